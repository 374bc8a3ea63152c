import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.conftest import make_store, read_all

import veil.store.classify as classify
import veil.store.obfuscate as store_mod
from veil import config as config_mod
from veil.cli import main
from veil.data import DataError, load_splits, read_npz, to_float
from veil.errors import StoreError
from veil.io import load_tensors, save_tensors, sha256_file
from veil.models.obfuscator import fingerprint
from veil.rundir import latest_step_dir, load_run
from veil.store.classify import (
    HeadConfig,
    check_head_config,
    load_classifier,
    predict,
    random_shift,
    shift_cells,
    store_accuracy,
    train_classifier,
    trained_shift_cells,
)
from veil.store.dataset import open_store
from veil.store.format import MANIFEST, read_manifest, verify
from veil.store.obfuscate import obfuscate, parse_spec
from veil.train import train


@pytest.fixture(scope="module")
def tiny(store_run):
    return store_run




# ----------------------------------------------------------------------------- data specs


def test_parse_spec_forms_and_errors():
    assert parse_spec("cifar10:test") == store_mod.DataSpec("cifar10", "", "test")
    assert parse_spec("run") == store_mod.DataSpec("run", "", "all")
    assert parse_spec("npz:a/b.npz") == store_mod.DataSpec("npz", "a/b.npz", "all")
    assert parse_spec("npz:a/b.npz:attacker") == store_mod.DataSpec("npz", "a/b.npz", "attacker")
    assert parse_spec("folder:C:/photos") == store_mod.DataSpec("folder", "C:/photos", "all")  # ':' inside a path is kept
    with pytest.raises(DataError, match="unknown split 'tset'.*all, defender, attacker, test"):
        parse_spec("cifar10:tset")
    with pytest.raises(DataError, match="unknown source 'imagenet'"):
        parse_spec("imagenet:test")
    with pytest.raises(DataError, match="npz needs a path"):
        parse_spec("npz:")


# ----------------------------------------------------------------------------- round trip


def test_store_round_trips_the_obfuscator_output(tiny, tmp_path):
    run = load_run(tiny["run"])
    test = load_splits(tiny["cfg"].data, tiny["cfg"].seed).test  # 60 images
    out = make_store(tiny, tmp_path, shard_size=16, batch_size=7)
    m = verify(out, fingerprint=fingerprint(run.obfuscator))
    assert [s["count"] for s in m["shards"]] == [16, 16, 16, 12] and m["count"] == 60 and m["complete"]
    assert m["obfuscator"]["fingerprint"] == fingerprint(run.obfuscator)
    assert m["veil_version"] == __import__("veil").__version__
    assert m["dataset"] == {"name": "npz", "split": "test", "classes": test.classes}
    for s in m["shards"]:
        assert s["sha256"] == sha256_file(out / s["file"]) and s["bytes"] == (out / s["file"]).stat().st_size
    stored = read_all(out)
    with torch.no_grad():
        expected = run.obfuscator(to_float(test.images))
    assert stored["features"].dtype == torch.float16 and stored["features"].shape == expected.shape == (60, 8, 8, 8)
    # Within float16 precision: rounding to 11 significant bits, relative error <= 2**-11.
    err = (stored["features"].float() - expected).abs()
    assert (err <= expected.abs() * 2**-11 + 1e-6).all(), err.max()
    assert torch.equal(stored["labels"], test.labels)
    assert len({bytes(r.tolist()) for r in stored["ids"]}) == 60  # opaque ids, all distinct

    out32 = make_store(tiny, tmp_path, name="f32", dtype="float32")
    assert torch.allclose(read_all(out32)["features"], expected, rtol=1e-5, atol=1e-6)


