"""Changed copies of the users' pictures: what an attacker tracking a person across photos holds.

Linkage from an exact copy asks whether a stored item can be tied to the very image it was made
from; tracking needs more: another photo of the same scene. Each entry turns uint8 images
N x C x H x W into changed copies of the same shape, deterministically:

    flip      mirrored left to right
    shift     moved 2 pixels right and 2 down, the uncovered border repeating the edge
    jpeg      re-encoded as JPEG at quality 50 (Pillow's encoder, 4:2:0 chroma for colour)
    brighter  every value 10% higher, clipped at 255

A new kind of copy is one function here and one entry in COPIES.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def flip(images: torch.Tensor) -> torch.Tensor:
    return images.flip(-1)


def shift(images: torch.Tensor, pixels: int = 2) -> torch.Tensor:
    padded = F.pad(images.float(), (pixels, 0, pixels, 0), mode="replicate")  # new rows/columns at the top and left
    return padded[..., : images.shape[-2], : images.shape[-1]].round().to(images.dtype)


def jpeg(images: torch.Tensor, quality: int = 50) -> torch.Tensor:
    out = []
    for x in images.cpu().permute(0, 2, 3, 1).numpy():  # H x W x C uint8
        picture = Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x)
        buf = io.BytesIO()
        picture.save(buf, format="JPEG", quality=quality)
        decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert(picture.mode))
        out.append(decoded[..., None] if decoded.ndim == 2 else decoded)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous().to(images.device)


def brighter(images: torch.Tensor, factor: float = 1.1) -> torch.Tensor:
    return (images.float() * factor).round().clamp(0, 255).to(images.dtype)


COPIES = {"flip": flip, "shift": shift, "jpeg": jpeg, "brighter": brighter}


def changed_copies(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """{kind: the changed copies of `images`} for every kind in COPIES."""
    return {name: change(images) for name, change in COPIES.items()}
