"""`veil attack --search`: one fixed learning rate and width per attacker is not "the strongest".

Each decoder is trained at every (learning rate, width) point of search_grid (the default point
first), each from scratch and early-stopped as usual, until search_seconds are spent (a point once
started is finished); the one with the best held-out PSNR on the attacker's own images is kept and
scored on the users'. The grid, each point's held-out PSNR and seconds, and the choice go to attack.json.
"""

from __future__ import annotations

import dataclasses
import time

from torch import nn

from veil.attack.attackers import AttackData, fit_attacker
from veil.attack.settings import AttackConfig, search_grid


def search_attacker(name: str, obfuscator: nn.Module, data: AttackData, s: AttackConfig, width: float, split: int, seed: int, bar=None,
                    fixed=None) -> tuple[nn.Module, list[dict], dict]:
    """fit_attacker at each grid point within the budget; the best by held-out PSNR, its curve, and the search's record."""
    began = time.perf_counter()
    points, best = [], None
    for lr_times, width_times in search_grid(s):
        point = {"lr": s.lr * lr_times, "width": width * width_times}
        if points and time.perf_counter() - began >= s.search_seconds:
            points.append({**point, "skipped": "budget spent"})
            continue
        start = time.perf_counter()
        reconstructor, curve = fit_attacker(name, obfuscator, data, dataclasses.replace(s, lr=point["lr"]), point["width"], split, seed, bar, fixed)
        point.update(val_psnr=max(r["val_psnr"] for r in curve), epochs=len(curve), seconds=round(time.perf_counter() - start, 1))
        points.append(point)
        if best is None or point["val_psnr"] > best[2]["val_psnr"]:
            best = (reconstructor, curve, point)
    reconstructor, curve, chosen = best
    record = {"grid": points, "chosen": {"lr": chosen["lr"], "width": chosen["width"]}, "budget_seconds": s.search_seconds,
              "seconds": round(time.perf_counter() - began, 1)}
    return reconstructor, curve, record
