"""The wire protocol: MQTT 5 topics and messages between devices and the coordinator.

One home for the topic layout and every message's fields; both sides import it. Control
messages are UTF-8 JSON objects, decoded strictly: a missing field, a wrong type, an
unknown field, a value out of range or an oversize payload is a ProtocolError that says
which. Large objects (graphs, weights, updates) never travel in a control message; they
are content-addressed blobs sent in chunks (edge_runtime/wire/transfer.py). Nothing received
is ever unpickled.

Topics, under `edgeblock/v1/<fleet>/`:

    device/<id>/hello     device -> coordinator   Hello (QoS 1)
    device/<id>/status    device -> all           Status, retained; the last will says offline
    device/<id>/task      coordinator -> device   Task (QoS 1), or Idle: nothing this round, and why
    device/<id>/fetch     device -> coordinator   Fetch: which chunks of which blob it lacks
    device/<id>/blob      coordinator -> device   blob chunks (binary; metadata in user properties)
    device/<id>/upload    device -> coordinator   chunks of an update blob
    device/<id>/update    device -> coordinator   Update: the finished task, naming its blob; Scores for a
                                                  score task; or Failed: why not
    device/<id>/ack       coordinator -> device   Ack: the update was stored (or rejected, and why)
    coordinator/status    coordinator -> all      Status, retained
    coordinator/metrics   coordinator -> all      the last closed round's metrics (JSON), retained
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, fields
from typing import ClassVar

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.logs import printable
from edge_runtime.wire.part import TrainablePart
from edge_runtime.wire.train_config import TrainConfig

PROTOCOL = "edgeblock/v1"
MAX_CONTROL_BYTES = 64 * 1024          # control messages are small; anything larger is refused unread
MAX_DEPTH = 8                          # JSON nesting a message may have, checked before it is parsed
MAX_INT = 2 ** 53                      # every integer field: exact in a float and in SQLite's INTEGER
MAX_FLOAT = 1e15
MAX_TEXT = 256                         # characters of a string field, unless the field says otherwise
MAX_ITEMS = 10_000                     # elements of a list or an object field
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")      # fullmatch: "$" would let a final newline in
_SHA = re.compile(r"[0-9a-f]{64}")
DEVICE_KINDS = ("hello", "status", "task", "fetch", "blob", "upload", "update", "ack")


class ProtocolError(EdgeRuntimeError):
    """A message that does not follow the protocol; the message says what is wrong."""


def check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ProtocolError(f"{what} {value!r} is not a valid id (letters, digits, '_', '.', '-'; at most 64)")
    return value


def check_sha(value: str, what: str) -> str:
    if not isinstance(value, str) or not _SHA.fullmatch(value):
        raise ProtocolError(f"{what} must be a lowercase hex sha256, not {value!r}")
    return value


@dataclass(frozen=True)
class Topics:
    """The topic layout of one fleet."""
    fleet: str

    def __post_init__(self):
        check_id(self.fleet, "fleet")

    @property
    def root(self) -> str:
        return f"{PROTOCOL}/{self.fleet}"

    def device(self, device_id: str, kind: str) -> str:
        if kind not in DEVICE_KINDS:
            raise ValueError(f"unknown device topic kind {kind!r}")
        return f"{self.root}/device/{check_id(device_id, 'device id')}/{kind}"

    def all_devices(self, kind: str) -> str:
        """Subscription filter for one kind of message from every device."""
        return f"{self.root}/device/+/{kind}"

    @property
    def coordinator_status(self) -> str:
        return f"{self.root}/coordinator/status"

    @property
    def coordinator_metrics(self) -> str:
        """The last closed round's metrics (JSON, retained), for dashboards and `status` tools."""
        return f"{self.root}/coordinator/metrics"

    def parse_device_topic(self, topic: str) -> tuple[str, str]:
        """(device id, kind) of a device topic of this fleet; ProtocolError for anything else."""
        prefix = f"{self.root}/device/"
        if not topic.startswith(prefix):
            raise ProtocolError(f"topic {topic!r} is not a device topic of fleet {self.fleet!r}")
        parts = topic[len(prefix):].split("/")
        if len(parts) != 2 or parts[1] not in DEVICE_KINDS:
            raise ProtocolError(f"topic {topic!r} is not <device>/<kind> with a known kind")
        return check_id(parts[0], "device id in topic"), parts[1]


