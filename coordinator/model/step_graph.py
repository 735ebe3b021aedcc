"""Training step graphs in standard ONNX, for devices on the maintained onnxruntime.

onnxruntime-training (frozen at 1.19.2, x86 only) stays on the coordinator as the gradient
builder. For each trainable part the coordinator builds one forward+backward graph with it,
then rewrites every training-only operator (coordinator/model/gradient_rewrites.py) into
default-domain ONNX at opset 17, so a board runs the step as a plain
`onnxruntime.InferenceSession` (onnxruntime 1.32, no training kernels) and applies the
optimizer in numpy. The graph's inputs and outputs are described in
edge_runtime/wire/step_interface.py and recorded in its metadata.
"""
from __future__ import annotations

import contextlib
import copy
import os
import re
import sys
import tempfile
import types
from typing import Any, Sequence

import onnx
from onnx import TensorProto, helper

from coordinator.model.gradient_rewrites import (  # noqa: F401  (the builder's callers import them from here)
    AUTO_FLIP_SAMPLES,
    IR_VERSION,
    OPSET,
    SUPPORTED_TRAINING_OPS,
    ConvWeightGrad,
    StepGraphError,
    UnsupportedOpError,
    _attrs,
    _float_info,
    _is_standard,
    _Rewriter,
    rewrite_to_standard,
    unsupported_nodes,
)
from edge_runtime.wire.step_interface import (  # noqa: F401  (re-exported for the coordinator's callers)
    CROSS_ENTROPY,
    GRAD_SUFFIX,
    LABELS,
    LOSS,
    LOSS_SCALE,
    METADATA_KEY,
    MSE,
    STAT_SUFFIX,
    TARGET,
    InterfaceError,
    StepGraphInterface,
    interface_from_metadata,
)


def step_graph_interface(model: onnx.ModelProto) -> StepGraphInterface:
    """The interface recorded in a step graph's metadata."""
    return interface_from_metadata({p.key: p.value for p in model.metadata_props})



# --------------------------------------------------------------------------- gradient building

def _import_ort_training():
    """Import onnxruntime-training's builder without importing torch (unless the process already has).

    `import onnxruntime` imports torch when it can (about 280 MB), and `onnxruntime.training`'s
    __init__ imports torch-only `amp`/`optim`; blocking torch during the import and empty
    stand-ins for those two avoid both (DESIGN.md, Established facts).
    """
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        for name in ("onnxruntime.training.amp", "onnxruntime.training.optim"):
            sys.modules.setdefault(name, types.ModuleType(name))
        import onnxruntime as ort
        from onnxruntime.training import onnxblock
    finally:
        if blocked and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    ort.set_default_logger_severity(3)
    return ort, onnxblock


