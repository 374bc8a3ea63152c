"""Tiny, seeded fixtures: small widths and a few hundred real images, so the suite runs in minutes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from veil import config as config_mod

ROOT = Path(__file__).resolve().parents[1]
DEMO_NPZ = ROOT / "demo" / "cifar10-2k.npz"


def shared_data_dir() -> Path:
    """The offline copies of the real datasets; point $VEIL_TEST_DATA_DIR elsewhere if needed."""
    return Path(os.environ.get("VEIL_TEST_DATA_DIR", ROOT.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
    torch.set_num_threads(1)  # tiny models: one thread is as fast, and the suite shares the machine


@pytest.fixture
def tiny_npz(tmp_path: Path) -> Path:
    """240 real CIFAR-10 images from the bundled demo sample, as a plain images/labels .npz."""
    from veil.data import read_npz

    images, labels, classes = read_npz(DEMO_NPZ, tmp_path / "cache")
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(len(labels), 240, replace=False))
    path = tmp_path / "tiny.npz"
    np.savez(path, images=images[idx], labels=labels[idx], classes=np.array(classes))
    return path


@pytest.fixture
def tiny_config(tiny_npz: Path) -> config_mod.Config:
    """Width 1/16, one epoch per phase: a whole Algorithm 1 run takes a few seconds."""
    return config_mod.from_dict(
        {
            "data": {"dataset": "npz", "path": str(tiny_npz), "test_fraction": 0.25, "attacker_fraction": 0.25},
            "model": {"width": 0.0625, "dropout": 0.0},
            "train": {"pretrain_epochs": 2, "warmup_epochs": 1, "t_main": 1, "t_sub": 1, "batch_size": 32, "eval_batch_size": 64, "lambda_privacy": 1.0},
            "seed": 0,
            "device": "cpu",
            "progress": False,
        }
    )


@pytest.fixture(scope="session")
def store_run(tmp_path_factory):
    """A tiny trained run (width 1/16, 240 real CIFAR-10 images) for the feature store's tests, trained once."""
    from veil.data import read_npz
    from veil.train import train

    root = tmp_path_factory.mktemp("store")
    images, labels, classes = read_npz(DEMO_NPZ, root / "cache")
    idx = np.sort(np.random.default_rng(0).choice(len(labels), 240, replace=False))
    npz = root / "tiny.npz"
    np.savez(npz, images=images[idx], labels=labels[idx], classes=np.array(classes))
    cfg = config_mod.from_dict({
        "data": {"dataset": "npz", "path": str(npz), "test_fraction": 0.25, "attacker_fraction": 0.25},
        "model": {"width": 0.0625, "dropout": 0.0},
        "train": {"pretrain_epochs": 2, "warmup_epochs": 0, "t_main": 1, "t_sub": 1, "batch_size": 32, "eval_batch_size": 64},
        "seed": 0, "device": "cpu", "progress": False,
    })
    torch.manual_seed(0)
    train(cfg, root / "run", log=lambda *_: None)
    return {"root": root, "run": root / "run", "npz": npz, "cfg": cfg}


def make_store(run, tmp_path, data="run:test", name="store", **kw):
    """`veil obfuscate` of `data` through run["run"] into tmp_path/name (or a URL given as name)."""
    from veil.store.obfuscate import obfuscate

    out = name if "://" in str(name) else tmp_path / name
    obfuscate(run["run"], data, out, device="cpu", progress=False, log=lambda *_: None, **kw)
    return out


def read_all(store, decode=True):
    """Every shard's tensors, concatenated in item order."""
    from veil.store.format import read_manifest, read_shard

    m = read_manifest(store)
    shards = [read_shard(store, m, i, decode) for i in range(len(m["shards"]))]
    return {k: torch.cat([s[k] for s in shards]) if shards else torch.zeros(0) for k in ("features", "labels", "ids")}
