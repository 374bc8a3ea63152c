"""veil sweep: one run per lambda, resumable, attacked, and the frontier it plots and reports."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sys

import pytest
import torch
from tests.report.test_report import QUIET, make_tiny_npz, tiny_cfg

from veil import config as config_mod
from veil import rundir
from veil.attack.results import strongest_reid
from veil.cli import main
from veil.config import ConfigError
from veil.data import load_splits
from veil.defences import strength_overrides
from veil.report.frontier import frontier_rows, frontier_table, growth_points, mark_dominated
from veil.report.sections import report
from veil.rundir import load_run
from veil.store.classify import HeadConfig
from veil.sweep import attacked_with, parse_attack_settings, parse_store_settings, parse_strengths, store_classified_with, store_head, sweep
from veil.sweepdir import point_name, read_sweep
from veil.train import plan


def test_parse_strengths():
    assert parse_strengths("0, 0.1,1,1,3") == [0.0, 0.1, 1.0, 3.0]
    for bad, msg in (("0,x", "'x' is not a number"), ("-1", "must be >= 0"), ("", "is not a number")):
        with pytest.raises(ConfigError, match=msg):
            parse_strengths(bad)
    assert point_name("adversarial", 0.1) == "lambda-0.1" and point_name("adversarial", 3.0) == "lambda-3"
    assert point_name("reid", 1.0) == "reid-lambda-1" and point_name("noise", 0.5) == "sigma-0.5"  # reid shares adversarial's lambda
    assert strength_overrides("adversarial", 0.3) == ["train.defence=adversarial", "train.lambda_privacy=0.3"]
    assert strength_overrides("noise", 0.5) == ["train.defence=noise", "train.noise_sigma=0.5"]


def test_the_strongest_re_identification_takes_either_match_rule():
    table = {"simrec": {"reid_top1": 0.03, "reid_std_top1": 0.05}, "unet": {"reid_top1": 0.04, "reid_std_top1": 0.01}}
    assert strongest_reid(table) == ("simrec, standardised", 0.05)
    table["unet"]["reid_top1"] = 0.06
    assert strongest_reid(table) == ("unet", 0.06)
    assert strongest_reid({"unet": {"reid_top1": 0.02}}) == ("unet", 0.02)  # an attack.json made before the rule
    assert strongest_reid({}) is None


def test_mark_dominated_finds_the_points_off_the_frontier():
    def row(name, acc, psnr):
        return {"name": name, "test_accuracy": acc, "psnr": psnr}

    rows = [row("a", 0.70, 20.0), row("b", 0.65, 18.0), row("c", 0.64, 19.0), row("d", 0.70, 21.0), row("e", 0.60, None)]
    mark_dominated(rows)
    assert [r["dominated_by"] for r in rows] == [[], [], ["b"], ["a"], []]  # c: b is more accurate and lower; d: a ties accuracy, lower PSNR
    mark_dominated(rows, lambda r: r["name"].upper())
    assert rows[2]["dominated_by"] == ["B"]
    assert all(r["store_dominated_by"] == [] for r in rows)  # no store accuracies: nothing to compare
    for r, acc in zip(rows, (0.60, 0.66, 0.70, 0.70, None)):  # a store classifier can reorder the points
        r["store_accuracy"] = acc
    mark_dominated(rows)
    assert [r["store_dominated_by"] for r in rows] == [["b", "c"], [], [], ["c"], []]


# `veil attack` turned down to seconds: one attacker, one epoch, a short white-box inversion.
TINY_ATTACK = {"attackers": "simrec", "max_epochs": 1, "batch_size": 16, "n_candidates": 10, "whitebox_images": 8,
               "whitebox_steps": 3, "n_show": 4, "progress": False, "device": "cpu"}


def test_sweep_trains_attacks_resumes_and_reports(tmp_path, monkeypatch):
    npz = make_tiny_npz(tmp_path / "tiny.npz")
    config = tmp_path / "tiny.yaml"
    config.write_text(config_mod.to_yaml(tiny_cfg(npz)))
    out = tmp_path / "sweep"

    # Kill the sweep three checkpoints into the second run (lambda = 1).
    steps = len(plan(tiny_cfg(npz).train))
    real_save, calls = rundir.save_checkpoint, {"n": 0}

    def crash(*args, **kwargs):
        real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == steps + 3:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(rundir, "save_checkpoint", crash)
    logs: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        sweep(config, [0.0, 1.0], out, ["t_main=2"], attack_settings=TINY_ATTACK, log=logs.append)
    monkeypatch.setattr(rundir, "save_checkpoint", real_save)
    assert "veil sweep: attacking lambda-0" in logs and (out / "lambda-0" / "attack" / "attack.json").is_file()
    assert not (out / "lambda-1" / "summary.json").exists()
    # lambda-1 pretrains as lambda-0 did: it started from lambda-0's pretraining instead of repeating it.
    n_pretrain = tiny_cfg(npz).train.pretrain_epochs
    assert f"veil sweep: training lambda-1 (lambda = 1) from lambda-0's pretraining (its {n_pretrain} epochs not repeated)" in logs
    assert json.loads((out / "lambda-1" / "forked.json").read_text())["from"] == str(out / "lambda-0")

    logs = []
    rows = sweep(config, [0.0, 1.0], out, ["t_main=2"], attack_settings=TINY_ATTACK, log=logs.append)
    assert "veil sweep: lambda-0 already trained" in logs and "veil sweep: lambda-0 already attacked" in logs
    assert "veil sweep: resuming lambda-1 (lambda = 1)" in logs and "veil sweep: attacking lambda-1" in logs
    assert len(rundir.read_metrics(out / "lambda-1")) == steps
    for name, lam in (("lambda-0", 0.0), ("lambda-1", 1.0)):
        assert config_mod.load(out / name / "config.yaml").train.lambda_privacy == lam

    # The frontier: each point's accuracy and its strongest attacker, read back from the runs; then the two reference
    # stores, scored as the first point's attack scored them (its users and candidates).
    assert [r["name"] for r in rows] == ["lambda-0", "lambda-1", "image store", "label store", "logits store"]
    references = json.loads((out / "lambda-0" / "attack" / "attack.json").read_text())["reference_stores"]
    image, label, logits = rows[2:]
    assert (image["reference"], label["reference"], logits["reference"]) == ("image", "label", "logits") and image["reid_top1"] == 1.0 and image["linkage_top1"] == 1.0
    assert label["psnr"] == references["label"]["psnr_mean"] and label["store_accuracy"] == references["label"]["accuracy"]
    assert logits["psnr"] == references["logits"]["psnr_mean"] and logits["class_floor_psnr"] == label["psnr"] and logits["bytes_per_item"] == 20
    assert label["bytes_per_item"] == 1 and image["bytes_per_item"] == 3 * 32 * 32 and image["dominated_by"] == label["dominated_by"] == []
    # No --growth: no growth columns anywhere.
    assert all(r["growth_ratio"] is None for r in rows) and "growth ratio" not in frontier_table(rows)[0]
    points = rows[:2]
    for r in points:
        s = json.loads((out / r["name"] / "summary.json").read_text())
        a = json.loads((out / r["name"] / "attack" / "attack.json").read_text())
        assert set(a["defended"]) == {"simrec", "whitebox"} and a["settings"]["max_epochs"] == 1
        assert r["test_accuracy"] == s["final_test_accuracy"]
        # the strongest by its margin above the floor of the users it was scored on (the white-box: only the first ones)
        assert r["psnr"] == max(a["defended"].values(), key=lambda x: x["psnr_mean"] - x.get("floor_psnr", a["floor"]["psnr"]))["psnr_mean"]
        assert r["reid_top1"] == max(x["reid_top1"] for x in a["defended"].values())
        assert r["floor_psnr"] == a["floor"]["psnr"] and r["n_candidates"] == 10
    assert json.loads((out / "frontier.json").read_text()) == rows
    # What each point cost: its parts add up to its total, which the frontier carries.
    for r in points:
        cost = json.loads((out / r["name"] / "cost.json").read_text())
        assert set(cost) == {"train", "attack", "total"} and cost["train"] > 0 and cost["attack"] > 0
        assert cost["total"] == pytest.approx(cost["train"] + cost["attack"], abs=0.11) and r["seconds"] == cost["total"]
    # Both points share their pretraining, so the undefended obfuscator was attacked once (for lambda-0).
    a0, a1 = (json.loads((out / n / "attack" / "attack.json").read_text()) for n in ("lambda-0", "lambda-1"))
    assert "undefended_from" not in a0 and a1["undefended_from"] == str(out / "lambda-0")
    assert a1["undefended"] == a0["undefended"] and len(json.loads((out / "ceilings.json").read_text())) == 1
    assert (out / "frontier.csv").read_text().splitlines()[0].startswith("name,defence,strength,test_accuracy")
    assert (out / "frontier.png").stat().st_size > 1000

    # Finished and attacked with these settings: a rerun trains and attacks nothing.
    monkeypatch.setattr(sys.modules["veil.sweep"], "train", lambda *a, **k: pytest.fail("a finished run was retrained"))
    assert sweep(config, [0.0, 1.0], out, ["t_main=2"], attack_settings=TINY_ATTACK, **QUIET) == rows
    # An attack.json made against another obfuscator (the run trained on, or was retrained, since) does not count.
    assert attacked_with(out / "lambda-1", TINY_ATTACK)
    saved = json.loads((out / "lambda-1" / "attack" / "attack.json").read_text())
    (out / "lambda-1" / "attack" / "attack.json").write_text(json.dumps({**saved, "obfuscator_fingerprint": "0" * 64}))
    assert not attacked_with(out / "lambda-1", TINY_ATTACK) and attacked_with(out / "lambda-0", TINY_ATTACK)
    # Other attack settings: attacked again, not retrained.
    logs = []
    sweep(config, [1.0], out, ["t_main=2"], attack_settings={**TINY_ATTACK, "n_candidates": 8}, log=logs.append)
    assert "veil sweep: attacking lambda-1" in logs and json.loads((out / "lambda-1" / "attack" / "attack.json").read_text())["settings"]["n_candidates"] == 8
    # Another config in the same directory is refused, naming the key, before anything is written.
    with pytest.raises(ConfigError, match="model.width: 0.0625 -> 0.125"):
        sweep(config, [0.0], out, ["t_main=2", "width=0.125"], attack_settings=TINY_ATTACK, **QUIET)
    with pytest.raises(ConfigError, match="unknown setting"):
        sweep(config, [0.0], tmp_path / "other", attack_settings={"epochs": 1}, **QUIET)
    assert not (tmp_path / "other").exists()
    assert [p.name for p in read_sweep(out)["points"]] == ["lambda-0", "lambda-1"]

    # `veil report DIR` of the sweep: the frontier heads the page, then both runs and their attack tables.
    md = report([out], tmp_path / "report", **QUIET)["markdown"].read_text()
    assert "Utility-privacy frontier: sweep" in md and "report-frontier-sweep.png" in md
    assert "| adversarial | lambda = 0 |" in md and "| adversarial | lambda = 1 |" in md
    assert "| lambda-0 |" in md and "| lambda-1 |" in md and "chance (N = 10)" in md and "chance (N = 8)" in md
    assert "| image store |  |" in md and "| label store |  |" in md and "| logits store |  |" in md  # the reference rows of the frontier table
    assert frontier_rows(out)[0] == rows[0]

    # A second sweep with another defence: `veil report A B` overlays both frontiers on one plot.
    monkeypatch.undo()  # training allowed again
    other = tmp_path / "noise-sweep"
    sweep(config, [0.5], other, ["t_main=2"], defence="noise", attack_settings=TINY_ATTACK, **QUIET)
    md = report([out, other], tmp_path / "both", **QUIET)["markdown"].read_text()
    assert "Utility-privacy frontiers side by side: sweep, noise-sweep" in md and "report-frontier-overlay.png" in md
    assert "| noise-sweep | noise | sigma = 0.5 |" in md and "| sweep | adversarial | lambda = 1 |" in md
    assert (tmp_path / "both" / "report-frontier-overlay.png").stat().st_size > 1000
    assert "| SimRec | noise σ=0.5 |" in md and "| SimRec | λ=1 |" in md  # the runs table names each run's defence
    table2 = md[md.index("## Table 2 style"):].split("\n\n")[2]
    assert "| 2 |" in table2 and "n/a" not in table2.split("| 2 |")[1].split("\n")[0]  # the noise run's epochs count as rounds


def test_parse_attack_settings():
    assert parse_attack_settings(["max_epochs=5", "whitebox=false", "attackers=simrec,resrec", "lr=1e-3"]) == {
        "max_epochs": 5, "whitebox": False, "attackers": "simrec,resrec", "lr": 0.001}
    with pytest.raises(ConfigError, match="unknown setting 'epochs'"):
        parse_attack_settings(["epochs=5"])
    with pytest.raises(ConfigError, match="'max_epochs' must be int"):
        parse_attack_settings(["max_epochs=many"])
    with pytest.raises(ConfigError, match="must look like KEY=VALUE"):
        parse_attack_settings(["max_epochs"])


def test_sweep_trains_a_classifier_on_each_points_stored_features(tmp_path, monkeypatch):
    npz = make_tiny_npz(tmp_path / "tiny.npz")
    config = tmp_path / "tiny.yaml"
    config.write_text(config_mod.to_yaml(tiny_cfg(npz)))
    out = tmp_path / "sweep"
    logs: list[str] = []
    rows = sweep(config, [0.0], out, ["t_main=1"], attack_settings=TINY_ATTACK, store_epochs=2, log=logs.append)
    run = out / "lambda-0"
    summary = json.loads((run / "store-classifier" / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["head"] == "vgg16"
    assert summary["train_items"] == len(load_splits(config_mod.load(run / "config.yaml").data, 0).defender)
    assert rows[0]["store_accuracy"] == summary["final_test_accuracy"] and 0 <= rows[0]["store_accuracy"] <= 1
    assert not (run / "store-classifier-stores").exists()  # the stores were temporary
    assert any("a classifier trained on its stored features reaches" in line for line in logs)
    md = report([out], tmp_path / "report", **QUIET)["markdown"].read_text()
    assert "store classifier accuracy" in md and "dominated by (store accuracy)" in md

    # Done with these epochs: not redone; other epochs: redone.
    import veil.sweep as sweep_mod

    real = sweep_mod.store_classifier
    monkeypatch.setattr(sweep_mod, "store_classifier", lambda *a, **k: pytest.fail("the store classifier was retrained"))
    assert sweep(config, [0.0], out, ["t_main=1"], attack_settings=TINY_ATTACK, store_epochs=2, **QUIET)[0]["store_accuracy"] == rows[0]["store_accuracy"]
    monkeypatch.setattr(sweep_mod, "store_classifier", real)
    sweep(config, [0.0], out, ["t_main=1"], attack_settings=TINY_ATTACK, store_epochs=1, **QUIET)
    assert json.loads((run / "store-classifier" / "summary.json").read_text())["epochs"] == 1
    # Other --store settings: redone with them, and recorded in sweep.json.
    sweep(config, [0.0], out, ["t_main=1"], attack_settings=TINY_ATTACK, store_epochs=1, store_settings={"shift": 0, "head": "small"}, **QUIET)
    summary = json.loads((run / "store-classifier" / "summary.json").read_text())
    assert (summary["head"], summary["shift_pixels"], summary["shift_cells"], summary["epochs"]) == ("small", 0, 0, 1)
    assert read_sweep(out)["store_classifier"] == {"epochs": 1, "settings": {"shift": 0, "head": "small"}}
    with pytest.raises(ConfigError, match="--store-classifier must be >= 0"):
        sweep(config, [0.0], out, ["t_main=1"], attack_settings=TINY_ATTACK, store_epochs=-1, **QUIET)


def test_parse_store_settings():
    assert parse_store_settings(["shift=0", "head=small", "lr=1e-3", "batch-size=64"]) == {"shift": 0, "head": "small", "lr": 0.001, "batch_size": 64}
    with pytest.raises(ConfigError, match="the epochs are --store-classifier EPOCHS"):
        parse_store_settings(["epochs=5"])
    with pytest.raises(ConfigError, match="unknown setting 'crop'"):
        parse_store_settings(["crop=4"])
    with pytest.raises(ConfigError, match="'shift' must be int"):
        parse_store_settings(["shift=wide"])
    with pytest.raises(ConfigError, match="must look like KEY=VALUE"):
        parse_store_settings(["shift"])


def test_the_sweeps_store_options_reach_the_head_config(tmp_path, monkeypatch):
    import veil.sweep as sweep_mod

    seen = {}
    monkeypatch.setattr(sweep_mod, "sweep", lambda *a, **k: seen.update(k) or [])
    assert main(["sweep", "--config", "c.yaml", "--lambdas", "0", "--out", str(tmp_path / "s"), "--store-classifier", "3",
                 "--store", "shift=8", "--store", "head=small"]) == 0
    assert seen["store_epochs"] == 3 and seen["store_settings"] == {"shift": 8, "head": "small"}
    cfg = tiny_cfg(tmp_path / "x.npz")
    head = store_head(cfg, seen["store_epochs"], seen["store_settings"])
    assert (head.head, head.shift, head.epochs, head.seed, head.device, head.progress) == ("small", 8, 3, cfg.seed, cfg.device, False)
    assert store_head(cfg, 3).shift == HeadConfig().shift == 4  # no --store: train-classifier's default, 4 pixels
    monkeypatch.undo()
    # Bad settings fail before anything is trained or written.
    with pytest.raises(ConfigError, match=r"--store: --shift must be >= 0 pixels, got -1"):
        sweep(tmp_path / "none.yaml", [0.0], tmp_path / "s", store_epochs=1, store_settings={"shift": -1}, **QUIET)
    with pytest.raises(ConfigError, match="needs --store-classifier EPOCHS"):
        sweep(tmp_path / "none.yaml", [0.0], tmp_path / "s", store_settings={"shift": 0}, **QUIET)
    assert not (tmp_path / "s").exists()


def test_a_store_classifier_made_with_another_shift_is_not_reused(tmp_path):
    import yaml

    def made(run_dir, split, summary, config):
        d = run_dir / "store-classifier"
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps(summary))
        (d / "config.yaml").write_text(yaml.safe_dump(config))
        (d / "classifier.json").write_text(json.dumps({"obfuscator": {"split": split}}))
        return run_dir

    head = lambda **k: HeadConfig(**{"epochs": 2, "device": "cpu", "progress": False, **k})  # noqa: E731
    new = made(tmp_path / "new", 2, {"epochs": 2, "shift_pixels": 4, "shift_cells": 1}, {**dataclasses.asdict(head()), "device": "cuda"})
    assert store_classified_with(new, head())  # the device changes how, not what
    assert not store_classified_with(new, head(shift=0)) and not store_classified_with(new, head(shift=7))  # 7 pixels: asked for, not made
    assert not store_classified_with(new, head(head="small")) and not store_classified_with(new, head(epochs=3))
    # Made before the shift was in pixels: config.yaml's shift 1 was one cell, and no shift in the summary.
    old = {**dataclasses.asdict(head()), "shift": 1}
    at_split_2 = made(tmp_path / "old2", 2, {"epochs": 2}, old)
    assert store_classified_with(at_split_2, head())  # 4 pixels at split 2 are the one cell it trained with
    assert not store_classified_with(at_split_2, head(shift=0))
    at_split_5 = made(tmp_path / "old5", 5, {"epochs": 2}, old)
    assert not store_classified_with(at_split_5, head())  # the one cell it trained with blanked 8 maps in 9: measured again
    assert store_classified_with(at_split_5, head(shift=32))
    assert not store_classified_with(tmp_path / "none", head())


def test_a_defence_without_strength_is_one_point_with_its_costs_on_the_frontier(tmp_path):
    from veil.report.frontier import frontier_table

    config = tmp_path / "tiny.yaml"
    config.write_text(config_mod.to_yaml(tiny_cfg(make_tiny_npz(tmp_path / "tiny.npz"))))
    out = tmp_path / "sweep"
    with pytest.raises(ConfigError, match="--defence none has no strength: it is one point, give --lambdas 0"):
        sweep(config, [0.0, 1.0], out, defence="none", attack_settings=TINY_ATTACK, **QUIET)
    overrides = ["model.bottleneck=orthogonal", "model.bottleneck_channels=3", "model.feature_bits=2", "model.input_norm=channel"]
    row, *_ = sweep(config, [0.0], out, overrides, defence="none", attack_settings=TINY_ATTACK, **QUIET)
    summary = json.loads((out / "none" / "summary.json").read_text())
    assert row["name"] == "none" and row["cut"] == "channel-standardised, split 2, orthogonal k=3, 2 bits"
    assert row["bytes_per_item"] == 3 * 8 * 8 == summary["features"]["bytes_per_item"]  # one byte per 2-bit code
    assert row["client_mflops"] == summary["client"]["mflops"] > 0
    attack = json.loads((out / "none" / "attack" / "attack.json").read_text())
    assert row["ssim"] == max(attack["defended"].values(), key=lambda r: r["ssim_mean"] - r.get("floor_ssim", attack["floor"]["ssim"]))["ssim_mean"]
    assert row["reid_top1"] == max(max(r["reid_top1"], r["reid_std_top1"]) for r in attack["defended"].values())
    # A deterministic f finds every stored map unless two users' 2-bit codes collide (the attacker then guesses among them).
    assert row["linkage_top1"] == attack["linkage"]["defended"]["reid_top1"] > 0.5
    header, cells = frontier_table([row])
    assert dict(zip(header, cells))["bytes / stored image"] == "192" and dict(zip(header, cells))["strength"] == ""
    # One epoch with patience 3: the cap stopped SimRec; the frontier marks an unconverged strongest attacker's PSNR as a lower bound.
    psnr_cell = lambda r: dict(zip(*frontier_table([r])))["strongest attacker PSNR (dB)"]  # noqa: E731
    assert row["capped"] == ["simrec"]
    assert "(SimRec) (cap" in psnr_cell(dict(row, psnr_attacker="simrec")) and row["flags"]["simrec"][0] == "cap"
    assert psnr_cell(dict(row, psnr_attacker="whitebox")).endswith("(white-box)")


def test_a_stopped_sweep_says_to_rerun_it_and_resumes_over_a_moved_data_file(tmp_path, monkeypatch, capsys):
    npz = make_tiny_npz(tmp_path / "tiny.npz")
    config = tmp_path / "tiny.yaml"
    config.write_text(config_mod.to_yaml(tiny_cfg(npz)))
    out = tmp_path / "sweep"
    attack_flags = [f"--attack={k}={v}" for k, v in TINY_ATTACK.items()]
    args = ["sweep", "--config", str(config), "--lambdas", "0", "--out", str(out), *attack_flags, "t_main=1"]

    # SIGTERM during the sweep's training: the message says to rerun the sweep, and the exit code is 128 + 15.
    real_save, calls = rundir.save_checkpoint, {"n": 0}

    def terminated_after_three(*a, **k):
        real_save(*a, **k)
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(rundir, "save_checkpoint", terminated_after_three)
    assert main(args) == 128 + signal.SIGTERM
    monkeypatch.setattr(rundir, "save_checkpoint", real_save)
    err = capsys.readouterr().err
    steps = len(plan(tiny_cfg(npz, t_main=1).train))
    assert f"veil sweep: stopped during lambda-0 after step 3 of {steps} (saved); run the same `veil sweep` command again to continue" in err
    assert "veil train --resume" not in err

    # The data file moved (and fp32 is asked for): the sweep resumes the run where `veil train --resume` would, and attacks it.
    moved = tmp_path / "moved" / "tiny.npz"
    moved.parent.mkdir()
    npz.rename(moved)
    config.write_text(config_mod.to_yaml(tiny_cfg(moved)))
    logs: list[str] = []
    sweep(config, [0.0], out, ["t_main=1", "train.precision=fp32"], attack_settings=TINY_ATTACK, log=logs.append)
    assert "veil sweep: resuming lambda-0 (lambda = 0)" in logs and "veil sweep: attacking lambda-0" in logs
    assert any("the data moved (data.path:" in line for line in logs)
    assert len(rundir.read_metrics(out / "lambda-0")) == steps
    assert config_mod.load(out / "lambda-0" / "config.yaml").data.path == str(moved)

    # Moved again, once finished and attacked: nothing to train or attack.
    again = tmp_path / "again.npz"
    moved.rename(again)
    config.write_text(config_mod.to_yaml(tiny_cfg(again)))
    logs = []
    sweep(config, [0.0], out, ["t_main=1"], attack_settings=TINY_ATTACK, log=logs.append)
    assert "veil sweep: lambda-0 already trained" in logs and "veil sweep: lambda-0 already attacked" in logs

    # The command's summary marks the strongest attacker's PSNR (cap) exactly when the cap stopped it (SimRec: 1 epoch, patience 3).
    capsys.readouterr()
    assert main(args) == 0
    row, *_ = frontier_rows(out)  # then the reference rows
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("lambda-0"))
    assert row["capped"] == ["simrec"] and ("(cap)" in line) == (row["psnr_attacker"] == "simrec")


def test_stored_bytes_reads_old_and_new_summaries():
    from veil.report.frontier import stored_bytes

    assert stored_bytes({"shape": [8, 2, 2], "bits": 4, "stored_as": "uint8", "bytes_per_item": 32}) == 32
    assert stored_bytes({"shape": [8, 2, 2], "bits": 4, "bytes_per_item": 16}) == 32  # an earlier summary counted packed bits
    assert stored_bytes({"shape": [32, 8, 8], "bits": 16, "bytes_per_item": 4096}) == 4096  # float16
    assert stored_bytes({}) is None


def _weights(run_dir):
    from veil.io import load_tensors

    step_dir = rundir.latest_step_dir(run_dir)
    return {n: load_tensors(step_dir / f"{n}.safetensors") for n in rundir.NETWORKS}


def _without_seconds(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_a_forked_point_ends_bit_for_bit_where_a_point_that_pretrained_itself_ends(tmp_path):
    from veil.errors import TrainingError
    from veil.train import fork, pretrains_alike, train

    npz = make_tiny_npz(tmp_path / "tiny.npz")
    donor_cfg = tiny_cfg(npz, lambda_privacy=0.0)
    cfg = tiny_cfg(npz, lambda_privacy=1.0, reconstructor="resrec")  # both act only after pretraining
    train(donor_cfg, tmp_path / "donor", **QUIET)
    train(cfg, tmp_path / "scratch", **QUIET)

    record = fork(tmp_path / "donor", cfg, tmp_path / "forked")
    assert record["from"] == str(tmp_path / "donor") and record["step"] == cfg.train.pretrain_epochs
    assert json.loads((tmp_path / "forked" / "forked.json").read_text()) == record
    assert set(record["undefended"]) == {"obfuscator.safetensors", "classifier.safetensors"}
    train(cfg, tmp_path / "forked", resume=True, **QUIET)

    forked, scratch = _weights(tmp_path / "forked"), _weights(tmp_path / "scratch")
    for net in rundir.NETWORKS:
        assert forked[net].keys() == scratch[net].keys()
        for key in scratch[net]:
            assert torch.equal(forked[net][key], scratch[net][key]), f"{net}.{key}"
    assert _without_seconds(rundir.read_metrics(tmp_path / "forked")) == _without_seconds(rundir.read_metrics(tmp_path / "scratch"))
    # Self-contained: its undefended f and g check against their own sha256s, even with the donor gone.
    shutil.rmtree(tmp_path / "donor")
    assert load_run(tmp_path / "forked").undefended_obfuscator is not None

    # Anything that acts during pretraining (a learning rate) is refused, naming it.
    train(donor_cfg, tmp_path / "donor", **QUIET)
    other = tiny_cfg(npz, lr_obfuscator=0.01)
    assert not pretrains_alike(donor_cfg, other)
    with pytest.raises(TrainingError, match="pretrained otherwise.*train.lr_obfuscator: 0.001 -> 0.01"):
        fork(tmp_path / "donor", other, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    assert pretrains_alike(donor_cfg, tiny_cfg(npz, defence="nopeek", t_main=5, warmup_epochs=3))

    # A defence that adds a layer to f (noise, idle until its rounds) forks from one that adds none, and back.
    noisy = tiny_cfg(npz, defence="noise", noise_sigma=0.5)
    train(noisy, tmp_path / "noise-scratch", **QUIET)
    fork(tmp_path / "donor", noisy, tmp_path / "noise-forked")
    train(noisy, tmp_path / "noise-forked", resume=True, **QUIET)
    fork(tmp_path / "noise-scratch", donor_cfg, tmp_path / "back")
    train(donor_cfg, tmp_path / "back", resume=True, **QUIET)
    for a, b in (("noise-forked", "noise-scratch"), ("back", "donor")):
        wa, wb = _weights(tmp_path / a), _weights(tmp_path / b)
        for net in rundir.NETWORKS:
            assert wa[net].keys() == wb[net].keys() and all(torch.equal(wa[net][k], wb[net][k]) for k in wb[net]), (a, net)
        assert _without_seconds(rundir.read_metrics(tmp_path / a)) == _without_seconds(rundir.read_metrics(tmp_path / b))
        assert load_run(tmp_path / a).undefended_obfuscator is not None


def test_sweep_growth_measures_each_point_with_one_image_store_and_puts_it_on_the_frontier(tmp_path, monkeypatch):
    import veil.store.growth as growth_mod

    config = tmp_path / "tiny.yaml"
    config.write_text(config_mod.to_yaml(tiny_cfg(make_tiny_npz(tmp_path / "tiny.npz"))))
    out = tmp_path / "sweep"
    with pytest.raises(ConfigError, match="--growth-head: .*nohead"):
        sweep(config, [0.0], out, attack_settings=TINY_ATTACK, growth_epochs=1, growth_heads="nohead", **QUIET)
    with pytest.raises(ConfigError, match="--growth must be >= 0"):
        sweep(config, [0.0], out, attack_settings=TINY_ATTACK, growth_epochs=-1, **QUIET)
    with pytest.raises(ConfigError, match="--growth-validation picks the epochs of --growth's classifiers"):
        sweep(config, [0.0], out, attack_settings=TINY_ATTACK, growth_validation=True, **QUIET)
    with pytest.raises(ConfigError, match=r"--growth-validation needs validation images.*data.n_test is 0 \(all\)"):
        sweep(config, [0.0], out, ["data.n_test=0"], attack_settings=TINY_ATTACK, growth_epochs=1, growth_validation=True, **QUIET)
    assert not out.exists()
    trained = []
    real = growth_mod.train_image_classifier
    monkeypatch.setattr(growth_mod, "train_image_classifier", lambda *a: trained.append(a[4]) or real(*a))
    # n_defender 60: what the test and attacker splits leave beyond it is the later split.
    overrides = ["t_main=1", "data.n_defender=60"]
    rows = sweep(config, [0.0, 1.0], out, overrides, attack_settings=TINY_ATTACK, growth_epochs=1, **QUIET)
    assert sorted(d.name for d in trained) == ["image-n", "image-n+m"] and {d.parent for d in trained} == {out / "image-store"}  # once for both points
    by_name = {r["name"]: r for r in rows}
    for name in ("lambda-0", "lambda-1"):
        g = json.loads((out / name / "growth" / "growth.json").read_text())
        later = load_splits(config_mod.load(out / name / "config.yaml").data, 0).later
        assert (g["n"], g["m"], g["epochs"]) == (60, len(later), 1) and len(later) > 0
        features, image, label, logits = g["stores"]
        assert logits["kind"] == "logits" and logits["classifiers"] == ["classifiers/logits-n", "classifiers/logits-n+m"]
        assert image["classifiers"] == [str(out / "image-store" / "image-n"), str(out / "image-store" / "image-n+m")]
        assert image["growth_ratio"] == (1.0 if image["gain"] else None)  # 1 by construction, where the image store grew at all
        r = by_name[name]
        assert (r["growth_accuracy_at_n"], r["growth_accuracy_at_n_plus_m"], r["growth_ratio"]) == (
            features["accuracy_at_n"], features["accuracy_at_n_plus_m"], features["growth_ratio"])
        assert json.loads((out / name / "cost.json").read_text())["growth"] > 0
    assert by_name["image store"]["growth_ratio"] == image["growth_ratio"] and by_name["label store"]["growth_ratio"] in (0.0, None)
    assert by_name["label store"]["growth_gain"] == 0.0 and by_name["image store"]["store_accuracy"] == image["accuracy_at_n"]
    assert by_name["logits store"]["growth_ratio"] == logits["growth_ratio"] and by_name["logits store"]["store_accuracy"] == logits["accuracy_at_n"]
    header, *cells = frontier_table(rows)
    assert "growth ratio" in header and dict(zip(header, cells[-3]))["growth: accuracy at N → N + M"].endswith(f"{100 * image['accuracy_at_n_plus_m']:.2f}%")
    assert read_sweep(out)["growth"] == {"epochs": 1, "heads": "vgg16", "validation": False}
    for name in ("lambda-0", "lambda-1"):  # the growth frontier's class floor: the class the run reads
        assert by_name[name]["class_floor_psnr"] == json.loads((out / name / "attack" / "attack.json").read_text())["class_floor"]["predicted"]["psnr_mean"]
    assert (out / "growth-frontier.png").is_file() == bool(growth_points(rows))
    # A rerun measures nothing again: every classifier is finished.
    monkeypatch.setattr(growth_mod, "train_classifier", lambda *a, **k: pytest.fail("a store classifier was retrained"))
    monkeypatch.setattr(growth_mod, "train_image_classifier", lambda *a, **k: pytest.fail("the image store was retrained"))
    again = sweep(config, [0.0, 1.0], out, overrides, attack_settings=TINY_ATTACK, growth_epochs=1, **QUIET)
    assert [r["growth_ratio"] for r in again] == [r["growth_ratio"] for r in rows]
