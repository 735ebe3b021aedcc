"""edge-device: the agent a board runs to train its share of each federated round.

It connects to the fleet's MQTT broker, announces the device and the memory budget its
training jobs get, then takes tasks one at a time: fetch only the blobs it lacks,
lay them out as a model, fit the job into the budget by measuring (calibration runs in
child processes; the chosen micro-batch is cached per model part), train in a
memory-limited child, send the update in chunks and wait until the coordinator
acknowledges it. Everything is kept in a state directory and survives kill -9: a
restarted agent resumes the interrupted task, the trainer resumes from its checkpoint,
and an update already prepared is only sent again.

This process never imports onnxruntime or torch: training runs in child processes, so
the agent stays small (about 40 MB), and its own memory is subtracted from the budget
announced for jobs, because every process a device runs counts.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

from edge_runtime import __version__
from edge_runtime.device.probe import probe
from edge_runtime.device.tiers import DEFAULT_PROFILES_DIR, TierError, find_tier
from edge_runtime.errors import BudgetError, EdgeRuntimeError
from edge_runtime.jobs.budget import DEFAULT_MARGIN, plan
from edge_runtime.jobs.child import ChildResult
from edge_runtime.jobs.worker import JobSpec, run_worker
from edge_runtime.memory import MIB, current_rss_bytes, peak_rss_bytes, release_free_heap
from edge_runtime.store import atomic_write_text, digest_of
from edge_runtime.train.datasets import LocalDataset
from edge_runtime.wire import weights as wcodec
from edge_runtime.wire.blob_exchange import fetch_blob, send_blob
from edge_runtime.wire.model_blobs import check_blob_names, materialize
from edge_runtime.wire.mqtt_link import (
    BrokerRefused,
    LinkSecurity,
    MqttLink,
    Received,
    parse_broker_url,
    security_from_settings,
)
from edge_runtime.wire.protocol import (
    Ack,
    Failed,
    Hello,
    Idle,
    ProtocolError,
    Scores,
    Status,
    Task,
    Topics,
    Update,
    check_id,
    decode_any,
)
from edge_runtime.wire.transfer import BlobStore

log = logging.getLogger("edge_runtime.device.agent")

TABLE = "device"
DEFAULTS = {
    "id": "",                 # required
    "tier": "custom",         # a name without a tier file is fine: the budget is then measured
    "fleet": "default",
    "broker": "",             # required
    "data": "",               # required
    "state": "",              # "" = device-state/<id>
    "budget_mb": 0.0,         # 0 = the tier's budget, else measured
    "margin": DEFAULT_MARGIN,
    "threads": 0,
    "ack_timeout_s": 30.0,
    "connect_timeout_s": 60.0,
    "username": "",           # the broker login ("" with a password_file = the device id, as the ACL expects)
    "password_file": "",      # the password on its first line; never on the command line
    "tls": False,             # TLS without an mqtts:// address
    "tls_ca": "",             # CA file the broker's certificate must chain to ("" = the system's)
    "tls_cert": "",           # client certificate, for a broker that asks for one
    "tls_key": "",
}
SEND_ATTEMPTS = 10
DONE_KEPT = 1000              # done.json remembers this many tasks; older ids belong to long-closed rounds
POLL_S = 0.5                  # how often waits look at the stop event
# A cached plan serves job budgets this close to the one it was measured for: the agent's RSS,
# subtracted from the device budget, differs by a few pages from one start to the next.
PLAN_BUDGET_TOLERANCE = 0.02
# The agent grows while it works (paho's buffers, an update being read, JSON): measured 39 MB after
# start-up and up to 46 MB in a fleet run, so its share of the budget is its start-up RSS plus this.
AGENT_GROWTH_BYTES = 8 * MIB


class ConfigError(ValueError):
    """A setting that cannot work; the message names the setting (and the file it came from)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that even a blocking wait for a training child is left at once."""


# -- settings ------------------------------------------------------------------------------

def load_settings(config: Path | None, flags: dict) -> dict:
    """Defaults, then the [device] table of a TOML file, then the flags given (None = not given)."""
    settings = dict(DEFAULTS)
    if config is not None:
        settings.update(_read_toml(Path(config)))
    settings.update({key: value for key, value in flags.items() if value is not None})
    return settings


def _read_toml(path: Path) -> dict:
    """The [device] table, checked as strictly as the other CLIs do: a typo is an error, never ignored."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    for table, values in raw.items():
        if table != TABLE or not isinstance(values, dict):
            raise ConfigError(f"{path}: unknown table [{table}]; an edge-device config holds only [{TABLE}]")
    out = {}
    for key, value in raw.get(TABLE, {}).items():
        if key not in DEFAULTS:
            raise ConfigError(f"{path}: unknown setting {TABLE}.{key}; known: {', '.join(DEFAULTS)}")
        expected = type(DEFAULTS[key])
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if (isinstance(value, bool) and expected is not bool) or not isinstance(value, expected):
            raise ConfigError(f"{path}: {TABLE}.{key} must be {expected.__name__}, not {value!r}")
        out[key] = value
    return out


