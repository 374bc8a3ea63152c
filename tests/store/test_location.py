"""Stores at fsspec URLs: memory:// and file:// here; a URL whose package is missing is one clear line."""

import importlib.util
import uuid

import fsspec
import pytest
import torch
from tests.conftest import make_store, read_all

import veil
from veil.cli import main
from veil.data import load_splits
from veil.errors import StoreError
from veil.store.erase import erase
from veil.store.format import id_hex, read_manifest, verify
from veil.store.location import locate, where


@pytest.fixture
def memory_url():
    url = f"memory://veil-test-{uuid.uuid4().hex[:8]}/store"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url.removeprefix("memory://").split("/")[0]):
        fs.rm("/" + url.removeprefix("memory://").split("/")[0], recursive=True)


def test_memory_round_trip_obfuscate_verify_open_erase_verify(store_run, tmp_path, memory_url, capsys):
    local = make_store(store_run, tmp_path, shard_size=16)
    make_store(store_run, tmp_path, name=memory_url, shard_size=16)
    m = verify(memory_url)
    assert m["count"] == 60 and len(m["shards"]) == 4
    remote = read_all(memory_url)
    assert torch.equal(remote["features"], read_all(local)["features"])  # the same features as a local store
    ds = veil.open_store(memory_url)
    assert len(ds) == 60 and torch.equal(ds[17][0], remote["features"][17].float())
    ids = id_hex(remote["ids"])
    r = erase(memory_url, [ids[3], ids[40]], log=lambda *_: None)
    assert r["erased"] == 2
    m = verify(memory_url)
    assert m["count"] == 58 and not {ids[3], ids[40]} & set(id_hex(read_all(memory_url)["ids"]))
    fs = fsspec.filesystem("memory")
    root = locate(memory_url).root
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)) == sorted(["manifest.json"] + [s["file"] for s in m["shards"]])
    assert where(locate(memory_url), "manifest.json") == memory_url + "/manifest.json"
    assert main(["verify", memory_url, "--no-progress"]) == 0
    assert "OK, 58 items" in capsys.readouterr().out
    obfuscate_cli = ["obfuscate", "--run", str(store_run["run"]), "--data", "run:defender", "--append", memory_url, "--no-progress", "--device", "cpu"]
    defender = len(load_splits(store_run["cfg"].data, store_run["cfg"].seed).defender)
    assert main(obfuscate_cli) == 0 and verify(memory_url)["count"] == 58 + defender
    # The same items again (run:test holds the two erased ones): refused, nothing added.
    assert main([*obfuscate_cli[:4], "run:test", *obfuscate_cli[5:]]) == 2 and verify(memory_url)["count"] == 58 + defender


def test_file_url_is_a_local_folder(store_run, tmp_path):
    out = make_store(store_run, tmp_path, name=f"file://{tmp_path}/via-url", shard_size=32)
    assert locate(out).local and (tmp_path / "via-url" / "manifest.json").is_file()
    assert verify(str(tmp_path / "via-url"))["count"] == 60 and read_manifest(out)["count"] == 60


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed here")
def test_a_url_without_its_package_is_one_clear_line(store_run, tmp_path, capsys):
    with pytest.raises(StoreError, match=r"s3://bucket/store: 's3://' needs the s3fs package, which is not installed \(pip install s3fs\)"):
        verify("s3://bucket/store")
    for argv in (["verify", "s3://bucket/store"], ["erase", "s3://bucket/store", "--ids", "0" * 32],
                 ["obfuscate", "--run", str(store_run["run"]), "--data", "run:test", "--out", "s3://bucket/store"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "needs the s3fs package" in err, err
    with pytest.raises(StoreError, match="no filesystem for 'nosuch://'"):
        verify("nosuch://x/y")
