"""Weight encoding: safetensors by parameter name, fp32 or fp16 on the wire, never pickle.

A weight file or payload may come from a broken or hostile device, so its header is checked here
before anything is allocated or read: JSON no deeper than the format nests (json.loads recurses per
level), an object of tensor objects, a dtype numpy holds, a shape of non-negative ints whose bytes are
exactly the tensor's data range, and that range inside the data. Anything else is an IntegrityError.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from edge_runtime.errors import IntegrityError
from edge_runtime.logs import printable
from edge_runtime.store import atomic_write_bytes
from edge_runtime.wire.protocol import json_nesting

Weights = dict[str, np.ndarray]


def encode(weights: Mapping[str, np.ndarray], fp16: bool = False) -> bytes:
    """Float tensors as float32 (float16 with fp16); integer tensors (labels, indices) as int64."""
    dtype = np.float16 if fp16 else np.float32
    return _st_save({k: np.ascontiguousarray(v, dtype=np.int64 if np.issubdtype(np.asarray(v).dtype, np.integer)
                                             else dtype) for k, v in sorted(weights.items())})


def decode(data: bytes, what: str = "weights", integers: Callable[[str], bool] = lambda name: False) -> Weights:
    """Decode safetensors bytes into float32 arrays (int64 for the tensors `integers` names, e.g. shared labels);
    raise IntegrityError on garbage or another dtype."""
    where = f"{what}: not a valid safetensors payload"
    n = _header_length(data[:8], len(data), where)
    for k, (dtype, _, _) in _tensors(data[8:8 + n], len(data) - 8 - n, _NUMPY_DTYPES, where).items():
        allowed = (np.int64,) if integers(k) else (np.float32, np.float16)
        if dtype not in allowed:
            raise IntegrityError(f"{what}: tensor {k} has dtype {np.dtype(dtype)}; only "
                                 f"{' and '.join(np.dtype(a).name for a in allowed)} accepted")
    try:
        raw = _st_load(data)
    except SafetensorError as exc:   # what safetensors asks beyond the header: no gaps between tensors, ...
        raise IntegrityError(f"{where} ({exc})") from None
    return {k: v if integers(k) else v.astype(np.float32, copy=False) for k, v in raw.items()}


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

    A lazy weight file (WeightFile, WeightFiles) is read through one 1 MiB buffer: a job hashes its
    weights before it trains, and a tensor-sized read there (9.4 MB for a 512x512 3x3 kernel) stayed
    in the heap, resident, for the whole job (8.8 MB more RSS after hashing ResNet-34's layer 15).
    """
    h = hashlib.sha256()
    ranged = getattr(weights, "read_range_into", None)
    chunk = np.empty(_HASH_CHUNK, np.float32) if ranged is not None else None
    for name in sorted(weights if names is None else names):
        h.update(name.encode())
        if chunk is None:
            arr = np.ascontiguousarray(weights[name], dtype=np.float32)
            h.update(str(arr.shape).encode())
            h.update(arr.reshape(-1).view(np.uint8))  # no copy: the tensor may be a whole layer (or empty)
            continue
        shape = weights.shape_of(name)
        h.update(str(shape).encode())
        total = math.prod(shape)
        for start in range(0, total, len(chunk)):
            part = chunk[:min(len(chunk), total - start)]
            ranged(name, start, part)
            h.update(part.view(np.uint8))
    return h.hexdigest()


_HASH_CHUNK = 1 << 18   # float32 elements (1 MiB) weights_hash reads a lazy file by


