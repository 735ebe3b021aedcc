"""The coordinator service: rounds of federated training over MQTT, durable at every step.

One loop in one thread owns the decisions; paho's network thread only queues messages,
and blob serving runs in a small pool so a device fetching a large graph never delays an
update. A round:

1. opens when enough devices are online: the strategy plans it from the devices'
   announced (measured) budgets and the memory model of the profile; the round, its plan,
   the schedule's state and every task are committed in one transaction; then the tasks
   are published.
2. collects: update chunks are written to disk before they are acknowledged; an Update is
   judged (coordinator/intake.py), recorded durably, and only then acknowledged to its
   device; a device's Failed report settles its task.
3. closes when every task is settled, when its deadline passes, or when every device
   still owing an update has gone offline (its last will); stragglers never stall it.
   With at least `min_updates` accepted updates the strategy aggregates and advances;
   the new weights (one blob per layer), the schedule's state and the round's metrics are
   committed together; the global model is evaluated on held-out data.

A coordinator killed at any moment restarts from the state store: a closed round is
final, an open round continues with the updates already accepted (duplicates count
once) and its unsettled tasks are published again.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from coordinator import intake, strategies
from coordinator.config import ConfigError
from coordinator.global_model import GlobalModel
from coordinator.guards import (
    Admission,
    Fetches,
    GuardSettings,
    RateLimit,
    Refusal,
    UploadGrants,
    Uploads,
    benched_devices,
    rejection_kind,
)
from coordinator.model import sources
from coordinator.model.zoo_profile import measured_profile
from coordinator.observe import prometheus
from coordinator.ops.broker_acl import site_state_topic
from coordinator.replicas import LEASE, LeaderLease, link_identity, replica_name, share_group, shared
from coordinator.round_metrics import DeviceRound, RoundMetrics, device_accuracy, models_text
from coordinator.state_sql import StoreError, without_password
from coordinator.state_store import STATE_URL, TESTING, LeaseLost, StateStore, TaskRow, task_spec
from coordinator.strategies.aggregation import AggregationSettings, UpdateCheck, aggregation_settings_table
from coordinator.strategies.base import Device, Result, RoundPlan, stage_text
from coordinator.strategies.freezing import Validator
from coordinator.strategies.shared_features import is_feature
from edge_runtime import systemd
from edge_runtime.errors import EdgeRuntimeError, IntegrityError
from edge_runtime.logs import printable
from edge_runtime.store import atomic_write_text, sha256_file
from edge_runtime.train.layer_scores import scores_from_json
from edge_runtime.wire import weights as wcodec
from edge_runtime.wire.blob_exchange import serve_fetch
from edge_runtime.wire.mqtt_link import MqttLink, Received, security_from_settings
from edge_runtime.wire.protocol import (
    Ack,
    Failed,
    Fetch,
    Hello,
    Idle,
    ProtocolError,
    Resend,
    Scores,
    Status,
    Task,
    Topics,
    Update,
    decode_any,
)
from edge_runtime.wire.train_config import MAX_HOLDOUT, TrainConfig
from edge_runtime.wire.transfer import DEFAULT_CHUNK_BYTES, BlobStore, ChunkHeader

log = logging.getLogger("edge-coordinator")

# a device's input mean further than this many evaluation-set stds from the set's, or its std more than this
# factor off, means the two are normalised differently (non-IID splits of one dataset stay well inside)
NORMALISATION_MEAN_STDS = 0.75
NORMALISATION_STD_RATIO = 2.0

DEFAULTS = {
    "service": {"workdir": "runs/coordinator", "fleet": "default", "broker": "", "model": "", "seed": 0,
                "strategy": strategies.DEFAULT, "profile": "", "min_devices": 1, "round_deadline_s": 600.0,
                "offline_grace_s": 20.0,
                "min_updates": 1, "sample_fraction": 1.0, "max_rounds": 200, "eval_samples": 10000,
                "max_update_relative_change": 10.0, "update_fp16": False, "init_weights": "",
                "eval_data": "",
                # labeled data no device holds and the test set does not hold either: what the freezing rule of
                # progressive and layer-wise training decides on (coordinator/strategies/freezing.py); "" none
                "validation_data": "", "validation_samples": 5000,
                # the broker login and TLS (docs/broker.md, "Production broker"); mqtts:// turns TLS on
                "username": "", "password_file": "", "tls": False, "tls_ca": "", "tls_cert": "", "tls_key": "",
                # admission: the fleet's device list (one id a line, the file `edge-coordinator acl` reads);
                # "" takes any id up to max_devices
                "devices_file": "", "max_tasks_per_round": 1000,
                # "" keeps the state in SQLite in the workdir; a postgresql:// URL lets several replicas, sharing
                # one workdir (its blobs), serve one fleet: one leads by a lease, all take updates
                "state": "", "replica": "", "lease_s": 15.0,
                # "HOST:PORT" serves Prometheus metrics at http://HOST:PORT/metrics (port 0: any free one); "" off
                "metrics_listen": "",
                # what one device may cost the coordinator (coordinator/guards.py)
                **asdict(GuardSettings())},
    "train": {"optimizer": "adamw", "learning_rate": 2e-3, "local_epochs": 1.0, "batch_sizes": [16, 32, 64],
              "margin": 0.10,
              # the fraction of each device's rows kept out of training, on which it measures the model it was
              # sent and the one it trained (TrainConfig.holdout); -1: 0.2 for a personalised schedule (it has no
              # global model to test), 0 for the others (the coordinator's test set measures their model)
              "holdout_fraction": -1.0},
    # how accepted updates are combined and what a claimed sample count may weigh (every strategy)
    **aggregation_settings_table(),
    # and one table per strategy, with its defaults, declared beside its code
    **strategies.settings_tables(),
}
MQTT_KINDS = ("hello", "status", "fetch", "upload", "update")
TICK_S = 0.2        # how often the loop checks whether to open or close a round
# a round's model is tested beside the next round, with the cores but one: the coordinator keeps one for the fleet
TEST_THREADS = max(1, (os.cpu_count() or 1) - 1)
DISPATCH_WAIT_S = 30.0   # the longest the test waits for the next round's tasks to reach the broker


class Coordinator:
    """The service's state and loop; `run` until the schedule finishes or `stop` is set."""

    def __init__(self, settings: dict, host: str, port: int):
        # replicas sharing a workdir start one at a time: the model install, a measured profile and the
        # initial weights are written once, then read by the others
        with _startup_lock(Path(settings["service"]["workdir"])):
            self._start(settings, host, port)

    def _start(self, settings: dict, host: str, port: int) -> None:
        s = settings["service"]
        self.settings, self.host, self.port = settings, host, port
        self.security = security_from_settings(s, s["broker"])   # checked before the slow start-up below
        AggregationSettings(**settings["aggregation"])            # so is the [aggregation] table
        if s["init_weights"] and not Path(s["init_weights"]).is_file():   # and a file read only after profiling
            raise ConfigError(f"init_weights {s['init_weights']} is not a file (a safetensors file of the model's "
                              f"weights, as `edge-coordinator weights` writes)")
        self.work = Path(s["workdir"]).resolve()
        self.topics = Topics(s["fleet"])
        self.blobs = BlobStore(self.work / "blobs")
        self.model = GlobalModel(sources.install(s["model"], self.work / "model", s["seed"]).parent, self.blobs)
        m = self.model.manifest
        self.test_x, self.test_y = _test_set(s["eval_data"], m, s["eval_samples"])   # before the slow start-up
        self.eval_stats = (float(np.mean(self.test_x, dtype=np.float64)), float(np.std(self.test_x, dtype=np.float64)))
        self._scale_warned: set[str] = set()
        self.state = StateStore(s["state"] or self.work / "state.db")
        self.replicated = self.state.shared      # replicas: a lease elects the leader, intake is shared
        if self.replicated:                      # status tools find the database from the workdir
            atomic_write_text(self.work / STATE_URL, without_password(str(self.state.location)) + "\n")
        self.replica = replica_name(s["replica"])
        self.is_leader = not self.replicated
        self.lease: LeaderLease | None = None
        self._lease_epoch: int | None = None
        self._round_seen: int | None = None
        self.incoming = BlobStore(self.work / "incoming",
                                  max_blob_bytes=self.model.param_bytes(m.all_param_names()) + (1 << 20),
                                  shared=self.replicated)
        self._check_same_run()
        self.strategy = strategies.build(settings, m, _predictor(settings, self.work, self.model).predict)
        if m.contrastive and not self.strategy.trains_without_labels:
            raise ConfigError(f"{m.model} learns without labels (two fresh views of every image each step, so no "
                              f"cached prefix), and the {self.strategy.name} schedule trains parts from one; use "
                              f"{' or '.join(n for n, c in strategies.registry().items() if c.trains_without_labels)}")
        self.strategy.attach(self.model)          # a personalised schedule keeps its own weights in the blob store
        self.validation = self._validation_set(s, m)
        self.strategy.attach_validation(self._validator())
        self.holdout = _holdout_fraction(settings["train"]["holdout_fraction"], self.strategy.personalized)
        self.check = UpdateCheck(max_relative_change=s["max_update_relative_change"])
        self.pending: dict[str, tuple[str, Update]] = {}   # task id -> (sender, update) whose blob is incomplete
        # device -> when it was last seen going offline; a broker restart takes every device offline
        # for a moment (their wills fire), so a round gives a device up only after a grace period
        self.offline_since = {d["device_id"]: time.time() for d in self.state.devices() if not d["online"]}
        self.rng = np.random.default_rng(s["seed"])
        self._restore()
        self.metrics_path = self.work / "metrics.jsonl"
        self._write_metrics_file()
        self.link: MqttLink | None = None
        self._idle_note = ""
        guard = GuardSettings(**{f.name: s[f.name] for f in fields(GuardSettings)})
        self.guard = guard
        self.admission = Admission(guard, _device_list(s["devices_file"]) if s["devices_file"] else None)
        self.uploads, self.fetches = Uploads(guard), Fetches(guard)
        self.grants = UploadGrants(guard.upload_slots)
        self._serving: set[tuple[str, str]] = set()    # (device, blob) fetches queued or being served
        # (at, sender, task, reason, kind), written once per tick
        self._rejections: list[tuple[float, str | None, str | None, str, str]] = []
        self._loud = RateLimit(1)     # a device's refusals are logged once a minute; all are counted
        self._unpublished: dict[str, tuple[str, Task]] = {}   # task id -> (device, task) the link had no room for
        # the last closed round, the test of its model (None until started) and that test's arguments
        self._testing: tuple[RoundMetrics, Future | None, tuple] | None = None
        # (when, the last task's MessageInfo) of the open round's dispatch, until the test may start
        self._dispatch: tuple[float, object | None] | None = None
        self.incoming.expire_partials(guard.partial_upload_ttl_s)   # uploads a previous run left half-done

    # -- start-up -------------------------------------------------------------------------
    def _check_same_run(self) -> None:
        """A workdir holds one run: refuse to continue it with another model or strategy."""
        s = self.settings["service"]
        key = {"manifest": self.model.manifest_sha, "strategy": s["strategy"]}
        if self.state.meta("run") is None:
            # the tag goes into task ids: devices remember finished task ids, and must not take
            # a new run's round-1 task for one they already did (replicas starting together agree on one)
            import secrets
            self.state.meta_setdefault("settings", self.settings)
            self.state.meta_setdefault("run", dict(key, tag=secrets.token_hex(3)))
        have = self.state.meta("run")
        if {k: have[k] for k in key} != key:
            raise ConfigError(f"{self.work} holds a {have['strategy']} run of another model or strategy; "
                             f"use another --workdir or --fresh")
        self.run_tag = have["tag"]

    def _restore(self) -> None:
        """Continue where the state store says the run is: the open round, or after the last closed one."""
        row = self.state.current_round()
        if row is None:
            self.weights_sha = self.model.save(self._initial_weights())
            self.next_round = 1
            self.eval_layer = len(self.model.manifest.layers) - 1
        else:
            self.strategy.load_state(row.strategy_state)
            if self.is_leader:          # a replica tests when it leads (_lead restores again)
                self._test_untested()
            self.weights_sha = row.weights_before if row.state == "open" else row.weights_after
            self.next_round = row.round + (0 if row.state == "open" else 1)
            last = self.state.closed_rounds()
            self.eval_layer = _tested_layer(self.model.manifest, last[-1] if last else {})
            log.info("resuming: round %d is %s", row.round, row.state)
        self.global_weights = self.model.load(self.weights_sha)

    def _initial_weights(self) -> dict:
        """The export's initial weights, or a pretrained model's (init_weights: a safetensors file)."""
        from coordinator.model.export import load_weights
        weights = load_weights(self.model.manifest)
        given = self.settings["service"]["init_weights"]
        if given:
            pretrained = wcodec.load(Path(given))
            specs = self.model.manifest.param_specs()
            wrong = sorted(n for n in specs if n not in pretrained or pretrained[n].shape != tuple(specs[n].shape))
            if wrong:
                raise ConfigError(f"init_weights {given} does not fit the model: {len(wrong)} parameter(s) missing "
                                 f"or of another shape, e.g. {wrong[:3]}")
            weights = {n: pretrained[n] for n in specs}
            log.info("starting from the weights in %s", given)
        return weights

    def _write_metrics_file(self) -> None:
        """metrics.jsonl is a view of the state store: rewritten whole, so it never misses or repeats a round."""
        lines = [json.dumps(m) for m in self.state.closed_rounds()]
        atomic_write_text(self.metrics_path, "".join(l + "\n" for l in lines))

    # -- the loop ----------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None, serving: threading.Event | None = None) -> dict:
        """Serve until the schedule ends or `stop` is set; `serving` is set once connected and serving."""
        stop = stop or threading.Event()
        s = self.settings["service"]
        self.link = self._connect()
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="serve-fetch")
        self.tester = ThreadPoolExecutor(1, thread_name_prefix="test-model")
        self.janitor = ThreadPoolExecutor(1, thread_name_prefix="remove-blobs")    # deletes what a close set aside
        log.info("coordinator %sfor fleet %r on %s://%s:%d, strategy %s, model %s (%s, state in %s)",
                 f"replica {self.replica} " if self.replicated else "", s["fleet"],
                 "mqtts" if self.security.tls else "mqtt", self.host, self.port, s["strategy"],
                 self.model.manifest.model, self.work, self.state.describe())
        try:
            self.metrics_server = prometheus.serve(s["metrics_listen"], self.state.location,
                                                   lambda: getattr(self, "is_leader", True))
            if self.replicated:
                self.lease = LeaderLease(self.state.location, self.replica, s["lease_s"]).start()
            else:
                self._lead()
            # connected and announced: a stop signal now only sets `stop` (set before READY is said, so that a
            # supervisor's stop right after READY ends the loop cleanly, never the start-up), and a Type=notify
            # unit's start is complete
            if serving is not None:
                serving.set()
            systemd.notify("READY=1", f"STATUS=serving fleet {s['fleet']} on {self.host}:{self.port}")
            next_tick = 0.0
            while not stop.is_set():
                msg = self.link.get(timeout_s=TICK_S)
                if msg is not None:
                    self._handle(msg)
                # a tick reads the whole round from the state store: once per TICK_S, not once per
                # message, or a fleet's burst of N messages costs N ticks of O(N) each
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + TICK_S
                    if self._tick():
                        break
        finally:
            prometheus.stop(getattr(self, "metrics_server", None))
            self.pool.shutdown(wait=True)
            leading = self.is_leader
            if leading and self._testing is not None:
                round_no = self._testing[0].round
                try:                # a second or so: the round's record is complete now, not at the restart
                    self._finish_test(wait=True)
                except (LeaseLost, StoreError) as exc:
                    log.warning("the test of round %d is left to the next start or leader: %s", round_no, exc)
            self.tester.shutdown(wait=True)
            self.janitor.shutdown(wait=True)
            self.link.stop(final=(self.topics.coordinator_status, Status("offline", time.time()).encode())
                           if leading else None)
            if leading:
                self.state.set_meta("coordinator", {"pid": os.getpid(), "host": socket.gethostname(),
                                                    "running": False, "since": time.time(), "replica": self.replica})
            if self.lease is not None:
                self.lease.release()        # a standby takes over at its next renewal
        return self.summary()

    def _connect(self) -> MqttLink:
        """The broker link. One coordinator has the fleet's fixed client id and a last will that says it went
        offline; replicas each have their own id and share the device topics (MQTT 5 shared subscriptions: the
        broker hands each message to one replica), with no session kept for a replica that died, so the
        broker gives its share to the others, and no will (the leader's lease, not a socket, says who serves)."""
        client_id, expiry = link_identity(self.settings["service"])
        subscriptions = [(self.topics.all_devices(k), 1) for k in MQTT_KINDS]
        sites = [(site_state_topic(self.topics, "+"), 1)]   # every replica hears a site's bridge come back
        if not self.replicated:
            link = MqttLink(client_id, self.host, self.port, subscriptions + sites,
                            will=(self.topics.coordinator_status, Status("offline").encode()), manual_ack=True,
                            security=self.security)
        else:
            link = MqttLink(client_id, self.host, self.port,
                            [(shared(t, share_group(self.state)), q) for t, q in subscriptions] + sites,
                            manual_ack=True, session_expiry_s=expiry, security=self.security)
        return link.start(timeout_s=30)

    def _lead(self) -> None:
        """Take over as the one that plans, aggregates and evaluates: from the state store as it is now (a replica
        that led before, or a restart), announced to the fleet (devices say hello again on a new online status)."""
        self.is_leader = True
        if self.replicated:
            self._testing = None      # a test it started when it led before: _restore tests what is left untested
            self._restore()
            self._write_metrics_file()
            self.offline_since = {d["device_id"]: time.time() for d in self.state.devices() if not d["online"]}
            self.pending.clear()   # intake state of the follower days: re-judged when the devices send again
            self.grants.clear()
            log.info("replica %s leads the fleet (lease epoch %d)", self.replica, self._lease_epoch)
        self.state.set_meta("finished", False)   # set again at the next tick if the run is over
        self.link.publish(self.topics.coordinator_status, Status("online", time.time()).encode(), retain=True)
        # who is running this run: status tools beside it tell a live coordinator from a stopped one
        self.state.set_meta("coordinator", {"pid": os.getpid(), "host": socket.gethostname(), "running": True,
                                            "since": time.time(), "replica": self.replica})
        self._republish_open_tasks()

    def _fence(self) -> tuple[str, str, int] | None:
        """What the leader's round writes are checked against (replicas): its lease, as it holds it."""
        return (LEASE, self.replica, self._lease_epoch) if self.replicated else None

    def _share_intake(self) -> None:
        """What replicas taking chunks of the same uploads must settle each tick: a blob another replica
        completed frees this one's upload slot, and an update waiting for it is judged now."""
        for blob in self.uploads.open_blobs():
            if self.incoming.has(blob):
                self.uploads.done(blob)
        for task_id, (sender, update) in list(self.pending.items()):
            if self.incoming.has(update.blob_sha256):
                del self.pending[task_id]
                self._take_update(sender, update)

    def _follow(self) -> bool:
        """A replica that does not lead takes updates: it checks them against the weights of the open round,
        forgets what a closed round left, and stops when the leader has finished the run."""
        row = self.state.current_round()
        if row is not None and row.round != self._round_seen:
            self._round_seen = row.round
            self.uploads.forget_unclaimed()
        if row is not None and row.state == "open" and row.weights_before != self.weights_sha:
            self.weights_sha, self.global_weights = row.weights_before, self.model.load(row.weights_before)
        return bool(self.state.meta("finished", False))

    def _tick(self) -> bool:
        """Open, watch or close the round; True when the run is over."""
        self._flush_rejections()
        for blob in self.uploads.expired():
            self.incoming.discard(blob)
        self._grant_uploads()          # a grant that brought nothing for a while gives its slot to the next
        if self.replicated:
            self._share_intake()
            self.lease.tick()
            epoch = self.lease.epoch()
            if epoch is None:
                if self.is_leader:
                    log.warning("replica %s lost the leader lease; following", self.replica)
                    self.is_leader = False
                return self._follow()
            if not self.is_leader or epoch != self._lease_epoch:
                self._lease_epoch = epoch
                self._lead()
            try:
                return self._lead_tick()
            except LeaseLost as exc:
                log.warning("replica %s: %s; its round write was refused, following", self.replica, exc)
                self.is_leader = False
                return False
        return self._lead_tick()

    def _lead_tick(self) -> bool:
        self._publish_leftovers()
        self._finish_test(wait=False)
        row = self.state.current_round()
        if row is not None and row.state == "open":
            self._start_test()
            self._maybe_close(row)
            return False
        s = self.settings["service"]
        if self.strategy.finished or self.next_round > s["max_rounds"]:
            self._finish_test(wait=True)
            self.state.set_meta("finished", True)      # replicas that follow stop too
            return True
        online = self._online_devices()
        if len(online) >= s["min_devices"]:
            self._open_round(online)
        self._start_test()      # the last round's test, once this one's tasks are out (or it cannot open yet)
        return False

    def _online_devices(self) -> list[Device]:
        return [Device(d["device_id"], d["tier"], d["budget_bytes"], d["disk_free_bytes"])
                for d in self.state.devices(online_only=True)]

    # -- opening a round ---------------------------------------------------------------------
    def _sample(self, devices: list[Device]) -> list[Device]:
        """Per tier, a fraction of the online devices (at least one per tier), at most max_tasks_per_round."""
        s = self.settings["service"]
        fraction = min(s["sample_fraction"], s["max_tasks_per_round"] / max(1, len(devices)))
        if fraction >= 1:
            return devices
        chosen = []
        for tier in sorted({d.tier for d in devices}):
            members = [d for d in devices if d.tier == tier]
            k = max(1, round(fraction * len(members)))
            chosen += [members[i] for i in sorted(self.rng.choice(len(members), k, replace=False))]
        return chosen[:s["max_tasks_per_round"]]

    def _open_round(self, online: list[Device]) -> None:
        round_no = self.next_round
        benched = benched_devices(self.state.recent_outcomes(self.guard.max_bench_rounds + 8), round_no, self.guard)
        plan = self.strategy.plan_round(round_no, self._sample([d for d in online if d.device_id not in benched]))
        if benched:
            plan = replace(plan, idle={**plan.idle, **{d: why for d, why in benched.items()
                                                       if d in {o.device_id for o in online}}})
        if not plan.assignments:
            note = "; ".join(f"{d}: {why}" for d, why in sorted(plan.idle.items()))
            if note != self._idle_note:
                log.warning("round %d cannot start: no online device can train its part (%s)", round_no, note)
                self._idle_note = note
            return
        self._idle_note = ""
        s, t = self.settings["service"], self.settings["train"]
        self.model.prepare_parts([a.part() for a in plan.assignments])
        tasks, blob_lists = [], {}
        for a in plan.assignments:
            part = a.part()
            config = TrainConfig(optimizer=t["optimizer"], learning_rate=t["learning_rate"], batch_size=a.batch_size,
                                 epochs=t["local_epochs"], seed=int(s["seed"] * 100003 + round_no),
                                 holdout=self.holdout if a.kind == "train" else 0.0,
                                 **(self.strategy.train_settings(a) if a.kind == "train" else {}))
            own = self.strategy.device_weights(a.device_id, self.global_weights)
            own_index = None if own is None else self.model.save(own)   # only the changed layers are new blobs
            features = self.strategy.task_features(a) if config.in_weight > 0 else None
            # a fleet's devices mostly train the same parts: each distinct blob list is made once a round
            key = (part, own_index or self.weights_sha, config.holdout > 0,
                   config.in_weight > 0 or config.share_rows > 0, features)
            if key not in blob_lists:
                blob_lists[key] = self.model.task_blobs(part, key[1], evaluation=key[2], fedin=key[3],
                                                        features_sha=features)
            task = Task(task_id=_task_id(round_no, self.run_tag, a.device_id), round=round_no,
                        manifest=self.model.manifest_ref(), blobs=blob_lists[key],
                        part=part, config=config, deadline_s=s["round_deadline_s"], update_fp16=s["update_fp16"],
                        kind=a.kind)
            tasks.append((task, a, own_index, task.encode()))     # encode validates; once for the store and link
        self.state.open_round(round_no, time.time() + s["round_deadline_s"], self.weights_sha, plan.to_dict(),
                              self.strategy.state(),
                              [(t.task_id, a.device_id, task_spec(a, payload, own)) for t, a, own, payload in tasks],
                              fence=self._fence())
        published = [self._publish_task(a.device_id, task, payload) for task, a, _, payload in tasks]
        # the last task through to the broker is the dispatch's end (paho sends in order): the test waits for it
        self._dispatch = (time.monotonic(), next((i for i in reversed(published) if i is not None), None))
        log.info("round %d opened (%s): %s", round_no, stage_text(plan.stage),
                 _assignments_text(self.model.manifest, plan.assignments))
        systemd.status(f"round {round_no} open ({stage_text(plan.stage)}): {len(tasks)} task(s)")
        for device_id, why in sorted(plan.idle.items()):  # a device that fits nothing is told why
            log.info("round %d: %s idle: %s", round_no, device_id, why)
            self.link.publish(self.topics.device(device_id, "task"), Idle(round_no, why[:2000]).encode(), qos=1)

    def _publish_task(self, device_id: str, task: Task, payload: bytes | None = None):
        """Send a task (`payload`: its encoding, when made already), waiting briefly for room on the link; one that
        finds none is sent from the next ticks. paho's MessageInfo of the publication, or None."""
        try:
            info = self.link.publish_when_room(self.topics.device(device_id, "task"), payload or task.encode(),
                                               timeout_s=2.0)
            self._unpublished.pop(task.task_id, None)
            return info
        except (BufferError, RuntimeError, ValueError) as exc:   # paho: queue full, not connected
            if task.task_id not in self._unpublished:
                log.warning("task %s for %s waits for room on the link (%s)", task.task_id, device_id, exc)
            self._unpublished[task.task_id] = (device_id, task)

    def _publish_leftovers(self) -> None:
        for task_id, (device_id, task) in list(self._unpublished.items())[:200]:
            row = self.state.task(task_id)
            if row is None or row.status != "sent":
                self._unpublished.pop(task_id, None)
                continue
            self._publish_task(device_id, task)
            if task_id in self._unpublished:
                return                      # still no room: try again next tick

    def _republish_open_tasks(self) -> None:
        row = self.state.current_round()
        if row is None or row.state != "open":
            return
        unsettled = [t for t in self.state.tasks(row.round) if t.status == "sent"]
        for t in unsettled:   # never raises: a task the link has no room for is sent from the next ticks
            self._publish_task(t.device_id, t.task)
        log.info("round %d continues: %d accepted update(s) kept, %d task(s) published again", row.round,
                 len(self.state.updates(row.round)), len(unsettled))

    # -- messages ---------------------------------------------------------------------------
    def _handle(self, msg: Received) -> None:
        """Dispatch one message; whatever it holds, the service keeps running and the message is acknowledged."""
        try:
            if msg.topic.startswith(self._site_prefix):
                self._on_site(msg)
                return
            device_id, kind = self.topics.parse_device_topic(msg.topic)
            if kind not in MQTT_KINDS:
                raise ProtocolError(f"devices do not publish {kind} messages")
            getattr(self, f"_on_{kind}")(device_id, msg)
        except (ProtocolError, EdgeRuntimeError) as exc:
            self._rejected(self._registered_sender(msg.topic), None, f"{printable(msg.topic, 120)}: {exc}",
                           rejection_kind(exc))
        except Exception:  # a bug must not take the fleet's coordinator down
            log.exception("error while handling a message on %s", msg.topic)
        finally:
            self.link.ack(msg)

    @property
    def _site_prefix(self) -> str:
        """Where sites' bridges say whether they are connected (site_state_topic: <root>/site/<site>/bridge)."""
        return f"{self.topics.root}/site/"

    def _on_site(self, msg: Received) -> None:
        """A site's bridge to this broker came (back) up: what the core published for the site's devices while it
        was down never reached them (the bridge keeps no session), so the open round's unsettled tasks go out again
        (a device that has its task takes the copy as one it has)."""
        site = msg.topic[len(self._site_prefix):].split("/")[0]
        if msg.payload == b"1" and self.is_leader:
            log.info("site %s's bridge is connected: the open round's unsettled tasks go out again", printable(site))
            self._republish_open_tasks()
        elif msg.payload == b"0":
            log.warning("site %s's bridge is down: its devices cannot be reached until it is back", printable(site))

    def _on_hello(self, device_id: str, msg: Received) -> None:
        hello = Hello.decode(msg.payload)
        if hello.device_id != device_id:
            raise ProtocolError(Refusal("wrong_identity", f"hello from {hello.device_id!r} on the topic of "
                                                          f"{device_id!r}"))
        known = self.state.has_device(device_id)
        refused = self.admission.refuse_hello(device_id, known, 0 if known else self.state.device_count())
        if refused:
            raise ProtocolError(refused)
        self.state.upsert_device(hello)
        log.info("device %s online: tier %s, budget %.0f MB, runtime %s", device_id, hello.tier,
                 hello.budget_bytes / 2**20, printable(hello.runtime_version, 64))
        row = self.state.current_round()
        if row is not None and row.state == "open":  # a device that restarted mid-round gets its task again
            for t in self.state.tasks(row.round):
                if t.device_id == device_id and t.status == "sent":
                    self._publish_task(device_id, t.task)

    def _on_status(self, device_id: str, msg: Received) -> None:
        status = Status.decode(msg.payload)
        if self.state.has_device(device_id):
            online = status.state == "online"
            self.state.set_online(device_id, online)
            if online:
                self.offline_since.pop(device_id, None)
            else:
                self.offline_since.setdefault(device_id, time.time())
                self._forget_uploads(device_id)
            log.info("device %s is %s", device_id, status.state)

    def _forget_uploads(self, device_id: str) -> None:
        """A device that went offline gives up its upload slot and its place in line (an upload slot it held would
        stay idle until the grant expired, 30 s, while the fleet waited behind it); the chunks it sent are kept,
        and back online it sends its update again, and queues again for the rest."""
        gone = [task_id for task_id, (sender, _) in self.pending.items() if sender == device_id]
        for task_id in gone:
            self.pending.pop(task_id)
            self.grants.release(task_id)
        if gone:
            log.info("device %s went offline with %d update(s) waiting for their blobs: their upload slots go to "
                     "the next", device_id, len(gone))
            self._grant_uploads()

    def _on_fetch(self, device_id: str, msg: Received) -> None:
        fetch = Fetch.decode(msg.payload)
        blob = fetch.sha256
        if (device_id, blob) in self._serving:
            # asked again while its first request waits for the serving pool: that answer sends everything this
            # one lists (a device only ever lacks fewer chunks), so it is neither served twice nor charged
            log.debug("fetch of %s… from %s: already being served", blob[:12], device_id)
            return
        task = self._open_task(device_id)
        # what the task names, with the sizes it gave the device
        named = {} if task is None else \
            {b["sha256"]: b.get("size", 0) for b in (task.task.manifest, *task.task.blobs)}
        asked = named.get(blob, 0) if fetch.chunks is None else \
            min(named.get(blob, 0), len(set(fetch.chunks)) * DEFAULT_CHUNK_BYTES)
        refused = self.fetches.refuse(device_id, blob, named, task.task_id if task else "", asked)
        if refused:
            raise ProtocolError(refused)

        def serve():
            try:
                serve_fetch(self.link, self.topics, self.blobs, msg)
            except Exception as exc:  # logged, the device asks again
                log.warning("fetch from %s failed: %s", device_id, exc)
            finally:
                self._serving.discard((device_id, blob))
        self._serving.add((device_id, blob))
        self.pool.submit(serve)

    def _on_upload(self, device_id: str, msg: Received) -> None:
        header = ChunkHeader.from_properties(msg.user_properties)
        task = self._open_task(device_id)
        if task is not None and task.status == "accepted":
            # a chunk of an update accepted meanwhile (a Resend crossed the ack): the device owes nothing more, and
            # it did nothing wrong; the chunk is not kept
            log.debug("chunk %d of %s… from %s: its update is accepted already", header.index, header.blob[:12],
                      device_id)
            return
        allowed = None if task is None or task.status != "sent" or task.assignment.kind != "train" else \
            intake.update_limit_bytes(self.model.manifest, task)
        refused = self.uploads.refuse_chunk(device_id, header.blob, header.size, allowed)
        if refused:
            raise ProtocolError(refused)
        try:
            done = self.incoming.receive(header, msg.payload)
        except IntegrityError:
            self.uploads.done(header.blob)      # the assembled blob failed its hash and is gone: a new upload may start
            raise
        # a chunk refused alone (bytes not matching its hash) keeps its upload's slot: the partial expires with it
        self.grants.progress(header.blob)
        done = header.blob if done else None
        if done:
            for extra in self.uploads.completed(done):
                self.incoming.remove(extra)
            for task_id, (sender, update) in list(self.pending.items()):
                if update.blob_sha256 == done:
                    del self.pending[task_id]
                    self._take_update(sender, update)
            self._grant_uploads()

    def _on_update(self, device_id: str, msg: Received) -> None:
        message = decode_any(msg.payload, (Update, Scores, Failed))
        if isinstance(message, Failed):
            self._take_failure(device_id, message)
        elif isinstance(message, Scores):
            self._take_scores(device_id, message)
        else:
            self._take_update(device_id, message)

    def _open_round_no(self) -> int | None:
        return self.state.open_round_no()

    def _take_update(self, sender: str, update: Update) -> None:
        verdict = intake.judge_update(update, sender, self.state, self._open_round_no(), self.incoming,
                                      self.model.manifest, self._sent_weights, self.check)
        if verdict.status == "pending":
            self.pending[update.task_id] = (sender, update)
            if self.grants.ask(update.task_id, update.blob_sha256):
                # granted before and sent again: what it sent under the grant was lost (a broker's full queue, a
                # restart), and the device sends only what is still missing
                self._ask_for_blob(sender, update, again=True)
            self._grant_uploads()
            return
        self.grants.release(update.task_id)
        if verdict.status == "accepted":
            self.uploads.claimed(update.blob_sha256)
            self._check_normalisation(sender, update)
        self._answer(sender, update, verdict, self.state.record_update,
                     f"update from {sender} accepted ({update.blob_size / 1024:.1f} KB, {update.num_examples} "
                     f"samples, loss {update.loss:.3f}, job peak {update.peak_rss_bytes / 2**20:.0f} MB)")

    def _grant_uploads(self) -> None:
        """Let the next waiting updates send their blobs, as upload slots free (UploadGrants)."""
        for task_id in self.grants.grant():
            if task_id in self.pending:
                self._ask_for_blob(*self.pending[task_id])

    def _ask_for_blob(self, sender: str, update: Update, again: bool = False) -> None:
        """Tell a device to send its update's chunks, those this coordinator still lacks."""
        missing = self.incoming.missing_chunks(update.blob_sha256)
        try:
            self.link.publish(self.topics.device(sender, "ack"),
                              Resend(update.task_id, update.blob_sha256, missing).encode(), qos=1)
        except BufferError:     # the link's queue is full: the grant expires, and the device's next update asks again
            log.warning("round %d: no room to ask %s for its update's chunks", update.round, sender)
            return
        if again:
            log.info("round %d: the update from %s lacks %s chunk(s) of its blob: asked for them again",
                     update.round, sender, "all" if missing is None else len(missing))

    def _sent_weights(self, task: TaskRow) -> Mapping[str, np.ndarray]:
        """The weights a task was sent: the device's own (a personalised schedule's) or the round's global ones."""
        index = task.weights_index
        return self.global_weights if index is None else self.model.load(index)

    def _check_normalisation(self, sender: str, update: Update) -> None:
        """Warn (once per device) when a device's inputs are scaled unlike the evaluation set's: the model it
        trains would be judged on data it never saw the like of, and the accuracy would mislead."""
        if update.input_mean is None or update.input_std is None or sender in self._scale_warned:
            return
        mean, std = self.eval_stats
        far = abs(update.input_mean - mean) > NORMALISATION_MEAN_STDS * max(std, 1e-6)
        ratio = update.input_std / max(std, 1e-12)
        if far or not 1 / NORMALISATION_STD_RATIO <= ratio <= NORMALISATION_STD_RATIO:
            self._scale_warned.add(sender)
            log.warning("device %s's inputs have mean %.3g and std %.3g, the evaluation set's mean %.3g and std %.3g: "
                        "they are normalised differently, so the accuracy reported here will mislead; normalise "
                        "the devices' data and the evaluation set alike (--eval-data)", sender, update.input_mean,
                        update.input_std, mean, std)

    def _take_scores(self, sender: str, msg: Scores) -> None:
        verdict = intake.judge_scores(msg, sender, self.state, self._open_round_no())
        self._answer(sender, msg, verdict, self.state.record_scores,
                     f"scores from {sender} accepted ({len(msg.scores)} layers, {msg.num_examples} samples)")

    def _answer(self, sender: str, msg: Update | Scores, verdict: intake.Verdict, record, accepted: str) -> None:
        """Store an accepted answer durably, then (and only then) tell the device; a rejection says why."""
        if verdict.status == "accepted":
            if record(msg):
                log.info("round %d: %s", msg.round, accepted)
            else:   # another replica took the same message (a re-send reached both): the store counts it once
                log.info("round %d: the %s from %s was taken already", msg.round, msg.TYPE, sender)
        elif verdict.status == "rejected":
            self._reject(sender, msg.task_id, verdict)
        self._ack(sender, msg.task_id, verdict)

    def _take_failure(self, sender: str, failed: Failed) -> None:
        verdict = intake.judge_failure(failed, sender, self.state, self._open_round_no())
        if verdict.status == "accepted":
            self.state.mark_task(failed.task_id, "failed", f"device reported: {failed.reason}")
            log.warning("round %d: %s could not train: %s", failed.round, sender, printable(failed.reason))
        else:
            self._reject(sender, failed.task_id, verdict)

    def _reject(self, sender: str, task_id: str, verdict: intake.Verdict) -> None:
        self._rejected(sender, task_id, verdict.reason, verdict.kind)
        if verdict.settles_task:
            self.state.mark_task(task_id, "rejected", verdict.reason)

    def _registered_sender(self, topic: str) -> str | None:
        """The device whose topic a message came on, if the registry holds it (an invented id is nobody)."""
        try:
            device_id, _ = self.topics.parse_device_topic(topic)
        except ProtocolError:
            return None
        return device_id if self.state.has_device(device_id) else None

    def _rejected(self, sender: str | None, task_id: str | None, reason: str, kind: str) -> None:
        """Count a rejection under its kind (guards.REJECTION_KINDS; stored with the next tick, in one transaction)
        and log it: once a minute per registered device, and once a minute for all the rest (a flood from invented
        ids is one line a minute)."""
        self._rejections.append((time.time(), sender, task_id, reason[:1000], kind))
        if self._loud.allow(sender or "\0unregistered"):
            log.warning("rejected a message from %s (task %s): %s", sender or "?", task_id or "-", printable(reason))

    def _flush_rejections(self) -> None:
        if self._rejections:
            batch, self._rejections = self._rejections, []
            self.state.record_rejections(batch)

    def _open_task(self, device_id: str) -> TaskRow | None:
        """The device's task in the open round, if it has one."""
        number = self._open_round_no()
        return None if number is None else self.state.task_of(number, device_id)

    def _ack(self, device_id: str, task_id: str, verdict: intake.Verdict) -> None:
        ack = Ack(task_id, verdict.status in ("accepted", "duplicate"), verdict.reason)
        self.link.publish(self.topics.device(device_id, "ack"), ack.encode(), qos=1)

    # -- closing a round --------------------------------------------------------------------
    def _maybe_close(self, row) -> None:
        waiting = self.state.waiting_tasks(row.round)       # [(task id, device)]
        online: set[str] = set()
        if not waiting:
            why = "every task settled"
        else:
            devices = {d["device_id"]: d for d in self.state.devices()}
            online = {d for d, device in devices.items() if device["online"]}
            grace = self.settings["service"]["offline_grace_s"]
            gone = [device for _, device in waiting if device not in online
                    and time.time() - self._offline_since(device, devices) >= grace]
            if time.time() >= row.deadline_at:
                why = f"deadline passed with {len(waiting)} task(s) open"
            elif len(gone) == len(waiting):
                why = f"the {len(waiting)} device(s) still owing an update went offline (for over {grace:.0f} s)"
            else:
                return
        for task_id, device in waiting:  # settled now, with the reason each one ends
            self.state.mark_task(task_id, "failed", "device went offline" if device not in online
                                 else "no update before the deadline")
        self._close(row, self.state.tasks(row.round), why)

    def _offline_since(self, device_id: str, devices: dict[str, dict]) -> float:
        """When a device went offline: as this process saw it, or (replicas, where another replica may have
        taken its status message) as the store has it."""
        seen = self.offline_since.get(device_id, 0.0)
        if self.replicated and device_id in devices:
            seen = max(seen, devices[device_id]["last_seen"])
        return seen

    def _close(self, row, tasks: list[TaskRow], why: str) -> None:
        self._finish_test(wait=True)      # the rounds' records come in order, each complete
        s = self.settings["service"]
        plan = RoundPlan.from_dict(row.plan)
        updates = {u.task_id: u for u in self.state.updates(row.round)}
        by_task = {t.task_id: t for t in tasks}
        results = stored_results(row.round, updates.values(), by_task, self.incoming, self.model.load)
        scored = {sc["task_id"]: sc for sc in self.state.scores(row.round)}
        for task_id, sc in scored.items():
            results.append(Result(by_task[task_id].assignment, {}, sc["num_examples"], 0.0,
                                  scores=scores_from_json(sc["scores"])))
        results = self._capped(row.round, results)
        failures = {t.device_id: t.reason or "no update" for t in tasks if t.status != "accepted"}
        before = self.global_weights
        aggregated = len(results) >= s["min_updates"]
        if aggregated:
            after = self.strategy.aggregate(plan, results, failures, before)
            self.strategy.advance(replace(plan, assignments=tuple(r.assignment for r in results)), before, after,
                                  results)
            weights_after = self.model.save(after)
            # tested as trained: through the deepest part of the round and the head it trained with (a layer-wise
            # stage's part ends inside a block; the block's own head after untrained layers tests at chance)
            self.eval_layer = max(r.assignment.last for r in results)
        else:
            after, weights_after = before, row.weights_before
        measured = self._round_metrics(row, plan, tasks, updates, scored, why, aggregated)
        # stored before the test: a stop from here on keeps the round closed, and the restart tests its model
        self.state.close_round(row.round, weights_after, self.strategy.state(), {**measured.to_dict(), TESTING: True},
                               fence=self._fence())
        self.global_weights, self.weights_sha, self.next_round = after, weights_after, row.round + 1
        # the updates are folded into the global weights (or never will be), and a blob no update named never will
        # be: free the disk
        self.incoming.remove_complete(later=self.janitor.submit)
        self.uploads.forget_unclaimed()
        self.pending.clear()
        self.grants.clear()
        self._collect_garbage()
        log.info("round %d closed (%s): %d of %d update(s)%s; testing its model", row.round, why, len(results),
                 len(tasks), "" if aggregated else f", fewer than {s['min_updates']}: weights kept")
        # the test is reporting, not the next round's input: it starts once the next round's tasks are out
        self._testing = (measured, None, (after, self.eval_layer, self.strategy.evaluations()))

    def _start_test(self, now: bool = False) -> None:
        """Start the last closed round's test once the open round's tasks have reached the broker (`now`: at once):
        the test takes the cores that sending a fleet's tasks needs. DISPATCH_WAIT_S after the opening at the
        latest."""
        if self._testing is None or self._testing[1] is not None:
            return
        if not now and self._dispatch is not None:
            since, last = self._dispatch
            if last is not None and not last.is_published() and time.monotonic() - since < DISPATCH_WAIT_S:
                return
        self._dispatch = None
        measured, _, args = self._testing
        self._testing = (measured, self.tester.submit(self._test, *args), args)

    def _test(self, weights: Mapping[str, np.ndarray], eval_layer: int,
              members: Mapping[str, tuple[int, ...]]) -> tuple[dict, dict[str, dict]]:
        """A global model on the held-out test set: (headline result, {member: result} of a model family)."""
        ev = self.model.evaluate(weights, self.test_x, self.test_y, upto_layer=eval_layer, threads=TEST_THREADS,
                                 fit_on=self.validation)
        # a model family's members, each tested as the devices run it (FedIN): the largest is the headline
        models = {name: self.model.evaluate(weights, self.test_x, self.test_y, skip=skip, threads=TEST_THREADS)
                  for name, skip in members.items()}
        return (models[list(models)[-1]] if models else ev), models

    def _tested(self, measured: RoundMetrics, result: tuple[dict, dict[str, dict]]) -> RoundMetrics:
        ev, models = result
        return replace(measured, accuracy=ev["accuracy"], loss=ev["loss"],
                       models={n: {"accuracy": e["accuracy"], "loss": e["loss"]} for n, e in models.items()})

    def _test_untested(self) -> None:
        """Test the rounds a coordinator closed and stopped before testing (one at most: it tests each round
        before closing the next), as the test would have gone."""
        for round_no, weights_sha, raw in self.state.untested_rounds():
            measured = RoundMetrics.from_dict({**raw, "accuracy": float("nan")})
            tested = self._tested(measured, self._test(self.model.load(weights_sha),
                                                       _tested_layer(self.model.manifest, raw),
                                                       self.strategy.evaluations()))
            self.state.record_test(round_no, tested.to_dict(), fence=self._fence())
            log.info("round %d, closed before the last stop, tested: test accuracy %.2f%%", round_no,
                     100 * tested.accuracy)

    def _finish_test(self, wait: bool) -> None:
        """Record the last closed round's test once it is done (`wait`: once it is done): the stored metrics,
        metrics.jsonl's line, the retained metrics message, the log."""
        if self._testing is None or (not wait and (self._testing[1] is None or not self._testing[1].done())):
            return
        self._start_test(now=True)
        measured, future, _ = self._testing
        self._testing = None
        self._record_test(self._tested(measured, future.result()))

    def _record_test(self, measured: RoundMetrics) -> None:
        metrics = measured.to_dict()
        self.state.record_test(measured.round, metrics, fence=self._fence())
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(metrics, allow_nan=False) + "\n")     # to_dict made every number finite or null
        self.link.publish(self.topics.coordinator_metrics, json.dumps(metrics, allow_nan=False).encode(), retain=True)
        own = device_accuracy([measured])
        tested = f"test accuracy per member {models_text(measured.models)}" if measured.models else \
            f"test accuracy {100 * measured.accuracy:.2f}% ({_tested_text(self.model.manifest, measured.eval_layer)})"
        log.info("round %d tested: %s%s", measured.round,
                 "" if own is None else f"per-device accuracy {own.text()}; ", tested)
        systemd.status(f"round {measured.round} closed ({measured.closed_because}): test accuracy "
                       f"{100 * measured.accuracy:.2f}%")

    def _capped(self, round_no: int, results: list[Result]) -> list[Result]:
        """The results with the weight each claimed sample count earns (AggregationSettings.weights): a device
        that claims 10^15 samples weighs what is plausible for it, never more than a share of the round."""
        claims = {r.assignment.device_id: r.num_examples for r in results}
        history = self.state.claimed_examples(claims, before_round=round_no)
        granted = self.strategy.aggregation.weights(claims, history)
        for device, n in claims.items():
            if granted[device] < n:   # a share cap in a small fleet lowers weights a little: only big cuts are news
                log.log(logging.INFO if granted[device] < n / 2 else logging.DEBUG,
                        "round %d: %s claimed %d samples, weighs %.0f (capped by the fleet's and its own past "
                        "claims, [aggregation])", round_no, device, n, granted[device])
        return [replace(r, weight=granted[r.assignment.device_id]) for r in results
                if granted[r.assignment.device_id] > 0]

    def _validation_set(self, s: Mapping, manifest) -> tuple[np.ndarray, np.ndarray] | None:
        """[service] validation_data: labeled data no device holds and the test set does not hold either, what
        freezing decides on and a self-supervised model's linear probe is fitted on; None without it."""
        if not s["validation_data"]:
            if manifest.contrastive:
                raise ConfigError(f"{manifest.model} learns without labels, and the linear probe that measures it "
                                  f"is fitted on labeled data no device holds: give it with --validation-data DIR "
                                  f"([service] validation_data)")
            if self.strategy.reads_validation():
                log.warning("no [service] validation_data: the %s schedule's freezing rule has no held-out accuracy "
                            "to read, so every stage trains to its round cap", self.strategy.name)
            return None
        if s["eval_data"] and Path(s["validation_data"]).resolve() == Path(s["eval_data"]).resolve():
            raise ConfigError("validation_data is eval_data: the rounds' reported test accuracy must come from data "
                              "nothing decided on; give a held-out set of its own")
        x, y = _labeled_set(s["validation_data"], manifest, s["validation_samples"], "validation_data")
        log.info("validation set: %d labeled examples (%s)%s", len(y), s["validation_data"],
                 ", which the linear probe is fitted on" if manifest.contrastive else "")
        return x, y

    def _validator(self) -> Validator | None:
        """The freezing rule's measure: the stage's accuracy on the validation set (a self-supervised model's: of a
        probe fitted on its first half, on its second)."""
        if self.validation is None:
            return None
        x, y = self.validation
        half = len(y) // 2

        def validate(weights: Mapping[str, np.ndarray], last_layer: int) -> float:
            if self.model.manifest.contrastive:
                return self.model.evaluate(weights, x[half:], y[half:], upto_layer=last_layer,
                                           fit_on=(x[:half], y[:half]))["accuracy"]
            return self.model.evaluate(weights, x, y, upto_layer=last_layer)["accuracy"]
        return validate

    def _collect_garbage(self) -> None:
        """Keep the current weights and those of the last round that changed them (a restart tests that round if it
        closed untested); delete older blobs."""
        changed = [r for r in self.state.closed_round_rows() if r.weights_after != r.weights_before][-1:]
        indexes = {self.weights_sha} | {i for r in changed for i in (r.weights_before, r.weights_after) if i}
        own_indexes, own_blobs = self.strategy.blobs_in_use()
        removed = self.model.collect_garbage(indexes | own_indexes, own_blobs)
        if removed:
            log.debug("collected %d blob(s) no round needs any more", removed)

    def _round_metrics(self, row, plan: RoundPlan, tasks: list[TaskRow], updates, scored, why: str,
                       aggregated: bool) -> RoundMetrics:
        """What the round measured, but its model's test (accuracy NaN: _finish_test fills it in)."""
        devices = {d["device_id"]: d for d in self.state.devices()}
        per_device = {}
        for t in tasks:
            a = t.assignment
            u, sc = updates.get(t.task_id), scored.get(t.task_id)
            answer = {}
            if u is not None:
                answer = dict(num_examples=u.num_examples, loss=u.loss, peak_rss_bytes=u.peak_rss_bytes,
                              agent_peak_rss_bytes=u.agent_peak_rss_bytes, downloaded_bytes=u.downloaded_bytes,
                              uploaded_bytes=u.blob_size, seconds=u.seconds, holdout_examples=u.holdout_examples,
                              holdout_accuracy_before=u.holdout_accuracy_before, holdout_accuracy=u.holdout_accuracy)
            if sc is not None:
                answer = dict(num_examples=sc["num_examples"], scores=sc["scores"], peak_rss_bytes=sc["peak_rss_bytes"],
                              agent_peak_rss_bytes=sc["agent_peak_rss_bytes"], seconds=sc["seconds"])
            per_device[t.device_id] = DeviceRound(
                tier=devices[t.device_id]["tier"], budget_bytes=devices[t.device_id]["budget_bytes"], kind=a.kind,
                trainable=tuple(a.trainable), train_head=a.train_head, layers=(a.first, a.last), head=a.head,
                batch_size=a.batch_size, predicted_peak_bytes=a.predicted_peak_bytes, status=t.status,
                reason=t.reason, trained_bytes=self.model.param_bytes(a.trained_names(self.model.manifest)),
                member=_member_name(self.model.manifest, a),
                **answer)
        return RoundMetrics(round=row.round, strategy=self.settings["service"]["strategy"], stage=plan.stage,
                            closed_because=why, aggregated=aggregated, accuracy=float("nan"),
                            eval_block=self.model.manifest.layers[self.eval_layer].block, eval_layer=self.eval_layer,
                            opened_at=row.opened_at, closed_at=time.time(),
                            updates=len(updates) + len(scored),
                            rejected=len(self.state.rejections(since=row.opened_at)),
                            failed=sum(t.status == "failed" for t in tasks), devices=per_device,
                            idle=dict(plan.idle), finished=self.strategy.finished,
                            rounds_left=tuple(self.strategy.rounds_left()),   # (fewest, most): progress and ETAs
                            schedule=self.strategy.round_report(row.round))

    def summary(self) -> dict:
        rounds = self.state.closed_rounds()
        return {"rounds": len(rounds), "finished": self.strategy.finished,
                "accuracy": rounds[-1]["accuracy"] if rounds else None, "workdir": str(self.work)}


