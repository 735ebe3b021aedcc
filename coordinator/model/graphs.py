"""Layer graphs: load them hash-checked, check them against the manifest, compose spans.

Composition is concatenation thanks to the manifest's naming contract (layer i reads
`act_{i}`, writes `act_{i+1}`; a head writes `logits`). Parameter values are filled in
from a weights mapping at composition time, so graph files stay weight-free.

A device never composes: it runs graphs the coordinator composed for it (forward_graph,
and the step graphs of coordinator/model/part_graphs.py), whose parameters are inputs,
so it needs onnxruntime and nothing of the onnx package.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edge_runtime.errors import IntegrityError, ManifestError
from edge_runtime.store import read_verified
from edge_runtime.wire.manifest import GraphRef, Manifest, ParamSpec


def act_name(i: int) -> str:
    return f"act_{i}"


LOGITS = "logits"


def layer_scope(i: int) -> str:
    """The prefix of every node and private value of layer i's graph, so that graphs compose."""
    return f"L{i}"


def head_scope(j: int) -> str:
    return f"H{j}"


_SCOPE = re.compile(r"(L|H)(\d+)/(.*)", re.S)


def scope_of(node_name: str) -> tuple[str, int, str] | None:
    """("layer" or "head", its index, the node's name inside it) of a node of a layer or head graph (also of the
    gradient nodes built from it); None for a node of no layer or head, e.g. the loss's."""
    m = _SCOPE.fullmatch(node_name)
    if m is None:
        return None
    return ("layer" if m.group(1) == "L" else "head"), int(m.group(2)), m.group(3)


class GraphLibrary:
    """Hash-checked, manifest-checked layer and head graphs of one manifest, loaded once."""

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self._cache: dict[str, onnx.ModelProto] = {}

    def layer(self, i: int) -> onnx.ModelProto:
        spec = self.manifest.layers[i]
        return self._load(spec.graph, spec.params, f"layer {i} ({spec.name})", act_name(i), act_name(i + 1))

    def head(self, h: int) -> onnx.ModelProto:
        spec = self.manifest.heads[h]
        return self._load(spec.graph, spec.params, f"head {h} ({spec.name})",
                          act_name(spec.attach_after_layer + 1), LOGITS)

    def _load(self, ref: GraphRef, params: Sequence[ParamSpec], what: str, inp: str, out: str) -> onnx.ModelProto:
        if ref.sha256 in self._cache:
            return self._cache[ref.sha256]
        data = read_verified(self.manifest.graph_path(ref), ref.sha256, what)
        try:
            model = onnx.load_from_string(data)
        except Exception as exc:
            raise IntegrityError(f"{what}: graph file is not a valid ONNX model ({exc})") from None
        check_graph_matches(model, params, what, inp, out)
        self._cache[ref.sha256] = model
        return model


def check_graph_matches(model: onnx.ModelProto, params: Sequence[ParamSpec], what: str, inp: str, out: str) -> None:
    """Raise ManifestError unless the graph has the manifest's I/O names and parameter shapes."""
    g = model.graph
    inputs = [i.name for i in g.input if i.name not in {t.name for t in g.initializer}]
    if inputs != [inp] or [o.name for o in g.output] != [out]:
        raise ManifestError(f"{what}: graph reads {inputs} and writes {[o.name for o in g.output]}, "
                            f"manifest says {inp} -> {out}")
    inits = {t.name: tuple(t.dims) for t in g.initializer}
    for p in params:
        if p.name not in inits:
            raise ManifestError(f"{what}: manifest parameter {p.name} is not in the graph")
        if inits[p.name] != tuple(p.shape):
            raise ManifestError(f"{what}: parameter {p.name} has shape {inits[p.name]} in the graph, "
                                f"{tuple(p.shape)} in the manifest")


def strip_param_values(model: onnx.ModelProto, param_names) -> onnx.ModelProto:
    """Drop the values of parameter initializers (keep name, dtype, dims) so the file is structure only."""
    names = set(param_names)
    for t in model.graph.initializer:
        if t.name in names:
            t.ClearField("raw_data")
            t.ClearField("float_data")
    return model


