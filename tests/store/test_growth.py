"""`veil growth` on tiny seeded runs: N and N + M stores, the image and label stores beside them, reruns, refusals;
and a run trained on a coarse data.task whose stores keep the fine labels."""

import importlib
import json

import numpy as np
import pytest
import torch
from tests.conftest import DEMO_NPZ, read_all

from veil import config as config_mod
from veil.cli import main
from veil.data import DataError, load_splits, read_npz, to_float
from veil.errors import StoreError
from veil.models.obfuscator import fingerprint
from veil.rundir import load_run
from veil.store.classify import HeadConfig, build_head
from veil.store.format import read_manifest
from veil.store.growth import GrowthConfig, finished_summary, growth, image_settings, make_stores, train_logits_classifier
from veil.store.obfuscate import obfuscate
from veil.train import train

VEHICLES = (0, 1, 8, 9)  # airplane, automobile, ship, truck


def _tiny_run(root, **data):
    """Width 1/16, 2 pretraining epochs, no defence rounds, on 240 real CIFAR-10 images: 60 test, 45 attacker, N = 90
    defender images, so that M = 180 - 90 - 45 = 45 training images are left over as the later split."""
    images, labels, classes = read_npz(DEMO_NPZ, root / "cache")
    idx = np.sort(np.random.default_rng(0).choice(len(labels), 240, replace=False))
    npz = root / "tiny.npz"
    np.savez(npz, images=images[idx], labels=labels[idx], classes=np.array(classes))
    cfg = config_mod.from_dict({
        "data": {"dataset": "npz", "path": str(npz), "test_fraction": 0.25, "attacker_fraction": 0.25, "n_defender": 90, **data},
        "model": {"width": 0.0625, "dropout": 0.0},
        "train": {"pretrain_epochs": 2, "warmup_epochs": 0, "t_main": 0, "batch_size": 32, "eval_batch_size": 64, "defence": "none"},
        "seed": 0, "device": "cpu", "progress": False,
    })
    torch.manual_seed(0)
    train(cfg, root / "run", log=lambda *_: None)
    return root / "run"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return _tiny_run(tmp_path_factory.mktemp("growth"))


def _settings(out, **kw):
    return GrowthConfig(**{"epochs": 1, "batch_size": 16, "heads": "vgg16,small", "out": str(out), "device": "cpu", "progress": False, **kw})


@torch.no_grad()
def _undefended_accuracy(run_dir, coarse=None):
    """The undefended classifier's test accuracy, recomputed from the run's networks in one pass (against the coarse labels
    when `coarse` maps the fine ones)."""
    run = load_run(run_dir)
    test = load_splits(run.config.data, run.config.seed).test
    predicted = run.undefended_classifier(run.undefended_obfuscator(to_float(test.images))).argmax(1)
    truth = test.labels if coarse is None else coarse[test.labels]
    return int((predicted == truth).sum()) / len(truth), predicted


