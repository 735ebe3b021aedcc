#!/usr/bin/env python3
"""Benchmark: what one or two poisoning devices do to the global model under each aggregation rule.

Federated rounds in one process, with the real pieces: every device trains the whole
fmnist_cnn (FedAvg's part) with the device trainer (edge_runtime.train.trainer.train on
the coordinator's step graphs), every update passes the intake's check
(coordinator.strategies.aggregation.validate_update, the default 10x bound), each
device's weight is capped from its claimed sample count and its past claims as the
service does (AggregationSettings.weights, i.e. capped_examples), and the FedAvg
strategy's own `aggregate` combines them with the rule under test. Only MQTT, the
state store and the device processes are left out: they do not change the arithmetic.

Fleet: 8 devices holding Fashion-MNIST split by Dirichlet(0.5); the same data, seeds and
starting weights for every rule. Scenarios:

  none                 no attacker
  sign_flip x1 / x2    the attacker(s) send global - 8 x their honest change
  noise x1 / x2        global + Gaussian noise with 8 x the norm of their honest change (per tensor)
  inflated x1 / x2     global + 8 x their honest change, claiming 10^15 samples

Rules: `today` (the weighted mean, every claimed sample count trusted: the aggregation
before this change), and mean / median / trimmed_mean / clipped_mean with the default
[aggregation] settings (claims capped, at most max_share of a round per device).
Final accuracy is on the 10,000 Fashion-MNIST test images after the last round.

Targets (for the default rule): one attacker costs at most 2 points and two at most 5
against the same rule without attackers; without attackers the default costs at most 1
point against `today`.

    python tools/bench_poisoning.py --write-docs       # about 25 minutes on 2 cores
    python tools/bench_poisoning.py --quick            # a few minutes: checks the script, not the claim
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchdocs import machine, write_section  # noqa: E402

from coordinator.strategies.aggregation import RULES, AggregationSettings  # noqa: E402

ATTACKS = ("sign_flip", "noise", "inflated")
SCENARIOS = ("none",) + tuple(f"{a} x{k}" for k in (1, 2) for a in ATTACKS)
TODAY = "today"
ALL_RULES = (TODAY,) + RULES
SCALE = 8.0
INFLATED_CLAIM = 10 ** 15
TARGETS = {1: 2.0, 2: 5.0}        # points an attack may cost the default rule, by number of attackers
CLEAN_TARGET = 1.0                 # points the default may cost against today's aggregation without attackers


def settings_for(rule: str, overrides: dict | None = None) -> AggregationSettings:
    """The rule with the default settings (or these overrides); `today` is the weighted mean, every claim trusted."""
    if rule == TODAY:
        return AggregationSettings(rule="mean", max_share=1.0)
    return replace(AggregationSettings(rule=rule), **(overrides or {}))


def attack(kind: str, update: dict, global_weights, rng: np.random.Generator) -> dict:
    """The update an attacker sends instead of its honest one."""
    out = {}
    for name, value in update.items():
        g = global_weights[name].astype(np.float64)
        change = value.astype(np.float64) - g
        if kind == "sign_flip":
            new = g - SCALE * change
        elif kind == "noise":
            noise = rng.standard_normal(change.shape)
            new = g + noise * (SCALE * np.linalg.norm(change) / (np.linalg.norm(noise) + 1e-12))
        elif kind == "inflated":
            new = g + SCALE * change
        else:
            raise ValueError(kind)
        out[name] = new.astype(np.float32)
    return out


def train_config(job: dict, round_no: int):
    """A round's training settings, the same for every device (the service's seed rule)."""
    from edge_runtime.wire.train_config import TrainConfig
    return TrainConfig(optimizer="adamw", learning_rate=job["learning_rate"], batch_size=job["batch_size"],
                       epochs=job["local_epochs"], seed=int(job["seed"] * 100003 + round_no), threads=1)


def train_round1(job: dict) -> None:
    """Every device's round-1 training from the initial weights, once for all runs."""
    from edge_runtime.train.datasets import LocalDataset
    from edge_runtime.train.trainer import train
    from edge_runtime.wire import weights as wcodec
    from edge_runtime.wire.manifest import Manifest
    from edge_runtime.wire.part import TrainablePart
    m = Manifest.load(Path(job["manifest"]))
    weights = wcodec.load(Path(job["weights"]))
    last = len(m.layers) - 1
    part = TrainablePart(span=tuple(range(last + 1)), trainable_layers=tuple(range(last + 1)), head=m.final_head.index)
    for d, path in job["data"].items():
        train(m, weights, LocalDataset(Path(path)), part, train_config(job, 1), Path(job["root"]) / "round1" / d,
              "r1", return_weights=False)


