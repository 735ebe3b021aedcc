"""Depth dropout in training: frozen skippable layers of a part replaced by identity, on real
step graphs and Fashion-MNIST (resnet_small, whose residual layers are skippable).

resnet_small's layers: 0 conv, 1-2 residual (32 ch), 3 strided conv, 4-6 residual (64 ch);
layer i is `model.layers()[i]` in torch.
"""
import numpy as np
import pytest
import torch
from conftest import build_graphs

from coordinator.model.graphs import GraphLibrary, forward_graph
from edge_runtime.errors import IntegrityError, ManifestError
from edge_runtime.jobs.worker import JobSpec, run_worker
from edge_runtime.train.ort_backend import ForwardSession
from edge_runtime.train.trainer import _batches, prepare_part, train
from edge_runtime.wire.part import TrainablePart
from edge_runtime.wire.train_config import TrainConfig


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    from coordinator.model import export, zoo
    m = export.export(zoo.resnet_small(), tmp_path_factory.mktemp("resnet_small"))
    return m, export.load_weights(m)


def _torch_without(weights, skipped):
    """resnet_small in torch with the given layers replaced by identity (their Residual removed)."""
    from coordinator.model import zoo
    model = zoo.resnet_small()
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()})
    for i in skipped:
        prefix, _, b = model.layers()[i]
        model.blocks[b][int(prefix.rsplit(".", 1)[1])] = torch.nn.Identity()
    return model


def _lacking(m, weights, layers):
    drop = set(m.param_names(layers))
    assert drop
    return {k: v for k, v in weights.items() if k not in drop}


def test_training_with_a_skipped_frozen_layer(resnet, small_dataset, tmp_path):
    m, weights = resnet
    part = TrainablePart.for_layers(m, {1}, skip={5})  # 2, 3, 4, 6 frozen; 5 skipped; final head
    assert part.span == (1, 2, 3, 4, 5, 6) and part.skip == (5,)
    skipped_names = set(m.param_names([5]))
    assert not skipped_names & set(part.required_names(m) + part.all_names(m) + part.frozen_names(m))
    assert TrainablePart.from_dict(part.to_dict()) == part
    assert TrainablePart.from_dict({k: v for k, v in part.to_dict().items() if k != "skip"}).skip == ()  # old specs

    state = tmp_path / "state"
    partial = _lacking(m, weights, [5])  # the skipped layer's weights are not needed at all
    others = [TrainablePart.for_layers(m, {1}, skip={4, 5}), TrainablePart.for_layers(m, {1})]
    build_graphs(m, part, *others)
    assert len({p.key(m) for p in [part, *others]}) == 3     # each skip set is a step graph of its own
    trained, res = train(m, partial, small_dataset, part, TrainConfig(batch_size=64, learning_rate=3e-3, epochs=2),
                         state, "dd")
    assert sorted(trained) == sorted(part.trainable_names(m))
    for name in trained:
        assert not np.allclose(trained[name], weights[name]), name
    first, last = np.mean(res.losses[:5]), np.mean(res.losses[-5:])
    assert last < first - 0.2, res.losses

    # the prefix cache is not affected by skip
    _, again = train(m, partial, small_dataset, part, TrainConfig(batch_size=64, max_steps=1), state, "dd2")
    assert not again.prefix_computed
    _, other = train(m, weights, small_dataset, others[0], TrainConfig(batch_size=64, max_steps=1), state, "dd3")
    assert not other.prefix_computed
    _, none = train(m, weights, small_dataset, others[1], TrainConfig(batch_size=64, max_steps=1), state, "dd4")
    assert none.steps == 1
    # without skipping, the layer's weights are needed
    with pytest.raises(IntegrityError, match="lack"):
        train(m, partial, small_dataset, TrainablePart.for_layers(m, {1}), TrainConfig(max_steps=1), state, "dd5")


