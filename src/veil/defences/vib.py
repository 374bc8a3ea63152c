"""A variational information bottleneck (Alemi et al., 2017) on the feature map: f's output is the mean
mu of a Gaussian code z = mu + eps, eps ~ N(0, 1), and f + g train on cross-entropy + beta * KL(N(mu, 1) ||
N(0, 1)) = beta * sum 0.5 mu^2 (nats per item, summed over the map's values). The store keeps one draw.

The unit noise is the noise defence's layer at sigma 1, so obfuscating, the attack (each use of f a new draw,
linkage against the mean of draws) and the client's refusal to export a random f treat it as they treat
noise. What differs is the term: noise alone can be beaten by f scaling its features up; the KL prices every
nat a value carries (0.5 log(1 + mu^2) at most), so f keeps what the classifier pays for and the scale of mu
says per value how much. The term is computed from the draw z: E[0.5 (z^2 - 1)] = 0.5 mu^2, with the same
gradient in expectation, so it needs no access to mu.
"""

from __future__ import annotations

import torch
from torch import nn

from veil.defences.defence import Defence
from veil.defences.noise import GaussianNoise, set_noise

UNIT = 1.0  # the code's noise: the KL's prior and posterior share it, so only mu's scale moves the information


def kl_to_prior(images: torch.Tensor, features: torch.Tensor, reconstructor: nn.Module) -> torch.Tensor:
    """The batch's mean KL(N(mu, 1) || N(0, 1)) in nats per item, estimated from the draw z = mu + eps as
    sum 0.5 (z^2 - 1); the reconstructor plays no part."""
    z = features.float().flatten(1)
    return (0.5 * (z.pow(2) - UNIT**2)).sum(1).mean()


def start_unit_noise(obfuscator: nn.Module, beta: float) -> None:
    """Turn the code's unit noise on (beta weighs the term, not the noise)."""
    set_noise(obfuscator, UNIT)


DEFENCE = Defence(
    name="vib",
    summary="f + g on cross-entropy + beta * KL(N(f(I), 1) || N(0, 1)) with the unit noise a layer of the obfuscator "
    "(a variational information bottleneck; the store keeps one draw)",
    strength_key="train.vib_beta",
    strength_label="beta",
    symbol="β",
    title="VIB",
    round_phases=("vib",),
    penalty=kl_to_prior,
    penalty_metric="train_kl_nats",
    layer=GaussianNoise,
    start=start_unit_noise,
)
