"""edge-demo: a small federated run on this machine, over MQTT, from one command.

Starts a private Mosquitto on a free loopback port, the coordinator service, and a fleet
of device agents in two tiers (each a process; each training job under a hard limit of
its device's budget; the small tier cannot hold the whole model), splits Fashion-MNIST
across them non-IID (Dirichlet), and runs progressive training (ProFL) to the end.
Progress is printed per round; everything lives in --workdir, so Ctrl-C stops it and the
same command resumes it.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from .config import ConfigError, load_config

DEFAULTS = {
    "demo": {"workdir": "runs/demo", "model": "fmnist_cnn", "samples": 16000, "alpha": 0.5, "seed": 0,
             "strategy": "progressive",
             # tier:budget_mb:count; a budget covers the agent and its training jobs
             "fleet": ["small-140mb:140:2", "pi-zero-2w:296:2"]},
    "train": {"learning_rate": 2e-3, "local_epochs": 1.0, "batch_sizes": [32, 64]},
    "progressive": {"shrink_rounds": 1, "min_rounds_per_block": 2, "max_rounds_per_block": 3, "max_extra_blocks": 1},
    "fedavg": {"rounds": 4},
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog="""examples:
  edge-demo                                  # 4 devices in 2 tiers, 16k samples, progressive (~2 min on 2 cores)
  edge-demo --samples 60000 --alpha 100      # more data, nearly IID
  edge-demo --strategy fedavg                # the full-model FedAvg baseline: the small tier is excluded
  edge-demo --fleet tiny:134:2 --fleet pi-zero-2w:296:1
  edge-demo --config demo.toml               # [demo], [train], [progressive], [fedavg]; flags win

