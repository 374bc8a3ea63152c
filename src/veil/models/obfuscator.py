"""Obfuscator f: the first VGG16-BN blocks, image -> feature map (paper Figure 2a).

VGG16 is five blocks of 3x3 convolutions, each ending in a 2x2 max-pool:
    64 64 | 128 128 | 256 256 256 | 512 512 512 | 512 512 512
The obfuscator takes the first `split` blocks (2 by default: 32x32xC -> 8x8x128), the
classifier the rest. `width` multiplies every channel count.
"""

from __future__ import annotations

import torch
from torch import nn

VGG16_BLOCKS: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def conv_bn_relu(c_in: int, c_out: int, kernel: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def vgg_block(c_in: int, channels: tuple[int, ...], width: float) -> tuple[list[nn.Module], int]:
    layers: list[nn.Module] = []
    for c in channels:
        c_out = scaled(c, width)
        layers += conv_bn_relu(c_in, c_out)
        c_in = c_out
    layers.append(nn.MaxPool2d(2))
    return layers, c_in


class Obfuscator(nn.Sequential):
    """f(image in [0, 1], N x C x H x W) -> feature map N x 128w x H/4 x W/4 (at split 2)."""

    def __init__(self, in_channels: int = 3, width: float = 1.0, split: int = 2, tail: nn.Module | None = None):
        layers: list[nn.Module] = []
        c = in_channels
        for channels in VGG16_BLOCKS[:split]:
            block, c = vgg_block(c, channels, width)
            layers += block
        if tail is not None:  # a defence's layer (e.g. noise): part of f, so every user of the obfuscator gets it
            layers.append(tail)
        super().__init__(*layers)
        self.in_channels, self.width, self.split, self.out_channels = in_channels, width, split, c


def feature_shape(in_channels: int, image_size: int, width: float, split: int) -> tuple[int, int, int]:
    """C x H x W of the obfuscated feature map."""
    return scaled(VGG16_BLOCKS[split - 1][-1], width), image_size >> split, image_size >> split


def fingerprint(obfuscator: nn.Module) -> str:
    """sha256 over the obfuscator's weights and buffers (names, shapes, dtypes and bytes)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(obfuscator.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # reshape: 0-d counters cannot be viewed as bytes
    return h.hexdigest()
