import copy
import json

import pytest
import torch
import yaml

from veil import config as config_mod
from veil import rundir
from veil.data import load_splits, to_float
from veil.errors import TrainingError
from veil.metrics import psnr
from veil.models import build_networks
from veil.train import (
    FINAL,
    PHASE_A,
    PHASE_B,
    PHASE_C,
    PRETRAIN,
    WARMUP,
    Step,
    make_optimizers,
    plan,
    privacy_term,
    train,
    train_obfuscator_classifier,
    train_reconstructor,
)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, module: torch.nn.Module) -> bool:
    after = module.state_dict()
    return any(not torch.equal(before[k], after[k]) for k in before)


def unchanged_bit_for_bit(before: dict, module: torch.nn.Module) -> bool:
    after = module.state_dict()
    return all(torch.equal(before[k], after[k]) for k in before)


def test_plan_follows_algorithm_1(tiny_config):
    t = tiny_config.train
    t.pretrain_epochs, t.warmup_epochs, t.t_main, t.t_sub = 3, 2, 2, 2
    phases = [s.phase for s in plan(t)]
    assert phases == [PRETRAIN] * 3 + [WARMUP] * 2 + ([PHASE_A] * 2 + [PHASE_B] * 2 + [PHASE_C] * 2) * 2 + [FINAL] * 2


def test_each_phase_updates_exactly_its_networks(tiny_config):
    cfg = tiny_config
    s = load_splits(cfg.data, cfg.seed)
    nets = build_networks(cfg.model, s.channels, s.num_classes)
    opts = make_optimizers(nets, cfg.train)
    g = torch.Generator().manual_seed(0)
    f_, g_, r_ = nets["obfuscator"], nets["classifier"], nets["reconstructor"]

    # (a) f+g move on Eq. 2; r is frozen (weights and BatchNorm statistics).
    before = {k: snapshot(m) for k, m in nets.items()}
    train_obfuscator_classifier(nets, opts[PHASE_A], s.defender, True, cfg, g, Step(PHASE_A, 1, 1), privacy_term(cfg))
    assert changed(before["obfuscator"], f_) and changed(before["classifier"], g_)
    assert unchanged_bit_for_bit(before["reconstructor"], r_)

    # (b) r moves on Eq. 3; f (and g) frozen.
    before = {k: snapshot(m) for k, m in nets.items()}
    train_reconstructor(nets, opts[PHASE_B], s.defender, True, cfg, g, Step(PHASE_B, 1, 1))
    assert changed(before["reconstructor"], r_)
    assert unchanged_bit_for_bit(before["obfuscator"], f_) and unchanged_bit_for_bit(before["classifier"], g_)

    # (c) f moves on Eq. 2; g and r frozen.
    before = {k: snapshot(m) for k, m in nets.items()}
    train_obfuscator_classifier(nets, opts[PHASE_C], s.defender, True, cfg, g, Step(PHASE_C, 1, 1), privacy_term(cfg), with_classifier=False)
    assert changed(before["obfuscator"], f_)
    assert unchanged_bit_for_bit(before["classifier"], g_) and unchanged_bit_for_bit(before["reconstructor"], r_)


def test_reconstructor_phase_raises_psnr(tiny_config):
    cfg = tiny_config
    s = load_splits(cfg.data, cfg.seed)
    nets = build_networks(cfg.model, s.channels, s.num_classes)
    cfg.train.lr_reconstructor = 5e-3
    opt = make_optimizers(nets, cfg.train)[PHASE_B]
    g = torch.Generator().manual_seed(0)
    first = train_reconstructor(nets, opt, s.defender, True, cfg, g, Step(PHASE_B, 1, 1))["train_psnr"]
    for _ in range(10):
        last = train_reconstructor(nets, opt, s.defender, True, cfg, g, Step(PHASE_B, 1, 1))["train_psnr"]
    assert last > first + 2.0, (first, last)


