"""Local data for a simulated fleet: Fashion-MNIST split across devices, non-IID by a Dirichlet draw.

For each class, the shares of its samples that go to each device are drawn from
Dirichlet(alpha): alpha 0.5 gives each device a few dominant classes and little of the
rest, the usual benchmark setting for label skew. Every device gets at least
`min_samples`, so none is left unable to fill a batch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_runtime.train.datasets import LocalDataset, load_fashion_mnist


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


def shift_exposure(x: np.ndarray, contrast: float = 0.5, brightness: float = 0.35) -> np.ndarray:
    """Normalised images as a differently exposed camera would see them: a domain shift.

    Pixel intensities p in [0, 1] become contrast * p + brightness (clipped), then are
    normalised again: washed out and brighter, the way a fleet of cheap sensors differs
    from the data a model was pretrained on. Fine-tuning benchmarks use it so that a
    pretrained model has something to adapt to.
    """
    from edge_runtime.train.datasets import FMNIST_MEAN, FMNIST_STD
    raw = np.asarray(x, np.float32) * FMNIST_STD + FMNIST_MEAN
    shifted = np.clip(contrast * raw + brightness, 0.0, 1.0)
    return ((shifted - FMNIST_MEAN) / FMNIST_STD).astype(np.float32)


def as_rgb32(x: np.ndarray) -> np.ndarray:
    """Normalised N x 1 x 28 x 28 images as N x 3 x 32 x 32: padded by 2 pixels of background, the channel
    repeated, so a model made for 32x32 colour input (vgg_cifar, mobilenet_v2) trains on Fashion-MNIST."""
    from edge_runtime.train.datasets import FMNIST_MEAN, FMNIST_STD
    x = np.asarray(x, np.float32)
    padded = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)), constant_values=np.float32(-FMNIST_MEAN / FMNIST_STD))
    return np.ascontiguousarray(np.repeat(padded, 3, axis=1))


def split_pool(samples: int, held_out: int = 0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices into the Fashion-MNIST training set: the fleet's `samples`, and `held_out` others.

    The held-out indices never reach a device: they are for pretraining a starting model
    that fine-tuning then adapts to the fleet's data.
    """
    n = 60000
    if samples + held_out > n:
        raise ValueError(f"{samples} fleet samples + {held_out} held out exceed the {n} training images")
    rng = np.random.default_rng(seed)
    pool = rng.choice(n, samples, replace=False)
    rest = np.setdiff1d(np.arange(n), pool)
    return pool, rng.choice(rest, held_out, replace=False)


def write_fleet_data(root: Path, device_ids: list[str], samples: int, alpha: float, seed: int = 0,
                     shift=None) -> dict[str, Path]:
    """A LocalDataset directory per device from `samples` Fashion-MNIST training images; kept if present.

    `shift`, if given, maps normalised images to the fleet's domain (e.g. shift_exposure).
    """
    root = Path(root)
    dirs = {d: root / d for d in device_ids}
    if all((p / "labels.npy").exists() for p in dirs.values()):
        return dirs
    x, y = load_fashion_mnist("train")
    pool, _ = split_pool(samples, 0, seed)
    for device, idx in zip(device_ids, dirichlet_split(y[pool], len(device_ids), alpha, seed)):
        xs = x[pool[idx]]
        LocalDataset.write(dirs[device], shift(xs) if shift else xs, y[pool[idx]])
    return dirs


def write_validation_data(folder: Path, samples: int, count: int, seed: int = 0) -> Path:
    """A LocalDataset of `count` Fashion-MNIST training images the fleet's `samples` (write_fleet_data with the same
    seed) do not include: the coordinator's validation set ([service] validation_data); kept if present."""
    folder = Path(folder)
    if not (folder / "labels.npy").exists():
        x, y = load_fashion_mnist("train")
        rows = np.sort(split_pool(samples, count, seed)[1])
        LocalDataset.write(folder, x[rows], y[rows])
    return folder
