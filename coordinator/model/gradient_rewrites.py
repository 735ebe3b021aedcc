"""The exact standard-ONNX form of every training-only operator a step graph may hold.

onnxruntime-training's gradient builder emits operators of its own (ReluGrad, ConvGrad,
BatchNormalizationGrad, InPlaceAccumulatorV2, ...) that the maintained onnxruntime does
not have. Each rule below replaces one of them by default-domain ONNX at opset 17 that
computes the same values (tests/test_step_graph.py holds each rule against the kernel it
replaces and every part against torch autograd); an operator without a rule is refused by
name. The step graph itself (what is built, its interface) is coordinator/model/step_graph.py.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Sequence, get_args

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

from edge_runtime.wire.step_interface import GRAD_SUFFIX

OPSET = 17
IR_VERSION = 8          # the IR version that goes with opset 17; onnxruntime 1.19.2 reads up to 10

ConvWeightGrad = Literal["auto", "taps", "conv", "flipped"]
CONV_WEIGHT_GRADS: tuple[str, ...] = get_args(ConvWeightGrad)
# "auto" writes a stride-1 convolution's weight gradient in the flipped form when the gradient is larger
# than the layer's input at this many samples (ResNet-34's 512-channel layers on 4x4, not its 256-channel
# ones on 8x8). There the taps form's two weight-sized buffers (the taps and their Concat) are most of a
# step's working memory, and the flipped form saves them at a slower step (measured on ResNet-34's
# largest layer at batch 32 with bench_block_memory's device job: 15 MB less, 35 % more CPU a step;
# docs/benchmarks.md, the ResNet-34 memory wall notes).
AUTO_FLIP_SAMPLES = 128


# --------------------------------------------------------------------------- errors

class StepGraphError(Exception):
    """The forward graph or the arguments cannot make a step graph."""


class UnsupportedOpError(StepGraphError):
    """An operator has no gradient builder or no exact standard-ONNX rewrite.

    Raised while the step graph is built (on the coordinator), before anything runs.
    """

    def __init__(self, op_type: str, node_name: str, reason: str = "") -> None:
        self.op_type = op_type
        self.node_name = node_name
        self.reason = reason
        text = f"operator {op_type} (node {node_name!r}) cannot be trained on a device"
        super().__init__(text + (f": {reason}" if reason else ""))


# --------------------------------------------------------------------------- rewriting machinery

def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _is_standard(node: onnx.NodeProto) -> bool:
    """True for an operator of the default ONNX domain that exists at opset 17."""
    if node.domain not in ("", "ai.onnx"):
        return False
    try:
        onnx.defs.get_schema(node.op_type, OPSET, "")
    except onnx.defs.SchemaError:
        return False
    return True


def _topological(nodes: Sequence[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Nodes in a topological order that keeps the given order wherever it is already valid."""
    ready = set(available) | {""}
    pending = list(nodes)
    out: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                out.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise StepGraphError(f"graph has a cycle or a dangling input at node {rest[0].name!r} "
                                 f"({[i for i in rest[0].input if i not in ready]})")
        pending = rest
    return out


Shape = tuple[int | None, ...]


