"""The block manifest: how a model is cut into layers, blocks and heads, and what each costs.

A *layer* is the unit of training: one ONNX graph with its parameters. A *block* is a
contiguous run of layers, the unit of progressive training. A *head* (output module)
maps the activation after some layer to class logits. Graph files hold structure only
(parameter initializers carry shapes, not values), so their hashes never change while
weights travel separately as safetensors.

Value naming contract inside every graph: layer i reads `act_{i}` and writes `act_{i+1}`;
a head attached after layer i reads `act_{i+1}` and writes `logits`. Composing any span
of layers is therefore concatenation.

A manifest travels to devices as a blob, so loading one checks every field's type and range
before anything uses it: a malformed manifest is a ManifestError naming the field.

`frozen_prefix` (written only when not 0, so older manifests load unchanged) is the number
of leading layers that never train, because the export found an op no gradient passes
through in the last of them; they run forward only.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge_runtime.errors import ManifestError
from edge_runtime.logs import printable

FORMAT = "edgeblock-manifest/1"
CLASSIFY, CONTRASTIVE = "classify", "contrastive"
OBJECTIVES = (CLASSIFY, CONTRASTIVE)
DTYPE_BYTES = {"float32": 4, "float16": 2, "int64": 8}
MAX_INT = 2 ** 63 - 1   # indices, byte counts and dimensions: what an int64 (numpy, onnxruntime) holds


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
class MemberSpec:
    """One architecture of a model family (FedIN): the shared extractor, these intermediate layers, the shared
    classifier. Every other member's layers are skipped as identity, so each layer maps s_in's shape to itself."""
    name: str
    layers: tuple[int, ...]


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
    # Leading layers that never train: no gradient flows back through layer frozen_prefix - 1 (the export
    # found an op there that a device cannot differentiate). They still run forward, as every part's cached
    # prefix and in evaluation. Heads attached inside it never train either. frozen_reason says why, for logs.
    frozen_prefix: int = 0
    frozen_reason: str = ""
    # A model family (FedIN): the layers before the first member's are the shared extractor, the final head is
    # the shared classifier, and each member is a run of intermediate layers, smallest member first. Empty for
    # one architecture; written only when not empty, so other manifests load unchanged.
    members: tuple[MemberSpec, ...] = ()
    # What the heads compute: CLASSIFY (class logits, trained on the devices' labels) or CONTRASTIVE (a projection
    # head's N x N similarity logits of a batch of two views per image, trained by NT-Xent without labels; the
    # coordinator judges the layers by a linear probe). Written only when not CLASSIFY.
    objective: str = CLASSIFY

    @property
    def contrastive(self) -> bool:
        return self.objective == CONTRASTIVE

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
        """Layers after which a part may end: a head exists there, after the frozen prefix."""
        return sorted({h.attach_after_layer for h in self.heads if h.attach_after_layer >= self.frozen_prefix})

    def stage_starts(self) -> list[int]:
        """Layers at which a run of trainable layers may start: the first layer after the frozen prefix, and
        the layer after each cut point."""
        return [self.frozen_prefix] + [c + 1 for c in self.cut_points() if c + 1 < len(self.layers)]

    def trainable_layers(self, layers=None) -> tuple[int, ...]:
        """Those of `layers` (default: every layer) that may train: the ones after the frozen prefix."""
        chosen = range(len(self.layers)) if layers is None else layers
        return tuple(i for i in chosen if i >= self.frozen_prefix)

    def head_can_train(self, head: int) -> bool:
        """A head attached inside the frozen prefix never trains: no part that trains a layer can end there."""
        return self.heads[head].attach_after_layer >= self.frozen_prefix

    def frozen_prefix_text(self) -> str:
        """The frozen prefix in words, for messages: 'layers 0-1 (blocks.0.0 .. blocks.1.0)'; why is frozen_reason."""
        p = self.frozen_prefix
        if p == 0:
            return "no layer"
        if p == 1:
            return f"layer 0 ({self.layers[0].name})"
        return f"layers 0-{p - 1} ({self.layers[0].name} .. {self.layers[p - 1].name})"

    def graph_path(self, ref: GraphRef) -> Path:
        return self.file(ref.file)

    def file(self, relative: str) -> Path:
        """A file of the model's directory (graphs, weights, part graphs)."""
        if self.root is None:
            raise ManifestError("manifest was not loaded from a directory; its files cannot be found")
        return self.root / relative

    # -- model families (FedIN) ------------------------------------------------------
    def member(self, name: str) -> MemberSpec:
        for m in self.members:
            if m.name == name:
                return m
        raise ManifestError(f"{self.model} has no member {name!r}"
                            + (f"; its members: {', '.join(m.name for m in self.members)}" if self.members
                               else ": it is not a model family"))

    @property
    def extractor_layers(self) -> tuple[int, ...]:
        """The family's shared front: every layer before the first member layer (empty for one architecture)."""
        if not self.members:
            return ()
        return tuple(range(min(i for m in self.members for i in m.layers)))

    def member_skip(self, name: str) -> tuple[int, ...]:
        """The layers a member does not have: every other member's, replaced by identity in its graphs."""
        own = set(self.member(name).layers)
        return tuple(sorted(i for m in self.members if m.name != name for i in m.layers if i not in own))

    def member_of(self, skip) -> MemberSpec | None:
        """The member whose graphs skip exactly `skip`, or None."""
        for m in self.members:
            if tuple(sorted(skip)) == self.member_skip(m.name):
                return m
        return None

    # -- (de)serialisation ---------------------------------------------------------
    def to_json(self) -> str:
        d = asdict(self)
        d.pop("root")
        if not self.frozen_prefix:   # a model that trains every layer keeps the manifest it always had
            d.pop("frozen_prefix")
            d.pop("frozen_reason")
        if not self.members:
            d.pop("members")
        if self.objective == CLASSIFY:
            d.pop("objective")
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
        """Check every field and the whole's consistency; ManifestError names what is wrong."""
        try:
            return _parse(raw, root)
        except ManifestError as exc:
            raise ManifestError(f"{source}: {exc}") from None


