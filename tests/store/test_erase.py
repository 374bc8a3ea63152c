"""Erasing items on request, appending, the id map: what is kept is kept bit for bit, a kill at any
rename leaves a store that verifies, and bad requests change nothing."""

import json
import shutil
import signal

import pytest
import torch
from tests.conftest import make_store, read_all
from tests.faults import folder_bytes, run_veil
from tests.store.test_store import run_with_another_obfuscator

from veil.cli import main
from veil.errors import StoreError
from veil.store import idmap
from veil.store.erase import erase, parse_ids
from veil.store.format import MANIFEST, erased_ids, id_hex, leftovers, read_manifest, verify
from veil.store.obfuscate import obfuscate

SPREAD = [5, 40, 41, 200, 239]  # items in shards 0, 1, 1, 6 and 7 of 32-item shards


def ids_of(store):
    return id_hex(read_all(store)["ids"])


@pytest.fixture
def store(store_run, tmp_path):
    """All 240 images of the tiny run's .npz, in eight shards of 32 (the last of 16)."""
    return make_store(store_run, tmp_path, data=f"npz:{store_run['npz']}", shard_size=32)


def test_erase_over_several_shards_keeps_exactly_the_others(store):
    before, m0 = read_all(store, decode=False), read_manifest(store)
    ids = id_hex(before["ids"])
    gone = [ids[i] for i in SPREAD]
    r = erase(store, gone, log=lambda *_: None)
    assert (r["erased"], r["shards_rewritten"], r["items"]) == (5, 4, 235)
    m = verify(store)
    after = read_all(store, decode=False)
    keep = torch.tensor([i not in SPREAD for i in range(240)])
    for key in ("features", "labels", "ids"):
        assert torch.equal(after[key], before[key][keep]), key  # bit for bit, in the same order
    assert not set(gone) & set(id_hex(after["ids"]))
    assert m["erasures"][0]["ids"] == sorted(gone) and set(m["erasures"][0]) == {"utc", "ids"}  # ids and time only
    assert set(erased_ids(m)) == set(gone)
    # Untouched shards keep their files; the four rewritten ones are new names, the old files gone.
    files0, files = [s["file"] for s in m0["shards"]], [s["file"] for s in m["shards"]]
    assert [files0[i] for i in (2, 3, 4, 5)] == [files[i] for i in (2, 3, 4, 5)]
    assert {files[i] for i in (0, 1, 6, 7)}.isdisjoint(files0)
    assert sorted(p.name for p in store.iterdir()) == sorted([MANIFEST, *files])
    assert m["pending"] == m["retired"] == [] and not leftovers(store, m)
    # A shard whose items are all erased is dropped from the list.
    r = erase(store, id_hex(after["ids"])[-15:], log=lambda *_: None)
    assert read_manifest(store)["count"] == 220 and len(read_manifest(store)["shards"]) == 7
    verify(store)


def test_a_quantised_store_keeps_its_codes_bit_for_bit(store_run, tmp_path):
    from veil import config as config_mod
    from veil.train import train

    cfg = config_mod.from_dict({**config_mod.to_dict(store_run["cfg"]), "model": {**config_mod.to_dict(store_run["cfg"])["model"],
                                "bottleneck": "learned", "bottleneck_channels": 3, "feature_bits": 2},
                                "train": {**config_mod.to_dict(store_run["cfg"])["train"], "pretrain_epochs": 1, "t_main": 0}})
    train(cfg, tmp_path / "run", log=lambda *_: None)
    out = tmp_path / "codes"
    obfuscate(tmp_path / "run", "run:test", out, shard_size=16, device="cpu", progress=False, log=lambda *_: None)
    before = read_all(out, decode=False)
    erase(out, [id_hex(before["ids"])[3]], log=lambda *_: None)
    after = read_all(out, decode=False)
    assert after["features"].dtype == torch.uint8 and torch.equal(after["features"], torch.cat([before["features"][:3], before["features"][4:]]))