@dataclass(frozen=True)
class DeviceConfig:
    """Settings checked and turned into what the agent uses."""
    device_id: str
    tier: str
    topics: Topics
    host: str
    port: int
    data: Path
    state: Path
    budget_bytes: int          # everything the device may use: agent and job together
    margin: float
    threads: int
    ack_timeout_s: float
    connect_timeout_s: float
    cores: int
    disk_free_bytes: int
    security: LinkSecurity = LinkSecurity()   # broker login and TLS


def resolve(settings: dict) -> DeviceConfig:
    """Check every setting before anything connects, so a bad one fails at once with its name."""
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}; known: {', '.join(DEFAULTS)}")
    s = {**DEFAULTS, **settings}
    for key in ("id", "broker", "data"):
        if not s[key]:
            raise ConfigError(f"--{key} is required (or {TABLE}.{key} in the --config file)")
    try:
        device_id = check_id(s["id"], "device id")
        topics = Topics(s["fleet"])
        host, port = parse_broker_url(s["broker"])
        # the broker's ACL knows a device by its id: the login defaults to it
        login = s["username"] or (device_id if s["password_file"] else "")
        security = security_from_settings({**s, "username": login}, s["broker"])
    except (ProtocolError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    data = LocalDataset(Path(s["data"]).expanduser().resolve())
    if not data.root.is_dir():
        raise ConfigError(f"--data {s['data']}: no such directory")
    for needed in (data.inputs_path, data.labels_path):
        if not needed.is_file():
            raise ConfigError(f"--data {s['data']}: no {needed.name} there; a device's data directory holds "
                              f"inputs.npy (float32) and labels.npy (int64)")
    if not 0 <= s["margin"] < 1:
        raise ConfigError(f"--margin must be in [0, 1), not {s['margin']}")
    if s["threads"] < 0 or s["budget_mb"] < 0:
        raise ConfigError("--threads and --budget-mb must not be negative")
    if s["ack_timeout_s"] <= 0 or s["connect_timeout_s"] <= 0:
        raise ConfigError("--ack-timeout and --connect-timeout must be positive")
    state = Path(s["state"] or f"device-state/{device_id}").expanduser().resolve()
    try:
        state.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--state {state}: cannot create it ({exc})") from None
    tier, tier_budget = _tier(s["tier"])
    found = probe(state)
    return DeviceConfig(device_id=device_id, tier=tier, topics=topics, host=host, port=port, data=data.root,
                        state=state, budget_bytes=_device_budget(s["budget_mb"], tier, tier_budget, found),
                        margin=s["margin"], threads=s["threads"], ack_timeout_s=s["ack_timeout_s"],
                        connect_timeout_s=s["connect_timeout_s"], cores=found.cores,
                        disk_free_bytes=found.disk_free_bytes, security=security)


def _tier(name_or_path: str) -> tuple[str, int | None]:
    """(tier name, its default budget): a tier file in profiles/ when there is one, else just the name."""
    try:
        tier = find_tier(name_or_path)
        # the tier's budget_mb is the jobs' share; the agent counts itself against the whole
        name, budget = tier.name, tier.device_budget_bytes
    except TierError as exc:
        if exc.path != DEFAULT_PROFILES_DIR:   # a tier file exists but is broken, or a given path is missing
            raise ConfigError(str(exc)) from None
        name, budget = name_or_path, None
    try:
        return check_id(name, "tier"), budget
    except ProtocolError as exc:
        raise ConfigError(str(exc)) from None


def _device_budget(budget_mb: float, tier: str, tier_budget: int | None, found) -> int:
    """The device's whole budget: given, else the tier's, else measured; never more than is free now."""
    usable = found.usable_budget_bytes
    if budget_mb:
        budget, source = int(budget_mb * MIB), "--budget-mb"
    elif tier_budget:
        budget, source = tier_budget, f"tier {tier}"
    else:
        log.info("budget: %s measured (usable memory of this device, no tier file for %s)", _size(usable), tier)
        return usable
    if budget > usable:
        log.warning("budget: %s from %s is more than the %s this device has free now; using %s",
                    _size(budget), source, _size(usable), _size(usable))
        return usable
    log.info("budget: %s from %s", _size(budget), source)
    return budget


# -- the agent -----------------------------------------------------------------------------

class Agent:
    """One device on the fleet: announces itself, then works through its tasks until stopped."""

    def __init__(self, cfg: DeviceConfig, link: MqttLink, job_budget: int, stop: threading.Event):
        self.cfg, self.link, self.job_budget, self.stop = cfg, link, job_budget, stop
        self.blobs = BlobStore(cfg.state / "blobs")
        self.uploads = BlobStore(cfg.state / "uploads")
        self.models, self.runtime, self.jobs = (cfg.state / d for d in ("models", "runtime", "jobs"))
        self.jobs.mkdir(exist_ok=True)
        self.current_file, self.done_file, self.plans_file = (
            cfg.state / f for f in ("current_task.json", "done.json", "plans.json"))
        self.done: dict = _read_state(self.done_file)
        self.plans: dict = _read_state(self.plans_file)
        self.pending: list[Task] = []
        self.working_on: str | None = None
        self.hello = Hello(cfg.device_id, cfg.tier, budget_bytes=job_budget, runtime_version=__version__,
                           cores=cfg.cores, disk_free_bytes=cfg.disk_free_bytes)
        self._announced = 0
        self._coordinator_since: float | None = None

    def topic(self, kind: str) -> str:
        return self.cfg.topics.device(self.cfg.device_id, kind)

    # -- presence ------------------------------------------------------------------------
    def announce(self) -> None:
        """Online status (retained, replacing the will's offline) and Hello, so the coordinator counts us."""
        self._announced = self.link.connects
        self.link.publish(self.topic("status"), Status("online", at=time.time()).encode(), retain=True)
        self.link.publish(self.topic("hello"), self.hello.encode(), qos=1)

    def _reannounce_after_reconnects(self) -> None:
        """A thread: a training job blocks the main loop for minutes, and a broker blip meanwhile would
        leave the device marked offline by its will until the job ends."""
        while not self.stop.wait(1.0):
            if self.link.connects != self._announced and self.link.connected.is_set():
                log.info("reconnected: announcing again")
                self.announce()

    # -- the main loop ------------------------------------------------------------------
    def serve(self) -> None:
        """Resume an interrupted task, then take tasks as they come until stopped."""
        self.announce()
        threading.Thread(target=self._reannounce_after_reconnects, name="announce", daemon=True).start()
        resumed = self._interrupted_task()
        if resumed:
            self._work(*resumed)
        while not self.stop.is_set():
            msg = self.link.get(timeout_s=POLL_S)
            while msg is not None:  # everything queued first, so the newest round is chosen among all
                if self._route(msg):
                    log.debug("ignored an ack outside a transfer")
                msg = self.link.get(timeout_s=0)
            task = self._next_task()
            if task:
                self._work(task, downloaded_before=0)

    def _route(self, msg: Received) -> Ack | None:
        """Keep tasks, hand back acks, ignore the rest: nothing received may stop the agent."""
        kind = msg.topic.rsplit("/", 1)[-1]
        try:
            if msg.topic == self.cfg.topics.coordinator_status:
                self._on_coordinator_status(Status.decode(msg.payload))
            elif kind == "task":
                message = decode_any(msg.payload, (Task, Idle))
                if isinstance(message, Idle):
                    log.warning("round %d: nothing to train here: %s", message.round, message.reason)
                else:
                    self._keep(message)
            elif kind == "ack":
                return Ack.decode(msg.payload)
            else:
                log.debug("ignored a %s message outside a transfer", kind)
        except ProtocolError as exc:
            log.warning("ignored a malformed %s message: %s", kind, exc)
        return None

    def _on_coordinator_status(self, status: Status) -> None:
        """Say hello to a coordinator that came online: one that starts after us never heard our Hello."""
        if status.state == "online" and status.at != self._coordinator_since:
            self._coordinator_since = status.at
            log.info("coordinator online: announcing")
            self.announce()

    def _keep(self, task: Task) -> None:
        if task.task_id in self.done:
            log.info("task %s: already done (%s); ignored", task.task_id,
                     "accepted" if self.done[task.task_id]["accepted"] else "not accepted")
        elif task.task_id == self.working_on or any(t.task_id == task.task_id for t in self.pending):
            log.debug("task %s: received again; already have it", task.task_id)
        else:
            log.info("task %s: received (round %d)", task.task_id, task.round)
            self.pending.append(task)

    def _next_task(self) -> Task | None:
        """The first task of the newest round; tasks of older rounds are dropped, their rounds are closed."""
        if not self.pending:
            return None
        newest = max(t.round for t in self.pending)
        for t in self.pending:
            if t.round < newest:
                log.info("task %s: dropped, its round %d is closed (round %d is newer)", t.task_id, t.round, newest)
        current = [t for t in self.pending if t.round == newest]
        self.pending = current[1:]
        return current[0]

    # -- one task -------------------------------------------------------------------------
    def _work(self, task: Task, downloaded_before: int) -> None:
        """Do one task to the end: an update acknowledged, or a Failed sent. Never raises for the task's sake."""
        self.working_on = task.task_id
        try:
            self._save_current(task, downloaded_before)
            try:
                update = self._prepared_update(task) or self._produce(task, downloaded_before)
            except BudgetError as exc:
                self._fail(task, str(exc), _needed_bytes(str(exc)))
                return
            except EdgeRuntimeError as exc:
                self._fail(task, str(exc))
                return
            except Exception as exc:  # a bug or a full disk: report it, keep serving the next task
                log.exception("task %s: unexpected error", task.task_id)
                self._fail(task, f"{type(exc).__name__}: {exc}")
                return
            self._deliver(task, update)
        finally:
            self.working_on = None

    def _produce(self, task: Task, downloaded_before: int) -> Update | Scores:
        """Fetch, lay out, train within the budget; the update is stored in uploads/ and described on disk."""
        downloaded = downloaded_before + self._fetch(task)
        self._save_current(task, downloaded)
        manifest_path, weight_files = materialize(task.manifest["sha256"], task.blobs, self.blobs, self.models)
        spec = self._spec(task, manifest_path, weight_files)
        report, child = self._train(task, spec)
        if task.kind == "score":
            return self._scored(task, report, child)
        update_file = Path(spec.update_out)
        if task.update_fp16:
            _reencode_fp16(update_file)
        sha = self.uploads.put_file(update_file)
        result = report["result"]
        update = Update(task.task_id, task.round, self.cfg.device_id, blob_sha256=sha,
                        blob_size=self.uploads.path(sha).stat().st_size, num_examples=result["num_examples"],
                        loss=result["loss"], steps=result["steps"], peak_rss_bytes=child.peak_rss_bytes,
                        seconds=child.seconds, downloaded_bytes=downloaded, agent_peak_rss_bytes=self._own_peak_rss())
        atomic_write_text(self._update_file(task), update.encode().decode())
        resumed = f" (resumed at step {result['resumed_from_step']})" if result["resumed_from_step"] else ""
        log.info("task %s: trained %d steps in %.1f s%s, loss %.4f", task.task_id, update.steps, update.seconds,
                 resumed, update.loss)
        return update

    def _scored(self, task: Task, report: dict, child: ChildResult) -> Scores:
        """A score task's answer: per-layer gradient scores, no blob (nothing was trained)."""
        result = report["result"]
        scores = Scores(task.task_id, task.round, self.cfg.device_id,
                        scores={str(k): float(v) for k, v in result["scores"].items()},
                        num_examples=result["num_examples"], peak_rss_bytes=child.peak_rss_bytes,
                        seconds=child.seconds, agent_peak_rss_bytes=self._own_peak_rss())
        atomic_write_text(self._update_file(task), scores.encode().decode())
        log.info("task %s: scored %d layer(s) over %d batches in %.1f s", task.task_id, len(scores.scores),
                 result["batches"], child.seconds)
        return scores

    def _own_peak_rss(self) -> int:
        """The agent's own peak, reported beside its job's; a process hosting many simulated devices shares it."""
        return peak_rss_bytes()

    def _fetch(self, task: Task) -> int:
        """Get the blobs the store lacks; return the bytes downloaded. Tasks arriving meanwhile are kept."""
        check_blob_names(task.blobs)
        sizes = {task.manifest["sha256"]: task.manifest.get("size", 0)} | {b["sha256"]: b["size"] for b in task.blobs}
        missing = [sha for sha in sizes if not self.blobs.has(sha)]
        log.info("task %s: round %d, %s, batch %s; fetching %d of %d blobs (%s)", task.task_id, task.round,
                 _describe_part(task.part), task.config.get("batch_size", "default"), len(missing), len(sizes),
                 _size(sum(sizes[sha] for sha in missing)))
        deferred: list[Received] = []
        try:
            for sha in missing:
                fetch_blob(self.link, self.cfg.topics, self.cfg.device_id, self.blobs, sha, deferred=deferred)
        finally:
            for msg in deferred:
                self._route(msg)
        return sum(self.blobs.path(sha).stat().st_size for sha in missing)

    def _spec(self, task: Task, manifest_path: Path, weight_files: list[str]) -> JobSpec:
        threads = self.cfg.threads or task.config.get("threads", 0)
        scoring = task.kind == "score"
        return JobSpec(manifest=str(manifest_path), weights=weight_files, dataset=str(self.cfg.data),
                       state_dir=str(self.runtime), task_id=task.task_id, part=task.part,
                       config=dict(task.config, threads=threads),
                       update_out=None if scoring else str(self.jobs / f"{task.task_id}.update.safetensors"),
                       progress_file=str(self.jobs / f"{task.task_id}.progress.json"),
                       mode=task.kind, scores_out=str(self.jobs / f"{task.task_id}.scores.json") if scoring else None)

    def _train(self, task: Task, spec: JobSpec) -> tuple[dict, ChildResult]:
        """Train at the cached micro-batch when this part was planned before, else calibrate first.

        The plan is stored before the long run, not after: a job killed mid-way then resumes
        at the same micro-batch, which its checkpoint requires, without calibrating again.
        """
        key = digest_of(task.kind, task.manifest["sha256"], json.dumps(task.part, sort_keys=True),
                        str(spec.config.get("batch_size", 64)), repr(self.cfg.margin))
        cached = self.plans.get(key)
        if cached and abs(cached["budget_bytes"] - self.job_budget) <= PLAN_BUDGET_TOLERANCE * self.job_budget:
            micro = cached["micro_batch_size"]
            log.info("task %s: training at micro-batch %d (plan cached) under a hard limit of %s",
                     task.task_id, micro, _size(self.job_budget))
            report, child = self._run_at(spec, micro)
            if not child.killed_by_oom:
                return _checked(spec, report, child)
            log.warning("task %s: killed at the memory limit at cached micro-batch %d; calibrating again",
                        task.task_id, micro)
        micro = self._plan(task, spec, key)
        log.info("task %s: training at micro-batch %d under a hard limit of %s", task.task_id, micro,
                 _size(self.job_budget))
        return _checked(spec, *self._run_at(spec, micro))

    def _plan(self, task: Task, spec: JobSpec, key: str) -> int:
        log.info("task %s: calibrating: which micro-batch fits %s with a %.0f%% margin", task.task_id,
                 _size(self.job_budget), self.cfg.margin * 100)
        self.plans.pop(key, None)
        chosen = plan(spec, self.job_budget, self.jobs, self.cfg.margin)
        self.plans[key] = {"micro_batch_size": chosen.micro_batch_size, "budget_bytes": self.job_budget}
        atomic_write_text(self.plans_file, json.dumps(self.plans, indent=1))
        log.info("task %s: micro-batch %d fits (measured peak %s)", task.task_id, chosen.micro_batch_size,
                 _size(chosen.measured_peak_bytes))
        return chosen.micro_batch_size

    def _run_at(self, spec: JobSpec, micro: int) -> tuple[dict | None, ChildResult]:
        job = replace(spec, config=dict(spec.config, micro_batch_size=micro))
        return run_worker(job, self.jobs, memory_limit_bytes=self.job_budget)

    # -- sending and acknowledgement -------------------------------------------------------
    def _deliver(self, task: Task, update: Update | Scores) -> None:
        """Send the update until the coordinator acknowledges it (duplicates are no-ops there)."""
        for attempt in range(1, SEND_ATTEMPTS + 1):
            try:
                if isinstance(update, Update):
                    send_blob(self.link, self.topic("upload"), self.uploads, update.blob_sha256)
                self.link.publish(self.topic("update"), update.encode(), qos=1)
                log.info("task %s: %s sent%s: %s, job peak %s of %s budget, agent %s", task.task_id, update.TYPE,
                         f" (attempt {attempt})" if attempt > 1 else "",
                         _size(update.blob_size) if isinstance(update, Update) else f"{len(update.scores)} scores",
                         _size(update.peak_rss_bytes), _size(self.job_budget), _size(update.agent_peak_rss_bytes))
            except (RuntimeError, ValueError, BufferError) as exc:  # paho: not connected, queue full
                log.warning("task %s: sending failed (%s); attempt %d of %d", task.task_id, exc, attempt,
                            SEND_ATTEMPTS)
            ack = self._await_ack(task.task_id)
            if ack:
                if ack.accepted:
                    log.info("task %s: accepted", task.task_id)
                else:
                    log.warning("task %s: rejected: %s", task.task_id, ack.reason)
                self._finish(task, ack.accepted, ack.reason)
                return
            if self.stop.is_set():
                return
        log.error("task %s: no acknowledgement after %d attempts; kept in %s for the next start",
                  task.task_id, SEND_ATTEMPTS, self.current_file)

    def _await_ack(self, task_id: str) -> Ack | None:
        deadline = time.monotonic() + self.cfg.ack_timeout_s
        while not self.stop.is_set() and (left := deadline - time.monotonic()) > 0:
            msg = self.link.get(timeout_s=min(left, POLL_S))
            ack = self._route(msg) if msg is not None else None
            if ack and ack.task_id == task_id:
                return ack
            if ack:
                log.debug("ignored an ack for task %s (waiting for %s)", ack.task_id, task_id)
        return None

    def _fail(self, task: Task, reason: str, needed_bytes: int = 0) -> None:
        """Tell the coordinator why not, so it stops waiting for this device this round."""
        log.warning("task %s: failed: %s", task.task_id, reason)
        self.link.publish(self.topic("update"), Failed(task.task_id, task.round, self.cfg.device_id,
                                                       reason=reason[:2000], needed_bytes=needed_bytes).encode(), qos=1)
        self._finish(task, accepted=False, reason=reason)

    def _finish(self, task: Task, accepted: bool, reason: str) -> None:
        """Record the outcome, then delete what only this task needed: its job files, its run, older blobs.

        The blobs this task named are kept, so the next round fetches only the ones that changed.
        """
        self.done[task.task_id] = {"round": task.round, "accepted": accepted, "reason": reason}
        self.done = dict(list(self.done.items())[-DONE_KEPT:])
        atomic_write_text(self.done_file, json.dumps(self.done, indent=1))
        self.current_file.unlink(missing_ok=True)
        keep = {task.manifest["sha256"]} | {b["sha256"] for b in task.blobs}
        for path in self.blobs.root.iterdir():
            if path.is_file() and path.name not in keep:
                path.unlink()
        for sha in {p.name.split(".")[0] for p in self.blobs.partial.iterdir()} - keep:
            self.blobs.discard(sha)
        for store in (self.uploads.root, self.jobs):
            for path in store.iterdir():
                if path.is_file():
                    path.unlink()
        shutil.rmtree(self.models, ignore_errors=True)  # hard links into blobs/: rebuilt in an instant
        shutil.rmtree(self.runtime / "runs" / task.task_id, ignore_errors=True)

    # -- what survives a restart --------------------------------------------------------------
    def _save_current(self, task: Task, downloaded: int) -> None:
        atomic_write_text(self.current_file,
                          json.dumps({"task": json.loads(task.encode()), "downloaded_bytes": downloaded}))

    def _interrupted_task(self) -> tuple[Task, int] | None:
        """The task a previous run was working on, with the bytes it had downloaded for it."""
        if not self.current_file.exists():
            return None
        try:
            saved = json.loads(self.current_file.read_text())
            task = Task.decode(json.dumps(saved["task"]).encode())
        except (ValueError, KeyError, TypeError, ProtocolError) as exc:
            log.warning("%s is unreadable (%s); discarded", self.current_file, exc)
            self.current_file.unlink()
            return None
        if task.task_id in self.done:
            self.current_file.unlink()
            return None
        log.info("task %s: resuming after a restart", task.task_id)
        return task, int(saved.get("downloaded_bytes", 0))

    def _update_file(self, task: Task) -> Path:
        return self.jobs / f"{task.task_id}.update.json"

    def _prepared_update(self, task: Task) -> Update | Scores | None:
        """The update of a task trained before a restart, when its blob is still in uploads/: send, don't train."""
        path = self._update_file(task)
        if not path.exists():
            return None
        update = decode_any(path.read_bytes(), (Update, Scores))
        if isinstance(update, Update) and not self.uploads.has(update.blob_sha256):
            return None
        log.info("task %s: update already prepared; sending it", task.task_id)
        return update


# -- helpers -------------------------------------------------------------------------------

def _read_state(path: Path) -> dict:
    """A JSON state file (written atomically, so only a person's edit can break it)."""
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); fix or delete it") from None


