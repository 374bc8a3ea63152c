"""The feature store: obfuscated feature maps in safetensors shards, a manifest, and verify.

Why it exists (paper, Introduction): images may not be kept, but an obfuscated representation
may. `obfuscate` runs images through a run's frozen obfuscator and keeps only what comes out:

    STORE/manifest.json            what the store holds and how to check it (below)
    STORE/shard-00000.safetensors  features  N x C x H x W   float16 by default (the obfuscator's output)
                                   labels    N               int64
                                   ids       N x 16          uint8, a random opaque id per item
    STORE/shard-00001.safetensors  ...

No pixels and no file names or paths are stored: an item is known by a random 128-bit id.
The manifest records the obfuscator's fingerprint (sha256 of its weights), Veil's version, the
dataset's name and class names, and the count, byte size and sha256 of every shard.

Writing is atomic and resumable: each shard is written under a temporary name and renamed, then
the manifest (with `"complete": false` until the last shard) is replaced atomically. A kill
leaves at worst a temporary file or a shard the manifest does not list; running the same
command again checks the listed shards and writes the rest. Memory holds one shard of features
(`shard_size` items) and one batch at a time, whatever the number of images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load
from tqdm.auto import tqdm

from veil.config import DataConfig
from veil.data import IMAGE_SUFFIXES, DataError, ImageSet, load_splits, read_named, read_npz, to_float, to_tensor_images
from veil.io import atomic_write_json, save_tensors, sha256_file
from veil.models.obfuscator import code_dtype, feature_shape, fingerprint, quantised_bits
from veil.rundir import load_run
from veil.train import resolve_device
from veil.version import __version__

FORMAT = "veil-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ID_BYTES = 16  # 128-bit random ids: opaque, and collisions are out of the question
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# A quantising obfuscator's (model.feature_bits) features are stored as their integer codes, b bits in
# the smallest integer type that holds them; read_shard turns them back into the values f gave.
CODES = {"uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32}
STORED_DTYPES = {**DTYPES, **CODES}  # what a shard's features may hold
NAMED = ("mnist", "fashion-mnist", "cifar10", "cifar100")
SPLITS = ("all", "defender", "attacker", "test")
SPEC_HELP = (
    "SOURCE[:SPLIT], SOURCE = run | mnist | fashion-mnist | cifar10 | cifar100 | npz:FILE.npz | folder:DIR, "
    "SPLIT = all | defender | attacker | test (e.g. cifar10:test, run:test, npz:demo/cifar10-2k.npz, folder:photos/)"
)


class StoreError(ValueError):
    """A store that is missing, damaged, incomplete or made by another obfuscator; the message names the file."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


# ----------------------------------------------------------------------------- sources


@dataclass
class DataSpec:
    kind: str  # run | a named dataset | npz | folder
    path: str  # the file or folder for npz/folder, else ''
    split: str  # all | defender | attacker | test


def parse_spec(spec: str) -> DataSpec:
    """`cifar10:test`, `run:attacker`, `npz:path/file.npz[:SPLIT]`, `folder:path/[:SPLIT]` -> DataSpec."""
    kind, _, rest = spec.partition(":")
    if kind in ("npz", "folder"):
        path, split = rest, "all"
        head, _, tail = rest.rpartition(":")
        if head and tail in SPLITS:  # a path may itself hold ':'; only a known split name is split off
            path, split = head, tail
        if not path:
            raise DataError(f"--data '{spec}': {kind} needs a path, e.g. {kind}:{'demo/cifar10-2k.npz' if kind == 'npz' else 'photos/'}")
        return DataSpec(kind, path, split)
    if kind in ("run", *NAMED):
        split = rest or "all"
        if split not in SPLITS:
            raise DataError(f"--data '{spec}': unknown split '{split}'; valid: {', '.join(SPLITS)}")
        return DataSpec(kind, "", split)
    raise DataError(f"--data '{spec}': unknown source '{kind}'. Expected {SPEC_HELP}")


@dataclass
class Source:
    """Images to obfuscate, read by index range: uint8 N x C x S x S, with every label known up front."""

    name: str  # written to the manifest: a dataset name, never a path
    split: str
    classes: list[str]
    labels: torch.Tensor  # int64, all items
    channels: int
    read: object  # (start, stop) -> uint8 images [start, stop)

    def __len__(self) -> int:
        return len(self.labels)


