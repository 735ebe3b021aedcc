#!/usr/bin/env python3
"""Benchmark: peak RSS and step time of the device runtime vs onnxruntime-training and torch, per block.

Why this exists: the product's promise is that a device too small to train a whole model
can still train one block of it (from cached activations of the frozen prefix) at a
fraction of the memory, and the device runtime moved from onnxruntime-training 1.19.2 (frozen
upstream, x86 only) to standard-ONNX step graphs on the maintained onnxruntime with numpy
optimizers. This script measures, in one run, on the zoo's VGG-style CNN
(`coordinator.model.zoo.vgg_cifar`, 9.2 M parameters, 5 blocks, 3x32x32; --model another), for the whole model
and every block (its layers + its head, from the cached activations of the frozen prefix):

  ours           the device job as it runs today: edge_runtime.jobs.worker.run_job with a
                 JobSpec (step graph from coordinator/model/part_graphs.py on onnxruntime
                 1.32, AdamW in numpy), one checkpoint halfway and the update at the end;
  ort-training   the old device path, rebuilt here: onnxruntime-training 1.19.2 (its own folder,
                 coordinator.model.part_graphs.builder_dir()) training artifacts from
                 generate_artifacts (the part's forward model composed with its weights,
                 requires_grad = its trainable names, frozen = the rest, the scaled-sum
                 cross-entropy loss, AdamW) and its TrainingSession Module/Optimizer with the
                 session options the old runtime used (memory patterns off, arena on), fed the
                 same cached activations, batches and labels;
  torch          torch eager on the same layers + head from the same cached activations (the
                 whole model from the dataset), AdamW, cross-entropy;
  import         a process that only imports the device runtime (its fixed cost);
  layer l        (with --layerwise, on all three) layer l alone with the small head right
                 after it: what greedy layer-wise training (coordinator/strategies/layerwise.py)
                 asks; shown, not held to the runtime targets.

Every configuration runs in its own fresh process, so no measurement inherits the memory
of another; the three runtimes of one part and batch are measured back to back, so they see
the same load, and the whole model and the blocks are measured again in a second round
(--repeats) with the runtimes in the other order: a cell shows its largest peak and its
smallest step time, and the report says how far repeated processes differed. Peaks are the kernel's high-water mark of the measured process (VmHWM,
printed by the child itself; see edge_runtime/memory.py for why not ru_maxrss). Nothing a
measured process does is building: before anything is measured, the coordinator builds
every part's step graph (ensure_part_graphs), a one-step job per part builds its prefix
activation cache (the measured job reports that it computed no prefix), and a child with
onnxruntime-training first on its path builds every training artifact.

Step time is the CPU time (user + system) of one optimizer step (batch read, forward,
backward, optimizer step), the smallest over steps 2..N; the first step (session warm-up)
and, for ours, the step that writes the checkpoint are left out. CPU time, not wall time,
because the machine this runs on is shared: other processes take the core away at random,
which stretches wall times but not the CPU a step consumes; the smallest, because sharing
caches and cores with other processes still inflates CPU time (by up to 2x between steps of
one process, measured), never deflates it. Every runtime gets one intra-op thread (THREADS),
so a step's CPU time is its work and equals its wall time on an idle core; the fastest
wall-clock step is shown beside it. Data is synthetic (random float32 inputs, random int64
labels): memory and speed do not depend on the values.

The lower bound of a part is: the runtime's import-only peak + 4 x the parameter bytes of
the part (weights, gradients, AdamW m and v) + its activation bytes for one batch (manifest
activation_bytes_per_sample over its layers and head, x batch).

Targets checked (exit status 1 when one fails): runtime import <= 45 MB; for the whole model
and every block at every batch, ours' peak <= 1.0x onnxruntime-training's, ours' step time
<= 1.0x onnxruntime-training's and <= 1.0x torch's; the last block <= 0.4x the whole model
(ours); every block <= 1.3x its lower bound; with --layerwise, the largest single-layer peak
<= 0.2x the whole model (ours).
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
SAMPLES = 256           # local dataset size; batches cycle over it
# One intra-op thread for every runtime: step times are CPU times (below), and with a second thread
# onnxruntime's pool thread spin-waits while the caller works (ours' numpy AdamW step of block 4
# measured 10 ms of CPU at one thread, 17 ms at two, for the same work). Ours' peaks at one thread
# were within 1 MB of those at two for every part at batches 32 and 128; onnxruntime-training's
# within 1.5 MB but for block 1 at 128, whose peak varies by 7 MB from run to run at either count.
THREADS = 1
LR = 1e-3
ADAM_EPS = 1e-8         # the JobSpec default; the artifact's AdamW gets the same
SEED = 0

TARGET_IMPORT_MB = 45
TARGET_VS_ORT_PEAK = 1.0
TARGET_VS_ORT_STEP = 1.0
TARGET_VS_TORCH_STEP = 1.0
TARGET_LAST_BLOCK = 0.4
TARGET_BOUND = 1.3
TARGET_LAYERWISE = 0.2

OURS, ORT, TORCH = "ours", "ort-training", "torch"
DOCS_MODEL = "vgg_cifar"

IMPORT_ONLY = ("from edge_runtime.train import ort_backend, trainer; from edge_runtime.jobs import worker; "
               "import json; print(json.dumps(ort_backend.runtime_versions())); "
               "from edge_runtime.jobs.child import report_own_peak; report_own_peak()")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# Children: each runs in a fresh process, prints one JSON line, then its own VmHWM.
# ---------------------------------------------------------------------------------------

def _clock() -> tuple[float, float]:
    """(wall, CPU of the whole process) now, in seconds."""
    return time.perf_counter(), time.process_time()


def _batches(n: int, batch: int, steps: int, seed: int = SEED):
    """The device trainer's data order (edge_runtime/train/trainer.py): one seeded permutation per epoch."""
    import numpy as np
    per_epoch = -(-n // batch)
    perm, perm_epoch = None, -1
    for step in range(steps):
        epoch, k = divmod(step, per_epoch)
        if epoch != perm_epoch:
            perm, perm_epoch = np.random.default_rng([seed, epoch]).permutation(n), epoch
        yield perm[k * batch:(k + 1) * batch].copy()


def _child_device(spec_path: Path) -> dict:
    """One device job through edge_runtime.jobs.worker.run_job (the code a device runs), timed per step.

    run_job's progress callback records the clocks and VmHWM after every optimizer step, and
    a wrapper around StepSession.run the VmHWM just before the first forward/backward (what
    the job holds before it computes anything: import, session, tensors, optimizer state, the
    first batch); nothing else about the job changes. (Wrapping trainer.train instead would
    not do: a wrapper's *args keeps the job's weights alive, which train() drops once it
    holds them.)
    """
    from edge_runtime.jobs import worker
    from edge_runtime.train import ort_backend

    clocks, peaks, before = [], [], []
    run = ort_backend.StepSession.run

    def run_noting_first(self, *args, **kwargs):
        if not before:
            before.append(peak_rss_bytes())
        return run(self, *args, **kwargs)

    ort_backend.StepSession.run = run_noting_first

    def on_progress(phase: str, done: int, total: int) -> None:
        if phase == "train":  # after each optimizer step (and its checkpoint, if any)
            clocks.append(_clock())
            peaks.append(peak_rss_bytes())

    result = worker.run_job(worker.JobSpec.load(spec_path), progress=on_progress)["result"]
    return {"clocks": clocks, "peaks": peaks, "before_step": before[0], "steps": result["steps"],
            "prefix_computed": result["prefix_computed"]}


def _import_ort_training():
    """onnxruntime-training 1.19.2 (first on this child's path) without torch: block torch, and register empty
    stand-ins for its torch-only `amp`/`optim` (DESIGN.md; coordinator/model/step_graph.py does the same)."""
    import types
    sys.modules["torch"] = None  # type: ignore[assignment]
    for name in ("onnxruntime.training.amp", "onnxruntime.training.optim"):
        sys.modules.setdefault(name, types.ModuleType(name))
    import onnxruntime as ort
    ort.set_default_logger_severity(3)
    return ort


def _child_ort_build(requests_path: Path) -> dict:
    """Build the onnxruntime-training artifacts of the requested parts (the old device path's artifact builder).

    Loss: loss_scale x the summed cross-entropy, as the old runtime and coordinator/model/step_graph.py's
    _training_block build it; AdamW with the job's eps and no weight decay.
    """
    import onnx
    from onnx import TensorProto, helper

    ort = _import_ort_training()
    from onnxruntime.training import artifacts, onnxblock

    class ScaledSumCrossEntropy(onnxblock.Block):
        def __init__(self) -> None:
            super().__init__()
            self._ce = onnxblock.loss.CrossEntropyLoss(reduction="sum")

        def build(self, logits: str) -> str:
            loss_sum = self._ce(logits, "labels")
            self.base.graph.input.append(helper.make_tensor_value_info("loss_scale", TensorProto.FLOAT, []))
            self.base.graph.node.append(helper.make_node("Mul", [loss_sum, "loss_scale"], ["loss"], name="loss_scale"))
            return "loss"

    built = []
    for request in json.loads(requests_path.read_text()):
        out = Path(request["out"])
        out.mkdir(parents=True, exist_ok=True)
        sys.stderr.flush()
        saved = os.dup(2)  # the C++ builder logs every graph transformer on fd 2
        with open(out / "generate.log", "wb") as sink:
            os.dup2(sink.fileno(), 2)
            try:
                artifacts.generate_artifacts(onnx.load(request["forward"]), requires_grad=request["trainable"],
                                             frozen_params=request["frozen"], loss=ScaledSumCrossEntropy(),
                                             optimizer=onnxblock.optim.AdamW(eps=ADAM_EPS, weight_decay=0.0),
                                             artifact_directory=str(out))
            finally:
                os.dup2(saved, 2)
                os.close(saved)
        built.append(request["what"])
    return {"built": built, "onnxruntime": ort.__version__}


def _child_ort(spec_path: Path) -> dict:
    """Train one part with onnxruntime-training 1.19.2 as the old device runtime did, timed per step.

    The old TrainingSession: checkpoint loaded, Module and Optimizer with memory patterns off
    and the arena on, weights read by name straight into the session's live buffers, freed
    heap returned; per step the batch read from the activation cache, forward/backward with
    loss_scale = 1/batch, learning rate set, optimizer step, gradients reset lazily.
    """
    import numpy as np

    ort = _import_ort_training()
    from onnxruntime.training import api

    from edge_runtime.memory import release_free_heap
    from edge_runtime.train.datasets import ArrayReader
    from edge_runtime.wire.weights import WeightFile

    spec = json.loads(spec_path.read_text())
    artifact = Path(spec["artifact"])
    so = ort.SessionOptions()
    so.enable_mem_pattern = False
    so.log_severity_level = 3
    so.intra_op_num_threads = spec["threads"]
    so.inter_op_num_threads = 1
    state = api.CheckpointState.load_checkpoint(str(artifact / "checkpoint"))
    module = api.Module(str(artifact / "training_model.onnx"), state, str(artifact / "eval_model.onnx"),
                        device="cpu", session_options=so)
    optimizer = api.Optimizer(str(artifact / "optimizer_model.onnx"), module)
    module.train()
    weights = WeightFile(Path(spec["weights"]), spec["names"])
    for name in spec["names"]:
        if not weights.read_into(name, state.parameters[name].data):
            state.parameters[name] = np.ascontiguousarray(weights[name], dtype=np.float32)
    weights = None
    release_free_heap()
    reader, labels = ArrayReader(Path(spec["inputs"])), np.load(spec["labels"])
    batch, clocks, before = spec["batch"], [], None
    scale = np.asarray(1.0 / batch, dtype=np.float32)
    for idx in _batches(len(labels), batch, spec["steps"]):
        x = reader.take(idx)
        before = before or peak_rss_bytes()
        loss = float(np.asarray(module(x, np.ascontiguousarray(labels[idx]), scale)))
        del x
        optimizer.set_learning_rate(LR)
        optimizer.step()
        module.lazy_reset_grad()
        if not np.isfinite(loss):
            raise RuntimeError(f"onnxruntime-training diverged: loss {loss}")
        clocks.append(_clock())
    return {"clocks": clocks, "before_step": before, "onnxruntime": ort.__version__}


def _child_torch(spec_path: Path) -> dict:
    """Train the same layers + head in torch eager from the same inputs, timed per step.

    The model is built on the meta device and only the part's modules are materialized, so
    the process holds the part's weights and nothing of the rest of the model.
    """
    import numpy as np
    import torch
    from torch import nn

    from coordinator.model import zoo
    from edge_runtime.train.datasets import ArrayReader
    from edge_runtime.wire.weights import WeightFile

    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    with torch.device("meta"):
        model = zoo.build(spec["model"])
    layers = model.layers()
    chosen = [(layers[i][0], layers[i][1]) for i in spec["span"]]
    chosen.append((spec["head_name"], model.get_submodule(spec["head_name"])))
    weights = WeightFile(Path(spec["weights"]))
    for prefix, module in chosen:
        module.to_empty(device="cpu")
        for pname, p in module.named_parameters():
            view = p.detach().numpy()
            if not weights.read_into(f"{prefix}.{pname}", view):
                view[...] = weights[f"{prefix}.{pname}"]
    net = nn.Sequential(*(m for _, m in chosen)).train()
    del model, weights
    optimizer = torch.optim.AdamW(net.parameters(), lr=LR, eps=ADAM_EPS, weight_decay=0.0)
    loss_fn = nn.CrossEntropyLoss()
    reader, labels = ArrayReader(Path(spec["inputs"])), np.load(spec["labels"])
    clocks, before = [], None
    for idx in _batches(len(labels), spec["batch"], spec["steps"]):
        x, y = torch.from_numpy(reader.take(idx)), torch.from_numpy(np.ascontiguousarray(labels[idx]))
        before = before or peak_rss_bytes()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        optimizer.step()
        del x, y, loss  # as the device trainers do: a batch is gone before the next one is read
        clocks.append(_clock())
    return {"clocks": clocks, "before_step": before, "torch": torch.__version__}


CHILDREN = {"device": _child_device, "ort-build": _child_ort_build, "ort": _child_ort, "torch": _child_torch}


def child_main(kind: str, args: list[str]) -> int:
    out = CHILDREN[kind](Path(args[0]))
    print(json.dumps(out), flush=True)
    report_own_peak()
    return 0


def _run(argv: list[str], what: str, builder: bool = False) -> tuple[dict, int]:
    """Run a child; return its JSON line and its peak RSS in bytes (raise with its stderr on failure).

    builder: put onnxruntime-training's folder first on the child's path (the old runtime).
    """
    env = device_child_env({"OMP_NUM_THREADS": str(THREADS)})  # the repo on the path; same threads for all
    if builder:
        from coordinator.model.part_graphs import builder_dir
        env["PYTHONPATH"] = os.pathsep.join([str(builder_dir()), env["PYTHONPATH"]])
    child = run_child(argv, env=env, cwd=REPO)
    lines = [l for l in child.stdout.splitlines() if l.startswith("{")]
    if child.returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed (exit {child.returncode}):\n{child.stderr[-3000:]}")
    return json.loads(lines[-1]), child.peak_rss_bytes


def step_times(clocks: list[list[float]], skip_step: int | None = None) -> tuple[float, float]:
    """(smallest CPU ms, smallest wall ms) of one step over steps 2..N, leaving out step `skip_step` (1-based).

    clocks[k] is (wall, cpu) after step k+1; step 1 (session warm-up) has no start time.
    """
    gaps = [(k + 2, b[0] - a[0], b[1] - a[1]) for k, (a, b) in enumerate(zip(clocks, clocks[1:]))]
    kept = [g for g in gaps if g[0] != skip_step] or gaps
    if not kept:
        return float("nan"), float("nan")
    return 1000 * min(g[2] for g in kept), 1000 * min(g[1] for g in kept)


# ---------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------

class Bench:
    runtimes = (OURS, ORT, TORCH)      # what a subclass measures (tools/bench_memory_wall.py: ours only)

    def __init__(self, workdir: Path, batches: list[int], steps: int, layerwise: bool = False, repeats: int = 1,
                 model: str = DOCS_MODEL):
        self.model = model
        self.workdir, self.batches, self.steps, self.layerwise = workdir, batches, steps, layerwise
        self.repeats = repeats
        self.nonce = f"{os.getpid()}-{int(time.time())}"  # a reused --workdir never returns a stored result
        self.runs: dict[tuple[str, int, str], list[dict]] = {}   # (part, batch, runtime) -> one dict per process
        self.versions: dict = {}
        self.prep_seconds: dict[str, float] = {}

    # -- setup ---------------------------------------------------------------------------
    def prepare(self) -> None:
        import numpy as np

        from coordinator.model import export, zoo
        from edge_runtime.train.datasets import LocalDataset

        log(f"exporting {self.model} to {self.workdir / 'model'}")
        self.manifest = export.export(zoo.build(self.model), self.workdir / "model")
        self.weights_path = self.manifest.graph_path(self.manifest.weights)
        self.data = self.workdir / "data"
        if not (self.data / "labels.npy").exists():
            rng = np.random.default_rng(0)
            x = rng.standard_normal((SAMPLES,) + tuple(self.manifest.input_shape), dtype=np.float32)
            y = rng.integers(0, self.manifest.num_classes, SAMPLES, dtype=np.int64)
            LocalDataset.write(self.data, x, y)
        self.dataset = LocalDataset(self.data)
        self.state = self.workdir / "state"
        self.jobs = self.workdir / "jobs"
        self.jobs.mkdir(parents=True, exist_ok=True)

    def parts(self) -> list[tuple[str, object]]:
        """(name, TrainablePart) of the whole model, every block and (with --layerwise) every layer."""
        from edge_runtime.wire.part import TrainablePart
        m = self.manifest
        everything = tuple(range(len(m.layers)))
        out = [("whole", TrainablePart(everything, everything, m.final_head.index))]
        out += [(f"block {b}", TrainablePart.block(m, b)) for b in range(len(m.blocks))]
        if self.layerwise:
            out += [(f"layer {i}", TrainablePart((i,), (i,), m.head_for_boundary(i))) for i in range(len(m.layers))]
        return out

    def parameters(self) -> int:
        """The model's trainable parameters (its heads' included)."""
        return sum(spec.nbytes for spec in self.manifest.param_specs().values() if spec.kind == "param") // 4

    @staticmethod
    def targeted(name: str) -> bool:
        """Parts the runtime targets are checked on: the whole model and the blocks (layers are shown, not checked)."""
        return not name.startswith("layer")

    @staticmethod
    def checkpoint_step(steps: int) -> int:
        """A measured job saves one checkpoint halfway (steps >= 4: at least one step runs before it)."""
        return max(1, steps // 2)

    def spec(self, task: str, part, batch: int, steps: int):
        from edge_runtime.jobs.worker import JobSpec
        config = dict(batch_size=batch, max_steps=steps, epochs=float(steps), optimizer="adamw",
                      learning_rate=LR, adam_eps=ADAM_EPS, checkpoint_every_steps=self.checkpoint_step(steps),
                      threads=THREADS)
        return JobSpec(manifest=str(self.manifest.root / "manifest.json"), weights=str(self.weights_path),
                       dataset=str(self.data), state_dir=str(self.state), task_id=f"{task}-{self.nonce}",
                       part=part.to_dict(), config=config)

    def _timed(self, what: str, fn) -> None:
        t0 = time.monotonic()
        fn()
        self.prep_seconds[what] = time.monotonic() - t0
        log(f"{what}: {self.prep_seconds[what]:.0f} s")

    def prepare_parts(self) -> None:
        """Step graphs, prefix activation caches and onnxruntime-training artifacts, before anything is measured."""
        from coordinator.model.part_graphs import ensure_part_graphs
        parts = self.parts()
        log(f"building the step graphs of {len(parts)} parts (coordinator, not measured)")
        self._timed("step graphs", lambda: ensure_part_graphs(self.manifest, [p for _, p in parts]))
        self._timed("prefix caches", lambda: [self._prepare_cache(name, part) for name, part in parts])
        self.inputs = {name: self._cache_path(part) for name, part in parts}
        if ORT in self.runtimes:
            self._timed("onnxruntime-training artifacts", self._build_ort_artifacts)

    def _prepare_cache(self, name: str, part) -> None:
        """A one-step job: builds the part's prefix activation cache, and shows the job runs at all."""
        from edge_runtime.jobs.worker import run_worker
        log(f"preparing {name}: prefix activation cache (one-step job, not measured)")
        spec = self.spec("prep-" + name.replace(" ", "-"), part, min(self.batches), 1)
        report, child = run_worker(spec, self.jobs)
        if not report or not report.get("ok"):
            raise RuntimeError(f"preparing {name} failed: {report and report.get('error')}\n{child.stderr[-2000:]}")
        shutil.rmtree(self.state / "runs" / spec.task_id, ignore_errors=True)

    def _cache_path(self, part) -> Path:
        """The activation file the device job reads for this part (the dataset's inputs for a part from layer 0)."""
        from edge_runtime.train.activation_cache import ActivationCache
        from edge_runtime.wire import weights as wcodec
        from edge_runtime.wire.model_blobs import part_graph_paths
        _, prefix_graph = part_graph_paths(self.manifest, part)
        path, computed = ActivationCache(self.state / "activations").get_or_build(
            self.manifest, part.span[0], prefix_graph, wcodec.WeightFile(self.weights_path), self.dataset,
            batch_size=min(self.batches))
        if computed:
            raise RuntimeError(f"the prefix cache of {part} was not built by its preparatory job")
        return path

    def _build_ort_artifacts(self) -> None:
        """The old path's artifacts: forward model composed with the weights, then generate_artifacts in a child
        whose onnxruntime is onnxruntime-training 1.19.2."""
        from coordinator.model.graphs import GraphLibrary, compose
        from edge_runtime.wire.weights import WeightFile
        lib, weights, requests = GraphLibrary(self.manifest), WeightFile(self.weights_path), []
        self.artifacts = {}
        for name, part in self.parts():
            folder = self.workdir / "ort-training" / name.replace(" ", "-")
            folder.mkdir(parents=True, exist_ok=True)
            forward = folder / "forward.onnx"
            forward.write_bytes(compose(lib, part.span, part.head, weights).SerializeToString())
            requests.append({"forward": str(forward), "trainable": part.trainable_names(self.manifest),
                             "frozen": part.frozen_names(self.manifest), "out": str(folder / "artifact"),
                             "what": name})
            self.artifacts[name] = folder / "artifact"
        path = self.workdir / "ort-training" / "requests.json"
        path.write_text(json.dumps(requests))
        log(f"building {len(requests)} onnxruntime-training artifacts (child with the gradient builder's folder)")
        out, _ = _run([sys.executable, __file__, "--child", "ort-build", str(path)], "artifact builder", builder=True)
        self.versions["onnxruntime-training"] = out["onnxruntime"]

    # -- measurements --------------------------------------------------------------------
    def measure_import(self) -> None:
        log("import-only process (device runtime)")
        out, peak = _run([sys.executable, "-c", IMPORT_ONLY], "import-only child")
        self.versions.update(out)
        self.import_peak = peak

    def _child_spec(self, name: str, batch: int, **fields) -> Path:
        path = self.jobs / f"{name.replace(' ', '-')}-{batch}-{fields.get('kind', '')}-{self.nonce}.json"
        path.write_text(json.dumps(dict(batch=batch, steps=self.steps, threads=THREADS, model=self.model,
                                        inputs=str(self.inputs[name]), labels=str(self.data / "labels.npy"),
                                        weights=str(self.weights_path), **fields)))
        return path

    def measure_ours(self, name: str, part, batch: int) -> dict:
        spec = self.spec(name.replace(" ", "-"), part, batch, self.steps)
        path = self.jobs / f"{spec.task_id}.json"
        spec.save(path)
        out, peak = _run([sys.executable, __file__, "--child", "device", str(path)], f"{name} ours (batch {batch})")
        if out["prefix_computed"] or len(out["clocks"]) != self.steps:
            raise RuntimeError(f"{name} (batch {batch}) was not a clean measurement: {out}")
        shutil.rmtree(self.state / "runs" / spec.task_id, ignore_errors=True)
        ckpt = self.checkpoint_step(self.steps)
        cpu_ms, wall_ms = step_times(out["clocks"], skip_step=ckpt)
        return dict(peak=peak, before_saves=out["peaks"][ckpt - 2], before_step=out["before_step"], cpu_ms=cpu_ms,
                    wall_ms=wall_ms, bound=self.lower_bound(part, batch))

    def measure_ort(self, name: str, part, batch: int) -> dict:
        spec = self._child_spec(name, batch, kind="ort", artifact=str(self.artifacts[name]),
                                names=part.all_names(self.manifest))
        out, peak = _run([sys.executable, __file__, "--child", "ort", str(spec)], f"{name} {ORT} (batch {batch})",
                         builder=True)
        cpu_ms, wall_ms = step_times(out["clocks"])
        return dict(peak=peak, before_step=out["before_step"], cpu_ms=cpu_ms, wall_ms=wall_ms)

    def measure_torch(self, name: str, part, batch: int) -> dict:
        spec = self._child_spec(name, batch, kind="torch", span=list(part.span),
                                head_name=self.manifest.heads[part.head].name)
        out, peak = _run([sys.executable, __file__, "--child", "torch", str(spec)], f"{name} torch (batch {batch})")
        self.versions["torch"] = out["torch"]
        cpu_ms, wall_ms = step_times(out["clocks"])
        return dict(peak=peak, before_step=out["before_step"], cpu_ms=cpu_ms, wall_ms=wall_ms)

    def lower_bound(self, part, batch: int) -> int:
        m = self.manifest
        layers, head = [m.layers[i] for i in part.span], m.heads[part.head]
        params = sum(l.param_bytes for l in layers) + head.param_bytes
        acts = sum(l.activation_bytes_per_sample for l in layers) + head.activation_bytes_per_sample
        return self.import_peak + 4 * params + acts * batch

    def run(self) -> None:
        self.prepare()
        self.measure_import()
        self.prepare_parts()
        parts = self.parts()
        # Round 1 measures everything; later rounds measure the targeted parts again, the runtimes in the other
        # order, minutes later: a slow spell of the shared machine then spoils one process of a cell, not all.
        todo = [(r, b, name, part, rt) for r in range(self.repeats) for b in self.batches for name, part in parts
                if r == 0 or self.targeted(name) for rt in ((OURS, ORT, TORCH) if r % 2 == 0 else (TORCH, ORT, OURS))]
        measure = {OURS: self.measure_ours, ORT: self.measure_ort, TORCH: self.measure_torch}
        for k, (rnd, batch, name, part, rt) in enumerate(todo, 1):
            t0 = time.monotonic()
            r = measure[rt](name, part, batch)
            self.runs.setdefault((name, batch, rt), []).append(r)
            log(f"[{k}/{len(todo)}] round {rnd + 1}, batch {batch}: {name} {rt}: peak {r['peak'] / MIB:.0f} MB, "
                f"step {r['cpu_ms']:.0f} ms CPU / {r['wall_ms']:.0f} ms fastest wall ({time.monotonic() - t0:.0f} s)")

    # -- report --------------------------------------------------------------------------
    def get(self, name: str, batch: int, rt: str = OURS) -> dict | None:
        """One cell over its processes: the largest peaks (a target cannot pass by luck), the smallest step times."""
        runs = self.runs.get((name, batch, rt))
        if not runs:
            return None
        out = dict(runs[0])
        for key in ("peak", "before_step", "before_saves"):
            if key in out:
                out[key] = max(r[key] for r in runs)
        for key in ("cpu_ms", "wall_ms"):
            out[key] = min(r[key] for r in runs)
        return out

    def spread(self) -> str:
        """How much repeated processes of one cell differed: how far a single measurement can be trusted."""
        cells = [(k, v) for k, v in self.runs.items() if len(v) > 1]
        if not cells:
            return "each cell was measured once"
        peaks, times = [], []
        for rt in (OURS, ORT, TORCH):
            mine = [c for c in cells if c[0][2] == rt]
            peak = max(mine, key=lambda c: max(r["peak"] for r in c[1]) - min(r["peak"] for r in c[1]))
            cpu = max(mine, key=lambda c: max(r["cpu_ms"] for r in c[1]) / min(r["cpu_ms"] for r in c[1]))
            peaks.append(f"{rt} {(max(r['peak'] for r in peak[1]) - min(r['peak'] for r in peak[1])) / MIB:.1f} MB "
                         f"({peak[0][0]} @{peak[0][1]})")
            times.append(f"{rt} {max(r['cpu_ms'] for r in cpu[1]) / min(r['cpu_ms'] for r in cpu[1]):.2f}x "
                         f"({cpu[0][0]} @{cpu[0][1]})")
        return (f"repeated processes of one cell ({len(cells)} cells, {self.repeats} each) differed in peak by at "
                f"most: {', '.join(peaks)}; in step CPU time by at most: {', '.join(times)}")

    def names(self) -> list[str]:
        return [name for name, _ in self.parts()]

    @staticmethod
    def _table(head: list[str], rows: list[list[str]]) -> str:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(head))) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)

    def memory_table(self) -> str:
        head = ["part", "batch", "ours MB", f"{ORT} MB", f"ours / {ORT}", "torch MB", "ours before step 1 MB",
                f"{ORT} before step 1 MB", "lower bound MB", "ours / bound", "ours / ours whole"]
        rows = []
        for b in self.batches:
            for name in self.names():
                o, x, t, w = self.get(name, b), self.get(name, b, ORT), self.get(name, b, TORCH), self.get("whole", b)
                rows.append([name, str(b), f"{o['peak'] / MIB:.0f}", f"{x['peak'] / MIB:.0f}",
                             f"{o['peak'] / x['peak']:.2f}", f"{t['peak'] / MIB:.0f}",
                             f"{o['before_step'] / MIB:.0f}", f"{x['before_step'] / MIB:.0f}",
                             f"{o['bound'] / MIB:.0f}", f"{o['peak'] / o['bound']:.2f}", f"{o['peak'] / w['peak']:.2f}"])
        rows.append(["import only (ours)", "", f"{self.import_peak / MIB:.0f}"] + [""] * (len(head) - 3))
        return self._table(head, rows)

    def time_table(self) -> str:
        head = ["part", "batch", "ours CPU ms", f"{ORT} CPU ms", "torch CPU ms", f"ours / {ORT}", "ours / torch",
                "ours fastest wall ms", f"{ORT} fastest wall ms", "torch fastest wall ms"]
        rows = []
        for b in self.batches:
            for name in self.names():
                o, x, t = self.get(name, b), self.get(name, b, ORT), self.get(name, b, TORCH)
                rows.append([name, str(b), f"{o['cpu_ms']:.0f}", f"{x['cpu_ms']:.0f}", f"{t['cpu_ms']:.0f}",
                             f"{o['cpu_ms'] / x['cpu_ms']:.2f}", f"{o['cpu_ms'] / t['cpu_ms']:.2f}",
                             f"{o['wall_ms']:.0f}", f"{x['wall_ms']:.0f}", f"{t['wall_ms']:.0f}"])
        return self._table(head, rows)

    def ratios(self) -> list[str]:
        out = []
        blocks = [n for n in self.names() if n.startswith("block")]
        for b in self.batches:
            w, x, t = self.get("whole", b), self.get("whole", b, ORT), self.get("whole", b, TORCH)
            out.append(f"batch {b}: whole model: ours {w['peak'] / MIB:.0f} MB, {ORT} {x['peak'] / MIB:.0f} MB, "
                       f"torch {t['peak'] / MIB:.0f} MB; ours / {ORT} peak {w['peak'] / x['peak']:.2f}x, "
                       f"CPU per step {w['cpu_ms'] / x['cpu_ms']:.2f}x; ours / torch CPU per step "
                       f"{w['cpu_ms'] / t['cpu_ms']:.2f}x")
            parts = [n for n in self.names() if self.targeted(n)]
            out.append(f"batch {b}: before step 1, ours - {ORT}: " + ", ".join(
                f"{n}: {(self.get(n, b)['before_step'] - self.get(n, b, ORT)['before_step']) / MIB:+.0f} MB"
                for n in parts) + f"; the steps' working memory (peak - before step 1), ours - {ORT}: " + ", ".join(
                f"{n}: {(self.get(n, b)['peak'] - self.get(n, b)['before_step'] - self.get(n, b, ORT)['peak'] + self.get(n, b, ORT)['before_step']) / MIB:+.0f} MB"
                for n in parts))
            out.append(f"batch {b}: block / whole model, ours (peak): " +
                       ", ".join(f"{n.split()[1]}: {self.get(n, b)['peak'] / w['peak']:.2f}x" for n in blocks))
            out.append(f"batch {b}: block / whole model, {ORT} (peak): " +
                       ", ".join(f"{n.split()[1]}: {self.get(n, b, ORT)['peak'] / x['peak']:.2f}x" for n in blocks))
            if self.layerwise:
                out.append(self._layerwise_breakdown(b))
        saves = max(((n, b, self.get(n, b)) for b in self.batches for n in self.names()),
                    key=lambda x: x[2]["peak"] - x[2]["before_saves"])
        ckpt = self.checkpoint_step(self.steps)
        out.append(f"ours' peak grew after step {ckpt - 1} (later steps, its checkpoint after step {ckpt}, its update at "
                   f"the end) by at most {(saves[2]['peak'] - saves[2]['before_saves']) / MIB:.1f} MB "
                   f"({saves[0]} @{saves[1]})")
        out.append(self.spread())
        out.append(f"device runtime import only: {self.import_peak / MIB:.1f} MB")
        return out

    def _layerwise_breakdown(self, b: int) -> str:
        """Where the layer-wise ratio comes from: the fixed runtime import, and the lower bounds.

        A layer's peak can only shrink towards its lower bound, so whole bound / largest layer
        bound is the most layer-wise could gain on this runtime; subtracting the import
        shows what the training itself (weights, optimizer state, activations) gains.
        """
        w, t, x, imp = self.get("whole", b), self.get("whole", b, TORCH), self.get("whole", b, ORT), self.import_peak
        layers = [self.get(n, b) | {"name": n} for n in self.names() if n.startswith("layer")]
        worst = max(layers, key=lambda r: r["peak"])
        worst_bound = max(layers, key=lambda r: r["bound"])
        worst_ort = max((self.get(n, b, ORT) | {"name": n} for n in self.names() if n.startswith("layer")),
                        key=lambda r: r["peak"])
        return (f"batch {b}: layer-wise, whole model / largest layer (ours): measured {w['peak'] / worst['peak']:.1f}x "
                f"({(w['peak'] - imp) / (worst['peak'] - imp):.1f}x above the runtime import); lower bounds "
                f"{w['bound'] / worst_bound['bound']:.1f}x ({(w['bound'] - imp) / (worst_bound['bound'] - imp):.1f}x "
                f"above the import); torch whole / largest layer {t['peak'] / worst['peak']:.1f}x; {ORT} whole / its "
                f"largest layer {x['peak'] / worst_ort['peak']:.1f}x ({worst_ort['name']}, "
                f"{worst_ort['peak'] / MIB:.0f} MB)")

    def _versus(self, metric: str, other: str, target: float, unit: str) -> tuple[bool, str]:
        """Ours vs another runtime on the whole model and every block at every batch: the misses by how much, or
        the closest case."""
        pairs = [(n, b, self.get(n, b), self.get(n, b, other)) for b in self.batches for n in self.names()
                 if self.targeted(n)]
        scale = MIB if metric == "peak" else 1.0

        def show(n, b, o, x):
            return (f"{n} @{b} {o[metric] / x[metric]:.2f}x ({o[metric] / scale:.0f} vs {x[metric] / scale:.0f} {unit}, "
                    f"{(o[metric] - x[metric]) / scale:+.0f} {unit})")
        over = [p for p in pairs if p[2][metric] > target * p[3][metric]]
        if over:
            return False, f"{len(over)} of {len(pairs)} over: " + "; ".join(show(*p) for p in over)
        worst = max(pairs, key=lambda p: p[2][metric] / p[3][metric])
        return True, f"all {len(pairs)} within; closest {show(*worst)}"

    def checks(self) -> list[tuple[bool, str]]:
        res = []
        imp = self.import_peak / MIB
        res.append((imp <= TARGET_IMPORT_MB, f"device runtime import <= {TARGET_IMPORT_MB} MB: {imp:.1f} MB"
                    + ("" if imp <= TARGET_IMPORT_MB else f" ({imp - TARGET_IMPORT_MB:+.1f} MB)")))
        ok, text = self._versus("peak", ORT, TARGET_VS_ORT_PEAK, "MB")
        res.append((ok, f"peak, whole model and every block, ours <= {TARGET_VS_ORT_PEAK}x {ORT}: {text}"))
        ok, text = self._versus("cpu_ms", ORT, TARGET_VS_ORT_STEP, "ms")
        res.append((ok, f"step CPU time, ours <= {TARGET_VS_ORT_STEP}x {ORT}: {text}"))
        ok, text = self._versus("cpu_ms", TORCH, TARGET_VS_TORCH_STEP, "ms")
        res.append((ok, f"step CPU time, ours <= {TARGET_VS_TORCH_STEP}x torch eager: {text}"))
        last = f"block {len(self.manifest.blocks) - 1}"
        parts, ok = [], True
        for b in self.batches:
            ratio = self.get(last, b)["peak"] / self.get("whole", b)["peak"]
            ok &= ratio <= TARGET_LAST_BLOCK
            parts.append(f"batch {b}: {ratio:.2f}x")
        res.append((ok, f"last block ({last}) <= {TARGET_LAST_BLOCK}x the whole model (ours): " + ", ".join(parts)))
        blocks = [(n, b, self.get(n, b)) for b in self.batches for n in self.names() if n.startswith("block")]
        over = [x for x in blocks if x[2]["peak"] > TARGET_BOUND * x[2]["bound"]]
        worst = max(blocks, key=lambda x: x[2]["peak"] / x[2]["bound"])
        detail = (f"{len(over)} of {len(blocks)} over: " +
                  ", ".join(f"{n} @{b} {r['peak'] / r['bound']:.2f}x ({r['peak'] / MIB:.0f} vs {r['bound'] / MIB:.0f} MB)"
                            for n, b, r in over)) if over else \
            f"worst {worst[0]} @{worst[1]} {worst[2]['peak'] / worst[2]['bound']:.2f}x"
        res.append((not over, f"every block <= {TARGET_BOUND}x its lower bound (ours): {detail}"))
        if self.layerwise:
            parts, ok = [], True
            for b in self.batches:
                worst = max((self.get(n, b) | {"name": n} for n in self.names() if n.startswith("layer")),
                            key=lambda r: r["peak"])
                ratio = worst["peak"] / self.get("whole", b)["peak"]
                ok &= ratio <= TARGET_LAYERWISE
                parts.append(f"batch {b}: {ratio:.2f}x ({worst['name']}, {worst['peak'] / MIB:.0f} MB)")
            res.append((ok, f"layer-wise: largest single layer <= {TARGET_LAYERWISE}x the whole model (ours): "
                            + ", ".join(parts)))
        return res


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(argv[1], argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="32,64,128", help="comma-separated batch sizes (default: 32,64,128)")
    p.add_argument("--steps", type=int, default=8,
                   help="optimizer steps per measured process; step 1 is warm-up, the step time is the smallest "
                        "CPU time of the rest (default: 8)")
    p.add_argument("--repeats", type=int, default=2,
                   help="processes per cell of the whole model and the blocks, in rounds minutes apart; a cell "
                        "shows the largest peak and the smallest step time (default: 2)")
    p.add_argument("--model", default=DOCS_MODEL, help=f"a zoo model (default {DOCS_MODEL}, the one the docs' section "
                                                         f"is about; --write-docs takes no other)")
    p.add_argument("--layerwise", action="store_true",
                   help="also measure every layer alone with its head (greedy layer-wise training)")
    p.add_argument("--workdir", type=Path, help="where the export, data, graphs and caches go "
                                                "(default: a temporary directory, removed afterwards)")
    p.add_argument("--write-docs", action="store_true",
                   help=f"write the results into {DOCS.relative_to(REPO)} "
                        f"(the section between the bench_block_memory markers)")
    a = p.parse_args(argv)
    batches = [int(b) for b in a.batches.split(",") if b.strip()]
    if a.steps < 4 or a.repeats < 1 or not batches or min(batches) < 1:
        p.error("--steps must be at least 4, --repeats at least 1 and batch sizes at least 1")
    if a.write_docs and a.model != DOCS_MODEL:
        p.error(f"--write-docs writes the section about {DOCS_MODEL}; measure {a.model} without it")
    if max(batches) > SAMPLES:
        p.error(f"batch sizes above the synthetic dataset's {SAMPLES} samples are not supported")
    command = " ".join([".venv/bin/python tools/bench_block_memory.py"]
                       + ([f"--model {a.model}"] if a.model != DOCS_MODEL else [])
                       + ([f"--batches {a.batches}"] if a.batches != "32,64,128" else [])
                       + ([f"--steps {a.steps}"] if a.steps != 8 else [])
                       + ([f"--repeats {a.repeats}"] if a.repeats != 2 else [])
                       + (["--layerwise"] if a.layerwise else []) + ["--write-docs"])

    t0, load_before = time.monotonic(), os.getloadavg()[0]
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="bench-block-memory-"))
    workdir.mkdir(parents=True, exist_ok=True)
    bench = Bench(workdir.resolve(), batches, a.steps, a.layerwise, a.repeats, a.model)
    try:
        bench.run()
    finally:
        if a.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    minutes, load_after = (time.monotonic() - t0) / 60, os.getloadavg()[0]

    ckpt = Bench.checkpoint_step(a.steps)
    checks = bench.checks()
    lines = [
        f"Model {bench.model} ({bench.parameters() / 1e6:.1f} M parameters, {len(bench.manifest.blocks)} blocks, "
        f"{'x'.join(map(str, bench.manifest.input_shape))} input): the whole model and every block (its "
        f"layers + head, from the cached activations of the frozen prefix), AdamW (lr {LR}, eps {ADAM_EPS}, no "
        f"decay), cross-entropy, {THREADS} intra-op thread for every runtime (see the step time below; "
        f"peaks with 2 threads were the same to 1 MB, to 7 MB for {ORT} block 1 at 128, which varies that "
        f"much between runs).",
        f"ours = the device job (edge_runtime.jobs.worker.run_job: step graph on onnxruntime "
        f"{bench.versions.get('onnxruntime')}, AdamW in numpy); {ORT} = onnxruntime-training "
        f"{bench.versions.get('onnxruntime-training')} artifacts (generate_artifacts, scaled-sum cross-entropy) "
        f"trained with its Module/Optimizer and the old runtime's session options (memory patterns off, arena "
        f"on); torch = torch {bench.versions.get('torch')} eager on the same layers + head. Same data, batches "
        f"and input activations for all three.",
        f"Data: synthetic (random float32 inputs, random int64 labels; {SAMPLES} samples): memory and speed do "
        f"not depend on the values.",
        f"Each measurement is its own fresh process; peak = its VmHWM. The whole model and the blocks are "
        f"measured {a.repeats} times, in rounds minutes apart with the runtimes in turned order (layers once); a "
        f"cell shows the largest peak and the smallest step time of its processes. Step graphs, prefix caches and artifacts are "
        f"built before anything is measured (step graphs {bench.prep_seconds.get('step graphs', 0):.0f} s, "
        f"{ORT} artifacts {bench.prep_seconds.get('onnxruntime-training artifacts', 0):.0f} s). Ours saves one "
        f"checkpoint after step {ckpt} and the update at the end, as a real job does; the other two save "
        f"nothing, so ours' peak is compared with theirs including its saves. 'Before step 1' = VmHWM just "
        f"before the first forward/backward: import, session, weights, gradient and optimizer buffers, the first "
        f"batch; the rest of a peak is the steps' working memory.",
        f"Step time = CPU time (user + system) of one step (batch read, forward, backward, optimizer step), the "
        f"smallest over steps 2..{a.steps} (ours without its checkpoint step): CPU time because the machine is "
        f"shared (1-min load average {load_before:.1f} at start, {load_after:.1f} at end, on "
        f"{len(os.sched_getaffinity(0))} CPUs) and other load stretches wall times, not the CPU a step uses; the "
        f"smallest because sharing cores and caches still inflates CPU time (up to 2x between steps of one "
        f"process), never deflates it. With one thread it is the step's work, what an idle core would take; "
        f"the fastest wall-clock step is shown beside it. Peaks do not depend on load.",
        "Lower bound = ours' import-only peak + 4 x parameter bytes (part) + activation bytes (part, manifest) "
        "x batch.",
    ]
    ratios = bench.ratios()
    verdicts = [f"{'PASS' if ok else 'FAIL'}: {text}" for ok, text in checks]
    print("\n".join(lines), "", "Peak RSS:", "", bench.memory_table(), "", "Step time:", "", bench.time_table(), "",
          *ratios, "", *verdicts, sep="\n")
    print(f"\nruntime {minutes:.1f} min")
    if a.write_docs:
        versions = ", ".join(f"{k} {v}" for k, v in sorted(bench.versions.items()))
        section = "\n".join([
            "## Device runtime vs onnxruntime-training and torch, per block (bench_block_memory)", "",
            f"Run {datetime.date.today().isoformat()} on {machine()}; {versions}. Whole run: {minutes:.1f} min.", "",
            f"Reproduce: `{command}`", "",
            *(l + "  " for l in lines), "",
            "Peak RSS:", "", bench.memory_table(), "",
            "Step time:", "", bench.time_table(), "",
            *(f"- {r}" for r in ratios), "",
            *(f"- **{v.split(':', 1)[0]}**:{v.split(':', 1)[1]}" for v in verdicts), ""])
        write_section("bench_block_memory", section)
        log(f"wrote {DOCS}")
    return 0 if all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
