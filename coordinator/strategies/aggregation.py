"""Checking and averaging the updates devices send back: pure functions over numpy arrays.

An update is the trained values of the parameters a device was told to train. Before it
may touch the global model it must name exactly those parameters, with the manifest's
shapes, hold only finite numbers, and not move the weights further than a bound allows
(a relative L2 norm of the change). Aggregation is FedAvg per parameter over the devices
that trained it, weighted by their sample counts, so devices that trained different
parts (tiers, selective layers) combine correctly.
"""
from __future__ import annotations

from dataclasses import dataclass
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


def weighted_average(updates: Sequence[tuple[Mapping[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    """FedAvg per parameter: each parameter averages the devices that sent it, weighted by samples."""
    sums: dict[str, np.ndarray] = {}
    weights: dict[str, int] = {}
    for values, n in updates:
        if n <= 0:
            raise ValueError("every update needs a positive sample count")
        for name, value in values.items():
            acc = sums.get(name)
            contribution = value.astype(np.float64) * n
            sums[name] = contribution if acc is None else acc + contribution
            weights[name] = weights.get(name, 0) + n
    return {name: (total / weights[name]).astype(np.float32) for name, total in sums.items()}
