"""Fault injection for the kill/resume tests: run `veil train` in a subprocess and stop it at an exact point.

    python tests/faults.py SPEC train --config FILE --out RUN ...
    python tests/faults.py SPEC erase STORE --ids ID ...      (any veil command)

SPEC says when this process signals itself (a real signal, so nothing of Python's cleanup runs on SIGKILL):
    none                      run normally
    kill@opt:N                SIGKILL right after the N-th optimiser step of this process (mid-phase)
    term@opt:N[,M]            SIGTERM after optimiser steps N (and M: a second signal)
    kill@replace:SUFFIX:N     SIGKILL just before the N-th os.replace onto a path ending in SUFFIX
                              (a checkpoint half written, latest.json not yet moved, summary not yet written);
                              an empty SUFFIX (kill@replace::N) counts every rename
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM}


def install(spec: str) -> None:
    if spec == "none":
        return
    action, _, where = spec.partition("@")
    sig = SIGNALS[action]
    count = [0]
    if where.startswith("opt:"):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        targets = {int(n) for n in where[len("opt:") :].split(",")}

        def hook(optimizer, args, kwargs) -> None:  # noqa: ANN001
            count[0] += 1
            if count[0] in targets:
                os.kill(os.getpid(), sig)

        register_optimizer_step_post_hook(hook)
    elif where.startswith("replace:"):
        suffix, n = where[len("replace:") :].rsplit(":", 1)
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):  # noqa: ANN001, ANN202
            if str(dst).endswith(suffix):
                count[0] += 1
                if count[0] == int(n):
                    os.kill(os.getpid(), sig)
            return real_replace(src, dst, *args, **kwargs)

        os.replace = replace
    else:
        raise SystemExit(f"unknown fault spec {spec!r}")


# ----------------------------------------------------------------------------- helpers for the tests


def env() -> dict[str, str]:
    """One thread everywhere: bit-for-bit equality needs the same reduction order in every process."""
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }


def run_train(spec: str, args: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    return run_veil(spec, ["train", *args], timeout)


def run_veil(spec: str, args: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(Path(__file__)), spec, *args]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def write_tiny_npz(path: Path, cache: Path) -> Path:
    """The same 240 real CIFAR-10 images as conftest's tiny_npz."""
    from tests.conftest import DEMO_NPZ

    from veil.data import read_npz

    images, labels, classes = read_npz(DEMO_NPZ, cache)
    idx = np.sort(np.random.default_rng(0).choice(len(labels), 240, replace=False))
    np.savez(path, images=images[idx], labels=labels[idx], classes=np.array(classes))
    return path


def tiny_config_dict(npz: Path) -> dict:
    """conftest's tiny_config: width 1/16, 7 phase-epochs (pretrain x2, warm-up, (a), (b), (c), final refit)."""
    return {
        "data": {"dataset": "npz", "path": str(npz), "test_fraction": 0.25, "attacker_fraction": 0.25},
        "model": {"width": 0.0625, "dropout": 0.0},
        "train": {"pretrain_epochs": 2, "warmup_epochs": 1, "t_main": 1, "t_sub": 1, "batch_size": 32, "eval_batch_size": 64, "lambda_privacy": 1.0},
        "seed": 0,
        "device": "cpu",
        "progress": False,
    }


def latest_step(run: Path) -> int:
    pointer = run / "checkpoints" / "latest.json"
    return json.loads(pointer.read_text())["step"] if pointer.is_file() else 0


def without_seconds(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


if __name__ == "__main__":
    install(sys.argv[1])
    from veil.cli import main

    sys.exit(main(sys.argv[2:]))
