"""Frozen-prefix activations, computed once per prefix version and read back from disk.

A cache file holds the output of layers [0, boundary) for every local sample. Its key
hashes the prefix graphs, the prefix weights and the data, so a changed prefix or new
data is a miss and the prefix runs again; anything else is a hit and the prefix never
runs. Reads go through mmap, and the mapped pages are dropped after every batch: they
stay in the page cache but do not count in the process's resident set, so reading a
cache larger than the budget costs only one batch of memory.
"""
from __future__ import annotations

import mmap
import os
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import weights as wcodec
from .datasets import LocalDataset
from .graphs import GraphLibrary, compose
from .store import digest_of


FLUSH_BYTES = 8 << 20


class ArrayReader:
    """Rows of a .npy file by index, as float32, without keeping the file resident."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._array = np.load(self.path, mmap_mode="r")
        self._mmap: mmap.mmap | None = getattr(self._array, "_mmap", None)

    def __len__(self) -> int:
        return int(self._array.shape[0])

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self._array.shape[1:])

    def take(self, indices: np.ndarray) -> np.ndarray:
        order = np.argsort(indices, kind="stable")
        rows = np.empty((len(indices),) + self.row_shape, dtype=np.float32)
        rows[order] = self._array[indices[order]]  # sorted reads: sequential on disk
        self._release()
        return rows

    def _release(self) -> None:
        if self._mmap is not None and hasattr(self._mmap, "madvise"):
            self._mmap.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self._release()
        self._array = None
        self._mmap = None


def write_npy_stream(path: Path, shape: tuple[int, ...], dtype, chunks: Iterator[np.ndarray]) -> None:
    """Write a .npy file chunk by chunk (never the whole array in memory), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    written = 0
    try:
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                     "fortran_order": False, "shape": shape})
            pending = 0
            for chunk in chunks:
                data = np.ascontiguousarray(chunk, dtype=dtype).tobytes()
                f.write(data)
                written += len(chunk)
                pending += len(data)
                if pending >= FLUSH_BYTES:
                    # Dirty page cache is charged to the device's memory cgroup and cannot be
                    # reclaimed until written back: flush in bounded chunks, then drop it.
                    os.fdatasync(f.fileno())
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                    pending = 0
            f.flush()
            os.fsync(f.fileno())
        if written != shape[0]:
            raise RuntimeError(f"wrote {written} rows, expected {shape[0]}")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class ActivationCache:
    """Activations of the frozen prefix, on disk under `root`, one file per prefix version."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.prefix_runs = 0  # how often this object actually ran a prefix (for tests and logs)

    def key(self, lib: GraphLibrary, boundary: int, weights: dict, dataset: LocalDataset, fp16: bool) -> str:
        m = lib.manifest
        names = m.param_names(range(boundary))
        prefix_weights = wcodec.weights_hash({n: weights[n] for n in names})
        graphs = [m.layers[i].graph.sha256 for i in range(boundary)]
        return digest_of(*graphs, prefix_weights, dataset.fingerprint(), "fp16" if fp16 else "fp32")

    def path_for(self, boundary: int, key: str) -> Path:
        return self.root / f"L{boundary}-{key[:24]}.npy"

    def get_or_build(self, lib: GraphLibrary, boundary: int, weights: dict, dataset: LocalDataset,
                     batch_size: int, fp16: bool = False, threads: int = 0,
                     progress: Callable[[int, int], None] | None = None) -> tuple[Path, bool]:
        """Path of the activations entering layer `boundary`, and whether the prefix had to run."""
        if boundary == 0:
            return dataset.inputs_path, False
        key = self.key(lib, boundary, weights, dataset, fp16)
        path = self.path_for(boundary, key)
        if path.exists():
            return path, False
        from .ort_backend import InferenceSession
        session = InferenceSession(compose(lib, range(boundary), None, weights), threads=threads)
        source = ArrayReader(dataset.inputs_path)
        n = len(source)
        out_shape = (n,) + tuple(lib.manifest.layers[boundary].input_shape)

        def chunks():
            t0 = time.monotonic()
            for start in range(0, n, batch_size):
                idx = np.arange(start, min(n, start + batch_size))
                yield session.run(source.take(idx))
                if progress:
                    progress(min(n, start + batch_size), n)
            self.last_build_seconds = time.monotonic() - t0

        write_npy_stream(path, out_shape, np.float16 if fp16 else np.float32, chunks())
        source.close()
        self.prefix_runs += 1
        for old in self.root.glob(f"L{boundary}-*.npy"):  # boards have small disks: one version per boundary
            if old != path:
                old.unlink(missing_ok=True)
        return path, True
