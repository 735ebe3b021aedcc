"""A user's own model: the block list's form, untrainable ops named by module, and a frozen prefix that trains.

GroupNorm exports as ONNX InstanceNormalization, which has no gradient on the device. In a
model's first layers it is accepted as the frozen prefix (forward only, never trained);
anywhere else it refuses the export, naming the user's module. Tiny 1x8x8 models keep
every export to a second or two.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from coordinator.model import export
from coordinator.model.block_model import BlockModel
from coordinator.model.graphs import evaluate
from coordinator.model.part_graphs import ensure_part_graphs
from coordinator.strategies.base import Device
from coordinator.strategies.fedavg import FedAvg
from coordinator.strategies.layerwise import LayerWise
from coordinator.strategies.progressive import Progressive
from coordinator.strategies.selective import Selective
from edge_runtime.errors import ManifestError, UnsupportedOpError
from edge_runtime.jobs.worker import JobSpec, run_worker
from edge_runtime.profiling.partition import best_partition
from edge_runtime.profiling.profile_file import Profile, ProfileError, StagePlan, TierPlan
from edge_runtime.profiling.profiler import Profiler, default_candidates
from edge_runtime.train.datasets import LocalDataset
from edge_runtime.wire import weights as wcodec
from edge_runtime.wire.manifest import Manifest
from edge_runtime.wire.part import TrainablePart

MB = 1 << 20
CLASSES = 3


def _conv(c_in: int, norm: bool = False) -> nn.Module:
    layers = [nn.Conv2d(c_in, 4, 3, padding=1)] + ([nn.GroupNorm(2, 4)] if norm else []) + [nn.ReLU()]
    return nn.Sequential(*layers)


def _head() -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, CLASSES))


def _model(norm_in: int, name: str = "gn") -> BlockModel:
    """Blocks [[L0, L1], [L2], [L3]], GroupNorm in layer `norm_in`, and a boundary head after layer 0."""
    torch.manual_seed(0)
    convs = [_conv(1 if i == 0 else 4, norm=i == norm_in) for i in range(4)]
    return BlockModel(name, (1, 8, 8), CLASSES, blocks=[convs[:2], [convs[2]], [convs[3]]],
                      heads=[_head(), _head(), _head()], boundary_head=lambda shape: _head())


@pytest.fixture(scope="module")
def frozen_model(tmp_path_factory) -> Manifest:
    """GroupNorm in layer 0 (block 0, which layer 1 shares): layer 0 is the frozen prefix."""
    return export.export(_model(norm_in=0), tmp_path_factory.mktemp("frozen") / "model")


# -- (a) the block list's form ------------------------------------------------------------------

def test_a_sequential_given_as_a_block_is_refused_with_the_right_form():
    a, b, c = nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)
    with pytest.raises(ValueError) as info:
        BlockModel("m", (1, 8, 8), CLASSES, blocks=[nn.Sequential(a, b), nn.Sequential(c)], heads=[_head(), _head()])
    text = str(info.value)
    assert "blocks[0] is a Sequential" in text and "[nn.Sequential(...)]" in text and "to make it one layer" in text
    assert "blocks=[[layer, ...], [layer, ...]]" in text
    with pytest.raises(ValueError, match=r"blocks\[1\] is a ModuleList"):
        BlockModel("m", (1, 8, 8), CLASSES, blocks=[[a], nn.ModuleList([c])], heads=[_head(), _head()])
    with pytest.raises(ValueError, match="blocks is a Sequential"):
        BlockModel("m", (1, 8, 8), CLASSES, blocks=nn.Sequential(a, c), heads=[_head(), _head()])
    with pytest.raises(ValueError, match=r"blocks\[0\]\[0\] is a list, not a torch module"):
        BlockModel("m", (1, 8, 8), CLASSES, blocks=[[[a, b]]], heads=[_head()])
    with pytest.raises(ValueError, match="heads is a Sequential"):
        BlockModel("m", (1, 8, 8), CLASSES, blocks=[[a], [c]], heads=nn.Sequential(_head(), _head()))
    with pytest.raises(ValueError, match=r"heads\[0\] is a list"):
        BlockModel("m", (1, 8, 8), CLASSES, blocks=[[a]], heads=[[nn.Flatten(), nn.Linear(4, CLASSES)]])
    # the right forms: a list of layers per block, one module per head (a ModuleList of heads is a list too)
    ok = BlockModel("m", (1, 8, 8), CLASSES, blocks=[[nn.Sequential(a, b)], (c,)],
                    heads=nn.ModuleList([_head(), _head()]))
    assert [p for p, _, _ in ok.layers()] == ["blocks.0.0", "blocks.1.0"]


# -- (b) an untrainable op, named by the user's module -------------------------------------------

def test_groupnorm_in_the_last_layer_is_refused_naming_the_module(tmp_path):
    with pytest.raises(UnsupportedOpError) as info:
        export.export(_model(norm_in=3), tmp_path / "out")
    e = info.value
    assert str(e).startswith("layer blocks.2.0 (block 2): module blocks.2.0.1 (GroupNorm) exports to ONNX op "
                             "InstanceNormalization, which the device runtime cannot differentiate; replace it "
                             "(e.g. by BatchNorm2d) or put it in the frozen prefix (the first layers), which never "
                             "trains (layer blocks.2.0 is the model's last layer")
    assert "[ONNX node 'L3//1/InstanceNormalization'" in str(e)
    assert (e.op_type, e.layer, e.head) == ("InstanceNormalization", 3, None)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_groupnorm_in_a_middle_layer_freezes_everything_before_it(tmp_path):
    m = export.export(_model(norm_in=2), tmp_path / "out")
    assert m.frozen_prefix == 3 and "module blocks.1.0.1 (GroupNorm)" in m.frozen_reason
    assert m.cut_points() == [3] and m.stage_starts() == [3]
    with pytest.raises(ManifestError, match="blocks 0-1 lie in the model's frozen prefix, layers 0-2 "
                                            r"\(blocks.0.0 .. blocks.1.0\), which never trains; train blocks from "
                                            "block 2 on"):
        TrainablePart.blocks(m, 0, 1)
    with pytest.raises(ManifestError, match="block 1 lies in the model's frozen prefix"):
        TrainablePart.block(m, 1)
    assert TrainablePart.blocks(m, 0, 2) == TrainablePart.block(m, 2)


def test_without_the_torch_model_the_layer_is_named_from_the_manifest(tmp_path):
    m = export.export(_model(norm_in=3), tmp_path / "out", check_trainable=False)
    with pytest.raises(UnsupportedOpError) as info:
        ensure_part_graphs(m, [TrainablePart.block(m, 2)])
    assert str(info.value).startswith("layer blocks.2.0 (block 2) exports to ONNX op InstanceNormalization")
    assert info.value.layer == 3


def test_groupnorm_in_a_head_is_refused_as_a_head(tmp_path):
    torch.manual_seed(0)
    head = nn.Sequential(nn.GroupNorm(2, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, CLASSES))
    model = BlockModel("gnhead", (1, 8, 8), CLASSES, blocks=[[_conv(1)], [_conv(4)]], heads=[head, _head()])
    with pytest.raises(UnsupportedOpError) as info:
        export.export(model, tmp_path / "out")
    assert str(info.value).startswith("head heads.0 (after layer 0): module heads.0.0 (GroupNorm) exports to ONNX "
                                      "op InstanceNormalization")
    assert "an output head always trains" in str(info.value) and info.value.head == 0


# -- (c) a frozen prefix: exported, recorded, respected, trained ---------------------------------

def test_groupnorm_in_the_first_layer_exports_with_a_frozen_prefix(frozen_model):
    m = frozen_model
    assert m.frozen_prefix == 1
    assert m.frozen_reason.startswith("layer blocks.0.0 (block 0): module blocks.0.0.1 (GroupNorm) exports to ONNX "
                                      "op InstanceNormalization")
    raw = json.loads((m.root / "manifest.json").read_text())
    assert raw["frozen_prefix"] == 1 and Manifest.load(m.root / "manifest.json") == m
    # the boundary head after layer 0 lies inside the prefix: no part may end there
    assert m.cut_points() == [1, 2, 3] and m.stage_starts() == [1, 2, 3]
    assert m.trainable_layers() == (1, 2, 3)


def test_manifests_without_the_field_load_and_bad_values_are_refused(frozen_model):
    raw = json.loads(frozen_model.to_json())
    raw.pop("frozen_prefix")
    raw.pop("frozen_reason")
    assert Manifest.from_dict(raw).frozen_prefix == 0      # what every earlier export wrote
    assert "frozen_prefix" not in replace(frozen_model, frozen_prefix=0).to_json()
    for bad, why in [(4, "at least one of the 4 layers"), (-1, "from 0"), ("1", "must be an integer"),
                     (True, "must be an integer")]:
        with pytest.raises(ManifestError, match=why):
            Manifest.from_dict({**raw, "frozen_prefix": bad})


def test_parts_never_train_the_frozen_prefix(frozen_model):
    m = frozen_model
    with pytest.raises(ManifestError) as info:
        TrainablePart.for_layers(m, [0, 1])
    assert str(info.value) == ("cannot train layer(s) [0] (blocks.0.0): they lie in the model's frozen prefix, "
                               "layer 0 (blocks.0.0), which never trains; train layers from 1 on (frozen because "
                               + m.frozen_reason + ")")
    head_in_prefix = next(h.index for h in m.heads if h.name == "boundary_heads.0")
    with pytest.raises(ManifestError, match=r"it attaches in the model's frozen prefix, layer 0 \(blocks.0.0\), "
                                            r"which never trains; end the part at a head after a later layer"):
        TrainablePart((0,), (), head_in_prefix).validate(m)
    # a block straddling the prefix trains its layers after it, reading the rest from the cache
    assert TrainablePart.block(m, 0) == TrainablePart(span=(1,), trainable_layers=(1,), head=m.blocks[0].head)
    # frozen prefix layers may still run inside a span, as long as they do not train
    TrainablePart((0, 1), (1,), m.blocks[0].head).validate(m)


def _predict(first, last, batch):
    return (40 + 5 * (last - first + 1)) * MB + batch * 0.1 * MB


FLEET = [Device("a", "t", 200 * MB), Device("b", "t", 200 * MB, disk_free_bytes=1)]


def _strategy(cls, m, **kw):
    return cls(m, _predict, batch_sizes=[16, 32], margin=0.10, **kw)


def _trained_layers(plan) -> set[int]:
    return {i for a in plan.assignments for i in a.trainable}


def test_every_schedule_leaves_the_frozen_prefix_alone(frozen_model):
    m = frozen_model
    plan = _strategy(FedAvg, m, rounds=1).plan_round(1, FLEET)
    assert [(a.first, a.last, a.trainable) for a in plan.assignments] == [(1, 3, (1, 2, 3))] * 2

    s = _strategy(Progressive, m, shrink_rounds=1, min_rounds_per_block=1, max_rounds_per_block=1,
                  max_extra_blocks=1)
    weights = export.load_weights(m)
    stages, trained, estimates = [], set(), []
    while not s.finished:
        estimates.append(s.rounds_left())
        plan = s.plan_round(len(stages), FLEET)
        stages.append((plan.stage["phase"], plan.stage["block"]))
        trained |= _trained_layers(plan)
        if stages[-1] == ("growing", 0):   # its own block, and the next one too (both fit)
            assert {(a.first, a.last, a.trainable) for a in plan.assignments} == {(1, 2, (1, 2))}
        for a in plan.assignments:
            a.part().validate(m)
        s.advance(plan, weights, weights)
    # shrinking from the back down to the block after the first trainable one, then growing from block 0,
    # whose frozen layer 0 is never trained
    assert stages == [("shrinking", 2), ("shrinking", 1), ("growing", 0), ("growing", 1), ("growing", 2)]
    assert trained == {1, 2, 3} and estimates[0] == (len(stages), len(stages))

    lw = _strategy(LayerWise, m, rounds_per_layer=1)
    assert lw.layers == [1, 2, 3]
    plan = lw.plan_round(1, FLEET)   # device b has no disk for the cache: its span starts at 0, layer 0 frozen
    assert _trained_layers(plan) == {1} and sorted(a.first for a in plan.assignments) == [0, 1]
    for a in plan.assignments:
        a.part().validate(m)

    sel = _strategy(Selective, m)
    plan = sel.plan_round(1, FLEET)
    assert sel.units[:-1] == [1, 2, 3] and plan.stage["phase"] == "score" and len(plan.assignments) == 2
    assert all(a.first >= 1 and set(a.trainable) <= {1, 2, 3} for a in plan.assignments)


def test_profiling_starts_after_the_frozen_prefix(frozen_model, tmp_path):
    m = frozen_model
    assert default_candidates(m) == [(1, 1), (2, 2), (3, 3), (1, 2), (2, 3)]
    part = best_partition(len(m.layers), m.cut_points(), 16, _predict, 60 * MB, first=m.frozen_prefix)
    assert part.stages[0].first == 1 and part.stages[-1].last == 3
    with pytest.raises(ManifestError, match="frozen prefix"):
        Profiler(m.root / "manifest.json", tmp_path / "prof", max_batch=4)._part(0, 1)
    # the profile file records the prefix, and its tiers' stages start after it
    stages = tuple(StagePlan(s.first, s.last, m.head_for_boundary(s.last), s.predicted_peak_bytes)
                   for s in part.stages)
    profile = Profile("gn", "0" * 64, "now", {}, 40 * MB, 0.1, tiers=[TierPlan("t", 100 * MB, 90 * MB, True, None, 16,
                                                                              stages)], frozen_prefix=1)
    profile.save(tmp_path / "p.json")
    assert Profile.load(tmp_path / "p.json") == profile
    raw = json.loads((tmp_path / "p.json").read_text())
    raw["frozen_prefix"] = 0
    (tmp_path / "p.json").write_text(json.dumps(raw))
    with pytest.raises(ProfileError, match=r"stages\[0\]: covers layers 1-.*expected to start at 0"):
        Profile.load(tmp_path / "p.json")


def test_a_job_after_the_frozen_prefix_trains_and_changes_only_trainable_weights(frozen_model, tmp_path):
    m = frozen_model
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, CLASSES, 64)
    data = LocalDataset.write(tmp_path / "data", x, y)
    plan = _strategy(FedAvg, m, rounds=1).plan_round(1, FLEET[:1])
    part = plan.assignments[0].part()
    ensure_part_graphs(m, [part])
    spec = JobSpec(manifest=str(m.root / "manifest.json"), weights=str(m.graph_path(m.weights)),
                   dataset=str(data.root), state_dir=str(tmp_path / "state"), task_id="after-prefix",
                   part=part.to_dict(), config={"batch_size": 16, "threads": 1, "max_steps": 4},
                   update_out=str(tmp_path / "update.safetensors"))
    report, child = run_worker(spec, tmp_path / "jobs")
    assert report and report["ok"], child.stderr[-2000:]
    assert report["result"]["prefix_computed"]     # layer 0 ran forward, GroupNorm and all, on onnxruntime
    update = wcodec.load(Path(spec.update_out))
    initial = export.load_weights(m)
    assert sorted(update) == sorted(part.update_names(m))
    assert not any(n.startswith("blocks.0.0.") for n in update)
    assert all(not np.array_equal(update[n], initial[n]) for n in part.trainable_names(m))
    # the coordinator's evaluation runs the whole model forward, frozen prefix included
    ev = evaluate(m, {**initial, **update}, x, y)
    assert ev["samples"] == 64 and np.isfinite(ev["loss"])


def test_a_model_left_with_one_trainable_block_is_profiled_at_enough_batch_sizes(tmp_path):
    """GroupNorm in layer 2 freezes layers 0-2: one candidate span is left, and the span model needs four
    points, so the profiler measures it at more batch sizes than it was given (the partition keeps the given)."""
    from edge_runtime.profiling.profiler import _enough_batches, run_profile
    assert _enough_batches([16], 1) == [2, 4, 8, 16] and _enough_batches([32, 64], 1) == [8, 16, 32, 64]
    assert _enough_batches([32, 64], 3) == [32, 64]
    m = export.export(_model(norm_in=2, name="gn-late"), tmp_path / "model")
    assert m.frozen_prefix == 3 and default_candidates(m) == [(3, 3)]
    profile = run_profile(m.root / "manifest.json", [], [16], tmp_path / "prof", verify=False, log=lambda s: None)
    assert sorted(p["batch_size"] for p in profile.measurements) == [2, 4, 8, 16]
    assert all((p["first"], p["last"]) == (3, 3) for p in profile.measurements)
