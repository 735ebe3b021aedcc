#!/usr/bin/env python3
"""Benchmark: FedIN's model per tier against FedAvg of one architecture, on one fleet and one data split.

One run starts a Mosquitto, measures the memory profile of the fmnist_fedin family on this
machine (every member, as the coordinator schedules from it), gives each of three tiers a
budget between its member's measured need and the next member's, splits Fashion-MNIST
across the devices by Dirichlet(alpha), then runs the real coordinator service and the real
device agents (each a process, each training job under a hard limit of its device's budget)
once per schedule, on the same data:

    fedin          strategy fedin: each tier its largest member, shared features, IN training
    fedin-no-in    the same without sharing features (so without IN training): the ablation
    fedavg-small   strategy fedin with member = small and no sharing: FedAvg of the smallest
                   member on every device, the architecture every tier can hold
    fedavg-large   member = large, no sharing: FedAvg of the largest member on the devices that
                   fit it only (the other tiers sit it out, as a real deployment must)

A tier's accuracy is the test accuracy (10,000 Fashion-MNIST test images) in the last round
of the member its devices trained. The targets: every tier's FedIN model above fedavg-small,
and the largest tier's above fedavg-large.

    python tools/bench_fedin.py --write-docs --workdir W    # the recorded run
    python tools/bench_fedin.py --quick                     # a few minutes: checks the script, not the claim
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchdocs import machine, write_section

from coordinator import strategies
from coordinator.round_metrics import RoundMetrics, member_tiers

REPO = Path(__file__).resolve().parent.parent
IMAGE = REPO / "docs" / "img" / "bench_fedin.png"
MODEL = "fmnist_fedin"
BATCH = 32
MARGIN = 0.10           # [train] margin: what the coordinator adds to a predicted peak
RUNS = {"fedin": {}, "fedin-no-in": {"share_features": False},
        "fedavg-small": {"member": "small", "share_features": False},
        "fedavg-large": {"member": "large", "share_features": False}}
LABELS = {"fedin": "FedIN", "fedin-no-in": "FedIN without IN training", "fedavg-small": "FedAvg, smallest member",
          "fedavg-large": "FedAvg, largest member (devices that fit it)"}


def _settings(args, work: Path, root: Path, run: str, n_devices: int) -> dict:
    tables = strategies.settings_tables()
    tables["fedin"].update(rounds=args.rounds, **RUNS[run])
    return {
        "service": {"workdir": str(work), "model": MODEL, "strategy": "fedin", "profile": str(root / "profile.json"),
                    "min_devices": n_devices, "round_deadline_s": 1800.0, "offline_grace_s": 30.0,
                    "eval_samples": 10000, "seed": args.seed},
        "train": {"learning_rate": args.learning_rate, "local_epochs": args.local_epochs, "batch_sizes": [BATCH]},
        **tables,
    }


def run_one(args, root: Path, work: Path, broker_url: str, specs, run: str) -> list[RoundMetrics]:
    """One schedule over the fleet until its coordinator finishes; a run finished in `work` is read back."""
    from coordinator.local.fleet import LocalFleet, read_metrics
    from coordinator.round_metrics import models_text
    done = read_metrics(work / "coordinator")
    if done and done[-1].get("finished"):
        return [RoundMetrics.from_dict(m) for m in done]
    t0 = time.monotonic()

    def closed(m: RoundMetrics) -> None:
        idle = f" idle {sorted(m.idle)}" if m.idle else ""
        print(f"  {run} round {m.round:>2}: {models_text(m.models)}{idle} ({time.monotonic() - t0:.0f} s)",
              file=sys.stderr, flush=True)

    with LocalFleet(work, broker_url, fleet=f"bench-fedin-{run}") as fleet:
        fleet.start_run(_settings(args, work / "coordinator", root, run, len(specs)), specs)
        code = fleet.follow(work / "coordinator", closed, every_s=2.0)
        if code != 0:
            raise SystemExit(f"the {run} coordinator failed:\n{fleet.log_tail('coordinator')}")
    return [RoundMetrics.from_dict(m) for m in read_metrics(work / "coordinator")]


def tier_accuracy(metrics: list[RoundMetrics]) -> dict[str, tuple[str, float]]:
    """tier -> (the member its devices trained, that member's test accuracy in the last round)."""
    last = metrics[-1].models
    return {tier: (member, last[member]["accuracy"]) for member, tiers in member_tiers(metrics).items()
            for tier in tiers}


def plot(results: dict, tiers: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(tiers), figsize=(4.2 * len(tiers), 3.6), sharey=True)
    for ax, tier in zip(axes, tiers):
        for run, metrics in results.items():
            member = tier_accuracy(metrics).get(tier, (None,))[0]
            if member is None:
                continue
            ax.plot([m.round for m in metrics], [100 * m.models[member]["accuracy"] for m in metrics], marker="o",
                    ms=3, label=f"{LABELS[run]} ({member})")
        ax.set_title(tier)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy of the tier's model (%)")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=12000, help="Fashion-MNIST training images split over the fleet")
    p.add_argument("--rounds", type=int, default=8, help="rounds of every run (each a local epoch on every device)")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the split (smaller: less IID)")
    p.add_argument("--per-tier", type=int, default=2, help="devices per tier")
    p.add_argument("--local-epochs", type=float, default=1.0)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="3000 samples, 2 rounds: checks the script, not the claim")
    p.add_argument("--workdir", type=Path, help="scratch directory (default: a temporary one); "
                                                "a run already finished in it is read back, not repeated")
    p.add_argument("--write-docs", action="store_true",
                   help="write the section of docs/benchmarks.md and docs/img/bench_fedin.png")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.rounds = 3000, 2
    from coordinator.local.data import write_fleet_data
    from coordinator.local.fleet import DeviceSpec
    from coordinator.model.zoo_profile import measured_profile, member_budgets
    from coordinator.ops.broker import EmbeddedBroker
    root = (args.workdir or Path(tempfile.mkdtemp(prefix="bench-fedin-"))).resolve()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    log(f"workdir {root}")
    margin = MARGIN
    profile = measured_profile(root, MODEL, [BATCH, 2 * BATCH], args.seed, margin=margin, log=log)
    budgets = {f"tier-{member}": mb for member, mb in
               member_budgets(profile, root / "model" / "manifest.json", BATCH, margin).items()}
    log("tiers: " + ", ".join(f"{t} {mb:.0f} MB" for t, mb in budgets.items()))
    ids = [f"{tier}-{i}" for tier in budgets for i in range(args.per_tier)]
    dirs = write_fleet_data(root / "data", ids, args.samples, args.alpha, args.seed)
    specs = [DeviceSpec(d, d.rsplit("-", 1)[0], budgets[d.rsplit("-", 1)[0]], dirs[d]) for d in ids]
    tag = f"s{args.samples}-r{args.rounds}-a{args.alpha:g}-e{args.local_epochs:g}-lr{args.learning_rate:g}"
    t_start, results, minutes = time.monotonic(), {}, {}
    with EmbeddedBroker(root / "broker") as broker:
        for run in RUNS:
            log(f"{run}")
            results[run] = run_one(args, root, root / tag / run, broker.url, specs, run)
            minutes[run] = (results[run][-1].closed_at - results[run][0].opened_at) / 60
    tiers = list(budgets)
    table = {run: tier_accuracy(metrics) for run, metrics in results.items()}
    worst = {run: {t: max((r.device_peak_bytes / 2**20 for m in metrics for r in m.accepted().values()
                           if r.tier == t), default=None) for t in tiers} for run, metrics in results.items()}
    (root / "summary.json").write_text(json.dumps({"budgets_mb": budgets, "accuracy": table, "peak_mb": worst,
                                                   "minutes": minutes}, indent=1))
    text = _table(table, tiers, budgets)
    print(text)
    verdict = _verdict(table, tiers)
    print(verdict)
    log(f"{(time.monotonic() - t_start) / 60:.1f} min")
    if args.write_docs:
        plot(results, tiers, IMAGE)
        write_section("bench_fedin", _section(args, text, verdict, budgets, worst, minutes, ids))
        log(f"wrote docs/benchmarks.md and {IMAGE.relative_to(REPO)}")
    return 0


