"""How far runs of the tiny test config drift apart when only the order of float32 additions differs.

    python tests/distributed_spread.py [WORKDIR]      (about 2 minutes on 2 cores)

Trains conftest's tiny config (7 phase-epochs) as one process under several kernel settings
(1 or 2 threads, ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA: each changes how sums are grouped,
nothing else), then as two processes (torchrun, gloo) under four of them. Prints the largest
difference between the one-process runs (the spread that tests/test_distributed.py's drift bounds
are multiples of) and, per setting, two processes against one. Not a test; `differences` is
shared with tests/test_distributed.py so that the spread and the bound measure the same thing.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

ONE_PROCESS = {  # name -> environment; every name a different grouping of the same float32 sums
    "native, 1 thread": {"OMP_NUM_THREADS": "1"},
    "native, 2 threads": {"OMP_NUM_THREADS": "2"},
    "aten=avx2": {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "avx2"},
    "aten=default": {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default"},
    "aten=default, 2 threads": {"OMP_NUM_THREADS": "2", "ATEN_CPU_CAPABILITY": "default"},
    "onednn=AVX2": {"OMP_NUM_THREADS": "1", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "aten=avx2, onednn=AVX2": {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}
TWO_PROCESSES = ["native, 1 thread", "aten=avx2", "aten=default", "onednn=AVX2"]  # each process one thread

STEP_FIGURES = ("loss", "ce", "train_psnr", "test_psnr")
ACCURACIES = ("train_accuracy", "test_accuracy")
SUMMARY_PSNR = ("undefended_test_psnr", "final_test_psnr", "last_obfuscator_phase_test_psnr")
SUMMARY_ACCURACY = ("pretrain_test_accuracy", "final_test_accuracy")


def final_state(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    """network -> its last checkpoint's tensors (parameters and BatchNorm buffers)."""
    from veil import rundir
    from veil.io import load_tensors

    step = rundir.latest_step_dir(run)
    return {n: load_tensors(step / f"{n}.safetensors") for n in rundir.NETWORKS}


def differences(a: Path, b: Path) -> dict[str, float]:
    """Largest differences between two finished runs of the same config:

    first      relative, the first phase-epoch's loss and ce
    step       relative, every phase-epoch's loss, ce, train_psnr, test_psnr
    weights    relative L2 norm of the difference of each network's floating-point state, largest network
    element    absolute, largest difference of one weight or BatchNorm buffer
    psnr       dB, the summary's PSNR figures
    accuracy   absolute, every accuracy of the metrics and the summary
    """
    from veil import rundir

    wa, wb = final_state(a), final_state(b)
    ma, mb = rundir.read_metrics(a), rundir.read_metrics(b)
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (a, b))
    assert len(ma) == len(mb) and all(p.keys() == q.keys() for p, q in zip(ma, mb))

    def rel(x: float, y: float) -> float:
        return abs(x - y) / abs(x)

    floats = {n: [k for k, v in wa[n].items() if v.is_floating_point()] for n in wa}
    return {
        "first": max(rel(ma[0][f], mb[0][f]) for f in ("loss", "ce")),
        "step": max(rel(p[f], q[f]) for p, q in zip(ma, mb) for f in STEP_FIGURES if f in p),
        "weights": max(
            (
                sum(((wa[n][k] - wb[n][k]) ** 2).sum() for k in floats[n]).sqrt() / sum((wa[n][k] ** 2).sum() for k in floats[n]).sqrt()
            ).item()
            for n in wa
        ),
        "element": max((wa[n][k] - wb[n][k]).abs().max().item() for n in wa for k in floats[n]),
        "psnr": max(abs(sa[f] - sb[f]) for f in SUMMARY_PSNR),
        "accuracy": max(
            [abs(p[f] - q[f]) for p, q in zip(ma, mb) for f in ACCURACIES if f in p] + [abs(sa[f] - sb[f]) for f in SUMMARY_ACCURACY]
        ),
    }


def _largest(pairs: list[dict[str, float]]) -> dict[str, float]:
    return {k: max(p[k] for p in pairs) for k in pairs[0]}


def main(work: Path) -> None:
    from tests.faults import tiny_config_dict, write_tiny_npz

    from veil import config as config_mod

    work.mkdir(parents=True, exist_ok=True)
    npz = write_tiny_npz(work / "tiny.npz", work / "cache")
    config = work / "tiny.yaml"
    cfg = config_mod.from_dict(tiny_config_dict(npz))
    cfg.train.channels_last = "off"  # as test_two_processes_match_one_and_resume: NCHW, whose BatchNorm sums precisely
    config.write_text(config_mod.to_yaml(cfg))
    base = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for key in ("OMP_NUM_THREADS", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"):
        base.pop(key, None)

    def train(name: str, env: dict[str, str], nproc: int) -> Path:
        out = work / f"{nproc}p-{name.replace(' ', '').replace(',', '-').replace('=', '')}"
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
        cmd = [sys.executable, *launcher, "-m", "veil", "train", "--config", str(config), "--out", str(out)]
        done = subprocess.run(cmd, env={**base, **env}, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{name} x {nproc}: {done.stderr[-2000:]}")
        return out

    one = {name: train(name, env, 1) for name, env in ONE_PROCESS.items()}
    print(f"torch {torch.__version__}, native CPU capability {torch.backends.cpu.get_cpu_capability()}")
    pairs = [differences(one[x], one[y]) for x, y in itertools.combinations(one, 2)]
    spread = _largest(pairs)
    print(f"spread of {len(one)} one-process runs ({len(pairs)} pairs): " + "  ".join(f"{k} {v:.2e}" for k, v in spread.items()))
    for name in TWO_PROCESSES:
        d = differences(one[name], train(name, ONE_PROCESS[name], 2))
        print(f"2 processes vs 1, {name:24s}: " + "  ".join(f"{k} {v:.2e}" for k, v in d.items()))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "src"))
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="veil-spread-")))
