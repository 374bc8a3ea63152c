"""Precision, memory layout, the hot loop's host syncs, batch sharding, the pretraining schedules."""

import copy
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from veil import config as config_mod
from veil.data import apply_augmentation, batches, draw_augmentation, load_splits, to_float
from veil.errors import TrainingError
from veil.metrics import psnr
from veil.models import build_networks
from veil.runtime import Runtime, memory_format, prepare_networks, resolve, resolve_channels_last, resolve_precision
from veil.train import (
    PHASE_A,
    PHASE_B,
    PRETRAIN,
    Step,
    evaluate,
    make_optimizers,
    pretrain_lr_factor,
    privacy_term,
    step_factor,
    train_obfuscator_classifier,
    train_reconstructor,
)


def _setup(cfg, rt):
    s = load_splits(cfg.data, cfg.seed)
    torch.manual_seed(0)
    nets = build_networks(cfg.model, s.channels, s.num_classes)
    prepare_networks(nets, rt)
    return s, nets, make_optimizers(nets, cfg.train)


def _run_phases(cfg, rt):
    """One pretraining epoch, one reconstructor epoch, one evaluation; seeded alike for every runtime."""
    s, nets, opts = _setup(cfg, rt)
    a = train_obfuscator_classifier(nets, opts[PRETRAIN], s.defender, True, cfg, torch.Generator().manual_seed(1), Step(PRETRAIN, 0, 1), None, rt=rt)
    b = train_reconstructor(nets, opts[PHASE_B], s.defender, True, cfg, torch.Generator().manual_seed(2), Step(PHASE_B, 1, 1), rt=rt)
    c = evaluate(nets, s.test, cfg.train.eval_batch_size, rt=rt)
    return nets, {**a, **{"r_" + k: v for k, v in b.items()}, **c}


def _one_batch_gradients(cfg, rt, dtype=torch.float32):
    """Loss and parameter gradients of Eq. 2 on one fixed batch, networks built alike for every runtime."""
    s, nets, _ = _setup(cfg, rt)
    for net in nets.values():
        net.to(dtype)
    images = to_float(s.defender.images[:32], rt.memory_format).to(dtype)
    f, g, r = nets["obfuscator"], nets["classifier"], nets["reconstructor"]
    with rt.autocast():
        features = f(images)
        loss = F.cross_entropy(g(features), s.defender.labels[:32]) + psnr(images, r(features)).mean()
    loss.backward()
    grads = {f"{n}.{k}": p.grad.double() for n, net in nets.items() for k, p in net.named_parameters()}
    return loss.item(), grads


def _worst_relative_error(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)).item() for k in a)


