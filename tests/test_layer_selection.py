"""Layer selection against brute force on small instances; limits and fallbacks on large ones."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from coordinator.strategies.layer_selection import (
    MAX_ENUMERATED_SUBSETS,
    SelectionProblem,
    TooLargeForExact,
    feasible_sets,
    objective,
    solve,
    solve_approx,
    solve_exact,
)

MAX_PRODUCT = 60_000      # brute-force combinations per instance, keeps the suite fast


def monotone_cost(rng, n, l, base_high=5.0):
    """Non-additive, monotone: base + max over the set + 0.3 * sum, per device; never called with {}."""
    base = rng.uniform(0, base_high, n)
    w = rng.uniform(1, 10, (n, l))

    def cost(i, units):
        assert isinstance(units, frozenset) and units, "cost is only asked about non-empty sets"
        ws = [w[i][j] for j in units]
        return base[i] + max(ws) + 0.3 * sum(ws)
    return cost


def all_affordable(p: SelectionProblem, i: int) -> list[frozenset]:
    """Brute force: every subset, kept if it fits (no pruning, no cache)."""
    out = [frozenset()]
    for size in range(1, p.l + 1):
        for c in itertools.combinations(range(p.l), size):
            if size <= p.caps[i] and p.cost(i, frozenset(c)) <= p.budgets[i]:
                out.append(frozenset(c))
    return out


def brute_force(p: SelectionProblem):
    """(best value, best sets, per-device affordable sets) over the product of all devices' sets,
    the penalty computed pairwise, independent of the k (N - k) identity."""
    options = [all_affordable(p, i) for i in range(p.n)]
    tables = [np.array([[j in s for j in range(p.l)] for s in o], dtype=float) for o in options]
    grid = np.stack([g.ravel() for g in np.meshgrid(*[np.arange(len(t)) for t in tables], indexing="ij")], axis=1)
    x = np.stack([tables[i][grid[:, i]] for i in range(p.n)], axis=1)            # P x N x L
    value = (x * p.scores[None]).sum(axis=(1, 2))
    for i, k in itertools.combinations(range(p.n), 2):
        value -= p.lam * ((x[:, i] - x[:, k]) ** 2).sum(axis=1)
    best = int(np.argmax(value))
    return float(value[best]), [options[i][grid[best, i]] for i in range(p.n)], options


def random_instances(count=60, seed=7):
    """Random small instances (N 2..4, L 3..5, lambda 0 / small / large) small enough to brute-force."""
    rng = np.random.default_rng(seed)
    made = 0
    while made < count:
        n, l = int(rng.integers(2, 5)), int(rng.integers(3, 6))
        scores = rng.gamma(0.7, 1.0, (n, l)) * (rng.random((n, l)) > 0.15)
        cost = monotone_cost(rng, n, l)
        full = np.array([cost(i, frozenset(range(l))) for i in range(n)])
        budgets = full * rng.uniform(0.1, 1.1, n)
        lam = [0.0, 0.05 * float(scores.mean()), 3.0 * float(scores.max())][made % 3]
        p = SelectionProblem(scores, budgets, cost, lam)
        if np.prod([len(feasible_sets(p, i)) for i in range(n)], dtype=float) > MAX_PRODUCT:
            continue
        made += 1
        yield p


def improves_alone(p: SelectionProblem, sets, options, tol=1e-9) -> bool:
    base = objective(p, sets)
    for i in range(p.n):
        for s in options[i]:
            if objective(p, sets[:i] + [s] + sets[i + 1:]) > base + tol:
                return True
    return False


def assert_affordable(p: SelectionProblem, sets):
    assert len(sets) == p.n
    for i, s in enumerate(sets):
        assert not s or (p.cost(i, s) <= p.budgets[i] and len(s) <= p.caps[i]), (i, s)


def test_exact_matches_brute_force_and_approx_is_a_good_local_optimum():
    hits, total = 0, 0
    for p in random_instances():
        best, _, options = brute_force(p)
        assert {frozenset(s) for s in feasible_sets(p, 0)} == set(options[0])

        exact = solve_exact(p)
        assert exact.optimal and exact.method == "exact-dp"
        assert exact.objective == pytest.approx(best, abs=1e-9)
        assert objective(p, list(exact.sets)) == pytest.approx(best, abs=1e-9)
        assert_affordable(p, exact.sets)

        approx = solve_approx(p)
        assert approx.objective <= best + 1e-9
        assert_affordable(p, approx.sets)
        assert not improves_alone(p, list(approx.sets), options)
        hits += approx.objective >= best - 1e-9
        total += 1
    assert total == 60
    assert hits / total >= 0.9, f"approx reached the optimum on {hits}/{total}"   # measured: 60/60


def test_lambda_zero_is_each_devices_best_affordable_set():
    for p in itertools.islice(random_instances(seed=11), 0, None, 3):      # lambda = 0 ones
        assert p.lam == 0
        own = [max(all_affordable(p, i), key=lambda s: sum(p.scores[i][j] for j in s)) for i in range(p.n)]
        want = sum(p.scores[i][j] for i, s in enumerate(own) for j in s)
        for sol in (solve_exact(p), solve_approx(p)):
            assert sol.optimal
            for i, s in enumerate(sol.sets):
                assert sum(p.scores[i][j] for j in s) == pytest.approx(sum(p.scores[i][j] for j in own[i]))
            assert sol.objective == pytest.approx(want)


def test_large_lambda_makes_devices_agree():
    rng = np.random.default_rng(3)
    n, l = 4, 5
    w = [2.0, 3.0, 3.0, 4.0, 4.0]
    cost = lambda i, units: 1 + max(w[j] for j in units) + 0.3 * sum(w[j] for j in units)   # same on every device
    budgets = [7.0] * n                                        # every unit alone fits, at most three together
    scores = rng.uniform(0.5, 1.0, (n, l)) + 5 * np.eye(n, l)   # device i wants unit i most
    free = solve_exact(SelectionProblem(scores, budgets, cost, 0.0))
    assert [i in s for i, s in enumerate(free.sets)] == [True] * n and len(set(free.sets)) > 1
    p = SelectionProblem(scores, budgets, cost, 100.0)
    for sol in (solve_exact(p), solve_approx(p)):
        assert len(set(sol.sets)) == 1 and sol.sets[0], sol.sets
        assert_affordable(p, sol.sets)


def test_a_device_that_affords_nothing_gets_the_empty_set():
    rng = np.random.default_rng(5)
    n, l = 3, 4
    cost = monotone_cost(rng, n, l)
    budgets = [cost(0, frozenset(range(l))), 0.5, cost(2, frozenset({1, 2}))]    # device 1: below any unit
    for lam in (0.0, 0.1, 50.0):
        p = SelectionProblem(rng.gamma(1.0, 1.0, (n, l)), budgets, cost, lam)
        assert feasible_sets(p, 1) == [frozenset()]
        for sol in (solve_exact(p), solve_approx(p), solve(p)):
            assert sol.sets[1] == frozenset()
            assert_affordable(p, sol.sets)


def test_enumeration_prunes_supersets_and_caches_costs():
    calls = []
    w = [1.0, 100.0, 2.0, 3.0]

    def cost(i, units):
        calls.append(units)
        return max(w[j] for j in units) + sum(w[j] for j in units)
    p = SelectionProblem(np.ones((1, 4)), [20.0], cost)
    sets = feasible_sets(p, 0)
    assert {frozenset({1})} <= set(calls) and not any(1 in c and len(c) > 1 for c in calls)
    made = len(calls)
    assert made == len(set(calls))
    feasible_sets(p, 0), solve(p), solve_approx(p)
    assert len(calls) == made
    assert set(sets) == set(all_affordable(p, 0))


def test_max_units_caps_sets_and_makes_many_units_exact():
    rng = np.random.default_rng(9)
    n, l = 2, 14                                     # 2^14 subsets: beyond enumeration without a cap
    cost = monotone_cost(rng, n, l)
    budgets = [cost(i, frozenset(range(l))) for i in range(n)]
    scores = rng.gamma(1.0, 1.0, (n, l))
    with pytest.raises(TooLargeForExact, match="limit 4,096"):
        solve_exact(SelectionProblem(scores, budgets, cost, 0.2))
    p = SelectionProblem(scores, budgets, cost, 0.2, max_units=2)
    best, _, _ = brute_force(p)
    sol = solve(p)
    assert sol.method == "exact-dp" and sol.objective == pytest.approx(best)
    assert all(len(s) <= 2 for s in sol.sets)


def test_greedy_best_responses_when_subsets_cannot_be_enumerated():
    rng = np.random.default_rng(4)
    n, l = 6, 16
    cost = monotone_cost(rng, n, l)
    budgets = [cost(i, frozenset(range(l))) * rng.uniform(0.2, 0.8) for i in range(n)]
    p = SelectionProblem(rng.gamma(1.0, 1.0, (n, l)), budgets, cost, 0.05)
    assert p.candidate_count(0) > MAX_ENUMERATED_SUBSETS
    sol = solve(p)
    assert sol.method == "approx-best-response[greedy]" and not sol.optimal
    assert_affordable(p, sol.sets)
    assert sol.objective >= 0.0 and any(sol.sets)        # no worse than everyone idle


def test_too_large_instances_are_refused_and_solve_falls_back():
    rng = np.random.default_rng(1)
    n, l = 50, 12
    cost = monotone_cost(rng, n, l)
    budgets = [cost(i, frozenset(range(l))) * rng.uniform(0.05, 0.5) for i in range(n)]
    p = SelectionProblem(rng.gamma(1.0, 1.0, (n, l)), budgets, cost, 0.05)
    with pytest.raises(ValueError, match="exact layer selection would need up to .* DP transitions"):
        solve_exact(p)
    sol = solve(p)
    assert sol.method == "approx-best-response[enumerated]" and not sol.optimal
    assert_affordable(p, sol.sets)
    options = [feasible_sets(p, i) for i in range(n)]
    assert not improves_alone(p, list(sol.sets), options)
    assert sol.objective == pytest.approx(objective(p, list(sol.sets)))


def test_invalid_problems_are_rejected():
    cost = lambda i, units: 1.0
    with pytest.raises(ValueError, match="non-negative"):
        SelectionProblem(np.array([[-1.0, 1.0]]), [1.0], cost)
    with pytest.raises(ValueError, match="budgets"):
        SelectionProblem(np.ones((2, 2)), [1.0], cost)
    with pytest.raises(ValueError, match="lambda"):
        SelectionProblem(np.ones((1, 2)), [1.0], cost, lam=-1.0)


def test_many_units_beyond_a_64_bit_mask():
    """70 units: exact with a cap of one unit per device, greedy best responses without one."""
    rng = np.random.default_rng(8)
    n, l = 3, 70
    cost = monotone_cost(rng, n, l)
    budgets = [cost(i, frozenset(range(8))) for i in range(n)]
    scores = rng.gamma(1.0, 1.0, (n, l))
    capped = SelectionProblem(scores, budgets, cost, 0.3, max_units=1)
    exact = solve(capped)
    assert exact.method == "exact-dp"
    assert exact.objective >= solve_approx(capped).objective - 1e-9
    assert_affordable(capped, exact.sets)
    free = SelectionProblem(scores, budgets, cost, 0.3)
    sol = solve(free)
    assert sol.method == "approx-best-response[greedy]" and any(sol.sets)
    assert_affordable(free, sol.sets)
    assert all(0 <= j < l for s in sol.sets for j in s)
