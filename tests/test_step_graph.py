"""Parity tests for coordinator/model/step_graph.py: each rewrite against onnxruntime-training's own kernel,
and whole parts against torch autograd (float64) and the onnxruntime-training 1.19.2 session.

The gradient builder and onnxruntime-training's kernels live only in a child process whose path puts
the builder's folder first (coordinator/model/part_graphs.py); the test process has the maintained
onnxruntime (1.32), which runs every rewritten graph, as a device would. Builder work is batched: one
child for all op-level kernels, one for every part-level build and session, one for the other builds
(tests/step_graph_harness.py); the device-side read of the interface starts one more, with neither
onnx nor torch importable. A missing builder fails every test that needs it, naming tools/bootstrap.sh.

Tolerance: |a - e| <= 1e-4 * max|e| + 1e-6 * G, where G is the largest gradient of the step (for op
tests: the largest reference output). The second term is the float32 floor: a parameter the loss is
almost invariant to (a conv bias feeding a BatchNorm, the scale of a BatchNorm followed by another
one) has a gradient made of cancelling terms, and onnxruntime-training and torch float32 miss the
float64 value by the same amount.
"""
from __future__ import annotations

import copy
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
import step_graph_harness as H
import torch
from onnx import TensorProto, helper, numpy_helper
from step_graph_harness import assert_close
from torch import nn

from coordinator.model import step_graph as sg
from coordinator.model import zoo


@pytest.fixture(scope="module", autouse=True)
def floor_report():
    """Which comparisons needed the float32 floor (shown with -s or -rA)."""
    yield
    if H.FLOOR_USED:
        print(f"\n{len(H.FLOOR_USED)} compared tensors needed the float32 floor: {H.FLOOR_USED}")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The parts are tiny: on two loaded cores torch's second thread only waits (a BatchNorm of a few
    kilobytes took 13 ms). Restored afterwards for the other modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rng(key: str) -> np.random.RandomState:
    """Each case's own generator: its data do not depend on which other tests run."""
    return np.random.RandomState(zlib.crc32(key.encode()))


# =========================================================================== op-level parity

def _vi(name: str, arr: np.ndarray) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape))


def op_model(nodes: list[onnx.NodeProto], feeds: dict[str, np.ndarray], outputs: list[str],
             inits: dict[str, np.ndarray] | None = None,
             shapes: dict[str, tuple[int, ...]] | None = None) -> onnx.ModelProto:
    """A graph of training ops as onnxruntime-training writes them (default + com.microsoft).

    Output shapes are optional, except where onnxruntime-training crashes without them
    (MaxPoolGrad has no shape inference; an unshaped graph output segfaults session creation).
    """
    shapes = shapes or {}
    graph = helper.make_graph(nodes, "op", [_vi(k, v) for k, v in feeds.items()],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, shapes.get(o)) for o in outputs],
                              [numpy_helper.from_array(v, k) for k, v in (inits or {}).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


def ms(op: str, inputs: list[str], outputs: list[str], **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, outputs, name=op.lower(), domain="com.microsoft", **attrs)


def std(op: str, inputs: list[str], outputs: list[str], **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, outputs, name=f"{op.lower()}_fwd_{outputs[0]}", **attrs)


def randn(rs: np.random.RandomState, *shape: int) -> np.ndarray:
    return rs.randn(*shape).astype(np.float32)


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)


@dataclass
class OpCase:
    """A graph of training ops and its feeds; `skip`: outputs not compared with the kernel."""
    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    skip: tuple[str, ...] = ()


# Every op case by key. The kernels fixture runs them all in one builder child; each test rewrites its
# case, runs the rewrite on onnxruntime 1.32 and compares with the kernel's outputs.
OP_CASES: dict[str, Callable[[np.random.RandomState], OpCase]] = {}

ELEMENTWISE = {
    "ReluGrad": ({}, lambda rs: {"dy": randn(rs, 4, 3, 5, 5), "x": randn(rs, 4, 3, 5, 5)}),
    "LeakyReluGrad": ({"alpha": 0.2}, lambda rs: {"dy": randn(rs, 4, 7), "x": randn(rs, 4, 7)}),
    "SigmoidGrad": ({}, lambda rs: {"dy": randn(rs, 4, 7), "x": 1 / (1 + np.exp(-randn(rs, 4, 7)))}),
    "TanhGrad": ({}, lambda rs: {"dy": randn(rs, 4, 7), "x": np.tanh(randn(rs, 4, 7))}),
    "GeluGrad": ({}, lambda rs: {"dy": randn(rs, 4, 7), "x": 3 * randn(rs, 4, 7)}),
    "QuickGeluGrad": ({"alpha": 1.702}, lambda rs: {"dy": randn(rs, 4, 7), "x": 3 * randn(rs, 4, 7)}),
    "SoftmaxGrad_13": ({"axis": -1}, lambda rs: {"dy": randn(rs, 2, 3, 7), "x": _softmax(randn(rs, 2, 3, 7), -1)}),
    "LogSoftmaxGrad_13": ({"axis": 1},
                          lambda rs: {"dy": randn(rs, 2, 3, 7), "x": np.log(_softmax(randn(rs, 2, 3, 7), 1))}),
}


def _elementwise(op: str) -> Callable[[np.random.RandomState], OpCase]:
    def make(rs):
        attrs, data = ELEMENTWISE[op]
        feeds = data(rs)
        return OpCase(op_model([ms(op, ["dy", "x"], ["dx"], **attrs)], feeds, ["dx"]), feeds)
    return make


for _op in ELEMENTWISE:
    OP_CASES[_op] = _elementwise(_op)

FORWARD_ACTIVATIONS = {"Gelu": ("Gelu", None), "QuickGelu-1.702": ("QuickGelu", 1.702),
                       "QuickGelu-1": ("QuickGelu", 1.0)}


def _forward_activation(key: str) -> Callable[[np.random.RandomState], OpCase]:
    def make(rs):
        op, alpha = FORWARD_ACTIVATIONS[key]
        feeds = {"x": 3 * randn(rs, 4, 9)}
        attrs = {} if alpha is None else {"alpha": alpha}
        return OpCase(op_model([ms(op, ["x"], ["y"], **attrs)], feeds, ["y"]), feeds)
    return make


