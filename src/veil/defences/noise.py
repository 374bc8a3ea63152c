"""Gaussian noise on the feature maps: a layer of the obfuscator, so that obfuscating and attacking
see it as well as training; f + g learn to classify through it."""

from __future__ import annotations

import torch
from torch import nn

from veil.defences.defence import Defence


class GaussianNoise(nn.Module):
    """Adds N(0, sigma^2) to its input in training and evaluation alike: the noise is the defence."""

    def __init__(self, sigma: float = 0.0):
        super().__init__()
        self.register_buffer("sigma", torch.tensor(float(sigma)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(self.sigma) == 0.0:
            return x
        return x + self.sigma * torch.randn_like(x)


def set_noise(obfuscator: nn.Module, sigma: float) -> None:
    for m in obfuscator.modules():
        if isinstance(m, GaussianNoise):
            m.sigma.fill_(sigma)


DEFENCE = Defence(
    name="noise",
    summary="f + g on cross-entropy with Gaussian noise of scale sigma added to the features (a layer of the obfuscator, kept in use afterwards)",
    strength_key="train.noise_sigma",
    strength_label="sigma",
    symbol="σ",
    title="noise",
    round_phases=("noise",),
    layer=GaussianNoise,
    start=set_noise,
)