# -- messages --------------------------------------------------------------------------

_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_nesting(text: bytes) -> int:
    """How deeply arrays and objects nest in UTF-8 JSON text, brackets inside strings not counted: checked
    before json.loads, which recurses once per level (and a megabyte of '[' would exhaust the stack)."""
    depth = deepest = 0
    for byte in _JSON_STRING.sub(b'""', text).translate(None, _NOT_BRACKETS):
        depth += 1 if byte in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


MAX_INT_DIGITS = 19     # every integer field is bounded far below 10^19; a longer one is refused while parsing


def _bounded_int(text: str) -> int:
    """A JSON integer, refused while parsing when longer than any field allows: a 400-digit integer would
    parse, then overflow float() in a float field (or a score) far from any handler."""
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)


def parse_json(payload: bytes, what: str):
    """A control payload as JSON, or ProtocolError: too large, nested too deep (checked before parsing), not
    UTF-8, not JSON, or a number Python will not parse (4300+ digits)."""
    if len(payload) > MAX_CONTROL_BYTES:
        raise ProtocolError(f"{what}: payload of {len(payload)} bytes exceeds {MAX_CONTROL_BYTES}")
    if json_nesting(payload) > MAX_DEPTH:
        raise ProtocolError(f"{what}: JSON nested deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(payload.decode("utf-8"), parse_int=_bounded_int)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:   # JSONDecodeError is a ValueError
        raise ProtocolError(f"{what}: not a UTF-8 JSON object ({printable(exc, 120)})") from None


def _bounded(value, name: str, msg: str, limits: dict):
    """Every number, string and collection in range before it reaches SQLite, a log or arithmetic."""
    lo, hi = limits.get(name, (None, None))
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        lo, hi = (0 if lo is None else lo), (MAX_INT if hi is None else hi)
        if value < lo:
            floor = {0: "must not be negative", 1: "must be positive"}.get(lo, f"must be at least {lo}")
            raise ProtocolError(f"{msg}: field '{name}' {floor}, not {printable(value, 40)}")
        if value > hi:
            raise ProtocolError(f"{msg}: field '{name}' must be at most {hi}, not {printable(value, 40)}")
    elif isinstance(value, float):
        if abs(value) > MAX_FLOAT:
            raise ProtocolError(f"{msg}: field '{name}' must be at most {MAX_FLOAT:g} in magnitude")
    elif isinstance(value, str):
        hi = MAX_TEXT if hi is None else hi
        if len(value) > hi:
            raise ProtocolError(f"{msg}: field '{name}' holds {len(value)} characters; at most {hi}")
    elif isinstance(value, (list, dict)):
        hi = MAX_ITEMS if hi is None else hi
        if len(value) > hi:
            raise ProtocolError(f"{msg}: field '{name}' holds {len(value)} items; at most {hi}")
    return value


def _expect(value, kind, name: str, msg: str):
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise ProtocolError(f"{msg}: field '{name}' must be {'/'.join(k.__name__ for k in kinds)}, not bool")
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kinds):
        raise ProtocolError(f"{msg}: field '{name}' must be {'/'.join(k.__name__ for k in kinds)}, "
                            f"not {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ProtocolError(f"{msg}: field '{name}' must be finite, not {value}")
    return value


def _plain(value):
    """A message as JSON-ready values, as dataclasses.asdict gives them but without its deep copy of every leaf:
    a task's encoding was 0.45 ms that way, and a round of 1,000 tasks encodes each twice (store and publish)."""
    if hasattr(value, "__dataclass_fields__"):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class Message:
    """Base of the control messages: strict JSON encode/decode."""
    TYPE: ClassVar[str] = ""
    TYPES: ClassVar[dict] = {}      # field -> python type(s)
    OPTIONAL: ClassVar[tuple] = ()
    # field -> what turns its JSON value into the typed value (raising on a malformed one)
    CONVERT: ClassVar[dict] = {}
    # field -> (lowest, highest) of a number, (None, most characters or items) of a string or collection;
    # a field not named here gets the defaults (0..MAX_INT, MAX_TEXT, MAX_ITEMS)
    LIMITS: ClassVar[dict] = {}

    def __post_init__(self):
        # a typed field given in its JSON form (a dict) is converted, so both forms make equal messages
        for name, convert in self.CONVERT.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, convert(value))

    def validate(self) -> None:
        """Range checks beyond types; subclasses extend."""

    def encode(self) -> bytes:
        self.validate()
        raw = _plain(self)
        for f in fields(self):
            if f.name not in self.CONVERT:
                _bounded(raw[f.name], f.name, self.TYPE, self.LIMITS)
        return json.dumps({"type": self.TYPE, **raw}, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, payload: bytes):
        raw = parse_json(payload, cls.TYPE)
        if not isinstance(raw, dict):
            raise ProtocolError(f"{cls.TYPE}: payload must be a JSON object")
        if raw.pop("type", None) != cls.TYPE:
            raise ProtocolError(f"{cls.TYPE}: 'type' field must be {cls.TYPE!r}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ProtocolError(f"{cls.TYPE}: unknown field(s) {unknown}")
        values = {}
        for f in fields(cls):
            if f.name not in raw:
                if f.name in cls.OPTIONAL:
                    continue
                raise ProtocolError(f"{cls.TYPE}: missing field '{f.name}'")
            value = raw[f.name]
            if value is None and f.name in cls.OPTIONAL:
                values[f.name] = None
                continue
            value = _bounded(_expect(value, cls.TYPES[f.name], f.name, cls.TYPE), f.name, cls.TYPE, cls.LIMITS)
            if f.name in cls.CONVERT:
                try:
                    value = cls.CONVERT[f.name](value)
                except (EdgeRuntimeError, KeyError, TypeError, ValueError) as exc:
                    raise ProtocolError(f"{cls.TYPE}: field '{f.name}': {exc}") from None
            values[f.name] = value
        msg = cls(**values)
        msg.validate()
        return msg


@dataclass(frozen=True)
class Hello(Message):
    """A device announces itself: who, which tier, and the budget it measured (not guessed)."""
    TYPE: ClassVar[str] = "hello"
    TYPES: ClassVar[dict] = {"device_id": str, "tier": str, "budget_bytes": int, "runtime_version": str,
                             "cores": int, "disk_free_bytes": int}
    LIMITS: ClassVar[dict] = {"budget_bytes": (1, 2 ** 44), "cores": (1, 4096), "disk_free_bytes": (0, 2 ** 50),
                             "runtime_version": (None, 64)}
    device_id: str
    tier: str
    budget_bytes: int
    runtime_version: str
    cores: int = 1
    disk_free_bytes: int = 0

    def validate(self) -> None:
        check_id(self.device_id, "hello: device_id")
        check_id(self.tier, "hello: tier")
        if self.budget_bytes <= 0 or self.cores <= 0 or self.disk_free_bytes < 0:
            raise ProtocolError("hello: budget_bytes and cores must be positive, disk_free_bytes not negative")


@dataclass(frozen=True)
class Status(Message):
    """Online/offline, retained; a device's last will publishes offline."""
    TYPE: ClassVar[str] = "status"
    TYPES: ClassVar[dict] = {"state": str, "at": float}
    state: str
    at: float = 0.0

    def validate(self) -> None:
        if self.state not in ("online", "offline"):
            raise ProtocolError(f"status: state must be online or offline, not {self.state!r}")


@dataclass(frozen=True)
class BlobRef:
    """A content-addressed object a task needs: its hash and size."""
    sha256: str
    size: int


@dataclass(frozen=True)
class Task(Message):
    """What a device trains this round; every object it needs is named by content hash."""
    TYPE: ClassVar[str] = "task"
    TYPES: ClassVar[dict] = {"task_id": str, "round": int, "manifest": dict, "blobs": list, "part": dict,
                             "config": dict, "deadline_s": float, "update_fp16": bool, "kind": str}
    LIMITS: ClassVar[dict] = {"round": (0, 10 ** 9), "blobs": (None, 10_000)}
    OPTIONAL: ClassVar[tuple] = ("update_fp16", "kind")
    CONVERT: ClassVar[dict] = {"part": TrainablePart.from_dict, "config": TrainConfig.from_dict}
    task_id: str
    round: int
    manifest: dict          # {"sha256", "size"} of manifest.json
    blobs: list             # [{"sha256", "size", "name"}]: graphs and weights, by the name the device stores
    part: TrainablePart     # what to train (on the wire: its to_dict form)
    config: TrainConfig     # how to train it
    deadline_s: float
    update_fp16: bool = False
    kind: str = "train"     # "train": send back an Update; "score": send back Scores, change nothing

    def validate(self) -> None:
        check_id(self.task_id, "task: task_id")
        if self.kind not in ("train", "score"):
            raise ProtocolError(f"task: kind must be train or score, not {self.kind!r}")
        if self.round < 0 or self.deadline_s <= 0:
            raise ProtocolError("task: round must be >= 0 and deadline_s positive")
        if set(self.manifest) - {"sha256", "size"}:
            raise ProtocolError("task: manifest holds only sha256 and size")
        check_sha(self.manifest.get("sha256"), "task: manifest.sha256")
        size = self.manifest.get("size", 0)
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= 2 ** 40:
            raise ProtocolError("task: manifest.size must be an int in [0, 2**40]")
        for i, b in enumerate(self.blobs):
            if not isinstance(b, dict) or set(b) != {"sha256", "size", "name"}:
                raise ProtocolError(f"task: blobs[{i}] must have exactly sha256, size and name")
            check_sha(b["sha256"], f"task: blobs[{i}].sha256")
            if isinstance(b["size"], bool) or not isinstance(b["size"], int) or not 0 <= b["size"] <= 2 ** 40:
                raise ProtocolError(f"task: blobs[{i}].size must be an int in [0, 2**40]")
            if not isinstance(b["name"], str) or len(b["name"]) > 200:
                raise ProtocolError(f"task: blobs[{i}].name must be a string of at most 200 characters")


@dataclass(frozen=True)
class Idle(Message):
    """Sent on the task topic instead of a Task: this round has nothing for the device, and why."""
    TYPE: ClassVar[str] = "idle"
    TYPES: ClassVar[dict] = {"round": int, "reason": str}
    LIMITS: ClassVar[dict] = {"round": (0, 10 ** 9), "reason": (None, 2000)}
    round: int
    reason: str

    def validate(self) -> None:
        if self.round < 0 or len(self.reason) > 2000:
            raise ProtocolError("idle: round must be >= 0 and the reason at most 2000 characters")


def _check_chunk_indices(chunks: list | None, what: str) -> None:
    """A list of a blob's chunk indices (Fetch, Resend), or None for all of them."""
    if chunks is not None and not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 10 ** 7
                                      for c in chunks):
        raise ProtocolError(f"{what}: chunks must be ints in [0, 10**7)")


