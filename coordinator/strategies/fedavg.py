"""Full-model FedAvg: the baseline. Every device trains the whole model, so devices whose
budget cannot hold whole-model training are excluded, as a real deployment must. (The whole
model less its frozen prefix, if it has one: those layers never train, and come cached.)"""
from __future__ import annotations

from dataclasses import dataclass

from coordinator.strategies.base import Assignment, FixedRounds, RoundPlan


@dataclass(frozen=True)
class FedAvgSettings:
    """[fedavg]"""
    rounds: int = 10


class FedAvg(FixedRounds):
    name = "fedavg"
    Settings = FedAvgSettings
    trains_without_labels = True    # the whole model, from its input: end-to-end SimCLR

    def __init__(self, *args, rounds: int = FedAvgSettings.rounds, **kwargs):
        super().__init__(*args, rounds=rounds, **kwargs)

    def plan_round(self, round_no, devices):
        first, last = self.first_trainable, len(self.manifest.layers) - 1   # the frozen prefix comes cached
        head = self.manifest.final_head.index
        assignments, idle = [], {}
        for d in devices:
            fit = self.fit(d, first, last)
            if fit is None:
                idle[d.device_id] = f"excluded: whole-model training does not fit {d.budget_bytes / 2**20:.0f} MB; " \
                                    + self.need_text(first, last)
                continue
            assignments.append(Assignment(d.device_id, first, last, tuple(range(first, last + 1)), head, *fit))
        return RoundPlan(round_no, tuple(assignments), idle, {"phase": "fedavg", "round": self.rounds_done})