@contextlib.contextmanager
def _stderr_captured():
    """Send fd 2 (where the C++ builder logs every transformer at info level) to a temp file."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


_NO_GRADIENT = re.compile(r"gradient builder has not been registered: (\S+) for node (\S+)")


def _training_block(forward: onnx.ModelProto, trainable: Sequence[str], frozen: Sequence[str],
                    loss: str = CROSS_ENTROPY):
    """Run onnxruntime-training's gradient builder; return (training model, (trainable, frozen) tensors).

    The loss is loss_scale * sum of per-sample cross-entropy over the single output (labels), or with
    loss=MSE loss_scale * sum over samples of the mean over elements of (output - target)^2.
    """
    _, onnxblock = _import_ort_training()

    class ScaledSumMeanSquaredError(onnxblock.Block):
        """Sub, Mul, ReduceSum and Mul by constants: the builder differentiates them into standard ops
        (Expand, Mul, Sub, Neg...), so the IN step graph needs no rewrite of its own."""

        def build(self, output: str) -> str:
            g = self.base.graph
            vi = next(o for o in g.output if o.name == output)
            dims = [d.dim_value for d in vi.type.tensor_type.shape.dim[1:]]
            if not dims or any(d <= 0 for d in dims):
                raise StepGraphError(f"an MSE step graph needs an output of static shape per sample, not {dims}")
            elements = 1
            for d in dims:
                elements *= d
            batch = vi.type.tensor_type.shape.dim[0]
            g.input.append(helper.make_tensor_value_info(TARGET, TensorProto.FLOAT,
                                                         [batch.dim_param or "N", *dims]))
            g.input.append(helper.make_tensor_value_info(LOSS_SCALE, TensorProto.FLOAT, []))
            g.initializer.append(helper.make_tensor("step_graph/mse_per_element", TensorProto.FLOAT, [],
                                                    [1.0 / elements]))
            g.node.extend([
                helper.make_node("Sub", [output, TARGET], ["step_graph/mse_diff"], name="step_graph/mse_diff"),
                helper.make_node("Mul", ["step_graph/mse_diff", "step_graph/mse_diff"], ["step_graph/mse_sq"],
                                 name="step_graph/mse_sq"),
                helper.make_node("ReduceSum", ["step_graph/mse_sq"], ["step_graph/mse_sum"], keepdims=0,
                                 name="step_graph/mse_sum"),
                helper.make_node("Mul", ["step_graph/mse_sum", "step_graph/mse_per_element"],
                                 ["step_graph/mse_mean_sum"], name="step_graph/mse_mean"),
                helper.make_node("Mul", ["step_graph/mse_mean_sum", LOSS_SCALE], [LOSS],
                                 name="step_graph/loss_scale")])
            return LOSS

    class ScaledSumCrossEntropy(onnxblock.Block):
        def __init__(self) -> None:
            super().__init__()
            self._ce = onnxblock.loss.CrossEntropyLoss(reduction="sum")

        def build(self, logits: str) -> str:
            loss_sum = self._ce(logits, LABELS)
            self.base.graph.input.append(helper.make_tensor_value_info(LOSS_SCALE, TensorProto.FLOAT, []))
            self.base.graph.node.append(helper.make_node("Mul", [loss_sum, LOSS_SCALE], [LOSS], name="step_graph/loss_scale"))
            return LOSS

    class Step(onnxblock.TrainingBlock):
        def __init__(self) -> None:
            super().__init__()
            self._loss = ScaledSumMeanSquaredError() if loss == MSE else ScaledSumCrossEntropy()

        def build(self, logits: str) -> str:
            return self._loss(logits)

    block = Step()
    for name in trainable:
        block.requires_grad(name, True)
    for name in frozen:
        block.requires_grad(name, False)
    try:
        with _stderr_captured(), onnxblock.base(forward):
            block(forward.graph.output[0].name)
            training, _ = block.to_model_proto()
            params = block.parameters()
    except Exception as exc:  # the builder raises RuntimeError carrying the C++ message
        m = _NO_GRADIENT.search(str(exc))
        if m:
            raise UnsupportedOpError(m.group(1), m.group(2), "onnxruntime-training has no gradient for it") from None
        raise StepGraphError(f"gradient building failed: {str(exc).strip().splitlines()[-1][:500]}") from exc
    _canonical_names(training)
    return training, params


_TOKEN = re.compile(r"onnx::([^:]+)::(\d+)")


def _canonical_names(model: onnx.ModelProto) -> None:
    """Renumber onnxblock's `onnx::<name>::<counter>` names by first appearance, in place.

    The counter is process-wide, so without this the same part built twice (or after other
    parts) gets other names, another content hash, and devices would fetch it again.
    """
    numbers: dict[str, int] = {}

    def fix(name: str) -> str:
        return _TOKEN.sub(lambda m: f"onnx::{m.group(1)}::{numbers.setdefault(m.group(2), len(numbers) + 1)}", name)

    g = model.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        vi.name = fix(vi.name)
    for t in g.initializer:
        t.name = fix(t.name)
    for node in g.node:
        node.name = fix(node.name)
        node.input[:] = [fix(i) for i in node.input]
        node.output[:] = [fix(o) for o in node.output]


def _initializer_names(model: onnx.ModelProto) -> set[str]:
    return {t.name for t in model.graph.initializer}


def _check_forward(forward: onnx.ModelProto, trainable: Sequence[str], frozen: Sequence[str]) -> str:
    """Validate the forward graph and the parameter lists; return the batch input's name."""
    g = forward.graph
    inits = _initializer_names(forward)
    inputs = [i.name for i in g.input if i.name not in inits]
    if len(inputs) != 1 or len(g.output) != 1:
        raise StepGraphError(f"the forward graph must have one input and one output, has inputs {inputs} "
                             f"and outputs {[o.name for o in g.output]}")
    if g.input[[i.name for i in g.input].index(inputs[0])].type.tensor_type.elem_type != TensorProto.FLOAT:
        raise StepGraphError("the batch input must be float32")
    if not trainable:
        raise StepGraphError("a step graph needs at least one trainable parameter")
    names = list(trainable) + list(frozen)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise StepGraphError(f"parameter(s) listed twice or both trainable and frozen: {dupes}")
    missing = [n for n in names if n not in inits]
    if missing:
        raise StepGraphError(f"parameter(s) {missing} are not initializers of the forward graph "
                             "(folded into constants by the export, or misnamed)")
    values = {v for n in g.node for v in list(n.input) + list(n.output)} | set(inits) | {inputs[0]}
    clash = sorted(values & {LABELS, TARGET, LOSS_SCALE, LOSS})
    if clash:
        raise StepGraphError(f"the forward graph already uses the reserved name(s) {clash}")
    return inputs[0]