for _key in FORWARD_ACTIVATIONS:
    OP_CASES[_key] = _forward_activation(_key)


def _scale(scale_down: int) -> Callable[[np.random.RandomState], OpCase]:
    def make(rs):
        feeds = {"x": randn(rs, 3, 4)}
        return OpCase(op_model([ms("Scale", ["x", "s"], ["y"], scale_down=scale_down)], feeds, ["y"],
                               {"s": np.array(16.0, np.float32)}), feeds)
    return make


for _down in (0, 1):
    OP_CASES[f"Scale-down{_down}"] = _scale(_down)


def _dropout_grad(rs) -> OpCase:
    feeds = {"dy": randn(rs, 5, 6), "mask": rs.rand(5, 6) > 0.3}
    inits = {"ratio": np.array(0.3, np.float32), "training": np.array(True)}
    return OpCase(op_model([ms("DropoutGrad", ["dy", "mask", "ratio", "training"], ["dx"])], feeds, ["dx"], inits),
                  feeds)


OP_CASES["DropoutGrad"] = _dropout_grad

FUSED_MATMUL = {
    "2d-transB-alpha": (((4, 6), (5, 6)), {"transB": 1, "alpha": 0.5}),    # 2-D: Gemm flags, no transposed copy
    "2d-transA": (((6, 4), (6, 5)), {"transA": 1}),
    "batched-transB": (((2, 4, 6), (2, 5, 6)), {"transB": 1}),
    "batched-transA-alpha": (((2, 6, 4), (2, 6, 5)), {"transA": 1, "alpha": 2.0}),
    "batched-by-2d": (((2, 4, 6), (6, 5)), {}),
}


def _fused_matmul(key: str) -> Callable[[np.random.RandomState], OpCase]:
    def make(rs):
        shapes, attrs = FUSED_MATMUL[key]
        feeds = {"a": randn(rs, *shapes[0]), "b": randn(rs, *shapes[1])}
        return OpCase(op_model([ms("FusedMatMul", ["a", "b"], ["y"], **attrs)], feeds, ["y"]), feeds)
    return make


for _key in FUSED_MATMUL:
    OP_CASES[f"FusedMatMul-{_key}"] = _fused_matmul(_key)


def _softmax_cross_entropy_grad(reduction: str) -> Callable[[np.random.RandomState], OpCase]:
    def make(rs):
        logits = randn(rs, 6, 5)
        log_prob = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        feeds = {"dloss": np.array(0.25, np.float32), "log_prob": log_prob.astype(np.float32),
                 "labels": rs.randint(0, 5, 6).astype(np.int64)}
        node = ms("SoftmaxCrossEntropyLossGrad", ["dloss", "log_prob", "labels"], ["dx"], reduction=reduction)
        return OpCase(op_model([node], feeds, ["dx"]), feeds)
    return make


for _reduction in ("sum", "mean"):
    OP_CASES[f"SoftmaxCrossEntropyLossGrad-{_reduction}"] = _softmax_cross_entropy_grad(_reduction)


def _batchnorm_internal(rs) -> OpCase:
    """running_var is skipped: the kernel uses the biased batch variance, the rewrite torch's unbiased one."""
    inits = {"scale": randn(rs, 3), "bias": randn(rs, 3), "mean": randn(rs, 3), "var": np.abs(randn(rs, 3)) + 0.5}
    feeds = {"x": randn(rs, 6, 3, 4, 4) * 2 + 1}
    node = ms("BatchNormInternal", ["x", "scale", "bias", "mean", "var"], ["y", "rm", "rv", "sm", "si"],
              epsilon=1e-5, momentum=0.9, training_mode=1)
    return OpCase(op_model([node], feeds, ["y", "rm", "rv", "sm", "si"], inits), feeds, skip=("rv",))


OP_CASES["BatchNormInternal"] = _batchnorm_internal


def _batchnorm_statistics_inside(rs) -> OpCase:
    inits = {"scale": randn(rs, 8), "bias": randn(rs, 8), "mean": randn(rs, 8), "var": np.abs(randn(rs, 8)) + 0.5,
             "one": np.array(1.0, np.float32)}
    nodes = [ms("BatchNormInternal", ["x", "scale", "bias", "mean", "var"], ["y", "rm", "rv", "sm", "si"],
                epsilon=1e-5, momentum=0.9, training_mode=1),
             std("Mul", ["sm", "one"], ["sm_used"]), std("Mul", ["si", "one"], ["si_used"])]
    feeds = {"x": randn(rs, 6, 8, 5, 5) * 2 + 1}
    return OpCase(op_model(nodes, feeds, ["y", "sm_used", "si_used"], inits), feeds)


OP_CASES["BatchNormInternal-8ch-statistics-used-inside"] = _batchnorm_statistics_inside


def _batchnorm_grad(rs) -> OpCase:
    x = randn(rs, 6, 3, 4, 4) * 2 + 1
    batch = x.transpose(1, 0, 2, 3).reshape(3, -1)
    feeds = {"dy": randn(rs, 6, 3, 4, 4), "x": x, "scale": randn(rs, 3), "mean": batch.mean(1),
             "inv_std": (1 / np.sqrt(batch.var(1) + 1e-5)).astype(np.float32)}
    node = ms("BatchNormalizationGrad", ["dy", "x", "scale", "mean", "inv_std"], ["dx", "dscale", "dbias"],
              epsilon=1e-5)
    return OpCase(op_model([node], feeds, ["dx", "dscale", "dbias"]), feeds)


OP_CASES["BatchNormalizationGrad"] = _batchnorm_grad

LAYERNORM = {"5x8-axis-1": ((5, 8), -1), "2x3x8-axis-1": ((2, 3, 8), -1), "2x3x4-axis1": ((2, 3, 4), 1)}


def _layernorm_grad(key: str) -> Callable[[np.random.RandomState], OpCase]:
    def make(rs):
        shape, axis = LAYERNORM[key]
        normalized = shape[axis % len(shape):]
        feeds = {"x": randn(rs, *shape) * 2 + 0.5, "dy": randn(rs, *shape)}
        inits = {"scale": randn(rs, *normalized), "bias": randn(rs, *normalized)}
        nodes = [std("LayerNormalization", ["x", "scale", "bias"], ["y", "mean", "inv"], axis=axis, epsilon=1e-5),
                 ms("LayerNormalizationGrad", ["dy", "x", "scale", "mean", "inv"], ["dx", "dscale", "dbias"],
                    axis=axis, epsilon=1e-5)]
        return OpCase(op_model(nodes, feeds, ["y", "dx", "dscale", "dbias"], inits), feeds)
    return make


