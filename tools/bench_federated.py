#!/usr/bin/env python3
"""Benchmark: every schedule of the coordinator on the same fleet and data, in one run.

One run starts a Mosquitto, measures the memory profile of the model on this machine,
splits Fashion-MNIST across the devices (Dirichlet alpha, non-IID), then runs the real
coordinator service and the real device agents (each a process, each training job under
a hard limit of its device's budget) once per schedule on the same devices and data:

  from scratch, on the fleet's Fashion-MNIST images:
    fedavg        full-model FedAvg: only the devices whose budget holds whole-model training
    progressive   ProFL: a block at a time, shrinking then growing, every device
    selective     devices score layers, the coordinator picks each device's layers under its budget
    layerwise     FLL: one layer (plus a head) at a time, every device

  fine-tuning, from one pretrained model, on the same images seen by a differently
  exposed camera (coordinator.local.data.shift_exposure), evaluated on the shifted test set:
    finetune-fedavg     full-model FedAvg from the pretrained weights
    finetune-selective  selective layer fine-tuning from the same weights, same train rounds

The pretrained model is trained in torch on images held out from the fleet (never on a
device), unshifted. Per round it records the test accuracy, the bytes each device
downloaded and uploaded, and each device's measured peak RSS (its training job's VmHWM
and its agent's), and writes tables and plots.

The default fleet has three tiers; four of its six devices cannot train the whole model:

    tiny   134 MB  only the last blocks fit (the first ones need ~90 MB at batch 32 + margin)
    small  150 MB  any single block, some pairs of blocks; not the whole model (~107 MB at batch 32)
    big    296 MB  the whole model at batch 64

Each budget covers the agent too: about 47 MB of it (start-up RSS plus room to grow) is
the agent's, the rest is the hard limit of its training jobs. fmnist_cnn is small, so its
tiers sit close together; the layer-wise memory ratio on the VGG-style model is measured
by tools/bench_block_memory.py --layerwise.

    python tools/bench_federated.py --write-docs        # about an hour on 2 cores
    python tools/bench_federated.py --quick             # a few minutes: fewer samples and rounds
    python tools/bench_federated.py --only finetune-fedavg,finetune-selective --workdir W
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
from coordinator.observe.run_data import round_bytes
from coordinator.round_metrics import DeviceRound, RoundMetrics
from coordinator.strategies.base import stage_text

REPO = Path(__file__).resolve().parent.parent
IMAGE = REPO / "docs" / "img" / "bench_federated.png"
IMAGE_FINETUNE = REPO / "docs" / "img" / "bench_federated_finetune.png"
TIERS = {"tiny": 134, "small": 150, "big": 296}
# every registered schedule of one architecture with a global model, from scratch (personalised ones:
# tools/bench_personalized.py; a model family's, FedIN: tools/bench_fedin.py)
SCRATCH = tuple(n for n, cls in strategies.registry().items() if not cls.personalized and not cls.trains_family)
FINETUNE = ("finetune-fedavg", "finetune-selective")
VALIDATION = 5000   # the coordinator's validation images (from the training images the fleet does not hold)


def _settings(args, work: Path, root: Path, run: str, n_devices: int) -> dict:
    finetune = run.startswith("finetune-")
    strategy = run.removeprefix("finetune-").split("-")[0]      # "progressive-capped": progressive, adjusted
    service = {"workdir": str(work), "strategy": strategy, "profile": str(root / "profile.json"),
               "min_devices": n_devices, "round_deadline_s": 900.0, "offline_grace_s": 30.0,
               "eval_samples": 10000, "seed": args.seed}
    if finetune:
        service.update(init_weights=str(root / "pretrained.safetensors"), eval_data=str(root / "eval-shifted"))
    else:   # training images no device holds: what progressive and layer-wise training freeze on
        service.update(validation_data=str(root / "validation"), validation_samples=VALIDATION)
    rounds = args.finetune_rounds if finetune else None
    # the benchmark's own round budgets; a schedule not named here runs with its defaults
    tables = strategies.settings_tables()
    tables["progressive"].update(shrink_rounds=1, min_rounds_per_block=args.min_rounds_per_block,
                                 max_rounds_per_block=args.max_rounds_per_block, max_extra_blocks=1)
    tables["fedavg"].update(rounds=rounds or args.fedavg_rounds)
    tables["selective"].update(rounds=rounds or args.selective_rounds, rescore_every=3, lam=0.0, max_units=2)
    tables["layerwise"].update(rounds_per_layer=args.rounds_per_layer, min_rounds_per_layer=1)
    return {
        "service": service,
        "train": {"learning_rate": args.finetune_learning_rate if finetune else args.learning_rate,
                  "local_epochs": args.finetune_epochs if finetune else args.local_epochs, "batch_sizes": [32, 64]},
        **tables,
    }


def pretrain(args, root: Path, held_out, log) -> dict:
    """The fine-tuning runs' common start: fmnist_cnn trained in torch on held-out, unshifted images."""
    out = root / "pretrained.safetensors"
    info = root / "pretrained.json"
    if out.exists() and info.exists():
        return json.loads(info.read_text())
    import numpy as np

    from coordinator.local.data import shift_exposure
    from coordinator.model import zoo
    from coordinator.model.torch_reference import accuracy, train_end_to_end
    from edge_runtime.train.datasets import load_fashion_mnist
    from edge_runtime.wire import weights as wcodec
    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    log(f"pretraining fmnist_cnn in torch on {len(held_out)} held-out images ({args.pretrain_epochs:g} epochs)")
    model = zoo.build("fmnist_cnn", seed=args.seed)
    clean = train_end_to_end(model, x[held_out], y[held_out], xt, yt, args.pretrain_epochs, 64,
                             args.learning_rate, args.seed)
    shifted = accuracy(model, shift_exposure(xt), yt)
    wcodec.save(out, {n: p.detach().numpy().astype(np.float32) for n, p in model.named_parameters()})
    result = {"images": len(held_out), "epochs": args.pretrain_epochs, "accuracy_clean": clean,
              "accuracy_shifted": shifted}
    info.write_text(json.dumps(result))
    log(f"pretrained: {clean:.2%} on the test set, {shifted:.2%} on the shifted test set")
    return result


