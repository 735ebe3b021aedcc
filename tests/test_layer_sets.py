"""Arbitrary trainable layer sets and layer gradient scores, on real step graphs and Fashion-MNIST."""
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_graphs

from coordinator.model.graphs import evaluate
from edge_runtime.errors import ManifestError
from edge_runtime.jobs.worker import JobSpec, run_worker
from edge_runtime.train.layer_scores import score_groups, score_layers, scores_from_json
from edge_runtime.train.trainer import _batches, train
from edge_runtime.wire.part import TrainablePart
from edge_runtime.wire.train_config import TrainConfig


def _torch_model(weights):
    from coordinator.model import zoo
    model = zoo.fmnist_cnn()
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()})
    return model


def _torch_part_loss(model, m, part, x, y):
    """Mean cross-entropy of the part in torch: frozen prefix without grad, span, head."""
    layers = [module for _, module, _ in model.layers()]
    h = torch.from_numpy(np.ascontiguousarray(x))
    with torch.no_grad():
        for i in range(part.span[0]):
            h = layers[i](h)
    for i in part.span:
        h = layers[i](h)
    logits = model.get_submodule(m.heads[part.head].name)(h)
    return torch.nn.functional.cross_entropy(logits, torch.from_numpy(y.astype(np.int64)))


def _data(dataset):
    return np.load(dataset.inputs_path), dataset.labels()


def test_for_layers_spans_from_the_first_trainable_layer_to_the_head(fmnist_model):
    m, _ = fmnist_model
    final = m.final_head.index
    part = TrainablePart.for_layers(m, {3, 1})
    assert (part.span, part.trainable_layers, part.head, part.train_head) == ((1, 2, 3, 4), (1, 3), final, True)
    assert part.trainable_names(m) == m.param_names([1, 3], [final])
    assert part.frozen_names(m) == m.param_names([2, 4])
    frozen_head = TrainablePart.for_layers(m, [1, 3], train_head=False)
    assert frozen_head.trainable_names(m) == m.param_names([1, 3])
    assert frozen_head.frozen_names(m) == m.param_names([2, 4], [final])
    after_2 = next(h.index for h in m.heads if h.attach_after_layer == 2)
    assert TrainablePart.for_layers(m, [1], head=after_2).span == (1, 2)
    assert TrainablePart.from_dict(part.to_dict()) == part


@pytest.mark.parametrize("layers, head, message", [
    ([], None, "empty layer set"),
    ([1, 5], None, r"layer\(s\) \[5\] out of range: fmnist_cnn has layers 0..4"),
    ([-1], None, r"layer\(s\) \[-1\] out of range"),
    (["2"], None, "integer layer indices"),
    (3, None, "a collection of layer indices"),
    ([1, 3], "after layer 1", r"attaches after layer 1, before trainable layer\(s\) \[3\]"),
    ([1], 99, "head 99 does not exist"),
])
def test_a_bad_layer_set_is_refused_clearly(fmnist_model, layers, head, message):
    m, _ = fmnist_model
    if head == "after layer 1":
        head = next(h.index for h in m.heads if h.attach_after_layer == 1)
    with pytest.raises(ManifestError, match=message):
        TrainablePart.for_layers(m, layers, head=head)


def test_a_layer_set_trains_with_frozen_layers_between_and_after(fmnist_model, small_dataset, fmnist, tmp_path):
    m, weights = fmnist_model
    _, _, xt, yt = fmnist
    part = TrainablePart.for_layers(m, {1, 3})  # layer 2 frozen in between, layer 4 frozen after, final head
    build_graphs(m, part)
    step = m.file(f"parts/{part.key(m)}/step.onnx")
    built_at = step.stat().st_mtime_ns
    state = tmp_path / "state"
    before = evaluate(m, weights, xt[:500], yt[:500])
    trained, first = train(m, weights, small_dataset, part, TrainConfig(batch_size=64, epochs=1), state, "r1")
    assert first.prefix_computed
    # the update is exactly the trainable parameters: frozen layers are not in it at all
    assert sorted(trained) == sorted(part.trainable_names(m))
    assert not set(trained) & set(part.frozen_names(m))
    for name in trained:
        assert not np.allclose(trained[name], weights[name]), name
    after = evaluate(m, {**weights, **trained}, xt[:500], yt[:500])
    assert after["loss"] < before["loss"] - 0.5, (before, after)
    assert after["accuracy"] > before["accuracy"] + 0.3, (before, after)

    # same set, new weights: the step graph is the same file (weights are fed by name), the prefix cache too
    build_graphs(m, part)
    assert step.stat().st_mtime_ns == built_at
    _, second = train(m, {**weights, **trained}, small_dataset, part, TrainConfig(batch_size=64, max_steps=2),
                      state, "r2")
    assert not second.prefix_computed
    # a different set is a different step graph
    other = TrainablePart.for_layers(m, {2, 4})
    assert other.key(m) != part.key(m)
    build_graphs(m, other)
    _, third = train(m, weights, small_dataset, other, TrainConfig(batch_size=64, max_steps=2), state, "r3")
    assert third.steps == 2