def test_channels_last_gives_the_same_result(tiny_config):
    cfg = tiny_config
    plain, nhwc = Runtime(torch.device("cpu"), channels_last=False), Runtime(torch.device("cpu"), channels_last=True)
    loss_64, grads_64 = _one_batch_gradients(cfg, plain, torch.float64)
    loss_a, grads_a = _one_batch_gradients(cfg, plain)
    loss_b, grads_b = _one_batch_gradients(cfg, nhwc)
    assert loss_a == pytest.approx(loss_64, rel=1e-5) and loss_b == pytest.approx(loss_64, rel=1e-5)
    # Against a float64 reference. PyTorch's channels_last BatchNorm on CPU is less accurate than
    # the contiguous one (it loses digits when a channel's mean is large against its spread), and
    # the reconstructor's gradient at initialisation amplifies that: ~1e-2 against ~1e-5.
    assert _worst_relative_error(grads_64, grads_a) < 1e-4
    assert _worst_relative_error(grads_64, grads_b) < 5e-2
    # Whole phases: the same metrics. (Weights are not compared: Adam's first steps move a
    # parameter by ~lr whatever the size of its gradient, so rounding noise on a near-zero
    # gradient flips whole steps.)
    nets_a, m_a = _run_phases(cfg, plain)
    nets_b, m_b = _run_phases(cfg, nhwc)
    assert nets_b["obfuscator"][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not nets_a["obfuscator"][0].weight.is_contiguous(memory_format=torch.channels_last)
    for k in m_a:
        assert m_a[k] == pytest.approx(m_b[k], rel=1e-3, abs=1e-3), k


def test_bf16_autocast_keeps_weights_and_batchnorm_fp32_and_stays_close(tiny_config):
    cfg = tiny_config
    fp32, bf16 = Runtime(torch.device("cpu")), Runtime(torch.device("cpu"), precision="bf16")
    loss_a, grads_a = _one_batch_gradients(cfg, fp32)
    loss_b, grads_b = _one_batch_gradients(cfg, bf16)
    assert loss_b == pytest.approx(loss_a, rel=1e-2)
    # bf16 keeps ~3 significant digits, and BatchNorm at width 1/16 (4 to 8 channels, 1x1 maps in
    # the classifier) amplifies rounding: the gradients point the same way, not to 3 digits.
    for net in ("obfuscator", "classifier", "reconstructor"):
        a, b = (torch.cat([g[k].flatten() for k in g if k.startswith(net)]) for g in (grads_a, grads_b))
        assert F.cosine_similarity(a, b, dim=0) > 0.8, net
        assert not torch.equal(a, b)

    seen = []
    s, nets, opts = _setup(cfg, bf16)
    conv, bn = nets["obfuscator"][0], nets["obfuscator"][1]
    conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    stats = bn.running_var.clone()
    train_obfuscator_classifier(nets, opts[PRETRAIN], s.defender, True, cfg, torch.Generator().manual_seed(1), Step(PRETRAIN, 0, 1), None, rt=bf16)
    assert seen and set(seen) == {torch.bfloat16}  # autocast really ran the convolutions in bf16
    # Weights, BatchNorm's affine parameters and running statistics stay float32 (and still move).
    assert all(p.dtype == torch.float32 for net in nets.values() for p in net.state_dict().values() if p.is_floating_point())
    assert not torch.equal(stats, bn.running_var)

    _, m_a = _run_phases(cfg, fp32)
    _, m_b = _run_phases(cfg, bf16)
    assert m_b["loss"] == pytest.approx(m_a["loss"], rel=0.02)
    assert m_b["r_train_psnr"] == pytest.approx(m_a["r_train_psnr"], abs=0.3)
    assert m_b["test_psnr"] == pytest.approx(m_a["test_psnr"], abs=0.3)


def test_options_resolve_per_device(tiny_config):
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    assert resolve_channels_last("auto", cpu) is True and resolve_channels_last("auto", torch.device("mps")) is False
    assert resolve_channels_last("on", cpu) is True and memory_format("auto", cpu) == torch.channels_last
    assert memory_format("off", cpu) == torch.contiguous_format
    assert resolve_channels_last("True", cpu) is True and resolve_channels_last("off", cpu) is False
    cfg = config_mod.apply_overrides(copy.deepcopy(tiny_config), ["channels_last=on", "precision=bf16", "compile=false"])
    rt = resolve(cfg, cpu)
    assert (rt.channels_last, rt.precision, rt.compile, rt.world_size) == (True, "bf16", False, 1)
    with pytest.raises(config_mod.ConfigError, match="train.precision must be one of auto, fp32, bf16, got 'fp16'"):
        config_mod.apply_overrides(copy.deepcopy(tiny_config), ["precision=fp16"])
    with pytest.raises(config_mod.ConfigError, match="train.channels_last must be auto, on or off, got 'sometimes'"):
        config_mod.apply_overrides(copy.deepcopy(tiny_config), ["channels_last=sometimes"])


def _count_host_transfers(monkeypatch) -> dict:
    """Count .item()/.tolist()/.cpu()/bool()/float() on tensors, when called from Veil's own code."""
    counts = {"n": 0}
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _original=original, **kwargs):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("veil"):
                counts["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return counts


@pytest.mark.parametrize("n_images", [64, 192])
def test_training_step_has_no_host_sync(tiny_config, monkeypatch, n_images):
    """The number of host transfers per phase-epoch does not grow with the number of batches."""
    cfg = tiny_config
    s, nets, opts = _setup(cfg, Runtime(torch.device("cpu")))
    data = s.defender.subset(torch.arange(n_images) % len(s.defender))
    counts = _count_host_transfers(monkeypatch)
    g = torch.Generator().manual_seed(0)
    train_obfuscator_classifier(nets, opts[PHASE_A], data, True, cfg, g, Step(PHASE_A, 1, 1), privacy_term(cfg))
    train_reconstructor(nets, opts[PHASE_B], data, True, cfg, g, Step(PHASE_B, 1, 1))
    evaluate(nets, data, 32)
    # One .tolist() at the end of each training epoch and of the evaluation, whatever the batch count.
    assert counts["n"] == 3, counts


def test_non_finite_loss_is_reported_with_phase_and_batch(tiny_config):
    cfg = tiny_config
    s, nets, opts = _setup(cfg, Runtime(torch.device("cpu")))
    with torch.no_grad():
        nets["classifier"].head[-1].bias.fill_(math.nan)
    with pytest.raises(TrainingError, match=r"non-finite loss in phase 'pretrain', round 0, epoch 1, first at batch 0"):
        train_obfuscator_classifier(nets, opts[PRETRAIN], s.defender, True, cfg, torch.Generator().manual_seed(0), Step(PRETRAIN, 0, 1), None)


def test_process_slices_of_a_batch_are_the_single_process_batch(tiny_config):
    """Two processes together see exactly one process's batches, augmentation included."""
    s = load_splits(tiny_config.data, 0)
    whole = list(batches(s.defender, 32, torch.Generator().manual_seed(5), True))
    parts = [list(batches(s.defender, 32, torch.Generator().manual_seed(5), True, rank, 2)) for rank in (0, 1)]
    assert len(whole) == len(parts[0]) == len(parts[1]) == len(s.defender) // 32
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *parts):
        assert len(y0) == len(y1) == 16
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    first = [next(iter(batches(s.defender, 32, torch.Generator().manual_seed(5), True, rank, 3))) for rank in range(3)]
    assert [len(y) for _, y in first] == [11, 11, 10]
    assert torch.equal(torch.cat([y for _, y in first]), whole[0][1])


