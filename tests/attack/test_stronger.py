"""The attackers that use f, a prior and a search (attack/registry.py): each trains, is seeded and beats the
floor on an undefended paper cut, and each of their parts matters in the direction it is meant to."""

import dataclasses
import math

import pytest
import torch
from tests.conftest import DEMO_NPZ

from veil.attack.attackers import attack_data, consistency_db, fit_attacker, reconstruct
from veil.attack.harness import attack_obfuscator
from veil.attack.registry import registry
from veil.attack.scoring import floor_scores
from veil.attack.settings import AttackConfig, resolve_settings, search_grid, seed_for
from veil.attack.tables import to_markdown
from veil.config import ConfigError
from veil.data import read_npz, to_float, to_tensor_images
from veil.metrics import draw_candidates, psnr
from veil.rundir import load_run
from veil.runtime import feature_maps

NEW = ("consistency", "adversarial", "decoder-inversion")


@pytest.fixture(scope="module")
def setting(store_run):
    """The tiny run's undefended obfuscator (the paper's cut, width 1/16, pretrained), 720 attacker images, 100 users."""
    torch.set_num_threads(1)
    images, _, _ = read_npz(DEMO_NPZ)
    images = to_tensor_images(images, 32, "demo")
    f = load_run(store_run["run"]).undefended_obfuscator.eval()
    s = AttackConfig(attackers="unet," + ",".join(NEW), max_epochs=4, patience=2, lr=5e-3, batch_size=32, n_candidates=20,
                     whitebox_images=50, whitebox_steps=40, progress=False)
    data = attack_data(images[:800], images[1900:], True, s)
    cand = draw_candidates(torch.arange(len(data.users)), len(data.users), s.n_candidates, torch.Generator().manual_seed(0))
    return f, data, s, cand


@pytest.fixture(scope="module")
def results(setting):
    f, data, s, cand = setting
    return attack_obfuscator(f, data, s, 0.0625, 2, cand, "undefended", log=lambda *_: None)


def test_every_new_attacker_is_in_the_registry_and_beats_the_floor_on_the_undefended_paper_cut(setting, results):
    f, data, s, cand = setting
    scores, shown = results
    assert set(NEW) <= set(registry())
    floor = floor_scores(data, cand)
    for name in NEW:
        r = scores[name]
        assert r["psnr_mean"] > r.get("floor_psnr", floor["psnr"]) + 1.0, (name, r["psnr_mean"], floor["psnr"])
        assert r["reid_top1"] > 3 * floor["reid_top1"] and r["reid_top1"] > 0.2, (name, r["reid_top1"])
        assert shown[name].shape == (s.n_show, 3, 32, 32)  # full-resolution images
    assert scores["decoder-inversion"]["decoder"] in ("unet", "consistency", "adversarial")
    assert set(scores["decoder-inversion"]["prior_tuning_psnr"]) == {"0", "1", "10", "100", "inf"}


def test_a_new_attacker_is_seeded(setting):
    f, data, s, _ = setting
    runs = [fit_attacker("consistency", f, data, dataclasses.replace(s, max_epochs=1), 0.0625, 2, seed_for(0, "consistency"))[1] for _ in range(2)]
    assert runs[0][0]["val_psnr"] == runs[1][0]["val_psnr"] and runs[0][0]["train_consistency_db"] == runs[1][0]["train_consistency_db"]


def test_the_consistency_term_makes_f_of_the_image_match_the_code(setting, results):
    f, data, s, _ = setting
    scores, _ = results
    # The same U-Net, the same seed: with the term its images' f is nearer the users' codes than without it.
    features = feature_maps(f, data.users, 500)
    fitted = {name: fit_attacker(name, f, data, s, 0.0625, 2, seed_for(s.seed, name))[0] for name in ("unet", "consistency")}
    error = {name: consistency_db(f, reconstruct(r, features, 500), features).item() for name, r in fitted.items()}
    assert error["consistency"] < error["unet"] - 1.0, error
    # Weight 0 is the plain U-Net, bit for bit (the term is the only difference).
    off = fit_attacker("consistency", f, data, dataclasses.replace(s, consistency_weight=0.0, max_epochs=1), 0.0625, 2, seed_for(s.seed, "unet"))[0]
    plain = fit_attacker("unet", f, data, dataclasses.replace(s, max_epochs=1), 0.0625, 2, seed_for(s.seed, "unet"))[0]
    assert torch.equal(reconstruct(off, features, 500), reconstruct(plain, features, 500))


def test_the_discriminator_is_the_adversarial_decoders_only_difference(setting):
    f, data, s, _ = setting
    features = feature_maps(f, data.users, 500)
    short = dataclasses.replace(s, max_epochs=2)
    fit = lambda name, w: fit_attacker(name, f, data, dataclasses.replace(short, adversarial_weight=w), 0.0625, 2, seed_for(s.seed, "unet"))  # noqa: E731
    plain = reconstruct(fit("unet", 0.0)[0], features, 500)
    # Weight 0: the critic trains beside it but the decoder's steps are the U-Net's, bit for bit.
    assert torch.equal(reconstruct(fit("adversarial", 0.0)[0], features, 500), plain)
    decoder, curve = fit("adversarial", 1.0)
    assert not torch.equal(reconstruct(decoder, features, 500), plain)
    assert all(math.isfinite(r["train_adversarial"]) and r["train_adversarial"] > 0 for r in curve)


