"""The two reference stores that bound every configuration, scored by the same rules as the attackers.

    image store  keep the images: every attacker's answer is the image itself (PSNR at its 100 dB
                 clamp, SSIM 1, re-identified and linked by pixels); all the utility, no privacy
    label store  keep only the class that a classifier trained on the same defender images reads
                 (the pretrained f and g of the ceiling run, else of the run itself): an attacker's best
                 image is the mean of its own images of that class, and linkage can only match labels
                 (every candidate of the same class ties); privacy at the class floor by construction

Each is a dict of the same fields as an attacker's scores, plus linkage (exact and from changed
copies), the entropy of what it stores and its bytes per item, under attack.json's
"reference_stores". What a later classifier learns from each is `veil growth`'s part.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from veil.attack.scoring import code_entropy, reid_rates, score
from veil.data import to_float
from veil.runtime import read_classes

IMAGE, LABEL = "image", "label"
COPY_FIELDS = ("reid_top1", "reid_top5", "reid_top1_lower")  # kept per changed copy


def _linkage(stored: torch.Tensor, held: dict[str, torch.Tensor], candidates: torch.Tensor) -> dict:
    """Re-identification of each stored item among its candidates by the attacker's own version of each
    candidate ('exact': the image itself; else a changed copy)."""
    exact = reid_rates(stored, held["exact"], candidates)
    changed = {kind: {k: v for k, v in reid_rates(stored, pool, candidates).items() if k in COPY_FIELDS}
               for kind, pool in held.items() if kind != "exact"}
    return {**exact, "changed": changed, **code_entropy(stored)}


def image_store(users: torch.Tensor, copies: dict[str, torch.Tensor], candidates: torch.Tensor) -> dict:
    """The images kept as they are. users: uint8 P x C x H x W; copies: {kind: changed copies of users}."""
    x = to_float(users)
    held = {"exact": x, **{kind: to_float(c) for kind, c in copies.items()}}
    return {**score(x, torch.arange(len(x)), x, candidates), "linkage": _linkage(x, held, candidates), "bytes_per_item": x[0].numel()}


def label_store(obfuscator: nn.Module, classifier: nn.Module, users: torch.Tensor, true_labels: torch.Tensor, copies: dict[str, torch.Tensor],
                means: torch.Tensor, candidates: torch.Tensor, batch_size: int) -> dict:
    """Only the class kept: the class means as the reconstructions, labels matched for linkage; `accuracy` is
    how often the kept class is the true one. obfuscator, classifier: the pretrained split whose label is kept;
    means: num_classes x C x H x W (the attacker's class means)."""
    labels = read_classes(obfuscator, classifier, users, batch_size)
    k = means.shape[0]
    one_hot = lambda y: F.one_hot(y, k).double()[:, :, None, None]  # noqa: E731  (N x k x 1 x 1: a label as a map)
    held = {"exact": one_hot(labels), **{kind: one_hot(read_classes(obfuscator, classifier, c, batch_size)) for kind, c in copies.items()}}
    x = to_float(users)
    return {**score(x, torch.arange(len(x)), means[labels.to(means.device)], candidates), "linkage": _linkage(one_hot(labels), held, candidates),
            "accuracy": (labels.cpu() == true_labels.cpu()).float().mean().item(), "bytes_per_item": 1}
