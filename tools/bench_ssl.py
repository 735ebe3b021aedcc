#!/usr/bin/env python3
"""Benchmark: federated self-supervised learning a layer at a time (Federated Layer-wise Learning's setting)
against end-to-end federated SimCLR, on one fleet, in one run.

One run starts a Mosquitto, exports fmnist_ssl (a residual CNN with a SimCLR projection head
after every layer) and measures its memory profile here, splits Fashion-MNIST over the device
agents by Dirichlet(alpha) and takes their labels away (every labels.npy is zeros: a
contrastive task never reads it), then runs the real coordinator twice over the same devices:

  layerwise           one layer and its projection head at a time, `--rounds-per-layer` rounds
                      each; the frozen layers before it run on every batch of views (nothing can
                      be cached)
  layerwise-dropout   the same, each frozen residual layer skipped with probability `--dropout`
                      on every device and round (depth dropout)
  fedavg              the whole model with its last projection head: end-to-end federated SimCLR

Both train with NT-Xent on two numpy-augmented views of each image (crop, flip, contrast,
brightness, noise: edge_runtime/train/augment.py), the same local epochs and optimizer, and
the same number of device-rounds (rounds x devices: every device holds the whole model here,
so FedAvg excludes none). Every round is judged by a linear probe on the representation the
round trained (the output of its deepest layer, averaged over space), fitted on 5,000 labeled
training images no device holds and scored on the 10,000 test images. Checked: layer-wise's
final probe accuracy is within 3 points of end-to-end's. Reported: the same with depth dropout,
the untrained model's probe, and each device's peak memory (its training job's VmHWM and its
agent's) in every run.

    python tools/bench_ssl.py --write-docs        # about 15 min on 2 cores
    python tools/bench_ssl.py --quick             # a few minutes: checks the script, not the claim
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from bench_federated import run_strategy
from benchdocs import command_line, machine, write_section

from coordinator import strategies
from coordinator.round_metrics import RoundMetrics

MODEL = "fmnist_ssl"
RUNS = ("layerwise", "layerwise-dropout", "fedavg")
WITHIN_POINTS = 3.0
VALIDATION = 5000     # the probe's fitting set: training images no device holds
BUDGET_MB = 600       # every device holds whole-model training at the largest batch


def settings(args, root: Path, run: str, n_devices: int, layers: int) -> dict:
    """The coordinator's settings of one run; the two differ only in the schedule."""
    tables = strategies.settings_tables()
    tables["layerwise"].update(rounds_per_layer=args.rounds_per_layer, min_rounds_per_layer=args.rounds_per_layer,
                               dropout=args.dropout if run.endswith("-dropout") else 0.0, frozen_after=0)
    tables["fedavg"].update(rounds=args.rounds_per_layer * layers)       # the same device-rounds
    return {
        "service": {"workdir": str(root / run / "coordinator"), "model": MODEL, "strategy": run.split("-")[0],
                    "profile": str(root / "profile.json"), "min_devices": n_devices, "round_deadline_s": 1800.0,
                    "offline_grace_s": 30.0, "eval_samples": 10000, "seed": args.seed,
                    "validation_data": str(root / "validation"), "validation_samples": VALIDATION},
        "train": {"learning_rate": args.learning_rate, "local_epochs": args.local_epochs,
                  "batch_sizes": [args.batch_size]},
        **tables,
    }


def unlabeled(dirs: dict[str, Path]) -> None:
    """Take the devices' labels away: zeros in their place (the data contract wants the file; nothing reads it)."""
    from edge_runtime.train.datasets import LocalDataset
    for folder in dirs.values():
        data = LocalDataset(folder)
        labels = data.labels()
        if labels.any():
            LocalDataset.write(folder, np.load(data.inputs_path), np.zeros_like(labels))


