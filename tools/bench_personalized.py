#!/usr/bin/env python3
"""Benchmark: personalised models per device (pFedLA, HeurpFedLA) against local-only training and FedAvg.

One run starts a Mosquitto, measures the memory profile of fmnist_cnn on this machine,
splits Fashion-MNIST across four devices by Dirichlet(alpha), then, per alpha and on the
same data, runs the real coordinator service and the real device agents (each a process,
each training job under a hard limit of its device's budget) once per schedule:

    pfedla       strategy pfedla, k_local 0: every layer of every device's model is a learned
                 mixture of all devices' copies (the hypernetworks learn the weights)
    heurpfedla   strategy pfedla, k_local 2: the two layers with the largest self-weight are the
                 device's own alone, the others mixed
    local-only   strategy pfedla, k_local 99: every layer the device's own; the same local work
                 with no sharing at all (the floor a personalised schedule has to beat)
    fedavg       full-model FedAvg, the same rounds

Every run holds out the same 20 % of each device's rows ([train] holdout_fraction = 0.2), and
each device reports, every round, its accuracy on them of the model it was sent
(holdout_accuracy_before) and of the model after its local training (holdout_accuracy). A
method's per-device accuracy is each device's value in the last round:

    pFedLA, HeurpFedLA, local-only   holdout_accuracy: the device's personalised model, trained
    FedAvg + fine-tuning             holdout_accuracy of FedAvg: the global model after one round
                                     of the device's local work on its own rows
    FedAvg global                    holdout_accuracy_before of FedAvg: the global model as sent

and the table gives their mean, worst device and spread (best minus worst). The plot has the
mean and worst per-device accuracy per round per method, per alpha, and the final layer
weights each device's pFedLA model is mixed with (alpha = the first of --alphas).

The fleet: four devices in two tiers that both hold whole-model training of fmnist_cnn, so
FedAvg trains on every device and FedAvg + fine-tuning is defined for each:

    pi-zero-2w   its budget from profiles/pi-zero-2w.toml
    big          296 MB

The hypernetworks' step size matters (do they learn within a few rounds?); check it first:

    python tools/bench_personalized.py --hn-lr-check 0.05,0.5,5.0 --rounds 3 --workdir W
    python tools/bench_personalized.py --write-docs --workdir W   # ~16 min on 2 cores (hn_lr: [pfedla]'s default)
    python tools/bench_personalized.py --quick                                 # a few minutes
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
from coordinator.round_metrics import RoundMetrics
from coordinator.strategies.base import stage_text

REPO = Path(__file__).resolve().parent.parent
IMAGE = REPO / "docs" / "img" / "bench_personalized.png"
# tier -> budget in MB (None: the tier file's), devices of it
TIERS = {"pi-zero-2w": None, "big": 296}
RUNS = {"pfedla": ("pfedla", 0), "heurpfedla": ("pfedla", 2), "local-only": ("pfedla", 99), "fedavg": ("fedavg", 0)}
# method -> (run, which of the device's two accuracies)
METHODS = {"pFedLA": ("pfedla", "after"), "HeurpFedLA": ("heurpfedla", "after"),
           "local-only": ("local-only", "after"), "FedAvg + fine-tuning": ("fedavg", "after"),
           "FedAvg global": ("fedavg", "before")}
HOLDOUT = 0.2


def _settings(args, work: Path, root: Path, run: str, n_devices: int, hn_lr: float) -> dict:
    strategy, k_local = RUNS[run]
    tables = strategies.settings_tables()
    tables["pfedla"].update(rounds=args.rounds, k_local=k_local, hn_lr=hn_lr)
    tables["fedavg"].update(rounds=args.rounds)
    return {
        "service": {"workdir": str(work), "strategy": strategy, "profile": str(root / "profile.json"),
                    "min_devices": n_devices, "round_deadline_s": 900.0, "offline_grace_s": 30.0,
                    "eval_samples": 10000, "seed": args.seed},
        "train": {"learning_rate": args.learning_rate, "local_epochs": args.local_epochs, "batch_sizes": [32, 64],
                  "holdout_fraction": HOLDOUT},
        **tables,
    }


def run_one(args, root: Path, work: Path, broker_url: str, specs, run: str, hn_lr: float) -> list[RoundMetrics]:
    """One schedule over the fleet until its coordinator finishes; a run finished in `work` is read back."""
    from coordinator.local.fleet import LocalFleet, read_metrics
    done = read_metrics(work / "coordinator")
    if done and done[-1].get("finished"):
        return [RoundMetrics.from_dict(m) for m in done]
    t0 = time.monotonic()

    def closed(m: RoundMetrics) -> None:
        acc = _round_accuracy(m)
        text = "  ".join(f"{k} mean {100 * v[0]:.1f}% worst {100 * v[1]:.1f}%" for k, v in acc.items())
        idle = f" idle {sorted(m.idle)}" if m.idle else ""
        print(f"  {work.relative_to(root)} round {m.round:>2} {stage_text(m.stage):<14} {text}{idle} "
              f"({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)

    with LocalFleet(work, broker_url, fleet=f"bench-{work.parent.name}-{work.name}") as fleet:
        fleet.start_run(_settings(args, work / "coordinator", root, run, len(specs), hn_lr), specs)
        code = fleet.follow(work / "coordinator", closed, every_s=2.0)
        if code != 0:
            raise SystemExit(f"the {run} coordinator failed:\n{fleet.log_tail('coordinator')}")
    return [RoundMetrics.from_dict(m) for m in read_metrics(work / "coordinator")]


def _round_accuracy(m: RoundMetrics) -> dict[str, tuple[float, float]]:
    """(mean, worst) over the devices of one round, of the models they trained ("after") and were sent ("before")."""
    out = {}
    for key, field in (("after", "holdout_accuracy"), ("before", "holdout_accuracy_before")):
        vals = [getattr(r, field) for r in m.accepted().values() if getattr(r, field) is not None]
        if vals:
            out[key] = (sum(vals) / len(vals), min(vals))
    return out


def per_device(metrics: list[RoundMetrics], which: str) -> dict[str, float]:
    """Each device's accuracy in the last round: of the model it trained ("after") or was sent ("before")."""
    field = "holdout_accuracy" if which == "after" else "holdout_accuracy_before"
    return {d: float(getattr(r, field)) for d, r in metrics[-1].accepted().items() if getattr(r, field) is not None}


