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
    parts/<key>/in_step.onnx FedIN, a family member's part: the IN step graph (the member's layers, s_in -> s_out,
                             MSE loss against a float target, the gradient of every parameter of the member's layers)
    parts/<key>/s_in.onnx    FedIN: the forward graph of the shared extractor (the part's input -> s_in)
    parts/<key>/s_out.onnx   FedIN: the forward graph of the member's layers (s_in -> s_out, other members skipped)
    weights/<group>          a weight group, passed to the training job as one of its weight files
    features/<sha256>        FedIN: shared features of other devices (safetensors: s_in, s_out, labels, origin),
                             laid out as features/<sha256>.safetensors beside the manifest (task_features_path)

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
from edge_runtime.wire.manifest import Manifest, MemberSpec
from edge_runtime.wire.protocol import ProtocolError
from edge_runtime.wire.transfer import BlobStore

_PART_NAME = re.compile(r"^parts/[0-9a-f]{32}/(step|prefix|eval|in_step|s_in|s_out)\.onnx$")
_WEIGHT_NAME = re.compile(r"^weights/(layer|head)\.[0-9]{1,5}$")
_FEATURES_NAME = re.compile(r"^features/[0-9a-f]{64}$")
STEP_GRAPH, PREFIX_GRAPH, EVAL_GRAPH = "step.onnx", "prefix.onnx", "eval.onnx"
IN_STEP_GRAPH, S_IN_GRAPH, S_OUT_GRAPH = "in_step.onnx", "s_in.onnx", "s_out.onnx"   # a family member's part
FEATURES_PREFIX = "features/"
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


def trained_member(manifest: Manifest, part) -> MemberSpec | None:
    """The family member (FedIN) a part trains: its graphs skip exactly every other member's layers, it trains
    every layer of that member and starts inside the shared extractor (so s_in is computed by the part); or None."""
    member = manifest.member_of(part.skip) if manifest.members else None
    if member is None or not set(member.layers) <= set(part.trainable_layers) \
            or part.span[0] >= len(manifest.extractor_layers):
        return None
    return member


def in_span(manifest: Manifest) -> tuple[int, ...]:
    """The layers of a family's IN graphs: every layer after the shared extractor (s_in = their input, s_out =
    the output of the last one); a member's graphs skip the other members' layers among them."""
    return tuple(range(len(manifest.extractor_layers), len(manifest.layers)))


def member_graph_paths(manifest: Manifest, part) -> tuple[Path, Path, Path]:
    """Where a member part's IN step graph, s_in graph and s_out graph are; IntegrityError naming what is
    missing (the coordinator builds them for a family member's part and sends them with a FedIN task)."""
    folder = part_folder(manifest, part)
    paths = (folder / IN_STEP_GRAPH, folder / S_IN_GRAPH, folder / S_OUT_GRAPH)
    for path in paths:
        if not path.exists():
            raise IntegrityError(f"no {path.name} for layers {part.span[0]}-{part.span[-1]} + head {part.head} in "
                                 f"{folder}: a FedIN task of a family member's part must send it")
    return paths


def task_features_path(manifest_path_or_root, blobs: list[dict]) -> str | None:
    """The shared-feature file a task names (features/<sha256>), where materialize laid it out, or None."""
    root = Path(manifest_path_or_root)
    if root.name == "manifest.json":
        root = root.parent
    for b in blobs:
        if _FEATURES_NAME.fullmatch(b["name"]):
            return str(root / (b["name"] + ".safetensors"))
    return None


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
               graphs: Mapping[str, str], features_sha: str | None = None) -> list[dict]:
    """The blob list of a task: the part's graphs ({"step.onnx": sha, "prefix.onnx": sha}), then its weight groups,
    then (FedIN) the shared-feature blob."""
    key = part.key(manifest)
    out = [{"sha256": sha, "size": store.path(sha).stat().st_size, "name": f"parts/{key}/{name}"}
           for name, sha in sorted(graphs.items())]
    for g in part_groups(manifest, part):
        out.append({"sha256": index[g], "size": store.path(index[g]).stat().st_size, "name": f"weights/{g}"})
    if features_sha is not None:
        out.append({"sha256": features_sha, "size": store.path(features_sha).stat().st_size,
                    "name": FEATURES_PREFIX + features_sha})
    return out


def check_blob_names(blobs: list[dict]) -> None:
    """Refuse a task whose blob names are not ones this module writes (no path tricks)."""
    for b in blobs:
        name = b["name"]
        if not (_PART_NAME.fullmatch(name) or _WEIGHT_NAME.fullmatch(name) or _FEATURES_NAME.fullmatch(name)):
            raise ProtocolError(f"task: blob name {name!r} is neither parts/<key>/(step|prefix|eval|in_step|s_in|"
                                f"s_out).onnx nor weights/<group> nor features/<sha256>")


def materialize(manifest_sha: str, blobs: list[dict], store: BlobStore, models_root: Path,
                part=None) -> tuple[Path, list[str]]:
    """Lay a task's blobs out as a model directory the runtime loads; return (manifest path, weight files).

    Graph files are hard links into the blob store (no copy); so is a shared-feature blob, as
    features/<sha256>.safetensors (task_features_path finds it): it is no weight file. With `part`, its graphs must be
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
        elif b["name"].startswith(FEATURES_PREFIX):
            if b["name"] != FEATURES_PREFIX + b["sha256"]:
                raise IntegrityError(f"task names shared features {b['name']} by another hash than their own "
                                     f"({b['sha256']})")
            target = root / (b["name"] + ".safetensors")
            target.parent.mkdir(parents=True, exist_ok=True)
            _link(store.path(b["sha256"]), target)
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
