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
                   training itself (tasks out, blob fetches, uploads, intake, aggregation,
                   evaluation of the new global model)
  dispatch         from the round's opening to the last of its N tasks passing through the
                   broker (a subscriber on device/+/task timestamps them)
  close            from the arrival of the last device's (first) update at the broker to
                   the round's close: working through the messages queued before it,
                   judging it, aggregating N updates, storing the new weights, evaluating
  aggregate        the part of close after the last device's (first) ack: aggregating,
                   storing and evaluating, without the intake backlog
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

    python tools/bench_fleet_scale.py --write-docs             # N = 25..400, fedavg: long (see below)
    python tools/bench_fleet_scale.py --quick                  # N = 10, 20, 2 rounds: checks the script
    python tools/bench_fleet_scale.py --sizes 50,100 --strategy progressive --compute-s 10
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from benchdocs import machine, write_section

REPO = Path(__file__).resolve().parent.parent
IMAGE = REPO / "docs" / "img" / "bench_fleet_scale.png"
MB = 1 << 20
SYS_TOPICS = ("$SYS/broker/bytes/+", "$SYS/broker/publish/messages/+")
CONTROL_KINDS = ("task", "fetch", "update", "ack")


# -- the broker and what passes through it ----------------------------------------------------

def sys_broker(workdir: Path):
    """The embedded broker, publishing its $SYS counters every second instead of every ten."""
    from coordinator.ops.broker import EmbeddedBroker

    class SysBroker(EmbeddedBroker):
        def _config(self) -> str:
            return super()._config() + "sys_interval 1\n"
    return SysBroker(workdir)


class Watcher:
    """A subscriber that timestamps Mosquitto's $SYS counters and the fleet's small control messages.

    It never subscribes to blob or upload chunks, so it adds a few small messages per device
    and round to what it measures.
    """

    def __init__(self, host: str, port: int, fleet: str):
        import paho.mqtt.client as mqtt

        from edge_runtime.wire.protocol import Topics
        self.counters: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self.control: list[tuple[float, str, str, dict]] = []     # (time, kind, device, message)
        self.topics = Topics(fleet)
        self._client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                                   client_id=f"bench-watcher-{fleet}")
        self._client.on_message = self._on_message
        self._client.connect(host, port)
        self._client.subscribe([(t, 0) for t in SYS_TOPICS] + [(self.topics.all_devices(k), 0) for k in CONTROL_KINDS])
        self._client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        now = time.time()
        try:
            if message.topic.startswith("$SYS/"):
                self.counters[message.topic.removeprefix("$SYS/broker/")].append((now, float(message.payload)))
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


# -- one fleet size ---------------------------------------------------------------------------

def _settings(args, work: Path, profile: Path, n: int) -> dict:
    rounds = args.rounds + 1      # one more than measured: the coordinator is still alive when its peak is read
    return {"service": {"workdir": str(work), "strategy": args.strategy, "profile": str(profile), "min_devices": n,
                        "round_deadline_s": args.deadline_s, "offline_grace_s": 30.0,
                        "eval_samples": args.eval_samples, "max_rounds": rounds, "seed": args.seed},
            "train": {"batch_sizes": [32, 64]},
            "fedavg": {"rounds": rounds},
            "progressive": {"shrink_rounds": 1, "min_rounds_per_block": 2, "max_rounds_per_block": 3,
                            "max_extra_blocks": 1}}


def _sim_command(args, broker_url: str, fleet: str, n: int, work: Path) -> list[str]:
    return [sys.executable, "-m", "coordinator.local.simulation", "--broker", broker_url, "--fleet", fleet,
            "--devices", str(n), "--tier", args.tier, "--compute-s", str(args.compute_s),
            "--processes", str(args.processes), "--workdir", str(work / "sim"), "--seed", str(args.seed)]


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
            except (OSError, ValueError, psutil.Error):
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


