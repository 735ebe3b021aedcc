"""FedIN's shared features: what a device may put beside its update, how it is checked, how the batch is built.

A device asked to share (TrainConfig.share_rows) adds to its update blob a few of its rows as
features of its trained member: `features/s_in` (the extractor's output), `features/s_out`
(the classifier's input) and `features/labels`. They travel inside the update, so they are
content-addressed and stored with it, and checked as strictly as its parameters: exact names,
dtypes, shapes, at most the rows asked for, finite values, labels among the classes. The
coordinator then builds one shared batch per round from the accepted devices' rows, each row
tagged with its device's `origin`, so a device skips its own rows when it trains on the batch.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from coordinator.strategies.aggregation import UpdateRejected

PREFIX = "features/"
S_IN, S_OUT, LABELS = PREFIX + "s_in", PREFIX + "s_out", PREFIX + "labels"
FLOAT_BYTES = 4


def is_feature(name: str) -> bool:
    return name.startswith(PREFIX)


def is_integer(name: str) -> bool:
    """The tensors of an update blob (and of a shared batch) that hold integers: labels and origins."""
    return name in (LABELS, "labels", "origin")


def feature_shapes(manifest) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-row shapes of s_in (the input of the family's first member layer) and s_out (the classifier's input)."""
    first = min(i for m in manifest.members for i in m.layers)
    return tuple(manifest.layers[first].input_shape), tuple(manifest.layers[-1].output_shape)


def feature_limit_bytes(manifest, rows: int) -> int:
    """The most bytes `rows` shared rows add to an update blob (float32 features, int64 labels)."""
    if rows <= 0 or not manifest.members:
        return 0
    s_in, s_out = feature_shapes(manifest)
    return rows * (FLOAT_BYTES * (int(np.prod(s_in)) + int(np.prod(s_out))) + 8)


def validate_features(features: Mapping[str, np.ndarray], manifest, share_rows: int) -> None:
    """Raise UpdateRejected unless `features` are exactly s_in, s_out and labels of at most share_rows rows of this
    family's shapes, finite, with labels among the classes. No features at all is fine: sharing is the device's to
    withhold."""
    if not features:
        return
    if share_rows <= 0 or not manifest.members:
        raise UpdateRejected(f"update carries shared features ({sorted(features)[:3]}) its task did not ask for")
    names = {S_IN, S_OUT, LABELS}
    if set(features) != names:
        raise UpdateRejected(f"shared features must be exactly {sorted(names)}, not {sorted(features)[:5]}")
    s_in, s_out = feature_shapes(manifest)
    labels = features[LABELS]
    if labels.dtype != np.int64 or labels.ndim != 1:
        raise UpdateRejected(f"{LABELS} must be a vector of int64, not {labels.dtype} of shape {labels.shape}")
    rows = len(labels)
    if not 1 <= rows <= share_rows:
        raise UpdateRejected(f"shared features hold {rows} rows; the task asked for at most {share_rows}")
    for name, shape in ((S_IN, s_in), (S_OUT, s_out)):
        value = features[name]
        if value.dtype not in (np.float32, np.float16):
            raise UpdateRejected(f"{name} has dtype {value.dtype}, expected float32 or float16")
        if tuple(value.shape) != (rows, *shape):
            raise UpdateRejected(f"{name} has shape {tuple(value.shape)}, expected {(rows, *shape)}")
        if not np.isfinite(value).all():
            raise UpdateRejected(f"{name} contains NaN or infinite values")
    bad = labels[(labels < 0) | (labels >= manifest.num_classes)]
    if len(bad):
        raise UpdateRejected(f"{LABELS} holds {bad[:3].tolist()}, outside 0..{manifest.num_classes - 1}")


def split_update(values: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """(parameters, shared features) of a decoded update."""
    params = {k: v for k, v in values.items() if not is_feature(k)}
    return params, {k: v for k, v in values.items() if is_feature(k)}


def assemble(shared: Sequence[tuple[int, Mapping[str, np.ndarray]]], max_rows: int,
             seed: int) -> dict[str, np.ndarray] | None:
    """One shared batch from (origin, features) pairs: s_in, s_out, labels and origin, at most max_rows rows, each
    device contributing an equal share (a seeded sample of its rows when it sent more). None when nothing was shared."""
    shared = [(o, f) for o, f in shared if f and len(f[LABELS])]
    if not shared:
        return None
    rng = np.random.default_rng(seed)
    each = max(1, max_rows // len(shared))
    parts = {"s_in": [], "s_out": [], "labels": [], "origin": []}
    for origin, f in shared:
        n = len(f[LABELS])
        rows = np.sort(rng.choice(n, size=min(n, each), replace=False))
        parts["s_in"].append(np.asarray(f[S_IN], dtype=np.float32)[rows])
        parts["s_out"].append(np.asarray(f[S_OUT], dtype=np.float32)[rows])
        parts["labels"].append(np.asarray(f[LABELS], dtype=np.int64)[rows])
        parts["origin"].append(np.full(len(rows), origin, dtype=np.int64))
    return {k: np.concatenate(v) for k, v in parts.items()}
