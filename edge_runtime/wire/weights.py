"""Weight encoding: safetensors by parameter name, fp32 or fp16 on the wire, never pickle."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping

import numpy as np
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from edge_runtime.errors import IntegrityError
from edge_runtime.store import atomic_write_bytes

Weights = dict[str, np.ndarray]


def encode(weights: Mapping[str, np.ndarray], fp16: bool = False) -> bytes:
    dtype = np.float16 if fp16 else np.float32
    return _st_save({k: np.ascontiguousarray(v, dtype=dtype) for k, v in sorted(weights.items())})


def decode(data: bytes, what: str = "weights") -> Weights:
    """Decode safetensors bytes into float32 arrays; raise IntegrityError on garbage."""
    try:
        raw = _st_load(data)
    except Exception as exc:
        raise IntegrityError(f"{what}: not a valid safetensors payload ({exc})") from None
    for k, v in raw.items():
        if v.dtype not in (np.float32, np.float16):
            raise IntegrityError(f"{what}: tensor {k} has dtype {v.dtype}; only float32 and float16 are accepted")
    return {k: v.astype(np.float32, copy=False) for k, v in raw.items()}


def save(path: Path, weights: Mapping[str, np.ndarray], fp16: bool = False) -> None:
    atomic_write_bytes(Path(path), encode(weights, fp16))


def load(path: Path) -> Weights:
    return decode(Path(path).read_bytes(), what=str(path))


def save_streaming(path: Path, names, get_tensor) -> None:
    """Write tensors to a safetensors file one at a time, atomically: float32, or int64 as int64
    (an optimizer's step counters).

    get_tensor(name) may return a live view (e.g. into a training session): each tensor is
    written straight from it, so the file costs no second copy of the weights in memory.
    """
    import json
    import os
    names = sorted(names)
    header, offset, layout = {}, 0, {}
    for name in names:
        tensor = get_tensor(name)
        dtype = np.dtype(np.int64) if np.asarray(tensor).dtype == np.int64 else np.dtype(np.float32)
        shape = tuple(int(d) for d in np.shape(tensor))
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": "I64" if dtype == np.int64 else "F32", "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        layout[name], offset = (shape, dtype), offset + size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for name in names:
            shape, dtype = layout[name]
            arr = np.asarray(get_tensor(name), dtype=dtype, order="C")   # (ascontiguousarray turns 0-d into 1-d)
            if arr.shape != shape:
                raise IntegrityError(f"{name} changed shape while being written")
            f.write(memoryview(arr.reshape(-1)).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def weights_hash(weights: Mapping[str, np.ndarray], names=None) -> str:
    """Hash of names, shapes and fp32 values: equal weights give equal hashes, whatever the container.

    Reads one tensor at a time, so a lazy WeightFile is hashed without loading it whole.
    """
    h = hashlib.sha256()
    for name in sorted(weights if names is None else names):
        arr = np.ascontiguousarray(weights[name], dtype=np.float32)
        h.update(name.encode())
        h.update(str(arr.shape).encode())
        h.update(memoryview(arr).cast("B"))  # no copy: the tensor may be a whole layer
    return h.hexdigest()


_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


class WeightFile(Mapping):
    """Tensors of a safetensors file, each read with pread only when asked for.

    A device job passes this instead of a dict so that a model's weights are never in memory
    together: training needs them only to fill the session, tensor by tensor. Not through
    safetensors.safe_open: it maps the file and each open raised the resident peak by about
    the file's size (measured: +46 MB for a 37 MB file).
    """

    def __init__(self, path: Path, names=None):
        import json
        import os
        self.path = Path(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if not 0 < n <= min(size - 8, 100 << 20):
                    raise ValueError(f"header length {n} does not fit a {size}-byte file")
                header = json.loads(f.read(n))
            self._base = 8 + n
            self._entries = {}
            for name, e in header.items():
                if name == "__metadata__":
                    continue
                dtype = _DTYPES.get(e["dtype"])
                if dtype is None:
                    raise ValueError(f"tensor {name} has unsupported dtype {e['dtype']}")
                shape = tuple(int(d) for d in e["shape"])
                start, stop = (int(x) for x in e["data_offsets"])
                if stop - start != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize \
                        or self._base + stop > size or start < 0:
                    raise ValueError(f"tensor {name} has inconsistent offsets")
                self._entries[name] = (dtype, shape, start)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"{path}: not a valid safetensors file ({exc})") from None
        if names is not None:
            missing = sorted(set(names) - set(self._entries))
            if missing:
                raise IntegrityError(f"{path} lacks {len(missing)} parameter(s), e.g. {missing[:3]}")
            wanted = set(names)
            self._entries = {k: v for k, v in self._entries.items() if k in wanted}

    def __getitem__(self, name: str) -> np.ndarray:
        dtype, shape, _ = self._entries[name]
        out = np.empty(shape, dtype=dtype)
        self._read(name, out)
        return out.astype(np.float32) if dtype == np.float16 else out

    def read_into(self, name: str, out: np.ndarray) -> bool:
        """Read a float32 tensor straight into `out` (e.g. a session's live parameter buffer).

        Returns False, touching nothing, when that cannot be done in place (fp16 file, other layout).
        """
        dtype, shape, _ = self._entries[name]
        if dtype != np.float32 or out.dtype != np.float32 or tuple(out.shape) != shape \
                or not out.flags.c_contiguous or not out.flags.writeable:
            return False
        self._read(name, out)
        return True

    def _read(self, name: str, out: np.ndarray) -> None:
        import os
        _, _, start = self._entries[name]
        fd = os.open(self.path, os.O_RDONLY)
        try:
            got = os.preadv(fd, [memoryview(out.reshape(-1).view(np.uint8))], self._base + start)
        finally:
            os.close(fd)
        if got != out.nbytes:
            raise IntegrityError(f"{self.path}: short read of {name}")

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries


class WeightFiles(Mapping):
    """Several safetensors files read as one, lazily: a device's per-layer weight blobs.

    A name held by two files is an error, not a silent choice between them.
    """

    def __init__(self, paths, names=None):
        self._where: dict[str, WeightFile] = {}
        for path in paths:
            f = WeightFile(Path(path))
            for name in f:
                if name in self._where:
                    raise IntegrityError(f"parameter {name} is in both {self._where[name].path} and {path}")
                self._where[name] = f
        if names is not None:
            missing = sorted(set(names) - set(self._where))
            if missing:
                raise IntegrityError(f"the weight files lack {len(missing)} parameter(s), e.g. {missing[:3]}")
            wanted = set(names)
            self._where = {k: v for k, v in self._where.items() if k in wanted}

    def __getitem__(self, name: str) -> np.ndarray:
        return self._where[name][name]

    def read_into(self, name: str, out: np.ndarray) -> bool:
        return self._where[name].read_into(name, out)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name) -> bool:
        return name in self._where


def open_weights(paths, names=None) -> Mapping[str, np.ndarray]:
    """One safetensors path, or a list of them (per-layer blobs), as one lazy mapping."""
    if isinstance(paths, (str, Path)):
        return WeightFile(Path(paths), names)
    return WeightFiles(paths, names)


def require(weights: Mapping[str, np.ndarray], names) -> None:
    """Raise IntegrityError unless every name is present (a name check: loads nothing)."""
    missing = [n for n in names if n not in weights]
    if missing:
        raise IntegrityError(f"weights lack {len(missing)} parameter(s), e.g. {missing[:3]}")
