import torch

from veil.defences import GaussianNoise, distance_correlation, set_noise
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
    for defence in ("nopeek", "noise"):
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
