"""pFedLA's per-device hypernetworks: how much of each other device's layer a device's model takes.

pFedLA (Ma et al., CVPR 2022, "Layer-wised Model Aggregation for Personalized Federated
Learning") personalises by layer: device i's layer l is a mixture of every device's own copy
of that layer, theta_bar_i^l = sum_j alpha_l[j] theta_j^l, and the mixing weights are not
fixed but learned on the server, one small hypernetwork per device:

    v_i (embedding, E) -> 3 x (Linear, ReLU) -> f (H) -> per layer l: r_l = relu(W_l f + b_l) (N)
    alpha_l = r_l / sum(r_l)           (a row of all zeros falls back to one-hot on i, no gradient)

so devices whose layer l helps device i get weight in it, and the rest get none. HeurpFedLA
keeps the K layers with the largest self-weight alpha_l[i] purely local: their rows become
one-hot on i and are not trained (K = 0 is plain pFedLA).

The server never sees device i's loss, only what training did to theta_bar_i. With
g_l = theta_bar_i^l - theta_trained^l, which is lr x dLoss/dtheta_bar for one SGD step and
points uphill in general, the chain rule through the mixture gives

    dLoss/dalpha_l[j] = <g_l, theta_j^l>            (summed over the layer's tensors)

and from there the gradient runs back through the normalisation, the ReLUs, the heads, the
MLP and the embedding; the update is plain SGD, p -= hn_lr x grad. The sign is the one thing
public re-implementations disagree on, and the wrong one trains each device's mixture away
from what it needs; tests/test_hypernetwork.py checks on a problem with a known answer that
this step lowers the device's loss and that the opposite sign raises it.

Everything here is numpy over float64 (the coordinator runs without torch): pure functions of
a plain dict of arrays that the caller persists as it likes. The caller streams the dot
products into `dalpha` itself, so no function here holds more than one layer of the fleet.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

MLP_LAYERS = 3          # the paper's depth: E -> H -> H -> H, each followed by ReLU

Params = dict[str, np.ndarray]


def init_hypernetwork(num_layers: int, num_devices: int, rng: np.random.Generator,
                      embedding_dim: int = 100, hidden_dim: int = 100) -> Params:
    """A fresh hypernetwork for one device, as float64 arrays under the names the module documents.

    The MLP starts as torch.nn.Linear does (uniform within 1/sqrt(fan_in)). The heads start with
    weights in U(0, 1) and zero bias: on a non-negative feature every output is positive and of
    similar size, so the first alphas are close to uniform and the first personalised model is
    close to the fleet average rather than an arbitrary mixture.
    """
    if num_layers < 1 or num_devices < 1 or embedding_dim < 1 or hidden_dim < 1:
        raise ValueError("a hypernetwork needs at least one layer, one device and positive dimensions")
    params: Params = {"embedding": rng.standard_normal(embedding_dim)}
    fan_in = embedding_dim
    for k in range(MLP_LAYERS):
        bound = 1.0 / np.sqrt(fan_in)
        params[f"mlp.{k}.weight"] = rng.uniform(-bound, bound, (hidden_dim, fan_in))
        params[f"mlp.{k}.bias"] = rng.uniform(-bound, bound, hidden_dim)
        fan_in = hidden_dim
    for layer in range(num_layers):
        params[f"head.{layer}.weight"] = rng.uniform(0.0, 1.0, (num_devices, hidden_dim))
        params[f"head.{layer}.bias"] = np.zeros(num_devices)
    return params


def grow(params: Mapping[str, np.ndarray], num_devices: int, rng: np.random.Generator) -> Params:
    """A copy of `params` whose heads have `num_devices` outputs; the existing values are kept bit for bit.

    A device that joins the fleet gets, in every other device's heads, a row initialised as
    init_hypernetwork initialises one (weights U(0, 1), bias 0), so it starts with about the
    weight of a typical device rather than none (which ReLU could never move).
    """
    num_layers, current, hidden = _dims(params)
    if num_devices < current:
        raise ValueError(f"a hypernetwork with {current} devices cannot shrink to {num_devices}")
    out = {name: np.array(value, np.float64, copy=True) for name, value in params.items()}
    extra = num_devices - current
    for layer in range(num_layers):
        weight, bias = f"head.{layer}.weight", f"head.{layer}.bias"
        out[weight] = np.concatenate([out[weight], rng.uniform(0.0, 1.0, (extra, hidden))])
        out[bias] = np.concatenate([out[bias], np.zeros(extra)])
    return out


def layer_weights(params: Mapping[str, np.ndarray], self_index: int,
                  k_local: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(alphas (L, N), local (L,)): each layer's mixing weights over the fleet for device `self_index`.

    Every row is non-negative and sums to 1. `local` marks the rows HeurpFedLA keeps one-hot on
    the device itself: the `k_local` with the largest self-weight in the plain (K = 0) pass,
    the lower layer first among equal weights; k_local >= L makes every layer local.
    """
    forward = _forward(params, self_index, k_local)
    return forward.alphas.copy(), forward.local.copy()