def test_the_skipped_graph_is_the_model_without_that_residual(resnet, small_dataset, fmnist, tmp_path):
    m, weights = resnet
    _, _, xt, _ = fmnist
    x = xt[:64]
    final = m.final_head.index
    partial = _lacking(m, weights, [2, 5])
    model = _torch_without(weights, [2, 5]).eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
        full = _torch_without(weights, []).eval()(torch.from_numpy(x)).numpy()
    graph = forward_graph(GraphLibrary(m), range(len(m.layers)), final, skip=[2, 5])
    out = ForwardSession(graph.SerializeToString()).run(x, partial)
    np.testing.assert_allclose(out, ref, atol=1e-4)
    assert not np.allclose(out, full, atol=1e-2)  # the branches really were removed

    # the training graph too: one SGD step of layer 1 with 2 and 5 skipped equals torch's on the model without them
    part = TrainablePart.for_layers(m, {1}, skip=[5, 2])
    build_graphs(m, part)
    cfg = TrainConfig(optimizer="sgd", learning_rate=0.05, batch_size=32, max_steps=2, seed=3)
    trained, res = train(m, partial, small_dataset, part, cfg, tmp_path / "state", "sgd")
    xs, ys = np.load(small_dataset.inputs_path), small_dataset.labels()
    params = dict(model.train().named_parameters())
    names = part.trainable_names(m)
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)
    opt = torch.optim.SGD([params[n] for n in names], lr=cfg.learning_rate)
    ref_losses = []
    for _, idx in _batches(len(ys), cfg.batch_size, 2, cfg.seed):
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(xs[idx])), torch.from_numpy(ys[idx].astype(np.int64)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref_losses.append(loss.item())
    np.testing.assert_allclose(res.losses, ref_losses, atol=1e-4)
    for n in names:
        np.testing.assert_allclose(trained[n], params[n].detach().numpy(), atol=1e-4, err_msg=n)


def test_skipping_does_not_need_more_memory(resnet, small_dataset, tmp_path):
    """Peak RSS of the same training job in a child process, with and without skipping frozen layers."""
    m, weights = resnet
    config = {"batch_size": 256, "max_steps": 4, "threads": 1}
    peaks = {}
    for label, skip in [("no skip", ()), ("skip 2,4,5", (2, 4, 5))]:
        part = TrainablePart.for_layers(m, {1}, skip=skip)  # layers 2..6 frozen after the trainable one
        state = tmp_path / label.replace(" ", "_").replace(",", "")
        # build the graphs and the prefix cache here, so the child measures training alone
        build_graphs(m, part)
        _, inputs, _, _ = prepare_part(m, part, weights, small_dataset, TrainConfig.from_dict(config), state)
        inputs.close()
        spec = JobSpec(manifest=str(m.root / "manifest.json"), weights=str(m.graph_path(m.weights)),
                       dataset=str(small_dataset.root), state_dir=str(state), task_id="mem",
                       part=part.to_dict(), config=config)
        report, child = run_worker(spec, tmp_path / "jobs" / state.name)
        assert report is not None and report["ok"], (report, child.stderr[-2000:])
        assert not report["result"]["prefix_computed"]
        peaks[label] = child.peak_rss_bytes
    print("\npeak RSS of training resnet_small layer 1 (batch 256): "
          + ", ".join(f"{k}: {v / 2**20:.1f} MiB" for k, v in peaks.items()))
    assert peaks["skip 2,4,5"] <= peaks["no skip"], peaks


@pytest.mark.parametrize("layers, skip, message", [
    ({1, 2}, {2}, r"cannot skip layer 2 \(.*\): it is a trainable layer"),
    ({1}, {3}, r"cannot skip layer 3 \(.*\): the manifest does not mark it skippable"),
    ({4}, {2}, r"cannot skip layer 2: it lies outside span \(4, 5, 6\)"),
    ({1}, {9}, r"cannot skip layer 9: it lies outside span"),
    ({1}, ["5"], "integer layer indices"),
])
def test_a_bad_skip_set_is_refused(resnet, layers, skip, message):
    m, _ = resnet
    with pytest.raises(ManifestError, match=message):
        TrainablePart.for_layers(m, layers, skip=skip)


def test_a_bad_skip_in_a_job_spec_is_refused_before_building(resnet, tmp_path):
    m, weights = resnet
    raw = TrainablePart.for_layers(m, {1}).to_dict()
    part = TrainablePart.from_dict({**raw, "skip": [1]})
    with pytest.raises(ManifestError, match="trainable layer"):
        part.validate(m)
    with pytest.raises(ManifestError, match="trainable layer"):
        build_graphs(m, part)


def test_a_task_sends_no_weights_for_the_layers_it_skips(resnet, tmp_path):
    from edge_runtime.wire import model_blobs
    from edge_runtime.wire.transfer import BlobStore
    m, weights = resnet
    store = BlobStore(tmp_path / "blobs")
    index = model_blobs.publish_weights(m, weights, store)
    part = TrainablePart.for_layers(m, [1], skip=[2, 5])
    build_graphs(m, part)
    step, prefix = model_blobs.part_graph_paths(m, part)
    graphs = {"step.onnx": store.put_file(step), "prefix.onnx": store.put_file(prefix)}
    names = [b["name"] for b in model_blobs.task_blobs(m, part, index, store, graphs)]
    assert "weights/layer.1" in names and "weights/layer.2" not in names and "weights/layer.5" not in names
    assert "weights/layer.4" in names                                  # frozen, not skipped: still needed