Results: WORKDIR/coordinator/metrics.jsonl (one line per round); logs: WORKDIR/fleet/logs/.
The block-by-block single-device run is `edge-blockwise`.""")
    p.add_argument("--config", type=Path, help="TOML file with [demo], [train], [progressive], [fedavg] tables")
    p.add_argument("--workdir", help="where the broker, coordinator, devices and results live (resumable)")
    p.add_argument("--model", help="zoo model (fmnist_cnn, resnet_small)")
    p.add_argument("--samples", type=int, help="Fashion-MNIST training images split across the fleet")
    p.add_argument("--alpha", type=float, help="Dirichlet concentration: 0.5 is strongly non-IID, 100 nearly IID")
    p.add_argument("--strategy", choices=["progressive", "fedavg"])
    p.add_argument("--fleet", action="append", metavar="TIER:MB:COUNT",
                   help="devices of a tier with a budget in MB (repeat the flag for each tier)")
    p.add_argument("--local-epochs", type=float, help="passes over its local data a device makes per round")
    p.add_argument("--fresh", action="store_true", help="discard a previous run in --workdir and start over")
    return p


def _fleet(entries: list[str]) -> list[tuple[str, float, int]]:
    out = []
    for e in entries:
        try:
            tier, mb, count = e.split(":")
            out.append((tier, float(mb), int(count)))
        except ValueError:
            raise ConfigError(f"fleet entry {e!r} is not TIER:BUDGET_MB:COUNT (e.g. pi-zero-2w:296:2)") from None
    if not out or any(c < 1 or mb <= 0 for _, mb, c in out):
        raise ConfigError("the fleet needs at least one tier with a positive budget and count")
    return out


def run(settings: dict, stop_flag: list) -> dict:
    from coordinator.broker import EmbeddedBroker
    from coordinator.fleet_data import write_fleet_data
    from coordinator.local_fleet import DeviceSpec, LocalFleet, read_metrics
    from edge_runtime.profiler import run_profile

    from . import export, zoo

    d = settings["demo"]
    work = Path(d["workdir"]).resolve()
    work.mkdir(parents=True, exist_ok=True)
    fleet_spec = _fleet(d["fleet"])
    ids = [(f"{tier}-{i}", tier, mb) for tier, mb, count in fleet_spec for i in range(count)]
    dirs = write_fleet_data(work / "data", [i for i, _, _ in ids], d["samples"], d["alpha"], d["seed"])
    specs = [DeviceSpec(i, tier, mb, dirs[i]) for i, tier, mb in ids]
    profile = work / "profile.json"
    if not profile.exists():
        print("measuring the memory of training each block on this machine (once, about 20 s)", flush=True)
        export.export(zoo.build(d["model"], seed=d["seed"]), work / "profiling" / "model")
        run_profile(work / "profiling" / "model" / "manifest.json", [], sorted(settings["train"]["batch_sizes"]),
                    work / "profiling", verify=False, log=lambda _: None).save(profile)
    coordinator = {
        "service": {"workdir": str(work / "coordinator"), "model": d["model"], "seed": d["seed"],
                    "strategy": d["strategy"], "profile": str(profile), "min_devices": len(specs),
                    "round_deadline_s": 300.0, "offline_grace_s": 10.0},
        "train": dict(settings["train"]), "progressive": dict(settings["progressive"]),
        "fedavg": dict(settings["fedavg"]),
    }
    print(f"fleet: {', '.join(f'{c} x {t} ({mb:.0f} MB)' for t, mb, c in fleet_spec)}; "
          f"{d['samples']} samples split by Dirichlet({d['alpha']:g}); strategy {d['strategy']}", flush=True)
    t0, seen = time.monotonic(), 0
    with EmbeddedBroker(work / "broker") as broker, LocalFleet(work / "fleet", broker.url, "demo") as fleet:
        print(f"broker {broker.url}; logs in {fleet.logs}", flush=True)
        fleet.start_run(coordinator, specs)
        proc = fleet.procs["coordinator"]
        while proc.poll() is None and not stop_flag:
            time.sleep(0.5)
            metrics = read_metrics(work / "coordinator")
            for m in metrics[seen:]:
                print(_round_line(m, time.monotonic() - t0), flush=True)
            seen = len(metrics)
        if stop_flag:
            raise KeyboardInterrupt
        if proc.returncode != 0:
            raise SystemExit(f"edge-demo: the coordinator failed:\n{fleet.log_tail('coordinator')}")
    metrics = read_metrics(work / "coordinator")
    for m in metrics[seen:]:
        print(_round_line(m, time.monotonic() - t0))
    return _summary(metrics, specs)


def _round_line(m: dict, elapsed: float) -> str:
    stage = m["stage"]
    where = f"{stage.get('phase')} block {stage['block']}" if "block" in stage else str(stage.get("phase"))
    trained = [r for r in m["devices"].values() if r["status"] == "accepted"]
    worst = max((r["peak_rss_bytes"] + r["agent_peak_rss_bytes"]) / 2**20 for r in trained) if trained else 0
    return (f"round {m['round']:>3}  {where:<20} updates {m['updates']}/{len(m['devices'])} "
            f"rejected {m['rejected']}  accuracy {m['accuracy']:6.2%}  largest device peak {worst:4.0f} MB  "
            f"({elapsed:.0f} s)")


def _summary(metrics: list[dict], specs) -> dict:
    budgets = {s.device_id: s.budget_mb for s in specs}
    worst = {}
    for m in metrics:
        for device, r in m["devices"].items():
            if r["status"] == "accepted":
                peak = (r["peak_rss_bytes"] + r["agent_peak_rss_bytes"]) / 2**20
                worst[device] = max(worst.get(device, 0), peak)
    return {"rounds": len(metrics), "finished": bool(metrics and metrics[-1]["finished"]),
            "final_test_accuracy": metrics[-1]["accuracy"] if metrics else None,
            "peak_mb": worst, "budget_mb": budgets}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {"demo": {"workdir": args.workdir, "model": args.model, "samples": args.samples,
                          "alpha": args.alpha, "strategy": args.strategy, "fleet": args.fleet},
                 "train": {"local_epochs": args.local_epochs}}
    try:
        settings = load_config(DEFAULTS, args.config, overrides)
        _fleet(settings["demo"]["fleet"])
    except ConfigError as exc:
        print(f"edge-demo: {exc}", file=sys.stderr)
        return 2
    if args.fresh:
        import shutil
        shutil.rmtree(settings["demo"]["workdir"], ignore_errors=True)
    stop_flag: list = []
    signal.signal(signal.SIGTERM, lambda *_: stop_flag.append("SIGTERM"))
    try:
        summary = run(settings, stop_flag)
    except KeyboardInterrupt:
        print("\nedge-demo: stopped; run the same command again to resume", file=sys.stderr)
        return 130
    (Path(settings["demo"]["workdir"]) / "summary.json").write_text(json.dumps(summary, indent=1))
    if summary["final_test_accuracy"] is not None:
        print(f"\n{summary['rounds']} rounds: test accuracy {summary['final_test_accuracy']:.2%}; every device's "
              f"largest peak (training job + agent) against its budget: " +
              ", ".join(f"{d} {p:.0f}/{summary['budget_mb'][d]:.0f} MB" for d, p in summary["peak_mb"].items()))
    return 0 if summary["finished"] else 1


if __name__ == "__main__":
    sys.exit(main())
