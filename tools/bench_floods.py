#!/usr/bin/env python3
"""Benchmark: what a flood from one hostile client costs the coordinator, against the bounds it states.

A coordinator serves every device of a fleet from one loop, on one disk: whatever anyone
can publish on a device topic (and on a loopback or badly configured broker that is anyone)
reaches it. coordinator/guards.py and the protocol limits are meant to keep each kind of
flood within a bound that depends on the settings, never on how much the attacker sends.
This benchmark sends each kind of flood to a real coordinator and checks that it does.

For each flood class, from scratch: a fresh embedded Mosquitto (coordinator.ops.broker),
the real coordinator as its own process (`edge-coordinator run` through
coordinator.local.fleet.LocalFleet: FedAvg on fmnist_cnn, evaluation on 500 test images),
one honest device agent (d0, its own process, Fashion-MNIST data) so that rounds run, and
`rogue`, a hand-made client that said hello like a device and holds a task (a device with a
task is the one that may upload and fetch). Round 1 runs normally (the rogue answers
Failed), so the coordinator's lifetime peak already holds a round's aggregation and
evaluation; in round 2 the rogue keeps its task (the round stays open, no round closes
while the flood is measured) and the flood is sent from a separate MQTT client:

  a hellos       5,000 Hellos from invented device ids, QoS 1
                   bound: the registry holds at most max_devices
  b partials     2,000 uploads from the rogue, each the first 120 KiB chunk (an agent's
                 chunk size) of a blob that never completes, declaring the largest size its
                 update may have; and 2,000 from invented ids that hold no task
                   bound: max_partial_uploads partials per device, gone after partial_upload_ttl_s
  c fetches      1,200 Fetch requests from the rogue for the largest blob its task names,
                 100 for a blob it does not name (amplification: bytes served per byte asked)
                   bound: fetches_per_minute blobs served a minute, only blobs the task names
  d oversize     payloads over the link's 1 MiB limit at QoS 0: 4 each of 2, 8, 32, 64 MiB
                   bound: the common RSS bound (the link drops them)
  e tiny-chunks  10,000 chunks of 1 byte of one upload that declares 10^12 chunks, in
                 batches of 1,000, each followed by a probe
                   bound: one partial; a chunk costs the coordinator the same CPU however many
                   came before (the last batch at most 2x the first, as
                   tests/test_hostile_fleet.py asks)
  f garbage      30,000 malformed messages on 40 device topics (8 invented ids x 5 kinds)
                   bound: the common ones (one rejection row each, batched per tick)

Measured per class: the coordinator's RSS before the flood and its peak while the flood is
sent and worked through (VmHWM from /proc/<pid>/status, reset to the current RSS through
clear_refs when the flood starts and sampled as well; its lifetime VmHWM before and at the
end is shown beside it), its VmRSS after; the workdir's disk use (real blocks and apparent
size) before and after; messages sent; rejections the coordinator stored (the state.db
`rejections` table); how long until it caught up (a probe: a malformed hello on a fresh
topic, sent after the flood on the same connection, whose rejection row shows that
everything before it was handled); and whether the first round opened after the flood
closed in time with d0's update accepted.

The bounds, from the coordinator's settings: the defaults of GuardSettings except max_devices
(1,000, not 10,000) and partial_upload_ttl_s (20 s, not 900), lowered so that a short run
reaches them (--max-devices, --partial-ttl-s); U = the largest update a task allows
(intake.update_limit_bytes: 1.7 MB for fmnist_cnn trained whole):

  RSS   the peak over the flood at most 80 MiB above the RSS before it: the 64 MiB of
        payloads the MQTT link may hold in its inbox (MAX_INBOX_BYTES; nothing else is kept per
        message) and 16 MiB for what holds them (paho's read buffer and copies of a packet,
        the queued messages' Python objects, allocator slack)
  disk  the workdir grows by at most  max_partial_uploads x tasks x (U + 12 KiB)  (partial
        uploads of every device holding a task)  +  1.5 KiB per message sent  (one rejection
        row, its reason cut at 1000 characters, or one registry row)  +  8 MiB (SQLite's
        write-ahead log before a checkpoint), in real blocks and in apparent size
  per class: as listed above (partials gone within partial_upload_ttl_s + 15 s)
  and every class: the coordinator stays up, catches up within 180 s, and the first round
        opened after the flood closes within its deadline (+ 10 s) with d0's update accepted

A class passes when it stays within every bound; the script exits 1 if any class fails.
Everything runs on this machine (loopback only); each class takes about a minute, the whole
run about 8 minutes on 2 shared cores, of which 40 s measure the memory profile once.

    python tools/bench_floods.py                        # every class, prints the table
    python tools/bench_floods.py --classes a,f          # a subset (letters or names)
    python tools/bench_floods.py --write-docs           # every class, then docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchdocs import machine, write_section  # noqa: E402

from coordinator.local.fleet import wait_until  # noqa: E402

MIB, KIB = 1 << 20, 1 << 10
FLEET = "floods"
HONEST, ROGUE = "d0", "rogue"
HONEST_TIER, HONEST_MB = "pi-zero-2w", 296      # what tests/fleet_helpers.py gives a device training the whole model
ROGUE_TIER, ROGUE_BUDGET = "a-rogue", 240 << 20  # its own tier: sampling always keeps it
INBOX_BYTES = 64 * MIB                          # edge_runtime.wire.mqtt_link.MAX_INBOX_BYTES
RSS_BOUND = INBOX_BYTES + 16 * MIB              # + paho's read buffer and copies of a packet, the queued messages'
                                                # Python objects, allocator slack
ROW_BYTES = 1536                                # disk per message: one rejection (reason <= 1000 chars) or device row
PARTIAL_FILE_SLACK = 12 * KIB                   # a partial's .meta and .log files and the .part's last block
WAL_SLACK = 8 * MIB                             # SQLite's WAL grows to ~4 MiB (1000 pages) before a checkpoint
CATCH_UP_S = 180.0
EXPIRY_SLACK_S = 15.0
HOLD_ROUND = 2                                  # the round whose task the rogue keeps through the flood


# -- reading the coordinator from the outside ------------------------------------------------------

def proc_kib(pid: int, key: str) -> int:
    """A /proc/<pid>/status figure (VmRSS, VmHWM) in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")