def run_size(args, root: Path, profile: Path, n: int, log) -> dict:
    """One fleet of n simulated devices against a fresh broker and coordinator, until R rounds closed."""
    from coordinator.local.fleet import LocalFleet, read_metrics
    from edge_runtime.jobs.child import device_child_env
    work = root / f"n{n}"
    shutil.rmtree(work, ignore_errors=True)
    fleet_name = f"scale-{n}"
    broker = sys_broker(work / "broker").start()
    watcher = Watcher(broker.host, broker.port, fleet_name)
    coordinator_dir = work / "coordinator"
    shutil.copytree(root / "model", coordinator_dir / "model")    # exported once for every size
    t0 = time.monotonic()
    sim = None
    try:
        with LocalFleet(work, broker.url, fleet=fleet_name) as fleet:
            coordinator = fleet.start_coordinator(_settings(args, coordinator_dir, profile, n))
            with open(work / "logs" / "sim.log", "ab") as out:
                sim = subprocess.Popen(_sim_command(args, broker.url, fleet_name, n, work), stdout=out,
                                       stderr=subprocess.STDOUT, env=device_child_env(), start_new_session=True)
            procs = Processes({"coordinator": coordinator.pid, "broker": broker.pid})
            metrics = _wait_for_rounds(args, fleet, coordinator_dir, n, t0, log, read_metrics)
            procs.stop()
            _stop_sim(sim)
    finally:
        if sim is not None and sim.poll() is None:
            _stop_sim(sim)
        watcher.stop()
        broker.stop()
    return summarize(args, n, metrics[:args.rounds], watcher, procs, work / "sim", time.monotonic() - t0)


def _wait_for_rounds(args, fleet, coordinator_dir: Path, n: int, t0: float, log, read_metrics) -> list[dict]:
    deadline = time.monotonic() + args.timeout_s
    seen = 0
    while True:
        metrics = read_metrics(coordinator_dir)
        for m in metrics[seen:]:
            log(f"  N={n} round {m['round']}: {m['updates']} of {len(m['devices'])} update(s), "
                f"{m['closed_at'] - m['opened_at']:.1f} s ({time.monotonic() - t0:.0f} s)")
        seen = len(metrics)
        if len(metrics) >= args.rounds:
            return metrics
        if fleet.procs["coordinator"].poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"N={n}: {len(metrics)} of {args.rounds} round(s) after {time.monotonic() - t0:.0f} s; "
                             f"coordinator log:\n{fleet.log_tail('coordinator')}")
        time.sleep(0.5)


def _stop_sim(sim: subprocess.Popen) -> None:
    """SIGTERM edge-sim (it stops its processes and their devices), SIGKILL the group if it hangs."""
    if sim.poll() is None:
        sim.send_signal(signal.SIGTERM)
    try:
        sim.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(sim.pid, signal.SIGKILL)
        sim.wait()


# -- what a size measured ---------------------------------------------------------------------

def _round_of_task(task_id: str) -> int:
    return int(task_id.split("-", 1)[0][1:])