class _Rewriter:
    """Rewrites a graph's training-only nodes into standard ONNX, one node at a time, in order.

    Nodes are visited in topological order, so when a rewrite needs a static shape, every
    producer before it is already standard and onnx shape inference over the rewritten
    prefix can supply it.
    """

    def __init__(self, model: onnx.ModelProto, conv_weight_grad: ConvWeightGrad) -> None:
        self.model = model
        g = model.graph
        self.inputs = list(g.input)
        self.initializers = list(g.initializer)
        self.available = {i.name for i in g.input} | {t.name for t in g.initializer}
        self.nodes_in = _topological(list(g.node), self.available)
        self.nodes_out: list[onnx.NodeProto] = []
        self.producer = {o: n for n in self.nodes_in for o in n.output if o}
        self.conv_weight_grad = conv_weight_grad
        self.stat_outputs: dict[str, str] = {}   # running-statistic input -> its updated value
        self.removed_outputs: dict[str, str] = {}  # accumulator flag output -> gradient it stood for
        self.removed_inputs: set[str] = set()      # accumulation buffers and lazy_reset_grad
        self._names = set(self.available) | {v for n in self.nodes_in for v in list(n.input) + list(n.output)}
        self._names |= {n.name for n in self.nodes_in}
        self._consts: dict[tuple, str] = {}
        self._types: dict[str, tuple[int, Shape | None]] = {}
        self._prefix = "sg"

    # ---- naming and emitting
    def fresh(self, hint: str) -> str:
        base = f"{self._prefix}/{hint}"
        name, k = base, 0
        while name in self._names:
            k += 1
            name = f"{base}_{k}"
        self._names.add(name)
        return name

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        """A (deduplicated) constant initializer."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self.fresh("const")
            self.initializers.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def ints(self, values: Iterable[int]) -> str:
        return self.const(list(values), np.int64)

    def emit(self, op: str, inputs: Sequence[str], out: str | None = None, **attrs: Any) -> str:
        """Append one standard node with a single output (named `out` or a fresh name)."""
        out = out or self.fresh(op.lower())
        self._names.add(out)
        self.nodes_out.append(helper.make_node(op, list(inputs), [out], name=self.fresh(op), **attrs))
        return out

    def after(self, v: str, anchor: str) -> str:
        """`v`, readable only once `anchor` exists: a Reshape to its own shape whose shape input reads anchor's
        first (batch) dimension, a view with no copy.

        onnxruntime runs a node as soon as its inputs exist. A backward computation that reads only forward
        tensors (a ReLU's mask, BatchNorm's centred input, the padded input of a convolution's weight
        gradient) would otherwise run during the forward pass and its activation-sized result be held through
        the whole backward pass: on ResNet-34's first layers that was several activations more at the peak.
        """
        batch = self.emit("Shape", [anchor], start=0, end=1)
        return self.emit("Reshape", [v, self.emit("Concat", [batch, self.emit("Shape", [v], start=1)], axis=0)])

    def emit_many(self, op: str, inputs: Sequence[str], outputs: Sequence[str | None], **attrs: Any) -> list[str]:
        """Append one standard node with several outputs (None: a fresh name)."""
        names = [o or self.fresh(f"{op.lower()}_out{i}") for i, o in enumerate(outputs)]
        self._names.update(names)
        self.nodes_out.append(helper.make_node(op, list(inputs), names, name=self.fresh(op), **attrs))
        return names

    # ---- shapes
    def _infer(self) -> None:
        graph = helper.make_graph(self.nodes_out, "prefix", self.inputs, [], initializer=self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = IR_VERSION
        inferred = shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input):
            t = vi.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim) if t.HasField("shape") else None
            self._types[vi.name] = (t.elem_type, dims)
        for init in self.initializers:
            self._types[init.name] = (init.data_type, tuple(init.dims))

    def _type(self, name: str, node: onnx.NodeProto) -> tuple[int, Shape | None]:
        if name not in self._types or self._types[name][1] is None:
            self._infer()
        if name not in self._types:
            raise UnsupportedOpError(node.op_type, node.name, f"the type of {name!r} cannot be inferred")
        return self._types[name]

    def shape(self, name: str, node: onnx.NodeProto) -> Shape:
        shape = self._type(name, node)[1]
        if shape is None:
            raise UnsupportedOpError(node.op_type, node.name, f"the rank of {name!r} cannot be inferred")
        return shape

    def static_dims(self, name: str, node: onnx.NodeProto, start: int) -> tuple[int, ...]:
        """Dimensions start.. of a tensor; they must be static (only the batch may vary)."""
        dims = self.shape(name, node)[start:]
        if any(d is None for d in dims):
            raise UnsupportedOpError(node.op_type, node.name, f"{name!r} needs static dimensions after the batch, has {dims}")
        return tuple(int(d) for d in dims)  # type: ignore[arg-type]

    def elem_type(self, name: str, node: onnx.NodeProto) -> int:
        return self._type(name, node)[0]

    # ---- driver
    def run(self) -> None:
        for node in self.nodes_in:
            if _is_standard(node) and not _needs_standard_rewrite(node):
                self.nodes_out.append(node)
                continue
            if _is_standard(node):
                rewrite = _STANDARD_REWRITES[node.op_type]
            else:
                rewrite = _REWRITES[(node.domain or "", node.op_type)]
            self._prefix = f"{node.name or node.op_type}/sg"
            rewrite(self, node)

    def to_model(self, outputs: Sequence[onnx.ValueInfoProto] | None = None) -> onnx.ModelProto:
        g = self.model.graph
        declared = outputs is not None
        if outputs is None:
            outputs = []
            for o in g.output:
                if o.name in self.removed_outputs:
                    o = _float_info(self.removed_outputs[o.name], None)
                outputs.append(o)
        inputs = [i for i in self.inputs if i.name not in self.removed_inputs]
        graph = helper.make_graph(self.nodes_out, g.name, inputs, list(outputs), initializer=self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="edgeblock.step_graph")
        model.ir_version = IR_VERSION
        model = _pruned(model)
        return model if declared else _with_output_types(model)


def _with_output_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fill in graph outputs declared without a shape (the checker requires one).

    From shape inference, else, for `<input>_grad`, from that input (inference cannot see
    through every op, e.g. MaxUnpool with a computed output shape).
    """
    def typed(vi: onnx.ValueInfoProto) -> bool:
        return vi.type.tensor_type.HasField("shape") and bool(vi.type.tensor_type.elem_type)

    if all(typed(o) for o in model.graph.output):
        return model
    inferred = shape_inference.infer_shapes(model, data_prop=True)
    known = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output) if typed(v)}
    known.update({i.name + GRAD_SUFFIX: i for i in model.graph.input if i.name + GRAD_SUFFIX not in known})
    for o in model.graph.output:
        if not typed(o) and o.name in known:
            o.type.CopyFrom(known[o.name].type)
    return model


