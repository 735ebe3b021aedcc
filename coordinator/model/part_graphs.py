"""The graphs a device runs for a part, built once on the coordinator and kept beside the export.

For a part (edge_runtime/wire/part.py) the coordinator writes `parts/<key>/` in the model
directory (edge_runtime/wire/model_blobs.py names the layout):

- `step.onnx`: forward and backward of the span and its head in standard ONNX, every
  parameter an input, the loss and each trainable parameter's gradient as outputs
  (coordinator/model/step_graph.py);
- `prefix.onnx`: the forward graph of the frozen layers before the span, when there are
  any (coordinator/model/graphs.py);
- `eval.onnx`: the forward graph of the span and its head (inference mode), with which a
  job measures accuracy on the rows it holds out.

Building a step graph needs onnxruntime-training's gradient builder, which exists only
for x86-64 and Python up to 3.12 and is frozen at 1.19.2. It is kept apart from the
maintained onnxruntime the coordinator and the devices run: installed into its own
folder (`EDGEBLOCK_GRADIENT_BUILDER`, by default `<venv>/gradient-builder`), and used only
in a child process whose path puts that folder first. Every part of a round is built in
one child, so a round pays one start-up, and a part already built costs nothing.

An op that cannot be differentiated comes back as UnsupportedOpError naming the layer or
head that holds it (`locate`); the export adds the torch module inside it.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from coordinator.model.graphs import GraphLibrary, compose, forward_graph, scope_of
from edge_runtime.errors import EdgeRuntimeError, UnsupportedOpError
from edge_runtime.store import atomic_write_bytes, sha256_bytes, sha256_file
from edge_runtime.wire.manifest import Manifest
from edge_runtime.wire.model_blobs import EVAL_GRAPH, PREFIX_GRAPH, STEP_GRAPH, part_folder, record_part_hashes
from edge_runtime.wire.part import TrainablePart

log = logging.getLogger(__name__)

GRADIENT_BUILDER = "onnxruntime-training-cpu==1.19.2"
REPO = Path(__file__).resolve().parents[2]


def builder_dir() -> Path:
    """Where onnxruntime-training lives, apart from the maintained onnxruntime."""
    return Path(os.environ.get("EDGEBLOCK_GRADIENT_BUILDER") or Path(sys.prefix) / "gradient-builder")


def ensure_builder() -> Path:
    """The gradient builder's folder, installed from PyPI the first time it is needed (tools/bootstrap.sh does it)."""
    where = builder_dir()
    if (where / "onnxruntime" / "training").is_dir():
        return where
    log.warning("installing the gradient builder (%s) into %s", GRADIENT_BUILDER, where)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(where),
                           GRADIENT_BUILDER], capture_output=True, text=True)
    if done.returncode != 0:
        raise EdgeRuntimeError(f"step graphs need onnxruntime-training's gradient builder, and installing it into "
                               f"{where} failed (pip: {done.stderr.strip().splitlines()[-1:]}); install it with "
                               f"`pip install --no-deps --target {where} {GRADIENT_BUILDER}` on an x86-64 machine "
                               f"with Python 3.11 or 3.12")
    return where


def ensure_part_graphs(manifest: Manifest, parts: Iterable[TrainablePart]) -> None:
    """Build the graphs of every part that lacks them (one child process for all); raise UnsupportedOpError
    naming the layer or head (by its manifest name) and the operator when a part cannot be trained on a device."""
    try:
        _ensure_part_graphs(manifest, parts)
    except UnsupportedOpError as exc:
        raise locate(exc, manifest) from None


def locate(error: UnsupportedOpError, manifest: Manifest, model: Any = None) -> UnsupportedOpError:
    """The error told in the model's terms: the layer (its state-dict name and block) or head whose graph holds
    the node and, given the torch model it was exported from (a BlockModel), the module inside it and its type.

    The node's name is the layer's scope (`L1/`) before the legacy exporter's module path
    (`/1/InstanceNormalization`, `/body/body.0/Conv`), gradient nodes keeping their forward node's path.
    """
    scope = scope_of(error.node_name)
    if scope is None:
        return error
    kind, index, inner = scope
    specs = manifest.layers if kind == "layer" else manifest.heads
    if not 0 <= index < len(specs):
        return error
    spec = specs[index]
    where = f"layer {spec.name} (block {spec.block})" if kind == "layer" else \
        f"head {spec.name} (after layer {spec.attach_after_layer})"
    module = _module_of(model, spec.name, inner) if model is not None else None
    if module is not None:
        where += f": module {module[0]} ({module[1]})"
    return error.located(where, **{kind: index})


