"""Which units each device trains: selective layer fine-tuning (Sun et al., arXiv 2408.15600).

N devices, L units (layers; the caller may add the head as one more unit). Device i scored
unit j with s[i][j] >= 0 (sum over its batches of the squared gradient norm) and has a
budget. Choose a set S_i per device to maximise

    sum_i sum_{j in S_i} s[i][j]  -  lambda * sum_j sum_{i<i'} (x_ij - x_i'j)^2

subject to cost(i, S_i) <= budget_i. The paper's cost is additive (sum of c_j); ours is the
caller's black box, the measured memory of training that set on that device, assumed only
monotone (a superset never costs less). The empty set always fits (cost 0): that device
trains nothing this round. lambda >= 0 pulls devices towards the same units, so that each
trained unit is averaged over more devices.

The penalty depends only on how many devices select each unit: with k_j = sum_i x_ij,

    sum_{i<i'} (x_ij - x_i'j)^2 = k_j (N - k_j)

(each disagreeing pair counts once). Two consequences shape the solvers:

* exact: a dynamic program over devices whose state is the count vector k. Any partial
  assignment reaching the same k has the same future, so only the best score per k is kept.
  Its work is (states) x (feasible sets), states after i devices <= min((i+1)^L, product of
  the earlier devices' feasible-set counts). solve_exact refuses an instance whose bound
  exceeds MAX_DP_TRANSITIONS, or whose devices would need more than MAX_ENUMERATED_SUBSETS
  candidate subsets each (L <= 12 without a max_units cap).
* approx: given the others' counts c_j, device i's share of the objective is modular,
  sum_{j in S_i} (s[i][j] - lambda (N - 1 - 2 c_j)), so its best response is a maximisation
  over its affordable sets, and the objective is an exact potential: every improving move
  of one device raises the objective by exactly its own gain. Best-response ascent therefore
  terminates, in a local optimum where no device can improve alone. It is not a global
  optimum: a better solution may need several devices to move at once (e.g. all switching
  to a shared unit under a large lambda); restarts from several starting points reduce,
  but do not remove, that gap. Best responses are exact while a device's subsets can be
  enumerated (the same MAX_ENUMERATED_SUBSETS); beyond that they are greedy, and the
  local-optimum guarantee weakens to "no greedy move of one device improves".

Costs are compared as cost <= budget; a safety margin belongs in the caller's cost or budget.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import comb
from typing import Callable, Sequence

import numpy as np

# cost(device index, units) -> memory of training those units on that device
CostFn = Callable[[int, frozenset], float]

MAX_ENUMERATED_SUBSETS = 4096      # candidate subsets per device we enumerate (2^12)
MAX_DP_TRANSITIONS = 2_000_000     # bound on (states x feasible sets) summed over devices


class TooLargeForExact(ValueError):
    """The instance exceeds the exact solver's documented limits; use solve_approx."""


@dataclass(eq=False)
class SelectionProblem:
    scores: np.ndarray                      # N x L, >= 0
    budgets: Sequence[float]                # per device, same unit as cost
    cost: CostFn                            # monotone black box; never called with the empty set
    lam: float = 0.0
    max_units: int | Sequence[int] | None = None   # cap on |S_i|, one for all or per device
    _costs: dict = field(default_factory=dict, init=False, repr=False)
    _feasible: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        self.scores = np.asarray(self.scores, dtype=np.float64)
        if self.scores.ndim != 2 or self.scores.shape[1] == 0 or not np.all(np.isfinite(self.scores)) \
                or np.any(self.scores < 0):
            raise ValueError("scores must be an N x L array (L >= 1) of finite non-negative numbers")
        self.budgets = [float(b) for b in self.budgets]
        if len(self.budgets) != self.n:
            raise ValueError(f"{len(self.budgets)} budgets for {self.n} devices")
        if not np.isfinite(self.lam) or self.lam < 0:
            raise ValueError(f"lambda must be finite and >= 0, got {self.lam}")
        caps = self.max_units
        if caps is None or isinstance(caps, (int, np.integer)):
            caps = [self.l if caps is None else caps] * self.n
        caps = list(caps)
        if len(caps) != self.n or any(int(c) < 0 for c in caps):
            raise ValueError("max_units must be a non-negative int or one per device")
        self.caps = [min(int(c), self.l) for c in caps]

    @property
    def n(self) -> int:
        return self.scores.shape[0]

    @property
    def l(self) -> int:
        return self.scores.shape[1]

    def cost_of(self, i: int, mask: int) -> float:
        """Cached cost of the units in bitmask `mask` on device i (calls may be expensive)."""
        if mask == 0:
            return 0.0
        key = (i, mask)
        if key not in self._costs:
            self._costs[key] = float(self.cost(i, _units(mask)))
        return self._costs[key]

    def affordable(self, i: int, mask: int) -> bool:
        return mask == 0 or (_popcount(mask) <= self.caps[i] and self.cost_of(i, mask) <= self.budgets[i])

    def candidate_count(self, i: int) -> int:
        """How many subsets device i could at most have to consider (before costs prune them)."""
        return sum(comb(self.l, k) for k in range(self.caps[i] + 1))