# -- reading a manifest: every field checked before it is used ---------------------------

_REQUIRED = object()
_KIND_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", bool: "a boolean"}


def _malformed(where: str, problem: str) -> ManifestError:
    return ManifestError(f"malformed field '{where}': {problem}")


def _get(raw: dict, key: str, where: str, kind: type, default=_REQUIRED):
    """raw[key], of type `kind` (a bool is no integer); `default` when absent, else an error."""
    path = f"{where}.{key}" if where else key
    if key not in raw:
        if default is _REQUIRED:
            raise _malformed(path, "missing")
        return default
    value = raw[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise _malformed(path, f"must be {_KIND_NAMES[kind]}, not {type(value).__name__}")
    return value


def _object(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise _malformed(where, f"must be an object, not {type(value).__name__}")
    return value


def _count(value, where: str, lo: int = 0) -> int:
    """An integer in [lo, MAX_INT]."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise _malformed(where, f"must be an integer, not {type(value).__name__}")
    if not lo <= value <= MAX_INT:
        shown = value if abs(value) <= MAX_INT else "an integer beyond int64"
        raise _malformed(where, f"must be an integer from {lo} to {MAX_INT}, not {shown}")
    return value


def _int(raw: dict, key: str, where: str, lo: int = 0) -> int:
    return _count(_get(raw, key, where, int), f"{where}.{key}" if where else key, lo)


def _ints(raw: dict, key: str, where: str) -> tuple[int, ...]:
    """A list of non-negative integers: a shape, a block's layers."""
    path = f"{where}.{key}" if where else key
    return tuple(_count(v, f"{path}[{i}]") for i, v in enumerate(_get(raw, key, where, list)))


def _texts(raw: dict, key: str, where: str) -> tuple[str, ...]:
    values = _get(raw, key, where, list, default=[])
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise _malformed(f"{where}.{key}[{i}]", f"must be a string, not {type(v).__name__}")
    return tuple(values)


def _params(raw: dict, where: str) -> tuple[ParamSpec, ...]:
    out = []
    for i, p in enumerate(_get(raw, "params", where, list)):
        pw = f"{where}.params[{i}]"
        _object(p, pw)
        spec = ParamSpec(_get(p, "name", pw, str), _ints(p, "shape", pw), _get(p, "dtype", pw, str, "float32"),
                         _get(p, "kind", pw, str, "param"))
        if spec.dtype not in DTYPE_BYTES:
            raise ManifestError(f"parameter {spec.name} has unsupported dtype {spec.dtype!r}")
        if spec.kind not in ("param", "stat"):
            raise ManifestError(f"tensor {spec.name} has unknown kind {spec.kind!r} (param or stat)")
        out.append(spec)
    return tuple(out)


def _graph(raw, where: str) -> GraphRef:
    _object(raw, where)
    ref = GraphRef(_get(raw, "file", where, str), _get(raw, "sha256", where, str))
    if len(ref.sha256) != 64 or ".." in Path(ref.file).parts or Path(ref.file).is_absolute():
        raise ManifestError(f"bad graph reference {ref}")
    return ref


def _layer(raw, where: str) -> LayerSpec:
    _object(raw, where)
    return LayerSpec(index=_int(raw, "index", where), name=_get(raw, "name", where, str),
                     block=_int(raw, "block", where), graph=_graph(_get(raw, "graph", where, dict), f"{where}.graph"),
                     input_shape=_ints(raw, "input_shape", where), output_shape=_ints(raw, "output_shape", where),
                     params=_params(raw, where),
                     activation_bytes_per_sample=_int(raw, "activation_bytes_per_sample", where),
                     ops=_texts(raw, "ops", where), skippable=_get(raw, "skippable", where, bool, False))


def _head(raw, where: str) -> HeadSpec:
    _object(raw, where)
    return HeadSpec(index=_int(raw, "index", where), name=_get(raw, "name", where, str),
                    attach_after_layer=_int(raw, "attach_after_layer", where),
                    graph=_graph(_get(raw, "graph", where, dict), f"{where}.graph"), params=_params(raw, where),
                    activation_bytes_per_sample=_int(raw, "activation_bytes_per_sample", where),
                    ops=_texts(raw, "ops", where))


def _block(raw, where: str) -> BlockSpec:
    _object(raw, where)
    return BlockSpec(_int(raw, "index", where), _ints(raw, "layers", where), _int(raw, "head", where))


def _member(raw, where: str) -> MemberSpec:
    _object(raw, where)
    return MemberSpec(_get(raw, "name", where, str), _ints(raw, "layers", where))


def _parse(raw: dict, root: Path | None) -> Manifest:
    if not isinstance(raw, dict):
        raise ManifestError(f"a manifest must be a JSON object, not {type(raw).__name__}")
    if raw.get("format") != FORMAT:
        shown = repr(raw.get("format"))
        raise ManifestError(f"format is {printable(shown, 60)}, expected {FORMAT!r}")
    layers = tuple(_layer(l, f"layers[{i}]") for i, l in enumerate(_get(raw, "layers", "", list)))
    heads = tuple(_head(h, f"heads[{i}]") for i, h in enumerate(_get(raw, "heads", "", list)))
    blocks = tuple(_block(b, f"blocks[{i}]") for i, b in enumerate(_get(raw, "blocks", "", list)))
    weights = raw.get("weights")
    m = Manifest(model=_get(raw, "model", "", str), input_shape=_ints(raw, "input_shape", ""),
                 num_classes=_int(raw, "num_classes", "", lo=1), opset=_int(raw, "opset", "", lo=1), layers=layers,
                 heads=heads, blocks=blocks, weights=None if weights is None else _graph(weights, "weights"),
                 root=root, frozen_prefix=_count(_get(raw, "frozen_prefix", "", int, 0), "frozen_prefix"),
                 frozen_reason=_get(raw, "frozen_reason", "", str, ""),
                 members=tuple(_member(x, f"members[{i}]") for i, x in enumerate(_get(raw, "members", "", list, []))),
                 objective=_get(raw, "objective", "", str, CLASSIFY))
    validate(m)
    return m


def validate(m: Manifest) -> None:
    """Check internal consistency: indices, contiguity, shapes chaining, unique names."""
    if m.objective not in OBJECTIVES:
        raise ManifestError(f"objective is {printable(repr(m.objective), 40)}; known: {', '.join(OBJECTIVES)}")
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
        if any(b != a + 1 for a, b in zip(blk.layers, blk.layers[1:])):   # (no range: the ends may be huge)
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
    if not 0 <= m.frozen_prefix < len(m.layers):
        raise ManifestError(f"frozen_prefix {m.frozen_prefix} must leave at least one of the {len(m.layers)} "
                            f"layers to train (0 to {len(m.layers) - 1})")
    _validate_members(m)
    names = Counter(m.all_param_names())
    if any(n > 1 for n in names.values()):
        dup = sorted(name for name, n in names.items() if n > 1)
        raise ManifestError(f"parameter names are not unique: {dup[:5]}")


def _validate_members(m: Manifest) -> None:
    """A family's members: named once, each a contiguous run of skippable layers, together every layer after the
    shared extractor, the extractor trainable; so any member's graph is the extractor, its layers, the classifier."""
    if not m.members:
        return
    names = [x.name for x in m.members]
    if len(set(names)) != len(names) or not all(names):
        raise ManifestError(f"member names must be unique and not empty: {names}")
    covered = sorted(i for x in m.members for i in x.layers)
    first = covered[0] if covered else 0
    if not covered or covered != list(range(first, len(m.layers))):
        raise ManifestError(f"the members' layers {covered} must cover every layer after the extractor exactly once")
    if first == 0 or m.frozen_prefix >= first:
        raise ManifestError("a model family needs a trainable shared extractor before its members' layers")
    for x in m.members:
        if not x.layers or list(x.layers) != list(range(x.layers[0], x.layers[-1] + 1)):
            raise ManifestError(f"member {x.name}: layers {x.layers} are not a contiguous run")
        fixed = [i for i in x.layers if not m.layers[i].skippable]
        if fixed:
            raise ManifestError(f"member {x.name}: layer(s) {fixed} are not skippable (shape-keeping residual "
                                f"layers): another member could not leave them out")
