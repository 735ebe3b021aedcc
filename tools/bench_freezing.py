#!/usr/bin/env python3
"""Benchmark: does the freezing rule decide? Progressive training (ProFL), twice on one fleet:

  capped     every block trains until its round cap (the rule off: a patience longer than the cap)
  freezing   the rule as shipped (coordinator/strategies/freezing.py, its default settings: a
             block freezes once its sub-model's accuracy on the coordinator's validation
             images stops rising)

The fleet, data and training are tools/bench_federated.py's (six real device agents in three
tiers, Fashion-MNIST split by Dirichlet(0.5), fmnist_cnn, the real coordinator over
Mosquitto, with 5,000 training images no device holds as its validation set); only the
progressive settings differ: `--max-rounds-per-block` (12) is the cap both runs share.
Checked, from the two runs' metrics:

  - the freezing run ends in fewer rounds than the capped one,
  - within 0.5 points of the capped run's final test accuracy,
  - at least half of the blocks freeze before their cap.

The capped run is also the recorded federated history the rule's tests replay: --record
writes tests/data/progressive_history.json (per growing round: the block, its validation
accuracy, the test accuracy).

    python tools/bench_freezing.py --write-docs --record      # about 40 min on 2 cores
    python tools/bench_freezing.py --quick                     # minutes: checks the script, not the claim
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bench_federated import TIERS, VALIDATION, run_strategy
from benchdocs import command_line, machine, write_section

from coordinator.round_metrics import RoundMetrics
from coordinator.strategies.freezing import FreezeRule

REPO = Path(__file__).resolve().parent.parent
HISTORY = REPO / "tests" / "data" / "progressive_history.json"
RUNS = ("progressive-capped", "progressive")
WITHIN_POINTS = 0.5


def _capped(settings: dict) -> None:
    """The rule off: it would need more rounds under its threshold than a block may train."""
    settings["progressive"]["freeze_patience"] = settings["progressive"]["max_rounds_per_block"] + 1


def stages(metrics: list[RoundMetrics]) -> dict[int, list[RoundMetrics]]:
    """The growing stage's rounds per block, in order."""
    out: dict[int, list[RoundMetrics]] = {}
    for m in metrics:
        if m.stage.get("phase") == "growing":
            out.setdefault(int(m.stage["block"]), []).append(m)
    return out


def history(metrics: list[RoundMetrics], cap: int, command: str) -> dict:
    """The recorded history the rule's tests replay: the growing rounds of a run whose blocks all trained to the
    cap."""
    return {"what": "progressive training with freezing off, every block to its cap: per growing round the block, "
                    "its sub-model's accuracy on the coordinator's validation images (what the rule reads) and the "
                    "round's test accuracy",
            "command": command, "cap": cap,
            "rounds": [{"round": m.round, "block": int(m.stage["block"]), "accuracy": m.accuracy,
                        "validation_accuracy": m.schedule.get("validation_accuracy")}
                       for ms in stages(metrics).values() for m in ms]}


def summarize(metrics: list[RoundMetrics], cap: int) -> dict:
    per_block = {b: len(ms) for b, ms in stages(metrics).items()}
    return {"final_accuracy": metrics[-1].accuracy, "rounds": len(metrics), "rounds_per_block": per_block,
            "froze_early": sorted(b for b, n in per_block.items() if n < cap),
            "signals": {b: [m.schedule.get("accuracy_slope") for m in ms] for b, ms in stages(metrics).items()},
            "validation": {b: [m.schedule.get("validation_accuracy") for m in ms] for b, ms in stages(metrics).items()}}


