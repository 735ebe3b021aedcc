"""Robust aggregation: each rule on cases whose answer is known, lazy reading, capped sample counts, the setting."""
import gc
import weakref
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import pytest

from coordinator.strategies.aggregation import (
    RULES,
    AggregationSettings,
    aggregate_updates,
    aggregation_settings_table,
    capped_examples,
    share_capped,
)
from coordinator.strategies.base import Result

GLOBAL = {"w": np.zeros(4, np.float32), "b": np.zeros(2, np.float32), "kept": np.full(3, 7, np.float32)}
FLAT = dict(max_share=1.0)    # no share cap: the rule alone


def _agg(rule, updates, **kw):
    return aggregate_updates(updates, GLOBAL, AggregationSettings(rule=rule, **{**FLAT, **kw}))


def _five_with_two_outliers():
    """Five devices on one coordinate: three honest near 1, two attackers at 100 and -50."""
    return [({"w": np.full(4, v, np.float32)}, 10) for v in (0.9, 1.0, 1.1, 100.0, -50.0)]


def test_mean_is_fedavg():
    updates = [({"w": np.full(4, 1, np.float32)}, 100), ({"w": np.full(4, 4, np.float32)}, 300)]
    np.testing.assert_allclose(_agg("mean", updates)["w"], 3.25)


def test_median_of_five_ignores_two_outliers():
    np.testing.assert_allclose(_agg("median", _five_with_two_outliers())["w"], 1.0)


def test_weighted_median_follows_the_weights_and_is_the_ordinary_median_when_they_are_equal():
    values = [({"w": np.full(4, v, np.float32)}, n) for v, n in ((1.0, 10), (2.0, 10), (3.0, 10), (4.0, 10))]
    np.testing.assert_allclose(_agg("median", values)["w"], 2.5)            # even count: midway
    heavy = [({"w": np.full(4, v, np.float32)}, n) for v, n in ((1.0, 10), (2.0, 10), (3.0, 50))]
    np.testing.assert_allclose(_agg("median", heavy)["w"], 3.0)             # 50 of 70 samples say 3


def test_median_is_per_coordinate():
    rows = [[0, 10, 5, 1], [1, 11, -5, 2], [2, 12, 0, 3], [99, -99, 99, -99], [3, 13, 1, 4]]
    updates = [({"w": np.array(r, np.float32)}, 1) for r in rows]
    np.testing.assert_allclose(_agg("median", updates)["w"], [2, 11, 1, 2])


def test_trimmed_mean_drops_the_ends_per_coordinate():
    # 5 devices, trim 0.2: one dropped at each end of every coordinate, the middle three averaged
    np.testing.assert_allclose(_agg("trimmed_mean", _five_with_two_outliers(), trim_fraction=0.2)["w"],
                               (0.9 + 1.0 + 1.1) / 3, rtol=1e-6)
    # trim 0.4 drops two at each end: the median
    np.testing.assert_allclose(_agg("trimmed_mean", _five_with_two_outliers(), trim_fraction=0.4)["w"], 1.0)
    # trim 0: the weighted mean
    updates = [({"w": np.full(4, v, np.float32)}, n) for v, n in ((1.0, 1), (2.0, 1), (6.0, 2))]
    np.testing.assert_allclose(_agg("trimmed_mean", updates, trim_fraction=0.0)["w"], 15 / 4)


def test_trimmed_mean_weights_what_it_keeps():
    updates = [({"w": np.full(4, v, np.float32)}, n) for v, n in ((-9.0, 1), (1.0, 1), (2.0, 3), (9.0, 1))]
    np.testing.assert_allclose(_agg("trimmed_mean", updates, trim_fraction=0.25)["w"], (1 + 2 * 3) / 4)


def test_clipping_keeps_the_direction_and_caps_the_norm():
    rng = np.random.default_rng(0)
    honest = [rng.standard_normal(4).astype(np.float32) for _ in range(4)]
    attacker = np.array([30, -40, 0, 0], np.float32)                  # norm 50, far above the others
    updates = [({"w": v}, 1) for v in honest] + [({"w": attacker}, 1)]
    norms = sorted(float(np.linalg.norm(v)) for v in honest + [attacker])
    bound = 2.0 * norms[2]                                              # 2 x the median change norm
    got = _agg("clipped_mean", updates, clip_multiple=2.0)["w"]
    clipped = [v if np.linalg.norm(v) <= bound else v * bound / np.linalg.norm(v) for v in honest + [attacker]]
    np.testing.assert_allclose(got, np.mean(clipped, axis=0), rtol=1e-5)
    contribution = clipped[-1]
    assert np.linalg.norm(contribution) == pytest.approx(bound, rel=1e-6)            # the norm is capped
    assert np.dot(contribution, attacker) / (np.linalg.norm(contribution) * 50) == pytest.approx(1.0)  # direction