def test_unknown_id_is_reported_and_nothing_changes(store, capsys):
    ids = ids_of(store)
    before = folder_bytes(store)
    with pytest.raises(StoreError, match=r"1 id\(s\) not in the store and never erased from it: 0{32}; nothing was erased"):
        erase(store, [ids[3], "0" * 32], log=lambda *_: None)
    assert folder_bytes(store) == before
    assert main(["erase", str(store), "--ids", ids[3], "f" * 32, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("veil erase: error: ") and "f" * 32 in err
    assert main(["erase", str(store), "--ids", "xyz", "--no-progress"]) == 2
    assert "'xyz': neither an id (32 hex digits) nor a file of ids" in capsys.readouterr().err
    assert folder_bytes(store) == before


def test_erase_again_reports_already_erased_and_cli_reads_id_files(store, tmp_path, capsys):
    ids = ids_of(store)
    listing = tmp_path / "request.txt"
    listing.write_text(f"# request 17\n{ids[0]}\n\n{ids[100].upper()}  # second\n")
    assert parse_ids([str(listing), ids[7]]) == [ids[0], ids[100], ids[7]]
    assert main(["erase", str(store), "--ids", str(listing), "--no-progress"]) == 0
    assert "erased 2 items" in capsys.readouterr().out
    r = erase(store, [ids[0], ids[7]], log=lambda *_: None)  # one already erased, one new
    assert r["erased"] == 1 and list(r["already"]) == [ids[0]]
    assert main(["erase", str(store), "--ids", ids[0], "--no-progress"]) == 0
    assert f"{ids[0]}: already erased on 20" in capsys.readouterr().out
    assert main(["verify", str(store), "--no-progress"]) == 0
    assert "erasure log: 3 ids erased in 2 erasures, none of them in a shard" in capsys.readouterr().out


def test_verify_catches_an_erased_id_that_came_back(store):
    ids = ids_of(store)
    pristine = store.parent / "copy"
    shutil.copytree(store, pristine)
    erase(store, [ids[50]], log=lambda *_: None)
    m = read_manifest(store)
    restored = read_manifest(pristine)  # the old shards put back under the new manifest's log
    (pristine / MANIFEST).write_text(json.dumps({**restored, "format_version": 2, "erasures": m["erasures"]}))
    with pytest.raises(StoreError, match=f"holds id {ids[50]}, which the erasure log says was erased on"):
        verify(pristine)


@pytest.mark.slow
def test_sigkill_at_each_rename_of_an_erase_leaves_a_store_that_verifies(store, tmp_path):
    """The 7 renames of this erase: manifest (pending), 4 shards, manifest (the commit), manifest (retired emptied);
    a kill just before each, and none (8)."""
    ids = ids_of(store)
    gone = [ids[i] for i in SPREAD]
    reference = tmp_path / "reference"
    shutil.copytree(store, reference)
    erase(reference, gone, log=lambda *_: None)
    expected = read_all(reference, decode=False)
    original = read_all(store, decode=False)
    states = []
    for n in range(1, 9):
        copy = tmp_path / f"kill{n}"
        shutil.copytree(store, copy)
        r = run_veil(f"kill@replace::{n}", ["erase", str(copy), "--ids", *gone, "--no-progress"], timeout=120)
        killed = r.returncode == -signal.SIGKILL
        assert killed == (n <= 7), (n, r.returncode, r.stderr[-2000:])
        m = verify(copy)  # old store or new store, never a broken one
        now = read_all(copy, decode=False)
        state = "new" if m["count"] == 235 else "old"
        want = expected if state == "new" else original
        assert all(torch.equal(now[k], want[k]) for k in ("features", "labels", "ids")), n
        states.append(state)
        # Running the same erase again finishes the job and deletes whatever the kill left.
        erase(copy, gone, log=lambda *_: None)
        m = verify(copy)
        assert not leftovers(copy, m) and torch.equal(read_all(copy, decode=False)["ids"], expected["ids"])
        assert m["pending"] == m["retired"] == [] and sorted(p.name for p in copy.iterdir() if not p.name.startswith(".")) == sorted(
            [MANIFEST] + [s["file"] for s in m["shards"]])
    assert states == ["old"] * 6 + ["new"] * 2


# ----------------------------------------------------------------------------- append


def test_append_adds_new_shards_only_and_refuses_another_obfuscator(store_run, tmp_path, capsys):
    out = make_store(store_run, tmp_path, data="run:defender", shard_size=32)
    before = folder_bytes(out)
    m0 = read_manifest(out)
    obfuscate(store_run["run"], "run:test", append=out, device="cpu", progress=False, log=lambda *_: None)
    m = verify(out)
    assert m["count"] == m0["count"] + 60 and m["shards"][: len(m0["shards"])] == m0["shards"]
    assert all(folder_bytes(out)[name] == data for name, data in before.items() if name != MANIFEST)  # old shards untouched
    assert [s["count"] for s in m["shards"][len(m0["shards"]) :]] == [32, 28]
    assert m["appends"][0]["count"] == 60 and m["appends"][0]["dataset"] == {"name": "npz", "split": "test"}
    test_only = read_all(make_store(store_run, tmp_path, data="run:test", name="t"))
    assert torch.equal(read_all(out)["features"][-60:], test_only["features"]) and torch.equal(read_all(out)["labels"][-60:], test_only["labels"])

    other = run_with_another_obfuscator(store_run["run"], tmp_path / "other-run")
    before = folder_bytes(out)
    assert main(["obfuscate", "--run", str(other), "--data", "run:test", "--append", str(out), "--no-progress", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    fp_store = m["obfuscator"]["fingerprint"][:16]
    assert len(err.splitlines()) == 1 and f"made by obfuscator {fp_store}..., but --run {other} has obfuscator " in err
    assert folder_bytes(out) == before


# ----------------------------------------------------------------------------- the id map


def test_id_map_resolves_items_outside_the_store_and_loses_erased_lines(store_run, tmp_path, capsys):
    from PIL import Image

    from veil.data import read_npz

    images, labels, classes = read_npz(store_run["npz"])
    folder = tmp_path / "photos"
    for c, name in enumerate(classes):  # two photos per class, all ten classes (as the run's data has)
        (folder / name).mkdir(parents=True)
        for i in [int(j) for j in (labels == c).nonzero()[0][:2]]:
            Image.fromarray(images[i]).save(folder / name / f"person-{i:03d}.png")
    with pytest.raises(StoreError, match="inside the store"):
        make_store(store_run, tmp_path, data=f"folder:{folder}", id_map=tmp_path / "store" / "ids.jsonl")
    assert not (tmp_path / "store").exists()
    id_map = tmp_path / "private" / "ids.jsonl"
    id_map.parent.mkdir()
    out = make_store(store_run, tmp_path, data=f"folder:{folder}", shard_size=5, id_map=id_map)
    head, entries = idmap.read(id_map)
    m = verify(out)
    assert head == {"format": "veil-id-map", "store_id": m["store_id"], "obfuscator": m["obfuscator"]["fingerprint"]}
    assert [i for i, _ in entries] == ids_of(out) and len({item for _, item in entries}) == 20
    for f in out.iterdir():
        assert b"person-" not in f.read_bytes() and b"photos" not in f.read_bytes()
    target = entries[3][1]
    target_id = next(i for i, item in entries if item == target)
    assert main(["erase", str(out), "--id-map", str(id_map), "--items", target, "--no-progress"]) == 0
    assert "erased 1 items" in capsys.readouterr().out
    assert target_id not in ids_of(out) and len(ids_of(out)) == 19
    assert target not in {item for _, item in idmap.read(id_map)[1]} and len(idmap.read(id_map)[1]) == 19

    # Append with the same map: its lines go on; an index source is named SPEC#INDEX.
    obfuscate(store_run["run"], "run:test", append=out, id_map=id_map, device="cpu", progress=False, log=lambda *_: None)
    entries = idmap.read(id_map)[1]
    assert [i for i, _ in entries] == ids_of(out) and entries[-1][1] == "run:test#59"

    # An id map of another store: refused, nothing changed.
    other_map = tmp_path / "private" / "other.jsonl"
    make_store(store_run, tmp_path, data="run:test", name="other", id_map=other_map)
    before, map_before = folder_bytes(out), id_map.read_bytes()
    assert main(["erase", str(out), "--id-map", str(other_map), "--items", "run:test#0", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "id map of store" in err and "use the id map written with this store" in err
    assert folder_bytes(out) == before and id_map.read_bytes() == map_before
    with pytest.raises(StoreError, match="already exists"):
        make_store(store_run, tmp_path, data="run:test", name="third", id_map=other_map)
    with pytest.raises(StoreError, match="no item 'nope.png'"):
        erase(out, id_map=id_map, items=["nope.png"], log=lambda *_: None)


def test_id_map_survives_an_interrupted_obfuscate(store_run, tmp_path, monkeypatch):
    import veil.store.obfuscate as store_mod

    id_map = tmp_path / "ids.jsonl"
    real = store_mod.write_manifest
    calls = {"n": 0}

    def killed_at_third(loc, manifest):
        calls["n"] += 1
        if calls["n"] == 4:  # after the first manifest and shards 0, 1: shard 2 written and mapped, not yet listed
            raise KeyboardInterrupt("kill")
        real(loc, manifest)

    monkeypatch.setattr(store_mod, "write_manifest", killed_at_third)
    with pytest.raises(KeyboardInterrupt):
        make_store(store_run, tmp_path, shard_size=16, id_map=id_map)
    monkeypatch.setattr(store_mod, "write_manifest", real)
    assert len(idmap.read(id_map)[1]) == 48  # the third shard's lines are there, its items not listed
    out = make_store(store_run, tmp_path, shard_size=16, id_map=id_map)
    entries = idmap.read(id_map)[1]
    assert [i for i, _ in entries] == ids_of(out) and [item for _, item in entries] == [f"run:test#{i}" for i in range(60)]


def test_a_format_1_store_is_read_and_erased(store):
    """A store written before erase and append existed (no store id, log or pending lists) still verifies and erases."""
    m = json.loads((store / MANIFEST).read_text())
    old = {k: v for k, v in m.items() if k not in ("store_id", "created_utc", "erasures", "appends", "pending", "retired")}
    (store / MANIFEST).write_text(json.dumps({**old, "format_version": 1}))
    verify(store)
    ids = ids_of(store)
    erase(store, [ids[9]], log=lambda *_: None)
    m = verify(store)
    assert m["format_version"] == 2 and m["count"] == 239 and set(erased_ids(m)) == {ids[9]}
