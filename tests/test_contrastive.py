"""Self-supervised (SimCLR) training a layer at a time: the contrastive head's step graph against torch autograd,
the device job that trains it on augmented views, the linear probe that judges it, and the schedule."""
from __future__ import annotations

import numpy as np
import pytest

from coordinator.model import zoo
from coordinator.model.export import export
from edge_runtime.wire.part import TrainablePart

B = 12      # images per batch: 2B views


@pytest.fixture(scope="module")
def ssl_model(tmp_path_factory):
    """fmnist_ssl exported (its step graphs built as a board gets them) and the torch model it came from."""
    model = zoo.build("fmnist_ssl")
    manifest = export(model, tmp_path_factory.mktemp("ssl") / "export")
    return manifest, model


@pytest.fixture(scope="module")
def views():
    from edge_runtime.train.augment import positive_pairs, two_views, view_rng
    from edge_runtime.train.datasets import load_fashion_mnist
    x, _ = load_fashion_mnist("test")
    return two_views(x[:B], view_rng(0, 1)), positive_pairs(B)


def _nt_xent(z, temperature: float):
    """SimCLR's NT-Xent over 2B projections (rows i and i + B are two views of one image), as the paper writes it:
    the mean over the 2B anchors of -log(exp(sim(i, pair)) / sum over k != i of exp(sim(i, k)))."""
    import torch
    z = torch.nn.functional.normalize(z, dim=1)
    sim = z @ z.T / temperature
    n = len(z) // 2
    pair = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    others = ~torch.eye(2 * n, dtype=torch.bool)
    denominator = torch.logsumexp(sim.masked_fill(~others, float("-inf")), dim=1)
    return (denominator - sim[torch.arange(2 * n), pair]).mean()


@pytest.mark.parametrize("layers, head", [((0,), "boundary_heads.0"), ((0, 1), "heads.0"), ((4, 5), "heads.2")])
def test_the_contrastive_step_graph_gives_nt_xent_and_its_gradients_as_torch_autograd(ssl_model, views, layers, head):
    import torch

    from coordinator.model import part_graphs
    from edge_runtime.train.ort_backend import StepSession
    from edge_runtime.wire import model_blobs
    manifest, model = ssl_model
    head_index = next(h.index for h in manifest.heads if h.name == head)
    part = TrainablePart.for_layers(manifest, range(layers[0], layers[-1] + 1), head=head_index)
    part_graphs.ensure_part_graphs(manifest, [part])
    session = StepSession(model_blobs.read_part_graph(model_blobs.part_graph_paths(manifest, part)[0]))
    x, pairs = views
    modules = dict(model.named_modules())
    with torch.no_grad():   # the input of the part: the frozen layers before it, in torch
        h = torch.from_numpy(x)
        for i in range(layers[0]):
            h = modules[manifest.layers[i].name](h)
    weights = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    itf = session.interface
    tensors = {n: np.ascontiguousarray(weights[n]) for n in itf.param_inputs + itf.stat_inputs}
    grads = {n: np.empty_like(tensors[n]) for n in itf.trainable}
    loss, _ = session.run(h.numpy(), pairs, 1.0 / len(pairs), tensors, grads)

    model.zero_grad()
    out = h
    for i in layers:
        out = modules[manifest.layers[i].name](out)
    projector = modules[head]
    expected = _nt_xent(projector.project(out), projector.temperature)
    expected.backward()
    assert loss == pytest.approx(expected.item(), rel=1e-4)
    params = dict(model.named_parameters())
    assert set(itf.trainable) == {n for n in params if n.startswith(tuple(manifest.layers[i].name + "." for i in layers))
                                  or n.startswith(head + ".")}
    for name in itf.trainable:
        np.testing.assert_allclose(grads[name], params[name].grad.numpy(), rtol=2e-3, atol=1e-5, err_msg=name)


# -- the linear probe --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def represented(ssl_model):
    """Real representations: fmnist_ssl's layers 0-3 (as initialised) on Fashion-MNIST training and test images."""
    from coordinator.model.export import load_weights
    from coordinator.model.probe import representation
    from edge_runtime.train.datasets import load_fashion_mnist
    manifest, _ = ssl_model
    weights = load_weights(manifest)
    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    fit = (x[:3000], y[:3000])
    test = (xt[:2000], yt[:2000])
    return manifest, weights, fit, test, representation(manifest, weights, fit[0], 3), \
        representation(manifest, weights, test[0], 3)


def test_the_probe_is_fitted_on_its_fitting_set_alone_and_reads_test_labels_only_to_score(represented):
    from coordinator.model.probe import LinearProbe, probe
    manifest, weights, fit, test, f_fit, f_test = represented
    assert f_fit.shape == (3000, 64)       # layer 3's 64 channels, averaged over space
    fitted = LinearProbe.fit(f_fit, fit[1], manifest.num_classes)     # never given a test row
    scrambled = np.random.default_rng(0).permutation(test[1])
    scores = [probe(manifest, weights, fit, (test[0], labels), upto_layer=3) for labels in (test[1], scrambled)]
    # the same probe whatever the test labels say: they change the score, never the fit
    assert scores == [fitted.score(f_test, test[1]), fitted.score(f_test, scrambled)]
    assert scores[0]["accuracy"] > 0.5 > scores[1]["accuracy"]


