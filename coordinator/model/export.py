"""Export a BlockModel once: one ONNX graph per layer and per head, the block manifest, initial weights.

The recipe is the one whose graphs onnxruntime-training's gradient builder differentiates
correctly: the legacy exporter (dynamo=False), opset 17, TrainingMode.TRAINING, no constant
folding (folding silently turns weights into constants), a dynamic batch axis, on a deep
copy of each module (the export runs a forward pass). After export every parameter must
be a graph initializer, or the export is refused.

BatchNorm's running mean and variance travel like parameters: each is a ParamSpec of kind
"stat" named by its state-dict name, its value is stripped from the graph and written to
the initial weights, and training updates it through the step graph (never by a gradient).
`num_batches_tracked` stays behind: it only matters to a BatchNorm whose momentum is None
(a cumulative average), which is refused.

An op a device cannot differentiate (GroupNorm exports as InstanceNormalization) is
named by the user's module (`blocks.1.0.1 (GroupNorm)`), not only by its ONNX node. In
the first layers it is accepted: those layers become the manifest's frozen prefix, which
runs forward only (onnxruntime has every forward op) and never trains.
"""
from __future__ import annotations

import copy
import io
import logging
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import shape_inference
from torch import nn

from coordinator.model.block_model import BlockModel, Residual
from coordinator.model.graphs import LOGITS, act_name, head_scope, layer_scope, strip_param_values
from edge_runtime.errors import ManifestError, UnsupportedOpError
from edge_runtime.store import atomic_write_bytes, sha256_bytes
from edge_runtime.wire import weights as wcodec
from edge_runtime.wire.manifest import (
    CLASSIFY,
    CONTRASTIVE,
    BlockSpec,
    GraphRef,
    HeadSpec,
    LayerSpec,
    Manifest,
    MemberSpec,
    ParamSpec,
)

OPSET = 17
log = logging.getLogger(__name__)


class ExportError(ManifestError):
    """The model cannot be exported in a form the device can train."""


def _running_stat_names(module: nn.Module, scope: str) -> list[str]:
    """The module's BatchNorm running statistics (running_mean, running_var) by state-dict name.

    Raises ExportError for a BatchNorm the device could not keep in step with torch: one whose
    momentum is None (its update averages over num_batches_tracked, which is not exported), or
    one without running statistics (it would normalize with batch statistics at inference too).
    """
    names = []
    for sub_name, sub in module.named_modules():
        if not isinstance(sub, nn.modules.batchnorm._BatchNorm):
            continue
        where = f"{scope}: BatchNorm {sub_name or type(module).__name__}"
        if not sub.track_running_stats or sub.running_mean is None:
            raise ExportError(f"{where} keeps no running statistics (track_running_stats=False); "
                              f"devices evaluate with running statistics, so give it track_running_stats=True")
        if sub.momentum is None:
            raise ExportError(f"{where} has momentum None (a cumulative average over num_batches_tracked, "
                              f"which is not exported); give it a momentum, e.g. the default 0.1")
        names += [f"{sub_name}.{stat}" if sub_name else stat for stat in ("running_mean", "running_var")]
    return names


def _export_module(module: nn.Module, in_shape, in_name: str, out_name: str, prefix: str,
                   scope: str, square: bool = False) -> tuple[onnx.ModelProto, list[ParamSpec], tuple[int, ...]]:
    """One layer or head as its own graph; `square`: the output is N x N (a contrastive head's similarities)."""
    stat_names = _running_stat_names(module, scope)
    module = copy.deepcopy(module).train()
    dummy = torch.zeros(2, *in_shape)
    with torch.no_grad():
        out_shape = tuple(module(dummy).shape[1:])
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (dummy,), buf, dynamo=False, opset_version=OPSET,
                          training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False,
                          input_names=[in_name], output_names=[out_name], export_params=True,
                          keep_initializers_as_inputs=False,
                          dynamic_axes={in_name: {0: "N"}, out_name: {0: "N", 1: "N"} if square else {0: "N"}})
    model = onnx.load_from_string(buf.getvalue())
    local_params = dict(module.named_parameters())
    buffers = dict(module.named_buffers(remove_duplicate=False))
    local_stats = {n: buffers[n] for n in stat_names}
    init_names = {t.name for t in model.graph.initializer}
    missing = [n for n in local_params if n not in init_names]
    if missing:
        raise ExportError(f"{scope}: parameter(s) {[prefix + '.' + n for n in missing]} did not survive export "
                          f"as graph initializers (folded or renamed); they would never train")
    missing = [n for n in local_stats if n not in init_names]
    if missing:
        raise ExportError(f"{scope}: running statistic(s) {[prefix + '.' + n for n in missing]} did not survive "
                          f"export as graph initializers (folded, shared or renamed); they would never be updated")
    _rename(model, {n: f"{prefix}.{n}" for n in [*local_params, *local_stats]}, keep={in_name, out_name},
            scope=scope)
    params = [ParamSpec(f"{prefix}.{n}", tuple(p.shape)) for n, p in local_params.items()]
    params += [ParamSpec(f"{prefix}.{n}", tuple(b.shape), kind="stat") for n, b in local_stats.items()]
    return model, params, out_shape