def round_numbers(args, m: dict, watcher: Watcher, procs: Processes) -> dict:
    """One round's timings and traffic (see the module's docstring for the definitions)."""
    r, t0, t1 = m["round"], m["opened_at"], m["closed_at"]
    tasks = [t for t, kind, _, body in watcher.control if kind == "task" and body.get("round") == r]
    first_update, acks, updates = {}, {}, defaultdict(int)
    for t, kind, device, body in watcher.control:
        if kind == "update" and body.get("round") == r:
            first_update.setdefault(device, t)
            updates[device] += 1
        elif kind == "ack" and _round_of_task(body["task_id"]) == r:
            acks.setdefault(device, t)
    fetches = sum(1 for t, kind, _, _ in watcher.control if kind == "fetch" and t0 <= t <= t1)
    latency = [acks[d] - first_update[d] for d in first_update if d in acks]
    last_ack = max((acks[d] for d in first_update if d in acks), default=float("nan"))
    n = len(m["devices"])
    return {"round": r, "wall_s": t1 - t0, "overhead_s": t1 - t0 - args.compute_s,
            "dispatch_s": max(tasks) - t0 if tasks else float("nan"),
            "close_s": t1 - max(first_update.values()) if first_update else float("nan"),
            "aggregate_s": t1 - last_ack,
            "coordinator_cpu": procs.cpu_use("coordinator", t0, t1), "broker_cpu": procs.cpu_use("broker", t0, t1),
            "ack_p95_s": float(np.percentile(latency, 95)) if latency else float("nan"),
            "accepted": sum(1 for row in m["devices"].values() if row["status"] == "accepted"), "tasks": n,
            "rejected": m["rejected"], "fetches_per_device": fetches / max(1, n),
            "updates_per_device": sum(updates.values()) / max(1, n),
            "mb_in_s": watcher.rate("bytes/received", t0, t1) / MB, "mb_out_s": watcher.rate("bytes/sent", t0, t1) / MB,
            "msgs_in_s": watcher.rate("publish/messages/received", t0, t1),
            "msgs_out_s": watcher.rate("publish/messages/sent", t0, t1),
            "up_mb": sum(row.get("uploaded_bytes", 0) for row in m["devices"].values()) / MB,
            "down_mb": sum(row.get("downloaded_bytes", 0) for row in m["devices"].values()) / MB}


def summarize(args, n: int, metrics: list[dict], watcher: Watcher, procs: Processes, sim_dir: Path,
              seconds: float) -> dict:
    rounds = [round_numbers(args, m, watcher, procs) for m in metrics]
    shards = [json.loads(p.read_text()) for p in sorted(sim_dir.glob("shard-*.json"))]
    mean = {k: float(np.nanmean([r[k] for r in rounds])) for k in rounds[0] if k != "round"}
    return {"n": n, "rounds": rounds, "mean": mean, "seconds": seconds,
            "accepted": sum(r["accepted"] for r in rounds), "expected": n * len(rounds),
            "coordinator_peak_mb": procs.peak("coordinator") / MB,
            "coordinator_startup_mb": procs.before("coordinator", metrics[0]["opened_at"]) / MB,
            "broker_peak_mb": procs.peak("broker") / MB,
            "sim_processes": len(shards),
            "sim_peak_mb": max((s["peak_rss_bytes"] for s in shards), default=0) / MB,
            "sim_mb_per_device": max((s["peak_rss_bytes"] / max(1, s["devices"]) for s in shards), default=0) / MB}


# -- report -----------------------------------------------------------------------------------

