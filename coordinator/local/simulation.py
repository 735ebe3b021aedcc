"""edge-sim: hundreds of simulated device agents on one machine, to plan a coordinator's and a broker's capacity.

Each simulated device is the real agent (edge_runtime/device/agent.py) with one thing replaced:
its training job. It connects to the broker with its own MQTT client, says hello with
the budget a board of its tier would announce, receives its task, fetches every blob the
task names that it lacks, sends its update in chunks and waits for the coordinator's
ack, resending like the real agent. Only the training is simulated: the device waits
for the simulated compute time, then takes the weights of its trained part from the
blobs it fetched, perturbs them slightly, and writes them with the trainer's own writer,
so the update has the real names, shapes and size and passes every intake check. No
onnxruntime is imported and no training child is started, so a process holds about a
hundred devices.

Devices are spread over a few processes (--processes; by default one per 100 devices),
each device running in its own threads. Every device keeps its state (blobs, uploads,
done tasks) in WORKDIR/devices/<id>, as a board would. At exit each process writes
WORKDIR/shard-<k>.json: its devices, their accepted and rejected tasks, and its own
peak RSS.

What a simulated update reports that is not measured: `loss` (a made-up decreasing
value), `peak_rss_bytes` (the device's job budget, the hard limit a real job runs
under) and `agent_peak_rss_bytes` (the process's peak divided by its devices).
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime import logs
from edge_runtime.device.agent import Agent, job_budget_bytes
from edge_runtime.device.cli import connect
from edge_runtime.device.settings import DeviceConfig
from edge_runtime.device.tiers import DEFAULT_PROFILES_DIR, TierError, find_tier
from edge_runtime.jobs.budget import DEFAULT_MARGIN
from edge_runtime.jobs.child import ChildResult
from edge_runtime.jobs.worker import JobSpec
from edge_runtime.memory import MIB, peak_rss_bytes
from edge_runtime.wire import weights as wcodec
from edge_runtime.wire.mqtt_link import parse_broker_url
from edge_runtime.wire.protocol import ProtocolError, Status, Topics, check_id

log = logging.getLogger("edge-sim")

DEVICES_PER_PROCESS = 100
STOP_GRACE_S = 15.0          # devices get this long to finish a send and say offline once stopped
FIRST_LOSS = 2.3


class Stopped(KeyboardInterrupt):
    """The simulation is stopping mid-task: leave the task as a killed board would, to resume at the next start."""


@dataclass(frozen=True)
class Simulated:
    """How a simulated device 'trains': how long it takes and how its update differs from what it fetched."""
    compute_s: float = 5.0
    jitter: float = 0.0          # compute time varies uniformly within +- this fraction
    examples: int = 500          # the local dataset size it reports (FedAvg weights by it)
    noise: float = 1e-3          # the update's change, relative to each tensor's RMS


@dataclass(frozen=True)
class SimDevice:
    device_id: str
    tier: str
    budget_bytes: int            # the whole device's budget, agent and job together
    cores: int
    disk_free_bytes: int


class SimulatedJobs:
    """A job runner (edge_runtime.jobs.budget.JobRunner) that waits the simulated compute time, then
    perturbs the fetched weights of the trained part: the agent around it is the real one."""

    def __init__(self, budget_bytes: int, sim: Simulated, rng: np.random.Generator, stop: threading.Event):
        self.budget_bytes, self.sim, self.rng, self.stop = budget_bytes, sim, rng, stop
        self.tasks_done = 0

    def run(self, spec: JobSpec) -> tuple[dict, ChildResult]:
        """What the training child would report, after the simulated compute time."""
        from edge_runtime.wire.manifest import Manifest
        t0 = time.monotonic()
        if self.stop.wait(self._compute_time()):
            raise Stopped()
        manifest = Manifest.load(Path(spec.manifest))
        part = spec.part
        part.validate(manifest)
        self.tasks_done += 1
        if spec.mode == "score":
            result = self._scores(manifest, part)
        else:
            write_update(Path(spec.update_out), spec.weights, part.update_names(manifest), self.sim.noise, self.rng)
            result = self._trained(spec.config)
        child = ChildResult(0, self.budget_bytes, time.monotonic() - t0, "", "")
        return {"ok": True, "result": result}, child

    def _compute_time(self) -> float:
        spread = self.sim.jitter * self.sim.compute_s
        return max(0.0, self.sim.compute_s + (self.rng.uniform(-spread, spread) if spread else 0.0))

    def _trained(self, config) -> dict:
        """The training report's fields the agent reads: a plausible step count and a loss that falls per task."""
        steps = math.ceil(self.sim.examples * config.epochs / config.batch_size)
        return {"num_examples": self.sim.examples, "loss": FIRST_LOSS / (1 + 0.2 * self.tasks_done),
                "steps": max(1, steps), "resumed_from_step": 0}

    def _scores(self, manifest, part) -> dict:
        """A score task's answer: a positive score for exactly the groups a real scoring job scores."""
        from edge_runtime.train.layer_scores import score_groups
        groups = score_groups(manifest, part)
        return {"scores": {str(g): float(self.rng.uniform(0.1, 1.0)) for g in groups},
                "num_examples": self.sim.examples, "batches": max(1, self.sim.examples // 64)}


@functools.cache
def agent_startup_rss_bytes() -> int:
    """What a real agent holds once started (its modules and an MQTT client), measured in a fresh process.

    A simulated device announces the job budget a real board of its tier would: its budget
    less this and the agent's room to grow (edge_runtime.device.agent.job_budget_bytes).
    """
    code = ("from edge_runtime.device import cli; from edge_runtime.wire.mqtt_link import MqttLink; "
            "link = MqttLink('probe', '127.0.0.1', 1, []); "
            "from edge_runtime.memory import current_rss_bytes; print(current_rss_bytes())")
    from edge_runtime.jobs.child import device_child_env
    out = subprocess.run([sys.executable, "-c", code], env=device_child_env(), capture_output=True, text=True,
                         timeout=60, check=True)
    return int(out.stdout.split()[-1])


def write_update(out: Path, weight_files, names: list[str], noise: float, rng: np.random.Generator) -> None:
    """The fetched weights of the trained part, slightly changed, written by the trainer's own writer.

    Tensor by tensor, never the whole part in memory (save_streaming reads each tensor twice,
    once for its shape; the second, perturbed again, is the one written).
    """
    fetched = wcodec.open_weights(weight_files, names)

    def perturbed(name: str) -> np.ndarray:
        w = fetched[name]
        scale = noise * max(float(np.sqrt(np.mean(np.square(w, dtype=np.float64)))) if w.size else 0.0, 1e-3)
        return w + (rng.standard_normal(w.shape, dtype=np.float32) * np.float32(scale))

    wcodec.save_streaming(out, names, perturbed)


# -- the fleet of one process ----------------------------------------------------------------

def device_config(dev: SimDevice, topics: Topics, host: str, port: int, workdir: Path, ack_timeout_s: float,
                  connect_timeout_s: float) -> DeviceConfig:
    """The agent's settings for one simulated device; its state directory is its own, as on a board."""
    state = workdir / "devices" / dev.device_id
    state.mkdir(parents=True, exist_ok=True)
    return DeviceConfig(device_id=dev.device_id, tier=dev.tier, topics=topics, host=host, port=port, data=state,
                        state=state, budget_bytes=dev.budget_bytes, margin=DEFAULT_MARGIN, threads=1,
                        ack_timeout_s=ack_timeout_s, connect_timeout_s=connect_timeout_s, cores=dev.cores,
                        disk_free_bytes=dev.disk_free_bytes)


def job_budget(dev: SimDevice) -> int:
    """What a real agent of this budget announces: the device budget less its own memory and room to grow."""
    return job_budget_bytes(dev.budget_bytes, agent_startup_rss_bytes())


def run_device(cfg: DeviceConfig, budget: int, sim: Simulated, seed: int, stop: threading.Event,
               devices_in_process: int, outcome: dict) -> None:
    """One device's thread: connect, serve tasks until stopped, leave with a retained offline status."""
    outcome[cfg.device_id] = {"connected": False}
    link = connect(cfg, stop)
    if link is None:
        return
    agent = None
    try:
        jobs = SimulatedJobs(budget, sim, np.random.default_rng(seed), stop)
        # the device's share of its process's peak: the process hosts many devices
        agent = Agent(cfg, link, jobs, stop, own_peak=lambda: peak_rss_bytes() // max(1, devices_in_process))
        outcome[cfg.device_id] = {"connected": True, "agent": agent}
        agent.serve()
    except Stopped:
        log.info("%s: stopped mid-task; it resumes at the next start", cfg.device_id)
    except Exception:  # a bug in one device must not take its process's other devices down
        log.exception("%s: stopped by an error", cfg.device_id)
    finally:
        link.stop(final=(cfg.topics.device(cfg.device_id, "status"), Status("offline", at=time.time()).encode()))


def run_shard(devices: list[SimDevice], args, shard: int, stop: threading.Event) -> dict:
    """Run these devices in this process until `stop`; return what they did."""
    host, port = parse_broker_url(args.broker)
    topics = Topics(args.fleet)
    sim = Simulated(args.compute_s, args.compute_jitter, args.examples, args.noise)
    outcome: dict = {}
    threads = []
    for i, dev in enumerate(devices):
        cfg = device_config(dev, topics, host, port, args.workdir, args.ack_timeout_s, args.connect_timeout_s)
        seed = args.seed * 1_000_003 + int(dev.device_id.rsplit("-", 1)[-1])
        t = threading.Thread(target=run_device, name=dev.device_id, daemon=True,
                             args=(cfg, job_budget(dev), sim, seed, stop, len(devices), outcome))
        t.start()
        threads.append(t)
        if args.ramp_s and i + 1 < len(devices) and stop.wait(args.ramp_s / len(devices)):
            break
    log.warning("shard %d: %d simulated device(s) started against %s, fleet %s", shard, len(threads),
                args.broker, args.fleet)
    while any(t.is_alive() for t in threads) and not stop.wait(1.0):
        pass
    stop.set()
    deadline = time.monotonic() + STOP_GRACE_S
    for t in threads:  # a device stuck in a fetch from a coordinator that left is abandoned: its will says offline
        t.join(max(0.0, deadline - time.monotonic()))
    per_device = {d: _outcome(o) for d, o in list(outcome.items())}
    summary = {"shard": shard, "devices": len(threads), "peak_rss_bytes": peak_rss_bytes(),
               "connected": sum(1 for o in per_device.values() if o["connected"]),
               "tasks": sum(o["tasks"] for o in per_device.values()),
               "accepted": sum(o["accepted"] for o in per_device.values()), "per_device": per_device}
    (args.workdir / f"shard-{shard}.json").write_text(json.dumps(summary, indent=1))
    log.warning("shard %d: %d device(s) stopped; %d task(s) done, %d accepted; process peak %.0f MB",
                shard, summary["devices"], summary["tasks"], summary["accepted"], summary["peak_rss_bytes"] / MIB)
    return summary


def _outcome(entry: dict) -> dict:
    """What a device did, from its agent's record of finished tasks."""
    agent = entry.get("agent")
    done = dict(agent.done) if agent is not None else {}
    return {"connected": entry["connected"], "tasks": len(done),
            "accepted": sum(1 for d in done.values() if d["accepted"])}


# -- the devices and the processes ------------------------------------------------------------

class SimError(ValueError):
    """A setting that cannot work; the message names it."""


def plan_devices(tiers: list[str], devices: int | None, budget_mb: float, prefix: str) -> list[SimDevice]:
    """The devices to simulate from --tier NAME[=COUNT] (repeatable) and --devices."""
    counted = [t.split("=", 1) for t in tiers or ["pi-zero-2w"]]
    if all(len(c) == 1 for c in counted):
        if len(counted) != 1:
            raise SimError("several --tier without counts: give each a count, e.g. --tier pi-zero-2w=300")
        counted = [[counted[0][0], str(devices if devices is not None else 100)]]
    elif any(len(c) == 1 for c in counted):
        raise SimError("give every --tier a count (NAME=COUNT), or a single --tier NAME with --devices N")
    mix = []
    for name, count in counted:
        if not count.isdigit() or int(count) < 1:
            raise SimError(f"--tier {name}={count}: the count must be a positive integer")
        mix.append((name, int(count)))
    total = sum(c for _, c in mix)
    if devices is not None and devices != total:
        raise SimError(f"--devices {devices} but the --tier counts add up to {total}")
    out, index = [], 0
    try:
        for name, count in mix:
            tier, budget, cores, disk = _tier(name, budget_mb)
            for _ in range(count):
                out.append(SimDevice(check_id(f"{prefix}-{tier}-{index:05d}", "device id"), tier, budget, cores,
                                     disk))
                index += 1
    except ProtocolError as exc:
        raise SimError(f"{exc}; choose a shorter --id-prefix or tier name") from None
    small = [d for d in out if job_budget(d) <= 0]
    if small:
        raise SimError(f"tier {small[0].tier}: a budget of {small[0].budget_bytes / MIB:.0f} MB leaves nothing for "
                       f"training beside the agent's own "
                       f"{(small[0].budget_bytes - job_budget(small[0])) / MIB:.0f} MB")
    return out


def _tier(name: str, budget_mb: float) -> tuple[str, int, int, int]:
    """(tier name, whole device budget, cores, disk) from profiles/<name>.toml; --budget-mb overrides the budget.

    A tier's budget_mb is its jobs' share; the device as a whole has it plus the agent's reserve.
    """
    try:
        tier = find_tier(name)
    except TierError as exc:
        if exc.path != DEFAULT_PROFILES_DIR:     # a tier file that is broken, or a path that is missing
            raise SimError(str(exc)) from None
        if not budget_mb:
            raise SimError(f"{exc}; or give --budget-mb to simulate a tier without a file") from None
        return check_id(name, "tier"), int(budget_mb * MIB), 4, 8 << 30
    budget = int(budget_mb * MIB) if budget_mb else tier.device_budget_bytes   # as the agent takes a tier's
    return tier.name, budget, tier.cores, int(tier.storage_gb * (1 << 30) / 2)


def _shard_of(devices: list[SimDevice], shard: int, processes: int) -> list[SimDevice]:
    return devices[shard::processes]


def run_processes(argv: list[str], processes: int, stop: threading.Event) -> int:
    """Start one child per shard with the same flags, pass SIGTERM on, and wait for all of them."""
    from edge_runtime.jobs.child import device_child_env
    children = [subprocess.Popen([sys.executable, "-m", "coordinator.local.simulation", *argv,
                                  "--shard", f"{k}/{processes}"], env=device_child_env())
                for k in range(processes)]
    while any(c.poll() is None for c in children) and not stop.wait(0.5):
        pass
    for c in children:
        if c.poll() is None:
            c.send_signal(signal.SIGTERM)
    codes = [c.wait() for c in children]
    return max(codes, default=0)


def summarize(workdir: Path, processes: int) -> dict:
    """The shards' summaries added up (what each process wrote as it stopped)."""
    shards = [json.loads((workdir / f"shard-{k}.json").read_text()) for k in range(processes)
              if (workdir / f"shard-{k}.json").exists()]
    return {"processes": len(shards), "devices": sum(s["devices"] for s in shards),
            "connected": sum(s["connected"] for s in shards), "tasks": sum(s["tasks"] for s in shards),
            "accepted": sum(s["accepted"] for s in shards),
            "peak_rss_bytes_per_process": [s["peak_rss_bytes"] for s in shards]}


# -- command line ---------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-sim", formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__,
        epilog="""examples:
  # 200 Pi Zero 2 W boards against a coordinator already running on fleet "lab"
  edge-sim --broker mqtt://coordinator.lan:1883 --fleet lab --devices 200 --tier pi-zero-2w

  # a mixed fleet, 10 s of simulated training per task (+-20 %), four processes
  edge-sim --broker 10.0.0.5 --fleet lab --tier pi-zero-2w=300 --tier pi-4b-2gb=100 \\
           --compute-s 10 --compute-jitter 0.2 --processes 4

  # a tier without a file: give its budget
  edge-sim --broker 10.0.0.5 --fleet lab --tier sensor-node=50 --budget-mb 180

Start the coordinator as usual (edge-coordinator run) with min_devices set to the number
of simulated devices, so that every one takes part in each round, then start edge-sim.
The devices serve until SIGTERM or Ctrl-C (or --duration-s); run it again with the same
--workdir and they resume where they stopped. Tiers come from profiles/<tier>.toml, read
as edge-device reads them: the jobs' budget plus the agent's reserve is the device's, and
each device announces what a real agent would; the cores; half the storage as free disk.
--budget-mb sets every device's whole budget instead. Device ids are <prefix>-<tier>-<index>.

tools/bench_fleet_scale.py runs the coordinator, a broker and edge-sim at several fleet
sizes and measures the round overhead, the broker's throughput and both processes' peaks.
Exit codes: 0 stopped, 1 no device reached the broker, 2 bad settings.""")
    p.add_argument("--broker", required=True, metavar="URL", help="the fleet's broker, mqtt://host:port")
    p.add_argument("--fleet", default="default", help="fleet name, the topic prefix edgeblock/v1/<fleet>/")
    p.add_argument("--devices", type=int, metavar="N", help="how many devices of the one --tier (default 100)")
    p.add_argument("--tier", action="append", metavar="NAME[=COUNT]",
                   help="a tier (profiles/<NAME>.toml or a tier file) and how many devices of it; repeat for a "
                        "mixed fleet (default pi-zero-2w)")
    p.add_argument("--budget-mb", type=float, default=0.0, metavar="MB",
                   help="every device's whole budget (agent and job), instead of its tier's")
    p.add_argument("--compute-s", type=float, default=5.0, metavar="S",
                   help="simulated training time of one task (default 5)")
    p.add_argument("--compute-jitter", type=float, default=0.0, metavar="F",
                   help="vary the compute time uniformly within +-F of it (default 0)")
    p.add_argument("--examples", type=int, default=500, help="local examples each device reports (default 500)")
    p.add_argument("--noise", type=float, default=1e-3,
                   help="size of an update's change, relative to each tensor's RMS (default 0.001)")
    p.add_argument("--processes", type=int, default=0, metavar="P",
                   help=f"processes to spread the devices over (default: one per {DEVICES_PER_PROCESS} devices)")
    p.add_argument("--workdir", type=Path, default=Path("sim-state"),
                   help="the devices' state directories and the shard summaries (default sim-state)")
    p.add_argument("--id-prefix", default="sim", help="device ids start with this (default sim)")
    p.add_argument("--ramp-s", type=float, default=0.0, metavar="S",
                   help="spread each process's connections over S seconds (default 0: all at once)")
    p.add_argument("--duration-s", type=float, default=0.0, metavar="S", help="stop after S seconds (0 = never)")
    p.add_argument("--ack-timeout", dest="ack_timeout_s", type=float, default=30.0, metavar="S",
                   help="seconds to wait for the coordinator's ack before sending again (default 30)")
    p.add_argument("--connect-timeout", dest="connect_timeout_s", type=float, default=60.0, metavar="S",
                   help="seconds to keep trying the broker at start-up (default 60)")
    p.add_argument("--seed", type=int, default=0, help="seed of compute times and update noise")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="info logs every task of every device (default warning)")
    p.add_argument("--shard", help=argparse.SUPPRESS)   # K/P: this process runs every P-th device from K
    return p


def _check(args) -> list[SimDevice]:
    if args.broker.strip().lower().startswith("mqtts://"):
        raise SimError(f"--broker {args.broker}: simulated devices connect without TLS or a login; "
                       "point them at a broker with a plain mqtt:// listener")
    try:
        parse_broker_url(args.broker)
        Topics(args.fleet)
        check_id(f"{args.id_prefix}-x", "--id-prefix")
    except (ProtocolError, ValueError) as exc:
        raise SimError(str(exc)) from None
    if args.compute_s < 0 or not 0 <= args.compute_jitter <= 1 or args.examples < 1 or args.noise <= 0:
        raise SimError("--compute-s >= 0, --compute-jitter in [0, 1], --examples >= 1 and --noise > 0")
    if args.processes < 0 or args.ramp_s < 0 or args.duration_s < 0 or args.devices is not None and args.devices < 1:
        raise SimError("--devices, --processes, --ramp-s and --duration-s must not be negative (--devices >= 1)")
    return plan_devices(args.tier, args.devices, args.budget_mb, args.id_prefix)


def _stop_on_signals(stop: threading.Event) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    try:
        devices = _check(args)
    except SimError as exc:
        print(f"edge-sim: {exc}", file=sys.stderr)
        return 2
    args.workdir = args.workdir.expanduser().resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    name = f"edge-sim[{args.shard}]" if args.shard else "edge-sim"
    logs.configure(args.log_level.upper(), f"%(asctime)s {name} %(threadName)s %(levelname)s %(message)s")
    stop = threading.Event()
    _stop_on_signals(stop)
    if args.duration_s:
        timer = threading.Timer(args.duration_s, stop.set)
        timer.daemon = True
        timer.start()
    if args.shard:
        shard, processes = (int(x) for x in args.shard.split("/"))
        summary = run_shard(_shard_of(devices, shard, processes), args, shard, stop)
        return 0 if summary["connected"] else 1
    processes = args.processes or math.ceil(len(devices) / DEVICES_PER_PROCESS)
    processes = min(processes, len(devices))
    for old in args.workdir.glob("shard-*.json"):
        old.unlink()
    if processes == 1:
        code = 0 if run_shard(devices, args, 0, stop)["connected"] else 1
    else:
        code = run_processes(argv, processes, stop)
    total = summarize(args.workdir, processes)
    log.warning("%d device(s) in %d process(es): %d task(s) done, %d accepted", total["devices"], total["processes"],
                total["tasks"], total["accepted"])
    return code


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