def _checked(spec: JobSpec, report: dict | None, child: ChildResult) -> tuple[dict, ChildResult]:
    """The job's report, or an EdgeRuntimeError saying why it failed."""
    if report is None or not report["ok"]:
        why = report["error"] if report else f"exit code {child.returncode} " + \
            ("(killed at the memory limit)" if child.killed_by_oom else child.stderr[-500:])
        raise EdgeRuntimeError(f"job {spec.task_id} failed: {why}")
    return report, child


def _reencode_fp16(path: Path) -> None:
    """Halve the update for the wire, as the task asks; read tensor by tensor, so the agent never
    holds the fp32 update whole."""
    update = wcodec.WeightFile(path)
    wcodec.save(path, {name: update[name].astype(np.float16) for name in update}, fp16=True)
    release_free_heap()


def _needed_bytes(message: str) -> int:
    """The measured need in a BudgetError's message ("needs 150 MB", "needs more than 800 MB"), else 0."""
    found = re.search(r"needs (?:more than )?([0-9.]+) MB", message)
    return int(float(found.group(1)) * MIB) if found else 0


def _describe_part(part: dict) -> str:
    """'layers 4-6 + head 2' from a task's part, which is not validated until the job reads it."""
    span, head = part.get("span"), part.get("head")
    if isinstance(span, list) and span:
        layers = f"layers {span[0]}-{span[-1]}" if len(span) > 1 else f"layer {span[0]}"
    else:
        layers = f"span {span!r}"
    return f"{layers} + head {head}"


