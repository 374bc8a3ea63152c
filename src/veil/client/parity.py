"""How far a client's output is from PyTorch's (the ClientModel it was exported from; for an int8 client, its
agreement with the float obfuscator).

For codes: items whose every code is equal, values that differ, and how many of those lie on a rounding boundary
(the value before rounding within BOUNDARY of k + 1/2, where two correct float computations may round either way).
For float16 features: values bit for bit equal, the largest absolute and relative difference, and items within the tolerance
|a - b| <= FLOAT_RTOL |b| + FLOAT_ATOL (about two float16 steps at the features' scale).
"""

from __future__ import annotations

import torch

from veil.client.model import ClientModel

BOUNDARY = 1e-4  # distance of the value before rounding from k + 1/2, in code units
FLOAT_RTOL, FLOAT_ATOL = 2e-3, 1e-3


@torch.inference_mode()
def compare(reference: ClientModel, client_run, images: torch.Tensor, batch_size: int = 500) -> dict:  # noqa: ANN001
    """client_run(uint8 images) against the PyTorch reference on the same images."""
    items = equal = values = differ = on_boundary = exact = 0
    max_abs = max_rel = max_code = 0.0
    for s in range(0, len(images), batch_size):
        x = images[s : s + batch_size]
        ours = client_run(x)
        x_ref = x if reference.input_kind == "uint8" else x.to(torch.float32) / 255
        theirs = reference(x_ref)
        if ours.shape != theirs.shape or ours.dtype != theirs.dtype:
            raise ValueError(f"client output {tuple(ours.shape)} {ours.dtype}, reference {tuple(theirs.shape)} {theirs.dtype}")
        items, values = items + len(x), values + ours.numel()
        if reference.bits:
            wrong = ours != theirs
            y = reference.scaled(x_ref)
            on_boundary += int((wrong & ((y - y.floor() - 0.5).abs() < BOUNDARY)).sum())
            max_code = max(max_code, float((ours.to(torch.int64) - theirs.to(torch.int64)).abs().max()))
        else:
            a, b = ours.to(torch.float32), theirs.to(torch.float32)
            gap = (a - b).abs()
            wrong = gap > FLOAT_RTOL * b.abs() + FLOAT_ATOL
            exact += int((a == b).sum())
            max_abs = max(max_abs, float(gap.max()))
            max_rel = max(max_rel, float((gap / b.abs().clamp_min(1e-3)).max()))
        differ += int(wrong.sum())
        equal += int((~wrong).flatten(1).all(1).sum())
    result = {"items": items, "items_equal": equal, "items_equal_fraction": equal / max(items, 1), "values": values, "values_differ": differ}
    if reference.bits:
        result |= {"max_code_difference": int(max_code), "values_differ_on_boundary": on_boundary,
                   "values_differ_off_boundary": differ - on_boundary}
    else:
        result |= {"values_exactly_equal": exact, "max_abs_difference": max_abs, "max_rel_difference": max_rel, "tolerance": {"rtol": FLOAT_RTOL, "atol": FLOAT_ATOL}}
    return result
