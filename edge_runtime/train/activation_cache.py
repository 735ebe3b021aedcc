"""Frozen-prefix activations, computed once per prefix version and read back from disk.

A cache file holds the output of layers [0, boundary) for every local sample, computed
with the prefix's forward graph (the coordinator composes it; BatchNorm in inference mode).
Its key hashes that graph, the prefix weights and the data, so a changed prefix or new
data is a miss and the prefix runs again; anything else is a hit and the prefix never
runs. Reads copy just the rows of a batch (datasets.ArrayReader), so reading a cache larger
than the budget costs one batch of resident memory.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from edge_runtime.store import digest_of, sha256_file
from edge_runtime.train.datasets import ArrayReader, LocalDataset
from edge_runtime.wire import weights as wcodec
from edge_runtime.wire.manifest import Manifest
from edge_runtime.wire.model_blobs import read_part_graph

FLUSH_BYTES = 8 << 20


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

    def key(self, manifest: Manifest, boundary: int, prefix_graph: Path, weights, dataset: LocalDataset,
            fp16: bool) -> str:
        prefix_weights = wcodec.weights_hash(weights, manifest.param_names(range(boundary)))
        return digest_of(sha256_file(prefix_graph), prefix_weights, dataset.fingerprint(), "fp16" if fp16 else "fp32")

    def path_for(self, boundary: int, key: str) -> Path:
        return self.root / f"L{boundary}-{key[:24]}.npy"

    def get_or_build(self, manifest: Manifest, boundary: int, prefix_graph: Path | None, weights,
                     dataset: LocalDataset, batch_size: int, fp16: bool = False, threads: int = 0,
                     progress: Callable[[int, int], None] | None = None) -> tuple[Path, bool]:
        """Path of the activations entering layer `boundary`, and whether the prefix had to run."""
        if boundary == 0:
            return dataset.inputs_path, False
        key = self.key(manifest, boundary, prefix_graph, weights, dataset, fp16)
        path = self.path_for(boundary, key)
        if path.exists():
            return path, False
        from edge_runtime.train.ort_backend import ForwardSession
        session = ForwardSession(read_part_graph(Path(prefix_graph)), threads=threads)
        params = {n: np.ascontiguousarray(weights[n], dtype=np.float32) for n in session.param_names}
        source = ArrayReader(dataset.inputs_path)
        n = len(source)
        out_shape = (n,) + tuple(manifest.layers[boundary].input_shape)

        def chunks():
            t0 = time.monotonic()
            for start in range(0, n, batch_size):
                idx = np.arange(start, min(n, start + batch_size))
                yield session.run(source.take(idx), params)
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
