"""Federated layer-wise learning with depth dropout (Guo et al., arXiv 2309.05213).

One layer trains at a time, front to back, plus a head (layers of the model's frozen
prefix never train: the first is the one after it). By default the head is the small
output head right after that layer (greedy layer-wise learning): the device's graph is
the layer and its head, with the frozen layers before it read from its activation
cache, so its memory is one layer's. `frozen_after` keeps that many frozen layers after
the trainable one in the graph (they run forward and pass gradients back; -1 keeps all of
them, up to the final head). A layer advances after `rounds_per_layer` rounds, or earlier
once the effective-movement rule (coordinator/strategies/freezing.py) says it has converged.

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

import math
import zlib
from dataclasses import dataclass

import numpy as np

from coordinator.strategies.base import Assignment, RoundPlan, Strategy
from coordinator.strategies.freezing import BlockMovement, FreezeRule, FreezeSettings, restore_movement, round_report


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
        self.movement = BlockMovement(self.rule)
        self.em_log: list[dict] = []

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
            cached = d.disk_free_bytes == 0 or d.disk_free_bytes >= self.min_cache_disk_bytes
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
        names = self.manifest.param_names([self.layer], kind="param")
        em = self.movement.observe({k: before[k] for k in names}, {k: after[k] for k in names})
        self.em_log.append({"round": plan.round, "layer": self.layer,
                            "effective_movement": em if math.isfinite(em) else None})
        converged = self.rounds_in_stage >= self.min_rounds and self.movement.converged
        if converged or self.rounds_in_stage >= self.rounds_per_layer:
            self.position += 1
            self.rounds_in_stage = 0
            self.movement = BlockMovement(self.rule)

    @property
    def finished(self):
        return self.position >= len(self.layers)

    def rounds_left(self) -> tuple[int, int]:
        if self.finished:
            return 0, 0
        later = len(self.layers) - 1 - self.position
        return (max(1, self.min_rounds - self.rounds_in_stage) + later * self.min_rounds,
                self.rounds_per_layer - self.rounds_in_stage + later * self.rounds_per_layer)

    def round_report(self, round_no: int) -> dict:
        return round_report(self.em_log, round_no, self.rule)

    def state(self):
        return {"position": self.position, "rounds_in_stage": self.rounds_in_stage, "em_log": self.em_log}

    def load_state(self, state):
        self.position = int(state.get("position", 0))
        self.rounds_in_stage = int(state.get("rounds_in_stage", 0))
        self.em_log = list(state.get("em_log", []))
        self.movement = BlockMovement(self.rule)

    def history_rounds(self) -> int:
        return self.rule.window

    def replay(self, history, load):
        if self.finished or self.rounds_in_stage == 0:
            return
        mine = [(b, a) for stage, b, a in history if stage.get("layer") == self.layer][-self.rounds_in_stage:]
        changes = ((load(b), load(a)) for b, a in mine[-self.rule.window:])
        ems = [e["effective_movement"] for e in self.em_log if e["layer"] == self.layer]
        self.movement = restore_movement(self.rule, self.manifest.param_names([self.layer], kind="param"), changes, ems,
                                         self.rounds_in_stage)
