"""edge-blockwise: train a model block by block on one device, each block as a memory-limited job.

The device runtime end to end without the network (the federated run is `edge-demo`):
export a zoo model to ONNX blocks, give a device its local Fashion-MNIST data, then for
each block in order (ProFL's growing stage) let the device runtime calibrate, train the
block from the cached activations of the frozen blocks before it, under a hard memory
limit, and fold the trained block into the global weights. Resumable: run it again with
the same --workdir and finished blocks are kept.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from coordinator.config import load_config

DEFAULTS = {
    "run": {"model": "fmnist_cnn", "workdir": "runs/blockwise", "samples": 30000, "seed": 0,
            "torch_baseline": False},
    "train": {"optimizer": "adamw", "learning_rate": 2e-3, "batch_size": 64, "epochs": 2.0, "threads": 0},
    "device": {"budget_mb": 192, "margin": 0.10, "cache_fp16": False},
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-blockwise", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__,
        epilog="""examples:
  edge-blockwise                          # 30k samples, 2 epochs per block, 192 MB budget (~2 min)
  edge-blockwise --samples 60000 --epochs 3 --torch-baseline   # the documented long run (>= 89 %)
  edge-blockwise --budget-mb 64                # refused: says how much memory the device would need
  edge-blockwise --config my.toml              # settings from TOML ([run], [train], [device]); flags win

Results land in WORKDIR/results.json; each block's job spec, progress and logs in WORKDIR/jobs/.""")
    p.add_argument("--config", type=Path, help="TOML file with [run], [train] and [device] tables")
    p.add_argument("--model", help="zoo model to train (fmnist_cnn, resnet_small)")
    p.add_argument("--workdir", type=Path, help="where the export, device state and results live (resumable)")
    p.add_argument("--samples", type=int, help="training samples the device holds (Fashion-MNIST train split)")
    p.add_argument("--epochs", type=float, help="passes over the local data per block")
    p.add_argument("--batch-size", type=int, help="samples per optimizer step")
    p.add_argument("--learning-rate", type=float, help="AdamW/SGD learning rate")
    p.add_argument("--optimizer", choices=["adamw", "sgd"])
    p.add_argument("--budget-mb", type=float, help="the device's memory budget; every job runs under this hard limit")
    p.add_argument("--cache-fp16", action="store_true", default=None, help="store prefix activations as float16")
    p.add_argument("--torch-baseline", action="store_true", default=None,
                   help="also train the same model end to end in torch and report its accuracy beside")
    p.add_argument("--fresh", action="store_true", help="discard a previous run in --workdir and start over")
    return p


@dataclass
class BlockReport:
    block: int
    layers: list[int]
    micro_batch_size: int
    steps: int
    loss: float
    test_accuracy: float
    peak_rss_mb: float
    budget_mb: float
    prefix_computed: bool
    seconds: float
    calibration: list[dict] = field(default_factory=list)


def _watch(progress_file: Path, label: str, stop: threading.Event) -> None:
    """Print the device job's progress on one terminal line until stopped (terminals only)."""
    if not sys.stderr.isatty():
        return
    while not stop.wait(0.5):
        try:
            p = json.loads(progress_file.read_text())
        except (OSError, ValueError):
            continue
        sys.stderr.write(f"\r  {label}: {p['phase']} {p['done']}/{p['total']}   ")
        sys.stderr.flush()
    sys.stderr.write("\r" + " " * 70 + "\r")


