"""veil sweep: one run per lambda, resumable, attacked, and the frontier it plots and reports."""

from __future__ import annotations

import json
import sys

import pytest

from test_report import QUIET, attacker_entry, make_tiny_npz, tiny_cfg, write_attack
from veil import config as config_mod
from veil import rundir
from veil.config import ConfigError
from veil.report import report
from veil.sweep import DEFENCES, frontier_rows, parse_strengths, point_name, read_sweep, sweep
from veil.train import plan


def test_parse_strengths():
    assert parse_strengths("0, 0.1,1,1,3") == [0.0, 0.1, 1.0, 3.0]
    for bad, msg in (("0,x", "'x' is not a number"), ("-1", "must be >= 0"), ("", "is not a number")):
        with pytest.raises(ConfigError, match=msg):
            parse_strengths(bad)
    assert point_name("adversarial", 0.1) == "lambda-0.1" and point_name("adversarial", 3.0) == "lambda-3"
    assert DEFENCES["adversarial"].overrides(0.3) == ["train.lambda_privacy=0.3"]


def summary_attack(run_dir) -> None:
    """Stands in for the harness: the run's own training reconstructor as the one 'attacker'."""
    s = json.loads((run_dir / "summary.json").read_text())
    write_attack(run_dir, {"simrec": attacker_entry(s["final_test_psnr"])}, {"simrec": attacker_entry(s["undefended_test_psnr"])})


def test_sweep_trains_attacks_resumes_and_reports(tmp_path, monkeypatch):
    npz = make_tiny_npz(tmp_path / "tiny.npz")
    config = tmp_path / "tiny.yaml"
    config.write_text(config_mod.to_yaml(tiny_cfg(npz)))
    out = tmp_path / "sweep"
    attacked: list[str] = []

    def attack(run_dir):
        attacked.append(run_dir.name)
        summary_attack(run_dir)

    # Kill the sweep three checkpoints into the second run (lambda = 1).
    steps = len(plan(tiny_cfg(npz).train))
    real_save, calls = rundir.save_checkpoint, {"n": 0}

    def crash(*args, **kwargs):
        real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == steps + 3:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(rundir, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        sweep(config, [0.0, 1.0], out, ["t_main=2"], attack=attack, **QUIET)
    monkeypatch.setattr(rundir, "save_checkpoint", real_save)
    assert attacked == ["lambda-0"] and not (out / "lambda-1" / "summary.json").exists()

    logs: list[str] = []
    rows = sweep(config, [0.0, 1.0], out, ["t_main=2"], attack=attack, log=logs.append)
    assert "veil sweep: lambda-0 already trained" in logs and "veil sweep: resuming lambda-1 (lambda = 1)" in logs
    assert attacked == ["lambda-0", "lambda-1"]  # lambda 0 was not attacked twice
    assert len(rundir.read_metrics(out / "lambda-1")) == steps
    for name, lam in (("lambda-0", 0.0), ("lambda-1", 1.0)):
        assert config_mod.load(out / name / "config.yaml").train.lambda_privacy == lam

    # The frontier: each point's accuracy and its strongest attacker, read back from the runs.
    assert [r["name"] for r in rows] == ["lambda-0", "lambda-1"]
    for r in rows:
        s = json.loads((out / r["name"] / "summary.json").read_text())
        assert r["test_accuracy"] == s["final_test_accuracy"] and r["psnr"] == s["final_test_psnr"]
        assert r["psnr_attacker"] == "simrec" and r["floor_psnr"] == 11.0 and r["n_candidates"] == 100
    assert json.loads((out / "frontier.json").read_text()) == rows
    assert (out / "frontier.csv").read_text().splitlines()[0].startswith("name,defence,strength,test_accuracy")
    assert (out / "frontier.png").stat().st_size > 1000

    # Finished and attacked: a rerun trains and attacks nothing.
    monkeypatch.setattr(sys.modules["veil.train"], "train", lambda *a, **k: pytest.fail("a finished run was retrained"))
    assert sweep(config, [0.0, 1.0], out, ["t_main=2"], attack=lambda d: pytest.fail("attacked twice"), **QUIET) == rows
    # Another config in the same directory is refused, naming the key.
    with pytest.raises(ConfigError, match="model.width: run has 0.0625, sweep asks 0.125"):
        sweep(config, [0.0], out, ["t_main=2", "width=0.125"], attack=attack, **QUIET)
    assert [p.name for p in read_sweep(out)["points"]] == ["lambda-0", "lambda-1"]

    # `veil report DIR` of the sweep: the frontier heads the page, then both runs.
    md = report([out], tmp_path / "report", **QUIET)["markdown"].read_text()
    assert "Utility-privacy frontier: sweep" in md and "report-frontier-sweep.png" in md
    assert "| adversarial | lambda = 0 |" in md and "| adversarial | lambda = 1 |" in md
    assert "| lambda-0 |" in md and "| lambda-1 |" in md
    assert frontier_rows(out) == rows
