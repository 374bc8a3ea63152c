"""Defences other than the paper's adversarial training, for side-by-side comparison.

    adversarial  Algorithm 1 (train.py), the default
    nopeek       cross-entropy + alpha * distance correlation(images, features) per batch
                 (Vepakomma et al., "NoPeek", 2020)
    noise        Gaussian noise of scale sigma added to the feature maps, in training and whenever
                 the obfuscator is used afterwards (it is a layer of the obfuscator)
    none         the pretrained split: the ceiling

Every defence starts from the same pretrained obfuscator+classifier (the `undefended` checkpoint)
and then trains for t_main rounds of t_sub epochs, so all are compared at the same budget. The
nopeek and noise epochs are train.train_obfuscator_classifier with their penalty (or none).
"""

from __future__ import annotations

import torch
from torch import nn

DEFENCES = ("adversarial", "nopeek", "noise", "none")


def _centred_distances(x: torch.Tensor) -> torch.Tensor:
    """Double-centred pairwise Euclidean distances of the rows of x (n x d)."""
    sq = x.pow(2).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2 * x @ x.T  # n x n, without an n x n x d intermediate
    d = d2.clamp_min(1e-12).sqrt()  # clamp: the zero diagonal would give an infinite gradient
    return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()


def distance_correlation(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation (Szekely et al., 2007) between two batches, each flattened per item.

    0 for independent data (in expectation, up to a small-sample bias), 1 when z is a similarity
    transform of x (scaled, rotated, shifted). Differentiable; O(n^2) in the batch size.
    """
    if len(x) != len(z):
        raise ValueError(f"distance_correlation: batches differ in size, {len(x)} vs {len(z)}")
    a, b = _centred_distances(x.flatten(1).float()), _centred_distances(z.flatten(1).float())
    dcov2_xz = (a * b).mean()
    dvar2 = (a * a).mean() * (b * b).mean()
    return (dcov2_xz.clamp_min(0) / dvar2.sqrt().clamp_min(1e-12)).sqrt()


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