def test_the_probe_gives_a_reference_logistic_regressions_accuracy_on_a_fixed_representation(represented):
    """The reference: the same objective (mean cross-entropy + l2/2 |W|^2 on standardised features) minimised by
    torch's L-BFGS; both reach its one optimum, so they classify the test rows alike."""
    import torch

    from coordinator.model.probe import L2, LinearProbe
    manifest, _, fit, test, f_fit, f_test = represented
    mean, std = f_fit.mean(axis=0), f_fit.std(axis=0) + 1e-8
    x = torch.tensor((f_fit - mean) / std, dtype=torch.float64)
    y = torch.tensor(fit[1])
    w = torch.zeros(x.shape[1], manifest.num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(manifest.num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=1000, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + 0.5 * L2 * (w * w).sum()
        loss.backward()
        return loss
    opt.step(closure)
    xt = torch.tensor((f_test - mean) / std, dtype=torch.float64)
    reference = ((xt @ w + b).argmax(dim=1).numpy() == test[1]).mean()
    ours = LinearProbe.fit(f_fit, fit[1], manifest.num_classes)
    assert ours.score(f_test, test[1])["accuracy"] == pytest.approx(reference, abs=1.5 / len(test[1]))
    np.testing.assert_allclose(ours.weight, w.detach().numpy(), atol=2e-3)


# -- the schedule, over a real broker ----------------------------------------------------------------------------

def test_layer_wise_self_supervised_training_over_a_real_fleet(tmp_path):
    """Two device agents whose data has no labels train fmnist_ssl a layer at a time with depth dropout; the
    coordinator judges each round by a linear probe fitted on labeled images no device holds."""
    import math

    from fleet_helpers import read_metrics

    from coordinator.local.data import write_fleet_data, write_validation_data
    from coordinator.local.fleet import DeviceSpec, LocalFleet
    from coordinator.model.zoo_profile import measured_profile
    from coordinator.ops.broker import EmbeddedBroker
    from coordinator.state_store import StateStore
    from edge_runtime.train.datasets import LocalDataset
    root = tmp_path
    measured_profile(root, "fmnist_ssl", [32, 64])
    dirs = write_fleet_data(root / "data", ["a", "b"], samples=1200, alpha=0.5)
    for folder in dirs.values():       # no labels on the devices
        data = LocalDataset(folder)
        LocalDataset.write(folder, np.load(data.inputs_path), np.zeros(len(data), np.int64))
    write_validation_data(root / "validation", samples=1200, count=1000)
    config = {"service": {"workdir": str(root / "coordinator"), "model": "fmnist_ssl", "strategy": "layerwise",
                          "profile": str(root / "profile.json"), "min_devices": 2, "round_deadline_s": 300.0,
                          "eval_samples": 1000, "validation_data": str(root / "validation"),
                          "validation_samples": 1000},
              "train": {"learning_rate": 2e-3, "local_epochs": 1.0, "batch_sizes": [64]},
              "layerwise": {"rounds_per_layer": 1, "min_rounds_per_layer": 1, "dropout": 0.5, "frozen_after": 0}}
    specs = [DeviceSpec(d, "ssl", 400, dirs[d]) for d in dirs]
    with EmbeddedBroker(root / "broker") as broker, LocalFleet(root, broker.url, "ssl") as fleet:
        fleet.start_run(config, specs)
        assert fleet.follow(root / "coordinator", lambda m: None) == 0, fleet.log_tail("coordinator")
    metrics = read_metrics(root / "coordinator")
    assert [m["stage"]["layer"] for m in metrics] == list(range(6))
    plans = [r.plan for r in StateStore(root / "coordinator" / "state.db", readonly=True).closed_round_rows()]
    skipped = {i for plan in plans for a in plan["assignments"] for i in a["skip"]}
    for m in metrics:
        layer = m["stage"]["layer"]
        for device in m["devices"].values():
            assert device["status"] == "accepted" and device["layers"] == [0, layer]   # from the images, every time
            assert device["trainable"] == [layer]
            # NT-Xent of 64 views: chance is ln(63)
            assert 0 < device["loss"] < math.log(63)
        # a probe on the trained layer's representation, well above chance (10 %) from the first round
        assert m["accuracy"] > 0.5 and m["eval_layer"] == layer
    # depth dropout drops frozen residual layers only, below the one training
    assert skipped and skipped <= {1, 2, 4}
    assert all(i < a["trainable"][0] for plan in plans for a in plan["assignments"] for i in a["skip"])
