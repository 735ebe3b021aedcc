"""FedIN: federated intermediate layers learning (Chan et al., arXiv 2304.00759): a model per tier.

The model is a family (Manifest.members, coordinator/model/zoo.py `fmnist_fedin`): one shared
extractor, one shared classifier, and per member its own intermediate layers, deeper or wider
for richer tiers. Each device trains the largest member its measured budget holds, at the
largest batch that fits (the profile's prediction plus margin, as every schedule fits parts);
a device that fits not even the smallest is idle, told what it would need.

Knowledge crosses architectures through features, not weights:

- a device asked to share (`share_rows` > 0) puts a few rows of its trained member's features
  in its update: s_in (the extractor's output), s_out (the classifier's input) and labels
  (coordinator/strategies/shared_features.py checks them like parameters). `share_noise` adds
  Gaussian noise to them on the device; `share_features = false` shares nothing, which also
  turns IN training off;
- aggregate() builds one shared batch from the round's accepted rows, each tagged with its
  device's origin, and the next round's tasks carry it;
- on the device, besides cross-entropy on its own data, the member's intermediate layers are
  trained to map the other devices' s_in to their s_out (MSE), reconciled with the local
  gradient by a GEM-style projection: the IN gradient is projected onto the half-space where it
  does not oppose the local one (edge_runtime/train/reconcile.py), then added with `in_weight`.

Aggregation is the shared rule by parameter name over the devices that trained it, which is
exactly FedIN's: the extractor and classifier over every device, a member's intermediate
layers over the devices of that member only. The coordinator tests every member's model on
the global test set each round (evaluations()).

`member` = a name restricts every device to that member (devices that cannot hold it idle):
with in_weight 0 that is FedAvg of one architecture, the baselines the benchmark compares
against (tools/bench_fedin.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

from coordinator.strategies.base import Assignment, Device, FixedRounds, RoundPlan
from coordinator.strategies.shared_features import assemble
from edge_runtime.wire import weights as wcodec
from edge_runtime.wire.part import TrainablePart
from edge_runtime.wire.train_config import MAX_SHARE_ROWS


@dataclass(frozen=True)
class FedINSettings:
    """[fedin]: rounds; IN training (in_weight 0: off); what devices share; `member` to train one member only."""
    rounds: int = 10
    in_weight: float = 1.0          # lambda: the (projected) IN gradient's weight beside the local gradient
    in_batch_size: int = 32         # shared rows per IN step
    share_features: bool = True     # false: devices share nothing (and no IN training happens)
    share_rows: int = 32            # rows each device shares per round
    share_noise: float = 0.0        # Gaussian noise on shared features, as a fraction of each tensor's std
    max_shared_rows: int = 512      # rows of the shared batch a task carries (an equal share per device)
    member: str = ""                # "": each device its largest member; a name: that member only


class FedIN(FixedRounds):
    name = "fedin"
    Settings = FedINSettings
    trains_family = True

    def __init__(self, *args, rounds: int = 10, in_weight: float = 1.0, in_batch_size: int = 32,
                 share_features: bool = True, share_rows: int = 32, share_noise: float = 0.0,
                 max_shared_rows: int = 512, member: str = "", seed: int = 0, **kwargs):
        super().__init__(*args, rounds=rounds, **kwargs)
        m = self.manifest
        if not m.members:
            raise ValueError(f"fedin needs a model family (a manifest with members); {m.model} is one architecture: "
                             f"use --model fmnist_fedin or cifar_fedin, or give your BlockModel members=")
        if rounds < 1 or in_weight < 0 or in_batch_size < 1 or share_noise < 0 or max_shared_rows < 1 \
                or not 0 <= share_rows <= MAX_SHARE_ROWS:
            raise ValueError(f"need rounds >= 1, in_weight >= 0, in_batch_size >= 1, share_noise >= 0, "
                             f"max_shared_rows >= 1 and share_rows in 0..{MAX_SHARE_ROWS}")
        if member:
            m.member(member)   # ManifestError naming the members
        self.in_weight, self.in_batch_size = in_weight, in_batch_size
        self.share_rows = share_rows if share_features else 0
        self.share_noise, self.max_shared_rows, self.only, self.seed = share_noise, max_shared_rows, member, seed
        self.parts = {x.name: TrainablePart.member(m, x.name) for x in m.members}
        self.origins: dict[str, int] = {}   # device -> its tag in shared batches, in the order devices shared
        self.shared: str | None = None      # blob of the shared batch the next round's tasks carry

    @classmethod
    def constructor_args(cls, settings, seed: int) -> dict:
        return {**asdict(settings), "seed": seed}

    @property
    def in_training(self) -> bool:
        return self.in_weight > 0 and self.share_rows > 0

    # -- planning ----------------------------------------------------------------------------
    def member_of(self, assignment: Assignment) -> str | None:
        found = self.manifest.member_of(assignment.skip)
        return found.name if found else None

    def _fit(self, device: Device) -> tuple[str, tuple[int, int]] | None:
        names = [self.only] if self.only else [x.name for x in reversed(self.manifest.members)]
        for name in names:
            part = self.parts[name]
            fit = self.fit(device, part.span[0], part.span[-1], skip=part.skip)
            if fit is not None:
                return name, fit
        return None

    def plan_round(self, round_no, devices):
        assignments, idle = [], {}
        for d in devices:
            chosen = self._fit(d)
            if chosen is None:
                name = self.only or self.manifest.members[0].name
                part = self.parts[name]
                smallest = self.batch_sizes[-1]
                need = self.predict(part.span[0], part.span[-1], smallest, skip=part.skip) * (1 + self.margin)
                idle[d.device_id] = (f"{'excluded' if self.only else 'fits no member'}: member {name} needs "
                                     f"{need / 2**20:.0f} MB at batch {smallest} (with margin), the budget is "
                                     f"{d.budget_bytes / 2**20:.0f} MB")
                continue
            name, (batch, peak) = chosen
            part = self.parts[name]
            assignments.append(Assignment(d.device_id, part.span[0], part.span[-1], part.trainable_layers, part.head,
                                          batch, peak, skip=part.skip))
        phase = f"fedavg {self.only}" if self.only and not self.in_training else "fedin"
        return RoundPlan(round_no, tuple(assignments), idle, {"phase": phase, "round": self.rounds_done})

    def train_settings(self, assignment: Assignment) -> dict:
        origin = self.origins.get(assignment.device_id, -1)
        return {"in_weight": self.in_weight if self.in_training and self.shared else 0.0,
                "in_batch_size": self.in_batch_size, "share_rows": self.share_rows if self.in_training else 0,
                "share_noise": self.share_noise, "in_origin": origin}

    def task_features(self, assignment: Assignment) -> str | None:
        return self.shared if self.in_training else None

    def evaluations(self) -> dict[str, tuple[int, ...]]:
        return {x.name: self.parts[x.name].skip for x in self.manifest.members}

    # -- a round's results -------------------------------------------------------------------
    def aggregate(self, plan, results, failures, global_weights):
        """The shared rule by name (extractor and classifier over all, a member's layers within it); then the
        next round's shared batch from the rows the accepted devices sent."""
        new = super().aggregate(plan, results, failures, global_weights)
        shared = []
        for r in sorted(results, key=lambda r: r.assignment.device_id):
            if r.features:
                device = r.assignment.device_id
                self.origins.setdefault(device, len(self.origins))
                shared.append((self.origins[device], r.features))
        batch = assemble(shared, self.max_shared_rows, seed=self.seed * 7919 + self.rounds_done)
        if batch is not None:
            self.shared = self.vault.put_bytes(wcodec.encode(batch))
        return new

    def state(self):
        return {**super().state(), "origins": dict(self.origins), "shared": self.shared}

    def load_state(self, state: Mapping):
        super().load_state(state)
        self.origins = {str(k): int(v) for k, v in (state.get("origins") or {}).items()}
        self.shared = state.get("shared")

    def blobs_in_use(self) -> tuple[set[str], set[str]]:
        return set(), ({self.shared} if self.shared else set())

