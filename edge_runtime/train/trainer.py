"""Train a part of a model on local data from cached prefix activations, resumable after a crash.

The step graph the coordinator built for the part gives the loss and every gradient
(ort_backend.StepSession); the optimizer steps the trainer's own weight arrays in numpy,
in place (optimizers.py). One training run is identified by a task id. Its directory
holds numbered checkpoints (the trained tensors and the optimizer's state) and a progress
file naming the newest; a process killed at any point restarts from that checkpoint,
replaying the same data order, and a finished run is never trained twice.

A family member's part (FedIN) may also train its intermediate layers on other devices' shared
features: each optimizer step adds one IN step (the member's layers mapping shared s_in to s_out,
mean squared error) whose gradient is projected so it never opposes the local one (reconcile.py),
and after training the job may put some of its own (s_in, s_out, labels) into the update.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from edge_runtime.errors import EdgeRuntimeError, ManifestError
from edge_runtime.memory import peak_rss_bytes, release_free_heap
from edge_runtime.store import atomic_write_text, digest_of, sha256_file
from edge_runtime.train.activation_cache import ActivationCache
from edge_runtime.train.augment import positive_pairs, two_views, view_rng
from edge_runtime.train.datasets import (
    DATA_CHECK_FILE,
    ArrayReader,
    DataError,
    LocalDataset,
    check_batch,
    holdout_split,
)
from edge_runtime.train.optimizers import make_optimizer
from edge_runtime.train.reconcile import combine
from edge_runtime.wire import weights as wcodec
from edge_runtime.wire.manifest import Manifest
from edge_runtime.wire.model_blobs import (
    in_span,
    member_graph_paths,
    part_eval_graph_path,
    part_graph_paths,
    read_part_graph,
    trained_member,
)
from edge_runtime.wire.part import TrainablePart
from edge_runtime.wire.train_config import TrainConfig

OPTIMIZER_PREFIX = "optimizer/"     # the optimizer's state in a checkpoint, beside the tensors
NEGATIVE_LOSS = -1e-3   # below this a cross-entropy loss is no rounding error: a label outside the logits was read
# what a member part's update carries beside its tensors when it shares features (TrainConfig.share_rows)
SHARED_S_IN, SHARED_S_OUT, SHARED_LABELS = "features/s_in", "features/s_out", "features/labels"


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
    resumed_from_step: int = 0
    micro_batch_size: int = 0
    step_seconds: float = 0.0         # median wall time of an optimizer step (first step excluded)
    losses: list[float] = field(default_factory=list)
    # accuracy on the rows held out of training (TrainConfig.holdout): of the model received, of the one trained
    holdout_examples: int = 0
    holdout_accuracy_before: float | None = None
    holdout_accuracy: float | None = None
    # FedIN: optimizer steps that took an IN step, those whose IN gradient opposed the local one and was
    # projected, and the rows of features this update shares
    in_steps: int = 0
    in_conflicts: int = 0
    shared_rows: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))


class _Progress:
    """The run's progress file: which checkpoint is current and the loss history so far."""

    def __init__(self, run_dir: Path, fingerprint: str):
        self.path = run_dir / "progress.json"
        self.fingerprint = fingerprint
        self.step, self.losses, self.checkpoint, self.in_conflicts = 0, [], None, 0
        if self.path.exists():
            saved = json.loads(self.path.read_text())
            if saved.get("fingerprint") == fingerprint and saved.get("checkpoint") \
                    and (run_dir / saved["checkpoint"]).exists():
                self.step, self.losses, self.checkpoint = saved["step"], saved["losses"], saved["checkpoint"]
                self.in_conflicts = saved.get("in_conflicts", 0)

    def commit(self, step: int, checkpoint: str) -> None:
        self.step, self.checkpoint = step, checkpoint
        atomic_write_text(self.path, json.dumps({"fingerprint": self.fingerprint, "step": step,
                                                 "checkpoint": checkpoint, "losses": self.losses,
                                                 "in_conflicts": self.in_conflicts}))


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


