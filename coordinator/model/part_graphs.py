"""The graphs a device runs for a part, built once on the coordinator and kept beside the export.

For a part (edge_runtime/wire/part.py) the coordinator writes `parts/<key>/` in the model
directory (edge_runtime/wire/model_blobs.py names the layout):

- `step.onnx`: forward and backward of the span and its head in standard ONNX, every
  parameter an input, the loss and each trainable parameter's gradient as outputs
  (coordinator/model/step_graph.py);
- `prefix.onnx`: the forward graph of the frozen layers before the span, when there are
  any (coordinator/model/graphs.py);
- `eval.onnx`: the forward graph of the span and its head (inference mode), with which a
  job measures accuracy on the rows it holds out;
- for a family member's part (FedIN, model_blobs.trained_member): `in_step.onnx`, the IN step
  graph (the member's layers from s_in to s_out, other members skipped, no head; loss
  loss_scale x sum over samples of the mean squared error against a float target; the
  gradient of every parameter of the member's layers), `s_in.onnx` (the extractor's forward
  graph from the part's input to s_in) and `s_out.onnx` (the member's forward graph, s_in ->
  s_out), with which a job computes the features it shares.

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
from edge_runtime.wire.model_blobs import (
    EVAL_GRAPH,
    IN_STEP_GRAPH,
    PREFIX_GRAPH,
    S_IN_GRAPH,
    S_OUT_GRAPH,
    STEP_GRAPH,
    in_span,
    part_folder,
    record_part_hashes,
    trained_member,
)
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


def _write_forward(folder: Path, name: str, model) -> None:
    data = model.SerializeToString()
    atomic_write_bytes(folder / name, data)
    record_part_hashes(folder, {name: sha256_bytes(data)})


def _ensure_part_graphs(manifest: Manifest, parts: Iterable[TrainablePart]) -> None:
    lib = GraphLibrary(manifest)
    requests: list[dict] = []
    built: list[Path] = []   # step graphs the builder writes, hashed once it has
    with tempfile.TemporaryDirectory(prefix="edgeblock-steps-") as tmp:
        for part in parts:
            part.validate(manifest)
            folder = part_folder(manifest, part)
            if part.span[0] > 0 and not (folder / PREFIX_GRAPH).exists():
                _write_forward(folder, PREFIX_GRAPH, forward_graph(lib, range(part.span[0]), None))
            if not (folder / EVAL_GRAPH).exists():
                _write_forward(folder, EVAL_GRAPH, forward_graph(lib, part.span, part.head, skip=part.skip))
            out = folder / STEP_GRAPH
            if not out.exists() and out not in built:
                forward = compose(lib, part.span, part.head, _Zeros(manifest, part.all_names(manifest)),
                                  skip=part.skip)
                requests.append(_request(Path(tmp), forward, part.trainable_names(manifest),
                                         part.frozen_names(manifest), out,
                                         f"layers {part.span[0]}-{part.span[-1]} + head {part.head}"))
                built.append(out)
            member = trained_member(manifest, part)
            if member is not None:
                requests += _member_graphs(lib, part, member, folder, Path(tmp), built)
        if requests:
            _run_builder(requests, Path(tmp))
    for out in built:
        record_part_hashes(out.parent, {out.name: sha256_file(out)})


def _member_graphs(lib: GraphLibrary, part: TrainablePart, member, folder: Path, tmp: Path,
                   built: list[Path]) -> list[dict]:
    """Write a member part's s_in and s_out forward graphs; return the builder's request for its IN step graph
    (none when it exists). The IN graphs run the layers after the extractor, skipping the other members'."""
    manifest = lib.manifest
    layers = in_span(manifest)
    skip = tuple(i for i in part.skip if i in layers)
    if not (folder / S_IN_GRAPH).exists():
        _write_forward(folder, S_IN_GRAPH, forward_graph(lib, range(part.span[0], layers[0]), None))
    if not (folder / S_OUT_GRAPH).exists():
        _write_forward(folder, S_OUT_GRAPH, forward_graph(lib, layers, None, skip=skip))
    out = folder / IN_STEP_GRAPH
    if out.exists() or out in built:
        return []
    ran = [i for i in layers if i not in skip]
    trainable = manifest.param_names(sorted(member.layers), kind="param")
    frozen = [n for n in manifest.param_names([i for i in ran if i not in member.layers], kind="param")]
    forward = compose(lib, layers, None, _Zeros(manifest, manifest.param_names(ran)), skip=skip)
    built.append(out)
    return [dict(_request(tmp, forward, trainable, frozen, out, f"the IN step of member {member.name}"), loss="mse")]


def _request(tmp: Path, forward, trainable: list[str], frozen: list[str], out: Path, what: str) -> dict:
    """One step graph for the builder child: the forward graph goes into a temporary file."""
    path = tmp / f"{sha256_bytes(str(out).encode())[:16]}.forward.onnx"
    path.write_bytes(forward.SerializeToString())
    return {"forward": str(path), "trainable": trainable, "frozen": frozen, "out": str(out), "what": what}


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
    """Zero values for a graph's parameters: the gradient builder needs them as initializers; the step graph it
    makes takes them as inputs, so the values never matter."""

    def __init__(self, manifest: Manifest, names):
        specs = manifest.param_specs()
        super().__init__({n: np.zeros(specs[n].shape, np.float32) for n in names})

