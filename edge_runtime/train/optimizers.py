"""In-place NumPy optimizers for the device: torch.optim.SGD and torch.optim.AdamW semantics.

Why this exists: the device computes loss and gradients with an ONNX graph and has no torch,
so the optimizer runs here, in numpy, on float32 weights that are updated IN PLACE (the arrays
handed to the constructor are the model's weights; nothing is copied or re-bound).

Memory. Per parameter the state is what the algorithm needs and nothing more: AdamW keeps
exp_avg and exp_avg_sq, SGD with momentum keeps momentum_buffer, plain SGD keeps nothing. All
of it is allocated in the constructor, so a device's peak is known before the first step.
Temporaries come from ONE scratch array allocated once and reused for every parameter:
`min(largest parameter, 2**18)` float32 elements (at most 1 MiB), split into two work buffers;
parameters are updated in flat chunks of half that length. Chunking changes no result
(every operation is elementwise) and means a step allocates no array the size of a
parameter: only small Python objects and views.

Gradients. `step(grads)` needs an entry for every parameter: a missing name is a ValueError
(a wiring bug, e.g. a renamed graph output, must not silently freeze a layer). An explicit
`None` skips that parameter exactly like torch skips a parameter whose `.grad` is None: no
update, no weight decay, no moment decay, and its own step count does not advance (AdamW's
bias correction and SGD's first-step momentum initialisation are per parameter, as in
torch). Gradients must be C-contiguous float32 arrays of the parameter's shape and are only
read, never modified. Accumulation over micro-batches is the caller's (sum them, then call
`step` once). Every check runs before any array is touched: a bad call updates nothing.

Learning rate. `step(grads, lr=x)` uses x for this step only (the caller's schedule owns the
learning rate); `lr=None` uses the `lr` attribute, which the caller may also assign.

Checkpoints. `state_dict()` is flat `{str: np.ndarray}` so safetensors.numpy can save it:
`step` (int64, 0-d: number of step() calls), `step.<name>` (int64, 0-d: updates this
parameter received), and `momentum_buffer.<name>` or `exp_avg.<name>` / `exp_avg_sq.<name>`.
The buffers are returned as the live arrays (no copy: a checkpoint must not double the
optimizer's memory), so save them before the next step. `load_state_dict` checks that the
key set, shapes and dtypes match exactly and copies into the existing buffers; a run resumed
from it is bit-identical to an uninterrupted one. Weights are not part of it: save
`optimizer.params` (or the model) alongside.

AdamW: torch form versus the Hugging Face / onnxruntime-training form. torch.optim.AdamW does,
at step t (bias corrections bc1 = 1 - beta1^t, bc2 = 1 - beta2^t):

    p *= 1 - lr*wd
    m = lerp(m, g, 1 - beta1);  v = beta2*v + (1 - beta2)*g*g
    p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)

onnxruntime-training's AdamWOptimizer with adam_mode=1, which `onnxblock.optim.AdamW` (what
the project uses today) hard-codes, is the Hugging Face transformers form:

    m = beta1*m + (1 - beta1)*g;  v = beta2*v + (1 - beta2)*g*g
    p -= lr*sqrt(bc2)/bc1 * m / (sqrt(v) + eps)
    p -= lr*wd * p                                  # decay AFTER the update

Two differences. (1) eps is added before the bias correction of sqrt(v): since
lr*sqrt(bc2)/bc1 * m/(sqrt(v) + eps) = lr/bc1 * m/(sqrt(v)/sqrt(bc2) + eps/sqrt(bc2)), the HF
step t equals the torch step with eps_torch = eps / sqrt(1 - beta2^t): much larger than eps
early (x31.6 at t=1 with beta2=0.999) and tending to eps. Where |g| is near eps this changes
early steps noticeably. (2) The weight decay is applied to the updated weight, (p - u)*(1 -
lr*wd) instead of p*(1 - lr*wd) - u: a difference of lr*wd*u, second order. With
`eps_before_bias_correction=True` this module reproduces that form, including the late
decay and onnxruntime's float32 arithmetic for the corrections (1 - beta computed in float32,
beta^t from the float32 beta), so runs made with the old artifacts can be reproduced.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import numpy as np

__all__ = ["Optimizer", "SGD", "AdamW", "make_optimizer"]

SCRATCH_CAP = 1 << 18  # float32 elements of scratch at most (1 MiB), whatever the model's size
_N_TMP = 2             # work buffers carved out of the scratch; enough for every update below


def _check_params(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The updates are in place and chunked over flat views: need writeable C-contiguous float32."""
    if not isinstance(params, Mapping) or not params:
        raise ValueError("params must be a non-empty mapping of name -> np.ndarray")
    out: dict[str, np.ndarray] = {}
    for name, p in params.items():
        if not isinstance(name, str):
            raise ValueError(f"parameter name {name!r} is not a str")
        if not isinstance(p, np.ndarray):
            raise ValueError(f"parameter '{name}' is {type(p).__name__}, not np.ndarray")
        if p.dtype != np.float32:
            raise ValueError(f"parameter '{name}' is {p.dtype}, only float32 is supported")
        if not p.flags.c_contiguous or not p.flags.writeable:
            raise ValueError(f"parameter '{name}' must be a writeable C-contiguous array "
                             "(it is updated in place)")
        out[name] = p
    return out


