"""The adversarial decoder's critic: a patch discriminator on the attacker's own images.

A decoder trained on the pixel loss alone draws the mean image given the code, which is what PSNR
rewards; a discriminator that tells the attacker's real images from the decoder's output pushes it
towards sharp, plausible images instead (pix2pix's PatchGAN, at 32 x 32 three strided convolutions:
one logit per 8 x 8-pixel patch of a 32 x 32 image). The non-saturating loss of Goodfellow et al.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from veil.models.obfuscator import scaled


def patch_discriminator(in_channels: int, width: float = 1.0) -> nn.Module:
    """conv4-64 s2, LReLU, conv4-128 s2, BN, LReLU, conv3-1: N x C x H x W -> N x 1 x H/4 x W/4 logits."""
    c1, c2 = scaled(64, width), scaled(128, width)
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.Conv2d(c1, c2, 4, stride=2, padding=1), nn.BatchNorm2d(c2), nn.LeakyReLU(0.2),
        nn.Conv2d(c2, 1, 3, padding=1),
    )


def discriminator_loss(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """The critic's loss: real patches towards 1, the decoder's (detached) towards 0."""
    return F.softplus(-critic(real).float()).mean() + F.softplus(critic(fake.detach()).float()).mean()


def generator_loss(critic: nn.Module, fake: torch.Tensor) -> torch.Tensor:
    """The decoder's adversarial loss (non-saturating): -log D(fake), in nats per patch."""
    return F.softplus(-critic(fake).float()).mean()
