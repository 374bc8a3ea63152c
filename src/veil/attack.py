"""The Chosen Image Attack harness: freeze f, fit fresh attackers, and score them against floor and ceiling.

    veil attack RUN_DIR                      -> RUN_DIR/attack/{attack.json, attack.csv, attack.md, <attacker>.png}
    veil attack --matrix RUN_A RUN_B ...     -> the attack x training reconstructor PSNR matrix (Table 3)

Threat model (paper Section 3): the attacker has unlimited use of the frozen obfuscator f and images
of its own (the attacker-train split), disjoint from the users' images (the test split). It trains
each reconstructor of Table 1 from scratch on (f(I), I) pairs of its own images (Eq. 3), stopping
when the PSNR on a held-out part of its own images stops improving, then turns the users' stored
feature maps back into images. A white-box attacker (whitebox.py) instead optimises an image so
that f(image) matches the stored feature map.

Every number comes with its floor and ceiling: the best constant image (the attacker-split mean
image), and the same attackers against the run's undefended obfuscator (after pretraining, before
adversarial training). A defended PSNR below the floor means the attacker was not trained well.
The files written from the results are attack_tables.py's.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from veil import data as data_mod
from veil.attack_tables import matrix_csv, matrix_markdown, write_outputs
from veil.data import augment, load_splits, to_float
from veil.defences import GaussianNoise, describe
from veil.errors import AttackError, ConfigError
from veil.io import atomic_write_json, atomic_write_text
from veil.metrics import draw_candidates, psnr, reid_ranks, ssim, top_k_rate
from veil.models import init_xavier
from veil.models.obfuscator import fingerprint
from veil.models.reconstructors import attackers, build_attacker
from veil.progress import progress_bar
from veil.results import CLASS_FLOOR, FLOOR, LINKAGE, OBFUSCATORS, WHITEBOX, defence_label
from veil.rundir import Run, load_run
from veil.runtime import OFF, ON, memory_format
from veil.train import feature_maps, plan, resolve_device
from veil.version import __version__
from veil.whitebox import choose_tv_weight, invert

# ----------------------------------------------------------------------------- settings


@dataclass
class AttackConfig:
    attackers: str = "simrec,resrec,unet"
    """Attackers to train from scratch, comma-separated: Table 1's simrec, urec1, urec2, resrec, and unet (a U-Net decoder).
    The default leaves out URec#1 and #2: measured, they were never the strongest and cost the most (docs/benchmarks.md);
    give simrec,urec1,urec2,resrec for the paper's Table 3."""
    whitebox: bool = True
    """Also run the white-box attacker (optimise an image so that f(image) matches the stored features)."""
    undefended: bool = True
    """Also attack the run's undefended obfuscator (after pretraining): the ceiling beside each number."""
    ceiling: str = ""
    """Another run directory whose undefended obfuscator is the ceiling instead (e.g. the paper's cut, undefended,
    beside a deeper or narrower one); it must have been trained on the same images (data and seed)."""
    width: float = 0.0
    """Channel multiplier of the attack reconstructors (0 = the run's model.width)."""
    max_epochs: int = 40
    """Most epochs an attacker trains for (over the attacker-train images minus the held-out part): a cap that
    patience, not the cap, should end (measured: 14-24 epochs on reduced CIFAR-10); one it ends is marked (cap)."""
    patience: int = 3
    """Stop after this many epochs without a held-out PSNR gain of min_delta; the best weights are kept."""
    min_delta: float = 0.01
    """Held-out PSNR gain (dB) that counts as an improvement for early stopping."""
    validation_fraction: float = 0.1
    """Fraction of the attacker-train images held out for early stopping."""
    lr: float = 2e-3
    """Adam learning rate of the attackers at the start."""
    lr_decay: float = 0.5
    """Multiply the learning rate by this after each epoch without improvement (1 = constant)."""
    batch_size: int = 64
    """Images per attacker optimisation step."""
    eval_batch_size: int = 500
    """Images per forward pass when obfuscating, reconstructing and inverting."""
    augment: bool = False
    """Random crop/flip on attacker batches (off: features are computed once, which is ~2x faster; a random
    obfuscator, e.g. the noise defence, is applied afresh to every batch either way)."""
    n_candidates: int = 100
    """Re-identification: candidates per reconstruction (the true user image and N-1 others at random)."""
    whitebox_images: int = 200
    """Users' images the white-box attacker inverts (the first ones of the test split; 0 = all)."""
    whitebox_steps: int = 200
    """Adam steps of the white-box inversion per image batch."""
    whitebox_lr: float = 0.05
    """Peak learning rate of the white-box inversion (on pixel values in [0, 1]), cosine-annealed to 0."""
    tv_weights: str = "0.1,1,10"
    """Total-variation prior weights to try, comma-separated; the white-box attacker keeps the one whose
    inversions of its own held-out images score the best PSNR (one value: no choice)."""
    n_show: int = 8
    """Users' images shown in each attacker's PNG (the first ones of the test split)."""
    seed: int = 0
    """Seed of the held-out split, attacker initialisation, batch order, candidate sets and a random obfuscator's draws."""
    device: str = "auto"
    """auto (cuda when available, else cpu) | cpu | cuda | cuda:N."""
    channels_last: str = "auto"
    """NHWC layout of the networks (auto | on | off; auto: on for CPU and CUDA, where it runs faster, as train.channels_last)."""
    progress: bool = True
    """Show progress bars."""
    allow_unfinished: bool = False
    """Attack a run whose training has not finished (its latest checkpoint); attack.json records the step."""


