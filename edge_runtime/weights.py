"""Weight encoding: safetensors by parameter name, fp32 or fp16 on the wire, never pickle."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping

import numpy as np
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from .errors import IntegrityError
from .store import atomic_write_bytes

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
    return {k: v.astype(np.float32, copy=False) for k, v in raw.items()}


def save(path: Path, weights: Mapping[str, np.ndarray], fp16: bool = False) -> None:
    atomic_write_bytes(Path(path), encode(weights, fp16))


def load(path: Path, names=None) -> Weights:
    """Load all tensors, or only `names` (read lazily: the rest never enters memory)."""
    if names is None:
        return decode(Path(path).read_bytes(), what=str(path))
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="numpy") as f:
            present = set(f.keys())
            missing = [n for n in names if n not in present]
            if missing:
                raise IntegrityError(f"{path} lacks {len(missing)} parameter(s), e.g. {missing[:3]}")
            return {n: f.get_tensor(n).astype(np.float32, copy=False) for n in names}
    except IntegrityError:
        raise
    except Exception as exc:
        raise IntegrityError(f"{path}: not a valid safetensors file ({exc})") from None


def save_streaming(path: Path, names, get_tensor) -> None:
    """Write float32 tensors to a safetensors file one at a time, atomically.

    get_tensor(name) may return a live view (e.g. into a training session): each tensor is
    written straight from it, so the file costs no second copy of the weights in memory.
    """
    import json
    import os
    names = sorted(names)
    header, offset, shapes = {}, 0, {}
    for name in names:
        shape = tuple(int(d) for d in np.shape(get_tensor(name)))
        size = int(np.prod(shape, dtype=np.int64)) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        shapes[name], offset = shape, offset + size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for name in names:
            arr = np.ascontiguousarray(get_tensor(name), dtype=np.float32)
            if arr.shape != shapes[name]:
                raise IntegrityError(f"{name} changed shape while being written")
            f.write(memoryview(arr).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def weights_hash(weights: Mapping[str, np.ndarray]) -> str:
    """Hash of names, shapes and fp32 values: equal weights give equal hashes, whatever the container."""
    h = hashlib.sha256()
    for name in sorted(weights):
        arr = np.ascontiguousarray(weights[name], dtype=np.float32)
        h.update(name.encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def subset(weights: Mapping[str, np.ndarray], names) -> Weights:
    missing = [n for n in names if n not in weights]
    if missing:
        raise IntegrityError(f"weights lack {len(missing)} parameter(s), e.g. {missing[:3]}")
    return {n: weights[n] for n in names}
