"""What one closed round measured: the record metrics.jsonl, the state store and every view share.

The service writes a RoundMetrics when it closes a round; `edge-coordinator status`, the
report, the demo's lines and the benchmarks read it back with `from_dict`, which takes
the rounds of older runs too (fields they lack get their defaults). The JSON form is the
one metrics.jsonl has always had: a device's update fields appear only when it sent one.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Mapping, Sequence


@dataclass(frozen=True)
class DeviceRound:
    """One device's task in a round: what it was asked to train and, if it answered, what that cost."""
    tier: str = "?"
    budget_bytes: int | None = None        # the job budget it announced
    kind: str = "train"                    # "train" | "score"
    trainable: tuple[int, ...] | None = None   # None in rounds of old runs: they name only the span
    train_head: bool = True
    layers: tuple[int, int] = (0, -1)      # the span, first and last layer
    head: int | None = None
    batch_size: int | None = None
    predicted_peak_bytes: int | None = None
    status: str = "?"                      # sent | accepted | rejected | failed
    reason: str | None = None
    trained_bytes: int = 0                 # bytes of the parameters its update must hold
    # set when the device answered
    num_examples: int | None = None
    loss: float | None = None
    peak_rss_bytes: int | None = None      # its training job's measured peak
    agent_peak_rss_bytes: int | None = None
    downloaded_bytes: int | None = None
    uploaded_bytes: int | None = None
    seconds: float | None = None
    scores: Mapping | None = None          # a score task's answer
    # accuracy on the rows the device held out of training (TrainConfig.holdout), of the model it was sent and of
    # the model it trained: how a personalised model is measured
    holdout_examples: int | None = None
    holdout_accuracy_before: float | None = None
    holdout_accuracy: float | None = None
    member: str | None = None              # the family member it trained (FedIN)

    @property
    def accepted(self) -> bool:
        return self.status == "accepted"

    @property
    def device_peak_bytes(self) -> int:
        """Everything the device ran at its peak: the job and the agent beside it."""
        return (self.peak_rss_bytes or 0) + (self.agent_peak_rss_bytes or 0)

    def trained_layers(self) -> list[int]:
        """The layers the task trained (rounds of old runs name only the span)."""
        if self.trainable is not None:
            return list(self.trainable)
        return list(range(self.layers[0], self.layers[1] + 1))

    def to_dict(self) -> dict:
        out = asdict(self)
        for name in _ANSWER_FIELDS:
            if out[name] is None:
                del out[name]
        out["trainable"], out["layers"] = self.trained_layers(), list(self.layers)
        return out

    @classmethod
    def from_dict(cls, raw: Mapping) -> "DeviceRound":
        values = _known(cls, raw)
        if "trainable" in values:
            values["trainable"] = tuple(int(i) for i in values["trainable"])
        if "layers" in values:
            values["layers"] = tuple(int(i) for i in values["layers"])
        return cls(**values)


_ANSWER_FIELDS = ("num_examples", "loss", "peak_rss_bytes", "agent_peak_rss_bytes", "downloaded_bytes",
                  "uploaded_bytes", "seconds", "scores", "holdout_examples", "holdout_accuracy_before",
                  "holdout_accuracy")


