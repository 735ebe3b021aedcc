"""The device's numpy optimizers (edge_runtime/train/optimizers.py): torch.optim parity, HF/onnxruntime form, checkpoints, in-place, memory.

Parity tolerance. torch's CPU `add_(alpha=)` and `lerp_` kernels are fused multiply-adds and
numpy has no FMA ufunc, so single elements differ from torch by an ulp now and then. The
comparisons therefore use realistic magnitudes (nn.Linear-style init, |w| < ~0.6, whose ulp
is <= 6e-8) and check the WEIGHTS after 20 steps within 1e-7 absolute, not single updates
(AdamW turns a 1e-9 difference in m into a visible one wherever |g| ~ eps).
"""
from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from edge_runtime.train import optimizers
from edge_runtime.train.optimizers import SGD, AdamW, make_optimizer

torch.set_num_threads(1)
SHAPES = {"fc.weight": (64, 33), "fc.bias": (64,), "conv.weight": (8, 3, 3, 3), "scale": ()}
STEPS = 20
ATOL = 1e-7


def init_params(seed: int = 0) -> dict[str, np.ndarray]:
    """nn.Linear-style uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) weights, float32."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in SHAPES.items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else max(1, int(np.prod(shape)))
        out[name] = np.asarray(rng.uniform(-1, 1, shape) / math.sqrt(fan_in), np.float32)
    return out


def grads_for(rng: np.random.Generator, lo: float = -3, hi: float = 0) -> dict[str, np.ndarray]:
    """Read-only float32 gradients whose magnitudes spread over 10**lo .. 10**hi."""
    out = {}
    for name, shape in SHAPES.items():
        g = np.asarray(rng.standard_normal(shape) * 10.0 ** rng.uniform(lo, hi, shape), np.float32)
        g.flags.writeable = False  # the optimizer must only read gradients
        out[name] = g
    return out


def torch_params(params: dict[str, np.ndarray]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params.values()]


def run_pair(make_np, make_torch, steps: int = STEPS, lrs=None, lo=-3, hi=0, skip=None, seed=0):
    """Run our optimizer and torch's on identical gradients; return both sets of weights."""
    rng = np.random.default_rng(seed + 1)
    params = init_params(seed)
    tparams = torch_params(params)
    opt, topt = make_np(params), make_torch(tparams)
    for k in range(steps):
        grads = grads_for(rng, lo, hi)
        if skip:
            grads = {n: (None if skip(k, n) else g) for n, g in grads.items()}
        lr = None if lrs is None else lrs[k]
        if lr is not None:
            topt.param_groups[0]["lr"] = lr
        for t, g in zip(tparams, grads.values()):
            t.grad = None if g is None else torch.from_numpy(g.copy())
        topt.step()
        opt.step(grads, lr=lr)
    return params, {n: t.detach().numpy() for n, t in zip(params, tparams)}


def assert_close(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray], atol: float = ATOL) -> None:
    for name in ref:
        diff = float(np.max(np.abs(ours[name] - ref[name]))) if ours[name].size else 0.0
        assert diff <= atol, f"{name}: max |diff| {diff:.3g} > {atol}"


@pytest.fixture(params=["default-scratch", "tiny-scratch"])
def scratch(request, monkeypatch):
    """Also run with a 10-element scratch so every update crosses many chunks and a ragged tail."""
    if request.param == "tiny-scratch":
        monkeypatch.setattr(optimizers, "SCRATCH_CAP", 10)


# --- torch parity ----------------------------------------------------------------------------
SGD_CASES = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.05, momentum=0.9),
    "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True),
    "dampening": dict(lr=0.05, momentum=0.8, dampening=0.3),
    "weight_decay": dict(lr=0.1, weight_decay=0.05),
    "nesterov+wd": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "momentum+dampening+wd": dict(lr=0.05, momentum=0.9, dampening=0.5, weight_decay=1e-3),
}


@pytest.mark.parametrize("kw", SGD_CASES.values(), ids=SGD_CASES.keys())
def test_sgd_matches_torch(kw, scratch):
    ours, ref = run_pair(lambda p: SGD(p, **kw), lambda t: torch.optim.SGD(t, **kw), lo=-3, hi=-1)
    assert_close(ours, ref)


