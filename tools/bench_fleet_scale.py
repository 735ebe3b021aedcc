#!/usr/bin/env python3
"""Benchmark: how the coordinator and the broker scale with the number of devices (simulation mode).

One run measures several fleet sizes N (default 25, 50, 100, 200, 400). For each N it
starts a fresh embedded Mosquitto, the real coordinator service as its own process
(fedavg or progressive on fmnist_cnn), and N simulated devices (`edge-sim`,
coordinator/local/simulation.py: the real agent and protocol, real blob fetches and
real updates of the trained part's size, only the training replaced by --compute-s of
waiting). The coordinator waits for all N devices and gives every one a task each
round. R rounds are measured (the coordinator is configured for R + 1 and stopped after
R, so that its peak is read while it is still alive).

Measured per round, then averaged over the R rounds:

  round wall       closed_at - opened_at, the coordinator's own timestamps (metrics.jsonl)
  round overhead   round wall - the simulated compute time: what a round costs beyond
                   training itself (tasks out, blob fetches, uploads, intake, aggregation;
                   runs before the coordinator tested each model beside the next round's
                   start also evaluated it here)
  dispatch         from the round's opening to the last of its N tasks passing through the
                   broker (a subscriber on device/+/task timestamps them; a task published
                   again to a device that reconnected counts at its first publication)
  close            from the last device's (first) ack at the broker (sent once its update's
                   blob is whole and judged) to the round's close: aggregating N updates,
                   storing the new weights (the new model's test runs after it, once
                   the next round's tasks are out)
  ack latency      per device, its first update message to its ack (95th percentile);
                   past the agent's 30 s ack timeout a device sends its update again
  CPU use          CPU seconds per second of the coordinator and of mosquitto over the
                   round (psutil, sampled every 0.2 s): 1.0 is one core busy throughout
  broker traffic   Mosquitto's own counters ($SYS/broker/bytes/received|sent and
                   publish/messages/received|sent, published every second by this
                   broker) over [opened_at, closed_at]: MB/s and PUBLISH messages/s, in
                   (clients to broker) and out (broker to clients)
  peaks            VmHWM from /proc/<pid>/status of the coordinator process and of the
                   mosquitto process, after the R rounds; the coordinator's at the
                   opening of round 1 is its start-up (torch, the test set, the model)

Ratios are against the smallest N of the same run. Everything runs on this one machine:
the simulated devices share its cores with the coordinator and the broker. Round time
grows faster than N: on 2 shared cores a round at N=100 took about 50 s, so the default
sizes take well over half an hour; --sizes picks fewer.

--topology compares set-ups at the same N (by default N = 400 and 1,000), each against
`core` at the same N, and each N against the smallest within a set-up:

  core       the sweep's set-up: one Mosquitto, one coordinator process
  sites      a core Mosquitto and two site Mosquittos bridged to it by the drop-in
             `edge-coordinator bridge` writes (coordinator/ops/broker_bridge.py; plain MQTT on
             loopback, no TLS); the coordinator and the bridges log in to the core through a
             listener with the product's password file and ACL (`edge-coordinator acl --site`);
             half the simulated devices log in to each site (an edge-sim per site)
  replicas   one Mosquitto, two coordinator replicas (processes) on one PostgreSQL database
             (coordinator/ops/postgres.py), sharing one workdir (coordinator/replicas.py)

with these numbers besides the sweep's (ack latency is then seen at the broker each device
logs in to, the site's under `sites`):

  transfer         round open to the last device's ack at the core broker, less the
                   simulated compute time and less dispatch: the time the round spends
                   moving blobs (the task's fetches down, the update up, granted a few at
                   a time: the update message now comes before its chunks) on its critical
                   path, with the coordinator's intake of them
  between          the previous round's close to this round's opening: storing the closed
                   round, cleaning up, planning and storing the new tasks (rounds after
                   the first)
  coordination     between + dispatch + close: what the coordinator adds around the
                   transfer
  overhead %       coordination / transfer, of the means over the rounds after the first
                   (target: < 10 % at 1,000 devices)
  bridge transit   a device's update message from its site broker to the core (95th percentile)
  store check      the state store (SQLite, or the replicas' PostgreSQL) read after the rounds:
                   one update per device and round, none recorded twice

    python tools/bench_fleet_scale.py --write-docs             # N = 25..400, fedavg: long (see below)
    python tools/bench_fleet_scale.py --quick                  # N = 10, 20, 2 rounds: checks the script
    python tools/bench_fleet_scale.py --sizes 50,100 --strategy progressive --compute-s 10
    python tools/bench_fleet_scale.py --topology core,sites,replicas --sizes 400,1000 --rounds 2 --write-docs
    python tools/bench_fleet_scale.py --quick --topology       # the three set-ups at N = 10, 20: checks the script
    python tools/bench_fleet_scale.py --report-only --write-docs --workdir DIR   # the run in DIR reported again

A set-up that closes no round within --timeout-s is reported as not finished, with what its
store and logs say (the open round's tasks by status, rejections by kind, dropped messages);
one that closed some rounds is measured on those. --ramp-s spreads each simulation process's
connections (1,000 devices connecting at once can lose one to a connect race, and the
coordinator then waits for it for ever).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from benchdocs import machine, write_section

REPO = Path(__file__).resolve().parent.parent
IMAGE = REPO / "docs" / "img" / "bench_fleet_scale.png"
TOPOLOGY_IMAGE = REPO / "docs" / "img" / "bench_fleet_scale_topology.png"
MB = 1 << 20
SYS_TOPICS = ("$SYS/broker/bytes/+", "$SYS/broker/publish/messages/+")
CONTROL_KINDS = ("task", "fetch", "update", "ack")
TOPOLOGIES = ("core", "sites", "replicas")
SITES = ("north", "south")              # the `sites` set-up's two site brokers
REPLICAS = ("a", "b")                   # the `replicas` set-up's two coordinator processes
COORDINATOR_USER = "coordinator"        # the coordinator's login on the core broker of `sites`
TARGET_PCT = 10.0                       # the coordination overhead's target, % of the transfer time


# -- the broker and what passes through it ----------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sys_broker(workdir: Path, more: str = "", login: tuple[Path, Path] | None = None):
    """The embedded broker, publishing its $SYS counters every second instead of every ten.

    more: config lines to add (a site's bridge). login: (password file, ACL file): a second listener on
    `login_port` that takes only logged-in clients under that ACL, as the product's core broker does; the
    first listener (`url`) stays anonymous and unrestricted, for the benchmark's own subscribers."""
    from coordinator.ops.broker import EmbeddedBroker

    class SysBroker(EmbeddedBroker):
        login_port = _free_port() if login else None

        def _config(self) -> str:
            text = super()._config() + "sys_interval 1\n"
            if login is not None:    # each listener its own security settings: the anonymous one, then this
                text = (f"per_listener_settings true\n{text}listener {self.login_port} {self.host}\n"
                        f"allow_anonymous false\npassword_file {login[0]}\nacl_file {login[1]}\n"
                        "use_username_as_clientid true\n")
            return text + more
    return SysBroker(workdir)


class Watcher:
    """A subscriber that timestamps Mosquitto's $SYS counters and the fleet's small control messages.

    It never subscribes to blob or upload chunks, so it adds a few small messages per device
    and round to what it measures. With sites=True it also keeps the sites' bridge states.
    """

    def __init__(self, host: str, port: int, fleet: str, name: str = "", sites: bool = False):
        import paho.mqtt.client as mqtt

        from coordinator.ops.broker_acl import site_state_topic
        from edge_runtime.wire.protocol import Topics
        self.counters: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self.control: list[tuple[float, str, str, dict]] = []     # (time, kind, device, message)
        self.site_states: dict[str, bytes] = {}
        self.topics = Topics(fleet)
        self._client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                                   client_id=f"bench-watcher-{fleet}{'-' + name if name else ''}")
        self._client.on_message = self._on_message
        self._client.connect(host, port)
        topics = [(t, 0) for t in SYS_TOPICS] + [(self.topics.all_devices(k), 0) for k in CONTROL_KINDS]
        self._client.subscribe(topics + ([(site_state_topic(self.topics, "+"), 0)] if sites else []))
        self._client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        now = time.time()
        try:
            if message.topic.startswith("$SYS/"):
                self.counters[message.topic.removeprefix("$SYS/broker/")].append((now, float(message.payload)))
                return
            if message.topic.startswith(f"{self.topics.root}/site/"):
                self.site_states[message.topic.split("/")[-2]] = message.payload
                return
            device, kind = self.topics.parse_device_topic(message.topic)
            body = json.loads(message.payload) if kind != "fetch" else {}
        except ValueError:   # a raised exception would stop paho's loop; nothing here is worth that
            return
        self.control.append((now, kind, device, body))

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def rate(self, counter: str, t0: float, t1: float) -> float:
        """Mean rate of a cumulative counter over [t0, t1], interpolated between its one-second samples."""
        samples = self.counters.get(counter, [])
        if len(samples) < 2 or t1 <= t0:
            return float("nan")
        ts, vs = np.array([s[0] for s in samples]), np.array([s[1] for s in samples])
        return float((np.interp(t1, ts, vs) - np.interp(t0, ts, vs)) / (t1 - t0))