def test_store_holds_no_pixels_and_no_file_names(tiny, tmp_path):
    images, labels, classes = read_npz(tiny["npz"])
    folder = tmp_path / "customer-photos-of-jane-doe"
    names = []
    from PIL import Image

    for i in range(30):
        d = folder / classes[labels[i]]
        d.mkdir(parents=True, exist_ok=True)
        name = f"jane-doe-passport-{i:04d}"
        Image.fromarray(images[i]).save(d / f"{name}.png")
        names.append(name)
    out = make_store(tiny, tmp_path, data=f"folder:{folder}", shard_size=8)
    m = verify(out)
    assert m["count"] == 30 and m["dataset"]["name"] == "folder"
    for f in out.iterdir():
        blob = f.read_bytes()
        for needle in names + [folder.name, str(folder), "jane-doe", ".png"]:
            assert needle.encode() not in blob, (f.name, needle)
    for f in out.glob("shard-*.safetensors"):
        for key, t in load_tensors(f).items():
            item = tuple(t.shape[1:])
            assert item not in ((3, 32, 32), (32, 32, 3), (32, 32)), (key, t.shape)
            assert t[0].numel() != 3 * 32 * 32, (key, t.shape)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST] + [f"shard-0000{i}.safetensors" for i in range(4)]
    # Streaming the folder gives the same features as the same images held in memory.
    run = load_run(tiny["run"])
    with torch.no_grad():
        expected = run.obfuscator(to_float(torch.from_numpy(images[:30]).permute(0, 3, 1, 2)))
    order = sorted(range(30), key=lambda i: (classes[labels[i]], i))  # class folders by name, then file names
    assert torch.allclose(read_all(out)["features"].float(), expected[torch.tensor(order)], rtol=2**-10, atol=1e-5)


def test_channel_mismatch_is_a_clear_error(tiny, tmp_path):
    gray = tmp_path / "gray.npz"
    np.savez(gray, images=np.zeros((4, 32, 32, 1), np.uint8), labels=np.zeros(4, np.int64))
    with pytest.raises(DataError, match="1 channel.*takes 3"):
        make_store(tiny, tmp_path, data=f"npz:{gray}")


# ----------------------------------------------------------------------------- verify


def test_verify_names_each_kind_of_damage(tiny, tmp_path):
    good = make_store(tiny, tmp_path, shard_size=16)
    verify(good)

    def damaged(name, how):
        d = tmp_path / name
        shutil.copytree(good, d)
        how(d)
        return d

    def truncate(d):
        p = d / "shard-00001.safetensors"
        p.write_bytes(p.read_bytes()[:-100])

    def alter(d):
        p = d / "shard-00002.safetensors"
        b = bytearray(p.read_bytes())
        b[-5] ^= 0xFF
        p.write_bytes(bytes(b))

    def edit_manifest(d):
        m = json.loads((d / MANIFEST).read_text())
        m["shards"][0]["count"] = 15
        (d / MANIFEST).write_text(json.dumps(m))

    def edit(**fields):
        def how(d):
            m = json.loads((d / MANIFEST).read_text())
            m.update(fields)
            (d / MANIFEST).write_text(json.dumps(m))
        return how

    cases = {
        "truncated": (truncate, r"shard-00001\.safetensors: shard truncated"),
        "altered": (alter, r"shard-00002\.safetensors: shard altered"),
        "missing": (lambda d: (d / "shard-00003.safetensors").unlink(), r"shard-00003\.safetensors: shard missing"),
        "stray": (lambda d: shutil.copy(d / "shard-00000.safetensors", d / "shard-00009.safetensors"), r"shard-00009\.safetensors: not listed"),
        "manifest": (lambda d: (d / MANIFEST).write_text("{"), r"manifest\.json: damaged"),
        "counts": (edit_manifest, r"shard-00000\.safetensors: 'features' should be \(15,"),
        "gone": (lambda d: (d / MANIFEST).unlink(), "not a Veil store"),
        "total": (edit(count=61), r"manifest\.json: count is 61 but the shards hold 60"),
        "labels": (edit(labels_sha256="0" * 64), r"manifest\.json: labels_sha256 does not match"),
        "unfinished": (edit(complete=False), r"incomplete \(60 of 60"),
    }
    for name, (how, message) in cases.items():
        with pytest.raises(StoreError, match=message):
            verify(damaged(name, how))
    # The CLI prints one line naming the shard and exits 2.
    assert main(["verify", str(tmp_path / "truncated"), "--no-progress"]) == 2


def run_with_another_obfuscator(run: Path, out: Path) -> Path:
    """A copy of `run` whose obfuscator's first weight is scaled by 1.01 (another fingerprint)."""
    shutil.copytree(run, out)
    weights = latest_step_dir(out) / "obfuscator.safetensors"
    state = load_tensors(weights)
    key = next(k for k in state if k.endswith("weight"))
    state[key] = state[key] * 1.01
    replace_weights(weights, state)
    return out