def prepare_part(manifest: Manifest, part: TrainablePart, weights, dataset: LocalDataset, config: TrainConfig,
                 state_dir: Path, progress: Callable[[str, int, int], None] | None = None):
    """What training (or scoring) a part needs before its first batch: its step graph and the prefix's activations.

    Returns (the step graph, hash-checked, reader of the span's input activations, labels, whether
    the prefix had to run). The graph is checked first, so a corrupted one costs no prefix run, then
    the data against the manifest's data contract (DataError). The activations come from
    state_dir/activations, computed only for a new prefix version or new data.
    """
    step_path, prefix_graph = part_graph_paths(manifest, part)
    step_graph = read_part_graph(step_path)
    # the data contract before anything reads the data: a wrong shape, a label outside the model's classes or a
    # NaN is named here, not by onnxruntime mid-calibration; read once per data version (the summary is cached)
    dataset.check(manifest.input_shape, manifest.num_classes, cache_file=Path(state_dir) / DATA_CHECK_FILE)
    cache = ActivationCache(Path(state_dir) / "activations")
    act_path, prefix_computed = cache.get_or_build(
        manifest, part.span[0], prefix_graph, weights, dataset, batch_size=config.micro(), fp16=config.cache_fp16,
        threads=config.threads, progress=(lambda i, n: progress("prefix", i, n)) if progress else None)
    inputs = ArrayReader(act_path)
    labels = dataset.labels()
    if len(inputs) != len(labels):
        inputs.close()
        raise EdgeRuntimeError(f"activation cache {act_path} has {len(inputs)} rows for {len(labels)} labels")
    return step_graph, inputs, labels, prefix_computed


class PartTensors:
    """The tensors a part's step graph reads (parameters and running statistics) and the gradients it writes,
    as numpy arrays this process owns: the optimizer updates them in place and the next step reads them."""

    def __init__(self, session, manifest: Manifest, part: TrainablePart, weights: Mapping[str, np.ndarray]):
        itf = session.interface
        _check_graph_matches(session, manifest, part)
        self.session = session
        self.tensors: dict[str, np.ndarray] = {}
        read_into = getattr(weights, "read_into", None)
        specs = manifest.param_specs()
        for name in itf.param_inputs + itf.stat_inputs:
            buffer = np.empty(specs[name].shape, np.float32)
            if read_into is None or not read_into(name, buffer):   # a lazy weight file reads straight in
                buffer[...] = weights[name]
            self.tensors[name] = buffer
        self.grads = {n: np.zeros_like(self.tensors[n]) for n in itf.trainable}
        self._scratch: dict[str, np.ndarray] | None = None

    def forward_backward(self, inputs: np.ndarray, labels: np.ndarray, loss_scale: float, accumulate: bool) -> float:
        """One micro-batch: its scaled loss; the gradients replace (or, accumulating, add to) self.grads.

        Accumulating needs a second gradient buffer: it is allocated the first time a batch is split.
        """
        if not accumulate:
            loss, stats = self.session.run(inputs, labels, loss_scale, self.tensors, self.grads)
        else:
            if self._scratch is None:
                self._scratch = {n: np.empty_like(g) for n, g in self.grads.items()}
            loss, stats = self.session.run(inputs, labels, loss_scale, self.tensors, self._scratch)
            for name, g in self.grads.items():
                g += self._scratch[name]
        for name, value in stats.items():
            self.tensors[name][...] = value
        return loss

    def batch(self, reader: ArrayReader, labels: np.ndarray, idx: np.ndarray, micro: int) -> float:
        """The gradient of the mean loss of one batch (each micro-batch scaled by 1/batch); its mean loss."""
        loss = 0.0
        for k, start in enumerate(range(0, len(idx), micro)):
            chunk = idx[start:start + micro]
            loss += self.forward_backward(reader.take(chunk), labels[chunk], 1.0 / len(idx), accumulate=k > 0)
        return loss

    def contrastive_batch(self, reader: ArrayReader, idx: np.ndarray, rng: np.random.Generator) -> float:
        """NT-Xent of one batch, two fresh views of each of its images in one pass (every other view in the batch is
        a negative, so the batch is never split into micro-batches); its mean over the 2 x len(idx) views."""
        pairs = positive_pairs(len(idx))
        return self.forward_backward(two_views(reader.take(idx), rng), pairs, 1.0 / len(pairs), accumulate=False)


