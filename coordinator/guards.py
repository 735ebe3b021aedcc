"""What one device may cost the coordinator: the bounds a hostile or broken device runs into.

Pure decisions over plain state, the service applies them (coordinator/service.py):

- Admission: who may join the fleet at all (an allow-list, or anyone up to a registry bound),
  and how often one id may say hello.
- Uploads: a device uploads only while it owes an update, a bounded number of blobs at once,
  each no larger than its task's update can be; a partial upload left untouched expires.
- Fetches: a device fetches only blobs its own open task names, at a bounded rate and a bounded number
  of bytes per task.
- Stragglers: a device that missed its last deadlines sits out a growing number of rounds.

Every refusal is a reason string the service logs (once per device and minute at most),
counts as a rejection of its kind and, where the device can act on it, sends back.
"""
from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from edge_runtime.errors import IntegrityError

# What a rejection is counted under: a closed set, so that a count per kind (the state store's running totals,
# /metrics) has series known in advance, whatever words a reason uses. Every refusal and intake verdict names one.
REJECTION_KINDS: dict[str, str] = {
    "malformed": "not a protocol message: undecodable, on a topic devices do not publish, a chunk that contradicts "
                 "its own header",
    "wrong_identity": "names another device than the one whose topic it came on",
    "unknown_device": "an update or report from a device that never said hello",
    "not_admitted": "a hello from an id not on the fleet's device list, or with the registry full",
    "over_limit": "beyond a device's bounds: hellos or fetches a minute, uploads at once, bytes fetched per task",
    "unsolicited": "an upload from a device that owes no update, or a fetch of a blob no open task of it names",
    "oversize": "an update or upload larger than its task's parameters can take",
    "unknown_task": "names a task the coordinator never scheduled",
    "wrong_task": "answers a task of another device or round, or of another kind (scores for a training task)",
    "stale": "answers a task already settled or a round already closed (late or replayed)",
    "implausible_loss": "reports a training loss no valid data gives (negative, or far above chance and the fleet)",
    "integrity": "bytes that do not match their hash or the size the update declared",
    "bad_update": "an update blob that is not the task's tensors (names, dtypes, shapes), not finite or moving the "
                  "weights too far; scores for other layers than the task's",
    "bad_features": "the shared features of a FedIN update do not fit its task",
    "other": "none of the above (and every rejection stored before rejections had kinds)",
}


class Refusal(str):
    """A refusal's reason, carrying the kind it is counted under (REJECTION_KINDS)."""
    kind: str

    def __new__(cls, kind: str, reason: str) -> "Refusal":
        if kind not in REJECTION_KINDS:
            raise ValueError(f"unknown rejection kind {kind!r}; known: {', '.join(REJECTION_KINDS)}")
        refusal = super().__new__(cls, reason)
        refusal.kind = kind
        return refusal


def rejection_kind(exc: Exception) -> str:
    """The kind a message refused with `exc` counts under: a refusal's own (the service raises a guard's refusal as
    ProtocolError(refusal), so it rides in the exception's args), `integrity` for an assembled blob that fails its
    hash, and `malformed` for every other protocol error."""
    given = exc.args[0] if exc.args else None
    if isinstance(given, Refusal):
        return given.kind
    return "integrity" if isinstance(exc, IntegrityError) else "malformed"


MISSED = ("no update before the deadline", "device went offline")   # how a task ends when its device did not answer