@dataclass(frozen=True)
class Selection:
    sets: tuple[frozenset, ...]     # units per device; empty = trains nothing
    objective: float
    optimal: bool                   # proven optimal (exact solver, or approx with lambda = 0)
    method: str                     # "exact-dp" or "approx-best-response[...]"


def objective(problem: SelectionProblem, sets: Sequence[frozenset]) -> float:
    """Score of the chosen units minus lambda * sum_j k_j (N - k_j)."""
    if len(sets) != problem.n or any(not 0 <= j < problem.l for s in sets for j in s):
        raise ValueError(f"need one set of units in 0..{problem.l - 1} per device ({problem.n})")
    x = _indicator(sets, problem.l)
    k = x.sum(axis=0)
    return float((x * problem.scores).sum() - problem.lam * (k * (problem.n - k)).sum())


def feasible_sets(problem: SelectionProblem, i: int) -> list[frozenset]:
    """Every set device i can afford, the empty set first, by increasing size."""
    return [_units(m) for m in _feasible_masks(problem, i)]


def solve_exact(problem: SelectionProblem) -> Selection:
    """The optimum, by dynamic programming over the count vector k (see the module docstring)."""
    _check_enumerable(problem)
    tables = [_indicator_masks(_feasible_masks(problem, i), problem.l) for i in range(problem.n)]
    bound = dp_work_bound(problem.l, [len(t) for t in tables])
    if bound > MAX_DP_TRANSITIONS:
        raise TooLargeForExact(
            f"exact layer selection would need up to {bound:,} DP transitions for {problem.n} devices, "
            f"{problem.l} units and up to {max(len(t) for t in tables)} feasible sets per device "
            f"(limit {MAX_DP_TRANSITIONS:,}); use solve_approx or solve")
    small = np.int16 if problem.n < 2**15 else np.int32          # counts lie in 0..N; halves the DP's memory
    counts = np.zeros((1, problem.l), dtype=small)
    values = np.zeros(1)
    back = []                                   # per device: (parent state, chosen set) of each new state
    for i, table in enumerate(tables):
        x = table.astype(small)
        gains = x @ problem.scores[i]
        new_counts = (counts[:, None, :] + x[None, :, :]).reshape(-1, problem.l)
        new_values = (values[:, None] + gains[None, :]).ravel()
        parent = np.repeat(np.arange(len(counts)), len(x))
        choice = np.tile(np.arange(len(x)), len(counts))
        counts, first = _best_per_state(new_counts, new_values)
        values = new_values[first]
        back.append((parent[first], choice[first]))
    k = counts.astype(np.float64)
    total = values - problem.lam * (k * (problem.n - k)).sum(axis=1)
    state = int(np.argmax(total))
    chosen = [0] * problem.n
    for i in range(problem.n - 1, -1, -1):
        parents, choices = back[i]
        chosen[i] = int(choices[state])
        state = int(parents[state])
    sets = tuple(_row_units(tables[i][c]) for i, c in enumerate(chosen))
    return Selection(sets, objective(problem, sets), True, "exact-dp")