class SharedFeatures:
    """Other devices' shared features (FedIN), a safetensors file of s_in [k, *s_in shape], s_out [k, *s_out
    shape] (float32 or float16), labels and origin [k] (int32 or int64): the rows whose origin is not this
    device's, read with pread a batch at a time, so the file is never in memory whole.

    Checked when opened: the tensors are there, their shapes are the manifest's (s_in enters the first layer
    after the shared extractor, s_out leaves the last layer), every value is finite; else EdgeRuntimeError.
    """

    _DTYPES = {"F32": np.float32, "F16": np.float16, "I32": np.int32, "I64": np.int64}
    _CHECK_ROWS = 256   # rows per read while checking finiteness

    def __init__(self, path: Path, manifest: Manifest, own_origin: int):
        self.path = Path(path)
        where = f"shared features {self.path}"
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                n = wcodec._header_length(f.read(8), size, f"{where}: not a valid safetensors file")
                head = f.read(n)
        except OSError as exc:
            raise EdgeRuntimeError(f"{where}: cannot read it ({exc.strerror})") from None
        self._base = 8 + n
        self._entries = wcodec._tensors(head, size - self._base, self._DTYPES,
                                        f"{where}: not a valid safetensors file")
        missing = [t for t in ("s_in", "s_out", "origin") if t not in self._entries]
        if missing:
            raise EdgeRuntimeError(f"{where} lack tensor(s) {missing}; they hold s_in, s_out, labels and origin")
        layers = in_span(manifest)
        want = {"s_in": tuple(manifest.layers[layers[0]].input_shape),
                "s_out": tuple(manifest.layers[layers[-1]].output_shape)}
        rows = self._entries["origin"][1][0] if len(self._entries["origin"][1]) == 1 else -1
        for name, shape in want.items():
            dtype, got, _ = self._entries[name]
            if dtype not in (np.float32, np.float16) or got != (rows, *shape):
                raise EdgeRuntimeError(f"{where}: {name} is {np.dtype(dtype).name} {list(got)}, the model needs "
                                       f"float [rows, {', '.join(map(str, shape))}] with one row per origin "
                                       f"({rows if rows >= 0 else 'origin is not one-dimensional'})")
        if self._entries["origin"][0] not in (np.int32, np.int64):
            raise EdgeRuntimeError(f"{where}: origin must be int32 or int64, not "
                                   f"{np.dtype(self._entries['origin'][0]).name}")
        self.s_in_shape, self.s_out_shape = want["s_in"], want["s_out"]
        self._fd = os.open(self.path, os.O_RDONLY)
        origin = self._read("origin", 0, rows)
        for name in ("s_in", "s_out"):
            for start in range(0, rows, self._CHECK_ROWS):
                block = self._read(name, start, min(rows, start + self._CHECK_ROWS))
                if not np.isfinite(block).all():
                    bad = start + int(np.flatnonzero(~np.isfinite(block.reshape(len(block), -1)).all(axis=1))[0])
                    self.close()
                    raise EdgeRuntimeError(f"{where}: {name} of row {bad} is not finite; shared features must be")
        self.rows = np.flatnonzero(origin != own_origin)   # the rows this device trains on

    def __len__(self) -> int:
        return len(self.rows)

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows start..stop of a tensor, in its own dtype."""
        dtype, shape, offset = self._entries[name]
        row_bytes = math.prod(shape[1:]) * np.dtype(dtype).itemsize
        out = np.empty((stop - start, *shape[1:]), dtype)
        if out.nbytes and os.preadv(self._fd, [memoryview(out.reshape(-1).view(np.uint8))],
                                    self._base + offset + start * row_bytes) != out.nbytes:
            raise EdgeRuntimeError(f"shared features {self.path}: short read of {name}; the file changed")
        return out

    def take(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(s_in, s_out) of the kept rows at these positions (0..len-1), as float32."""
        rows = self.rows[positions]
        s_in = np.empty((len(rows), *self.s_in_shape), np.float32)
        s_out = np.empty((len(rows), *self.s_out_shape), np.float32)
        for k, row in enumerate(rows):
            s_in[k] = self._read("s_in", int(row), int(row) + 1)[0]
            s_out[k] = self._read("s_out", int(row), int(row) + 1)[0]
        return s_in, s_out

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None


