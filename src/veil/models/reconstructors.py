"""Reconstructors r: feature map -> image in [0, 1]. Exactly the four of the paper's Table 1 at its cut.

Every "conv3-N" is a 3x3 convolution with BatchNorm and ReLU; "conv1-N" is 1x1; "up" is a 2x
nearest-neighbour upsampling; the last layer is followed by a sigmoid. `width` scales the hidden
channels like the obfuscator's. Table 1 is written for split 2 (8x8 maps, two upsamplings), and at
split 2 each network is exactly Table 1's. A cut at split s pools s times, so the networks built for
it upsample s times, always by 2 and always followed by convolutions: each deeper cut repeats the
network's own stage after its first upsampling (see each function), so no split draws a coarser
image than split 2 does. At split 1 (16x16 maps) the first upsampling is left out.

To add a fifth reconstructor, write a function with the same signature and add it to
RECONSTRUCTORS: training may then use it, and `veil attack --attackers NAME` too (attackers()).
Training may also pit f against a pool of them (ReconstructorPool: model.reconstructor = 'simrec,unet').
"""

from __future__ import annotations

import torch
from torch import nn

from veil.models.obfuscator import conv_bn_relu, scaled


def _convs(c_in: int, channels: list[int]) -> tuple[list[nn.Module], int]:
    layers: list[nn.Module] = []
    for c in channels:
        layers += conv_bn_relu(c_in, c)
        c_in = c
    return layers, c_in


class Upsample(nn.Upsample):
    """Nearest-neighbour upsampling that keeps the network's layout. PyTorch returns NCHW for a 1x1 input
    (N x C x 1 x 1 is both layouts, and BatchNorm hands it on with NCHW strides), so a channels-last decoder
    at split 5 ran NCHW after its first upsampling and converted at every convolution and residual sum
    (copies were 30% of ResRec's time there). It has no weights to carry the layout: use_layout sets it."""

    channels_last = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y.contiguous(memory_format=torch.channels_last) if self.channels_last else y


def use_layout(net: nn.Module, memory_format: torch.memory_format) -> nn.Module:
    """net.to(memory_format=memory_format), every Upsample in it told the layout too. Returns net."""
    net.to(memory_format=memory_format)
    for m in net.modules():
        if isinstance(m, Upsample):
            m.channels_last = memory_format == torch.channels_last
    return net


def _up(scale: int = 2) -> nn.Module:
    return Upsample(scale_factor=scale, mode="nearest") if scale > 1 else nn.Identity()


def _first_up(split: int) -> nn.Module:
    """The first upsampling: 2x, or at split 1 (maps already half the image's size) none. An Identity
    keeps its place in the Sequential, so a split-1 network's state_dict keys are those it always had."""
    return _up(2 if split >= 2 else 1)


def simrec(in_channels: int, out_channels: int, width: float = 1.0, split: int = 2) -> nn.Module:
    """SimRec: the obfuscator reversed. conv3-128 x2, up, conv3-64 x2, up, conv3-C, sigmoid (Table 1, split 2).

    Split s > 2: conv3-128 x2, [up, conv3-64 x2] x (s-1), up, conv3-C, sigmoid; the 64-channel stage is
    repeated, so there are s upsamplings and the last is followed by the 3x3 output convolution."""
    layers, c = _convs(in_channels, [scaled(128, width)] * 2)
    for i in range(max(split - 1, 1)):
        b, c = _convs(c, [scaled(64, width)] * 2)
        layers += [_first_up(split) if i == 0 else _up(), *b]
    return nn.Sequential(*layers, _up(), nn.Conv2d(c, out_channels, 3, padding=1), nn.Sigmoid())


def _unet_style(in_channels: int, out_channels: int, width: float, split: int, depth: int) -> nn.Module:
    """conv3-64 x d, up, conv3-128 x d, [up, conv3-128 x d] x (s-2), up, conv3-256 x d, conv3-C, conv1-C, sigmoid."""
    layers, c = _convs(in_channels, [scaled(64, width)] * depth)
    for i in range(max(split - 1, 1)):
        b, c = _convs(c, [scaled(128, width)] * depth)
        layers += [_first_up(split) if i == 0 else _up(), *b]
    d, c = _convs(c, [scaled(256, width)] * depth)
    tail = [*conv_bn_relu(c, out_channels), nn.Conv2d(out_channels, out_channels, 1), nn.Sigmoid()]
    return nn.Sequential(*layers, _up(), *d, *tail)


def urec1(in_channels: int, out_channels: int, width: float = 1.0, split: int = 2) -> nn.Module:
    """URec#1: conv3-64 x3, up, conv3-128 x3, up, conv3-256 x3, conv3-C, conv1-C, sigmoid (Table 1, split 2).

    Split s > 2: the 128-channel stage is repeated, [up, conv3-128 x3] x (s-2) after the first, so there
    are s upsamplings."""
    return _unet_style(in_channels, out_channels, width, split, depth=3)


def urec2(in_channels: int, out_channels: int, width: float = 1.0, split: int = 2) -> nn.Module:
    """URec#2, the lighter U-Net: conv3-64 x2, up, conv3-128 x2, up, conv3-256 x2, conv3-C, conv1-C, sigmoid
    (Table 1, split 2). Split s > 2: [up, conv3-128 x2] x (s-2) after the first 128-channel stage."""
    return _unet_style(in_channels, out_channels, width, split, depth=2)


