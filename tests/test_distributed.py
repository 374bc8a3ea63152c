"""Multi-process training through torchrun, with gloo on CPU: BatchNorm across processes,
two processes against one with the same global batch, process 0 alone writing, and resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from veil import config as config_mod
from veil import rundir
from veil.io import load_tensors
from veil.train import plan, train

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A command with this checkout's src/ first on the path and one thread per process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def torchrun(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args], tmp_path)


def test_batchnorm_statistics_span_the_processes(tmp_path):
    """GlobalBatchNorm2d on two halves = BatchNorm2d on the whole batch: outputs, gradients, running stats."""
    out = tmp_path / "bn.safetensors"
    done = torchrun([str(WORKER), "batchnorm", str(out)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    got = load_tensors(out)
    torch.manual_seed(0)
    x = (torch.randn(8, 3, 4, 4) * 3 + 1).requires_grad_(True)
    weights = torch.randn(8, 3, 4, 4)
    bn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
    y = bn(x)
    (weights * y).sum().backward()
    torch.testing.assert_close(got["y"], y.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["grad_x"], x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["grad_wb"], torch.cat([bn.weight.grad, bn.bias.grad]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["running_mean"], bn.running_mean)
    torch.testing.assert_close(got["running_var"], bn.running_var)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    step = rundir.latest_step_dir(run)
    return {f"{n}.{k}": v for n in rundir.NETWORKS for k, v in load_tensors(step / f"{n}.safetensors").items()}


@pytest.mark.slow
def test_two_processes_match_one_and_resume(tiny_config, tmp_path):
    cfg = tiny_config
    cfg.train.pretrain_epochs = 2
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(config_mod.to_yaml(cfg))
    n_steps = len(plan(cfg.train))

    # One process, global batch 32, one thread like each torchrun process.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train(cfg, tmp_path / "one", log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)

    # Two processes, 16 images each of the same batches of 32.
    done = torchrun(["-m", "veil", "train", "--config", str(config_file), "--out", str(tmp_path / "two")], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("veil train: ") == 1 and "x 2 processes" in done.stdout  # process 0 alone logs
    metrics = rundir.read_metrics(tmp_path / "two")
    assert [m["step"] for m in metrics] == list(range(n_steps))  # process 0 alone writes, once per step
    double = json.loads((tmp_path / "two" / "summary.json").read_text())

    # Same arithmetic up to float32 summation order (per-process sums, then all-reduce).
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=k)
    for k in ("pretrain_test_accuracy", "final_test_accuracy"):
        assert abs(single[k] - double[k]) <= 1 / 60 + 1e-9, k  # at most one of the 60 test images differs
    for k in ("undefended_test_psnr", "final_test_psnr"):
        assert single[k] == pytest.approx(double[k], abs=0.02), k
    for m1, m2 in zip(rundir.read_metrics(tmp_path / "one"), metrics):
        assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-3, abs=1e-3), m1["phase"]

    # Kill process 0 after its third checkpoint, then resume with `veil train --nproc 2`.
    crashed = torchrun([str(WORKER), "crash", "3", "--", "train", "--config", str(config_file), "--out", str(tmp_path / "three")], tmp_path)
    assert crashed.returncode != 0
    assert len(rundir.read_metrics(tmp_path / "three")) == 3
    resumed = run([sys.executable, "-m", "veil", "train", "--nproc", "2", "--resume", str(tmp_path / "three")], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout and "after step 3 of" in resumed.stdout
    c = _weights(tmp_path / "three")
    for k in b:
        assert torch.equal(b[k], c[k]), k  # resumed = uninterrupted, bit for bit
    assert [m["step"] for m in rundir.read_metrics(tmp_path / "three")] == list(range(n_steps))