def _prepare_forward(forward: onnx.ModelProto) -> list[str]:
    """Make the forward graph differentiable in place; return the BatchNorm running statistics.

    LayerNormalization needs its optional Mean/InvStdDev outputs or the gradient builder fails
    (`i < node_->OutputDefs().size()`). Running statistics must become graph inputs: left as
    initializers, onnxruntime's ConstantSharing pass ties equal-valued ones of <= 8 elements
    across layers (an 8-channel BN reads another layer's running_var), and their updates
    could not be fed back.
    """
    stats: list[str] = []
    used = {v for n in forward.graph.node for v in list(n.input) + list(n.output)}
    for node in forward.graph.node:
        if node.op_type == "LayerNormalization" and len(node.output) == 1:
            base = node.output[0]
            for suffix in ("/mean", "/inv_std_dev"):
                name = base + suffix
                while name in used:
                    name += "_"
                used.add(name)
                node.output.append(name)
        if node.op_type == "BatchNormalization" and _attrs(node).get("training_mode", 0):
            for name in node.input[3:5]:
                if name in stats:
                    raise StepGraphError(f"running statistic {name} is shared by two BatchNormalization nodes")
                stats.append(name)
    return stats


def gradient_graph(forward: onnx.ModelProto, trainable: Sequence[str], frozen: Sequence[str]) -> onnx.ModelProto:
    """onnxruntime-training's forward+backward graph, before any rewrite (training ops included)."""
    forward = copy.deepcopy(forward)
    _check_forward(forward, trainable, frozen)
    stats = _prepare_forward(forward)
    training, _ = _training_block(forward, trainable, list(frozen) + [s for s in stats if s not in frozen])
    return training


# --------------------------------------------------------------------------- the step graph

