"""Schedules as pure decisions: who trains what, from measured budgets, and when stages advance."""
import json
from dataclasses import replace

import numpy as np
import pytest

from coordinator.strategies.aggregation import AggregationSettings
from coordinator.strategies.base import Device, Result
from coordinator.strategies.fedavg import FedAvg
from coordinator.strategies.progressive import Progressive

MB = 1 << 20
LAYER_MB = [30, 20, 20, 40, 10]   # fmnist_cnn has 5 layers in 4 blocks: [0], [1, 2], [3], [4]


def predict(first, last, batch):
    """A memory model of the shape the profiler fits: baseline + span cost + per-sample cost."""
    return (60 + sum(LAYER_MB[first:last + 1])) * MB + batch * 0.5 * MB


FLEET = [Device("tiny", "generic-256mb", 80 * MB), Device("small", "pi-zero-2w", 140 * MB),
         Device("big", "pi-4b-2gb", 400 * MB)]


def _strategy(cls, manifest, **kw):
    return cls(manifest, predict, batch_sizes=[16, 32, 64], margin=0.10, **kw)


def test_fedavg_excludes_devices_that_cannot_hold_the_whole_model(fmnist_model):
    m, _ = fmnist_model
    plan = _strategy(FedAvg, m, rounds=2).plan_round(1, FLEET)
    assert [a.device_id for a in plan.assignments] == ["big"]
    a = plan.assignments[0]
    assert (a.first, a.last, a.head) == (0, 4, m.final_head.index) and a.batch_size == 64
    assert "whole-model training does not fit" in plan.idle["small"] and "MB at batch 16" in plan.idle["tiny"]


def test_progressive_lets_small_devices_train_and_big_ones_train_more(fmnist_model):
    m, _ = fmnist_model
    s = _strategy(Progressive, m, shrink_rounds=0)
    plan = s.plan_round(1, FLEET)
    by_device = {a.device_id: a for a in plan.assignments}
    assert set(by_device) == {"small", "big"} and "block 0 does not fit 80 MB" in plan.idle["tiny"]
    assert (by_device["small"].first, by_device["small"].last, by_device["small"].head) == (0, 0, m.blocks[0].head)
    big = by_device["big"]  # block 0 plus the next block, ending in block 1's head
    assert (big.first, big.last, big.head) == (0, 2, m.blocks[1].head) and big.trainable == (0, 1, 2)
    for a in plan.assignments:
        assert a.predicted_peak_bytes * 1.10 <= next(d for d in FLEET if d.device_id == a.device_id).budget_bytes


def _round(s, plan, weights, rng, step):
    """Pretend devices trained: the stage's block moves by `step(rng)`."""
    after = dict(weights)
    for name in m_block_names(s):
        after[name] = weights[name] + step(rng, weights[name].shape).astype(np.float32)
    s.advance(plan, weights, after)
    return after


def m_block_names(s):
    """The parameters the schedule is training now: progressive's block, or layer-wise's layer."""
    if hasattr(s, "layer"):
        return s.manifest.param_names([s.layer])
    return s.manifest.param_names(s.manifest.blocks[s.block].layers)


def _scripted_validation(s, rng):
    """The validation accuracies the rule reads, as a run would give them: block 1 still gains a point a round, the
    other blocks are flat; every round swings by about half a point."""
    return lambda weights, last: (0.6 + 0.01 * s.rounds_in_stage if s.block == 1 else 0.8) + rng.normal(0, 0.005)


def test_stages_run_back_to_front_then_front_to_back_and_advance_on_convergence(fmnist_model):
    m, weights = fmnist_model
    s = _strategy(Progressive, m, shrink_rounds=1, min_rounds_per_block=2, max_rounds_per_block=12)
    s.attach_validation(_scripted_validation(s, np.random.default_rng(0)))
    assert s.rounds_left() == (3 + 4 * 5, 3 + 4 * 12)   # the rule can decide after its window of 5 rounds
    seen = []
    for r in range(200):
        if s.finished:
            break
        plan = s.plan_round(r, FLEET)
        seen.append((plan.stage["phase"], plan.stage["block"]))
        s.advance(plan, weights, weights)
    stages = list(dict.fromkeys(seen))
    assert stages == [("shrinking", 3), ("shrinking", 2), ("shrinking", 1),
                      ("growing", 0), ("growing", 1), ("growing", 2), ("growing", 3)]
    rounds_at = {st: seen.count(st) for st in stages}
    assert rounds_at[("growing", 1)] == 12           # a block still learning is never frozen early: it hits the cap
    assert rounds_at[("growing", 0)] < 12 and rounds_at[("growing", 2)] < 12    # flat blocks freeze on the rule
    assert s.finished and s.plan_round(999, FLEET).assignments == ()