def in_memory_source(images: ImageSet, name: str, split: str) -> Source:
    return Source(name, split, images.classes, images.labels, images.images.shape[1], lambda a, b: images.images[a:b])


def load_image(path: Path, mode: str | None, image_size: int, pad_small: bool) -> np.ndarray:
    """One image file -> H x W x C uint8 at image_size (resized, or zero-padded if smaller and pad_small)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            mode = mode or ("L" if img.mode in ("L", "1", "I;16", "I") else "RGB")
            img = img.convert(mode)
            if not (pad_small and img.width <= image_size and img.height <= image_size):
                img = img.resize((image_size, image_size), Image.BILINEAR)  # as veil.data.read_folder does
            arr = np.array(img, dtype=np.uint8)  # a copy: PIL's buffer is read-only
    except Exception as e:  # PIL raises many types for corrupt data
        raise DataError(f"{path}: not a readable image ({e})") from None
    return arr if arr.ndim == 3 else arr[..., None]


def folder_source(path: Path, image_size: int) -> Source:
    """One sub-folder per class, decoded batch by batch (the files are listed, never all held)."""
    if not path.is_dir():
        raise DataError(f"image folder not found: {path}")
    class_dirs = sorted(p for p in path.iterdir() if p.is_dir())
    if not class_dirs:
        raise DataError(f"{path}: expected one sub-folder per class, found none")
    files, labels = [], []
    for label, d in enumerate(class_dirs):
        found = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise DataError(f"{d}: class folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        files += found
        labels += [label] * len(found)
    # The first image decides grayscale or colour for all, as in veil.data.read_folder.
    mode = "L" if load_image(files[0], None, image_size, False).shape[-1] == 1 else "RGB"

    def read(start: int, stop: int) -> torch.Tensor:
        batch = np.stack([load_image(f, mode, image_size, False) for f in files[start:stop]])
        return to_tensor_images(batch, image_size, str(path))

    return Source("folder", "all", [d.name for d in class_dirs], torch.tensor(labels, dtype=torch.long), 1 if mode == "L" else 3, read)


def open_source(spec: DataSpec, run_data: DataConfig, seed: int, name: str = "") -> Source:
    """The images a --data SPEC names. Splits are drawn exactly as `veil train` draws them, with the run's data settings and seed."""
    if spec.kind == "run":
        data = run_data
    elif spec.kind in NAMED:
        data = dataclasses.replace(run_data, dataset=spec.kind, path="")
    else:
        data = dataclasses.replace(run_data, dataset=spec.kind, path=spec.path)
    # A file or folder name can itself be personal data: npz and folder sources are named by kind.
    name = name or data.dataset

    if spec.split != "all":
        splits = load_splits(data, seed)
        return in_memory_source(getattr(splits, "defender" if spec.split == "defender" else spec.split), name, spec.split)
    if data.dataset == "folder":
        src = folder_source(Path(data.path), data.image_size)
        src.name = name
        return src
    if data.dataset == "npz":
        path = Path(data.path)
        if not path.is_file():
            raise DataError(f"--data: .npz file not found: {path}")
        images, labels, classes = read_npz(path, Path(data.cache_dir) if data.cache_dir else None)
    else:  # a named dataset: every image, the official train split then the test split
        tr_images, tr_labels, classes = read_named(data, train=True)
        te_images, te_labels, _ = read_named(data, train=False)
        images, labels = np.concatenate([tr_images, te_images]), np.concatenate([tr_labels, te_labels])
    return in_memory_source(ImageSet(to_tensor_images(images, data.image_size, name), torch.from_numpy(labels), classes), name, "all")


# ----------------------------------------------------------------------------- manifest


def labels_digest(labels: torch.Tensor) -> str:
    """sha256 of the label sequence: a rerun must see the same items in the same order."""
    return hashlib.sha256(labels.to(torch.int64).numpy().tobytes()).hexdigest()


def read_manifest(store: Path) -> dict:
    path = Path(store) / MANIFEST
    if not Path(store).is_dir():
        raise StoreError(f"store not found: {store}")
    if not path.is_file():
        raise StoreError(f"{store}: not a Veil store (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path}: damaged ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{path}: not a Veil store manifest (format should be '{FORMAT}')")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{path}: store format version {manifest.get('format_version')}, this Veil reads version {FORMAT_VERSION}")
    required = ("veil_version", "obfuscator", "dataset", "features", "shard_size", "count", "labels_sha256", "shards", "complete")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise StoreError(f"{path}: missing fields {', '.join(missing)}")
    return manifest