def summarize(metrics: list[RoundMetrics]) -> dict:
    peaks: dict[str, tuple[int, int]] = {}
    for m in metrics:
        for d, r in m.accepted().items():
            job, agent = peaks.get(d, (0, 0))
            peaks[d] = (max(job, r.peak_rss_bytes), max(agent, r.agent_peak_rss_bytes))
    return {"final_accuracy": metrics[-1].accuracy, "best_accuracy": max(m.accuracy for m in metrics),
            "rounds": len(metrics), "device_rounds": sum(len(m.accepted()) for m in metrics),
            "accuracy": [m.accuracy for m in metrics], "stages": [dict(m.stage) for m in metrics],
            "job_peak_mb": max(j for j, _ in peaks.values()) / 2**20,
            "device_peak_mb": max(j + a for j, a in peaks.values()) / 2**20,
            "minutes": (metrics[-1].closed_at - metrics[0].opened_at) / 60}


def initial_probe(root: Path) -> float:
    """The probe's accuracy on the untrained model's whole representation: what training has to beat (random
    convolutions already give Fashion-MNIST a usable representation)."""
    from coordinator.model.export import load_weights
    from coordinator.model.probe import probe
    from edge_runtime.train.datasets import LocalDataset, load_fashion_mnist
    from edge_runtime.wire.manifest import Manifest
    manifest = Manifest.load(root / "model" / "manifest.json")
    validation = LocalDataset(root / "validation")
    return probe(manifest, load_weights(manifest), (np.load(validation.inputs_path), validation.labels()),
                 load_fashion_mnist("test"), len(manifest.layers) - 1)["accuracy"]


