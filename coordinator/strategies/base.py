"""The contract every schedule follows: plan a round, aggregate it, advance.

A round's life:

1. plan_round(round, devices) decides who trains which span of layers, with which head
   and batch size, from each device's *measured* budget and the profiler's memory model.
   A device that fits nothing is left idle with a reason that says what it would need.
   No plan trains a layer of the model's frozen prefix (`first_trainable`, `trainable`).
2. aggregate(plan, results, failures, global_weights) returns the new global weights from
   the accepted results. Each parameter combines only the devices that trained it, by the
   [aggregation] rule (coordinator/strategies/aggregation.py: weighted mean, median, trimmed
   mean or clipped mean), each device weighted by its Result's weight (its sample count,
   capped by what is plausible); a parameter nobody trained keeps its value; with no results the
   global weights come back unchanged. Failures (timeouts, rejections, devices that went
   offline) are passed so a strategy can take them into account; they never stall it.
3. advance(plan, before, after) moves the schedule on (freezing, next stage) from what
   the round changed, and `finished` says when training is over.

A personalised schedule (`personalized`: pFedLA) gives each device weights of its own:
device_weights(device) names what a device's task starts from (None: the global weights),
each Result carries those as `start`, and the weights aggregate returns are only the
fleet's reference model. It keeps what it learns (per-device layers, hypernetworks) in the
coordinator's blob store through the WeightVault the service attaches, naming the blobs in
its state() and in blobs_in_use(), so a restarted coordinator finds them and the garbage
collector leaves them.

The service owns timing, MQTT and persistence; a strategy owns only decisions and
arithmetic. Its schedule state is a JSON-able dict (state/load_state), persisted with
every round so a restarted coordinator continues the same schedule.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Callable, ClassVar, Mapping, Protocol, Sequence

import numpy as np

from coordinator.strategies.aggregation import AggregationSettings, aggregate_updates
from coordinator.strategies.freezing import Validator
from edge_runtime.wire.part import TrainablePart

# peak bytes of training layers first..last (head after last) at a batch size; a family member's part (FedIN)
# passes the layers it skips as the keyword `skip`
PeakPredictor = Callable[..., float]


@dataclass(frozen=True)
class Device:
    device_id: str
    tier: str
    budget_bytes: int          # measured on the device and announced in its hello
    disk_free_bytes: int = 0   # announced too; 0 = unknown


@dataclass(frozen=True)
class Assignment:
    device_id: str
    first: int                 # first layer of the span (layers before it are the cached frozen prefix)
    last: int                  # last layer; the head attaches after it
    trainable: tuple[int, ...]
    head: int
    batch_size: int
    predicted_peak_bytes: int
    train_head: bool = True
    kind: str = "train"        # "score": the device scores the trainable layers and changes nothing
    skip: tuple[int, ...] = ()  # frozen layers of the span dropped this round (depth dropout)

    def part(self) -> TrainablePart:
        """The part a device job trains (or scores)."""
        return TrainablePart(span=tuple(range(self.first, self.last + 1)), trainable_layers=self.trainable,
                             head=self.head, train_head=self.train_head, skip=self.skip)

    def trained_names(self, manifest) -> list[str]:
        """The tensors this assignment's update must hold (none for a score task): TrainablePart.update_names."""
        if self.kind == "score":
            return []
        return self.part().update_names(manifest)


@dataclass(frozen=True)
class RoundPlan:
    round: int
    assignments: tuple[Assignment, ...]
    idle: Mapping[str, str] = field(default_factory=dict)   # device id -> why it trains nothing
    stage: Mapping = field(default_factory=dict)            # what the schedule is doing, for logs

    def trained_parameters(self, manifest) -> set[str]:
        return {n for a in self.assignments for n in a.trained_names(manifest)}

    def to_dict(self) -> dict:
        """The JSON form the state store keeps with the round."""
        return {"round": self.round, "assignments": [asdict(a) for a in self.assignments], "idle": dict(self.idle),
                "stage": dict(self.stage)}

    @classmethod
    def from_dict(cls, raw: Mapping) -> "RoundPlan":
        return cls(int(raw["round"]), tuple(assignment_from_dict(a) for a in raw["assignments"]),
                   dict(raw.get("idle", {})), dict(raw.get("stage", {})))


def stage_text(stage: Mapping, short: bool = False) -> str:
    """What a round's schedule was doing: 'growing block 2', 'layerwise layer 3', 'score'.

    short: a few characters for a timeline cell ('grow b2', 'layer 3', 'score').
    """
    phase = str(stage.get("phase", ""))
    if short:
        phase = {"shrinking": "shrink", "growing": "grow", "layerwise": "layer"}.get(phase, phase)
        if "block" in stage:
            return f"{phase} b{stage['block']}"
        if "layer" in stage:
            return f"layer {stage['layer']}"
        return phase or "-"
    for key in ("block", "layer"):
        if key in stage:
            return f"{phase} {key} {stage[key]}".strip()
    return phase or "-"


