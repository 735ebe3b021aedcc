"""FedIN's two gradients on a member's parameters made one: the IN gradient never opposes the local one.

The choice is GEM's projection (Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual
Learning", 2017) with one constraint. The local gradient g (cross-entropy on this device's data)
is the device's own task; the IN gradient h (map other devices' s_in to their s_out) may pull the
member's layers away from it. When h.g < 0 the step along h would raise the local loss to first
order, so h is replaced by the closest vector that does not: h' = argmin ||h' - h||^2 s.t.
h'.g >= 0, whose closed form is h' = h - (h.g / g.g) g (h' is then orthogonal to g). When
h.g >= 0, or g is zero, h' = h. The combined gradient is g + in_weight * h'.

Pure numpy over dicts name -> array, treated as one vector in a fixed name order; dot products
and the update run chunk by chunk, so no parameter-sized temporary is allocated.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

CHUNK = 1 << 16   # elements per chunk: 512 KB of float64 at most


def _flat(array: np.ndarray) -> np.ndarray:
    """A 1-d view (never a copy: the in-place updates must reach the caller's arrays)."""
    flat = array.reshape(-1)
    if not np.shares_memory(flat, array) and array.size:
        raise ValueError("gradient arrays must be contiguous")
    return flat


def dot(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], names) -> float:
    """sum over names of a[name] . b[name], accumulated in float64 a chunk at a time."""
    total = 0.0
    for name in names:
        x, y = _flat(a[name]), _flat(b[name])
        for start in range(0, x.size, CHUNK):
            total += float(np.dot(x[start:start + CHUNK].astype(np.float64), y[start:start + CHUNK].astype(np.float64)))
    return total


def project(local: Mapping[str, np.ndarray], inter: Mapping[str, np.ndarray], names=None) -> bool:
    """Replace `inter` (h) in place by its projection h' that does not oppose `local` (g); whether it had to
    (h.g < 0 and g != 0: a conflict)."""
    names = sorted(inter if names is None else names)
    hg = dot(inter, local, names)
    if hg >= 0:
        return False
    gg = dot(local, local, names)
    if gg == 0:
        return False
    c = hg / gg
    for name in names:
        h, g = _flat(inter[name]), _flat(local[name])
        for start in range(0, h.size, CHUNK):
            part = slice(start, start + CHUNK)
            h[part] -= (c * g[part].astype(np.float64)).astype(h.dtype)
    return True


def combine(local: Mapping[str, np.ndarray], inter: Mapping[str, np.ndarray], in_weight: float) -> bool:
    """local <- g + in_weight * h' on the parameters `inter` names (the member's), in place; `inter` becomes h'.
    Returns whether the IN gradient was projected (it opposed the local one)."""
    conflict = project(local, inter)
    for name in inter:
        g, h = _flat(local[name]), _flat(inter[name])
        for start in range(0, g.size, CHUNK):
            part = slice(start, start + CHUNK)
            g[part] += in_weight * h[part]
    return conflict
