"""How a model travels to a device: its manifest, its graphs, and its weights one layer at a time.

The global weights are kept as one safetensors blob per layer and per head (a "weight
group"), each named by the sha256 of its bytes; the global model of a round is an index
{group: sha256}. A task lists exactly the blobs its part needs (the frozen prefix, the
span, the head, and their graphs), so a device that kept last round's blobs downloads only
the groups whose weights changed: in progressive training, the block being trained.

Blob names in a task say where a blob goes on the device:
    parts/<key>/step.onnx    the part's step graph (forward and backward, standard ONNX), key = TrainablePart.key
    parts/<key>/prefix.onnx  the forward graph of the frozen layers before the part (absent when it starts at 0)
    parts/<key>/eval.onnx    the forward graph of the part's span and head (only in a task that holds rows out,
                             TrainConfig.holdout: the job measures accuracy with it)
    weights/<group>          a weight group, passed to the training job as one of its weight files

The per-layer graphs the manifest names stay on the coordinator: a device runs only the
graphs composed for its part.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Mapping

import numpy as np

from edge_runtime.errors import IntegrityError
from edge_runtime.store import atomic_write_text, read_verified
from edge_runtime.wire import weights as wcodec
from edge_runtime.wire.manifest import Manifest
from edge_runtime.wire.protocol import ProtocolError
from edge_runtime.wire.transfer import BlobStore

_PART_NAME = re.compile(r"^parts/[0-9a-f]{32}/(step|prefix|eval)\.onnx$")
_WEIGHT_NAME = re.compile(r"^weights/(layer|head)\.[0-9]{1,5}$")
STEP_GRAPH, PREFIX_GRAPH, EVAL_GRAPH = "step.onnx", "prefix.onnx", "eval.onnx"
GRAPH_HASHES = "hashes.json"   # beside a part's graphs: their sha256, checked every time a job reads them


def part_folder(manifest: Manifest, part) -> Path:
    """Where a part's graphs live in a model directory: parts/<key>/."""
    return manifest.file(f"parts/{part.key(manifest)}")


def part_graph_paths(manifest: Manifest, part) -> tuple[Path, Path | None]:
    """Where a part's step graph and its prefix's forward graph are, beside the manifest; IntegrityError
    naming what is missing (a board cannot build them: the coordinator does, and sends them with a task)."""
    folder = part_folder(manifest, part)
    step, prefix = folder / STEP_GRAPH, (folder / PREFIX_GRAPH if part.span[0] > 0 else None)
    for path in (step, prefix, folder / GRAPH_HASHES):
        if path is not None and not path.exists():
            raise IntegrityError(f"no {path.name} for layers {part.span[0]}-{part.span[-1]} + head {part.head} in "
                                 f"{folder}: a part's graphs are built by the coordinator (they come with a task, "
                                 f"or with an export made for profiling)")
    return step, prefix


def part_eval_graph_path(manifest: Manifest, part) -> Path:
    """Where a part's evaluation graph is (the forward graph of its span and head); IntegrityError when absent."""
    path = part_folder(manifest, part) / EVAL_GRAPH
    if not path.exists():
        raise IntegrityError(f"no {EVAL_GRAPH} for layers {part.span[0]}-{part.span[-1]} + head {part.head} in "
                             f"{path.parent}: a task that holds rows out must send it")
    return path


def read_part_graph(path: Path) -> bytes:
    """A part's graph, checked against the hash recorded beside it (IntegrityError when it was altered)."""
    hashes = json.loads((path.parent / GRAPH_HASHES).read_text())
    if path.name not in hashes:
        raise IntegrityError(f"{path.parent / GRAPH_HASHES} records no hash for {path.name}")
    return read_verified(path, hashes[path.name], f"the {path.stem} graph of part {path.parent.name}")


def record_part_hashes(folder: Path, hashes: Mapping[str, str]) -> None:
    """Write (or extend) the hashes of the graphs in a part's folder."""
    path = Path(folder) / GRAPH_HASHES
    known = json.loads(path.read_text()) if path.exists() else {}
    atomic_write_text(path, json.dumps(dict(known, **hashes), sort_keys=True))