def test_clipping_works_on_the_change_around_the_global_weights():
    base = {"w": np.full(4, 10, np.float32)}
    updates = [({"w": np.full(4, 10 + d, np.float32)}, 1) for d in (1.0, 1.0, 1.0, 1.0, 40.0)]
    got = aggregate_updates(updates, base, AggregationSettings(rule="clipped_mean", clip_multiple=2.0, **FLAT))
    np.testing.assert_allclose(got["w"], 10 + (4 * 1.0 + 2.0) / 5)     # the 40 change clipped to 2 x 1


@pytest.mark.parametrize("rule", RULES)
def test_one_trainer_gives_its_values_and_untrained_parameters_are_not_touched(rule):
    """A parameter trained by one device takes its value under every rule; the rest are left to the caller."""
    updates = [({"w": np.full(4, 1, np.float32), "b": np.full(2, 5, np.float32)}, 10),
               ({"w": np.full(4, 3, np.float32)}, 10),
               ({"w": np.full(4, 2, np.float32)}, 10)]
    got = _agg(rule, updates)
    assert set(got) == {"w", "b"}                                       # "kept" is nobody's: not returned
    np.testing.assert_allclose(got["b"], 5)
    assert got["w"].dtype == np.float32 and got["b"].dtype == np.float32


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_two_trainers_take_their_weighted_mean(rule):
    """Nothing to outvote with two devices: median and trimmed mean fall back to the weighted mean."""
    updates = [({"b": np.full(2, 1, np.float32)}, 10), ({"b": np.full(2, 4, np.float32)}, 30)]
    np.testing.assert_allclose(_agg(rule, updates)["b"], 3.25)


@pytest.mark.parametrize("rule", RULES)
def test_a_parameter_without_values_aggregates_to_an_empty_one(rule):
    updates = [({"e": np.zeros((0, 3), np.float32), "b": np.full(2, v, np.float32)}, 10) for v in (1, 2, 3, 4, 5)]
    got = aggregate_updates(updates, {"e": np.zeros((0, 3), np.float32), **GLOBAL}, AggregationSettings(rule=rule))
    assert got["e"].shape == (0, 3) and got["e"].dtype == np.float32
    np.testing.assert_allclose(got["b"], 3)


def test_two_trainers_under_clipping_cap_the_larger_change_to_a_multiple_of_the_smaller():
    updates = [({"b": np.full(2, 1, np.float32)}, 10), ({"b": np.full(2, 8, np.float32)}, 10)]
    np.testing.assert_allclose(_agg("clipped_mean", updates, clip_multiple=2.0)["b"], (1 + 2) / 2)


def test_max_share_applies_per_parameter_over_its_trainers():
    updates = [({"w": np.full(4, 0, np.float32)}, 1), ({"w": np.full(4, 0, np.float32)}, 1),
               ({"w": np.full(4, 0, np.float32)}, 1), ({"w": np.full(4, 10, np.float32)}, 1000)]
    got = aggregate_updates(updates, GLOBAL, AggregationSettings(rule="mean", max_share=0.25))
    np.testing.assert_allclose(got["w"], 2.5)                           # the heavy device held to a quarter


def test_an_update_without_a_positive_weight_is_refused():
    with pytest.raises(ValueError, match="positive"):
        _agg("mean", [({"w": np.zeros(4, np.float32)}, 0)])


# -- lazy reading ----------------------------------------------------------------------------------
class LazyUpdate(Mapping):
    """A lazy update like WeightFile: a fresh array per read. It logs every read and, before each, notes any
    tensor read earlier (from any update of the round) for another parameter that is still alive."""

    def __init__(self, values, log, round_updates, holding):
        self._values, self.log, self.round, self.holding = values, log, round_updates, holding
        self.alive: list[tuple[str, weakref.ref]] = []

    def __getitem__(self, name):
        gc.collect()
        for u in self.round:
            self.holding += [f"{held} alive while reading {name}" for held, ref in u.alive
                             if held != name and ref() is not None]
        self.log.append(name)
        array = self._values[name].copy()
        self.alive.append((name, weakref.ref(array)))
        return array

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)


