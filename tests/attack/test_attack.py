"""The attack harness must be able to succeed (a recoverable obfuscator) and to fail (a constant one),
and its metrics must match hand-computed values."""

import dataclasses
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import DEMO_NPZ
from torch import nn

from veil import rundir
from veil.attack.attackers import attack_data, convergence_flags, fit_attacker, reconstruct
from veil.attack.harness import attack, attack_matrix, attack_obfuscator, ceiling_key, saved_attack
from veil.attack.references import NEIGHBOURS, label_store, logits_store, nearest_mean
from veil.attack.scoring import class_means, floor_scores, linkage, reid_rates, score, under_trained
from veil.attack.settings import AttackConfig, resolve_settings, seed_for
from veil.attack.tables import format_table, to_markdown
from veil.attack.whitebox import invert
from veil.cli import main
from veil.config import ConfigError
from veil.data import read_npz, to_float, to_tensor_images
from veil.defences import GaussianNoise
from veil.errors import AttackError
from veil.metrics import draw_candidates, expected_top_k, match_counts, psnr, reid_ranks, standardised, top_k_rate, total_variation
from veil.models import RECONSTRUCTORS
from veil.models.obfuscator import fingerprint
from veil.rundir import load_run
from veil.runtime import feature_maps, read_classes, read_logits
from veil.train import plan, train

# ----------------------------------------------------------------------------- metrics


def test_reid_ranks_hand_computed():
    pool = torch.tensor([0.0, 0.1, 0.5, 1.0]).view(4, 1, 1, 1)
    reconstructions = torch.tensor([0.45, 0.45, 0.05]).view(3, 1, 1, 1)
    candidates = torch.tensor([[0, 1, 2, 3], [2, 0, 1, 3], [0, 1, 3, 2]])
    # Row 0: true image 0.0 is 0.45 away; 0.1 (0.35) and 0.5 (0.05) are closer -> rank 3.
    # Row 1: true image 0.5 is the closest -> rank 1.
    # Row 2: 0.05 is as far from 0.0 as from 0.1: a tie counts against the attacker -> rank 2.
    ranks = reid_ranks(reconstructions, pool, candidates)
    assert ranks.tolist() == [3, 1, 2]
    assert top_k_rate(ranks, 1) == pytest.approx(1 / 3)
    assert top_k_rate(ranks, 2) == pytest.approx(2 / 3)
    assert top_k_rate(ranks, 5) == 1.0


def test_reid_ranks_match_a_slow_loop():
    torch.manual_seed(0)
    pool = torch.rand(30, 3, 4, 4)
    rec = (pool[:12] + 0.3 * torch.randn(12, 3, 4, 4)).clamp(0, 1)
    cand = draw_candidates(torch.arange(12), 30, 7, torch.Generator().manual_seed(1))
    slow = []
    for i in range(12):
        d = [((rec[i] - pool[j]) ** 2).mean().item() for j in cand[i].tolist()]
        slow.append(1 + sum(x <= d[0] for x in d[1:]))
    assert reid_ranks(rec, pool, cand, chunk=5).tolist() == slow


def test_reid_ranks_match_the_direct_distance_and_count_exact_copies_against_the_attacker():
    # The ranks come from |c|^2 - 2 c.r; they must order candidates as the plain mean squared difference
    # does, standardised or not, and an exact copy of the true image among the candidates is a tie.
    torch.manual_seed(0)
    pool = torch.rand(300, 3, 16, 16)
    pool[1::3] = pool[0::3][: len(pool[1::3])]  # every third image has an exact copy
    rec = (pool[:200] + 0.4 * torch.randn(200, 3, 16, 16)).clamp(0, 1)
    rec[150:] = pool.mean(0)  # constant reconstructions: the floor's kind
    cand = draw_candidates(torch.arange(200), 300, 50, torch.Generator().manual_seed(2))
    for standardise in (False, True):
        r, c = rec.double(), pool.double()[cand]  # 200 x 50 x C x H x W
        if standardise:
            r, c = standardised(r), standardised(c)
        d = (c.flatten(2) - r.flatten(1)[:, None]).pow(2).mean(2)
        direct = 1 + (d[:, 1:] <= d[:, :1]).sum(1)
        assert reid_ranks(rec, pool, cand, chunk=64, standardise=standardise).tolist() == direct.tolist()
    copy = torch.tensor([[0, 1, 2]])  # image 1 is an exact copy of image 0
    assert reid_ranks(pool[:1], pool, copy).item() == 2


def test_standardised_matching_finds_a_recoloured_image_that_pixel_matching_misses():
    torch.manual_seed(0)
    pool = torch.rand(20, 3, 8, 8) * 0.5 + 0.25
    rec = pool[:1] * 0.2 + torch.tensor([0.6, 0.0, 0.6]).view(3, 1, 1)  # image 0's shapes, faded and recoloured
    pool[1:] = rec.mean((2, 3), keepdim=True) + 0.001 * torch.randn(19, 3, 8, 8)  # the others: nearly flat, in its colours
    cand = torch.arange(20)[None]
    assert reid_ranks(rec, pool, cand).item() == 20  # by pixel MSE every flat image is nearer
    assert reid_ranks(rec, pool, cand, standardise=True).item() == 1


def test_the_class_floor_rebuilds_each_user_as_its_class_mean():
    from veil.attack.scoring import class_floor_scores, class_means

    torch.manual_seed(0)
    # Two classes far apart in brightness, the attacker has images of class 0 and 1 only (class 2: its overall mean).
    attacker = torch.cat([torch.randint(0, 60, (20, 3, 4, 4)), torch.randint(190, 250, (20, 3, 4, 4))]).to(torch.uint8)
    labels = torch.tensor([0] * 20 + [1] * 20)
    means = class_means(attacker, labels, 3)
    assert torch.allclose(means[0], to_float(attacker[:20]).mean(0)) and torch.allclose(means[2], to_float(attacker).mean(0))
    users = torch.cat([torch.randint(0, 60, (10, 3, 4, 4)), torch.randint(190, 250, (10, 3, 4, 4))]).to(torch.uint8)
    truth = torch.tensor([0] * 10 + [1] * 10)
    cand = draw_candidates(torch.arange(20), 20, 20, torch.Generator().manual_seed(0))
    scores = class_floor_scores(means, users, {"true": truth, "predicted": 1 - truth}, cand)
    assert scores["true"]["psnr_mean"] > scores["predicted"]["psnr_mean"] + 10  # the right class's mean is far nearer
    assert scores["predicted"]["reid_top5"] == 0.0  # the wrong class's mean is nearer every other-class candidate
    assert 0 < scores["true"]["reid_top1"] < 0.5  # the right class's mean cannot tell its 10 members apart


def test_draw_candidates():
    g = torch.Generator().manual_seed(0)
    cand = draw_candidates(torch.arange(50), 50, 10, g)
    assert cand.shape == (50, 10)
    assert cand[:, 0].tolist() == list(range(50))
    for i, row in enumerate(cand.tolist()):
        assert len(set(row)) == 10 and i not in row[1:] and all(0 <= j < 50 for j in row)
    assert torch.equal(cand, draw_candidates(torch.arange(50), 50, 10, torch.Generator().manual_seed(0)))
    assert len(torch.unique(cand[:, 1:])) == 50  # every image serves as a distractor somewhere
    with pytest.raises(ValueError, match="n_candidates"):
        draw_candidates(torch.arange(5), 5, 6, g)


