"""Erase speed on a 50,000-item store, and the memory `veil.open_store` holds while iterating it.

    VEIL_DATA_DIR=../shared/data python benchmarks/store_life.py --work /tmp/store-life

1. trains a throwaway obfuscator (width 1/16, one pretraining epoch on the bundled demo images;
   its quality does not matter here, only the store's size and layout);
2. `veil obfuscate`s the 50,000 CIFAR-10 training images into WORK/store (float16 8x8x8 features,
   1 KiB per item, 4,096 items per shard: 13 shards);
3. erases N ids spread evenly over the store (so that every shard holding one is rewritten), on a
   fresh copy of the store for each N, and reports seconds, erased items/s and store items/s;
4. in a fresh process (so that memory freed by the steps above cannot hide growth), iterates the
   whole store through open_store (ShardShuffle order, 2 shards cached) and reports how much the
   process's resident memory (VmRSS, sampled every 256 items) and its peak (VmHWM) grew over what
   they were once the store was opened, beside the bytes the cache's tensors hold and the store's size.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import veil
from veil import config as config_mod
from veil.config import DataConfig
from veil.data import read_named
from veil.store.erase import erase
from veil.store.format import id_hex, read_manifest, read_shard
from veil.store.obfuscate import obfuscate
from veil.train import train


def rss_bytes(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def measure_open_store(store: Path) -> dict:
    torch.set_num_threads(1)
    gc.collect()
    ds = veil.open_store(store, cache_shards=2)
    base, base_peak, growth, cache_peak = rss_bytes(), rss_bytes("VmHWM"), 0, 0
    t0 = time.perf_counter()
    for j, i in enumerate(veil.ShardShuffle(ds, torch.Generator().manual_seed(0))):
        ds[i]
        if j % 256 == 0:
            growth = max(growth, rss_bytes() - base)
            cache_peak = max(cache_peak, sum(t.nbytes for s in ds._cache.values() for t in s.values()))
        if j == len(ds) // 4:
            quarter = growth  # bounded memory: no more after a quarter of the store than after all of it
    seconds = time.perf_counter() - t0
    return {"rss_growth_bytes": max(growth, rss_bytes() - base), "rss_growth_after_a_quarter_bytes": quarter, "peak_rss_growth_bytes": rss_bytes("VmHWM") - base_peak,
            "cache_tensor_bytes": cache_peak, "largest_shard_bytes": max(s["bytes"] for s in ds.manifest["shards"]),
            "seconds": round(seconds, 2), "items_per_s": round(len(ds) / seconds)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="scratch folder (the run, the store, copies)")
    p.add_argument("--data", default="", help="--data SPEC of the images to store (default: CIFAR-10's 50,000 training images, as WORK/cifar10-train.npz)")
    p.add_argument("--erase", default="1,100,1000", help="numbers of ids to erase, each on a fresh copy")
    p.add_argument("--open-only", action="store_true", help="only step 4, on WORK/store (what the script runs in a fresh process)")
    args = p.parse_args()
    if args.open_only:
        print(json.dumps(measure_open_store(Path(args.work) / "store")))
        return
    torch.set_num_threads(1)
    work = Path(args.work)
    run, store = work / "run", work / "store"
    if not (run / "summary.json").is_file():
        cfg = config_mod.from_dict({
            "data": {"dataset": "npz", "path": str(Path(__file__).resolve().parents[1] / "demo" / "cifar10-2k.npz")},
            "model": {"width": 0.0625}, "train": {"pretrain_epochs": 1, "warmup_epochs": 0, "t_main": 0, "batch_size": 64},
            "seed": 0, "device": "cpu", "progress": False,
        })
        train(cfg, run, log=lambda *_: None)
    data = args.data
    if not data:
        npz = work / "cifar10-train.npz"
        if not npz.is_file():
            images, labels, classes = read_named(DataConfig(dataset="cifar10"), train=True)
            np.savez(npz, images=images, labels=labels, classes=np.array(classes))
        data = f"npz:{npz}"
    if not (store / "manifest.json").is_file() or not read_manifest(store)["complete"]:
        t0 = time.perf_counter()
        obfuscate(run, data, store, device="cpu", progress=False, log=lambda *_: None)
        print(f"obfuscate: {time.perf_counter() - t0:.1f} s")
    m = read_manifest(store)
    size = sum(s["bytes"] for s in m["shards"])
    print(f"store: {m['count']} items, {len(m['shards'])} shards, {size / 2**20:.1f} MiB, features {m['features']}")
    ids = [i for k in range(len(m["shards"])) for i in id_hex(read_shard(store, m, k)["ids"])]

    results = {"items": m["count"], "shards": len(m["shards"]), "store_bytes": size, "erase": [], "torch": torch.__version__}
    for n in [int(x) for x in args.erase.split(",")]:
        copy = work / f"erase-{n}"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(store, copy)
        chosen = ids[:: max(1, len(ids) // n)][:n]  # spread evenly over the store
        t0 = time.perf_counter()
        r = erase(copy, chosen, log=lambda *_: None)
        seconds = time.perf_counter() - t0
        row = {"ids": n, "shards_rewritten": r["shards_rewritten"], "seconds": round(seconds, 3),
               "erased_per_s": round(n / seconds, 1), "store_items_per_s": round(m["count"] / seconds)}
        results["erase"].append(row)
        print(f"erase {n} ids: {seconds:.2f} s, {r['shards_rewritten']} shards rewritten, {n / seconds:.0f} erased items/s, "
              f"{m['count'] / seconds:.0f} store items/s")
        shutil.rmtree(copy)

    child = subprocess.run([sys.executable, __file__, "--work", str(work), "--open-only"], capture_output=True, text=True, check=True)
    results["open_store"] = o = json.loads(child.stdout.splitlines()[-1])
    print(f"open_store: iterated {m['count']} items in {o['seconds']:.1f} s ({o['items_per_s']} items/s); resident memory grew by "
          f"{o['rss_growth_bytes'] / 2**20:.1f} MiB ({o['rss_growth_after_a_quarter_bytes'] / 2**20:.1f} MiB a quarter of the way), its peak by {o['peak_rss_growth_bytes'] / 2**20:.1f} MiB (the cache's tensors: "
          f"{o['cache_tensor_bytes'] / 2**20:.1f} MiB; the largest shard file {o['largest_shard_bytes'] / 2**20:.1f} MiB; the store {size / 2**20:.1f} MiB)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
