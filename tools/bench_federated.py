#!/usr/bin/env python3
"""Benchmark: progressive training (ProFL) against full-model FedAvg on the same fleet and data.

One run starts a Mosquitto, measures the memory profile of the model on this machine,
splits Fashion-MNIST across the devices (Dirichlet alpha, non-IID), then runs the real
coordinator service and the real device agents (each a process, each training job under
a hard limit of its device's budget) twice on the same devices and data: first the
progressive schedule, then full-model FedAvg, which can only use the devices whose
budget holds whole-model training. It records per round the test accuracy, the bytes
each device downloaded and uploaded, and each device's measured peak RSS (its training
job's VmHWM and its agent's), and writes a table and a plot.

The default fleet has three tiers; four of its six devices cannot train the whole model:

    tiny   134 MB  only the last blocks fit (the first ones need ~90 MB at batch 32 + margin)
    small  150 MB  any single block, some pairs of blocks; not the whole model (~107 MB at batch 32)
    big    296 MB  the whole model at batch 64

Each budget covers the agent too: about 47 MB of it (start-up RSS plus room to grow) is
the agent's, the rest is the hard limit of its training jobs.

    python tools/bench_federated.py --write-docs        # about 25 minutes on 2 cores
    python tools/bench_federated.py --quick             # a few minutes: fewer samples and rounds
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchdocs import machine, write_section

REPO = Path(__file__).resolve().parent.parent
IMAGE = REPO / "docs" / "img" / "bench_federated.png"
TIERS = {"tiny": 134, "small": 150, "big": 296}


def _settings(args, work: Path, profile: Path, strategy: str, n_devices: int) -> dict:
    return {
        "service": {"workdir": str(work), "strategy": strategy, "profile": str(profile), "min_devices": n_devices,
                    "round_deadline_s": 900.0, "offline_grace_s": 30.0, "eval_samples": 10000, "seed": args.seed},
        "train": {"learning_rate": args.learning_rate, "local_epochs": args.local_epochs, "batch_sizes": [32, 64]},
        "progressive": {"shrink_rounds": 1, "min_rounds_per_block": args.min_rounds_per_block,
                        "max_rounds_per_block": args.max_rounds_per_block, "max_extra_blocks": 1},
        "fedavg": {"rounds": args.fedavg_rounds},
    }


def run_strategy(args, root: Path, broker_url: str, specs, profile: Path, strategy: str) -> list[dict]:
    from coordinator.local_fleet import LocalFleet, read_metrics
    work = root / strategy
    t0 = time.monotonic()
    with LocalFleet(work, broker_url, fleet=f"bench-{strategy}") as fleet:
        fleet.start_run(_settings(args, work / "coordinator", profile, strategy, len(specs)), specs)
        seen = 0
        while fleet.procs["coordinator"].poll() is None:
            time.sleep(2)
            metrics = read_metrics(work / "coordinator")
            for m in metrics[seen:]:
                print(f"  {strategy} round {m['round']:>2} {_stage(m):<22} accuracy {m['accuracy']:.2%} "
                      f"({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
            seen = len(metrics)
        if fleet.procs["coordinator"].returncode != 0:
            raise SystemExit(f"the {strategy} coordinator failed:\n{fleet.log_tail('coordinator')}")
    return read_metrics(work / "coordinator")


def _stage(m: dict) -> str:
    s = m["stage"]
    return f"{s.get('phase')} block {s['block']}" if "block" in s else str(s.get("phase"))


def summarize(metrics: list[dict], budgets: dict) -> dict:
    rows = [(m, d, r) for m in metrics for d, r in m["devices"].items() if r["status"] == "accepted"]
    peaks = {}
    for _, d, r in rows:
        job, agent = peaks.get(d, (0, 0))
        peaks[d] = (max(job, r["peak_rss_bytes"]), max(agent, r["agent_peak_rss_bytes"]))
    up_ratio = max((r["uploaded_bytes"] / r["trained_bytes"] for _, _, r in rows), default=0)
    # the safetensors header (names, shapes, offsets) is a fixed cost: large next to a 2.6 KB part
    up_overhead = max((r["uploaded_bytes"] - r["trained_bytes"] for _, _, r in rows), default=0)
    repeat_down = []  # download in a round that trains the same part as the device's previous round
    last = {}
    for m, d, r in rows:
        part = (r["layers"][0], r["layers"][1], r["head"])
        if last.get(d) == (m["round"] - 1, part):
            repeat_down.append(r["downloaded_bytes"] / r["trained_bytes"])
        last[d] = (m["round"], part)
    return {"final_accuracy": metrics[-1]["accuracy"], "best_accuracy": max(m["accuracy"] for m in metrics),
            "rounds": len(metrics), "device_rounds": len(rows),
            "devices_used": sorted({d for _, d, _ in rows}), "peaks": peaks,
            "over_budget": [d for d, (job, agent) in peaks.items() if job + agent > budgets[d]],
            "max_upload_over_trained": up_ratio, "max_upload_overhead_bytes": up_overhead,
            "max_repeat_download_over_trained": max(repeat_down, default=None),
            "mean_up_kb": sum(r["uploaded_bytes"] for _, _, r in rows) / max(1, len(rows)) / 1024,
            "mean_down_kb": sum(r["downloaded_bytes"] for _, _, r in rows) / max(1, len(rows)) / 1024}


def plot(results: dict, specs, budgets: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, metrics in results.items():
        ax[0].plot([m["round"] for m in metrics], [100 * m["accuracy"] for m in metrics], marker=".", label=name)
    ax[0].set(xlabel="round", ylabel="test accuracy (%)", title="accuracy per round", ylim=(0, 100))
    ax[0].grid(alpha=0.3)
    ax[0].legend()
    for name, metrics in results.items():
        up = [sum(r.get("uploaded_bytes", 0) for r in m["devices"].values()) / 2**20 for m in metrics]
        down = [sum(r.get("downloaded_bytes", 0) for r in m["devices"].values()) / 2**20 for m in metrics]
        rounds = [m["round"] for m in metrics]
        ax[1].plot(rounds, up, marker=".", label=f"{name}: uploaded")
        ax[1].plot(rounds, down, marker=".", linestyle="--", label=f"{name}: downloaded")
    ax[1].set(xlabel="round", ylabel="MB, all devices", title="bytes per round", yscale="log")
    ax[1].grid(alpha=0.3)
    ax[1].legend(fontsize=8)
    ids = [s.device_id for s in specs]
    width = 0.38
    for k, (name, metrics) in enumerate(results.items()):
        peaks = summarize(metrics, budgets)["peaks"]
        vals = [sum(peaks.get(d, (0, 0))) / 2**20 for d in ids]
        ax[2].bar([i + (k - 0.5) * width for i in range(len(ids))], vals, width, label=f"{name}: job + agent peak")
    ax[2].scatter(range(len(ids)), [budgets[d] / 2**20 for d in ids], marker="_", s=600, color="k", label="budget")
    ax[2].set_xticks(range(len(ids)), ids, rotation=30, fontsize=8)
    ax[2].set(ylabel="MB", title="peak RSS per device (0 = not used)")
    ax[2].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=60000, help="Fashion-MNIST training images split over the fleet")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the non-IID split")
    p.add_argument("--per-tier", type=int, default=2, help="devices per tier")
    p.add_argument("--local-epochs", type=float, default=2.0)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--min-rounds-per-block", type=int, default=3)
    p.add_argument("--max-rounds-per-block", type=int, default=8)
    p.add_argument("--fedavg-rounds", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="12k samples, short schedules: checks the script, not the claim")
    p.add_argument("--workdir", type=Path, help="scratch directory (default: a temporary one)")
    p.add_argument("--write-docs", action="store_true", help="write results to docs/benchmarks.md and the plot")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.local_epochs, args.fedavg_rounds = 12000, 1.0, 4
        args.min_rounds_per_block, args.max_rounds_per_block = 1, 2
    from coordinator import export, zoo
    from coordinator.broker import EmbeddedBroker
    from coordinator.fleet_data import write_fleet_data
    from coordinator.local_fleet import DeviceSpec
    from edge_runtime.profiler import run_profile
    root = (args.workdir or Path(tempfile.mkdtemp(prefix="bench-federated-"))).resolve()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    log(f"workdir {root}")
    if not (root / "profile.json").exists():
        export.export(zoo.build("fmnist_cnn", seed=args.seed), root / "model")
        log("measuring the memory profile of fmnist_cnn (about 20 s)")
        run_profile(root / "model" / "manifest.json", [], [32, 64], root / "profiling", verify=False,
                    log=lambda _: None).save(root / "profile.json")
    ids = [f"{tier}-{i}" for tier in TIERS for i in range(args.per_tier)]
    dirs = write_fleet_data(root / "data", ids, args.samples, args.alpha, args.seed)
    specs = [DeviceSpec(d, d.rsplit("-", 1)[0], TIERS[d.rsplit("-", 1)[0]], dirs[d]) for d in ids]
    budgets = {s.device_id: s.budget_mb * 2**20 for s in specs}
    results, t0 = {}, time.monotonic()
    with EmbeddedBroker(root / "broker") as broker:
        for strategy in ("progressive", "fedavg"):
            log(f"running {strategy}")
            results[strategy] = run_strategy(args, root, broker.url, specs, root / "profile.json", strategy)
    minutes = (time.monotonic() - t0) / 60
    summary = {k: summarize(v, budgets) for k, v in results.items()}
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    if args.write_docs:
        plot(results, specs, budgets, IMAGE)
        write_section("bench_federated", _section(args, summary, results, specs, minutes))
        log(f"wrote docs/benchmarks.md and {IMAGE.relative_to(REPO)}")
    return 0


def _section(args, summary, results, specs, minutes) -> str:
    prog, fed = summary["progressive"], summary["fedavg"]
    lines = [
        "## Progressive training vs full-model FedAvg over MQTT (bench_federated)",
        "",
        f"Command: `.venv/bin/python tools/bench_federated.py --write-docs` ({minutes:.0f} min on {machine()}).",
        "",
        f"Fleet: {len(specs)} device agents in three tiers ({', '.join(f'{t} {mb} MB' for t, mb in TIERS.items())}, "
        f"{args.per_tier} each; the budget covers the agent and its training job), the real coordinator service and "
        f"Mosquitto on one machine. fmnist_cnn; {args.samples} Fashion-MNIST training images split by "
        f"Dirichlet({args.alpha}); {args.local_epochs:g} local epochs per round, AdamW lr {args.learning_rate:g}, "
        f"batch 32 or 64 as the device's budget allows. Progressive: one shrinking round per block, then "
        f"{args.min_rounds_per_block}-{args.max_rounds_per_block} rounds per block (effective-movement freezing). "
        f"FedAvg: {args.fedavg_rounds} rounds with every device that can hold whole-model training.",
        "",
        "| | progressive | full-model FedAvg |",
        "|---|---:|---:|",
        f"| final test accuracy (10k test images) | **{prog['final_accuracy']:.2%}** | {fed['final_accuracy']:.2%} |",
        f"| rounds / device-rounds | {prog['rounds']} / {prog['device_rounds']} | {fed['rounds']} / {fed['device_rounds']} |",
        f"| devices that trained | {len(prog['devices_used'])} of {len(specs)} | {len(fed['devices_used'])} of {len(specs)} |",
        f"| mean upload per device-round | {prog['mean_up_kb']:.0f} KB | {fed['mean_up_kb']:.0f} KB |",
        f"| mean download per device-round | {prog['mean_down_kb']:.0f} KB | {fed['mean_down_kb']:.0f} KB |",
        f"| largest upload / trained-part bytes | {prog['max_upload_over_trained']:.4f} | {fed['max_upload_over_trained']:.4f} |",
        f"| largest upload - trained-part bytes (the safetensors header) | {prog['max_upload_overhead_bytes']} B | "
        f"{fed['max_upload_overhead_bytes']} B |",
        f"| download when retraining the same part / its bytes | "
        f"{_ratio(prog['max_repeat_download_over_trained'])} | {_ratio(fed['max_repeat_download_over_trained'])} |",
        f"| devices over budget (job + agent peak) | {len(prog['over_budget'])} | {len(fed['over_budget'])} |",
        "",
        "Peak RSS per device, measured (training job's VmHWM + agent's VmHWM), MB:",
        "",
        "| device | budget | progressive | FedAvg |",
        "|---|---:|---:|---:|",
    ]
    for s in specs:
        cells = []
        for sm in (prog, fed):
            job, agent = sm["peaks"].get(s.device_id, (0, 0))
            cells.append(f"{job / 2**20:.0f} + {agent / 2**20:.0f}" if job else "excluded")
        lines.append(f"| {s.device_id} | {s.budget_mb} | {cells[0]} | {cells[1]} |")
    lines += ["", "Accuracy per round:", "",
              "| round | " + " | ".join(results) + " |", "|---:|" + "---:|" * len(results)]
    for i in range(max(len(v) for v in results.values())):
        cells = [f"{v[i]['accuracy']:.2%} ({_stage(v[i])})" if i < len(v) else "" for v in results.values()]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    lines += ["", "![accuracy, bytes and peaks per device](img/bench_federated.png)", ""]
    return "\n".join(lines)


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.4f}"


if __name__ == "__main__":
    sys.exit(main())