# -- helpers -----------------------------------------------------------------------------------
def stored_results(round_no: int, updates, by_task: dict[str, TaskRow], incoming: BlobStore,
                   load_index: Callable[[str], Mapping[str, np.ndarray]]) -> list[Result]:
    """The round's accepted updates as Results whose tensors are read lazily, one at a time; a task that was
    sent the device's own weights (a personalised schedule) has them as its Result's `start` (load_index).

    Aggregation then holds only its running sums, never every update at once (N devices x
    the part each trained). A stored update that is gone or no longer matches its hash
    (a disk that lost a file in a power cut) is logged and left out, not aggregated; one this
    process hashed as it arrived and whose file has not changed since is not hashed again.
    """
    updates = list(updates)

    def digest(u) -> str | OSError:
        if incoming.hashed_unchanged(u.blob_sha256):   # hashed as it arrived, untouched since: the same bytes
            return u.blob_sha256
        try:
            return sha256_file(incoming.path(u.blob_sha256))
        except OSError as exc:
            return exc
    # what needs hashing (after a restart, or another replica's upload) is hashed outside the GIL: on more than one
    # core the close waits for it less (1.2 s for 1,000 updates of 1.7 MB on one)
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="check-update") as pool:
        digests = list(pool.map(digest, updates))
    results = []
    for u, found in zip(updates, digests):
        path = incoming.path(u.blob_sha256)
        try:
            if isinstance(found, OSError):
                raise found
            if found != u.blob_sha256:
                raise EdgeRuntimeError(f"{path.name} no longer matches its hash")
            values = wcodec.WeightFile(path)
        except (OSError, EdgeRuntimeError) as exc:
            log.error("round %d: the stored update of %s is unreadable, left out: %s", round_no, u.device_id, exc)
            continue
        task = by_task[u.task_id]
        start = load_index(task.weights_index) if task.weights_index else None
        shared = [n for n in values if is_feature(n)]
        features = None
        if shared:   # FedIN's shared rows travel in the update: read now (a few rows), kept out of the parameters
            features = {n: values[n] for n in shared}
            values = wcodec.WeightFile(path, names=[n for n in values if not is_feature(n)])
        results.append(Result(task.assignment, values, u.num_examples, u.loss, start=start, features=features))
    return results


