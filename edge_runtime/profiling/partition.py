"""Choosing where to cut a model into progressive stages for a memory budget.

Dynamic programming over the layer boundaries where a head exists: the fewest stages
(largest blocks, fewest progressive stages) whose every stage is predicted to fit the
usable budget; among equal stage counts, the largest batch size (on the CPUs measured,
time per sample falls or stays flat as the batch grows, so the largest fitting batch
trains at least as fast), then the lowest worst-stage peak (most headroom). A model with a
frozen prefix (Manifest.frozen_prefix) is cut from its first trainable layer: the layers
before it never train, and every stage reads them from its cache.

A model family (FedIN) is not cut: each tier trains the largest member whose whole part fits
(choose_member).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class Stage:
    first: int
    last: int
    predicted_peak_bytes: int


@dataclass(frozen=True)
class Partition:
    batch_size: int
    stages: tuple[Stage, ...]

    @property
    def worst_peak_bytes(self) -> int:
        return max(s.predicted_peak_bytes for s in self.stages)


class NoPartition(Exception):
    """No cut of the model fits; the message names the layer that does not fit and what it needs."""


def _cuts_and_starts(cut_points: Sequence[int], first: int) -> tuple[list[int], list[int]]:
    """Where stages may end (cut points from `first` on) and where each finest stage starts."""
    cuts = sorted({c for c in cut_points if c >= first})
    return cuts, [first] + [c + 1 for c in cuts[:-1]]


def best_partition(n_layers: int, cut_points: Sequence[int], batch_size: int,
                   predict: Callable[[int, int, int], float], usable_bytes: float,
                   first: int = 0) -> Partition | None:
    """Fewest stages covering layers first..n-1 at one batch size, every stage predicted <= usable_bytes.

    first: the first layer that trains (the frozen prefix's length); cut points before it are ignored.
    """
    cuts, starts = _cuts_and_starts(cut_points, first)
    if not cuts or cuts[-1] != n_layers - 1:
        raise ValueError("the last layer must be a cut point (the model's own classifier head)")
    # best[c] = (stages, worst peak, previous cut) for the prefix ending after layer c
    best: dict[int, tuple[int, float, int | None]] = {}
    for c in cuts:
        for start in starts:
            if start > c:
                break
            prev = start - 1
            if start > first and prev not in best:
                continue
            peak = predict(start, c, batch_size)
            if peak > usable_bytes:
                continue
            stages, worst = (0, 0.0) if start == first else best[prev][:2]
            cand = (stages + 1, max(worst, peak), prev if start > first else None)
            if c not in best or cand[:2] < best[c][:2]:
                best[c] = cand
    last = n_layers - 1
    if last not in best:
        return None
    stages, c = [], last
    while c is not None:
        prev = best[c][2]
        start = first if prev is None else prev + 1
        stages.append(Stage(start, c, int(predict(start, c, batch_size))))
        c = prev
    return Partition(batch_size, tuple(reversed(stages)))


def choose_partition(n_layers: int, cut_points: Sequence[int], batch_sizes: Sequence[int],
                     predict: Callable[[int, int, int], float], usable_bytes: float, first: int = 0) -> Partition:
    """The best partition of layers first..n-1 over every batch size; NoPartition says why none fits."""
    found = [p for b in sorted(set(batch_sizes), reverse=True)
             if (p := best_partition(n_layers, cut_points, b, predict, usable_bytes, first)) is not None]
    if not found:
        b = min(batch_sizes)
        cuts, starts = _cuts_and_starts(cut_points, first)
        needs = [(predict(s, c, b), s, c) for s, c in zip(starts, cuts)]
        worst = max(needs)
        raise NoPartition(f"layers {worst[1]}-{worst[2]} alone need {worst[0] / 2**20:.0f} MB at batch {b}, "
                          f"more than the usable {usable_bytes / 2**20:.0f} MB")
    return min(found, key=lambda p: (len(p.stages), -p.batch_size, p.worst_peak_bytes))


@dataclass(frozen=True)
class MemberChoice:
    member: str
    batch_size: int
    predicted_peak_bytes: int


def choose_member(members: Sequence[tuple[str, Callable[[int], float]]], batch_sizes: Sequence[int],
                  usable_bytes: float) -> MemberChoice:
    """The largest member of a model family (FedIN) whose part fits, at the largest batch at which it fits.

    members: (name, peak of its part at a batch size), smallest member first, as the manifest lists them.
    A family member is trained whole, never cut into stages: a larger member has more to learn with, so it is
    worth more than a larger batch of a smaller one. NoPartition says what the smallest member needs when none fits.
    """
    if not members:
        raise ValueError("a model family needs at least one member")
    batches = sorted(set(batch_sizes), reverse=True)
    for name, predict in reversed(members):
        for b in batches:
            peak = predict(b)
            if peak <= usable_bytes:
                return MemberChoice(name, b, int(peak))
    name, predict = members[0]
    b = batches[-1]
    raise NoPartition(f"the smallest member, {name}, needs {predict(b) / 2**20:.0f} MB at batch {b}, "
                      f"more than the usable {usable_bytes / 2**20:.0f} MB")