@dataclass(frozen=True)
class GuardSettings:
    """[service] bounds; each has a default that lets an honest fleet of a few thousand devices through."""
    max_devices: int = 10_000            # devices the registry holds; a hello from one more new id is refused
    hellos_per_minute: int = 12          # per device id; a reconnecting board says hello a few times a minute
    max_partial_uploads: int = 2         # blobs one device may be uploading at once
    upload_slots: int = 16               # update blobs granted at once, fleet-wide (UploadGrants)
    partial_upload_ttl_s: float = 900.0  # a partial upload with no chunk for this long is deleted
    fetches_per_minute: int = 600        # Fetch requests per device (a blob of N chunks is one request, or a
                                         # few more when chunks are lost)
    fetch_allowance: float = 4.0         # a task's blobs may be asked for this many times over, in bytes
    bench_after_misses: int = 2          # consecutive missed deadlines before a device sits rounds out
    max_bench_rounds: int = 32

    def __post_init__(self):
        from coordinator.config import ConfigError
        if self.upload_slots < 1 or self.max_partial_uploads < 1:
            raise ConfigError(f"service.upload_slots ({self.upload_slots}) and service.max_partial_uploads "
                              f"({self.max_partial_uploads}) must be at least 1: no update could be uploaded")


class RateLimit:
    """At most `per_minute` events per key in any 60 s; remembers at most `max_keys` keys (oldest forgotten)."""

    def __init__(self, per_minute: int, max_keys: int = 100_000):
        self.per_minute, self.max_keys = per_minute, max_keys
        self._seen: OrderedDict[str, deque] = OrderedDict()

    def allow(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        times = self._seen.pop(key, None) or deque()
        while times and now - times[0] >= 60.0:
            times.popleft()
        allowed = len(times) < self.per_minute
        if allowed:
            times.append(now)
        self._seen[key] = times
        while len(self._seen) > self.max_keys:
            self._seen.popitem(last=False)
        return allowed


class Admission:
    """Who may join: the listed ids (an allow-list, e.g. the file the broker's ACL is made from), or, with no
    list, any id while the registry has room; and at most hellos_per_minute hellos per id."""

    def __init__(self, settings: GuardSettings, listed: Iterable[str] | None = None):
        self.settings = settings
        self.listed = frozenset(listed) if listed is not None else None
        self._hellos = RateLimit(settings.hellos_per_minute)

    def refuse_hello(self, device_id: str, known: bool, registered: int,
                     now: float | None = None) -> Refusal | None:
        """Why this hello is refused, or None to take it."""
        if self.listed is not None and device_id not in self.listed:
            return Refusal("not_admitted", f"device {device_id} is not on the fleet's device list")
        if not known and registered >= self.settings.max_devices:
            return Refusal("not_admitted", f"the registry is full ({self.settings.max_devices} devices; max_devices)")
        if not self._hellos.allow(device_id, now):
            return Refusal("over_limit",
                           f"more than {self.settings.hellos_per_minute} hellos a minute from {device_id}")
        return None


@dataclass
class _Upload:
    device_id: str
    size: int
    last_chunk_at: float


class Uploads:
    """The update blobs being uploaded: by whom, how large, when a chunk last arrived."""

    def __init__(self, settings: GuardSettings):
        self.settings = settings
        self._open: dict[str, _Upload] = {}
        self._unclaimed: dict[str, list[str]] = {}    # device -> complete blobs no update has named yet

    def refuse_chunk(self, device_id: str, blob: str, size: int, allowed_bytes: int | None,
                     now: float | None = None) -> Refusal | None:
        """Why a chunk is refused: the device owes no update (allowed_bytes None), the blob is larger than its
        update can be, or it already uploads as many blobs as it may. None: take it."""
        now = time.monotonic() if now is None else now
        if allowed_bytes is None:
            return Refusal("unsolicited", f"{device_id} owes no update this round: upload refused")
        if size > allowed_bytes:
            return Refusal("oversize", f"an upload of {size} bytes from {device_id} exceeds the {allowed_bytes} bytes "
                                       f"its update can be")
        known = self._open.get(blob)
        if known is None:
            mine = sum(1 for u in self._open.values() if u.device_id == device_id)
            if mine >= self.settings.max_partial_uploads:
                return Refusal("over_limit", f"{device_id} already uploads {mine} blob(s) (max_partial_uploads)")
            self._open[blob] = _Upload(device_id, size, now)
        else:
            known.last_chunk_at = now
        return None

    def open_blobs(self) -> list[str]:
        """The blobs being uploaded (replicas: another replica may have completed one)."""
        return list(self._open)

    def done(self, blob: str) -> None:
        """The upload of `blob` failed and the blob is gone (or another replica completed it): its slot is
        free."""
        self._open.pop(blob, None)

    def completed(self, blob: str) -> list[str]:
        """The upload of `blob` finished: its slot is free. Returns its device's complete blobs that no update has
        named yet beyond the newest max_partial_uploads (oldest first), for the caller to delete: without it, a
        device holding a task could fill the disk one complete blob at a time."""
        upload = self._open.pop(blob, None)
        if upload is None:
            return []
        mine = self._unclaimed.setdefault(upload.device_id, [])
        if blob in mine:            # the same content uploaded again (a resent update): one blob, listed once
            mine.remove(blob)
        mine.append(blob)
        extra = mine[:-self.settings.max_partial_uploads]
        del mine[:-self.settings.max_partial_uploads]
        # content-addressed: another device may have uploaded the same bytes, and may still name them
        others = {b for device, theirs in self._unclaimed.items() if device != upload.device_id for b in theirs}
        return [b for b in extra if b not in others]

    def claimed(self, blob: str) -> None:
        """An update named `blob`: it is the update's now, not an upload's."""
        for mine in self._unclaimed.values():
            if blob in mine:
                mine.remove(blob)

    def forget_unclaimed(self) -> None:
        """The round closed: the blobs no update named are deleted by the caller."""
        self._unclaimed.clear()

    def expired(self, now: float | None = None) -> list[str]:
        """Blobs whose upload stalled past the time to live; they are forgotten here, the caller discards them."""
        now = time.monotonic() if now is None else now
        stale = [b for b, u in self._open.items() if now - u.last_chunk_at >= self.settings.partial_upload_ttl_s]
        for blob in stale:
            del self._open[blob]
        return stale

    def open_bytes(self) -> int:
        return sum(u.size for u in self._open.values())


class UploadGrants:
    """Which waiting updates may send their blob now: at most `slots` at once, first come first granted.

    End-to-end flow control for uploads: a device sends its small update message first and its chunks only when
    granted (a Resend naming them), so a fleet finishing at once waits as small messages, never as gigabytes of
    chunks in the broker's queue and the coordinator's inbox. The broker's in-flight window cannot do it:
    Mosquitto 2.0 sends a client past its MQTT 5 Receive Maximum once it acknowledges. A grant whose upload
    brought nothing for `ttl_s` gives its slot to the next; its device, asking again, queues again."""

    def __init__(self, slots: int, ttl_s: float = 30.0):
        self.slots, self.ttl_s = slots, ttl_s
        self._waiting: OrderedDict[str, str] = OrderedDict()     # task id -> blob, in the order they asked
        self._granted: dict[str, list] = {}                      # task id -> [blob, when a grant or chunk came]

    def ask(self, task_id: str, blob: str, now: float | None = None) -> bool:
        """An update waits for its blob. True when it holds a grant already: it came again, so chunks sent under
        the grant were lost (the caller names the missing ones again)."""
        now = time.monotonic() if now is None else now
        held = self._granted.get(task_id)
        if held is not None:
            held[1] = now
            return True
        self._waiting.setdefault(task_id, blob)
        return False

    def progress(self, blob: str, now: float | None = None) -> None:
        """A chunk of `blob` came: its grant is alive."""
        now = time.monotonic() if now is None else now
        for held in self._granted.values():
            if held[0] == blob:
                held[1] = now

    def release(self, task_id: str) -> None:
        """The update is judged (or its round closed): its slot, or its place in the queue, is free."""
        self._waiting.pop(task_id, None)
        self._granted.pop(task_id, None)

    def grant(self, now: float | None = None) -> list[str]:
        """The task ids granted now, as slots allow (stale grants expire first)."""
        now = time.monotonic() if now is None else now
        for task_id in [t for t, (_, at) in self._granted.items() if now - at >= self.ttl_s]:
            del self._granted[task_id]
        granted = []
        while self._waiting and len(self._granted) < self.slots:
            task_id, blob = self._waiting.popitem(last=False)
            self._granted[task_id] = [blob, now]
            granted.append(task_id)
        return granted

    def clear(self) -> None:
        self._waiting.clear()
        self._granted.clear()

    def counts(self) -> tuple[int, int]:
        """(granted, waiting)."""
        return len(self._granted), len(self._waiting)


class Fetches:
    """A device fetches only what its open task names, at a bounded rate, and a task's blobs at most
    `fetch_allowance` times over in bytes (a request is cheap, serving it is not: one Fetch of 100 bytes can
    ask for megabytes)."""

    def __init__(self, settings: GuardSettings, max_tasks: int = 100_000):
        self._rate = RateLimit(settings.fetches_per_minute)
        self.per_minute = settings.fetches_per_minute
        self.allowance = settings.fetch_allowance
        self._served: OrderedDict[str, int] = OrderedDict()    # task id -> bytes asked for so far
        self.max_tasks = max_tasks

    def refuse(self, device_id: str, blob: str, named: Mapping[str, int], task_id: str = "",
               asked_bytes: int = 0, now: float | None = None) -> Refusal | None:
        """Why this fetch is refused, or None to serve it. named: the blobs the device's open task names, with
        their sizes; asked_bytes: what this request asks for (the blob, or the chunks it lists)."""
        if blob not in named:
            return Refusal("unsolicited", f"{device_id} asked for blob {blob[:12]}…, which no open task of its names")
        if not self._rate.allow(device_id, now):
            return Refusal("over_limit", f"more than {self.per_minute} fetches a minute from {device_id}")
        served = self._served.pop(task_id, 0) + asked_bytes
        self._served[task_id] = served
        while len(self._served) > self.max_tasks:
            self._served.popitem(last=False)
        most = self.allowance * sum(named.values())
        if served > most:
            return Refusal("over_limit", f"{device_id} asked for {served} bytes for task {task_id}, more than "
                                         f"{self.allowance:g} x its blobs ({most:.0f} bytes; fetch_allowance)")
        return None


def benched_rounds(outcomes: Sequence[str | None], after_misses: int, most: int) -> int:
    """Rounds a device sits out, from how its recent tasks ended (newest last; None: it answered).

    After `after_misses` consecutive missed deadlines it sits out 1 round, then 2, 4, ... for each further
    miss in a row, at most `most`; one answered task clears the record.
    """
    misses = 0
    for outcome in reversed(outcomes):
        if outcome is None:
            break
        misses += 1
    if misses < after_misses:
        return 0
    return min(most, 2 ** (misses - after_misses))


def benched_devices(history: Mapping[str, Sequence[tuple[int, str | None]]], round_no: int,
                    settings: GuardSettings) -> dict[str, str]:
    """{device: why it sits this round out}, from each device's recent (round, outcome) pairs, oldest first.

    A device is benched for benched_rounds(...) rounds after its last missed round.
    """
    out = {}
    for device, rounds in history.items():
        if not rounds:
            continue
        sit_out = benched_rounds([outcome for _, outcome in rounds], settings.bench_after_misses,
                                 settings.max_bench_rounds)
        last_round = rounds[-1][0]
        if sit_out and round_no <= last_round + sit_out:
            misses = sum(1 for _ in _trailing_misses([o for _, o in rounds]))
            out[device] = (f"benched until round {last_round + sit_out + 1}: missed its last {misses} deadline(s) "
                           f"(a device that answers again is scheduled again)")
    return out


def _trailing_misses(outcomes: Sequence[str | None]):
    for outcome in reversed(outcomes):
        if outcome is None:
            return
        yield outcome


def missed(status: str, reason: str | None) -> str | None:
    """A task's outcome for benching: the miss (why) when its device did not answer in time, else None."""
    if status == "failed" and reason in MISSED:
        return reason
    return None

