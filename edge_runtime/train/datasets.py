"""Local data on a device: Fashion-MNIST IDX files, stored as .npy files the runtime reads row by row (pread).

Also the data contract (check_arrays, LocalDataset.check): what a model's inputs and labels
must be, checked where the data is, in chunks, so that a wrong shape, a label outside the
model's classes or a NaN input is named as such (file, rows, fix) instead of surfacing as a
memory problem, a negative loss or a learning rate that is too high.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.store import atomic_write_text, sha256_bytes

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


HOLDOUT_SEED = 0x0EB1   # fixed: the held-out rows must be the same rows in every task, on every run


def holdout_split(n: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(rows to train on, held-out rows) of n local rows, both sorted: round(fraction x n) rows held out, at
    least one when fraction > 0 and n > 1, never all. The same n and fraction give the same rows every time:
    a held-out row is never trained on, in this task or any other."""
    held = 0 if fraction <= 0 or n < 2 else min(n - 1, max(1, round(fraction * n)))
    order = np.random.default_rng([HOLDOUT_SEED, n]).permutation(n)
    return np.sort(order[held:]), np.sort(order[:held])


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

    def require_files(self) -> None:
        """DataError unless both files are there: the first thing to fix, named before anything reads them."""
        for path in (self.inputs_path, self.labels_path):
            if not path.is_file():
                raise DataError(f"{self.root}: no {path.name}; a device's data directory holds inputs.npy "
                                f"(float32, one row per example, shaped as the model's input) and labels.npy "
                                f"(int64 class indices, one per row), both written with numpy.save")

    def fingerprint(self) -> str:
        """Identifies the data for cache keys: changes whenever the files are rewritten."""
        self.require_files()
        parts = []
        for p in (self.inputs_path, self.labels_path):
            st = p.stat()
            parts.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
        return sha256_bytes("|".join(parts).encode())

    def check(self, input_shape: Sequence[int], num_classes: int, cache_file: Path | None = None) -> DataSummary:
        """The data contract (check_arrays) on the files, read in chunks; DataError naming the file and the rows.

        With cache_file, a summary already computed for this data version, input shape and
        number of classes is read from it instead of reading the data again, and a new one is
        written there: every job child of a device checks its data, but only the first one reads it.
        """
        fingerprint = self.fingerprint()
        key = {"fingerprint": fingerprint, "input_shape": [int(d) for d in input_shape],
               "num_classes": int(num_classes)}
        if cache_file is not None and Path(cache_file).is_file():
            try:
                saved = json.loads(Path(cache_file).read_text())
                if saved.get("key") == key:
                    return DataSummary.from_dict(saved["summary"])
            except (ValueError, KeyError, TypeError):
                pass  # a cache: checking again is the cost of losing it
        with ArrayReader(self.inputs_path, DataError) as inputs, ArrayReader(self.labels_path, DataError) as labels:
            summary = check_arrays(inputs, labels, input_shape, num_classes, source=str(self.inputs_path),
                                   labels_source=str(self.labels_path), fingerprint=fingerprint)
        if cache_file is not None:
            Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(Path(cache_file), json.dumps({"key": key, "summary": summary.to_dict()}))
        return summary

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


# -- the data contract --------------------------------------------------------------------
#
# What a model's data must be, checked where the data is (the device, and the coordinator for
# its evaluation set) before anything trains on it: onnxruntime reads a label outside the
# logits without a word (a negative loss, or a zero gradient for -1), a wrong shape fails deep
# inside a calibration run, and a NaN input looks like a learning rate that is too high.

CHECK_CHUNK_BYTES = 1 << 20     # input bytes read at a time: the check costs a few MB whatever the data's size
SHOWN = 5                       # offending rows named in a message
DATA_CHECK_FILE = "data-check.json"   # a device's cached summary, in its runtime state directory


class DataError(EdgeRuntimeError):
    """A dataset that breaks the data contract; the message names the file, its rows, the problem and the fix."""


