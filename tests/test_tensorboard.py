"""veil train --tensorboard: optional scalars and reconstruction images; off changes nothing."""

from __future__ import annotations

import sys

import pytest

from veil.errors import TrainingError
from veil.rundir import read_metrics
from veil.train import plan, train


def test_tensorboard_without_the_package_fails_before_writing(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    with pytest.raises(TrainingError, match="needs the tensorboard package"):
        train(tiny_config, tmp_path / "run", tensorboard=True, log=lambda *_: None)
    assert not (tmp_path / "run").exists()


def test_tensorboard_logs_every_phase_epoch(tiny_config, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train(tiny_config, run, tensorboard=True, log=lambda *_: None)
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    metrics = read_metrics(run)
    accuracy = events.Scalars("test/test_accuracy")
    assert [e.step for e in accuracy] == [m["step"] for m in metrics] and len(metrics) == len(plan(tiny_config.train))
    assert [e.value for e in accuracy] == pytest.approx([m["test_accuracy"] for m in metrics], abs=1e-6)
    assert [e.step for e in events.Scalars("test/test_psnr")] == [m["step"] for m in metrics if m["phase"] != "pretrain"]
    images = events.Images("reconstructions")
    assert len(images) == sum(m["phase"] != "pretrain" for m in metrics)
    assert images[0].width == 8 * 32 + 9 * 2 and images[0].height == 2 * 32 + 3 * 2  # make_grid: 8 x 2 images, 2-pixel padding