@contextlib.contextmanager
def _startup_lock(workdir: Path):
    """An exclusive lock on the workdir (flock: released by the kernel if the process dies holding it)."""
    import fcntl
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "startup.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _member_name(manifest, a) -> str | None:
    """The family member an assignment trains (FedIN: the others' layers are its skip), or None."""
    member = manifest.member_of(a.skip) if a.skip else None
    return member.name if member else None


def _tested_layer(manifest, metrics: Mapping) -> int:
    """The last layer a round's model was tested through, from its stored metrics (a round recorded before
    eval_layer existed: its eval_block's last layer; none at all: the whole model's)."""
    if isinstance(metrics.get("eval_layer"), int):
        return metrics["eval_layer"]
    block = metrics.get("eval_block")
    return manifest.blocks[block].layers[-1] if isinstance(block, int) else len(manifest.layers) - 1


def _tested_text(manifest, layer: int) -> str:
    """'layers 0-1 and head boundary_heads.1': what a round's test ran."""
    return f"layers 0-{layer} and head {manifest.heads[manifest.head_for_boundary(layer)].name}"


def _assignments_text(manifest, assignments, listed: int = 12) -> str:
    """Who trains what: each device for a few, each distinct part and batch with its count for a fleet (a line
    per device would be 80 KB at 1,000 devices)."""
    if len(assignments) <= listed:
        return ", ".join(f"{a.device_id} {_part_text(manifest, a)} batch {a.batch_size}" for a in assignments)
    kinds = Counter(f"{_part_text(manifest, a)} batch {a.batch_size}" for a in assignments)
    return f"{len(assignments)} devices: " + ", ".join(f"{n} x {k}" for k, n in kinds.most_common())


