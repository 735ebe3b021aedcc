"""The only module that touches onnxruntime: import without torch, artifacts, sessions.

onnxruntime-training is frozen at 1.19.2; keeping every use of its API here means the
backend can be replaced (C API, a source build on aarch64) by editing one file.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import types
from pathlib import Path
from typing import Iterable

import numpy as np

from edge_runtime.errors import EdgeRuntimeError, UnsupportedOpError

SCORE_CHUNK = 1 << 16   # elements of a gradient summed at a time in float64 (512 KB)

_ort = None
_api = None
_artifacts = None


def _import_onnxruntime():
    """Import onnxruntime and its training API without pulling in torch.

    `import onnxruntime` imports torch during build validation when torch is installed
    (about 280 MB RSS instead of about 60 MB), and `onnxruntime.training.api` fails to
    import without torch because the package __init__ imports torch-only `amp`/`optim`.
    Blocking torch for the duration of the import and registering empty stand-ins for
    those two sub-modules fixes both; torch stays importable afterwards for processes
    (the coordinator, tests) that want it.
    """
    global _ort, _api, _artifacts
    if _api is not None:
        return _ort, _api, _artifacts
    blocked_torch = "torch" not in sys.modules
    if blocked_torch:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError inside onnxruntime
    try:
        for name in ("onnxruntime.training.amp", "onnxruntime.training.optim"):
            sys.modules.setdefault(name, types.ModuleType(name))
        import onnxruntime as ort
        from onnxruntime.training import api, artifacts
    finally:
        if blocked_torch and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    ort.set_default_logger_severity(3)
    _ort, _api, _artifacts = ort, api, artifacts
    return _ort, _api, _artifacts


def runtime_versions() -> dict:
    ort, _, _ = _import_onnxruntime()
    return {"onnxruntime": ort.__version__}


def session_options(threads: int = 0):
    """Session options for the lowest, flattest peak: memory patterns off, arena on."""
    ort, _, _ = _import_onnxruntime()
    so = ort.SessionOptions()
    so.enable_mem_pattern = False
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return so


@contextlib.contextmanager
def _stderr_to(path: Path):
    """Redirect fd 2 (where the C++ artifact builder logs at info level) into a file."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "wb") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _scaled_sum_cross_entropy():
    """Loss block: sum of per-sample cross-entropy times a fed scalar `loss_scale`.

    Feeding loss_scale = 1/batch_size to each micro-batch makes the gradients that
    onnxruntime accumulates across micro-batches exactly the gradient of the batch mean,
    for any optimizer and for uneven last micro-batches. (Accumulating per-micro-batch
    means instead gives k times the gradient; AdamW is not invariant to that because of eps.)
    """
    import onnx
    from onnxruntime.training import onnxblock
    from onnxruntime.training.onnxblock import _graph_utils

    class ScaledSumCrossEntropy(onnxblock.Block):
        def __init__(self):
            super().__init__()
            self._ce = onnxblock.loss.CrossEntropyLoss(reduction="sum")

        def build(self, logits_name: str):
            loss_sum = self._ce(logits_name)
            self.base.graph.input.append(
                onnx.helper.make_tensor_value_info(LOSS_SCALE, onnx.TensorProto.FLOAT, []))
            out = _graph_utils.generate_graph_name("scaled_loss")
            self.base.graph.node.append(onnx.helper.make_node("Mul", [loss_sum, LOSS_SCALE], [out],
                                                              name=_graph_utils.generate_graph_name("Mul")))
            return out

    return ScaledSumCrossEntropy()


LOSS_SCALE = "loss_scale"
_NO_GRADIENT = re.compile(r"gradient builder has not been registered: (\S+) for node (\S+)")


def generate_training_artifacts(model, requires_grad: Iterable[str], frozen_params: Iterable[str],
                                optimizer: str, out_dir: Path, weight_decay: float = 0.0,
                                adamw_eps: float = 1e-6) -> None:
    """Write training, eval and optimizer graphs plus a checkpoint for `model` into out_dir.

    Loss: scaled sum of cross-entropy over the graph's single output (see
    _scaled_sum_cross_entropy); labels are int64. An op without a
    gradient builder raises UnsupportedOpError naming the op before anything trains.
    """
    _, _, artifacts = _import_onnxruntime()
    from onnxruntime.training import onnxblock

    if optimizer == "adamw":
        optim = onnxblock.optim.AdamW(eps=adamw_eps, weight_decay=weight_decay)
    elif optimizer == "sgd":
        if weight_decay:
            raise EdgeRuntimeError("weight decay is only supported with adamw")
        optim = artifacts.OptimType.SGD
    else:
        raise EdgeRuntimeError(f"unknown optimizer '{optimizer}' (choose adamw or sgd)")
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "generate.log"
    try:
        with _stderr_to(log_path):
            artifacts.generate_artifacts(
                model, requires_grad=list(requires_grad), frozen_params=list(frozen_params),
                loss=_scaled_sum_cross_entropy(), optimizer=optim,
                artifact_directory=str(out_dir))
    except Exception as exc:  # onnxruntime raises RuntimeError with the C++ message
        text = str(exc)
        m = _NO_GRADIENT.search(text)
        if m:
            raise UnsupportedOpError(m.group(1), m.group(2)) from None
        raise EdgeRuntimeError(f"building the training artifact failed: {text.splitlines()[-1][:500]}") from exc
    finally:
        log_path.unlink(missing_ok=True)