def test_growth_measures_every_store_and_a_rerun_trains_nothing(run_dir, tmp_path):
    out = tmp_path / "growth"
    logs = []
    r = growth(run_dir, _settings(out), log=logs.append)
    assert (r["n"], r["m"], r["test_items"], r["epochs"], r["heads"]) == (90, 45, 60, 1, ["vgg16", "small"])
    assert json.loads((out / "growth.json").read_text()) == r
    rows = {s["name"].split(" (")[0]: s for s in r["stores"]}
    assert list(rows) == ["features, vgg16 head", "features, small head", "image", "label", "logits"]
    # bytes per item: 8 channels x 8 x 8 float16 features, 3 x 32 x 32 image bytes, one label byte, 10 float16 logits
    assert [s["bytes_per_item"] for s in r["stores"]] == [1024, 1024, 3072, 1, 20]
    image, label = rows["image"], rows["label"]
    assert image["gain"] != 0 and image["growth_ratio"] == 1.0  # by construction
    for s in r["stores"]:
        assert s["gain"] == s["accuracy_at_n_plus_m"] - s["accuracy_at_n"] and s["growth_ratio"] == (s["gain"] / image["gain"] or 0.0)
    # The label store is the undefended classifier's class of each test image: its accuracy, exactly, at N and N + M.
    expected, _ = _undefended_accuracy(run_dir)
    assert label["accuracy_at_n"] == label["accuracy_at_n_plus_m"] == expected and label["gain"] == 0 and label["growth_ratio"] == 0.0
    assert expected == load_run(run_dir).summary["pretrain_test_accuracy"]
    # Each classifier was trained on N or N + M items and scored on the 60 test images; the stores are gone.
    for head in ("vgg16", "small"):
        for size, items in (("n", 90), ("n+m", 135)):
            summary = json.loads((out / "classifiers" / f"store-{head}-{size}" / "summary.json").read_text())
            assert (summary["train_items"], summary["test_items"], summary["epochs"]) == (items, 60, 1)
            assert summary["final_test_accuracy"] == rows[f"features, {head} head"]["accuracy_at_n" if size == "n" else "accuracy_at_n_plus_m"]
    for size, items in (("n", 90), ("n+m", 135)):
        assert json.loads((out / "classifiers" / f"image-{size}" / "summary.json").read_text())["train_items"] == items
        logits = json.loads((out / "classifiers" / f"logits-{size}" / "summary.json").read_text())
        assert (logits["train_items"], logits["test_items"], logits["epochs"]) == (items, 60, 1)
        assert logits["final_test_accuracy"] == rows["logits"]["accuracy_at_n" if size == "n" else "accuracy_at_n_plus_m"]
    assert not (out / "stores").exists()
    assert "| image (the whole VGG16) | 3072 |" in (out / "growth.md").read_text() and "--epochs 1 --head vgg16,small" in r["command"]

    # A rerun skips every finished classifier (and so never makes a store) and reports the same numbers.
    stamps = {d.name: (d / "summary.json").stat().st_mtime_ns for d in (out / "classifiers").iterdir()}
    logs.clear()
    again = growth(run_dir, _settings(out), log=logs.append)
    assert sum("already trained with these settings; kept" in line for line in logs) == 6 and not any("training" in line for line in logs)
    assert {d.name: (d / "summary.json").stat().st_mtime_ns for d in (out / "classifiers").iterdir()} == stamps
    assert [s["accuracy_at_n_plus_m"] for s in again["stores"]] == [s["accuracy_at_n_plus_m"] for s in r["stores"]]
    # A half-made classifier (killed before its summary) is trained again, alone, bit for bit as before.
    (out / "classifiers" / "store-small-n+m" / "summary.json").unlink()
    logs.clear()
    third = growth(run_dir, _settings(out), log=logs.append)
    assert [line.split(" on ")[0] for line in logs if "training" in line] == ["veil growth: training store-small-n+m"]
    assert third["stores"] == again["stores"]


def test_with_validation_every_classifier_is_scored_at_the_epoch_that_reads_the_validation_split_best(tmp_path):
    run = _tiny_run(tmp_path, n_test=40)  # 60 test images: 40 users', 20 to pick epochs on
    out = tmp_path / "growth"
    r = growth(run, _settings(out, epochs=3, heads="small", validation=True, keep_stores=True), log=lambda *_: None)
    assert (r["test_items"], r["validation_items"]) == (40, 20) and "--validation" in r["command"]
    assert read_manifest(out / "stores" / "val")["count"] == 20 and read_manifest(out / "stores" / "val")["dataset"]["split"] == "validation"
    rows = {s["kind"]: s for s in r["stores"]}
    dirs = {"features": ("store-small-n", "store-small-n+m"), "image": ("image-n", "image-n+m"), "logits": ("logits-n", "logits-n+m")}
    for kind, names in dirs.items():
        summaries = [json.loads((out / "classifiers" / d / "summary.json").read_text()) for d in names]
        for summary, d in zip(summaries, names):
            per_epoch = summary["metrics"] if kind == "logits" else [json.loads(x) for x in (out / "classifiers" / d / "metrics.jsonl").read_text().splitlines()]
            assert len(per_epoch) == 3 and all("val_accuracy" in e for e in per_epoch)
            best = max(per_epoch, key=lambda e: (e["val_accuracy"], -e["epoch"]))  # the earliest of the best
            assert (summary["kept_epoch"], summary["kept_test_accuracy"]) == (best["epoch"], best["test_accuracy"]), d
            assert summary["final_test_accuracy"] == per_epoch[-1]["test_accuracy"]
        row = rows[kind]
        assert (row["accuracy_at_n"], row["accuracy_at_n_plus_m"]) == tuple(s["kept_test_accuracy"] for s in summaries)
        assert row["kept_epochs"] == [s["kept_epoch"] for s in summaries]
        assert (row["last_epoch_accuracy_at_n"], row["last_epoch_accuracy_at_n_plus_m"]) == tuple(s["final_test_accuracy"] for s in summaries)
    assert rows["image"]["growth_ratio"] in (1.0, None)  # 1 by construction (None: the image store did not move)
    assert rows["label"]["gain"] == 0 and "kept_epochs" not in rows["label"]
    assert "scored at the epoch that reads the 20 validation images best" in (out / "growth.md").read_text()
    # Classifiers scored at their last epoch are not reused for a measurement that picks epochs, nor the other way round.
    logs = []
    growth(run, _settings(out, epochs=3, heads="small"), log=logs.append)
    assert sum(line.startswith("veil growth: training") for line in logs) == 6


