"""Train a part of a model on local data from cached prefix activations, resumable after a crash.

One training run is identified by a task id. Its directory holds numbered checkpoints
(parameters and optimizer state) and a progress file naming the newest; a process killed
at any point restarts from that checkpoint, replaying the same data order, and a
finished run is never trained twice.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.memory import peak_rss_bytes, release_free_heap
from edge_runtime.store import atomic_write_text, digest_of
from edge_runtime.train.activation_cache import ActivationCache, ArrayReader
from edge_runtime.train.artifacts import ArtifactCache
from edge_runtime.train.datasets import LocalDataset
from edge_runtime.train.graphs import GraphLibrary, compose
from edge_runtime.wire import weights as wcodec
from edge_runtime.wire.manifest import Manifest
from edge_runtime.wire.part import TrainablePart
from edge_runtime.wire.train_config import TrainConfig


@dataclass
class TrainResult:
    task_id: str
    steps: int
    samples: int                      # samples seen (counting repeats over epochs)
    num_examples: int                 # local dataset size, the FedAvg weight
    loss: float                       # mean training loss over the last epoch's steps
    seconds: float
    peak_rss_bytes: int
    prefix_computed: bool
    artifact_built: bool
    resumed_from_step: int = 0
    micro_batch_size: int = 0
    step_seconds: float = 0.0         # median wall time of an optimizer step (first step excluded)
    losses: list[float] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


class _Progress:
    """The run's progress file: which checkpoint is current and the loss history so far."""

    def __init__(self, run_dir: Path, fingerprint: str):
        self.path = run_dir / "progress.json"
        self.fingerprint = fingerprint
        self.step, self.losses, self.checkpoint = 0, [], None
        if self.path.exists():
            saved = json.loads(self.path.read_text())
            if saved.get("fingerprint") == fingerprint and saved.get("checkpoint") \
                    and (run_dir / saved["checkpoint"]).exists():
                self.step, self.losses, self.checkpoint = saved["step"], saved["losses"], saved["checkpoint"]

    def commit(self, step: int, checkpoint: str) -> None:
        self.step, self.checkpoint = step, checkpoint
        atomic_write_text(self.path, json.dumps({"fingerprint": self.fingerprint, "step": step,
                                                 "checkpoint": checkpoint, "losses": self.losses}))


def _total_steps(n: int, config: TrainConfig) -> int:
    total = max(1, math.ceil(math.ceil(n / config.batch_size) * config.epochs))
    return total if config.max_steps is None else min(total, config.max_steps)


def _batches(n: int, batch_size: int, total_steps: int, seed: int, start: int = 0):
    """The run's data order: one fixed permutation per epoch, so a resumed run sees the same batches.

    Lazy, and each batch is a copy: a slice view would keep its epoch's whole permutation alive.
    """
    steps_per_epoch = math.ceil(n / batch_size)
    perm, perm_epoch = None, -1
    for step in range(start, total_steps):
        epoch, k = divmod(step, steps_per_epoch)
        if epoch != perm_epoch:
            perm, perm_epoch = np.random.default_rng([seed, epoch]).permutation(n), epoch
        yield step, perm[k * batch_size:(k + 1) * batch_size].copy()


def prepare_part(lib: GraphLibrary, part: TrainablePart, weights, dataset: LocalDataset, config: TrainConfig,
                 state_dir: Path, progress: Callable[[str, int, int], None] | None = None):
    """What training (or scoring) a part needs before its first batch: the artifact and the prefix's activations.

    Returns (artifact cache, artifact dir, reader of the span's input activations, labels,
    whether the prefix had to run). The artifact comes from the cache under state_dir/artifacts
    (built only for a new structure); the activations from state_dir/activations (computed
    only for a new prefix version or new data).
    """
    state_dir = Path(state_dir)
    artifacts = ArtifactCache(state_dir / "artifacts")
    artifact_dir = artifacts.get_or_build(lib, part, weights, config.optimizer, config.weight_decay)
    cache = ActivationCache(state_dir / "activations")
    act_path, prefix_computed = cache.get_or_build(
        lib, part.span[0], weights, dataset, batch_size=config.micro(), fp16=config.cache_fp16,
        threads=config.threads, progress=(lambda i, n: progress("prefix", i, n)) if progress else None)
    inputs = ArrayReader(act_path)
    labels = dataset.labels()
    if len(inputs) != len(labels):
        inputs.close()
        raise EdgeRuntimeError(f"activation cache {act_path} has {len(inputs)} rows for {len(labels)} labels")
    return artifacts, artifact_dir, inputs, labels, prefix_computed