def section(args, command: str, s: dict, n_devices: int, layers: int) -> str:
    lw, dd, fa = s["layerwise"], s["layerwise-dropout"], s["fedavg"]
    gap = 100 * (fa["final_accuracy"] - lw["final_accuracy"])
    ok = gap <= WITHIN_POINTS and lw["device_rounds"] == fa["device_rounds"]
    runs = (lw, dd, fa)
    minutes = sum(r["minutes"] for r in runs)

    def row(what: str, cell) -> str:
        return f"| {what} | " + " | ".join(cell(r) for r in runs) + " |"
    lines = [
        "## Federated self-supervised learning, a layer at a time, against end-to-end federated SimCLR (bench_ssl)",
        "",
        f"Command: `{command}` ({minutes:.0f} min of rounds on {machine()}).",
        "",
        f"{n_devices} device agents, {args.samples} Fashion-MNIST training images split by Dirichlet({args.alpha}) "
        f"with their labels taken away, {MODEL} ({layers} layers with BatchNorm, a SimCLR projection head after "
        f"each), NT-Xent on two augmented views per image (numpy on the device), batch {args.batch_size} views, "
        f"{args.local_epochs:g} local epoch(s) of AdamW (lr {args.learning_rate:g}) per round. *layer-wise*: "
        f"{args.rounds_per_layer} rounds per layer, the frozen layers before it run on every batch; *with depth "
        f"dropout*: the same, each frozen residual layer skipped with probability {args.dropout:g}; *end-to-end*: "
        f"FedAvg of the whole model, {args.rounds_per_layer * layers} rounds. Each round is judged by a linear probe "
        f"(multinomial logistic regression on the representation after the deepest layer trained, averaged over "
        f"space), fitted on {VALIDATION} labeled training images no device holds, scored on the 10,000 test images; "
        f"the untrained model's probe scores {s['initial']:.2%}.",
        "",
        "| | layer-wise SSL | with depth dropout | end-to-end SimCLR (FedAvg) |",
        "|---|---:|---:|---:|",
        row("final probe accuracy", lambda r: f"{r['final_accuracy']:.2%}"),
        row("best probe accuracy", lambda r: f"{r['best_accuracy']:.2%}"),
        row("rounds / device-rounds", lambda r: f"{r['rounds']} / {r['device_rounds']}"),
        row("largest training job peak (VmHWM)", lambda r: f"{r['job_peak_mb']:.0f} MB"),
        row("largest device peak (job + agent)", lambda r: f"{r['device_peak_mb']:.0f} MB"),
        row("minutes of rounds", lambda r: f"{r['minutes']:.1f}"),
        "",
        f"- **{'PASS' if ok else 'FAIL'}**: layer-wise SSL's final probe accuracy is within {WITHIN_POINTS:g} points "
        f"of end-to-end SimCLR's with the same device-rounds: {lw['final_accuracy']:.2%} against "
        f"{fa['final_accuracy']:.2%} ({-gap:+.2f} points).",
        f"- With depth dropout {args.dropout:g}: {dd['final_accuracy']:.2%} "
        f"({100 * (dd['final_accuracy'] - lw['final_accuracy']):+.2f} points against layer-wise without it).",
        "",
        "Probe accuracy per round:",
        "",
        "| round | layer-wise (layer) | with depth dropout | end-to-end |",
        "|---:|---:|---:|---:|",
    ]
    for i in range(max(r["rounds"] for r in runs)):
        cells = [f"{lw['accuracy'][i]:.2%} ({lw['stages'][i].get('layer', '')})" if i < lw["rounds"] else "",
                 f"{dd['accuracy'][i]:.2%}" if i < dd["rounds"] else "",
                 f"{fa['accuracy'][i]:.2%}" if i < fa["rounds"] else ""]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--samples", type=int, default=8000, help="Fashion-MNIST training images split over the fleet")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the non-IID split")
    p.add_argument("--rounds-per-layer", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.5, help="depth dropout of the frozen residual layers")
    p.add_argument("--local-epochs", type=float, default=1.0)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=128, help="views per step: half as many images, two views each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="2,000 images, one round per layer: checks the script")
    p.add_argument("--workdir", type=Path, help="scratch directory (default: a temporary one); a run already "
                                                "finished in it is read back, not repeated")
    p.add_argument("--write-docs", action="store_true", help="write the section of docs/benchmarks.md")
    args = p.parse_args(argv)
    if args.quick:
        if args.write_docs:
            p.error("--quick checks the script: its runs are no benchmark")
        args.samples, args.rounds_per_layer = 2000, 1
    command = command_line("bench_ssl.py", argv if argv is not None else sys.argv[1:])
    from coordinator.local.data import write_fleet_data, write_validation_data
    from coordinator.local.fleet import DeviceSpec
    from coordinator.model.zoo_profile import measured_profile
    from coordinator.ops.broker import EmbeddedBroker
    from edge_runtime.wire.manifest import Manifest
    root = (args.workdir or Path(tempfile.mkdtemp(prefix="bench-ssl-"))).resolve()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    log(f"workdir {root}")
    measured_profile(root, MODEL, [args.batch_size // 2, args.batch_size], args.seed, log=log)
    layers = sum(1 for layer in Manifest.load(root / "model" / "manifest.json").layers if layer.params)
    ids = [f"dev-{i}" for i in range(args.devices)]
    dirs = write_fleet_data(root / "data", ids, args.samples, args.alpha, args.seed)
    unlabeled(dirs)
    write_validation_data(root / "validation", args.samples, VALIDATION, args.seed)
    specs = [DeviceSpec(d, "ssl", BUDGET_MB, dirs[d]) for d in ids]
    results = {}
    with EmbeddedBroker(root / "broker") as broker:
        for run in RUNS:
            log(f"running {run}")
            results[run] = run_strategy(args, root, broker.url, specs, run,
                                        settings=settings(args, root, run, len(specs), layers))
    summary = {r: summarize(results[r]) for r in RUNS}
    summary["initial"] = initial_probe(root)
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({r: {k: v for k, v in s.items() if k not in ("accuracy", "stages")} if isinstance(s, dict)
                      else s for r, s in summary.items()}, indent=1))
    if args.write_docs:
        write_section("bench_ssl", section(args, command, summary, len(specs), layers))
        log("wrote docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
