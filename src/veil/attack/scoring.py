"""Scoring: PSNR (Eq. 1), SSIM and re-identification of reconstructions, the constant-image and class floors,
linkage (the attacker's own f(candidate) against the stored maps), and the flags for under-trained or capped attackers."""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from veil.attack.attackers import AttackData, is_random, stored_features
from veil.attack.results import FLOOR, LINKAGE, OBFUSCATORS
from veil.attack.settings import AttackConfig, seed_for
from veil.data import to_float
from veil.metrics import expected_top_k, match_counts, psnr, ssim, top_k_rate
from veil.runtime import feature_maps

# ----------------------------------------------------------------------------- scoring


def reid_rates(queries: torch.Tensor, pool: torch.Tensor, candidates: torch.Tensor, prefix: str = "reid", standardise: bool = False) -> dict:
    """Top-1 and top-5 re-identification, ties split uniformly (a j-way tie at the top scores 1/j: an attacker
    guessing among equally close candidates), beside the same rates with every tie counted against the
    attacker (`_lower`, a lower bound) and the share of queries whose true candidate ties with another."""
    ahead, tied = match_counts(queries, pool, candidates, standardise=standardise)
    return {
        f"{prefix}_top1": expected_top_k(ahead, tied, 1),
        f"{prefix}_top5": expected_top_k(ahead, tied, 5),
        f"{prefix}_top1_lower": top_k_rate(1 + ahead + tied, 1),
        f"{prefix}_top5_lower": top_k_rate(1 + ahead + tied, 5),
        f"{prefix}_tied": (tied > 0).float().mean().item(),
    }


def score(users: torch.Tensor, rows: torch.Tensor, reconstructions: torch.Tensor, candidates: torch.Tensor) -> dict:
    """PSNR (Eq. 1), SSIM and re-identification of reconstructions of users[rows], by pixel MSE and after
    standardising each image per channel (`reid_std_*`: a match on shapes, not brightness or colour cast).
    users: float P x C x H x W; rows: M indices; reconstructions: M x C x H x W; candidates: M x N."""
    originals = users[rows.to(users.device)]
    p = psnr(originals, reconstructions)
    return {
        "psnr_mean": p.mean().item(),
        "psnr_std": p.std().item() if len(p) > 1 else 0.0,
        "ssim_mean": ssim(originals, reconstructions).mean().item(),
        **reid_rates(reconstructions, users, candidates),
        **reid_rates(reconstructions, users, candidates, "reid_std", standardise=True),
        "n_candidates": candidates.shape[1],
        "n_images": len(rows),
    }


# A doubling of few draws can move the rate by less than its standard error by chance while the template is
# still noisy (measured: 2 draws at sigma 3 looked settled, 16 were not); below this many, doubling goes on.
MIN_TEMPLATE_DRAWS = 16


def linkage(obfuscator: nn.Module, users: torch.Tensor, candidates: torch.Tensor, s: AttackConfig, label: str, copies: dict[str, torch.Tensor] | None = None) -> dict:
    """Linkage by feature matching: an attacker holding the candidate images, with the use of f, computes
    f(candidate) itself and ranks each stored feature map's candidates by the MSE between feature maps.
    Scored as re-identification (rank of the true image, ties split), but no image is rebuilt.
    A random f (noise): unlimited use of f lets the attacker average M draws of f(candidate) into the noise-free
    template, instead of comparing one draw with another (which doubles the noise in the distance); M doubles
    from 1 until, at MIN_TEMPLATE_DRAWS or more, a doubling moves the top-1 rate by less than its standard error
    (or M reaches s.linkage_max_draws).
    `copies` ({kind: changed copies of users}, copies.changed_copies): the attacker holds another photo of each
    user instead of the image itself and matches f(copy) against the store (tracking across photos): one
    rate per kind under "changed". Also the entropy of the stored maps (code_entropy).
    users: uint8 P x C x H x W (every candidate is one of them); candidates: P x N, column 0 the true one."""
    start = time.perf_counter()
    stored = stored_features(obfuscator, users, s, label)  # the same draws the attackers are given
    torch.manual_seed(seed_for(s.seed, label, LINKAGE))
    result = _match(obfuscator, stored, users, candidates, s)
    if copies:
        result["changed"] = {}
        for kind, images in copies.items():
            torch.manual_seed(seed_for(s.seed, label, LINKAGE, kind))
            r = _match(obfuscator, stored, images, candidates, s, draws=result["draws"])  # the template size the exact copy needed
            result["changed"][kind] = {k: r[k] for k in ("reid_top1", "reid_top5", "reid_top1_lower", "draws")}
    return {**result, **code_entropy(stored), "n_candidates": candidates.shape[1], "n_images": len(candidates),
            "seconds": round(time.perf_counter() - start, 1)}