class TrainingSession:
    """A loaded training artifact: forward/backward, optimizer steps, weights by name."""

    def __init__(self, artifact_dir: Path, checkpoint_path: Path | None = None, threads: int = 0):
        _, api, _ = _import_onnxruntime()
        self._api = api
        ckpt = checkpoint_path or artifact_dir / "checkpoint"
        self.state = api.CheckpointState.load_checkpoint(str(ckpt))
        self.module = api.Module(str(artifact_dir / "training_model.onnx"), self.state,
                                 str(artifact_dir / "eval_model.onnx"), device="cpu",
                                 session_options=session_options(threads))
        self.optimizer = api.Optimizer(str(artifact_dir / "optimizer_model.onnx"), self.module)
        self.module.train()

    def forward_backward(self, inputs: np.ndarray, labels: np.ndarray, loss_scale: float) -> float:
        """Accumulate gradients of loss_scale x (summed loss of this micro-batch); return that loss.

        With loss_scale = 1/batch for every micro-batch of a batch, the accumulated gradient is
        the gradient of the batch mean and the returned losses add up to the batch mean loss.
        """
        loss = self.module(np.ascontiguousarray(inputs, dtype=np.float32),
                           np.ascontiguousarray(labels, dtype=np.int64),
                           np.asarray(loss_scale, dtype=np.float32))
        return float(np.asarray(loss))

    def step(self, learning_rate: float) -> None:
        """Apply accumulated gradients, then clear them for the next batch."""
        self.optimizer.set_learning_rate(float(learning_rate))
        self.optimizer.step()
        self.module.lazy_reset_grad()

    def squared_grad_norms(self, names: Iterable[str]) -> dict[str, float]:
        """Squared L2 norm of each named parameter's accumulated gradient; then clear the gradients.

        No optimizer step: weights are untouched. Call after forward_backward on the micro-batches
        of one batch (loss_scale = 1/batch) to get the norms of the gradient of the batch-mean loss.
        Gradients are read from onnxruntime's live buffers (`Parameter.grad`) and summed in float64
        in 64 k-element chunks, so the sum costs 512 KB whatever the layer (1 M-element chunks
        cost up to 8 MB on a layer as large as vgg_cifar's 2.4 M-parameter ones). The reset is
        `Module.lazy_reset_grad()`: the next forward_backward overwrites the buffers instead of
        accumulating into them.
        """
        out = {}
        for name in names:
            grad = self.state.parameters[name].grad
            if grad is None:
                raise EdgeRuntimeError(f"parameter {name} has no gradient in this artifact (it is frozen)")
            flat = grad.reshape(-1)
            total = 0.0
            for start in range(0, flat.size, SCORE_CHUNK):
                chunk = flat[start:start + SCORE_CHUNK].astype(np.float64)
                total += float(np.dot(chunk, chunk))
            out[name] = total
        self.module.lazy_reset_grad()
        return out

    def reset_grad(self) -> None:
        """Forget accumulated gradients: the next forward_backward starts from zero."""
        self.module.lazy_reset_grad()

    def weight_view(self, name: str) -> np.ndarray:
        """A live view of one parameter: valid until the next step, no copy."""
        return self.state.parameters[name].data

    def set_weights(self, weights, names: Iterable[str] | None = None) -> None:
        """Copy values into the session's parameters, one tensor at a time (weights may be lazy).

        A source with read_into (weights.WeightFile) reads each tensor straight into the
        session's own buffer, so loading a block allocates nothing.
        """
        read_into = getattr(weights, "read_into", None)
        for name in (weights if names is None else names):
            if read_into is not None and read_into(name, self.state.parameters[name].data):
                continue
            self.state.parameters[name] = np.ascontiguousarray(weights[name], dtype=np.float32)

    def save_checkpoint(self, path: Path) -> None:
        """Parameters and optimizer state, written atomically."""
        tmp = path.with_name(path.name + ".tmp")
        self._api.CheckpointState.save_checkpoint(self.state, str(tmp), include_optimizer_state=True)
        os.replace(tmp, path)


class InferenceSession:
    """A forward-only session over an in-memory ONNX model (frozen prefix, evaluation)."""

    def __init__(self, model, threads: int = 0):
        ort, _, _ = _import_onnxruntime()
        self._session = ort.InferenceSession(model.SerializeToString(), session_options(threads),
                                             providers=["CPUExecutionProvider"])
        self.input_name = self._session.get_inputs()[0].name

    def run(self, inputs: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self.input_name: np.ascontiguousarray(inputs, dtype=np.float32)})[0]


def scratch_dir(parent: Path) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