def solve_approx(problem: SelectionProblem, restarts: int = 3, seed: int = 0,
                 max_sweeps: int = 1000) -> Selection:
    """Best-response ascent from several starts; the best local optimum found.

    Starts: every device's own best set (the lambda = 0 optimum), everyone empty, the best
    set shared by every device that can afford it, and `restarts` random affordable sets.
    Each step moves one device to its best response only if that strictly raises the
    objective, so each run ends at a point where no device can improve alone (max_sweeps is
    only a safety stop; the objective rises every sweep and the points are finitely many). When every device's subsets can be enumerated
    (candidate_count <= MAX_ENUMERATED_SUBSETS), best responses are exact and that guarantee
    holds; otherwise they are greedy by gain per marginal cost (or by gain), and the result is
    only a point that greedy moves cannot improve. No bound on the gap to the optimum is
    claimed; with lambda = 0 the first start is already optimal (and marked so).
    """
    n = problem.n
    exact_br = all(problem.candidate_count(i) <= MAX_ENUMERATED_SUBSETS for i in range(n))
    responder = _EnumeratedResponses(problem) if exact_br else _GreedyResponses(problem)
    rng = np.random.default_rng(seed)
    starts = [[responder.best(i, problem.scores[i]) for i in range(n)], [0] * n]
    shared = responder.shared_start()
    if shared is not None:
        starts.append(shared)
    starts += [[responder.random(i, rng) for i in range(n)] for _ in range(restarts)]
    best_masks, best_value = None, -np.inf
    for masks in starts:
        masks = _ascend(problem, list(masks), responder, max_sweeps)
        value = objective(problem, [_units(m) for m in masks])
        if value > best_value:
            best_masks, best_value = masks, value
    sets = tuple(_units(m) for m in best_masks)
    how = "enumerated" if exact_br else "greedy"
    return Selection(sets, objective(problem, sets), exact_br and problem.lam == 0,
                     f"approx-best-response[{how}]")


def solve(problem: SelectionProblem) -> Selection:
    """Exact when within the exact solver's limits, otherwise the best-response approximation."""
    try:
        return solve_exact(problem)
    except TooLargeForExact:
        return solve_approx(problem)


def dp_work_bound(l: int, feasible_counts: Sequence[int]) -> int:
    """Upper bound on the DP's transitions: sum_i (states before device i) x |F_i|."""
    total, product = 0, 1
    for i, f in enumerate(feasible_counts):
        total += min((i + 1) ** l, product) * f   # counts after i devices lie in 0..i
        product *= f
    return total


# -- best responses --------------------------------------------------------------------------
def _unit_weights(problem: SelectionProblem, i: int, counts: np.ndarray, masks: list[int]) -> np.ndarray:
    """Device i's marginal objective per unit given the others' counts c: s_ij - lam (N - 1 - 2 c_j)."""
    others = counts - _mask_row(masks[i], problem.l)
    return problem.scores[i] - problem.lam * (problem.n - 1 - 2 * others)


def _ascend(problem: SelectionProblem, masks: list[int], responder, max_sweeps: int) -> list[int]:
    """Move devices to strictly better best responses until none improves (or max_sweeps)."""
    counts = _indicator_masks(masks, problem.l).sum(axis=0)
    tol = 1e-9 * (1.0 + float(problem.scores.sum()) + problem.lam * problem.n * problem.n * problem.l)
    for _ in range(max_sweeps):
        moved = False
        for i in range(problem.n):
            w = _unit_weights(problem, i, counts, masks)
            new = responder.best(i, w)
            if _gain(new, w) > _gain(masks[i], w) + tol:
                counts += _mask_row(new, problem.l) - _mask_row(masks[i], problem.l)
                masks[i] = new
                moved = True
        if not moved:
            break
    return masks


class _EnumeratedResponses:
    """Exact best responses: argmax of the unit weights over all affordable sets."""

    def __init__(self, problem: SelectionProblem):
        self.problem = problem
        self.masks = [_feasible_masks(problem, i) for i in range(problem.n)]     # python ints: any L
        self.tables = [_indicator_masks(m, problem.l).astype(np.float64) for m in self.masks]

    def best(self, i: int, w: np.ndarray) -> int:
        return self.masks[i][int(np.argmax(self.tables[i] @ w))]   # ties -> earliest, i.e. smallest

    def random(self, i: int, rng) -> int:
        return self.masks[i][int(rng.integers(len(self.masks[i])))]

    def shared_start(self) -> list[int]:
        """One set for everyone who can afford it (others empty): the best such start."""
        p = self.problem
        if p.n == 0:
            return []
        owned = [set(m) for m in self.masks]
        union = sorted(set().union(*owned))
        x = _indicator_masks(union, p.l).astype(np.float64)                               # M x L
        can = np.array([[m in own for m in union] for own in owned], dtype=np.float64)    # N x M
        score = (can * (p.scores @ x.T)).sum(axis=0)
        k = can.sum(axis=0)[:, None] * x
        best = int(np.argmax(score - p.lam * (k * (p.n - k)).sum(axis=1)))
        return [union[best] if c else 0 for c in can[:, best]]


