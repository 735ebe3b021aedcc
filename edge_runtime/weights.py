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


def load(path: Path) -> Weights:
    return decode(Path(path).read_bytes(), what=str(path))


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
