"""Models shipped with edgeblock, each already cut into blocks with an output head per block."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from coordinator.model.block_model import BlockModel, ContrastiveHead, Residual


def _conv(cin: int, cout: int, pool: bool) -> nn.Module:
    layers = [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def _gap_head(channels: int, num_classes: int) -> nn.Module:
    """ProFL's small output module: global average pooling + linear."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


def _any_boundary_head(num_classes: int):
    """A head for any layer output: GAP + linear after a feature map, linear after a vector."""
    def make(shape: tuple[int, ...]) -> nn.Module:
        return _gap_head(shape[0], num_classes) if len(shape) == 3 else nn.Linear(shape[0], num_classes)
    return make


def fmnist_cnn(num_classes: int = 10, seed: int = 0) -> BlockModel:
    """About 0.43 M parameters, 5 layers in 4 blocks, for 1x28x28 input."""
    torch.manual_seed(seed)
    blocks = [
        [_conv(1, 32, pool=True)],                              # 32x14x14
        [_conv(32, 64, pool=False), _conv(64, 64, pool=True)],  # 64x7x7
        [_conv(64, 128, pool=True)],                            # 128x3x3
        [nn.Sequential(nn.Flatten(), nn.Linear(128 * 3 * 3, 256), nn.ReLU())],
    ]
    heads = [_gap_head(32, num_classes), _gap_head(64, num_classes), _gap_head(128, num_classes),
             nn.Linear(256, num_classes)]
    return BlockModel("fmnist_cnn", (1, 28, 28), num_classes, blocks, heads, _any_boundary_head(num_classes))


def vgg_cifar(num_classes: int = 10, seed: int = 0) -> BlockModel:
    """VGG-style CNN for 3x32x32 input: about 9.2 M parameters, 10 layers in 5 blocks."""
    torch.manual_seed(seed)
    blocks = [
        [_conv(3, 64, False), _conv(64, 64, True)],                               # 64x16x16
        [_conv(64, 128, False), _conv(128, 128, True)],                           # 128x8x8
        [_conv(128, 256, False), _conv(256, 256, True)],                          # 256x4x4
        [_conv(256, 512, False), _conv(512, 512, False), _conv(512, 512, True)],  # 512x2x2
        [nn.Sequential(nn.Flatten(), nn.Linear(512 * 2 * 2, 1024), nn.ReLU())],
    ]
    heads = [_gap_head(64, num_classes), _gap_head(128, num_classes), _gap_head(256, num_classes),
             _gap_head(512, num_classes), nn.Linear(1024, num_classes)]
    return BlockModel("vgg_cifar", (3, 32, 32), num_classes, blocks, heads, _any_boundary_head(num_classes))


def _res(channels: int) -> nn.Module:
    return Residual(nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1)))


def resnet_small(num_classes: int = 10, seed: int = 0) -> BlockModel:
    """Residual CNN for 1x28x28: residual layers are skippable (depth dropout)."""
    torch.manual_seed(seed)
    blocks = [
        [_conv(1, 32, pool=True)],                                               # 32x14x14
        [_res(32), _res(32)],
        [nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU()), _res(64)],  # 64x7x7
        [_res(64), _res(64)],
    ]
    heads = [_gap_head(32, num_classes), _gap_head(32, num_classes), _gap_head(64, num_classes),
             _gap_head(64, num_classes)]
    return BlockModel("resnet_small", (1, 28, 28), num_classes, blocks, heads, _any_boundary_head(num_classes))


def _bn_res(channels: int) -> nn.Module:
    return Residual(nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                                  nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels)))


def _bn_conv(cin: int, cout: int, stride: int = 1, pool: bool = False) -> nn.Module:
    layers = [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else []))