def in_positions(rows: int, batch: int, step: int, seed: int) -> np.ndarray:
    """The shared rows (positions 0..rows-1) of optimizer step `step`'s IN batch: the steps walk one seeded
    permutation after another, so a resumed run takes the same rows from the step number alone."""
    flat = step * batch + np.arange(batch, dtype=np.int64)
    epochs, within = np.divmod(flat, rows)
    out = np.empty(batch, np.int64)
    for epoch in np.unique(epochs):
        here = epochs == epoch
        out[here] = np.random.default_rng([seed, 0x1F, int(epoch)]).permutation(rows)[within[here]]
    return out


class InTraining:
    """FedIN's IN step on a member's layers: its gradient, in buffers of the member's parameters only, from the
    IN step graph (s_in -> s_out, mean squared error), a micro-batch at a time; reconciled with the local one."""

    def __init__(self, session, manifest: Manifest, member, features: SharedFeatures, tensors: PartTensors,
                 config: TrainConfig):
        names = manifest.param_names(sorted(member.layers), kind="param")
        if set(session.interface.trainable) != set(names):
            raise ManifestError(f"the IN step graph of member {member.name} trains other parameters than its "
                                f"layers: {sorted(set(session.interface.trainable) ^ set(names))[:3]}")
        self.session, self.features, self.config = session, features, config
        self.tensors = tensors.tensors
        self.local = {n: tensors.grads[n] for n in names}
        self.grads = {n: np.zeros_like(tensors.grads[n]) for n in names}
        self._scratch: dict[str, np.ndarray] | None = None

    def step(self, step: int, micro: int) -> tuple[float, bool]:
        """The IN gradient of step `step`'s shared rows, projected and added (x in_weight) to the local gradient
        of the member's parameters, in place; (its mean loss, whether it was projected)."""
        positions = in_positions(len(self.features), self.config.in_batch_size, step, self.config.seed)
        loss = 0.0
        for k, start in enumerate(range(0, len(positions), micro)):
            s_in, s_out = self.features.take(positions[start:start + micro])
            if k == 0:
                out = self.grads
            else:
                if self._scratch is None:
                    self._scratch = {n: np.empty_like(g) for n, g in self.grads.items()}
                out = self._scratch
            # running statistics (if the member has any) follow the local data only: the IN step's are dropped
            part_loss, _ = self.session.run(s_in, s_out, 1.0 / len(positions), self.tensors, out)
            loss += part_loss
            if k > 0:
                for name, g in self.grads.items():
                    g += out[name]
        if not math.isfinite(loss):
            raise EdgeRuntimeError(f"the IN step at training step {step} gave a loss of {loss} on finite shared "
                                   f"features; lower in_weight or the learning rate "
                                   f"(now {self.config.in_weight}, {self.config.learning_rate})")
        return loss, combine(self.local, self.grads, self.config.in_weight)