def replace_weights(path, state):
    """Other weights in a checkpoint, recorded as such (a genuinely different run, not a damaged file)."""
    digest = save_tensors(path, state)
    info_path = path.parent / "info.json"
    info = json.loads(info_path.read_text())
    info["files"][path.name] = digest
    info_path.write_text(json.dumps(info))


def test_store_is_refused_by_a_run_with_another_obfuscator(tiny, tmp_path, capsys):
    out = make_store(tiny, tmp_path)
    other = run_with_another_obfuscator(tiny["run"], tmp_path / "other-run")
    with pytest.raises(StoreError, match="made by obfuscator .* but this run has obfuscator"):
        verify(out, fingerprint=fingerprint(load_run(other).obfuscator))
    with pytest.raises(StoreError, match="made by obfuscator"):
        predict(other, store=out, device="cpu")
    assert main(["verify", str(out), "--run", str(other), "--no-progress"]) == 2
    assert "made by obfuscator" in capsys.readouterr().err
    assert main(["verify", str(out), "--run", str(tiny["run"]), "--no-progress"]) == 0
    assert "OK, 60 items" in capsys.readouterr().out


# ----------------------------------------------------------------------------- resume


def test_interrupted_obfuscate_leaves_no_whole_looking_half_shard_and_resumes(tiny, tmp_path, monkeypatch):
    reference = read_all(make_store(tiny, tmp_path, name="reference", shard_size=16))
    real_save = store_mod.write_shard
    calls = {"n": 0}

    def killed_while_writing_third(loc, name, tensors, index):
        calls["n"] += 1
        if calls["n"] == 3:  # what a kill mid-write leaves: a partial temporary file, never the shard's name
            (tmp_path / "store" / f".{name}.abc123.tmp").write_bytes(b"\x00" * 100)
            raise KeyboardInterrupt("simulated kill")
        return real_save(loc, name, tensors, index)

    monkeypatch.setattr(store_mod, "write_shard", killed_while_writing_third)
    with pytest.raises(KeyboardInterrupt):
        make_store(tiny, tmp_path, shard_size=16)
    monkeypatch.setattr(store_mod, "write_shard", real_save)
    out = tmp_path / "store"
    assert not (out / "shard-00002.safetensors").exists()
    m = read_manifest(out)
    assert not m["complete"] and len(m["shards"]) == 2
    with pytest.raises(StoreError, match="incomplete \\(32 of 60 items.*run the same command again"):
        verify(out)

    # A kill between the shard's rename and the manifest's update leaves a whole shard the manifest does not list
    # (the rerun's first manifest, naming the shards still to come, is written; the next one is not).
    real_write, writes = store_mod.write_manifest, {"n": 0}

    def killed_at_second(loc, manifest):
        writes["n"] += 1
        if writes["n"] == 2:
            raise KeyboardInterrupt("kill")
        real_write(loc, manifest)

    monkeypatch.setattr(store_mod, "write_manifest", killed_at_second)
    with pytest.raises(KeyboardInterrupt):
        make_store(tiny, tmp_path, shard_size=16)
    monkeypatch.setattr(store_mod, "write_manifest", real_write)
    assert (out / "shard-00002.safetensors").exists() and len(read_manifest(out)["shards"]) == 2

    result = obfuscate(tiny["run"], "run:test", out, shard_size=16, device="cpu", progress=False, log=lambda *_: None)
    assert result["written"] == 60 - 32
    verify(out)
    assert not list(out.glob(".*tmp"))
    resumed = read_all(out)
    assert torch.equal(resumed["features"], reference["features"]) and torch.equal(resumed["labels"], reference["labels"])
    again = obfuscate(tiny["run"], "run:test", out, shard_size=16, device="cpu", progress=False, log=lambda *_: None)
    assert again["written"] == 0
    with pytest.raises(StoreError, match="already holds another store \\(features.dtype"):
        obfuscate(tiny["run"], "run:test", out, shard_size=16, dtype="float32", device="cpu", progress=False, log=lambda *_: None)
    with pytest.raises(StoreError, match="already holds another store \\(count"):
        obfuscate(tiny["run"], "run:defender", out, shard_size=16, device="cpu", progress=False, log=lambda *_: None)


# ----------------------------------------------------------------------------- training from a store, predicting