# -- one set-up at one fleet size -------------------------------------------------------------

def _settings(args, work: Path, profile: Path, n: int) -> dict:
    rounds = args.rounds + 1      # one more than measured: the coordinator is still alive when its peak is read
    return {"service": {"workdir": str(work), "strategy": args.strategy, "profile": str(profile), "min_devices": n,
                        "round_deadline_s": args.deadline_s, "offline_grace_s": 30.0,
                        "eval_samples": args.eval_samples, "max_rounds": rounds, "seed": args.seed},
            "train": {"batch_sizes": [32, 64]},
            "fedavg": {"rounds": rounds},
            "progressive": {"shrink_rounds": 1, "min_rounds_per_block": 2, "max_rounds_per_block": 3,
                            "max_extra_blocks": 1}}


def _sim_command(args, broker_url: str, fleet: str, n: int, work: Path, prefix: str = "sim",
                 processes: int | None = None) -> list[str]:
    # the simulated boards yield this machine's CPU to the coordinator and the brokers (real boards have their own)
    niced = ["nice", "-n", str(args.sim_nice)] if args.sim_nice else []
    return niced + [sys.executable, "-m", "coordinator.local.simulation", "--broker", broker_url, "--fleet", fleet,
            "--devices", str(n), "--tier", args.tier, "--compute-s", str(args.compute_s),
            "--processes", str(args.processes if processes is None else processes), "--workdir", str(work),
            "--seed", str(args.seed), "--id-prefix", prefix, "--ramp-s", str(args.ramp_s)]


class Processes:
    """The coordinator's and the broker's VmHWM and CPU time, sampled in a thread as (time, peak, cpu s) series."""

    def __init__(self, pids: dict[str, int]):
        self.pids, self.series = pids, {name: [] for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self.read()

    def read(self) -> None:
        import psutil

        from edge_runtime.memory import peak_rss_bytes
        for name, pid in self.pids.items():
            try:
                cpu = psutil.Process(pid).cpu_times()
                self.series[name].append((time.time(), peak_rss_bytes(pid), cpu.user + cpu.system))
            except (OSError, ValueError, RuntimeError, psutil.Error):   # gone, or a zombie without VmHWM
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.read()

    def peak(self, name: str) -> int:
        return max((v for _, v, _ in self.series[name]), default=0)

    def before(self, name: str, t: float) -> int:
        return max((v for s, v, _ in self.series[name] if s <= t), default=0)

    def cpu_use(self, name: str, t0: float, t1: float) -> float:
        """CPU seconds per second over [t0, t1] (1.0 = one core busy all the time)."""
        samples = self.series[name]
        if len(samples) < 2 or t1 <= t0:
            return float("nan")
        ts, cpu = np.array([s[0] for s in samples]), np.array([s[2] for s in samples])
        return float((np.interp(t1, ts, cpu) - np.interp(t0, ts, cpu)) / (t1 - t0))


@dataclass
class Setup:
    """What one set-up runs at one fleet size: its brokers (the core first), where each group of simulated
    devices logs in, the watchers, and the coordinator processes' names."""
    topology: str
    brokers: dict = field(default_factory=dict)          # name: EmbeddedBroker ("broker" is the core)
    watchers: dict = field(default_factory=dict)         # broker name: Watcher
    groups: list = field(default_factory=list)           # (id prefix, broker name, devices)
    coordinators: dict = field(default_factory=dict)     # LocalFleet process name: [service] settings it adds
    coordinator_url: str = ""                            # where the coordinators log in
    service: dict = field(default_factory=dict)          # [service] settings the set-up adds
    postgres: object = None

    @property
    def edge(self) -> list[str]:
        """The brokers the devices log in to (their watchers see what the devices see)."""
        return sorted({broker for _, broker, _ in self.groups})

    def stop(self) -> None:
        for w in self.watchers.values():
            w.stop()
        for b in reversed(list(self.brokers.values())):
            b.stop()
        if self.postgres is not None:
            self.postgres.__exit__(None, None, None)     # stopped, its directory removed


def _groups(n: int, names: tuple[str, ...]) -> list[tuple[str, int]]:
    """n devices split as evenly as can be over the named groups."""
    return [(name, n // len(names) + (1 if i < n % len(names) else 0)) for i, name in enumerate(names)]


def start_setup(args, topology: str, work: Path, fleet: str, n: int, log) -> Setup:
    """Start the brokers (and PostgreSQL) of a set-up; the coordinators and devices come after."""
    setup = Setup(topology)
    try:
        if topology == "sites":
            _start_sites(args, setup, work, fleet, n, log)
        else:
            core = setup.brokers["broker"] = sys_broker(work / "broker").start()
            setup.watchers["broker"] = Watcher(core.host, core.port, fleet)
            setup.coordinator_url = core.url
            setup.groups = [("sim", "broker", n)]
            setup.coordinators = {"coordinator": {}}
        if topology == "replicas":
            from coordinator.ops.postgres import EmbeddedPostgres
            # a directory of its own: as root the server runs as `postgres`, which must own it
            setup.postgres = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="bench-fleet-pg-"))).start()
            setup.service = {"state": setup.postgres.new_database()}
            setup.coordinators = {f"replica-{r}": {"replica": r} for r in REPLICAS}
    except BaseException:
        setup.stop()
        raise
    return setup