def run(job: dict) -> dict:
    """One federated run: `rounds` rounds of FedAvg, one rule, one scenario. Returns its accuracy per round."""
    from coordinator.model.graphs import evaluate
    from coordinator.strategies.aggregation import UpdateCheck, UpdateRejected, validate_update
    from coordinator.strategies.base import Device, Result
    from coordinator.strategies.fedavg import FedAvg
    from edge_runtime.train.datasets import LocalDataset, load_fashion_mnist
    from edge_runtime.train.trainer import train
    from edge_runtime.wire import weights as wcodec
    from edge_runtime.wire.manifest import Manifest

    t0 = time.monotonic()
    root = Path(job["root"])
    m = Manifest.load(Path(job["manifest"]))
    weights = wcodec.load(Path(job["weights"]))
    datasets = {d: LocalDataset(Path(p)) for d, p in job["data"].items()}
    attackers = job["attackers"]
    kind = job["attack"]
    strategy = FedAvg(m, lambda first, last, batch: 0.0, batch_sizes=[job["batch_size"]], margin=0.0,
                      rounds=job["rounds"], aggregation=settings_for(job["rule"], job["overrides"]))
    devices = [Device(d, "bench", 1 << 30) for d in datasets]
    shapes = {n: s.shape for n, s in m.param_specs().items()}
    history: dict[str, list[int]] = {d: [] for d in datasets}
    rng = np.random.default_rng(job["seed"] + 7)
    state = Path(tempfile.mkdtemp(prefix="run-", dir=root))
    rejected, accuracy, shares = 0, [], []
    xt, yt = load_fashion_mnist("test")
    for round_no in range(1, job["rounds"] + 1):
        plan = strategy.plan_round(round_no, devices)
        config = train_config(job, round_no)
        sent, claims = {}, {}
        for a in plan.assignments:
            # round 1 starts from the same weights in every run: the parent trained it once (the trainer's
            # stored result is returned for the same weights, data, settings and part)
            where = root / "round1" if round_no == 1 else state
            trained, result = train(m, weights, datasets[a.device_id], a.part(), config, where / a.device_id,
                                    f"r{round_no}")
            claims[a.device_id] = result.num_examples
            if a.device_id in attackers:
                trained = attack(kind, trained, weights, rng)
                if kind == "inflated":
                    claims[a.device_id] = INFLATED_CLAIM
            try:
                validate_update(trained, {n: shapes[n] for n in a.trained_names(m)}, weights, UpdateCheck())
            except UpdateRejected:
                rejected += 1
                continue
            sent[a.device_id] = (a, trained)
        if job["rule"] == TODAY:
            granted = {d: float(claims[d]) for d in sent}
        else:
            granted = strategy.aggregation.weights({d: claims[d] for d in sent}, history)
        total = sum(granted.values())
        shares.append(max((granted[d] / total for d in attackers if d in granted), default=0.0))
        results = [Result(a, update, claims[d], 0.0, weight=granted[d]) for d, (a, update) in sent.items()]
        for d in sent:
            history[d].append(claims[d])
        new = strategy.aggregate(plan, results, {}, weights)
        strategy.advance(plan, weights, new, results)
        weights = new
        if round_no > job["rounds"] - job["eval_rounds"]:
            accuracy.append(evaluate(m, weights, xt, yt, threads=1)["accuracy"])
    shutil.rmtree(state, ignore_errors=True)
    return {"rule": job["rule"], "scenario": job["scenario"], "accuracy": accuracy, "final": accuracy[-1],
            "rejected": rejected, "attacker_share": float(np.mean(shares)), "seconds": time.monotonic() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=8000, help="Fashion-MNIST training images split over the fleet")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the non-IID split")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--local-epochs", type=float, default=1.0)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-rounds", type=int, default=1, help="evaluate the last this many rounds (the table: the last)")
    p.add_argument("--rules", default=",".join(ALL_RULES), help=f"comma-separated, out of {','.join(ALL_RULES)}")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, out of {','.join(SCENARIOS)}")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each trains with one thread)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an [aggregation] setting for every rule but today (to try one; --write-docs takes none)")
    p.add_argument("--quick", action="store_true", help="2000 samples, 2 rounds: checks the script, not the claim")
    p.add_argument("--workdir", type=Path, help="scratch directory (default: a temporary one)")
    p.add_argument("--write-docs", action="store_true", help="write the table to docs/benchmarks.md")
    p.add_argument("--from-results", type=Path, metavar="WORKDIR",
                   help="train nothing: report (and with --write-docs, write) the results a finished run stored "
                        "in WORKDIR/results.json")
    args = p.parse_args(argv)
    if args.from_results:
        return _report_stored(args.from_results, args.write_docs)
    rules = [r for r in args.rules.split(",") if r]
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [r for r in rules if r not in ALL_RULES] + [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown rule(s) or scenario(s) {unknown}")
    if args.quick:
        args.samples, args.rounds = 2000, 2
    defaults = asdict(AggregationSettings())
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in defaults or key == "rule":
            p.error(f"--set {item}: not an [aggregation] setting other than rule ({', '.join(defaults)})")
        overrides[key] = type(defaults[key])(value)
    if args.write_docs and (args.quick or overrides or set(rules) != set(ALL_RULES) or set(scenarios) != set(SCENARIOS)):
        p.error("--write-docs needs every rule and scenario, without --quick")

    from coordinator.local.data import write_fleet_data
    from coordinator.model import export, zoo
    from coordinator.model.part_graphs import ensure_part_graphs
    from edge_runtime.train.datasets import LocalDataset
    from edge_runtime.wire.part import TrainablePart

    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    root = (args.workdir or Path(tempfile.mkdtemp(prefix="bench-poisoning-"))).resolve()
    log(f"workdir {root}")
    model_dir = root / "model"
    if not (model_dir / "manifest.json").exists():
        export.export(zoo.fmnist_cnn(seed=args.seed), model_dir)
    from edge_runtime.wire.manifest import Manifest
    m = Manifest.load(model_dir / "manifest.json")
    last = len(m.layers) - 1
    ensure_part_graphs(m, [TrainablePart(span=tuple(range(last + 1)), trainable_layers=tuple(range(last + 1)),
                                         head=m.final_head.index)])
    ids = [f"dev-{i}" for i in range(args.devices)]
    data = write_fleet_data(root / f"data-{args.samples}-{args.alpha:g}-{args.seed}", ids, args.samples, args.alpha,
                            args.seed)
    sizes = {d: len(LocalDataset(p)) for d, p in data.items()}
    log("samples per device: " + ", ".join(f"{d} {n}" for d, n in sizes.items()))
    attackers_of = {0: [], 1: ids[:1], 2: ids[:2]}
    common = dict(root=str(root), manifest=str(model_dir / "manifest.json"),
                  weights=str(_initial_weights(m, model_dir)), data={d: str(p) for d, p in data.items()},
                  rounds=args.rounds, local_epochs=args.local_epochs, learning_rate=args.learning_rate,
                  batch_size=args.batch_size, eval_rounds=max(1, args.eval_rounds), seed=args.seed,
                  overrides=overrides)
    jobs = []
    for scenario in scenarios:
        kind, _, count = scenario.partition(" x")
        for rule in rules:
            jobs.append(dict(common, rule=rule, scenario=scenario, attack=kind,
                             attackers=attackers_of[int(count) if count else 0]))
    t0 = time.monotonic()
    log("round 1 from the initial weights, once for every run")
    train_round1(common)
    results = []
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        for r in pool.map(run, jobs):
            log(f"{r['rule']:>13} {r['scenario']:<12} {100 * r['final']:6.2f}%  ({r['seconds']:.0f} s, "
                f"{r['rejected']} rejected, attacker share {r['attacker_share']:.3f})")
            results.append(r)
    minutes = (time.monotonic() - t0) / 60
    (root / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                   "sizes": sizes, "results": results, "minutes": minutes},
                                                  indent=1))
    table, verdicts = report(results, rules, scenarios)
    print(table)
    print("\n".join(verdicts))
    if args.write_docs:
        write_section("bench_poisoning", section(args, sizes, ids, table, verdicts, minutes))
        log("wrote docs/benchmarks.md")
    return 0


