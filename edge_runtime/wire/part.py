"""What one device trains: a span of layers ending in a head, some of which train.

A task names its part and a job trains it; both sides speak of it in these terms, so it
lives with the wire protocol. It knows the manifest's layers and heads, never a graph.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

from edge_runtime.errors import ManifestError
from edge_runtime.store import digest_of


@dataclass(frozen=True)
class TrainablePart:
    """What one device trains: a span of layers (first..last) ending in a head, of which some layers train.

    Layers before `span[0]` are the frozen prefix (read from the activation cache); layers
    in the span that are not trainable are frozen but still run forward and pass gradients back.
    Layers in `skip` (depth dropout) are frozen span layers the manifest marks skippable that
    the training graph replaces by identity: they do not run, and their weights are not needed.
    No part trains a layer of the model's own frozen prefix (Manifest.frozen_prefix: no gradient
    reaches it) or a head attached inside it; those layers may only run, before or in the span.
    """
    span: tuple[int, ...]
    trainable_layers: tuple[int, ...]
    head: int
    train_head: bool = True
    skip: tuple[int, ...] = ()

    @classmethod
    def block(cls, manifest, block: int) -> "TrainablePart":
        """The block and its head, less the layers of the model's frozen prefix (they stay in the cached prefix)."""
        return cls.blocks(manifest, block, block)

    @classmethod
    def blocks(cls, manifest, first: int, last: int) -> "TrainablePart":
        """Blocks first..last ending in block last's head; layers of the frozen prefix stay in the cached prefix."""
        layers = manifest.trainable_layers(i for b in range(first, last + 1) for i in manifest.blocks[b].layers)
        if not layers:
            what = f"block {first} lies" if first == last else f"blocks {first}-{last} lie"
            raise _in_frozen_prefix(manifest, what, f"train blocks from block "
                                    f"{manifest.layers[manifest.frozen_prefix].block} on")
        return cls(span=layers, trainable_layers=layers, head=manifest.blocks[last].head)

    @classmethod
    def member(cls, manifest, name: str) -> "TrainablePart":
        """A family member (FedIN) trained whole: the shared extractor (less any frozen prefix), the member's own
        layers and the shared classifier; every other member's layers are skipped as identity."""
        own = manifest.member(name).layers
        return cls.for_layers(manifest, manifest.trainable_layers(manifest.extractor_layers) + tuple(own),
                              skip=manifest.member_skip(name))

    @classmethod
    def for_layers(cls, manifest, layers, head: int | None = None, train_head: bool = True,
                   skip=()) -> "TrainablePart":
        """Train an arbitrary set of layers (selective fine-tuning), ending in `head`.

        The span runs from the first trainable layer to the layer `head` attaches after
        (default: the model's final head, after the last layer). Layers before the span are
        the frozen prefix (activation cache); span layers not in `layers` are frozen but run
        forward and pass gradients back. `train_head=False` keeps the head's weights fixed.
        `skip` names frozen skippable span layers to replace by identity (depth dropout).
        """
        n = len(manifest.layers)
        chosen = list(_index_tuple(layers, "layers"))
        if not chosen:
            raise ManifestError("an empty layer set: name at least one layer to train "
                                f"({manifest.model} has layers 0..{n - 1})")
        outside = [i for i in chosen if not 0 <= i < n]
        if outside:
            raise ManifestError(f"layer(s) {outside} out of range: {manifest.model} has layers 0..{n - 1}")
        if head is None:
            head = manifest.final_head.index
        if not _is_integer(head) or not 0 <= int(head) < len(manifest.heads):
            raise ManifestError(f"head {head!r} does not exist: {manifest.model} has heads 0..{len(manifest.heads) - 1}")
        head = int(head)
        end = manifest.heads[head].attach_after_layer
        after = [i for i in chosen if i > end]
        if after:
            raise ManifestError(f"head {head} ({manifest.heads[head].name}) attaches after layer {end}, before "
                                f"trainable layer(s) {after}: a part ends at its head, so choose a head after "
                                f"layer {chosen[-1]} (heads attach after layers {manifest.cut_points()})")
        part = cls(span=tuple(range(chosen[0], end + 1)), trainable_layers=tuple(chosen), head=head,
                   train_head=bool(train_head), skip=_index_tuple(skip, "skip"))
        part.validate(manifest)
        return part

    def to_dict(self) -> dict:
        """The JSON form a job spec carries."""
        return {"span": list(self.span), "trainable_layers": list(self.trainable_layers), "head": self.head,
                "train_head": self.train_head, "skip": list(self.skip)}

    @classmethod
    def from_dict(cls, raw) -> "TrainablePart":
        """The part a task or a job spec names; ManifestError says which field is missing or malformed."""
        if not isinstance(raw, dict):
            raise ManifestError(f"a part must be an object, not {type(raw).__name__}")
        known = {"span", "trainable_layers", "head", "train_head", "skip"}
        unknown = sorted(set(raw) - known)
        missing = sorted({"span", "trainable_layers", "head"} - set(raw))
        if unknown or missing:
            raise ManifestError(f"a part has unknown field(s) {unknown} or lacks {missing}")
        if not _is_integer(raw["head"]) or not isinstance(raw.get("train_head", True), bool):
            raise ManifestError(f"a part's head must be an integer and train_head a bool, not {raw['head']!r}, "
                                f"{raw.get('train_head')!r}")
        span = raw["span"]
        if isinstance(span, (str, bytes)) or not hasattr(span, "__iter__") \
                or not all(_is_integer(i) for i in span):
            raise ManifestError(f"a part's span must be a list of layer indices, not {span!r}")
        return cls(span=tuple(int(i) for i in span), trainable_layers=_index_tuple(raw["trainable_layers"],
                   "trainable_layers"), head=int(raw["head"]), train_head=raw.get("train_head", True),
                   skip=_index_tuple(raw.get("skip", ()), "skip"))

    def required_names(self, manifest) -> list[str]:
        """Every weight training this part needs: the frozen prefix, the span (less skipped layers) and the head."""
        return manifest.param_names([i for i in range(self.span[-1] + 1) if i not in self.skip], [self.head])

    def validate(self, manifest) -> None:
        span = list(self.span)
        if not span or span != list(range(span[0], span[-1] + 1)) or span[-1] >= len(manifest.layers) or span[0] < 0:
            raise ManifestError(f"span {self.span} is not a contiguous run of this model's "
                                f"{len(manifest.layers)} layers")
        if not set(self.trainable_layers) <= set(span):
            raise ManifestError(f"trainable layers {self.trainable_layers} lie outside span {self.span}")
        if not self.trainable_layers and not self.train_head:
            raise ManifestError("nothing to train: no trainable layers and a frozen head")
        if not 0 <= self.head < len(manifest.heads) or manifest.heads[self.head].attach_after_layer != span[-1]:
            raise ManifestError(f"head {self.head} does not attach after layer {span[-1]}")
        frozen = [i for i in self.trainable_layers if i < manifest.frozen_prefix]
        if frozen:
            names = ", ".join(manifest.layers[i].name for i in frozen)
            raise _in_frozen_prefix(manifest, f"cannot train layer(s) {frozen} ({names}): they lie",
                                    f"train layers from {manifest.frozen_prefix} on")
        if self.train_head and not manifest.head_can_train(self.head):
            raise _in_frozen_prefix(manifest, f"cannot train head {self.head} ({manifest.heads[self.head].name}): it "
                                    f"attaches", f"end the part at a head after a later layer (heads attach after "
                                    f"layers {manifest.cut_points()})")
        for i in self.skip:
            if not _is_integer(i):
                raise ManifestError(f"skip must hold integer layer indices, got {i!r}")
            if i not in span:
                raise ManifestError(f"cannot skip layer {i}: it lies outside span {self.span} "
                                    f"(only frozen layers of the span can be skipped)")
            if i in self.trainable_layers:
                raise ManifestError(f"cannot skip layer {i} ({manifest.layers[i].name}): it is a trainable layer; "
                                    f"only frozen layers of the span can be skipped")
            if not manifest.layers[i].skippable:
                raise ManifestError(f"cannot skip layer {i} ({manifest.layers[i].name}): the manifest does not mark "
                                    f"it skippable (skippable layers: "
                                    f"{[l.index for l in manifest.layers if l.skippable]})")

    def trainable_names(self, manifest) -> list[str]:
        """The parameters that get a gradient and an optimizer step."""
        return manifest.param_names(sorted(self.trainable_layers), [self.head] if self.train_head else [], kind="param")

    def update_names(self, manifest) -> list[str]:
        """What an update of this part holds: its trainable parameters and the running statistics of the
        layers they belong to (training moves them too)."""
        heads = [self.head] if self.train_head else []
        return manifest.param_names(sorted(self.trainable_layers), heads)

    def frozen_names(self, manifest) -> list[str]:
        """Parameters of the training graph that stay fixed (skipped layers have none in it)."""
        frozen = [i for i in self.span if i not in self.trainable_layers and i not in self.skip]
        return manifest.param_names(frozen, [] if self.train_head else [self.head], kind="param")

    def key(self, manifest) -> str:
        """Names this part's graphs (the coordinator builds them, the device finds them by it): the graphs of its
        layers and head, which layers train, whether the head trains, which are skipped."""
        graphs = [manifest.layers[i].graph.sha256 for i in self.span] + [manifest.heads[self.head].graph.sha256]
        return digest_of(*graphs, "train:" + ",".join(map(str, self.trainable_layers)),
                         f"head:{self.train_head}", "skip:" + ",".join(map(str, self.skip)))[:32]

    def all_names(self, manifest) -> list[str]:
        """Every parameter of the training graph: the span less skipped layers, and the head."""
        return manifest.param_names([i for i in self.span if i not in self.skip], [self.head])


def _in_frozen_prefix(manifest, what: str, instead: str) -> ManifestError:
    """`what` (it lies / they lie) inside the model's frozen prefix, what to do instead, and why it is frozen."""
    why = f" (frozen because {manifest.frozen_reason})" if manifest.frozen_reason else ""
    return ManifestError(f"{what} in the model's frozen prefix, {manifest.frozen_prefix_text()}, which never trains; "
                         f"{instead}{why}")


def _index_tuple(values, what: str) -> tuple:
    """Layer indices as a sorted tuple without repeats (so equal sets are equal parts, with one key)."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ManifestError(f"{what} must be a collection of layer indices, got {values!r}")
    raw = list(values)
    bad = [i for i in raw if not _is_integer(i)]
    if bad:
        raise ManifestError(f"{what} must hold integer layer indices, got {bad}")
    return tuple(sorted({int(i) for i in raw}))



def _is_integer(value) -> bool:
    """An int, or a numpy integer (not a bool, a float or a string)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