for _key in LAYERNORM:
    OP_CASES[f"LayerNormalizationGrad-{_key}"] = _layernorm_grad(_key)


@dataclass(frozen=True)
class ConvCase:
    cin: int
    cout: int
    kernel: tuple[int, ...]
    spatial: tuple[int, ...]
    stride: int = 1
    pads: tuple[int, ...] | None = None
    dilation: int = 1
    group: int = 1

    def __str__(self) -> str:
        return (f"c{self.cin}-{self.cout}_k{'x'.join(map(str, self.kernel))}_s{self.stride}_p{self.pads}"
                f"_d{self.dilation}_g{self.group}_{'x'.join(map(str, self.spatial))}").replace(" ", "")


CONV_CASES = [
    ConvCase(3, 5, (3, 3), (8, 8), pads=(1, 1, 1, 1)),
    ConvCase(3, 5, (3, 3), (9, 9), stride=2, pads=(1, 1, 1, 1)),           # output_padding = 0
    ConvCase(3, 5, (3, 3), (8, 8), stride=2, pads=(1, 1, 1, 1)),           # output_padding = 1
    ConvCase(4, 6, (3, 3), (9, 9), stride=2, pads=(2, 2, 2, 2), dilation=2),
    ConvCase(2, 4, (1, 1), (6, 6)),
    ConvCase(3, 4, (3, 2), (7, 6), pads=(1, 0, 2, 1)),                      # asymmetric pads and kernel
    ConvCase(4, 6, (3, 3), (7, 7), pads=(1, 1, 1, 1), group=2),            # grouped
    ConvCase(6, 6, (3, 3), (7, 7), pads=(1, 1, 1, 1), group=6),            # depthwise
    ConvCase(4, 8, (3, 3), (8, 8), stride=2, pads=(1, 1, 1, 1), group=4),  # depthwise, multiplier 2
    ConvCase(3, 4, (3,), (10,), pads=(1, 1)),                              # Conv1d
    ConvCase(4, 64, (3, 3), (2, 2), pads=(1, 1, 1, 1)),                    # weight > 128 samples' input: auto flips
    ConvCase(2, 3, (3, 2), (5, 4), pads=(2, 0, 1, 1)),                     # pads up to k-1, asymmetric, flippable
]