def test_total_variation_hand_computed():
    stripes = torch.tensor([[0.0, 1.0], [0.0, 1.0]]).view(1, 1, 2, 2)  # only horizontal neighbours differ, by 1
    bands = torch.tensor([[0.0, 0.0], [0.5, 0.5]]).view(1, 1, 2, 2)  # only vertical neighbours differ, by 0.5
    assert total_variation(torch.cat([stripes, bands])).tolist() == pytest.approx([1.0, 0.25])


# ----------------------------------------------------------------------------- obfuscators that must succeed / fail


class Unshuffle(nn.Module):
    """Identity-like: a lossless rearrangement of each 2x2 patch into channels, 3x32x32 -> 12x16x16,
    the feature-map size of a one-block obfuscator (model.split = 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(x, 2)


class Constant(nn.Module):
    """Outputs the same feature map whatever the image: nothing to recover."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones(len(x), 8, 8, 8)


@pytest.fixture(scope="module")
def demo_images() -> torch.Tensor:
    images, _, _ = read_npz(DEMO_NPZ)
    return to_tensor_images(images, 32, "demo")  # 2000 x 3 x 32 x 32 uint8


def small_settings(**kw) -> AttackConfig:
    base = dict(attackers="simrec", max_epochs=12, patience=4, lr=5e-3, batch_size=32, n_candidates=20, whitebox_steps=60, progress=False)
    return AttackConfig(**{**base, **kw})


def test_attacker_succeeds_against_identity_like_obfuscator(demo_images):
    s = small_settings()
    data = attack_data(demo_images[:1000], demo_images[1800:], True, s)
    cand = draw_candidates(torch.arange(200), 200, s.n_candidates, torch.Generator().manual_seed(0))
    results, _ = attack_obfuscator(Unshuffle(), data, s, 0.25, 1, cand, "identity", log=lambda *_: None)
    floor = floor_scores(data, cand)
    for name in ("simrec", "whitebox"):
        r = results[name]
        assert r["psnr_mean"] > 25.0, (name, r["psnr_mean"])
        assert r["reid_top1"] >= 0.95, (name, r["reid_top1"])
        assert r["ssim_mean"] > floor["ssim"] + 0.5
    assert floor["psnr"] < 15.0
    # A lossless obfuscator needs no prior: the attacker's own held-out images pick the smallest TV weight.
    assert results["whitebox"]["tv_weight"] == 0.1 and set(results["whitebox"]["tv_tuning_psnr"]) == {"0.1", "1", "10"}


def test_attacker_reaches_floor_and_no_better_against_constant_obfuscator(demo_images):
    s = small_settings(max_epochs=4)
    data = attack_data(demo_images[:600], demo_images[1000:], True, s)
    cand = draw_candidates(torch.arange(1000), 1000, s.n_candidates, torch.Generator().manual_seed(0))
    results, _ = attack_obfuscator(Constant(), data, s, 0.25, 2, cand, "constant", log=lambda *_: None)
    floor = floor_scores(data, cand)
    chance = 1 / s.n_candidates
    for name in ("simrec", "whitebox"):
        r = results[name]
        assert r["psnr_mean"] < floor["psnr"] + 0.3, (name, r["psnr_mean"], floor["psnr"])
        assert r["psnr_mean"] > floor["psnr"] - 1.5, (name, r["psnr_mean"], floor["psnr"])
        # Every reconstruction is (nearly) the same image: re-identification at chance.
        assert abs(r["reid_top1"] - chance) < 0.05, (name, r["reid_top1"])
        assert abs(r["reid_top5"] - 5 * chance) < 0.1, (name, r["reid_top5"])
    assert abs(floor["reid_top1"] - chance) < 0.05


def test_whitebox_from_mean_image_is_the_floor_when_features_carry_nothing(demo_images):
    # Without a TV prior the objective has no gradient at all: the mean image comes back unchanged.
    s = small_settings(whitebox_steps=5)
    data = attack_data(demo_images[:200], demo_images[200:260], True, s)
    images, _ = invert(Constant(), feature_maps(Constant(), data.users, 64), data.mean_image, 0.0, s.whitebox_steps, s.whitebox_lr, s.eval_batch_size)
    assert torch.allclose(images, data.mean_image.expand_as(images).clamp(0, 1))


def _epoch_patience_runs_out(curve: list[dict], s: AttackConfig) -> int | None:
    """The stopping rule replayed on a curve: an epoch whose val_psnr beats the best before it (by any
    amount) resets the patience, any other uses one up; the epoch at which `patience` epochs in a row
    brought no new best (None if that never happens)."""
    best, waited = -math.inf, 0
    for c in curve:
        waited = 0 if c["val_psnr"] > best else waited + 1
        best = max(best, c["val_psnr"])
        if waited >= s.patience:
            return c["epoch"]
    return None


def test_early_stopping_counts_epochs_without_a_new_best_and_min_delta_only_slows_the_learning_rate(demo_images):
    # No gain can reach min_delta, so every epoch halves the learning rate; but each new best, however small,
    # resets the patience, so the attacker trains on while it still gains (the old rule stopped at epoch 3).
    s = small_settings(max_epochs=20, patience=2, lr=2e-2, min_delta=1e6)
    data = attack_data(demo_images[:300], demo_images[300:400], True, s)
    _, curve = fit_attacker("resrec", Unshuffle(), data, s, 0.125, 1, seed=0)
    # epoch 1 beats a best of -inf (no plateau); from then on each epoch gains less than min_delta
    assert [c["lr"] for c in curve] == pytest.approx([2e-2] + [2e-2 * 0.5**i for i in range(len(curve) - 1)])
    assert len(curve) > 1 + s.patience and _epoch_patience_runs_out(curve, s) in (len(curve), None)
    best = -math.inf
    for c in curve:  # waited is 0 exactly on a new best
        assert (c["waited"] == 0) == (c["val_psnr"] > best)
        best = max(best, c["val_psnr"])


def test_convergence_flags_name_each_reason_a_figure_is_a_lower_bound():
    def curve(vals, trains):
        best, waited, out = -math.inf, 0, []
        for i, (v, t) in enumerate(zip(vals, trains)):
            waited = 0 if v > best else waited + 1
            best = max(best, v)
            out.append({"epoch": i + 1, "val_psnr": v, "train_psnr": t, "waited": waited})
        return out

    assert convergence_flags(curve([12.0, 13.0, 12.9, 12.8], [12.5, 13.5, 13.6, 13.7]), 2) == []  # ended by patience, fitted
    assert convergence_flags(curve([12.0, 13.0, 13.1], [12.5, 13.5, 13.6]), 2) == ["cap", "best-last"]  # still gaining
    assert convergence_flags(curve([12.0, 13.0, 12.9], [12.5, 13.5, 13.6]), 2) == ["cap"]
    assert convergence_flags(curve([12.0, 13.0, 12.9, 12.8], [11.0, 12.5, 12.6, 12.7]), 2) == ["under-fit"]  # train below held-out at its best