def disk_use(path: Path) -> tuple[int, int]:
    """(real bytes in blocks, apparent bytes) of every file under `path`, as du and du --apparent-size count."""
    real = apparent = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            real += st.st_blocks * 512
            apparent += st.st_size
    return real, apparent


def state_bytes(work: Path) -> int:
    """Real bytes of the state store: state.db and its write-ahead log."""
    return sum(p.stat().st_blocks * 512 for p in work.glob("state.db*") if p.is_file())


class Memory:
    """The coordinator's (and the broker's) RSS over a window: VmHWM reset at its start, and sampled every 10 ms."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.before = {n: proc_kib(p, "VmRSS") for n, p in pids.items()}
        self.lifetime_hwm_before = {n: proc_kib(p, "VmHWM") for n, p in pids.items()}
        self.cpu_before = {n: cpu_seconds(p) for n, p in pids.items()}
        self.reset = {}
        for name, pid in pids.items():
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")      # VmHWM := VmRSS
                self.reset[name] = True
            except OSError:
                self.reset[name] = False
        self.peak = dict(self.before)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            for name, pid in self.pids.items():
                try:
                    self.peak[name] = max(self.peak[name], proc_kib(pid, "VmRSS"))
                except (OSError, KeyError):
                    pass

    def checkpoint(self, name: str = "coordinator") -> int:
        """The process's peak since the last reset (kept in the window's peak), then VmHWM reset again: the peak
        of one step of a flood."""
        pid = self.pids[name]
        peak = proc_kib(pid, "VmHWM") if self.reset[name] else proc_kib(pid, "VmRSS")
        self.peak[name] = max(self.peak[name], peak)
        if self.reset[name]:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        return peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.after = {}
        self.cpu = {}
        for name, pid in self.pids.items():
            if self.reset[name]:
                self.peak[name] = max(self.peak[name], proc_kib(pid, "VmHWM"))
            self.after[name] = proc_kib(pid, "VmRSS")
            self.cpu[name] = cpu_seconds(pid) - self.cpu_before[name]

    def growth(self, name: str) -> int:
        return self.peak[name] - self.before[name]


class State:
    """Read-only looks into the coordinator's state.db (it writes in WAL mode; readers never block it)."""

    def __init__(self, work: Path):
        self.path = work / "state.db"

    def rows(self, sql: str, *args) -> list[tuple]:
        with closing(sqlite3.connect(f"{self.path.as_uri()}?mode=ro", uri=True, timeout=30)) as db:
            return db.execute(sql, args).fetchall()

    def last_rejection(self) -> int:
        return self.rows("SELECT COALESCE(MAX(id), 0) FROM rejections")[0][0]

    def rejections(self, after_id: int, text: str = "") -> int:
        return self.rows("SELECT COUNT(*) FROM rejections WHERE id > ? AND instr(reason, ?) > 0", after_id, text)[0][0]

    def devices(self) -> int:
        return self.rows("SELECT COUNT(*) FROM devices")[0][0]

    def registered(self, device: str) -> bool:
        return bool(self.rows("SELECT 1 FROM devices WHERE device_id = ?", device))

    def open_tasks(self) -> int:
        return self.rows("SELECT COUNT(*) FROM tasks t JOIN rounds r ON r.round = t.round "
                         "WHERE r.state = 'open' AND t.status = 'sent'")[0][0]

    def update_limit(self, task_id: str, manifest_path: Path) -> int:
        """The largest update blob this task's device may upload (what the upload guard holds it to)."""
        from coordinator.intake import update_limit_bytes
        from coordinator.state_store import StateStore
        from edge_runtime.wire.manifest import Manifest
        store = StateStore(self.path, readonly=True)
        try:
            return update_limit_bytes(Manifest.load(manifest_path), store.task(task_id))
        finally:
            store.close()


def read_metrics(work: Path) -> list[dict]:
    path = work / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []




# -- speaking MQTT ---------------------------------------------------------------------------------

def publish(link, topic: str, payload: bytes, qos: int = 1, user_properties=None):
    """Publish, waiting while paho's outgoing queue is full (a flood outruns it)."""
    while True:
        try:
            return link.publish(topic, payload, qos=qos, user_properties=user_properties)
        except BufferError:
            time.sleep(0.01)


class Rogue:
    """A hand-made device: says hello, answers each task with Failed at once, except that it keeps its task of
    round HOLD_ROUND (so the round stays open through the flood) until released."""

    def __init__(self, broker, topics):
        from edge_runtime.wire.mqtt_link import MqttLink
        from edge_runtime.wire.protocol import Hello, Status
        self.topics = topics
        self.link = MqttLink("bench-rogue", broker.host, broker.port, [(topics.device(ROGUE, "task"), 1)]).start()
        self.hello = Hello(ROGUE, ROGUE_TIER, ROGUE_BUDGET, "bench-floods").encode()
        self.link.publish(topics.device(ROGUE, "status"), Status("online", time.time()).encode(), retain=True)
        self.link.publish(topics.device(ROGUE, "hello"), self.hello)
        self.held = None
        self.holding = threading.Event()
        self._released = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._answer, daemon=True)
        self._thread.start()

    def _fail(self, task) -> None:
        from edge_runtime.wire.protocol import Failed
        self.link.publish(self.topics.device(ROGUE, "update"),
                          Failed(task.task_id, task.round, ROGUE, "bench_floods: no update").encode())

    def _answer(self) -> None:
        from edge_runtime.wire.protocol import Idle, ProtocolError, Task, decode_any
        while not self._stop.is_set():
            msg = self.link.get(0.1)
            if msg is None:
                continue
            try:
                task = decode_any(msg.payload, (Task, Idle))
            except ProtocolError:
                continue
            if not isinstance(task, Task):
                continue
            with self._lock:
                if task.round == HOLD_ROUND and not self._released:
                    self.held = task
                    self.holding.set()
                    continue
            self._fail(task)

    def release(self) -> None:
        with self._lock:
            self._released = True
            held = self.held
        if held is not None:
            self._fail(held)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.link.stop()