def self_weight(metrics: list[RoundMetrics]) -> float | None:
    """The mean over devices and layers of alpha_ii, the weight a device's mixture gives its own copy, in the
    mixtures the last round's models were made with (they have seen the hypernetwork steps of the rounds before)."""
    sched = metrics[-1].schedule
    if not sched.get("alphas"):
        return None
    roster = sched["roster"]
    vals = [row[roster.index(d)] for d, rows in sched["alphas"].items() for row in rows]
    return sum(vals) / len(vals)


def layer_self_weight(metrics: list[RoundMetrics]) -> dict[str, float]:
    """Per layer, alpha_ii averaged over the devices (the last round's mixtures)."""
    sched = metrics[-1].schedule
    roster, devices = sched["roster"], sched["alphas"]
    return {u: sum(rows[l][roster.index(d)] for d, rows in devices.items()) / len(devices)
            for l, u in enumerate(sched["units"])}


def summarize(metrics: list[RoundMetrics], which: str, ids: list[str]) -> dict:
    acc = per_device(metrics, which)
    worst = min(sorted(acc), key=acc.__getitem__)
    return {"mean": sum(acc.values()) / len(acc), "worst": acc[worst], "worst_device": worst,
            "spread": max(acc.values()) - min(acc.values()), "devices": acc,
            "missing": [d for d in ids if d not in acc], "rounds": len(metrics),
            "test_accuracy": metrics[-1].accuracy,
            "idle": sorted({d for m in metrics for d in m.idle}),
            "rejected": sorted({(m.round, d) for m in metrics for d, r in m.devices.items() if not r.accepted}),
            "per_round": [_round_accuracy(m).get(which) for m in metrics]}


