"""Damaged, foreign or unfinished checkpoints are refused with one clear line, and nothing on disk is harmed.

Every CLI test goes through `veil.cli.main` and checks the return code, that stderr is one
`veil train: error: ...` line (no traceback from inside torch) and that every file that existed
before is byte for byte what it was.
"""

from __future__ import annotations

import errno
import importlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tests.faults import folder_bytes, tiny_config_dict, write_tiny_npz

from veil import config as config_mod
from veil import rundir
from veil.cli import main
from veil.io import CheckpointError, check_sha256, load_module, save_tensors, sha256_file
from veil.models import build_networks
from veil.train import train


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # bit-for-bit comparisons with the module's reference run


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished tiny run (7 phase-epochs); tests copy it before touching it."""
    root = tmp_path_factory.mktemp("finished")
    torch.set_num_threads(1)
    raw = tiny_config_dict(write_tiny_npz(root / "tiny.npz", root / "cache"))
    train(config_mod.from_dict(raw), root / "run", log=lambda *_: None)
    return {"run": root / "run", "npz": root / "tiny.npz", "raw": raw}


def copy_run(finished: dict, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished["run"], run)
    return run


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def cli_error(capsys, argv: list[str], code: int = 2) -> str:
    """Run the CLI, expect `code` and a single error line; return that line."""
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"veil {argv[0]}: error: "), err
    return err


# ----------------------------------------------------------------------------- what a checkpoint records


def test_info_records_sha256_of_every_file(finished):
    step_dir = rundir.latest_step_dir(finished["run"])
    info = json.loads((step_dir / "info.json").read_text())
    on_disk = sorted(p.name for p in step_dir.iterdir() if p.name != "info.json")
    assert sorted(info["files"]) == on_disk and len(on_disk) == 7  # 3 networks + 4 optimisers
    for name, digest in info["files"].items():
        assert digest == sha256_file(step_dir / name)
    undefended = rundir.checkpoints(finished["run"]) / "undefended"
    assert json.loads((undefended / "info.json").read_text())["files"]["obfuscator.safetensors"] == sha256_file(undefended / "obfuscator.safetensors")
    assert info["config"] == config_mod.to_dict(config_mod.from_dict(finished["raw"])) and len(info["data_fingerprint"]) == 64


def test_save_tensors_returns_sha_of_the_bytes_on_disk(tmp_path):
    digest = save_tensors(tmp_path / "t.safetensors", {"w": torch.arange(6.0)})
    assert digest == sha256_file(tmp_path / "t.safetensors")
    check_sha256(tmp_path / "t.safetensors", digest)
    with pytest.raises(CheckpointError, match=r"t.safetensors: sha256 is .* but .* was recorded"):
        check_sha256(tmp_path / "t.safetensors", "0" * 64)
    assert not list(tmp_path.glob(".*.tmp"))


# ----------------------------------------------------------------------------- damaged checkpoints


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))


DAMAGE = {
    "truncated": (lambda d: _truncate(d / "reconstructor.safetensors"), r"reconstructor.safetensors: sha256 is .* damaged or was replaced"),
    "one byte changed": (lambda d: _flip_byte(d / "optim-obfuscator.safetensors"), r"optim-obfuscator.safetensors: sha256 is .* refusing to load it"),
    "file missing": (lambda d: (d / "classifier.safetensors").unlink(), r"classifier.safetensors: file is missing"),
    "info.json damaged": (lambda d: (d / "info.json").write_text('{"step": 7, "fil'), r"info.json: damaged"),
    "info.json without step": (
        lambda d: (d / "info.json").write_text(json.dumps({k: v for k, v in json.loads((d / "info.json").read_text()).items() if k != "step"})),
        r"info.json: damaged \(step missing or not a whole number\)",
    ),
    "latest.json damaged": (lambda d: (d.parent / "latest.json").write_text("{"), r"latest.json: damaged"),
    "latest.json points nowhere": (lambda d: shutil.rmtree(d), r"latest.json points at .*step-00007, which does not exist"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_refused_on_resume_and_load(finished, tmp_path, capsys, damage):
    run = copy_run(finished, tmp_path)
    harm, message = DAMAGE[damage]
    harm(rundir.latest_step_dir(run) if damage != "latest.json points nowhere" else run / "checkpoints" / "step-00007")
    before = snapshot(run)
    err = cli_error(capsys, ["train", "--resume", str(run)])
    assert re.search(message, err), err
    with pytest.raises(CheckpointError, match=message):
        rundir.load_run(run)
    assert snapshot(run) == before  # refused, and nothing was overwritten or removed


def test_truncated_safetensors_without_a_recorded_sha_is_still_refused(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    step_dir = rundir.latest_step_dir(run)
    info = json.loads((step_dir / "info.json").read_text())
    del info["files"]  # a checkpoint from before sha256s were recorded
    (step_dir / "info.json").write_text(json.dumps(info))
    _truncate(step_dir / "obfuscator.safetensors")
    with pytest.raises(CheckpointError, match=r"obfuscator.safetensors: not a readable safetensors file"):
        rundir.load_run(run)


def test_damaged_metrics_line_before_the_last_is_an_error(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:20]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    before = snapshot(run)
    err = cli_error(capsys, ["train", "--resume", str(run)])
    assert "metrics.jsonl: line 3 of 7 is damaged" in err
    assert snapshot(run) == before


# ----------------------------------------------------------------------------- checkpoints made for something else


@pytest.mark.parametrize(
    "edit, shown",
    [
        ({"model": {"width": 0.125}}, "model.width: 0.0625 -> 0.125"),
        ({"model": {"reconstructor": "urec1"}}, "model.reconstructor: 'simrec' -> 'urec1'"),
        ({"train": {"lambda_privacy": 0.5}}, "train.lambda_privacy: 1.0 -> 0.5"),
    ],
)
def test_resume_or_load_of_edited_config_is_refused(finished, tmp_path, capsys, edit, shown):
    run = copy_run(finished, tmp_path)
    raw = yaml.safe_load((run / "config.yaml").read_text())
    for section, values in edit.items():
        raw[section].update(values)
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    before = snapshot(run)
    err = cli_error(capsys, ["train", "--resume", str(run)])
    assert "was made with another config; config.yaml was edited since" in err and shown in err, err
    with pytest.raises(CheckpointError, match="was edited after"):
        rundir.load_run(run)
    assert snapshot(run) == before


def test_moved_data_file_is_fine_but_changed_data_is_refused(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    moved = tmp_path / "elsewhere.npz"
    shutil.copy(finished["npz"], moved)
    # Resuming a finished run from a new data location: allowed, the content is the same.
    assert main(["train", "--resume", str(run), f"data.path={moved}"]) == 0
    capsys.readouterr()

    z = dict(np.load(moved))
    z["labels"] = (z["labels"] + 1) % 10  # same shapes, other labels
    np.savez(moved, **z)
    err = cli_error(capsys, ["train", "--resume", str(run), f"data.path={moved}"])
    assert "was trained on other images: the data's fingerprint" in err

    z["images"] = z["images"][..., :1]  # now greyscale: 1 channel where the checkpoint has 3
    np.savez(moved, **z)
    err = cli_error(capsys, ["train", "--resume", str(run), f"data.path={moved}"])
    assert "was trained on data with 3 image channels, but the data now has 1" in err


def test_weights_of_another_width_or_architecture_are_refused(finished, tmp_path):
    step_dir = rundir.latest_step_dir(finished["run"])
    cfg = config_mod.from_dict(finished["raw"])
    cfg.model.width = 0.125
    wider = build_networks(cfg.model, 3, 10)
    with pytest.raises(CheckpointError, match=r"obfuscator.safetensors: '0.weight' has shape \(4, 3, 3, 3\), this model expects \(8, 3, 3, 3\) \(a checkpoint made for another width"):
        load_module(wider["obfuscator"], step_dir / "obfuscator.safetensors")
    grey = build_networks(config_mod.from_dict(finished["raw"]).model, 1, 10)
    with pytest.raises(CheckpointError, match=r"\(4, 3, 3, 3\), this model expects \(4, 1, 3, 3\) \(a checkpoint made for another width, channel count"):
        load_module(grey["obfuscator"], step_dir / "obfuscator.safetensors")
    cfg.model.width, cfg.model.reconstructor = 0.0625, "resrec"
    with pytest.raises(CheckpointError, match=r"reconstructor.safetensors: does not fit this .* \(another architecture or split\?\)"):
        load_module(build_networks(cfg.model, 3, 10)["reconstructor"], step_dir / "reconstructor.safetensors")


# ----------------------------------------------------------------------------- failures during training


def _write_config(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_nan_loss_stops_names_phase_and_step_and_keeps_last_checkpoint(finished, tmp_path, capsys, monkeypatch):
    train_mod = importlib.import_module("veil.train")  # `veil.train` the attribute is the function

    real_psnr, calls = train_mod.psnr, {"phase_b": False}

    def psnr_goes_nan(a, b):  # noqa: ANN001, ANN202
        p = real_psnr(a, b)
        return p * float("nan") if torch.is_grad_enabled() and calls["phase_b"] else p

    # NaN from the first batch of phase (b) (step 5 of 7) on; everything before is healthy.
    real_train_reconstructor = train_mod.train_reconstructor

    def train_reconstructor(nets, opt, data, natural, cfg, generator, step, *rest):  # noqa: ANN001, ANN202
        calls["phase_b"] = step.phase == train_mod.PHASE_B
        try:
            return real_train_reconstructor(nets, opt, data, natural, cfg, generator, step, *rest)
        finally:
            calls["phase_b"] = False

    monkeypatch.setattr(train_mod, "psnr", psnr_goes_nan)
    monkeypatch.setattr(train_mod, "train_reconstructor", train_reconstructor)
    run = tmp_path / "run"
    err = cli_error(capsys, ["train", "--config", str(_write_config(tmp_path, finished["raw"])), "--out", str(run)])
    # The step never waits for the device, so the loss is checked once, at the end of the phase-epoch.
    assert "non-finite loss in phase 'reconstructor', round 1, epoch 1, first at batch 0 (step 5 of 7)" in err, err
    assert f"the last good checkpoint, {run / 'checkpoints' / 'step-00004'}, is kept" in err
    assert rundir.latest_step_dir(run).name == "step-00004" and len(rundir.read_metrics(run)) == 4
    rundir.read_info(rundir.latest_step_dir(run))  # whole and loadable

    monkeypatch.undo()  # the cause is gone: the run continues from step 4 and ends as an unbroken one would
    assert main(["train", "--resume", str(run)]) == 0
    assert folder_bytes(run / "checkpoints" / "step-00007") == folder_bytes(finished["run"] / "checkpoints" / "step-00007")


def test_huge_learning_rate_is_caught_before_a_bad_checkpoint(finished, tmp_path, capsys):
    raw = json.loads(json.dumps(finished["raw"]))
    raw["train"].update(lr_obfuscator=1e30, lr_classifier=1e30, pretrain_schedule="constant")
    run = tmp_path / "run"
    err = cli_error(capsys, ["train", "--config", str(_write_config(tmp_path, raw)), "--out", str(run)])
    assert "phase 'pretrain', round 0, epoch 1" in err and "(step 1 of 7); training stopped and no checkpoint had been written yet" in err, err
    assert not (run / "checkpoints" / "latest.json").exists() and not (run / "summary.json").exists()


def test_full_disk_during_checkpoint_keeps_previous_one(finished, tmp_path, capsys, monkeypatch):
    io_mod = importlib.import_module("veil.io")

    real_save, calls = io_mod.save_file, {"n": 0}

    def save_file(tensors, filename, metadata=None):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 7 * 3 + 2 + 3:  # the 3rd file of step 4's checkpoint (steps 1-3: 7 files each, + undefended's 2)
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(io_mod, "save_file", save_file)
    run = tmp_path / "run"
    err = cli_error(capsys, ["train", "--config", str(_write_config(tmp_path, finished["raw"])), "--out", str(run)], code=1)
    assert "No space left on device" in err and ".step-00004.tmp" in err, err
    assert rundir.latest_step_dir(run).name == "step-00003"
    rundir.read_info(rundir.latest_step_dir(run))
    assert not list((run / "checkpoints").glob(".*")), "no temporary file or folder is left behind"

    monkeypatch.undo()
    assert main(["train", "--resume", str(run)]) == 0
    assert folder_bytes(run / "checkpoints" / "step-00007") == folder_bytes(finished["run"] / "checkpoints" / "step-00007")


def test_optimiser_state_of_the_earlier_two_entry_format_still_loads(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    net(torch.ones(4, 3)).sum().backward()
    opt.step()
    tensors, meta = rundir.optimizer_to_tensors(opt)
    old = json.loads(meta["optimizer"])
    save_tensors(tmp_path / "old.safetensors", tensors, {"param_groups": json.dumps(old["param_groups"]), "scalars": json.dumps(old["scalars"])})
    fresh = torch.optim.Adam(net.parameters(), lr=1.0)
    rundir.optimizer_from_file(fresh, tmp_path / "old.safetensors")
    assert fresh.param_groups[0]["lr"] == 0.01
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_only_the_writing_process_tidies_the_run_directory_on_resume(finished, tmp_path):
    """Another process of a multi-process run only loads: removing temporary files could remove the one
    process 0 is about to rename (a resumed two-process run once failed that way)."""
    run = copy_run(finished, tmp_path)
    cfg = config_mod.from_dict(finished["raw"])
    stale = run / ".metrics.jsonl.abc123.tmp"
    stale.write_text("being written by process 0")
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text() + '{"step": 99}\n')  # a line past the checkpoint
    before = snapshot(run)
    nets = build_networks(cfg.model, 3, 10, 32, None, cfg.seed)
    info = json.loads((rundir.latest_step_dir(run) / "info.json").read_text())
    opts = {}  # the networks are enough to show it
    done = rundir.restore(run, nets, opts, info, writer=False)
    assert done == info["step"] and snapshot(run) == before  # loaded, nothing touched
    rundir.restore(run, nets, opts, info, writer=True)
    assert not stale.exists() and len(rundir.read_metrics(run)) == done  # process 0 tidies


# ----------------------------------------------------------------------------- a lost latest.json, lost checkpoints


def test_resume_without_latest_json_takes_up_the_newest_complete_checkpoint(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    before = snapshot(run)
    (run / "checkpoints" / "latest.json").unlink()
    missing = (rf"{re.escape(str(run / 'checkpoints' / 'latest.json'))}: missing, though {re.escape(str(run / 'checkpoints'))} holds step-00007; "
               rf"`veil train --resume {re.escape(str(run))}` resumes from the newest complete one")
    with pytest.raises(CheckpointError, match=missing):
        rundir.load_run(run)
    err = cli_error(capsys, ["attack", str(run)])  # the truth, not "no checkpoint yet"
    assert re.search(missing, err), err
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "latest.json was missing; resuming from step-00007, the newest complete checkpoint (every file's sha256 checked)" in out
    assert f"resuming {run} after step 7 of 7" in out
    assert snapshot(run) == before  # nothing trained again: every checkpoint, the log and the summary as they were, latest.json back


def test_resume_without_latest_json_refuses_when_no_checkpoint_is_whole(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    (run / "checkpoints" / "latest.json").unlink()
    (run / "checkpoints" / "step-00007" / "classifier.safetensors").unlink()
    before = snapshot(run)
    err = cli_error(capsys, ["train", "--resume", str(run)])
    assert "latest.json: missing, and no step folder holds a complete checkpoint (" in err
    assert "step-00007/classifier.safetensors: file is missing (it was recorded with sha256 " in err
    assert snapshot(run) == before


def test_resume_refuses_to_train_again_over_a_run_whose_checkpoints_are_gone(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    shutil.rmtree(run / "checkpoints")
    before = snapshot(run)
    err = cli_error(capsys, ["train", "--resume", str(run)])
    assert (f"{run}: summary.json records 7 steps, but {run / 'checkpoints'} holds no checkpoint, which covers 0; the later checkpoints are "
            f"gone (a kill loses at most one step), so --resume would train them again over that record") in err
    assert snapshot(run) == before
    (run / "summary.json").unlink()
    err = cli_error(capsys, ["train", "--resume", str(run)])
    assert f"{run}: metrics.jsonl records 7 steps, but" in err
    assert not (run / "checkpoints").exists()
