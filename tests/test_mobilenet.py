"""mobilenet_v2: BatchNorm end to end, on real step graphs, real onnxruntime and real Fashion-MNIST.

BatchNorm's running mean and variance are tensors of kind "stat": exported by name without
values in the graphs, trained by the step graph's forward pass (never by a gradient), sent
in the update, and used by inference-mode BatchNorm in the frozen prefix and in evaluation.
Every result is compared with torch on the same weights and the same batches.

mobilenet_v2's layers (`model.layers()[i]` in torch): 0 stem, 1 inverted residual to 16
channels (block 0, 32x32); 2-3 the 24-channel stage (block 1, 16x16; layer 3 is a residual);
... 18 the final 1x1 convolution to 1280 channels (block 6).
"""
import time

import numpy as np
import pytest
import torch
from conftest import build_graphs

from coordinator.local.data import as_rgb32
from coordinator.model import export, zoo
from coordinator.model.block_model import BlockModel
from coordinator.model.graphs import GraphLibrary, evaluate
from edge_runtime.jobs.worker import JobSpec, run_worker
from edge_runtime.train.datasets import LocalDataset
from edge_runtime.train.trainer import _batches, train
from edge_runtime.wire import weights as wcodec
from edge_runtime.wire.manifest import Manifest
from edge_runtime.wire.part import TrainablePart
from edge_runtime.wire.train_config import TrainConfig

STATS = ("running_mean", "running_var")
ATOL = 1e-4


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory):
    """mobilenet_v2 exported once (its whole-model and per-head step graphs built: the export's own check)."""
    m = export.export(zoo.mobilenet_v2(), tmp_path_factory.mktemp("mobilenet_v2"))
    return m, export.load_weights(m)


@pytest.fixture(scope="module")
def rgb_data(fmnist, tmp_path_factory):
    """256 training images and 300 test images of Fashion-MNIST as 3x32x32: (local dataset, test x, test y)."""
    x, y, xt, yt = fmnist
    idx = np.random.default_rng(7).choice(len(y), 256, replace=False)
    local = LocalDataset.write(tmp_path_factory.mktemp("rgb256"), as_rgb32(x[idx]), y[idx])
    return local, as_rgb32(xt[:300]), yt[:300]


def _torch_model(weights) -> BlockModel:
    """mobilenet_v2 in torch holding exactly these weights (num_batches_tracked is not exported)."""
    model = zoo.mobilenet_v2(seed=123)
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()},
                                                strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), missing
    return model


