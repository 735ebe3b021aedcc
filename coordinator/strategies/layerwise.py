"""Federated layer-wise learning with depth dropout (Guo et al., arXiv 2309.05213).

One layer trains at a time, front to back, plus a head (layers of the model's frozen
prefix never train: the first is the one after it). By default the head is the small
output head right after that layer (greedy layer-wise learning): the device's graph is
the layer and its head, with the frozen layers before it read from its activation
cache, so its memory is one layer's. `frozen_after` keeps that many frozen layers after
the trainable one in the graph (they run forward and pass gradients back; -1 keeps all of
them, up to the final head). A layer advances after `rounds_per_layer` rounds, or earlier
once the freezing rule (coordinator/strategies/freezing.py: the accuracy through it on the
coordinator's validation set has stopped rising) says it has converged.

Depth dropout: each frozen skippable (residual) layer in a device's graph is skipped for
that device in a round with probability `dropout`; the device neither computes it nor
holds its activations. With the prefix cached, those are the frozen layers after the
trainable one. A device whose disk is below `min_cache_disk_bytes` cannot keep the
prefix's activation cache, so its part starts at layer 0 and recomputes the prefix every
batch; dropout then skips skippable prefix layers too.

A part's memory is fitted as the profile's prediction for its whole span (an upper bound:
frozen layers keep no optimizer state, and skipped layers cost nothing).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from coordinator.strategies.base import Assignment, RoundPlan, Strategy
from coordinator.strategies.freezing import BlockProgress, FreezeRule, FreezeSettings, freeze_entry, round_report


@dataclass(frozen=True)
class LayerWiseSettings(FreezeSettings):
    """[layerwise]: rounds per layer, depth dropout, and its own freezing rule."""
    rounds_per_layer: int = 3
    min_rounds_per_layer: int = 1
    dropout: float = 0.0
    frozen_after: int = 0
    min_cache_disk_mb: float = 256.0


class LayerWise(Strategy):
    name = "layerwise"
    Settings = LayerWiseSettings
    trains_without_labels = True    # FLL's setting: self-supervised, a layer at a time, depth dropout on the prefix

    @classmethod
    def constructor_args(cls, settings: LayerWiseSettings, seed: int) -> dict:
        return dict(rounds_per_layer=settings.rounds_per_layer, min_rounds_per_layer=settings.min_rounds_per_layer,
                    dropout=settings.dropout, frozen_after=settings.frozen_after,
                    min_cache_disk_bytes=int(settings.min_cache_disk_mb * 2**20), seed=seed,
                    freeze_rule=settings.freeze_rule())

    def __init__(self, *args, rounds_per_layer: int = LayerWiseSettings.rounds_per_layer,
                 min_rounds_per_layer: int = LayerWiseSettings.min_rounds_per_layer,
                 dropout: float = LayerWiseSettings.dropout, frozen_after: int = LayerWiseSettings.frozen_after,
                 min_cache_disk_bytes: int = int(LayerWiseSettings.min_cache_disk_mb * 2**20),
                 freeze_rule: FreezeRule = FreezeRule(), seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        if not 1 <= min_rounds_per_layer <= rounds_per_layer or not 0 <= dropout < 1 or frozen_after < -1:
            raise ValueError("need 1 <= min_rounds_per_layer <= rounds_per_layer, 0 <= dropout < 1 and "
                             "frozen_after >= -1")
        self.frozen_after = frozen_after
        self.rounds_per_layer, self.min_rounds = rounds_per_layer, min_rounds_per_layer
        self.dropout, self.min_cache_disk_bytes, self.seed = dropout, min_cache_disk_bytes, seed
        self.rule = freeze_rule
        m = self.manifest
        self.last = len(m.layers) - 1
        self.layers = list(self.trainable(l.index for l in m.layers if l.params))   # the units that train, in order
        self.position = 0
        self.rounds_in_stage = 0
        self.progress = BlockProgress(self.rule)
        self.freeze_log: list[dict] = []

    @property
    def layer(self) -> int:
        return self.layers[self.position]

    def _end(self) -> int:
        """The last layer of the parts this stage: the trainable one plus `frozen_after`, at a head."""
        if self.frozen_after < 0:
            return self.last
        cuts = [c for c in self.manifest.cut_points() if c >= min(self.layer + self.frozen_after, self.last)]
        return cuts[0] if cuts else self.last

    def _skips(self, round_no: int, device_id: str, first: int, end: int) -> tuple[int, ...]:
        """This device's dropped layers this round: frozen, skippable, in its span; reproducible."""
        if self.dropout == 0:
            return ()
        rng = np.random.default_rng([self.seed, round_no, zlib.crc32(device_id.encode())])
        frozen = [i for i in range(first, end + 1) if i != self.layer and self.manifest.layers[i].skippable]
        return tuple(i for i in frozen if rng.random() < self.dropout)

    def plan_round(self, round_no, devices):
        if self.finished:
            return RoundPlan(round_no, (), {d.device_id: "training is finished" for d in devices}, {"phase": "done"})
        end = self._end()
        head = self.manifest.head_for_boundary(end)
        assignments, idle = [], {}
        for d in devices:
            # a contrastive model's views are fresh every step: nothing to cache, the frozen layers run each batch
            cached = not self.manifest.contrastive and \
                (d.disk_free_bytes == 0 or d.disk_free_bytes >= self.min_cache_disk_bytes)
            first = self.layer if cached else 0
            fit = self.fit(d, first, end)
            if fit is None:
                idle[d.device_id] = f"layer {self.layer} does not fit {d.budget_bytes / 2**20:.0f} MB; " \
                                    + self.need_text(first, end)
                continue
            assignments.append(Assignment(d.device_id, first, end, (self.layer,), head, *fit,
                                          skip=self._skips(round_no, d.device_id, first, end)))
        return RoundPlan(round_no, tuple(assignments), idle,
                         {"phase": "layerwise", "layer": self.layer, "round_in_stage": self.rounds_in_stage})

    def advance(self, plan, before, after, results=()):
        if self.finished or not plan.assignments:
            return
        self.rounds_in_stage += 1
        # through the layer and the head the stage trains it with (its head after an untrained layer is chance)
        accuracy = self.validate(after, self._end()) if self.validate else None
        slope = self.progress.observe(accuracy)
        self.freeze_log.append(freeze_entry(plan.round, "layer", self.layer, accuracy, slope))
        converged = self.rounds_in_stage >= self.min_rounds and self.progress.converged
        if converged or self.rounds_in_stage >= self.rounds_per_layer:
            self.position += 1
            self.rounds_in_stage = 0
            self.progress = BlockProgress(self.rule)

    @property
    def finished(self):
        return self.position >= len(self.layers)

    def rounds_left(self) -> tuple[int, int]:
        if self.finished:
            return 0, 0
        later = len(self.layers) - 1 - self.position
        return (max(1, self._fewest() - self.rounds_in_stage) + later * self._fewest(),
                self.rounds_per_layer - self.rounds_in_stage + later * self.rounds_per_layer)

    def reads_validation(self) -> bool:
        return self.rule.can_decide(self.rounds_per_layer)

    def _fewest(self) -> int:
        """The fewest rounds a stage can take (FreezeRule.fewest_rounds)."""
        return self.rule.fewest_rounds(self.min_rounds, self.rounds_per_layer, self.validate is not None)

    def round_report(self, round_no: int) -> dict:
        return round_report(self.freeze_log, round_no, self.rule)

    def state(self):
        return {"position": self.position, "rounds_in_stage": self.rounds_in_stage, "freeze_log": self.freeze_log,
                "progress": self.progress.state()}

    def load_state(self, state):
        self.position = int(state.get("position", 0))
        self.rounds_in_stage = int(state.get("rounds_in_stage", 0))
        self.freeze_log = list(state.get("freeze_log", []))
        self.progress = BlockProgress.from_state(self.rule, state.get("progress"))
