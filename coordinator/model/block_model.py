"""A model as the product sees it: an ordered list of blocks of layers, plus one head per block.

Bring your own model by handing your `torch.nn.Module` pieces to `BlockModel`: each block
is a list of layer modules (the unit that can be trained or frozen), and each block gets
a small output head mapping its output to class logits (the last block's head is the
real classifier). Parameter names are the BlockModel's state_dict names
(`blocks.{b}.{l}.…`, `heads.{b}.…`), which are also the names on the wire.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn


class Residual(nn.Module):
    """y = relu(x + body(x)), or x + body(x) with relu=False (MobileNetV2's linear bottleneck).

    Shape-preserving, so depth dropout may skip it as identity.
    """

    def __init__(self, body: nn.Module, relu: bool = True):
        super().__init__()
        self.body = body
        self.relu = relu

    def forward(self, x):
        y = x + self.body(x)
        return torch.relu(y) if self.relu else y


class BlockModel(nn.Module):
    """Blocks of layers with a head per block.

    boundary_head, if given, maps a layer's output shape to an output head; the model then
    also carries a head after every layer that does not end a block (`boundary_heads.{i}`),
    so the profiler may cut the model at any layer boundary, not only at the given blocks.
    """

    def __init__(self, name: str, input_shape: Sequence[int], num_classes: int,
                 blocks: Sequence[Sequence[nn.Module]], heads: Sequence[nn.Module],
                 boundary_head: Callable[[tuple[int, ...]], nn.Module] | None = None):
        super().__init__()
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

    def features(self, x, upto_block: int | None = None):
        last = len(self.blocks) - 1 if upto_block is None else upto_block
        for block in self.blocks[: last + 1]:
            for layer in block:
                x = layer(x)
        return x

    def forward(self, x, upto_block: int | None = None):
        """Logits of the sub-model blocks[0..upto_block] -> heads[upto_block] (default: the whole model)."""
        last = len(self.blocks) - 1 if upto_block is None else upto_block
        return self.heads[last](self.features(x, last))