class BlobCounter:
    """A QoS 0 subscriber to the rogue's blob topic: what the coordinator served it, per blob."""

    def __init__(self, host: str, port: int, topic: str):
        import paho.mqtt.client as mqtt
        self.bytes = self.messages = 0
        self.serves: dict[str, int] = {}       # blob -> chunk-0 messages (one per served request)
        self.last = time.monotonic()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                                   client_id="bench-blob-counter")
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *a: self._subscribed.set()
        self._client.connect(host, port)
        self._client.subscribe(topic, qos=0)
        self._client.loop_start()
        self._subscribed.wait(10)

    def _on_message(self, client, userdata, message) -> None:
        self.bytes += len(message.payload)
        self.messages += 1
        self.last = time.monotonic()
        props = dict(getattr(message.properties, "UserProperty", None) or [])
        if props.get("index") == "0":
            self.serves[props.get("blob", "")] = self.serves.get(props.get("blob", ""), 0) + 1

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


# -- one class -----------------------------------------------------------------------------------

@dataclass
class Run:
    """One class's fleet: the broker, the coordinator and d0 as processes, the rogue, and the flooding client."""
    name: str
    args: argparse.Namespace
    root: Path
    work: Path
    broker: object
    fleet: object
    topics: object
    state: State
    rogue: Rogue
    flooder: object
    task: object                     # the rogue's held Task
    limit: int                       # the largest update its task allows
    links: list = field(default_factory=list)
    probes: int = 0
    mem: Memory | None = None
    before_id: int = 0               # the last rejection row before the flood

    def topic(self, device: str, kind: str) -> str:
        return self.topics.device(device, kind)

    def log_text(self, name: str = "coordinator") -> str:
        path = self.fleet.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def broker_log(self) -> str:
        path = self.broker.log_path
        return path.read_text(errors="replace") if path.exists() else ""

    def alive(self) -> bool:
        return self.fleet.procs["coordinator"].poll() is None

    def probe(self, link, qos: int = 1, timeout_s: float = CATCH_UP_S) -> float | None:
        """Seconds until the coordinator stored the rejection of a probe sent now on `link` (so it has handled
        everything `link` published before); a probe unanswered for 10 s (dropped on the way) is sent again."""
        start, after_id = time.monotonic(), self.before_id
        tags: list[str] = []
        while time.monotonic() - start < timeout_s and self.alive():
            tags.append(f"probe-{uuid.uuid4().hex[:10]}")
            self.probes += 1
            publish(link, self.topic(tags[-1], "hello"), b"probe", qos=qos)
            again = min(start + timeout_s, time.monotonic() + 10.0)
            while time.monotonic() < again:
                if any(self.state.rejections(after_id, tag) for tag in tags):
                    return time.monotonic() - start
                time.sleep(0.05)
        return None


@dataclass
class Flood:
    """What a class's flood function reports: messages and bytes sent, when it ended, and per-class figures."""
    sent: int
    sent_bytes: int
    ended: float = 0.0                              # time.monotonic() when the broker had taken the last message
    qos: int = 1
    info: dict = field(default_factory=dict)        # shown in the details
    checks: list = field(default_factory=list)      # (what, ok) beyond the common bounds
    after_catch_up: Callable | None = None          # more to wait for before the window closes (fetch serving)
    after_round: Callable | None = None             # checks once the honest round closed (expiry)
    served_bytes: int | None = None                 # c: what the coordinator served the rogue


def _last_sent(info, qos: int) -> float:
    if qos:
        info.wait_for_publish(60)
    return time.monotonic()


def flood_hellos(run: Run) -> Flood:
    from edge_runtime.wire.protocol import Hello
    n, sent_bytes, info = run.args.hellos, 0, None
    registered = run.state.devices()
    for i in range(n):
        device = f"flood-{i:05d}"
        payload = Hello(device, "zz-flood", ROGUE_BUDGET, "flood").encode()
        info = publish(run.flooder, run.topic(device, "hello"), payload)
        sent_bytes += len(payload)
    flood = Flood(n, sent_bytes, _last_sent(info, 1))

    def after_catch_up():
        count = run.state.devices()
        flood.info["registry"] = f"{registered} devices before, {count} after (max_devices {run.args.max_devices})"
        flood.checks.append((f"registry {count} <= max_devices {run.args.max_devices}", count <= run.args.max_devices))
        full = run.state.rejections(run.before_id, "the registry is full")
        flood.info["refused: registry full"] = full
    flood.after_catch_up = after_catch_up
    return flood


def flood_partials(run: Run) -> Flood:
    from edge_runtime.wire.transfer import DEFAULT_CHUNK_BYTES, ChunkHeader
    n = run.args.uploads
    data = os.urandom(DEFAULT_CHUNK_BYTES)          # what an agent sends: the largest chunk it uses
    chunk_sha = hashlib.sha256(data).hexdigest()
    count = math.ceil(run.limit / len(data))
    blobs, sent_bytes, info = [], 0, None
    for i in range(n):
        blob = os.urandom(32).hex()
        blobs.append(blob)
        header = ChunkHeader(blob, 0, count, 0, run.limit, chunk_sha)   # the first chunk of the largest update allowed
        info = publish(run.flooder, run.topic(ROGUE, "upload"), data, user_properties=header.to_properties())
        ghost = f"ghost-{i:05d}"                                        # and one from an id that holds no task
        info = publish(run.flooder, run.topic(ghost, "upload"), data, user_properties=header.to_properties())
        sent_bytes += 2 * len(data)
    flood = Flood(2 * n, sent_bytes, _last_sent(info, 1))
    partial_dir = run.work / "incoming" / "partial"
    mine = set(blobs)

    def partials() -> set[str]:
        return {p.name.split(".")[0] for p in partial_dir.iterdir()} & mine

    def after_catch_up():
        started = partials()
        flood.info["partial uploads kept"] = f"{len(started)} of {n} from the rogue"
        flood.info["refused: already uploading"] = run.state.rejections(run.before_id, "already uploads")
        flood.info["refused: owes no update"] = run.state.rejections(run.before_id, "owes no update")
        flood.checks.append((f"{len(started)} partials from the rogue <= max_partial_uploads "
                             f"{run.args.max_partial_uploads}", len(started) <= run.args.max_partial_uploads))

    def after_round():
        ttl = run.args.partial_ttl_s
        left = ttl + EXPIRY_SLACK_S - (time.monotonic() - flood.ended)
        gone = wait_until(lambda: not partials(), max(0.0, left) + 0.5, 0.25)
        took = time.monotonic() - flood.ended
        flood.info["partials expired"] = (f"{took:.0f} s after the flood" if gone else
                                          f"still {len(partials())} after {took:.0f} s") + f" (ttl {ttl:g} s)"
        flood.checks.append((f"partials gone within ttl {ttl:g} s + {EXPIRY_SLACK_S:g} s", bool(gone)))
    flood.after_catch_up, flood.after_round = after_catch_up, after_round
    return flood