def fmnist_ssl(num_classes: int = 10, seed: int = 0) -> BlockModel:
    """Self-supervised (SimCLR) residual CNN for 1x28x28 with BatchNorm: 6 layers in 3 blocks, a contrastive
    projection head after every layer; four of its layers are residual, which depth dropout may skip. Learns
    without labels; num_classes is what its representation is probed on (coordinator/model/probe.py). (Without
    BatchNorm, three epochs of SimCLR left its probe below the untrained model's: 73 % against 77 %.)"""
    torch.manual_seed(seed)
    blocks = [
        [_bn_conv(1, 32, pool=True), _bn_res(32)],               # 32x14x14
        [_bn_res(32), _bn_conv(32, 64, stride=2)],                # 64x7x7
        [_bn_res(64), _bn_res(64)],
    ]
    heads = [ContrastiveHead((32, 14, 14)), ContrastiveHead((64, 7, 7)), ContrastiveHead((64, 7, 7))]
    return BlockModel("fmnist_ssl", (1, 28, 28), num_classes, blocks, heads, ContrastiveHead,
                      objective="contrastive")


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, relu6: bool = True) -> list:
    """Convolution without bias, BatchNorm, and (unless it is a linear bottleneck) ReLU6."""
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU6()] if relu6 else layers


def _inverted_residual(cin: int, cout: int, stride: int, expand: int) -> nn.Module:
    """MobileNetV2's layer: 1x1 expand (unless expand is 1), 3x3 depthwise, 1x1 linear projection;
    x + body(x) where the shape is kept (a skippable Residual), the body alone where it changes."""
    hidden = cin * expand
    body = _conv_bn(cin, hidden, 1) if expand != 1 else []
    body = nn.Sequential(*body, *_conv_bn(hidden, hidden, 3, stride, groups=hidden),
                         *_conv_bn(hidden, cout, 1, relu6=False))
    return Residual(body, relu=False) if stride == 1 and cin == cout else body


# MobileNetV2's stages (expansion t, output channels c, layers n, first stride s), with the strides of the
# stem and the 24-channel stage at 1 and 2 for 32x32 input (ImageNet's 2 and 2 would leave 1x1 maps).
MOBILENET_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                       (6, 160, 3, 2), (6, 320, 1, 1))


def mobilenet_v2(num_classes: int = 10, seed: int = 0) -> BlockModel:
    """MobileNetV2 for 3x32x32 input: about 2.2 M parameters, 19 layers in 7 blocks, BatchNorm throughout.

    A layer is one inverted residual (the stem and the final 1x1 convolution are layers of their
    own); a block is one stage (the stem joins the first, the 1x1 convolution the last), each with
    a GAP + linear head. Inverted residuals that keep their shape are skippable.
    """
    torch.manual_seed(seed)
    stem = nn.Sequential(*_conv_bn(3, 32, 3))                        # 32x32x32
    blocks, cin = [], 32
    for t, c, n, s in MOBILENET_V2_STAGES:
        blocks.append([_inverted_residual(cin if i == 0 else c, c, s if i == 0 else 1, t) for i in range(n)])
        cin = c
    blocks[0].insert(0, stem)                                         # 16x32x32
    blocks[-1].append(nn.Sequential(*_conv_bn(cin, 1280, 1)))         # 1280x2x2
    channels = [c for _, c, _, _ in MOBILENET_V2_STAGES[:-1]] + [1280]
    heads = [_gap_head(c, num_classes) for c in channels]
    return BlockModel("mobilenet_v2", (3, 32, 32), num_classes, blocks, heads, _any_boundary_head(num_classes))


def _basic_block(cin: int, cout: int, stride: int) -> nn.Module:
    """ResNet's basic block: two 3x3 convolutions with BatchNorm, a 1x1 projection shortcut where the shape
    changes (that one is not skippable)."""
    body = nn.Sequential(*_conv_bn(cin, cout, 3, stride, relu6=False), nn.ReLU(), *_conv_bn(cout, cout, 3, relu6=False))
    shortcut = None if stride == 1 and cin == cout else nn.Sequential(*_conv_bn(cin, cout, 1, stride, relu6=False))
    return Residual(body, shortcut=shortcut)


