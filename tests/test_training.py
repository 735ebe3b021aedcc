"""Training a part with its step graph and the numpy optimizers: parity with torch, caches, micro-batches."""
import numpy as np
import pytest
import torch

from edge_runtime.train.datasets import LocalDataset
from edge_runtime.train.trainer import train
from edge_runtime.wire.part import TrainablePart
from edge_runtime.wire.train_config import TrainConfig


def _torch_one_step(model, weights, block, x, y, optimizer, lr, eps):
    """One torch step of blocks[0..block] -> heads[block], training only block `block` and its head."""
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()})
    params = list(model.blocks[block].parameters()) + list(model.heads[block].parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=lr) if optimizer == "sgd" else \
        torch.optim.AdamW(params, lr=lr, eps=eps, weight_decay=0.0)
    loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x), upto_block=block), torch.from_numpy(y))
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item(), {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("block", [0, 2])
def test_one_step_matches_torch(fmnist_model, fmnist, tmp_path, optimizer, block):
    from coordinator.model import zoo
    m, weights = fmnist_model
    x, y, _, _ = fmnist
    xb, yb = x[:32], y[:32]
    ds = LocalDataset.write(tmp_path / "data", xb, yb)
    part = TrainablePart.block(m, block)
    # AdamW's first step is about lr * sign(gradient) where |gradient| >> eps: an eps above float32's
    # noise in the smallest gradients keeps the comparison about the mechanism, not rounding.
    cfg = TrainConfig(optimizer=optimizer, learning_rate=0.05 if optimizer == "sgd" else 1e-3,
                      batch_size=32, max_steps=1, adam_eps=1e-5)
    trained, result = train(m, weights, ds, part, cfg, tmp_path / "state", "parity")
    ref_loss, ref = _torch_one_step(zoo.fmnist_cnn(), weights, block, xb, yb, optimizer, cfg.learning_rate,
                                    cfg.adam_eps)
    assert result.losses[0] == pytest.approx(ref_loss, abs=1e-4)
    assert set(trained) == set(part.trainable_names(m))
    for name, value in trained.items():
        np.testing.assert_allclose(value, ref[name], atol=1e-4, err_msg=name)
        assert not np.allclose(value, weights[name]) or "bias" in name  # the step really moved it


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_micro_batches_take_the_same_step_as_the_full_batch(fmnist_model, small_dataset, tmp_path, optimizer):
    m, weights = fmnist_model
    part = TrainablePart.block(m, 1)
    lr = 0.05 if optimizer == "sgd" else 1e-3
    full, _ = train(m, weights, small_dataset, part, TrainConfig(optimizer=optimizer, learning_rate=lr, batch_size=32,
                                                                 max_steps=3), tmp_path / "s", "full")
    micro, res = train(m, weights, small_dataset, part, TrainConfig(optimizer=optimizer, learning_rate=lr,
                                                                    batch_size=32, micro_batch_size=8, max_steps=3),
                       tmp_path / "s", "micro")
    assert res.micro_batch_size == 8
    for name in full:
        np.testing.assert_allclose(micro[name], full[name], atol=2e-5, err_msg=name)


def test_prefix_runs_once_per_prefix_version(fmnist_model, small_dataset, tmp_path):
    m, weights = fmnist_model
    part = TrainablePart.block(m, 2)
    cfg = TrainConfig(batch_size=64, max_steps=2)
    state = tmp_path / "state"
    _, first = train(m, weights, small_dataset, part, cfg, state, "r1")
    trained, second = train(m, weights, small_dataset, part, cfg, state, "r2")
    assert first.prefix_computed and not second.prefix_computed
    # the block's own weights changing does not touch the prefix: still a hit
    _, third = train(m, {**weights, **trained}, small_dataset, part, cfg, state, "r3")
    assert not third.prefix_computed
    # changing a prefix weight invalidates the cache, and the old version is dropped
    changed = dict(weights)
    first_prefix_param = m.layers[0].params[0].name
    changed[first_prefix_param] = weights[first_prefix_param] * 1.01
    _, fourth = train(m, changed, small_dataset, part, cfg, state, "r4")
    assert fourth.prefix_computed
    caches = list((state / "activations").glob("L*.npy"))
    assert len(caches) == 1
    cached = np.load(caches[0], mmap_mode="r")
    assert cached.shape == (len(small_dataset),) + tuple(m.layers[part.span[0]].input_shape)


def test_fp16_cache_halves_disk_and_still_trains(fmnist_model, small_dataset, tmp_path):
    m, weights = fmnist_model
    part = TrainablePart.block(m, 3)
    sizes, losses = {}, {}
    for fp16 in (False, True):
        state = tmp_path / f"state{fp16}"
        _, res = train(m, weights, small_dataset, part, TrainConfig(batch_size=64, epochs=1, cache_fp16=fp16),
                       state, "t")
        sizes[fp16] = sum(p.stat().st_size for p in (state / "activations").glob("*.npy"))
        losses[fp16] = res.loss
    assert sizes[True] < 0.51 * sizes[False]
    assert losses[True] == pytest.approx(losses[False], rel=0.02)


def test_finished_task_is_not_trained_twice(fmnist_model, small_dataset, tmp_path):
    m, weights = fmnist_model
    part = TrainablePart.block(m, 3)
    cfg = TrainConfig(batch_size=64, max_steps=3)
    a, ra = train(m, weights, small_dataset, part, cfg, tmp_path, "same")
    b, rb = train(m, weights, small_dataset, part, cfg, tmp_path, "same")
    assert ra.seconds == rb.seconds  # the stored result, not a new run
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
