"""Checking and combining the updates devices send back: pure functions over numpy arrays.

An update is the trained values of the parameters a device was told to train. Before it
may touch the global model it must name exactly those parameters, with the manifest's
shapes, hold only finite numbers, and not move the weights further than a bound allows
(a relative L2 norm of the change). A check like that cannot stop one device from
wrecking the model with a valid-looking update (flipped and scaled inside the bound, or a
claimed sample count of 10^15), so aggregation is robust too:

- the weight a device's update gets is its claimed sample count, capped by what is
  plausible (`capped_examples`: a multiple of the round's median claim, of the device's own
  past claims, and a maximum share of the round); the service sets it as Result.weight;
- each parameter is combined over the devices that trained it (so devices that trained
  different parts, tiers or selected layers combine correctly) by the [aggregation] rule
  (`AggregationSettings`): the weighted mean (FedAvg), the weighted coordinate-wise median,
  the trimmed mean, or the mean of changes clipped to a multiple of the round's median
  change norm. `aggregate_updates` reads updates a parameter at a time: a round never holds
  whole updates, only one parameter's tensors from each device that trained it.

What each rule costs and buys is measured by tools/bench_poisoning.py (docs/benchmarks.md).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np


class UpdateRejected(Exception):
    """An update that must not touch the global model; the message is the logged reason."""


@dataclass(frozen=True)
class UpdateCheck:
    max_relative_change: float = 10.0   # ||new - old|| / (||old|| + eps) over the whole update


def validate_update(update: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]],
                    global_weights: Mapping[str, np.ndarray], check: UpdateCheck = UpdateCheck()) -> None:
    """Raise UpdateRejected unless `update` is exactly the expected parameters, finite and within bounds."""
    missing = sorted(set(expected) - set(update))
    extra = sorted(set(update) - set(expected))
    if missing or extra:
        raise UpdateRejected(f"update names the wrong parameters: missing {missing[:3]}, unexpected {extra[:3]}")
    change_sq, base_sq = 0.0, 0.0
    for name, shape in expected.items():
        value = update[name]
        if value.dtype not in (np.float32, np.float16):
            raise UpdateRejected(f"{name} has dtype {value.dtype}, expected float32 or float16")
        if tuple(value.shape) != tuple(shape):
            raise UpdateRejected(f"{name} has shape {tuple(value.shape)}, expected {tuple(shape)}")
        if not np.isfinite(value).all():
            raise UpdateRejected(f"{name} contains NaN or infinite values")
        old = global_weights[name].astype(np.float64)
        change_sq += float(np.sum((value.astype(np.float64) - old) ** 2))
        base_sq += float(np.sum(old ** 2))
    relative = np.sqrt(change_sq) / (np.sqrt(base_sq) + 1e-12)
    if relative > check.max_relative_change:
        raise UpdateRejected(f"update moves the weights by {relative:.3g}x their norm, "
                             f"more than the bound {check.max_relative_change:g}")


# -- robust aggregation -------------------------------------------------------------------------
RULES = ("mean", "median", "trimmed_mean", "clipped_mean")


@dataclass(frozen=True)
class AggregationSettings:
    """[aggregation]: how a round's accepted updates become the global weights, for every strategy.

    rule: per parameter, over the devices that trained it,
      mean          the weight-averaged values: FedAvg (one attacker can move a parameter anywhere)
      median        the weighted coordinate-wise median (two attackers capped at max_share each hold half
                    the weight, and inflated claims then move it: measured)
      trimmed_mean  per coordinate, the `trim_fraction` lowest and highest devices dropped (by count, whatever
                    their weights), the rest weight-averaged: the default, the only rule measured to hold
                    against every attack of tools/bench_poisoning.py; with fewer than four trainers of a
                    parameter nothing is trimmed (the weighted mean)
      clipped_mean  each device's change of a tensor clipped to `clip_multiple` x the round's median change
                    norm of that tensor, then averaged
    A device's weight is its sample count, capped (capped_examples): at most `fleet_multiple` x the
    round's median claim, `history_multiple` x the median of its own past claims once it has
    `min_history` of them, and `max_share` of the round; aggregation caps every parameter's
    weights to `max_share` of its trainers again.
    """
    rule: str = "trimmed_mean"
    trim_fraction: float = 0.25
    clip_multiple: float = 2.0
    max_share: float = 0.25
    fleet_multiple: float = 4.0
    history_multiple: float = 1.5
    min_history: int = 1

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"aggregation rule {self.rule!r} is not one of {', '.join(RULES)}")
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), not {self.trim_fraction}")
        if not self.clip_multiple > 0 or not 0 < self.max_share <= 1:
            raise ValueError("clip_multiple must be positive and max_share in (0, 1]")
        if not (self.fleet_multiple >= 1 and self.history_multiple >= 1 and self.min_history >= 1):
            raise ValueError("fleet_multiple and history_multiple must be >= 1, min_history >= 1")

    def weights(self, claimed: Mapping[str, float], history: Mapping[str, Sequence[float]],
                ceilings: Mapping[str, float] | None = None) -> dict[str, float]:
        """capped_examples with these settings."""
        return capped_examples(claimed, history, self.max_share, fleet_multiple=self.fleet_multiple,
                               history_multiple=self.history_multiple, min_history=self.min_history,
                               ceilings=ceilings)


def aggregation_settings_table() -> dict[str, dict]:
    """The coordinator's [aggregation] table with its defaults, to add to the service's DEFAULTS."""
    return {"aggregation": asdict(AggregationSettings())}


def share_capped(weights: Sequence[float], max_share: float) -> np.ndarray:
    """The weights with none above `max_share` of their total: the largest lowered to one level, the rest kept.

    Never raises a weight. When no level can do it (fewer than 1 / max_share weights), all become the smallest.
    """
    w = np.asarray(weights, np.float64)
    if len(w) <= 1 or max_share >= 1 or w.max() <= max_share * w.sum():
        return w.copy()
    order = np.argsort(-w, kind="stable")
    desc = w[order]
    rest = np.cumsum(desc[::-1])[::-1]            # rest[k] = sum of desc[k:]
    for k in range(1, len(w)):
        if 1 - max_share * k <= 0:
            break
        level = max_share * rest[k] / (1 - max_share * k)
        if desc[k] <= level:
            out = w.copy()
            out[order[:k]] = level
            return out
    return np.full_like(w, w.min())


def capped_examples(claimed: Mapping[str, float], history: Mapping[str, Sequence[float]], max_share: float,
                    fleet_multiple: float = AggregationSettings.fleet_multiple,
                    history_multiple: float = AggregationSettings.history_multiple,
                    min_history: int = AggregationSettings.min_history,
                    ceilings: Mapping[str, float] | None = None) -> dict[str, float]:
    """The weight each device's claimed sample count earns in a round: the claim, capped by what is plausible.

    A device's weight is at most
    - `fleet_multiple` x the round's median claim (the lower median: with two devices, the
      smaller claim), whatever its history: a device cannot buy influence by lying consistently;
    - `history_multiple` x the median of its own past claims, once it has `min_history` of them
      (its past claims only ever lower its cap, so the history may be raw claims);
    - its ceiling, if the caller knows one (e.g. the most its tier can hold);
    and then no device keeps more than `max_share` of the round's total (share_capped).
    Claims are never raised; a claim that is not a positive finite number earns 0.
    """
    devices = list(claimed)
    if not devices:
        return {}
    raw = np.array([float(claimed[d]) for d in devices])
    raw = np.where(np.isfinite(raw) & (raw > 0), raw, 0.0)
    positive = np.sort(raw[raw > 0])
    if len(positive) == 0:
        return {d: 0.0 for d in devices}
    fleet_cap = fleet_multiple * positive[(len(positive) - 1) // 2]
    ceilings = ceilings or {}
    capped = []
    for d, n in zip(devices, raw):
        cap = min(fleet_cap, float(ceilings.get(d, np.inf)))
        past = [float(x) for x in history.get(d, ()) if np.isfinite(x) and x > 0]
        if len(past) >= min_history:
            cap = min(cap, history_multiple * float(np.median(past)))
        capped.append(min(n, cap))
    capped = np.array(capped)
    out = np.zeros(len(devices))
    live = capped > 0
    out[live] = share_capped(capped[live], max_share)
    return {d: float(w) for d, w in zip(devices, out)}


def aggregate_updates(updates: Sequence[tuple[Mapping[str, np.ndarray], float]],
                      global_weights: Mapping[str, np.ndarray],
                      settings: AggregationSettings = AggregationSettings()) -> dict[str, np.ndarray]:
    """The new value of every parameter some update holds, by the settings' rule over the devices that sent it.

    updates: (trained tensors, weight) per device; the tensors may be a lazy mapping (a
    WeightFile): they are read a parameter at a time, so at most one parameter's tensors
    (one per device that trained it) are held, never whole updates. A parameter's weights
    are capped to `max_share` of its trainers first. With one trainer a parameter takes its
    value under every rule; with two, median and trimmed mean have nothing to outvote and
    take their weighted mean, while clipped_mean still clips the larger change to
    `clip_multiple` x the smaller. Parameters no update holds are not returned (the caller
    keeps their global values).
    """
    weights = [float(n) for _, n in updates]
    if any(not (np.isfinite(n) and n > 0) for n in weights):
        raise ValueError("every update needs a positive finite weight")
    names: dict[str, list[int]] = {}
    for i, (values, _) in enumerate(updates):
        for name in values:                      # names only: a lazy mapping reads nothing here
            names.setdefault(name, []).append(i)
    share_cache: dict[tuple[int, ...], np.ndarray] = {}
    out = {}
    for name, devices in names.items():
        key = tuple(devices)
        if key not in share_cache:
            share_cache[key] = share_capped([weights[i] for i in devices], settings.max_share)
        w = share_cache[key]
        tensors = [updates[i][0] for i in devices]
        if settings.rule == "clipped_mean":
            value = _clipped_mean(name, tensors, w, global_weights[name], settings.clip_multiple)
        elif settings.rule in ("median", "trimmed_mean") and len(devices) > 2:
            value = _order_statistic(name, tensors, w, settings)
        else:
            value = _mean(name, tensors, w)
        out[name] = value.astype(np.float32)
    return out


def _mean(name: str, tensors, w: np.ndarray) -> np.ndarray:
    total = None
    for values, wi in zip(tensors, w):
        contribution = values[name].astype(np.float64) * wi
        total = contribution if total is None else total + contribution
    return total / w.sum()


def _clipped_mean(name: str, tensors, w: np.ndarray, old: np.ndarray, clip_multiple: float) -> np.ndarray:
    """Two passes over the devices' tensors (read twice, held once each): the change norms, then the clipped mean."""
    base = np.asarray(old, np.float64)
    norms = np.array([float(np.linalg.norm(values[name].astype(np.float64) - base)) for values in tensors])
    reference = np.sort(norms)[(len(norms) - 1) // 2]          # lower median: the smaller of two
    bound = clip_multiple * reference
    total = np.zeros_like(base)
    for values, wi, norm in zip(tensors, w, norms):
        scale = 1.0 if norm <= bound else bound / norm
        total += (values[name].astype(np.float64) - base) * (wi * scale)
    return base + total / w.sum()


ORDER_BUDGET_BYTES = 64 << 20   # what a coordinate-wise rule holds at once besides its output, however many devices
READ_SHARE = 0.5                # of the budget: the chunk of coordinates read, float32, one row per device
WORK_BYTES_PER_VALUE = 32       # the rest: per device and coordinate of the block being ordered, at most this (each
#                                 rule's class says what it holds)
ORDER_THREADS = max(1, min(4, os.cpu_count() or 1))    # threads reading and ordering a chunk, sharing the budget


def _order_statistic(name: str, tensors, w: np.ndarray, settings: AggregationSettings) -> np.ndarray:
    """Weighted coordinate-wise median or trimmed mean, a chunk of coordinates at a time: each device's slice of
    the chunk is read on its own (WeightFile.read_range_into), so the coordinator holds N slices, never N tensors,
    and its peak stays flat as the fleet grows (the chunk narrows as N grows). The chunk is then ordered a block
    of coordinates at a time, in buffers allocated once, each block laid out coordinates x devices so that every
    sort runs along contiguous memory.

    ORDER_THREADS threads share each chunk, the reads split by device and the ordering by block of coordinates
    (the reads and numpy's sorts and sums run outside the GIL). The chunk keeps its whole share of the budget:
    splitting chunks among threads would narrow each, and at 1,000 devices the reads, N per chunk, are what
    costs most. Every coordinate is computed alone, so the result does not depend on the threads."""
    n = len(tensors)
    shape = _shape(tensors[0], name)
    size = int(np.prod(shape, dtype=np.int64))
    trim = min(int(np.floor(settings.trim_fraction * n)), (n - 1) // 2)
    if settings.rule == "trimmed_mean" and trim == 0:     # nothing to drop: the weighted mean, without ordering
        return _mean(name, tensors, w)
    read_width = min(max(size, 1), max(256, int(ORDER_BUDGET_BYTES * READ_SHARE) // (4 * n)))
    threads = ORDER_THREADS if n * read_width >= 1 << 16 else 1      # a chunk this small is done sooner alone
    threads = min(threads, max(1, int(ORDER_BUDGET_BYTES * (1 - READ_SHARE)) // (64 * WORK_BYTES_PER_VALUE * n)))
    work_width = min(read_width, max(64, int(ORDER_BUDGET_BYTES * (1 - READ_SHARE)) // (WORK_BYTES_PER_VALUE * n
                                                                                         * threads)))
    combiners = [_WeightedMedian(w, work_width) if settings.rule == "median" else _TrimmedMean(w, work_width, trim)
                 for _ in range(threads)]
    chunk = np.empty((n, read_width), np.float32)
    out = np.empty(size, np.float64)

    def read(start: int, count: int, devices: range) -> None:
        for d in devices:
            _read_slice(tensors[d], name, start, chunk[d, :count])

    def combine(start: int, count: int, k: int) -> None:
        for a in range(k * work_width, count, threads * work_width):     # every threads-th block of the chunk
            b = min(count, a + work_width)
            out[start + a:start + b] = combiners[k](chunk[:, a:b])

    rows = [range(k * n // threads, (k + 1) * n // threads) for k in range(threads)]
    with ThreadPoolExecutor(threads, thread_name_prefix="aggregate") if threads > 1 else nullcontext() as pool:
        def each(fn, calls) -> None:
            """fn(*call) for every call: in the threads, or here when there is one."""
            if pool is None:
                for call in calls:
                    fn(*call)
            else:
                for done in [pool.submit(fn, *call) for call in calls]:
                    done.result()
        for start in range(0, size, read_width):
            count = min(read_width, size - start)
            each(read, [(start, count, r) for r in rows])
            each(combine, [(start, count, k) for k in range(threads)])
    return out.reshape(shape)


def _shape(values, name: str) -> tuple[int, ...]:
    return values.shape_of(name) if hasattr(values, "shape_of") else np.shape(values[name])


def _read_slice(values, name: str, start: int, out: np.ndarray) -> None:
    """Elements [start, start + len(out)) of one device's flattened tensor into `out`: read from its file alone
    when it is one, else copied from the array."""
    if hasattr(values, "read_range_into"):
        values.read_range_into(name, start, out)
    else:
        out[:] = np.asarray(values[name]).reshape(-1)[start:start + len(out)]


class _TrimmedMean:
    """Per column of a block (devices x coordinates, float32): the `trim` lowest and highest devices dropped, the
    rest weight-averaged. Which devices those are is what a stable sort says: among equal values the later device
    counts as the larger.

    The values alone are sorted (`_sorted_at`: the values at the two cuts); a device is kept when its value lies
    within the cuts. In a column with a tie at a cut (equal values on both sides of it) that keeps too many: of
    the devices at the low cut, the first ones by device are dropped until `trim` lie below it, and of those at
    the high cut the last ones. Then one masked product with the weights. 6 bytes per value, and about 16
    more for the tied columns (all of them when every device sent the same values)."""

    def __init__(self, w: np.ndarray, width: int, trim: int):
        n = len(w)
        self.w, self.trim = w, trim
        self.ordered = np.empty((width, n), np.float32)     # coordinates x devices: sorted along contiguous memory
        self.kept = np.empty((n, width), bool)
        self.not_above = np.empty((n, width), bool)

    def __call__(self, values: np.ndarray) -> np.ndarray:
        n, columns = values.shape
        trim = self.trim
        ordered, kept, not_above = self.ordered[:columns], self.kept[:, :columns], self.not_above[:, :columns]
        np.copyto(ordered, values.T)
        low, high = _sorted_at(ordered, (trim, n - 1 - trim))
        np.greater_equal(values, low, out=kept)
        np.less_equal(values, high, out=not_above)
        np.logical_and(kept, not_above, out=kept)
        tied = np.flatnonzero(np.add.reduce(kept, axis=0, dtype=np.int32) > n - 2 * trim)
        if tied.size:
            x, low, high = values[:, tied], low[tied], high[tied]
            at_low, at_high = x == low, x == high
            dropped = at_low & (np.cumsum(at_low, axis=0, dtype=np.int32) <= trim - (x < low).sum(0))
            dropped |= at_high & (np.cumsum(at_high[::-1], axis=0, dtype=np.int32)[::-1] <= trim - (x > high).sum(0))
            kept[:, tied] &= ~dropped
        return np.einsum("d,dc,dc->c", self.w, values, kept) / np.einsum("d,dc->c", self.w, kept)


SORT_RUN = 512   # values a row may have to sort in one run: longer rows sort ~4x slower per value (numpy's SIMD sort)


def _sorted_at(rows: np.ndarray, positions: Sequence[int]) -> np.ndarray:
    """Per row, the values at `positions` of its sorted order (positions x rows); sorts the rows in place. A row of
    up to two runs is sorted as two halves, and the positions found in the pair by a binary search (_kth_of_two)."""
    n = rows.shape[1]
    if n <= SORT_RUN or n > 2 * SORT_RUN:
        rows.sort(axis=1)
        return rows[:, list(positions)].T
    first, second = rows[:, :n // 2], rows[:, n // 2:]
    first.sort(axis=1)
    second.sort(axis=1)
    return _kth_of_two(first, second, np.array(positions))


def _kth_of_two(a: np.ndarray, b: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """Per k of `ks` and row, the k-th smallest (from 0) of a row of `a` and the same row of `b`, both sorted
    (ks x rows): found by how many of the k + 1 smallest come from `a`, a binary search over every k and row at
    once."""
    p, q = a.shape[1], b.shape[1]
    rows = np.arange(len(a))
    ks = ks[:, None]
    lo = np.broadcast_to(np.maximum(0, ks + 1 - q), (len(ks), len(a)))
    hi = np.broadcast_to(np.minimum(ks + 1, p), (len(ks), len(a)))
    for _ in range(int((hi - lo).max(initial=0)).bit_length()):
        mid = (lo + hi) // 2
        rest = ks + 1 - mid                                  # taken from b with `mid` from a
        more = (mid < p) & (rest > 0) & (a[rows, np.minimum(mid, p - 1)] < b[rows, np.clip(rest - 1, 0, q - 1)])
        active = lo < hi
        lo = np.where(active & more, mid + 1, lo)
        hi = np.where(active & ~more, mid, hi)
    rest = ks + 1 - lo
    from_a = np.where(lo > 0, a[rows, np.maximum(lo - 1, 0)], -np.inf)
    from_b = np.where(rest > 0, b[rows, np.clip(rest - 1, 0, q - 1)], -np.inf)
    return np.maximum(from_a, from_b).astype(a.dtype)


class _WeightedMedian:
    """Per column of a block (devices x coordinates, float32): the value where the cumulative weight, in order of
    value, reaches half; midway between two when it lands on half exactly (equal weights: the ordinary median).

    The answer depends only on the values and their weights, not on how equal values are ordered among
    themselves, so one sort of keys does: each value widened to float64 with its device's index in the low
    mantissa bits the widening leaves zero (which orders equal values by device and changes no other order),
    then the weights looked up by index. 25 bytes per value, within WORK_BYTES_PER_VALUE."""
    INDEX_BITS = np.uint64((1 << 29) - 1)     # float32's 24-bit significand in float64's 53: 29 bits spare

    def __init__(self, w: np.ndarray, width: int):
        n = len(w)
        if n > self.INDEX_BITS:
            raise ValueError(f"a weighted median over {n} devices: at most {int(self.INDEX_BITS)}")
        self.w = w
        self.devices = np.arange(n, dtype=np.uint64)
        self.keys = np.empty((width, n), np.float64)
        self.device = np.empty((width, n), np.intp)
        self.cumulative = np.empty((width, n), np.float64)
        self.reached = np.empty((width, n), bool)

    def __call__(self, values: np.ndarray) -> np.ndarray:
        columns = values.shape[1]
        keys, device, cumulative, reached = (self.keys[:columns], self.device[:columns], self.cumulative[:columns],
                                             self.reached[:columns])
        np.copyto(keys, values.T)
        bits = keys.view(np.uint64)
        bits |= self.devices
        keys.sort(axis=1)
        np.bitwise_and(bits, self.INDEX_BITS, out=device.view(np.uint64))
        np.take(self.w, device, out=cumulative, mode="clip")   # (mode "raise" would copy `out` first)
        np.cumsum(cumulative, axis=1, out=cumulative)
        total = cumulative[:, -1:]
        lower = np.argmax(np.greater_equal(cumulative, total / 2 - 1e-9 * total, out=reached), axis=1)
        upper = np.argmax(np.greater(cumulative, total / 2 + 1e-9 * total, out=reached), axis=1)
        rows = np.arange(columns)
        value = ~self.INDEX_BITS
        return ((bits[rows, lower] & value).view(np.float64) + (bits[rows, upper] & value).view(np.float64)) / 2