def flood_fetches(run: Run) -> Flood:
    from edge_runtime.wire.protocol import Fetch
    task = run.task
    named = {task.manifest["sha256"]: task.manifest["size"], **{b["sha256"]: b["size"] for b in task.blobs}}
    largest = max(named, key=named.get)
    unnamed = next((p.name for p in sorted((run.work / "blobs").iterdir()) if p.is_file() and p.name not in named),
                   os.urandom(32).hex())
    counter = BlobCounter(run.broker.host, run.broker.port, run.topic(ROGUE, "blob"))
    run.links.append(counter)
    n, n_unnamed = run.args.fetches, run.args.fetches // 12
    ask, ask_unnamed = Fetch(largest).encode(), Fetch(unnamed).encode()
    order = [ask] * n + [ask_unnamed] * n_unnamed
    order = [order[i] for i in sorted(range(len(order)), key=lambda i: (i * 7919) % len(order))]   # interleaved
    start, info = time.monotonic(), None
    for payload in order:
        info = publish(run.flooder, run.topic(ROGUE, "fetch"), payload)
    flood = Flood(len(order), sum(map(len, order)), _last_sent(info, 1))

    def after_catch_up():
        # serving runs in the coordinator's pool, after its loop took the request: wait until it stops
        wait_until(lambda: time.monotonic() - counter.last > 3.0, 300, 0.2)
        window = counter.last - start
        served = counter.serves.get(largest, 0)
        per_minute = run.args.fetches_per_minute
        allowed = per_minute * max(1, math.ceil(window / 60))
        flood.info["largest named blob"] = f"{named[largest] / MIB:.2f} MB ({largest[:12]}…)"
        flood.info["served"] = (f"{served} of {n} requests, {counter.bytes / MIB:.0f} MB, serving ended "
                                f"{counter.last - flood.ended:.1f} s after the last request")
        flood.info["amplification"] = (f"{counter.bytes / max(1, flood.sent_bytes):,.0f} bytes served per byte "
                                       f"requested ({named[largest] / len(ask):,.0f} per served request)")
        flood.info["refused: rate"] = run.state.rejections(run.before_id, "fetches a minute")
        flood.info["refused: not named"] = run.state.rejections(run.before_id, "which no open task of its names")
        flood.info["served MB/s"] = f"{counter.bytes / MIB / max(1e-3, window):.0f}"
        flood.checks.append((f"{served} served <= fetches_per_minute x minutes = {allowed}", served <= allowed))
        flood.checks.append((f"unnamed blob served {counter.serves.get(unnamed, 0)} times (0)",
                             counter.serves.get(unnamed, 0) == 0))
        flood.served_bytes = counter.bytes
    flood.after_catch_up = after_catch_up
    return flood


def flood_oversize(run: Run) -> Flood:
    sizes = [int(x) * MIB for x in run.args.oversize_mib.split(",")]
    n = run.args.oversize
    dropped_before = run.log_text().count("oversize or inbox full")
    steps, sent, sent_bytes = [], 0, 0
    for size in sizes:               # each size a step of its own: its peak is read (and reset) after it
        payload = os.urandom(size)
        before = proc_kib(run.mem.pids["coordinator"], "VmRSS")
        for i in range(n):
            run.flooder.publish(run.topic(f"big-{i % 8}", "update"), payload, qos=0).wait_for_publish(120)
        run.probe(run.flooder, qos=0)
        steps.append((size, run.mem.checkpoint() - before))
        sent, sent_bytes = sent + n, sent_bytes + n * size
        del payload
    flood = Flood(sent, sent_bytes, time.monotonic(), qos=0)
    flood.info["peak growth per payload size"] = ", ".join(f"{s_ // MIB} MiB x {n}: +{g / MIB:.0f} MB"
                                                           for s_, g in steps)

    def after_catch_up():
        text = run.log_text()
        counts = [int(c) for c in re.findall(r"dropped (\d+) message\(s\) so far", text)]
        flood.info["link drops logged"] = (f"{text.count('oversize or inbox full') - dropped_before} log line(s), "
                                           f"the last saying {max(counts) if counts else 0} dropped so far")
    flood.after_catch_up = after_catch_up
    return flood


def flood_tiny_chunks(run: Run) -> Flood:
    from edge_runtime.wire.transfer import ChunkHeader
    n, batch = run.args.chunks, 1000
    blob, data = os.urandom(32).hex(), b"x"
    chunk_sha = hashlib.sha256(data).hexdigest()
    pid = run.mem.pids["coordinator"]
    walls, cpus, sent, info = [], [], 0, None
    while sent < n:
        start, cpu = time.monotonic(), cpu_seconds(pid)
        for i in range(sent, min(n, sent + batch)):
            header = ChunkHeader(blob, i, 10 ** 12, i, run.limit, chunk_sha)
            info = publish(run.flooder, run.topic(ROGUE, "upload"), data, user_properties=header.to_properties())
        sent = min(n, sent + batch)
        if sent < n:       # the last batch's probe is the common catch-up probe
            run.probe(run.flooder)
            walls.append(time.monotonic() - start)
            cpus.append(cpu_seconds(pid) - cpu)
    flood = Flood(n, n, _last_sent(info, 1))
    partial_dir = run.work / "incoming" / "partial"

    def after_catch_up():
        walls.append(time.monotonic() - start)
        cpus.append(cpu_seconds(pid) - cpu)
        files = [p for p in partial_dir.iterdir() if p.name.startswith(blob)]
        real = sum(p.stat().st_blocks * 512 for p in files)
        apparent = sum(p.stat().st_size for p in files)
        flood.info[f"coordinator CPU seconds per {batch} chunks"] = ", ".join(f"{t:.1f}" for t in cpus)
        flood.info[f"wall seconds per {batch} chunks"] = ", ".join(f"{t:.1f}" for t in walls)
        flood.info["its partial"] = f"{len(files)} files, {real / KIB:.0f} KiB real, {apparent / KIB:.0f} KiB apparent"
        flood.info["refused"] = run.state.rejections(run.before_id, "upload")
        bound = run.limit + PARTIAL_FILE_SLACK + 14 * n         # the .part, and a line of its .log per chunk
        flood.checks.append((f"its partial {apparent:,} B <= U + 12 KiB + 14 B per chunk = {bound:,} B",
                             apparent <= bound))
        first, last = cpus[0], cpus[-1]
        flood.checks.append((f"a chunk costs the same however many came before: CPU per batch, last {last:.1f} s "
                             f"<= 2 x first {first:.1f} s", last <= 2 * first))
    flood.after_catch_up = after_catch_up
    return flood