def _resnet_cifar(name: str, depths: tuple[int, ...], num_classes: int, seed: int) -> BlockModel:
    """ResNet for 3x32x32 input in its CIFAR form (a 3x3 stem, no max pooling), the widths of ResNet-18 and -34
    (64, 128, 256, 512): a layer is the stem or one basic block, a block is one stage (the stem joins the first),
    each with a GAP + linear head; BatchNorm throughout."""
    torch.manual_seed(seed)
    stem = nn.Sequential(*_conv_bn(3, 64, 3, relu6=False), nn.ReLU())      # 64x32x32
    blocks, cin = [], 64
    for i, (c, n) in enumerate(zip((64, 128, 256, 512), depths)):          # 64x32x32 .. 512x4x4
        blocks.append([_basic_block(cin, c, 1 if i == 0 else 2)] + [_basic_block(c, c, 1) for _ in range(n - 1)])
        cin = c
    blocks[0].insert(0, stem)
    heads = [_gap_head(c, num_classes) for c in (64, 128, 256, 512)]
    return BlockModel(name, (3, 32, 32), num_classes, blocks, heads, _any_boundary_head(num_classes))


def resnet18_cifar(num_classes: int = 10, seed: int = 0) -> BlockModel:
    """ResNet-18 for 3x32x32: about 11.2 M parameters, 9 layers (the stem and 8 basic blocks) in 4 blocks."""
    return _resnet_cifar("resnet18_cifar", (2, 2, 2, 2), num_classes, seed)


def resnet34_cifar(num_classes: int = 10, seed: int = 0) -> BlockModel:
    """ResNet-34 for 3x32x32: about 21.3 M parameters, 17 layers (the stem and 16 basic blocks) in 4 blocks.

    A model where the memory wall is real: training it whole at batch 64 needs over a gigabyte in the device
    runtime, more than any board in profiles/ below 2 GB gives a job, while one of its layers trains in a
    quarter of that (its first stage's layers hold the largest activations; tools/bench_memory_wall.py)."""
    return _resnet_cifar("resnet34_cifar", (3, 4, 6, 3), num_classes, seed)