_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}   # what a WeightFile reads
# every safetensors dtype numpy holds (safetensors.numpy's table): what decode reads before it names a wrong one
_NUMPY_DTYPES = {"F64": np.float64, **_DTYPES, "U64": np.uint64, "I32": np.int32, "U32": np.uint32, "I16": np.int16,
                 "U16": np.uint16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
MAX_HEADER_BYTES = 100 << 20   # safetensors' own limit
MAX_HEADER_DEPTH = 3           # {"name": {"shape": [...]}}: the deepest a safetensors header nests
MAX_DIMS = 32                  # numpy 1's limit (numpy 2 allows 64); no tensor has more
_MAX_ARRAY_BYTES = 2 ** 63 - 1  # numpy's limit on the bytes of an array, zero-sized dimensions left out


def _count(value) -> bool:
    """A non-negative JSON integer (not a bool, not a float: JSON's 1.0 and Infinity are floats)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _header_length(first: bytes, size: int, where: str) -> int:
    """The header length the first 8 bytes declare, checked against the file's size."""
    if len(first) < 8:
        raise IntegrityError(f"{where} ({size} bytes: shorter than the 8-byte header length)")
    n = int.from_bytes(first, "little")
    if not 0 < n <= min(size - 8, MAX_HEADER_BYTES):
        raise IntegrityError(f"{where} (header length {n} does not fit a {size}-byte file)")
    return n


def _tensors(head: bytes, data_bytes: int, dtypes: Mapping[str, type], where: str) -> dict:
    """The tensors a header declares, name -> (dtype, shape, start within the data), every field checked."""
    def bad(problem: str):
        return IntegrityError(f"{where} ({problem})")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise bad("the header is not UTF-8") from None
    if json_nesting(head) > MAX_HEADER_DEPTH:
        raise bad(f"the header nests deeper than the format's {MAX_HEADER_DEPTH} levels")
    try:
        header = json.loads(text)
    except ValueError as exc:   # JSONDecodeError, or an integer of more digits than Python parses
        raise bad(f"the header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise bad(f"the header must be a JSON object, not {type(header).__name__}")
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensor = f"tensor {printable(repr(name), 60)}"
        if not isinstance(entry, dict):
            raise bad(f"{tensor} must be an object, not {type(entry).__name__}")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in dtypes:
            raise bad(f"{tensor} has dtype {printable(repr(dtype), 60)}; accepted: {', '.join(dtypes)}")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_count(d) for d in shape):
            raise bad(f"{tensor}: shape must be a list of at most {MAX_DIMS} non-negative integers, "
                      f"not {printable(repr(shape), 60)}")
        itemsize = np.dtype(dtypes[dtype]).itemsize
        if itemsize * math.prod(d for d in shape if d) > _MAX_ARRAY_BYTES:
            raise bad(f"{tensor}: shape {printable(repr(shape), 60)} is too large for an array")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(x) for x in offsets)):
            raise bad(f"{tensor}: data_offsets must be two non-negative integers, "
                      f"not {printable(repr(offsets), 60)}")
        start, stop = offsets
        if not start <= stop <= data_bytes:
            raise bad(f"{tensor}: data_offsets {printable(repr(offsets), 60)} are not a range within the "
                      f"{data_bytes} bytes of data")
        if stop - start != itemsize * math.prod(shape):
            raise bad(f"{tensor}: data_offsets hold {stop - start} bytes; shape {printable(repr(shape), 60)} of "
                      f"{dtype} needs {itemsize * math.prod(shape)}")
        out[name] = (dtypes[dtype], tuple(shape), start)
    return out


class WeightFile(Mapping):
    """Tensors of a safetensors file, each read with pread only when asked for.

    A device job passes this instead of a dict so that a model's weights are never in memory
    together: training needs them only to fill the session, tensor by tensor. Not through
    safetensors.safe_open: it maps the file and each open raised the resident peak by about
    the file's size (measured: +46 MB for a 37 MB file).
    """

    def __init__(self, path: Path, names=None):
        import os
        self.path = Path(path)
        where = f"{path}: not a valid safetensors file"
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                n = _header_length(f.read(8), size, where)
                head = f.read(n)
        except OSError as exc:
            raise IntegrityError(f"{where} ({exc})") from None
        self._base = 8 + n
        self._entries = _tensors(head, size - self._base, _DTYPES, where)
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

    def shape_of(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][1])

    def read_range(self, name: str, start: int, count: int) -> np.ndarray:
        """Elements [start, start + count) of a tensor, flattened, as float32: a coordinator aggregating N updates
        coordinate-wise holds a slice of each, not N whole tensors."""
        count = max(0, min(count, math.prod(self._entries[name][1]) - start))
        out = np.empty(count, np.float32)
        if count:
            self.read_range_into(name, start, out)
        return out

    def read_range_into(self, name: str, start: int, out: np.ndarray) -> None:
        """Elements [start, start + len(out)) of a tensor, flattened, into the float32 vector `out` (a row of the
        coordinator's chunk): one pread, no array of its own unless the file holds fp16."""
        dtype, shape, offset = self._entries[name]
        if not 0 <= start <= start + len(out) <= math.prod(shape):
            raise ValueError(f"elements {start}..{start + len(out)} are not within {name} of shape {shape}")
        target = out if dtype == np.float32 else np.empty(len(out), dtype)
        self._pread(name, target, self._base + offset + start * target.itemsize)
        if target is not out:
            out[:] = target

    def _read(self, name: str, out: np.ndarray) -> None:
        self._pread(name, out.reshape(-1), self._base + self._entries[name][2])

    def _pread(self, name: str, out: np.ndarray, position: int) -> None:
        """Fill the contiguous array `out` from the file at byte `position`; IntegrityError if the file ends first."""
        import os
        fd = os.open(self.path, os.O_RDONLY)
        try:
            got = os.preadv(fd, [memoryview(out.view(np.uint8))], position)
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

    def read_range_into(self, name: str, start: int, out: np.ndarray) -> None:
        self._where[name].read_range_into(name, start, out)

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape_of(name)

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
