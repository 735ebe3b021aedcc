"""Local data on a device: Fashion-MNIST IDX files, stored as .npy files the runtime memory-maps."""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.store import sha256_bytes

FASHION_MNIST_DIR = Path(os.environ.get("EDGEBLOCK_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
# Per-pixel statistics of the Fashion-MNIST training set, so every device normalises alike.
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or data[0] != 0 or data[1] != 0:
        raise EdgeRuntimeError(f"{path} is not an IDX file")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise EdgeRuntimeError(f"{path}: only unsigned-byte IDX files are supported")
    dims = struct.unpack(">" + "I" * ndim, data[4: 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise EdgeRuntimeError(f"{path}: truncated ({body.size} values for shape {dims})")
    return body.reshape(dims)


def load_fashion_mnist(split: str = "train", root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 N x 1 x 28 x 28 (normalised), labels as int64."""
    root = Path(root or FASHION_MNIST_DIR)
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    img_file, lbl_file = (root / f for f in _FILES[split])
    if not img_file.exists():
        raise EdgeRuntimeError(f"Fashion-MNIST not found at {root}: install the Debian package "
                               f"'dataset-fashion-mnist' or set EDGEBLOCK_FASHION_MNIST")
    images = _read_idx(img_file).astype(np.float32) / 255.0
    images = (images - FMNIST_MEAN) / FMNIST_STD
    labels = _read_idx(lbl_file).astype(np.int64)
    return images[:, None, :, :], labels


@dataclass(frozen=True)
class LocalDataset:
    """A device's training data on disk: inputs.npy (float32) and labels.npy (int64)."""
    root: Path

    @property
    def inputs_path(self) -> Path:
        return self.root / "inputs.npy"

    @property
    def labels_path(self) -> Path:
        return self.root / "labels.npy"

    def labels(self) -> np.ndarray:
        return np.load(self.labels_path)

    def __len__(self) -> int:
        return int(np.load(self.labels_path, mmap_mode="r").shape[0])

    def fingerprint(self) -> str:
        """Identifies the data for cache keys: changes whenever the files are rewritten."""
        parts = []
        for p in (self.inputs_path, self.labels_path):
            st = p.stat()
            parts.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
        return sha256_bytes("|".join(parts).encode())

    @classmethod
    def write(cls, root: Path, inputs: np.ndarray, labels: np.ndarray) -> "LocalDataset":
        if len(inputs) != len(labels):
            raise ValueError(f"{len(inputs)} inputs but {len(labels)} labels")
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        for name, arr in (("inputs.npy", np.asarray(inputs, np.float32)), ("labels.npy", np.asarray(labels, np.int64))):
            tmp = root / f".{name}.tmp.npy"
            np.save(tmp, arr)
            os.replace(tmp, root / name)
        return cls(root)