def test_without_validation_data_every_block_trains_to_its_cap(fmnist_model):
    m, weights = fmnist_model
    s = _strategy(Progressive, m, shrink_rounds=0, min_rounds_per_block=2, max_rounds_per_block=7)
    assert s.rounds_left() == (4 * 7, 4 * 7)
    rounds = 0
    while not s.finished:
        s.advance(s.plan_round(rounds, FLEET), weights, weights)
        rounds += 1
    assert rounds == 4 * 7 and s.round_report(rounds - 1)["validation_accuracy"] is None


def test_a_round_without_participants_does_not_advance_and_state_survives_a_restart(fmnist_model):
    m, weights = fmnist_model
    s = _strategy(Progressive, m, shrink_rounds=0)
    empty = s.plan_round(1, [FLEET[0]])                  # only the tiny device: nobody can train
    s.advance(empty, weights, weights)
    assert (s.phase, s.block, s.rounds_in_stage) == ("growing", 0, 0)
    plan = s.plan_round(2, FLEET)
    s.advance(plan, weights, {k: v + 0.01 for k, v in weights.items()})
    restored = _strategy(Progressive, m, shrink_rounds=0)
    restored.load_state(s.state())
    assert restored.plan_round(3, FLEET) == s.plan_round(3, FLEET)


def test_aggregation_keeps_untrained_parameters_and_weights_by_samples(fmnist_model):
    """With the plain weighted mean (FedAvg) and no share cap; the robust rules: test_robust_aggregation.py."""
    m, weights = fmnist_model
    s = _strategy(Progressive, m, shrink_rounds=0, aggregation=AggregationSettings(rule="mean", max_share=1.0))
    plan = s.plan_round(1, FLEET)
    results = []
    for a, value, n in zip(plan.assignments, (1.0, 3.0), (100, 300)):
        names = m.param_names(a.trainable, [a.head])
        results.append(Result(a, {k: np.full_like(weights[k], value) for k in names}, n, 0.5))
    new = s.aggregate(plan, results, {"tiny": "idle"}, weights)
    block0 = m.param_names([0])[0]
    np.testing.assert_allclose(new[block0], 2.5)                      # (1*100 + 3*300) / 400
    block1 = m.param_names([1])[0]
    np.testing.assert_allclose(new[block1], 3.0)                      # only the big device trained it
    last = m.param_names([4])[0]
    np.testing.assert_array_equal(new[last], weights[last])           # nobody trained it
    assert s.aggregate(plan, [], {}, weights) == dict(weights)


def test_a_restarted_coordinator_freezes_blocks_exactly_when_an_uninterrupted_one_would(fmnist_model):
    """The rule's record is in the schedule's state: a restart (through JSON, as the store keeps it) decides the same."""
    m, weights = fmnist_model
    a = _strategy(Progressive, m, shrink_rounds=0, min_rounds_per_block=2, max_rounds_per_block=12)
    rng = np.random.default_rng(1)
    rounds = 0
    while not a.finished:
        plan = a.plan_round(rounds, FLEET)
        b = _strategy(Progressive, m, shrink_rounds=0, min_rounds_per_block=2, max_rounds_per_block=12)
        b.load_state(json.loads(json.dumps(a.state())))      # the coordinator restarted before this round closed
        accuracy = 0.8 + rng.normal(0, 0.005)
        a.attach_validation(lambda w, last: accuracy)
        b.attach_validation(lambda w, last: accuracy)
        a.advance(plan, weights, weights)
        b.advance(plan, weights, weights)
        assert (b.phase, b.block, b.rounds_in_stage, b.progress.below) == \
            (a.phase, a.block, a.rounds_in_stage, a.progress.below), rounds
        rounds += 1
    assert rounds < 4 * 12      # blocks froze on the rule, not at the cap