def test_pretraining_schedules():
    assert [step_factor(e, 8) for e in range(1, 9)] == [1.0] * 4 + [0.1] * 2 + [0.01] * 2
    assert pretrain_lr_factor("constant", 1, 10, 5) is None
    assert pretrain_lr_factor("step", 9, 10, 5)(3) == 0.01
    onecycle = [pretrain_lr_factor("onecycle", e, 4, 10)(i) for e in range(1, 5) for i in range(10)]
    assert max(onecycle) == 1.0 and onecycle[0] < 0.2 and onecycle[-1] < 0.01
    assert onecycle.index(1.0) == 5  # 15% warm-up of 40 steps


def test_batch_augmentation_equals_a_slow_per_image_loop():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    dy, dx, mirror = draw_augmentation(64, True, g)
    fast = apply_augmentation(x, dy, dx, mirror)
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(64):
        crop = padded[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32]
        assert torch.equal(fast[i], crop.flip(2) if mirror[i] else crop), i
    assert mirror.any() and not mirror.all() and len(set(dy.tolist())) > 3


def test_noise_layer_never_reads_the_device(monkeypatch):
    """The noise defence's layer decides on the host whether to add noise, also after loading weights."""
    from veil.defences import GaussianNoise, set_noise
    from veil.models import Obfuscator

    f = Obfuscator(3, 0.0625, 2, GaussianNoise())
    set_noise(f, 0.5)
    g = Obfuscator(3, 0.0625, 2, GaussianNoise())
    g.load_state_dict(f.state_dict())  # sigma 0.5 arrives with the weights
    x = torch.rand(4, 3, 32, 32)
    counts = _count_host_transfers(monkeypatch)
    torch.manual_seed(0)
    noisy = g(x)
    assert counts["n"] == 0
    monkeypatch.undo()
    assert not torch.equal(noisy, f.eval()(x)) and not torch.equal(g.eval()(x), g(x))  # noise on, a fresh draw each call
    set_noise(g, 0.0)
    assert torch.equal(g(x), g(x))  # off again: deterministic


@pytest.mark.parametrize("amx, avx512_bf16, unit", [(True, True, "AMX"), (False, True, "AVX-512 BF16"), (False, False, "")])
def test_native_bf16_is_asked_of_the_cpu_and_auto_stays_fp32_on_a_cpu(monkeypatch, amx, avx512_bf16, unit):
    from veil import runtime

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    cpu = torch.device("cpu")
    assert runtime.native_bf16() == unit
    assert resolve_precision("auto", cpu) == "fp32"  # whatever the unit: bf16 moved the paper's cut's figures (docs/benchmarks.md)
    note = runtime.precision_note("auto", cpu)
    assert note.startswith("fp32 (auto on a CPU") and ((f"it has {unit}" in note) if unit else ("no native bf16 unit" in note))
    assert runtime.precision_note("bf16", cpu) == "bf16 (asked for)"
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # an older PyTorch without the check: no unit, no error
    assert runtime.native_bf16() == ("AVX-512 BF16" if avx512_bf16 else "")