class _PatchEmbedding(nn.Module):
    """An image to tokens: non-overlapping patches, each projected to `dim`, plus a learned position per token."""

    def __init__(self, channels: int, size: int, patch: int, dim: int):
        super().__init__()
        self.project = nn.Conv2d(channels, dim, patch, stride=patch)
        self.position = nn.Parameter(torch.randn(1, (size // patch) ** 2, dim) * 0.02)

    def forward(self, x):
        return self.project(x).flatten(2).transpose(1, 2) + self.position       # (N, tokens, dim)


class _TransformerLayer(nn.Module):
    """A pre-norm transformer encoder layer: x + attention(norm(x)), then + MLP(norm(.)); shape-keeping."""

    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attention = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        x = x + self.out((attention @ v).transpose(1, 2).reshape(n, t, d))
        return x + self.mlp(self.norm2(x))


class _TokenHead(nn.Module):
    """Mean over the tokens, then a linear classifier: a head for any layer of a transformer."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm, self.classify = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.classify(self.norm(x.mean(1)))


def vit_cifar(num_classes: int = 10, seed: int = 0) -> BlockModel:
    """A small vision transformer for 3x32x32 (ViT-S widths: 384, 6 heads, MLP 1536; 4x4 patches, 64 tokens):
    about 21.4 M parameters, 13 layers (the patch embedding and 12 encoder layers) in 4 blocks, a token-mean
    head after every layer. Its layers are alike, as federated layer-wise learning's models are: a layer's
    activations are a twelfth of the model's, where ResNet's first stage holds half of them."""
    torch.manual_seed(seed)
    dim = 384
    layers = [_PatchEmbedding(3, 32, 4, dim)] + [_TransformerLayer(dim, 6, 4 * dim) for _ in range(12)]
    blocks = [layers[:4], layers[4:7], layers[7:10], layers[10:]]
    heads = [_TokenHead(dim, num_classes) for _ in blocks]
    return BlockModel("vit_cifar", (3, 32, 32), num_classes, blocks, heads, lambda shape: _TokenHead(shape[-1], num_classes))


def _bottleneck(channels: int, width: int) -> nn.Module:
    """A FedIN intermediate layer: x -> relu(x + conv(relu(conv(x)))), `width` channels inside; it keeps its
    input's shape, so a family member may leave it out."""
    return Residual(nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, channels, 3, padding=1)))


def _family(name: str, input_shape: tuple[int, ...], extractor: nn.Module, channels: int,
            members: dict[str, tuple[int, int]], classifier: Callable[[], nn.Module],
            num_classes: int) -> BlockModel:
    """A FedIN family: one shared extractor, per member `depth` intermediate layers `width` channels wide inside,
    one shared classifier. Each member block carries a head of the classifier's shape (a BlockModel has a head per
    block); only the last block's is the family's classifier."""
    blocks = [[extractor]] + [[_bottleneck(channels, width) for _ in range(depth)] for depth, width in members.values()]
    heads = [classifier() for _ in blocks]
    return BlockModel(name, input_shape, num_classes, blocks, heads,
                      members={m: b + 1 for b, m in enumerate(members)})


# FedIN's Fashion-MNIST family: (depth, inner width) of each member's intermediate layers, smallest first
FMNIST_FAMILY = {"small": (1, 32), "medium": (2, 96), "large": (3, 192)}
CIFAR_FAMILY = {"small": (1, 32), "medium": (2, 96), "large": (4, 192)}


def fmnist_fedin(num_classes: int = 10, seed: int = 0) -> BlockModel:
    """A model family for 1x28x28 (FedIN): extractor conv 1->32 + pool (s_in: 32x14x14), members of 1, 2 and 3
    residual layers 32, 96 and 192 channels wide inside, classifier conv 32->64 stride 2 + linear.

    The classifier flattens rather than pools: with global average pooling every member learnt about three times
    slower (one epoch of 1,500 images: 42-44 % against 77 % test accuracy, torch, centralised)."""
    torch.manual_seed(seed)

    def classifier() -> nn.Module:
        return nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(64 * 7 * 7, num_classes))
    return _family("fmnist_fedin", (1, 28, 28), _conv(1, 32, pool=True), 32, FMNIST_FAMILY, classifier, num_classes)


def cifar_fedin(num_classes: int = 10, seed: int = 0) -> BlockModel:
    """A model family for 3x32x32 (FedIN): extractor conv 3->32 + pool (s_in: 32x16x16), members of 1, 2 and 4
    residual layers, classifier two stride-2 convolutions + linear."""
    torch.manual_seed(seed)

    def classifier() -> nn.Module:
        return nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
                             nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(128 * 4 * 4, num_classes))
    return _family("cifar_fedin", (3, 32, 32), _conv(3, 32, pool=True), 32, CIFAR_FAMILY, classifier, num_classes)


ZOO: dict[str, Callable[..., BlockModel]] = {
    "fmnist_cnn": fmnist_cnn,
    "vgg_cifar": vgg_cifar,
    "resnet_small": resnet_small,
    "fmnist_ssl": fmnist_ssl,
    "mobilenet_v2": mobilenet_v2,
    "resnet18_cifar": resnet18_cifar,
    "resnet34_cifar": resnet34_cifar,
    "vit_cifar": vit_cifar,
    "fmnist_fedin": fmnist_fedin,
    "cifar_fedin": cifar_fedin,
}


def build(name: str, **kwargs) -> BlockModel:
    if name not in ZOO:
        raise ValueError(f"unknown model '{name}'; the zoo has: {', '.join(sorted(ZOO))}")
    return ZOO[name](**kwargs)