def assignment_from_dict(raw: Mapping) -> Assignment:
    return Assignment(raw["device_id"], int(raw["first"]), int(raw["last"]), tuple(raw["trainable"]), int(raw["head"]),
                      int(raw["batch_size"]), int(raw["predicted_peak_bytes"]), bool(raw.get("train_head", True)),
                      raw.get("kind", "train"), tuple(raw.get("skip", ())))


@dataclass(frozen=True)
class Result:
    assignment: Assignment
    update: Mapping[str, np.ndarray]   # trained values of the assignment's trainable parameters
    num_examples: int
    loss: float
    scores: Mapping | None = None      # a score task's answer: {layer index or "head": score}
    weight: float | None = None        # what the update weighs in aggregation; None = num_examples (as claimed)
    start: Mapping[str, np.ndarray] | None = None   # the weights the task started from, when they were the
    #                                                  device's own (a personalised schedule); None = the global ones
    features: Mapping[str, np.ndarray] | None = None   # the rows of features the device shared (FedIN), checked

    @property
    def aggregation_weight(self) -> float:
        """The weight aggregation gives this update: `weight` once the service has capped the claim, else the claim."""
        return float(self.num_examples if self.weight is None else self.weight)


class WeightVault(Protocol):
    """Where a schedule keeps weights beyond the global model: the coordinator's content-addressed blob store
    (coordinator/global_model.py). Every blob is named by its hash; the hashes go in the schedule's state."""

    def save(self, weights: Mapping[str, np.ndarray]) -> str:
        """Store model weights a layer per blob; the hash of the index naming them."""

    def load(self, index_sha: str) -> dict[str, np.ndarray]:
        """The weights an index names."""

    def put_bytes(self, data: bytes) -> str:
        """Store any bytes; their hash."""

    def get_bytes(self, sha: str) -> bytes:
        """The bytes of a blob, hash-checked."""


@dataclass(frozen=True)
class NoSettings:
    """A schedule with no settings of its own."""


