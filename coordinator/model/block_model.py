"""A model as the product sees it: an ordered list of blocks of layers, plus one head per block.

Bring your own model by handing your `torch.nn.Module` pieces to `BlockModel`: each block
is a list of layer modules (the unit that can be trained or frozen), `blocks=[[conv1],
[nn.Sequential(conv2, relu), fc]]`, and a module given where a list belongs is refused
(iterated, a Sequential would silently become one layer per child). Each block gets
a small output head mapping its output to class logits (the last block's head is the
real classifier). Parameter names are the BlockModel's state_dict names
(`blocks.{b}.{l}.…`, `heads.{b}.…`), which are also the names on the wire.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from edge_runtime.wire.manifest import CLASSIFY, OBJECTIVES


class Residual(nn.Module):
    """y = relu(x + body(x)), or x + body(x) with relu=False (MobileNetV2's linear bottleneck).

    Shape-preserving, so depth dropout may skip it as identity. With a `shortcut` (ResNet's projection where the
    body changes the shape), y = relu(shortcut(x) + body(x)), which no one may skip.
    """

    def __init__(self, body: nn.Module, relu: bool = True, shortcut: nn.Module | None = None):
        super().__init__()
        self.body = body
        self.relu = relu
        self.shortcut = shortcut

    def forward(self, x):
        y = (x if self.shortcut is None else self.shortcut(x)) + self.body(x)
        return torch.relu(y) if self.relu else y


class ContrastiveHead(nn.Module):
    """SimCLR's projection head with NT-Xent's logits: features -> (GAP) -> MLP (with BatchNorm, as SimCLR's: without
    it the representation learned here fell below the untrained one's) -> unit vectors z, then the N x N
    cosine similarities z z^T / temperature with each row's own entry pushed out of reach.

    Given a batch of two views per image (rows i and its pair, edge_runtime/train/augment.py's positive_pairs),
    cross-entropy of these logits against each row's pair is NT-Xent exactly, so a device trains it with the
    step graph every head has (labels: the pairs); a board needs no loss of its own. The similarities have the
    batch on both axes: the exported head works at any batch.
    """

    def __init__(self, in_shape: Sequence[int], hidden: int = 128, out: int = 64, temperature: float = 0.5):
        super().__init__()
        pool = [nn.AdaptiveAvgPool2d(1), nn.Flatten()] if len(in_shape) == 3 else []
        self.project = nn.Sequential(*pool, nn.Linear(int(in_shape[0]), hidden, bias=False), nn.BatchNorm1d(hidden),
                                     nn.ReLU(), nn.Linear(hidden, out))
        self.temperature = float(temperature)

    def forward(self, x):
        z = self.project(x)
        z = z / torch.sqrt((z * z).sum(dim=1, keepdim=True) + 1e-12)
        sim = z @ z.t() / self.temperature
        # exp(-1e4) is 0 in float32: a row's own view never counts as a negative
        return sim - 1e4 * torch.eye(sim.shape[0], dtype=sim.dtype)


class BlockModel(nn.Module):
    """Blocks of layers with a head per block.

    boundary_head, if given, maps a layer's output shape to an output head; the model then
    also carries a head after every layer that does not end a block (`boundary_heads.{i}`),
    so the profiler may cut the model at any layer boundary, not only at the given blocks.

    members, if given, makes the model a family (FedIN): {member name: block index}, smallest
    first. The blocks before the first member's are the shared extractor, the last block's
    head is the shared classifier, and each member is its block of shape-keeping Residual
    layers; a member's model skips every other member's block (`forward(x, member=name)`).

    objective "contrastive": the heads are ContrastiveHeads and the model learns without labels
    (edge_runtime.wire.manifest.CONTRASTIVE); num_classes is then the classes of the labeled
    data its representation is probed on.
    """

    def __init__(self, name: str, input_shape: Sequence[int], num_classes: int,
                 blocks: Sequence[Sequence[nn.Module]], heads: Sequence[nn.Module],
                 boundary_head: Callable[[tuple[int, ...]], nn.Module] | None = None,
                 members: dict[str, int] | None = None, objective: str = CLASSIFY):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"{name}: objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}")
        self.objective = objective
        _check_structure(name, blocks, heads)
        if len(blocks) != len(heads):
            raise ValueError(f"{name}: {len(blocks)} blocks but {len(heads)} heads; give one head per block")
        if any(len(b) == 0 for b in blocks):
            raise ValueError(f"{name}: every block needs at least one layer")
        self.name = name
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = int(num_classes)
        self.blocks = nn.ModuleList(nn.ModuleList(b) for b in blocks)
        self.heads = nn.ModuleList(heads)
        self.boundary_heads = nn.ModuleDict()
        self.members = dict(members or {})
        if self.members and sorted(self.members.values()) != list(range(len(blocks) - len(self.members), len(blocks))):
            raise ValueError(f"{name}: members {self.members} must name the last {len(self.members)} blocks, one each")
        if boundary_head is not None:
            block_ends = {sum(len(b) for b in blocks[: k + 1]) - 1 for k in range(len(blocks))}
            for i, shape in enumerate(self.layer_output_shapes()):
                if i not in block_ends:
                    self.boundary_heads[str(i)] = boundary_head(shape)

    def layer_output_shapes(self) -> list[tuple[int, ...]]:
        """Per-sample output shape of every layer (a dummy forward pass, no gradients)."""
        shapes, x = [], torch.zeros(1, *self.input_shape)
        with torch.no_grad():
            for _, layer, _ in self.layers():
                x = layer(x)
                shapes.append(tuple(x.shape[1:]))
        return shapes

    def layers(self) -> list[tuple[str, nn.Module, int]]:
        """(state-dict prefix, module, block index) of every layer, in forward order."""
        return [(f"blocks.{b}.{l}", layer, b)
                for b, block in enumerate(self.blocks) for l, layer in enumerate(block)]

    def features(self, x, upto_block: int | None = None, member: str | None = None):
        last = len(self.blocks) - 1 if upto_block is None else upto_block
        others = {b for m, b in self.members.items() if m != member} if member is not None else set()
        for b, block in enumerate(self.blocks[: last + 1]):
            if b in others:
                continue
            for layer in block:
                x = layer(x)
        return x

    def forward(self, x, upto_block: int | None = None, member: str | None = None):
        """Logits of the sub-model blocks[0..upto_block] -> heads[upto_block] (default: the whole model); of a
        family, `member` runs the extractor, that member's block and the classifier."""
        if member is not None:
            if member not in self.members:
                raise ValueError(f"{self.name} has no member {member!r}; members: {', '.join(self.members)}")
            return self.heads[-1](self.features(x, None, member))
        last = len(self.blocks) - 1 if upto_block is None else upto_block
        return self.heads[last](self.features(x, last))


_FORM = "blocks=[[layer, ...], [layer, ...]], heads=[head, head, ...]"


def _check_structure(name: str, blocks, heads) -> None:
    """Refuse the easy misreadings of the nested block list, which would otherwise cut the model elsewhere.

    A module given where a list of layers belongs would be iterated as one (nn.ModuleList of a
    Sequential is its children), silently making each child a layer of its own.
    """
    if isinstance(blocks, nn.Module) or isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence):
        raise ValueError(f"{name}: blocks is a {type(blocks).__name__}; give a list of blocks, each a list of "
                         f"layers: {_FORM}")
    for b, block in enumerate(blocks):
        kind = type(block).__name__
        if isinstance(block, nn.Module):
            shown = f"nn.{kind}" if type(block).__module__.startswith("torch.nn") else kind
            raise ValueError(f"{name}: blocks[{b}] is a {kind}, not a list of layers: wrap it in a list, "
                             f"[{shown}(...)], to make it one layer, or list its layers, [layer, ...] "
                             f"({_FORM})")
        if isinstance(block, (str, bytes)) or not isinstance(block, Sequence):
            raise ValueError(f"{name}: blocks[{b}] is a {kind}; a block is a list of layers: {_FORM}")
        for i, layer in enumerate(block):
            if not isinstance(layer, nn.Module):
                raise ValueError(f"{name}: blocks[{b}][{i}] is a {type(layer).__name__}, not a torch module; a layer "
                                 f"is one module (nn.Sequential(a, b) makes one of several): {_FORM}")
    a_list = isinstance(heads, nn.ModuleList) or isinstance(heads, Sequence) and not isinstance(heads, (str, bytes))
    if not a_list or isinstance(heads, nn.Module) and not isinstance(heads, nn.ModuleList):
        raise ValueError(f"{name}: heads is a {type(heads).__name__}; give a list with one head module per block, "
                         f"heads=[head, head, ...] (an nn.Sequential is one head)")
    for j, head in enumerate(heads):
        if not isinstance(head, nn.Module):
            raise ValueError(f"{name}: heads[{j}] is a {type(head).__name__}, not a torch module; a head is one "
                             f"module: nn.Sequential(a, b) makes one of several")