@dataclass(frozen=True)
class Fetch(Message):
    """A device asks for the chunks of a blob it lacks (all of them, or the listed indices)."""
    TYPE: ClassVar[str] = "fetch"
    TYPES: ClassVar[dict] = {"sha256": str, "chunks": list}
    LIMITS: ClassVar[dict] = {"chunks": (None, 100_000)}
    OPTIONAL: ClassVar[tuple] = ("chunks",)
    sha256: str
    chunks: list | None = None

    def validate(self) -> None:
        check_sha(self.sha256, "fetch: sha256")
        _check_chunk_indices(self.chunks, "fetch")


@dataclass(frozen=True)
class Update(Message):
    """A finished task: the update blob's hash and what training it cost, measured."""
    TYPE: ClassVar[str] = "update"
    TYPES: ClassVar[dict] = {"task_id": str, "round": int, "device_id": str, "blob_sha256": str,
                             "blob_size": int, "num_examples": int, "loss": float, "steps": int,
                             "peak_rss_bytes": int, "seconds": float, "downloaded_bytes": int,
                             "agent_peak_rss_bytes": int, "input_mean": float, "input_std": float,
                             "holdout_examples": int, "holdout_accuracy_before": float, "holdout_accuracy": float}
    LIMITS: ClassVar[dict] = {"round": (0, 10 ** 9), "blob_size": (0, 2 ** 40), "num_examples": (1, 10 ** 9),
                              "steps": (0, 10 ** 9), "peak_rss_bytes": (1, 2 ** 44), "downloaded_bytes": (0, 2 ** 50),
                              "agent_peak_rss_bytes": (0, 2 ** 44), "input_std": (0, 2 ** 50),
                              "holdout_examples": (0, 10 ** 9)}
    OPTIONAL: ClassVar[tuple] = ("downloaded_bytes", "agent_peak_rss_bytes", "input_mean", "input_std",
                                 "holdout_examples", "holdout_accuracy_before", "holdout_accuracy")
    task_id: str
    round: int
    device_id: str
    blob_sha256: str
    blob_size: int
    num_examples: int
    loss: float
    steps: int
    peak_rss_bytes: int
    seconds: float
    downloaded_bytes: int = 0        # blob bytes the device fetched for this task (only what it lacked)
    agent_peak_rss_bytes: int = 0    # the agent process's own peak, beside the training job's
    # the mean and standard deviation of the device's input values (its whole local dataset), so the
    # coordinator can tell when devices normalise their data unlike its evaluation set; None = not sent
    input_mean: float | None = None
    input_std: float | None = None
    # accuracy on the rows the device held out of training (TrainConfig.holdout) of the model it was sent and of
    # the one it trained: a personalised model's measure; None = the task held nothing out
    holdout_examples: int = 0
    holdout_accuracy_before: float | None = None
    holdout_accuracy: float | None = None

    def validate(self) -> None:
        check_id(self.task_id, "update: task_id")
        check_id(self.device_id, "update: device_id")
        check_sha(self.blob_sha256, "update: blob_sha256")
        if min(self.round, self.blob_size, self.steps, self.downloaded_bytes, self.agent_peak_rss_bytes) < 0 \
                or self.num_examples <= 0 or self.peak_rss_bytes <= 0:
            raise ProtocolError("update: round, blob_size, steps, downloaded_bytes, agent_peak_rss_bytes must be "
                                ">= 0; num_examples, peak_rss_bytes > 0")
        for name in ("holdout_accuracy_before", "holdout_accuracy"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and 0 <= value <= 1):
                raise ProtocolError(f"update: {name} must be a fraction in [0, 1], not {printable(value, 40)}")


