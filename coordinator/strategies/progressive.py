"""ProFL: progressive training against the memory wall (Wu, Li, Xu; KDD 2025).

Only one block (and its small output head) trains at a time, from the cached activations
of the frozen blocks before it, so a device needs the memory of that block, not of the model.

- Shrinking stage, back to front: blocks T-1 .. 1 each train with their output head for
  `shrink_rounds` rounds on top of the still-initial prefix, which gives every block and
  head starting parameters shaped by the position they will hold. (Block 0 is skipped: it
  is the growing stage's first step anyway.) shrink_rounds=0 turns the stage off.
- A model with a frozen prefix (Manifest.frozen_prefix) starts where its first trainable
  layer is: block 0 above means that layer's block, whose frozen layers stay in the cached
  prefix, and blocks wholly inside the prefix never get a stage.
- Growing stage, front to back: block t trains with its head on top of the trained,
  frozen prefix until the freezing rule (coordinator/strategies/freezing.py: the sub-model's
  accuracy on the coordinator's validation set has stopped rising) says it has converged
  (after `min_rounds_per_block`) or `max_rounds_per_block` is reached; then it freezes and
  block t+1 starts. The last block's head is the real classifier.
- A device takes part in a stage only if the stage's sub-model is predicted to fit its
  measured budget; a device with room trains blocks t .. t+k together (k up to
  `max_extra_blocks`) with block t+k's head, which pre-trains the blocks that follow.
"""
from __future__ import annotations

from dataclasses import dataclass

from coordinator.strategies.base import Assignment, RoundPlan, Strategy
from coordinator.strategies.freezing import BlockProgress, FreezeRule, FreezeSettings, freeze_entry, round_report


@dataclass(frozen=True)
class ProgressiveSettings(FreezeSettings):
    """[progressive]: the stages' round bounds and the freezing rule (the cap leaves the rule room: it can freeze a
    block after freeze_window + freeze_patience - 1 rounds)."""
    shrink_rounds: int = 1
    min_rounds_per_block: int = 2
    max_rounds_per_block: int = 12
    max_extra_blocks: int = 1


