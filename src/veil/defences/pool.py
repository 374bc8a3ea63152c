"""Adversarial training that aims at what an attacker can achieve, not at one decoder: Algorithm 1's
rounds against the strongest of a pool of reconstructors (model.reconstructor = 'simrec,unet,resrec',
re-initialised every train.reinit_every rounds, trained train.t_reconstructor epochs a round), with a
privacy term that stops at the floor.

The paper's term, PSNR(I, r(f(I))), keeps rewarding f for driving one decoder *below* the constant-
image floor, which a refitted decoder undoes within an epoch (docs/results.md): f learns to fool r
rather than to remove what r needs. Here the term is max(0, PSNR of the strongest member - PSNR of
the batch's mean image): nothing is gained below the floor, so the only way down is for every
member, fresh ones included, to be left with no more than a constant image.
"""

from __future__ import annotations

import torch
from torch import nn

from veil.defences.adversarial import reconstruction_psnr
from veil.defences.defence import PHASE_A, PHASE_B, PHASE_C, Defence
from veil.metrics import psnr


def strongest_above_floor(images: torch.Tensor, features: torch.Tensor, reconstructor: nn.Module) -> torch.Tensor:
    """max(0, max over the pool of mean PSNR(I, r(f(I))) - mean PSNR(I, mean image of the batch)), in dB."""
    floor = psnr(images, images.mean(0, keepdim=True).expand_as(images)).mean().detach()
    return (reconstruction_psnr(images, features, reconstructor) - floor).clamp_min(0)  # Eq. 2's term: the strongest member's


DEFENCE = Defence(
    name="pool",
    summary="Algorithm 1's phases (a), (b), (c) against a pool of reconstructors (model.reconstructor = a comma list; "
    "train.reinit_every, train.t_reconstructor), privacy term max(0, strongest member's PSNR - the batch's constant-image PSNR)",
    strength_key="train.lambda_privacy",
    strength_label="lambda",
    symbol="λ",
    title="pool",
    round_phases=(PHASE_A, PHASE_B, PHASE_C),
    penalty=strongest_above_floor,
    penalty_metric="train_psnr_above_floor",
)