def _size(n: int) -> str:
    """Bytes for a log line: KB below a MiB, MB above."""
    return f"{n / 1024:.0f} KB" if n < MIB else f"{n / MIB:.0f} MB"


# -- running -------------------------------------------------------------------------------

def _connect(cfg: DeviceConfig, stop: threading.Event) -> MqttLink | None:
    """Connect, retrying with backoff until connect_timeout_s: a board often boots before its network."""
    t = cfg.topics
    deadline = time.monotonic() + cfg.connect_timeout_s
    delay = 1.0
    while True:
        link = MqttLink(f"edge-device-{cfg.device_id}", cfg.host, cfg.port,
                        subscriptions=[(t.device(cfg.device_id, kind), 1) for kind in ("task", "blob", "ack")]
                        + [(t.coordinator_status, 1)],
                        will=(t.device(cfg.device_id, "status"), Status("offline").encode()),
                        security=cfg.security)
        try:
            return link.start(timeout_s=max(1.0, min(5.0, deadline - time.monotonic())))
        except BrokerRefused as exc:  # a refused login or an untrusted certificate: no retry can help
            log.error("%s", exc)
            return None
        except ConnectionError as exc:
            left = deadline - time.monotonic()
            if left <= 0 or stop.is_set():
                log.error("%s; gave up after %.0f s", exc, cfg.connect_timeout_s)
                return None
            log.warning("%s; retrying in %.0f s", exc, min(delay, left))
            stop.wait(min(delay, left))
            delay = min(delay * 2, 30.0)


