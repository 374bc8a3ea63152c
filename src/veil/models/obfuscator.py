"""Obfuscator f: the first VGG16-BN blocks, image -> feature map (paper Figure 2a).

VGG16 is five blocks of 3x3 convolutions, each ending in a 2x2 max-pool:
    64 64 | 128 128 | 256 256 256 | 512 512 512 | 512 512 512
The obfuscator takes the first `split` blocks (2 by default: 32x32xC -> 8x8x128), the
classifier the rest. `width` multiplies every channel count.

Optionally f first standardises each image (model.input_norm), so that nothing after it can tell
the image's brightness, contrast or colour cast. Optionally f narrows what leaves it
(model.bottleneck, model.feature_bits): a 1x1 projection to k channels (learned, or a fixed random
orthogonal one) and a quantiser to b bits, so that a stored feature map carries less than the cut
does. Then a defence's layer (noise) may follow.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from veil.metrics import standardised

BOTTLENECKS = ("none", "learned", "orthogonal")
INPUT_NORMS = ("none", "image", "channel")

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


def cut_channels(width: float, split: int) -> int:
    """Channels of the feature map where VGG16 is cut (before any bottleneck)."""
    return scaled(VGG16_BLOCKS[split - 1][-1], width)


class Standardise(nn.Module):
    """Each image to mean 0 and std 1: over all its pixels and channels (`image`) or per channel (`channel`).
    No weights; f(a * x + b) = f(x) for any a > 0 and b (per channel with `channel`)."""

    def __init__(self, per_channel: bool):
        super().__init__()
        self.per_channel = per_channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return standardised(x, self.per_channel)  # the same rule as the attack's standardised re-identification


class Projection(nn.Module):
    """A fixed 1x1 projection of C channels onto k orthonormal directions, drawn from `seed`; never trained
    (a buffer, so it is saved with the weights and no optimiser moves it)."""

    def __init__(self, c_in: int, k: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(c_in, k, generator=g))  # c_in x k, orthonormal columns
        self.register_buffer("weight", q.T.contiguous()[:, :, None, None])  # k x c_in x 1 x 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight.to(x.dtype))


class Quantise(nn.Module):
    """Features to `bits` bits: BatchNorm (no affine), sigmoid, then rounding to 2**bits levels in [0, 1].
    The rounding passes gradients straight through in training; the stored codes are integers."""

    def __init__(self, channels: int, bits: int):
        super().__init__()
        self.bits, self.levels = bits, 2**bits - 1
        self.norm = nn.BatchNorm2d(channels, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.sigmoid(self.norm(x))
        q = torch.round(y * self.levels) / self.levels
        return y + (q - y).detach()  # straight-through: forward q, gradient of y


class Obfuscator(nn.Sequential):
    """f(image in [0, 1], N x C x H x W) -> feature map N x 128w x H/4 x W/4 (at split 2; k channels with a bottleneck)."""

    def __init__(self, in_channels: int = 3, width: float = 1.0, split: int = 2, tail: nn.Module | None = None,
                 bottleneck: str = "none", channels: int = 0, bits: int = 0, seed: int = 0, input_norm: str = "none"):
        layers: list[nn.Module] = [Standardise(input_norm == "channel")] if input_norm != "none" else []
        c = in_channels
        for block_channels in VGG16_BLOCKS[:split]:
            block, c = vgg_block(c, block_channels, width)
            layers += block
        if bottleneck == "learned":
            layers.append(nn.Conv2d(c, channels, 1, bias=False))
            c = channels
        elif bottleneck == "orthogonal":
            layers.append(Projection(c, channels, seed))
            c = channels
        if bits:
            layers.append(Quantise(c, bits))
        if tail is not None:  # a defence's layer (e.g. noise): part of f, so every user of the obfuscator gets it
            layers.append(tail)
        super().__init__(*layers)
        self.in_channels, self.width, self.split, self.out_channels, self.bits = in_channels, width, split, c, bits


def build_obfuscator(model_cfg, in_channels: int, seed: int = 0, tail: nn.Module | None = None) -> Obfuscator:  # noqa: ANN001
    """The obfuscator a ModelConfig describes; `seed` draws a fixed projection."""
    m = model_cfg
    return Obfuscator(in_channels, m.width, m.split, tail, m.bottleneck, m.bottleneck_channels, m.feature_bits, seed, m.input_norm)


def feature_shape(in_channels: int, image_size: int, width: float, split: int, out_channels: int = 0) -> tuple[int, int, int]:
    """C x H x W of the obfuscated feature map (out_channels: a bottleneck's k, else the cut's channels)."""
    return out_channels or cut_channels(width, split), image_size >> split, image_size >> split


def quantised_bits(obfuscator: nn.Module) -> int:
    """b when the obfuscator's output is its quantiser's (every value k / (2^b - 1)), else 0 (float
    features, or noise after the quantiser): what decides how `veil obfuscate` stores them."""
    return obfuscator[-1].bits if isinstance(obfuscator[-1], Quantise) else 0


def code_dtype(bits: int) -> str:
    """How `veil obfuscate` stores a value by default: float16 for float features (bits 0), else a
    quantiser's integer code in the smallest integer type that holds b bits."""
    return "float16" if not bits else "uint8" if bits <= 8 else "int16" if bits <= 15 else "int32"


def code_bytes(bits: int) -> int:
    return {"float16": 2, "uint8": 1, "int16": 2, "int32": 4}[code_dtype(bits)]


def client_cost(obfuscator: nn.Module, image_size: int) -> dict:
    """What the client pays to obfuscate one image: MFLOPs (torch's counter; a multiply-add is 2)
    and parameters (learned weights; fixed buffers such as a projection are not counted)."""
    x = torch.zeros(1, obfuscator.in_channels, image_size, image_size, device=next(obfuscator.buffers()).device)
    mode = obfuscator.training
    obfuscator.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        obfuscator(x)
    obfuscator.train(mode)
    return {"mflops": counter.get_total_flops() / 1e6, "parameters": sum(p.numel() for p in obfuscator.parameters())}


def identity(obfuscator: nn.Module, image_size: int) -> dict:
    """What a store's manifest (and a client file) says of the obfuscator that made its features."""
    return {"fingerprint": fingerprint(obfuscator), "in_channels": obfuscator.in_channels, "width": obfuscator.width, "split": obfuscator.split,
            "image_size": image_size, "out_channels": obfuscator.out_channels, "feature_bits": obfuscator.bits}


def fingerprint(obfuscator: nn.Module) -> str:
    """sha256 over the obfuscator's weights and buffers (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(obfuscator.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # reshape: 0-d counters cannot be viewed as bytes
    return h.hexdigest()
