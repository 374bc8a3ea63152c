import dataclasses
import math
import sys

import pytest
import torch

from veil.defences import GaussianNoise, distance_correlation, set_noise
from veil.defences.vib import kl_to_prior
from veil.models import Obfuscator
from veil.rundir import load_run
from veil.train import FINAL, PRETRAIN, WARMUP, plan, train


def test_distance_correlation_hand_computed():
    # x = (0, 1, 2), z = (0, 1, 4): distance matrices and their double centring by hand.
    x = torch.tensor([[0.0], [1.0], [2.0]])
    z = torch.tensor([[0.0], [1.0], [4.0]])
    a = torch.tensor([[0.0, 1, 2], [1, 0, 1], [2, 1, 0]])
    b = torch.tensor([[0.0, 1, 4], [1, 0, 3], [4, 3, 0]])

    def centre(m):
        return m - m.mean(0, keepdim=True) - m.mean(1, keepdim=True) + m.mean()

    A, B = centre(a), centre(b)
    expected = ((A * B).mean() / ((A * A).mean() * (B * B).mean()).sqrt()).sqrt()
    assert abs(distance_correlation(x, z).item() - expected.item()) < 1e-5
    assert 0.9 < expected < 1.0  # monotone but not linear


def test_distance_correlation_linear_map_is_one_and_independent_near_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, 4, 4, generator=g)
    q, _ = torch.linalg.qr(torch.randn(48, 48, generator=g))
    z = 2.5 * x.flatten(1) @ q + 1.0  # scaled rotation plus shift
    assert abs(distance_correlation(x, z).item() - 1.0) < 1e-4
    # Independent data: 0 in expectation for the population; the sample statistic is biased up,
    # by less as n grows and the dimension falls.
    small, big = torch.randn(600, 2, generator=g), torch.randn(600, 2, generator=g)
    assert distance_correlation(small, big).item() < 0.15
    y = x.flatten(1)[:, :1].pow(2)  # dependent but not linearly: strictly between
    assert 0.1 < distance_correlation(x, y).item() < 0.9


def test_distance_correlation_has_finite_gradients():
    x = torch.randn(16, 8)
    z = torch.randn(16, 5, requires_grad=True)
    distance_correlation(x, z).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_noise_sigma_zero_leaves_features_unchanged():
    f = Obfuscator(3, 0.125, 2, GaussianNoise()).eval()
    plain = Obfuscator(3, 0.125, 2).eval()
    plain.load_state_dict({k: v for k, v in f.state_dict().items() if not k.endswith("sigma")})
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(f(x), plain(x))
    set_noise(f, 0.5)
    noisy = f(x) - plain(x)
    assert abs(noisy.std().item() - 0.5) < 0.05  # the noise has the asked scale, in eval mode too
    assert isinstance(f[-1], GaussianNoise)


def test_plans_of_each_defence(tiny_config):
    t = tiny_config.train
    t.t_main, t.t_sub = 2, 1
    for defence in ("nopeek", "noise", "vib"):
        t.defence = defence
        phases = [s.phase for s in plan(t)]
        assert phases == [PRETRAIN] * 2 + [WARMUP] + [defence] * 2 + [FINAL]
    t.defence = "none"
    assert [s.phase for s in plan(t)] == [PRETRAIN] * 2 + [WARMUP]


def test_noise_run_keeps_noise_in_loaded_obfuscator(tiny_config, tmp_path):
    tiny_config.train.defence = "noise"
    tiny_config.train.noise_sigma = 0.3
    summary = train(tiny_config, tmp_path / "run", log=lambda *_: None)
    assert summary["defence"] == "noise" and summary["strength"] == 0.3
    run = load_run(tmp_path / "run")
    assert abs(float(run.obfuscator[-1].sigma) - 0.3) < 1e-6
    assert float(run.undefended_obfuscator[-1].sigma) == 0.0  # the ceiling has no noise


def test_nopeek_run_lowers_distance_correlation(tiny_config, tmp_path):
    tiny_config.train.defence = "nopeek"
    tiny_config.train.nopeek_alpha = 5.0
    tiny_config.train.t_main = 3
    tiny_config.train.adversarial_lr_scale = 1.0
    train(tiny_config, tmp_path / "run", log=lambda *_: None)
    rows = [r for r in load_run(tmp_path / "run").metrics if r["phase"] == "nopeek"]
    assert rows[-1]["train_dcor"] < rows[0]["train_dcor"]