@dataclass(frozen=True)
class RoundMetrics:
    """A closed round: its plan's stage, why it closed, the global model's test result, every device's task."""
    round: int
    accuracy: float
    strategy: str = "?"
    stage: Mapping = field(default_factory=dict)
    closed_because: str = "every task settled"
    aggregated: bool = True                # False: too few updates, the weights were kept
    loss: float | None = None
    eval_block: int | None = None          # the block of eval_layer
    eval_layer: int | None = None          # tested through layers 0..eval_layer and the head after it
    opened_at: float | None = None
    closed_at: float | None = None
    updates: int = 0
    rejected: int = 0
    failed: int = 0
    devices: Mapping[str, DeviceRound] = field(default_factory=dict)
    idle: Mapping[str, str] = field(default_factory=dict)   # device -> why it trained nothing
    finished: bool = False
    rounds_left: tuple[int, int] | None = None             # (fewest, most) the schedule can still take
    schedule: Mapping = field(default_factory=dict)        # what the strategy measured (e.g. freezing)
    models: Mapping = field(default_factory=dict)          # a model family's members on the test set (FedIN):
    #                                                        {name: {"accuracy", "loss"}}; `accuracy` is the largest's

    @property
    def seconds(self) -> float | None:
        if self.opened_at is None or self.closed_at is None:
            return None
        return self.closed_at - self.opened_at

    def accepted(self) -> dict[str, DeviceRound]:
        return {d: r for d, r in self.devices.items() if r.accepted}

    def to_dict(self) -> dict:
        """The JSON form; a non-finite number (a diverged evaluation) becomes null, never NaN."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["stage"], out["idle"], out["schedule"] = dict(self.stage), dict(self.idle), dict(self.schedule)
        out["models"] = {k: dict(v) for k, v in self.models.items()}
        out["devices"] = {d: r.to_dict() for d, r in self.devices.items()}
        out["rounds_left"] = list(self.rounds_left) if self.rounds_left is not None else None
        return _finite(out)

    @classmethod
    def from_dict(cls, raw: Mapping) -> "RoundMetrics":
        """A round as metrics.jsonl or the state store keeps it; KeyError/TypeError/ValueError when it is not one."""
        if not isinstance(raw.get("round"), int) or not isinstance(raw.get("accuracy"), (int, float)):
            raise ValueError("a round's metrics need an integer round and a numeric accuracy")
        values = _known(cls, raw)
        values["devices"] = {str(d): DeviceRound.from_dict(r) for d, r in (raw.get("devices") or {}).items()}
        for key in ("stage", "idle", "schedule", "models"):
            values[key] = dict(raw.get(key) or {})
        if raw.get("rounds_left") is not None:
            lo, hi = raw["rounds_left"]
            values["rounds_left"] = (int(lo), int(hi))
        return cls(**values)


@dataclass(frozen=True)
class DeviceAccuracy:
    """Each device's latest accuracy on its own held-out rows, and what the fleet's operator reads of them."""
    by_device: Mapping[str, float]         # device -> accuracy of the model it trained, in the last round it reported
    before: Mapping[str, float]            # device -> accuracy of the model it was sent, that same round

    @property
    def mean(self) -> float:
        return sum(self.by_device.values()) / len(self.by_device)

    @property
    def worst(self) -> tuple[str, float]:
        device = min(sorted(self.by_device), key=self.by_device.__getitem__)
        return device, self.by_device[device]

    @property
    def spread(self) -> float:
        """Best minus worst device."""
        return max(self.by_device.values()) - min(self.by_device.values())

    def text(self) -> str:
        return accuracy_text(self.to_dict())

    def to_dict(self) -> dict:
        device, worst = self.worst
        return {"mean": self.mean, "worst": worst, "worst_device": device, "spread": self.spread,
                "devices": dict(self.by_device), "before": dict(self.before)}


def accuracy_text(summary: Mapping) -> str:
    """DeviceAccuracy.to_dict() in words, as every view shows it: 'mean 91.36%, worst 85.22% (pi-02), spread 11.6
    points over 5 device(s)'."""
    return (f"mean {summary['mean']:.2%}, worst {summary['worst']:.2%} ({summary['worst_device']}), "
            f"spread {100 * summary['spread']:.1f} points over {len(summary['devices'])} device(s)")


def member_tiers(rounds: Sequence[RoundMetrics]) -> dict[str, list[str]]:
    """A model family's members (FedIN) and the tiers whose devices last trained each one."""
    latest: dict[str, tuple[str, str]] = {}
    for m in rounds:
        for device, r in m.devices.items():
            if r.member:
                latest[device] = (r.member, r.tier)
    out: dict[str, set[str]] = {}
    for member, tier in latest.values():
        out.setdefault(member, set()).add(tier)
    return {k: sorted(v) for k, v in out.items()}


def models_text(models: Mapping, tiers: Mapping[str, Sequence[str]] | None = None) -> str:
    """RoundMetrics.models in words, as every view shows them: 'small 80.12% (generic-256mb), large 82.30%
    (pi-3b-plus, pi-zero-2w)', a member no device trains marked so."""
    parts = []
    for name, e in models.items():
        acc = "-" if e.get("accuracy") is None else f"{e['accuracy']:.2%}"
        who = "" if tiers is None else f" ({', '.join(tiers[name]) if tiers.get(name) else 'no device'})"
        parts.append(f"{name} {acc}{who}")
    return ", ".join(parts)


def device_accuracy(rounds: Sequence[RoundMetrics]) -> DeviceAccuracy | None:
    """Every device's accuracy on its held-out rows from the last round it reported one in; None when no device
    has (the run holds nothing out: its schedule's model is measured on the coordinator's test set)."""
    after, before = {}, {}
    for m in rounds:
        for device, r in m.devices.items():
            if r.accepted and r.holdout_accuracy is not None:
                after[device] = float(r.holdout_accuracy)
                before[device] = float(r.holdout_accuracy_before if r.holdout_accuracy_before is not None
                                       else r.holdout_accuracy)
    return DeviceAccuracy(after, before) if after else None


def _known(cls, raw: Mapping) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in raw.items() if k in names}


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
