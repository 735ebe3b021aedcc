"""When a block has converged: its accuracy on held-out data has stopped rising.

ProFL freezes block t once it has converged and reads that from the block's parameters
(effective movement: their net movement over a window against the path they took). On
this product's federated rounds (several local epochs of AdamW on non-IID devices) that
measure stayed at 0.6-0.95 in every stage, whether the block still improved or not, and
never froze a block; the devices' training loss kept falling 5-15 % a round on blocks
whose test accuracy had been flat for six rounds (docs/benchmarks.md). Both measure the
fit to data the devices train on. The rule here reads convergence where it matters, on
labeled data no device holds ([service] validation_data, disjoint from the test set the
rounds are reported on):

    a_r   = the stage's sub-model (frozen blocks, block t, its head) accuracy on the
            validation set after round r, in percentage points
    slope = the least-squares slope of the last `window` a_r, in points per round

A block freezes once the slope has stayed under `threshold` for `patience` rounds in a
row. The slope, not the last change, because one round's accuracy swings by 1-2 points
here: over a window of 5 a slope's noise is sigma / sqrt(10), about 0.2 points for a
sigma of 0.7, so the default threshold of 0.25 points a round freezes a flat block most
rounds and a block still gaining a point a round almost never. Calibrated and checked on
a recorded federated run (tools/bench_freezing.py, tests/test_freezing.py).

Without validation data the rule has nothing to read: every block trains to its cap
(the coordinator says so when it starts).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

# (weights, last layer of the sub-model) -> its accuracy on the coordinator's validation set, in [0, 1]
Validator = Callable[[Mapping[str, np.ndarray], int], float]


@dataclass(frozen=True)
class FreezeRule:
    window: int = 5           # rounds the slope is fitted over
    threshold: float = 0.25   # points of validation accuracy a round: a slope under it counts as converged
    patience: int = 1         # slopes in a row under the threshold before the block freezes
    min_rounds: int = 0       # never freeze a block that has trained fewer rounds than this

    def __post_init__(self):
        if self.window < 3 or self.threshold <= 0 or self.patience < 1:
            raise ValueError("freeze_window >= 3, freeze_threshold > 0 (points per round) and freeze_patience >= 1 "
                             "are required")

    @property
    def earliest(self) -> int:
        """The fewest rounds of a stage after which the rule can freeze its block."""
        return self.window + self.patience - 1

    def can_decide(self, cap: int) -> bool:
        """Whether the rule could end a stage capped at `cap` rounds before its cap."""
        return self.earliest < cap

    def fewest_rounds(self, min_rounds: int, cap: int, measured: bool) -> int:
        """The fewest rounds a stage can take: its minimum, or what the rule needs to decide when it has a
        validation measure to read (`measured`), within the cap; the cap itself without one."""
        return min(cap, max(min_rounds, self.earliest)) if measured else cap


@dataclass(frozen=True)
class FreezeSettings:
    """The rule's settings, as a schedule that freezes declares them in its table."""
    freeze_window: int = 5
    freeze_threshold: float = 0.25
    freeze_patience: int = 1

    def freeze_rule(self) -> FreezeRule:
        return FreezeRule(window=self.freeze_window, threshold=self.freeze_threshold, patience=self.freeze_patience)


def accuracy_slope(points: Sequence[float]) -> float:
    """The least-squares slope of equally spaced values (per step); NaN for fewer than two."""
    y = np.asarray(points, np.float64)
    if len(y) < 2:
        return float("nan")
    x = np.arange(len(y)) - (len(y) - 1) / 2
    return float((x * (y - y.mean())).sum() / (x * x).sum())


@dataclass
class BlockProgress:
    """One stage's validation accuracies; says when its block (or layer) may freeze. All of it is in state()."""
    rule: FreezeRule
    points: list = field(default_factory=list)   # the last `window` accuracies, in points
    below: int = 0
    rounds: int = 0

    def observe(self, accuracy: float | None) -> float:
        """Record one round's validation accuracy (in [0, 1]; None: not measured); return the round's slope in
        points per round (NaN until `window` rounds have one)."""
        self.rounds += 1
        if accuracy is None or not math.isfinite(accuracy):
            self.below = 0
            return float("nan")
        self.points = (self.points + [100.0 * accuracy])[-self.rule.window:]
        slope = accuracy_slope(self.points) if len(self.points) == self.rule.window else float("nan")
        self.below = self.below + 1 if math.isfinite(slope) and slope < self.rule.threshold else 0
        return slope

    @property
    def converged(self) -> bool:
        return self.rounds >= self.rule.min_rounds and self.below >= self.rule.patience

    def state(self) -> dict:
        return {"points": self.points, "below": self.below, "rounds": self.rounds}

    @classmethod
    def from_state(cls, rule: FreezeRule, state: Mapping | None) -> "BlockProgress":
        """As state() left it; a fresh record for a state without one (a run stored by an earlier version)."""
        if not state:
            return cls(rule)
        return cls(rule, [float(p) for p in state.get("points", [])][-rule.window:], int(state.get("below", 0)),
                   int(state.get("rounds", 0)))


def freeze_entry(round_no: int, unit: str, index: int, accuracy: float | None, slope: float) -> dict:
    """A round's line of a schedule's freezing log (None for what has no value: NaN is not JSON)."""
    return {"round": round_no, unit: index,
            "validation_accuracy": accuracy if accuracy is not None and math.isfinite(accuracy) else None,
            "accuracy_slope": slope if math.isfinite(slope) else None}


def round_report(freeze_log, round_no: int, rule: FreezeRule) -> dict:
    """What a schedule logged for a round, beside the threshold the slope is held against."""
    for entry in reversed(freeze_log):
        if entry["round"] == round_no and "accuracy_slope" in entry:
            return {"validation_accuracy": entry["validation_accuracy"], "accuracy_slope": entry["accuracy_slope"],
                    "freeze_threshold": rule.threshold, "freeze_window": rule.window}
    return {}