def _conv_grad(case: ConvCase) -> Callable[[np.random.RandomState], OpCase]:
    def make(rs):
        r = len(case.kernel)
        attrs = {"kernel_shape": list(case.kernel), "strides": [case.stride] * r, "dilations": [case.dilation] * r,
                 "pads": list(case.pads or [0] * 2 * r), "group": case.group}
        x = randn(rs, 3, case.cin, *case.spatial)
        w = randn(rs, case.cout, case.cin // case.group, *case.kernel)
        out_spatial = [(s + p0 + p1 - case.dilation * (k - 1) - 1) // case.stride + 1
                       for s, k, p0, p1 in zip(case.spatial, case.kernel, attrs["pads"][:r], attrs["pads"][r:])]
        feeds = {"dy": randn(rs, 3, case.cout, *out_spatial), "x": x, "w": w}
        return OpCase(op_model([ms("ConvGrad", ["dy", "x", "w"], ["dx", "dw", "db"], **attrs)], feeds,
                               ["dx", "dw", "db"]), feeds)
    return make


for _case in CONV_CASES:     # one kernel run serves both dW forms
    OP_CASES[f"ConvGrad-{_case}"] = _conv_grad(_case)

MAXPOOL = [(2, 2, 0), (3, 2, 1), (3, 1, 1), (2, 1, 0)]     # kernel, stride, pads


def _maxpool_grad(kernel: int, stride: int, pads: int) -> Callable[[np.random.RandomState], OpCase]:
    def make(rs):
        x = randn(rs, 3, 4, 9, 9)
        attrs = {"kernel_shape": [kernel] * 2, "strides": [stride] * 2, "pads": [pads] * 4}
        out = (9 + 2 * pads - kernel) // stride + 1
        feeds = {"x": x, "dy": randn(rs, 3, 4, out, out)}
        nodes = [std("MaxPool", ["x"], ["y", "idx"], **attrs),
                 helper.make_node("MaxPoolGrad", ["dy", "idx"], ["x_grad"], name="maxpoolgrad", **attrs)]
        return OpCase(op_model(nodes, feeds, ["y", "x_grad"], shapes={"y": feeds["dy"].shape, "x_grad": x.shape}),
                      feeds)
    return make


for _k, _s, _p in MAXPOOL:
    OP_CASES[f"MaxPoolGrad-k{_k}s{_s}p{_p}"] = _maxpool_grad(_k, _s, _p)

AVGPOOL = [(2, 2, 0, 1), (3, 2, 1, 1), (3, 2, 1, 0), (3, 1, 1, 0), (2, 3, 0, 0)]   # kernel, stride, pads, include_pad


def _avgpool_grad(kernel: int, stride: int, pads: int, include_pad: int) -> Callable[[np.random.RandomState], OpCase]:
    def make(rs):
        attrs = {"kernel_shape": [kernel] * 2, "strides": [stride] * 2, "pads": [pads] * 4,
                 "count_include_pad": include_pad}
        out = (9 + 2 * pads - kernel) // stride + 1
        feeds = {"x": randn(rs, 3, 4, 9, 9), "dy": randn(rs, 3, 4, out, out)}
        nodes = [std("AveragePool", ["x"], ["y"], **attrs),
                 helper.make_node("AveragePoolGrad", ["dy"], ["x_grad"], name="avgpoolgrad", **attrs)]
        shapes = {"y": feeds["dy"].shape, "x_grad": feeds["x"].shape}
        return OpCase(op_model(nodes, feeds, ["y", "x_grad"], shapes=shapes), feeds)
    return make


for _k, _s, _p, _i in AVGPOOL:
    OP_CASES[f"AveragePoolGrad-k{_k}s{_s}p{_p}i{_i}"] = _avgpool_grad(_k, _s, _p, _i)


@dataclass
class Kernels:
    cases: dict[str, OpCase]
    results: H.BuilderResults


@pytest.fixture(scope="module")
def kernels() -> Kernels:
    """Every op case, run on onnxruntime-training's own kernels in one builder child."""
    cases = {key: make(rng(key)) for key, make in OP_CASES.items()}
    return Kernels(cases, H.run_builder({key: H.kernel_job(c.model, c.feeds) for key, c in cases.items()}))


def check_op(kernels: Kernels, key: str, conv_weight_grad: sg.ConvWeightGrad = "taps") -> dict[str, np.ndarray]:
    """The reference kernel (onnxruntime-training 1.19.2) vs the rewrite on onnxruntime 1.32."""
    case = kernels.cases[key]
    ref = kernels.results.value(key)
    rewritten = sg.rewrite_to_standard(case.model, conv_weight_grad)
    sg.validate_step_graph(rewritten)
    assert {n.domain for n in rewritten.graph.node} <= {""}
    got = H.run_standard(rewritten, case.feeds)
    scale = max(float(np.max(np.abs(v))) for k, v in ref.items() if k not in case.skip and v.dtype.kind == "f")
    for name, value in ref.items():
        if name not in case.skip:
            assert_close(got[name], value, f"{key}:{name}", scale)
    return got


@pytest.mark.parametrize("op", sorted(ELEMENTWISE))
def test_elementwise_grad_ops(kernels, op):
    check_op(kernels, op)


@pytest.mark.parametrize("key", list(FORWARD_ACTIVATIONS))
def test_forward_activation_ops(kernels, key):
    check_op(kernels, key)


@pytest.mark.parametrize("scale_down", [0, 1])
def test_scale(kernels, scale_down):
    check_op(kernels, f"Scale-down{scale_down}")


def test_dropout_grad(kernels):
    check_op(kernels, "DropoutGrad")


def test_dropout_grad_not_training_is_identity():
    """Not training, Dropout is the identity, so is its gradient. (onnxruntime-training's kernel
    ignores training_mode and still scales by 1/(1-ratio); the recipe always exports training=True.)"""
    rs = rng("DropoutGrad-not-training")
    feeds = {"dy": randn(rs, 5, 6), "mask": np.ones((5, 6), bool)}
    inits = {"ratio": np.array(0.5, np.float32), "training": np.array(False)}
    model = op_model([ms("DropoutGrad", ["dy", "mask", "ratio", "training"], ["dx"])], feeds, ["dx"], inits)
    got = H.run_standard(sg.rewrite_to_standard(model), feeds)
    np.testing.assert_array_equal(got["dx"], feeds["dy"])


@pytest.mark.parametrize("key", list(FUSED_MATMUL))
def test_fused_matmul(kernels, key):
    check_op(kernels, f"FusedMatMul-{key}")


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_softmax_cross_entropy_grad(kernels, reduction):
    check_op(kernels, f"SoftmaxCrossEntropyLossGrad-{reduction}")


def test_batchnorm_internal(kernels):
    """Y, saved mean and inverse deviation match the kernel; running_mean too.

    onnxruntime's kernel updates running_var with the biased batch variance (the ONNX rule);
    the rewrite follows torch (unbiased), checked against numpy here.
    """
    got = check_op(kernels, "BatchNormInternal")
    case = kernels.cases["BatchNormInternal"]
    var = numpy_helper.to_array(next(t for t in case.model.graph.initializer if t.name == "var"))
    batch = case.feeds["x"].transpose(1, 0, 2, 3).reshape(3, -1).astype(np.float64)
    expected_rv = 0.9 * var + 0.1 * batch.var(1, ddof=1)
    assert_close(got["rv"], expected_rv, "BatchNormInternal:running_var(unbiased)", 1.0)


def test_batchnorm_statistics_used_inside_the_graph(kernels):
    """Regression: the batch statistics feed further nodes (not graph outputs) in an 8-channel BN.

    onnxruntime 1.32 returns the variance as the mean when one buffer feeds a training-mode
    BatchNormalization's mean and variance inputs, and only when those outputs are consumed
    inside the graph; its ConstantSharing pass makes one buffer of equal zero initializers of
    <= 8 elements. Graph outputs hide the bug, so they are consumed here by a Mul.
    """
    check_op(kernels, "BatchNormInternal-8ch-statistics-used-inside")


def test_batchnorm_grad(kernels):
    check_op(kernels, "BatchNormalizationGrad")


@pytest.mark.parametrize("key", list(LAYERNORM))
def test_layernorm_grad(kernels, key):
    check_op(kernels, f"LayerNormalizationGrad-{key}")


@pytest.mark.parametrize("form", ["taps", "conv", "flipped"])
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv_grad(kernels, case, form):
    check_op(kernels, f"ConvGrad-{case}", conv_weight_grad=form)


def _dw_producer(model, case: ConvCase) -> str:
    """The operator that writes dW in a rewritten ConvGrad case."""
    return next(n.op_type for n in model.graph.node if "dw" in n.output)


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv_grad_form_choice(kernels, case):
    """"flipped" writes dW with the one Conv wherever the form applies (stride and dilation 1, one group), so no
    weight-sized buffer precedes the output; "auto" does so only where the weight outweighs 128 samples' input,
    and is the default."""
    model = kernels.cases[f"ConvGrad-{case}"].model
    flippable = case.stride == 1 and case.dilation == 1 and case.group == 1
    heavy = case.cout * math.prod(case.kernel) >= sg.AUTO_FLIP_SAMPLES * math.prod(case.spatial)
    assert _dw_producer(sg.rewrite_to_standard(model, "flipped"), case) == ("Conv" if flippable else "Reshape")
    auto = _dw_producer(sg.rewrite_to_standard(model, "auto"), case)
    assert auto == ("Conv" if flippable and heavy else "Reshape")
    assert _dw_producer(sg.rewrite_to_standard(model), case) == auto


def test_conv_grad_form_refused(kernels):
    model = kernels.cases[f"ConvGrad-{CONV_CASES[0]}"].model
    with pytest.raises(sg.StepGraphError, match="conv_weight_grad must be one of auto, taps, conv, flipped"):
        sg.rewrite_to_standard(model, "im2col")


@pytest.mark.parametrize("kernel,stride,pads", MAXPOOL)
def test_maxpool_grad(kernels, kernel, stride, pads):
    key = f"MaxPoolGrad-k{kernel}s{stride}p{pads}"
    rewritten = sg.rewrite_to_standard(kernels.cases[key].model)
    expected_op = "MaxUnpool" if kernel <= stride else "ScatterElements"
    assert expected_op in {n.op_type for n in rewritten.graph.node}
    check_op(kernels, key)


@pytest.mark.parametrize("kernel,stride,pads,include_pad", AVGPOOL)
def test_avgpool_grad(kernels, kernel, stride, pads, include_pad):
    check_op(kernels, f"AveragePoolGrad-k{kernel}s{stride}p{pads}i{include_pad}")


# =========================================================================== part-level parity

def conv_relu(cin: int, cout: int, pool: bool, stride: int = 1) -> nn.Module:
    layers = [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def gap_head(channels: int, classes: int) -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))