def compose(lib: GraphLibrary, layers: Sequence[int], head: int | None, weights: Mapping[str, np.ndarray] | None,
            skip: Sequence[int] = ()) -> onnx.ModelProto:
    """One forward model over a contiguous span of layers, optionally ending in a head.

    Every parameter of the span gets its value from `weights`, or, with weights None, becomes
    a graph input after the activation input (fed by name at run time). Layers in `skip` are
    replaced by identity (depth dropout; only layers the manifest marks skippable).
    """
    m = lib.manifest
    layers = list(layers)
    if not layers:
        raise ManifestError("a forward model needs at least one layer")
    if layers != list(range(layers[0], layers[-1] + 1)):
        raise ManifestError(f"layers {layers} are not a contiguous span")
    if head is not None and m.heads[head].attach_after_layer != layers[-1]:
        raise ManifestError(f"head {head} attaches after layer {m.heads[head].attach_after_layer}, "
                            f"not after layer {layers[-1]}")
    parts = []  # in forward order, so the nodes are topologically sorted (training artifacts need that)
    nodes, inits, value_info, param_inputs = [], [], [], []
    params = set(m.param_names([i for i in layers if i not in skip], [head] if head is not None else []))
    for i in layers:
        if i in skip:
            if not m.layers[i].skippable:
                raise ManifestError(f"layer {i} ({m.layers[i].name}) cannot be skipped")
            parts.append(helper.make_node("Identity", [act_name(i)], [act_name(i + 1)], name=f"skip_{i}"))
            continue
        parts.append(lib.layer(i))
    if head is not None:
        parts.append(lib.head(head))
    first_graph = lib.layer(layers[0]).graph
    last_graph = (lib.head(head) if head is not None else lib.layer(layers[-1])).graph
    opsets = {}
    for part in parts:
        if isinstance(part, onnx.NodeProto):
            nodes.append(part)
            continue
        nodes.extend(part.graph.node)
        value_info.extend(part.graph.value_info)
        for t in part.graph.initializer:
            if weights is None and t.name in params:
                param_inputs.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
            elif weights is not None and t.name in weights:
                inits.append(numpy_helper.from_array(np.asarray(weights[t.name], dtype=np.float32), t.name))
            elif t.raw_data or t.float_data or t.int64_data or t.int32_data:
                inits.append(t)  # a constant of the graph, not a parameter
            else:
                raise IntegrityError(f"no weight given for parameter {t.name}")
        for op in part.opset_import:
            opsets[op.domain] = max(opsets.get(op.domain, 0), op.version)
    graph = helper.make_graph(nodes, f"{m.model}_L{layers[0]}-{layers[-1]}" + (f"_H{head}" if head is not None else ""),
                              [first_graph.input[0], *param_inputs], [last_graph.output[0]], initializer=inits,
                              value_info=value_info)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    model.ir_version = lib.layer(layers[0]).ir_version
    return model


def forward_graph(lib: GraphLibrary, layers: Sequence[int], head: int | None, skip: Sequence[int] = ()) -> onnx.ModelProto:
    """An inference graph of a span (optionally ending in a head) whose parameters are graph inputs.

    What a device runs for its frozen prefix and what evaluation runs: weights are fed by
    name, so one graph serves every round's weights. BatchNorm runs in inference mode
    (running statistics, no batch statistics), as it must for a frozen layer.
    """
    model = compose(lib, layers, head, None, skip=skip)
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            del node.output[1:]
            kept = [a for a in node.attribute if a.name != "training_mode"]
            node.ClearField("attribute")
            node.attribute.extend(kept)
    return model


def evaluate(manifest: Manifest, weights, inputs: np.ndarray, labels: np.ndarray, upto_block: int | None = None,
             batch_size: int = 500, threads: int = 0, skip: Sequence[int] = (), upto_layer: int | None = None) -> dict:
    """Accuracy and mean loss of blocks[0..upto_block] -> its head (default: the whole model), or of layers
    [0..upto_layer] -> the head after that layer (a part that ends inside a block, as a layer-wise stage's does),
    without the layers in `skip` (a family member's model skips the other members' layers)."""
    from edge_runtime.train.ort_backend import ForwardSession
    if upto_layer is not None:
        last_layer, head = upto_layer, manifest.head_for_boundary(upto_layer)
    else:
        b = len(manifest.blocks) - 1 if upto_block is None else upto_block
        last_layer, head = manifest.blocks[b].layers[-1], manifest.blocks[b].head
    graph = forward_graph(GraphLibrary(manifest), range(last_layer + 1), head,
                          skip=tuple(i for i in skip if i <= last_layer))
    session = ForwardSession(graph.SerializeToString(), threads=threads)
    params = {n: np.ascontiguousarray(weights[n], dtype=np.float32) for n in session.param_names}
    correct, loss_sum = 0, 0.0
    for start in range(0, len(labels), batch_size):
        logits = session.run(inputs[start:start + batch_size], params).astype(np.float64)
        y = labels[start:start + batch_size]
        z = logits - logits.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        loss_sum += float(-logp[np.arange(len(y)), y].sum())
        correct += int((logits.argmax(axis=1) == y).sum())
    return {"accuracy": correct / len(labels), "loss": loss_sum / len(labels), "samples": int(len(labels))}
