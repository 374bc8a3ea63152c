"""Where a frontier point's CPU time goes: torch.profiler over a short version of each of its three parts.

    python benchmarks/profile_point.py [--config configs/private-cifar10.yaml] [--out profile] [--top 15]

The three parts of a point, each cut short (the per-step costs are what matter, not the epoch counts):
training (`veil train`, 2 pretraining epochs, 1 warm-up epoch of the training reconstructor, no rounds), the attack (`veil attack`, one
attacker of each kind the default set holds, 2 epochs each, no white-box) and the store classifier
(`veil obfuscate` of the defender and users' images, then `veil train-classifier`, 2 epochs). For each
part: its wall time, the share of it inside the matrix products (convolutions, linear layers and their
gradients), inside every other PyTorch operator, and outside any operator (Python, data handling), then
the operators with the most self time. Needs the data set (VEIL_DATA_DIR) as the config names it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from veil.cli import main as veil

# Operators whose self time is matrix-product work (forward and backward, oneDNN or BLAS).
MATRIX_OPS = ("conv", "mkldnn_convolution", "addmm", "mm", "bmm", "matmul", "linear", "_convolution")


def is_matrix(name: str) -> bool:
    name = name.removeprefix("aten::")
    return any(name == op or name.startswith(op) for op in MATRIX_OPS)


def profiled(argv: list[str]) -> tuple[float, list]:
    """Run one veil command under the profiler: (wall seconds, operator averages)."""
    began = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        code = veil(argv)
    wall = time.perf_counter() - began
    if code:
        raise SystemExit(f"veil {' '.join(argv)} exited with {code}")
    return wall, prof.key_averages()


def summarise(name: str, parts: list[tuple[float, list]], top: int) -> dict:
    wall = sum(w for w, _ in parts)
    ops: dict[str, float] = {}
    for _, averages in parts:
        for a in averages:
            ops[a.key] = ops.get(a.key, 0.0) + a.self_cpu_time_total / 1e6
    # Self times of nested operators add up to the time inside any operator; with two threads an
    # operator's self time is its wall time on the calling thread, so the shares are of wall time.
    inside = sum(ops.values())
    matrix = sum(t for k, t in ops.items() if is_matrix(k))
    row = {"part": name, "wall_s": round(wall, 2), "matrix_s": round(matrix, 2), "other_ops_s": round(inside - matrix, 2),
           "outside_ops_s": round(max(0.0, wall - inside), 2),
           "top": [{"op": k, "self_s": round(t, 2), "matrix": is_matrix(k)} for k, t in sorted(ops.items(), key=lambda kv: -kv[1])[:top]]}
    print(f"\n## {name}: {wall:.1f} s wall; matrix products {matrix:.1f} s ({matrix / wall:.0%}), other operators "
          f"{inside - matrix:.1f} s ({(inside - matrix) / wall:.0%}), outside any operator {max(0.0, wall - inside):.1f} s "
          f"({max(0.0, wall - inside) / wall:.0%})")
    print("| operator | self s | share of wall |\n| --- | ---: | ---: |")
    for r in row["top"]:
        print(f"| {r['op']}{' (matrix)' if r['matrix'] else ''} | {r['self_s']:.2f} | {r['self_s'] / wall:.1%} |")
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/private-cifar10.yaml")
    p.add_argument("--out", default="profile", help="scratch folder (replaced)")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--attackers", default="simrec,resrec,unet", help="attackers to profile (2 epochs each)")
    args = p.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    run = str(out / "run")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    rows = [summarise("training (2 pretraining epochs)", [profiled(
        ["train", "--config", args.config, "--out", run, "train.pretrain_epochs=2", "train.warmup_epochs=1", "train.t_main=0",
         "device=cpu", "progress=false"])], args.top)]
    rows.append(summarise(f"attack ({args.attackers}, 2 epochs each)", [profiled(
        ["attack", run, "--attackers", args.attackers, "--max-epochs", "2", "--no-whitebox", "--no-undefended",
         "--device", "cpu", "--no-progress"])], args.top))
    stores = [profiled(["obfuscate", "--run", run, "--data", f"run:{split}", "--out", str(out / split), "--device", "cpu", "--no-progress"])
              for split in ("defender", "test")]
    stores.append(profiled(["train-classifier", str(out / "defender"), "--test-store", str(out / "test"), "--out", str(out / "head"),
                            "--epochs", "2", "--device", "cpu", "--no-progress"]))
    rows.append(summarise("store classifier (obfuscate both splits, 2 epochs)", stores, args.top))
    (out / "profile.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
