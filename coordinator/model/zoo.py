"""Models shipped with edgeblock, each already cut into blocks with an output head per block."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from coordinator.model.block_model import BlockModel, Residual


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


ZOO: dict[str, Callable[..., BlockModel]] = {
    "fmnist_cnn": fmnist_cnn,
    "vgg_cifar": vgg_cifar,
    "resnet_small": resnet_small,
}


def build(name: str, **kwargs) -> BlockModel:
    if name not in ZOO:
        raise ValueError(f"unknown model '{name}'; the zoo has: {', '.join(sorted(ZOO))}")
    return ZOO[name](**kwargs)