def test_early_stopping_ends_a_plateau_and_keeps_the_best_weights(demo_images):
    # Features that carry nothing: the held-out PSNR levels off at the mean image within a few epochs.
    s = small_settings(max_epochs=40, patience=2, lr=2e-2)
    data = attack_data(demo_images[:300], demo_images[300:400], True, s)
    reconstructor, curve = fit_attacker("simrec", Constant(), data, s, 0.25, 2, seed=0)
    assert len(curve) < s.max_epochs
    # It stopped where the rule says, not before: the last `patience` epochs did not beat the best
    # before them, and every earlier run of epochs without a new best was shorter.
    assert _epoch_patience_runs_out(curve, s) == len(curve)
    best_before = max(c["val_psnr"] for c in curve[: -s.patience])
    assert all(c["val_psnr"] <= best_before for c in curve[-s.patience :])
    # Here the best epoch is not the last (seen: epoch 4 of 6, 12.49 dB against 12.47), so the
    # weights returned must be the best epoch's, restored, not simply the last ones.
    best = max(curve, key=lambda c: c["val_psnr"])
    assert best["epoch"] < len(curve)
    val = psnr(to_float(data.val), reconstruct(reconstructor, feature_maps(Constant(), data.val, 500), 500)).mean().item()
    assert val == pytest.approx(best["val_psnr"], abs=1e-4)


def test_an_attacker_never_finite_on_its_held_out_images_fails_naming_itself(demo_images, monkeypatch):
    import veil.attack.attackers as attack_mod

    s = small_settings(max_epochs=3, patience=5)
    data = attack_data(demo_images[:100], demo_images[100:120], True, s)
    monkeypatch.setattr(attack_mod, "reconstruct", lambda r, features, b, precision="fp32": torch.full((len(features), 3, 32, 32), math.nan))
    with pytest.raises(AttackError, match=r"attacker simrec: held-out PSNR was not finite in any of its 3 epochs; lower --lr"):
        fit_attacker("simrec", Unshuffle(), data, s, 0.0625, 1, seed=0)