def _table(table: dict, tiers: list[str], budgets: dict) -> str:
    lines = ["| method | " + " | ".join(f"{t} ({budgets[t]:.0f} MB)" for t in tiers) + " |",
             "|---|" + "---:|" * len(tiers)]
    for run, per_tier in table.items():
        cells = [f"{per_tier[t][1]:.2%} ({per_tier[t][0]})" if t in per_tier else "- (cannot hold it)" for t in tiers]
        lines.append(f"| {LABELS[run]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _verdict(table: dict, tiers: list[str]) -> str:
    fedin, small, large = table["fedin"], table["fedavg-small"], table["fedavg-large"]
    above_small = [t for t in tiers if t in fedin and t in small and fedin[t][1] > small[t][1]]
    top = tiers[-1]
    above_large = top in fedin and top in large and fedin[top][1] > large[top][1]
    return (f"every tier's FedIN model above FedAvg of the smallest member: "
            f"{'yes' if len(above_small) == len(tiers) else 'no'} ({len(above_small)} of {len(tiers)} tiers); "
            f"the largest tier's above FedAvg of the largest member: {'yes' if above_large else 'no'}")


def _section(args, text: str, verdict: str, budgets: dict, worst: dict, minutes: dict, ids: list[str]) -> str:
    peak_rows = "\n".join(f"| {LABELS[run]} | " + " | ".join(
        f"{p:.0f} of {budgets[t]:.0f}" if p is not None else "-" for t, p in per.items()) + " |"
        for run, per in worst.items())
    return f"""## A model per tier: FedIN against FedAvg of one architecture

`python tools/bench_fedin.py --write-docs` ({sum(minutes.values()):.0f} min on {machine()}).

The fleet: {len(ids)} devices, {args.per_tier} per tier, each tier's budget between its member's
measured need at batch {BATCH} (with the 10 % margin, plus 6 %) and the next member's (this machine's
profile of `{MODEL}`, `zoo_profile.member_budgets`, plus the agent's 48 MB reserve). {args.samples} Fashion-MNIST images split by
Dirichlet({args.alpha:g}), the same split for every run; {args.rounds} rounds of {args.local_epochs:g} local
epoch(s), AdamW at {args.learning_rate:g}. A tier's accuracy is the last round's test accuracy (10,000
images) of the member its devices trained; FedIN shares 32 rows per device per round and trains
with in_weight 1.

{text}

{verdict}.

Largest peak per device (training job + agent, MB) against its budget:

| method | {" | ".join(budgets)} |
|---|{"---:|" * len(budgets)}
{peak_rows}

![test accuracy per round, per tier](img/bench_fedin.png)
"""


if __name__ == "__main__":
    sys.exit(main())