# Settings that change no number: a saved attack.json made with other values may be reused.
NOT_RESULTS = ("device", "channels_last", "progress", "allow_unfinished")


def result_settings(settings: AttackConfig | dict) -> dict:
    """The settings that change the numbers (all but NOT_RESULTS), from an AttackConfig or a saved attack.json's
    "settings": two attacks with equal ones may share their results."""
    # A setting added since a saved attack was made is at its default there (an attack.json stays reusable).
    values = dataclasses.asdict(settings) if isinstance(settings, AttackConfig) else {**dataclasses.asdict(AttackConfig()), **settings}
    return {k: v for k, v in values.items() if k not in NOT_RESULTS}


def attacker_names(s: AttackConfig) -> list[str]:
    return [name.strip() for name in s.attackers.split(",") if name.strip()]


def tv_weights(s: AttackConfig) -> list[float]:
    return [float(w) for w in s.tv_weights.split(",") if w.strip()]


def validate_attack(s: AttackConfig) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(f"attack settings: {msg}")

    names = attacker_names(s)
    valid = attackers()
    unknown = [n for n in names if n not in valid]
    need(not unknown, f"unknown attacker(s) {', '.join(unknown)} in '{s.attackers}'; valid: {', '.join(valid)}")
    need(len(set(names)) == len(names), f"attackers lists a name twice: '{s.attackers}'")
    need(bool(names) or s.whitebox, "no attacker to run: give --attackers or leave --whitebox on")
    need(s.width >= 0, f"width must be >= 0 (0 = the run's width), got {s.width}")
    need(s.max_epochs >= 1, f"max_epochs must be >= 1, got {s.max_epochs}")
    need(s.patience >= 1, f"patience must be >= 1, got {s.patience}")
    need(s.min_delta >= 0, f"min_delta must be >= 0, got {s.min_delta}")
    need(0 < s.validation_fraction < 1, f"validation_fraction must be in (0, 1), got {s.validation_fraction}")
    need(s.lr > 0 and s.whitebox_lr > 0, f"lr and whitebox_lr must be > 0, got {s.lr} and {s.whitebox_lr}")
    need(0 < s.lr_decay <= 1, f"lr_decay must be in (0, 1], got {s.lr_decay}")
    need(s.batch_size >= 2 and s.eval_batch_size >= 1, f"batch_size must be >= 2 and eval_batch_size >= 1, got {s.batch_size} and {s.eval_batch_size}")
    need(s.n_candidates >= 2, f"n_candidates must be >= 2, got {s.n_candidates}")
    need(s.whitebox_images >= 0 and s.whitebox_steps >= 1, f"whitebox_images must be >= 0 and whitebox_steps >= 1, got {s.whitebox_images} and {s.whitebox_steps}")
    try:
        weights = tv_weights(s)
    except ValueError:
        weights = []
    need(bool(weights) and all(w >= 0 for w in weights), f"tv_weights must be comma-separated numbers >= 0, got '{s.tv_weights}'")
    need(s.n_show >= 1, f"n_show must be >= 1, got {s.n_show}")
    need(s.device == "auto" or s.device == "cpu" or s.device.startswith("cuda"), f"device must be auto, cpu or cuda[:N], got '{s.device}'")
    need(str(s.channels_last).lower() in ("auto", *ON, *OFF), f"channels_last must be auto, on or off, got '{s.channels_last}'")


