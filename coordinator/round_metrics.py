"""What one closed round measured: the record metrics.jsonl, the state store and every view share.

The service writes a RoundMetrics when it closes a round; `edge-coordinator status`, the
report, the demo's lines and the benchmarks read it back with `from_dict`, which takes
the rounds of older runs too (fields they lack get their defaults). The JSON form is the
one metrics.jsonl has always had: a device's update fields appear only when it sent one.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Mapping


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
                  "uploaded_bytes", "seconds", "scores")


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
    eval_block: int | None = None
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
        for key in ("stage", "idle", "schedule"):
            values[key] = dict(raw.get(key) or {})
        if raw.get("rounds_left") is not None:
            lo, hi = raw["rounds_left"]
            values["rounds_left"] = (int(lo), int(hi))
        return cls(**values)


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