def test_train_writes_run_directory(tiny_config, tmp_path):
    run = tmp_path / "run"
    summary = train(tiny_config, run, log=lambda *_: None)
    assert (run / "config.yaml").is_file()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(plan(tiny_config.train))
    rec = json.loads(lines[-1])
    for key in ("phase", "round", "epoch", "loss", "test_accuracy", "test_psnr", "seconds"):
        assert key in rec
    for name in ("obfuscator", "classifier", "reconstructor"):
        assert (rundir.latest_step_dir(run) / f"{name}.safetensors").is_file()
    assert (run / "checkpoints" / "undefended" / "obfuscator.safetensors").is_file()
    for key in ("pretrain_test_accuracy", "final_test_accuracy", "final_test_psnr"):
        assert isinstance(summary[key], float)
    assert json.loads((run / "summary.json").read_text()) == summary
    assert summary["precision"].startswith("fp32 (auto on a CPU")  # the choice and why, e.g. "...; it has AVX-512 BF16, bf16 is opt-in..."
    loaded = rundir.load_run(run)
    assert not loaded.obfuscator.training and loaded.undefended_obfuscator is not None
    # The undefended obfuscator is the one right after pretraining, not the final one.
    assert any(not torch.equal(a, b) for a, b in zip(loaded.obfuscator.state_dict().values(), loaded.undefended_obfuscator.state_dict().values()))
    with pytest.raises(TrainingError, match="already holds a run"):
        train(tiny_config, run, log=lambda *_: None)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_after_crash_matches_uninterrupted_run(tiny_config, tmp_path, monkeypatch, precision):
    """Bit for bit under either precision: bf16 autocast on a CPU is as deterministic as fp32."""
    tiny_config = config_mod.apply_overrides(copy.deepcopy(tiny_config), [f"train.precision={precision}"])
    reference = train(tiny_config, tmp_path / "a", log=lambda *_: None)
    real_save = rundir.save_checkpoint
    calls = {"n": 0}

    def crash_after_three(*args, **kwargs):
        real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(rundir, "save_checkpoint", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config, tmp_path / "b", log=lambda *_: None)
    monkeypatch.setattr(rundir, "save_checkpoint", real_save)
    # A half-written metrics line, as a kill mid-write would leave.
    with open(tmp_path / "b" / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "phase": "reconstructor_wa')
    resumed = train(tiny_config, tmp_path / "b", resume=True, log=lambda *_: None)
    for key in ("pretrain_test_accuracy", "final_test_accuracy", "final_test_psnr", "undefended_test_psnr"):
        assert resumed[key] == reference[key], key
    a, b = rundir.load_run(tmp_path / "a"), rundir.load_run(tmp_path / "b")
    for x, y in zip(a.obfuscator.state_dict().values(), b.obfuscator.state_dict().values()):
        assert torch.equal(x, y)
    assert len(rundir.read_metrics(tmp_path / "b")) == len(plan(tiny_config.train))


@pytest.mark.parametrize("phase", [PHASE_A, PHASE_C])
def test_privacy_term_lowers_the_frozen_reconstructors_psnr(tiny_config, phase):
    """Eq. 2's sign: from the same start, an epoch of (a) or (c) with lambda > 0 leaves the frozen
    reconstructor rebuilding the defender images worse than the same epoch with lambda = 0."""
    cfg = tiny_config
    cfg.train.adversarial_lr_scale, cfg.train.lr_reconstructor, cfg.train.lr_obfuscator = 1.0, 5e-3, 5e-3
    s = load_splits(cfg.data, cfg.seed)
    start = build_networks(cfg.model, s.channels, s.num_classes)
    opts = make_optimizers(start, cfg.train)
    for e in range(8):  # a reconstructor worth fooling: well above the constant image
        train_reconstructor(start, opts[PHASE_B], s.defender, True, cfg, torch.Generator().manual_seed(e), Step(PHASE_B, 0, e + 1))
    images = to_float(s.defender.images)

    def after_one_epoch(lam: float) -> float:
        cfg.train.lambda_privacy = lam
        nets = copy.deepcopy(start)
        opt = make_optimizers(nets, cfg.train)[phase]
        for e in range(2):
            train_obfuscator_classifier(nets, opt, s.defender, True, cfg, torch.Generator().manual_seed(9 + e), Step(phase, 1, e + 1),
                                        privacy_term(cfg), with_classifier=phase == PHASE_A)
        f, r = nets["obfuscator"].eval(), nets["reconstructor"].eval()
        with torch.no_grad():
            return psnr(images, r(f(images))).mean().item()

    plain, private = after_one_epoch(0.0), after_one_epoch(1.0)
    # Seen on 2026-11-27 (ATEN_CPU_CAPABILITY native, default, avx2 alike to 0.02 dB): (a) 9.91 -> 7.71 dB,
    # (c) 9.78 -> 8.04 dB; with the sign of lambda * PSNR flipped in Eq. 2, 9.91 -> 11.42 and 9.78 -> 12.03.
    assert private < plain - 0.5, (plain, private)


def test_bottleneck_run_records_what_client_and_store_pay(tiny_config, tmp_path):
    cfg = tiny_config
    cfg.model.bottleneck, cfg.model.bottleneck_channels, cfg.model.feature_bits = "learned", 3, 2
    summary = train(cfg, tmp_path / "run", log=lambda *_: None)
    assert summary["features"] == {"shape": [3, 8, 8], "bits": 2, "stored_as": "uint8", "bytes_per_item": 3 * 8 * 8}  # one byte per 2-bit code
    run = rundir.load_run(tmp_path / "run")
    assert run.obfuscator.out_channels == 3 and summary["client"]["parameters"] == sum(p.numel() for p in run.obfuscator.parameters())
    # MFLOPs per image: the convolutions of the first two VGG blocks at width 1/16 (4, 4, 8, 8 channels) and the 1x1 projection.
    macs = 32 * 32 * (3 * 4 * 9 + 4 * 4 * 9) + 16 * 16 * (4 * 8 * 9 + 8 * 8 * 9) + 8 * 8 * 8 * 3
    assert summary["client"]["mflops"] == pytest.approx(2 * macs / 1e6, rel=0.01)


def test_a_run_made_before_a_config_key_existed_still_loads(tiny_config, tmp_path):
    """Keys added later (model.bottleneck ...) count as their defaults in an older run's config."""
    train(tiny_config, tmp_path / "run", log=lambda *_: None)
    path = tmp_path / "run" / "config.yaml"
    raw = yaml.safe_load(path.read_text())
    for key in ("bottleneck", "bottleneck_channels", "feature_bits"):
        del raw["model"][key]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    step_dir = rundir.latest_step_dir(tmp_path / "run")
    info = json.loads((step_dir / "info.json").read_text())
    for key in ("bottleneck", "bottleneck_channels", "feature_bits"):
        del info["config"]["model"][key]
    (step_dir / "info.json").write_text(json.dumps(info))
    assert rundir.load_run(tmp_path / "run").obfuscator.out_channels == 8  # 128 channels at width 1/16


def test_costs_count_floats_when_noise_follows_the_quantiser(tiny_config):
    from veil.defences import GaussianNoise
    from veil.train import costs

    cfg = tiny_config
    cfg.model.bottleneck, cfg.model.bottleneck_channels, cfg.model.feature_bits = "learned", 3, 2
    coded = build_networks(cfg.model, 3, 10)["obfuscator"]
    noisy = build_networks(cfg.model, 3, 10, tail=GaussianNoise(0.5))["obfuscator"]
    assert costs(coded, cfg)["features"] == {"shape": [3, 8, 8], "bits": 2, "stored_as": "uint8", "bytes_per_item": 192}
    assert costs(noisy, cfg)["features"] == {"shape": [3, 8, 8], "bits": 2, "stored_as": "float16", "bytes_per_item": 384}  # as veil obfuscate keeps them


def test_flip_test_time_augmentation_adds_the_mirror_images_logits():
    from veil.data import ImageSet
    from veil.train import evaluate

    torch.manual_seed(0)
    # A linear g on the raw image: its logits change under a mirror, unlike an untrained VGG's.
    nets = {"obfuscator": torch.nn.Identity(), "classifier": torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10)),
            "reconstructor": torch.nn.Identity()}
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    x = to_float(images)
    with torch.no_grad():
        plain_logits = nets["classifier"](x)
        both = plain_logits + nets["classifier"](x.flip(3))
    labels = both.argmax(1)  # labels the flipped sum gets all right
    data = ImageSet(images, labels, [str(i) for i in range(10)])
    assert evaluate(nets, data, 16, with_reconstructor=False, flip=True)["test_accuracy"] == 1.0
    plain = evaluate(nets, data, 16, with_reconstructor=False)["test_accuracy"]
    assert plain == pytest.approx((plain_logits.argmax(1) == labels).float().mean().item()) and plain < 0.9