def test_a_layer_set_takes_torchs_sgd_steps(fmnist_model, small_dataset, tmp_path):
    """Two SGD steps of {1, 3} equal torch's: gradients pass back through frozen layer 2, and
    frozen layers 2 and 4 stay put inside the session (the second step runs through them)."""
    m, weights = fmnist_model
    part = TrainablePart.for_layers(m, {1, 3})
    build_graphs(m, part)
    cfg = TrainConfig(optimizer="sgd", learning_rate=0.05, batch_size=32, max_steps=2, seed=3)
    trained, result = train(m, weights, small_dataset, part, cfg, tmp_path / "state", "sgd")

    x, y = _data(small_dataset)
    model = _torch_model(weights)
    params = dict(model.named_parameters())
    opt = torch.optim.SGD([params[n] for n in part.trainable_names(m)], lr=cfg.learning_rate)
    ref_losses = []
    for _, idx in _batches(len(y), cfg.batch_size, 2, cfg.seed):
        loss = _torch_part_loss(model, m, part, x[idx], y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref_losses.append(loss.item())
    np.testing.assert_allclose(result.losses, ref_losses, atol=1e-4)
    for name in part.trainable_names(m):
        np.testing.assert_allclose(trained[name], params[name].detach().numpy(), atol=1e-4, err_msg=name)


def _torch_scores(m, weights, part, x, y, batches):
    model = _torch_model(weights)
    params = dict(model.named_parameters())
    groups = score_groups(m, part)
    sums = dict.fromkeys(groups, 0.0)
    for idx in batches:
        loss = _torch_part_loss(model, m, part, x[idx], y[idx])
        names = [n for group in groups.values() for n in group]
        grads = dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names])))
        for key, group in groups.items():
            sums[key] += sum(float((grads[n].double() ** 2).sum()) for n in group)
    return sums


@pytest.mark.parametrize("layers, head_after, train_head", [
    ({1, 3}, None, True),       # frozen layer between and after, final head
    (range(5), None, True),     # every layer from the raw input (no prefix)
    ({1}, 2, False),            # a boundary head, frozen
])
def test_scores_equal_torch_autograd(fmnist_model, small_dataset, tmp_path, layers, head_after, train_head):
    m, weights = fmnist_model
    head = None if head_after is None else next(h.index for h in m.heads if h.attach_after_layer == head_after)
    part = TrainablePart.for_layers(m, layers, head=head, train_head=train_head)
    build_graphs(m, part)
    cfg = TrainConfig(optimizer="sgd", batch_size=64, micro_batch_size=24, max_steps=3, seed=5)
    snapshot = {k: v.copy() for k, v in weights.items()}
    out = score_layers(m, weights, small_dataset, part, cfg, tmp_path / "state")
    assert (out["batches"], out["samples"]) == (3, 192)
    expected_keys = sorted(part.trainable_layers) + (["head"] if train_head else [])
    assert list(out["scores"]) == expected_keys

    x, y = _data(small_dataset)
    batches = [idx for _, idx in _batches(len(y), cfg.batch_size, 3, cfg.seed)]
    ref = _torch_scores(m, weights, part, x, y, batches)
    for key, value in ref.items():
        assert value > 0
        assert out["scores"][key] == pytest.approx(value, rel=1e-3), key
    for k, v in snapshot.items():
        np.testing.assert_array_equal(weights[k], v)


def test_scoring_through_the_worker_child(fmnist_model, small_dataset, tmp_path):
    m, weights = fmnist_model
    weights_file = m.graph_path(m.weights)
    sha_before = hashlib.sha256(weights_file.read_bytes()).hexdigest()
    part = TrainablePart.for_layers(m, {2, 4})  # layer 3 frozen in between
    build_graphs(m, part)
    state = tmp_path / "state"
    config = {"batch_size": 250, "micro_batch_size": 125, "threads": 1}
    spec = JobSpec(manifest=str(m.root / "manifest.json"), weights=str(weights_file), dataset=str(small_dataset.root),
                   state_dir=str(state), task_id="score-1", part=part.to_dict(), config=config,
                   mode="score", scores_out=str(tmp_path / "scores.json"))
    report, child = run_worker(spec, tmp_path / "jobs")
    assert report is not None and report["ok"], (report, child.stderr[-2000:])
    assert report["mode"] == "score" and report["update"] is None
    result = report["result"]
    assert (result["batches"], result["samples"]) == (math.ceil(2000 / 250), 2000)  # one pass over the local data
    scores = scores_from_json(result["scores"])
    assert list(scores) == [2, 4, "head"]
    assert all(v > 0 and math.isfinite(v) for v in scores.values())
    assert json.loads(Path(spec.scores_out).read_text()) == result
    # nothing changed, nothing to send back
    assert hashlib.sha256(weights_file.read_bytes()).hexdigest() == sha_before
    assert not list(state.rglob("*.safetensors"))
    # the child computes what this process computes
    here = score_layers(m, weights, small_dataset, part, TrainConfig.from_dict(config), state)
    assert not here["prefix_computed"]  # the child's prefix cache is reused
    for key, value in here["scores"].items():
        assert scores[key] == pytest.approx(value, rel=1e-4), key