def _rename(model: onnx.ModelProto, param_map: dict[str, str], keep: set[str], scope: str) -> None:
    """Give parameters their global names and every other value a scope prefix, so graphs compose."""
    def new(name: str) -> str:
        if not name or name in keep:
            return name
        return param_map.get(name, f"{scope}/{name}")
    g = model.graph
    for t in g.initializer:
        t.name = new(t.name)
    for node in g.node:
        node.name = f"{scope}/{node.name}"
        node.input[:] = [new(n) for n in node.input]
        node.output[:] = [new(n) for n in node.output]
    for vi in g.value_info:
        vi.name = new(vi.name)


def _activation_bytes_per_sample(model: onnx.ModelProto) -> int:
    """Bytes of every tensor one forward pass produces for one sample (shape inference at batch 1)."""
    m = copy.deepcopy(model)
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    inferred = shape_inference.infer_shapes(m)
    total = 0
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if not dims or any(not d.HasField("dim_value") for d in dims):
            continue
        elem = 8 if vi.type.tensor_type.elem_type == onnx.TensorProto.INT64 else 4
        total += int(np.prod([d.dim_value for d in dims])) * elem
    return total


def _write_graph(model: onnx.ModelProto, param_names, graphs_dir: Path) -> GraphRef:
    data = strip_param_values(model, param_names).SerializeToString()
    sha = sha256_bytes(data)
    path = graphs_dir / f"{sha}.onnx"
    if not path.exists():
        atomic_write_bytes(path, data)
    return GraphRef(f"graphs/{sha}.onnx", sha)


