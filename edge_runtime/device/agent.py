"""The device agent: announces the device, then takes its tasks one at a time until stopped.

A task: fetch only the blobs the state lacks, lay them out as a model, check the device's
data against the model's data contract (once per data version: at start-up when an earlier
task's model is known, then whenever the files change), hand the job to the job runner
(real children under a hard limit, calibrated once per part), send the update in chunks
and wait until the coordinator acknowledges it. Data that breaks the contract fails each
task with a Failed naming the file, the rows and the fix; the agent serves on, and the
first task after the data is fixed trains. Everything is kept in the state
directory and survives kill -9: a restarted agent resumes the interrupted task, the
trainer resumes from its checkpoint, and an update already prepared is only sent again.

This process never imports onnxruntime or torch: training runs in child processes, so the
agent stays small (about 40 MB), and its own memory is counted against the device's
budget, because every process a device runs counts.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from edge_runtime import __version__
from edge_runtime.device.settings import ConfigError, DeviceConfig
from edge_runtime.errors import BudgetError, EdgeRuntimeError
from edge_runtime.jobs.budget import BudgetedJobs, JobRunner
from edge_runtime.jobs.child import ChildResult
from edge_runtime.jobs.worker import JobSpec
from edge_runtime.logs import printable
from edge_runtime.memory import MIB, peak_rss_bytes, release_free_heap, size_text
from edge_runtime.store import atomic_write_text
from edge_runtime.train.datasets import DATA_CHECK_FILE, DataError, DataSummary, LocalDataset
from edge_runtime.wire import weights as wcodec
from edge_runtime.wire.blob_exchange import fetch_blob, send_blob
from edge_runtime.wire.manifest import Manifest
from edge_runtime.wire.model_blobs import check_blob_names, materialize, task_features_path
from edge_runtime.wire.mqtt_link import MqttLink, Received
from edge_runtime.wire.part import TrainablePart
from edge_runtime.wire.protocol import (
    MAX_FLOAT,
    Ack,
    Failed,
    Hello,
    Idle,
    ProtocolError,
    Resend,
    Scores,
    Status,
    Task,
    Update,
    decode_any,
)
from edge_runtime.wire.transfer import BlobStore

log = logging.getLogger("edge_runtime.device")

SEND_ATTEMPTS = 10
DONE_KEPT = 1000              # done.json remembers this many tasks; older ids belong to long-closed rounds
POLL_S = 0.5                  # how often waits look at the stop event
# The agent grows while it works (paho's buffers, an update being read, JSON): measured 39 MB after
# start-up and up to 46 MB in a fleet run, so its share of the budget is its start-up RSS plus this.
AGENT_GROWTH_BYTES = 8 * MIB
CONTRACT_FILE = "data_contract.json"   # in the state: the last task's model's input shape and classes


def job_budget_bytes(device_budget_bytes: int, agent_rss_bytes: int) -> int:
    """What the device's jobs get: its whole budget less the agent's start-up RSS and room to grow."""
    return device_budget_bytes - agent_rss_bytes - AGENT_GROWTH_BYTES


def budgeted_jobs(cfg: DeviceConfig, job_budget: int) -> BudgetedJobs:
    """The real job runner of a device: children under a hard limit, micro-batch plans kept in its state."""
    return BudgetedJobs(cfg.state / "jobs", job_budget, cfg.margin, plans_file=cfg.state / "plans.json",
                        log=lambda text: log.info("%s", text), python=cfg.job_python)


class Agent:
    """One device on the fleet: announces itself, then works through its tasks until stopped."""

    def __init__(self, cfg: DeviceConfig, link: MqttLink, jobs: JobRunner, stop: threading.Event,
                 own_peak: Callable[[], int] = peak_rss_bytes):
        """jobs runs each task's job (budgeted_jobs: real children; a simulator passes its own);
        own_peak is the agent's peak RSS as reported beside its job's."""
        self.cfg, self.link, self.jobs, self.stop, self.own_peak = cfg, link, jobs, stop, own_peak
        self.blobs = BlobStore(cfg.state / "blobs")
        self.uploads = BlobStore(cfg.state / "uploads")
        self.models, self.runtime, self.job_files = (cfg.state / d for d in ("models", "runtime", "jobs"))
        self.job_files.mkdir(exist_ok=True)
        self.current_file, self.done_file = cfg.state / "current_task.json", cfg.state / "done.json"
        self.done: dict = _read_state(self.done_file)
        self.pending: list[Task] = []
        self.working_on: str | None = None
        self.hello = Hello(cfg.device_id, cfg.tier, budget_bytes=jobs.budget_bytes, runtime_version=__version__,
                           cores=cfg.cores, disk_free_bytes=cfg.disk_free_bytes)
        self._announced = 0
        self._coordinator_since: float | None = None
        # the data is checked only when the runner's jobs read it (a simulator's do not)
        self.data = LocalDataset(cfg.data)
        self.checks_data = bool(getattr(jobs, "reads_device_data", False))
        self.contract_file = cfg.state / CONTRACT_FILE
        self._data_check: tuple[tuple, DataSummary | DataError] | None = None   # (its key, its outcome)

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
        self._check_data_at_start()
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

    def _route(self, msg: Received) -> Ack | Resend | None:
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
                return decode_any(msg.payload, (Ack, Resend))
            else:
                log.debug("ignored a %s message outside a transfer", kind)
        except ProtocolError as exc:
            log.warning("ignored a malformed %s message: %s", printable(kind, 40), exc)
        except Exception:   # a decoder's bug: logged, and the agent serves on (the message may be retained)
            log.exception("ignored a %s message the agent could not read", printable(kind, 40))
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

    # -- the device's data ------------------------------------------------------------------
    def check_data(self, input_shape, num_classes: int) -> DataSummary:
        """The device's data checked against a model's data contract; DataError (logged) when it breaks it.

        Once per data version: the outcome, a summary or the error, is kept by the files'
        fingerprint, so a task costs two stat calls until the files change. The summary is
        also written where the job children look (runtime/data-check.json): they do not read
        the data again.
        """
        try:
            fingerprint = self.data.fingerprint()
        except DataError:
            fingerprint = None   # a file is missing: check() says which
        key = (fingerprint, tuple(int(d) for d in input_shape), int(num_classes))
        if self._data_check is None or self._data_check[0] != key:
            try:
                outcome: DataSummary | DataError = self.data.check(input_shape, num_classes,
                                                                   cache_file=self.runtime / DATA_CHECK_FILE)
                log.info("data: %d rows of %s in %s, input mean %.4g std %.4g, examples per class %s", outcome.rows,
                         key[1], self.data.root, outcome.input_mean, outcome.input_std,
                         " ".join(map(str, outcome.label_counts)))
            except DataError as exc:
                outcome = exc
                log.error("data check failed: %s. Every task is answered with Failed until the data is fixed; "
                          "the agent checks again when the files change", exc)
            release_free_heap()
            self._data_check = (key, outcome)
        outcome = self._data_check[1]
        if isinstance(outcome, DataError):
            raise DataError(str(outcome))
        return outcome

    def _check_data_for(self, manifest: Manifest) -> DataSummary:
        """check_data against this model's input shape and classes, remembered for the next start-up."""
        contract = {"input_shape": list(manifest.input_shape), "num_classes": manifest.num_classes}
        if self._known_contract() != contract:
            atomic_write_text(self.contract_file, json.dumps(contract))
        return self.check_data(manifest.input_shape, manifest.num_classes)

    def _known_contract(self) -> dict | None:
        try:
            saved = json.loads(self.contract_file.read_text())
            return {"input_shape": [int(d) for d in saved["input_shape"]], "num_classes": int(saved["num_classes"])}
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _check_data_at_start(self) -> None:
        """Bad data said at start-up, against the last task's model, rather than at the next task."""
        if not self.checks_data:
            return
        contract = self._known_contract()
        if contract is None:
            log.info("data in %s: checked against the model at the first task", self.data.root)
            return
        try:
            self.check_data(contract["input_shape"], contract["num_classes"])
        except DataError:
            pass   # logged; the agent serves on, answering each task with why not

    # -- one task -------------------------------------------------------------------------
    def _work(self, task: Task, downloaded_before: int) -> None:
        """Do one task to the end: an update acknowledged, or a Failed sent. Never raises for the task's sake."""
        self.working_on = task.task_id
        try:
            self._save_current(task, downloaded_before)
            try:
                update = self._prepared_update(task) or self._produce(task, downloaded_before)
            except BudgetError as exc:
                self._fail(task, str(exc), exc.needed_bytes)
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
        data = None
        if self.checks_data and self.blobs.has(task.manifest["sha256"]):
            # the model is known from an earlier task: data that breaks its contract fails before any download
            data = self._check_data_for(Manifest.load(self.blobs.path(task.manifest["sha256"])))
        downloaded = downloaded_before + self._fetch(task)
        self._save_current(task, downloaded)
        manifest_path, weight_files = materialize(task.manifest["sha256"], task.blobs, self.blobs, self.models,
                                                  part=task.part)
        if self.checks_data and data is None:   # a model new to this device: checked once it is here
            data = self._check_data_for(Manifest.load(manifest_path))
        spec = self._spec(task, manifest_path, weight_files)
        report, child = self.jobs.run(spec)
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
                        seconds=child.seconds, downloaded_bytes=downloaded, agent_peak_rss_bytes=self.own_peak(),
                        input_mean=_wire_float(data.input_mean) if data else None,
                        input_std=_wire_float(data.input_std) if data else None,
                        holdout_examples=result.get("holdout_examples", 0),
                        holdout_accuracy_before=result.get("holdout_accuracy_before"),
                        holdout_accuracy=result.get("holdout_accuracy"))
        atomic_write_text(self._update_file(task), update.encode().decode())
        resumed = f" (resumed at step {result['resumed_from_step']})" if result["resumed_from_step"] else ""
        held = "" if update.holdout_accuracy is None else \
            f", held-out accuracy {100 * update.holdout_accuracy_before:.1f}% -> {100 * update.holdout_accuracy:.1f}% " \
            f"({update.holdout_examples} rows)"
        log.info("task %s: trained %d steps in %.1f s%s, loss %.4f%s", task.task_id, update.steps, update.seconds,
                 resumed, update.loss, held)
        return update

    def _scored(self, task: Task, report: dict, child: ChildResult) -> Scores:
        """A score task's answer: per-layer gradient scores, no blob (nothing was trained)."""
        result = report["result"]
        scores = Scores(task.task_id, task.round, self.cfg.device_id,
                        scores={str(k): float(v) for k, v in result["scores"].items()},
                        num_examples=result["num_examples"], peak_rss_bytes=child.peak_rss_bytes,
                        seconds=child.seconds, agent_peak_rss_bytes=self.own_peak())
        atomic_write_text(self._update_file(task), scores.encode().decode())
        log.info("task %s: scored %d layer(s) over %d batches in %.1f s", task.task_id, len(scores.scores),
                 result["batches"], child.seconds)
        return scores

    def _fetch(self, task: Task) -> int:
        """Get the blobs the store lacks; return the bytes downloaded. Tasks arriving meanwhile are kept."""
        check_blob_names(task.blobs)
        sizes = {task.manifest["sha256"]: task.manifest.get("size", 0)} | {b["sha256"]: b["size"] for b in task.blobs}
        missing = [sha for sha in sizes if not self.blobs.has(sha)]
        log.info("task %s: round %d, %s, batch %s; fetching %d of %d blobs (%s)", task.task_id, task.round,
                 _describe_part(task.part), task.config.batch_size, len(missing), len(sizes),
                 size_text(sum(sizes[sha] for sha in missing)))
        deferred: list[Received] = []
        try:
            for sha in missing:
                fetch_blob(self.link, self.cfg.topics, self.cfg.device_id, self.blobs, sha, deferred=deferred)
        finally:
            for msg in deferred:
                self._route(msg)
        return sum(self.blobs.path(sha).stat().st_size for sha in missing)

    def _spec(self, task: Task, manifest_path: Path, weight_files: list[str]) -> JobSpec:
        threads = self.cfg.threads or task.config.threads
        scoring = task.kind == "score"
        files = self.job_files
        return JobSpec(manifest=str(manifest_path), weights=weight_files, dataset=str(self.cfg.data),
                       state_dir=str(self.runtime), task_id=task.task_id, part=task.part,
                       config=replace(task.config, threads=threads),
                       update_out=None if scoring else str(files / f"{task.task_id}.update.safetensors"),
                       progress_file=str(files / f"{task.task_id}.progress.json"),
                       mode=task.kind, scores_out=str(files / f"{task.task_id}.scores.json") if scoring else None,
                       features=task_features_path(manifest_path, task.blobs))

    # -- sending and acknowledgement -------------------------------------------------------
    def _deliver(self, task: Task, update: Update | Scores) -> None:
        """Send the update until the coordinator acknowledges it (duplicates are no-ops there).

        The update message goes first, alone, and the blob's chunks when the coordinator asks for them (Resend:
        all, or those it lacks): it grants a few uploads at a time, so a fleet finishing at once waits as small
        messages instead of flooding the broker and the coordinator with chunks. An unanswered update is sent
        again, alone."""
        chunks: list | None | bool = False      # what of the blob to send: None all, a list those, False nothing
        # waiting in the coordinator's upload line takes as long as the uploads before it: the device keeps asking
        # until its round's deadline has passed (the coordinator stops waiting then too), SEND_ATTEMPTS at least
        give_up_at = time.monotonic() + task.deadline_s
        attempt = 0
        while (attempt := attempt + 1) <= SEND_ATTEMPTS or time.monotonic() < give_up_at:
            try:
                if isinstance(update, Update) and chunks is not False:
                    # asked for: the coordinator holds the update, and judges it once the blob is whole
                    send_blob(self.link, self.topic("upload"), self.uploads, update.blob_sha256, indices=chunks)
                else:
                    self.link.publish(self.topic("update"), update.encode(), qos=1)
                log.info("task %s: %s sent%s: %s, job peak %s of %s budget, agent %s", task.task_id, update.TYPE,
                         f" (attempt {attempt})" if attempt > 1 else "",
                         size_text(update.blob_size) if isinstance(update, Update) else f"{len(update.scores)} scores",
                         size_text(update.peak_rss_bytes), size_text(self.jobs.budget_bytes), size_text(update.agent_peak_rss_bytes))
            except (RuntimeError, ValueError, BufferError) as exc:  # paho: not connected, queue full
                log.warning("task %s: sending failed (%s); attempt %d", task.task_id, exc, attempt)
            ack = self._await_ack(task.task_id)
            chunks = False                          # unanswered: the update alone again
            if isinstance(ack, Resend):
                if isinstance(update, Update) and ack.blob_sha256 == update.blob_sha256:
                    chunks = ack.chunks
                    log.info("task %s: the coordinator asks for %s chunk(s) of the update", task.task_id,
                             "all" if chunks is None else len(chunks))
                continue
            if ack:
                if ack.accepted:
                    log.info("task %s: accepted", task.task_id)
                else:
                    log.warning("task %s: rejected: %s", task.task_id, ack.reason)
                self._finish(task, ack.accepted, ack.reason)
                return
            if self.stop.is_set():
                return
        log.error("task %s: no acknowledgement after %d attempts, its round's deadline passed; kept in %s for the "
                  "next start", task.task_id, attempt - 1, self.current_file)

    def _await_ack(self, task_id: str) -> Ack | Resend | None:
        """The coordinator's answer to a task's update, or None after ack_timeout_s, or at once when the link has
        reconnected meanwhile: what was in flight may be lost (and the coordinator gives a device that went
        offline's upload slot to the next), so the update is sent again now rather than after the timeout."""
        deadline = time.monotonic() + self.cfg.ack_timeout_s
        connects = self.link.connects
        while not self.stop.is_set() and (left := deadline - time.monotonic()) > 0:
            if self.link.connects != connects:
                log.info("task %s: reconnected while waiting for the coordinator's answer: sending again", task_id)
                return None
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
        for store in (self.uploads.root, self.job_files):
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
        return self.job_files / f"{task.task_id}.update.json"

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


def _read_state(path: Path) -> dict:
    """A JSON state file (written atomically, so only a person's edit can break it)."""
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); fix or delete it") from None


def _wire_float(value: float) -> float | None:
    """A statistic as an Update carries it: None when the protocol could not (not finite, or beyond MAX_FLOAT)."""
    return float(value) if math.isfinite(value) and abs(value) <= MAX_FLOAT else None


def _reencode_fp16(path: Path) -> None:
    """Halve the update for the wire, as the task asks; read tensor by tensor, so the agent never
    holds the fp32 update whole. Float tensors only: shared labels (features/labels) stay int64."""
    update = wcodec.WeightFile(path)
    def half(tensor: np.ndarray) -> np.ndarray:
        return tensor if np.issubdtype(tensor.dtype, np.integer) else tensor.astype(np.float16)
    wcodec.save(path, {name: half(update[name]) for name in update}, fp16=True)
    release_free_heap()


def _describe_part(part: TrainablePart) -> str:
    """'layers 4-6 + head 2': what a task trains, for a log line."""
    span = part.span
    layers = f"layers {span[0]}-{span[-1]}" if len(span) > 1 else f"layer {span[0]}"
    return f"{layers} + head {part.head}"
