"""When a block has converged: ProFL's effective-movement rule.

ProFL freezes block t once its parameters stop going anywhere. The paper does not publish
the formula; ours is per-scalar net movement over a window divided by the path length,

    EM = mean over scalars of |sum_r dW_r| / sum_r |dW_r|     (r over the last `window` rounds)

which is near 1 while every round pushes a weight the same way (still learning) and small
when rounds cancel out (oscillating around an optimum). Calibration: for changes that are
independent noise, E|sum| / E sum|.| = 1/sqrt(window) (0.41 for a window of 6), and noise
around an optimum is mean-reverting, so lower still; the threshold must lie between
1/sqrt(window) and 1, and the default 0.5 does. A block freezes once EM has been below
`threshold` for `patience` consecutive rounds. Window, threshold and patience are
settings; EM is logged every round.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np


@dataclass(frozen=True)
class FreezeRule:
    window: int = 6
    threshold: float = 0.5
    patience: int = 2
    min_rounds: int = 0      # never freeze a block that has trained fewer rounds than this

    def __post_init__(self):
        if self.window < 2 or not 0 < self.threshold < 1 or self.patience < 1:
            raise ValueError("window >= 2, 0 < threshold < 1 and patience >= 1 are required")
        if self.threshold <= self.window ** -0.5:
            raise ValueError(f"threshold {self.threshold} is at or below 1/sqrt(window) = {self.window ** -0.5:.2f}, "
                             f"what pure noise scores: a converged block would never freeze")


@dataclass(frozen=True)
class FreezeSettings:
    """The rule's settings, as a schedule that freezes declares them in its table."""
    freeze_window: int = 6
    freeze_threshold: float = 0.5
    freeze_patience: int = 2

    def freeze_rule(self) -> FreezeRule:
        return FreezeRule(window=self.freeze_window, threshold=self.freeze_threshold, patience=self.freeze_patience)


def effective_movement(deltas: list[Mapping[str, np.ndarray]]) -> float:
    """Mean over scalars of |net movement| / path length across the given rounds' changes."""
    if not deltas:
        return float("nan")
    net_sum, count = 0.0, 0
    for name in deltas[0]:
        stack = np.stack([d[name].astype(np.float64).ravel() for d in deltas])
        path = np.abs(stack).sum(axis=0)
        moving = path > 0
        net_sum += float((np.abs(stack.sum(axis=0))[moving] / path[moving]).sum())
        count += int(moving.sum())
    return net_sum / count if count else 0.0


@dataclass
class BlockMovement:
    """Per-block history of round-to-round changes; says when the block may freeze."""
    rule: FreezeRule
    deltas: deque = field(default_factory=deque)
    below: int = 0
    rounds: int = 0
    history: list = field(default_factory=list)   # EM per round, for logs and plots

    def observe(self, before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray]) -> float:
        """Record one round's change of the block; return the round's EM (nan until the window fills)."""
        self.deltas.append({k: after[k] - before[k] for k in after})
        while len(self.deltas) > self.rule.window:
            self.deltas.popleft()
        self.rounds += 1
        em = effective_movement(list(self.deltas)) if len(self.deltas) == self.rule.window else float("nan")
        self.below = self.below + 1 if em == em and em < self.rule.threshold else 0
        self.history.append(em)
        return em

    @property
    def converged(self) -> bool:
        return self.rounds >= self.rule.min_rounds and self.below >= self.rule.patience


def restore_movement(rule: FreezeRule, names, changes, logged_ems, rounds: int) -> BlockMovement:
    """A BlockMovement as it was after `rounds` rounds of one stage, for a restarted coordinator.

    changes: the stage's (before, after) weight pairs, oldest first (only the last `window`
    are read); logged_ems: the stage's logged movements (None before the window filled).
    The per-round changes are as large as the block, so they are rebuilt from stored
    weights rather than kept in the strategy's state.
    """
    movement = BlockMovement(rule)
    for before, after in list(changes)[-rule.window:]:
        movement.deltas.append({k: after[k] - before[k] for k in names})
    ems = list(logged_ems)[-rounds:] if rounds else []
    movement.rounds = rounds
    movement.history = [float("nan") if em is None else em for em in ems]
    for em in ems:
        movement.below = movement.below + 1 if em is not None and em < rule.threshold else 0
    return movement


def round_report(em_log, round_no: int, rule: FreezeRule) -> dict:
    """The movement a schedule logged for a round, beside the threshold it is held against."""
    for entry in reversed(em_log):
        if entry["round"] == round_no:
            return {"effective_movement": entry["effective_movement"], "freeze_threshold": rule.threshold}
    return {}