def _float_info(name: str, shape: Sequence[int | str | None] | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _pruned(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop nodes and initializers no graph output depends on (graph inputs stay: they are the interface)."""
    g = model.graph
    needed = {o.name for o in g.output}
    kept = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    kept.reverse()
    del g.node[:]
    g.node.extend(kept)
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    return model


def _needs_standard_rewrite(node: onnx.NodeProto) -> bool:
    """Standard ops that still need rewriting: training-mode BatchNormalization.

    It has no outputs for the inverse deviation the backward needs, and it updates
    running_var with the biased variance (torch: unbiased).
    """
    return node.op_type == "BatchNormalization" and bool(_attrs(node).get("training_mode", 0))


def unsupported_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes that are neither standard ONNX at opset 17 nor covered by an exact rewrite."""
    return [n for n in model.graph.node
            if not _is_standard(n) and (n.domain or "", n.op_type) not in _REWRITES]


def rewrite_to_standard(model: onnx.ModelProto, conv_weight_grad: ConvWeightGrad = "auto") -> onnx.ModelProto:
    """The same computation with every training-only op replaced by default-domain ONNX (opset 17).

    InPlaceAccumulatorV2 nodes are removed: the gradient each accumulated becomes the graph
    output in place of the accumulator's flag, and the caller accumulates in numpy.
    Raises UnsupportedOpError, naming the first op without a rewrite, before rewriting anything.
    """
    bad = unsupported_nodes(model)
    if bad:
        raise UnsupportedOpError(bad[0].op_type, bad[0].name, "no exact standard-ONNX rewrite is known for it")
    if conv_weight_grad not in CONV_WEIGHT_GRADS:
        raise StepGraphError(f"conv_weight_grad must be one of {', '.join(CONV_WEIGHT_GRADS)}, "
                             f"not {conv_weight_grad!r}")
    rw = _Rewriter(model, conv_weight_grad)
    rw.run()
    return rw.to_model()


# --------------------------------------------------------------------------- elementwise rewrites

def _positive_mask(rw: _Rewriter, x: str, dy: str) -> str:
    """Cast(X > 0) as float, made once dY exists (rw.after). onnxruntime's Where with a broadcast scalar is 5x
    slower than Greater + Cast + Mul (26 vs 5 ms on 32x64x14x14); the float mask costs 3 bytes per element
    more than a bool one, for the moment it lives."""
    return rw.emit("Cast", [rw.emit("Greater", [rw.after(x, dy), rw.const(0.0)])], to=TensorProto.FLOAT)


def _relu_grad(rw: _Rewriter, n: onnx.NodeProto) -> None:
    """ReluGrad(dY, X) = dY * (X > 0)."""
    dy, x = n.input[:2]
    rw.emit("Mul", [dy, _positive_mask(rw, x, dy)], n.output[0])


def _leaky_relu_grad(rw: _Rewriter, n: onnx.NodeProto) -> None:
    """LeakyReluGrad(dY, Y; alpha) = dY * (alpha + (1 - alpha) (Y > 0))."""
    dy, y = n.input[:2]
    alpha = float(_attrs(n).get("alpha", 0.01))
    slope = rw.emit("Add", [rw.emit("Mul", [_positive_mask(rw, y, dy), rw.const(1.0 - alpha)]), rw.const(alpha)])
    rw.emit("Mul", [dy, slope], n.output[0])


def _sigmoid_grad(rw: _Rewriter, n: onnx.NodeProto) -> None:
    """SigmoidGrad(dY, Y) = dY * Y * (1 - Y)."""
    dy, y = n.input[:2]
    y = rw.after(y, dy)
    rw.emit("Mul", [dy, rw.emit("Mul", [y, rw.emit("Sub", [rw.const(1.0), y])])], n.output[0])


def _tanh_grad(rw: _Rewriter, n: onnx.NodeProto) -> None:
    """TanhGrad(dY, Y) = dY * (1 - Y^2)."""
    dy, y = n.input[:2]
    y = rw.after(y, dy)
    rw.emit("Mul", [dy, rw.emit("Sub", [rw.const(1.0), rw.emit("Mul", [y, y])])], n.output[0])


def _softmax_grad(rw: _Rewriter, n: onnx.NodeProto) -> None:
    """SoftmaxGrad_13(dY, Y; axis) = Y * (dY - sum(dY * Y, axis))."""
    dy, y = n.input[:2]
    axis = _attrs(n).get("axis", -1)
    s = rw.emit("ReduceSum", [rw.emit("Mul", [dy, y]), rw.ints([axis])], keepdims=1)
    rw.emit("Mul", [y, rw.emit("Sub", [dy, s])], n.output[0])


def _log_softmax_grad(rw: _Rewriter, n: onnx.NodeProto) -> None:
    """LogSoftmaxGrad_13(dY, Y; axis) = dY - exp(Y) * sum(dY, axis)."""
    dy, y = n.input[:2]
    y = rw.after(y, dy)
    axis = _attrs(n).get("axis", -1)
    s = rw.emit("ReduceSum", [dy, rw.ints([axis])], keepdims=1)
    rw.emit("Sub", [dy, rw.emit("Mul", [rw.emit("Exp", [y]), s])], n.output[0])


_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _gelu(rw: _Rewriter, n: onnx.NodeProto) -> None:
    """Gelu(X) = 0.5 X (1 + erf(X / sqrt 2)): what torch exported before onnxruntime fused it."""
    x = n.input[0]
    cdf = rw.emit("Add", [rw.const(1.0), rw.emit("Erf", [rw.emit("Mul", [x, rw.const(_INV_SQRT2)])])])
    rw.emit("Mul", [rw.emit("Mul", [x, rw.const(0.5)]), cdf], n.output[0])


def _gelu_grad(rw: _Rewriter, n: onnx.NodeProto) -> None:
    """GeluGrad(dY, X) = dY * (Phi(X) + X * phi(X)), Phi = 0.5 (1 + erf(X / sqrt 2))."""
    dy, x = n.input[:2]
    x = rw.after(x, dy)
    cdf = rw.emit("Mul", [rw.const(0.5), rw.emit("Add", [rw.const(1.0),
                                                           rw.emit("Erf", [rw.emit("Mul", [x, rw.const(_INV_SQRT2)])])])])
    pdf = rw.emit("Mul", [rw.const(_INV_SQRT_2PI), rw.emit("Exp", [rw.emit("Mul", [rw.emit("Mul", [x, x]), rw.const(-0.5)])])])
    rw.emit("Mul", [dy, rw.emit("Add", [cdf, rw.emit("Mul", [x, pdf])])], n.output[0])


def _quick_gelu_sigmoid(rw: _Rewriter, x: str, alpha: float) -> str:
    return rw.emit("Sigmoid", [x if alpha == 1.0 else rw.emit("Mul", [x, rw.const(alpha)])])


def _quick_gelu(rw: _Rewriter, n: onnx.NodeProto) -> None:
    """QuickGelu(X; alpha) = X * sigmoid(alpha X) (onnxruntime fuses SiLU into it with alpha = 1)."""
    x = n.input[0]
    rw.emit("Mul", [x, _quick_gelu_sigmoid(rw, x, _attrs(n).get("alpha", 1.702))], n.output[0])


def _quick_gelu_grad(rw: _Rewriter, n: onnx.NodeProto) -> None:
    """QuickGeluGrad(dY, X; alpha) = dY * s * (1 + alpha X (1 - s)), s = sigmoid(alpha X)."""
    dy, x = n.input[:2]
    x = rw.after(x, dy)
    alpha = _attrs(n).get("alpha", 1.702)
    s = _quick_gelu_sigmoid(rw, x, alpha)
    ax = x if alpha == 1.0 else rw.emit("Mul", [x, rw.const(alpha)])
    inner = rw.emit("Add", [rw.const(1.0), rw.emit("Mul", [ax, rw.emit("Sub", [rw.const(1.0), s])])])
    rw.emit("Mul", [dy, rw.emit("Mul", [s, inner])], n.output[0])


def _dropout_grad(rw: _Rewriter, n: onnx.NodeProto) -> None:
    """DropoutGrad(dY, mask, ratio, training_mode) = dY * mask / (1 - ratio) when training, else dY."""
    ins = list(n.input) + [""] * (4 - len(n.input))
    dy, mask, ratio, training = ins[:4]
    if not training:  # onnxruntime's default for an absent training_mode is false: identity
        rw.emit("Identity", [dy], n.output[0])
        return
    keep_scale = rw.emit("Div", [rw.const(1.0), rw.emit("Sub", [rw.const(1.0), ratio or rw.const(0.5)])])
    # not training: scale 1 and every element kept
    keep_scale = rw.emit("Where", [training, keep_scale, rw.const(1.0)])
    kept = rw.emit("Or", [mask, rw.emit("Not", [training])])
    rw.emit("Mul", [dy, rw.emit("Mul", [rw.emit("Cast", [kept], to=TensorProto.FLOAT), keep_scale])], n.output[0])


def _scale(rw: _Rewriter, n: onnx.NodeProto) -> None:
    """Scale(X, s; scale_down) = X * s, or X / s."""
    x, s = n.input[:2]
    if rw.elem_type(s, n) != rw.elem_type(x, n):
        s = rw.emit("Cast", [s], to=rw.elem_type(x, n))
    rw.emit("Div" if _attrs(n).get("scale_down", 0) else "Mul", [x, s], n.output[0])


def _fused_matmul(rw: _Rewriter, n: onnx.NodeProto) -> None:
    """FusedMatMul(A, B; alpha, transA, transB) = alpha * op(A) @ op(B).

    2-D operands use Gemm's transA/transB flags, so nothing is transposed in memory.
    """
    a = _attrs(n)
    if a.get("transBatchA", 0) or a.get("transBatchB", 0):
        raise UnsupportedOpError(n.op_type, n.name, "transBatchA/transBatchB are not rewritten")
    x, y = n.input[:2]
    alpha, ta, tb = float(a.get("alpha", 1.0)), int(a.get("transA", 0)), int(a.get("transB", 0))
    rx, ry = len(rw.shape(x, n)), len(rw.shape(y, n))
    if rx == 2 and ry == 2:
        rw.emit("Gemm", [x, y], n.output[0], alpha=alpha, transA=ta, transB=tb)
        return

    def t(v: str, rank: int, flag: int) -> str:
        if not flag or rank < 2:
            return v
        perm = list(range(rank - 2)) + [rank - 1, rank - 2]
        return rw.emit("Transpose", [v], perm=perm)

    if alpha == 1.0:
        rw.emit("MatMul", [t(x, rx, ta), t(y, ry, tb)], n.output[0])
    else:
        rw.emit("Mul", [rw.emit("MatMul", [t(x, rx, ta), t(y, ry, tb)]), rw.const(alpha)], n.output[0])


def _sum_to(rw: _Rewriter, grad: str, like: str, n: onnx.NodeProto, out: str) -> None:
    """`grad` summed over the axes along which `like` was broadcast to it (numpy rules), as `out`.

    From the static shapes: an axis `like` lacks (leading) or holds as 1 where the gradient's is
    not 1 is summed; a batch axis unknown on both sides is taken as equal.
    """
    g_shape, l_shape = rw.shape(grad, n), rw.shape(like, n)
    lead = len(g_shape) - len(l_shape)
    if lead < 0:
        raise UnsupportedOpError(n.op_type, n.name, f"{like!r} has a higher rank than its gradient")
    kept = [lead + i for i, (gd, ld) in enumerate(zip(g_shape[lead:], l_shape)) if ld == 1 and gd != 1]
    if any(ld is not None and ld != 1 and gd is not None and gd != ld
           for gd, ld in zip(g_shape[lead:], l_shape)):
        raise UnsupportedOpError(n.op_type, n.name, f"shapes {g_shape} and {l_shape} do not broadcast")
    v = grad
    if kept:
        v = rw.emit("ReduceSum", [v, rw.ints(kept)], keepdims=1)
    if lead:
        v = rw.emit("ReduceSum", [v, rw.ints(range(lead))], keepdims=0)
    rw.emit("Identity", [v], out)


def _div_grad(rw: _Rewriter, n: onnx.NodeProto) -> None:
    """DivGrad(dY, A, B) = (dY / B, -dY * A / B^2), each summed back to its operand's shape."""
    dy, a, b = n.input[:3]
    da, db = (list(n.output) + ["", ""])[:2]
    if da:
        _sum_to(rw, rw.emit("Div", [dy, b]), a, n, da)
    if db:
        quotient = rw.emit("Div", [rw.emit("Div", [a, b]), b])
        _sum_to(rw, rw.emit("Neg", [rw.emit("Mul", [dy, quotient])]), b, n, db)


def _concat_training(rw: _Rewriter, n: onnx.NodeProto) -> None:
    """ConcatTraining = Concat; its second output (each input's length on the axis, for Concat's gradient) is
    built only if something reads it."""
    axis = int(_attrs(n).get("axis", 0))
    rw.emit("Concat", list(n.input), n.output[0], axis=axis)
    if len(n.output) > 1 and n.output[1] and any(n.output[1] in m.input for m in rw.nodes_in):
        lengths = [rw.emit("Slice", [rw.emit("Shape", [x]), rw.ints([axis]), rw.ints([axis + 1 if axis != -1
                                                                                       else 2 ** 62])])
                   for x in n.input]
        rw.emit("Concat", lengths, n.output[1], axis=0)


def _softmax_ce_grad(rw: _Rewriter, n: onnx.NodeProto) -> None:
    """SoftmaxCrossEntropyLossGrad(dY, log_prob, label) = (exp(log_prob) - onehot(label)) * dY (/N for mean)."""
    a = _attrs(n)
    if len(n.input) > 3 and any(n.input[3:]):
        raise UnsupportedOpError(n.op_type, n.name, "class weights / ignore_index inputs are not rewritten")
    if "ignore_index" in a:
        raise UnsupportedOpError(n.op_type, n.name, "ignore_index is not rewritten")
    dy, log_prob, label = n.input[:3]
    classes = rw.shape(log_prob, n)[1]
    depth = rw.ints([classes]) if classes is not None else rw.emit(
        "Slice", [rw.emit("Shape", [log_prob]), rw.ints([1]), rw.ints([2])])
    onehot = rw.emit("OneHot", [label, depth, rw.const([0.0, 1.0])], axis=1)
    diff = rw.emit("Sub", [rw.emit("Exp", [log_prob]), onehot])
    reduction = a.get("reduction", "mean")
    if reduction == "sum":
        scale = dy
    elif reduction == "mean":
        scale = rw.emit("Div", [dy, rw.emit("Cast", [rw.emit("Size", [label])], to=TensorProto.FLOAT)])
    elif reduction == "none":
        scale = rw.emit("Unsqueeze", [dy, rw.ints([1])])
    else:
        raise UnsupportedOpError(n.op_type, n.name, f"reduction {reduction!r}")
    rw.emit("Mul", [diff, scale], n.output[0])


def _accumulator(rw: _Rewriter, n: onnx.NodeProto) -> None:
    """InPlaceAccumulatorV2 is dropped: the gradient itself is the output; numpy accumulates."""
    rw.removed_outputs[n.output[0]] = n.input[1]
    rw.removed_inputs.update(name for name in (n.input[0], n.input[2] if len(n.input) > 2 else "") if name)


# --------------------------------------------------------------------------- normalization

def _batchnorm_train(rw: _Rewriter, n: onnx.NodeProto) -> None:
    """Training-mode BatchNorm (BatchNormInternal, or BatchNormalization training_mode=1).

    Batch statistics from ReduceMean / ReduceSumSquare over the centred input (freed at once),
    Y from the standard inference-mode BatchNormalization fed those statistics (a fused pass,
    no normalized copy kept), the inverse deviation for the backward, and the running
    statistics updated as torch does: momentum-weighted, variance unbiased by n / (n - 1) (the
    ONNX rule and onnxruntime-training's kernel use the biased one). The standard op in
    training mode gives the statistics in one pass (0-12% less CPU on a MobileNetV2 block) but
    peaks 5-42 MB higher at batch 32-128, and onnxruntime 1.32 corrupts its outputs when one
    buffer feeds its mean and variance inputs: see NOTES.md.
    """
    a = _attrs(n)
    x, scale, bias, mean_in, var_in = n.input[:5]
    eps, momentum = float(a.get("epsilon", 1e-5)), float(a.get("momentum", 0.9))
    outs = list(n.output) + [""] * (5 - len(n.output))
    rank = len(rw.shape(x, n))
    axes = [0] + list(range(2, rank))
    mean = rw.emit("ReduceMean", [x], outs[3] or None, axes=axes, keepdims=0)
    centred = rw.emit("Sub", [x, rw.emit("Unsqueeze", [mean, rw.ints(axes)])])
    sq_sum = rw.emit("ReduceSumSquare", [centred], axes=axes, keepdims=0)
    count = rw.emit("Cast", [rw.emit("Div", [rw.emit("Size", [x]), rw.emit("Size", [scale])])], to=TensorProto.FLOAT)
    var = rw.emit("Div", [sq_sum, count])
    rw.emit("BatchNormalization", [x, scale, bias, mean, var], outs[0], epsilon=eps)
    if outs[4]:
        rw.emit("Reciprocal", [rw.emit("Sqrt", [rw.emit("Add", [var, rw.const(eps)])])], outs[4])
    unbiased = rw.emit("Div", [sq_sum, rw.emit("Sub", [count, rw.const(1.0)])])
    for stat_in, batch_stat, out in ((mean_in, mean, outs[1]), (var_in, unbiased, outs[2])):
        updated = rw.emit("Add", [rw.emit("Mul", [stat_in, rw.const(momentum)]),
                                  rw.emit("Mul", [batch_stat, rw.const(1.0 - momentum)])], out or None)
        rw.stat_outputs[stat_in] = updated


def _batchnorm_grad(rw: _Rewriter, n: onnx.NodeProto) -> None:
    """BatchNormalizationGrad(dY, X, scale, mean, inv_std) -> dX, dScale, dBias.

    With xc = X - mean (sums over every axis but the channels, n elements each):
    dBias = sum dY; dScale = inv_std sum(dY xc);
    dX = k dY - a xc - c, k = scale inv_std, a = k inv_std dScale / n, c = k dBias / n.
    Eight passes over the activation; the centred input is reused, never normalized in memory.
    """
    dy, x, scale, mean, inv_std = n.input[:5]
    outs = list(n.output) + [""] * (3 - len(n.output))
    rank = len(rw.shape(x, n))
    axes = rw.ints([0] + list(range(2, rank)))
    centred = rw.emit("Sub", [rw.after(x, dy), rw.emit("Unsqueeze", [mean, axes])])
    dbias = rw.emit("ReduceSum", [dy, axes], outs[2] or None, keepdims=0)
    dscale = rw.emit("Mul", [rw.emit("ReduceSum", [rw.emit("Mul", [dy, centred]), axes], keepdims=0), inv_std],
                     outs[1] or None)
    if not outs[0]:
        return
    count = rw.emit("Cast", [rw.emit("Div", [rw.emit("Size", [dy]), rw.emit("Size", [scale])])], to=TensorProto.FLOAT)
    k = rw.emit("Mul", [scale, inv_std])
    k_over_n = rw.emit("Div", [k, count])
    slope = rw.emit("Mul", [rw.emit("Mul", [k_over_n, inv_std]), dscale])
    shift = rw.emit("Mul", [k_over_n, dbias])
    rw.emit("Sub", [rw.emit("Mul", [dy, rw.emit("Unsqueeze", [k, axes])]),
                    rw.emit("Add", [rw.emit("Mul", [centred, rw.emit("Unsqueeze", [slope, axes])]),
                                    rw.emit("Unsqueeze", [shift, axes])])], outs[0])


def _layernorm_grad(rw: _Rewriter, n: onnx.NodeProto) -> None:
    """LayerNormalizationGrad(dY, X, scale, mean, inv_std; axis) -> dX, dScale, dBias.

    g = dY scale; dX = inv_std (g - mean(g) - xhat mean(g xhat)) over the normalized axes;
    dScale, dBias sum over the leading axes. mean / inv_std come from the standard
    LayerNormalization's optional outputs (keepdims shapes, so they broadcast).
    """
    dy, x, scale, mean, inv_std = n.input[:5]
    outs = list(n.output) + [""] * (3 - len(n.output))
    rank = len(rw.shape(x, n))
    axis = _attrs(n).get("axis", -1) % rank
    lead, norm = list(range(axis)), list(range(axis, rank))
    xhat = rw.emit("Mul", [rw.emit("Sub", [rw.after(x, dy), mean]), inv_std])

    def lead_sum(v: str, out: str) -> None:
        if lead:
            rw.emit("ReduceSum", [v, rw.ints(lead)], out, keepdims=0)
        else:
            rw.emit("Identity", [v], out)

    if outs[2]:
        lead_sum(dy, outs[2])
    if outs[1]:
        lead_sum(rw.emit("Mul", [dy, xhat]), outs[1])
    if outs[0]:
        g = rw.emit("Mul", [dy, scale])
        mean_g = rw.emit("ReduceMean", [g], axes=norm, keepdims=1)
        mean_gx = rw.emit("ReduceMean", [rw.emit("Mul", [g, xhat])], axes=norm, keepdims=1)
        inner = rw.emit("Sub", [rw.emit("Sub", [g, mean_g]), rw.emit("Mul", [xhat, mean_gx])])
        rw.emit("Mul", [inner, inv_std], outs[0])


# --------------------------------------------------------------------------- convolution

@dataclass(frozen=True)
class _ConvGeometry:
    groups: int
    in_per_group: int
    out_per_group: int
    spatial: tuple[int, ...]       # input spatial size
    out_spatial: tuple[int, ...]
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]          # begins then ends, as in ONNX

    @property
    def rank(self) -> int:
        return len(self.kernel)

    def output_padding(self) -> list[int]:
        """ConvTranspose output_padding that gives back exactly the input's spatial size."""
        r = self.rank
        return [(self.spatial[i] + self.pads[i] + self.pads[i + r] - self.dilations[i] * (self.kernel[i] - 1) - 1)
                % self.strides[i] for i in range(r)]

    def tap_slices(self) -> list[tuple[list[int], list[int]] | None]:
        """(starts, ends) in the padded input of the strided window each kernel tap sees.

        None where the window is the whole padded input (a 1x1 kernel, stride 1, no padding):
        no Slice, which would only copy.
        """
        r = self.rank
        padded = [self.spatial[i] + self.pads[i] + self.pads[i + r] for i in range(r)]
        out: list[tuple[list[int], list[int]] | None] = []
        for tap in itertools.product(*[range(k) for k in self.kernel]):
            starts = [t * d for t, d in zip(tap, self.dilations)]
            ends = [s + st * (o - 1) + 1 for s, st, o in zip(starts, self.strides, self.out_spatial)]
            whole = not any(starts) and ends == padded and all(st == 1 for st in self.strides)
            out.append(None if whole else (starts, ends))
        return out


def _conv_geometry(rw: _Rewriter, n: onnx.NodeProto, x: str, w: str) -> _ConvGeometry:
    a = _attrs(n)
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", ""):
        raise UnsupportedOpError(n.op_type, n.name, "auto_pad other than NOTSET (export with explicit pads)")
    wdims = rw.static_dims(w, n, 0)
    spatial = rw.static_dims(x, n, 2)
    r = len(wdims) - 2
    kernel = tuple(a.get("kernel_shape") or wdims[2:])
    strides = tuple(a.get("strides") or [1] * r)
    dilations = tuple(a.get("dilations") or [1] * r)
    pads = tuple(a.get("pads") or [0] * (2 * r))
    groups = int(a.get("group", 1))
    out_spatial = tuple((spatial[i] + pads[i] + pads[i + r] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
                        for i in range(r))
    return _ConvGeometry(groups, wdims[1], wdims[0] // groups, spatial, out_spatial, kernel, strides, dilations, pads)


def _pad_spatial(rw: _Rewriter, v: str, rank: int, first_spatial: int, geo: _ConvGeometry) -> str:
    """Zero-pad the spatial axes (first_spatial ..) of a rank-`rank` tensor by the conv's pads."""
    if not any(geo.pads):
        return v
    r = geo.rank
    begins = [0] * rank
    ends = [0] * rank
    for i in range(r):
        begins[first_spatial + i] = geo.pads[i]
        ends[first_spatial + i] = geo.pads[i + r]
    return rw.emit("Pad", [v, rw.ints(begins + ends)], mode="constant")


def _conv_dw_taps(rw: _Rewriter, dy: str, x: str, geo: _ConvGeometry, out: str) -> None:
    """dW as one product per kernel tap over a strided slice of the padded input.

    Depthwise (one input channel per group): Mul + ReduceSum in NCHW, no transposed copy.
    Otherwise: X to channels-last (g, N, *S, Ci), dY to (g, Co, N*h*w), one MatMul per tap
    contracting over N*h*w, Concat + Reshape to (C_out, Ci, *k).
    """
    r, g, ci, co = geo.rank, geo.groups, geo.in_per_group, geo.out_per_group
    spatial_axes = list(range(2, 2 + r))
    taps = []
    if ci == 1:
        xp = _pad_spatial(rw, x, 2 + r, 2, geo)
        dyr = dy if co == 1 else rw.emit("Reshape", [dy, rw.ints([0, g, co, *geo.out_spatial])])
        reduce_axes = rw.ints([0] + (spatial_axes if co == 1 else [a + 1 for a in spatial_axes]))
        for window in geo.tap_slices():
            xs = xp if window is None else rw.emit(
                "Slice", [xp, rw.ints(window[0]), rw.ints(window[1]), rw.ints(spatial_axes), rw.ints(geo.strides)])
            if co > 1:
                xs = rw.emit("Unsqueeze", [xs, rw.ints([2])])
            red = rw.emit("ReduceSum", [rw.emit("Mul", [xs, dyr]), reduce_axes], keepdims=0)   # (C) or (C, m)
            taps.append(rw.emit("Unsqueeze", [red, rw.ints([-1])]))
    else:
        npos = int(np.prod(geo.out_spatial))
        if g == 1:
            xt = rw.emit("Transpose", [x], perm=[0, *range(2, 2 + r), 1])                 # (N, *S, Ci)
            first, lead = 1, []
            dyt = rw.emit("Transpose", [rw.emit("Reshape", [dy, rw.ints([0, co, npos])])], perm=[1, 0, 2])
            dyt = rw.emit("Reshape", [dyt, rw.ints([co, -1])])                              # (Co, M)
        else:
            xg = rw.emit("Reshape", [x, rw.ints([0, g, ci, *geo.spatial])])
            xt = rw.emit("Transpose", [xg], perm=[1, 0, *range(3, 3 + r), 2])              # (g, N, *S, Ci)
            first, lead = 2, [g]
            dyt = rw.emit("Transpose", [rw.emit("Reshape", [dy, rw.ints([0, g, co, npos])])], perm=[1, 2, 0, 3])
            dyt = rw.emit("Reshape", [dyt, rw.ints([g, co, -1])])                           # (g, Co, M)
        xp = _pad_spatial(rw, xt, first + r + 1, first, geo)
        axes = rw.ints(range(first, first + r))
        for window in geo.tap_slices():
            xs = xp if window is None else rw.emit(
                "Slice", [xp, rw.ints(window[0]), rw.ints(window[1]), axes, rw.ints(geo.strides)])
            xs = rw.emit("Reshape", [xs, rw.ints(lead + [-1, ci])])                          # ([g,] M, Ci)
            taps.append(rw.emit("Unsqueeze", [rw.emit("MatMul", [dyt, xs]), rw.ints([-1])]))  # ([g,] Co, Ci, 1)
    cat = taps[0] if len(taps) == 1 else rw.emit("Concat", taps, axis=-1)
    rw.emit("Reshape", [cat, rw.ints([g * co, ci, *geo.kernel])], out)


def _conv_dw_conv(rw: _Rewriter, dy: str, x: str, geo: _ConvGeometry, out: str) -> None:
    """dW as a convolution of the input with dY: batch and channel axes swapped.

    Conv(X^T (Ci, g*N, *S), dY^T (g*Co, N, *s); strides=dilations, dilations=strides,
    group=g) gives (Ci, C_out, *k'), sliced to k and transposed to (C_out, Ci, *k).
    """
    r, g, ci, co = geo.rank, geo.groups, geo.in_per_group, geo.out_per_group
    swap = [1, 0, *range(2, 2 + r)]
    if g == 1:
        xt = rw.emit("Transpose", [x], perm=swap)
        dyt = rw.emit("Transpose", [dy], perm=swap)
    else:
        xg = rw.emit("Transpose", [rw.emit("Reshape", [x, rw.ints([0, g, ci, *geo.spatial])])], perm=[2, 1, 0, *range(3, 3 + r)])
        xt = rw.emit("Reshape", [xg, rw.ints([ci, -1, *geo.spatial])])
        dyg = rw.emit("Transpose", [rw.emit("Reshape", [dy, rw.ints([0, g, co, *geo.out_spatial])])], perm=[1, 2, 0, *range(3, 3 + r)])
        dyt = rw.emit("Reshape", [dyg, rw.ints([g * co, -1, *geo.out_spatial])])
    full = tuple((geo.spatial[i] + geo.pads[i] + geo.pads[i + r] - geo.strides[i] * (geo.out_spatial[i] - 1) - 1)
                 // geo.dilations[i] + 1 for i in range(r))
    c = rw.emit("Conv", [xt, dyt], strides=list(geo.dilations), dilations=list(geo.strides), pads=list(geo.pads),
                group=g, kernel_shape=list(geo.out_spatial))
    if full != geo.kernel:
        c = rw.emit("Slice", [c, rw.ints([0] * r), rw.ints(geo.kernel), rw.ints(range(2, 2 + r))])
    rw.emit("Transpose", [c], out, perm=swap)


def _conv_dw_flipped(rw: _Rewriter, dy: str, x: str, geo: _ConvGeometry, out: str) -> None:
    """dW straight out of one Conv, no weight-sized intermediate: dY and X channel-swapped and spatially flipped.

    For stride 1, dilation 1, one group: dW[co, ci, a] = sum_{n, i} dY[n, co, i] X[n, ci, i + a - pad_begin].
    A Conv whose input is flip(dY)^T (Co, N, *s) padded by (k-1-pad_end, k-1-pad_begin) and whose kernel
    is flip(X)^T (Ci, N, *S) computes exactly that, already in (C_out, Ci, *k) order, so the graph
    output (the bound gradient buffer) is the Conv's own output. The two flips and transposes copy
    activations, which is cheap where the weight is large and the activations small.
    """
    r = geo.rank
    swap = [1, 0, *range(2, 2 + r)]
    axes = rw.ints(range(2, 2 + r))
    first, last, back = rw.ints([-1] * r), rw.ints([np.iinfo(np.int64).min] * r), rw.ints([-1] * r)

    def flipped(v: str) -> str:
        return rw.emit("Slice", [rw.emit("Transpose", [v], perm=swap), first, last, axes, back])

    pads = [k - 1 - geo.pads[i + r] for i, k in enumerate(geo.kernel)] + \
           [k - 1 - geo.pads[i] for i, k in enumerate(geo.kernel)]
    rw.emit("Conv", [flipped(dy), flipped(x)], out, pads=pads, kernel_shape=list(geo.spatial))


def _flippable(geo: _ConvGeometry) -> bool:
    """The flipped form's conditions: one group, stride and dilation 1, no pad wider than the kernel minus one."""
    r = geo.rank
    return (geo.groups == 1 and all(s == 1 for s in geo.strides) and all(d == 1 for d in geo.dilations)
            and all(geo.pads[i] <= k - 1 and geo.pads[i + r] <= k - 1 for i, k in enumerate(geo.kernel)))


def _conv_dw_form(rw: _Rewriter, geo: _ConvGeometry):
    """The rewrite of dW this convolution gets (see ConvWeightGrad): "flipped" and "auto" fall back to taps
    where the flipped form does not apply; "auto" takes it only where the weight gradient is the larger
    buffer (C_out x prod(k) >= AUTO_FLIP_SAMPLES x prod(S): per input channel, the gradient against the
    input of that many samples)."""
    form = rw.conv_weight_grad
    if form in ("taps", "conv"):
        return _conv_dw_taps if form == "taps" else _conv_dw_conv
    heavy = geo.out_per_group * math.prod(geo.kernel) >= AUTO_FLIP_SAMPLES * math.prod(geo.spatial)
    return _conv_dw_flipped if _flippable(geo) and (form == "flipped" or heavy) else _conv_dw_taps


def _conv_grad(rw: _Rewriter, n: onnx.NodeProto) -> None:
    """ConvGrad(dY, X, W) -> dW (taps, conv or flipped form), dX (ConvTranspose), dB (ReduceSum).

    dW reads X through rw.after, so its copies of X are made once dY exists, not in the forward pass.
    """
    dy, x, w = n.input[:3]
    outs = list(n.output) + [""] * (3 - len(n.output))
    geo = _conv_geometry(rw, n, x, w)
    r = geo.rank
    if outs[1]:
        _conv_dw_form(rw, geo)(rw, dy, rw.after(x, dy), geo, outs[1])
    if outs[0]:
        rw.emit("ConvTranspose", [dy, w], outs[0], strides=list(geo.strides), pads=list(geo.pads),
                dilations=list(geo.dilations), group=geo.groups, kernel_shape=list(geo.kernel),
                output_padding=geo.output_padding())
    if outs[2]:
        rw.emit("ReduceSum", [dy, rw.ints([0, *range(2, 2 + r)])], outs[2], keepdims=0)


# --------------------------------------------------------------------------- pooling

def _pool_params(n: onnx.NodeProto, r: int) -> tuple[list[int], list[int], list[int], list[int]]:
    a = _attrs(n)
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", ""):
        raise UnsupportedOpError(n.op_type, n.name, "auto_pad other than NOTSET")
    kernel = list(a["kernel_shape"])
    return (kernel, list(a.get("strides") or [1] * r), list(a.get("dilations") or [1] * r),
            list(a.get("pads") or [0] * (2 * r)))


def _batch_channels_then(rw: _Rewriter, like: str, spatial: Sequence[int]) -> str:
    """Shape (N, C, *spatial) with N, C taken from `like` at run time: no forward tensor kept alive."""
    nc = rw.emit("Slice", [rw.emit("Shape", [like]), rw.ints([0]), rw.ints([2])])
    return rw.emit("Concat", [nc, rw.ints(spatial)], axis=0)


def _maxpool_grad(rw: _Rewriter, n: onnx.NodeProto) -> None:
    """MaxPoolGrad(dY, Indices): MaxUnpool when windows do not overlap, else ScatterElements(add).

    Overlapping windows can pick the same input twice, and MaxUnpool assigns instead of
    adding; ScatterElements with reduction='add' sums them (at the cost of a zero buffer).
    """
    dy, indices = n.input[:2]
    pool = rw.producer.get(indices)
    if pool is None or pool.op_type != "MaxPool" or len(pool.output) < 2 or pool.output[1] != indices:
        raise UnsupportedOpError(n.op_type, n.name, "its indices do not come from a MaxPool node")
    spatial = rw.static_dims(pool.input[0], n, 2)
    kernel, strides, dilations, pads = _pool_params(n, len(spatial))
    if _attrs(n).get("storage_order", 0):
        raise UnsupportedOpError(n.op_type, n.name, "storage_order=1 indices")
    shape = _batch_channels_then(rw, dy, spatial)
    overlap = any((k - 1) * d + 1 > s for k, d, s in zip(kernel, dilations, strides))
    if not overlap:
        rw.emit("MaxUnpool", [dy, indices, shape], n.output[0], kernel_shape=kernel, strides=strides, pads=pads)
        return
    zeros = rw.emit("ConstantOfShape", [rw.emit("ReduceProd", [shape], keepdims=1)],
                    value=numpy_helper.from_array(np.zeros(1, np.float32)))
    flat = rw.ints([-1])
    scattered = rw.emit("ScatterElements", [zeros, rw.emit("Reshape", [indices, flat]), rw.emit("Reshape", [dy, flat])],
                        axis=0, reduction="add")
    rw.emit("Reshape", [scattered, shape], n.output[0])


def _pool_output_size(size: int, k: int, s: int, pb: int, pe: int, ceil: bool) -> int:
    span = size + pb + pe - k
    return (-(-span // s) if ceil else span // s) + 1


def _avgpool_grad(rw: _Rewriter, n: onnx.NodeProto) -> None:
    """AveragePoolGrad(dY): ConvTranspose of dY with a ones kernel, one channel at a time.

    dY is viewed as (N*C, 1, *s) (a free reshape) so one (1, 1, *k) kernel serves every
    channel. Divisors: 1/K folded into the kernel, or, with count_include_pad=0 and pads,
    a constant map of 1/(valid elements per window) multiplied in first (exact, static).
    """
    a = _attrs(n)
    dy = n.input[0]
    keys = ("kernel_shape", "strides", "pads", "count_include_pad", "ceil_mode")
    pools = [p for p in rw.nodes_in if p.op_type == "AveragePool" and all(_attrs(p).get(k) == a.get(k) for k in keys)]
    named = [p for p in pools if p.input[0] + GRAD_SUFFIX == n.output[0]]
    pool = named[0] if named else (pools[0] if len(pools) == 1 else None)
    if pool is None:
        raise UnsupportedOpError(n.op_type, n.name, "cannot find the forward AveragePool it differentiates")
    spatial = rw.static_dims(pool.input[0], n, 2)
    r = len(spatial)
    kernel, strides, _, pads = _pool_params(n, r)
    out_spatial = [_pool_output_size(spatial[i], kernel[i], strides[i], pads[i], pads[i + r], False) for i in range(r)]
    if a.get("ceil_mode", 0) and out_spatial != [_pool_output_size(spatial[i], kernel[i], strides[i], pads[i], pads[i + r], True)
                                                 for i in range(r)]:
        raise UnsupportedOpError(n.op_type, n.name, "ceil_mode=1 adds a partial window (not rewritten)")
    window = int(np.prod(kernel))
    if a.get("count_include_pad", 0) or not any(pads):
        weight = np.full([1, 1, *kernel], 1.0 / window, np.float32)
        src = dy
    else:
        counts = np.ones([], np.float64)
        for i in range(r):
            starts = np.arange(out_spatial[i]) * strides[i] - pads[i]
            valid = np.minimum(starts + kernel[i], spatial[i]) - np.maximum(starts, 0)
            counts = np.multiply.outer(counts, valid)
        weight = np.ones([1, 1, *kernel], np.float32)
        src = rw.emit("Mul", [dy, rw.const((1.0 / counts).astype(np.float32))])
    flat = rw.emit("Reshape", [src, rw.ints([-1, 1, *out_spatial])])
    output_padding = [(spatial[i] + pads[i] + pads[i + r] - kernel[i]) % strides[i] for i in range(r)]
    spread = rw.emit("ConvTranspose", [flat, rw.const(weight)], strides=strides, pads=pads, kernel_shape=kernel,
                     output_padding=output_padding)
    rw.emit("Reshape", [spread, _batch_channels_then(rw, dy, spatial)], n.output[0])


# --------------------------------------------------------------------------- registry

_REWRITES: dict[tuple[str, str], Callable[[_Rewriter, onnx.NodeProto], None]] = {
    ("com.microsoft", "ReluGrad"): _relu_grad,
    ("com.microsoft", "LeakyReluGrad"): _leaky_relu_grad,
    ("com.microsoft", "SigmoidGrad"): _sigmoid_grad,
    ("com.microsoft", "TanhGrad"): _tanh_grad,
    ("com.microsoft", "SoftmaxGrad_13"): _softmax_grad,
    ("com.microsoft", "LogSoftmaxGrad_13"): _log_softmax_grad,
    ("com.microsoft", "Gelu"): _gelu,
    ("com.microsoft", "GeluGrad"): _gelu_grad,
    ("com.microsoft", "QuickGelu"): _quick_gelu,
    ("com.microsoft", "QuickGeluGrad"): _quick_gelu_grad,
    ("com.microsoft", "DropoutGrad"): _dropout_grad,
    ("com.microsoft", "Scale"): _scale,
    ("com.microsoft", "DivGrad"): _div_grad,
    ("com.microsoft", "ConcatTraining"): _concat_training,
    ("com.microsoft", "FusedMatMul"): _fused_matmul,
    ("com.microsoft", "SoftmaxCrossEntropyLossGrad"): _softmax_ce_grad,
    ("com.microsoft", "InPlaceAccumulatorV2"): _accumulator,
    ("com.microsoft", "BatchNormInternal"): _batchnorm_train,
    ("com.microsoft", "BatchNormalizationGrad"): _batchnorm_grad,
    ("com.microsoft", "LayerNormalizationGrad"): _layernorm_grad,
    ("com.microsoft", "ConvGrad"): _conv_grad,
    ("", "MaxPoolGrad"): _maxpool_grad,        # onnxruntime registers these two in the default
    ("", "AveragePoolGrad"): _avgpool_grad,    # domain, but they are not ONNX operators
}

_STANDARD_REWRITES: dict[str, Callable[[_Rewriter, onnx.NodeProto], None]] = {
    "BatchNormalization": _batchnorm_train,
}

SUPPORTED_TRAINING_OPS: tuple[str, ...] = tuple(sorted(op for _, op in _REWRITES))
