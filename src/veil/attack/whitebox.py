"""The white-box attacker: optimise an image so that the frozen obfuscator maps it onto a stored feature map.

From a start image (the attacker's mean image), find x in [0, 1] minimising
|f(x) - z|^2 / |z|^2 + w * TV(x) per image, z the stored feature map and TV a total-variation
prior of weight w. The attacker picks w on its own held-out images, never the users'. The attack
harness (harness.py) runs it beside the learned attackers and scores it alike.

The decoder-started inversion (attacker "decoder-inversion") starts instead from a learned decoder's
image x0 = r(z) and minimises |f(x) - z|^2 / |z|^2 + v * mean((x - x0)^2): the decoder's image is
its prior. The weight v is picked on held-out images from a grid that includes infinity (x = x0, the
decoder itself), so on the attacker's own images it can only improve on the decoder.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from veil.attack.attackers import reconstruct
from veil.data import to_float
from veil.errors import AttackError
from veil.metrics import psnr, total_variation
from veil.runtime import feature_maps

TUNE_IMAGES = 32  # held-out attacker images on which the white-box attacker chooses its TV weight


def invert(obfuscator: nn.Module, features: torch.Tensor, start: torch.Tensor, tv_weight: float, steps: int, lr: float, batch_size: int,
           bar=None, prior_weight: float = 0.0) -> tuple[torch.Tensor, list[dict]]:
    """White-box attack: from `start` (the mean image, 1 x C x H x W, or one start per image), optimise images
    x in [0, 1] so that f(x) matches `features`, minimising |f(x) - features|^2 / |features|^2 + tv_weight * TV(x)
    + prior_weight * mean((x - start)^2) per image.
    `steps` Adam steps per batch of `batch_size` images, the learning rate cosine-annealed from `lr` to 0.
    Returns the images (N x C x H x W) and the mean objective every few steps."""
    obfuscator.eval().requires_grad_(False)
    out, curve = [], []
    for b in range(0, len(features), batch_size):
        target = features[b : b + batch_size]
        scale = target.pow(2).flatten(1).mean(1).clamp_min(1e-12)  # relative error: any feature scale alike
        x0 = start.expand(len(target), *start.shape[1:]) if len(start) == 1 else start[b : b + batch_size]
        x = x0.clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=lr)
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            feature_error = (obfuscator(x) - target).pow(2).flatten(1).mean(1) / scale
            objective = feature_error + tv_weight * total_variation(x)
            if prior_weight:
                objective = objective + prior_weight * (x - x0).pow(2).flatten(1).mean(1)
            loss = objective.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.clamp_(0, 1)
            if not torch.isfinite(loss):
                raise AttackError(f"white-box inversion: non-finite objective at step {step}; lower --whitebox-lr")
            if step % 10 == 0 or step == steps - 1:
                curve.append({"batch": b // batch_size, "step": step, "objective": loss.item(), "feature_error": feature_error.mean().item()})
            if bar is not None:
                bar.update(1)
        out.append(x.detach())
    return torch.cat(out), curve


def choose_tv_weight(obfuscator: nn.Module, images: torch.Tensor, start: torch.Tensor, weights: list[float], steps: int, lr: float, batch_size: int,
                     bar=None) -> tuple[float, dict[str, float]]:
    """The white-box attacker picks its prior weight on its own held-out images (uint8; the first
    TUNE_IMAGES of them, never the users'): the weight whose inversions score the best PSNR."""
    if len(weights) == 1:
        return weights[0], {}
    images = images[:TUNE_IMAGES]
    features = feature_maps(obfuscator, images, batch_size)
    scores = {}
    for w in weights:
        inverted, _ = invert(obfuscator, features, start, w, steps, lr, batch_size, bar)
        scores[f"{w:g}"] = psnr(to_float(images), inverted).mean().item()
    best = max(weights, key=lambda w: scores[f"{w:g}"])
    return best, scores


def decoder_inversion(obfuscator: nn.Module, decoder: nn.Module, val_images: torch.Tensor, features: torch.Tensor, weights: list[float], steps: int,
                      lr: float, batch_size: int, bar=None, precision: str = "fp32") -> tuple[torch.Tensor, float, dict[str, float], list[dict]]:
    """The decoder-started inversion of `features` (the users'): each image starts at the decoder's and is held
    near it by the prior weight the attacker picks on its own held-out images (uint8, the first TUNE_IMAGES; the
    weight whose images score the best PSNR; math.inf: the decoder's image, unchanged).
    `precision`: the decoder's (its images as the attack scored them); the inversion itself runs in fp32.
    Returns the images, the weight, the PSNR of each weight tried, and the inversion's curve."""
    held_out = val_images[:TUNE_IMAGES]
    held_features = feature_maps(obfuscator, held_out, batch_size)
    held_start, scores = reconstruct(decoder, held_features, batch_size, precision), {}
    for w in weights:
        image = held_start if math.isinf(w) else invert(obfuscator, held_features, held_start, 0.0, steps, lr, batch_size, bar, prior_weight=w)[0]
        scores[f"{w:g}"] = psnr(to_float(held_out), image).mean().item()
    best = max(weights, key=lambda w: scores[f"{w:g}"])
    start = reconstruct(decoder, features, batch_size, precision)
    if math.isinf(best):
        return start, best, scores, []
    images, curve = invert(obfuscator, features, start, 0.0, steps, lr, batch_size, bar, prior_weight=best)
    return images, best, scores, curve

