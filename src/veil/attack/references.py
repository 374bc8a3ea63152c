"""The reference stores that bound every configuration, scored by the same rules as the attackers.

    image store  keep the images: every attacker's answer is the image itself (PSNR at its 100 dB
                 clamp, SSIM 1, re-identified and linked by pixels); all the utility, no privacy
    label store  keep only the class that a classifier trained on the same defender images reads
                 (the pretrained f and g of the ceiling run, else of the run itself): an attacker's best
                 image is the mean of its own images of that class, and linkage can only match labels
                 (every candidate of the same class ties); privacy at the class floor by construction
    logits store the same classifier's logits (float16), the label store's variant that keeps how sure the
                 classifier is: the attacker's image is the mean of its own images whose logits are nearest
                 (how many chosen on its held-out images), and linkage matches logits; its privacy is
                 measured, not the class floor by construction

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
from veil.metrics import psnr
from veil.runtime import read_classes, read_logits

IMAGE, LABEL, LOGITS = "image", "label", "logits"
NEIGHBOURS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # the logits store's attacker: how many nearest images it may average
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


def nearest_mean(queries: torch.Tensor, keys: torch.Tensor, images: torch.Tensor, k: int) -> torch.Tensor:
    """The mean of the k images whose keys are nearest (L2) each query. queries: M x D, keys: N x D, images: float N x C x H x W."""
    chunk = max(1, 2**24 // (k * images[0].numel()))  # at most 2^24 gathered pixel values at once
    out = []
    for q in queries.split(chunk):
        nearest = torch.cdist(q, keys).topk(k, dim=1, largest=False).indices
        out.append(images[nearest].mean(1))
    return torch.cat(out)


def logits_store(obfuscator: nn.Module, classifier: nn.Module, own: torch.Tensor, held_out: torch.Tensor, users: torch.Tensor,
                 true_labels: torch.Tensor, copies: dict[str, torch.Tensor], candidates: torch.Tensor, batch_size: int) -> dict:
    """The classifier's logits kept as float16: each user's image rebuilt as the mean of the attacker's own images
    (own, uint8) with the nearest logits, as many as score best on its held-out images (held_out, uint8); linkage
    by the nearest logits. `neighbours` is the number chosen, `accuracy` how often the logits' class is the true one."""
    read = lambda x: read_logits(obfuscator, classifier, x, batch_size).half().float()  # noqa: E731  (what a float16 store holds)
    keys, images = read(own), to_float(own)
    val_keys, val = read(held_out), to_float(held_out)
    ks = [k for k in NEIGHBOURS if k <= len(own)]
    k = max(ks, key=lambda k: psnr(val, nearest_mean(val_keys, keys, images, k)).mean().item())
    stored = read(users)
    as_map = lambda z: z.double()[:, :, None, None]  # noqa: E731  (N x classes x 1 x 1: logits as a map, for the linkage rules)
    held = {"exact": as_map(stored), **{kind: as_map(read(c)) for kind, c in copies.items()}}
    x = to_float(users)
    return {**score(x, torch.arange(len(x)), nearest_mean(stored, keys, images, k).to(x.device), candidates),
            "linkage": _linkage(as_map(stored), held, candidates), "accuracy": (stored.argmax(1).cpu() == true_labels.cpu()).float().mean().item(),
            "neighbours": k, "bytes_per_item": 2 * stored.shape[1]}