def _report_stored(root: Path, write_docs: bool) -> int:
    """The report of a run that finished, from its results.json (the run's own arguments, sizes and accuracies)."""
    path = root / "results.json"
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        print(f"bench_poisoning: no results to report in {root}: {exc}", file=sys.stderr)
        return 2
    saved = stored["args"]
    rules = [r for r in saved["rules"].split(",") if r]
    scenarios = [x.strip() for x in saved["scenarios"].split(",") if x.strip()]
    if write_docs and (saved["quick"] == "True" or saved["set"] != "[]" or set(rules) != set(ALL_RULES)
                       or set(scenarios) != set(SCENARIOS)):
        print("bench_poisoning: --write-docs needs a run of every rule and scenario, without --quick or --set",
              file=sys.stderr)
        return 2
    # a run stored before minutes were: from the export it started with to the results it wrote
    minutes = stored.get("minutes") or (path.stat().st_mtime - (root / "model" / "manifest.json").stat().st_mtime) / 60
    args = argparse.Namespace(jobs=int(saved["jobs"]), devices=int(saved["devices"]), samples=int(saved["samples"]),
                              alpha=float(saved["alpha"]), rounds=int(saved["rounds"]),
                              local_epochs=float(saved["local_epochs"]), learning_rate=float(saved["learning_rate"]),
                              batch_size=int(saved["batch_size"]))
    sizes = stored["sizes"]
    table, verdicts = report(stored["results"], rules, scenarios)
    print(table)
    print("\n".join(verdicts))
    if write_docs:
        write_section("bench_poisoning", section(args, sizes, list(sizes), table, verdicts, minutes))
        print("wrote docs/benchmarks.md", file=sys.stderr)
    return 0