@dataclass(frozen=True)
class Failed(Message):
    """A device could not do its task (it does not fit the budget, its data is missing, ...), and why.

    Sent on the update topic, so the coordinator stops waiting for that device this round.
    `needed_bytes` is the measured need when the task did not fit the budget.
    """
    TYPE: ClassVar[str] = "failed"
    TYPES: ClassVar[dict] = {"task_id": str, "round": int, "device_id": str, "reason": str, "needed_bytes": int}
    LIMITS: ClassVar[dict] = {"round": (0, 10 ** 9), "reason": (None, 2000), "needed_bytes": (0, 2 ** 50)}
    OPTIONAL: ClassVar[tuple] = ("needed_bytes",)
    task_id: str
    round: int
    device_id: str
    reason: str
    needed_bytes: int = 0

    def validate(self) -> None:
        check_id(self.task_id, "failed: task_id")
        check_id(self.device_id, "failed: device_id")
        if self.round < 0 or self.needed_bytes < 0 or len(self.reason) > 2000:
            raise ProtocolError("failed: round and needed_bytes must be >= 0, reason at most 2000 characters")


@dataclass(frozen=True)
class Scores(Message):
    """A finished score task: per layer (and "head"), the summed squared gradient norm on local data."""
    TYPE: ClassVar[str] = "scores"
    TYPES: ClassVar[dict] = {"task_id": str, "round": int, "device_id": str, "scores": dict, "num_examples": int,
                             "peak_rss_bytes": int, "seconds": float, "agent_peak_rss_bytes": int}
    LIMITS: ClassVar[dict] = {"round": (0, 10 ** 9), "scores": (None, 1000), "num_examples": (1, 10 ** 9),
                              "peak_rss_bytes": (1, 2 ** 44), "agent_peak_rss_bytes": (0, 2 ** 44)}
    OPTIONAL: ClassVar[tuple] = ("agent_peak_rss_bytes",)
    task_id: str
    round: int
    device_id: str
    scores: dict            # {"<layer index>" or "head": score}
    num_examples: int
    peak_rss_bytes: int
    seconds: float
    agent_peak_rss_bytes: int = 0

    def validate(self) -> None:
        check_id(self.task_id, "scores: task_id")
        check_id(self.device_id, "scores: device_id")
        if self.round < 0 or self.num_examples <= 0 or self.peak_rss_bytes <= 0 or len(self.scores) > 1000:
            raise ProtocolError("scores: round >= 0, num_examples and peak_rss_bytes > 0, at most 1000 scores")
        for key, value in self.scores.items():
            if key != "head" and not (key.isdigit() and len(key) <= 5):
                raise ProtocolError(f"scores: key {key!r} is neither a layer index nor 'head'")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not 0 <= value <= MAX_FLOAT:
                raise ProtocolError(f"scores: the score of {key} must be a finite number >= 0, not {value!r}")