def _check_hparam(name: str, value: float, low: float = 0.0, high: float = math.inf,
                  high_open: bool = False) -> float:
    """Hyperparameters become Python floats so the scalar arithmetic matches torch's (float64)."""
    value = float(value)
    if not math.isfinite(value) or not (low <= value and (value < high if high_open else value <= high)):
        bound = f"< {high}" if high_open else f"<= {high}"
        raise ValueError(f"{name} must be >= {low} and {bound}, not {value}")
    return value


class Optimizer:
    """Shared bookkeeping: validation, step counters, scratch, chunking, state_dict.

    Subclasses set `_slots` (their per-parameter state buffers) and implement `_update`.
    """

    _slots: tuple[str, ...] = ()

    def __init__(self, params: Mapping[str, np.ndarray], lr: float) -> None:
        self.params = _check_params(params)
        self.lr = _check_hparam("lr", lr)
        self.steps = 0  # number of step() calls
        self._param_steps = dict.fromkeys(self.params, 0)
        self._state = {slot: {n: np.zeros_like(p) for n, p in self.params.items()}
                       for slot in self._slots}
        largest = max(p.size for p in self.params.values())
        self._chunk = max(1, min(largest, SCRATCH_CAP) // _N_TMP)
        self._scratch = np.empty(self._chunk * _N_TMP, np.float32)

    # -- stepping ---------------------------------------------------------------------------
    def step(self, grads: Mapping[str, np.ndarray | None], lr: float | None = None) -> None:
        """Apply one update from `grads` (one entry per parameter, None to skip one)."""
        lr = self.lr if lr is None else _check_hparam("lr", lr)
        checked = self._check_grads(grads)
        self.steps += 1
        for name, g in checked.items():
            if g is None:
                continue
            self._param_steps[name] += 1
            self._update(name, g, lr)

    def _check_grads(self, grads: Mapping[str, np.ndarray | None]) -> dict[str, np.ndarray | None]:
        if not isinstance(grads, Mapping):
            raise ValueError("grads must be a mapping of name -> np.ndarray (or None to skip)")
        unknown = [n for n in grads if n not in self.params]
        if unknown:
            raise ValueError(f"gradient for unknown parameter '{unknown[0]}'")
        out: dict[str, np.ndarray | None] = {}
        for name, p in self.params.items():
            if name not in grads:
                raise ValueError(f"no gradient for parameter '{name}' (pass None to skip it)")
            g = grads[name]
            if g is not None:
                if not isinstance(g, np.ndarray):
                    raise ValueError(f"gradient '{name}' is {type(g).__name__}, not np.ndarray")
                if g.shape != p.shape:
                    raise ValueError(f"gradient '{name}' has shape {g.shape}, "
                                     f"parameter has {p.shape}")
                if g.dtype != np.float32:
                    raise ValueError(f"gradient '{name}' is {g.dtype}, only float32 is supported")
                if not g.flags.c_contiguous:
                    raise ValueError(f"gradient '{name}' must be C-contiguous "
                                     "(a copy would cost a parameter's worth of memory)")
                if np.shares_memory(g, p):
                    raise ValueError(f"gradient '{name}' shares memory with its parameter")
            out[name] = g
        return out

    def _chunks(self, *arrays: np.ndarray | None) -> Iterator[list]:
        """Yield aligned flat chunks of `arrays` (None passes through) plus the two work buffers."""
        flats = [None if a is None else a.reshape(-1) for a in arrays]
        n = flats[0].size
        c = self._chunk
        t1, t2 = self._scratch[:c], self._scratch[c:2 * c]
        for s in range(0, n, c):
            e = min(s + c, n)
            yield [None if f is None else f[s:e] for f in flats] + [t1[:e - s], t2[:e - s]]

    def _update(self, name: str, grad: np.ndarray, lr: float) -> None:
        raise NotImplementedError

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Flat state for safetensors: live buffers (no copy) plus int64 0-d step counters."""
        state: dict[str, np.ndarray] = {"step": np.array(self.steps, np.int64)}
        for name, k in self._param_steps.items():
            state[f"step.{name}"] = np.array(k, np.int64)
        for slot, bufs in self._state.items():
            for name, buf in bufs.items():
                state[f"{slot}.{name}"] = buf
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore exactly: same keys, shapes and dtypes as state_dict(), copied into place."""
        mine = self.state_dict()
        missing = [k for k in mine if k not in state]
        if missing:
            raise ValueError(f"state is missing '{missing[0]}'")
        extra = [k for k in state if k not in mine]
        if extra:
            raise ValueError(f"unexpected state entry '{extra[0]}'")
        for key, ref in mine.items():
            val = np.asarray(state[key])
            if val.dtype != ref.dtype or val.size != ref.size or (
                    val.shape != ref.shape and key.split(".", 1)[0] != "step"):
                raise ValueError(f"state entry '{key}' is {val.dtype}{list(val.shape)}, "
                                 f"expected {ref.dtype}{list(ref.shape)}")
            if key.split(".", 1)[0] == "step" and int(val.reshape(-1)[0]) < 0:
                raise ValueError(f"state entry '{key}' is negative")
        # All checked: now write (a rejected state leaves the optimizer untouched).
        self.steps = int(np.asarray(state["step"]).reshape(-1)[0])
        for name in self._param_steps:
            self._param_steps[name] = int(np.asarray(state[f"step.{name}"]).reshape(-1)[0])
        for slot, bufs in self._state.items():
            for name, buf in bufs.items():
                np.copyto(buf, state[f"{slot}.{name}"])


class SGD(Optimizer):
    """torch.optim.SGD: weight decay added to the gradient, momentum buffer = grad on first step.

        d = g + wd*p
        buf = d (first step) | momentum*buf + (1 - dampening)*d
        d = d + momentum*buf (nesterov) | buf
        p -= lr*d
    """

    def __init__(self, params: Mapping[str, np.ndarray], lr: float, momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0) -> None:
        self.momentum = _check_hparam("momentum", momentum)
        self.dampening = _check_hparam("dampening", dampening)
        self.weight_decay = _check_hparam("weight_decay", weight_decay)
        self.nesterov = bool(nesterov)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov momentum requires a momentum and zero dampening")
        self._slots = ("momentum_buffer",) if self.momentum else ()
        super().__init__(params, lr)

    def _update(self, name: str, grad: np.ndarray, lr: float) -> None:
        mom, damp, wd = self.momentum, self.dampening, self.weight_decay
        first = self._param_steps[name] == 1
        buf = self._state["momentum_buffer"][name] if mom else None
        for p, g, b, t1, t2 in self._chunks(self.params[name], grad, buf):
            d = g
            if wd:
                np.multiply(p, wd, out=t1)
                d = np.add(g, t1, out=t1)
            if mom:
                if first:
                    np.copyto(b, d)
                else:
                    np.multiply(b, mom, out=b)
                    if damp:  # never with nesterov, so d may be overwritten
                        np.add(b, np.multiply(d, 1 - damp, out=t2), out=b)
                    else:
                        np.add(b, d, out=b)
                if self.nesterov:
                    d = np.add(d, np.multiply(b, mom, out=t2), out=t2)
                else:
                    d = b
            np.add(p, np.multiply(d, -lr, out=t2), out=p)


class AdamW(Optimizer):
    """torch.optim.AdamW (decoupled decay, bias corrections, eps after bias-correcting sqrt(v)).

    `eps_before_bias_correction=True` gives the Hugging Face / onnxruntime-training form
    instead (see the module docstring): eps added to sqrt(v), bias correction folded into the
    learning rate, weight decay applied after the update.
    """

    _slots = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: Mapping[str, np.ndarray], lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, eps_before_bias_correction: bool = False) -> None:
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair, not {betas!r}")
        self.betas = (_check_hparam("betas[0]", betas[0], high=1.0, high_open=True),
                      _check_hparam("betas[1]", betas[1], high=1.0, high_open=True))
        self.eps = _check_hparam("eps", eps)
        self.weight_decay = _check_hparam("weight_decay", weight_decay)
        self.eps_before_bias_correction = bool(eps_before_bias_correction)
        super().__init__(params, lr)

    def _update(self, name: str, grad: np.ndarray, lr: float) -> None:
        if self.eps_before_bias_correction:
            self._update_hf(name, grad, lr)
            return
        b1, b2 = self.betas
        t = self._param_steps[name]
        decay = 1 - lr * self.weight_decay
        # torch's lerp_(end, w): start + w*(end - start) for |w| < 0.5, else end - (end - start)*(1 - w),
        # with w and 1 - w in float32.
        w = np.float32(1 - b1)
        small, w_rest = abs(w) < 0.5, np.float32(1) - w
        step_size = lr / (1 - b1 ** t)
        bc2_sqrt = (1 - b2 ** t) ** 0.5
        for p, g, m, v, t1, t2 in self._chunks(self.params[name], grad,
                                               self._state["exp_avg"][name],
                                               self._state["exp_avg_sq"][name]):
            if self.weight_decay:
                np.multiply(p, decay, out=p)
            np.subtract(g, m, out=t1)
            if small:
                np.add(m, np.multiply(t1, w, out=t1), out=m)
            else:
                np.subtract(g, np.multiply(t1, w_rest, out=t1), out=m)
            np.multiply(v, b2, out=v)
            np.multiply(g, 1 - b2, out=t1)
            np.add(v, np.multiply(t1, g, out=t1), out=v)
            np.sqrt(v, out=t1)                      # denom = sqrt(v)/sqrt(bc2) + eps
            np.divide(t1, bc2_sqrt, out=t1)
            np.add(t1, self.eps, out=t1)
            np.multiply(m, -step_size, out=t2)      # p += (-step_size*m)/denom (torch's addcdiv order)
            np.add(p, np.divide(t2, t1, out=t2), out=p)

    def _update_hf(self, name: str, grad: np.ndarray, lr: float) -> None:
        """onnxruntime AdamWOptimizer adam_mode=1 (CPU kernel), float32 scalars as it computes them."""
        f32 = np.float32
        b1, b2 = f32(self.betas[0]), f32(self.betas[1])
        t = self._param_steps[name]
        bc1 = f32(1) - f32(float(b1) ** t)
        bc2 = f32(1) - f32(float(b2) ** t)
        lr32 = f32(lr)
        lr_corrected = lr32 * (np.sqrt(bc2) / bc1)
        lr_wd = lr32 * f32(self.weight_decay)
        eps = f32(self.eps)
        for p, g, m, v, t1, t2 in self._chunks(self.params[name], grad,
                                               self._state["exp_avg"][name],
                                               self._state["exp_avg_sq"][name]):
            np.multiply(m, b1, out=m)               # m = b1*m + (1 - b1)*g
            np.add(m, np.multiply(g, f32(1) - b1, out=t1), out=m)
            np.multiply(v, b2, out=v)               # v = b2*v + ((1 - b2)*g)*g
            np.multiply(g, f32(1) - b2, out=t1)
            np.add(v, np.multiply(t1, g, out=t1), out=v)
            np.add(np.sqrt(v, out=t1), eps, out=t1)
            np.multiply(m, lr_corrected, out=t2)    # p -= (lr_c*m)/(sqrt(v) + eps)
            np.subtract(p, np.divide(t2, t1, out=t2), out=p)
            if self.weight_decay:                   # then p -= (lr*wd)*p
                np.subtract(p, np.multiply(p, lr_wd, out=t1), out=p)


_OPTIMIZERS: dict[str, type[Optimizer]] = {"sgd": SGD, "adamw": AdamW}


def make_optimizer(name: str, params: Mapping[str, np.ndarray], **settings) -> Optimizer:
    """Build an optimizer from config: `name` is "sgd" or "adamw" (any case), settings its kwargs."""
    cls = _OPTIMIZERS.get(str(name).lower())
    if cls is None:
        raise ValueError(f"unknown optimizer {name!r} (choose {' or '.join(_OPTIMIZERS)})")
    return cls(params, **settings)