class NoisySpy(nn.Module):
    """Unshuffle, then Gaussian noise (a random f, as the noise defence's); records every feature map it
    hands out for each image (keyed by the image's bytes)."""

    def __init__(self, sigma: float = 0.1):
        super().__init__()
        self.noise = GaussianNoise(sigma)
        self.seen: dict[int, set[int]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.noise(F.pixel_unshuffle(x, 2))
        for image, features in zip(x, z):
            self.seen.setdefault(hash(image.numpy().tobytes()), set()).add(hash(features.numpy().tobytes()))
        return z


def test_the_attacker_draws_a_random_obfuscator_afresh_for_every_batch(demo_images):
    s = small_settings(max_epochs=2, patience=5, batch_size=30)
    data = attack_data(demo_images[:100], demo_images[100:120], True, s)  # 90 training images: three whole batches
    spy = NoisySpy()
    fit_attacker("simrec", spy, data, s, 0.0625, 1, seed=0)
    draws = [len(spy.seen[hash(to_float(image).numpy().tobytes())]) for image in data.train]
    assert min(draws) == 2  # two epochs, a new noise draw each (not one draw stored once)
    # Each fit is seeded: the same seed sees the same draws, another seed others.
    again, other = NoisySpy(), NoisySpy()
    fit_attacker("simrec", again, data, s, 0.0625, 1, seed=0)
    fit_attacker("simrec", other, data, s, 0.0625, 1, seed=1)
    assert again.seen == spy.seen and other.seen != spy.seen


def test_a_fifth_reconstructor_added_to_the_registry_is_an_attacker_too(demo_images, monkeypatch):
    def tinyrec(in_channels: int, out_channels: int, width: float = 1.0, split: int = 2) -> nn.Module:
        return nn.Sequential(nn.Conv2d(in_channels, 4 * out_channels, 3, padding=1), nn.PixelShuffle(2), nn.Sigmoid())

    monkeypatch.setitem(RECONSTRUCTORS, "tinyrec", tinyrec)  # after veil.attack was imported
    s = resolve_settings({"attackers": "tinyrec", "max_epochs": 1, "batch_size": 30, "whitebox": False, "n_candidates": 10, "progress": False})
    data = attack_data(demo_images[:100], demo_images[100:140], True, s)
    cand = draw_candidates(torch.arange(40), 40, s.n_candidates, torch.Generator().manual_seed(0))
    results, _ = attack_obfuscator(Unshuffle(), data, s, 0.0625, 1, cand, "defended", log=lambda *_: None)
    assert list(results) == ["tinyrec"] and math.isfinite(results["tinyrec"]["psnr_mean"]) and results["tinyrec"]["epochs"] == 1


class CountingUnshuffle(Unshuffle):
    """Unshuffle that counts the images it has been given."""

    def __init__(self) -> None:
        super().__init__()
        self.images = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += len(x)
        return super().forward(x)


def test_every_attacker_of_one_fixed_obfuscator_reuses_one_computation_of_its_features(demo_images):
    s = small_settings(attackers="simrec,resrec", max_epochs=2, whitebox=False, n_candidates=10)
    data = attack_data(demo_images[:100], demo_images[100:120], True, s)
    cand = draw_candidates(torch.arange(len(data.users)), len(data.users), s.n_candidates, torch.Generator().manual_seed(0))
    f = CountingUnshuffle()
    attack_obfuscator(f, data, s, 0.0625, 1, cand, "defended", log=lambda *_: None)
    # Once over the attacker's training and held-out images, once over the users' (two attackers, two epochs each).
    assert f.images == len(data.train) + len(data.val) + len(data.users)
    f.images = 0
    attack_obfuscator(f, data, dataclasses.replace(s, augment=True), 0.0625, 1, cand, "defended", log=lambda *_: None)
    assert f.images > 2 * len(data.train)  # augmented images: f on every batch of every attacker


def test_linkage_finds_every_user_behind_a_deterministic_f_and_fewer_behind_strong_noise(demo_images):
    s = small_settings(n_candidates=10)
    users = demo_images[:60]
    cand = draw_candidates(torch.arange(60), 60, s.n_candidates, torch.Generator().manual_seed(0))
    exact = linkage(Unshuffle(), users, cand, s, "defended")
    assert exact["reid_top1"] == 1.0 and exact["n_candidates"] == 10 and exact["n_images"] == 60  # the stored map is f(image) itself
    noisy = nn.Sequential(Unshuffle(), GaussianNoise(50.0))  # noise far above the features' scale
    blurred = linkage(noisy, users, cand, s, "defended")
    assert blurred["reid_top1"] < 0.5 and blurred == {**linkage(noisy, users, cand, s, "defended"), "seconds": blurred["seconds"]}  # seeded


def test_a_tie_at_the_top_is_split_and_the_tie_against_rate_stays_beside_it():
    # Four pool images; 0 and 1 are exact copies (one code behind a quantiser), 2 and 3 far away.
    pool = torch.zeros(4, 1, 2, 2)
    pool[2], pool[3] = 1.0, 0.5
    queries = pool[[0, 0, 2]].clone()  # user 0 twice (candidates with and without its copy), user 2
    candidates = torch.tensor([[0, 1, 2, 3], [0, 2, 3, 1], [2, 0, 1, 3]])
    ahead, tied = match_counts(queries, pool, candidates)
    assert ahead.tolist() == [0, 0, 0] and tied.tolist() == [1, 1, 0]
    assert expected_top_k(ahead, tied, 1) == pytest.approx((0.5 + 0.5 + 1) / 3)  # a 2-way tie at the top scores 1/2
    assert expected_top_k(ahead, tied, 2) == pytest.approx(1.0)
    assert top_k_rate(reid_ranks(queries, pool, candidates), 1) == pytest.approx(1 / 3)  # every tie against: the lower bound
    r = score(pool, torch.tensor([0, 0, 2]), queries, candidates)
    assert r["reid_top1"] == pytest.approx(2 / 3) and r["reid_top1_lower"] == pytest.approx(1 / 3) and r["reid_tied"] == pytest.approx(2 / 3)
    # A gap far below any real distance but above rounding is still a tie; a real gap is not.
    near = pool.clone()
    near[1] += 1e-13
    assert match_counts(queries[:1], near, candidates[:1])[1].tolist() == [1]
    near[1] += 1e-3
    assert match_counts(queries[:1], near, candidates[:1]) == (torch.tensor([0]), torch.tensor([0]))


class Quantised(nn.Module):
    """A deterministic code of 2 levels per cell: many users share a code."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.avg_pool2d(x, 16) > 0.45).float()  # N x C x 2 x 2, 2^12 codes at most


def test_linkage_splits_ties_between_users_sharing_a_code(demo_images):
    s = small_settings(n_candidates=10)
    users = demo_images[:200]
    cand = draw_candidates(torch.arange(200), 200, s.n_candidates, torch.Generator().manual_seed(0))
    r = linkage(Quantised(), users, cand, s, "defended")
    assert r["reid_top1_lower"] < r["reid_top1"] <= 1.0 and r["reid_tied"] > 0 and r["draws"] == 1
    codes = Quantised()(to_float(users)).flatten(1)
    shared = (codes[cand[:, 1:]] == codes[cand[:, :1]]).all(-1).sum(1)  # candidates with the user's own code
    assert r["reid_top1"] == pytest.approx((1 / (1 + shared).float()).mean().item())  # the true one among them, found by a guess
    assert r["reid_top1_lower"] == pytest.approx((shared == 0).float().mean().item())


def test_noise_linkage_matches_against_the_mean_of_many_draws(demo_images):
    # One draw against one draw doubles the noise in the distance; the attacker, free to query f, averages draws.
    s = small_settings(n_candidates=10)
    users = demo_images[:100]
    cand = draw_candidates(torch.arange(100), 100, s.n_candidates, torch.Generator().manual_seed(0))
    noisy = nn.Sequential(Unshuffle(), GaussianNoise(1.0))
    single = linkage(noisy, users, cand, small_settings(n_candidates=10, linkage_max_draws=1), "defended")
    template = linkage(noisy, users, cand, s, "defended")
    assert single["draws"] == 1 and template["draws"] >= 16 and template["draws_settled"]
    assert template["reid_top1"] > single["reid_top1"] + 0.2  # measured: 0.63 with one draw, 0.97 with 16
    # Many more draws than it took change the rate by less than its standard error (or one user).
    torch.manual_seed(1)
    many = sum(feature_maps(noisy, users, 500) for _ in range(128)) / 128
    p = template["reid_top1"]
    torch.manual_seed(seed_for(s.seed, "defended", "users"))
    stored = feature_maps(noisy, users, s.eval_batch_size)  # the same stored draw linkage() matched against
    more = reid_rates(stored, many, cand)["reid_top1"]
    assert abs(more - p) <= max(math.sqrt(p * (1 - p) / 100), 1 / 100) + 1e-6


def test_the_whitebox_is_judged_against_the_floor_of_the_users_it_inverted():
    result = {"floor": {"psnr": 12.71}, "defended": {"whitebox": {"psnr_mean": 12.60, "floor_psnr": 12.55}, "simrec": {"psnr_mean": 12.70}}}
    assert under_trained(result) == ["defended/simrec"]  # 12.60 dB is above its own users' floor, 12.70 below all users'
    from veil.attack.results import strongest

    table = {"whitebox": {"psnr_mean": 12.9, "floor_psnr": 12.4}, "unet": {"psnr_mean": 13.0}}
    assert strongest(table, "psnr_mean", {"psnr": 12.71, "ssim": 0.1}) == ("whitebox", 12.9)  # 0.5 dB above its users' floor against 0.29
    assert strongest(table, "psnr_mean") == ("unet", 13.0)  # without the floor: the raw figure


def test_attack_data_is_disjoint_and_seeded(demo_images):
    s = small_settings()
    data = attack_data(demo_images[:300], demo_images[300:400], True, s)
    assert len(data.train) + len(data.val) == 300 and len(data.val) == 30
    key = lambda t: {bytes(x.numpy().tobytes()) for x in t}  # noqa: E731
    assert not key(data.train) & key(data.val)
    assert torch.equal(data.val, attack_data(demo_images[:300], demo_images[300:400], True, s).val)
    assert torch.allclose(data.mean_image, to_float(demo_images[:300]).mean(0, keepdim=True))


# ----------------------------------------------------------------------------- settings and outputs


def test_settings_validation():
    with pytest.raises(ConfigError, match="valid: simrec, urec1, urec2, resrec, unet"):
        resolve_settings({"attackers": "simrec,unet9"})
    assert resolve_settings({"attackers": "simrec,unet"}).attackers == "simrec,unet"  # the stronger decoder
    with pytest.raises(ConfigError, match="n_candidates"):
        resolve_settings({"n_candidates": 1})
    with pytest.raises(ConfigError, match="unknown setting"):
        resolve_settings({"epochs": 3})
    assert resolve_settings({"attackers": "simrec, resrec"}).attackers == "simrec, resrec"
    with pytest.raises(ConfigError, match=r"seed must be in 0..2\*\*32-1, got -1"):  # also for veil sweep --attack seed=-1
        resolve_settings({"seed": -1})


def fake_result(defended_psnr: float) -> dict:
    entry = dict(psnr_mean=defended_psnr, psnr_std=1.0, ssim_mean=0.1, reid_top1=0.01, reid_top5=0.05, n_candidates=100, n_images=400)
    floor = dict(entry, psnr_mean=12.0, psnr=12.0, ssim=0.05)
    result = {
        "run": "runs/x", "dataset": "demo", "training_reconstructor": "simrec", "lambda_privacy": 1.0, "n_attacker_train": 288,
        "n_attacker_val": 32, "n_users": 400, "chance": {"top1": 0.01, "top5": 0.05}, "floor": floor,
        "defended": {"simrec": entry}, "undefended": {"simrec": dict(entry, psnr_mean=20.0)}, "settings": AttackConfig().__dict__,
        "seed": 0, "attacker_width": 0.25, "device": "cpu", "torch_threads": 2, "torch_version": "x", "veil_version": "x", "date": "x", "seconds": 1.0,
    }
    from veil.attack.scoring import under_trained

    result["under_trained"] = under_trained(result)
    return result


def test_defended_psnr_below_floor_is_flagged_as_under_trained():
    low, high = fake_result(11.0), fake_result(13.0)
    assert low["under_trained"] == ["defended/simrec"] and high["under_trained"] == []
    assert "under-trained" in format_table(low) and "under-trained" in to_markdown(low)
    assert "under-trained" not in format_table(high) and "under-trained" not in to_markdown(high)


def test_ceiling_key_is_the_obfuscators_function_data_and_settings():
    from veil.defences import GaussianNoise, set_noise
    from veil.models import Obfuscator

    torch.manual_seed(0)
    plain = Obfuscator(3, 0.0625, 2)
    noisy = Obfuscator(3, 0.0625, 2, GaussianNoise())
    noisy.load_state_dict(plain.state_dict(), strict=False)  # same weights, plus a sigma = 0 noise layer
    s = AttackConfig()
    key = ceiling_key(plain, "data", s, 0.0625, 2)
    assert ceiling_key(noisy, "data", s, 0.0625, 2) == key  # a zero-noise layer changes nothing
    set_noise(noisy, 0.5)
    assert ceiling_key(noisy, "data", s, 0.0625, 2) != key
    assert ceiling_key(plain, "other data", s, 0.0625, 2) != key
    assert ceiling_key(plain, "data", AttackConfig(max_epochs=s.max_epochs + 1), 0.0625, 2) != key
    assert ceiling_key(plain, "data", AttackConfig(device="cpu", progress=False), 0.0625, 2) == key  # how, not what
    with torch.no_grad():
        plain[0].weight[0, 0, 0, 0] += 1e-3
    assert ceiling_key(plain, "data", s, 0.0625, 2) != key


@pytest.fixture
def tiny_run(tiny_config, tmp_path):
    """A whole tiny Algorithm 1 run (width 1/16, 240 images) to attack."""
    train(tiny_config, tmp_path / "run", log=lambda *_: None)
    return tmp_path / "run"


TINY_FLAGS = ["--attackers", "simrec,resrec", "--max-epochs", "2", "--batch-size", "16", "--n-candidates", "10",
              "--whitebox-images", "12", "--whitebox-steps", "4", "--n-show", "4", "--no-progress"]


def test_veil_attack_writes_every_output(tiny_run, capsys):
    assert main(["attack", str(tiny_run), *TINY_FLAGS]) == 0
    out = capsys.readouterr().out
    assert "floor: mean image" in out and "undefended PSNR" in out
    folder = tiny_run / "attack"
    result = json.loads((folder / "attack.json").read_text())
    keys = {"psnr_mean", "psnr_std", "ssim_mean", "reid_top1", "reid_top5", "reid_std_top1", "reid_std_top5", "n_candidates"}
    assert set(result["floor"]) >= {"psnr", "ssim"}
    for which in ("defended", "undefended"):
        assert set(result[which]) == {"simrec", "resrec", "whitebox"}
        for name, r in result[which].items():
            assert keys <= set(r), name
            assert r["n_candidates"] == 10 and math.isfinite(r["psnr_mean"]) and 0 <= r["reid_top1"] <= r["reid_top5"] <= 1
            assert 0 <= r["reid_std_top1"] <= r["reid_std_top5"] <= 1
            assert r["curve"], name
            if name != "whitebox":  # what a learned attacker cost: epochs to its early stop, seconds per epoch
                assert r["epochs"] == len(r["curve"]) <= 2 and 1 <= r["best_epoch"] <= r["epochs"]
                assert r["seconds_per_epoch"] == pytest.approx(sum(c["seconds"] for c in r["curve"]) / r["epochs"], abs=0.01)
                assert 0 < r["seconds_per_epoch"] * r["epochs"] <= r["seconds"] + 0.1  # both rounded
        assert result[which]["whitebox"]["n_images"] == 12 and result[which]["simrec"]["n_images"] == result["n_users"]
    assert result["settings"]["max_epochs"] == 2 and result["seed"] == 0 and result["settings"]["attackers"] == "simrec,resrec"
    # The class floors: the attacker's mean image of the user's true class, and of the class the run's classifier reads.
    for k in ("true", "predicted"):
        r = result["class_floor"][k]
        assert r["n_images"] == result["n_users"] and 0 <= r["reid_top1"] <= r["reid_top5"] <= 1 and math.isfinite(r["psnr_mean"])
    assert "| floor: class mean, true label |" in (folder / "attack.md").read_text()
    assert "| floor: class mean, label the run's classifier reads |" in (folder / "attack.md").read_text()  # the run's g, not a store classifier
    # Linkage by feature matching, apart from the attackers: a deterministic f links every stored map to its image.
    for which in ("defended", "undefended"):
        assert result["linkage"][which]["reid_top1"] == 1.0 and result["linkage"][which]["n_candidates"] == 10
        assert "linkage" not in result[which]
    assert "linkage: feature matching (attacker computes f(candidate))" in out
    csv = (folder / "attack.csv").read_text().splitlines()
    assert csv[0].startswith("obfuscator,attacker,psnr_mean") and len(csv) == 1 + 1 + 2 + 3 + 6 + 2  # floors, references, attackers, linkage
    assert csv[-2].startswith("defended,linkage,,,,1,1,10,")
    assert [line.split(",")[1] for line in csv if line.startswith("reference,")] == ["image_store", "label_store", "logits_store"]
    # The reference stores: the image store gives everything away; the label store keeps the pretrained classifier's class.
    image, label = result["reference_stores"]["image"], result["reference_stores"]["label"]
    assert image["psnr_mean"] == pytest.approx(100.0) and image["reid_top1"] == 1.0 and image["bytes_per_item"] == 3 * 32 * 32
    assert label["bytes_per_item"] == 1 and label["linkage"]["distinct_codes"] <= 10
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert label["accuracy"] == pytest.approx(summary["pretrain_test_accuracy"], abs=1e-9)  # the pretrained classifier's own accuracy, reproduced
    logits = result["reference_stores"]["logits"]  # the same classifier's logits: its class, so its accuracy, and 10 float16 values
    assert logits["accuracy"] == label["accuracy"] and logits["bytes_per_item"] == 2 * 10 and logits["labels_from"] == label["labels_from"]
    assert "| reference: logits store (keeps the classifier's logits) |" in (folder / "attack.md").read_text()
    assert set(result["linkage"]["defended"]["changed"]) == {"flip", "shift", "jpeg", "brighter"}
    assert "| reference: label store (keeps the class read) |" in (folder / "attack.md").read_text() and "shifted 2 px" in (folder / "attack.md").read_text()
    header = csv[0].split(",")
    simrec = dict(zip(header, next(line for line in csv if line.startswith("defended,simrec,")).split(",")))
    assert int(simrec["epochs"]) == result["defended"]["simrec"]["epochs"] and float(simrec["seconds_per_epoch"]) > 0
    assert float(simrec["reid_std_top1"]) == pytest.approx(result["defended"]["simrec"]["reid_std_top1"], abs=1e-6)  # the CSV keeps 6 digits
    md = (folder / "attack.md").read_text()
    assert "| floor: mean image |" in md and "| linkage: feature matching (attacker computes f(candidate)) | — | — | 100.0% | 100.0% |" in md
    for name in ("simrec", "resrec", "whitebox", "attackers-side-by-side"):
        assert (folder / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Strongest against the defended obfuscator, per metric: PSNR " in md


def test_a_ceiling_from_another_run_of_the_same_images_and_not_of_others(tiny_run, tiny_config, tmp_path, capsys):
    deeper = dataclasses.replace(tiny_config, model=dataclasses.replace(tiny_config.model, split=3, width=0.125), train=dataclasses.replace(tiny_config.train, defence="none"))
    train(deeper, tmp_path / "deeper", log=lambda *_: None)
    assert main(["attack", str(tmp_path / "deeper"), "--ceiling", str(tiny_run), *TINY_FLAGS]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "deeper" / "attack" / "attack.json").read_text())
    assert result["ceiling_run"] == str(tiny_run) and f"the undefended (pretrained) obfuscator of {tiny_run} (--ceiling)" in out
    # Each side's attackers are as wide as the obfuscator they attack, and attack.json says so per side.
    assert result["attacker_width"] == {"defended": 0.125, "undefended": tiny_config.model.width} and "defended 0.125, undefended 0.0625" in (tmp_path / "deeper" / "attack" / "attack.md").read_text()
    assert result["reference_stores"]["label"]["labels_from"].startswith(str(tiny_run))  # the label the ceiling's pretrained classifier reads
    # The undefended columns are the other run's pretrained split (cut at block 2), not this run's own (block 3).
    own = attack(tmp_path / "deeper", resolve_settings({"attackers": "simrec", "max_epochs": 2, "batch_size": 16, "n_candidates": 10,
                                                         "whitebox": False, "progress": False}), log=lambda *_: None)
    assert own["undefended"]["simrec"]["psnr_mean"] == own["defended"]["simrec"]["psnr_mean"]  # defence none: itself
    assert result["undefended"]["simrec"]["psnr_mean"] != result["defended"]["simrec"]["psnr_mean"]
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert result["accuracy"]["undefended"] == summary["pretrain_test_accuracy"] and "Test accuracy of the run's classifier" in out
    # A ceiling trained on other images (another seed draws other splits) is refused, naming both runs' data.
    other_seed = dataclasses.replace(tiny_config, seed=1)
    train(other_seed, tmp_path / "seed1", log=lambda *_: None)
    with pytest.raises(AttackError, match="trained on other images"):
        attack(tmp_path / "deeper", resolve_settings({"attackers": "simrec", "max_epochs": 1, "ceiling": str(tmp_path / "seed1"), "progress": False}),
               log=lambda *_: None)


def test_veil_attack_matrix_reuses_runs_with_the_same_settings(tiny_run, tmp_path, capsys):
    other, third = tmp_path / "other", tmp_path / "third"
    shutil.copytree(tiny_run, other, ignore=shutil.ignore_patterns("attack"))
    shutil.copytree(tiny_run, third, ignore=shutil.ignore_patterns("attack"))
    s = resolve_settings({"attackers": "simrec,resrec", "max_epochs": 2, "batch_size": 16, "n_candidates": 10, "whitebox_images": 12,
                          "whitebox_steps": 4, "n_show": 4, "progress": False})
    attack(tiny_run, s, log=lambda *_: None)
    lines = []
    matrix = attack_matrix([tiny_run, other, third], s, tmp_path / "table3", log=lines.append)
    assert any("reusing" in line for line in lines) and (other / "attack" / "attack.json").is_file()
    assert matrix["rows"] == ["simrec", "resrec", "whitebox"] and len(matrix["columns"]) == 3
    # Runs of one pretraining share its undefended attack: attacked for `other`, reused for `third`.
    assert sum("its results reused" in line for line in lines) == 1
    assert json.loads((third / "attack" / "attack.json").read_text())["undefended_from"] == str(other)
    # The same run attacked twice with the same seed gives the same numbers.
    a, b, _ = matrix["columns"]
    assert matrix["psnr"]["simrec"][a] == pytest.approx(matrix["psnr"]["simrec"][b], abs=1e-4)
    # SSIM, re-identification, the floors and the accuracy of each column are its run's attack.json figures.
    saved = json.loads((other / "attack" / "attack.json").read_text())
    assert matrix["ssim"]["resrec"][b] == saved["defended"]["resrec"]["ssim_mean"]
    assert matrix["reid_top1"]["whitebox"][b] == saved["defended"]["whitebox"]["reid_top1"]
    assert matrix["floors"][b]["predicted"]["psnr"] == saved["class_floor"]["predicted"]["psnr_mean"]
    assert matrix["accuracy"][b] == saved["accuracy"]["defended"]
    md = (tmp_path / "table3" / "matrix.md").read_text()
    assert "re-identification top-1" in md and "class floor: class read" in md and md.count("|") > 30
    assert (tmp_path / "table3" / "matrix.csv").read_text().splitlines()[0].startswith("attack,")


def test_an_attacker_stopped_by_the_epoch_cap_is_marked_as_a_lower_bound(tiny_run):
    # Two epochs with patience 5 cannot end by patience: every learned attacker is capped, and says so
    # in attack.json, the CSV and the table. With a gain no epoch reaches, patience ends it instead.
    s = {"attackers": "simrec,resrec", "max_epochs": 2, "patience": 5, "batch_size": 16, "n_candidates": 10, "whitebox_images": 8,
         "whitebox_steps": 3, "n_show": 4, "progress": False, "undefended": False}
    result = attack(tiny_run, resolve_settings(s), log=lambda *_: None)
    assert result["capped"] == ["defended/simrec", "defended/resrec"]
    assert [result["defended"][n]["stopped"] for n in ("simrec", "resrec")] == ["cap", "cap"] and "stopped" not in result["defended"]["whitebox"]
    assert all("cap" in result["defended"][n]["flags"] for n in ("simrec", "resrec")) and set(result["unconverged"]) == {"defended/simrec", "defended/resrec"}
    md, csv_rows = (tiny_run / "attack" / "attack.md").read_text(), (tiny_run / "attack" / "attack.csv").read_text().splitlines()
    assert md.count("(cap") == 4 and "defended/simrec (cap" in md and "Not converged" in md  # two cells and the note's two names
    header = csv_rows[0].split(",")
    assert [r.split(",")[header.index("stopped")] for r in csv_rows[1:] if ",simrec," in r or ",whitebox," in r] == ["cap", ""]
    assert [r.split(",")[header.index("flags")].split("+")[0] for r in csv_rows[1:] if ",simrec," in r] == ["cap"]
    assert result["attacker_width"] == {"defended": 0.0625}  # one width per side attacked (the undefended side was not)
    stopped = attack(tiny_run, resolve_settings({**s, "attackers": "simrec", "max_epochs": 40, "patience": 1, "lr": 0.05}), log=lambda *_: None)
    r = stopped["defended"]["simrec"]
    assert r["stopped"] == "patience" and r["epochs"] < 40 and stopped["capped"] == []
    assert ("(cap" in (tiny_run / "attack" / "attack.md").read_text()) == ("cap" in r["flags"])


def numbers(result: dict) -> dict:
    """attack.json's numbers, less timings."""
    drop = {"seconds", "seconds_per_epoch", "date", "settings", "seed", "curve"}
    return {k: numbers(v) if isinstance(v, dict) else v for k, v in result.items() if k not in drop}


def test_attacks_of_a_noise_run_are_seeded_by_the_attack_seed(tiny_config, tmp_path):
    tiny_config.train.defence, tiny_config.train.noise_sigma = "noise", 0.5
    train(tiny_config, tmp_path / "run", log=lambda *_: None)
    s = resolve_settings({"attackers": "simrec", "max_epochs": 2, "batch_size": 16, "n_candidates": 10, "whitebox_images": 8,
                          "whitebox_steps": 3, "n_show": 4, "progress": False, "undefended": False})
    first = numbers(attack(tmp_path / "run", s, log=lambda *_: None))
    torch.manual_seed(123)  # the global generator's state before an attack must not matter
    assert numbers(attack(tmp_path / "run", s, log=lambda *_: None)) == first
    other = numbers(attack(tmp_path / "run", resolve_settings({**dataclasses.asdict(s), "seed": 1}), log=lambda *_: None))
    assert other["defended"]["simrec"]["psnr_mean"] != first["defended"]["simrec"]["psnr_mean"]


def test_the_attack_layout_changes_speed_not_figures(tiny_run, tmp_path):
    # channels_last (NHWC) is on by default on a CPU, where it is faster; it reorders the arithmetic only.
    s = {"attackers": "simrec,unet", "max_epochs": 2, "patience": 5, "batch_size": 16, "n_candidates": 10, "whitebox_images": 8,
         "whitebox_steps": 3, "n_show": 4, "progress": False, "undefended": False}
    results = {}
    for layout in ("off", "on"):
        shutil.rmtree(tiny_run / "attack", ignore_errors=True)
        results[layout] = attack(tiny_run, resolve_settings({**s, "channels_last": layout}), log=lambda *_: None)
    for name in ("simrec", "unet", "whitebox"):
        off, on = results["off"]["defended"][name], results["on"]["defended"][name]
        assert on["psnr_mean"] == pytest.approx(off["psnr_mean"], abs=0.05) and on["ssim_mean"] == pytest.approx(off["ssim_mean"], abs=0.005)
    with pytest.raises(ConfigError, match="channels_last must be auto, on or off, got 'nhwc'"):
        resolve_settings({"channels_last": "nhwc"})


def test_an_unfinished_run_is_refused_unless_allowed_and_a_changed_obfuscator_is_attacked_again(tiny_config, tmp_path, monkeypatch, capsys):
    run, quiet = tmp_path / "run", (lambda *_: None)
    real_save, calls = rundir.save_checkpoint, {"n": 0}

    def killed_after_three(*args, **kwargs):
        real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(rundir, "save_checkpoint", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config, run, log=quiet)
    monkeypatch.setattr(rundir, "save_checkpoint", real_save)
    n = len(plan(tiny_config.train))
    assert main(["attack", str(run), *TINY_FLAGS]) == 2
    err = capsys.readouterr().err
    assert f"{run}: training has not finished (step 3 of {n})" in err and "--allow-unfinished" in err and err.count("\n") == 1
    s = resolve_settings({"attackers": "simrec", "max_epochs": 1, "batch_size": 16, "n_candidates": 10, "whitebox": False, "n_show": 4,
                          "progress": False, "undefended": False})
    with pytest.raises(AttackError, match=r"training has not finished \(step 3 of"):
        attack_matrix([run], s, tmp_path / "table3", log=quiet)

    # Allowed: attack.json says which checkpoint and which obfuscator were attacked, and attack.md flags it.
    early = attack(run, dataclasses.replace(s, allow_unfinished=True), log=quiet)
    assert early["step"] == 3 and early["steps"] == n and early["obfuscator_fingerprint"] == fingerprint(load_run(run).obfuscator)
    assert "had not finished training" in (run / "attack" / "attack.md").read_text()

    # Trained to the end: the same settings, but another obfuscator, so attacked again (not reused).
    train(tiny_config, run, resume=True, log=quiet)
    lines: list[str] = []
    attack_matrix([run], s, tmp_path / "table3", log=lines.append)
    assert not any("reusing" in line for line in lines) and any("another obfuscator" in line for line in lines)
    final = json.loads((run / "attack" / "attack.json").read_text())
    assert final["step"] == n and final["obfuscator_fingerprint"] not in ("", early["obfuscator_fingerprint"])
    lines = []
    attack_matrix([run], s, tmp_path / "table3", log=lines.append)  # now the same settings and obfuscator
    assert any("reusing" in line for line in lines)
    # allow_unfinished changes no number: an attack.json made with it stands for one made without.
    assert saved_attack(run, dataclasses.replace(s, allow_unfinished=True), final["obfuscator_fingerprint"])[0] == final


def test_veil_attack_errors_are_one_line(tmp_path, capsys):
    assert main(["attack"]) == 2
    assert "needs one RUN_DIR" in capsys.readouterr().err
    assert main(["attack", str(tmp_path), "--attackers", "simrec,nope"]) == 2
    assert "valid: simrec, urec1, urec2, resrec" in capsys.readouterr().err
    assert main(["attack", str(tmp_path)]) == 2
    assert "not a Veil run directory" in capsys.readouterr().err


def test_defence_none_is_attacked_once_for_both_columns(tiny_config, tmp_path, monkeypatch):
    """With no defence the undefended obfuscator is the defended one: its attack is not run twice."""
    import veil.attack.harness as attack_mod

    tiny_config.train.defence = "none"
    train(tiny_config, tmp_path / "run", log=lambda *_: None)
    calls, linked = [], []
    real, real_linkage = attack_mod.attack_obfuscator, attack_mod.linkage
    monkeypatch.setattr(attack_mod, "attack_obfuscator", lambda *a, **k: calls.append(a[-2]) or real(*a, **k))
    monkeypatch.setattr(attack_mod, "linkage", lambda *a, **k: linked.append(a[-2]) or real_linkage(*a, **k))
    s = resolve_settings({"attackers": "simrec", "max_epochs": 1, "batch_size": 16, "whitebox": False, "n_candidates": 10, "progress": False, "device": "cpu"})
    result = attack(tmp_path / "run", s, log=lambda *_: None)
    assert calls == ["defended"] and result["undefended"] == result["defended"] and "same weights" in result["undefended_from"]
    assert linked == ["defended"] and result["linkage"]["undefended"] == result["linkage"]["defended"]  # linked once, for both columns


def test_a_secret_rotation_of_the_channels_hides_nothing_from_an_attacker_who_matches_gram_matrices(demo_images):
    """Why the docs say a keyed projection does not stop linkage: for any orthogonal Q over the channels,
    (Q z)^T (Q z) = z^T z, so the Gram matrix of a stored map over its positions is f(image)'s, key or no key."""
    users = to_float(demo_images[:50])
    z = Unshuffle()(users).flatten(2)  # 50 x C x P
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(z.shape[1], z.shape[1]))  # the store's secret
    stored = q @ z
    naive = torch.cdist(stored.flatten(1), z.flatten(1)).argmin(1)  # MSE against f(candidate), as `linkage` does
    gram = lambda x: (x.transpose(1, 2) @ x).flatten(1)  # noqa: E731
    invariant = torch.cdist(gram(stored), gram(z)).argmin(1)
    truth = torch.arange(len(users))
    assert (naive == truth).float().mean() < 0.2  # the key defeats plain matching...
    assert (invariant == truth).float().mean() == 1.0  # ...not matching what the key leaves unchanged