def _describe_difference(old: dict, new: dict, prefix: str = "") -> str | None:
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _describe_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}: store has {a!r}, this command gives {b!r}"
    return None


# ----------------------------------------------------------------------------- reading and verifying


def read_shard(store: Path, manifest: dict, index: int) -> dict[str, torch.Tensor]:
    """One shard, checked against the manifest (size, sha256, tensor shapes) before it is used."""
    entry = manifest["shards"][index]
    path = Path(store) / entry["file"]
    if not path.is_file():
        raise StoreError(f"{path}: shard missing (the manifest lists it with {entry['count']} items)")
    data = path.read_bytes()
    if len(data) != entry["bytes"]:
        what = "truncated" if len(data) < entry["bytes"] else "grown"
        raise StoreError(f"{path}: shard {what}: {len(data)} bytes, the manifest says {entry['bytes']}")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise StoreError(f"{path}: shard altered: its sha256 differs from the manifest's")
    try:
        tensors = load(data)
    except (SafetensorError, ValueError) as e:
        raise StoreError(f"{path}: not a readable safetensors shard ({e})") from None
    n, shape, dtype = entry["count"], tuple(manifest["features"]["shape"]), STORED_DTYPES.get(manifest["features"]["dtype"])
    expected = {"features": ((n, *shape), dtype), "labels": ((n,), torch.int64), "ids": ((n, ID_BYTES), torch.uint8)}
    for key, (want_shape, want_dtype) in expected.items():
        t = tensors.get(key)
        if t is None or tuple(t.shape) != want_shape or t.dtype != want_dtype:
            got = "missing" if t is None else f"{tuple(t.shape)} {t.dtype}"
            raise StoreError(f"{path}: '{key}' should be {want_shape} {want_dtype}, got {got}")
    bits = manifest["features"].get("bits")
    if bits:  # integer codes -> the values in [0, 1] the obfuscator gave
        tensors["features"] = tensors["features"].float() / (2**bits - 1)
    return tensors


def check_fingerprint(manifest: dict, fingerprint: str, where: str, against: str) -> None:
    if manifest["obfuscator"]["fingerprint"] != fingerprint:
        raise StoreError(
            f"{where}: made by obfuscator {manifest['obfuscator']['fingerprint'][:16]}..., but {against} has obfuscator "
            f"{fingerprint[:16]}...; features from another obfuscator mean nothing to it"
        )


def verify(store: str | Path, fingerprint: str | None = None, progress: bool = False) -> dict:
    """Recompute every checksum and check the manifest; raise StoreError naming the first bad file."""
    store = Path(store)
    manifest = read_manifest(store)
    if fingerprint is not None:
        check_fingerprint(manifest, fingerprint, str(store), "this run")
    if not manifest["complete"]:
        done = sum(s["count"] for s in manifest["shards"])
        raise StoreError(f"{store}: incomplete ({done} of {manifest['count']} items written; `veil obfuscate` was interrupted); run the same command again to finish it")
    listed = {s["file"] for s in manifest["shards"]}
    expected_files = {shard_name(i) for i in range(len(manifest["shards"]))}
    if listed != expected_files:
        raise StoreError(f"{store / MANIFEST}: shard list should be {shard_name(0)}..{shard_name(len(listed) - 1)} in order")
    strays = sorted(p.name for p in store.glob("shard-*.safetensors") if p.name not in listed)
    if strays:
        raise StoreError(f"{store / strays[0]}: not listed in the manifest (left by an interrupted run, or added later)")
    digest, count, n_classes = hashlib.sha256(), 0, len(manifest["dataset"]["classes"])
    for i in tqdm(range(len(manifest["shards"])), desc="verify", disable=not progress, leave=False):
        labels = read_shard(store, manifest, i)["labels"]  # one shard at a time: memory stays bounded
        digest.update(labels.numpy().tobytes())
        count += len(labels)
        if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
            raise StoreError(f"{store / manifest['shards'][i]['file']}: labels must be in 0..{n_classes - 1}, found {labels.min().item()}..{labels.max().item()}")
    if count != manifest["count"]:
        raise StoreError(f"{store / MANIFEST}: count is {manifest['count']} but the shards hold {count} items")
    if digest.hexdigest() != manifest["labels_sha256"]:
        raise StoreError(f"{store / MANIFEST}: labels_sha256 does not match the labels in the shards")
    return manifest