GARBAGE = (b"{not json", b'{"type":"update"}', b"[]", b'{"type":"hello","device_id":1}', b"\xff\xfe" * 20)


def flood_garbage(run: Run) -> Flood:
    n, kinds = run.args.garbage, ("hello", "status", "fetch", "upload", "update")
    lines_before = run.log_text().count("rejected a message from")
    sent_bytes, info = 0, None
    for i in range(n):
        payload = GARBAGE[(i // 5) % len(GARBAGE)]
        info = publish(run.flooder, run.topic(f"junk-{i % 8}", kinds[i % 5]), payload)
        sent_bytes += len(payload)
    flood = Flood(n, sent_bytes, _last_sent(info, 1))

    def after_catch_up():
        lines = run.log_text().count("rejected a message from") - lines_before
        flood.info["log lines"] = f"{lines} 'rejected a message' lines for {n} messages on 40 topics"
        lost = n + run.probes - run.state.rejections(run.before_id)
        flood.info["never reached the coordinator"] = (
            f"{lost} of the {n} (each that reached it is a rejection)" + (
                ": the broker dropped them, its queue for the coordinator full (max_queued_messages); it drops "
                "whatever else arrives for the coordinator then, honest messages too" if lost > 0 else ""))
    flood.after_catch_up = after_catch_up
    return flood


@dataclass(frozen=True)
class FloodClass:
    letter: str
    name: str
    title: str
    flood: Callable[[Run], Flood]


CLASSES = [
    FloodClass("a", "hellos", "hellos from invented ids", flood_hellos),
    FloodClass("b", "partials", "never-finished uploads", flood_partials),
    FloodClass("c", "fetches", "fetches of the largest blob", flood_fetches),
    FloodClass("d", "oversize", "oversize payloads, QoS 0", flood_oversize),
    FloodClass("e", "tiny-chunks", "1-byte chunks of one upload", flood_tiny_chunks),
    FloodClass("f", "garbage", "malformed messages", flood_garbage),
]


def coordinator_settings(args, work: Path, profile: Path) -> dict:
    return {"service": {"workdir": str(work), "strategy": "fedavg", "profile": str(profile), "min_devices": 2,
                        "round_deadline_s": args.deadline_s, "offline_grace_s": 5.0, "eval_samples": 500,
                        "max_rounds": 50, "max_devices": args.max_devices, "max_tasks_per_round": 1000,
                        "max_partial_uploads": args.max_partial_uploads, "partial_upload_ttl_s": args.partial_ttl_s,
                        "fetches_per_minute": args.fetches_per_minute},
            "train": {"learning_rate": 2e-3, "local_epochs": 1.0, "batch_sizes": [32, 64]},
            "fedavg": {"rounds": 50}}


def run_class(cls: FloodClass, args, prep: dict, log) -> dict:
    """One class from a fresh broker, coordinator and agent: returns its measurements and verdict."""
    from coordinator.local.fleet import DeviceSpec, LocalFleet
    from coordinator.ops.broker import EmbeddedBroker
    from edge_runtime.wire.mqtt_link import MqttLink
    from edge_runtime.wire.protocol import Topics

    t0 = time.monotonic()
    root = prep["root"] / cls.name
    shutil.rmtree(root, ignore_errors=True)
    work = root / "fleet" / "coordinator"
    topics = Topics(FLEET)
    broker = EmbeddedBroker(root / "broker").start()
    fleet = LocalFleet(root / "fleet", broker.url, FLEET)
    rogue = flooder = None
    links: list = []
    result = {"class": cls.name, "letter": cls.letter, "title": cls.title, "checks": [], "info": {}}
    try:
        fleet.start_coordinator(coordinator_settings(args, work, prep["profile"]))
        coordinator_log = fleet.logs / "coordinator.log"
        if not wait_until(lambda: coordinator_log.exists() and "coordinator for fleet" in coordinator_log.read_text(),
                        180):
            raise RuntimeError(f"the coordinator did not start:\n{fleet.log_tail('coordinator')}")
        state = State(work)
        rogue = Rogue(broker, topics)
        for _ in range(12):              # a hello sent before the coordinator's subscription took hold is lost
            if wait_until(lambda: state.registered(ROGUE), 5.0):
                break
            rogue.link.publish(topics.device(ROGUE, "hello"), rogue.hello)
        else:
            raise RuntimeError(f"the rogue was never registered:\n{fleet.log_tail('coordinator')}")
        fleet.start_device(DeviceSpec(HONEST, HONEST_TIER, HONEST_MB, prep["data"]))
        if not rogue.holding.wait(args.deadline_s + 180):
            raise RuntimeError(f"round {HOLD_ROUND} never opened:\n{fleet.log_tail('coordinator')}\n"
                               f"{fleet.log_tail(HONEST)}")
        flooder = MqttLink(f"bench-flooder-{cls.name}", broker.host, broker.port, []).start()
        links.append(flooder)
        task = rogue.held
        run = Run(cls.name, args, root, work, broker, fleet, topics, state, rogue, flooder, task,
                  state.update_limit(task.task_id, work / "model" / "manifest.json"), links)
        pid = fleet.procs["coordinator"].pid
        time.sleep(1.0)                                   # let the round's opening settle
        tasks_open = state.open_tasks()
        before_id = run.before_id = state.last_rejection()
        disk_before = disk_use(work)
        state_before = state_bytes(work)
        partial_before = disk_use(work / "incoming" / "partial")
        log_before = coordinator_log.stat().st_size
        lines_before = len(run.log_text().splitlines())
        mem = run.mem = Memory({"coordinator": pid, "broker": broker.pid})
        started = time.monotonic()
        log(f"[{cls.letter} {cls.name}] round {task.round} open, {tasks_open} task(s); flooding")
        flood = cls.flood(run)
        sent_s = flood.ended - started
        caught = run.probe(flooder, qos=flood.qos)
        caught_s = None if caught is None else time.monotonic() - flood.ended
        if flood.after_catch_up is not None and run.alive():
            flood.after_catch_up()
        mem.stop()
        window_s = time.monotonic() - started
        held_closed = any(m["round"] == task.round for m in read_metrics(work))
        disk_after = disk_use(work)
        partial_after = disk_use(work / "incoming" / "partial")
        stored = state.rejections(before_id) if run.alive() else 0
        flood_end_wall = time.time()
        log(f"[{cls.letter} {cls.name}] sent {flood.sent} in {sent_s:.1f} s, caught up "
            f"{'never' if caught_s is None else f'{caught_s:.1f} s'} later; waiting for an honest round")

        # the honest round: the first round opened after the flood closes in time with d0's update accepted
        rogue.release()
        deadline = args.deadline_s

        def honest_round():
            for m in read_metrics(work):
                if m["opened_at"] > flood_end_wall:
                    return m
            return None
        honest = wait_until(lambda: honest_round() or not run.alive(), 2 * deadline + 90, 0.5)
        honest = honest if isinstance(honest, dict) else None
        if flood.after_round is not None and run.alive():
            flood.after_round()
        alive = run.alive()
        end_rss = proc_kib(pid, "VmRSS") if alive else 0
        end_hwm = proc_kib(pid, "VmHWM") if alive else 0
        end_disk = disk_use(work)

        # the bounds
        partial_bound = args.max_partial_uploads * tasks_open * (run.limit + PARTIAL_FILE_SLACK)
        disk_bound = partial_bound + (flood.sent + run.probes) * ROW_BYTES + WAL_SLACK
        grown_real = disk_after[0] - disk_before[0]
        grown_apparent = disk_after[1] - disk_before[1]
        checks = [
            ("coordinator alive", alive),
            (f"caught up within {CATCH_UP_S:.0f} s", caught_s is not None),
            (f"RSS peak growth {mem.growth('coordinator') / MIB:.1f} MB <= {RSS_BOUND / MIB:.0f} MB",
             mem.growth("coordinator") <= RSS_BOUND),
            (f"disk growth {grown_real / MIB:.2f} MB real, {grown_apparent / MIB:.2f} MB apparent <= "
             f"{disk_bound / MIB:.1f} MB", max(grown_real, grown_apparent) <= disk_bound),
            *flood.checks,
        ]
        if honest is None:
            checks.append(("a round opened after the flood closed", False))
        else:
            took = honest["closed_at"] - honest["opened_at"]
            status = honest["devices"].get(HONEST, {}).get("status", "not planned")
            checks.append((f"round {honest['round']} (opened after the flood) closed in {took:.0f} s "
                           f"<= deadline {deadline:g} + 10 s", took <= deadline + 10))
            checks.append((f"d0's update in round {honest['round']}: {status}", status == "accepted"))
        drops = run.broker_log().count("Outgoing messages are being dropped")
        too_large = run.broker_log().count("Dropping too large outgoing PUBLISH for edge-coordinator")
        with open(coordinator_log, "rb") as f:
            f.seek(log_before)
            window_log = f.read().decode("utf-8", "replace")
        link_drops = [int(c) for c in re.findall(r"dropped (\d+) message\(s\) so far", window_log)]
        result.update(
            sent=flood.sent, sent_mb=flood.sent_bytes / MIB, sent_s=sent_s, qos=flood.qos, stored=stored,
            probes=run.probes, caught_s=caught_s, window_s=window_s, tasks_open=tasks_open, limit=run.limit,
            rss_before=mem.before["coordinator"], rss_peak=mem.peak["coordinator"], rss_after=mem.after["coordinator"],
            growth=mem.growth("coordinator"), hwm_reset=mem.reset["coordinator"],
            hwm_lifetime_before=mem.lifetime_hwm_before["coordinator"], hwm_end=end_hwm, rss_end=end_rss,
            cpu_s=mem.cpu["coordinator"], broker_before=mem.before["broker"], broker_peak=mem.peak["broker"],
            disk_before=disk_before, disk_after=disk_after, disk_end=end_disk, partial_before=partial_before,
            partial_after=partial_after, disk_bound=disk_bound, partial_bound=partial_bound,
            log_bytes=coordinator_log.stat().st_size - log_before,
            log_lines=len(run.log_text().splitlines()) - lines_before, broker_drop_lines=drops,
            held_closed=held_closed, link_drops=max(link_drops, default=0), broker_too_large=too_large,
            state_growth=state_bytes(work) - state_before,
            honest=None if honest is None else {
                "round": honest["round"], "seconds": honest["closed_at"] - honest["opened_at"],
                "closed_because": honest["closed_because"], "tasks": len(honest["devices"]),
                "d0": honest["devices"].get(HONEST, {}).get("status", "not planned"),
                "after_flood_s": honest["closed_at"] - flood_end_wall},
            checks=checks, info=flood.info, passed=all(ok for _, ok in checks),
            tracebacks=run.log_text().count("Traceback"), seconds=time.monotonic() - t0)
        if flood.served_bytes is not None:
            result["served_mb"] = flood.served_bytes / MIB
        if not alive:
            result["log_tail"] = fleet.log_tail("coordinator", 40)
        return result
    except Exception as exc:   # a class that could not be measured fails, the others still run
        result.update(passed=False, error=f"{type(exc).__name__}: {exc}", checks=[("measured", False)],
                      seconds=time.monotonic() - t0)
        return result
    finally:
        for link in links:
            try:
                link.stop()
            except Exception:
                pass
        if rogue is not None:
            rogue.stop()
        fleet.stop_all()
        broker.stop()


# -- the report ------------------------------------------------------------------------------------

def mb(n: float) -> str:
    return f"{n / MIB:.1f}"


def table(results: list[dict]) -> str:
    lines = ["| class | sent | rejections stored | caught up | coordinator RSS before → flood peak (growth) | "
             "RSS after | workdir disk growth, real / apparent (bound) | round after the flood | verdict |",
             "|---|---:|---:|---:|---|---:|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['letter']} {r['name'] if 'name' in r else r['class']} | | | | | | | | "
                         f"**FAIL** ({r['error'][:80]}) |")
            continue
        real = r["disk_after"][0] - r["disk_before"][0]
        apparent = r["disk_after"][1] - r["disk_before"][1]
        h = r["honest"]
        honest = "none closed" if h is None else \
            f"r{h['round']}: {h['seconds']:.0f} s, d0 {h['d0']}" + (f", {h['tasks']} tasks" if h["tasks"] > 2 else "")
        caught = "never" if r["caught_s"] is None else f"{r['caught_s']:.1f} s"
        lines.append(
            f"| {r['letter']} {r['class']} | {r['sent']:,} ({r['sent_mb']:.1f} MB, QoS {r['qos']}, "
            f"{r['sent_s']:.1f} s) "
            f"| {r['stored']:,} | {caught} | {mb(r['rss_before'])} → {mb(r['rss_peak'])} MB "
            f"(+{mb(r['growth'])}) | {mb(r['rss_after'])} MB | {real / MIB:+.2f} / {apparent / MIB:+.2f} MB "
            f"(≤ {mb(r['disk_bound'])}) | {honest} | **{'PASS' if r['passed'] else 'FAIL'}** |")
    return "\n".join(lines)


def details(results: list[dict]) -> list[str]:
    out = []
    for r in results:
        head = f"- **{r['letter']} {r['class']}** ({r['title']}, {r.get('seconds', 0):.0f} s)"
        if "error" in r:
            out.append(f"{head}: not measured: {r['error']}")
            continue
        facts = [f"{k}: {v}" for k, v in r["info"].items()]
        facts.append(f"coordinator CPU {r['cpu_s']:.1f} s over the {r['window_s']:.0f} s window")
        facts.append(f"lifetime VmHWM {mb(r['hwm_lifetime_before'])} MB before, {mb(r['hwm_end'])} MB at the end "
                     f"(RSS {mb(r['rss_end'])} MB)")
        facts.append(f"broker RSS {mb(r['broker_before'])} → peak {mb(r['broker_peak'])} MB")
        facts.append(f"incoming/partial {r['partial_before'][0] / KIB:.0f} → {r['partial_after'][0] / KIB:.0f} KiB "
                     f"real, {r['partial_before'][1] / MIB:.1f} → {r['partial_after'][1] / MIB:.1f} MB apparent "
                     f"(partial bound {mb(r['partial_bound'])} MB: {r['tasks_open']} tasks x "
                     f"max_partial_uploads x U = {r['limit']:,} B)")
        if r["stored"] >= 100:
            facts.append(f"state.db + WAL {r['state_growth'] / MIB:+.2f} MB, {r['state_growth'] / r['stored']:.0f} B "
                         f"per stored rejection")
        if r.get("broker_too_large"):
            facts.append(f"mosquitto dropped {r['broker_too_large']} PUBLISH(es) too large for the coordinator's "
                         "announced Maximum Packet Size before sending them")
        if r["link_drops"]:
            facts.append(f"the coordinator's MQTT link dropped at least {r['link_drops']} message(s) (oversize, or "
                         "its inbox full; it logs the 1st and every 1000th)")
        facts.append(f"coordinator log +{r['log_bytes'] / KIB:.0f} KiB ({r['log_lines']} lines)")
        if r["broker_drop_lines"]:
            facts.append(f"mosquitto logged {r['broker_drop_lines']} 'Outgoing messages are being dropped' line(s) "
                         f"(its queue for the coordinator is max_queued_messages 10000)")
        if r["honest"]:
            facts.append(f"round {r['honest']['round']} closed {r['honest']['after_flood_s']:.0f} s after the flood's "
                         f"catch-up ({r['honest']['closed_because']})")
        if r.get("held_closed"):
            facts.append(f"the held round {HOLD_ROUND} reached its deadline inside the window: the peak includes a "
                         "round's close (aggregation, evaluation)")
        if r["tracebacks"]:
            facts.append(f"{r['tracebacks']} traceback(s) in the coordinator log")
        failed = [what for what, ok in r["checks"] if not ok]
        if failed:
            facts.append("FAILED: " + "; ".join(failed))
        out.append(f"{head}: " + "; ".join(facts) + ".")
    return out


def section(args, results: list[dict], minutes: float, load: tuple[float, float]) -> str:
    from coordinator.guards import GuardSettings
    g = GuardSettings()
    return "\n".join([
        "## Floods against the coordinator (bench_floods)",
        "",
        f"Command: `.venv/bin/python tools/bench_floods.py --write-docs` ({minutes:.1f} min on {machine()}; "
        f"1-min load average {load[0]:.1f} at start, {load[1]:.1f} at end).",
        "",
        "Per class, from scratch: a fresh embedded Mosquitto, the coordinator as its own process (FedAvg on "
        "fmnist_cnn, "
        f"round deadline {args.deadline_s:g} s, evaluation on 500 test images), one honest agent (d0, "
        f"{args.samples} Fashion-MNIST images) and `rogue`, a hand-made client registered as a device. Round 1 runs "
        f"normally; the rogue keeps its round-{HOLD_ROUND} task, so that round stays open (nothing closes) while a "
        "separate MQTT client floods. *Flood peak* = the coordinator's VmHWM, reset to its RSS when the flood "
        "starts (clear_refs), read when the coordinator caught up (for fetches: when serving stopped), so the growth "
        "is what the flood cost; *caught up* = from the broker taking the flood's last message to the coordinator "
        "storing the rejection of a probe sent after it on the same connection; *disk* = the workdir's files in "
        "real blocks and in apparent size (partial uploads are sparse), over the same window; *round after the "
        "flood* = the first round opened after it, with d0's update.",
        "",
        f"Floods, from one MQTT client as fast as the broker takes them: **a** {args.hellos:,} Hellos from invented "
        f"ids; **b** {args.uploads:,} first chunks (120 KiB, an agent's chunk size) of uploads that never complete "
        f"from the rogue, each declaring U bytes, and {args.uploads:,} from invented ids; **c** {args.fetches:,} "
        f"Fetches of the largest blob the rogue's task names and {args.fetches // 12} of a blob it does not name; "
        f"**d** {args.oversize} payloads each of {args.oversize_mib.replace(',', ', ')} MiB at QoS 0 (the link's "
        f"limit is 1 MiB); **e** {args.chunks:,} chunks of 1 byte of one upload declaring 10^12 chunks, in batches "
        f"of 1,000 each followed by a probe; **f** {args.garbage:,} malformed messages on 40 device topics "
        "(8 invented ids x 5 kinds). All at QoS 1 but d.",
        "",
        f"Settings: the defaults of GuardSettings (hellos_per_minute {g.hellos_per_minute}, max_partial_uploads "
        f"{g.max_partial_uploads}, fetches_per_minute {g.fetches_per_minute}) except max_devices {args.max_devices} "
        f"(default {g.max_devices:,}) and partial_upload_ttl_s {args.partial_ttl_s:g} "
        f"(default {g.partial_upload_ttl_s:g}), "
        "lowered so that a short run reaches them. Bounds: RSS growth at most 80 MiB (the 64 MiB of payloads the link "
        "may hold in its inbox, MAX_INBOX_BYTES, and 16 MiB for what holds them); disk growth at most "
        "max_partial_uploads x tasks x (U + 12 KiB) + 1.5 KiB per message (one rejection or registry row; reasons "
        "are cut at 1000 characters) + 8 MiB (SQLite's WAL), U being the largest update a task allows "
        "(intake.update_limit_bytes); the registry at most max_devices (a); at most max_partial_uploads partials "
        "per device, gone within the ttl + 15 s (b); at most fetches_per_minute blobs served per minute, none the "
        "task does not name (c); the coordinator's CPU per 1,000 chunks of one upload, last batch at most twice "
        "the first (e, as tests/test_hostile_fleet.py asks); caught up within 3 min; the round after the flood "
        "closed within its deadline + 10 s with d0's update accepted.",
        "",
        table(results),
        "",
        *details(results),
    ])


def main(argv: list[str] | None = None) -> int:
    from coordinator.guards import GuardSettings
    g = GuardSettings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="exit status: 0 when every class passed, 1 when any failed")
    names = ", ".join(f"{c.letter}={c.name}" for c in CLASSES)
    p.add_argument("--classes", default=",".join(c.letter for c in CLASSES),
                   help=f"comma-separated letters or names of the classes to run ({names}; default: all)")
    p.add_argument("--hellos", type=int, default=5000, help="a: Hellos from invented ids (%(default)s)")
    p.add_argument("--uploads", type=int, default=2000,
                   help="b: never-finished uploads from the rogue, and as many from invented ids (%(default)s)")
    p.add_argument("--fetches", type=int, default=1200,
                   help="c: Fetch requests for the largest named blob (%(default)s; 1/12 as many for an unnamed one)")
    p.add_argument("--oversize", type=int, default=4, help="d: oversize payloads of each size (%(default)s)")
    p.add_argument("--oversize-mib", default="2,8,32,64",
                   help="d: the payload sizes in MiB, comma-separated (%(default)s)")
    p.add_argument("--chunks", type=int, default=10000, help="e: 1-byte chunks of one upload (%(default)s)")
    p.add_argument("--garbage", type=int, default=30000, help="f: malformed messages (%(default)s)")
    p.add_argument("--max-devices", type=int, default=1000,
                   help=f"the coordinator's [service] max_devices (%(default)s; its own default is {g.max_devices:,}, "
                        "lowered so that the hello flood reaches it)")
    p.add_argument("--partial-ttl-s", type=float, default=20.0,
                   help="the coordinator's [service] partial_upload_ttl_s (%(default)s; its own default is "
                        f"{g.partial_upload_ttl_s:g}, lowered to see partials expire)")
    p.add_argument("--max-partial-uploads", type=int, default=g.max_partial_uploads, help=argparse.SUPPRESS)
    p.add_argument("--fetches-per-minute", type=int, default=g.fetches_per_minute, help=argparse.SUPPRESS)
    p.add_argument("--deadline-s", type=float, default=60.0,
                   help="round deadline (%(default)s): the flood and its catch-up must fit in the held round")
    p.add_argument("--samples", type=int, default=2000, help="Fashion-MNIST images of the honest device (%(default)s)")
    p.add_argument("--workdir", type=Path, help="scratch directory, kept (default: a temporary one, removed); "
                                                "a second run reuses its memory profile")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--write-docs", action="store_true",
                   help="write the table to docs/benchmarks.md (needs every class and the default sizes)")
    args = p.parse_args(argv)
    wanted = [w.strip() for w in args.classes.split(",") if w.strip()]
    by_key = {**{c.letter: c for c in CLASSES}, **{c.name: c for c in CLASSES}}
    unknown = [w for w in wanted if w not in by_key]
    if unknown:
        p.error(f"unknown class(es) {unknown}; known: {names}")
    chosen = [c for c in CLASSES if c in {by_key[w] for w in wanted}]
    if args.write_docs:
        defaults = p.parse_args([])
        changed = [k for k, v in vars(args).items()
                   if k not in ("classes", "workdir", "json", "write_docs") and v != getattr(defaults, k)]
        if len(chosen) != len(CLASSES) or changed:
            p.error("--write-docs needs every class and the default sizes" +
                    (f" (changed: {', '.join(changed)})" if changed else ""))

    from coordinator.local.data import write_fleet_data
    from coordinator.model.zoo_profile import measured_profile

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    t0, load0 = time.monotonic(), os.getloadavg()[0]
    temporary = args.workdir is None
    root = (args.workdir or Path(tempfile.mkdtemp(prefix="bench-floods-"))).resolve()
    root.mkdir(parents=True, exist_ok=True)
    log(f"workdir {root}; measuring the memory profile of fmnist_cnn (once, about 40 s)")
    prep = {"root": root, "profile": measured_profile(root / "prep", "fmnist_cnn", [32, 64]),
            "data": write_fleet_data(root / "prep" / f"data-{args.samples}", [HONEST], args.samples, 50.0)[HONEST]}
    results = []
    try:
        for cls in chosen:
            r = run_class(cls, args, prep, log)
            results.append(r)
            log(f"[{cls.letter} {cls.name}] {'PASS' if r['passed'] else 'FAIL'} ({r['seconds']:.0f} s)"
                + "".join(f"\n    {'ok  ' if ok else 'FAIL'} {what}" for what, ok in r["checks"])
                + (f"\n    error: {r['error']}" if "error" in r else "")
                + (f"\n    coordinator log:\n{r['log_tail']}" if "log_tail" in r else ""))
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
    minutes = (time.monotonic() - t0) / 60
    print(table(results))
    print()
    print("\n".join(details(results)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    if args.write_docs:
        write_section("bench_floods", section(args, results, minutes, (load0, os.getloadavg()[0])))
        log("wrote docs/benchmarks.md")
    failed = [r["class"] for r in results if not r["passed"]]
    log(f"{len(results) - len(failed)} of {len(results)} classes passed in {minutes:.1f} min"
        + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
