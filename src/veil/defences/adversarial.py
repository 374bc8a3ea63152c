"""The paper's defence: Algorithm 1's rounds (a), (b), (c) with the privacy term of Eq. 2."""

from __future__ import annotations

import torch
from torch import nn

from veil.defences.defence import PHASE_A, PHASE_B, PHASE_C, Defence
from veil.metrics import psnr
from veil.models.reconstructors import members


def reconstruction_psnr(images: torch.Tensor, features: torch.Tensor, reconstructor: nn.Module) -> torch.Tensor:
    """PSNR(I, r(f(I))), averaged over the batch: the privacy term of Eq. 2 (minimised by f); against a pool
    of reconstructors, the strongest member's."""
    return torch.stack([psnr(images, m(features)).mean() for m in members(reconstructor)]).max()


DEFENCE = Defence(
    name="adversarial",
    summary="Algorithm 1's phases (a), (b), (c): f + g and then f alone on CE + lambda * PSNR(I, r(f(I))), r refitted in between",
    strength_key="train.lambda_privacy",
    strength_label="lambda",
    symbol="λ",
    round_phases=(PHASE_A, PHASE_B, PHASE_C),
    penalty=reconstruction_psnr,
    penalty_metric="train_psnr",
)
