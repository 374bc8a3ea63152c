"""The learned attackers: the attacker's own data, fixed features, and fitting a fresh decoder
(registry.py: models/reconstructors.attackers(), alone or with a consistency or adversarial term) on
(f(I), I) pairs of its own images until its held-out PSNR stops improving."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from veil.attack.discriminator import discriminator_loss, generator_loss, patch_discriminator
from veil.attack.registry import DECODER, get_attacker
from veil.attack.settings import AttackConfig, seed_for
from veil.data import augment, to_float
from veil.defences import GaussianNoise
from veil.errors import AttackError, ConfigError
from veil.metrics import psnr
from veil.models import init_xavier
from veil.models.reconstructors import build_attacker, use_layout
from veil.runtime import autocast, feature_maps, memory_format, resolve_precision

# ----------------------------------------------------------------------------- data


@dataclass
class AttackData:
    train: torch.Tensor  # uint8 N x C x H x W: attacker-train minus the held-out part
    val: torch.Tensor  # uint8: the held-out part of attacker-train (early stopping)
    users: torch.Tensor  # uint8: the users' images (test split), never used for training
    mean_image: torch.Tensor  # float 1 x C x H x W in [0, 1]: the attacker-split mean image
    natural: bool  # horizontal flips make sense


def attack_data(attacker: torch.Tensor, users: torch.Tensor, natural: bool, s: AttackConfig) -> AttackData:
    """Split the attacker's own images into train and held-out parts, seeded by the attack seed."""
    n = len(attacker)
    n_val = max(1, int(round(n * s.validation_fraction)))
    if n - n_val < s.batch_size:
        raise ConfigError(
            f"attack settings: {n} attacker images leave {n - n_val} for training after holding out {n_val}, "
            f"fewer than batch_size={s.batch_size}; lower batch_size or validation_fraction"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(s.seed)).to(attacker.device)
    mean_image = to_float(attacker).mean(0, keepdim=True)
    return AttackData(attacker[order[n_val:]], attacker[order[:n_val]], users, mean_image, natural)


def is_random(obfuscator: nn.Module) -> bool:
    """f draws noise on every call (a GaussianNoise layer that is on): each use of f is a new draw."""
    return any(isinstance(m, GaussianNoise) and m.on for m in obfuscator.modules())


def stored_features(obfuscator: nn.Module, users: torch.Tensor, s: AttackConfig, label: str) -> torch.Tensor:
    """The users' stored feature maps f(users), N x C' x H' x W': one draw of a random f, seeded by the attack seed."""
    torch.manual_seed(seed_for(s.seed, label, "users"))
    return feature_maps(obfuscator, users, s.eval_batch_size)


@torch.no_grad()
def reconstruct(reconstructor: nn.Module, features: torch.Tensor, batch_size: int, precision: str = "fp32") -> torch.Tensor:
    """The decoder's images of `features`, float32 (under bf16 autocast at precision 'bf16')."""
    reconstructor.eval()
    with autocast(precision, features.device):
        return torch.cat([reconstructor(features[i : i + batch_size]).float() for i in range(0, len(features), batch_size)])


# ----------------------------------------------------------------------------- learned attackers


