"""Score layers by their local gradient instead of training them (selective layer fine-tuning).

The score of layer j on a device is the sum over its local batches of the squared L2 norm
of the gradient of the batch-mean cross-entropy with respect to all of layer j's
parameters together (Sun et al., arXiv 2408.15600; docs/papers.md section 3). One pass
over the local data (or `max_steps` batches), forward and backward only: no optimizer
step, so no weight changes and nothing to send back but the scores.

Scoring uses the same machinery as training: the part's step graph (the same graph
training the part uses) and the activation cache of the frozen prefix. Only the part's
trainable layers (and its head, if it trains) have gradients, so those are the layers that
get a score; to score every layer that can train, score
`TrainablePart.for_layers(manifest, manifest.trainable_layers())`.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import numpy as np

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.memory import peak_rss_bytes, release_free_heap
from edge_runtime.train.datasets import LocalDataset
from edge_runtime.train.trainer import PartTensors, _batches, prepare_part
from edge_runtime.wire import weights as wcodec
from edge_runtime.wire.manifest import Manifest
from edge_runtime.wire.part import TrainablePart
from edge_runtime.wire.train_config import TrainConfig

SCORE_CHUNK = 1 << 16   # elements of a gradient summed at a time in float64 (512 KB)
HEAD = "head"


def score_groups(manifest: Manifest, part: TrainablePart) -> dict:
    """{layer index or "head": its parameter names}: what gets a score for this part."""
    groups: dict = {i: manifest.param_names([i], kind="param") for i in sorted(part.trainable_layers)}
    if part.train_head:
        groups[HEAD] = manifest.param_names((), [part.head], kind="param")
    return groups


def score_layers(manifest: Manifest, weights, dataset: LocalDataset, part: TrainablePart, config: TrainConfig,
                 state_dir: Path, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Gradient scores of the part's trainable layers (and head) on the local data; weights are untouched.

    Batches are the first epoch of training's data order (config.batch_size, config.seed),
    at most config.max_steps of them; config.micro_batch_size splits a batch for memory
    without changing the score (each micro-batch's loss is scaled by 1/batch, so the
    accumulated gradient is that of the batch mean). learning_rate, epochs and the optimizer
    are ignored.

    Returns {"scores": {layer: float, ..., "head": float}, "samples": n, "batches": k,
    "loss": mean batch loss, "peak_rss_bytes", "seconds", "prefix_computed",
    "micro_batch_size"}. (In JSON the layer keys become strings.)
    """
    t0 = time.monotonic()
    part.validate(manifest)
    wcodec.require(weights, part.required_names(manifest))
    step_graph, inputs, labels, prefix_computed = prepare_part(manifest, part, weights, dataset, config,
                                                               Path(state_dir), progress)

    from edge_runtime.train.ort_backend import StepSession
    tensors = PartTensors(StepSession(step_graph, threads=config.threads), manifest, part, weights)
    weights = None
    release_free_heap()

    groups = score_groups(manifest, part)
    names = [name for group in groups.values() for name in group]
    n, micro = len(labels), config.micro()
    total = math.ceil(n / config.batch_size)
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    sums = dict.fromkeys(names, 0.0)
    losses, samples = [], 0
    try:
        for step, idx in _batches(n, config.batch_size, total, config.seed):
            loss = tensors.batch(inputs, labels, idx, micro)
            norms = {name: squared_norm(tensors.grads[name]) for name in names}   # no step: weights untouched
            if not math.isfinite(loss) or not all(math.isfinite(v) for v in norms.values()):
                raise EdgeRuntimeError(f"scoring hit a non-finite loss or gradient at batch {step} (loss {loss})")
            for name, value in norms.items():
                sums[name] += value
            losses.append(loss)
            samples += len(idx)
            if progress:
                progress("score", step + 1, total)
    finally:
        inputs.close()
    del tensors
    scores = {key: float(sum(sums[name] for name in group)) for key, group in groups.items()}
    return {"scores": scores, "samples": samples, "batches": total, "num_examples": n,
            "loss": float(np.mean(losses)) if losses else float("nan"),
            "peak_rss_bytes": peak_rss_bytes(), "seconds": time.monotonic() - t0,
            "prefix_computed": prefix_computed, "micro_batch_size": micro}


def squared_norm(grad: np.ndarray) -> float:
    """The squared L2 norm, summed in float64 in 64 k-element chunks: 512 KB whatever the layer
    (1 M-element chunks cost up to 8 MB on a layer as large as vgg_cifar's 2.4 M-parameter ones)."""
    flat = grad.reshape(-1)
    total = 0.0
    for start in range(0, flat.size, SCORE_CHUNK):
        chunk = flat[start:start + SCORE_CHUNK].astype(np.float64)
        total += float(np.dot(chunk, chunk))
    return total


def scores_from_json(raw: dict) -> dict:
    """Scores as read back from a JSON report: layer keys as ints again, "head" as is."""
    return {(key if key == HEAD else int(key)): float(value) for key, value in raw.items()}
