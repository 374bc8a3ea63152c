"""Adversarial training towards "privacy up to the label": Algorithm 1's rounds with a privacy term whose
floor is the mean image of each image's own class, not the batch's constant image.

The paper's term (and the pool's) rewards f until r(f(I)) is no better than one constant image, which
also hides the class; a store that hides the class is worth nothing to a later classifier. Here the term
is the mean over the batch of max(0, PSNR(I, r(f(I))) - PSNR(I, the mean of the other images of I's class
in the batch)), the strongest member's against a pool: f gains nothing by pushing r below what the class
already tells (the class floor every label store sits at), only by removing what the class does not
explain. The class mean leaves I out (else a reconstruction could beat it by knowing I); an image alone
of its class in the batch is judged against the mean of all the others.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from veil.defences.defence import PHASE_A, PHASE_B, PHASE_C, Defence
from veil.metrics import psnr
from veil.models.reconstructors import members


def others_of_class_mean(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per image, the mean of the other images of its class in the batch (of all the others, for one alone in its class)."""
    x = images.float().flatten(1)  # N x D
    one_hot = F.one_hot(labels, int(labels.max()) + 1).float()  # N x K
    sums, counts = one_hot.T @ x, one_hot.sum(0)  # K x D, K
    own_n = (counts[labels] - 1)[:, None]
    same = (sums[labels] - x) / own_n.clamp_min(1)
    rest = (x.sum(0, keepdim=True) - x) / max(len(x) - 1, 1)
    return torch.where(own_n > 0, same, rest).view_as(images)


def above_class_floor(images: torch.Tensor, features: torch.Tensor, reconstructor: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """mean_i max(0, PSNR(I_i, r(f(I_i))) - PSNR(I_i, the mean of the other images of its class)), in dB; the strongest member's."""
    floor = psnr(images, others_of_class_mean(images, labels)).detach()
    return torch.stack([(psnr(images, m(features)) - floor).clamp_min(0).mean() for m in members(reconstructor)]).max()


DEFENCE = Defence(
    name="classfloor",
    summary="Algorithm 1's phases (a), (b), (c) with the privacy term mean max(0, PSNR(I, r(f(I))) - PSNR(I, mean image of I's class)): "
    "reconstructions pushed down to what the class tells, no further",
    strength_key="train.lambda_privacy",
    strength_label="lambda",
    symbol="λ",
    title="class floor",
    round_phases=(PHASE_A, PHASE_B, PHASE_C),
    penalty=above_class_floor,
    penalty_metric="train_psnr_above_class_floor",
    penalty_uses_labels=True,
)