ROWS = [  # (key in a size's result, label, format)
    ("wall_s", "round wall, s", "{:.1f}"),
    ("overhead_s", "round overhead (wall - compute), s", "{:.1f}"),
    ("dispatch_s", "dispatch (open to last task out), s", "{:.2f}"),
    ("close_s", "close (last update in to round closed), s", "{:.2f}"),
    ("aggregate_s", "of which after the last ack (aggregate, store, evaluate), s", "{:.2f}"),
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


def value(result: dict, key: str) -> float:
    if key == "coordinator_growth_mb":
        return result["coordinator_peak_mb"] - result["coordinator_startup_mb"]
    return result["mean"][key] if key in result["mean"] else result[key]


def exponent(results: list[dict], key: str) -> float:
    """k in value ~ N^k between the smallest and the largest N."""
    a, b = results[0], results[-1]
    va, vb = value(a, key), value(b, key)
    if not (va > 0 and vb > 0) or a["n"] == b["n"]:
        return float("nan")
    return float(np.log(vb / va) / np.log(b["n"] / a["n"]))


def section(args, results: list[dict], minutes: float, load: tuple[float, float]) -> str:
    base = results[0]
    head = "| | " + " | ".join(f"N={r['n']}" for r in results) + f" | N^k, k ({base['n']}->{results[-1]['n']}) |"
    lines = [
        "## Coordinator and broker at fleet scale, simulated devices (bench_fleet_scale)",
        "",
        f"Command: `.venv/bin/python tools/bench_fleet_scale.py {args.command}` ({minutes:.0f} min on {machine()}; "
        f"1-min load average {load[0]:.1f} at start, {load[1]:.1f} at end).",
        "",
        f"Per fleet size N: a fresh Mosquitto (embedded broker), the real coordinator service as a process "
        f"({args.strategy} on fmnist_cnn, every device in every round, evaluation on {args.eval_samples} test "
        f"images), and N simulated devices of tier {args.tier} (`edge-sim`: the real agent and protocol, real "
        f"fetches, real updates of the trained part's size; training replaced by {args.compute_s:g} s of waiting), "
        f"spread over processes of up to 100 devices. Means over {args.rounds} rounds (the first one fetches the "
        f"graphs too). All processes share this machine's cores.",
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


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ns = [r["n"] for r in results]
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.4))
    for key, label in (("wall_s", "round wall"), ("overhead_s", "round overhead"), ("close_s", "close"),
                       ("aggregate_s", "close after the last ack"), ("dispatch_s", "dispatch"),
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


# -- main -------------------------------------------------------------------------------------

def prepare(root: Path, seed: int, log) -> Path:
    """fmnist_cnn exported once and its memory profile measured once (the coordinator plans with it)."""
    from coordinator.model.zoo_profile import measured_profile
    return measured_profile(root, "fmnist_cnn", [32, 64], seed, log=log)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="25,50,100,200,400", help="fleet sizes N, comma-separated, ascending")
    p.add_argument("--rounds", type=int, default=3, help="rounds measured per size (default 3)")
    p.add_argument("--strategy", default="fedavg", choices=["fedavg", "progressive"])
    p.add_argument("--tier", default="pi-zero-2w", help="tier of every simulated device (profiles/<tier>.toml)")
    p.add_argument("--compute-s", type=float, default=5.0, help="simulated training time per task (default 5)")
    p.add_argument("--processes", type=int, default=0, help="simulation processes (default: one per 100 devices)")
    p.add_argument("--eval-samples", type=int, default=2000, help="test images the coordinator evaluates per round")
    p.add_argument("--deadline-s", type=float, default=1800.0, help="the coordinator's round deadline")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="give up on a size after this long")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="N = 10, 20, 2 rounds, 2 s compute: checks the script")
    p.add_argument("--workdir", type=Path, help="scratch directory (default: a temporary one)")
    p.add_argument("--write-docs", action="store_true",
                   help="write the section of docs/benchmarks.md and docs/img/bench_fleet_scale.png")
    args = p.parse_args(argv)
    args.command = " ".join(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.sizes, args.rounds, args.compute_s = "10,20", 2, 2.0
    sizes = [int(x) for x in args.sizes.split(",")]
    if sizes != sorted(set(sizes)) or sizes[0] < 1 or args.rounds < 1:
        p.error("--sizes must be ascending positive integers and --rounds at least 1")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    root = (args.workdir or Path(tempfile.mkdtemp(prefix="bench-fleet-scale-"))).resolve()
    root.mkdir(parents=True, exist_ok=True)
    log(f"workdir {root}")
    load_start = os.getloadavg()[0]
    t0 = time.monotonic()
    profile = prepare(root, args.seed, log)
    results = []
    for n in sizes:
        log(f"N={n}: {args.strategy}, {args.rounds} round(s), {args.compute_s:g} s of simulated compute")
        results.append(run_size(args, root, profile, n, log))
        (root / "results.json").write_text(json.dumps(results, indent=1))
    minutes = (time.monotonic() - t0) / 60
    load = (load_start, os.getloadavg()[0])
    text = section(args, results, minutes, load)
    print(text)
    if args.write_docs:
        plot(results, IMAGE)
        write_section("bench_fleet_scale", text)
        log(f"wrote docs/benchmarks.md and {IMAGE.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