@dataclass(frozen=True)
class DataSummary:
    """What a checked dataset holds: its rows, the mean and std of every input value, examples per class."""
    rows: int
    input_mean: float
    input_std: float
    label_counts: tuple[int, ...]        # examples of class 0, 1, ..., num_classes - 1
    fingerprint: str | None = None       # LocalDataset.fingerprint() of the data it was computed for

    def to_dict(self) -> dict:
        return {**asdict(self), "label_counts": list(self.label_counts)}

    @classmethod
    def from_dict(cls, raw: dict) -> "DataSummary":
        return cls(rows=int(raw["rows"]), input_mean=float(raw["input_mean"]), input_std=float(raw["input_std"]),
                   label_counts=tuple(int(c) for c in raw["label_counts"]), fingerprint=raw.get("fingerprint"))


class ArrayReader:
    """Rows of a .npy file read with pread into fresh buffers: by index as float32 (`take`, a training
    batch) or as a contiguous slice in the file's own dtype (`rows[a:b]`, a pass over the whole file).

    Not through mmap: on recent kernels a fault on a file mapping maps whole large page-cache
    folios around it, so 64 random rows of a 250 MB cache put about 90 MB into the resident
    set at once (measured), and every page a scan reads stays resident until unmapped. pread
    copies exactly the rows asked for; the file's pages stay in the page cache, outside the
    process's resident memory. The header is checked when opened: `error` (DataError for a
    device's data) for a file that is not a whole C-ordered .npy array.
    """

    def __init__(self, path: Path, error: type[Exception] = ValueError):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise error(f"{self.path}: cannot read it ({exc.strerror}); check the file and its permissions") \
                from None
        try:
            with open(self.path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(f)
                self._offset = f.tell()
        except (ValueError, OSError) as exc:
            self.close()
            raise error(f"{self.path} is not a .npy file ({str(exc).splitlines()[0][:120]}); "
                        f"write it with numpy.save") from None
        self.shape, self.dtype = tuple(int(d) for d in shape), np.dtype(dtype)
        self._row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
        if fortran and len(self.shape) > 1:
            self.close()
            raise error(f"{self.path}: the array is stored in Fortran order; save it in C order: "
                        f"numpy.save(path, numpy.ascontiguousarray(array))")
        if not self.dtype.hasobject:
            needed = self._offset + math.prod(self.shape) * self.dtype.itemsize
            size = os.fstat(self._fd).st_size
            if size < needed:
                self.close()
                raise error(f"{self.path} is truncated: {size} bytes where an array of shape {self.shape} "
                            f"({self.dtype}) needs {needed}; write it again")

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 0

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.shape[1:]

    def take(self, indices: np.ndarray) -> np.ndarray:
        """The rows at `indices`, in that order, as float32."""
        raw = np.empty((len(indices),) + self.row_shape, dtype=self.dtype)
        view = memoryview(raw.reshape(-1).view(np.uint8))
        rb = self._row_bytes
        for pos in np.argsort(indices, kind="stable"):  # ascending file offsets
            row = int(indices[pos])
            if not 0 <= row < len(self):
                raise IndexError(f"row {row} out of range for {self.path} ({len(self)} rows)")
            got = os.preadv(self._fd, [view[pos * rb:(pos + 1) * rb]], self._offset + row * rb)
            if got != rb:
                raise IOError(f"short read of row {row} from {self.path}")
        return raw if raw.dtype == np.float32 else raw.astype(np.float32)

    def __getitem__(self, rows: slice) -> np.ndarray:
        """Contiguous rows in the file's own dtype, in one read (what a check of the whole file needs)."""
        start, stop, step = rows.indices(len(self))
        if step != 1:
            raise ValueError("ArrayReader slices contiguous rows only")
        count = max(0, stop - start)
        raw = np.empty((count,) + self.row_shape, dtype=self.dtype)
        want = count * self._row_bytes
        got = os.preadv(self._fd, [memoryview(raw.reshape(-1).view(np.uint8))],
                        self._offset + start * self._row_bytes) if want else 0
        if got != want:
            raise DataError(f"{self.path}: short read at row {start}; the file changed while it was read")
        return raw

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "ArrayReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def check_arrays(inputs, labels, input_shape: Sequence[int], num_classes: int, source: str,
                 labels_source: str | None = None, fingerprint: str | None = None) -> DataSummary:
    """Check a dataset against a model's data contract; its summary, or DataError saying every problem found.

    inputs and labels are numpy arrays (in memory or memory-mapped) or ArrayReaders: anything with
    shape, dtype and row slices. They are read CHECK_CHUNK_BYTES of inputs at a time. The
    contract: inputs float32 of shape (N, *input_shape), labels of an integer dtype (int64
    expected) and shape (N,), N > 0, every label in 0..num_classes-1, every input value finite.
    source names the inputs in messages (a file, or e.g. "the evaluation set"); labels_source
    names the labels file when it is another file, else the labels are "<source> labels".
    """
    names = (source, labels_source) if labels_source else (f"{source} inputs", f"{source} labels")
    input_shape, num_classes = tuple(int(d) for d in input_shape), int(num_classes)
    rows = _check_layout(inputs, labels, input_shape, names)
    scan = _RowScan(num_classes)
    step = max(1, CHECK_CHUNK_BYTES // max(1, math.prod(input_shape) * 4))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        scan.add(inputs[start:stop], labels[start:stop], np.arange(start, stop))
    problems = scan.problems(names, rows)
    if problems:
        raise DataError("; ".join(problems))
    mean, std = scan.mean_std()
    return DataSummary(rows=rows, input_mean=mean, input_std=std, label_counts=tuple(int(c) for c in scan.counts),
                       fingerprint=fingerprint)


def check_batch(inputs: np.ndarray, labels: np.ndarray, rows: np.ndarray, num_classes: int,
                inputs_source: str, labels_source: str) -> None:
    """DataError naming the rows (numbered as in the files) of one batch whose inputs are not finite or whose
    labels are outside 0..num_classes-1: what a trainer looks at before blaming a diverged loss on its settings."""
    scan = _RowScan(int(num_classes))
    scan.add(np.asarray(inputs), np.asarray(labels), np.asarray(rows))
    problems = scan.problems((inputs_source, labels_source), len(rows), of="of the batch's")
    if problems:
        raise DataError("; ".join(problems))


def _check_layout(inputs, labels, input_shape: tuple[int, ...], names: tuple[str, str]) -> int:
    """The row count, once dtypes, shapes and counts are right; else DataError listing what is wrong with each."""
    in_name, lab_name = names
    in_shape, lab_shape = tuple(inputs.shape), tuple(labels.shape)
    n = in_shape[0] if in_shape else 0
    what = f"({n} rows)" if in_shape else "(a single value, not rows)"
    problems = []
    if inputs.dtype != np.float32:
        hint = ", normalised as the coordinator's evaluation data is," if inputs.dtype.kind in "iub" else ""
        problems.append(f"{in_name} {what}: inputs are {inputs.dtype}, the model takes float32; convert them with "
                        f"inputs.astype(numpy.float32){hint} then numpy.save")
    if in_shape[1:] != input_shape or not in_shape:
        expected = (n,) + input_shape
        if in_shape and math.prod(in_shape) == math.prod(expected):
            fix = f"reshape them: inputs.reshape{expected}"
        else:
            fix = "this data is not for this model (or needs resizing to its input)"
        problems.append(f"{in_name} {what}: inputs have shape {in_shape}, the model takes {expected} "
                        f"(rows of shape {input_shape}); {fix}")
    if labels.dtype.kind not in "iu":
        problems.append(f"{lab_name}: labels are {labels.dtype}; they must be integer class indices (int64): "
                        f"labels.astype(numpy.int64), then numpy.save")
    if len(lab_shape) != 1:
        fix = ("labels.reshape(-1)" if len(lab_shape) == 2 and lab_shape[1] == 1 else
               "labels.argmax(axis=1) for one-hot rows" if len(lab_shape) == 2 else "one class index per row")
        problems.append(f"{lab_name}: labels have shape {lab_shape}; they must be one class index per row, "
                        f"shape ({lab_shape[0] if lab_shape else n},): {fix}")
    elif in_shape and lab_shape[0] != n:
        problems.append(f"{lab_name} holds {lab_shape[0]} labels for the {n} rows of {in_name}; every input row "
                        f"needs exactly one label, in the same order")
    if in_shape and n == 0 and not problems:
        problems.append(f"{in_name}: 0 rows; a device needs at least one training example")
    if problems:
        raise DataError("; ".join(problems))
    return n


class _RowScan:
    """What a pass over a dataset's rows found: rows with non-finite inputs, labels out of range, and the
    running mean and variance of the input values and the class counts (merged per chunk, in float64)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.bad_inputs, self.nan, self.inf = 0, False, False
        self.first_bad_inputs: list[int] = []
        self.bad_labels = 0
        self.first_bad_labels: list[tuple[int, int]] = []
        self.n, self.mean, self.m2 = 0, 0.0, 0.0
        self.counts = np.zeros(num_classes, np.int64)

    def add(self, inputs: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> None:
        flat = inputs.reshape(len(inputs), -1)
        finite = np.isfinite(flat)
        if not finite.all():
            bad = ~finite.all(axis=1)
            self.bad_inputs += int(bad.sum())
            self.first_bad_inputs += [int(r) for r in rows[bad][:SHOWN - len(self.first_bad_inputs)]]
            self.nan = self.nan or bool(np.isnan(flat[bad]).any())
            self.inf = self.inf or bool(np.isinf(flat[bad]).any())
        elif flat.size:
            self._merge(flat)
        labels = labels.reshape(-1)
        out = (labels < 0) | (labels >= self.num_classes)
        if out.any():
            self.bad_labels += int(out.sum())
            self.first_bad_labels += [(int(r), int(v)) for r, v in
                                      zip(rows[out][:SHOWN - len(self.first_bad_labels)], labels[out])]
            labels = labels[~out]
        self.counts += np.bincount(labels.astype(np.int64), minlength=self.num_classes)

    def _merge(self, values: np.ndarray) -> None:
        """Chan et al.'s pairwise update: the chunk's mean and squared deviations, then merged with the total."""
        k = values.size
        mean = float(values.sum(dtype=np.float64)) / k
        dev = values - np.float32(mean)
        np.square(dev, out=dev)
        m2 = float(dev.sum(dtype=np.float64))
        total = self.n + k
        delta = mean - self.mean
        self.mean += delta * k / total
        self.m2 += m2 + delta * delta * self.n * k / total
        self.n = total

    def mean_std(self) -> tuple[float, float]:
        return self.mean, math.sqrt(self.m2 / self.n) if self.n else 0.0

    def problems(self, names: tuple[str, str], rows: int, of: str = "of") -> list[str]:
        in_name, lab_name = names
        out = []
        if self.bad_labels:
            shown = ", ".join(f"row {r} is {v}" for r, v in self.first_bad_labels)
            more = ", ..." if self.bad_labels > len(self.first_bad_labels) else ""
            hint = ""
            if self.counts[0] == 0 and all(0 < v <= self.num_classes for _, v in self.first_bad_labels):
                hint = " (numbered from 1? class indices start at 0: labels - 1)"
            out.append(f"{lab_name}: {self.bad_labels} {of} {rows} labels are outside 0..{self.num_classes - 1} "
                       f"(the model's {self.num_classes} classes): {shown}{more}{hint}; fix or drop those rows")
        if self.bad_inputs:
            kinds = " and ".join(k for k, found in (("NaN", self.nan), ("inf", self.inf)) if found)
            shown = ", ".join(str(r) for r in self.first_bad_inputs)
            more = ", ..." if self.bad_inputs > len(self.first_bad_inputs) else ""
            which = "row" if self.bad_inputs == 1 else "rows"
            out.append(f"{in_name}: {self.bad_inputs} {of} {rows} rows hold values that are not finite ({kinds}): "
                       f"{which} {shown}{more}; fix or drop those rows")
        return out