ADAMW_CASES = {
    "defaults": dict(lr=1e-3),
    "project-eps": dict(lr=1e-3, eps=1e-6, weight_decay=0.0),
    "hot": dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
    "low-beta1": dict(lr=3e-3, betas=(0.3, 0.9), eps=1e-10, weight_decay=0.0),  # lerp weight >= 0.5
    "big-eps": dict(lr=1e-3, betas=(0.95, 0.9999), eps=1e-3, weight_decay=0.5),
}


@pytest.mark.parametrize("kw", ADAMW_CASES.values(), ids=ADAMW_CASES.keys())
@pytest.mark.parametrize("grad_range", [(-3, 0), (-10, -4)], ids=["g-normal", "g-near-eps"])
def test_adamw_matches_torch(kw, grad_range, scratch):
    ours, ref = run_pair(lambda p: AdamW(p, **kw), lambda t: torch.optim.AdamW(t, **kw),
                         lo=grad_range[0], hi=grad_range[1])
    assert_close(ours, ref)


def test_changing_lr_matches_torch():
    lrs = [0.05 * (0.5 + 0.5 * math.cos(math.pi * k / STEPS)) + 1e-3 for k in range(STEPS)]
    kw = dict(momentum=0.9, nesterov=True, weight_decay=1e-2)
    ours, ref = run_pair(lambda p: SGD(p, lr=1.0, **kw), lambda t: torch.optim.SGD(t, lr=1.0, **kw),
                         lrs=lrs, lo=-3, hi=-1)
    assert_close(ours, ref)
    alrs = [lr / 10 for lr in lrs]
    kw = dict(betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)  # decay uses this step's lr
    ours, ref = run_pair(lambda p: AdamW(p, lr=1.0, **kw), lambda t: torch.optim.AdamW(t, lr=1.0, **kw),
                         lrs=alrs)
    assert_close(ours, ref)


def test_lr_none_uses_attribute():
    a, b = init_params(), init_params()
    g = grads_for(np.random.default_rng(3))
    oa, ob = SGD(a, lr=0.1), SGD(b, lr=0.1)
    oa.lr = 0.02
    oa.step(g)
    ob.step(g, lr=0.02)
    assert all(np.array_equal(a[n], b[n]) for n in a)
    assert ob.lr == 0.1  # a per-step lr is not sticky


@pytest.mark.parametrize("make_np, make_torch", [
    (lambda p: AdamW(p, lr=1e-2, weight_decay=0.1), lambda t: torch.optim.AdamW(t, lr=1e-2, weight_decay=0.1)),
    (lambda p: SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01),
     lambda t: torch.optim.SGD(t, lr=0.05, momentum=0.9, weight_decay=0.01)),
], ids=["adamw", "sgd-momentum"])
def test_none_grad_skips_like_torch(make_np, make_torch):
    """None = torch's grad None: no update/decay, and per-parameter step counts (bias correction,
    first-step momentum init) only advance for parameters that got a gradient."""
    def skip(k, n):
        return (n == "fc.bias" and k < 5) or (n == "scale" and k % 3 == 1)
    start = init_params()
    ours, ref = run_pair(make_np, make_torch, skip=skip, lo=-3, hi=-1)
    assert_close(ours, ref)
    params = init_params()
    opt = make_np(params)
    opt.step({n: (None if n == "fc.bias" else np.zeros(s, np.float32)) for n, s in SHAPES.items()})
    assert np.array_equal(params["fc.bias"], start["fc.bias"])
    assert int(opt.state_dict()["step.fc.bias"]) == 0 and int(opt.state_dict()["step"]) == 1