def test_random_shift_matches_a_slow_loop_and_the_obfuscator():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 2, 8, 8)
    y = random_shift(x, 1, g)
    g = torch.Generator().manual_seed(3)
    dy, dx = torch.randint(0, 3, (5,), generator=g), torch.randint(0, 3, (5,), generator=g)
    for i in range(5):
        padded = torch.nn.functional.pad(x[i], (1, 1, 1, 1))
        assert torch.equal(y[i], padded[:, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8])
    # Shifting an image by 4 pixels shifts the (split 2) feature map by one cell, away from the borders
    # (a cell sees 16 pixels: cell j sees pixels 4j-6 .. 4j+9, so cells 3..5 of the shifted image see no border).
    from veil.models import Obfuscator, init_xavier

    f = init_xavier(Obfuscator(3, 0.125, 2)).eval()
    img = torch.rand(2, 3, 32, 32)
    shifted = torch.nn.functional.pad(img, (4, 0, 0, 0))[..., :32]
    with torch.no_grad():
        a, b = f(img), f(shifted)
    assert torch.allclose(b[..., 3:6], a[..., 2:5], atol=1e-5)
    assert not torch.allclose(b[..., 3:6], a[..., 3:6], atol=1e-3)


def blank_items(x: torch.Tensor) -> int:
    """How many items of a batch are all-zero feature maps."""
    return int((x.flatten(1) == 0).all(1).sum())


def test_the_default_shift_leaves_no_blank_map_at_split_5():
    # At split 5 a cell is 32 pixels (the whole 1x1 map): the default 4-pixel shift is 0 cells, no shift.
    assert HeadConfig().shift == 4
    assert [shift_cells(HeadConfig().shift, split) for split in (1, 2, 3, 4, 5)] == [2, 1, 0, 0, 0]
    x = torch.rand(900, 8, 1, 1, generator=torch.Generator().manual_seed(0)) + 0.1  # a training epoch's worth of 1x1 maps, none blank
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    y = random_shift(x, shift_cells(HeadConfig().shift, 5), g)
    assert blank_items(y) == 0 and torch.equal(y, x)
    assert torch.equal(g.get_state(), state)  # nothing drawn: training at 0 cells is as before with shift 0
    # The one-cell shift the default was: 8 items in 9 blank (799 of 900 with this seed).
    assert blank_items(random_shift(x, 1, torch.Generator().manual_seed(0))) == 799


def test_the_default_shift_is_one_cell_at_split_2():
    # At split 2 a cell is 4 pixels: the default is one cell, the shift every store classifier had before.
    assert shift_cells(HeadConfig().shift, 2) == 1
    assert [shift_cells(pixels, 2) for pixels in (0, 3, 4, 7, 8)] == [0, 0, 1, 1, 2]
    x = torch.rand(90, 2, 8, 8, generator=torch.Generator().manual_seed(0)) + 0.1
    y = random_shift(x, shift_cells(HeadConfig().shift, 2), torch.Generator().manual_seed(0))
    assert torch.equal(y, random_shift(x, 1, torch.Generator().manual_seed(0)))
    moved = [not torch.equal(y[i], x[i]) for i in range(len(x))]
    assert sum(moved) == 76  # 8 in 9 moved (76 of 90 with this seed)
    g = torch.Generator().manual_seed(0)
    ry, rx = torch.randint(0, 3, (90,), generator=g) - 1, torch.randint(0, 3, (90,), generator=g) - 1
    assert moved == [bool(a or b) for a, b in zip(ry.tolist(), rx.tolist())]
    # A moved item loses a one-cell band of its 8x8 map to zero fill, in each of its 2 channels; none is blank.
    zeros = [int((y[i] == 0).sum()) for i in range(len(x))]
    assert zeros == [2 * (8 * abs(a) + 8 * abs(b) - abs(a * b)) for a, b in zip(ry.tolist(), rx.tolist())]
    assert blank_items(y) == 0
    # Written before the shift was in pixels: config.yaml's shift counted cells.
    assert trained_shift_cells({}, {"shift": 1}) == 1 and trained_shift_cells({}, {}) == 1
    assert trained_shift_cells({"shift_pixels": 4, "shift_cells": 0}, {"shift": 4}) == 0


def test_a_negative_shift_is_refused():
    with pytest.raises(StoreError, match=r"^--shift must be >= 0 pixels, got -1$"):
        check_head_config(HeadConfig(shift=-1))
    assert main(["train-classifier", "no-store", "--out", "x", "--shift", "-4", "--no-progress"]) == 2