def plot(results: dict, path: Path) -> None:
    """Left: mean (solid) and worst (dashed) per-device accuracy per round, per alpha; right: pFedLA's final layer
    weights at the first alpha, one heatmap per device."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec
    alphas = list(results)
    rows = max(2, len(alphas))
    fig = plt.figure(figsize=(16, 4.2 * rows))
    gs = GridSpec(rows, 3, figure=fig, width_ratios=[2.4, 1, 1])
    colors = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for k, alpha in enumerate(alphas):
        ax = fig.add_subplot(gs[k, 0])
        for method, (run, which) in METHODS.items():
            metrics = results[alpha][run]
            rows = [(m.round, _round_accuracy(m).get(which)) for m in metrics]
            rows = [(r, v) for r, v in rows if v is not None]
            ax.plot([r for r, _ in rows], [100 * v[0] for _, v in rows], marker=".", color=colors[method],
                    label=f"{method} mean")
            ax.plot([r for r, _ in rows], [100 * v[1] for _, v in rows], linestyle="--", color=colors[method],
                    alpha=0.7, label=f"{method} worst")
        ax.set(xlabel="round", ylabel="accuracy on the device's held-out rows (%)",
               title=f"Dirichlet alpha {alpha:g}: per-device accuracy, mean (solid) and worst device (dashed)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if k == 0:
            ax.legend(fontsize=7, ncol=2)
    sched = results[alphas[0]]["pfedla"][-1].schedule
    roster, units = sched["roster"], sched["units"]
    cells = [gs[r, c] for r in (0, 1) for c in (1, 2)]
    for n, device in enumerate(sorted(sched["alphas"])):
        if n >= len(cells):
            break
        ax = fig.add_subplot(cells[n])
        grid = sched["alphas"][device]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.5 else "k")
        ax.set_xticks(range(len(roster)), roster, rotation=20, fontsize=7)
        ax.set_yticks(range(len(units)), units, fontsize=7)
        ax.set_title(f"pFedLA alpha {alphas[0]:g}: {device}'s layers draw on", fontsize=9)
    fig.colorbar(im, ax=fig.axes[-1], shrink=0.8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


def _fleet(root: Path, alpha: float, args, ids: list[str]):
    from coordinator.local.data import write_fleet_data
    from coordinator.local.fleet import DeviceSpec
    dirs = write_fleet_data(root / f"data-alpha{alpha:g}", ids, args.samples, alpha, args.seed)
    return [DeviceSpec(d, d.rsplit("-", 1)[0], TIERS[d.rsplit("-", 1)[0]], dirs[d]) for d in ids]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=8000, help="Fashion-MNIST training images split over the fleet")
    p.add_argument("--rounds", type=int, default=6, help="rounds of every run (each a local epoch on every device)")
    p.add_argument("--alphas", default="0.1,0.5",
                   help="Dirichlet concentrations, comma-separated: smaller is more non-IID; one fleet split per "
                        "alpha, the same for every run at it")
    p.add_argument("--local-epochs", type=float, default=1.0)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--hn-lr", type=float, default=strategies.registry()["pfedla"].Settings.hn_lr,
                   help="[pfedla] hn_lr of the pfedla and heurpfedla runs: the hypernetworks' SGD step")
    p.add_argument("--hn-lr-check", metavar="LRS",
                   help="instead of the benchmark: run only pfedla at the first alpha once per hn_lr in LRS "
                        "(comma-separated) and print per-device accuracy and the mean self-weight alpha_ii "
                        "(1/devices = uniform: the hypernetworks learned nothing)")
    p.add_argument("--per-tier", type=int, default=2, help="devices per tier")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="3000 samples, 3 rounds: checks the script, not the claim")
    p.add_argument("--workdir", type=Path, help="scratch directory (default: a temporary one); "
                                                "a run already finished in it is read back, not repeated")
    p.add_argument("--write-docs", action="store_true",
                   help="write the section of docs/benchmarks.md and docs/img/bench_personalized.png")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.rounds = 3000, 3
    alphas = [float(a) for a in args.alphas.split(",")]
    from coordinator.model.zoo_profile import measured_profile
    from coordinator.ops.broker import EmbeddedBroker
    root = (args.workdir or Path(tempfile.mkdtemp(prefix="bench-personalized-"))).resolve()
    tag = f"s{args.samples}-r{args.rounds}-e{args.local_epochs:g}-lr{args.learning_rate:g}"
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    log(f"workdir {root}")
    measured_profile(root, "fmnist_cnn", [32, 64], args.seed, log=log)
    ids = [f"{tier}-{i}" for tier in TIERS for i in range(args.per_tier)]
    t_start = time.monotonic()
    with EmbeddedBroker(root / "broker") as broker:
        if args.hn_lr_check:
            alpha, specs = alphas[0], _fleet(root, alphas[0], args, ids)
            check = {}
            for lr in [float(x) for x in args.hn_lr_check.split(",")]:
                log(f"alpha {alpha:g}: pfedla with hn_lr {lr:g}")
                metrics = run_one(args, root, root / tag / f"alpha{alpha:g}" / f"pfedla-hn{lr:g}", broker.url,
                                  specs, "pfedla", lr)
                s = summarize(metrics, "after", ids)
                check[lr] = {"mean": s["mean"], "worst": s["worst"], "worst_device": s["worst_device"],
                             "self_weight": self_weight(metrics), "rounds": s["rounds"]}
            out = {"alpha": alpha, "samples": args.samples, "rounds": args.rounds, "devices": len(ids),
                   "results": {f"{k:g}": v for k, v in check.items()}}
            (root / "hn_lr_check.json").write_text(json.dumps(out, indent=1))
            print(_check_table(out))
            return 0
        results, minutes = {}, {}
        for alpha in alphas:
            specs = _fleet(root, alpha, args, ids)
            results[alpha] = {}
            for run in RUNS:
                log(f"alpha {alpha:g}: {run}")
                hn = f"-hn{args.hn_lr:g}" if RUNS[run][0] == "pfedla" and RUNS[run][1] < 99 else ""
                metrics = run_one(args, root, root / tag / f"alpha{alpha:g}" / f"{run}{hn}", broker.url, specs,
                                  run, args.hn_lr)
                results[alpha][run] = metrics
                minutes[(alpha, run)] = (metrics[-1].closed_at - metrics[0].opened_at) / 60
    summary = {a: {method: summarize(results[a][run], which, ids) for method, (run, which) in METHODS.items()}
               for a in alphas}
    weights = {a: self_weight(results[a]["pfedla"]) for a in alphas}
    (root / "summary.json").write_text(json.dumps(
        {f"{a:g}": {"methods": summary[a], "pfedla_self_weight": weights[a]} for a in alphas}, indent=1, default=str))
    for a in alphas:
        print(_table(a, summary[a], weights[a]))
        print()
    log(f"{(time.monotonic() - t_start) / 60:.1f} min")
    if args.write_docs:
        plot(results, IMAGE)
        check = root / "hn_lr_check.json"
        check = json.loads(check.read_text()) if check.exists() else None
        per_layer = {a: layer_self_weight(results[a]["pfedla"]) for a in alphas}
        rows = [r.holdout_examples for a in alphas for m in results[a].values() for r in m[-1].accepted().values()
                if r.holdout_examples]
        write_section("bench_personalized", _section(args, alphas, summary, weights, minutes, ids, check,
                                                     per_layer, rows))
        log(f"wrote docs/benchmarks.md and {IMAGE.relative_to(REPO)}")
    return 0


def _table(alpha: float, summary: dict, weight: float | None) -> str:
    lines = [f"Dirichlet alpha {alpha:g}:", "",
             "| method | mean | worst device | spread | coordinator's test accuracy |",
             "|---|---:|---:|---:|---:|"]
    for method, s in summary.items():
        test = f"{s['test_accuracy']:.2%}" if method == "FedAvg global" else "-"
        missing = f" (no value from {', '.join(s['missing'])})" if s["missing"] else ""
        lines.append(f"| {method}{missing} | **{s['mean']:.2%}** | {s['worst']:.2%} ({s['worst_device']}) | "
                     f"{100 * s['spread']:.1f} pts | {test} |")
    if weight is not None:
        lines += ["", f"pFedLA's mean self-weight alpha_ii (of the mixtures the last round's models were made with, over "
                      f"devices and layers): {weight:.3f} (uniform: 0.25 with 4 devices)"]
    return "\n".join(lines)


def _check_table(check: dict) -> str:
    lines = [f"hn_lr check: pfedla, Dirichlet alpha {check['alpha']:g}, {check['samples']} samples, "
             f"{check['rounds']} rounds, {check['devices']} devices", "",
             "| hn_lr | mean per-device | worst device | mean self-weight alpha_ii (uniform "
             f"{1 / check['devices']:.2f}) |", "|---:|---:|---:|---:|"]
    for lr, v in check["results"].items():
        lines.append(f"| {lr} | {v['mean']:.2%} | {v['worst']:.2%} ({v['worst_device']}) | {v['self_weight']:.3f} |")
    return "\n".join(lines)


def _gap(a: dict, b: dict, key: str) -> str:
    d = 100 * (a[key] - b[key])
    return f"{'+' if d >= 0 else '-'}{abs(d):.1f}"


def _last2(s: dict) -> float:
    vals = [r[0] for r in s["per_round"][-2:] if r]
    return sum(vals) / len(vals)


def _verdict(pf: dict, other: dict) -> str:
    short = [k for k in ("mean", "worst") if pf[k] < other[k]]
    if not short:
        return "reaches it"
    return "falls short on " + " and ".join(f"{k} by {100 * (other[k] - pf[k]):.1f} points" for k in short)


def _section(args, alphas, summary, weights, minutes, ids, check, layer_self_weights, holdout_rows) -> str:
    total = sum(minutes.values())
    cmd = (f".venv/bin/python tools/bench_personalized.py --samples {args.samples} --rounds {args.rounds} "
           f"--alphas {args.alphas} --hn-lr {args.hn_lr:g} --write-docs")
    lines = [
        "## Personalised models: pFedLA and HeurpFedLA against local-only and FedAvg (bench_personalized)",
        "",
        f"Command: `{cmd}` ({total:.0f} min of rounds on {machine()}).",
        "",
        f"Fleet: {len(ids)} device agents in two tiers that both hold whole-model training of fmnist_cnn "
        f"({', '.join(ids)}; pi-zero-2w at its profile's budget, big at 296 MB), the real coordinator service and "
        f"Mosquitto on one machine. {args.samples} Fashion-MNIST training images split by Dirichlet(alpha), the same "
        f"split for every run at an alpha; every device holds out {HOLDOUT:.0%} of its rows. {args.rounds} rounds per "
        f"run, {args.local_epochs:g} local epoch per round, AdamW lr {args.learning_rate:g}, batch 32 or 64. pFedLA: "
        f"k_local 0; HeurpFedLA: k_local 2; local-only: k_local 99 (every layer the device's own); hn_lr "
        f"{args.hn_lr:g}.",
        "",
        "Per-device accuracy = each device's accuracy on its held-out rows in the last round: of the model after its "
        "local training (pFedLA, HeurpFedLA, local-only; for FedAvg that is the global model fine-tuned by one "
        "round's local work: *FedAvg + fine-tuning*), and of FedAvg's global model as sent (*FedAvg global*). "
        "Spread = best minus worst device. The coordinator's test accuracy (10k test images) is given for FedAvg's "
        "global model only: the personalised schedules have no one model (their reference, the mean of the "
        "devices' copies, runs on no device).",
        "",
    ]
    for a in alphas:
        lines += [_table(a, summary[a], weights[a]), ""]
    lines += ["![per-device accuracy per round, and pFedLA's learned layer weights](img/bench_personalized.png)", ""]
    if check:
        lines += [f"Before the runs above, the hypernetworks' step size (`--hn-lr-check`, pFedLA only, "
                  f"{check['rounds']} rounds, {check['samples']} samples):", "", _check_table(check).split("\n", 2)[2],
                  "", f"The runs above use hn_lr {args.hn_lr:g}.", ""]
    lines += ["Reading:", ""]
    for a in alphas:
        s = summary[a]
        pf, ft, lo, hp = s["pFedLA"], s["FedAvg + fine-tuning"], s["local-only"], s["HeurpFedLA"]
        lines.append(f"- alpha {a:g}: pFedLA mean {pf['mean']:.2%} / worst {pf['worst']:.2%}. Against FedAvg + "
                     f"fine-tuning it {_verdict(pf, ft)} ({_gap(pf, ft, 'mean')} / {_gap(pf, ft, 'worst')} points, mean / "
                     f"worst); against local-only it {_verdict(pf, lo)} ({_gap(pf, lo, 'mean')} / "
                     f"{_gap(pf, lo, 'worst')}). HeurpFedLA "
                     f"{hp['mean']:.2%} / {hp['worst']:.2%}. Self-weight alpha_ii at the end {weights[a]:.3f} "
                     f"(uniform 0.25). Mean per-device accuracy averaged over the last two rounds (less noisy than the "
                     f"last alone): " + ", ".join(f"{k} {_last2(s[k]):.2%}" for k in METHODS if k != "FedAvg global")
                     + ".")
    lines += ["", "Why, as far as this run shows:", ""]
    for a in alphas:
        lines.append(f"- alpha {a:g}, pFedLA's self-weight alpha_ii per layer (mean over devices): "
                     + ", ".join(f"{u} {w:.2f}" for u, w in layer_self_weights[a].items()))
    lo, hi = min(holdout_rows), max(holdout_rows)
    lines += [
        f"- every device holds out {lo}-{hi} rows, and this is one seed: one row is 0.1-0.5 points of a device's "
        "accuracy, and the last rounds of one run move a device by 1-3 points, so differences of a point or two "
        "between the personalised methods and local-only are within noise.",
        "- the hypernetworks learn nothing in round 1: every device's copy is still the initial model, so the "
        "gradient on alpha_ij is the same for every j and the normalisation of the weights passes none of it; they take "
        f"{args.rounds - 1} effective steps in {args.rounds} rounds, and the last round's mixture has seen "
        f"{args.rounds - 2}. The gradient on alpha_ij is an inner product over a whole layer, so it grows with the "
        "layer's size: the large dense layer (layer 4, 295k of fmnist_cnn's parameters) goes (nearly) all-own "
        "within a few steps at this hn_lr, the middle convolutions move part way, and the first convolution and "
        "the head stay near uniform, i.e. close to averaged over all devices. With hn_lr 0.05 the mixtures stay near "
        "uniform within this many rounds (see the check above): [pfedla] hn_lr defaults to 5 for that reason.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