@dataclass(frozen=True)
class Resend(Message):
    """The coordinator grants a waiting update's upload, on the device's ack topic: send these chunks of its blob
    (None: all of them). Asked again, with only what is still missing, when the update comes a second time from a
    device already granted: chunks sent under the grant were lost (a broker's full queue, a restart)."""
    TYPE: ClassVar[str] = "resend"
    TYPES: ClassVar[dict] = {"task_id": str, "blob_sha256": str, "chunks": list}
    LIMITS: ClassVar[dict] = {"chunks": (None, 100_000)}
    OPTIONAL: ClassVar[tuple] = ("chunks",)
    task_id: str
    blob_sha256: str
    chunks: list | None = None

    def validate(self) -> None:
        check_id(self.task_id, "resend: task_id")
        check_sha(self.blob_sha256, "resend: blob_sha256")
        _check_chunk_indices(self.chunks, "resend")


@dataclass(frozen=True)
class Ack(Message):
    """The coordinator stored an update durably (accepted) or refused it (with the reason)."""
    TYPE: ClassVar[str] = "ack"
    TYPES: ClassVar[dict] = {"task_id": str, "accepted": bool, "reason": str}
    LIMITS: ClassVar[dict] = {"reason": (None, 2000)}
    task_id: str
    accepted: bool
    reason: str = ""


MESSAGES = {cls.TYPE: cls for cls in (Hello, Status, Task, Idle, Fetch, Update, Failed, Scores, Resend, Ack)}


def decode_any(payload: bytes, allowed: tuple[type, ...]):
    """Decode a payload that may be any of `allowed` (by its 'type' field); ProtocolError otherwise."""
    raw = parse_json(payload, "message")
    kind = raw.get("type") if isinstance(raw, dict) else None
    for cls in allowed:
        if cls.TYPE == kind:
            return cls.decode(payload)
    raise ProtocolError(f"message type {printable(repr(kind), 40)} is not one of {[c.TYPE for c in allowed]} here")