class Residual(nn.Module):
    """relu(x + body(x)), as in the project's zoo."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x):
        return torch.relu(x + self.body(x))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, BN, ReLU6, depthwise 3x3, BN, ReLU6, 1x1 project, BN (+ x)."""

    def __init__(self, cin: int, cout: int, expand: int, stride: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.body = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MlpBlock(nn.Module):
    """Pre-norm transformer-style MLP block: x + W2 GELU(W1 LN(x)), then LN."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self.out_norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.out_norm(x + self.fc2(self.act(self.fc1(self.norm(x)))))


class TinyAttention(nn.Module):
    """Single-head self-attention over tokens (MatMul, Softmax, Scale in the backward)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        att = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) / x.shape[-1] ** 0.5, dim=-1)
        return self.norm(x + att @ self.v(x)).mean(1)


def residual_body(channels: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(channels, channels, 3, padding=1))


@dataclass
class Part:
    """A torch part, which of its parameters train (prefixes of their names; None: all), and an input shape."""
    module: nn.Module
    input_shape: tuple[int, ...]
    trainable_prefixes: tuple[str, ...] | None = None
    classes: int = 5
    batch: int = 6
    # onnxruntime-training 1.19.2 dies (SIGFPE) in AveragePoolGrad when the batch is dynamic:
    # its session then runs on a static-batch copy of the same forward graph
    baseline_static_batch: bool = False
    trainable: list[str] = field(init=False)
    frozen: list[str] = field(init=False)

    def __post_init__(self) -> None:
        with torch.no_grad():   # LazyLinear needs one call to get its shape
            self.module(torch.zeros(2, *self.input_shape))
        names = [n for n, _ in self.module.named_parameters()]
        self.trainable = [n for n in names if self.trainable_prefixes is None or n.startswith(self.trainable_prefixes)]
        self.frozen = [n for n in names if n not in self.trainable]


@dataclass(frozen=True)
class PartCase:
    make: Callable[[], Part]          # called with torch seeded at 0
    forms: tuple[str, ...] = ("taps",)


PARTS = {
    # the zoo's fmnist_cnn, cut as the product cuts it (layer + its head)
    "fmnist_layer0": PartCase(lambda: Part(nn.Sequential(conv_relu(1, 32, True), gap_head(32, 10)), (1, 28, 28),
                                           classes=10), ("taps", "conv")),
    "fmnist_layers1-2": PartCase(lambda: Part(nn.Sequential(conv_relu(32, 64, False), conv_relu(64, 64, True),
                                                            gap_head(64, 10)), (32, 14, 14), classes=10),
                                 ("taps", "conv")),
    "fmnist_layer4": PartCase(lambda: Part(nn.Sequential(nn.Flatten(), nn.Linear(128 * 3 * 3, 256), nn.ReLU(),
                                                         nn.Linear(256, 10)), (128, 3, 3), classes=10)),
    "residual": PartCase(lambda: Part(nn.Sequential(Residual(residual_body(16)), gap_head(16, 5)), (16, 8, 8)),
                         ("taps", "conv", "flipped")),
    "residual_stride2": PartCase(lambda: Part(nn.Sequential(conv_relu(8, 16, False, stride=2),
                                                            Residual(residual_body(16)), gap_head(16, 5)), (8, 9, 9)),
                                 ("taps", "conv", "flipped")),
    "mobilenetv2_block": PartCase(lambda: Part(nn.Sequential(InvertedResidual(8, 8, 4, 1), gap_head(8, 5)), (8, 8, 8)),
                                  ("taps", "conv")),
    "mobilenetv2_stride2": PartCase(lambda: Part(nn.Sequential(InvertedResidual(8, 12, 3, 2),
                                                               InvertedResidual(12, 12, 2, 1), gap_head(12, 5)),
                                                 (8, 9, 9), batch=8)),
    "gelu_layernorm_mlp": PartCase(lambda: Part(nn.Sequential(MlpBlock(16, 32), nn.Linear(16, 5)), (16,))),
    "gelu_layernorm_tokens": PartCase(lambda: Part(nn.Sequential(MlpBlock(8, 16), nn.Flatten(), nn.Linear(4 * 8, 5)),
                                                   (4, 8))),
    "attention": PartCase(lambda: Part(nn.Sequential(TinyAttention(8), nn.Linear(8, 5)), (4, 8))),
    # the zoo's vit_cifar, narrower: an encoder layer (multi-head attention, GELU MLP, pre-norm) and its token head
    "vit_layer": PartCase(lambda: Part(nn.Sequential(zoo._TransformerLayer(16, 2, 32), zoo._TokenHead(16, 5)), (8, 16))),
    "vit_patches": PartCase(lambda: Part(nn.Sequential(zoo._PatchEmbedding(3, 8, 4, 16), zoo._TokenHead(16, 5)),
                                         (3, 8, 8)), ("taps", "flipped")),
    "sigmoid_tanh_avgpool": PartCase(lambda: Part(nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.Sigmoid(), nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
        nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(6 * 2 * 2, 5), nn.Softmax(dim=-1)),
        (3, 9, 9), baseline_static_batch=True)),
    "silu_leaky_logsoftmax": PartCase(lambda: Part(nn.Sequential(
        nn.Linear(10, 16), nn.SiLU(), nn.Linear(16, 16), nn.LeakyReLU(0.1), nn.Linear(16, 5), nn.LogSoftmax(dim=-1)),
        (10,))),
    "grouped_dilated_conv1d": PartCase(lambda: Part(nn.Sequential(
        nn.Conv1d(4, 8, 3, padding=2, dilation=2), nn.ReLU(), nn.Conv1d(8, 8, 3, stride=2, groups=2), nn.ReLU(),
        nn.MaxPool1d(3, stride=2, padding=1), nn.Flatten(), nn.LazyLinear(5)), (4, 16)), ("taps", "conv")),
    "overlapping_maxpool": PartCase(lambda: Part(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1), gap_head(8, 5)), (3, 9, 9))),
}