def consistency_db(obfuscator: nn.Module, images: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """How far f(images) is from the stored features, in dB: 10 log10(|f(x) - z|^2 / |z|^2) per image (relative, so
    any feature scale reads alike, and in the pixel loss's unit), averaged. Gradients flow through the frozen f."""
    scale = features.pow(2).flatten(1).mean(1).clamp_min(1e-12)
    error = (obfuscator(images) - features).pow(2).flatten(1).mean(1) / scale
    return (10 * torch.log10(error + 1e-10)).mean()


def fixed_features(obfuscator: nn.Module, data: AttackData, s: AttackConfig) -> tuple[torch.Tensor, torch.Tensor] | None:
    """f(attacker's training images), f(held-out images), computed once for every attacker of one
    obfuscator; None when they cannot be fixed (augmentation, or a random f: new draws per batch)."""
    obfuscator.eval().requires_grad_(False)
    if s.augment or is_random(obfuscator):
        return None
    return feature_maps(obfuscator, data.train, s.eval_batch_size), feature_maps(obfuscator, data.val, s.eval_batch_size)


def fit_attacker(name: str, obfuscator: nn.Module, data: AttackData, s: AttackConfig, width: float, split: int, seed: int, bar=None,
                 fixed: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[nn.Module, list[dict]]:
    """Train attacker `name` (a decoder of the registry) from scratch on the attacker's own images (Eq. 3, f frozen),
    with early stopping on the held-out part (patience epochs without a new best); the learning rate shrinks
    after each epoch that gains less than min_delta. The consistency attacker adds consistency_weight x
    consistency_db (f of its images against the code it was given); the adversarial one adds adversarial_weight x
    the patch discriminator's loss, the discriminator trained on the attacker's own images alongside.
    A random f (the noise defence) is applied afresh to every batch: the threat model grants unlimited
    use of f, so the attacker sees a new draw of each image's features every epoch. Every draw is seeded.
    `fixed`: fixed_features, when the caller computed them for several attackers.
    Returns it with its best weights, in eval mode, and its curve (one record per epoch)."""
    spec = get_attacker(name)
    if spec.kind != DECODER:
        raise AttackError(f"attacker {name} is not a decoder: it is not trained on (f(I), I) pairs")
    device = data.train.device
    precision = resolve_precision(s.precision, device)  # the forward passes below; f's stored features stay fp32
    fixed = fixed or fixed_features(obfuscator, data, s)
    fresh = fixed is None  # compute f per batch, else once for all
    if fresh:
        torch.manual_seed(seed_for(seed, "held-out"))  # a random f's draw on the held-out images
        train_features, val_features = None, feature_maps(obfuscator, data.val, s.eval_batch_size)
    else:
        train_features, val_features = fixed  # N x C' x H' x W'
    val_images = to_float(data.val)
    torch.manual_seed(seed)  # initialisation, then a random f's draw on every batch
    reconstructor = init_xavier(build_attacker(spec.decoder, val_features.shape[1], data.train.shape[1], width, split))
    use_layout(reconstructor.to(device), memory_format(s.channels_last, device))
    opt = torch.optim.Adam(reconstructor.parameters(), lr=s.lr)
    critic = critic_opt = None
    if spec.adversarial:  # initialised after the decoder: a plain decoder's draws are untouched
        critic = init_xavier(patch_discriminator(data.train.shape[1], width)).to(device, memory_format=memory_format(s.channels_last, device))
        critic_opt = torch.optim.Adam(critic.parameters(), lr=s.lr, betas=(0.5, 0.999))
    generator = torch.Generator(device=device).manual_seed(seed)
    n = len(data.train)
    stop = n - n % s.batch_size  # drop a last partial batch: BatchNorm cannot take a single image
    best, best_state, waited, curve = -math.inf, None, 0, []
    for epoch in range(1, s.max_epochs + 1):
        start_time = time.perf_counter()
        reconstructor.train()
        order = torch.randperm(n, generator=generator, device=device)
        total = torch.zeros((), device=device)
        terms = {"consistency_db": torch.zeros((), device=device), "adversarial": torch.zeros((), device=device)}
        for start in range(0, stop, s.batch_size):
            idx = order[start : start + s.batch_size]
            images = data.train[idx]
            if s.augment:
                images = augment(images, data.natural, generator)
            if fresh:
                with torch.no_grad():
                    features = obfuscator(to_float(images))
            else:
                features = train_features[idx]
            real = to_float(images)
            with autocast(precision, device):  # losses in float32 (psnr promotes), backward outside
                rebuilt = reconstructor(features).float()
                p = psnr(real, rebuilt).mean()
                loss = -p  # Eq. 3: maximise PSNR
                if spec.consistency:
                    c = consistency_db(obfuscator, rebuilt, features)
                    loss = loss + s.consistency_weight * c
                    terms["consistency_db"] += c.detach().float() * len(idx)
            if critic is not None:
                critic_opt.zero_grad(set_to_none=True)
                with autocast(precision, device):
                    critic_loss = discriminator_loss(critic, real, rebuilt)
                critic_loss.backward()
                critic_opt.step()
                with autocast(precision, device):
                    g = generator_loss(critic, rebuilt)
                loss = loss + s.adversarial_weight * g
                terms["adversarial"] += g.detach().float() * len(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if not torch.isfinite(p):
                raise AttackError(f"attacker {name}: non-finite PSNR in epoch {epoch}; lower --lr")
            total += p.detach() * len(idx)
            if bar is not None:
                bar.update(1)
        val = psnr(val_images, reconstruct(reconstructor, val_features, s.eval_batch_size, precision)).mean().item()
        lr = opt.param_groups[0]["lr"]
        # Two rules, kept apart: patience ends training after `patience` epochs in a row without a new best
        # (any gain counts, so a slow learner is not stopped while still gaining), and an epoch gaining less
        # than min_delta is a plateau for the learning rate only (smaller steps, patience untouched).
        if val < best + s.min_delta:
            for group in opt.param_groups:
                group["lr"] *= s.lr_decay
        if val > best:
            best, best_state, waited = val, {k: v.detach().clone() for k, v in reconstructor.state_dict().items()}, 0
        else:
            waited += 1
        # waited: epochs since the last new best; below patience at the last epoch = stopped by the cap
        record = {"epoch": epoch, "lr": lr, "train_psnr": total.item() / stop, "val_psnr": val, "waited": waited,
                  "seconds": round(time.perf_counter() - start_time, 3)}
        if spec.consistency:
            record["train_consistency_db"] = terms["consistency_db"].item() / stop
        if critic is not None:
            record["train_adversarial"] = terms["adversarial"].item() / stop
        curve.append(record)
        if bar is not None:
            bar.set_postfix(epoch=epoch, val_psnr=f"{val:.2f}", best=f"{best:.2f}")
        if waited >= s.patience:
            break
    if best_state is None:  # every held-out PSNR was NaN: no weights to keep
        raise AttackError(f"attacker {name}: held-out PSNR was not finite in any of its {len(curve)} epochs; lower --lr")
    reconstructor.load_state_dict(best_state)
    return reconstructor.eval(), curve


def convergence_flags(curve: list[dict], patience: int) -> list[str]:
    """Why an attacker's figures may be a lower bound on what it can do: 'cap' (max_epochs ended it before
    patience ran out), 'best-last' (its last epoch was its best: it was still gaining), 'under-fit' (at its
    best epoch its training PSNR was still below its held-out PSNR). Empty when it ended by patience, fitted."""
    best = max(curve, key=lambda r: r["val_psnr"])
    flags = []
    if curve[-1]["waited"] < patience:
        flags.append("cap")
    if best["epoch"] == curve[-1]["epoch"] and len(curve) > 1:
        flags.append("best-last")
    if best["train_psnr"] < best["val_psnr"]:
        flags.append("under-fit")
    return flags
