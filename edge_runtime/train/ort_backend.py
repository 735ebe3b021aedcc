"""The only module that touches onnxruntime: import without torch, sessions for forward and step graphs.

A device runs the maintained onnxruntime (wheels for aarch64 and Python 3.13, no training
kernels). It never builds a graph: the coordinator sends a forward graph for the frozen
prefix and a step graph for the part it trains (coordinator/model/part_graphs.py), both
in standard ONNX with every parameter as a graph input. A step graph returns the loss and
one gradient per trainable parameter; the optimizer runs in numpy (optimizers.py).

Inputs and outputs are bound to numpy buffers (IOBinding): the weights are fed from the
trainer's own arrays and the gradients are written straight into the trainer's gradient
buffers, so a step copies no parameter-sized tensor in or out.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Mapping

import numpy as np

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.wire.step_interface import InterfaceError, interface_from_metadata

_ort = None


def _import_onnxruntime():
    """Import onnxruntime without pulling in torch.

    Where torch is installed beside it (a one-machine demo's shared environment), onnxruntime's
    import may import torch, which would cost a device process about 230 MB. Blocking torch for
    the duration of the import keeps the device at its own size; torch stays importable
    afterwards for processes (the coordinator, tests) that want it.
    """
    global _ort
    if _ort is not None:
        return _ort
    blocked_torch = "torch" not in sys.modules
    if blocked_torch:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError inside onnxruntime
    try:
        import onnxruntime as ort
    finally:
        if blocked_torch and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    ort.set_default_logger_severity(3)
    _ort = ort
    return _ort


def runtime_versions() -> dict:
    return {"onnxruntime": _import_onnxruntime().__version__}


def session_options(threads: int = 0):
    """Session options for the lowest, flattest peak: memory patterns off, arena on (measured: docs/benchmarks.md)."""
    ort = _import_onnxruntime()
    so = ort.SessionOptions()
    so.enable_mem_pattern = False
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return so


def _session(model: bytes | Path, threads: int):
    ort = _import_onnxruntime()
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types with the C++ message
        what = "a graph" if isinstance(model, bytes) else str(model)
        raise EdgeRuntimeError(f"onnxruntime cannot load {what}: {str(exc).splitlines()[0][:500]}") from None


class ForwardSession:
    """A forward-only session (frozen prefix, evaluation): the batch first, then parameters by name."""

    def __init__(self, model: bytes | Path, threads: int = 0):
        self._session = _session(model, threads)
        inputs = self._session.get_inputs()
        self.input_name = inputs[0].name
        self.param_names = [i.name for i in inputs[1:]]

    def run(self, inputs: np.ndarray, params: Mapping[str, np.ndarray]) -> np.ndarray:
        feeds = {self.input_name: np.ascontiguousarray(inputs, dtype=np.float32)}
        feeds.update((n, params[n]) for n in self.param_names)
        return self._session.run(None, feeds)[0]


class StepSession:
    """Forward and backward of one part: the loss of a micro-batch, its gradients, updated BatchNorm statistics.

    The loss is loss_scale x the summed cross-entropy of the micro-batch (an IN step graph: the summed per-sample
    mean squared error against a float target, passed as `labels`): with loss_scale =
    1/batch for each micro-batch of a batch, the summed gradients are the gradient of the
    batch-mean loss, whatever the split (and for any optimizer).
    """

    def __init__(self, graph: bytes | Path, threads: int = 0):
        self._session = _session(graph, threads)
        try:
            self.interface = interface_from_metadata(self._session.get_modelmeta().custom_metadata_map)
        except InterfaceError as exc:
            raise EdgeRuntimeError(str(exc)) from None
        self.input_shapes = {i.name: tuple(i.shape) for i in self._session.get_inputs()}
        self._binding = self._session.io_binding()

    def run(self, inputs: np.ndarray, labels: np.ndarray, loss_scale: float, tensors: Mapping[str, np.ndarray],
            grads: Mapping[str, np.ndarray]) -> tuple[float, dict[str, np.ndarray]]:
        """One micro-batch: write each trainable parameter's gradient into grads[name] (overwriting it);
        return the scaled loss and the BatchNorm statistics this forward pass produced, by the name they replace.

        tensors holds every parameter and running statistic the graph reads (interface.param_inputs and stat_inputs); they are
        read in place, so the caller's in-place optimizer updates are what the next run sees.
        """
        itf, b = self.interface, self._binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        batch = np.ascontiguousarray(inputs, dtype=np.float32)
        # an IN step graph (loss "mse") reads a float target shaped like its output, a step graph int64 labels
        label_array = np.ascontiguousarray(labels, dtype=np.float32 if itf.float_target else np.int64)
        scale = np.asarray(loss_scale, dtype=np.float32)
        b.bind_cpu_input(itf.batch_input, batch)
        b.bind_cpu_input(itf.labels_input, label_array)
        b.bind_cpu_input(itf.loss_scale_input, scale)
        for name in itf.param_inputs + itf.stat_inputs:
            b.bind_cpu_input(name, tensors[name])
        b.bind_output(itf.loss_output)
        for name, output in zip(itf.trainable, itf.grad_outputs):
            out = grads[name]
            b.bind_output(output, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        for output, _ in itf.stat_updates:
            b.bind_output(output)
        self._session.run_with_iobinding(b)
        outputs = b.get_outputs()   # OrtValues: the gradients are already in grads, nothing is copied
        loss = float(outputs[0].numpy())
        first = 1 + len(itf.trainable)
        stats = {stat: outputs[first + k].numpy() for k, (_, stat) in enumerate(itf.stat_updates)}
        return loss, stats