def test_the_shift_is_turned_into_cells_by_the_training_loop(tiny, tmp_path):
    # Split 2 (4-pixel cells): 3 pixels are 0 cells, trained exactly as no shift; 4 and 7 pixels are one cell.
    train_store = make_store(tiny, tmp_path, data="run:defender", name="train")
    weights, summaries = {}, {}
    for pixels in (0, 3, 4, 7):
        out = tmp_path / f"clf-{pixels}"
        cfg = HeadConfig(head="small", epochs=1, batch_size=32, device="cpu", progress=False, shift=pixels)
        summaries[pixels] = train_classifier(train_store, out, cfg, log=lambda *_: None)
        weights[pixels] = load_tensors(out / "classifier.safetensors")
        assert json.loads((out / "classifier.json").read_text())["shift_pixels"] == pixels
    assert [(summaries[p]["shift_pixels"], summaries[p]["shift_cells"]) for p in (0, 3, 4, 7)] == [(0, 0), (3, 0), (4, 1), (7, 1)]
    same = lambda a, b: all(torch.equal(weights[a][k], weights[b][k]) for k in weights[a])  # noqa: E731
    assert same(0, 3) and same(4, 7) and not same(0, 4)


def test_train_classifier_from_store_alone_and_predict_with_it(tiny, tmp_path, capsys):
    train_store = make_store(tiny, tmp_path, data="run:defender", name="train", shard_size=64)
    test_store = make_store(tiny, tmp_path, data="run:test", name="test")
    for head in ("small", "vgg16"):
        out = tmp_path / f"clf-{head}"
        cfg = HeadConfig(head=head, epochs=8, batch_size=32, lr=5e-3, device="cpu", progress=False, memory_mb=1)
        summary = train_classifier(train_store, out, cfg, test_store=test_store, log=lambda *_: None)
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert len(metrics) == 8 and metrics[-1]["loss"] < metrics[0]["loss"]
        clf, meta = load_classifier(out, torch.device("cpu"))
        assert meta["obfuscator"]["fingerprint"] == read_manifest(train_store)["obfuscator"]["fingerprint"]
        acc = store_accuracy(clf, open_store(test_store, dtype=None), torch.device("cpu"))
        assert acc == summary["final_test_accuracy"] == metrics[-1]["test_accuracy"]
        assert (summary["shift_pixels"], summary["shift_cells"]) == (4, 1)  # the default 4 pixels: one cell at split 2
        assert json.loads((out / "summary.json").read_text())["shift_cells"] == 1 and meta["shift_cells"] == 1
        preds = predict(tiny["run"], store=test_store, classifier=out, device="cpu")
        assert sum(p.label == p.true_label for p in preds) / len(preds) == pytest.approx(acc)
    with pytest.raises(StoreError, match="already holds a classifier"):
        train_classifier(train_store, tmp_path / "clf-small", HeadConfig(progress=False), log=lambda *_: None)
    assert main(["train-classifier", str(train_store), "--out", str(tmp_path / "cli"), "--test-store", str(test_store),
                 "--head", "small", "--epochs", "1", "--batch-size", "32", "--device", "cpu", "--shift", "8", "--no-progress"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert {k: v for k, v in json.loads((tmp_path / "cli" / "summary.json").read_text()).items() if k.startswith("shift")} == {
        "shift_pixels": 8, "shift_cells": 2}


def test_a_validation_store_keeps_the_head_of_the_epoch_that_reads_it_best(tiny, tmp_path, capsys, monkeypatch):
    train_store = make_store(tiny, tmp_path, data="run:defender", name="train")
    test_store = make_store(tiny, tmp_path, data="run:test", name="test")
    val_store = make_store(tiny, tmp_path, data="run:attacker", name="val")  # any store of the same obfuscator
    cfg = HeadConfig(head="small", epochs=4, batch_size=32, lr=5e-3, device="cpu", progress=False)
    # Scripted validation readings (the earliest of the two best is kept), and the head's weights at each reading.
    readings, snapshots, real = iter([0.1, 0.5, 0.5, 0.2]), [], classify.store_accuracy

    def reading(head, data, device, **kw):
        if data.manifest["count"] != read_manifest(val_store)["count"]:
            return real(head, data, device, **kw)
        snapshots.append({k: v.clone() for k, v in head.state_dict().items()})
        return next(readings)

    monkeypatch.setattr(classify, "store_accuracy", reading)
    summary = train_classifier(train_store, tmp_path / "clf", cfg, test_store=test_store, val_store=val_store, log=lambda *_: None)
    metrics = [json.loads(line) for line in (tmp_path / "clf" / "metrics.jsonl").read_text().splitlines()]
    assert [m["val_accuracy"] for m in metrics] == [0.1, 0.5, 0.5, 0.2] and len(snapshots) == 4
    assert (summary["kept_epoch"], summary["kept_val_accuracy"], summary["val_items"]) == (2, 0.5, 45)
    assert summary["kept_test_accuracy"] == metrics[1]["test_accuracy"] and summary["final_test_accuracy"] == metrics[3]["test_accuracy"]
    saved = load_tensors(tmp_path / "clf" / "classifier.safetensors")
    assert all(torch.equal(saved[k], snapshots[1][k]) for k in saved) and not all(torch.equal(saved[k], snapshots[3][k]) for k in saved)
    clf, meta = load_classifier(tmp_path / "clf", torch.device("cpu"))
    assert meta["epoch"] == 2 and real(clf, open_store(test_store, dtype=None), torch.device("cpu")) == summary["kept_test_accuracy"]
    monkeypatch.undo()
    # Without a validation store the last epoch is kept; a validation store of another obfuscator is refused by name.
    last = train_classifier(train_store, tmp_path / "clf-last", HeadConfig(head="small", epochs=2, batch_size=32, device="cpu", progress=False),
                            test_store=test_store, log=lambda *_: None)
    assert (last["kept_epoch"], last["val_items"], last["kept_test_accuracy"]) == (2, None, last["final_test_accuracy"])
    m = json.loads((val_store / MANIFEST).read_text())
    m["obfuscator"]["fingerprint"] = "0" * 64
    (val_store / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(StoreError, match="val: made by obfuscator 0000"):
        train_classifier(train_store, tmp_path / "clf-bad", cfg, val_store=val_store, log=lambda *_: None)
    # The command line says which epoch it kept.
    good_val = make_store(tiny, tmp_path, data="run:attacker", name="val2")
    assert main(["train-classifier", str(train_store), "--out", str(tmp_path / "cli"), "--test-store", str(test_store), "--val-store", str(good_val),
                 "--head", "small", "--epochs", "2", "--batch-size", "32", "--device", "cpu", "--no-progress"]) == 0
    kept = json.loads((tmp_path / "cli" / "summary.json").read_text())["kept_epoch"]
    assert f"(head small, epoch {kept} of 2, picked on 45 validation items" in capsys.readouterr().out


def test_train_classifier_layout_changes_speed_not_training(tiny, tmp_path):
    train_store = make_store(tiny, tmp_path, data="run:defender", name="train")
    losses = {}
    for layout in ("off", "on"):
        cfg = HeadConfig(epochs=2, batch_size=32, device="cpu", progress=False, channels_last=layout)
        train_classifier(train_store, tmp_path / f"clf-{layout}", cfg, log=lambda *_: None)
        losses[layout] = [json.loads(line)["loss"] for line in (tmp_path / f"clf-{layout}" / "metrics.jsonl").read_text().splitlines()]
    assert losses["on"] == pytest.approx(losses["off"], rel=1e-3)
    with pytest.raises(StoreError, match="--channels-last must be auto, on or off, got 'nhwc'"):
        train_classifier(train_store, tmp_path / "clf", HeadConfig(channels_last="nhwc"), log=lambda *_: None)


def test_train_classifier_under_bf16_learns_alike_and_records_its_precision(tiny, tmp_path):
    """bf16 autocast changes the head's arithmetic, not what it learns: the losses stay near fp32's, but not equal
    (the setting is used), and summary.json names the precision; an unknown one is refused by name."""
    train_store = make_store(tiny, tmp_path, data="run:defender", name="train")
    losses, summaries = {}, {}
    for precision in ("fp32", "bf16"):
        cfg = HeadConfig(epochs=2, batch_size=32, device="cpu", progress=False, precision=precision)
        summaries[precision] = train_classifier(train_store, tmp_path / f"clf-{precision}", cfg, log=lambda *_: None)
        losses[precision] = [json.loads(line)["loss"] for line in (tmp_path / f"clf-{precision}" / "metrics.jsonl").read_text().splitlines()]
    assert losses["bf16"] != losses["fp32"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)
    assert summaries["bf16"]["precision"] == "bf16 (asked for)" and summaries["fp32"]["precision"] == "fp32 (asked for)"
    with pytest.raises(StoreError, match="--precision must be one of auto, fp32, bf16, got 'fp16'"):
        train_classifier(train_store, tmp_path / "clf", HeadConfig(precision="fp16"), log=lambda *_: None)


def test_train_classifier_refuses_a_test_store_of_another_obfuscator(tiny, tmp_path):
    train_store = make_store(tiny, tmp_path, data="run:defender", name="train")
    test_store = make_store(tiny, tmp_path, data="run:test", name="test")
    m = json.loads((test_store / MANIFEST).read_text())
    m["obfuscator"]["fingerprint"] = "0" * 64
    (test_store / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(StoreError, match="test: made by obfuscator 0000"):
        train_classifier(train_store, tmp_path / "clf", HeadConfig(epochs=1, progress=False, device="cpu"), test_store=test_store, log=lambda *_: None)


def test_predict_matches_the_in_run_classifier(tiny, tmp_path, capsys):
    from PIL import Image

    run = load_run(tiny["run"])
    test = load_splits(tiny["cfg"].data, tiny["cfg"].seed).test
    paths = []
    for i in range(12):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(test.images[i].permute(1, 2, 0).numpy()).save(p)  # PNG is lossless
        paths.append(str(p))
    with torch.no_grad():
        probs = run.classifier(run.obfuscator(to_float(test.images[:12]))).softmax(1)
    preds = predict(tiny["run"], images=paths, device="cpu")
    assert [p.item for p in preds] == paths
    assert [p.label for p in preds] == probs.argmax(1).tolist()
    assert [p.name for p in preds] == [test.classes[i] for i in probs.argmax(1).tolist()]
    assert torch.allclose(torch.tensor([p.confidence for p in preds]), probs.max(1).values, atol=1e-6)

    # From a store: the same classifier on float16 features gives the same classes (up to float16 ties).
    out = make_store(tiny, tmp_path)
    from_store = predict(tiny["run"], store=out, device="cpu")
    with torch.no_grad():
        all_probs = run.classifier(run.obfuscator(to_float(test.images))).softmax(1)
    agree = np.mean([p.label == int(c) for p, c in zip(from_store, all_probs.argmax(1))])
    assert agree >= 0.95 and [p.true_label for p in from_store] == test.labels.tolist()
    assert np.allclose([p.confidence for p in from_store], all_probs.max(1).values.numpy(), atol=1e-2)

    assert main(["predict", "--run", str(tiny["run"]), *paths[:2], "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:2] == [paths[0], preds[0].name] and lines[1].endswith(f"{preds[0].confidence:.1%}")
    assert main(["predict", "--run", str(tiny["run"]), "--store", str(out), "--show", "3", "--csv", str(tmp_path / "p.csv")]) == 0
    text = capsys.readouterr().out
    assert "... 57 more" in text and "accuracy against the store's labels" in text
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 61
    assert main(["predict", "--run", str(tiny["run"]), str(tmp_path / "nope.png")]) == 2
    assert "image not found" in capsys.readouterr().err


def test_cli_obfuscate_and_bad_spec(tiny, tmp_path, capsys):
    assert main(["obfuscate", "--run", str(tiny["run"]), "--data", "run:test", "--out", str(tmp_path / "s"), "--no-progress", "--bench", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "wrote 60 of 60 items" in text and "bare obfuscator forward" in text
    assert main(["obfuscate", "--run", str(tiny["run"]), "--data", "cifar10:tset", "--out", str(tmp_path / "t")]) == 2
    assert "unknown split 'tset'" in capsys.readouterr().err


def test_fingerprint_follows_weights_and_batchnorm_statistics(tiny):
    a, b = load_run(tiny["run"]).obfuscator, load_run(tiny["run"]).obfuscator
    assert fingerprint(a) == fingerprint(b) and len(fingerprint(a)) == 64
    bn = next(m for m in b.modules() if isinstance(m, torch.nn.BatchNorm2d))
    saved = bn.running_mean.clone()
    bn.running_mean[0] += 1e-3  # eval-mode features change with BatchNorm statistics, so must the fingerprint
    assert fingerprint(a) != fingerprint(b)
    bn.running_mean.copy_(saved)
    assert fingerprint(a) == fingerprint(b)
    bn.num_batches_tracked += 1  # a 0-d counter that does not change any output still counts as a weight
    assert fingerprint(a) != fingerprint(b)


def test_features_the_dtype_cannot_hold_are_refused(tiny, tmp_path):
    run = tmp_path / "loud-run"
    shutil.copytree(tiny["run"], run)
    weights = latest_step_dir(run) / "obfuscator.safetensors"
    state = load_tensors(weights)
    last_bn = max((k for k in state if k.endswith("running_var")), key=lambda k: int(k.split(".")[0])).replace("running_var", "weight")
    for scale, message in ((1e6, "exceed float16's range"), (float("nan"), "not finite")):
        state[last_bn] = torch.full_like(state[last_bn], scale)
        replace_weights(weights, state)
        with pytest.raises(StoreError, match=message):
            obfuscate(run, "run:test", tmp_path / f"s{scale}", device="cpu", progress=False, log=lambda *_: None)
    state[last_bn] = torch.full_like(state[last_bn], 1e6)
    replace_weights(weights, state)
    obfuscate(run, "run:test", tmp_path / "s32", dtype="float32", device="cpu", progress=False, log=lambda *_: None)
    assert read_all(tmp_path / "s32")["features"].abs().max() > 65504


def test_fingerprint_covers_the_noise_defence_sigma():
    from veil.defences import GaussianNoise, set_noise
    from veil.models import Obfuscator

    f = Obfuscator(3, 0.0625, 2, GaussianNoise())
    before = fingerprint(f)
    set_noise(f, 0.5)  # a 0-d buffer: the stored features' noise level is part of the obfuscator
    assert fingerprint(f) != before


def test_a_quantising_obfuscator_is_stored_as_its_codes_and_read_back_exactly(tiny, tmp_path):
    """model.feature_bits=2 with a 3-channel bottleneck: one byte per code on disk, f's values when read,
    and the store trains a classifier like any other."""
    cfg = config_mod.from_dict({**config_mod.to_dict(tiny["cfg"]), "model": {**config_mod.to_dict(tiny["cfg"])["model"],
                                "bottleneck": "learned", "bottleneck_channels": 3, "feature_bits": 2}})
    run_dir = tmp_path / "run"
    train(cfg, run_dir, log=lambda *_: None)
    run, test = load_run(run_dir), load_splits(cfg.data, cfg.seed).test
    codes = tmp_path / "codes"
    obfuscate(run_dir, "run:test", codes, device="cpu", progress=False, log=lambda *_: None)
    floats = tmp_path / "floats"
    obfuscate(run_dir, "run:test", floats, dtype="float16", device="cpu", progress=False, log=lambda *_: None)
    m = verify(codes, fingerprint=fingerprint(run.obfuscator))
    assert m["features"] == {"shape": [3, 8, 8], "dtype": "uint8", "bits": 2}
    assert m["obfuscator"]["out_channels"] == 3 and m["obfuscator"]["feature_bits"] == 2
    assert load_tensors(codes / m["shards"][0]["file"])["features"].max() <= 3  # codes 0..3
    with torch.no_grad():
        expected = run.obfuscator(to_float(test.images))
    assert torch.equal(read_all(codes)["features"], expected)  # k / 3 exactly, back from the codes
    assert not read_all(floats)["features"].float().equal(expected)  # float16 cannot hold 2/3 exactly; the codes can
    bytes_codes = sum(s["bytes"] for s in m["shards"])
    bytes_floats = sum(s["bytes"] for s in read_manifest(floats)["shards"])
    assert bytes_codes < bytes_floats  # 192 feature bytes per item instead of 384
    head = HeadConfig(head="vgg16", epochs=1, batch_size=16, device="cpu", progress=False)
    train_store = tmp_path / "train"
    obfuscate(run_dir, "run:defender", train_store, device="cpu", progress=False, log=lambda *_: None)
    summary = train_classifier(train_store, tmp_path / "clf", head, test_store=codes, log=lambda *_: None)
    assert 0 <= summary["final_test_accuracy"] <= 1 and summary["test_items"] == len(test)