def test_vib_term_estimates_the_kl_of_a_unit_gaussian_code_from_its_draw():
    torch.manual_seed(0)
    mu = torch.tensor([0.0, 1.0, -2.0, 3.0]).repeat(20_000, 1).view(20_000, 1, 2, 2)
    z = mu + torch.randn_like(mu)  # what the layer stores: one draw
    exact = 0.5 * (mu[0] ** 2).sum().item()  # KL(N(mu, 1) || N(0, 1)) summed over the map: 7.0 nats
    assert abs(kl_to_prior(None, z, None).item() - exact) < 0.05
    z = (mu + torch.randn_like(mu)).requires_grad_()
    kl_to_prior(None, z, None).backward()  # d/dz of the batch mean: z / N, whose mean over draws is mu / N
    assert torch.allclose(z.grad.mean(0) * len(z), mu[0], atol=0.05)


def test_vib_run_shrinks_the_code_and_keeps_its_unit_noise(tiny_config, tmp_path):
    tiny_config.train.defence, tiny_config.train.vib_beta = "vib", 0.5
    tiny_config.train.t_main, tiny_config.train.adversarial_lr_scale = 3, 1.0
    summary = train(tiny_config, tmp_path / "run", log=lambda *_: None)
    assert summary["defence"] == "vib" and summary["strength"] == 0.5
    run = load_run(tmp_path / "run")
    rows = [r for r in run.metrics if r["phase"] == "vib"]
    assert len(rows) == 3 and rows[-1]["train_kl_nats"] < 0.8 * rows[0]["train_kl_nats"]  # the term prices the code down
    assert float(run.obfuscator[-1].sigma) == 1.0 and run.obfuscator[-1].on  # the stored code is a draw
    assert float(run.undefended_obfuscator[-1].sigma) == 0.0  # the ceiling has no noise