@pytest.mark.parametrize("rule", RULES)
def test_updates_are_read_a_parameter_at_a_time_and_never_held_whole(rule):
    rng = np.random.default_rng(1)
    names = [f"p{i}" for i in range(6)]
    base = {n: rng.standard_normal(50).astype(np.float32) for n in names}
    log, round_updates, holding = [], [], []
    for _ in range(5):
        round_updates.append(LazyUpdate({n: base[n] + rng.standard_normal(50).astype(np.float32) for n in names},
                                        log, round_updates, holding))
    got = aggregate_updates([(u, 10) for u in round_updates], base, AggregationSettings(rule=rule))
    assert set(got) == set(names)
    assert not holding, holding[:3]               # at most one parameter's tensors held at once
    # reads come grouped by parameter: every read of p0 (one pass, or two for clipping), then p1, ...
    assert log == sorted(log) and list(dict.fromkeys(log)) == names


def test_stored_weight_files_aggregate_lazily(tmp_path):
    """The service's Results hold WeightFiles: aggregation reads them without loading them first."""
    from edge_runtime.wire import weights as wcodec
    paths = []
    for i, v in enumerate((1.0, 2.0, 3.0, 50.0, 2.5)):
        paths.append(tmp_path / f"{i}.safetensors")
        wcodec.save(paths[-1], {"w": np.full(4, v, np.float32), "b": np.full(2, v, np.float32)})
    files = [wcodec.WeightFile(p) for p in paths]
    got = aggregate_updates([(f, 1) for f in files], GLOBAL, AggregationSettings(rule="median", **FLAT))
    np.testing.assert_allclose(got["w"], 2.5)
    np.testing.assert_allclose(got["b"], 2.5)


# -- weight capping ----------------------------------------------------------------------------------
def test_share_cap_lowers_only_the_largest_and_keeps_the_rest():
    capped = share_capped([10, 1, 1, 1, 1, 1, 1, 1], 0.25)
    np.testing.assert_allclose(capped[1:], 1)
    assert capped[0] / capped.sum() == pytest.approx(0.25)
    np.testing.assert_allclose(share_capped([3, 2, 1], 0.9), [3, 2, 1])           # already within: unchanged
    np.testing.assert_allclose(share_capped([5, 2], 0.25), [2, 2])                # no level can: all the smallest
    assert share_capped([7], 0.1).tolist() == [7]


def test_an_inflated_claim_is_capped_by_the_fleet_and_the_share():
    claimed = {f"d{i}": 1000 for i in range(7)} | {"liar": 10 ** 15}
    w = capped_examples(claimed, {}, max_share=1.0, fleet_multiple=4.0)
    assert w["liar"] == 4000 and all(w[f"d{i}"] == 1000 for i in range(7))
    w = capped_examples(claimed, {}, max_share=0.25, fleet_multiple=4.0)
    assert w["liar"] / sum(w.values()) == pytest.approx(0.25)
    assert all(w[f"d{i}"] == 1000 for i in range(7))


def test_a_device_with_history_is_held_near_its_own_past_claims():
    claimed = {"a": 3000, "b": 1000, "c": 1000, "d": 1000}
    w = capped_examples(claimed, {"a": [900, 1000, 1100]}, max_share=1.0, fleet_multiple=4.0, history_multiple=1.5)
    assert w["a"] == 1500                                # 1.5 x its median past claim, though the fleet allows 4000
    w = capped_examples(claimed, {"a": [900]}, max_share=1.0, history_multiple=1.5, min_history=3)
    assert w["a"] == 3000                                # too little history yet: only the fleet cap
    # a history of lies never lifts the fleet cap
    w = capped_examples({"liar": 10 ** 15, "b": 1000, "c": 1000}, {"liar": [10 ** 15] * 5}, max_share=1.0,
                        fleet_multiple=4.0)
    assert w["liar"] == 4000


