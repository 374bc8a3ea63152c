"""A store as a PyTorch dataset: for training one's own model on the features, and for `veil train-classifier`.

    ds = veil.open_store("stores/c10-train")           # a folder, or "s3://bucket/c10-train", "memory://..."
    features, label = ds[0]                             # C x H x W float32, int
    loader = DataLoader(ds, batch_size=128, sampler=ShardShuffle(ds, generator))

Opening checks what is cheap (the manifest's count against its shards' counts, the shard list);
shards are read when one of their items is first asked for, each checked against the manifest
(size, sha256, shapes, labels in the range of the classes), and at most `cache_shards` of them are held, the least recently used
dropped: memory is about cache_shards shards whatever the size of the store (each item returned
is a copy, so holding items does not hold their shard). Random access over the whole store
(DataLoader(shuffle=True)) would read a shard for nearly every item; ShardShuffle is a random
order that takes one shard at a time (shards in random order, items shuffled within each), so
that each shard is read once per epoch. Each DataLoader worker process holds its own cache.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import OrderedDict
from pathlib import Path

import torch
from torch.utils.data import Dataset, Sampler

from veil.errors import StoreError
from veil.store.format import check_complete, check_counts, check_label_range, check_listing, read_manifest, read_shard
from veil.store.location import Location, locate


class StoreDataset(Dataset):
    """A store's items, map-style: (features, label), or (features, label, id) with ids=True (id: 32 hex digits)."""

    def __init__(self, store: str | Path | Location, ids: bool = False, dtype: torch.dtype | None = torch.float32, cache_shards: int = 2):
        if cache_shards < 1:
            raise ValueError(f"cache_shards must be >= 1, got {cache_shards}")
        self.location = locate(store)
        self.manifest = read_manifest(self.location)
        check_complete(self.location, self.manifest)
        check_listing(self.location, self.manifest)
        check_counts(self.location, self.manifest)
        self.ids, self.dtype, self.cache_shards = ids, dtype, cache_shards
        self.classes: list[str] = self.manifest["dataset"]["classes"]
        self.starts = [0]  # first item of each shard, and the total at the end
        for entry in self.manifest["shards"]:
            self.starts.append(self.starts[-1] + entry["count"])
        self._cache: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return self.starts[-1]

    @property
    def num_shards(self) -> int:
        return len(self.manifest["shards"])

    def shard(self, k: int) -> dict[str, torch.Tensor]:
        """Shard k's tensors as read_shard gives them (features N x C x H x W, labels N, ids N x 16), through the cache."""
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        while len(self._cache) >= self.cache_shards:
            self._cache.popitem(last=False)
        try:
            shard = read_shard(self.location, self.manifest, k)
        except StoreError:
            if read_manifest(self.location) != self.manifest:  # an erase or append replaced the manifest (and this shard) since
                raise StoreError(f"{self.location.url}: changed since it was opened (an erase or append replaced "
                                 f"{self.manifest['shards'][k]['file']}); open it again") from None
            raise
        check_label_range(self.location, self.manifest, k, shard["labels"])
        self._cache[k] = shard
        return shard

    def __getitem__(self, index: int) -> tuple:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"item {index} of a store of {n} items")
        index %= n
        k = bisect_right(self.starts, index) - 1
        shard, j = self.shard(k), index - self.starts[k]
        features = shard["features"][j].to(self.dtype or shard["features"].dtype, copy=True)
        label = int(shard["labels"][j])
        return (features, label, shard["ids"][j].numpy().tobytes().hex()) if self.ids else (features, label)

    def __getstate__(self) -> dict:  # a DataLoader worker starts with an empty cache
        return {**self.__dict__, "_cache": OrderedDict()}


class ShardShuffle(Sampler):
    """Every item once, in a random order that stays within one shard at a time (each shard read once per pass)."""

    def __init__(self, dataset: StoreDataset, generator: torch.Generator | None = None):
        self.starts, self.generator = dataset.starts, generator

    def __len__(self) -> int:
        return self.starts[-1]

    def __iter__(self):  # noqa: ANN204
        for k in torch.randperm(len(self.starts) - 1, generator=self.generator).tolist():
            a, b = self.starts[k], self.starts[k + 1]
            yield from (a + torch.randperm(b - a, generator=self.generator)).tolist()


def open_store(store: str | Path | Location, ids: bool = False, dtype: torch.dtype | None = torch.float32, cache_shards: int = 2) -> StoreDataset:
    """A store (a folder or an fsspec URL) as a map-style torch Dataset of (features, label[, id]).
    dtype: what features are returned as (None: as stored, e.g. float16); cache_shards: shards held at once."""
    return StoreDataset(store, ids, dtype, cache_shards)