class ToyShrink(torch.nn.Module):
    """A toy defence's layer: halves the features once `start` switched it on (a buffer, so checkpoints keep it)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("active", torch.tensor(0.0))

    def forward(self, x):
        return x * (1 - 0.5 * self.active)


def _switch_on(obfuscator, strength):
    for m in obfuscator.modules():
        if isinstance(m, ToyShrink):
            m.active.fill_(1.0)


def feature_energy(images, features, reconstructor):
    return features.float().pow(2).mean()


def test_a_new_defence_is_one_registry_entry(tmp_path, monkeypatch):
    """A toy defence declared here and registered in DEFENCES alone is trained, swept, attacked and reported."""
    from tests.report.test_report import make_tiny_npz, tiny_cfg
    from tests.test_sweep import TINY_ATTACK

    from veil import config as config_mod
    from veil.defences import DEFENCES, Defence
    from veil.report.sections import report
    from veil.rundir import read_metrics
    from veil.sweep import sweep

    toy = Defence(name="toy", summary="f + g on CE + gamma * mean squared feature, features halved", strength_key="train.lambda_privacy",
                  strength_label="gamma", symbol="γ", title="toy", round_phases=("toy",), penalty=feature_energy,
                  penalty_metric="train_energy", layer=ToyShrink, start=_switch_on)
    monkeypatch.setitem(DEFENCES, "toy", toy)
    config = tmp_path / "tiny.yaml"
    config.write_text(config_mod.to_yaml(tiny_cfg(make_tiny_npz(tmp_path / "tiny.npz"))))
    out = tmp_path / "sweep"
    rows = [r for r in sweep(config, [0.0, 5.0], out, ["t_main=2"], defence="toy", attack_settings=TINY_ATTACK, log=lambda *_: None) if not r["reference"]]

    assert [r["name"] for r in rows] == ["gamma-0", "gamma-5"] and all(r["defence"] == "toy" and r["psnr"] is not None for r in rows)
    energy = {}
    for name in ("gamma-0", "gamma-5"):
        metrics = read_metrics(out / name)
        assert [m["phase"] for m in metrics if m["round"] > 0 and m["phase"] != FINAL] == ["toy", "toy"]
        energy[name] = [m["train_energy"] for m in metrics if m["phase"] == "toy"]
        run = load_run(out / name)
        assert isinstance(run.obfuscator[-1], ToyShrink) and run.obfuscator[-1].active.item() == 1.0  # its layer, switched on, saved
        assert run.undefended_obfuscator[-1].active.item() == 0.0  # pretraining was undefended
    # The same pretraining, then the penalty at strength 5 pushes the feature energy below the unpenalised run's.
    assert energy["gamma-5"][-1] < energy["gamma-0"][-1]
    page = report([out], tmp_path / "report", log=lambda *_: None)["markdown"].read_text()
    assert "toy γ=5" in page and "gamma = 5" in page


def test_reid_penalty_is_zero_at_chance_and_log_n_when_every_reconstruction_picks_its_image():
    from veil.defences.reid import pairwise_psnr, reid_above_chance

    torch.manual_seed(0)
    images = torch.rand(6, 3, 8, 8)
    # pairwise PSNR against the obvious per-pair loop
    rec = torch.rand(6, 3, 8, 8)
    loop = torch.tensor([[-10 * math.log10(((rec[i] - images[j]) ** 2).mean().item()) for j in range(6)] for i in range(6)])
    torch.testing.assert_close(pairwise_psnr(rec, images), loop, atol=1e-3, rtol=0)
    constant = lambda z: images.mean(0, keepdim=True).expand(len(z), -1, -1, -1)  # noqa: E731 (the same image for everyone)
    assert reid_above_chance(images, images, constant).item() == 0.0
    perfect = reid_above_chance(images, images, lambda z: z)  # r(f(I)) = I: each picks its own image (100 dB apart)
    assert perfect.item() == pytest.approx(math.log(6), abs=1e-4)
    blurred = images + 0.3 * torch.randn_like(images)  # in between, and the gradient pushes towards chance
    blurred.requires_grad_(True)
    p = reid_above_chance(images, blurred, lambda z: z)
    assert 0 < p.item() < math.log(6)
    p.backward()
    with torch.no_grad():
        assert reid_above_chance(images, blurred - 0.01 * blurred.grad / blurred.grad.norm(), lambda z: z) < p


class _Fixed(torch.nn.Module):
    """A reconstructor that returns what it was built with (a function of the features)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, z):
        return self.fn(z)


def test_pool_penalty_takes_the_strongest_member_and_stops_at_the_floor():
    from veil.defences.adversarial import reconstruction_psnr
    from veil.defences.pool import strongest_above_floor
    from veil.metrics import psnr
    from veil.models.reconstructors import ReconstructorPool

    torch.manual_seed(0)
    images = torch.rand(8, 3, 8, 8)
    mean = images.mean(0, keepdim=True)
    constant = _Fixed(lambda z: mean.expand(len(z), -1, -1, -1))
    noisy = _Fixed(lambda z: (z + 0.1 * torch.randn_like(z)).clamp(0, 1))
    worse = _Fixed(lambda z: 1 - z)  # below the floor
    floor = psnr(images, mean.expand_as(images)).mean()
    assert strongest_above_floor(images, images, constant).item() == 0.0
    assert strongest_above_floor(images, images, worse).item() == 0.0  # nothing to gain below the floor
    pool = ReconstructorPool({"constant": constant, "worse": worse})
    assert strongest_above_floor(images, images, pool).item() == 0.0
    torch.manual_seed(1)
    alone = strongest_above_floor(images, images, noisy)
    torch.manual_seed(1)
    pooled = strongest_above_floor(images, images, ReconstructorPool({"constant": constant, "noisy": noisy, "worse": worse}))
    assert alone.item() > 5 and pooled.item() == pytest.approx(alone.item())  # the strongest member decides
    torch.manual_seed(1)
    assert reconstruction_psnr(images, images, ReconstructorPool({"worse": worse, "noisy": noisy})).item() == pytest.approx(alone.item() + floor.item())