# layer sets with frozen layers, compared in the same way
FROZEN_PARTS = {
    "frozen_prefix": PartCase(lambda: Part(nn.Sequential(conv_relu(32, 64, False), conv_relu(64, 64, True),
                                                         gap_head(64, 10)), (32, 14, 14), ("1.",), classes=10)),
    # the gradient must flow through frozen convs (dX only, no dW) and a frozen head
    "frozen_after_trainable": PartCase(lambda: Part(nn.Sequential(conv_relu(8, 16, False), conv_relu(16, 16, True),
                                                                  conv_relu(16, 16, False), gap_head(16, 5)),
                                                    (8, 10, 10), ("0.",)), ("taps", "conv")),
    "mobilenet_depthwise_only": PartCase(lambda: Part(nn.Sequential(InvertedResidual(8, 8, 4, 1), gap_head(8, 5)),
                                                      (8, 8, 8), ("0.body.3.weight",))),
    "frozen_body_head_only": PartCase(lambda: Part(nn.Sequential(MlpBlock(16, 32), nn.Linear(16, 5)), (16,), ("1.",))),
}


@dataclass
class PreparedPart:
    """A part exported, with its weights and one batch; its step graphs and session step come from the builder."""
    part: Part
    forward: onnx.ModelProto
    weights: dict[str, np.ndarray]
    x: np.ndarray
    labels: np.ndarray
    results: H.BuilderResults | None = None

    @property
    def loss_scale(self) -> float:
        return 1.0 / self.part.batch


def prepare(case: PartCase, seed: int = 0) -> PreparedPart:
    torch.manual_seed(0)
    part = case.make()
    rs = np.random.RandomState(seed)
    x = rs.randn(part.batch, *part.input_shape).astype(np.float32)
    labels = rs.randint(0, part.classes, part.batch).astype(np.int64)
    return PreparedPart(part, H.export_forward(part.module, part.input_shape), H.state_arrays(part.module), x, labels)


@pytest.fixture(scope="module")
def parts() -> dict[str, PreparedPart]:
    """Every part's step graphs (each dW form it is tested with) and one onnxruntime-training session step,
    in one builder child."""
    prepared, jobs = {}, {}
    for name, case in {**PARTS, **FROZEN_PARTS}.items():
        p = prepared[name] = prepare(case)
        for form in case.forms:
            jobs[f"{name}/step/{form}"] = H.build_job(p.forward, p.part.trainable, p.part.frozen, form)
        baseline = p.forward
        if p.part.baseline_static_batch:
            baseline = copy.deepcopy(p.forward)
            for vi in list(baseline.graph.input) + list(baseline.graph.output):
                vi.type.tensor_type.shape.dim[0].dim_value = p.part.batch
        jobs[f"{name}/session"] = H.session_job(baseline, p.part.trainable, p.part.frozen, p.weights, p.x,
                                                p.labels, p.loss_scale)
    results = H.run_builder(jobs)
    for p in prepared.values():
        p.results = results
    return prepared


def check_part(parts: dict[str, PreparedPart], name: str,
               form: str = "taps") -> tuple[dict[str, np.ndarray], sg.StepGraphInterface]:
    """The step graph on onnxruntime 1.32 vs torch float64 and vs the onnxruntime-training session."""
    p = parts[name]
    step = p.results.model(f"{name}/step/{form}")
    base = p.results.value(f"{name}/session")
    iface = sg.step_graph_interface(step)
    got = H.run_standard(step, H.step_feeds(iface, p.weights, p.x, p.labels, p.loss_scale))
    ref = H.torch_step(p.part.module, p.x, p.labels, p.loss_scale, p.part.trainable)

    g = max(float(np.max(np.abs(v))) for v in ref.grads.values())
    assert_close(got[iface.loss_output], ref.loss, "loss", abs(ref.loss))
    assert_close(got[iface.loss_output], base["loss"], "loss vs ort-training", abs(ref.loss))
    assert iface.trainable == tuple(p.part.trainable)
    for param, out in zip(iface.trainable, iface.grad_outputs):
        assert_close(got[out], ref.grads[param], f"{name}/{form}: {param} vs torch", g)
        assert_close(got[out], base["grads"][param], f"{name}/{form}: {param} vs ort-training", g)
    stat_scale = max((float(np.max(np.abs(v))) for v in ref.stats.values()), default=0.0)
    for out, stat in iface.stat_updates:
        assert_close(got[out], ref.stats[stat], f"{name}/{form}: {stat} vs torch", stat_scale)
    assert {s for _, s in iface.stat_updates} == set(ref.stats)
    return got, iface


@pytest.mark.parametrize("name,form", [(n, f) for n, case in PARTS.items() for f in case.forms])
def test_part_matches_torch_and_ort_training(parts, name, form):
    check_part(parts, name, form)


# ---- frozen layers

def test_frozen_prefix_trainable_last_conv(parts):
    _, iface = check_part(parts, "frozen_prefix")
    assert iface.frozen == ("0.0.weight", "0.0.bias", "2.2.weight", "2.2.bias")


def test_frozen_layers_after_the_trainable_one_and_frozen_head(parts):
    """The gradient must flow through frozen convs (dX only, no dW) and a frozen head."""
    for form in ("taps", "conv"):
        _, iface = check_part(parts, "frozen_after_trainable", form)
        assert iface.grad_outputs == ("0.0.weight_grad", "0.0.bias_grad")


def test_mobilenet_only_depthwise_trainable_frozen_batchnorm_still_updates(parts):
    got, iface = check_part(parts, "mobilenet_depthwise_only")
    assert iface.trainable == ("0.body.3.weight",)
    assert len([k for k in got if k.endswith(sg.STAT_SUFFIX)]) == 6