def _match(obfuscator: nn.Module, stored: torch.Tensor, images: torch.Tensor, candidates: torch.Tensor, s: AttackConfig, draws: int | None = None) -> dict:
    """Re-identification of each stored map among its candidates by f(images) (the attacker's template: one
    evaluation of a deterministic f, the mean of M draws of a random one, see linkage; `draws` fixes M)."""
    if draws is not None and draws > 1:
        total = sum(feature_maps(obfuscator, images, s.eval_batch_size) for _ in range(draws))
        return {**reid_rates(stored, total / draws, candidates), "draws": draws, "draws_settled": True}
    total, draws = feature_maps(obfuscator, images, s.eval_batch_size), 1  # the attacker's f(candidate), P x C' x H' x W'
    rates = reid_rates(stored, total, candidates)
    while is_random(obfuscator) and draws < s.linkage_max_draws:
        more = min(draws, s.linkage_max_draws - draws)
        for _ in range(more):
            total += feature_maps(obfuscator, images, s.eval_batch_size)
        draws += more
        new = reid_rates(stored, total / draws, candidates)
        p = new["reid_top1"]
        settled = draws >= MIN_TEMPLATE_DRAWS and abs(new["reid_top1"] - rates["reid_top1"]) < max(math.sqrt(p * (1 - p) / len(candidates)), 1 / len(candidates))
        rates = new
        if settled:
            break
    settled = not is_random(obfuscator) or draws < s.linkage_max_draws  # ended by the rule, not by the most draws allowed
    return {**rates, "draws": draws, "draws_settled": settled}


def code_entropy(stored: torch.Tensor) -> dict:
    """The empirical entropy of the stored maps over the users' store, in bits per item: a deterministic
    quantiser's codes repeat, and log2(classes) is what a label store holds. At most log2(items), reached
    when every item is distinct (as float features always are)."""
    _, counts = torch.unique(stored.flatten(1), dim=0, return_counts=True)
    p = counts.double() / len(stored)
    return {"code_entropy_bits": float(-(p * p.log2()).sum()), "distinct_codes": len(counts)}


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
    """'defended/simrec'-style names of attackers whose PSNR is below the constant-image floor of the users
    they were scored on (the white-box inverts only the first users: its own floor_psnr)."""
    floor = result[FLOOR]["psnr"]
    return [f"{which}/{name}" for which in OBFUSCATORS for name, r in result.get(which, {}).items() if r["psnr_mean"] < r.get("floor_psnr", floor)]


def capped(result: dict) -> list[str]:
    """'defended/simrec'-style names of attackers that max_epochs stopped before patience ran out: they may
    still have been gaining, so their figures are a lower bound on what they can do."""
    return [f"{which}/{name}" for which in OBFUSCATORS for name, r in result.get(which, {}).items() if r.get("stopped") == "cap"]


def unconverged(result: dict) -> dict[str, list[str]]:
    """{'defended/simrec': its flags} for every learned attacker with a convergence flag (attackers.convergence_flags):
    its figures are a lower bound, not a privacy claim."""
    return {f"{which}/{name}": r["flags"] for which in OBFUSCATORS for name, r in result.get(which, {}).items() if r.get("flags")}
