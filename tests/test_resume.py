"""`veil train` in a subprocess, killed (SIGKILL) or stopped (SIGTERM) at exact points, then resumed.

The resumed run must end bit for bit where an uninterrupted run ends: summary, every metrics
line (but its timing) and every checkpoint file. All processes run one CPU thread, because the
reduction order (and so the last bits) of a convolution depends on the thread count.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tests.faults import ROOT, env, folder_bytes, latest_step, run_train, tiny_config_dict, without_seconds, write_tiny_npz

from veil import rundir
from veil.config import from_dict
from veil.data import load_splits
from veil.train import plan

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of the tiny config, and what each test needs to repeat it."""
    root = tmp_path_factory.mktemp("reference")
    cfg = tiny_config_dict(write_tiny_npz(root / "tiny.npz", root / "cache"))
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run = root / "run"
    done = run_train("none", ["--config", str(config), "--out", str(run)])
    assert done.returncode == 0, done.stderr
    c = from_dict(cfg)
    per_epoch = len(load_splits(c.data, c.seed).defender) // c.train.batch_size  # optimiser steps per phase-epoch
    return {"config": config, "run": run, "steps": len(plan(c.train)), "per_epoch": per_epoch}


def assert_same_as_reference(run: Path, reference: dict) -> None:
    ref = reference["run"]
    a, b = json.loads((ref / "summary.json").read_text()), json.loads((run / "summary.json").read_text())
    assert without_seconds([a]) == without_seconds([b])
    assert without_seconds(rundir.read_metrics(ref)) == without_seconds(rundir.read_metrics(run))
    last = f"step-{reference['steps']:05d}"
    for folder in (last, "undefended"):
        want, got = folder_bytes(ref / "checkpoints" / folder), folder_bytes(run / "checkpoints" / folder)
        assert want.keys() == got.keys()
        for name in want:
            assert want[name] == got[name], f"{folder}/{name} differs from the uninterrupted run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(p.name for p in (ref / "checkpoints").iterdir())


def test_sigkill_anywhere_then_resume_is_bit_for_bit(reference, tmp_path):
    run, spe = tmp_path / "run", reference["per_epoch"]
    resume = ["--resume", str(run)]

    # 1. A plain `python -m veil train`, SIGKILLed from outside as soon as it has loaded the data.
    proc = subprocess.Popen(
        [sys.executable, "-m", "veil", "train", "--config", str(reference["config"]), "--out", str(run)],
        env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout.readline().startswith("veil train:")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    proc.stdout.close(), proc.stderr.close()

    # 2. Kills inside each phase, at a given optimiser step (counted from the resume point),
    #    then in the windows between the files of a checkpoint. (step index, fault) pairs:
    kills = [
        (1, "opt", 2),  # pretrain, epoch 2, after 2 batches
        (2, "opt", 3),  # reconstructor warm-up, after 3 batches
        (3, "opt", 1),  # (a) obfuscator+classifier on Eq. 2
        (4, "opt", 2),  # (b) reconstructor on Eq. 3
        (5, "opt", 2),  # (c) obfuscator on Eq. 2
        (5, "replace", "optim-obfuscator_classifier.safetensors:1"),  # (c) done, metrics line written, checkpoint half written
        (6, "replace", "latest.json:2"),  # final refit done, step folder renamed, latest.json not yet moved
        (7, "replace", "summary.json:1"),  # every step done, summary not yet written
    ]
    hit = []
    for step, kind, where in kills:
        done = latest_step(run)
        if kind == "opt":
            if step * spe + where <= done * spe:
                continue  # the outside kill of part 1 landed later than this point
            spec = f"kill@opt:{step * spe + where - done * spe}"
        else:
            spec = f"kill@replace:{where}"
        p = run_train(spec, resume)
        assert p.returncode == -signal.SIGKILL, (spec, p.returncode, p.stderr[-2000:])
        assert latest_step(run) == step, (spec, latest_step(run))  # the kill landed inside this step
        # Whatever survives a kill is whole: the newest checkpoint passes its sha256 check.
        rundir.read_info(rundir.latest_step_dir(run))
        hit.append(spec)
    assert len(hit) >= len(kills) - 1

    p = run_train("none", resume)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert_same_as_reference(run, reference)


def test_sigterm_stops_at_next_safe_point_and_resume_completes(reference, tmp_path):
    run, spe = tmp_path / "run", reference["per_epoch"]
    args = ["--config", str(reference["config"]), "--out", str(run)]

    # SIGTERM during phase (a) (step index 3): it finishes and saves that phase-epoch, then exits.
    start = time.perf_counter()
    p = run_train(f"term@opt:{3 * spe + 1}", args)
    assert p.returncode == 128 + signal.SIGTERM, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert f"stopped after step 4 of {reference['steps']} (saved); continue with `veil train --resume {run}`" in p.stderr
    assert latest_step(run) == 4 and len(rundir.read_metrics(run)) == 4
    assert not (run / "summary.json").exists()

    # A second signal stops at once (Ctrl-C twice): nothing of the step in progress is kept.
    p = run_train("term@opt:1,2", ["--resume", str(run)])
    assert p.returncode == 130, p.stderr[-2000:]
    assert "interrupted" in p.stderr and "Traceback" not in p.stderr
    assert latest_step(run) == 4 and len(rundir.read_metrics(run)) == 4
    rundir.read_info(rundir.latest_step_dir(run))

    p = run_train("none", ["--resume", str(run)])
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resuming" in p.stdout
    assert_same_as_reference(run, reference)
    print(f"sigterm test: {time.perf_counter() - start:.1f} s")
