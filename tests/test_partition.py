"""The partition search and the memory-model fits: pure functions, checked against brute force."""
import itertools

import numpy as np
import pytest

from edge_runtime.profiling.memory_model import (
    CandidateFit,
    Measurement,
    Predictor,
    SpanModel,
    fit_candidate,
    fit_span_model,
)
from edge_runtime.profiling.partition import NoPartition, best_partition, choose_member, choose_partition


def _brute_force(n, cuts, batch, predict, usable):
    """Every subset of cut points, checked exhaustively: the fewest stages, then the lowest worst peak."""
    inner = [c for c in cuts if c != n - 1]
    best = None
    for k in range(len(inner) + 1):
        for chosen in itertools.combinations(inner, k):
            ends = list(chosen) + [n - 1]
            firsts = [0] + [e + 1 for e in ends[:-1]]
            peaks = [predict(f, e, batch) for f, e in zip(firsts, ends)]
            if max(peaks) <= usable:
                key = (len(ends), max(peaks))
                if best is None or key < best:
                    best = key
    return best


@pytest.mark.parametrize("seed", range(30))
def test_dp_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 9))
    cuts = sorted(set(rng.choice(n - 1, size=int(rng.integers(0, n)), replace=False).tolist()) | {n - 1}) \
        if n > 1 else [0]
    cost = rng.uniform(1, 10, size=n)
    fixed = rng.uniform(0, 5)

    def predict(first, last, batch):
        return fixed + cost[first:last + 1].sum() * batch

    usable = rng.uniform(cost.max() * 2, cost.sum() * 2 + 1)
    got = best_partition(n, cuts, 2, predict, usable)
    expected = _brute_force(n, cuts, 2, predict, usable)
    if expected is None:
        assert got is None
    else:
        assert (len(got.stages), got.worst_peak_bytes) == (expected[0], pytest.approx(int(expected[1]), abs=1))
        assert got.stages[0].first == 0 and got.stages[-1].last == n - 1
        assert all(a.last + 1 == b.first for a, b in zip(got.stages, got.stages[1:]))
        assert all(s.last in cuts for s in got.stages)


def test_more_memory_never_means_more_stages():
    cost = np.array([5, 1, 1, 8, 2, 2, 1.0])
    predict = lambda f, l, b: 10 + cost[f:l + 1].sum() * b  # noqa: E731
    counts = [len(choose_partition(7, range(7), [4, 8], predict, budget).stages) for budget in (60, 90, 130, 400)]
    assert counts == sorted(counts, reverse=True) and counts[-1] == 1


def test_prefers_larger_batch_at_equal_stage_count_and_explains_infeasible():
    predict = lambda f, l, b: 10 + (l - f + 1) * b  # noqa: E731
    p = choose_partition(4, range(4), [2, 4, 8], predict, usable_bytes=10 + 4 * 8)
    assert len(p.stages) == 1 and p.batch_size == 8
    with pytest.raises(NoPartition, match=r"layers \d-\d alone need"):
        choose_partition(4, range(4), [2, 4], predict, usable_bytes=5)


def _m(first, last, batch, peak, p=1000, a=100):
    return Measurement(first, last, 0, batch, peak, 0.01, p, a)


def test_candidate_fit_recovers_a_line_and_predicts_untried_batches():
    base = 60 << 20
    pts = [_m(0, 1, b, base + 30_000_000 + 150_000 * b) for b in (16, 64)]
    fit = fit_candidate(pts, base)
    assert fit.predict(base, 32) == pytest.approx(base + 30_000_000 + 150_000 * 32, rel=1e-9)
    assert fit.max_rel_error < 1e-9
    with pytest.raises(ValueError, match="two batch sizes"):
        fit_candidate(pts[:1], base)


def test_span_model_generalises_from_features():
    base = 60 << 20
    truth = lambda p, a, b: base + 4 * p + 5e6 + (3 * a + 2000) * b  # noqa: E731
    pts = [Measurement(i, i, 0, b, int(truth(p, a, b)), 0.0, p, a)
           for i, (p, a) in enumerate([(1e6, 2e4), (8e6, 1e4), (2e5, 9e4), (3e6, 5e4)]) for b in (16, 64)]
    model = fit_span_model(pts, base)
    assert model.predict(5e6, 3e4, 32) == pytest.approx(truth(5e6, 3e4, 32), rel=1e-6)


# a family of three members whose peaks grow with the member and the batch: 10 + need x batch
FAMILY = [(name, lambda b, need=need: 10 + need * b) for name, need in (("small", 1), ("medium", 2), ("large", 20))]


@pytest.mark.parametrize("usable, member, batch", [
    (10 + 20 * 8, "large", 8),     # the largest member at the largest batch
    (10 + 20 * 4, "large", 4),     # the largest member at a smaller batch: a member is worth more than a batch
    (10 + 20 * 2 - 1, "medium", 8),  # between medium and large at every batch: the smaller, at its largest batch
    (10 + 2 * 4, "medium", 4),
    (10 + 2 * 2, "medium", 2),
    (10 + 2 * 2 - 1, "small", 2),
])
def test_choose_member_takes_the_largest_member_that_fits_then_the_largest_batch(usable, member, batch):
    got = choose_member(FAMILY, [2, 4, 8], usable)
    assert (got.member, got.batch_size) == (member, batch)
    assert got.predicted_peak_bytes <= usable


def test_choose_member_says_what_the_smallest_member_needs():
    with pytest.raises(NoPartition, match=r"the smallest member, small, needs 0 MB at batch 2, more than the usable"):
        choose_member(FAMILY, [8, 2, 4], usable_bytes=11)


def test_a_fit_with_skip_is_its_own_key_and_json_lists_become_tuples():
    base = 60 << 20
    span = SpanModel(base, 0.0, 1e6, 0.0, 0.0, 0.0)
    whole = CandidateFit(0, 6, 5e6, 1e5, 0.0)
    member = CandidateFit(0, 6, 2e6, 3e4, 0.0, skip=[5, 4, 6])   # as a profile file's JSON holds it
    assert member.skip == (4, 5, 6) and Measurement(0, 6, 3, 16, 1, 0.1, 1, 1, [3, 1]).skip == (1, 3)
    predictor = Predictor(None, base, [whole, member], span)    # no manifest: every span asked for was measured
    assert predictor.predict(0, 6, 32) == whole.predict(base, 32)                    # as callers pass it today
    assert predictor.predict(0, 6, 32, skip=(6, 5, 4)) == member.predict(base, 32)  # any order of the same set
    assert predictor.predict(0, 6, 32, skip=[4, 5, 6]) != predictor.predict(0, 6, 32)


def test_candidate_fit_keeps_the_skip_and_refuses_mixed_spans():
    base = 60 << 20
    pts = [Measurement(0, 6, 3, b, base + 1_000_000 + 50_000 * b, 0.01, 10, 10, (1, 2)) for b in (16, 64)]
    assert fit_candidate(pts, base).skip == (1, 2)
    with pytest.raises(ValueError, match="one span"):
        fit_candidate([pts[0], Measurement(0, 6, 3, 64, base + 2, 0.01, 10, 10)], base)