def _start_sites(args, setup: Setup, work: Path, fleet: str, n: int, log) -> None:
    """The core broker with the product's login and ACL for the coordinator and the bridges, and a broker per
    site with the bridge `edge-coordinator bridge` writes; returns once both bridges say they are connected."""
    from coordinator.local.simulation import plan_devices
    from coordinator.ops.broker_acl import bridge_user, write_fleet_acl
    from coordinator.ops.broker_bridge import bridge_password, site_bridge_config
    groups = _groups(n, SITES)
    ids = {site: [d.device_id for d in plan_devices([args.tier], count, 0.0, site)] for site, count in groups}
    secrets = work / "secrets"
    subprocess.run(["bash", str(REPO / "deploy" / "mosquitto" / "make-secrets.sh"), "users", str(secrets),
                    COORDINATOR_USER, *(bridge_user(s) for s in SITES)], check=True, capture_output=True, timeout=60)
    acl = write_fleet_acl(work / "edgeblock.acl", fleet, [d for site in SITES for d in ids[site]], sites=ids)
    core = setup.brokers["broker"] = sys_broker(work / "broker", login=(secrets / "edgeblock.passwd", acl)).start()
    setup.watchers["broker"] = Watcher(core.host, core.port, fleet, sites=True)
    setup.coordinator_url = f"mqtt://{core.host}:{core.login_port}"
    setup.service = {"username": COORDINATOR_USER, "password_file": str(secrets / "passwords" / COORDINATOR_USER)}
    for site, count in groups:
        password = bridge_password(str(secrets / "passwords" / bridge_user(site)), site, setup.coordinator_url)
        bridge = site_bridge_config(fleet, site, setup.coordinator_url, ids[site], password)
        broker = setup.brokers[f"site-{site}"] = sys_broker(work / f"site-{site}", more=bridge).start()
        setup.watchers[f"site-{site}"] = Watcher(broker.host, broker.port, fleet, name=site)
        setup.groups.append((site, f"site-{site}", count))
    setup.coordinators = {"coordinator": {}}
    deadline = time.monotonic() + 60
    while any(setup.watchers["broker"].site_states.get(s) != b"1" for s in SITES):
        if time.monotonic() > deadline:
            raise SystemExit(f"sites, N={n}: the bridges did not connect within 60 s "
                             f"({setup.watchers['broker'].site_states}); see {work}/site-*/mosquitto.log")
        time.sleep(0.1)
    log(f"  sites: {', '.join(f'{s} {c} devices' for s, c in groups)}, both bridges connected")


def run_size(args, root: Path, profile: Path, n: int, log, topology: str = "core") -> dict:
    """One fleet of n simulated devices on a fresh set-up, until R rounds closed."""
    from coordinator.local.fleet import LocalFleet, read_metrics
    from edge_runtime.jobs.child import device_child_env
    work = root / (f"n{n}" if args.topology is None else f"{topology}-n{n}")
    shutil.rmtree(work, ignore_errors=True)
    fleet_name = f"scale-{n}"
    coordinator_dir = work / "coordinator"
    shutil.copytree(root / "model", coordinator_dir / "model")    # exported once for every size
    t0 = time.monotonic()
    setup = start_setup(args, topology, work, fleet_name, n, log)
    sims: list[subprocess.Popen] = []
    try:
        with LocalFleet(work, setup.coordinator_url, fleet=fleet_name) as fleet:
            settings = _settings(args, coordinator_dir, profile, n)
            settings["service"].update(setup.service)
            pids = {}
            for name, own in setup.coordinators.items():
                pids[name] = fleet.start_coordinator({**settings, "service": {**settings["service"], **own}}, name).pid
            processes = _split(args.processes, len(setup.groups))
            for (prefix, broker, count), p in zip(setup.groups, processes):
                with open(work / "logs" / f"sim-{prefix}.log", "ab") as out:
                    sims.append(subprocess.Popen(
                        _sim_command(args, setup.brokers[broker].url, fleet_name, count, work / "sim" / prefix,
                                     prefix, p),
                        stdout=out, stderr=subprocess.STDOUT, env=device_child_env(), start_new_session=True))
            procs = Processes({**pids, **{name: b.pid for name, b in setup.brokers.items()}})
            try:
                metrics = _wait_for_rounds(args, fleet, setup, coordinator_dir, n, t0, log, read_metrics)
            except SystemExit as exc:     # what the store and the logs say, read while PostgreSQL still runs
                procs.stop()
                raise Unfinished(str(exc), unfinished_evidence(work, coordinator_dir, setup)) from None
            procs.stop()
            _stop_sims(sims)
            store = store_check(coordinator_dir, [m["round"] for m in metrics[:args.rounds]])
    finally:
        _stop_sims(sims)
        setup.stop()
    logs = {name: (work / "logs" / f"{name}.log") for name in setup.coordinators}
    result = summarize(args, n, metrics[:args.rounds], setup, procs, work / "sim", time.monotonic() - t0)
    result.update(topology=topology, store=store, intake={name: _accepted_in_log(p) for name, p in logs.items()},
                  link_dropped={name: _link_dropped(p) for name, p in logs.items()})
    freed = free_disk(work)
    log(f"  {topology} N={n}: measured; {freed / 2**30:.1f} GiB of device state and blobs removed (logs, shards, "
        f"metrics and the store kept)")
    return result


def free_disk(work: Path) -> int:
    """Remove what a measured set-up no longer needs: the simulated devices' state (their blobs and uploads) and
    the coordinator's blobs, 12-13 GB at 1,000 devices, which left in place filled this machine's disk four
    set-ups later. What a report or a post-mortem reads stays: logs, the simulation's shards, metrics.jsonl,
    the state store. Bytes removed."""
    doomed = [*work.glob("sim/*/devices"), *work.glob("coordinator/blobs"), *work.glob("coordinator/incoming")]
    sizes = {}                       # by inode: a device's model files are hard links into its blobs
    for d in doomed:
        for f in d.rglob("*"):
            if f.is_file() and not f.is_symlink():
                st = f.stat()
                sizes[st.st_dev, st.st_ino] = st.st_size
        shutil.rmtree(d, ignore_errors=True)
    return sum(sizes.values())


class Unfinished(SystemExit):
    """A set-up that closed no round in time (or whose coordinator exited); `evidence` says what went on."""

    def __init__(self, message: str, evidence: dict):
        super().__init__(message)
        self.evidence = evidence


def unfinished_evidence(work: Path, coordinator_dir: Path, setup: Setup) -> dict:
    """The open round's tasks by status and their commonest failure, the rejections by kind, the coordinators'
    dropped messages, and the clients a broker said it dropped messages for."""
    import re
    from collections import Counter

    from coordinator.state_store import run_store
    evidence: dict = {"link_dropped": {name: _link_dropped(work / "logs" / f"{name}.log")
                                       for name in setup.coordinators}}
    try:
        store = run_store(coordinator_dir)
    except Exception as exc:   # no store yet: the coordinator never started
        return {**evidence, "store": str(exc)}
    try:
        row = store.current_round()
        tasks = store.tasks(row.round) if row is not None else []
        reasons = Counter(re.sub(r"[0-9a-f]{12,}\S*", "<blob>", t.reason or "") for t in tasks if t.status == "failed")
        evidence.update(round=row.round if row is not None else None,
                        tasks=dict(Counter(t.status for t in tasks)), rejections=store.rejection_totals(),
                        failure=reasons.most_common(1)[0] if reasons else None)
    finally:
        store.close()
    evidence["broker_dropped_for"] = {
        name: sorted(set(re.findall(r"Outgoing messages are being dropped for client (\S+?)\.?$",
                                    b.log_path.read_text(errors="replace"), re.M)))
        for name, b in setup.brokers.items() if b.log_path.exists()}
    return evidence


def _evidence_text(e: dict) -> str:
    """An unfinished set-up's evidence, in one sentence."""
    if "tasks" not in e:
        return f"no state store ({e.get('store', '')})"
    parts = [f"round {e['round']}: tasks " + ", ".join(f"{k} {v}" for k, v in sorted(e["tasks"].items()))]
    if e.get("failure"):
        parts.append(f"the commonest failure ({e['failure'][1]}x): \"{e['failure'][0]}\"")
    parts.append("rejections " + (", ".join(f"{k} {v}" for k, v in e["rejections"].items() if v) or "none"))
    parts.append(f"messages the coordinator's link dropped (at least) {sum(e['link_dropped'].values())}")
    dropped = {b: c for b, c in e.get("broker_dropped_for", {}).items() if c}
    parts.append("brokers that said they dropped outgoing messages: "
                 + ("; ".join(f"{b} for {', '.join(c)}" for b, c in dropped.items()) or "none"))
    return "; ".join(parts)


