"""Frozen-prefix activations, computed once per prefix version and read back from disk.

A cache file holds the output of layers [0, boundary) for every local sample, computed
with the prefix's forward graph (the coordinator composes it; BatchNorm in inference mode).
Its key hashes that graph, the prefix weights and the data, so a changed prefix or new
data is a miss and the prefix runs again; anything else is a hit and the prefix never
runs. Reads copy just the rows of a batch (see ArrayReader), so reading a cache larger
than the budget costs one batch of resident memory.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from edge_runtime.store import digest_of, sha256_file
from edge_runtime.train.datasets import LocalDataset
from edge_runtime.wire import weights as wcodec
from edge_runtime.wire.manifest import Manifest
from edge_runtime.wire.model_blobs import read_part_graph

FLUSH_BYTES = 8 << 20


class ArrayReader:
    """Rows of a .npy file by index, as float32, read with pread into fresh buffers.

    Not through mmap: on recent kernels a fault on a file mapping maps whole large page-cache
    folios around it, so 64 random rows of a 250 MB cache put about 90 MB into the resident
    set at once (measured). pread copies exactly the rows asked for; the file's pages stay
    in the page cache, outside the process's resident memory.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            self._offset = f.tell()
        if fortran:
            raise ValueError(f"{path}: Fortran-ordered arrays are not supported")
        self._shape, self._dtype = tuple(shape), np.dtype(dtype)
        self._row_bytes = int(np.prod(self._shape[1:], dtype=np.int64)) * self._dtype.itemsize
        expected = self._offset + self._shape[0] * self._row_bytes
        if os.fstat(self._fd).st_size < expected:
            raise ValueError(f"{path} is truncated: {os.fstat(self._fd).st_size} bytes, expected {expected}")

    def __len__(self) -> int:
        return self._shape[0]

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self._shape[1:]

    def take(self, indices: np.ndarray) -> np.ndarray:
        raw = np.empty((len(indices),) + self.row_shape, dtype=self._dtype)
        view = memoryview(raw.reshape(-1).view(np.uint8))
        rb = self._row_bytes
        for pos in np.argsort(indices, kind="stable"):  # ascending file offsets
            row = int(indices[pos])
            if not 0 <= row < self._shape[0]:
                raise IndexError(f"row {row} out of range for {self.path} ({self._shape[0]} rows)")
            got = os.preadv(self._fd, [view[pos * rb:(pos + 1) * rb]], self._offset + row * rb)
            if got != rb:
                raise IOError(f"short read of row {row} from {self.path}")
        return raw if raw.dtype == np.float32 else raw.astype(np.float32)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


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
