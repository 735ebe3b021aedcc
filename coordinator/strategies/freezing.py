"""When a block has converged: the fleet's training loss on it stops improving.

ProFL freezes block t once it has converged, and reads convergence from the block's
parameters (effective movement: their net movement over a window against the path they
took). On this product's federated rounds (several local epochs of Adam on non-IID
devices) that measure stayed at 0.6-0.95 in every stage, whether the block still improved
or not, and never froze a block (docs/benchmarks.md): a block's weights keep drifting the
same way long after the drift stops helping. The rule here reads convergence where it
shows, in the loss the devices report for the part they trained:

    gain_r   = median over devices d that trained the same part in rounds r-1 and r of
               (L_d,r-1 - L_d,r) / L_d,r-1
    signal_r = mean of gain over the last `window` rounds

L_d,r is the mean training loss device d reported for round r (over its local epochs,
from the round's weights). Each device is compared with itself, which cancels the
differences between devices' data (non-IID: one device's loss says nothing of another's);
the median keeps one device (a straggler, a poisoner) from deciding; the window smooths the
noise of sampling. A block freezes once the signal has stayed under `threshold` (a gain of
1 % a round by default) for `patience` consecutive rounds. Calibrated and checked on
recorded federated runs (tests/test_freezing.py, tools/record_freezing.py).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np


@dataclass(frozen=True)
class FreezeRule:
    window: int = 3          # rounds whose gains are averaged
    threshold: float = 0.01  # a smoothed relative loss gain per round under this counts as converged
    patience: int = 2        # consecutive rounds under the threshold before the block freezes
    min_rounds: int = 0      # never freeze a block that has trained fewer rounds than this

    def __post_init__(self):
        if self.window < 1 or not 0 < self.threshold < 1 or self.patience < 1:
            raise ValueError("freeze_window >= 1, 0 < freeze_threshold < 1 and freeze_patience >= 1 are required")

    @property
    def earliest(self) -> int:
        """The fewest rounds of a stage after which the rule can freeze its block: a gain needs two rounds, the
        signal `window` gains, the decision `patience` signals."""
        return self.window + self.patience


@dataclass(frozen=True)
class FreezeSettings:
    """The rule's settings, as a schedule that freezes declares them in its table."""
    freeze_window: int = 3
    freeze_threshold: float = 0.01
    freeze_patience: int = 2

    def freeze_rule(self) -> FreezeRule:
        return FreezeRule(window=self.freeze_window, threshold=self.freeze_threshold, patience=self.freeze_patience)


def part_key(device_id: str, first: int, last: int, head: int | None) -> str:
    """What a device's loss is comparable across rounds for: the same device, span and head."""
    return f"{device_id}:{first}-{last}:{head}"


def round_gain(previous: Mapping[str, float], current: Mapping[str, float]) -> float:
    """The median over the parts in both rounds of the relative loss improvement; NaN when none is in both."""
    gains = [(previous[k] - current[k]) / previous[k] for k in current.keys() & previous.keys() if previous[k] > 0]
    return float(np.median(gains)) if gains else float("nan")


def losses_of(results: Iterable) -> dict[str, float]:
    """{part_key: loss} of a round's results (coordinator.strategies.base.Result), finite positive losses only."""
    out = {}
    for r in results:
        a = r.assignment
        if r.loss is not None and math.isfinite(r.loss) and r.loss > 0:
            out[part_key(a.device_id, a.first, a.last, a.head)] = float(r.loss)
    return out


@dataclass
class BlockProgress:
    """One stage's record of the fleet's losses; says when its block (or layer) may freeze."""
    rule: FreezeRule
    losses: dict[str, float] = field(default_factory=dict)   # the last round's, by part_key
    gains: deque = field(default_factory=deque)              # the last `window` rounds' gains
    below: int = 0
    rounds: int = 0

    def observe(self, losses: Mapping[str, float]) -> float:
        """Record one round's losses ({part_key: loss}); return the round's signal (NaN until `window` gains)."""
        gain = round_gain(self.losses, losses)
        self.losses = dict(losses)
        self.rounds += 1
        if math.isfinite(gain):
            self.gains.append(gain)
            while len(self.gains) > self.rule.window:
                self.gains.popleft()
        signal = float(np.mean(self.gains)) if len(self.gains) == self.rule.window else float("nan")
        self.below = self.below + 1 if math.isfinite(signal) and signal < self.rule.threshold else 0
        return signal

    @property
    def converged(self) -> bool:
        return self.rounds >= self.rule.min_rounds and self.below >= self.rule.patience

    def state(self) -> dict:
        return {"losses": self.losses, "gains": list(self.gains), "below": self.below, "rounds": self.rounds}

    @classmethod
    def from_state(cls, rule: FreezeRule, state: Mapping | None) -> "BlockProgress":
        """As state() left it; a fresh record for a state without one (a run stored by an earlier version)."""
        if not state:
            return cls(rule)
        return cls(rule, {str(k): float(v) for k, v in dict(state.get("losses", {})).items()},
                   deque(float(g) for g in state.get("gains", [])[-rule.window:]), int(state.get("below", 0)),
                   int(state.get("rounds", 0)))


def freeze_entry(round_no: int, unit: str, index: int, signal: float) -> dict:
    """A round's line of a schedule's freezing log: the signal (None until it has a value: NaN is not JSON)."""
    return {"round": round_no, unit: index, "loss_gain": signal if math.isfinite(signal) else None}


def round_report(freeze_log, round_no: int, rule: FreezeRule) -> dict:
    """The signal a schedule logged for a round, beside the threshold it is held against."""
    for entry in reversed(freeze_log):
        if entry["round"] == round_no and "loss_gain" in entry:
            return {"loss_gain": entry["loss_gain"], "freeze_threshold": rule.threshold,
                    "freeze_window": rule.window}
    return {}