def test_honest_claims_pass_unchanged_and_nothing_is_raised():
    claimed = {"a": 552, "b": 694, "c": 846, "d": 1000, "e": 1054, "f": 1227, "g": 1277, "h": 1350}
    assert capped_examples(claimed, {d: [n] for d, n in claimed.items()}, max_share=0.25) == \
        {d: float(n) for d, n in claimed.items()}
    w = capped_examples({"a": 10, "b": 0, "c": -5}, {}, max_share=0.25)
    assert w["b"] == 0 and w["c"] == 0 and w["a"] <= 10
    assert capped_examples({"a": 10}, {}, 0.1, ceilings={"a": 4}) == {"a": 4.0}


# -- the setting -------------------------------------------------------------------------------------
def test_the_settings_table_and_its_checks():
    table = aggregation_settings_table()
    assert table["aggregation"]["rule"] == AggregationSettings().rule in RULES
    assert AggregationSettings(**table["aggregation"]) == AggregationSettings()
    for bad in (dict(rule="krum"), dict(trim_fraction=0.5), dict(max_share=0.0), dict(clip_multiple=0.0)):
        with pytest.raises(ValueError):
            AggregationSettings(**bad)


def test_result_weight_defaults_to_the_claim():
    from coordinator.strategies.base import Assignment
    a = Assignment("d", 0, 0, (0,), 0, 32, 1)
    assert Result(a, {}, 120, 0.1).aggregation_weight == 120
    assert Result(a, {}, 10 ** 15, 0.1, weight=400.0).aggregation_weight == 400