def store_bytes(store: Path, manifest: dict) -> int:
    return sum(s["bytes"] for s in manifest["shards"]) + (Path(store) / MANIFEST).stat().st_size


# ----------------------------------------------------------------------------- writing


def _new_manifest(source: Source, obfuscator: torch.nn.Module, fingerprint: str, image_size: int, shape: tuple[int, ...], dtype: str, shard_size: int) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "veil_version": __version__,
        "obfuscator": {
            "fingerprint": fingerprint,
            "in_channels": obfuscator.in_channels,
            "width": obfuscator.width,
            "split": obfuscator.split,
            "image_size": image_size,
            "out_channels": obfuscator.out_channels,
            "feature_bits": obfuscator.bits,
        },
        "dataset": {"name": source.name, "split": source.split, "classes": list(source.classes)},
        "features": {"shape": list(shape), "dtype": dtype, **({"bits": obfuscator.bits} if dtype in CODES else {})},
        "shard_size": shard_size,
        "count": len(source),
        "labels_sha256": labels_digest(source.labels),
        "shards": [],
        "complete": False,
    }


def _resume_point(store: Path, manifest: dict, log) -> int:  # noqa: ANN001
    """Check the shards an interrupted run listed and return how many to keep."""
    for i in range(len(manifest["shards"])):
        read_shard(store, manifest, i)
    for tmp in store.glob(".shard-*.tmp"):
        tmp.unlink(missing_ok=True)  # half-written shards of the interrupted run
    done = sum(s["count"] for s in manifest["shards"])
    log(f"resuming {store}: {len(manifest['shards'])} shards ({done} of {manifest['count']} items) checked and kept")
    return len(manifest["shards"])