# --- Hugging Face / onnxruntime-training form --------------------------------------------------
@pytest.mark.parametrize("t", [1, 2, 10, 200])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_hf_form_equals_torch_with_scaled_eps(t, wd):
    """At step t the HF form is torch AdamW with eps/sqrt(1 - beta2**t) (plus the decay applied
    after the update instead of before when wd != 0)."""
    lr, betas, eps = 1e-2, (0.9, 0.999), 1e-6
    rng = np.random.default_rng(t)
    params = init_params()
    hf = AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=wd, eps_before_bias_correction=True)
    for _ in range(t - 1):  # reach a realistic state at step t - 1
        hf.step(grads_for(rng, -9, -3))
    before = {n: p.copy() for n, p in params.items()}
    tparams = torch_params(before)
    eps_t = eps / math.sqrt(1 - betas[1] ** t)
    topt = torch.optim.AdamW(tparams, lr=lr, betas=betas, eps=eps_t, weight_decay=0.0)
    sd = hf.state_dict()
    for name, tp in zip(SHAPES, tparams):
        topt.state[tp] = {"step": torch.tensor(float(t - 1)),
                          "exp_avg": torch.from_numpy(sd[f"exp_avg.{name}"].copy()),
                          "exp_avg_sq": torch.from_numpy(sd[f"exp_avg_sq.{name}"].copy())}
    grads = grads_for(rng, -9, -3)  # |g| near eps: where the two forms differ most
    for tp, g in zip(tparams, grads.values()):
        tp.grad = torch.from_numpy(g.copy())
    topt.step()
    hf.step(grads)
    ref = {n: tp.detach().numpy() * np.float32(1 - lr * wd) for n, tp in zip(SHAPES, tparams)}
    assert_close(params, ref)

    plain = {n: p.copy() for n, p in before.items()}  # and the forms really differ
    torch_form = AdamW(plain, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    torch_form.load_state_dict({**sd, "step": np.array(t - 1), **{
        f"step.{n}": np.array(t - 1) for n in SHAPES}})
    torch_form.step(grads)
    if t < 200:
        assert max(float(np.max(np.abs(plain[n] - params[n]))) for n in SHAPES) > 1e-5


# Runs in a child with onnxruntime-training first on its path (it cannot share a process with the
# maintained onnxruntime): 20 AdamW steps of its onnxblock.optim.AdamW on the gradients given.
_ORT_TRAINING_ADAMW = """
import sys, types
sys.modules["torch"] = None
for name in ("onnxruntime.training.amp", "onnxruntime.training.optim"):
    sys.modules[name] = types.ModuleType(name)
import numpy as np
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.training import api, artifacts, onnxblock
work = sys.argv[1]
data = np.load(work + "/in.npz")
names = ["w0", "w1"]
nodes, inputs = [], []
for n in names:   # loss = sum_i sum(w_i * x_i): the gradient of w_i is exactly the input x_i
    inputs.append(helper.make_tensor_value_info("x_" + n, TensorProto.FLOAT, list(data[n].shape)))
    nodes += [helper.make_node("Mul", [n, "x_" + n], ["m_" + n]),
              helper.make_node("ReduceSum", ["m_" + n], ["s_" + n], keepdims=0)]
nodes.append(helper.make_node("Add", ["s_w0", "s_w1"], ["loss"]))
graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])],
                          [numpy_helper.from_array(data[n], n) for n in names])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
artifacts.generate_artifacts(model, requires_grad=names, frozen_params=[], loss=None,
                             optimizer=onnxblock.optim.AdamW(eps=float(data["eps"]), weight_decay=float(data["wd"])),
                             artifact_directory=work)
state = api.CheckpointState.load_checkpoint(work + "/checkpoint")
module = api.Module(work + "/training_model.onnx", state, work + "/eval_model.onnx", device="cpu")
opt = api.Optimizer(work + "/optimizer_model.onnx", module)
module.train()
for k, lr in enumerate(data["lrs"]):
    module(*[data[f"g{k}_{n}"] for n in names])
    opt.set_learning_rate(float(lr))
    opt.step()
    module.lazy_reset_grad()
np.savez(work + "/out.npz", **{n: state.parameters[n].data for n in names})
"""


def test_hf_form_reproduces_onnxruntime_training_adamw(tmp_path):
    """eps_before_bias_correction=True reproduces the AdamW devices used before the move to the maintained
    onnxruntime: onnxruntime-training's onnxblock.optim.AdamW (adam_mode=1), 20 steps, changing lr."""
    import os
    import subprocess
    import sys

    from coordinator.model.part_graphs import REPO, builder_dir
    assert (builder_dir() / "onnxruntime" / "training").is_dir(), \
        f"the gradient builder is not installed in {builder_dir()}: run tools/bootstrap.sh"
    shapes = {"w0": (16, 9), "w1": (9,)}
    rng = np.random.default_rng(0)
    init = {n: (rng.uniform(-1, 1, s) / 3).astype(np.float32) for n, s in shapes.items()}
    eps, wd, lr0 = 1e-6, 0.1, 1e-2
    lrs = [lr0 * (1 + 0.5 * math.cos(k)) for k in range(STEPS)]
    grads = [{n: (rng.standard_normal(s) * 10.0 ** rng.uniform(-8, 0, s)).astype(np.float32)
              for n, s in shapes.items()} for _ in range(STEPS)]
    np.savez(tmp_path / "in.npz", eps=eps, wd=wd, lrs=np.array(lrs), **init,
             **{f"g{k}_{n}": g[n] for k, g in enumerate(grads) for n in shapes})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(builder_dir()), str(REPO)]))
    done = subprocess.run([sys.executable, "-c", _ORT_TRAINING_ADAMW, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = dict(np.load(tmp_path / "out.npz"))
    ours = {n: w.copy() for n, w in init.items()}
    opt = AdamW(ours, lr=lr0, eps=eps, weight_decay=wd, eps_before_bias_correction=True)
    for k in range(STEPS):
        opt.step(grads[k], lr=lrs[k])
    assert_close(ours, theirs)


# --- checkpoints ---------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda p: SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    lambda p: SGD(p, lr=0.05),
    lambda p: AdamW(p, lr=1e-3, weight_decay=0.1),
    lambda p: AdamW(p, lr=1e-3, eps=1e-6, eps_before_bias_correction=True),
], ids=["sgd-nesterov", "sgd-plain", "adamw", "adamw-hf"])
def test_state_dict_roundtrip_is_bit_identical(make, tmp_path):
    rng = np.random.default_rng(7)
    grads = [grads_for(rng) for _ in range(STEPS)]
    grads[3] = {**grads[3], "fc.bias": None}  # per-parameter step counts must survive too
    lrs = [1e-3 * (1 + k) for k in range(STEPS)]

    straight = init_params()
    opt = make(straight)
    for g, lr in zip(grads, lrs):
        opt.step(g, lr=lr)

    first = init_params()
    opt1 = make(first)
    for g, lr in zip(grads[:10], lrs[:10]):
        opt1.step(g, lr=lr)
    save_file(first, str(tmp_path / "weights.safetensors"))
    save_file(opt1.state_dict(), str(tmp_path / "optim.safetensors"))
    del opt1, first

    resumed = load_file(str(tmp_path / "weights.safetensors"))
    opt2 = make(resumed)
    opt2.load_state_dict(load_file(str(tmp_path / "optim.safetensors")))
    assert opt2.steps == 10
    for g, lr in zip(grads[10:], lrs[10:]):
        opt2.step(g, lr=lr)
    for name in straight:
        assert np.array_equal(resumed[name], straight[name]), name
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1.keys() == s2.keys()
    for key in s1:
        assert s1[key].dtype == s2[key].dtype and np.array_equal(s1[key], s2[key]), key