def test_selective_scores_first_then_trains_the_best_affordable_sets(fmnist_model):
    from coordinator.strategies.selective import Selective
    m, weights = fmnist_model
    s = _strategy(Selective, m, rounds=2, rescore_every=1, lam=0.0)
    plan = s.plan_round(1, FLEET)
    assert all(a.kind == "score" for a in plan.assignments) and "head alone does not fit" in plan.idle["tiny"]
    by_device = {a.device_id: a for a in plan.assignments}
    assert by_device["big"].first == 0                    # the big device can score every layer
    assert by_device["small"].first > 0                   # the small one only those it could ever train
    # layer 3 matters most on both devices; layer 0 would, but only the big device can afford it
    scores = {"big": {"0": 9.0, "1": 0.1, "2": 0.1, "3": 5.0, "4": 0.2, "head": 1.0},
              "small": {str(i): (5.0 if i == 3 else 0.1) for i in by_device["small"].trainable} | {"head": 1.0}}
    results = [Result(a, {}, 100, 0.0, scores=scores[a.device_id]) for a in plan.assignments]
    lost = _strategy(Selective, m, rounds=2, rescore_every=1, lam=0.0)   # the small device's score job failed
    asked = lost.plan_round(1, FLEET)
    answered = [r for r in results if r.assignment.device_id == "big"]
    # as the service calls it: the plan holds only the devices that answered
    lost.advance(replace(asked, assignments=tuple(r.assignment for r in answered)), weights, weights, answered)
    assert "sent no scores" in lost.plan_round(2, FLEET).idle["small"]
    # a device that scored before and fails a later score job trains on its earlier scores: a task, no Idle
    lost.scores["small"] = scores["small"]                               # as if it had scored in an earlier round
    again = lost.plan_round(3, FLEET)
    assert "small" in lost.unscored
    assert "small" not in again.idle and "small" in {a.device_id for a in again.assignments}, again
    s.advance(plan, weights, weights, results)
    train = s.plan_round(2, FLEET)
    chosen = {a.device_id: a for a in train.assignments}
    assert all(a.kind == "train" for a in train.assignments)
    assert 0 in chosen["big"].trainable and 3 in chosen["big"].trainable
    assert 3 in chosen["small"].trainable and 0 not in chosen["small"].trainable
    units = {d: len(a.trainable) + a.train_head for d, a in chosen.items()}
    assert units["small"] <= 2 < units["big"] <= 4          # the device with room for the whole model trains more
    for a in train.assignments:
        budget = next(d.budget_bytes for d in FLEET if d.device_id == a.device_id)
        assert a.predicted_peak_bytes * 1.10 <= budget and a.last == 4 and a.head == m.final_head.index
    s.advance(train, weights, weights, [Result(a, {"x": np.zeros(1)}, 100, 0.5) for a in train.assignments])
    assert s.phase == "score" and not s.finished        # rescore after every train round
    restored = _strategy(Selective, m, rounds=2, rescore_every=1)
    restored.load_state(s.state())
    assert restored.plan_round(3, FLEET) == s.plan_round(3, FLEET)


@pytest.fixture(scope="module")
def resnet_manifest(tmp_path_factory):
    from coordinator.model import export, zoo
    return export.export(zoo.resnet_small(), tmp_path_factory.mktemp("resnet_small"))


def test_layerwise_trains_one_layer_at_a_time_front_to_back(fmnist_model):
    from coordinator.strategies.base import Device
    from coordinator.strategies.layerwise import LayerWise
    m, weights = fmnist_model
    s = _strategy(LayerWise, m, rounds_per_layer=2, min_rounds_per_layer=1)
    no_disk = Device("nodisk", "pi-4b-2gb", 400 * MB, disk_free_bytes=10 * MB)
    trained, w = [], dict(weights)
    for r in range(20):
        if s.finished:
            break
        plan = s.plan_round(r, FLEET + [no_disk])
        by = {a.device_id: a for a in plan.assignments}
        layer = plan.stage["layer"]
        # greedy layer-wise: the layer and the head right after it
        assert all(a.trainable == (layer,) and a.last == layer and a.head == m.head_for_boundary(layer)
                   for a in by.values())
        assert by["big"].first == layer and by["nodisk"].first == 0      # no room to cache: recompute the prefix
        assert "tiny" in plan.idle and "does not fit" in plan.idle["tiny"]
        trained.append(layer)
        w = _round(s, plan, w, np.random.default_rng(r), lambda g, shape: np.full(shape, 0.01))
    assert trained == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4] and s.finished