def train(manifest: Manifest, weights: dict[str, np.ndarray], dataset: LocalDataset, part: TrainablePart,
          config: TrainConfig, state_dir: Path, task_id: str,
          progress: Callable[[str, int, int], None] | None = None,
          return_weights: bool = True) -> tuple[dict[str, np.ndarray], TrainResult]:
    """Train `part` from `weights` on `dataset`; return the trained parameters and what it cost.

    Only the trainable parameters are returned; they are also in
    state_dir/runs/<task_id>/update.safetensors (a device job passes return_weights=False
    and ships that file instead of holding a copy in memory). state_dir holds the device's
    caches (artifacts, activations) and run directories; it survives restarts.
    """
    t0 = time.monotonic()
    state_dir = Path(state_dir)
    part.validate(manifest)
    lib = GraphLibrary(manifest)
    needed = part.required_names(manifest)
    wcodec.require(weights, needed)  # every weight the part and its prefix need is present
    run_dir = state_dir / "runs" / task_id
    run_dir.mkdir(parents=True, exist_ok=True)
    done_file = run_dir / "result.json"
    fingerprint = digest_of(wcodec.weights_hash(weights, needed), dataset.fingerprint(),
                            json.dumps(asdict(config), sort_keys=True), repr(part))
    if done_file.exists():
        saved = json.loads(done_file.read_text())
        if saved.get("fingerprint") == fingerprint:
            result = TrainResult(**saved["result"])
            return (wcodec.load(run_dir / "update.safetensors") if return_weights else {}), result

    artifacts, artifact_dir, inputs, labels, prefix_computed = prepare_part(
        lib, part, weights, dataset, config, state_dir, progress)
    micro = config.micro()
    n = len(labels)

    from edge_runtime.train.ort_backend import TrainingSession
    state = _Progress(run_dir, fingerprint)
    if state.checkpoint and config.checkpoint == "full":
        session = TrainingSession(artifact_dir, run_dir / state.checkpoint, threads=config.threads)
    else:
        session = TrainingSession(artifact_dir, threads=config.threads)
        session.set_weights(weights, part.all_names(manifest))
        if state.checkpoint:
            session.set_weights(wcodec.WeightFile(run_dir / state.checkpoint))
    weights = None  # the session holds its own copy; drop ours before training (a whole block's worth)
    release_free_heap()  # and hand the heap that loading used back to the kernel
    resumed_from = state.step

    steps_per_epoch = math.ceil(n / config.batch_size)
    total = _total_steps(n, config)
    trainable = part.trainable_names(manifest)
    step_times = []
    for step, idx in _batches(n, config.batch_size, total, config.seed, start=state.step):
        t_step = time.monotonic()
        chunks = [idx[i:i + micro] for i in range(0, len(idx), micro)]
        loss = 0.0
        for chunk in chunks:
            loss += session.forward_backward(inputs.take(chunk), labels[chunk], loss_scale=1.0 / len(idx))
        if not math.isfinite(loss):
            raise EdgeRuntimeError(f"training diverged at step {step}: loss is {loss}; "
                                   f"lower the learning rate (now {config.learning_rate})")
        session.step(config.learning_rate)
        step_times.append(time.monotonic() - t_step)  # batch read + forward/backward + step; no checkpoint
        state.losses.append(loss)
        done = step + 1
        if done % config.checkpoint_every_steps == 0 and done < total:
            name = f"ckpt-{done:06d}"
            if config.checkpoint == "full":
                session.save_checkpoint(run_dir / name)
            else:
                name += ".safetensors"
                wcodec.save_streaming(run_dir / name, trainable, session.weight_view)
            old = state.checkpoint
            state.commit(done, name)
            if old and old != name:
                (run_dir / old).unlink(missing_ok=True)
        if progress:
            progress("train", done, total)
    inputs.close()

    samples = sum(min(config.batch_size, n - (s % steps_per_epoch) * config.batch_size) for s in range(total))
    # Written straight from the session's live views, one tensor at a time: no second copy.
    wcodec.save_streaming(run_dir / "update.safetensors", trainable, session.weight_view)
    del session
    trained = wcodec.load(run_dir / "update.safetensors") if return_weights else {}
    last_epoch = state.losses[-min(len(state.losses), steps_per_epoch):] or [float("nan")]
    result = TrainResult(task_id=task_id, steps=total, samples=samples, num_examples=n,
                         loss=float(np.mean(last_epoch)), seconds=time.monotonic() - t0,
                         peak_rss_bytes=peak_rss_bytes(), prefix_computed=prefix_computed,
                         artifact_built=artifacts.builds > 0, resumed_from_step=resumed_from,
                         micro_batch_size=micro,
                         step_seconds=float(np.median(step_times[1:] or step_times or [0.0])), losses=[float(x) for x in state.losses])
    atomic_write_text(done_file, json.dumps({"fingerprint": fingerprint, "result": asdict(result)}))
    for ckpt in run_dir.glob("ckpt-*"):
        ckpt.unlink(missing_ok=True)
    return trained, result


def evaluate(manifest: Manifest, weights: dict[str, np.ndarray], inputs: np.ndarray, labels: np.ndarray,
             upto_block: int | None = None, batch_size: int = 500, threads: int = 0) -> dict:
    """Accuracy and mean loss of blocks[0..upto_block] -> its head (default: the whole model)."""
    from edge_runtime.train.ort_backend import InferenceSession
    b = len(manifest.blocks) - 1 if upto_block is None else upto_block
    last_layer = manifest.blocks[b].layers[-1]
    session = InferenceSession(compose(GraphLibrary(manifest), range(last_layer + 1), manifest.blocks[b].head,
                                       weights), threads=threads)
    correct, loss_sum = 0, 0.0
    for start in range(0, len(labels), batch_size):
        logits = session.run(inputs[start:start + batch_size]).astype(np.float64)
        y = labels[start:start + batch_size]
        z = logits - logits.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        loss_sum += float(-logp[np.arange(len(y)), y].sum())
        correct += int((logits.argmax(axis=1) == y).sum())
    return {"accuracy": correct / len(labels), "loss": loss_sum / len(labels), "samples": int(len(labels))}