def shared_features(manifest: Manifest, part: TrainablePart, tensors: Mapping[str, np.ndarray],
                    reader: ArrayReader, labels: np.ndarray, train_rows: np.ndarray, config: TrainConfig,
                    micro: int) -> dict[str, np.ndarray]:
    """share_rows training rows (seeded) through the trained extractor (s_in) and member layers (s_out), with
    Gaussian noise of share_noise x each tensor's own std (seeded): the update's features/* tensors."""
    s_in_graph, s_out_graph = member_graph_paths(manifest, part)[1:]
    from edge_runtime.train.ort_backend import ForwardSession
    to_s_in = ForwardSession(read_part_graph(s_in_graph), threads=config.threads)
    to_s_out = ForwardSession(read_part_graph(s_out_graph), threads=config.threads)
    k = min(config.share_rows, len(train_rows))
    rows = np.sort(train_rows[np.random.default_rng([config.seed, 0x5A]).choice(len(train_rows), k, replace=False)])
    layers = in_span(manifest)
    s_in = np.empty((k, *manifest.layers[layers[0]].input_shape), np.float32)
    s_out = np.empty((k, *manifest.layers[layers[-1]].output_shape), np.float32)
    for start in range(0, k, micro):
        chunk = slice(start, start + micro)
        s_in[chunk] = to_s_in.run(reader.take(rows[chunk]), tensors)
        s_out[chunk] = to_s_out.run(s_in[chunk], tensors)
    if config.share_noise > 0:
        rng = np.random.default_rng([config.seed, 0x4E])
        for values in (s_in, s_out):
            std = float(values.std()) * config.share_noise
            values += rng.normal(0.0, std, values.shape).astype(np.float32)
    return {SHARED_S_IN: s_in, SHARED_S_OUT: s_out, SHARED_LABELS: labels[rows].astype(np.int64)}


def holdout_accuracy(session, tensors: Mapping[str, np.ndarray], reader: ArrayReader, labels: np.ndarray,
                     rows: np.ndarray, micro: int) -> float:
    """The fraction of `rows` whose largest logit is their label, through the part's eval graph (a ForwardSession
    reading the part's tensors by name), a micro-batch at a time."""
    correct = 0
    for start in range(0, len(rows), micro):
        chunk = rows[start:start + micro]
        logits = session.run(reader.take(chunk), tensors)
        correct += int(np.sum(np.argmax(logits, axis=1) == labels[chunk]))
    return correct / max(1, len(rows))


def _check_graph_matches(session, manifest: Manifest, part: TrainablePart) -> None:
    """ManifestError unless the step graph trains exactly the part's parameters, with the manifest's shapes."""
    itf, specs = session.interface, manifest.param_specs()
    what = f"the step graph of layers {part.span[0]}-{part.span[-1]} + head {part.head}"
    for name in part.trainable_names(manifest) + part.frozen_names(manifest):
        if name not in session.input_shapes:
            raise ManifestError(f"manifest parameter {name} is not in the graph ({what})")
    for name in itf.param_inputs + itf.stat_inputs:
        if name not in specs:
            raise ManifestError(f"{what} reads {name}, which the manifest does not name")
        if tuple(session.input_shapes[name]) != tuple(specs[name].shape):
            raise ManifestError(f"parameter {name} has shape {tuple(session.input_shapes[name])} in {what}, "
                                f"{tuple(specs[name].shape)} in the manifest")
    if set(itf.trainable) != set(part.trainable_names(manifest)):
        raise ManifestError(f"{what} trains other parameters than its part: "
                            f"{sorted(set(itf.trainable) ^ set(part.trainable_names(manifest)))[:3]}")


def _loss_problem(loss: float, step: int, idx: np.ndarray, config: TrainConfig, manifest: Manifest,
                  part: TrainablePart, dataset: LocalDataset, activations: ArrayReader,
                  labels: np.ndarray) -> EdgeRuntimeError | None:
    """Why a batch's loss cannot be trusted, or None when it can. A loss that is not finite or is negative
    (cross-entropy never is, with labels in range) is put down to the batch's data first (DataError naming its
    rows), then to the frozen prefix's activations, and only then to the learning rate."""
    if math.isfinite(loss) and loss >= NEGATIVE_LOSS:
        return None
    what = f"training step {step} gave a loss of {loss:.4g}"
    if loss < 0:
        what += f", which cross-entropy cannot give with labels in 0..{manifest.num_classes - 1}"
    blamed = _data_error(what, idx, manifest, dataset, labels)
    if blamed is not None:
        return blamed
    if part.span[0] > 0 and not math.isfinite(loss):
        rows = np.sort(idx)
        acts = activations.take(rows).reshape(len(rows), -1)
        bad = rows[~np.isfinite(acts).all(axis=1)]
        if len(bad):
            return EdgeRuntimeError(f"{what}: the frozen layers 0-{part.span[0] - 1} turn the finite inputs of "
                                    f"rows {', '.join(map(str, bad[:5]))} of {dataset.inputs_path} into non-finite "
                                    f"activations; the global model's frozen weights are broken, not this device's "
                                    f"data or settings")
    if loss < 0:
        return EdgeRuntimeError(f"{what}, yet this batch's labels are in range: the step graph does not compute "
                                f"cross-entropy; export the model again")
    return EdgeRuntimeError(f"training diverged at step {step}: loss is {loss} although the batch's inputs are "
                            f"finite and its labels in 0..{manifest.num_classes - 1}; lower the learning rate "
                            f"(now {config.learning_rate})")