def test_frozen_body_trainable_head_only(parts):
    _, iface = check_part(parts, "frozen_body_head_only")
    assert iface.trainable == ("1.weight", "1.bias")


# =========================================================================== micro-batches, interface, refusals

@dataclass
class Exported:
    module: nn.Module
    forward: onnx.ModelProto
    names: list[str]          # parameter names in module order


def exported(make: Callable[[], nn.Module], input_shape: tuple[int, ...]) -> Exported:
    torch.manual_seed(0)
    module = make()
    return Exported(module, H.export_forward(module, input_shape), [n for n, _ in module.named_parameters()])


def mobilenet_4() -> nn.Module:
    return nn.Sequential(InvertedResidual(4, 4, 2, 1), gap_head(4, 3))


class Gather(nn.Module):
    def forward(self, x):
        return x[:, [2, 0, 1, 3]]


# op_type -> (module, input shape)
NO_GRADIENT = {
    "InstanceNormalization": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), gap_head(4, 3)), (3, 6, 6)),
    "HardSwish": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Hardswish(), gap_head(4, 3)), (3, 6, 6)),
}
NO_REWRITE = {
    "GatherGrad": (lambda: nn.Sequential(nn.Linear(4, 4), Gather(), nn.Linear(4, 3)), (4,)),
    "AveragePoolGrad": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.AvgPool2d(2, ceil_mode=True), gap_head(4, 3)),
                        (3, 7, 7)),
}


@dataclass
class Builds:
    exports: dict[str, Exported]
    results: H.BuilderResults


@pytest.fixture(scope="module")
def builds() -> Builds:
    """The other step graphs the tests below need, built in one builder child, in this order."""
    ex = {"mobilenet": exported(mobilenet_4, (4, 6, 6)),
          "mobilenet_x2": exported(lambda: nn.Sequential(InvertedResidual(4, 4, 2, 1), InvertedResidual(4, 4, 2, 1),
                                                         gap_head(4, 3)), (4, 6, 6)),
          "linear": exported(lambda: nn.Sequential(nn.Linear(3, 2)), (3,)),
          "linear4": exported(lambda: nn.Sequential(nn.Linear(4, 3)), (4,)),
          "conv": exported(lambda: nn.Sequential(conv_relu(3, 4, True), gap_head(4, 3)), (3, 8, 8))}
    for op, (make, shape) in {**NO_GRADIENT, **NO_REWRITE}.items():
        ex[f"refuse/{op}"] = exported(make, shape)
    mob, names = ex["mobilenet"], ex["mobilenet"].names
    jobs = {
        "micro": H.build_job(mob.forward, names, []),
        "repeat": H.build_job(ex["mobilenet_x2"].forward, ex["mobilenet_x2"].names, []),
        "device": H.build_job(mob.forward, names[2:], names[:2]),
        "interface": H.build_job(mob.forward, names[3:], names[:3]),
        # the same part, another part between: the same bytes (onnxblock's counters are process-wide)
        "repro/first": H.build_job(mob.forward, names, []),
        "repro/other": H.build_job(ex["linear"].forward, ["0.weight"], ["0.bias"]),
        "repro/again": H.build_job(mob.forward, names, []),
        "gradient_graph": H.gradient_graph_job(ex["conv"].forward, ex["conv"].names, []),
        "error/not-initializer": H.build_job(ex["linear4"].forward, ["0.weight", "nope"], []),
        "error/twice": H.build_job(ex["linear4"].forward, ["0.weight"], ["0.weight"]),
        "error/none-trainable": H.build_job(ex["linear4"].forward, [], ["0.weight", "0.bias"]),
    }
    for op in {**NO_GRADIENT, **NO_REWRITE}:
        jobs[f"refuse/{op}"] = H.build_job(ex[f"refuse/{op}"].forward, ex[f"refuse/{op}"].names, [])
    return Builds(ex, H.run_builder(jobs))


def test_micro_batches_sum_to_the_batch_mean_gradient(builds):
    """loss_scale = 1/B on every micro-batch: summed gradients = gradient of the batch mean."""
    m = builds.exports["mobilenet"].module
    step = builds.results.model("micro")
    iface = sg.step_graph_interface(step)
    session = H.standard_session(step)
    rs = np.random.RandomState(3)
    x, labels = rs.randn(8, 4, 6, 6).astype(np.float32), rs.randint(0, 3, 8)
    w = H.state_arrays(m)
    total = {g: 0.0 for g in iface.grad_outputs}
    loss = 0.0
    for part in (slice(0, 3), slice(3, 8)):
        out = H.run_standard(session, H.step_feeds(iface, w, x[part], labels[part], 1 / 8))
        loss += float(out["loss"])
        for gname, so_far in total.items():
            total[gname] = so_far + out[gname]
    # BatchNorm normalizes by micro-batch statistics, so torch runs the same micro-batches
    m2 = copy.deepcopy(m).double().train()
    torch_loss = 0.0
    for part in (slice(0, 3), slice(3, 8)):
        batch_loss = nn.functional.cross_entropy(m2(torch.from_numpy(x[part]).double()),
                                                 torch.from_numpy(labels[part]), reduction="sum") / 8
        batch_loss.backward()
        torch_loss += batch_loss.item()
    assert abs(loss - torch_loss) < 1e-5 * abs(torch_loss)
    g = max(float(p.grad.abs().max()) for p in m2.parameters())
    assert len(iface.grad_outputs) == len(list(m2.parameters()))
    for (pname, p), gname in zip(m2.named_parameters(), iface.grad_outputs):
        assert gname == pname + sg.GRAD_SUFFIX
        assert_close(total[gname], p.grad.numpy(), f"micro-batch {pname}", g)


def test_repeated_runs_give_identical_outputs(builds):
    """A step graph holds no state between runs (statistics buffers are not mutated in place)."""
    step = builds.results.model("repeat")
    iface = sg.step_graph_interface(step)
    rs = np.random.RandomState(5)
    w = H.state_arrays(builds.exports["mobilenet_x2"].module)
    feeds = [H.step_feeds(iface, w, rs.randn(5, 4, 6, 6).astype(np.float32), rs.randint(0, 3, 5), 0.2)
             for _ in range(2)]
    session = H.standard_session(step)
    first = H.run_standard(session, feeds[0])
    H.run_standard(session, feeds[1])            # same session, other data in between
    again = H.run_standard(session, feeds[0])
    for name in iface.output_names:
        np.testing.assert_array_equal(again[name], first[name], err_msg=name)


