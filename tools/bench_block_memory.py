#!/usr/bin/env python3
"""Benchmark: peak RSS and step time of block-wise vs whole-model training on the device runtime.

Why this exists: the product's promise is that a device too small to train a whole model
can still train one block of it (from cached activations of the frozen prefix) at a
fraction of the memory. This script measures that promise and its baseline in one run, on
the zoo's VGG-style CNN (`coordinator.model.zoo.vgg_cifar`, 9.2 M parameters, 5 blocks, 3x32x32):

  torch whole     whole-model training in plain torch eager (AdamW, cross-entropy,
                  forward + backward + step): the baseline a user would otherwise run;
  runtime whole   whole-model training with the device runtime (onnxruntime-training,
                  through edge_runtime.jobs.worker.run_job: the code a device runs for a job);
  block b         block b and its head trained alone from the cached activations of the
                  frozen prefix (blocks 0..b-1), same runtime and code path;
  import          a process that only imports the device runtime (its fixed cost);
  layer l         (with --layerwise) layer l alone with the small head right after it, from
                  the cached activations of layers 0..l-1: what greedy layer-wise training
                  (FLL, coordinator/strategies/layerwise.py) asks of a device.

Every configuration runs in its own fresh process, so no measurement inherits the memory
of another. Peaks are the kernel's high-water mark of the measured process (VmHWM, printed
by the child itself; see edge_runtime/memory.py for why not ru_maxrss). Before a device run is
measured, a preparatory job (edge_runtime.jobs.worker.run_worker, one step) builds its training
artifact and its prefix activation cache, so the measured process neither builds an
artifact nor runs the prefix (both are checked in its report). Step time is the shortest wall
time between consecutive optimizer steps inside the measured process (batch fetch included,
session build and the first step excluded): on a shared machine the fastest step is the one
least disturbed by other load, while the median moves with whatever else runs.

Like a real job, each measured device run saves one checkpoint (halfway) and its trained
weights (at the end); the table also shows the peak reached before the first of those
saves, to tell training memory from saving memory. The script re-runs itself with a hidden
`--child torch|device` argument to be each measured process.

Data is synthetic (random float32 inputs, random int64 labels): memory and speed do not
depend on the values. Both torch and the runtime use the same number of intra-op threads.

The lower bound of a block is: the runtime's import-only peak + 4 x the parameter bytes of
the block and its head (weights, gradients, AdamW m and v) + the block's activation bytes
for one batch (manifest activation_bytes_per_sample over its layers and head, x batch).

Targets checked: last block <= 0.4x whole-model runtime training; every block <= 1.3x its
lower bound; runtime import <= 64 MB; with --layerwise, the largest single-layer peak <=
0.2x whole-model runtime training (5x lower). The exit status is 1 when a target fails.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchdocs import DOCS, machine, write_section

from edge_runtime.jobs.child import device_child_env, report_own_peak, run_child
from edge_runtime.memory import MIB, peak_rss_bytes

REPO = Path(__file__).resolve().parent.parent
COMMAND = "python tools/bench_block_memory.py --layerwise --write-docs"
SAMPLES = 256           # local dataset size; batches cycle over it
THREADS = 2             # intra-op threads for torch and onnxruntime alike
LR = 1e-3

TARGET_LAST_BLOCK = 0.4
TARGET_BOUND = 1.3
TARGET_LAYERWISE = 0.2
TARGET_IMPORT_MB = 64

IMPORT_ONLY = ("from edge_runtime.train import ort_backend, trainer; from edge_runtime.jobs import worker; "
               "import json; print(json.dumps(ort_backend.runtime_versions())); "
               "from edge_runtime.jobs.child import report_own_peak; report_own_peak()")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# Children: each runs in a fresh process, prints one JSON line, then its own VmHWM.
# ---------------------------------------------------------------------------------------

def _child_torch(data: Path, batch: int, steps: int) -> dict:
    """Whole-model training in plain torch eager; wall time after every optimizer step."""
    import numpy as np
    import torch

    from coordinator.model import zoo

    torch.set_num_threads(THREADS)
    model = zoo.vgg_cifar().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    loss_fn = torch.nn.CrossEntropyLoss()
    inputs = np.load(data / "inputs.npy", mmap_mode="r")
    labels = np.load(data / "labels.npy")
    stamps = []
    for step in range(steps):
        idx = (np.arange(batch) + step * batch) % len(labels)
        x, y = torch.from_numpy(np.ascontiguousarray(inputs[idx])), torch.from_numpy(labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()
        stamps.append(time.perf_counter())
    return {"stamps": stamps, "torch": torch.__version__}


def _child_device(spec_path: Path) -> dict:
    """One device job through edge_runtime.jobs.worker.run_job (the code a device runs), timed per step.

    run_job's progress callback records the wall time and VmHWM after every optimizer step;
    nothing else about the job changes. (Wrapping trainer.train instead would not do: a
    wrapper's *args keeps the job's weights alive, which train() drops once the session
    holds them.)
    """
    from edge_runtime.jobs import worker

    stamps, peaks = [], []

    def on_progress(phase: str, done: int, total: int) -> None:
        if phase == "train":  # after each optimizer step (and its checkpoint, if any)
            stamps.append(time.perf_counter())
            peaks.append(peak_rss_bytes())

    result = worker.run_job(worker.JobSpec.load(spec_path), progress=on_progress)["result"]
    return {"stamps": stamps, "peaks": peaks, "steps": result["steps"],
            "prefix_computed": result["prefix_computed"], "artifact_built": result["artifact_built"]}


def child_main(kind: str, args: list[str]) -> int:
    out = _child_torch(Path(args[0]), int(args[1]), int(args[2])) if kind == "torch" else \
        _child_device(Path(args[0]))
    print(json.dumps(out), flush=True)
    report_own_peak()
    return 0


def _run(argv: list[str], what: str) -> tuple[dict, int]:
    """Run a child; return its JSON line and its peak RSS in bytes (raise with its stderr on failure)."""
    env = device_child_env({"OMP_NUM_THREADS": str(THREADS)})  # the repo on the path; same threads for all
    child = run_child(argv, env=env, cwd=REPO)
    lines = [l for l in child.stdout.splitlines() if l.startswith("{")]
    if child.returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed (exit {child.returncode}):\n{child.stderr[-2000:]}")
    return json.loads(lines[-1]), child.peak_rss_bytes


def _step_ms(stamps: list[float]) -> float:
    """Fastest gap between consecutive steps (the first step, before the first stamp, is warm-up)."""
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return 1000 * min(gaps) if gaps else float("nan")


# ---------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------

class Bench:
    def __init__(self, workdir: Path, batches: list[int], steps: int, layerwise: bool = False):
        self.workdir, self.batches, self.steps, self.layerwise = workdir, batches, steps, layerwise
        self.nonce = f"{os.getpid()}-{int(time.time())}"  # a reused --workdir never returns a stored result
        self.rows: list[dict] = []
        self.versions: dict = {}

    # -- setup ---------------------------------------------------------------------------
    def prepare(self) -> None:
        import numpy as np

        from coordinator.model import export, zoo
        from edge_runtime.train.datasets import LocalDataset

        log(f"exporting vgg_cifar to {self.workdir / 'model'}")
        self.manifest = export.export(zoo.vgg_cifar(), self.workdir / "model")
        self.data = self.workdir / "data"
        if not (self.data / "labels.npy").exists():
            rng = np.random.default_rng(0)
            x = rng.standard_normal((SAMPLES,) + tuple(self.manifest.input_shape), dtype=np.float32)
            y = rng.integers(0, self.manifest.num_classes, SAMPLES, dtype=np.int64)
            LocalDataset.write(self.data, x, y)
        self.state = self.workdir / "state"
        self.jobs = self.workdir / "jobs"

    def parts(self) -> list[tuple[str, dict]]:
        """(name, TrainablePart fields) of the whole model and of every block."""
        from edge_runtime.wire.part import TrainablePart
        m = self.manifest
        everything = tuple(range(len(m.layers)))
        out = [("runtime whole", TrainablePart(everything, everything, m.final_head.index).to_dict())]
        out += [(f"block {b}", TrainablePart.block(m, b).to_dict()) for b in range(len(m.blocks))]
        if self.layerwise:
            out += [(f"layer {i}", TrainablePart((i,), (i,), m.head_for_boundary(i)).to_dict())
                    for i in range(len(m.layers))]
        return out

    @staticmethod
    def checkpoint_step(steps: int) -> int:
        """A measured run saves one checkpoint halfway (steps >= 4: at least one step runs before it)."""
        return max(1, steps // 2)

    def spec(self, task: str, part: dict, batch: int, steps: int):
        from edge_runtime.jobs.worker import JobSpec
        config = dict(batch_size=batch, max_steps=steps, epochs=float(steps), optimizer="adamw",
                      learning_rate=LR, checkpoint_every_steps=self.checkpoint_step(steps), threads=THREADS)
        return JobSpec(manifest=str(self.manifest.root / "manifest.json"),
                       weights=str(self.manifest.graph_path(self.manifest.weights)),
                       dataset=str(self.data), state_dir=str(self.state), task_id=f"{task}-{self.nonce}",
                       part=part, config=config)

    # -- measurements --------------------------------------------------------------------
    def measure_import(self) -> None:
        log("import-only process (device runtime)")
        out, peak = _run([sys.executable, "-c", IMPORT_ONLY], "import-only child")
        self.versions.update(out)
        self.import_peak = peak

    def prepare_parts(self) -> None:
        """Build every training artifact and prefix activation cache before anything is measured."""
        from edge_runtime.jobs.worker import run_worker
        for name, part in self.parts():
            log(f"preparing {name}: training artifact and prefix activation cache (not measured)")
            spec = self.spec("prep-" + name.replace(" ", "-"), part, min(self.batches), 1)
            report, child = run_worker(spec, self.jobs)
            if not report or not report.get("ok"):
                raise RuntimeError(f"preparing {name} failed: {report and report.get('error')}\n"
                                   f"{child.stderr[-2000:]}")
            shutil.rmtree(self.state / "runs" / spec.task_id, ignore_errors=True)

    def measure_torch(self, batch: int) -> None:
        out, peak = _run([sys.executable, __file__, "--child", "torch", str(self.data), str(batch), str(self.steps)],
                         f"torch whole (batch {batch})")
        self.versions["torch"] = out["torch"]
        self.rows.append(dict(config="torch whole", batch=batch, peak=peak, step_ms=_step_ms(out["stamps"])))

    def measure_device(self, name: str, part: dict, batch: int) -> None:
        spec = self.spec(name.replace(" ", "-"), part, batch, self.steps)
        self.jobs.mkdir(parents=True, exist_ok=True)
        path = self.jobs / f"{spec.task_id}.json"
        spec.save(path)
        out, peak = _run([sys.executable, __file__, "--child", "device", str(path)], f"{name} (batch {batch})")
        if out["prefix_computed"] or out["artifact_built"] or len(out["stamps"]) != self.steps:
            raise RuntimeError(f"{name} (batch {batch}) was not a clean measurement: {out}")
        shutil.rmtree(self.state / "runs" / spec.task_id, ignore_errors=True)
        before_saves = out["peaks"][self.checkpoint_step(self.steps) - 2]  # after the last step before the checkpoint
        self.rows.append(dict(config=name, batch=batch, peak=peak, before_saves=before_saves,
                              step_ms=_step_ms(out["stamps"]), bound=self.lower_bound(part, batch)))

    def lower_bound(self, part: dict, batch: int) -> int:
        m = self.manifest
        layers, head = [m.layers[i] for i in part["span"]], m.heads[part["head"]]
        params = sum(l.param_bytes for l in layers) + head.param_bytes
        acts = sum(l.activation_bytes_per_sample for l in layers) + head.activation_bytes_per_sample
        return self.import_peak + 4 * params + acts * batch

    def run(self) -> None:
        self.prepare()
        self.measure_import()
        self.prepare_parts()
        parts = self.parts()
        total, k = len(self.batches) * (1 + len(parts)), 0
        for batch in self.batches:
            for name, part in [("torch whole", None)] + parts:
                k += 1
                t0 = time.monotonic()
                log(f"[{k}/{total}] batch {batch}: {name} ...")
                if part is None:
                    self.measure_torch(batch)
                else:
                    self.measure_device(name, part, batch)
                r = self.rows[-1]
                log(f"[{k}/{total}] batch {batch}: {name}: peak {r['peak'] / MIB:.0f} MB, "
                    f"step {r['step_ms']:.0f} ms ({time.monotonic() - t0:.0f} s)")

    # -- report --------------------------------------------------------------------------
    def row(self, config: str, batch: int) -> dict:
        return next(r for r in self.rows if r["config"] == config and r["batch"] == batch)

    def table(self) -> str:
        head = ["config", "batch", "peak MB", "peak before saves MB", "step ms", "peak / runtime whole",
                "step / runtime whole", "lower bound MB", "peak / bound"]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(head))) + "|"]
        for r in self.rows:
            whole = self.row("runtime whole", r["batch"])
            vs = r["config"] != "torch whole"
            cells = [r["config"], str(r["batch"]), f"{r['peak'] / MIB:.0f}",
                     f"{r['before_saves'] / MIB:.0f}" if "before_saves" in r else "", f"{r['step_ms']:.0f}",
                     f"{r['peak'] / whole['peak']:.2f}" if vs else "",
                     f"{r['step_ms'] / whole['step_ms']:.2f}" if vs else "",
                     f"{r['bound'] / MIB:.0f}" if "bound" in r else "",
                     f"{r['peak'] / r['bound']:.2f}" if "bound" in r else ""]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("| import only | | " + f"{self.import_peak / MIB:.0f} |" + " |" * (len(head) - 3))
        return "\n".join(lines)

    def ratios(self) -> list[str]:
        out = []
        for b in self.batches:
            rt, pt = self.row("runtime whole", b), self.row("torch whole", b)
            out.append(f"batch {b}: runtime whole / torch whole: peak {rt['peak'] / pt['peak']:.2f}x, "
                       f"step time {rt['step_ms'] / pt['step_ms']:.2f}x")
            blocks = [r for r in self.rows if r["batch"] == b and r["config"].startswith("block")]
            out.append(f"batch {b}: block / runtime whole (peak): " +
                       ", ".join(f"{r['config'].split()[1]}: {r['peak'] / rt['peak']:.2f}x" for r in blocks))
            out.append(f"batch {b}: block / its lower bound (peak): " +
                       ", ".join(f"{r['config'].split()[1]}: {r['peak'] / r['bound']:.2f}x" for r in blocks))
            if self.layerwise:
                out.append(self._layerwise_breakdown(b))
        out.append(f"device runtime import only: {self.import_peak / MIB:.0f} MB")
        return out

    def _layerwise_breakdown(self, b: int) -> str:
        """Where the layer-wise ratio comes from: the fixed runtime import, and the lower bounds.

        A layer's peak can only shrink towards its lower bound, so whole bound / largest layer
        bound is the most layer-wise could gain on this runtime; subtracting the import
        shows what the training itself (weights, optimizer state, activations) gains.
        """
        rt, pt, imp = self.row("runtime whole", b), self.row("torch whole", b), self.import_peak
        layers = [r for r in self.rows if r["batch"] == b and r["config"].startswith("layer")]
        worst = max(layers, key=lambda r: r["peak"])
        worst_bound = max(layers, key=lambda r: r["bound"])
        return (f"batch {b}: layer-wise, whole-model / largest layer: measured {rt['peak'] / worst['peak']:.1f}x "
                f"({(rt['peak'] - imp) / (worst['peak'] - imp):.1f}x above the runtime import); lower bounds "
                f"{rt['bound'] / worst_bound['bound']:.1f}x ({(rt['bound'] - imp) / (worst_bound['bound'] - imp):.1f}x "
                f"above the import); torch whole / largest layer {pt['peak'] / worst['peak']:.1f}x")

    def checks(self) -> list[tuple[bool, str]]:
        last = f"block {len(self.manifest.blocks) - 1}"
        res, parts, ok = [], [], True
        for b in self.batches:
            ratio = self.row(last, b)["peak"] / self.row("runtime whole", b)["peak"]
            ok &= ratio <= TARGET_LAST_BLOCK
            parts.append(f"batch {b}: {ratio:.2f}x")
        res.append((ok, f"last block ({last}) <= {TARGET_LAST_BLOCK}x whole-model runtime training: " + ", ".join(parts)))
        blocks = [r for r in self.rows if r["config"].startswith("block")]
        over = [r for r in blocks if r["peak"] > TARGET_BOUND * r["bound"]]
        worst = max(blocks, key=lambda r: r["peak"] / r["bound"])
        detail = (f"{len(over)} of {len(blocks)} over: " +
                  ", ".join(f"{r['config']} @{r['batch']} {r['peak'] / r['bound']:.2f}x "
                            f"({r['peak'] / MIB:.0f} vs {r['bound'] / MIB:.0f} MB)" for r in over)) if over else \
            f"worst {worst['config']} @{worst['batch']} {worst['peak'] / worst['bound']:.2f}x"
        res.append((not over, f"every block <= {TARGET_BOUND}x its lower bound: {detail}"))
        if self.layerwise:
            parts, ok = [], True
            for b in self.batches:
                worst = max((r for r in self.rows if r["batch"] == b and r["config"].startswith("layer")),
                            key=lambda r: r["peak"])
                ratio = worst["peak"] / self.row("runtime whole", b)["peak"]
                ok &= ratio <= TARGET_LAYERWISE
                parts.append(f"batch {b}: {ratio:.2f}x ({worst['config']}, {worst['peak'] / MIB:.0f} MB)")
            res.append((ok, f"layer-wise: largest single layer <= {TARGET_LAYERWISE}x whole-model runtime training: "
                            + ", ".join(parts)))
        imp = self.import_peak / MIB
        res.append((imp <= TARGET_IMPORT_MB, f"device runtime import <= {TARGET_IMPORT_MB} MB: {imp:.1f} MB"))
        return res


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(argv[1], argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="32,64,128", help="comma-separated batch sizes (default: 32,64,128)")
    p.add_argument("--steps", type=int, default=10,
                   help="optimizer steps per measured process; the first is warm-up, step time is the fastest "
                        "of the rest (default: 10)")
    p.add_argument("--layerwise", action="store_true",
                   help="also measure every layer alone with its head (greedy layer-wise training)")
    p.add_argument("--workdir", type=Path, help="where the export, data and caches go "
                                                "(default: a temporary directory, removed afterwards)")
    p.add_argument("--write-docs", action="store_true",
                   help=f"write the results into {DOCS.relative_to(REPO)} "
                        f"(the section between the bench_block_memory markers)")
    a = p.parse_args(argv)
    batches = [int(b) for b in a.batches.split(",") if b.strip()]
    if a.steps < 4 or not batches or min(batches) < 1:
        p.error("--steps must be at least 4 and batch sizes at least 1")
    if max(batches) > SAMPLES:
        p.error(f"batch sizes above the synthetic dataset's {SAMPLES} samples are not supported")

    t0, load_before = time.monotonic(), os.getloadavg()[0]
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="bench-block-memory-"))
    workdir.mkdir(parents=True, exist_ok=True)
    bench = Bench(workdir.resolve(), batches, a.steps, a.layerwise)
    try:
        bench.run()
    finally:
        if a.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    minutes, load_after = (time.monotonic() - t0) / 60, os.getloadavg()[0]

    checks = bench.checks()
    lines = [
        f"Block-wise vs whole-model training, model vgg_cifar (9.2 M parameters, 5 blocks, 3x32x32 input), "
        f"AdamW, cross-entropy, {THREADS} intra-op threads for torch and onnxruntime alike.",
        f"Data: synthetic (random float32 inputs, random int64 labels; {SAMPLES} samples): memory and speed do "
        f"not depend on the values.",
        f"Each row is its own fresh process; peak = its VmHWM. Step time = shortest wall time between consecutive "
        f"optimizer steps over steps 2..{a.steps} (batch fetch included; session build and step 1 excluded); "
        f"device runs save one checkpoint after step {Bench.checkpoint_step(a.steps)} and the trained weights at the "
        f"end, as a real job does; 'peak before saves' is the VmHWM after step {Bench.checkpoint_step(a.steps) - 1}.",
        f"Step times are wall clock and suffer from other load on the machine (1-min load average "
        f"{load_before:.1f} at start, {load_after:.1f} at end, on {len(os.sched_getaffinity(0))} CPUs); peaks do not.",
        f"Lower bound = runtime import-only peak + 4 x parameter bytes (block + head) + activation bytes "
        f"(block + head, manifest) x batch.",
    ]
    ratios = bench.ratios()
    verdicts = [f"{'PASS' if ok else 'FAIL'}: {text}" for ok, text in checks]
    print("\n".join(lines), "", bench.table(), "", *ratios, "", *verdicts, sep="\n")
    print(f"\nruntime {minutes:.1f} min")
    if a.write_docs:
        versions = ", ".join(f"{k} {v}" for k, v in sorted(bench.versions.items()))
        section = "\n".join([
            "## Block-wise training memory (bench_block_memory)", "",
            f"Run {datetime.date.today().isoformat()} on {machine()}; {versions}. Whole run: {minutes:.1f} min.", "",
            f"Reproduce: `{COMMAND}`", "",
            *(l + "  " for l in lines), "",
            bench.table(), "",
            *(f"- {r}" for r in ratios), "",
            *(f"- **{v.split(':', 1)[0]}**:{v.split(':', 1)[1]}" for v in verdicts), ""])
        write_section("bench_block_memory", section)
        log(f"wrote {DOCS}")
    return 0 if all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