def mix(alpha_row: np.ndarray, tensors: Sequence[np.ndarray]) -> np.ndarray:
    """sum_j alpha_row[j] * tensors[j] as float32 (the model's dtype), accumulated in float64.

    Devices with a weight of exactly 0 are skipped without indexing `tensors`, so a local row
    (one-hot) reads one tensor, and a lazy sequence loads only what the mixture needs.
    """
    alpha_row = np.asarray(alpha_row, np.float64)
    if alpha_row.ndim != 1 or len(alpha_row) != len(tensors):
        raise ValueError(f"{alpha_row.shape} weights for {len(tensors)} tensors")
    total = None
    for j in np.flatnonzero(alpha_row):
        term = np.asarray(tensors[j], np.float64) * alpha_row[j]
        total = term if total is None else total + term
    if total is None:
        raise ValueError("every weight is 0: a row of layer_weights always has one that is not")
    return total.astype(np.float32)


def hypernetwork_grads(params: Mapping[str, np.ndarray], self_index: int, k_local: int,
                       dalpha: np.ndarray) -> Params:
    """d(loss)/d(every parameter), same names and shapes as `params`, given dalpha[l, j] = d(loss)/d(alpha_l[j]).

    For a device's round, dalpha[l, j] = <theta_bar^l - theta_trained^l, theta_j^l> summed over
    the tensors of layer l: then sgd_step with these gradients lowers the device's loss. Rows
    that are local (HeurpFedLA) or fell back to one-hot are constants: their dalpha is ignored.
    """
    forward = _forward(params, self_index, k_local)
    dalpha = np.asarray(dalpha, np.float64)
    if dalpha.shape != forward.alphas.shape:
        raise ValueError(f"dalpha has shape {dalpha.shape}, expected {forward.alphas.shape}")
    grads = {name: np.zeros_like(value, np.float64) for name, value in params.items()}
    d_feature = np.zeros_like(forward.feature)
    for layer in np.flatnonzero(forward.trained):
        alpha, upstream = forward.alphas[layer], dalpha[layer]
        # through alpha = r / sum(r): d alpha_j / d r_k = (delta_jk - alpha_j) / sum(r)
        d_r = (upstream - alpha @ upstream) / forward.sums[layer]
        d_z = d_r * (forward.head_pre[layer] > 0)       # torch's convention: no gradient at exactly 0
        grads[f"head.{layer}.weight"] = np.outer(d_z, forward.feature)
        grads[f"head.{layer}.bias"] = d_z
        d_feature += np.asarray(params[f"head.{layer}.weight"], np.float64).T @ d_z
    d_out = d_feature
    for k in reversed(range(MLP_LAYERS)):
        d_pre = d_out * (forward.mlp_pre[k] > 0)
        grads[f"mlp.{k}.weight"] = np.outer(d_pre, forward.mlp_in[k])
        grads[f"mlp.{k}.bias"] = d_pre
        d_out = np.asarray(params[f"mlp.{k}.weight"], np.float64).T @ d_pre
    grads["embedding"] = d_out
    return grads