def run(settings: dict) -> dict:
    from coordinator.model import export, zoo
    from coordinator.model.graphs import evaluate
    from coordinator.model.part_graphs import ensure_part_graphs
    from edge_runtime.jobs import budget
    from edge_runtime.jobs.worker import JobSpec
    from edge_runtime.memory import MIB
    from edge_runtime.store import atomic_write_text
    from edge_runtime.train.datasets import LocalDataset, load_fashion_mnist
    from edge_runtime.wire import weights as wcodec
    from edge_runtime.wire.part import TrainablePart

    r, t, d = settings["run"], settings["train"], settings["device"]
    work = Path(r["workdir"]).resolve()
    work.mkdir(parents=True, exist_ok=True)
    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    if r["samples"] > len(y) or r["samples"] < t["batch_size"]:
        raise SystemExit(f"--samples must be between {t['batch_size']} and {len(y)}")
    manifest_path = work / "model" / "manifest.json"
    if not manifest_path.exists():
        print(f"exporting {r['model']} to ONNX blocks in {work / 'model'}")
        export.export(zoo.build(r["model"], seed=r["seed"]), work / "model")
    from edge_runtime.wire.manifest import Manifest
    m = Manifest.load(manifest_path)
    if m.model != r["model"]:
        raise SystemExit(f"{work} holds a run of {m.model}; use another --workdir or --fresh")
    data_dir = work / "device" / "data"
    if not (data_dir / "labels.npy").exists():
        idx = np.random.default_rng(r["seed"]).choice(len(y), r["samples"], replace=False)
        LocalDataset.write(data_dir, x[idx], y[idx])
    dataset = LocalDataset(data_dir)
    global_path = work / "global.safetensors"
    weights = wcodec.load(global_path) if global_path.exists() else export.load_weights(m)
    results_path = work / "results.json"
    done: list[dict] = json.loads(results_path.read_text())["blocks"] if results_path.exists() else []

    budget_bytes = int(d["budget_mb"] * MIB)
    n_params = sum(s.nbytes for s in m.param_specs().values()) // 4
    print(f"model {m.model}: {n_params / 1e6:.2f} M parameters, {len(m.layers)} layers in {len(m.blocks)} blocks; "
          f"device: {len(dataset)} samples, budget {d['budget_mb']:.0f} MB (hard limit)")
    print(f"{'block':>5} {'layers':>8} {'micro':>5} {'steps':>5} {'loss':>7} {'test acc':>8} "
          f"{'peak MB':>8} {'prefix':>7} {'secs':>6}", flush=True)
    for row in done:
        print(_format(row) + "  (kept from an earlier run)")
    t_start = time.monotonic()
    for b in range(len(done), len(m.blocks)):
        part = TrainablePart.block(m, b)
        ensure_part_graphs(m, [part])
        jobs = work / "jobs"
        jobs.mkdir(exist_ok=True)
        wcodec.save(work / "job_weights.safetensors", weights)
        progress = jobs / f"block{b}.progress"
        spec = JobSpec(manifest=str(manifest_path), weights=str(work / "job_weights.safetensors"),
                       dataset=str(data_dir), state_dir=str(work / "device" / "state"), task_id=f"block{b}",
                       part=part.to_dict(),
                       config={k: t[k] for k in ("optimizer", "learning_rate", "batch_size", "epochs", "threads")}
                       | {"cache_fp16": d["cache_fp16"], "seed": r["seed"]},
                       update_out=str(jobs / f"block{b}.safetensors"), progress_file=str(progress))
        stop = threading.Event()
        watcher = threading.Thread(target=_watch, args=(progress, f"block {b}", stop), daemon=True)
        watcher.start()
        try:
            report, child, plan = budget.train_within_budget(spec, budget_bytes, jobs, margin=d["margin"])
        finally:
            stop.set()
            watcher.join()
        weights.update(wcodec.load(Path(spec.update_out)))
        wcodec.save(global_path, weights)
        res = report["result"]
        acc = evaluate(m, weights, xt, yt, upto_block=b)["accuracy"]
        row = asdict(BlockReport(block=b, layers=list(part.span), micro_batch_size=res["micro_batch_size"],
                                 steps=res["steps"], loss=res["loss"], test_accuracy=acc,
                                 peak_rss_mb=child.peak_rss_bytes / MIB, budget_mb=d["budget_mb"],
                                 # the first calibration run usually builds the cache the job then reads
                                 prefix_computed=res["prefix_computed"] or any(tr.prepared for tr in plan.trials),
                                 seconds=child.seconds,
                                 calibration=[asdict(tr) for tr in plan.trials]))
        done.append(row)
        atomic_write_text(results_path, json.dumps({"settings": settings, "blocks": done}, indent=1))
        print(_format(row), flush=True)
    final = evaluate(m, weights, xt, yt)
    summary = {"settings": settings, "blocks": done, "final_test_accuracy": final["accuracy"],
               "max_peak_rss_mb": max(row["peak_rss_mb"] for row in done)}
    print(f"\nblock-by-block on the device runtime: test accuracy {final['accuracy']:.2%}, "
          f"largest device peak {summary['max_peak_rss_mb']:.0f} MB of a {d['budget_mb']:.0f} MB budget "
          f"({time.monotonic() - t_start:.0f} s)")
    if r["torch_baseline"]:
        from coordinator.model.torch_reference import train_end_to_end
        idx = np.random.default_rng(r["seed"]).choice(len(y), r["samples"], replace=False)
        epochs_total = t["epochs"] * len(m.blocks)
        acc = train_end_to_end(zoo.build(r["model"], seed=r["seed"]), x[idx], y[idx], xt, yt,
                               epochs=epochs_total, batch_size=t["batch_size"], learning_rate=t["learning_rate"],
                               seed=r["seed"])
        summary["torch_end_to_end_accuracy"] = acc
        print(f"the same model trained end to end in torch ({epochs_total:g} epochs, same data): "
              f"test accuracy {acc:.2%}")
    atomic_write_text(results_path, json.dumps(summary, indent=1))
    return summary


def _format(row: dict) -> str:
    layers = f"{row['layers'][0]}-{row['layers'][-1]}" if len(row["layers"]) > 1 else str(row["layers"][0])
    return (f"{row['block']:>5} {layers:>8} {row['micro_batch_size']:>5} {row['steps']:>5} {row['loss']:>7.3f} "
            f"{row['test_accuracy']:>8.2%} {row['peak_rss_mb']:>8.0f} {('-' if row['block'] == 0 else 'built' if row['prefix_computed'] else 'cached'):>7} "
            f"{row['seconds']:>6.1f}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {
        "run": {"model": args.model, "workdir": args.workdir and str(args.workdir), "samples": args.samples,
                "torch_baseline": args.torch_baseline},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                  "optimizer": args.optimizer},
        "device": {"budget_mb": args.budget_mb, "cache_fp16": args.cache_fp16},
    }
    settings = load_config(DEFAULTS, args.config, overrides)
    if args.fresh:
        import shutil
        shutil.rmtree(settings["run"]["workdir"], ignore_errors=True)
    from edge_runtime.errors import EdgeRuntimeError
    try:
        run(settings)
    except EdgeRuntimeError as exc:
        print(f"edge-blockwise: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nedge-blockwise: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