def resolve_settings(overrides: dict) -> AttackConfig:
    """Defaults with `overrides` (field name -> value) applied, validated."""
    names = {f.name for f in dataclasses.fields(AttackConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"attack settings: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    s = dataclasses.replace(AttackConfig(), **overrides)
    validate_attack(s)
    return s


def seed_for(seed: int, *names: str) -> int:
    """A stable seed per (seed, attacker): the same attacker starts alike against both obfuscators."""
    return (seed * 1_000_003 + zlib.crc32("/".join(names).encode()) % 1_000_003) % 2**63  # within torch.manual_seed's range


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
def reconstruct(reconstructor: nn.Module, features: torch.Tensor, batch_size: int) -> torch.Tensor:
    reconstructor.eval()
    return torch.cat([reconstructor(features[i : i + batch_size]) for i in range(0, len(features), batch_size)])


# ----------------------------------------------------------------------------- learned attackers


def fixed_features(obfuscator: nn.Module, data: AttackData, s: AttackConfig) -> tuple[torch.Tensor, torch.Tensor] | None:
    """f(attacker's training images), f(held-out images), computed once for every attacker of one
    obfuscator; None when they cannot be fixed (augmentation, or a random f: new draws per batch)."""
    obfuscator.eval().requires_grad_(False)
    if s.augment or is_random(obfuscator):
        return None
    return feature_maps(obfuscator, data.train, s.eval_batch_size), feature_maps(obfuscator, data.val, s.eval_batch_size)


def fit_attacker(name: str, obfuscator: nn.Module, data: AttackData, s: AttackConfig, width: float, split: int, seed: int, bar=None,
                 fixed: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[nn.Module, list[dict]]:
    """Train reconstructor `name` from scratch on the attacker's own images (Eq. 3, f frozen), with
    early stopping on the held-out part; the learning rate shrinks after each epoch without gain.
    A random f (the noise defence) is applied afresh to every batch: the threat model grants unlimited
    use of f, so the attacker sees a new draw of each image's features every epoch. Every draw is seeded.
    `fixed`: fixed_features, when the caller computed them for several attackers.
    Returns it with its best weights, in eval mode, and its curve (one record per epoch)."""
    device = data.train.device
    fixed = fixed or fixed_features(obfuscator, data, s)
    fresh = fixed is None  # compute f per batch, else once for all
    if fresh:
        torch.manual_seed(seed_for(seed, "held-out"))  # a random f's draw on the held-out images
        train_features, val_features = None, feature_maps(obfuscator, data.val, s.eval_batch_size)
    else:
        train_features, val_features = fixed  # N x C' x H' x W'
    val_images = to_float(data.val)
    torch.manual_seed(seed)  # initialisation, then a random f's draw on every batch
    reconstructor = init_xavier(build_attacker(name, val_features.shape[1], data.train.shape[1], width, split))
    reconstructor.to(device, memory_format=memory_format(s.channels_last, device))
    opt = torch.optim.Adam(reconstructor.parameters(), lr=s.lr)
    generator = torch.Generator(device=device).manual_seed(seed)
    n = len(data.train)
    stop = n - n % s.batch_size  # drop a last partial batch: BatchNorm cannot take a single image
    best, best_state, waited, curve = -math.inf, None, 0, []
    for epoch in range(1, s.max_epochs + 1):
        start_time = time.perf_counter()
        reconstructor.train()
        order = torch.randperm(n, generator=generator, device=device)
        total = torch.zeros((), device=device)
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
            p = psnr(to_float(images), reconstructor(features)).mean()
            opt.zero_grad(set_to_none=True)
            (-p).backward()  # Eq. 3: maximise PSNR
            opt.step()
            if not torch.isfinite(p):
                raise AttackError(f"attacker {name}: non-finite PSNR in epoch {epoch}; lower --lr")
            total += p.detach() * len(idx)
            if bar is not None:
                bar.update(1)
        val = psnr(val_images, reconstruct(reconstructor, val_features, s.eval_batch_size)).mean().item()
        lr = opt.param_groups[0]["lr"]
        improved = val > best + s.min_delta
        if val > best:  # keep the best weights, even when the gain is too small to reset the patience
            best, best_state = val, {k: v.detach().clone() for k, v in reconstructor.state_dict().items()}
        if improved:
            waited = 0
        else:
            waited += 1
            for group in opt.param_groups:  # a plateau: take smaller steps before giving up
                group["lr"] *= s.lr_decay
        # waited: epochs since the last gain of min_delta; below patience at the last epoch = stopped by the cap
        curve.append({"epoch": epoch, "lr": lr, "train_psnr": total.item() / stop, "val_psnr": val, "waited": waited,
                      "seconds": round(time.perf_counter() - start_time, 3)})
        if bar is not None:
            bar.set_postfix(epoch=epoch, val_psnr=f"{val:.2f}", best=f"{best:.2f}")
        if waited >= s.patience:
            break
    if best_state is None:  # every held-out PSNR was NaN: no weights to keep
        raise AttackError(f"attacker {name}: held-out PSNR was not finite in any of its {len(curve)} epochs; lower --lr")
    reconstructor.load_state_dict(best_state)
    return reconstructor.eval(), curve


# ----------------------------------------------------------------------------- scoring


def score(users: torch.Tensor, rows: torch.Tensor, reconstructions: torch.Tensor, candidates: torch.Tensor) -> dict:
    """PSNR (Eq. 1), SSIM and re-identification of reconstructions of users[rows].
    users: float P x C x H x W; rows: M indices; reconstructions: M x C x H x W; candidates: M x N."""
    originals = users[rows.to(users.device)]
    p = psnr(originals, reconstructions)
    ranks = reid_ranks(reconstructions, users, candidates)
    ranks_std = reid_ranks(reconstructions, users, candidates, standardise=True)
    return {
        "psnr_mean": p.mean().item(),
        "psnr_std": p.std().item() if len(p) > 1 else 0.0,
        "ssim_mean": ssim(originals, reconstructions).mean().item(),
        "reid_top1": top_k_rate(ranks, 1),
        "reid_top5": top_k_rate(ranks, 5),
        "reid_std_top1": top_k_rate(ranks_std, 1),  # the same match after standardising each image per channel
        "reid_std_top5": top_k_rate(ranks_std, 5),
        "n_candidates": candidates.shape[1],
        "n_images": len(rows),
    }


def attack_obfuscator(obfuscator: nn.Module, data: AttackData, s: AttackConfig, width: float, split: int, candidates: torch.Tensor, label: str, log=print) -> tuple[dict, dict]:
    """Every attacker against one frozen obfuscator. Returns {attacker: scores (with its curve)} and
    {attacker: reconstructions of the first n_show users' images} for the figures."""
    users = to_float(data.users)
    all_rows = torch.arange(len(users))
    user_features = stored_features(obfuscator, data.users, s, label)
    results, shown = {}, {}
    steps = (len(data.train) // s.batch_size) * s.max_epochs
    fixed = fixed_features(obfuscator, data, s)
    for name in attacker_names(s):
        start = time.perf_counter()
        with progress_bar(steps, f"{label} {name}", s.progress) as bar:
            reconstructor, curve = fit_attacker(name, obfuscator, data, s, width, split, seed_for(s.seed, name), bar, fixed)
        rebuilt = reconstruct(reconstructor, user_features, s.eval_batch_size)
        results[name] = {**score(users, all_rows, rebuilt, candidates), "epochs": len(curve), "best_epoch": _best_epoch(curve),
                         "stopped": "patience" if curve[-1]["waited"] >= s.patience else "cap",
                         "seconds_per_epoch": round(sum(r["seconds"] for r in curve) / len(curve), 2),
                         "seconds": round(time.perf_counter() - start, 1), "curve": curve}
        shown[name] = rebuilt[: s.n_show].cpu()
        capped_note = ", stopped by the cap, not by patience" if results[name]["stopped"] == "cap" else ""
        log(f"  {label:10s} {name:8s} {_line(results[name])}  ({len(curve)} epochs{capped_note}, best {results[name]['best_epoch']}, "
            f"{results[name]['seconds_per_epoch']:.1f} s/epoch, {results[name]['seconds']:.0f} s)")
    if s.whitebox:
        start = time.perf_counter()
        m = len(users) if s.whitebox_images == 0 else min(s.whitebox_images, len(users))
        n_batches = math.ceil(m / s.eval_batch_size)
        n_tune = len(tv_weights(s)) if len(tv_weights(s)) > 1 else 0
        torch.manual_seed(seed_for(s.seed, label, WHITEBOX))  # a random f's draws while tuning and inverting
        with progress_bar((n_batches + n_tune) * s.whitebox_steps, f"{label} {WHITEBOX}", s.progress) as bar:
            tv_weight, tuning = choose_tv_weight(obfuscator, data.val, data.mean_image, tv_weights(s), s.whitebox_steps, s.whitebox_lr, s.eval_batch_size, bar)
            rebuilt, curve = invert(obfuscator, user_features[:m], data.mean_image, tv_weight, s.whitebox_steps, s.whitebox_lr, s.eval_batch_size, bar)
        results[WHITEBOX] = {
            **score(users, all_rows[:m], rebuilt, candidates[:m]), "steps": s.whitebox_steps, "tv_weight": tv_weight,
            "tv_tuning_psnr": tuning, "seconds": round(time.perf_counter() - start, 1), "curve": curve,
        }
        shown[WHITEBOX] = rebuilt[: s.n_show].cpu()
        log(f"  {label:10s} {WHITEBOX:8s} {_line(results[WHITEBOX])}  ({m} images, {s.whitebox_steps} steps, TV weight {tv_weight:g}, {results[WHITEBOX]['seconds']:.0f} s)")
    return results, shown


def _best_epoch(curve: list[dict]) -> int:
    return max(curve, key=lambda r: r["val_psnr"])["epoch"]


def _line(r: dict) -> str:
    return f"PSNR {r['psnr_mean']:6.2f} +- {r['psnr_std']:.2f} dB  SSIM {r['ssim_mean']:.3f}  top-1 {r['reid_top1']:6.1%}  top-5 {r['reid_top5']:6.1%}"


def linkage(obfuscator: nn.Module, users: torch.Tensor, candidates: torch.Tensor, s: AttackConfig, label: str) -> dict:
    """Linkage by feature matching: an attacker holding the candidate images, with the use of f, computes
    f(candidate) itself (its own draw of a random f) and ranks each stored feature map's candidates by the
    MSE between feature maps. Scored as re-identification (rank of the true image), but no image is rebuilt.
    users: uint8 P x C x H x W (every candidate is one of them); candidates: P x N, column 0 the true one."""
    start = time.perf_counter()
    stored = stored_features(obfuscator, users, s, label)  # the same draws the attackers are given
    torch.manual_seed(seed_for(s.seed, label, LINKAGE))
    own = feature_maps(obfuscator, users, s.eval_batch_size)  # the attacker's f(candidate), P x C' x H' x W'
    ranks = reid_ranks(stored, own, candidates)
    return {"reid_top1": top_k_rate(ranks, 1), "reid_top5": top_k_rate(ranks, 5), "n_candidates": candidates.shape[1], "n_images": len(candidates),
            "seconds": round(time.perf_counter() - start, 1)}


def floor_scores(data: AttackData, candidates: torch.Tensor) -> dict:
    """The best constant image (the attacker-split mean image) as every user's reconstruction."""
    users = to_float(data.users)
    constant = data.mean_image.expand_as(users)
    r = score(users, torch.arange(len(users)), constant, candidates)
    return {"psnr": r["psnr_mean"], "ssim": r["ssim_mean"], **r}


def class_means(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """num_classes x C x H x W: the mean of the attacker's own images of each class (its overall mean
    for a class it has none of)."""
    x = to_float(images)
    overall = x.mean(0)
    return torch.stack([x[labels == c].mean(0) if (labels == c).any() else overall for c in range(num_classes)])


@torch.no_grad()
def predicted_labels(obfuscator: nn.Module, classifier: nn.Module, users: torch.Tensor, s: AttackConfig) -> torch.Tensor:
    """The classes the run's own classifier reads from the users' stored feature maps."""
    features = stored_features(obfuscator, users, s, "defended")
    classifier.eval()
    return torch.cat([classifier(features[i : i + s.eval_batch_size]).argmax(1) for i in range(0, len(features), s.eval_batch_size)])


def class_floor_scores(means: torch.Tensor, users: torch.Tensor, labels: dict[str, torch.Tensor], candidates: torch.Tensor) -> dict:
    """The label as the only leak: each user's image rebuilt as the attacker's mean image of a class,
    the user's true class ('true': what any store that classifies perfectly gives away) or the class the
    run's classifier reads from its stored map ('predicted': what this store's label alone gives away)."""
    x = to_float(users)
    return {k: score(x, torch.arange(len(x)), means[v.to(means.device)], candidates) for k, v in labels.items()}


def under_trained(result: dict) -> list[str]:
    """'defended/simrec'-style names of attackers whose PSNR is below the constant-image floor."""
    floor = result[FLOOR]["psnr"]
    return [f"{which}/{name}" for which in OBFUSCATORS for name, r in result.get(which, {}).items() if r["psnr_mean"] < floor]


def capped(result: dict) -> list[str]:
    """'defended/simrec'-style names of attackers that max_epochs stopped before patience ran out: they may
    still have been gaining, so their figures are a lower bound on what they can do."""
    return [f"{which}/{name}" for which in OBFUSCATORS for name, r in result.get(which, {}).items() if r.get("stopped") == "cap"]


# ----------------------------------------------------------------------------- a run


def without_idle_noise(obfuscator: nn.Module) -> nn.Module:
    """The obfuscator's layers less a noise layer of sigma 0 (it adds nothing), the others under their own
    names: a noise run's undefended obfuscator then fingerprints like any other run's pretrained one."""
    kept = ((name, m) for name, m in obfuscator.named_children() if not (isinstance(m, GaussianNoise) and not m.on))
    return nn.Sequential(OrderedDict(kept))


def ceiling_key(obfuscator: nn.Module, data_fingerprint: str, s: AttackConfig, width: float, split: int) -> str:
    """sha256 of what the undefended attack depends on: the obfuscator's function (the fingerprint of its
    weights and BatchNorm statistics, without an idle noise layer), the data, and the settings."""
    inputs = {"obfuscator": fingerprint(without_idle_noise(obfuscator)), "data": data_fingerprint, "settings": result_settings(s), "width": width, "split": split}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def read_ceilings(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise AttackError(f"{path}: not a readable ceilings file ({e}); remove it to attack the undefended obfuscators again") from None


def finished_run(run_dir: str | Path, s: AttackConfig, device: str | torch.device = "cpu") -> tuple[Run, int]:
    """The run loaded, and the number of steps its plan has; refused while its training has not finished
    (unless s.allow_unfinished): an unfinished obfuscator is not the one the run's numbers are about."""
    run = load_run(run_dir, device)
    total = len(plan(run.config.train))
    if run.step < total and not s.allow_unfinished:
        raise AttackError(
            f"{run_dir}: training has not finished (step {run.step} of {total}); finish it with `veil train --resume {run_dir}`, "
            f"or pass --allow-unfinished to attack it as it is"
        )
    return run, total


def ceiling_run(run: Run, s: AttackConfig, data_fingerprint: str, device: torch.device) -> Run:
    """The run whose undefended obfuscator is the ceiling: `run` itself, or s.ceiling, which must have
    been trained on the same images (the users, and the attacker's own images, must be the same ones)."""
    if not s.ceiling or not s.undefended:
        return run
    other = load_run(s.ceiling, device)
    theirs = data_mod.fingerprint(load_splits(other.config.data, other.config.seed))
    if theirs != data_fingerprint:
        raise AttackError(f"--ceiling {s.ceiling}: trained on other images than {run.path} (data fingerprint {theirs[:16]}... against "
                          f"{data_fingerprint[:16]}...); a ceiling must be measured on the same users' and attacker's images")
    return other


def saved_attack(run_dir: str | Path, s: AttackConfig, obfuscator_fingerprint: str) -> tuple[dict | None, str]:
    """RUN_DIR/attack/attack.json when it stands for attacking the obfuscator of this fingerprint with settings
    `s` (the same result settings), else None and the reason it does not."""
    path = Path(run_dir) / "attack" / "attack.json"
    if not path.is_file():
        return None, f"{path} does not exist"
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None, f"{path} is not readable JSON"
    if result_settings(saved.get("settings", {})) != result_settings(s):
        return None, f"{path} was made with other settings"
    if saved.get("obfuscator_fingerprint") != obfuscator_fingerprint:
        return None, f"{path} was made against another obfuscator (the run trained on, or was retrained, since)"
    return saved, ""


def attack(run_dir: str | Path, s: AttackConfig, log=print, ceilings: str | Path | None = None) -> dict:
    """Attack a run's final (and undefended) obfuscator; write RUN_DIR/attack/ and return the result.

    `ceilings` names a JSON file shared by runs that start from the same pretrained split (a sweep):
    the undefended attack is looked up there by `ceiling_key` and computed only when missing.
    """
    validate_attack(s)
    run_dir = Path(run_dir)
    began = time.perf_counter()
    device = resolve_device(s.device)
    run, total = finished_run(run_dir, s, device)
    cfg = run.config
    splits = load_splits(cfg.data, cfg.seed)  # the same three splits the run used
    reference = ceiling_run(run, s, data_mod.fingerprint(splits), device)
    if s.undefended and reference.undefended_obfuscator is None:
        raise AttackError(f"{reference.path}: no checkpoints/undefended/obfuscator.safetensors (pretraining not finished?); pass --no-undefended to skip the ceiling")
    for net in (run.obfuscator, run.classifier, reference.undefended_obfuscator):  # the layout changes speed, not weights
        if net is not None:
            net.to(memory_format=memory_format(s.channels_last, device))
    data = attack_data(splits.attacker.images.to(device), splits.test.images.to(device), splits.natural, s)
    if len(data.users) < 2:
        raise AttackError(f"{run_dir}: re-identification needs at least 2 users' (test) images, the run has {len(data.users)}")
    n_candidates = min(s.n_candidates, len(data.users))
    candidates = draw_candidates(torch.arange(len(data.users)), len(data.users), n_candidates, torch.Generator().manual_seed(s.seed))
    log(
        f"veil attack: {run_dir} ({splits.name}, training reconstructor {cfg.model.reconstructor}, defence {describe(cfg)}): "
        f"attackers train on {len(data.train)} of their own images ({len(data.val)} held out), users' images {len(data.users)}, "
        f"re-identification among {n_candidates}, device {device}"
    )
    result: dict = {
        "run": str(run_dir),
        "dataset": splits.name,
        "training_reconstructor": cfg.model.reconstructor,
        "defence": describe(cfg),
        "lambda_privacy": cfg.train.lambda_privacy,
        "step": run.step,  # the checkpoint attacked: phase-epochs done, of the plan's `steps`
        "steps": total,
        "obfuscator_fingerprint": fingerprint(run.obfuscator),  # the defended obfuscator attacked
        "n_attacker_train": len(data.train),
        "n_attacker_val": len(data.val),
        "n_users": len(data.users),
        "chance": {"top1": 1 / n_candidates, "top5": min(5, n_candidates) / n_candidates},
        FLOOR: floor_scores(data, candidates),
        LINKAGE: {},
    }
    log(f"  {'floor':10s} {'mean':8s} {_line(result[FLOOR])}")
    means = class_means(splits.attacker.images.to(device), splits.attacker.labels.to(device), run.num_classes)
    labels = {"true": splits.test.labels, "predicted": predicted_labels(run.obfuscator, run.classifier, data.users, s)}
    result[CLASS_FLOOR] = class_floor_scores(means, data.users, labels, candidates)
    for k, r in result[CLASS_FLOOR].items():
        log(f"  {'class':10s} {k:10s} {_line(r)}")
    figures: dict[str, dict] = {}
    for which, obfuscator, model in (("defended", run.obfuscator, cfg.model), ("undefended", reference.undefended_obfuscator, reference.config.model)):
        width = s.width or model.width  # attackers as wide as the networks they attack; upsampling as deep as their cut
        if which == "undefended" and not s.undefended:
            result[which] = {}
            continue
        result[LINKAGE][which] = linkage(obfuscator, data.users, candidates, s, which)
        log(f"  {which:10s} {LINKAGE:8s} top-1 {result[LINKAGE][which]['reid_top1']:6.1%}  top-5 {result[LINKAGE][which]['reid_top5']:6.1%}  "
            f"(feature matching: the attacker computes f(candidate))")
        shared = which == "undefended" and ceilings is not None
        if shared:
            key = ceiling_key(obfuscator, data_mod.fingerprint(splits), s, width, model.split)
            known = read_ceilings(Path(ceilings))
            if key in known:
                result[which], result["undefended_from"] = known[key]["result"], known[key]["run"]
                log(f"  undefended: the same obfuscator, data and settings as {known[key]['run']}; its results reused")
                continue
        same = which == "undefended" and fingerprint(without_idle_noise(obfuscator)) == fingerprint(without_idle_noise(run.obfuscator))
        if same:  # defence none: the undefended obfuscator is the defended one, attacked already with these settings
            result[which], result["undefended_from"] = copy.deepcopy(result["defended"]), f"{run_dir} (its defended obfuscator: the same weights)"
            figures[which] = figures["defended"]
            log("  undefended: the same weights as the defended obfuscator; its results reused")
        else:
            result[which], figures[which] = attack_obfuscator(obfuscator, data, s, width, model.split, candidates, which, log)
        if shared:
            known = read_ceilings(Path(ceilings))  # re-read: the file is only ever added to
            known[key] = {"run": str(run_dir), "result": result[which]}
            atomic_write_json(Path(ceilings), known)
    if reference is not run:
        result["ceiling_run"] = str(reference.path)  # the undefended columns are that run's pretrained obfuscator
    # What each obfuscator's classifier scores, beside what its features give away.
    result["accuracy"] = {"defended": run.summary.get("final_test_accuracy"), "undefended": reference.summary.get("pretrain_test_accuracy")}
    result["under_trained"] = under_trained(result)
    result["capped"] = capped(result)
    result.update(
        settings=dataclasses.asdict(s), seed=s.seed, attacker_width=s.width or cfg.model.width, device=str(device), seconds=round(time.perf_counter() - began, 1),
        date=time.strftime("%Y-%m-%d"), veil_version=__version__, torch_version=torch.__version__, torch_threads=torch.get_num_threads(),
    )
    out = run_dir / "attack"
    write_outputs(out, result, to_float(data.users[: s.n_show]).cpu(), figures)
    return result


# ----------------------------------------------------------------------------- Table 3


def attack_matrix(run_dirs: list[str | Path], s: AttackConfig, out_dir: str | Path, log=print) -> dict:
    """Attack each run (reusing RUN/attack/attack.json when it was made with the same settings against the
    same obfuscator) and write the attack x training reconstructor PSNR matrix of the defended obfuscators (Table 3).
    Every run must have finished training (unless s.allow_unfinished), before any is attacked."""
    validate_attack(s)
    fingerprints = [fingerprint(finished_run(run_dir, s)[0].obfuscator) for run_dir in run_dirs]
    results = []
    for run_dir, fp in zip(run_dirs, fingerprints):
        previous, why = saved_attack(run_dir, s, fp)
        if previous:
            log(f"veil attack: reusing {Path(run_dir) / 'attack' / 'attack.json'} (same settings, same obfuscator)")
            results.append(previous)
        else:
            if (Path(run_dir) / "attack" / "attack.json").is_file():
                log(f"veil attack: {why}; attacking {run_dir} again")
            results.append(attack(run_dir, s, log))
    columns = [f"{r['training_reconstructor']} ({Path(r['run']).name})" for r in results]
    rows = attacker_names(s) + ([WHITEBOX] if s.whitebox else [])
    matrix = {
        "rows": rows,
        "columns": columns,
        "psnr": {row: {col: r["defended"][row]["psnr_mean"] for col, r in zip(columns, results)} for row in rows},
        "floor": {col: r[FLOOR]["psnr"] for col, r in zip(columns, results)},
        "undefended": {row: {col: r["undefended"][row]["psnr_mean"] if row in r.get("undefended", {}) else None for col, r in zip(columns, results)} for row in rows},
        "runs": [r["run"] for r in results],
        "lambda_privacy": {col: r["lambda_privacy"] for col, r in zip(columns, results)},
        "defence": {col: defence_label(r) for col, r in zip(columns, results)},
        "settings": dataclasses.asdict(s),
        "seed": s.seed,
    }
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "matrix.json", matrix)
    atomic_write_text(out_dir / "matrix.csv", matrix_csv(matrix))
    atomic_write_text(out_dir / "matrix.md", matrix_markdown(matrix))
    return matrix