def test_an_attack_saved_before_a_setting_existed_counts_it_at_its_default():
    from veil.attack.settings import result_settings

    s = resolve_settings({"max_epochs": 3})
    old = {k: v for k, v in dataclasses.asdict(s).items() if k != "ceiling"}  # an attack.json written before --ceiling
    assert result_settings(old) == result_settings(s)
    assert result_settings({**old, "ceiling": "runs/other"}) != result_settings(s)


# ----------------------------------------------------------------------------- changed copies and the reference stores


def test_changed_copies_are_what_they_say(demo_images):
    from veil.attack.copies import changed_copies

    x = demo_images[:6]
    c = changed_copies(x)
    assert set(c) == {"flip", "shift", "jpeg", "brighter"} and all(v.shape == x.shape and v.dtype == torch.uint8 for v in c.values())
    assert torch.equal(c["flip"], x.flip(-1)) and torch.equal(c["flip"].flip(-1), x)
    assert torch.equal(c["shift"][..., 2:, 2:], x[..., :-2, :-2])  # moved 2 right and 2 down
    assert torch.equal(c["shift"][..., :2, 2:], x[..., :1, :-2].expand(-1, -1, 2, -1))  # the uncovered rows repeat the edge
    assert torch.equal(c["brighter"], (x.float() * 1.1).round().clamp(0, 255).to(torch.uint8)) and (c["brighter"] >= x).all()
    err = psnr(to_float(x), to_float(c["jpeg"]))
    assert (err > 22).all() and (err < 45).all()  # quality 50: a visibly lossy copy, not the image nor noise


