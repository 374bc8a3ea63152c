"""Gaussian noise on the feature maps: a layer of the obfuscator, so that obfuscating and attacking
see it as well as training; f + g learn to classify through it."""

from __future__ import annotations

import torch
from torch import nn

from veil.defences.defence import Defence


class GaussianNoise(nn.Module):
    """Adds N(0, sigma^2) to its input in training and evaluation alike: the noise is the defence.

    sigma is a buffer (checkpoints keep it); whether it is 0 is also kept on the host (`on`), set by
    set_noise and when weights are loaded, so that forward never reads the device (a sync per step on CUDA).
    """

    def __init__(self, sigma: float = 0.0):
        super().__init__()
        self.register_buffer("sigma", torch.tensor(float(sigma)))
        self.on = sigma != 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.on:
            return x
        return x + self.sigma * torch.randn_like(x)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "sigma" in state_dict:
            self.on = bool(state_dict[prefix + "sigma"] != 0)  # once per load, not per step


def set_noise(obfuscator: nn.Module, sigma: float) -> None:
    for m in obfuscator.modules():
        if isinstance(m, GaussianNoise):
            m.sigma.fill_(sigma)
            m.on = sigma != 0.0


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
