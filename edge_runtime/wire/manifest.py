"""The block manifest: how a model is cut into layers, blocks and heads, and what each costs.

A *layer* is the unit of training: one ONNX graph with its parameters. A *block* is a
contiguous run of layers, the unit of progressive training. A *head* (output module)
maps the activation after some layer to class logits. Graph files hold structure only
(parameter initializers carry shapes, not values), so their hashes never change while
weights travel separately as safetensors.

Value naming contract inside every graph: layer i reads `act_{i}` and writes `act_{i+1}`;
a head attached after layer i reads `act_{i+1}` and writes `logits`. Composing any span
of layers is therefore concatenation.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge_runtime.errors import ManifestError

FORMAT = "edgeblock-manifest/1"
DTYPE_BYTES = {"float32": 4, "float16": 2, "int64": 8}


@dataclass(frozen=True)
class ParamSpec:
    """A tensor of a layer that travels with its weights: a parameter, or a running statistic
    (kind "stat": BatchNorm's mean and variance, updated by training but never by a gradient)."""
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    kind: str = "param"     # "param" | "stat"

    @property
    def nbytes(self) -> int:
        n = DTYPE_BYTES[self.dtype]
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class GraphRef:
    file: str      # relative to the manifest's directory
    sha256: str


class _HasParams:
    params: tuple[ParamSpec, ...]

    @property
    def param_bytes(self) -> int:
        return sum(p.nbytes for p in self.params)


@dataclass(frozen=True)
class LayerSpec(_HasParams):
    index: int
    name: str
    block: int
    graph: GraphRef
    input_shape: tuple[int, ...]   # per sample, no batch axis
    output_shape: tuple[int, ...]
    params: tuple[ParamSpec, ...]
    activation_bytes_per_sample: int  # every intermediate tensor of one forward pass
    ops: tuple[str, ...] = ()
    skippable: bool = False           # output shape == input shape and the layer is residual


@dataclass(frozen=True)
class HeadSpec(_HasParams):
    index: int
    name: str
    attach_after_layer: int
    graph: GraphRef
    params: tuple[ParamSpec, ...]
    activation_bytes_per_sample: int
    ops: tuple[str, ...] = ()


@dataclass(frozen=True)
class BlockSpec:
    index: int
    layers: tuple[int, ...]
    head: int


@dataclass(frozen=True)
class Manifest:
    model: str
    input_shape: tuple[int, ...]
    num_classes: int
    opset: int
    layers: tuple[LayerSpec, ...]
    heads: tuple[HeadSpec, ...]
    blocks: tuple[BlockSpec, ...]
    weights: GraphRef | None = None  # initial weights (safetensors)
    format: str = FORMAT
    root: Path | None = field(default=None, compare=False)

    # -- queries -----------------------------------------------------------------
    @property
    def final_head(self) -> HeadSpec:
        return self.heads[self.blocks[-1].head]

    def block_of_layer(self, layer: int) -> BlockSpec:
        return self.blocks[self.layers[layer].block]

    def block_input_shape(self, block: int) -> tuple[int, ...]:
        return self.layers[self.blocks[block].layers[0]].input_shape

    def block_output_shape(self, block: int) -> tuple[int, ...]:
        return self.layers[self.blocks[block].layers[-1]].output_shape

    def param_names(self, layers=(), heads=(), kind: str | None = None) -> list[str]:
        """Names of the tensors of these layers and heads: all of them, or only one kind ("param", "stat")."""
        specs = [p for i in layers for p in self.layers[i].params] + [p for h in heads for p in self.heads[h].params]
        return [p.name for p in specs if kind is None or p.kind == kind]

    def all_param_names(self) -> list[str]:
        return self.param_names(range(len(self.layers)), range(len(self.heads)))

    def param_specs(self) -> dict[str, ParamSpec]:
        specs = {p.name: p for layer in self.layers for p in layer.params}
        specs.update({p.name: p for head in self.heads for p in head.params})
        return specs

    def head_for_boundary(self, after_layer: int) -> int:
        """The head after a layer: a block's own head where a block ends there, else a boundary head."""
        for b in self.blocks:
            if b.layers[-1] == after_layer:
                return b.head
        for h in self.heads:
            if h.attach_after_layer == after_layer:
                return h.index
        raise ManifestError(f"no head is attached after layer {after_layer}: a part may only end where a head is "
                            f"(export the model with a boundary_head factory to cut at any layer)")

    def cut_points(self) -> list[int]:
        """Layers after which a part may end (a head exists there)."""
        return sorted({h.attach_after_layer for h in self.heads})

    def graph_path(self, ref: GraphRef) -> Path:
        return self.file(ref.file)

    def file(self, relative: str) -> Path:
        """A file of the model's directory (graphs, weights, part graphs)."""
        if self.root is None:
            raise ManifestError("manifest was not loaded from a directory; its files cannot be found")
        return self.root / relative

    # -- (de)serialisation ---------------------------------------------------------
    def to_json(self) -> str:
        d = asdict(self)
        d.pop("root")
        return json.dumps(d, indent=1)

    def save(self, path: Path) -> None:
        from edge_runtime.store import atomic_write_text
        atomic_write_text(Path(path), self.to_json())

    @classmethod
    def load(cls, path: Path) -> "Manifest":
        from edge_runtime.store import read_json
        path = Path(path)
        raw = read_json(path, ManifestError, "manifest")
        return cls.from_dict(raw, root=path.parent, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, root: Path | None = None, source: str = "manifest") -> "Manifest":
        try:
            return _parse(raw, root)
        except ManifestError as exc:
            raise ManifestError(f"{source}: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"{source}: malformed field ({type(exc).__name__}: {exc})") from None


def _params(raw) -> tuple[ParamSpec, ...]:
    out = []
    for p in raw:
        spec = ParamSpec(str(p["name"]), tuple(int(d) for d in p["shape"]), str(p.get("dtype", "float32")),
                         str(p.get("kind", "param")))
        if spec.dtype not in DTYPE_BYTES:
            raise ManifestError(f"parameter {spec.name} has unsupported dtype {spec.dtype}")
        if spec.kind not in ("param", "stat"):
            raise ManifestError(f"tensor {spec.name} has unknown kind {spec.kind!r} (param or stat)")
        out.append(spec)
    return tuple(out)


def _graph(raw) -> GraphRef:
    ref = GraphRef(str(raw["file"]), str(raw["sha256"]))
    if len(ref.sha256) != 64 or ".." in Path(ref.file).parts or Path(ref.file).is_absolute():
        raise ManifestError(f"bad graph reference {ref}")
    return ref


def _parse(raw: dict, root: Path | None) -> Manifest:
    if raw.get("format") != FORMAT:
        raise ManifestError(f"format is {raw.get('format')!r}, expected {FORMAT!r}")
    layers = tuple(
        LayerSpec(index=int(l["index"]), name=str(l["name"]), block=int(l["block"]), graph=_graph(l["graph"]),
                  input_shape=tuple(l["input_shape"]), output_shape=tuple(l["output_shape"]),
                  params=_params(l["params"]), activation_bytes_per_sample=int(l["activation_bytes_per_sample"]),
                  ops=tuple(l.get("ops", ())), skippable=bool(l.get("skippable", False)))
        for l in raw["layers"])
    heads = tuple(
        HeadSpec(index=int(h["index"]), name=str(h["name"]), attach_after_layer=int(h["attach_after_layer"]),
                 graph=_graph(h["graph"]), params=_params(h["params"]),
                 activation_bytes_per_sample=int(h["activation_bytes_per_sample"]), ops=tuple(h.get("ops", ())))
        for h in raw["heads"])
    blocks = tuple(BlockSpec(int(b["index"]), tuple(int(i) for i in b["layers"]), int(b["head"]))
                   for b in raw["blocks"])
    weights = _graph(raw["weights"]) if raw.get("weights") else None
    m = Manifest(model=str(raw["model"]), input_shape=tuple(raw["input_shape"]), num_classes=int(raw["num_classes"]),
                 opset=int(raw["opset"]), layers=layers, heads=heads, blocks=blocks, weights=weights, root=root)
    validate(m)
    return m


def validate(m: Manifest) -> None:
    """Check internal consistency: indices, contiguity, shapes chaining, unique names."""
    if not m.layers or not m.blocks:
        raise ManifestError("a manifest needs at least one layer and one block")
    for i, layer in enumerate(m.layers):
        if layer.index != i:
            raise ManifestError(f"layer {layer.name} has index {layer.index}, expected {i}")
        if not 0 <= layer.block < len(m.blocks):
            raise ManifestError(f"layer {layer.name} names block {layer.block}, which does not exist")
    if tuple(m.layers[0].input_shape) != tuple(m.input_shape):
        raise ManifestError(f"first layer input {m.layers[0].input_shape} != model input {m.input_shape}")
    for a, b in zip(m.layers, m.layers[1:]):
        if tuple(a.output_shape) != tuple(b.input_shape):
            raise ManifestError(f"layer {a.name} outputs {a.output_shape} but {b.name} expects {b.input_shape}")
    covered = []
    for j, blk in enumerate(m.blocks):
        if blk.index != j or not blk.layers:
            raise ManifestError(f"block {j} is empty or misnumbered")
        if list(blk.layers) != list(range(blk.layers[0], blk.layers[-1] + 1)):
            raise ManifestError(f"block {j} layers {blk.layers} are not contiguous")
        if not 0 <= blk.head < len(m.heads):
            raise ManifestError(f"block {j} names head {blk.head}, which does not exist")
        if m.heads[blk.head].attach_after_layer != blk.layers[-1]:
            raise ManifestError(f"block {j} ends at layer {blk.layers[-1]} but its head attaches after "
                                f"layer {m.heads[blk.head].attach_after_layer}")
        covered.extend(blk.layers)
    if covered != list(range(len(m.layers))):
        raise ManifestError("blocks must cover every layer exactly once, in order")
    for h in m.heads:
        if not 0 <= h.attach_after_layer < len(m.layers):
            raise ManifestError(f"head {h.name} attaches after missing layer {h.attach_after_layer}")
    names = m.all_param_names()
    if len(names) != len(set(names)):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ManifestError(f"parameter names are not unique: {dup[:5]}")