def build_step_graph(forward: onnx.ModelProto, trainable: Sequence[str], frozen: Sequence[str],
                     conv_weight_grad: ConvWeightGrad = "auto", loss: str = CROSS_ENTROPY) -> onnx.ModelProto:
    """A forward+backward graph of `forward` in standard ONNX (opset 17, default domain only).

    forward: exported by the training recipe (one float input with a dynamic batch, one
    logits output, parameters as initializers). Its other initializers stay constants.
    conv_weight_grad: how a convolution's weight gradient is written (gradient_rewrites.ConvWeightGrad):
    "taps" (one MatMul per kernel tap, the fastest), "conv" (a Conv of the transposed input with the
    transposed output gradient), "flipped" (a Conv of both flipped, writing the gradient with no
    intermediate; stride 1 only) or "auto" (flipped where the weight outweighs the input, taps elsewhere).
    loss: CROSS_ENTROPY (int64 labels) or MSE (a float target shaped like the output: FedIN's IN step graph,
    whose forward ends at an intermediate activation).
    The interface is described in step_interface.py and recorded in the metadata
    (`step_graph_interface(model)`).
    Raises UnsupportedOpError (op_type, node_name) for an operator that cannot be trained.
    """
    trainable, frozen = list(trainable), list(frozen)
    fwd = copy.deepcopy(forward)
    batch_input = _check_forward(fwd, trainable, frozen)
    stats = _prepare_forward(fwd)
    trainable_stats = [s for s in stats if s in trainable]
    if trainable_stats:
        raise StepGraphError(f"BatchNorm running statistics cannot be trainable: {trainable_stats}")
    stat_inputs = [s for s in stats if s not in frozen]
    if loss not in (CROSS_ENTROPY, MSE):
        raise StepGraphError(f"unknown loss {loss!r}: {CROSS_ENTROPY} or {MSE}")
    training, _ = _training_block(fwd, trainable, frozen + stat_inputs, loss)

    bad = unsupported_nodes(training)
    if bad:
        raise UnsupportedOpError(bad[0].op_type, bad[0].name, "no exact standard-ONNX rewrite is known for it")
    rw = _Rewriter(training, conv_weight_grad)
    rw.run()

    # Interface: named outputs, Identity where a value must be renamed (a few small tensors).
    produced = {o for node in rw.nodes_out for o in node.output}
    grad_outputs = []
    for p in trainable:
        name = p + GRAD_SUFFIX
        if name not in produced:
            raise StepGraphError(f"no gradient was built for {p}: the loss does not depend on it")
        grad_outputs.append(name)
    stat_updates = []
    for s in stats:
        if s not in rw.stat_outputs:
            raise StepGraphError(f"running statistic {s} has no update (BatchNorm not in training mode?)")
        out = s + STAT_SUFFIX
        rw.emit("Identity", [rw.stat_outputs[s]], out)
        stat_updates.append((out, s))
    iface = StepGraphInterface(batch_input=batch_input, trainable=tuple(trainable), frozen=tuple(frozen),
                               stat_inputs=tuple(stat_inputs), stat_updates=tuple(stat_updates),
                               labels_input=TARGET if loss == MSE else LABELS, loss=loss)

    by_name = {i.name: i for i in training.graph.input}
    batch_vi = next(i for i in fwd.graph.input if i.name == batch_input)
    dim0 = batch_vi.type.tensor_type.shape.dim[0]
    batch_dim: int | str = dim0.dim_param or (dim0.dim_value if dim0.HasField("dim_value") else "N")
    out_dims = [d.dim_value for d in fwd.graph.output[0].type.tensor_type.shape.dim[1:]]
    inputs = [batch_vi,
              helper.make_tensor_value_info(TARGET, TensorProto.FLOAT, [batch_dim, *out_dims]) if loss == MSE else
              helper.make_tensor_value_info(LABELS, TensorProto.INT64, [batch_dim]),
              helper.make_tensor_value_info(LOSS_SCALE, TensorProto.FLOAT, [])]
    inputs += [by_name[name] for name in iface.param_inputs + iface.stat_inputs]
    param_dims = {t.name: list(t.dims) for t in fwd.graph.initializer}
    outputs = [_float_info(LOSS, [])]
    outputs += [_float_info(name, param_dims[p]) for p, name in zip(trainable, grad_outputs)]
    outputs += [_float_info(o, param_dims[s]) for o, s in stat_updates]
    rw.inputs = inputs
    model = rw.to_model(outputs)
    del model.graph.value_info[:]
    model.graph.name = f"step_{forward.graph.name or 'graph'}"
    helper.set_model_props(model, {METADATA_KEY: iface.to_json()})
    validate_step_graph(model)
    return model


def validate_step_graph(model: onnx.ModelProto) -> None:
    """Raise unless the model is full-checked standard ONNX a plain onnxruntime can load."""
    domains = {(o.domain or "", o.version) for o in model.opset_import}
    if domains != {("", OPSET)}:
        raise StepGraphError(f"step graph imports {sorted(domains)}, expected only the default domain at {OPSET}")
    if model.ir_version > 10:
        raise StepGraphError(f"IR version {model.ir_version} > 10")
    odd = [n.op_type for n in model.graph.node if not _is_standard(n)]
    if odd:
        raise StepGraphError(f"non-standard operators left: {sorted(set(odd))}")
    onnx.checker.check_model(model, full_check=True)



# --------------------------------------------------------------------------- the builder child

def main(argv: list[str] | None = None) -> int:
    """`python -m coordinator.model.step_graph REQUESTS.json`, with onnxruntime-training first on the path
    (coordinator/model/part_graphs.py starts it): build each requested step graph, write it atomically,
    and print one JSON line per request: {"ok": true} or the failure, by operator when it is one."""
    import json
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        requests = json.load(f)
    for request in requests:
        report: dict[str, Any] = {"what": request.get("what", "")}
        try:
            model = build_step_graph(onnx.load(request["forward"]), request["trainable"], request["frozen"],
                                     loss=request.get("loss", CROSS_ENTROPY))
            out = request["out"]
            os.makedirs(os.path.dirname(out), exist_ok=True)
            tmp = f"{out}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString())
            os.replace(tmp, out)
            report["ok"] = True
        except UnsupportedOpError as exc:
            report.update(ok=False, op_type=exc.op_type, node_name=exc.node_name, detail=exc.reason)
        except StepGraphError as exc:
            report.update(ok=False, error=str(exc))
        print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