def test_an_interrupted_n_plus_m_store_is_finished(run_dir, tmp_path):
    """Killed between its defender part and the append: the next call appends the later images, once."""
    run = load_run(run_dir)
    fp = fingerprint(run.obfuscator)
    part = tmp_path / "stores" / "defender+later"
    obfuscate(run_dir, "run:defender", part, device="cpu", progress=False, log=lambda *_: None)
    paths = make_stores(run_dir, tmp_path, fp, 90, 45, run.class_names, 0, "cpu", lambda *_: None)
    m = read_manifest(paths["n+m"])
    assert m["count"] == 135 and [a["dataset"]["split"] for a in m["appends"]] == ["later"]
    splits = load_splits(run.config.data, run.config.seed)
    assert torch.equal(read_all(paths["n+m"])["labels"], torch.cat([splits.defender.labels, splits.later.labels]))
    make_stores(run_dir, tmp_path, fp, 90, 45, run.class_names, 0, "cpu", lambda *_: None)  # whole: nothing added
    assert read_manifest(paths["n+m"])["count"] == 135


def test_an_empty_later_split_and_another_obfuscators_folder_are_refused(run_dir, store_run, tmp_path):
    # store_run keeps every training image in its defender (n_defender 0: all) and attacker splits.
    with pytest.raises(DataError, match=r"later split is empty: the defender split \(data.n_defender = 0: all\) takes 135 of its pool of 135 "
                                        r"and the attacker split \(data.n_attacker = 0: all\) 45 of its 45"):
        growth(store_run["run"], _settings(tmp_path / "g"))
    out = tmp_path / "ours"
    growth(run_dir, _settings(out, heads="small"))
    with pytest.raises(StoreError, match=r"ours/inputs.json: this growth folder was made from obfuscator .* but .* has obfuscator"):
        growth(store_run["run"], _settings(out))
    # A store of another obfuscator where the N + M store belongs: refused, naming its manifest.
    other = tmp_path / "x" / "stores" / "defender+later"
    obfuscate(store_run["run"], "run:test", other, device="cpu", progress=False, log=lambda *_: None)
    with pytest.raises(StoreError, match=r"defender\+later/manifest.json: a store of obfuscator"):
        make_stores(run_dir, tmp_path / "x", fingerprint(load_run(run_dir).obfuscator), 90, 45, load_run(run_dir).class_names, 0, "cpu", lambda *_: None)
    with pytest.raises(StoreError, match="--head: large"):
        growth(run_dir, _settings(tmp_path / "h", heads="vgg16,large"))


def test_a_coarse_task_trains_two_classes_and_its_stores_keep_ten(tmp_path, monkeypatch):
    # train.py reads its splits with labelling="task" (the one line the data.task change asks of it); until it does, so
    # does this test, through the same load_splits.
    monkeypatch.setattr(importlib.import_module("veil.train"), "load_splits", lambda cfg, seed, labelling="task": load_splits(cfg, seed, labelling="task"))
    run_dir = _tiny_run(tmp_path, task="cifar10-superclass")
    run = load_run(run_dir)
    assert run.num_classes == 2 and run.class_names == ["vehicle", "animal"]
    assert run.classifier(run.obfuscator(torch.zeros(1, 3, 32, 32))).shape == (1, 2)
    store = tmp_path / "test-store"
    obfuscate(run_dir, "run:test", store, device="cpu", progress=False, log=lambda *_: None)
    fine = load_splits(run.config.data, run.config.seed).test
    assert read_manifest(store)["dataset"]["classes"][:3] == ["airplane", "automobile", "bird"] and len(read_manifest(store)["dataset"]["classes"]) == 10
    assert torch.equal(read_all(store)["labels"], fine.labels) and int(fine.labels.max()) > 1

    # Growth: the store classifiers learn the ten classes; the label store only has the coarse class to offer.
    r = growth(run_dir, _settings(tmp_path / "growth", heads="small"))
    assert r["task"] == "cifar10-superclass" and r["classes"] == 10
    coarse = torch.tensor([0 if c in VEHICLES else 1 for c in range(10)])
    task_accuracy, predicted = _undefended_accuracy(run_dir, coarse)
    label, logits = ({s["kind"]: s for s in r["stores"]}[k] for k in ("label", "logits"))
    assert label["task_accuracy"] == task_accuracy
    assert logits["bytes_per_item"] == 2 * 2  # the two coarse logits, from which its MLP learns the ten classes
    # Read as the fine class most frequent in each coarse class among the defender images.
    defender = load_splits(run.config.data, run.config.seed).defender.labels
    decode = [int(torch.bincount(defender[coarse[defender] == c], minlength=10).argmax()) for c in (0, 1)]
    assert label["accuracy_at_n"] == int((torch.tensor(decode)[predicted] == fine.labels).sum()) / len(fine.labels)