def _data_error(what: str, idx: np.ndarray, manifest: Manifest, dataset: LocalDataset,
                labels: np.ndarray) -> DataError | None:
    """A DataError saying `what` happened because of the batch's data (its rows, as in the files), or None when
    its inputs are finite and its labels in range: the data is checked before a job trains, but files can change."""
    rows = np.sort(idx)
    raw = ArrayReader(dataset.inputs_path)
    try:
        check_batch(raw.take(rows), labels[rows], rows, manifest.num_classes, str(dataset.inputs_path),
                    str(dataset.labels_path))
    except DataError as exc:
        return DataError(f"{what}, because of the data: {exc}")
    finally:
        raw.close()
    return None


def _first_line(exc: BaseException) -> str:
    """An onnxruntime error in a few words: its first line's end (the start is the C++ source location)."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if len(line) > 160:
        tail = line.rsplit("] ", 1)[-1]    # after "[with T = ...] ": onnxruntime's own words
        line = tail if 0 < len(tail) <= 160 else "..." + line[-150:]
    return line


def train(manifest: Manifest, weights: Mapping[str, np.ndarray], dataset: LocalDataset, part: TrainablePart,
          config: TrainConfig, state_dir: Path, task_id: str,
          progress: Callable[[str, int, int], None] | None = None,
          return_weights: bool = True, features: Path | str | None = None) -> tuple[dict[str, np.ndarray], TrainResult]:
    """Train `part` from `weights` on `dataset`; return the trained tensors and what it cost.

    The trained tensors (the part's update_names: its trainable parameters and their layers'
    running statistics) are returned and written to state_dir/runs/<task_id>/update.safetensors
    (a device job passes return_weights=False and ships that file instead of holding a copy in
    memory). state_dir holds the device's caches (activations) and run directories; it survives
    restarts.

    FedIN (a family member's part): with config.in_weight > 0 and `features` (other devices' shared
    features, SharedFeatures), every optimizer step adds an IN step on the member's layers; with
    config.share_rows > 0 the update also holds features/s_in, features/s_out and features/labels.
    """
    t0 = time.monotonic()
    state_dir = Path(state_dir)
    part.validate(manifest)
    needed = part.required_names(manifest)
    wcodec.require(weights, needed)  # every weight the part and its prefix need is present
    run_dir = state_dir / "runs" / task_id
    run_dir.mkdir(parents=True, exist_ok=True)
    done_file = run_dir / "result.json"
    member = trained_member(manifest, part)
    in_training = config.in_weight > 0 and features is not None
    if in_training and member is None:
        raise EdgeRuntimeError(f"IN training (in_weight {config.in_weight}) needs a family member's part; layers "
                               f"{part.span[0]}-{part.span[-1]} skipping {list(part.skip)} train no member of "
                               f"{manifest.model}")
    if manifest.contrastive:
        _check_contrastive(config, in_training)
    fingerprint = digest_of(wcodec.weights_hash(weights, needed), dataset.fingerprint(),
                            json.dumps(asdict(config), sort_keys=True), repr(part),
                            sha256_file(Path(features)) if in_training else "")
    if done_file.exists():
        saved = json.loads(done_file.read_text())
        if saved.get("fingerprint") == fingerprint:
            result = TrainResult(**saved["result"])
            return (_load_update(run_dir / "update.safetensors") if return_weights else {}), result

    shared = SharedFeatures(Path(features), manifest, config.in_origin) if in_training else None
    if shared is not None and len(shared) == 0:   # only this device's own rows: nothing to learn from
        shared.close()
        shared = None
    step_graph, inputs, labels, prefix_computed = prepare_part(manifest, part, weights, dataset, config, state_dir,
                                                               progress)
    micro = config.micro()
    train_rows, held_rows = holdout_split(len(labels), config.holdout)
    n = len(train_rows)
    # a contrastive step reads half a batch of images and makes the batch of their two views
    rows_per_step = config.batch_size // 2 if manifest.contrastive else config.batch_size

    from edge_runtime.train.ort_backend import ForwardSession, StepSession
    session = StepSession(step_graph, threads=config.threads)
    tensors = PartTensors(session, manifest, part, weights)
    evaluator, accuracy_before = None, None
    if len(held_rows):   # the model as received, before a checkpoint (if any) puts trained values back
        evaluator = ForwardSession(read_part_graph(part_eval_graph_path(manifest, part)), threads=config.threads)
        accuracy_before = holdout_accuracy(evaluator, tensors.tensors, inputs, labels, held_rows, micro)
    intermediate = None
    if shared is not None:
        in_session = StepSession(read_part_graph(member_graph_paths(manifest, part)[0]), threads=config.threads)
        intermediate = InTraining(in_session, manifest, member, shared, tensors, config)
    trainable = session.interface.trainable
    optimizer = make_optimizer(config.optimizer, {name: tensors.tensors[name] for name in trainable},
                               **config.optimizer_settings())
    state = _Progress(run_dir, fingerprint)
    if state.checkpoint:
        _restore(run_dir / state.checkpoint, tensors.tensors, optimizer)
    weights = None  # the arrays above hold the part; drop the mapping before training
    release_free_heap()  # and hand the heap that loading used back to the kernel
    resumed_from = state.step
    kept = list(trainable) + [s for _, s in session.interface.stat_updates]   # what a checkpoint holds

    steps_per_epoch = math.ceil(n / rows_per_step)
    total = _total_steps(n, replace(config, batch_size=rows_per_step))
    step_times = []
    for step, positions in _batches(n, rows_per_step, total, config.seed, start=state.step):
        idx = train_rows[positions]       # rows of the files (every row when nothing is held out)
        t_step = time.monotonic()
        try:
            loss = tensors.contrastive_batch(inputs, idx, view_rng(config.seed, step)) if manifest.contrastive \
                else tensors.batch(inputs, labels, idx, micro)
        except (EdgeRuntimeError, MemoryError):
            raise
        except Exception as exc:  # onnxruntime's own error (an index out of range, a shape): the batch's data first
            blamed = _data_error(f"training step {step} failed in onnxruntime ({_first_line(exc)})", idx, manifest,
                                 dataset, labels)
            if blamed is None:
                raise
            raise blamed from None
        problem = _loss_problem(loss, step, idx, config, manifest, part, dataset, inputs, labels)
        if problem is not None:
            inputs.close()
            raise problem
        if intermediate is not None:
            _, conflict = intermediate.step(step, micro)
            state.in_conflicts += int(conflict)
        optimizer.step(tensors.grads)
        step_times.append(time.monotonic() - t_step)  # batch read + forward/backward + step; no checkpoint
        state.losses.append(loss)
        done = step + 1
        if done % config.checkpoint_every_steps == 0 and done < total:
            name = f"ckpt-{done:06d}.safetensors"
            _checkpoint(run_dir / name, tensors.tensors, kept, optimizer if config.checkpoint == "full" else None)
            old = state.checkpoint
            state.commit(done, name)
            if old and old != name:
                (run_dir / old).unlink(missing_ok=True)
        if progress:
            progress("train", done, total)
    accuracy = None if evaluator is None else \
        holdout_accuracy(evaluator, tensors.tensors, inputs, labels, held_rows, micro)
    sharing = shared_features(manifest, part, tensors.tensors, inputs, labels, train_rows, config, micro) \
        if config.share_rows > 0 and member is not None else {}
    inputs.close()
    if shared is not None:
        shared.close()

    samples = sum(min(rows_per_step, n - (s % steps_per_epoch) * rows_per_step) for s in range(total))
    # Written straight from the trainer's arrays, one tensor at a time: no second copy.
    wcodec.save_streaming(run_dir / "update.safetensors", part.update_names(manifest) + list(sharing),
                          lambda name: sharing[name] if name in sharing else tensors.tensors[name])
    del session, tensors, optimizer, evaluator, intermediate, sharing
    trained = _load_update(run_dir / "update.safetensors") if return_weights else {}
    last_epoch = state.losses[-min(len(state.losses), steps_per_epoch):] or [float("nan")]
    result = TrainResult(task_id=task_id, steps=total, samples=samples, num_examples=n,
                         loss=float(np.mean(last_epoch)), seconds=time.monotonic() - t0,
                         peak_rss_bytes=peak_rss_bytes(), prefix_computed=prefix_computed,
                         resumed_from_step=resumed_from, micro_batch_size=micro,
                         step_seconds=float(np.median(step_times[1:] or step_times or [0.0])),
                         losses=[float(x) for x in state.losses], holdout_examples=len(held_rows),
                         holdout_accuracy_before=accuracy_before, holdout_accuracy=accuracy,
                         in_steps=total if shared is not None else 0, in_conflicts=state.in_conflicts,
                         shared_rows=min(config.share_rows, n) if config.share_rows > 0 and member is not None else 0)
    atomic_write_text(done_file, json.dumps({"fingerprint": fingerprint, "result": asdict(result)}))
    for ckpt in run_dir.glob("ckpt-*"):
        ckpt.unlink(missing_ok=True)
    return trained, result


def _check_contrastive(config: TrainConfig, in_training: bool) -> None:
    """What a contrastive task cannot do: hold rows out or measure accuracy (it has no labels), share features, or
    make a batch of fewer than two images. (The schedules start its part at layer 0, so that the views are of the
    images; a part that starts later, as the profiler measures one, views its cached activations: the same shapes
    and cost.)"""
    if config.holdout > 0 or config.share_rows > 0 or in_training:
        raise EdgeRuntimeError("a contrastive task learns without labels: it holds no rows out (holdout 0), shares "
                               "no features and does no IN training")
    if config.batch_size < 4:
        raise EdgeRuntimeError(f"a contrastive batch holds two views of each image and needs at least 2 images: "
                               f"batch_size must be at least 4, not {config.batch_size}")


def _load_update(path: Path) -> dict[str, np.ndarray]:
    """An update file's tensors: float32, and the shared labels (features/labels) as int64."""
    update = wcodec.WeightFile(path)
    return {name: update[name] for name in update}


def _checkpoint(path: Path, tensors: Mapping[str, np.ndarray], names, optimizer) -> None:
    """The trained tensors and (with an optimizer) its state, streamed into one safetensors file."""
    state = {OPTIMIZER_PREFIX + k: v for k, v in optimizer.state_dict().items()} if optimizer is not None else {}
    wcodec.save_streaming(path, list(names) + list(state), lambda n: state[n] if n in state else tensors[n])


def _restore(path: Path, tensors: Mapping[str, np.ndarray], optimizer) -> None:
    """Put a checkpoint's tensors back into the part's arrays and its optimizer state (if it has one)."""
    saved = wcodec.WeightFile(path)
    state = {}
    for name in saved:
        if name.startswith(OPTIMIZER_PREFIX):
            state[name[len(OPTIMIZER_PREFIX):]] = saved[name]
        elif not saved.read_into(name, tensors[name]):
            tensors[name][...] = saved[name]
    if state:
        optimizer.load_state_dict(state)


