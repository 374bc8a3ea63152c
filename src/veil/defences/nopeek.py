"""NoPeek (Vepakomma et al., 2020): cross-entropy + alpha * distance correlation(images, features)."""

from __future__ import annotations

import torch
from torch import nn

from veil.defences.defence import Defence


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


def image_feature_dcor(images: torch.Tensor, features: torch.Tensor, reconstructor: nn.Module) -> torch.Tensor:
    """NoPeek's term, on each process's part of the batch; the reconstructor plays no part."""
    return distance_correlation(images, features)


DEFENCE = Defence(
    name="nopeek",
    summary="f + g on cross-entropy + alpha * distance correlation(images, features), per batch (NoPeek)",
    strength_key="train.nopeek_alpha",
    strength_label="alpha",
    symbol="α",
    title="NoPeek",
    round_phases=("nopeek",),
    penalty=image_feature_dcor,
    penalty_metric="train_dcor",
)