def test_state_dict_layout():
    params = init_params()
    sd = AdamW(params, lr=1e-3).state_dict()
    assert set(sd) == {"step"} | {f"{k}.{n}" for n in SHAPES for k in ("step", "exp_avg", "exp_avg_sq")}
    assert sd["step"].dtype == np.int64 and sd["step"].shape == ()
    assert set(SGD(params, lr=0.1, momentum=0.9).state_dict()) == (
        {"step"} | {f"{k}.{n}" for n in SHAPES for k in ("step", "momentum_buffer")})
    assert set(SGD(params, lr=0.1).state_dict()) == {"step"} | {f"step.{n}" for n in SHAPES}
    opt = SGD(params, lr=0.1)  # 1-element counters are accepted as well as 0-d ones
    opt.load_state_dict({k: np.array([5], np.int64) for k in opt.state_dict()})
    assert opt.steps == 5


# --- in place, memory --------------------------------------------------------------------------
def test_updates_in_place():
    """Parameters may be views into one flat buffer, as a runtime's parameter blob often is."""
    sizes = {n: int(np.prod(s)) for n, s in SHAPES.items()}
    flat = np.concatenate([p.reshape(-1) for p in init_params().values()])
    before = flat.copy()
    params, off = {}, 0
    for n, s in SHAPES.items():
        params[n] = flat[off:off + sizes[n]].reshape(s)
        off += sizes[n]
    ids = {n: (id(p), p.__array_interface__["data"][0]) for n, p in params.items()}
    for opt in (AdamW(params, lr=1e-2), SGD(params, lr=0.1, momentum=0.9)):
        state_ids = {k: id(v) for k, v in opt.state_dict().items() if not k.startswith("step")}
        for _ in range(3):
            opt.step(grads_for(np.random.default_rng(0)))
        assert all(opt.params[n] is params[n] for n in params)
        assert {n: (id(p), p.__array_interface__["data"][0]) for n, p in params.items()} == ids
        opt.load_state_dict({k: v.copy() for k, v in opt.state_dict().items()})
        assert {k: id(v) for k, v in opt.state_dict().items() if not k.startswith("step")} == state_ids
    assert not np.array_equal(flat, before)  # the shared buffer itself was written