def _initial_weights(m, model_dir: Path) -> Path:
    """The export's initial weights as one safetensors file (every run starts from it)."""
    from coordinator.model import export
    from edge_runtime.wire import weights as wcodec
    path = model_dir / "initial.safetensors"
    if not path.exists():
        wcodec.save(path, export.load_weights(m))
    return path


def report(results: list[dict], rules: list[str], scenarios: list[str]) -> tuple[str, list[str]]:
    """The rule x scenario table of final accuracies, and PASS/FAIL lines for the default rule."""
    final = {(r["rule"], r["scenario"]): 100 * r["final"] for r in results}
    default = AggregationSettings().rule
    lines = ["| rule | " + " | ".join(scenarios) + " |", "|---|" + "---:|" * len(scenarios)]
    for rule in rules:
        label = f"**{rule}** (default)" if rule == default else rule
        cells = []
        for s in scenarios:
            acc = final.get((rule, s))
            clean = final.get((rule, "none"))
            if acc is None:
                cells.append("")
            elif s == "none" or clean is None:
                cells.append(f"{acc:.2f}%")
            else:
                cells.append(f"{acc:.2f}% ({acc - clean:+.1f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    verdicts = []
    clean = final.get((default, "none"))
    if clean is not None and (TODAY, "none") in final:
        cost = final[(TODAY, "none")] - clean
        verdicts.append(f"- **{'PASS' if cost <= CLEAN_TARGET else 'FAIL'}**: without attackers the default "
                        f"({default}) costs {cost:+.2f} points against today's aggregation "
                        f"({clean:.2f}% vs {final[(TODAY, 'none')]:.2f}%; target at most {CLEAN_TARGET:g})")
    for s in scenarios:
        if s == "none" or clean is None or (default, s) not in final:
            continue
        k = int(s.rsplit("x", 1)[1])
        cost = clean - final[(default, s)]
        verdicts.append(f"- **{'PASS' if cost <= TARGETS[k] else 'FAIL'}**: {s}: the default loses {cost:.2f} points "
                        f"against its clean run (target at most {TARGETS[k]:g})")
    return "\n".join(lines), verdicts


def section(args, sizes: dict, ids: list[str], table: str, verdicts: list[str], minutes: float) -> str:
    d = AggregationSettings()
    return "\n".join([
        "## Poisoning devices against each aggregation rule (bench_poisoning)",
        "",
        f"Command: `.venv/bin/python tools/bench_poisoning.py --write-docs` ({minutes:.0f} min on {machine()}, "
        f"{args.jobs} runs at a time).",
        "",
        f"Fleet: {args.devices} devices, fmnist_cnn trained whole (FedAvg's part) by the device trainer on the "
        f"coordinator's step graphs; {args.samples} Fashion-MNIST training images split by Dirichlet({args.alpha:g}) "
        f"({', '.join(f'{n}' for n in sizes.values())} per device); {args.rounds} rounds of "
        f"{args.local_epochs:g} local epoch(s), AdamW lr {args.learning_rate:g}, batch {args.batch_size}. Every "
        "update passes the intake's check (the default 10x bound) and each weight is capped as the service caps it "
        "(`AggregationSettings.weights`); the FedAvg strategy's `aggregate` applies the rule. The same data, seeds "
        "and initial weights for every cell; final accuracy on the 10,000 test images after the last round, "
        "in brackets the points against the same rule without attackers.",
        "",
        f"Attackers: {ids[0]} ({sizes[ids[0]]} images), then {ids[0]} and {ids[1]} ({sizes[ids[1]]}). sign_flip: "
        f"global - {SCALE:g} x its honest change; noise: Gaussian noise of {SCALE:g} x the change's norm (per "
        f"tensor); inflated: {SCALE:g} x its honest change, claiming 10^15 samples. `today`: the weighted mean with "
        "every claim trusted (the aggregation before robust aggregation); the others: the rule with the default "
        f"settings (trim_fraction {d.trim_fraction:g}, clip_multiple {d.clip_multiple:g}, max_share "
        f"{d.max_share:g}, fleet_multiple {d.fleet_multiple:g}, history_multiple {d.history_multiple:g}).",
        "",
        table,
        "",
        *verdicts,
    ])


if __name__ == "__main__":
    sys.exit(main())