def _part_text(manifest, a) -> str:
    """'layers 2-4', or a family's 'member small' (its span is the whole family, less the others' layers)."""
    member = _member_name(manifest, a)
    return f"member {member}" if member else f"layers {a.first}-{a.last}"


def _holdout_fraction(setting: float, personalized: bool) -> float:
    """[train] holdout_fraction: -1 (the default) is 0.2 for a personalised schedule, 0 for the others."""
    if setting < 0:
        return 0.2 if personalized else 0.0
    if not 0 <= setting <= MAX_HOLDOUT:
        raise ConfigError(f"train.holdout_fraction must be -1 (automatic) or in [0, {MAX_HOLDOUT}], not {setting}")
    return float(setting)


def _device_list(path: str) -> list[str]:
    """The fleet's device ids, from the file the broker's ACL is made from (coordinator/ops/broker_acl.py)."""
    from coordinator.ops.broker_acl import AclError, read_device_ids
    try:
        return read_device_ids(Path(path))
    except (AclError, OSError) as exc:
        raise ConfigError(f"devices_file: {exc}") from None


def _task_id(round_no: int, run_tag: str, device_id: str) -> str:
    """r<round>-<run>-<device>, within the protocol's 64 characters (a long device id is hashed)."""
    task_id = f"r{round_no}-{run_tag}-{device_id}"
    if len(task_id) > 64:
        import hashlib
        task_id = f"r{round_no}-{run_tag}-{hashlib.sha256(device_id.encode()).hexdigest()[:16]}"
    return task_id