@pytest.mark.parametrize("make", [
    lambda p: AdamW(p, lr=1e-3, weight_decay=0.1),
    lambda p: AdamW(p, lr=1e-3, weight_decay=0.1, eps_before_bias_correction=True),
    lambda p: SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
], ids=["adamw", "adamw-hf", "sgd-nesterov-wd"])
def test_memory(make):
    """State = what the algorithm needs; scratch <= one parameter; a step allocates ~nothing."""
    n = 1 << 20  # 4 MiB per parameter
    params = {"a": np.ones(n, np.float32), "b": np.ones((1024, 512), np.float32)}
    grads = {"a": np.full(n, 1e-3, np.float32), "b": np.full((1024, 512), 1e-3, np.float32)}
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        opt = make(params)
        built, _ = tracemalloc.get_traced_memory()
        slots = sum(1 for k in opt.state_dict() if k.startswith(("exp_avg", "momentum_buffer")))
        state_bytes = sum(v.nbytes for k, v in opt.state_dict().items() if not k.startswith("step"))
        assert state_bytes == slots // 2 * (params["a"].nbytes + params["b"].nbytes)
        assert opt._scratch.nbytes <= min(params["a"].nbytes, 4 * optimizers.SCRATCH_CAP)
        assert built <= state_bytes + opt._scratch.nbytes + 64 * 1024
        for _ in range(2):  # first step initialises momentum buffers: measure both paths
            before, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            opt.step(grads, lr=1e-3)
            _, peak = tracemalloc.get_traced_memory()
            assert peak - before < 64 * 1024, f"a step allocated {peak - before} bytes"
    finally:
        tracemalloc.stop()


def test_scratch_never_exceeds_largest_parameter():
    opt = AdamW({"w": np.zeros((3, 4), np.float32), "b": np.zeros(3, np.float32)}, lr=1e-3)
    assert opt._scratch.size <= 12


# --- bad input ------------------------------------------------------------------------------------
def _params():
    return {"w": np.zeros((3, 4), np.float32), "b": np.zeros(3, np.float32)}


def _grads():
    return {"w": np.ones((3, 4), np.float32), "b": np.ones(3, np.float32)}