def test_linkage_from_changed_copies_and_the_code_entropy(demo_images):
    from veil.attack.copies import changed_copies

    s = small_settings(n_candidates=10)
    users = demo_images[:80]
    cand = draw_candidates(torch.arange(80), 80, s.n_candidates, torch.Generator().manual_seed(0))
    r = linkage(Unshuffle(), users, cand, s, "defended", changed_copies(users))
    assert r["reid_top1"] == 1.0 and r["changed"]["brighter"]["reid_top1"] > 0.9  # pixels rearranged: a brighter copy is still closest
    assert r["changed"]["flip"]["reid_top1"] < r["reid_top1"]
    assert r["distinct_codes"] == 80 and r["code_entropy_bits"] == pytest.approx(math.log2(80))  # every item distinct
    q = linkage(Quantised(), users, cand, s, "defended")
    codes = Quantised()(to_float(users)).flatten(1)
    _, counts = torch.unique(codes, dim=0, return_counts=True)
    p = counts.double() / 80
    assert q["distinct_codes"] == len(counts) < 80 and q["code_entropy_bits"] == pytest.approx(float(-(p * p.log2()).sum()))


class Labels(nn.Module):
    """A 'classifier' reading a fixed class from the mean brightness of the map: 3 classes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.flatten(1).mean(1)
        return torch.stack([-(m - c).abs() for c in (0.3, 0.45, 0.6)], 1)


def test_the_reference_stores_bound_a_configuration(demo_images):
    from veil.attack.copies import changed_copies
    from veil.attack.references import image_store, label_store
    from veil.runtime import read_classes

    users = demo_images[:90]
    cand = draw_candidates(torch.arange(90), 90, 10, torch.Generator().manual_seed(0))
    copies = changed_copies(users)
    image = image_store(users, copies, cand)
    assert image["psnr_mean"] == pytest.approx(100.0) and image["ssim_mean"] == pytest.approx(1.0) and image["reid_top1"] == 1.0
    assert image["linkage"]["reid_top1"] == 1.0 and image["bytes_per_item"] == 3 * 32 * 32
    f = nn.Identity()
    labels = read_classes(f, Labels(), users, 500)
    means = torch.rand(3, 3, 32, 32)
    truth = labels.clone()
    truth[:9] = (truth[:9] + 1) % 3  # the label store is right on 81 of 90
    label = label_store(f, Labels(), users, truth, copies, means, cand, 500)
    assert label["accuracy"] == pytest.approx(81 / 90) and label["bytes_per_item"] == 1
    assert label["psnr_mean"] == pytest.approx(psnr(to_float(users), means[labels]).mean().item(), abs=1e-5)  # the class mean, read
    same = (labels[cand[:, 1:]] == labels[cand[:, :1]]).sum(1)  # candidates of the same class: all tie with the true one
    assert label["linkage"]["reid_top1"] == pytest.approx((1 / (1 + same).float()).mean().item())
    assert label["linkage"]["distinct_codes"] == len(set(labels.tolist())) <= 3


def test_the_logits_store_rebuilds_from_the_nearest_logits_and_links_by_them(demo_images):
    from veil.attack.copies import changed_copies

    images, keys = to_float(demo_images[:50]), torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(nearest_mean(keys, keys, images, 1), images)  # each key its own nearest
    assert torch.allclose(nearest_mean(keys[:5], keys, images, 50), images.mean(0, keepdim=True).expand(5, -1, -1, -1), atol=1e-6)
    f, g = nn.Identity(), Labels()  # logits: the distance of the mean brightness to three levels
    own, held_out, users = demo_images[:800], demo_images[800:1000], demo_images[1000:1090]
    cand = draw_candidates(torch.arange(90), 90, 10, torch.Generator().manual_seed(0))
    copies = changed_copies(users)
    truth = read_classes(f, g, users, 500)
    truth[:9] = (truth[:9] + 1) % 3
    r = logits_store(f, g, own, held_out, users, truth, copies, cand, 500)
    assert r["accuracy"] == pytest.approx(81 / 90) and r["bytes_per_item"] == 2 * 3 and r["neighbours"] in NEIGHBOURS
    # Its rebuild is the mean of the k own images with the nearest float16 logits, k as chosen on the held-out images.
    keep = lambda x: read_logits(f, g, x, 500).half().float()  # noqa: E731
    expected = nearest_mean(keep(users), keep(own), to_float(own), r["neighbours"])
    assert r["psnr_mean"] == pytest.approx(psnr(to_float(users), expected).mean().item(), abs=1e-5)
    # The logits say how bright the image is, which the class does not: closer than the class mean, and far easier to link.
    label = label_store(f, g, users, truth, copies, class_means(own, read_classes(f, g, own, 500), 3), cand, 500)
    assert r["psnr_mean"] > label["psnr_mean"] + 0.1  # 13.49 against 13.25 dB here
    assert r["linkage"]["reid_top1"] > 0.9 > label["linkage"]["reid_top1"] and r["linkage"]["changed"]["flip"]["reid_top1"] > 0.9  # a flip keeps the mean