def test_cli_growth_prints_the_table_with_a_larger_head(run_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["growth", str(run_dir), "--epochs", "1", "--batch-size", "16", "--head", "vgg16-wide", "--out", str(out), "--device", "cpu",
                 "--no-progress", "--keep-stores"]) == 0
    printed = capsys.readouterr().out
    assert "| features, vgg16-wide head | 1024 |" in printed and "growth ratio" in printed
    meta = json.loads((out / "classifiers" / "store-vgg16-wide-n" / "classifier.json").read_text())
    size = {h: sum(p.numel() for p in build_head(h, meta["features"], meta["obfuscator"], 10, 0.0).parameters()) for h in ("vgg16", "vgg16-wide")}
    assert size["vgg16-wide"] > 3 * size["vgg16"]  # twice the width: about four times the weights
    assert sorted(p.name for p in (out / "stores").iterdir()) == ["defender", "defender+later", "test"]
    assert main(["growth", str(run_dir), "--head", "vgg17", "--out", str(out)]) == 2


def test_an_image_store_keeps_the_precision_auto_chose_and_is_not_reused_where_auto_chooses_otherwise(tmp_path, monkeypatch):
    cfg = config_mod.from_dict({"train": {"precision": "auto"}, "device": "cpu"})
    settings = image_settings(cfg, True, 90, 60)
    assert settings["precision"] == "fp32"  # auto on a CPU today, recorded as what it resolved to
    (tmp_path / "summary.json").write_text(json.dumps({"settings": settings}))
    assert finished_summary(tmp_path, image_settings(cfg, True, 90, 60)) is not None
    # A machine where auto means bf16 (a fake capability): the same config asks for another image store.
    monkeypatch.setattr("veil.store.growth.resolve_precision", lambda value, device: "bf16" if value == "auto" else value)
    elsewhere = image_settings(cfg, True, 90, 60)
    assert elsewhere["precision"] == "bf16"
    assert finished_summary(tmp_path, elsewhere) is None


def test_the_logits_classifier_learns_what_the_logits_say_and_is_kept(tmp_path):
    """An MLP on logits whose largest entry is the label, less a tenth of them flipped: it learns the argmax (about
    90% right on fresh logits of the same kind); a second call with the same settings returns the kept summary."""
    g = torch.Generator().manual_seed(0)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 10, (n,), generator=g)
        x = torch.randn(n, 10, generator=g) + 4 * torch.nn.functional.one_hot(y, 10)
        flipped = torch.rand(n, generator=g) < 0.1
        return x, torch.where(flipped, (y + 1) % 10, y)

    (x, y), (tx, ty) = draw(2000), draw(500)
    head = HeadConfig(epochs=4, batch_size=64, device="cpu", progress=False)
    logs = []
    first = train_logits_classifier(x, y, tx, ty, 10, head, tmp_path / "logits-n", logs.append)
    argmax = (tx.argmax(1) == ty).float().mean().item()
    assert abs(first["final_test_accuracy"] - argmax) < 0.03 and first["train_items"] == 2000 and logs == ["veil growth: training logits-n (an MLP on 2000 kept logits)"]
    stamp = (tmp_path / "logits-n" / "summary.json").stat().st_mtime_ns
    assert train_logits_classifier(x, y, tx, ty, 10, head, tmp_path / "logits-n", logs.append) == first and len(logs) == 1
    assert (tmp_path / "logits-n" / "summary.json").stat().st_mtime_ns == stamp
    other = train_logits_classifier(x, y, tx, ty, 10, HeadConfig(epochs=2, batch_size=64, device="cpu", progress=False), tmp_path / "logits-n", logs.append)
    assert other["epochs"] == 2 and len(logs) == 2  # made with other settings: trained again
