"""Local data for a simulated fleet: Fashion-MNIST split across devices, non-IID by a Dirichlet draw.

For each class, the shares of its samples that go to each device are drawn from
Dirichlet(alpha): alpha 0.5 gives each device a few dominant classes and little of the
rest, the usual benchmark setting for label skew. Every device gets at least
`min_samples`, so none is left unable to fill a batch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_runtime.datasets import LocalDataset, load_fashion_mnist


def dirichlet_split(labels: np.ndarray, n_devices: int, alpha: float, seed: int = 0,
                    min_samples: int = 64) -> list[np.ndarray]:
    """Indices of `labels` per device; each class divided by Dirichlet(alpha) shares."""
    if n_devices < 1 or alpha <= 0:
        raise ValueError("need n_devices >= 1 and alpha > 0")
    if len(labels) < n_devices * min_samples:
        raise ValueError(f"{len(labels)} samples cannot give {n_devices} devices {min_samples} each")
    rng = np.random.default_rng(seed)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(n_devices)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(n_devices, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for device, chunk in enumerate(np.split(idx, cuts)):
                parts[device].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_samples:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"no Dirichlet({alpha}) draw in 100 gave every device {min_samples} samples")


def write_fleet_data(root: Path, device_ids: list[str], samples: int, alpha: float, seed: int = 0) -> dict[str, Path]:
    """A LocalDataset directory per device from `samples` Fashion-MNIST training images; kept if present."""
    root = Path(root)
    dirs = {d: root / d for d in device_ids}
    if all((p / "labels.npy").exists() for p in dirs.values()):
        return dirs
    x, y = load_fashion_mnist("train")
    pool = np.random.default_rng(seed).choice(len(y), samples, replace=False)
    for device, idx in zip(device_ids, dirichlet_split(y[pool], len(device_ids), alpha, seed)):
        LocalDataset.write(dirs[device], x[pool[idx]], y[pool[idx]])
    return dirs