def _test_set(eval_data: str, manifest, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """The data every round's global model is evaluated on, checked against the model before any round:
    a LocalDataset directory (inputs.npy, labels.npy) of the fleet's kind, or the Fashion-MNIST test set
    when the model takes Fashion-MNIST's shape and none is given."""
    from edge_runtime.train.datasets import FMNIST_MEAN, FMNIST_STD, load_fashion_mnist
    shape, classes = tuple(manifest.input_shape), manifest.num_classes
    if not eval_data:
        if shape != (1, 28, 28) or classes != 10:
            raise ConfigError(f"model {manifest.model} takes inputs of shape {shape} and {classes} classes, and the "
                             f"default evaluation set is Fashion-MNIST's (1, 28, 28), 10 classes: give the "
                             f"coordinator held-out data of the fleet's kind with --eval-data DIR (inputs.npy: "
                             f"float32 N x {' x '.join(map(str, shape))}, normalised like the devices' data; "
                             f"labels.npy: int64 in 0..{classes - 1})")
        log.info("evaluating on the Fashion-MNIST test set, normalised with mean %.4f and std %.4f: the devices' "
                 "data must be normalised alike (else give --eval-data)", FMNIST_MEAN, FMNIST_STD)
        x, y = load_fashion_mnist("test")
        return x[:samples], y[:samples]
    return _labeled_set(eval_data, manifest, samples, "eval_data")


def _labeled_set(folder: str, manifest, samples: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """The first `samples` rows of a LocalDataset directory (inputs.npy, labels.npy) that fits the model."""
    from edge_runtime.train.datasets import LocalDataset
    data = LocalDataset(Path(folder))
    if not data.labels_path.exists() or not data.inputs_path.exists():
        raise ConfigError(f"{what} {folder} is not a dataset directory (inputs.npy and labels.npy)")
    try:
        data.check(tuple(manifest.input_shape), manifest.num_classes)
    except EdgeRuntimeError as exc:
        raise ConfigError(f"{what}: {exc}") from None
    return np.load(data.inputs_path, mmap_mode="r")[:samples], data.labels()[:samples]


def check_settings(settings: dict) -> None:
    """What can be refused in a moment, before the broker is even asked (cli.run): an unknown model, and evaluation
    data that does not fit a model whose manifest is at hand (an export directory, or the workdir's installed
    model). A zoo or Python model's evaluation data is checked after its export, in Coordinator's start-up."""
    from edge_runtime.wire.manifest import Manifest
    s = settings["service"]
    try:
        source = sources.resolve(s["model"]) if s["model"] else None
    except EdgeRuntimeError as exc:
        raise ConfigError(str(exc)) from None
    installed = Path(s["workdir"]) / "model" / "manifest.json"
    manifest = Path(source.location) / "manifest.json" if source is not None and source.kind == "export" else \
        installed if source is None and installed.is_file() else None
    if manifest is not None:
        try:
            _test_set(s["eval_data"], Manifest.load(manifest), 1)
            if s["validation_data"]:
                _labeled_set(s["validation_data"], Manifest.load(manifest), 1, "validation_data")
        except EdgeRuntimeError as exc:
            raise ConfigError(str(exc)) from None


def _predictor(settings: dict, work: Path, model: GlobalModel):
    """The memory model the schedules fit parts with: the given profile, or one measured here once."""
    from edge_runtime.profiling.memory_model import Predictor
    from edge_runtime.profiling.profile_file import Profile, ProfileError
    given = settings["service"]["profile"]
    if given and not Path(given).exists():
        raise ConfigError(f"profile {given} does not exist (make one with `edge-profile measure`)")
    path = Path(given) if given else measured_profile(
        work, model.manifest.model, settings["train"]["batch_sizes"], settings["service"]["seed"],
        margin=settings["train"]["margin"], log=lambda text: log.info("no profile given: %s", text))
    profile = Profile.load(path)
    if profile.manifest_sha256 != model.manifest_sha:
        raise ProfileError(f"profile {path} was measured for another model export ({profile.model}, manifest "
                           f"{profile.manifest_sha256[:12]}…); measure this one with `edge-profile measure`")
    return Predictor.from_profile(model.manifest, profile)