@pytest.mark.parametrize("change, match", [
    (lambda g: {**g, "typo": g["b"]}, "unknown parameter 'typo'"),
    (lambda g: {"w": g["w"]}, "no gradient for parameter 'b'"),
    (lambda g: {**g, "b": np.ones(4, np.float32)}, r"'b' has shape \(4,\)"),
    (lambda g: {**g, "w": np.ones((3, 4))}, "'w' is float64"),
    (lambda g: {**g, "w": np.ones((4, 3), np.float32).T}, "'w' must be C-contiguous"),
    (lambda g: {**g, "w": [[1.0] * 4] * 3}, "'w' is list"),
    (lambda g: [g["w"], g["b"]], "mapping"),
], ids=["unknown", "missing", "shape", "dtype", "non-contiguous", "not-array", "not-mapping"])
@pytest.mark.parametrize("make", [lambda p: SGD(p, lr=0.1, momentum=0.9), lambda p: AdamW(p, lr=0.1)],
                         ids=["sgd", "adamw"])
def test_bad_grads_raise_and_change_nothing(change, match, make):
    params = _params()
    opt = make(params)
    before = {k: np.array(v) for k, v in opt.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        opt.step(change(_grads()))
    assert not params["w"].any() and not params["b"].any()
    assert all(np.array_equal(before[k], v) for k, v in opt.state_dict().items())


def test_bad_params_and_settings():
    readonly = np.zeros(3, np.float32)
    readonly.flags.writeable = False
    for params, match in [({}, "non-empty"), ({"w": np.zeros(3)}, "'w' is float64"),
                          ({"w": np.zeros((4, 3), np.float32).T}, "'w' must be a writeable"),
                          ({"w": readonly}, "'w' must be a writeable"),
                          ({"w": [0.0]}, "'w' is list")]:
        with pytest.raises(ValueError, match=match):
            SGD(params, lr=0.1)
    for kw, match in [(dict(lr=-1.0), "lr"), (dict(lr=0.1, nesterov=True), "nesterov"),
                      (dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "nesterov"),
                      (dict(lr=0.1, momentum=-0.1), "momentum")]:
        with pytest.raises(ValueError, match=match):
            SGD(_params(), **kw)
    for kw, match in [(dict(betas=(0.9, 1.0)), r"betas\[1\]"), (dict(betas=(0.9,)), "pair"),
                      (dict(eps=-1e-8), "eps"), (dict(weight_decay=-0.1), "weight_decay")]:
        with pytest.raises(ValueError, match=match):
            AdamW(_params(), lr=1e-3, **kw)
    with pytest.raises(ValueError, match="lr"):
        SGD(_params(), lr=0.1).step(_grads(), lr=float("nan"))
    with pytest.raises(ValueError, match="shares memory"):
        p = _params()
        SGD(p, lr=0.1).step({"w": p["w"], "b": np.ones(3, np.float32)})


def test_bad_state_dict():
    opt = AdamW(_params(), lr=1e-3)
    good = {k: v.copy() for k, v in opt.state_dict().items()}
    cases = [({k: v for k, v in good.items() if k != "exp_avg.w"}, "missing 'exp_avg.w'"),
             ({**good, "momentum_buffer.w": good["exp_avg.w"]}, "unexpected .*'momentum_buffer.w'"),
             ({**good, "exp_avg_sq.b": np.zeros(4, np.float32)}, "'exp_avg_sq.b'"),
             ({**good, "exp_avg.w": np.zeros((3, 4))}, "'exp_avg.w' is float64"),
             ({**good, "step": np.array(-1)}, "'step' is negative")]
    good["exp_avg.w"][:] = 1
    for state, match in cases:
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(state)
        assert not opt.state_dict()["exp_avg.w"].any()  # rejected states write nothing


def test_make_optimizer():
    p = _params()
    sgd = make_optimizer("SGD", p, lr=0.1, momentum=0.9)
    assert isinstance(sgd, SGD) and sgd.momentum == 0.9
    adamw = make_optimizer("adamw", p, lr=1e-3, eps=1e-6, eps_before_bias_correction=True)
    assert isinstance(adamw, AdamW) and adamw.eps == 1e-6 and adamw.eps_before_bias_correction
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        make_optimizer("adam", p, lr=1e-3)
    with pytest.raises(TypeError):
        make_optimizer("sgd", p, lr=0.1, momentun=0.9)