def weight_groups(manifest: Manifest) -> dict[str, list[str]]:
    """Group name -> parameter names, for every layer and head that has parameters."""
    groups = {f"layer.{l.index}": [p.name for p in l.params] for l in manifest.layers}
    groups.update({f"head.{h.index}": [p.name for p in h.params] for h in manifest.heads})
    return {g: names for g, names in groups.items() if names}


def publish_weights(manifest: Manifest, weights: Mapping[str, np.ndarray], store: BlobStore,
                    fp16: bool = False) -> dict[str, str]:
    """Store every weight group as its own blob; return the index {group: sha256}.

    An unchanged group encodes to the same bytes, hence the same name: nothing new is stored.
    """
    return {g: store.put_bytes(wcodec.encode({n: weights[n] for n in names}, fp16=fp16))
            for g, names in weight_groups(manifest).items()}


def load_index(index: Mapping[str, str], store: BlobStore, groups=None) -> dict[str, np.ndarray]:
    """The weights of an index (or of some of its groups) as one float32 dict."""
    out: dict[str, np.ndarray] = {}
    for g in (index if groups is None else groups):
        out.update(wcodec.load(store.path(index[g])))
    return out


def part_groups(manifest: Manifest, part) -> list[str]:
    """The weight groups a part needs: every layer up to the end of its span but those it skips, and its head."""
    have = weight_groups(manifest)
    wanted = [f"layer.{i}" for i in range(part.span[-1] + 1) if i not in part.skip] + [f"head.{part.head}"]
    return [g for g in wanted if g in have]


def task_blobs(manifest: Manifest, part, index: Mapping[str, str], store: BlobStore,
               graphs: Mapping[str, str]) -> list[dict]:
    """The blob list of a task: the part's graphs ({"step.onnx": sha, "prefix.onnx": sha}), then its weight groups."""
    key = part.key(manifest)
    out = [{"sha256": sha, "size": store.path(sha).stat().st_size, "name": f"parts/{key}/{name}"}
           for name, sha in sorted(graphs.items())]
    for g in part_groups(manifest, part):
        out.append({"sha256": index[g], "size": store.path(index[g]).stat().st_size, "name": f"weights/{g}"})
    return out


def check_blob_names(blobs: list[dict]) -> None:
    """Refuse a task whose blob names are not ones this module writes (no path tricks)."""
    for b in blobs:
        name = b["name"]
        if not (_PART_NAME.fullmatch(name) or _WEIGHT_NAME.fullmatch(name)):
            raise ProtocolError(f"task: blob name {name!r} is neither parts/<key>/(step|prefix|eval).onnx nor "
                                f"weights/<group>")


def materialize(manifest_sha: str, blobs: list[dict], store: BlobStore, models_root: Path,
                part=None) -> tuple[Path, list[str]]:
    """Lay a task's blobs out as a model directory the runtime loads; return (manifest path, weight files).

    Graph files are hard links into the blob store (no copy). With `part`, its graphs must be
    the ones the task names for that part of this manifest: a task cannot pair a part with
    another part's graphs.
    """
    check_blob_names(blobs)
    root = Path(models_root) / manifest_sha
    root.mkdir(parents=True, exist_ok=True)
    _link(store.path(manifest_sha), root / "manifest.json")
    manifest = Manifest.load(root / "manifest.json")
    key = part.key(manifest) if part is not None else None
    weight_files = []
    for b in blobs:
        if b["name"].startswith("parts/"):
            if key is not None and b["name"].split("/")[1] != key:
                raise IntegrityError(f"task sends graph {b['name']}, which is not of its part (key {key})")
            target = root / b["name"]
            target.parent.mkdir(parents=True, exist_ok=True)
            _link(store.path(b["sha256"]), target)
            record_part_hashes(target.parent, {target.name: b["sha256"]})
        else:
            weight_files.append(str(store.path(b["sha256"])))
    return root / "manifest.json", weight_files


def _link(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # another filesystem: copy
        import shutil
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
