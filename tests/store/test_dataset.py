"""veil.open_store: the store as a torch Dataset, read a shard at a time with bounded memory."""

import json
import re
from pathlib import Path

import pytest
import torch
from tests.conftest import make_store, read_all

import veil
from veil.errors import StoreError
from veil.store import dataset as store_dataset
from veil.store.format import id_hex

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(store_run, tmp_path):
    return make_store(store_run, tmp_path, data=f"npz:{store_run['npz']}", shard_size=32)  # 240 items, 8 shards


def test_open_store_yields_the_shards_tensors(store):
    everything = read_all(store)
    ds = veil.open_store(store, ids=True)
    assert isinstance(ds, torch.utils.data.Dataset) and len(ds) == 240 and ds.num_shards == 8
    for i in (0, 31, 32, 100, 239, -1):
        features, label, item_id = ds[i]
        assert features.dtype == torch.float32 and torch.equal(features, everything["features"][i].float())
        assert label == int(everything["labels"][i]) and item_id == id_hex(everything["ids"])[i]
    as_stored = veil.open_store(store, dtype=None)
    features, label = as_stored[7]
    assert features.dtype == torch.float16 and torch.equal(features, everything["features"][7])
    with pytest.raises(IndexError):
        ds[240]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=40)))
    assert torch.equal(batch[0], everything["features"][:40].float()) and torch.equal(batch[1], everything["labels"][:40])
    assert list(batch[2]) == id_hex(everything["ids"])[:40]


def test_memory_holds_at_most_cache_shards_and_shard_shuffle_reads_each_shard_once(store, monkeypatch):
    reads = []
    real = store_dataset.read_shard
    monkeypatch.setattr(store_dataset, "read_shard", lambda loc, m, k: reads.append(k) or real(loc, m, k))
    ds = veil.open_store(store, cache_shards=2)
    order = list(veil.ShardShuffle(ds, torch.Generator().manual_seed(0)))
    assert sorted(order) == list(range(240)) and order != list(range(240))
    seen = []
    for i in order:
        seen.append(ds[i][1])
        assert len(ds._cache) <= 2
    assert sorted(reads) == list(range(8))  # each shard read once in the pass
    assert [i // 32 for i in order] == sorted((i // 32 for i in order), key=[i // 32 for i in order].index)  # one shard at a time
    shuffled = [ds[i][1] for i in torch.randperm(240).tolist()]
    assert sorted(shuffled) == sorted(seen) and len(reads) > 8 + 100  # plain random access reads a shard for most items


def test_open_store_refuses_a_damaged_or_unfinished_store(store):
    shard = store / "shard-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    ds = veil.open_store(store)
    ds[0]  # shard 0 is fine
    with pytest.raises(StoreError, match=r"shard-00003\.safetensors: shard altered"):
        ds[100]
    with pytest.raises(StoreError, match="store not found"):
        veil.open_store(store / "nowhere")
    m = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").write_text(json.dumps({**m, "complete": False}))
    with pytest.raises(StoreError, match="incomplete"):
        veil.open_store(store)


def test_the_readme_training_loop_runs_on_a_store(store):
    """The README's example of a user's own head on open_store, run as written (only the store path changed)."""
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(# Train your own model on a store.*?)```", readme, re.S).group(1)
    code = code.replace('"stores/c10-train"', repr(str(store)))
    scope = {}
    torch.manual_seed(0)
    exec(compile(code, "README.md", "exec"), scope)
    per_epoch = len(scope["losses"]) // 5
    assert sum(scope["losses"][-per_epoch:]) < sum(scope["losses"][:per_epoch])  # the last epoch's batches against the first's