def test_a_kill_between_the_first_checkpoint_and_latest_json_resumes_from_that_checkpoint(tiny_config, tmp_path, monkeypatch):
    reference = train(tiny_config, tmp_path / "a", log=lambda *_: None)
    real_write = rundir.atomic_write_json

    def killed_at_the_first_pointer(path, obj):  # noqa: ANN001, ANN202
        if str(path).endswith("latest.json"):
            raise KeyboardInterrupt("simulated kill")  # step-00001 renamed into place, latest.json never written
        return real_write(path, obj)

    monkeypatch.setattr(rundir, "atomic_write_json", killed_at_the_first_pointer)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config, tmp_path / "b", log=lambda *_: None)
    monkeypatch.setattr(rundir, "atomic_write_json", real_write)
    assert (tmp_path / "b" / "checkpoints" / "step-00001").is_dir() and not (tmp_path / "b" / "checkpoints" / "latest.json").exists()
    lines = []
    resumed = train(tiny_config, tmp_path / "b", resume=True, log=lines.append)
    assert "resuming from step-00001, the newest complete checkpoint" in lines[0] and f"resuming {tmp_path / 'b'} after step 1 of" in lines[1]
    for key in ("pretrain_test_accuracy", "final_test_accuracy", "final_test_psnr", "undefended_test_psnr"):
        assert resumed[key] == reference[key], key