class Progressive(Strategy):
    name = "progressive"
    Settings = ProgressiveSettings

    @classmethod
    def constructor_args(cls, settings: ProgressiveSettings, seed: int) -> dict:
        return dict(shrink_rounds=settings.shrink_rounds, min_rounds_per_block=settings.min_rounds_per_block,
                    max_rounds_per_block=settings.max_rounds_per_block, max_extra_blocks=settings.max_extra_blocks,
                    freeze_rule=settings.freeze_rule())

    def __init__(self, *args, shrink_rounds: int = ProgressiveSettings.shrink_rounds,
                 min_rounds_per_block: int = ProgressiveSettings.min_rounds_per_block,
                 max_rounds_per_block: int = ProgressiveSettings.max_rounds_per_block,
                 max_extra_blocks: int = ProgressiveSettings.max_extra_blocks, freeze_rule: FreezeRule = FreezeRule(),
                 **kwargs):
        super().__init__(*args, **kwargs)
        if not 1 <= min_rounds_per_block <= max_rounds_per_block:
            raise ValueError("need 1 <= min_rounds_per_block <= max_rounds_per_block")
        self.shrink_rounds = shrink_rounds
        self.min_rounds = min_rounds_per_block
        self.max_rounds = max_rounds_per_block
        self.max_extra_blocks = max_extra_blocks
        self.rule = freeze_rule
        n = len(self.manifest.blocks)
        self.first_block = self.manifest.layers[self.first_trainable].block   # the first block that can train
        self.phase = "shrinking" if shrink_rounds > 0 and n - self.first_block > 1 else "growing"
        self.block = n - 1 if self.phase == "shrinking" else self.first_block
        self.rounds_in_stage = 0
        self.progress = BlockProgress(self.rule)
        self.freeze_log: list[dict] = []

    # -- stages -------------------------------------------------------------------------------
    def _span(self, first_block: int, last_block: int) -> tuple[int, int]:
        """The layers blocks first..last train: less the frozen prefix, which the device reads from its cache."""
        first = max(self.manifest.blocks[first_block].layers[0], self.first_trainable)
        return first, self.manifest.blocks[last_block].layers[-1]

    def plan_round(self, round_no, devices):
        if self.finished:
            return RoundPlan(round_no, (), {d.device_id: "training is finished" for d in devices},
                             {"phase": "done"})
        n = len(self.manifest.blocks)
        extra_allowed = self.max_extra_blocks if self.phase == "growing" else 0
        assignments, idle = [], {}
        for d in devices:
            chosen = None
            for k in range(min(extra_allowed, n - 1 - self.block), -1, -1):  # the most blocks that fit
                first, last = self._span(self.block, self.block + k)
                fit = self.fit(d, first, last)
                if fit is not None:
                    chosen = (first, last, self.block + k, fit)
                    break
            if chosen is None:
                first, last = self._span(self.block, self.block)
                idle[d.device_id] = f"block {self.block} does not fit {d.budget_bytes / 2**20:.0f} MB; " \
                                    + self.need_text(first, last)
                continue
            first, last, last_block, (batch, peak) = chosen
            assignments.append(Assignment(d.device_id, first, last, tuple(range(first, last + 1)),
                                          self.manifest.blocks[last_block].head, batch, peak))
        return RoundPlan(round_no, tuple(assignments), idle,
                         {"phase": self.phase, "block": self.block, "round_in_stage": self.rounds_in_stage})

    def advance(self, plan, before, after, results=()):
        if self.finished or not plan.assignments:
            return  # nobody trained: the stage stays where it is
        self.rounds_in_stage += 1
        if self.phase == "shrinking":
            if self.rounds_in_stage >= self.shrink_rounds:
                self._next_stage()
            return
        # the stage's model as the rule judges it: as trained, through the deepest part of the round and its head
        # (devices with room train the next block too, with its head: then this block's head may never train)
        deepest = max(a.last for a in plan.assignments)
        accuracy = self.validate(after, deepest) if self.validate else None
        slope = self.progress.observe(accuracy)
        self.freeze_log.append(freeze_entry(plan.round, "block", self.block, accuracy, slope))
        converged = self.rounds_in_stage >= self.min_rounds and self.progress.converged
        if converged or self.rounds_in_stage >= self.max_rounds:
            self._next_stage()

    def _next_stage(self):
        n = len(self.manifest.blocks)
        self.rounds_in_stage = 0
        self.progress = BlockProgress(self.rule)
        if self.phase == "shrinking":
            self.block -= 1
            if self.block <= self.first_block:
                self.phase, self.block = "growing", self.first_block
        else:
            self.block += 1
            if self.block >= n:
                self.phase = "done"

    @property
    def finished(self):
        return self.phase == "done"

    def rounds_left(self) -> tuple[int, int]:
        if self.finished:
            return 0, 0
        n = len(self.manifest.blocks)
        grow = n - self.first_block   # every block that can train has a growing stage
        if self.phase == "shrinking":   # this block's shrink rounds, the blocks down to first_block + 1, then growing
            shrink = (self.shrink_rounds - self.rounds_in_stage
                      + (self.block - self.first_block - 1) * self.shrink_rounds)
            return shrink + grow * self._fewest(), shrink + grow * self.max_rounds
        later = n - 1 - self.block
        return (max(1, self._fewest() - self.rounds_in_stage) + later * self._fewest(),
                self.max_rounds - self.rounds_in_stage + later * self.max_rounds)

    def reads_validation(self) -> bool:
        return self.rule.can_decide(self.max_rounds)

    def _fewest(self) -> int:
        """The fewest rounds a growing stage can take (FreezeRule.fewest_rounds)."""
        return self.rule.fewest_rounds(self.min_rounds, self.max_rounds, self.validate is not None)

    def round_report(self, round_no: int) -> dict:
        return round_report(self.freeze_log, round_no, self.rule)

    # -- persistence ------------------------------------------------------------------------
    def state(self):
        return {"phase": self.phase, "block": self.block, "rounds_in_stage": self.rounds_in_stage,
                "freeze_log": self.freeze_log, "progress": self.progress.state()}

    def load_state(self, state):
        """Restore the stage and its freezing record (a state from an earlier rule: the record starts anew)."""
        self.phase, self.block = state["phase"], int(state["block"])
        self.rounds_in_stage = int(state["rounds_in_stage"])
        self.freeze_log = list(state.get("freeze_log", []))
        self.progress = BlockProgress.from_state(self.rule, state.get("progress"))