class _GreedyResponses:
    """Greedy best responses when subsets are too many to enumerate: add the unit with the best
    positive weight per marginal cost (or the best weight) while it fits; keep the better."""

    def __init__(self, problem: SelectionProblem):
        self.problem = problem

    def best(self, i: int, w: np.ndarray) -> int:
        by_ratio, by_weight = self._greedy(i, w, True), self._greedy(i, w, False)
        return by_ratio if _gain(by_ratio, w) >= _gain(by_weight, w) else by_weight

    def _greedy(self, i: int, w: np.ndarray, per_cost: bool) -> int:
        p, mask = self.problem, 0
        while True:
            base, best, best_key = p.cost_of(i, mask), None, -np.inf
            for j in range(p.l):
                bit = 1 << j
                if mask & bit or w[j] <= 0 or not p.affordable(i, mask | bit):
                    continue
                key = w[j] / max(p.cost_of(i, mask | bit) - base, 1e-12) if per_cost else w[j]
                if key > best_key:
                    best, best_key = bit, key
            if best is None:
                return mask
            mask |= best

    def random(self, i: int, rng) -> int:
        """A random affordable set: units added in random order while they fit."""
        p, mask = self.problem, 0
        for j in rng.permutation(p.l):
            if rng.random() < 0.5 and p.affordable(i, mask | (1 << int(j))):
                mask |= 1 << int(j)
        return mask

    def shared_start(self) -> None:
        return None


# -- enumeration and bit sets -----------------------------------------------------------------
def _check_enumerable(problem: SelectionProblem) -> None:
    for i in range(problem.n):
        if problem.candidate_count(i) > MAX_ENUMERATED_SUBSETS:
            raise TooLargeForExact(
                f"exact layer selection enumerates each device's subsets; device {i} has "
                f"{problem.candidate_count(i):,} candidates for {problem.l} units (cap {problem.caps[i]}), "
                f"over the limit {MAX_ENUMERATED_SUBSETS:,}; use solve_approx or solve")


def _feasible_masks(problem: SelectionProblem, i: int) -> list[int]:
    """Affordable bitmasks level by level; a set is costed only if all its one-smaller subsets fit.

    Monotone cost means a superset of an unaffordable set is unaffordable, so those are never
    costed. Each set of size k+1 is generated once, from the set without its highest unit.
    """
    if i in problem._feasible:
        return problem._feasible[i]
    out, level = [0], [0]
    for _ in range(problem.caps[i]):
        fits, nxt = set(level), []
        for mask in level:
            for j in range(mask.bit_length(), problem.l):
                cand = mask | (1 << j)
                if all(cand ^ b in fits for b in _bits(mask)) and problem.affordable(i, cand):
                    nxt.append(cand)
        if not nxt:
            break
        out += nxt
        level = nxt
    problem._feasible[i] = out
    return out


def _best_per_state(counts: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct count vectors and, for each, the index of its highest value (one lexsort)."""
    order = np.lexsort((-values, *counts.T[::-1]))
    ordered = counts[order]
    starts = np.ones(len(order), dtype=bool)
    starts[1:] = np.any(ordered[1:] != ordered[:-1], axis=1)
    return ordered[starts], order[starts]


def _bits(mask: int):
    while mask:
        low = mask & -mask
        yield low
        mask ^= low


def _popcount(mask: int) -> int:
    return bin(mask).count("1")


def _units(mask: int) -> frozenset:
    return frozenset(j for j in range(mask.bit_length()) if mask >> j & 1)


def _mask_row(mask: int, l: int) -> np.ndarray:
    return _indicator_masks([mask], l)[0]


def _indicator_masks(masks: Sequence[int], l: int) -> np.ndarray:
    """0/1 rows of bitmasks; numpy shifts only while the masks fit an int64."""
    if l <= 62:
        return (np.asarray(masks, dtype=np.int64).reshape(-1, 1) >> np.arange(l)) & 1
    return np.array([[m >> j & 1 for j in range(l)] for m in masks], dtype=np.int64).reshape(len(masks), l)


def _indicator(sets: Sequence[frozenset], l: int) -> np.ndarray:
    x = np.zeros((len(sets), l))
    for i, s in enumerate(sets):
        x[i, sorted(s)] = 1
    return x


def _row_units(row: np.ndarray) -> frozenset:
    return frozenset(int(j) for j in np.flatnonzero(row))


def _gain(mask: int, w: np.ndarray) -> float:
    return float(sum(w[j] for j in _units(mask)))