def test_layerwise_depth_dropout_skips_only_frozen_residual_layers(resnet_manifest):
    from coordinator.strategies.base import Device
    from coordinator.strategies.layerwise import LayerWise
    m = resnet_manifest
    skippable = {l.index for l in m.layers if l.skippable}
    big = lambda first, last, batch: 100 * MB                          # noqa: E731  everything fits
    s = LayerWise(m, big, batch_sizes=[32], dropout=0.5, seed=3, frozen_after=-1)   # up to the final head
    devices = [Device(f"d{i}", "t", 1 << 30, disk_free_bytes=(1 << 30) if i % 2 else MB) for i in range(8)]
    plan = s.plan_round(1, devices)
    skipped = [i for a in plan.assignments for i in a.skip]
    assert skipped and set(skipped) <= skippable and s.layer not in skipped
    for a in plan.assignments:
        assert all(a.first <= i <= a.last for i in a.skip)
    assert s.plan_round(1, devices) == plan                            # reproducible per round and device
    assert LayerWise(m, big, batch_sizes=[32], dropout=0.0, frozen_after=-1).plan_round(1, devices) \
        .assignments[0].skip == ()
    greedy = LayerWise(m, big, batch_sizes=[32], dropout=0.5, seed=3).plan_round(1, devices)
    cached = [a for a in greedy.assignments if a.first == a.last]     # nothing frozen in the graph: nothing to drop
    assert cached and all(a.skip == () for a in cached)


@pytest.mark.parametrize("kind", ["fedavg", "progressive", "selective", "layerwise"])
def test_rounds_left_brackets_the_rounds_each_schedule_really_takes(fmnist_model, kind):
    """What progress displays and time estimates rest on: lo <= rounds still to come <= hi, every round."""
    from coordinator.strategies.layerwise import LayerWise
    from coordinator.strategies.selective import Selective
    m, weights = fmnist_model
    s = {"fedavg": lambda: _strategy(FedAvg, m, rounds=4),
         "progressive": lambda: _strategy(Progressive, m, shrink_rounds=1, min_rounds_per_block=2,
                                          max_rounds_per_block=8),
         "selective": lambda: _strategy(Selective, m, rounds=5, rescore_every=2),
         "layerwise": lambda: _strategy(LayerWise, m, rounds_per_layer=7, min_rounds_per_layer=1)}[kind]()
    rng = np.random.default_rng(0)
    # a validation accuracy that levels off: the freezing rule may fire before the caps, as in a real run
    s.attach_validation(lambda weights, last: 0.9 - 0.2 / len(bounds) + rng.normal(0, 0.003))
    bounds, w = [], dict(weights)
    while not s.finished:
        bounds.append(s.rounds_left())
        plan = s.plan_round(len(bounds), FLEET)
        results = [Result(a, {}, 100, 0.0, scores={"0": 1.0, "3": 2.0, "head": 0.5}) if a.kind == "score"
                   else Result(a, {"x": np.zeros(1)}, 100, 0.5) for a in plan.assignments]
        after = {n: v + (0.01 / len(bounds) * rng.standard_normal(v.shape)).astype(np.float32) for n, v in w.items()}
        s.advance(plan, w, after, results)
        w = after
        assert len(bounds) < 100
    assert s.rounds_left() == (0, 0)
    for k, (lo, hi) in enumerate(bounds):
        assert lo <= len(bounds) - k <= hi, (kind, k, lo, hi, len(bounds))
    if kind in ("fedavg", "selective"):          # no rule to cut them short: exact
        assert all(lo == hi for lo, hi in bounds)