def obfuscate(
    run_dir: str | Path, data: str, out: str | Path, dtype: str = "auto", shard_size: int = 4096, batch_size: int = 500,
    name: str = "", device: str = "auto", progress: bool = True, bench: bool = False, log=print,  # noqa: ANN001
) -> dict:
    """Images -> a store of obfuscated features (resumes an interrupted store at `out`). Returns counts and timings.
    dtype auto: a quantising obfuscator's integer codes, else float16."""
    if dtype not in ("auto", *DTYPES):
        raise StoreError(f"--dtype must be one of auto, {', '.join(DTYPES)}, got '{dtype}'")
    if shard_size < 1 or batch_size < 1:
        raise StoreError(f"--shard-size and --batch-size must be >= 1, got {shard_size} and {batch_size}")
    dev = resolve_device(device)
    run = load_run(run_dir, dev)
    if not run.summary:
        log(f"note: {run_dir} has not finished training; its latest checkpoint is used")
    t0 = time.perf_counter()
    source = open_source(parse_spec(data), run.config.data, run.config.seed, name)
    open_seconds = time.perf_counter() - t0  # reading (and for named data, decoding) the images held in memory
    if source.channels != run.channels:
        raise DataError(f"--data {data}: images have {source.channels} channel(s), the obfuscator of {run_dir} takes {run.channels}")
    if len(source) == 0:
        raise DataError(f"--data {data}: no images")
    bits = quantised_bits(run.obfuscator)
    if dtype == "auto":
        dtype = code_dtype(bits)
    m = run.config.model
    shape = feature_shape(run.channels, run.config.data.image_size, m.width, m.split, run.obfuscator.out_channels)
    manifest = _new_manifest(source, run.obfuscator, fingerprint(run.obfuscator), run.config.data.image_size, shape, dtype, shard_size)

    out = Path(out)
    first = 0
    if (out / MANIFEST).is_file():
        old = read_manifest(out)
        diff = _describe_difference({k: v for k, v in old.items() if k not in ("shards", "complete", "veil_version")},
                                    {k: v for k, v in manifest.items() if k not in ("shards", "complete", "veil_version")})
        if diff:
            raise StoreError(f"{out} already holds another store ({diff}); choose another --out")
        if old["complete"]:
            log(f"{out} is already complete ({old['count']} items); nothing to do")
            return {"items": old["count"], "written": 0, "shards": len(old["shards"]), "bytes": store_bytes(out, old), "seconds": 0.0}
        manifest = old
        first = _resume_point(out, manifest, log)
    elif out.exists() and any(out.iterdir()):
        raise StoreError(f"{out}: exists, is not empty and holds no {MANIFEST}; choose another --out")
    out.mkdir(parents=True, exist_ok=True)

    n_shards = -(-len(source) // shard_size)
    n_bench = min(len(source) - first * shard_size, shard_size)  # one shard's worth: memory stays bounded
    bare_before = bare_forward_seconds(run.obfuscator, source, first * shard_size, n_bench, batch_size, dev) if bench else None
    start_time, start_cpu = time.perf_counter(), time.process_time()
    written = 0
    with torch.inference_mode(), tqdm(total=len(source), initial=first * shard_size, desc="obfuscate", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for index in range(first, n_shards):
            a, b = index * shard_size, min(len(source), (index + 1) * shard_size)
            stored = STORED_DTYPES[dtype]
            features = torch.empty((b - a, *shape), dtype=stored)  # one shard, filled batch by batch
            for s in range(a, b, batch_size):
                e = min(b, s + batch_size)
                out_batch = run.obfuscator(to_float(source.read(s, e).to(dev)))  # N x C x H x W
                if dtype in CODES:
                    out_batch = torch.round(out_batch * (2**bits - 1))  # the codes, exactly
                else:
                    _check_representable(out_batch, dtype, data, s)
                features[s - a : e - a] = out_batch.to(stored).cpu()
                bar.update(e - s)
            ids = torch.frombuffer(bytearray(secrets.token_bytes(ID_BYTES * (b - a))), dtype=torch.uint8).reshape(b - a, ID_BYTES)
            path = out / shard_name(index)
            save_tensors(path, {"features": features, "labels": source.labels[a:b].clone(), "ids": ids}, {"format": FORMAT, "shard": str(index)})
            manifest["shards"].append({"file": path.name, "count": b - a, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
            manifest["complete"] = index + 1 == n_shards
            atomic_write_json(out / MANIFEST, manifest)  # after the shard: a listed shard is always whole
            written += b - a
    seconds, cpu_seconds = time.perf_counter() - start_time, time.process_time() - start_cpu
    result = {"items": len(source), "written": written, "shards": n_shards, "bytes": store_bytes(out, manifest),
              "seconds": seconds, "cpu_seconds": cpu_seconds, "open_seconds": open_seconds}
    if bench:
        # Timed before and after the store is written, and averaged, so that a change in machine load
        # during the run does not land on one side of the ratio only.
        bare_after = bare_forward_seconds(run.obfuscator, source, first * shard_size, n_bench, batch_size, dev)
        result["bare_images"] = n_bench
        result["bare_seconds"] = (bare_before[0] + bare_after[0]) / 2
        result["bare_cpu_seconds"] = (bare_before[1] + bare_after[1]) / 2
    return result


def _check_representable(features: torch.Tensor, dtype: str, data: str, start: int) -> None:
    """One reduction catches NaN, inf and values the store's dtype cannot hold (NaN fails every comparison)."""
    limit = torch.finfo(DTYPES[dtype]).max
    if not features.abs().amax() <= limit:
        raise StoreError(f"--data {data}: features of items {start}.. are not finite or exceed {dtype}'s range ({limit:g}); "
                         f"a damaged run, or use --dtype float32")


@torch.inference_mode()
def bare_forward_seconds(obfuscator: torch.nn.Module, source: Source, start: int, n: int, batch_size: int, device: torch.device) -> tuple[float, float]:
    """Wall and CPU seconds of the obfuscator's forward pass alone over n items from `start`, each batch already on the device."""
    wall = cpu = 0.0
    for s in range(start, start + n, batch_size):
        x = to_float(source.read(s, min(start + n, s + batch_size)).to(device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        obfuscator(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall, cpu = wall + time.perf_counter() - t0, cpu + time.process_time() - c0
    return wall, cpu


def iter_shards(store: str | Path, manifest: dict):  # noqa: ANN201
    """Yield each shard's tensors in order, each checked against the manifest."""
    for i in range(len(manifest["shards"])):
        yield read_shard(Path(store), manifest, i)