def test_the_decoder_start_matters_and_an_infinite_prior_is_the_decoder_itself(setting, results):
    f, data, s, cand = setting
    scores, _ = results
    r = scores["decoder-inversion"]
    users = to_float(data.users)
    # It rebuilds every user (the white-box only the first whitebox_images), and started from the decoder it is far
    # further above the floor of its users than the white-box started from the mean image.
    assert r["n_images"] == len(users) and scores["whitebox"]["n_images"] == s.whitebox_images
    margin = {k: scores[k]["psnr_mean"] - scores[k]["floor_psnr"] for k in ("decoder-inversion", "whitebox")}
    assert margin["decoder-inversion"] > margin["whitebox"] + 1.0, margin
    # With only an infinite prior weight it returns the decoder's images: the decoder's own PSNR on those users.
    only_inf = dataclasses.replace(s, attackers="unet,decoder-inversion", prior_weights="inf", whitebox=False)
    again, shown = attack_obfuscator(f, data, only_inf, 0.0625, 2, cand, "undefended", log=lambda *_: None)
    assert again["decoder-inversion"]["prior_weight"] == math.inf and again["decoder-inversion"]["curve"] == []
    assert torch.equal(shown["decoder-inversion"], shown["unet"])
    decoder_psnr = psnr(users[:1], shown["unet"][:1]).item()
    assert psnr(users[:1], shown["decoder-inversion"][:1]).item() == decoder_psnr


def test_the_search_records_its_grid_and_keeps_the_best_held_out_point(setting):
    f, data, s, cand = setting
    searched = dataclasses.replace(s, attackers="simrec", whitebox=False, search=True, search_lrs="1,3", search_widths="1", max_epochs=2)
    scores, _ = attack_obfuscator(f, data, searched, 0.0625, 2, cand, "undefended", log=lambda *_: None)
    record = scores["simrec"]["search"]
    assert [p["lr"] for p in record["grid"]] == [s.lr, 3 * s.lr]
    best = max(record["grid"], key=lambda p: p["val_psnr"])
    assert record["chosen"] == {"lr": best["lr"], "width": best["width"]}
    assert max(c["val_psnr"] for c in scores["simrec"]["curve"]) == best["val_psnr"]
    # A spent budget starts no new point (the first is always tried) and says so.
    tight = dataclasses.replace(searched, search_seconds=1e-9)
    record = attack_obfuscator(f, data, tight, 0.0625, 2, cand, "undefended", log=lambda *_: None)[0]["simrec"]["search"]
    assert "val_psnr" in record["grid"][0] and record["grid"][1] == {"lr": 3 * s.lr, "width": 0.0625, "skipped": "budget spent"}


def test_bf16_attackers_train_near_fp32_and_an_unknown_precision_is_refused(setting):
    """The attack's precision setting reaches the decoders (bf16's held-out curve differs from fp32's) and changes
    the arithmetic, not the attacker: its first epoch scores within a fraction of a dB of fp32's (later epochs part
    further, as two seeds do at this size), and its reconstructions, float32, beat the floor as fp32's do."""
    f, data, s, cand = setting
    users = to_float(data.users)
    features = feature_maps(f, data.users, s.eval_batch_size)
    floor = floor_scores(data, cand)["psnr"]
    curves = {}
    for precision in ("fp32", "bf16"):
        t = dataclasses.replace(s, precision=precision)
        decoder, curves[precision] = fit_attacker("unet", f, data, t, 0.0625, 2, seed_for(0, "unet"))
        rebuilt = reconstruct(decoder, features, t.eval_batch_size, precision)
        assert rebuilt.dtype == torch.float32
        assert psnr(users, rebuilt).mean().item() > floor + 1.0, (precision, floor, curves[precision])
    first = {k: v[0]["val_psnr"] for k, v in curves.items()}
    assert first["bf16"] != first["fp32"] and abs(first["bf16"] - first["fp32"]) < 0.5, first
    with pytest.raises(ConfigError, match="precision must be one of auto, fp32, bf16, got 'fp16'"):
        resolve_settings({"precision": "fp16"})


def test_the_search_grid_puts_the_default_first():
    assert search_grid(AttackConfig(search_lrs="0.5,1,2", search_widths="2,1"))[0] == (1.0, 1.0)
    assert len(search_grid(AttackConfig(search_lrs="0.5,1,2", search_widths="2,1"))) == 6


@pytest.mark.parametrize("overrides, message", [
    ({"attackers": "decoder-inversion,unet"}, "starts from a decoder listed before it"),
    ({"prior_weights": "1,-1"}, "prior_weights must be"),
    ({"search_lrs": "0"}, "search_lrs and search_widths"),
    ({"search_seconds": 0}, "search_seconds must be > 0"),
    ({"consistency_weight": -1}, "consistency_weight and adversarial_weight"),
])
def test_bad_settings_of_the_new_attackers_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve_settings(overrides)


def test_the_attack_table_names_the_strongest_attacker_of_each_metric(setting, results):
    f, data, s, cand = setting
    scores, _ = results
    floor = floor_scores(data, cand)
    result = {"run": "r", "dataset": "demo", "training_reconstructor": "simrec", "defence": "none", "n_attacker_train": len(data.train),
              "n_attacker_val": len(data.val), "n_users": len(data.users), "settings": dataclasses.asdict(s), "attacker_width": {"defended": 0.0625},
              "chance": {"top1": 0.05, "top5": 0.25}, "floor": floor, "defended": scores, "undefended": {}, "under_trained": [], "capped": [],
              "seed": 0, "device": "cpu", "torch_threads": 1, "torch_version": "x", "veil_version": "x", "date": "d", "seconds": 1.0}
    text = to_markdown(result)
    top = max(scores, key=lambda a: scores[a]["psnr_mean"] - scores[a].get("floor_psnr", floor["psnr"]))
    assert f"PSNR {scores[top]['psnr_mean']:.2f} dB ({top})" in text
    assert "decoder-inversion (100 images, from " in text