def section(args, command: str, s: dict, results: dict, minutes: dict) -> str:
    capped, freezing = s["progressive-capped"], s["progressive"]
    rule = FreezeRule()
    blocks = sorted(freezing["rounds_per_block"])
    gap = 100 * (capped["final_accuracy"] - freezing["final_accuracy"])
    checks = [
        (freezing["rounds"] < capped["rounds"],
         f"the freezing run ends in fewer rounds: {freezing['rounds']} against {capped['rounds']}"),
        (gap <= WITHIN_POINTS,
         f"within {WITHIN_POINTS} points of the capped run's final accuracy: {freezing['final_accuracy']:.2%} "
         f"against {capped['final_accuracy']:.2%} ({-gap:+.2f} points)"),
        (2 * len(freezing["froze_early"]) >= len(blocks),
         f"at least half of the blocks freeze before their cap: {len(freezing['froze_early'])} of {len(blocks)} "
         f"(blocks {', '.join(map(str, freezing['froze_early'])) or 'none'})"),
    ]
    lines = [
        "## Freezing that decides: progressive training with the rule and with round caps only (bench_freezing)",
        "",
        f"Command: `{command}` ({sum(minutes.values()):.0f} min of rounds on {machine()}).",
        "",
        f"The fleet and training of bench_federated (above): {args.per_tier * len(TIERS)} device agents in three "
        f"tiers, {args.samples} Fashion-MNIST images split by Dirichlet({args.alpha}), fmnist_cnn, "
        f"{args.local_epochs:g} local epochs of AdamW (lr {args.learning_rate:g}) per round. Progressive, one "
        f"shrinking round per block, then {args.min_rounds_per_block}-{args.max_rounds_per_block} rounds per block. "
        f"*capped*: the freezing rule off, every block trains to the cap; *freezing*: the rule as shipped "
        f"(window {rule.window}, threshold {rule.threshold:g}, patience {rule.patience}: a block freezes once the "
        f"least-squares slope of its last {rule.window} validation accuracies is under {rule.threshold:g} points a "
        f"round for {rule.patience} round(s) in a row; the validation set is {VALIDATION} training images no device "
        f"holds, disjoint from the test set).",
        "",
        "| | capped | freezing |",
        "|---|---:|---:|",
        f"| final test accuracy (10k test images) | {capped['final_accuracy']:.2%} | "
        f"{freezing['final_accuracy']:.2%} |",
        f"| rounds | {capped['rounds']} | {freezing['rounds']} |",
        f"| growing rounds per block | {_per_block(capped)} | {_per_block(freezing)} |",
        "",
        *[f"- **{'PASS' if ok else 'FAIL'}**: {text}" for ok, text in checks],
        "",
        "Each block's growing stage, round by round: validation accuracy (%) / the rule's slope (points a round; - "
        "before the window fills). Capped run first, freezing run second:",
        "",
    ]
    for name, run in (("capped", capped), ("freezing", freezing)):
        for b in sorted(run["rounds_per_block"]):
            cells = [("-" if a is None else f"{100 * a:.1f}") + " / " + ("-" if v is None else f"{v:+.2f}")
                     for a, v in zip(run["validation"][b], run["signals"][b])]
            lines.append(f"- {name}, block {b}: {', '.join(cells)}")
    lines += ["", "Test accuracy per round:", "", "| round | capped | freezing |", "|---:|---:|---:|"]
    for i in range(max(len(v) for v in results.values())):
        cells = [f"{results[r][i].accuracy:.2%} ({_stage(results[r][i])})" if i < len(results[r]) else ""
                 for r in RUNS]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _per_block(s: dict) -> str:
    return ", ".join(f"{b}: {n}" for b, n in sorted(s["rounds_per_block"].items()))


def _stage(m: RoundMetrics) -> str:
    return f"{m.stage.get('phase', '?')} {m.stage.get('block', '')}".strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=50000)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--per-tier", type=int, default=2)
    p.add_argument("--local-epochs", type=float, default=2.0)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--min-rounds-per-block", type=int, default=2)
    p.add_argument("--max-rounds-per-block", type=int, default=12, help="the cap both runs share (default 12)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="12k samples, 1 local epoch, a cap of 6: checks the script")
    p.add_argument("--workdir", type=Path, help="scratch directory (default: a temporary one); a run already "
                                                "finished in it is read back, not repeated")
    p.add_argument("--record", action="store_true", help=f"write the capped run's history to "
                                                         f"{HISTORY.relative_to(REPO)} (the rule's tests replay it)")
    p.add_argument("--write-docs", action="store_true", help="write the section of docs/benchmarks.md")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.local_epochs, args.max_rounds_per_block = 12000, 1.0, 6
    if args.quick and (args.record or args.write_docs):
        p.error("--quick checks the script: its runs are no record and no benchmark")
    # what bench_federated's settings read besides the progressive bounds
    args.fedavg_rounds, args.selective_rounds, args.rounds_per_layer = 1, 1, 1
    args.finetune_rounds, args.finetune_epochs, args.finetune_learning_rate = 1, 1.0, 1e-3
    command = command_line("bench_freezing.py", argv if argv is not None else sys.argv[1:])
    from coordinator.local.data import write_fleet_data, write_validation_data
    from coordinator.local.fleet import DeviceSpec
    from coordinator.model.zoo_profile import measured_profile
    from coordinator.ops.broker import EmbeddedBroker
    root = (args.workdir or Path(tempfile.mkdtemp(prefix="bench-freezing-"))).resolve()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    log(f"workdir {root}")
    measured_profile(root, "fmnist_cnn", [32, 64], args.seed, log=log)
    ids = [f"{tier}-{i}" for tier in TIERS for i in range(args.per_tier)]
    dirs = write_fleet_data(root / "data", ids, args.samples, args.alpha, args.seed)
    write_validation_data(root / "validation", args.samples, VALIDATION, args.seed)
    specs = [DeviceSpec(d, d.rsplit("-", 1)[0], TIERS[d.rsplit("-", 1)[0]], dirs[d]) for d in ids]
    results, minutes = {}, {}
    with EmbeddedBroker(root / "broker") as broker:
        for run in RUNS:
            log(f"running {run}")
            results[run] = run_strategy(args, root, broker.url, specs, run,
                                        adjust=_capped if run == "progressive-capped" else None)
            minutes[run] = (results[run][-1].closed_at - results[run][0].opened_at) / 60
    summary = {r: summarize(results[r], args.max_rounds_per_block) for r in RUNS}
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    if args.record:
        HISTORY.parent.mkdir(parents=True, exist_ok=True)
        HISTORY.write_text(json.dumps(history(results["progressive-capped"], args.max_rounds_per_block, command),
                                      indent=1) + "\n")
        log(f"wrote {HISTORY.relative_to(REPO)}")
    if args.write_docs:
        write_section("bench_freezing", section(args, command, summary, results, minutes))
        log("wrote docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