@pytest.mark.parametrize("strategy", ["fedavg", "progressive", "selective", "layerwise"])
def test_every_strategy_aggregates_with_the_configured_rule(fmnist_model, strategy):
    """Through from_settings and the base class: each schedule uses the [aggregation] table."""
    from coordinator import strategies
    from coordinator.strategies.base import Assignment
    m, weights = fmnist_model
    cls = strategies.registry()[strategy]
    last = len(m.layers) - 1
    a = Assignment("x", 0, last, tuple(range(last + 1)), m.final_head.index, 32, 1)
    names = a.trained_names(m)
    values = (1.0, 1.1, 0.9, 1.05, 500.0)                          # one device far off
    results = [Result(replace(a, device_id=f"d{i}"), {n: np.full_like(weights[n], v) for n in names}, 100, 0.1)
               for i, v in enumerate(values)]
    aggregated = {}
    for rule in RULES:
        s = cls.from_settings(m, lambda *_: 0.0, {}, batch_sizes=[32], margin=0.1, seed=0,
                              aggregation={"rule": rule, "max_share": 1.0})
        assert s.aggregation.rule == rule
        aggregated[rule] = s.aggregate(None, results, {}, weights)[names[0]]
    np.testing.assert_allclose(aggregated["mean"], np.mean(values), rtol=1e-5)
    np.testing.assert_allclose(aggregated["median"], np.median(values), rtol=1e-6)
    trim = min(int(AggregationSettings().trim_fraction * len(values)), (len(values) - 1) // 2)
    np.testing.assert_allclose(aggregated["trimmed_mean"], np.mean(sorted(values)[trim:len(values) - trim]),
                               rtol=1e-5)
    assert np.all(aggregated["clipped_mean"] < 5)                   # the far-off change clipped
    default = cls.from_settings(m, lambda *_: 0.0, {}, batch_sizes=[32], margin=0.1, seed=0)
    assert default.aggregation == AggregationSettings()


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_a_coordinate_wise_rule_over_update_files_reads_slices_and_equals_the_in_memory_one(tmp_path, monkeypatch,
                                                                                            rule):
    """The coordinator aggregates stored updates: each device's file is read a slice at a time (a chunk of
    coordinates whose width shrinks as devices are added), so N updates never sit in memory whole; the result is
    the one over whole arrays, for fp32 and fp16 files and a tensor that does not divide into chunks."""
    from coordinator.strategies import aggregation
    from edge_runtime.wire import weights as wcodec
    rng = np.random.default_rng(3)
    old = {"w": rng.normal(size=(37, 29)).astype(np.float32), "b": rng.normal(size=(29,)).astype(np.float32)}
    arrays = [{k: (v + rng.normal(scale=0.1, size=v.shape)).astype(np.float32) for k, v in old.items()}
              for _ in range(9)]
    files = []
    for i, a in enumerate(arrays):
        wcodec.save(tmp_path / f"u{i}.safetensors", a, fp16=i % 2 == 1)
        files.append(wcodec.WeightFile(tmp_path / f"u{i}.safetensors"))
    as_read = [{k: f[k] for k in f} for f in files]                    # the fp16 ones as the coordinator reads them
    weights = [float(n) for n in rng.integers(50, 500, size=9)]
    settings = AggregationSettings(rule=rule, max_share=1.0)
    # chunks of 256 coordinates read (the tail: 49), ordered in blocks of 64
    monkeypatch.setattr(aggregation, "ORDER_BUDGET_BYTES", int(256 * 4 * 9 / aggregation.READ_SHARE))
    from_files = aggregate_updates(list(zip(files, weights)), old, settings)
    in_memory = aggregate_updates(list(zip(as_read, weights)), old, settings)
    for name in old:
        np.testing.assert_allclose(from_files[name], in_memory[name], rtol=0, atol=0)
    assert files[1].read_range("w", 1000, 500).shape == (73,)           # the tail of 37 x 29 = 1073
    np.testing.assert_array_equal(files[0].read_range("w", 300, 40), arrays[0]["w"].reshape(-1)[300:340])


@pytest.mark.parametrize("rule, devices, budget_mb", [("trimmed_mean", 200, 2), ("median", 200, 2),
                                                     ("trimmed_mean", 700, 4)])
def test_the_memory_of_a_coordinate_wise_rule_does_not_grow_with_the_number_of_updates(tmp_path, monkeypatch, rule,
                                                                                     devices, budget_mb):
    """200 stored updates of a 100,000-value tensor are 80 MB (700 of 30,000: 84 MB, sorted in two runs): a rule
    over them holds its budget (here 2 or 4 MB) and its output, measured by tracemalloc (numpy reports its
    buffers to it), not the updates. A quarter of the coordinates are equal on every device, so the path for
    columns tied at a cut holds within the budget too."""
    import tracemalloc

    from coordinator.strategies import aggregation
    from edge_runtime.wire import weights as wcodec
    rng = np.random.default_rng(4)
    size = 100_000 if devices == 200 else 30_000
    old = {"w": np.zeros(size, np.float32)}
    files = []
    for i in range(devices):
        value = rng.normal(size=size).astype(np.float32)
        value[: size // 4] = 0.5                                       # a quarter of the columns all tied
        wcodec.save(tmp_path / f"u{i}.safetensors", {"w": value})
        files.append(wcodec.WeightFile(tmp_path / f"u{i}.safetensors"))
    monkeypatch.setattr(aggregation, "ORDER_BUDGET_BYTES", budget_mb << 20)
    tracemalloc.start()
    try:
        out = aggregate_updates([(f, 1.0 + i % 3) for i, f in enumerate(files)], old,
                                AggregationSettings(rule=rule, max_share=1.0))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out["w"].shape == (size,) and abs(float(out["w"][size // 4:].mean())) < 0.05
    np.testing.assert_array_equal(out["w"][: size // 4], 0.5)
    held = (budget_mb << 20) + 12 * size  # the budget, the float64 output and its float32 copy
    assert peak < held + (256 << 10), \
        f"{peak / 2**20:.1f} MB held for {devices * size * 4 / 2**20:.0f} MB of updates, more than {held / 2**20:.1f}"


# -- the coordinate-wise rules against a plain reference ----------------------------------------------------------
def _reference(rule: str, columns: np.ndarray, weights: np.ndarray, trim_fraction: float) -> np.ndarray:
    """The rules as their docs say, one coordinate at a time: devices in stable sorted order (equal values keep
    the devices' order); the trimmed mean drops `trim` at each end and weight-averages the rest; the weighted
    median is the value where the cumulative weight reaches half, midway when it lands on half exactly."""
    n = len(weights)
    trim = min(int(np.floor(trim_fraction * n)), (n - 1) // 2) if n > 2 else 0
    out = []
    for column in columns.T.astype(np.float64):
        order = sorted(range(n), key=lambda d: column[d])
        if rule == "median" and n > 2:
            cumulative = np.cumsum(weights[order])
            half, tol = cumulative[-1] / 2, 1e-9 * cumulative[-1]
            lower = next(i for i, c in enumerate(cumulative) if c >= half - tol)
            upper = next(i for i, c in enumerate(cumulative) if c > half + tol)
            out.append((column[order[lower]] + column[order[upper]]) / 2)
        else:
            kept = order[trim:n - trim]
            out.append(sum(column[d] * weights[d] for d in kept) / sum(weights[d] for d in kept))
    return np.array(out, np.float32)


@pytest.mark.parametrize("devices", [1, 2, 3, 4, 5, 8, 13, 600, 1031])
@pytest.mark.parametrize("rule", ["trimmed_mean", "median"])
def test_coordinate_wise_rules_equal_the_plain_reference_with_ties_and_weights(monkeypatch, rule, devices):
    """Small integers and integer weights, so that every sum is exact whatever its order: the rules must give the
    reference's values exactly, ties at the cuts (which device a stable sort drops) included, for fleets below
    and above a sort run (600: two runs; 1031: longer than two) and trim fractions that trim nothing (0, and
    0.1 below ten devices). Chunks of 64 coordinates, blocks of 64 or fewer, so that several are crossed."""
    from coordinator.strategies import aggregation
    rng = np.random.default_rng(devices)
    coordinates = 300 if devices < 100 else 70
    monkeypatch.setattr(aggregation, "ORDER_BUDGET_BYTES", int(max(256, 64) * 4 * devices / aggregation.READ_SHARE))
    values = rng.integers(-3, 4, size=(devices, coordinates)).astype(np.float32)
    values[:, :5] = 2.0                                               # columns where every device agrees
    values[:, 5][::2] = -0.0                                          # -0.0 and 0.0 are equal values
    values[:, 5][1::2] = 0.0
    weights = rng.integers(1, 50, size=devices).astype(np.float64)
    updates = [({"w": v}, float(n)) for v, n in zip(values, weights)]
    for trim_fraction in (0.0, 0.1, 0.25, 0.49):
        got = aggregate_updates(updates, {}, AggregationSettings(rule=rule, trim_fraction=trim_fraction, **FLAT))["w"]
        np.testing.assert_array_equal(got, _reference(rule, values, weights, trim_fraction),
                                      err_msg=f"{rule}, {devices} devices, trim_fraction {trim_fraction}")


@pytest.mark.parametrize("rule", ["trimmed_mean", "median"])
def test_threads_sharing_a_chunk_give_exactly_the_one_thread_result(monkeypatch, rule):
    """600 devices, three threads reading a chunk's rows and ordering its blocks of coordinates (chunks of 1,562,
    blocks of 65, so that chunks, blocks and threads all cross): the same values as one thread, bit for bit,
    and as the plain reference (integer values and weights: every sum is exact)."""
    from coordinator.strategies import aggregation
    rng = np.random.default_rng(5)
    devices, coordinates = 600, 2500
    values = rng.integers(-3, 4, size=(devices, coordinates)).astype(np.float32)
    weights = rng.integers(1, 50, size=devices).astype(np.float64)
    updates = [({"w": v}, float(n)) for v, n in zip(values, weights)]
    settings = AggregationSettings(rule=rule, trim_fraction=0.1, **FLAT)
    monkeypatch.setattr(aggregation, "ORDER_BUDGET_BYTES", 7_500_000)
    results = {}
    for threads in (3, 1):
        monkeypatch.setattr(aggregation, "ORDER_THREADS", threads)
        results[threads] = aggregate_updates(updates, {}, settings)["w"]
    np.testing.assert_array_equal(results[3], results[1])
    np.testing.assert_array_equal(results[3], _reference(rule, values, weights, 0.1))


@pytest.mark.parametrize("rule", ["trimmed_mean", "median"])
def test_coordinate_wise_rules_on_real_valued_updates_equal_the_reference_to_float32_rounding(rule):
    """Continuous values and weights capped to a share, as a round has them: equal to the reference but for the
    order of a float64 sum (at most one float32 step), per coordinate of a 4 x 50 tensor and a vector."""
    rng = np.random.default_rng(11)
    for devices in (3, 7, 40, 700):
        base = {"w": rng.normal(size=(4, 50)).astype(np.float32), "b": rng.normal(size=9).astype(np.float32)}
        updates = [({k: (v + rng.normal(scale=0.01, size=v.shape)).astype(np.float32) for k, v in base.items()},
                    float(rng.uniform(10, 1000))) for _ in range(devices)]
        settings = AggregationSettings(rule=rule)
        got = aggregate_updates(updates, base, settings)
        weights = share_capped([n for _, n in updates], settings.max_share)
        for name, value in base.items():
            columns = np.stack([u[name].reshape(-1) for u, _ in updates])
            want = _reference(rule, columns, weights, settings.trim_fraction).reshape(value.shape)
            np.testing.assert_array_max_ulp(got[name], want, maxulp=1)