def run_strategy(args, root: Path, broker_url: str, specs, run: str, adjust=None,
                 settings: dict | None = None) -> list[RoundMetrics]:
    """One schedule over the fleet until its coordinator finishes; resumes a run left in `root`. `adjust(settings)`
    changes the run's settings (tools/bench_freezing.py: the same schedule with and without freezing); `settings`
    replaces them (tools/bench_ssl.py: another model)."""
    from coordinator.local.fleet import LocalFleet, read_metrics
    work = root / run
    t0 = time.monotonic()

    def closed(m: RoundMetrics) -> None:
        print(f"  {run} round {m.round:>2} {stage_text(m.stage):<22} accuracy {m.accuracy:.2%} "
              f"({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)

    settings = settings or _settings(args, work / "coordinator", root, run, len(specs))
    if adjust is not None:
        adjust(settings)
    with LocalFleet(work, broker_url, fleet=f"bench-{run}") as fleet:
        fleet.start_run(settings, specs)
        code = fleet.follow(work / "coordinator", closed, every_s=2.0)
        if code != 0:
            raise SystemExit(f"the {run} coordinator failed:\n{fleet.log_tail('coordinator')}")
    return [RoundMetrics.from_dict(m) for m in read_metrics(work / "coordinator")]


def summarize(metrics: list[RoundMetrics], budgets: dict) -> dict:
    rows = [(m, d, r) for m in metrics for d, r in m.accepted().items()]
    train = [(m, d, r) for m, d, r in rows if r.kind == "train"]
    peaks = {}
    for _, d, r in rows:   # score jobs count too: a device runs them
        job, agent = peaks.get(d, (0, 0))
        peaks[d] = (max(job, r.peak_rss_bytes), max(agent, r.agent_peak_rss_bytes))
    up_ratio = max((r.uploaded_bytes / r.trained_bytes for _, _, r in train), default=0)
    # the safetensors header (names, shapes, offsets) is a fixed cost: large next to a 2.6 KB part
    up_overhead = max((r.uploaded_bytes - r.trained_bytes for _, _, r in train), default=0)
    repeat_down = []  # download in a round that trains the same part as the device's previous round
    last = {}
    for m, d, r in train:
        part = (tuple(r.trained_layers()), r.head, r.train_head)
        if last.get(d) == (m.round - 1, part):
            repeat_down.append(r.downloaded_bytes / r.trained_bytes)
        last[d] = (m.round, part)
    total_bytes = sum(sum(round_bytes(m)) for m in metrics)   # sent and received, all devices
    return {"final_accuracy": metrics[-1].accuracy, "best_accuracy": max(m.accuracy for m in metrics),
            "rounds": len(metrics), "device_rounds": len(train),
            "score_rounds": sum(1 for m in metrics if m.stage.get("phase") == "score"),
            "devices_used": sorted({d for _, d, _ in train}), "peaks": peaks,
            "over_budget": [d for d, (job, agent) in peaks.items() if job + agent > budgets[d]],
            "max_upload_over_trained": up_ratio, "max_upload_overhead_bytes": up_overhead,
            "max_repeat_download_over_trained": max(repeat_down, default=None),
            "mean_up_kb": sum(r.uploaded_bytes for _, _, r in train) / max(1, len(train)) / 1024,
            "mean_down_kb": sum(r.downloaded_bytes for _, _, r in train) / max(1, len(train)) / 1024,
            "total_mb": total_bytes / 2**20, "mean_round_mb": total_bytes / max(1, len(metrics)) / 2**20}


def plot(results: dict, specs, budgets: dict, path: Path, start_accuracy: float | None = None) -> None:
    """Accuracy per round, bytes per round (all devices) and each device's peak against its budget."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.4))
    for name, metrics in results.items():
        ax[0].plot([m.round for m in metrics], [100 * m.accuracy for m in metrics], marker=".", label=name)
    if start_accuracy is not None:
        ax[0].axhline(100 * start_accuracy, color="grey", linestyle=":", label="pretrained start")
    ax[0].set(xlabel="round", ylabel="test accuracy (%)", title="accuracy per round",
              ylim=(0 if start_accuracy is None else 100 * start_accuracy - 10, 100))
    ax[0].grid(alpha=0.3)
    ax[0].legend(fontsize=8)
    for name, metrics in results.items():
        total = [sum(round_bytes(m)) / 2**20 for m in metrics]
        ax[1].plot([m.round for m in metrics], total, marker=".", label=name)
    ax[1].set(xlabel="round", ylabel="MB sent + received, all devices", title="bytes per round", yscale="log")
    ax[1].grid(alpha=0.3)
    ax[1].legend(fontsize=8)
    ids = [s.device_id for s in specs]
    width = 0.8 / len(results)
    for k, (name, metrics) in enumerate(results.items()):
        peaks = summarize(metrics, budgets)["peaks"]
        vals = [sum(peaks.get(d, (0, 0))) / 2**20 for d in ids]
        ax[2].bar([i + (k - (len(results) - 1) / 2) * width for i in range(len(ids))], vals, width, label=name)
    ax[2].scatter(range(len(ids)), [budgets[d] / 2**20 for d in ids], marker="_", s=900, color="k", label="budget")
    ax[2].set_xticks(range(len(ids)), ids, rotation=30, fontsize=8)
    ax[2].set(ylabel="MB", title="peak RSS per device, job + agent (0 = not used)")
    ax[2].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=50000, help="Fashion-MNIST training images split over the fleet")
    p.add_argument("--held-out", type=int, default=10000,
                   help="other training images, never on a device, that the fine-tuning start is pretrained on")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the non-IID split")
    p.add_argument("--per-tier", type=int, default=2, help="devices per tier")
    p.add_argument("--local-epochs", type=float, default=2.0)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--min-rounds-per-block", type=int, default=3)
    p.add_argument("--max-rounds-per-block", type=int, default=8)
    p.add_argument("--fedavg-rounds", type=int, default=20)
    p.add_argument("--selective-rounds", type=int, default=15, help="train rounds of selective from scratch")
    p.add_argument("--rounds-per-layer", type=int, default=4, help="layer-wise: rounds per layer")
    p.add_argument("--pretrain-epochs", type=float, default=3.0)
    p.add_argument("--finetune-rounds", type=int, default=10, help="train rounds of each fine-tuning run")
    p.add_argument("--finetune-epochs", type=float, default=1.0)
    p.add_argument("--finetune-learning-rate", type=float, default=1e-3)
    p.add_argument("--only", help=f"comma-separated runs out of {','.join(SCRATCH + FINETUNE)} (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="12k samples, short schedules: checks the script, not the claim")
    p.add_argument("--workdir", type=Path, help="scratch directory (default: a temporary one); "
                                                "a run already finished in it is read back, not repeated")
    p.add_argument("--write-docs", action="store_true", help="write results to docs/benchmarks.md and the plots")
    args = p.parse_args(argv)
    runs = tuple(args.only.split(",")) if args.only else SCRATCH + FINETUNE
    unknown = [r for r in runs if r not in SCRATCH + FINETUNE]
    if unknown:
        p.error(f"unknown run(s) {unknown}; choose from {', '.join(SCRATCH + FINETUNE)}")
    if args.quick:
        args.samples, args.held_out, args.local_epochs, args.fedavg_rounds = 12000, 3000, 1.0, 4
        args.min_rounds_per_block, args.max_rounds_per_block, args.selective_rounds = 1, 2, 3
        args.rounds_per_layer, args.pretrain_epochs, args.finetune_rounds = 1, 1.0, 3
    from coordinator.local.data import shift_exposure, split_pool, write_fleet_data, write_validation_data
    from coordinator.local.fleet import DeviceSpec
    from coordinator.model.zoo_profile import measured_profile
    from coordinator.ops.broker import EmbeddedBroker
    from edge_runtime.train.datasets import LocalDataset, load_fashion_mnist
    root = (args.workdir or Path(tempfile.mkdtemp(prefix="bench-federated-"))).resolve()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    log(f"workdir {root}")
    measured_profile(root, "fmnist_cnn", [32, 64], args.seed, log=log)
    ids = [f"{tier}-{i}" for tier in TIERS for i in range(args.per_tier)]
    budgets = {d: TIERS[d.rsplit("-", 1)[0]] * 2**20 for d in ids}
    specs, pretrained = {}, None
    if any(r in SCRATCH for r in runs):
        dirs = write_fleet_data(root / "data", ids, args.samples, args.alpha, args.seed)
        specs["scratch"] = [DeviceSpec(d, d.rsplit("-", 1)[0], TIERS[d.rsplit("-", 1)[0]], dirs[d]) for d in ids]
        write_validation_data(root / "validation", args.samples, VALIDATION, args.seed)
    if any(r in FINETUNE for r in runs):
        dirs = write_fleet_data(root / "data-shifted", ids, args.samples, args.alpha, args.seed, shift=shift_exposure)
        specs["finetune"] = [DeviceSpec(d, d.rsplit("-", 1)[0], TIERS[d.rsplit("-", 1)[0]], dirs[d]) for d in ids]
        xt, yt = load_fashion_mnist("test")
        if not (root / "eval-shifted" / "labels.npy").exists():
            LocalDataset.write(root / "eval-shifted", shift_exposure(xt), yt)
        pretrained = pretrain(args, root, split_pool(args.samples, args.held_out, args.seed)[1], log)
    results, minutes = {}, {}
    with EmbeddedBroker(root / "broker") as broker:
        for run in runs:
            log(f"running {run}")
            group = "finetune" if run in FINETUNE else "scratch"
            results[run] = run_strategy(args, root, broker.url, specs[group], run)
            # the run's own span (first round opened to last closed): right for a run read back, too
            minutes[run] = (results[run][-1].closed_at - results[run][0].opened_at) / 60
    summary = {k: summarize(v, budgets) for k, v in results.items()}
    (root / "summary.json").write_text(json.dumps({"runs": summary, "pretrained": pretrained, "minutes": minutes},
                                                  indent=1))
    print(json.dumps({"runs": summary, "pretrained": pretrained}, indent=1))
    if args.write_docs:
        if set(runs) != set(SCRATCH + FINETUNE):
            raise SystemExit("--write-docs needs every run (no --only)")
        plot({k: results[k] for k in SCRATCH}, specs["scratch"], budgets, IMAGE)
        plot({k: results[k] for k in FINETUNE}, specs["finetune"], budgets, IMAGE_FINETUNE,
             pretrained["accuracy_shifted"])
        write_section("bench_federated", _section(args, summary, results, specs["scratch"], pretrained, minutes))
        log(f"wrote docs/benchmarks.md, {IMAGE.relative_to(REPO)} and {IMAGE_FINETUNE.relative_to(REPO)}")
    return 0


def _section(args, summary, results, specs, pretrained, minutes) -> str:
    sc = [summary[k] for k in SCRATCH]
    ft = {k.removeprefix("finetune-"): summary[k] for k in FINETUNE}
    gap = 100 * (ft["fedavg"]["final_accuracy"] - ft["selective"]["final_accuracy"])
    verdict = "PASS" if gap <= 1.5 else "FAIL"

    def row(label, cells):
        return f"| {label} | " + " | ".join(cells) + " |"

    lines = [
        "## Four schedules over MQTT, and fine-tuning a pretrained model (bench_federated)",
        "",
        f"Command: `.venv/bin/python tools/bench_federated.py --write-docs` ({sum(minutes.values()):.0f} min of rounds "
        f"on {machine()}; per run: {', '.join(f'{k} {v:.0f}' for k, v in minutes.items())} min).",
        "",
        f"Fleet: {len(specs)} device agents in three tiers ({', '.join(f'{t} {mb} MB' for t, mb in TIERS.items())}, "
        f"{args.per_tier} each; the budget covers the agent and its training job), the real coordinator service and "
        f"Mosquitto on one machine. fmnist_cnn; {args.samples} Fashion-MNIST training images split by "
        f"Dirichlet({args.alpha}); AdamW, batch 32 or 64 as the device's budget allows.",
        "",
        f"### From scratch ({args.local_epochs:g} local epochs per round, lr {args.learning_rate:g})",
        "",
        f"FedAvg: {args.fedavg_rounds} rounds with every device that can hold whole-model training. Progressive: "
        f"one shrinking round per block, then {args.min_rounds_per_block}-{args.max_rounds_per_block} rounds per "
        f"block (freezing once the validation accuracy stops rising). Selective: {args.selective_rounds} train "
        f"rounds, a score round before every 3, up to 2 layers per device (4 if it holds the whole model). "
        f"Layer-wise: {args.rounds_per_layer} rounds per layer, one layer and its boundary head per device.",
        "",
        "| | " + " | ".join(SCRATCH) + " |",
        "|---|" + "---:|" * len(SCRATCH),
        row("final test accuracy (10k test images)", [f"**{x['final_accuracy']:.2%}**" for x in sc]),
        row("best accuracy of any round", [f"{x['best_accuracy']:.2%}" for x in sc]),
        row("rounds (score rounds) / train device-rounds",
            [f"{x['rounds']} ({x['score_rounds']}) / {x['device_rounds']}" for x in sc]),
        row("devices that trained", [f"{len(x['devices_used'])} of {len(specs)}" for x in sc]),
        row("MB sent + received, all devices, per round", [f"{x['mean_round_mb']:.2f}" for x in sc]),
        row("MB sent + received, whole run", [f"{x['total_mb']:.1f}" for x in sc]),
        row("mean upload / download per train device-round",
            [f"{x['mean_up_kb']:.0f} / {x['mean_down_kb']:.0f} KB" for x in sc]),
        row("largest upload / trained-part bytes", [f"{x['max_upload_over_trained']:.4f}" for x in sc]),
        row("download when retraining the same part / its bytes",
            [_ratio(x["max_repeat_download_over_trained"]) for x in sc]),
        row("devices over budget (job + agent peak)", [str(len(x["over_budget"])) for x in sc]),
        "",
        "Peak RSS per device, measured (training or scoring job's VmHWM + agent's VmHWM), MB:",
        "",
        "| device | budget | " + " | ".join(SCRATCH) + " |",
        "|---|---:|" + "---:|" * len(SCRATCH),
    ]
    for s in specs:
        cells = []
        for x in sc:
            job, agent = x["peaks"].get(s.device_id, (0, 0))
            cells.append(f"{job / 2**20:.0f} + {agent / 2**20:.0f}" if job else "excluded")
        lines.append(f"| {s.device_id} | {s.budget_mb} | " + " | ".join(cells) + " |")
    lines += ["", "![accuracy, bytes and peaks per device, from scratch](img/bench_federated.png)", "",
              "Accuracy per round (stage in brackets):", "",
              "| round | " + " | ".join(SCRATCH) + " |", "|---:|" + "---:|" * len(SCRATCH)]
    for i in range(max(len(results[k]) for k in SCRATCH)):
        cells = [f"{results[k][i].accuracy:.2%} ({stage_text(results[k][i].stage)})"
                 if i < len(results[k]) else "" for k in SCRATCH]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"### Fine-tuning a pretrained model on shifted data ({args.finetune_epochs:g} local epoch per round, "
        f"lr {args.finetune_learning_rate:g})",
        "",
        f"Start: fmnist_cnn trained in torch for {pretrained['epochs']:g} epochs on {pretrained['images']} training "
        f"images held out from the fleet: {pretrained['accuracy_clean']:.2%} on the test set, "
        f"**{pretrained['accuracy_shifted']:.2%}** on the shifted test set. The devices hold the same images as "
        f"above seen through `shift_exposure` (half the contrast, brighter); every round is evaluated on the "
        f"shifted test set (`--eval-data`). Both runs have {args.finetune_rounds} train rounds from the same "
        f"weights; FedAvg uses the devices that hold the whole model, selective every device (plus its score "
        f"rounds, which change no weight).",
        "",
        "| | full-model FedAvg | selective |",
        "|---|---:|---:|",
        f"| final accuracy, shifted test set | **{ft['fedavg']['final_accuracy']:.2%}** | "
        f"**{ft['selective']['final_accuracy']:.2%}** |",
        f"| rounds (score rounds) / train device-rounds | {ft['fedavg']['rounds']} (0) / "
        f"{ft['fedavg']['device_rounds']} | {ft['selective']['rounds']} ({ft['selective']['score_rounds']}) / "
        f"{ft['selective']['device_rounds']} |",
        f"| devices that trained | {len(ft['fedavg']['devices_used'])} | {len(ft['selective']['devices_used'])} |",
        f"| MB sent + received, whole run | {ft['fedavg']['total_mb']:.1f} | {ft['selective']['total_mb']:.1f} |",
        f"| devices over budget | {len(ft['fedavg']['over_budget'])} | {len(ft['selective']['over_budget'])} |",
        "",
        f"- **{verdict}**: selective fine-tuning ends within 1.5 points of full-model FedAvg fine-tuning: "
        f"{ft['selective']['final_accuracy']:.2%} vs {ft['fedavg']['final_accuracy']:.2%} "
        f"({'+' if gap <= 0 else '-'}{abs(gap):.2f} points)",
        "",
        "Layers each device trained, per selective train round (layer indices, h = head):",
        "",
    ]
    for m in results["finetune-selective"]:
        if m.stage.get("phase") != "train":
            continue
        picks = ", ".join(f"{d} {_picked(r)}" for d, r in sorted(m.accepted().items()))
        lines.append(f"- round {m.round}: {picks}")
    lines += ["", "![accuracy, bytes and peaks per device, fine-tuning](img/bench_federated_finetune.png)", ""]
    return "\n".join(lines)


def _picked(r: DeviceRound) -> str:
    return "[" + " ".join([str(i) for i in r.trained_layers()] + (["h"] if r.train_head else [])) + "]"


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.4f}"


if __name__ == "__main__":
    sys.exit(main())