class ResidualBlock(nn.Module):
    """[3x3, c; 3x3, c] with an identity shortcut (He et al., 2016)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            *conv_bn_relu(channels, channels),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


def resrec(in_channels: int, out_channels: int, width: float = 1.0, split: int = 2) -> nn.Module:
    """ResRec: [transconv3-64, residual block 64] x2, up, residual block 64 x2, up, conv1-C, sigmoid (Table 1, split 2).

    Split s > 2: [transconv3-64, res64] x2, up, res64 x2, [up, res64 x2] x (s-2), up, conv1-C, sigmoid: the
    residual stage is repeated, so there are s upsamplings. The last stage, an upsampling then a 1x1
    convolution, is the paper's: it draws in 2x2 blocks (16x16 values a channel for a 32x32 image) at
    every split, split 2 included; kept so that split 2 stays Table 1's, and no deeper cut is coarser."""
    c = scaled(64, width)
    layers: list[nn.Module] = []
    c_in = in_channels
    for _ in range(2):
        layers += [nn.ConvTranspose2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True), ResidualBlock(c)]
        c_in = c
    for i in range(max(split - 1, 1)):
        layers += [_first_up(split) if i == 0 else _up(), ResidualBlock(c), ResidualBlock(c)]
    layers += [_up(), nn.Conv2d(c, out_channels, 1), nn.Sigmoid()]
    return nn.Sequential(*layers)


RECONSTRUCTORS = {"simrec": simrec, "urec1": urec1, "urec2": urec2, "resrec": resrec}


def build_reconstructor(name: str, in_channels: int, out_channels: int, width: float = 1.0, split: int = 2) -> nn.Module:
    """The training reconstructor `name` (model.reconstructor): one of RECONSTRUCTORS, or a pool of
    several reconstructors or attack decoders named with commas ('simrec,unet,resrec')."""
    names = pool_names(name)
    if len(names) > 1:
        return ReconstructorPool({n: build_attacker(n, in_channels, out_channels, width, split) for n in names})
    if name not in RECONSTRUCTORS:
        raise ValueError(f"unknown reconstructor '{name}'; valid: {', '.join(RECONSTRUCTORS)}")
    return RECONSTRUCTORS[name](in_channels, out_channels, width, split)


# ----------------------------------------------------------------------------- a pool of adversaries


def pool_names(spec: str) -> list[str]:
    """'simrec, unet' -> ['simrec', 'unet']; one name -> [name]."""
    return [n.strip() for n in spec.split(",") if n.strip()] or [spec]


class ReconstructorPool(nn.Module):
    """Several reconstructors trained side by side as the adversary: each fits f on its own (Eq. 3), and a
    defence's privacy term is taken over the strongest (members()). Called as one network (a report's figure,
    the run's saved reconstructor) it is its first member."""

    def __init__(self, members: dict[str, nn.Module]):
        super().__init__()
        self.members = nn.ModuleDict(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return next(iter(self.members.values()))(x)


def members(reconstructor: nn.Module) -> list[nn.Module]:
    """The reconstructors a training reconstructor stands for: a pool's members, or itself."""
    return list(reconstructor.members.values()) if isinstance(reconstructor, ReconstructorPool) else [reconstructor]


# ----------------------------------------------------------------------------- attack-only decoders


class UNetDecoder(nn.Module):
    """A stronger attacker than Table 1's: a U-Net over the feature map (skip connections inside the
    decoder), then upsampling stages with two convolutions each. At width 1 it has several times
    URec#1's parameters, so the strongest attacker is not one a defence was trained against."""

    def __init__(self, in_channels: int, out_channels: int, width: float = 1.0, split: int = 2):
        super().__init__()
        c1, c2 = scaled(256, width), scaled(512, width)
        self.enc1 = nn.Sequential(*conv_bn_relu(in_channels, c1), *conv_bn_relu(c1, c1))  # H x W
        # At split 5 (1x1 maps for 32x32 images) there is nothing to pool: the inner level is left out.
        self.inner = split < 5
        if self.inner:
            self.enc2 = nn.Sequential(nn.MaxPool2d(2), *conv_bn_relu(c1, c2), *conv_bn_relu(c2, c2))  # H/2
            self.up = _up()
            self.dec1 = nn.Sequential(*conv_bn_relu(c2 + c1, c1), *conv_bn_relu(c1, c1))  # skip from enc1
        stages: list[nn.Module] = []
        c = c1 + in_channels  # second skip: the raw feature map itself
        for i in range(split):  # one 2x upsampling per pooling of the obfuscator
            c_out = scaled(128 if i == 0 else 64, width)
            stages += [_up(), *conv_bn_relu(c, c_out), *conv_bn_relu(c_out, c_out)]
            c = c_out
        self.stages = nn.Sequential(*stages, nn.Conv2d(c, out_channels, 3, padding=1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        d1 = self.dec1(torch.cat([self.up(self.enc2(e1)), e1], 1)) if self.inner else e1
        return self.stages(torch.cat([d1, x], 1))


def unet(in_channels: int, out_channels: int, width: float = 1.0, split: int = 2) -> nn.Module:
    """The attack-only U-Net decoder (see UNetDecoder)."""
    return UNetDecoder(in_channels, out_channels, width, split)


# Decoders used only to attack (training never uses them).
ATTACK_ONLY = {"unet": unet}


def attackers() -> dict:
    """The attackers of `veil attack`: every reconstructor of RECONSTRUCTORS (one added after import
    included, read at call time) and ATTACK_ONLY's decoders."""
    return {**RECONSTRUCTORS, **ATTACK_ONLY}


def build_attacker(name: str, in_channels: int, out_channels: int, width: float = 1.0, split: int = 2) -> nn.Module:
    table = attackers()
    if name not in table:
        raise ValueError(f"unknown attacker '{name}'; valid: {', '.join(table)}")
    return table[name](in_channels, out_channels, width, split)