def export(model: BlockModel, out_dir: Path, check_trainable: bool = True) -> Manifest:
    """Write `out_dir/manifest.json`, `out_dir/graphs/*.onnx`, `out_dir/weights/*.safetensors`.

    With check_trainable, builds the step graphs of the model and of every head
    (coordinator/model/part_graphs.py, kept in out_dir/parts/) so that an operator a device
    cannot train is reported now, by module, not on a board. Layers a gradient cannot flow
    back through are accepted at the start of the model only: they and every layer before
    them become the manifest's frozen prefix, which never trains. Such a layer anywhere
    else, or in a head that can train, refuses the export (UnsupportedOpError).
    """
    out_dir = Path(out_dir)
    graphs_dir = out_dir / "graphs"
    graphs_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.named_parameters()}

    layers, shape = [], model.input_shape
    for i, (prefix, module, block) in enumerate(model.layers()):
        proto, params, out_shape = _export_module(module, shape, act_name(i), act_name(i + 1), prefix,
                                                  layer_scope(i))
        act_bytes = _activation_bytes_per_sample(proto)
        ops = tuple(sorted({n.op_type for n in proto.graph.node}))
        ref = _write_graph(proto, [p.name for p in params], graphs_dir)
        layers.append(LayerSpec(index=i, name=prefix, block=block, graph=ref, input_shape=tuple(shape),
                                output_shape=out_shape, params=tuple(params), activation_bytes_per_sample=act_bytes,
                                ops=ops, skippable=isinstance(module, Residual) and tuple(out_shape) == tuple(shape)))
        shape = out_shape

    contrastive = getattr(model, "objective", CLASSIFY) == CONTRASTIVE

    def export_head(module: nn.Module, index: int, name: str, after_layer: int) -> HeadSpec:
        proto, params, out_shape = _export_module(module, layers[after_layer].output_shape,
                                                  act_name(after_layer + 1), LOGITS, name, head_scope(index),
                                                  square=contrastive)
        expected = (2,) if contrastive else (model.num_classes,)   # the dummy batch is 2: N x N similarities
        if out_shape != expected:
            raise ExportError(f"head {name} outputs {out_shape} per example, expected {expected}"
                              + (" (a contrastive head's similarities to every row of the batch)" if contrastive
                                 else ""))
        return HeadSpec(index=index, name=name, attach_after_layer=after_layer,
                        graph=_write_graph(proto, [p.name for p in params], graphs_dir), params=tuple(params),
                        activation_bytes_per_sample=_activation_bytes_per_sample(proto),
                        ops=tuple(sorted({n.op_type for n in proto.graph.node})))

    heads, blocks, first = [], [], 0
    for b, block in enumerate(model.blocks):
        last = first + len(block) - 1
        heads.append(export_head(model.heads[b], b, f"heads.{b}", last))
        blocks.append(BlockSpec(index=b, layers=tuple(range(first, last + 1)), head=b))
        first = last + 1
    for key, module in model.boundary_heads.items():
        heads.append(export_head(module, len(heads), f"boundary_heads.{key}", int(key)))

    # the running statistics' initial values, from the model itself (each export ran on a copy)
    buffers = dict(model.named_buffers(remove_duplicate=False))
    state.update({p.name: buffers[p.name].detach().cpu().numpy().astype(np.float32)
                  for spec in [*layers, *heads] for p in spec.params if p.kind == "stat"})
    weights_data = wcodec.encode(state)
    wsha = sha256_bytes(weights_data)
    atomic_write_bytes(out_dir / "weights" / f"{wsha}.safetensors", weights_data)
    members = tuple(MemberSpec(name, blocks[b].layers) for name, b in getattr(model, "members", {}).items())
    manifest = Manifest(model=model.name, input_shape=model.input_shape, num_classes=model.num_classes,
                        opset=OPSET, layers=tuple(layers), heads=tuple(heads), blocks=tuple(blocks),
                        weights=GraphRef(f"weights/{wsha}.safetensors", wsha), root=out_dir, members=members,
                        objective=getattr(model, "objective", CLASSIFY))
    manifest.save(out_dir / "manifest.json")
    manifest = Manifest.load(out_dir / "manifest.json")
    if check_trainable:
        try:
            frozen, cause = check_differentiable(manifest, model)
        except BaseException:
            (out_dir / "manifest.json").unlink()   # an export that cannot train is not an export
            raise
        if frozen:
            manifest = replace(manifest, frozen_prefix=frozen, frozen_reason=cause.summary)
            log.warning("%s: its frozen prefix, %s, will never train: %s", model.name,
                        manifest.frozen_prefix_text(), cause.summary)
            manifest.save(out_dir / "manifest.json")
            manifest = Manifest.load(out_dir / "manifest.json")
    return manifest


def check_differentiable(manifest: Manifest,
                         model: BlockModel | None = None) -> tuple[int, UnsupportedOpError | None]:
    """Build the step graphs of every layer and head that can train; return the frozen prefix and its cause.

    A layer holding an op a device cannot differentiate stops every gradient at it, so it and
    the layers before it can never train: the rest of the model is checked again from the
    layer after it, until it builds. The frozen prefix is the number of such leading layers
    (0, None for a model that trains throughout). Heads attached after a layer that can train
    are checked too. Raises UnsupportedOpError, in the terms of `model` when given (else of the
    manifest), when the last layer or a head that can train cannot be differentiated.
    """
    from coordinator.model.part_graphs import ensure_part_graphs, locate
    from edge_runtime.wire.part import TrainablePart
    n = len(manifest.layers)
    first, cause = 0, None
    while True:
        try:
            ensure_part_graphs(manifest, [TrainablePart.for_layers(manifest, range(first, n))])
            break
        except UnsupportedOpError as exc:
            exc = locate(exc, manifest, model)
            if exc.layer is None or exc.layer < first:
                raise exc from None
            if exc.layer == n - 1:
                raise exc.located("", note=f"layer {manifest.layers[-1].name} is the model's last layer, so "
                                  f"freezing every layer up to it would leave nothing to train") from None
            first, cause = exc.layer + 1, exc
    heads = [TrainablePart.for_layers(manifest, [h.attach_after_layer], head=h.index) for h in manifest.heads
             if h.index != manifest.final_head.index and h.attach_after_layer >= first]
    try:
        ensure_part_graphs(manifest, heads)
    except UnsupportedOpError as exc:
        raise locate(exc, manifest, model) from None
    return first, cause


def load_weights(manifest: Manifest) -> dict[str, np.ndarray]:
    """The manifest's initial weights, hash-checked."""
    from edge_runtime.store import read_verified
    ref = manifest.weights
    return wcodec.decode(read_verified(manifest.graph_path(ref), ref.sha256, "initial weights"))
