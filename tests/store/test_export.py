"""veil store-export: a store as Parquet, every value read back with pyarrow."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from tests.conftest import make_store, read_all

from veil.cli import main
from veil.errors import StoreError
from veil.store.erase import erase
from veil.store.export import export_store
from veil.store.format import id_hex, read_manifest


def check_file(path, store):
    """Every row of the file is the store's item: id, label, and the stored values, flattened C x H x W."""
    table = pq.read_table(path)
    items, m = read_all(store, decode=False), read_manifest(store)
    assert table.num_rows == m["count"] == len(items["labels"])
    assert table.column("id").to_pylist() == id_hex(items["ids"])
    assert table.column("label").to_pylist() == items["labels"].tolist()
    features = np.stack(table.column("features").to_numpy(zero_copy_only=False))
    assert features.shape == (m["count"], int(np.prod(m["features"]["shape"])))
    assert np.array_equal(features, items["features"].float().reshape(m["count"], -1).numpy())  # float16 widens exactly
    meta = json.loads(table.schema.metadata[b"veil"])
    assert meta["obfuscator"]["fingerprint"] == m["obfuscator"]["fingerprint"] and meta["store_id"] == m["store_id"]
    assert meta["dataset"]["classes"] == m["dataset"]["classes"] and meta["count"] == m["count"]
    return table, meta


def test_a_float_store_exports_every_value_and_an_erasure_needs_a_new_export(store_run, tmp_path):
    store = make_store(store_run, tmp_path, shard_size=25)  # 60 items in 3 shards
    out = tmp_path / "store.parquet"
    r = export_store(store, out, progress=False)
    table, meta = check_file(out, store)
    assert r["rows"] == 60 and str(table.schema.field("features").type.value_type) == "float" and meta["features"]["dtype"] == "float16"
    gone = table.column("id").to_pylist()[:5]
    erase(store, gone, log=lambda *_: None)
    export_store(store, tmp_path / "after.parquet", progress=False)
    after, meta = check_file(tmp_path / "after.parquet", store)
    assert after.num_rows == 55 and not set(gone) & set(after.column("id").to_pylist()) and meta["erasures"] == 5
    assert pq.read_table(out).num_rows == 60  # the earlier copy still holds them: why README says export again


def test_bad_input_is_refused_naming_the_problem(store_run, tmp_path, capsys):
    store = make_store(store_run, tmp_path)
    with pytest.raises(StoreError, match="folder .*nowhere does not exist"):
        export_store(store, tmp_path / "nowhere" / "x.parquet")
    with pytest.raises(StoreError, match="is a folder"):
        export_store(store, tmp_path)
    with pytest.raises(StoreError, match="not a Veil store"):
        export_store(tmp_path, tmp_path / "x.parquet")
    assert main(["store-export", str(tmp_path / "none"), str(tmp_path / "x.parquet")]) == 2
    assert "store not found" in capsys.readouterr().err


def test_a_damaged_shard_stops_the_export_and_leaves_no_file(store_run, tmp_path):
    store = make_store(store_run, tmp_path, shard_size=25)  # 3 shards
    m = read_manifest(store)
    last = store / m["shards"][-1]["file"]
    data = bytearray(last.read_bytes())
    data[-1] ^= 0xFF  # the last shard altered: found only after two shards were written to the file
    last.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="shard altered"):
        export_store(store, tmp_path / "x.parquet", progress=False)
    assert not (tmp_path / "x.parquet").exists()
    assert not list(tmp_path.glob(".x.parquet.*"))  # nothing half-written left behind