def _module_of(model: Any, prefix: str, inner: str) -> tuple[str, str] | None:
    """(state-dict path, type name) of the deepest module of `model.<prefix>` that the node path names."""
    try:
        modules = dict(model.get_submodule(prefix).named_modules())
    except AttributeError:
        return None
    segments = [s for s in inner.split("/")[:-1] if s]   # the last segment is the node's own name
    found = ""
    for k in range(len(segments), 0, -1):   # the exporter writes full paths (body.0); accept body/0 too
        hit = next((c for c in (segments[k - 1], ".".join(segments[:k])) if c in modules), None)
        if hit is not None:
            found = hit
            break
    return (f"{prefix}.{found}" if found else prefix), type(modules[found]).__name__


def _ensure_part_graphs(manifest: Manifest, parts: Iterable[TrainablePart]) -> None:
    lib = GraphLibrary(manifest)
    todo: dict[str, TrainablePart] = {}
    for part in parts:
        part.validate(manifest)
        folder = part_folder(manifest, part)
        if part.span[0] > 0 and not (folder / PREFIX_GRAPH).exists():
            prefix = forward_graph(lib, range(part.span[0]), None).SerializeToString()
            atomic_write_bytes(folder / PREFIX_GRAPH, prefix)
            record_part_hashes(folder, {PREFIX_GRAPH: sha256_bytes(prefix)})
        if not (folder / EVAL_GRAPH).exists():
            evaluation = forward_graph(lib, part.span, part.head, skip=part.skip).SerializeToString()
            atomic_write_bytes(folder / EVAL_GRAPH, evaluation)
            record_part_hashes(folder, {EVAL_GRAPH: sha256_bytes(evaluation)})
        if not (folder / STEP_GRAPH).exists():
            todo[part.key(manifest)] = part
    if not todo:
        return
    with tempfile.TemporaryDirectory(prefix="edgeblock-steps-") as tmp:
        requests = []
        for key, part in todo.items():
            forward = compose(lib, part.span, part.head, _Zeros(manifest, part), skip=part.skip)
            path = Path(tmp) / f"{key}.forward.onnx"
            path.write_bytes(forward.SerializeToString())
            requests.append({"forward": str(path), "trainable": part.trainable_names(manifest),
                             "frozen": part.frozen_names(manifest),
                             "out": str(part_folder(manifest, part) / STEP_GRAPH),
                             "what": f"layers {part.span[0]}-{part.span[-1]} + head {part.head}"})
        _run_builder(requests, Path(tmp))
    for part in todo.values():
        folder = part_folder(manifest, part)
        record_part_hashes(folder, {STEP_GRAPH: sha256_file(folder / STEP_GRAPH)})


def _run_builder(requests: list[dict], tmp: Path) -> None:
    """Build step graphs in a child whose onnxruntime is the training build; its failures come back by name."""
    where = ensure_builder()
    request_file = tmp / "requests.json"
    request_file.write_text(json.dumps(requests))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(where), str(REPO)]), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "coordinator.model.step_graph", str(request_file)], env=env,
                          capture_output=True, text=True)
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    for report in reports:
        if report.get("op_type"):
            raise UnsupportedOpError(report["op_type"], report["node_name"], report.get("detail", ""))
        if not report.get("ok"):
            raise EdgeRuntimeError(f"building the step graph of {report.get('what', 'a part')} failed: "
                                   f"{report.get('error')}")
    if done.returncode != 0 or len(reports) != len(requests):
        raise EdgeRuntimeError(f"the step graph builder failed (exit {done.returncode}): {done.stderr[-800:]}")


class _Zeros(dict):
    """Zero values for a part's parameters: the gradient builder needs them as initializers; the step graph it
    makes takes them as inputs, so the values never matter."""

    def __init__(self, manifest: Manifest, part: TrainablePart):
        specs = manifest.param_specs()
        super().__init__({n: np.zeros(specs[n].shape, np.float32) for n in part.all_names(manifest)})