def test_a_pool_trains_every_member_and_reinitialises_when_told(tiny_config, tmp_path, monkeypatch):
    from veil.models.reconstructors import ReconstructorPool

    train_mod = sys.modules["veil.train"]  # the module (veil.train is also the function's name)

    t = tiny_config.train
    t.defence, t.t_main, t.t_reconstructor, t.reinit_every = "pool", 3, 2, 2
    tiny_config.model.reconstructor = "simrec,resrec"
    assert [(s.phase, s.round) for s in plan(t)].count(("reconstructor", 2)) == 2  # phase (b): t_reconstructor epochs a round
    seen = []
    real = train_mod.train_reconstructor

    def spy(nets, *args, **kwargs):
        step = args[5]
        seen.append((step.phase, step.round, step.epoch, {k: v.clone() for k, v in nets["reconstructor"].state_dict().items()}))
        return real(nets, *args, **kwargs)

    monkeypatch.setattr(train_mod, "train_reconstructor", spy)
    train(tiny_config, tmp_path / "run", log=lambda *_: None)
    run = load_run(tmp_path / "run")
    assert isinstance(run.reconstructor, ReconstructorPool) and list(run.reconstructor.members) == ["simrec", "resrec"]
    entering = {(p, r, e): w for p, r, e, w in seen}
    fresh = train_mod.build_networks(tiny_config.model, 3, 10, 32, None, 0)["reconstructor"]
    train_mod.reinitialise(fresh, torch.optim.Adam(fresh.parameters()), tiny_config.seed, 3)
    # Round 3 (reinit_every 2: rounds 3, 5, ...) starts phase (b) from fresh weights; round 2 goes on from round 1's.
    for k, v in fresh.state_dict().items():
        assert torch.equal(entering[("reconstructor", 3, 1)][k], v), k
    after_round_1 = entering[("reconstructor", 2, 1)]
    assert any(not torch.equal(after_round_1[k], v) for k, v in fresh.state_dict().items() if v.is_floating_point())
    # Both members trained: each moved away from its state when round 2's phase (b) began.
    for member in ("simrec", "resrec"):
        keys = [k for k in after_round_1 if k.startswith(f"members.{member}.") and k.endswith("weight")]
        assert any(not torch.equal(after_round_1[k], entering[("reconstructor", 2, 2)][k]) for k in keys), member


def test_class_floor_penalty_is_zero_at_the_mean_of_the_others_of_its_class_and_counts_what_is_above():
    from veil.defences.classfloor import above_class_floor, others_of_class_mean
    from veil.metrics import psnr

    torch.manual_seed(0)
    images, labels = torch.rand(9, 3, 8, 8), torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3])  # class 3: one image alone
    means = others_of_class_mean(images, labels)
    assert torch.allclose(means[0], (images[1] + images[2]) / 2) and torch.allclose(means[3], images[4])
    assert torch.allclose(means[8], images[:8].mean(0))  # alone in its class: the mean of all the others
    at_floor = _Fixed(lambda z: means)
    assert above_class_floor(images, images, at_floor, labels).item() == 0.0
    assert above_class_floor(images, images, _Fixed(lambda z: 1 - z), labels).item() == 0.0  # nothing gained below the class floor
    # The image itself: every image's 100 dB above its own floor, averaged.
    exact = above_class_floor(images, images, _Fixed(lambda z: z), labels)
    assert exact.item() == pytest.approx((100 - psnr(images, means)).mean().item(), rel=1e-5) and exact.item() > 80
    # Differentiable through the features: a step against its gradient lowers it.
    z = (0.7 * images + 0.3 * means).requires_grad_()
    p = above_class_floor(images, z, _Fixed(lambda x: x), labels)
    p.backward()
    assert p.item() > 0 and above_class_floor(images, (z - 0.05 * z.grad / z.grad.norm()).detach(), _Fixed(lambda x: x), labels) < p


def test_a_class_floor_run_trains_with_the_batch_labels_and_logs_its_term(tiny_config, tmp_path):
    from veil.rundir import read_metrics
    from veil.train import train

    cfg = dataclasses.replace(tiny_config, train=dataclasses.replace(tiny_config.train, defence="classfloor"))
    train(cfg, tmp_path / "run", log=lambda *_: None)
    logged = [m["train_psnr_above_class_floor"] for m in read_metrics(tmp_path / "run") if "train_psnr_above_class_floor" in m]
    assert len(logged) == 2 and all(v >= 0 for v in logged)  # phases (a) and (c) of the one round