def sgd_step(params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray], lr: float) -> Params:
    """A new dict: every parameter moved by -lr x its gradient."""
    if set(params) != set(grads):
        raise ValueError(f"gradients name different parameters: {sorted(set(params) ^ set(grads))[:3]}")
    return {name: np.asarray(value, np.float64) - lr * np.asarray(grads[name], np.float64)
            for name, value in params.items()}


# -- the forward pass, kept for the backward one ---------------------------------------------------
@dataclass(frozen=True)
class _Forward:
    mlp_in: list[np.ndarray]       # the input of each MLP layer (the embedding first)
    mlp_pre: list[np.ndarray]      # each MLP layer's output before its ReLU
    feature: np.ndarray            # f (H,)
    head_pre: np.ndarray           # W_l f + b_l, (L, N)
    sums: np.ndarray               # sum of relu(head_pre) per row, (L,)
    alphas: np.ndarray             # (L, N)
    local: np.ndarray              # (L,) bool: kept one-hot by HeurpFedLA
    trained: np.ndarray            # (L,) bool: rows a gradient flows through (not local, not fallen back)


def _dims(params: Mapping[str, np.ndarray]) -> tuple[int, int, int]:
    """(layers, devices, hidden width) of a hypernetwork, checking its heads agree."""
    num_layers = sum(1 for name in params if name.startswith("head.") and name.endswith(".weight"))
    if num_layers == 0 or any(f"head.{layer}.weight" not in params for layer in range(num_layers)):
        raise ValueError("the heads of a hypernetwork are head.0 ... head.{L-1}")
    shapes = {np.shape(params[f"head.{layer}.weight"]) for layer in range(num_layers)}
    if len(shapes) != 1:
        raise ValueError(f"the heads disagree on their shape: {sorted(shapes)}")
    num_devices, hidden = shapes.pop()
    return num_layers, num_devices, hidden


def _forward(params: Mapping[str, np.ndarray], self_index: int, k_local: int) -> _Forward:
    num_layers, num_devices, _ = _dims(params)
    if not 0 <= self_index < num_devices:
        raise ValueError(f"device {self_index} is not one of the hypernetwork's {num_devices}")
    if k_local < 0:
        raise ValueError(f"k_local must be >= 0, not {k_local}")
    mlp_in, mlp_pre = [], []
    x = np.asarray(params["embedding"], np.float64)
    for k in range(MLP_LAYERS):
        mlp_in.append(x)
        pre = np.asarray(params[f"mlp.{k}.weight"], np.float64) @ x + np.asarray(params[f"mlp.{k}.bias"], np.float64)
        mlp_pre.append(pre)
        x = np.maximum(pre, 0.0)
    feature = x
    head_pre = np.stack([np.asarray(params[f"head.{layer}.weight"], np.float64) @ feature
                         + np.asarray(params[f"head.{layer}.bias"], np.float64) for layer in range(num_layers)])
    r = np.maximum(head_pre, 0.0)
    sums = r.sum(axis=1)
    alive = sums > 0
    own = np.zeros(num_devices)
    own[self_index] = 1.0
    alphas = np.where(alive[:, None], r / np.where(alive, sums, 1.0)[:, None], own)
    local = np.zeros(num_layers, bool)
    # stable: among equal self-weights the lower layer is kept local first, so the choice is reproducible
    local[np.argsort(-alphas[:, self_index], kind="stable")[:k_local]] = True
    alphas[local] = own
    return _Forward(mlp_in, mlp_pre, feature, head_pre, sums, alphas, local, alive & ~local)