def _stop_jobs() -> None:
    """Kill a training job still running (the agent is leaving): its trainer resumes from its checkpoint.

    Only job children (edge_runtime.jobs.worker): the process may run other children of its own.
    """
    import psutil
    for child in psutil.Process().children(recursive=True):
        try:
            if "edge_runtime.jobs.worker" in child.cmdline():
                child.kill()
        except psutil.Error:
            pass


def run_agent(settings: dict, stop: threading.Event | None = None) -> int:
    """Run the agent until `stop` is set, SIGTERM or Ctrl-C. Exit code: 0 stopped, 2 bad settings, 1 no broker."""
    stop = stop or threading.Event()
    try:
        cfg = resolve(settings)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    link = None
    try:
        link = _connect(cfg, stop)
        if link is None:
            return 1
        # started up (modules loaded, the network thread running), plus room to grow while working
        agent_rss = current_rss_bytes() + AGENT_GROWTH_BYTES
        job_budget = cfg.budget_bytes - agent_rss
        if job_budget <= 0:
            log.error("a budget of %s leaves nothing for training beside the agent's own %s",
                      _size(cfg.budget_bytes), _size(agent_rss))
            return 2
        log.info("device %s (tier %s): budget %s = jobs %s + agent %s; state in %s", cfg.device_id, cfg.tier,
                 _size(cfg.budget_bytes), _size(job_budget), _size(agent_rss), cfg.state)
        Agent(cfg, link, job_budget, stop).serve()
        return 0
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt as exc:  # maybe raised mid-job (the stop event only acts between jobs)
        log.info("stopping (%s)", "SIGTERM" if isinstance(exc, Terminated) else "interrupted")
        _stop_jobs()
        return 0 if isinstance(exc, Terminated) else 130
    finally:
        stop.set()
        if link is not None:
            link.stop(final=(cfg.topics.device(cfg.device_id, "status"), Status("offline", at=time.time()).encode()))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-device", formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__,
        epilog="""examples:
  edge-device --id pi-01 --tier pi-zero-2w --broker mqtt://coordinator.lan:1883 --data /srv/edge/data
  edge-device --config /etc/edge-device.toml          # settings in a [device] table; flags win
  edge-device --id pi-01 --broker 10.0.0.5 --data data --budget-mb 300 --log-level debug
  edge-device --id pi-01 --broker mqtts://broker.lan --password-file pw.txt --tls-ca ca.crt --data data
                                        # TLS on port 8883, logged in as user pi-01 (its id)

/etc/edge-device.toml:
  [device]
  id = "pi-01"
  tier = "pi-zero-2w"          # profiles/<tier>.toml gives the default budget
  broker = "mqtt://coordinator.lan:1883"
  data = "/srv/edge/data"      # inputs.npy + labels.npy
  state = "/var/lib/edge-device"

A production broker (docs/broker.md) takes broker = "mqtts://broker.lan" (TLS, port
8883), tls_ca = "/etc/edge-device/ca.crt" and password_file = "/etc/edge-device/password"
(mode 600, the password on its first line); the user name is the device id.

The budget announced to the coordinator is what training jobs get: the device budget
less this agent's own memory. State (blobs, caches, checkpoints, the current task)
lives in --state; stop the agent at any time and start it again to resume.
Exit codes: 0 stopped, 1 no broker within --connect-timeout, or it refused the login or
its certificate is not trusted, 2 bad settings.""")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="TOML file with a [device] table (keys as the flags, with _)")
    p.add_argument("--id", help="this device's id (letters, digits, '_', '.', '-'); required")
    p.add_argument("--tier", help="tier name (profiles/<tier>.toml) or a tier file; default 'custom' (no file)")
    p.add_argument("--fleet", help="fleet name, the topic prefix edgeblock/v1/<fleet>/ (default 'default')")
    p.add_argument("--broker", metavar="URL",
                   help="the coordinator's broker, mqtt://host:port or mqtts://host:port (TLS, port 8883); required")
    p.add_argument("--data", metavar="DIR",
                   help="local training data: a directory with inputs.npy and labels.npy; required")
    p.add_argument("--state", metavar="DIR", help="state directory (default device-state/<id>)")
    p.add_argument("--budget-mb", type=float, metavar="MB",
                   help="memory for agent and jobs together (0 = the tier's, else measured); capped by what is free")
    p.add_argument("--margin", type=float, help="safety margin over a job's measured peak (default 0.10)")
    p.add_argument("--threads", type=int, help="onnxruntime threads per job (0 = the task's setting or the default)")
    p.add_argument("--ack-timeout", dest="ack_timeout_s", type=float, metavar="S",
                   help="seconds to wait for the coordinator's ack before sending again (default 30)")
    p.add_argument("--connect-timeout", dest="connect_timeout_s", type=float, metavar="S",
                   help="seconds to keep trying the broker at start-up (default 60)")
    p.add_argument("--username", help="broker user name (default with --password-file: the device id, "
                                      "which a production broker's ACL expects)")
    p.add_argument("--password-file", metavar="FILE",
                   help="file whose first line is the broker password (a password is never a flag)")
    p.add_argument("--tls", action="store_true", default=None, help="TLS even without an mqtts:// address")
    p.add_argument("--tls-ca", metavar="FILE", help="CA certificate (PEM) the broker's certificate must chain to")
    p.add_argument("--tls-cert", metavar="FILE", help="client certificate (PEM), for a broker that asks for one")
    p.add_argument("--tls-key", metavar="FILE", help="the client certificate's unencrypted key (PEM)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    flags = {key: getattr(args, key) for key in DEFAULTS}
    try:
        settings = load_settings(args.config, flags)
    except ConfigError as exc:
        print(f"edge-device: {exc}", file=sys.stderr)
        return 2
    name = str(settings["id"] or "?").replace("%", "%%")
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s edge-device[{name}] %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, _raise_terminated)
    return run_agent(settings)


if __name__ == "__main__":
    sys.exit(main())
