"""pFedLA's hypernetworks in numpy: the forward pass and the gradients against torch autograd, and the
direction of the server's step on a problem whose answer is known."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from coordinator.strategies.hypernetwork import (
    grow,
    hypernetwork_grads,
    init_hypernetwork,
    layer_weights,
    mix,
    sgd_step,
)


def random_params(num_layers: int, num_devices: int, seed: int, embedding_dim: int = 7,
                  hidden_dim: int = 9) -> dict[str, np.ndarray]:
    """A hypernetwork whose heads are centred on 0, so ReLU cuts some outputs (and now and then a whole row)."""
    rng = np.random.default_rng(seed)
    params = init_hypernetwork(num_layers, num_devices, rng, embedding_dim=embedding_dim, hidden_dim=hidden_dim)
    for layer in range(num_layers):
        params[f"head.{layer}.weight"] = rng.standard_normal((num_devices, hidden_dim))
        params[f"head.{layer}.bias"] = rng.standard_normal(num_devices)
    return params


def torch_alphas(params: dict[str, np.ndarray], self_index: int, k_local: int = 0):
    """The same net written in torch from the paper's description: (alphas, the torch leaves by name)."""
    leaves = {name: torch.tensor(value, dtype=torch.float64, requires_grad=True) for name, value in params.items()}
    x = leaves["embedding"]
    for k in range(3):
        x = torch.relu(leaves[f"mlp.{k}.weight"] @ x + leaves[f"mlp.{k}.bias"])
    num_layers = sum(1 for name in params if name.startswith("head.") and name.endswith(".weight"))
    num_devices = params["head.0.weight"].shape[0]
    own = torch.zeros(num_devices, dtype=torch.float64)
    own[self_index] = 1.0
    rows = []
    for layer in range(num_layers):
        r = torch.relu(leaves[f"head.{layer}.weight"] @ x + leaves[f"head.{layer}.bias"])
        rows.append(r / r.sum() if r.sum() > 0 else own)
    alphas = torch.stack(rows)
    if k_local:
        chosen = torch.argsort(alphas[:, self_index].detach(), descending=True, stable=True)[:k_local]
        local = torch.zeros(num_layers, dtype=torch.bool)
        local[chosen] = True
        alphas = torch.where(local[:, None], own, alphas)
    return alphas, leaves


def torch_grads(loss, leaves) -> dict[str, np.ndarray]:
    """d loss / d every leaf; zeros where the loss does not depend on it (e.g. every row local)."""
    if not loss.requires_grad:
        return {name: np.zeros(tuple(leaf.shape)) for name, leaf in leaves.items()}
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {name: np.zeros(tuple(leaf.shape)) if g is None else g.numpy()
            for (name, leaf), g in zip(leaves.items(), grads)}