def _torch_sgd(model: BlockModel, part: TrainablePart, m, dataset: LocalDataset, cfg: TrainConfig, steps: int):
    """What the device does, in torch: the frozen prefix in eval mode (running statistics), the span and its
    head in train mode (batch statistics, running statistics updated), SGD on the part's trainable parameters,
    the trainer's batches in the trainer's order. Returns the losses."""
    layers = model.layers()
    model.train()
    for i in range(part.span[0]):
        layers[i][1].eval()
    head = model.get_submodule(m.heads[part.head].name)
    names = set(part.trainable_names(m))
    params = dict(model.named_parameters())
    for n, p in params.items():
        p.requires_grad_(n in names)
    opt = torch.optim.SGD([params[n] for n in part.trainable_names(m)], lr=cfg.learning_rate)
    xs, ys = np.load(dataset.inputs_path), dataset.labels()
    losses = []
    for _, idx in _batches(len(ys), cfg.batch_size, steps, cfg.seed):
        x = torch.from_numpy(xs[idx])
        for i in range(part.span[-1] + 1):
            x = layers[i][1](x)
        loss = torch.nn.functional.cross_entropy(head(x), torch.from_numpy(ys[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_export_lists_batchnorm_statistics_by_state_dict_name_without_values_in_the_graphs(mobilenet):
    m, weights = mobilenet
    model = zoo.mobilenet_v2()
    state = model.state_dict()
    specs = m.param_specs()
    stats = {n for n, s in specs.items() if s.kind == "stat"}
    assert stats == {k for k in state if k.endswith(STATS)} and len(stats) == 2 * 52   # 52 BatchNorms
    assert {n for n, s in specs.items() if s.kind == "param"} == {n for n, _ in model.named_parameters()}
    assert not any("num_batches_tracked" in n for n in specs)
    for name in stats:
        assert specs[name].shape == tuple(state[name].shape)
        np.testing.assert_array_equal(weights[name], state[name].numpy(), err_msg=name)   # initial values
    # a layer's statistics are its own: layer 2 (the 24-channel stage's first layer) has three BatchNorms
    assert m.param_names([2], kind="stat") == [f"blocks.1.0.{k}.{s}" for k in (1, 4, 7) for s in STATS]
    # every graph holds the statistics as initializers with their shapes but no values
    lib = GraphLibrary(m)
    for spec, graph in [(l, lib.layer(l.index)) for l in m.layers] + [(h, lib.head(h.index)) for h in m.heads]:
        inits = {t.name: t for t in graph.graph.initializer}
        for p in spec.params:
            t = inits[p.name]
            assert tuple(t.dims) == p.shape and not t.raw_data and not t.float_data, p.name
    assert sum(s.nbytes for s in specs.values() if s.kind == "param") // 4 == \
        sum(p.numel() for p in model.parameters())


def test_a_batchnorm_without_momentum_or_running_statistics_is_refused(tmp_path):
    from torch import nn
    for bn, message in [(nn.BatchNorm2d(4, momentum=None), "momentum None"),
                        (nn.BatchNorm2d(4, track_running_stats=False), "track_running_stats=False")]:
        model = BlockModel("bn", (1, 8, 8), 10, [[nn.Sequential(nn.Conv2d(1, 4, 3), bn, nn.ReLU())]],
                           [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))])
        with pytest.raises(export.ExportError, match=message):
            export.export(model, tmp_path / message.split()[0], check_trainable=False)


def test_a_block_trains_through_the_device_job_and_its_running_statistics_match_torch(mobilenet, rgb_data,
                                                                                      tmp_path):
    """Four SGD steps of block 1 in a job child; the update equals torch's parameters and running statistics.

    Small steps on purpose: BatchNorm puts many pre-activations next to ReLU6's kink at 0, where
    float32 rounding decides whether a gradient passes. Both float32 paths differ from float64
    gradients by up to 6e-3 relative for a few tensors (measured; torch as much as the step graph,
    depending on the data), so large or many steps make the two runs drift apart, not wrong.
    """
    m, weights = mobilenet
    dataset = rgb_data[0]
    part = TrainablePart.block(m, 1)                 # layers 2-3 and head 1; layers 0-1 the frozen prefix
    build_graphs(m, part)
    config = {"optimizer": "sgd", "learning_rate": 0.02, "batch_size": 64, "epochs": 1.0, "seed": 5, "threads": 1}
    spec = JobSpec(manifest=str(m.root / "manifest.json"), weights=str(m.graph_path(m.weights)),
                   dataset=str(dataset.root), state_dir=str(tmp_path / "state"), task_id="block1",
                   part=part.to_dict(), config=config, update_out=str(tmp_path / "update.safetensors"))
    t0 = time.monotonic()
    report, child = run_worker(spec, tmp_path / "jobs")
    assert report is not None and report["ok"], (report, child.stderr[-2000:])
    result = report["result"]
    update = wcodec.load(tmp_path / "update.safetensors")
    stat_names = m.param_names(part.trainable_layers, kind="stat")
    assert len(stat_names) == 2 * 3 * 2
    assert sorted(update) == sorted(part.trainable_names(m) + stat_names) == sorted(part.update_names(m))

    cfg = TrainConfig.from_dict(config)
    model = _torch_model(weights)
    ref_losses = _torch_sgd(model, part, m, dataset, cfg, steps=result["steps"])
    np.testing.assert_allclose(result["losses"], ref_losses, atol=ATOL)
    state = model.state_dict()
    for name in update:
        np.testing.assert_allclose(update[name], state[name].numpy(), atol=ATOL, err_msg=name)
    for name in stat_names:      # the statistics did move: training updated them, as torch's BatchNorm does
        moved = float(np.abs(update[name] - weights[name]).max())
        assert moved > (1e-2 if name.endswith("var") else 1e-5), (name, moved)
    params = sum(m.param_specs()[n].nbytes for n in part.trainable_names(m)) // 4
    print(f"\nmobilenet_v2 block 1 (layers 2-3 + head 1, {params} parameters) trained {result['steps']} SGD steps "
          f"at batch 64 in {time.monotonic() - t0:.1f} s; "
          f"the job reported a peak RSS of {result['peak_rss_bytes'] / 2**20:.1f} MiB "
          f"(child VmHWM {child.peak_rss_bytes / 2**20:.1f} MiB)")


def test_one_step_with_a_frozen_batchnorm_layer_inside_the_span_matches_torch(mobilenet, rgb_data, tmp_path):
    """Layer 2 trains, layer 3 (a residual with three BatchNorms) is frozen but runs in the span: its BatchNorms
    normalize with batch statistics, as a torch module in train mode with frozen parameters does."""
    m, weights = mobilenet
    dataset = rgb_data[0]
    part = TrainablePart.for_layers(m, [2], head=m.head_for_boundary(3))
    assert part.span == (2, 3) and part.trainable_layers == (2,)
    build_graphs(m, part)
    cfg = TrainConfig(optimizer="sgd", learning_rate=0.1, batch_size=64, max_steps=1, seed=2, threads=1)
    trained, res = train(m, weights, dataset, part, cfg, tmp_path / "state", "frozen-bn")
    assert sorted(trained) == sorted(part.trainable_names(m) + m.param_names([2], kind="stat"))
    assert not set(trained) & set(m.param_names([3]))        # the frozen layer sends nothing, statistics included

    model = _torch_model(weights)
    ref_losses = _torch_sgd(model, part, m, dataset, cfg, steps=1)
    np.testing.assert_allclose(res.losses, ref_losses, atol=ATOL)
    state = model.state_dict()
    for name in trained:
        np.testing.assert_allclose(trained[name], state[name].numpy(), atol=ATOL, err_msg=name)
    assert not np.allclose(trained["blocks.1.0.0.weight"], weights["blocks.1.0.0.weight"])


def test_evaluation_uses_the_running_statistics_as_torch_eval_does(mobilenet, rgb_data):
    m, weights = mobilenet
    _, xt, yt = rgb_data
    rng = np.random.default_rng(0)
    moved = dict(weights)   # statistics far from their initial 0 and 1, so using them (or not) shows
    for name, spec in m.param_specs().items():
        if spec.kind == "stat":
            moved[name] = (rng.normal(0, 0.3, spec.shape) if name.endswith("mean")
                           else rng.uniform(0.5, 2.0, spec.shape)).astype(np.float32)
    model = _torch_model(moved).eval()
    for block in (1, len(m.blocks) - 1):
        got = evaluate(m, moved, xt, yt, upto_block=block, threads=1)
        with torch.no_grad():
            logits = model(torch.from_numpy(xt), upto_block=block)
        loss = torch.nn.functional.cross_entropy(logits.double(), torch.from_numpy(yt)).item()
        accuracy = float((logits.argmax(1).numpy() == yt).mean())
        assert abs(got["loss"] - loss) <= ATOL and abs(got["accuracy"] - accuracy) <= 1 / len(yt), (block, got, loss)
        if block == 1:
            initial = evaluate(m, weights, xt, yt, upto_block=block, threads=1)
            assert abs(initial["loss"] - got["loss"]) > 1e-3   # the statistics made a difference


# --------------------------------------------------------------------------- a fleet over a real Mosquitto

FLEET_MB = 220       # per device, agent and jobs: block 0 at batch 32 measured about 110 MB, the agent about 40 MB


def test_mobilenet_trains_progressively_over_mqtt_with_every_device_inside_its_budget(fmnist, tmp_path):
    """The coordinator and two device agents as processes on a real Mosquitto: two rounds of block 0 (the stem and
    the first inverted residual) on 300 images each; the running statistics travel with the weights."""
    import shutil

    from fleet_helpers import MB, LocalFleet, read_metrics, settings

    from coordinator.local.data import write_fleet_data
    from coordinator.local.fleet import DeviceSpec
    from coordinator.model.zoo_profile import measured_profile
    from coordinator.ops.broker import EmbeddedBroker
    _, _, xt, yt = fmnist
    profile = measured_profile(tmp_path / "profiled", "mobilenet_v2", [16, 32], candidates=[(0, 0), (0, 1)])
    work = tmp_path / "run"
    # the coordinator would export the same model again (deterministic, so the profile's manifest hash matches)
    shutil.copytree(tmp_path / "profiled" / "model", work / "coordinator" / "model")
    eval_dir = LocalDataset.write(tmp_path / "eval", as_rgb32(xt[:1000]), yt[:1000]).root
    dirs = write_fleet_data(tmp_path / "data", ["dev-0", "dev-1"], 600, alpha=100.0, shift=as_rgb32)
    specs = [DeviceSpec(d, "pi-zero-2w", FLEET_MB, dirs[d]) for d in dirs]
    s = settings(work / "coordinator", profile, "progressive", model="mobilenet_v2", min_devices=2, max_rounds=2,
                 eval_data=str(eval_dir), eval_samples=1000)
    s["train"].update(batch_sizes=[16, 32], learning_rate=1e-2, local_epochs=3.0)
    s["progressive"].update(shrink_rounds=0, min_rounds_per_block=2, max_rounds_per_block=2, max_extra_blocks=0)
    broker = EmbeddedBroker(tmp_path / "broker").start()
    try:
        with LocalFleet(work, broker.url, fleet="mobilenet") as fleet:
            fleet.start_run(s, specs)
            code = fleet.wait("coordinator", timeout_s=240)
            assert code == 0, fleet.log_tail("coordinator")
    finally:
        broker.stop()
    metrics = read_metrics(work / "coordinator")
    assert [m["round"] for m in metrics] == [1, 2], metrics
    accuracies = [round(m["accuracy"], 3) for m in metrics]
    # chance is 0.1; measured 0.22 then 0.35 (two layers and a GAP head, 60 local steps in all)
    assert metrics[-1]["accuracy"] >= 0.25 and metrics[-1]["accuracy"] > metrics[0]["accuracy"], accuracies
    for m in metrics:
        assert sorted(m["devices"]) == ["dev-0", "dev-1"], m["idle"]
        for device, row in m["devices"].items():
            assert row["status"] == "accepted", (m["round"], device, row)
            assert row["layers"] == [0, 1], row
            # up: the block's parameters and running statistics (trained_bytes counts both), plus a header
            assert row["uploaded_bytes"] <= row["trained_bytes"] * 1.02 + 4096, (m["round"], device, row)
            assert row["peak_rss_bytes"] <= row["budget_bytes"], (m["round"], device, row)
            assert row["peak_rss_bytes"] + row["agent_peak_rss_bytes"] <= FLEET_MB * MB, (m["round"], device, row)
    # the global model's running statistics moved: the devices' updates carried them and they were averaged
    from coordinator.cli import main as cli
    assert cli(["weights", str(work / "coordinator"), str(tmp_path / "global.safetensors")]) == 0
    final = wcodec.load(tmp_path / "global.safetensors")
    initial = export.load_weights(Manifest.load(work / "coordinator" / "model" / "manifest.json"))
    block0_stats = [n for n in initial if n.startswith(("blocks.0.0.", "blocks.0.1.")) and n.endswith(STATS)]
    assert len(block0_stats) == 2 * 3
    assert all(not np.array_equal(final[n], initial[n]) for n in block0_stats)
    assert all(np.array_equal(final[n], initial[n]) for n in initial if n.startswith("blocks.1."))
    print(f"\nmobilenet_v2 over MQTT, block 0 for two rounds: accuracy {accuracies}; peaks "
          + ", ".join(f"{d} {r['peak_rss_bytes'] / MB:.0f}+{r['agent_peak_rss_bytes'] / MB:.0f} MB"
                      for d, r in metrics[-1]["devices"].items()))