def _split(processes: int, groups: int) -> list[int]:
    """--processes over the groups of devices (0: edge-sim's default, one process per 100 devices)."""
    if not processes:
        return [0] * groups
    return [max(1, processes // groups + (1 if i < processes % groups else 0)) for i in range(groups)]


def _wait_for_rounds(args, fleet, setup: Setup, coordinator_dir: Path, n: int, t0: float, log,
                     read_metrics) -> list[dict]:
    deadline = time.monotonic() + args.timeout_s
    seen = 0
    while True:
        metrics = read_metrics(coordinator_dir)
        for m in metrics[seen:]:
            log(f"  {setup.topology} N={n} round {m['round']}: {m['updates']} of {len(m['devices'])} update(s), "
                f"{m['closed_at'] - m['opened_at']:.1f} s ({time.monotonic() - t0:.0f} s)")
        seen = len(metrics)
        if len(metrics) >= args.rounds:
            return metrics
        exited = [name for name in setup.coordinators if fleet.procs[name].poll() is not None]
        if metrics and not exited and time.monotonic() > deadline:   # what closed is measured, and says so
            log(f"  {setup.topology} N={n}: --timeout-s {args.timeout_s:g} reached; measuring the {len(metrics)} "
                f"round(s) closed")
            return metrics
        if exited or time.monotonic() > deadline:
            tails = "\n".join(f"--- {name}\n{fleet.log_tail(name)}" for name in setup.coordinators)
            raise SystemExit(f"{setup.topology} N={n}: {len(metrics)} of {args.rounds} round(s) after "
                             f"{time.monotonic() - t0:.0f} s{'; exited: ' + ', '.join(exited) if exited else ''}\n"
                             f"{tails}")
        time.sleep(0.5)


def _stop_sims(sims: list[subprocess.Popen]) -> None:
    """SIGTERM every edge-sim at once (each stops its processes and their devices), SIGKILL a group that hangs."""
    for sim in sims:
        if sim.poll() is None:
            sim.send_signal(signal.SIGTERM)
    for sim in sims:
        try:
            sim.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(sim.pid, signal.SIGKILL)
            sim.wait()


def store_check(coordinator_dir: Path, rounds: list[int]) -> dict:
    """The measured rounds as the state store holds them (SQLite, or the replicas' PostgreSQL named by the
    workdir's state.url, read-only): updates recorded, and how many repeat a device's update in a round."""
    from coordinator.state_store import run_store
    store = run_store(coordinator_dir)
    try:
        rows = [(r, u.device_id) for r in rounds for u in store.updates(r)]
        tasks = sum(len(store.tasks(r)) for r in rounds)
        rejections = store.rejection_totals()
        leader = (store.lease("leader") or {}).get("holder") if store.shared else None
        where = "PostgreSQL" if store.shared else "SQLite"
    finally:
        store.close()
    return {"updates": len(rows), "duplicates": len(rows) - len(set(rows)), "tasks": tasks, "leader": leader,
            "where": where, "rejections": rejections}


def _accepted_in_log(path: Path) -> int:
    """Updates this coordinator process accepted, by its log (with replicas: its share of the intake)."""
    if not path.exists():
        return 0
    with open(path, errors="replace") as f:
        return sum(1 for line in f if "update from " in line and " accepted (" in line)


def _link_dropped(path: Path) -> int:
    """Messages this coordinator's MQTT link dropped (oversize, or its inbox full), by its log: the link logs the
    first and every thousandth, so this is a lower bound."""
    if not path.exists():
        return 0
    dropped = 0
    with open(path, errors="replace") as f:
        for line in f:
            if ": dropped " in line and " message(s) so far" in line:
                dropped = max(dropped, int(line.split(": dropped ", 1)[1].split()[0]))
    return dropped


# -- what a size measured ---------------------------------------------------------------------

def _round_of_task(task_id: str) -> int:
    return int(task_id.split("-", 1)[0][1:])


def _firsts(control: list, r: int) -> tuple[dict, dict, dict]:
    """Per device: its first update message of round r, its first ack, and its number of update messages."""
    first_update, acks, updates = {}, {}, defaultdict(int)
    for t, kind, device, body in control:
        if kind == "update" and body.get("round") == r:
            first_update.setdefault(device, t)
            updates[device] += 1
        elif kind == "ack" and body.get("type") == "ack" and _round_of_task(body["task_id"]) == r:   # not a resend
            acks.setdefault(device, t)
    return first_update, acks, updates


def _p95(values: list[float]) -> float:
    return float(np.percentile(values, 95)) if values else float("nan")


def round_numbers(args, m: dict, setup: Setup, procs: Processes, previous_close: float | None = None) -> dict:
    """One round's timings and traffic (see the module's docstring for the definitions); previous_close: the
    closed_at of the round before (None for the first)."""
    r, t0, t1 = m["round"], m["opened_at"], m["closed_at"]
    between = t0 - previous_close if previous_close is not None else float("nan")
    core = setup.watchers["broker"]
    first_task: dict[str, float] = {}     # a task published again (a device that reconnected) is not dispatch
    for t, kind, device, body in core.control:
        if kind == "task" and body.get("round") == r:
            first_task.setdefault(device, t)
    tasks = list(first_task.values())
    first_update, core_acks, updates = _firsts(core.control, r)
    edge_update, acks = {}, {}       # seen at the brokers the devices log in to (the core, or their site's)
    for name in setup.edge:
        u, a, _ = _firsts(setup.watchers[name].control, r)
        edge_update.update(u)
        acks.update(a)
    fetches = sum(1 for t, kind, _, _ in core.control if kind == "fetch" and t0 <= t <= t1)
    latency = [acks[d] - edge_update[d] for d in edge_update if d in acks]
    last_ack = max((core_acks[d] for d in first_update if d in core_acks), default=float("nan"))
    dispatch = max(tasks) - t0 if tasks else float("nan")
    n = len(m["devices"])
    sites = [name for name in setup.edge if name != "broker"]
    transfer = last_ack - t0 - args.compute_s - dispatch
    return {"round": r, "wall_s": t1 - t0, "overhead_s": t1 - t0 - args.compute_s,
            "between_s": between, "dispatch_s": dispatch, "close_s": t1 - last_ack, "transfer_s": transfer,
            # a round after another: what the coordinator adds, counted from the previous round's close
            "coordination_s": between + dispatch + t1 - last_ack,
            "steady_transfer_s": transfer if np.isfinite(between) else float("nan"),
            "coordinator_cpu": sum(procs.cpu_use(c, t0, t1) for c in setup.coordinators),
            "broker_cpu": procs.cpu_use("broker", t0, t1),
            "sites_cpu": sum(procs.cpu_use(s, t0, t1) for s in sites) if sites else float("nan"),
            "ack_p95_s": _p95(latency),
            "bridge_p95_s": _p95([first_update[d] - edge_update[d] for d in edge_update if d in first_update])
            if sites else float("nan"),
            "accepted": sum(1 for row in m["devices"].values() if row["status"] == "accepted"), "tasks": n,
            "rejected": m["rejected"], "fetches_per_device": fetches / max(1, n),
            "updates_per_device": sum(updates.values()) / max(1, n),
            "mb_in_s": core.rate("bytes/received", t0, t1) / MB, "mb_out_s": core.rate("bytes/sent", t0, t1) / MB,
            "msgs_in_s": core.rate("publish/messages/received", t0, t1),
            "msgs_out_s": core.rate("publish/messages/sent", t0, t1),
            "site_mb_in_s": sum(setup.watchers[s].rate("bytes/received", t0, t1) for s in sites) / MB
            if sites else float("nan"),
            "up_mb": sum(row.get("uploaded_bytes", 0) for row in m["devices"].values()) / MB,
            "down_mb": sum(row.get("downloaded_bytes", 0) for row in m["devices"].values()) / MB}


def _mean(values: list[float]) -> float:
    """The mean of the finite values; nan when there are none (a number this set-up does not have)."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def summarize(args, n: int, metrics: list[dict], setup: Setup, procs: Processes, sim_dir: Path,
              seconds: float) -> dict:
    rounds = [round_numbers(args, m, setup, procs, metrics[i - 1]["closed_at"] if i else None)
              for i, m in enumerate(metrics)]
    shards = [json.loads(p.read_text()) for p in sorted(sim_dir.glob("**/shard-*.json"))]
    mean = {k: _mean([r[k] for r in rounds]) for k in rounds[0] if k != "round"}
    peaks = {name: procs.peak(name) / MB for name in procs.pids}
    return {"n": n, "rounds": rounds, "mean": mean, "seconds": seconds,
            "accepted": sum(r["accepted"] for r in rounds), "expected": n * len(rounds),
            "peaks_mb": peaks,
            "coordinator_peak_mb": max(peaks[c] for c in setup.coordinators),
            "coordinator_startup_mb": max(procs.before(c, metrics[0]["opened_at"]) for c in setup.coordinators) / MB,
            "broker_peak_mb": peaks["broker"],
            "sim_processes": len(shards),
            "sim_peak_mb": max((s["peak_rss_bytes"] for s in shards), default=0) / MB,
            "sim_mb_per_device": max((s["peak_rss_bytes"] / max(1, s["devices"]) for s in shards), default=0) / MB}


# -- report -----------------------------------------------------------------------------------

ROWS = [  # (key in a size's result, label, format)
    ("wall_s", "round wall, s", "{:.1f}"),
    ("overhead_s", "round overhead (wall - compute), s", "{:.1f}"),
    ("dispatch_s", "dispatch (open to last task out), s", "{:.2f}"),
    ("close_s", "close (last ack to round closed: aggregate, store, evaluate), s", "{:.2f}"),
    ("ack_p95_s", "ack latency p95, s", "{:.2f}"),
    ("coordinator_cpu", "coordinator CPU use in the round (1 = a core)", "{:.2f}"),
    ("broker_cpu", "broker CPU use in the round", "{:.2f}"),
    ("mb_in_s", "broker MB/s in", "{:.1f}"),
    ("mb_out_s", "broker MB/s out", "{:.1f}"),
    ("msgs_in_s", "broker PUBLISH/s in", "{:.0f}"),
    ("msgs_out_s", "broker PUBLISH/s out", "{:.0f}"),
    ("fetches_per_device", "fetch requests per device-round", "{:.1f}"),
    ("updates_per_device", "update messages per device-round", "{:.2f}"),
    ("coordinator_peak_mb", "coordinator peak RSS, MB", "{:.0f}"),
    ("coordinator_growth_mb", "coordinator peak - start-up, MB", "{:.0f}"),
    ("broker_peak_mb", "broker peak RSS, MB", "{:.1f}"),
    ("sim_mb_per_device", "simulation MB per device", "{:.1f}"),
]

TOPOLOGY_ROWS = [  # the same, for the set-ups side by side; "-" where a set-up has no such thing
    ("wall_s", "round wall, s", "{:.1f}"),
    ("overhead_s", "round overhead (wall - compute), s", "{:.1f}"),
    ("transfer_s", "transfer (open to last ack at the core - compute - dispatch), s", "{:.1f}"),
    ("dispatch_s", "dispatch (open to last task out), s", "{:.2f}"),
    ("close_s", "close (last ack to round closed: aggregate, store), s", "{:.2f}"),
    ("between_s", "between rounds (previous close to open: store, clean up, plan), s", "{:.2f}"),
    ("coordination_s", "coordination overhead (between + dispatch + close; rounds after the first), s", "{:.2f}"),
    ("steady_transfer_s", "transfer in the rounds after the first, s", "{:.1f}"),
    ("overhead_pct", "coordination overhead / transfer, %", "{:.1f}"),
    ("ack_p95_s", "ack latency p95 at the device's broker, s", "{:.2f}"),
    ("bridge_p95_s", "bridge transit p95 (update, site to core), s", "{:.2f}"),
    ("coordinator_cpu", "coordinator CPU use in the round, all processes (1 = a core)", "{:.2f}"),
    ("broker_cpu", "core broker CPU use in the round", "{:.2f}"),
    ("sites_cpu", "site brokers' CPU use in the round, both", "{:.2f}"),
    ("mb_in_s", "core broker MB/s in", "{:.1f}"),
    ("mb_out_s", "core broker MB/s out", "{:.1f}"),
    ("msgs_in_s", "core broker PUBLISH/s in", "{:.0f}"),
    ("msgs_out_s", "core broker PUBLISH/s out", "{:.0f}"),
    ("site_mb_in_s", "site brokers' MB/s in, both", "{:.1f}"),
    ("fetches_per_device", "fetch requests per device-round", "{:.1f}"),
    ("updates_per_device", "update messages per device-round", "{:.2f}"),
    ("coordinator_peak_mb", "coordinator peak RSS, MB (the larger replica's)", "{:.0f}"),
    ("coordinator_growth_mb", "coordinator peak - start-up, MB", "{:.0f}"),
    ("broker_peak_mb", "core broker peak RSS, MB", "{:.1f}"),
    ("sites_peak_mb", "site broker peak RSS, MB (the larger site's)", "{:.1f}"),
    ("sim_mb_per_device", "simulation MB per device", "{:.1f}"),
]
SCALING_ROWS = ("wall_s", "transfer_s", "coordination_s", "overhead_pct", "ack_p95_s", "coordinator_cpu",
                "coordinator_peak_mb", "coordinator_growth_mb", "broker_peak_mb", "sites_peak_mb")


def value(result: dict, key: str) -> float:
    if key == "coordinator_growth_mb":
        return result["coordinator_peak_mb"] - result["coordinator_startup_mb"]
    if key == "steady_transfer_s":    # a run before between_s was measured: over all its rounds
        return result["mean"].get(key, result["mean"]["transfer_s"])
    if key == "overhead_pct":     # of the means over the rounds after the first
        transfer = value(result, "steady_transfer_s")
        return 100 * result["mean"]["coordination_s"] / transfer if transfer > 0 else float("nan")
    if key == "sites_peak_mb":
        sites = [v for name, v in result["peaks_mb"].items() if name.startswith("site-")]
        return max(sites) if sites else float("nan")
    return result["mean"][key] if key in result["mean"] else result[key]


def exponent(results: list[dict], key: str) -> float:
    """k in value ~ N^k between the smallest and the largest N."""
    a, b = results[0], results[-1]
    va, vb = value(a, key), value(b, key)
    if not (va > 0 and vb > 0) or a["n"] == b["n"]:
        return float("nan")
    return float(np.log(vb / va) / np.log(b["n"] / a["n"]))


def _header(args, minutes: float, load: tuple[float, float]) -> str:
    return (f"Command: `.venv/bin/python tools/bench_fleet_scale.py {args.command}` ({minutes:.0f} min on "
            f"{machine()}; 1-min load average {load[0]:.1f} at start, {load[1]:.1f} at end).")


def _fleet_text(args) -> str:
    from coordinator.strategies.aggregation import AggregationSettings
    ramp = f", each process connecting its devices over {args.ramp_s:g} s" if args.ramp_s else ""
    return (f"the real coordinator service as a process ({args.strategy} on fmnist_cnn, aggregation rule "
            f"{AggregationSettings().rule} (the default), every device in every round, evaluation on "
            f"{args.eval_samples} test images), and N simulated devices of tier {args.tier} (`edge-sim`: the real "
            f"agent and protocol, real fetches, real updates of the trained part's size; training replaced by "
            f"{args.compute_s:g} s of waiting), spread over processes of up to 100 devices{ramp}. Means over "
            f"{args.rounds} rounds (the first one fetches the graphs too). All processes share this machine's "
            f"cores{_nice_text(args)}.")


def _nice_text(args) -> str:
    if not args.sim_nice:
        return ", evenly"
    return (f"; the simulation processes run at nice {args.sim_nice}, so the coordinator and the brokers get the "
            f"CPU whenever they need it, as on a fleet whose boards compute on their own")


def section(args, results: list[dict], minutes: float, load: tuple[float, float]) -> str:
    base = results[0]
    head = "| | " + " | ".join(f"N={r['n']}" for r in results) + f" | N^k, k ({base['n']}->{results[-1]['n']}) |"
    lines = [
        "## Coordinator and broker at fleet scale, simulated devices (bench_fleet_scale)",
        "",
        _header(args, minutes, load),
        "",
        f"Per fleet size N: a fresh Mosquitto (embedded broker), {_fleet_text(args)}",
        "",
        "Definitions: *round wall* = the coordinator's closed_at - opened_at; *round overhead* = round wall - the "
        "simulated compute time; *dispatch* = round open to the last task seen at the broker; *close* = the last "
        "device's first update seen at the broker to the round's close (the coordinator's queue of messages before "
        "it, judging it, aggregating, storing, evaluating), of which *after the last ack* leaves the queue out; "
        "*ack latency* = a device's first update to its ack (the agent sends again after 30 s); *CPU use* = CPU "
        "seconds per second of the process over the round; *broker* rates = Mosquitto's $SYS counters (bytes and "
        "PUBLISH messages, all clients) over the round; *peaks* = VmHWM of the process (/proc/<pid>/status) after "
        "the rounds; start-up = the coordinator's VmHWM when round 1 opened.",
        "",
        head,
        "|---|" + "---:|" * (len(results) + 1),
    ]
    for key, label, fmt in ROWS:
        cells = []
        for r in results:
            v, v0 = value(r, key), value(base, key)
            ratio = f" (x{v / v0:.2f})" if r is not base and v0 and np.isfinite(v0) and v0 > 0 else ""
            cells.append(fmt.format(v) + ratio)
        k = exponent(results, key)
        lines.append(f"| {label} | " + " | ".join(cells) + (f" | {k:.2f} |" if np.isfinite(k) else " | - |"))
    lines += [
        "| updates accepted / tasks | " + " | ".join(f"{r['accepted']} / {r['expected']}" for r in results) + " | |",
        "| MB up + down per round, all devices | "
        + " | ".join(f"{r['mean']['up_mb'] + r['mean']['down_mb']:.0f}" for r in results) + " | |",
        "",
        "Ratios in brackets are against N=" + str(base["n"]) + "; k = log(value ratio) / log(N ratio) between the "
        "smallest and the largest N (1 = linear in the fleet size).",
        "",
        "![round times, broker throughput and peaks against N](img/bench_fleet_scale.png)",
        "",
    ]
    return "\n".join(lines)


def _cell(v: float, fmt: str, ratio: float | None = None) -> str:
    if not np.isfinite(v):
        return "-"
    return fmt.format(v) + (f" (x{ratio:.2f})" if ratio is not None and np.isfinite(ratio) else "")


def _by(results: list[dict]) -> dict[tuple[str, int], dict]:
    """The set-ups and sizes that finished, by (set-up, N)."""
    return {(r["topology"], r["n"]): r for r in results if "failed" not in r}


def topology_section(args, results: list[dict], minutes: float, load: tuple[float, float]) -> str:
    """The set-ups side by side per N (ratios against core at that N), how each scales from the smallest N, and
    the targets' verdicts."""
    topologies = list(dict.fromkeys(r["topology"] for r in results))
    by = _by(results)
    sizes = sorted({n for _, n in by})
    cols = [(t, n) for n in sizes for t in topologies if (t, n) in by]
    lines = [
        "## Set-ups at fleet scale: one core broker or two bridged sites, one coordinator or two replicas "
        "(bench_fleet_scale --topology)",
        "",
        _header(args, minutes, load) + " Other work may have shared the machine: read the ratios within this "
        "run, not the absolute times against other runs.",
        "",
        f"Per set-up and fleet size N: fresh brokers, {_fleet_text(args)} The set-ups: *core* = one Mosquitto "
        f"(embedded broker) and one coordinator process; *sites* = a core Mosquitto and two site Mosquittos "
        f"bridged to it by the drop-in `edge-coordinator bridge` writes (the product's bridge topics, QoS 1, MQTT "
        f"5; plain MQTT on loopback, no TLS), the coordinator and the two bridges logging in to the core with "
        f"passwords under the ACL `edge-coordinator acl --site` writes, half the devices on each site (anonymous: "
        f"`edge-sim` has no login); *replicas* = one Mosquitto and two coordinator replicas (processes) on one "
        f"PostgreSQL database (a local server, fsync off), sharing one workdir, the device topics shared between "
        f"them by the broker.",
        "",
        "Definitions: *round wall* = the coordinator's closed_at - opened_at; *dispatch* = round open to the last "
        "device's (first) task seen at the core broker; *transfer* = round open to the last device's ack seen at "
        "the core broker (sent once its update's blob is whole and judged: uploads are granted a few at a time, so the update "
        "message comes before its chunks), less the simulated compute time, less dispatch: the time the round "
        "spends moving blobs (the task's fetches down, the update up) on its critical path, with the "
        "coordinator's intake; *close* = that last ack to the round's close (aggregating, storing; the new model "
        "is tested after it, once the next round's tasks are out); *between rounds* = the previous round's close to this round's opening (storing the closed round, "
        "cleaning up, planning and storing the new tasks; none before the first round); *coordination overhead* = "
        "between + dispatch + close, and its share of the transfer is taken of the means over the rounds after "
        "the first (which also fetches the graphs and has no round before it); *ack latency* = a device's first "
        "update message to its ack, both seen at the broker the device logs in to (its site's under *sites*); *bridge transit* = an update message's arrival at its site "
        "broker to its arrival at the core; *CPU use* = CPU seconds per second of the process(es) over the round; "
        "*broker* rates = Mosquitto's $SYS counters (all clients) over the round; *peaks* = VmHWM "
        "(/proc/<pid>/status) over the run, of each coordinator process and each broker; start-up = the "
        "coordinator's VmHWM when round 1 opened. *Store* = the state store read after the rounds (SQLite, or "
        "the replicas' PostgreSQL, read-only): updates recorded for the measured rounds, and how many repeat a "
        "device's update within a round.",
        "",
        "| | " + " | ".join(f"{t} N={n}" + (f" ({len(by[t, n]['rounds'])} round(s))"
                                             if len(by[t, n]["rounds"]) < args.rounds else "") for t, n in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for key, label, fmt in TOPOLOGY_ROWS:
        cells = []
        for t, n in cols:
            v = value(by[t, n], key)
            v0 = value(by["core", n], key) if ("core", n) in by and t != "core" else float("nan")
            cells.append(_cell(v, fmt, v / v0 if v0 > 0 else None))
        if any(c != "-" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "| coordinator peak RSS per process, MB | " + " | ".join(
            " / ".join(f"{name.removeprefix('replica-')} {by[c]['peaks_mb'][name]:.0f}"
                       for name in by[c]["peaks_mb"] if name == "coordinator" or name.startswith("replica-"))
            for c in cols) + " |",
        "| site broker peak RSS per site, MB | " + " | ".join(
            " / ".join(f"{name.removeprefix('site-')} {v:.0f}" for name, v in by[c]["peaks_mb"].items()
                       if name.startswith("site-")) or "-" for c in cols) + " |",
        "| update acceptances logged by each replica (all rounds run; both log one taken twice) | " + " | ".join(
            " / ".join(f"{name.removeprefix('replica-')} {v}" for name, v in by[c]["intake"].items())
            if len(by[c]["intake"]) > 1 else "-" for c in cols) + " |",
        "| updates accepted / tasks (round metrics) | " + " | ".join(
            f"{by[c]['accepted']} / {by[c]['expected']}" for c in cols) + " |",
        "| store: updates recorded / device-rounds recorded twice | " + " | ".join(
            f"{by[c]['store']['updates']} / {by[c]['store']['duplicates']}" for c in cols) + " |",
        "| messages the coordinator's MQTT link dropped, inbox full (its log, whole run, at least) | " + " | ".join(
            str(sum(by[c]["link_dropped"].values())) for c in cols) + " |",
        "| rejections stored, by kind (whole run) | " + " | ".join(
            ", ".join(f"{kind} {count}" for kind, count in by[c]["store"]["rejections"].items() if count) or "0"
            for c in cols) + " |",
        "| MB up + down per round, all devices | " + " | ".join(
            f"{by[c]['mean']['up_mb'] + by[c]['mean']['down_mb']:.0f}" for c in cols) + " |",
        "",
        "Ratios in brackets are against *core* at the same N.",
        "",
    ]
    lines += [f"Did not finish: {r['failed'].splitlines()[0]}"
              + (f" ({_evidence_text(r['evidence'])})." if r.get("evidence") else ".") + "\n"
              for r in results if "failed" in r]
    if len(sizes) > 1:
        lines += _scaling_table(topologies, sizes, by)
    if by:    # at every N run, a set-up that closed no round included
        lines += _verdicts(topologies, sorted({r["n"] for r in results}), by)
    lines += ["", "![round time by part, overhead share and peaks per set-up](img/bench_fleet_scale_topology.png)",
              ""]
    return "\n".join(lines)


def _scaling_table(topologies: list[str], sizes: list[int], by: dict) -> list[str]:
    """Each N against the smallest within each set-up: the ratio and k = log(ratio) / log(N ratio)."""
    n0 = sizes[0]
    cols = [(t, n) for n in sizes[1:] for t in topologies if (t, n) in by and (t, n0) in by]
    lines = [f"Within each set-up, N against N={n0}: ratio, and k = log(value ratio) / log(N ratio) "
             "(1 = linear in the fleet size, below 1 sub-linear).", "",
             "| | " + " | ".join(f"{t} N={n}/{n0}" for t, n in cols) + " |", "|---|" + "---:|" * len(cols)]
    labels = {key: label for key, label, _ in TOPOLOGY_ROWS}
    for key in SCALING_ROWS:
        cells = []
        for t, n in cols:
            v, v0 = value(by[t, n], key), value(by[t, n0], key)
            cells.append(f"x{v / v0:.2f}, k {np.log(v / v0) / np.log(n / n0):.2f}"
                         if v > 0 and v0 > 0 and np.isfinite(v) and np.isfinite(v0) else "-")
        if any(c != "-" for c in cells):
            lines.append(f"| {labels[key]} | " + " | ".join(cells) + " |")
    return lines + [""]


def _verdicts(topologies: list[str], sizes: list[int], by: dict) -> list[str]:
    """The issue's targets per set-up: the overhead under 10 % of the transfer at the largest N, and the
    coordinator's peak RSS growing sub-linearly between the smallest and the largest N. A set-up that closed
    no round at the largest N meets neither: nothing was measured there."""
    n0, n1 = sizes[0], sizes[-1]
    lines = [f"Targets: coordination overhead below {TARGET_PCT:g} % of the transfer time at N={n1}; the "
             f"coordinator's peak RSS growing sub-linearly with N (k < 1, N={n0} -> {n1}).", "",
             f"| set-up | transfer at N={n1}, s | coordination overhead, s | overhead / transfer | "
             f"below {TARGET_PCT:g} %? | coordinator peak k | sub-linear? | k of peak - start-up |",
             "|---|---:|---:|---:|---|---:|---|---:|"]
    for t in topologies:
        if (t, n1) not in by:
            lines.append(f"| {t} | - | - | - | no: no round closed | - | not measured | - |")
            continue
        r = by[t, n1]
        pct = value(r, "overhead_pct")
        ks = [np.log(value(r, key) / value(by[t, n0], key)) / np.log(n1 / n0)
              if (t, n0) in by and n1 != n0 and value(r, key) > 0 and value(by[t, n0], key) > 0 else float("nan")
              for key in ("coordinator_peak_mb", "coordinator_growth_mb")]
        lines.append(f"| {t} | {value(r, 'steady_transfer_s'):.1f} | {value(r, 'coordination_s'):.2f} | {pct:.1f} % | "
                     f"{'yes' if pct < TARGET_PCT else 'no'} | " + (f"{ks[0]:.2f} | {'yes' if ks[0] < 1 else 'no'}"
                                                                    if np.isfinite(ks[0]) else "- | -")
                     + (f" | {ks[1]:.2f} |" if np.isfinite(ks[1]) else " | - |"))
    return lines


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ns = [r["n"] for r in results]
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.4))
    for key, label in (("wall_s", "round wall"), ("overhead_s", "round overhead"), ("close_s", "close"),
                       ("dispatch_s", "dispatch"),
                       ("ack_p95_s", "ack latency p95")):
        ax[0].plot(ns, [value(r, key) for r in results], marker="o", label=label)
    ax[0].set(xscale="log", yscale="log", xlabel="devices N", ylabel="s", title="per round")
    for key, label in (("mb_in_s", "MB/s in"), ("mb_out_s", "MB/s out")):
        ax[1].plot(ns, [value(r, key) for r in results], marker="o", label=label)
    ax[1].set(xscale="log", xlabel="devices N", ylabel="MB/s", title="broker throughput during rounds", ylim=(0, None))
    for key, label in (("coordinator_peak_mb", "coordinator"), ("coordinator_growth_mb", "coordinator - start-up"),
                       ("broker_peak_mb", "broker"), ("sim_peak_mb", "one simulation process")):
        ax[2].plot(ns, [value(r, key) for r in results], marker="o", label=label)
    ax[2].set(xscale="log", xlabel="devices N", ylabel="MB", title="peak RSS (VmHWM)")
    for a in ax:
        a.set_xticks(ns, [str(n) for n in ns])
        a.minorticks_off()
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


def plot_topologies(results: list[dict], path: Path) -> None:
    """Per set-up and N: the round wall by part, the overhead's share of the transfer, and the peaks."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    results = sorted((r for r in results if "failed" not in r), key=lambda r: (r["n"], TOPOLOGIES.index(r["topology"])))
    if not results:
        return
    labels = [f"{r['topology']}\nN={r['n']}" for r in results]
    x = np.arange(len(results))
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.6))
    bottom = np.zeros(len(results))
    for key, label in (("dispatch_s", "dispatch"), ("transfer_s", "transfer"), ("compute", "simulated compute"),
                       ("close_s", "close")):
        heights = np.array([r["mean"].get(key, r["mean"]["wall_s"] - r["mean"]["overhead_s"]) for r in results])
        ax[0].bar(x, heights, bottom=bottom, label=label)
        bottom += heights
    ax[0].set(ylabel="s", title="round wall by part (means)")
    ax[1].bar(x, [value(r, "overhead_pct") for r in results], color="tab:red")
    ax[1].axhline(TARGET_PCT, color="k", linestyle="--", label=f"target {TARGET_PCT:g} %")
    ax[1].set(ylabel="%", title="coordination overhead / transfer")
    width = 0.27
    for i, (key, label) in enumerate((("coordinator_peak_mb", "coordinator (larger replica)"),
                                      ("broker_peak_mb", "core broker"), ("sites_peak_mb", "larger site broker"))):
        ax[2].bar(x + (i - 1) * width, [np.nan_to_num(value(r, key)) for r in results], width, label=label)
    ax[2].set(ylabel="MB", title="peak RSS (VmHWM)")
    for a in ax:
        a.set_xticks(x, labels, fontsize=8)
        a.grid(alpha=0.3, axis="y")
        a.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


# -- main -------------------------------------------------------------------------------------

def prepare(root: Path, seed: int, log) -> Path:
    """fmnist_cnn exported once and its memory profile measured once (the coordinator plans with it)."""
    from coordinator.model.zoo_profile import measured_profile
    return measured_profile(root, "fmnist_cnn", [32, 64], seed, log=log)


def _parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = p.parse_args(argv)
    args.command = " ".join(sys.argv[1:] if argv is None else argv)
    if args.topology is not None:
        args.topologies = [t.strip() for t in args.topology.split(",") if t.strip()]
        unknown = [t for t in args.topologies if t not in TOPOLOGIES]
        if unknown or not args.topologies or len(set(args.topologies)) != len(args.topologies):
            p.error(f"--topology: a comma-separated list of {', '.join(TOPOLOGIES)}, each once "
                    f"(got {args.topology!r})")
    if args.quick:
        args.sizes, args.rounds, args.compute_s = "10,20", 2, 2.0
    args.sizes = args.sizes or ("25,50,100,200,400" if args.topology is None else "400,1000")
    try:
        sizes = [int(x) for x in args.sizes.split(",")]
    except ValueError:
        sizes = []
    if not sizes or sizes != sorted(set(sizes)) or sizes[0] < 1 or args.rounds < 1:
        p.error("--sizes must be ascending positive integers and --rounds at least 1")
    if args.topology is not None and "sites" in args.topologies and sizes[0] < len(SITES):
        p.error(f"--topology sites needs at least {len(SITES)} devices, one per site")
    if args.processes < 0 or args.ramp_s < 0:
        p.error("--processes and --ramp-s must not be negative")
    if args.report_only and args.workdir is None:
        p.error("--report-only needs the --workdir of the run to report")
    args.size_list = sizes
    return args


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", help="fleet sizes N, comma-separated, ascending (default 25,50,100,200,400; "
                                   "with --topology 400,1000)")
    p.add_argument("--topology", nargs="?", const=",".join(TOPOLOGIES), metavar="LIST",
                   help=f"compare set-ups at each N: a comma-separated list of {', '.join(TOPOLOGIES)} "
                        f"(alone: all three)")
    p.add_argument("--rounds", type=int, default=3, help="rounds measured per size (default 3)")
    p.add_argument("--strategy", default="fedavg", choices=["fedavg", "progressive"])
    p.add_argument("--tier", default="pi-zero-2w", help="tier of every simulated device (profiles/<tier>.toml)")
    p.add_argument("--compute-s", type=float, default=5.0, help="simulated training time per task (default 5)")
    p.add_argument("--processes", type=int, default=0,
                   help="simulation processes, over all sites (default: one per 100 devices)")
    p.add_argument("--ramp-s", type=float, default=0.0,
                   help="spread each simulation process's connections over this many seconds (default 0: at once)")
    p.add_argument("--sim-nice", type=int, default=19, choices=range(0, 20), metavar="0-19",
                   help="nice level of the simulation processes (default 19: the simulated boards yield the CPU "
                        "to the coordinator and the brokers, as boards with their own CPUs would; 0: all share it "
                        "evenly, as runs before this option did)")
    p.add_argument("--eval-samples", type=int, default=2000, help="test images the coordinator evaluates per round")
    p.add_argument("--deadline-s", type=float, default=1800.0, help="the coordinator's round deadline")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="give up on a size after this long")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="N = 10, 20, 2 rounds, 2 s compute: checks the script")
    p.add_argument("--workdir", type=Path, help="scratch directory (default: a temporary one)")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: report the run in --workdir again, from its results.json")
    p.add_argument("--write-docs", action="store_true",
                   help="write the section of docs/benchmarks.md and its figure in docs/img/")
    args = _parse(p, argv)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    root = (args.workdir or Path(tempfile.mkdtemp(prefix="bench-fleet-scale-"))).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        return report(args, *load_run(args, root))
    log(f"workdir {root}")
    load_start = os.getloadavg()[0]
    t0 = time.monotonic()
    profile = prepare(root, args.seed, log)
    results = []
    for n in args.size_list:
        for topology in args.topologies if args.topology is not None else ["core"]:
            log(f"{topology} N={n}: {args.strategy}, {args.rounds} round(s), {args.compute_s:g} s of simulated "
                f"compute (load average {os.getloadavg()[0]:.1f})")
            try:
                results.append(run_size(args, root, profile, n, log, topology))
            except SystemExit as exc:
                if args.topology is None:
                    raise
                log(f"{topology} N={n} did not finish: {exc}")   # the other set-ups are still worth measuring
                results.append({"topology": topology, "n": n, "failed": str(exc),
                                "evidence": getattr(exc, "evidence", None)})
            save_run(args, root, results, (time.monotonic() - t0) / 60, (load_start, os.getloadavg()[0]))
    return report(args, results, (time.monotonic() - t0) / 60, (load_start, os.getloadavg()[0]))


RUN_KEYS = ("command", "topology", "strategy", "tier", "compute_s", "rounds", "eval_samples", "ramp_s", "sim_nice")
RUN_DEFAULTS = {"sim_nice": 0}      # what a results.json from before a setting existed ran with


def save_run(args, root: Path, results: list[dict], minutes: float, load: tuple[float, float]) -> None:
    """WORKDIR/results.json: the results so far and what the report needs of the run (--report-only reads it)."""
    run = {k: getattr(args, k) for k in RUN_KEYS} | {"minutes": minutes, "load": list(load)}
    (root / "results.json").write_text(json.dumps({"run": run, "results": results}, indent=1))


def load_run(args, root: Path) -> tuple[list[dict], float, tuple[float, float]]:
    """A run's results.json, its settings put back into args so that the report describes that run."""
    path = root / "results.json"
    try:
        saved = json.loads(path.read_text())
        run, results = saved["run"], saved["results"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"--report-only: {path} holds no run of this script ({exc})") from None
    for k in RUN_KEYS:
        setattr(args, k, run[k] if k in run or k not in RUN_DEFAULTS else RUN_DEFAULTS[k])
    return results, run["minutes"], tuple(run["load"])


def report(args, results: list[dict], minutes: float, load: tuple[float, float]) -> int:
    """Print the section; with --write-docs, write it into docs/benchmarks.md with its figure."""
    if args.topology is None:
        text, name, image = section(args, results, minutes, load), "bench_fleet_scale", IMAGE
    else:
        text, name, image = topology_section(args, results, minutes, load), "bench_fleet_scale_topology", \
            TOPOLOGY_IMAGE
    print(text)
    if args.write_docs:
        (plot if args.topology is None else plot_topologies)(results, image)
        write_section(name, text)
        print(f"wrote docs/benchmarks.md and {image.relative_to(REPO)}", file=sys.stderr)
    return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