def assert_grads_close(ours: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> None:
    assert set(ours) == set(reference)
    for name in reference:
        assert ours[name].shape == reference[name].shape, name
        np.testing.assert_allclose(ours[name], reference[name], rtol=1e-8, atol=1e-12, err_msg=name)


# -- 1. the forward pass -------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed, num_layers, num_devices", [(0, 1, 1), (1, 4, 3), (2, 4, 7), (3, 3, 5)])
def test_alphas_match_torch_and_are_distributions(seed, num_layers, num_devices):
    for params in (random_params(num_layers, num_devices, seed),
                   init_hypernetwork(num_layers, num_devices, np.random.default_rng(seed))):
        self_index = seed % num_devices
        alphas, local = layer_weights(params, self_index)
        reference, _ = torch_alphas(params, self_index)
        assert alphas.shape == (num_layers, num_devices) and alphas.dtype == np.float64
        np.testing.assert_allclose(alphas, reference.detach().numpy(), rtol=0, atol=1e-10)
        np.testing.assert_allclose(alphas.sum(axis=1), 1.0, rtol=0, atol=1e-12)
        assert (alphas >= 0).all() and not local.any()


def test_a_fresh_hypernetwork_starts_near_the_fleet_average():
    params = init_hypernetwork(4, 6, np.random.default_rng(0))
    assert params["embedding"].shape == (100,) and params["mlp.0.weight"].shape == (100, 100)
    assert params["head.3.weight"].shape == (6, 100) and not params["head.3.bias"].any()
    alphas, _ = layer_weights(params, 0)
    assert np.abs(alphas - 1 / 6).max() < 0.05


# -- 2. gradients of the net -----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("num_layers", [1, 4])
@pytest.mark.parametrize("num_devices", [1, 3, 7])
@pytest.mark.parametrize("k_local", [0, 1, 3])
def test_gradients_match_torch_autograd(seed, num_layers, num_devices, k_local):
    params = random_params(num_layers, num_devices, seed)
    self_index = (seed + 1) % num_devices
    c = np.random.default_rng(100 + seed).standard_normal((num_layers, num_devices))
    alphas, leaves = torch_alphas(params, self_index, k_local)
    reference = torch_grads((alphas * torch.tensor(c)).sum(), leaves)
    assert_grads_close(hypernetwork_grads(params, self_index, k_local, c), reference)


def test_gradients_are_not_all_zero_where_they_should_not_be():
    """Guards the comparison above against passing on two sets of zeros."""
    params = random_params(4, 5, 0)
    c = np.random.default_rng(1).standard_normal((4, 5))
    grads = hypernetwork_grads(params, 0, 0, c)
    assert all(np.abs(g).max() > 1e-6 for name, g in grads.items() if name.startswith(("mlp", "embedding")))


# -- 3. through the mixture ------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed, num_devices, k_local", [(0, 3, 0), (1, 5, 0), (2, 5, 1), (3, 1, 0)])
def test_the_mixture_and_its_gradient_match_torch_through_the_whole_pipeline(seed, num_devices, k_local):
    num_layers, self_index = 3, num_devices - 1
    rng = np.random.default_rng(seed)
    params = random_params(num_layers, num_devices, seed)
    # device j's own copy of layer l: a weight and a bias, in the model's dtype
    thetas = [[(rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(3).astype(np.float32))
               for _ in range(num_layers)] for _ in range(num_devices)]
    upstream = [(rng.standard_normal((3, 4)), rng.standard_normal(3)) for _ in range(num_layers)]   # G_l

    alphas, _ = layer_weights(params, self_index, k_local)
    dalpha = np.zeros((num_layers, num_devices))
    for layer in range(num_layers):
        for t in range(2):
            mixed = mix(alphas[layer], [thetas[j][layer][t] for j in range(num_devices)])
            expected = sum(alphas[layer, j] * thetas[j][layer][t].astype(np.float64) for j in range(num_devices))
            assert mixed.dtype == np.float32
            np.testing.assert_allclose(mixed, expected, rtol=1e-6, atol=1e-6)
            for j in range(num_devices):    # the caller's streamed dot products
                dalpha[layer, j] += float(np.sum(upstream[layer][t] * thetas[j][layer][t].astype(np.float64)))
    ours = hypernetwork_grads(params, self_index, k_local, dalpha)

    t_alphas, leaves = torch_alphas(params, self_index, k_local)
    loss = torch.zeros((), dtype=torch.float64)
    for layer in range(num_layers):
        for t in range(2):
            stacked = torch.stack([torch.tensor(thetas[j][layer][t], dtype=torch.float64) for j in range(num_devices)])
            mixed = torch.tensordot(t_alphas[layer], stacked, dims=1)
            loss = loss + (torch.tensor(upstream[layer][t]) * mixed).sum()
    assert_grads_close(ours, torch_grads(loss, leaves))


class Recording:
    """A sequence that notes which items were read."""

    def __init__(self, items):
        self.items, self.read = items, []

    def __len__(self):
        return len(self.items)

    def __getitem__(self, j):
        self.read.append(int(j))
        return self.items[j]


def test_mix_reads_only_the_devices_with_weight():
    tensors = Recording([np.full(3, j, np.float32) for j in range(4)])
    out = mix(np.array([0.0, 1.0, 0.0, 0.0]), tensors)
    assert tensors.read == [1] and out.dtype == np.float32 and np.array_equal(out, tensors.items[1])
    tensors.read.clear()
    np.testing.assert_allclose(mix(np.array([0.25, 0.0, 0.75, 0.0]), tensors), 1.5)
    assert tensors.read == [0, 2]
    with pytest.raises(ValueError):
        mix(np.array([0.5, 0.5]), tensors)


# -- 4. the direction of the step ------------------------------------------------------------------------------
def run_device_zero(steps: int, sign: float = 1.0, hn_lr: float = 0.1):
    """Device 0's ideal model is device 2's; each round it trains one SGD step from its mixture.

    Returns (loss at the mixture before each server step and after the last, the last alphas)."""
    rng = np.random.default_rng(0)
    num_devices, num_layers = 4, 3
    thetas = rng.standard_normal((num_devices, num_layers, 5))       # device, layer, a vector per layer
    params = init_hypernetwork(num_layers, num_devices, rng)

    def personalised(p):
        alphas, _ = layer_weights(p, 0)
        bar = np.einsum("lj,jld->ld", alphas, thetas)
        return alphas, bar, float(np.sum((bar - thetas[2]) ** 2))

    losses = []
    for _ in range(steps):
        alphas, bar, loss = personalised(params)
        losses.append(loss)
        trained = bar - 0.1 * 2 * (bar - thetas[2])                 # the device's step on its own loss
        g = sign * (bar - trained)
        dalpha = np.einsum("ld,jld->lj", g, thetas)
        params = sgd_step(params, hypernetwork_grads(params, 0, 0, dalpha), hn_lr)
    alphas, _, loss = personalised(params)
    losses.append(loss)
    return np.array(losses), alphas


def test_the_server_step_lowers_the_devices_loss():
    losses, alphas = run_device_zero(200)
    assert losses[1] < losses[0]
    assert losses[-1] < 0.1 * losses[0]
    assert (alphas.argmax(axis=1) == 2).all()


def test_the_opposite_sign_raises_the_loss():
    losses, _ = run_device_zero(1, sign=-1.0)
    assert losses[1] > losses[0]


# -- 5. HeurpFedLA ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k_local", range(7))
def test_exactly_k_layers_with_the_largest_self_weight_stay_local(k_local):
    num_layers, num_devices, self_index = 6, 5, 2
    params = init_hypernetwork(num_layers, num_devices, np.random.default_rng(7))    # every output positive
    plain, _ = layer_weights(params, self_index)
    assert len(set(plain[:, self_index])) == num_layers      # no ties: the choice below is the only one
    alphas, local = layer_weights(params, self_index, k_local)
    expected = set(np.argsort(-plain[:, self_index])[:k_local].tolist())
    assert set(np.flatnonzero(local).tolist()) == expected and local.sum() == k_local
    one_hot = np.eye(num_devices)[self_index]
    for layer in range(num_layers):
        if layer in expected:
            assert np.array_equal(alphas[layer], one_hot)
        else:
            assert np.array_equal(alphas[layer], plain[layer])

    rng = np.random.default_rng(k_local)
    c = rng.standard_normal((num_layers, num_devices))
    changed = c.copy()
    changed[local] = rng.standard_normal((k_local, num_devices)) * 1e3
    grads, again = hypernetwork_grads(params, self_index, k_local, c), hypernetwork_grads(params, self_index,
                                                                                          k_local, changed)
    for name in grads:
        assert np.array_equal(grads[name], again[name]), name
    for layer in expected:
        assert not grads[f"head.{layer}.weight"].any() and not grads[f"head.{layer}.bias"].any()


# -- 6. a growing fleet, and a head that outputs nothing ----------------------------------------------------------
def test_grow_keeps_every_value_and_widens_the_heads():
    params = init_hypernetwork(2, 3, np.random.default_rng(0), embedding_dim=8, hidden_dim=6)
    before = {name: value.copy() for name, value in params.items()}
    grown = grow(params, 5, np.random.default_rng(1))
    assert set(grown) == set(params)
    for name, value in params.items():
        assert value.tobytes() == before[name].tobytes(), f"grow changed its input {name}"
        if name.startswith("head."):
            assert grown[name].shape[0] == 5 and grown[name][:3].tobytes() == value.tobytes()
        else:
            assert grown[name].tobytes() == value.tobytes() and grown[name] is not value
    for layer in range(2):
        new_rows = grown[f"head.{layer}.weight"][3:]
        assert new_rows.shape == (2, 6) and ((new_rows >= 0) & (new_rows < 1)).all()
        assert not grown[f"head.{layer}.bias"][3:].any()
    alphas, _ = layer_weights(grown, 4)
    assert alphas.shape == (2, 5) and (alphas[:, 3:] > 0).all()
    assert all(np.array_equal(a, b) for a, b in zip(grow(params, 3, np.random.default_rng(2)).values(),
                                                     params.values()))
    with pytest.raises(ValueError):
        grow(params, 2, np.random.default_rng(3))


def test_a_head_with_no_positive_output_falls_back_to_the_device_itself():
    params = random_params(3, 4, 0)
    params["head.1.bias"] = np.full(4, -1e9)
    alphas, local = layer_weights(params, 3)
    assert np.array_equal(alphas[1], [0.0, 0.0, 0.0, 1.0]) and not local.any()
    c = np.random.default_rng(0).standard_normal((3, 4))
    changed = c.copy()
    changed[1] = 1e3
    grads, again = hypernetwork_grads(params, 3, 0, c), hypernetwork_grads(params, 3, 0, changed)
    assert not grads["head.1.weight"].any() and not grads["head.1.bias"].any()
    assert all(np.array_equal(grads[name], again[name]) for name in grads)


def test_sgd_step_returns_new_arrays_and_checks_the_names():
    params = init_hypernetwork(1, 2, np.random.default_rng(0), embedding_dim=3, hidden_dim=4)
    grads = {name: np.ones_like(value) for name, value in params.items()}
    stepped = sgd_step(params, grads, 0.5)
    for name, value in params.items():
        np.testing.assert_array_equal(stepped[name], value - 0.5)
    with pytest.raises(ValueError):
        sgd_step(params, {"embedding": grads["embedding"]}, 0.5)
