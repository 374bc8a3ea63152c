"""Adversarial training against re-identification rather than PSNR: Algorithm 1's rounds, with a
privacy term that asks only that a reconstruction be no nearer its own image than chance says.

Re-identification ranks candidate images by pixel MSE to a reconstruction (metrics.reid_ranks),
i.e. by PSNR. The soft version over a batch of N: p_i = softmax_j(PSNR(r_i, I_j) / T)_i, the
probability that reconstruction i picks its own image among the batch. The penalty is
max(0, mean_i log p_i - log(1/N)): it pushes the batch's average down to chance and then stops
(a constant reconstruction scores 0, by Jensen's inequality), so the obfuscator is not rewarded
for driving one decoder below the floor or away from each image (which a fresh decoder undoes),
only for making reconstructions useless for telling users apart.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from veil.defences.defence import PHASE_A, PHASE_B, PHASE_C, Defence
from veil.metrics import MSE_FLOOR
from veil.models.reconstructors import members

TEMPERATURE_DB = 1.0  # 1 dB of PSNR difference = a factor e in the odds


def pairwise_psnr(reconstructions: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """PSNR (Eq. 1, dB) of every reconstruction against every image: N x N, row i = reconstruction i."""
    r, x = reconstructions.float().flatten(1), images.float().flatten(1)  # N x D
    mse = (r.pow(2).sum(1, keepdim=True) + x.pow(2).sum(1)[None, :] - 2 * r @ x.T) / r.shape[1]
    return -10.0 * torch.log10(mse.clamp_min(MSE_FLOOR))


def reid_above_chance(images: torch.Tensor, features: torch.Tensor, reconstructor: nn.Module) -> torch.Tensor:
    """max(0, mean_i log p_i + log N): 0 when reconstructions pick their own images no better than
    chance on average (a constant reconstruction included), log N when every one picks it for sure."""
    n = len(images)
    excess = []
    for m in members(reconstructor):  # against a pool: the member that re-identifies best
        logp = torch.log_softmax(pairwise_psnr(m(features), images) / TEMPERATURE_DB, dim=1).diagonal()
        excess.append(logp.mean() + math.log(n))
    return torch.stack(excess).max().clamp_min(0)


DEFENCE = Defence(
    name="reid",
    summary="Algorithm 1's phases (a), (b), (c) with the privacy term max(0, mean log p(own image) - log(1/N)) over the batch, "
    "p a softmax over the PSNR of r(f(I_i)) to every image: re-identification pushed to chance, no further",
    strength_key="train.lambda_privacy",
    strength_label="lambda",
    symbol="λ",
    title="re-id",
    round_phases=(PHASE_A, PHASE_B, PHASE_C),
    penalty=reid_above_chance,
    penalty_metric="train_reid_excess",
)
