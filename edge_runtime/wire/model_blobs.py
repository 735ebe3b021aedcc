"""How a model travels to a device: its manifest, its graphs, and its weights one layer at a time.

The global weights are kept as one safetensors blob per layer and per head (a "weight
group"), each named by the sha256 of its bytes; the global model of a round is an index
{group: sha256}. A task lists exactly the blobs its part needs (the frozen prefix, the
span, the head, and their graphs), so a device that kept last round's blobs downloads only
the groups whose weights changed: in progressive training, the block being trained.

Blob names in a task say where a blob goes on the device:
    graphs/<sha256>.onnx     a graph file, placed beside the manifest as the manifest names it
    weights/<group>          a weight group, passed to the training job as one of its weight files
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

import numpy as np

from edge_runtime.errors import IntegrityError
from edge_runtime.wire import weights as wcodec
from edge_runtime.wire.manifest import Manifest
from edge_runtime.wire.protocol import ProtocolError
from edge_runtime.wire.transfer import BlobStore

_GRAPH_NAME = re.compile(r"^graphs/[0-9a-f]{64}\.onnx$")
_WEIGHT_NAME = re.compile(r"^weights/(layer|head)\.[0-9]{1,5}$")


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


def task_blobs(manifest: Manifest, part, index: Mapping[str, str], store: BlobStore) -> list[dict]:
    """The blob list of a task: graphs of the prefix, span and head, then their weight groups."""
    refs = [manifest.layers[i].graph for i in range(part.span[-1] + 1)] + [manifest.heads[part.head].graph]
    out = [{"sha256": r.sha256, "size": store.path(r.sha256).stat().st_size, "name": r.file} for r in refs]
    for g in part_groups(manifest, part):
        out.append({"sha256": index[g], "size": store.path(index[g]).stat().st_size, "name": f"weights/{g}"})
    return out


def check_blob_names(blobs: list[dict]) -> None:
    """Refuse a task whose blob names are not ones this module writes (no path tricks)."""
    for b in blobs:
        name = b["name"]
        if not (_GRAPH_NAME.match(name) or _WEIGHT_NAME.match(name)):
            raise ProtocolError(f"task: blob name {name!r} is neither graphs/<sha256>.onnx nor weights/<group>")
        if name.startswith("graphs/") and name != f"graphs/{b['sha256']}.onnx":
            raise ProtocolError(f"task: graph blob {name!r} is not named by its hash {b['sha256'][:12]}…")


def materialize(manifest_sha: str, blobs: list[dict], store: BlobStore, models_root: Path) -> tuple[Path, list[str]]:
    """Lay a task's blobs out as a model directory the runtime loads; return (manifest path, weight files).

    Graph files are hard links into the blob store (no copy); the manifest is checked to
    name the graphs the task sent, so a task cannot pair a manifest with other graphs.
    """
    check_blob_names(blobs)
    root = Path(models_root) / manifest_sha
    (root / "graphs").mkdir(parents=True, exist_ok=True)
    _link(store.path(manifest_sha), root / "manifest.json")
    manifest = Manifest.load(root / "manifest.json")
    known = {l.graph.file for l in manifest.layers} | {h.graph.file for h in manifest.heads}
    weight_files = []
    for b in blobs:
        if b["name"].startswith("graphs/"):
            if b["name"] not in known:
                raise IntegrityError(f"task sends graph {b['name']} that its manifest does not name")
            _link(store.path(b["sha256"]), root / b["name"])
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