class Strategy(ABC):
    """One published schedule. A subclass in a module of this package registers itself: it names
    itself (`name`, also its table in the coordinator's settings) and declares its settings and
    their defaults in `Settings`, a frozen dataclass beside its code."""
    name: ClassVar[str] = ""
    Settings: ClassVar[type] = NoSettings
    # each device trains a model of its own: its accuracy is measured on the rows it holds out
    # (TrainConfig.holdout), and the global test set sees only the fleet's reference model
    personalized: ClassVar[bool] = False
    # may train a model that learns without labels (Manifest.contrastive): its parts start at the model's input,
    # since two fresh views of every image each step leave no cached prefix to start from
    trains_without_labels: ClassVar[bool] = False
    # trains a model family's members (Manifest.members), not one architecture: FedIN
    trains_family: ClassVar[bool] = False

    def __init__(self, manifest, predict: PeakPredictor, batch_sizes: Sequence[int], margin: float = 0.10,
                 aggregation: AggregationSettings = AggregationSettings()):
        self.manifest = manifest
        self.predict = predict
        self.batch_sizes = sorted(set(batch_sizes), reverse=True)
        self.margin = margin
        self.aggregation = aggregation
        self.validate: Validator | None = None

    @classmethod
    def from_settings(cls, manifest, predict: PeakPredictor, table: Mapping, batch_sizes: Sequence[int],
                      margin: float, seed: int, aggregation: Mapping | None = None) -> "Strategy":
        """The strategy configured from its own table of the coordinator's settings, and the
        [aggregation] table every strategy shares (None: its defaults)."""
        return cls(manifest, predict, batch_sizes=batch_sizes, margin=margin,
                   aggregation=AggregationSettings(**(aggregation or {})),
                   **cls.constructor_args(cls.Settings(**table), seed))

    @classmethod
    def constructor_args(cls, settings, seed: int) -> dict:
        """The constructor's keyword arguments for a table of settings (by default: the same names)."""
        return asdict(settings)

    # -- the contract ---------------------------------------------------------------------
    @abstractmethod
    def plan_round(self, round_no: int, devices: Sequence[Device]) -> RoundPlan:
        """Who trains what this round."""

    def aggregate(self, plan: RoundPlan, results: Sequence[Result], failures: Mapping[str, str],
                  global_weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per parameter, the [aggregation] rule over the devices that trained it, each weighted by its Result's
        aggregation_weight; untouched parameters keep their values. Updates are read a parameter at a time."""
        new = dict(global_weights)
        trained = [(r.update, r.aggregation_weight) for r in results if r.update]
        new.update(aggregate_updates(trained, global_weights, self.aggregation) if trained else {})
        return new

    def advance(self, plan: RoundPlan, before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray],
                results: Sequence[Result] = ()) -> None:
        """Move the schedule on after a round (results: what the devices sent); the default has no stages."""

    @property
    @abstractmethod
    def finished(self) -> bool:
        """True once the schedule has nothing left to train."""

    def round_report(self, round_no: int) -> dict:
        """What the schedule measured in a round, for the round's metrics (e.g. the freezing metric)."""
        return {}

    @abstractmethod
    def rounds_left(self) -> tuple[int, int]:
        """(fewest, most) rounds the schedule can still take, for progress and time estimates.

        A schedule that freezes on a rule may finish before its caps: the two differ then.
        """

    def state(self) -> dict:
        return {}

    def load_state(self, state: Mapping) -> None:
        """Restore what state() returned (a restarted coordinator)."""

    # -- freezing --------------------------------------------------------------------------------
    def attach_validation(self, validate: Validator | None) -> None:
        """Give the schedule the coordinator's validation set, as a function (None: the coordinator has none): a
        schedule that freezes reads its stages' progress from it (coordinator/strategies/freezing.py)."""
        self.validate = validate

    def reads_validation(self) -> bool:
        """True when the schedule's freezing rule could end a stage before its cap, given validation data."""
        return False

    # -- personalised schedules ---------------------------------------------------------------
    def attach(self, vault: WeightVault) -> None:
        """Give the schedule the store it keeps its own weights in (the service does, before load_state)."""
        self.vault = vault

    def device_weights(self, device_id: str, global_weights: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray] | None:
        """The weights a device's task starts from this round; None: the global weights (every shared schedule)."""
        return None

    # -- what a task carries beyond its part -------------------------------------------------
    def train_settings(self, assignment: Assignment) -> dict:
        """TrainConfig fields this schedule sets for one task (FedIN: IN training and feature sharing); {} for most."""
        return {}

    def task_features(self, assignment: Assignment) -> str | None:
        """The blob of shared features a task carries (FedIN's s_in/s_out batch), or None."""
        return None

    def evaluations(self) -> dict[str, tuple[int, ...]]:
        """Models the coordinator tests each round besides the global one, as {name: layers skipped}: a model
        family's members (FedIN). {}: the global model alone."""
        return {}

    def blobs_in_use(self) -> tuple[set[str], set[str]]:
        """(weight indexes, other blobs) the schedule's state names: the blob collector keeps them."""
        return set(), set()

    # -- shared decisions -------------------------------------------------------------------
    @property
    def first_trainable(self) -> int:
        """The first layer a schedule may train. The layers before it are the model's frozen prefix
        (Manifest.frozen_prefix: no gradient reaches them); devices run them only as the cached prefix."""
        return self.manifest.frozen_prefix

    def trainable(self, layers) -> tuple[int, ...]:
        """Those of `layers` a schedule may train: never one of the frozen prefix."""
        return self.manifest.trainable_layers(layers)

    def fit(self, device: Device, first: int, last: int, skip: tuple[int, ...] = ()) -> tuple[int, int] | None:
        """(largest batch, predicted peak) at which layers first..last (less `skip`) fit the device's budget, or None."""
        for batch in self.batch_sizes:
            peak = self.predict(first, last, batch, skip=skip) if skip else self.predict(first, last, batch)
            if peak * (1 + self.margin) <= device.budget_bytes:
                return batch, int(peak)
        return None

    def need_text(self, first: int, last: int) -> str:
        smallest = self.batch_sizes[-1]
        need = self.predict(first, last, smallest) * (1 + self.margin)
        return f"layers {first}-{last} need {need / 2**20:.0f} MB at batch {smallest} (with margin)"


class FixedRounds(Strategy):
    """A schedule that trains for a set number of rounds (FedAvg, pFedLA, FedIN): it counts the rounds it
    aggregated, is finished at `rounds`, and keeps the count in its state; a subclass adds its own state to
    super().state() and reads it after super().load_state()."""

    def __init__(self, *args, rounds: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.rounds = rounds
        self.rounds_done = 0

    def advance(self, plan, before, after, results=()):
        self.rounds_done += 1

    @property
    def finished(self):
        return self.rounds_done >= self.rounds

    def rounds_left(self) -> tuple[int, int]:
        left = max(0, self.rounds - self.rounds_done)
        return left, left

    def state(self):
        return {"rounds_done": self.rounds_done}

    def load_state(self, state):
        self.rounds_done = int(state.get("rounds_done", 0))