def test_backward_work_waits_for_the_loss_gradient(builds, tmp_path):
    """No gradient rewrite can make an activation-sized tensor during the forward pass.

    onnxruntime runs a node as soon as its inputs exist: a rewrite that read only forward tensors (a ReLU's
    mask, BatchNorm's centred input, a weight gradient's transposed input) ran during the forward pass and
    its output was held through the whole backward pass (Rewriter.after). So every rewrite node whose output
    is activation-sized (measured: onnxruntime's profile of a run) must depend on the loss scale, where
    the backward pass begins.
    """
    import json

    import onnxruntime as ort
    step = builds.results.model("interface")
    iface = sg.step_graph_interface(step)
    rs = np.random.RandomState(7)
    batch = 16
    feeds = H.step_feeds(iface, H.state_arrays(builds.exports["mobilenet"].module),
                         rs.randn(batch, 4, 6, 6).astype(np.float32), rs.randint(0, 3, batch), 1 / batch)
    options = ort.SessionOptions()
    options.enable_profiling, options.profile_file_prefix = True, str(tmp_path / "profile")
    session = ort.InferenceSession(step.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.run(None, feeds)
    sizes = {e["name"].removesuffix("_kernel_time"): int(e["args"]["output_size"])
             for e in json.loads(Path(session.end_profiling()).read_text())
             if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")}
    backward = {iface.loss_scale_input}
    for n in step.graph.node:        # topological: a node's inputs come first
        if backward & set(n.input):
            backward |= set(n.output)
    smallest = batch * 4 * 3 * 3 * 4      # bytes of the model's smallest activation (4 channels at 3x3)
    rewrites = [n for n in step.graph.node if "_Grad/" in n.name and "/sg/" in n.name
                and sizes.get(n.name, 0) >= smallest]
    early = [(n.op_type, n.name) for n in rewrites if not backward & set(n.output)]
    assert len(rewrites) > 20
    assert not early, f"gradient work that can run before the backward pass: {early}"


def test_device_reads_the_interface_without_onnx(builds, tmp_path):
    """On onnxruntime 1.32 with neither onnx nor torch importable: interface from the session's metadata,
    names match."""
    step = builds.results.model("device")
    path = tmp_path / "step.onnx"
    path.write_bytes(step.SerializeToString())
    seen = H.describe_on_device(path)
    assert seen["onnxruntime"].startswith(H.RUNTIME_SERIES)
    assert seen["loaded"] == []
    iface = sg.step_graph_interface(step)
    assert tuple(seen["inputs"]) == iface.input_names == tuple(seen["session_inputs"])
    assert tuple(seen["outputs"]) == iface.output_names == tuple(seen["session_outputs"])
    assert [tuple(p) for p in seen["stat_updates"]] == list(iface.stat_updates)


def test_build_is_reproducible(builds):
    """Same part, same bytes, whatever was built before (graphs are content-addressed)."""
    first = builds.results.value("repro/first")
    builds.results.value("repro/other")
    assert builds.results.value("repro/again") == first
    assert builds.results.value("micro") == first     # the same part, built earlier in the child


def test_interface_and_validity(builds):
    names = builds.exports["mobilenet"].names
    trainable, frozen = names[3:], names[:3]
    step = builds.results.model("interface")
    onnx.checker.check_model(step, full_check=True)
    assert [(o.domain, o.version) for o in step.opset_import] == [("", 17)]
    assert step.ir_version <= 10
    assert all(n.domain == "" for n in step.graph.node)
    iface = sg.step_graph_interface(step)
    assert sg.StepGraphInterface.from_json(iface.to_json()) == iface
    assert tuple(i.name for i in step.graph.input) == iface.input_names
    assert tuple(o.name for o in step.graph.output) == iface.output_names
    assert iface.input_names[:3] == ("x", "labels", "loss_scale")
    assert iface.param_inputs == tuple(trainable + frozen)
    assert iface.grad_outputs == tuple(p + "_grad" for p in trainable)
    assert iface.stat_inputs == tuple(f"0.body.{i}.running_{s}" for i in (1, 4, 7) for s in ("mean", "var"))
    assert dict(iface.stat_updates) == {s + "_updated": s for s in iface.stat_inputs}
    assert not {t.name for t in step.graph.initializer} & set(iface.input_names)
    types = {i.name: i.type.tensor_type for i in step.graph.input}
    assert types["labels"].elem_type == TensorProto.INT64 and len(types["labels"].shape.dim) == 1
    assert types["loss_scale"].elem_type == TensorProto.FLOAT and len(types["loss_scale"].shape.dim) == 0


def test_rewrite_of_a_whole_training_graph_needs_no_accumulator_inputs(builds):
    """rewrite_to_standard on onnxruntime-training's own graph: gradients out, no buffers in."""
    names = builds.exports["conv"].names
    training = builds.results.model("gradient_graph")
    assert "InPlaceAccumulatorV2" in {n.op_type for n in training.graph.node}
    plain = sg.rewrite_to_standard(training)
    sg.validate_step_graph(plain)
    assert [i.name for i in plain.graph.input] == ["x", "labels", "loss_scale"] + names
    assert [o.name for o in plain.graph.output] == ["loss"] + [n + "_grad" for n in names]


def test_builder_errors_are_typed(builds):
    with pytest.raises(sg.StepGraphError, match="not initializers"):
        builds.results.value("error/not-initializer")
    with pytest.raises(sg.StepGraphError, match="listed twice"):
        builds.results.value("error/twice")
    with pytest.raises(sg.StepGraphError, match="at least one"):
        builds.results.value("error/none-trainable")


@pytest.mark.parametrize("op", list(NO_GRADIENT))
def test_op_without_gradient_is_refused_by_name(builds, op):
    with pytest.raises(sg.UnsupportedOpError) as info:
        builds.results.value(f"refuse/{op}")
    assert info.value.op_type == op
    assert info.value.node_name


@pytest.mark.parametrize("op", list(NO_REWRITE))
def test_op_without_rewrite_is_refused_by_name(builds, op):
    with pytest.raises(sg.UnsupportedOpError) as info:
        builds.results.value(f"refuse/{op}")
    assert info.value.op_type == op
    assert info.value.node_name
