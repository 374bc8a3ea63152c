"""`veil obfuscate`: images (a run's splits, a named dataset, an npz or a folder) through a run's frozen
obfuscator into a new store, or appended to one. The format it writes is format.py's."""


from __future__ import annotations

import dataclasses
import hashlib
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from veil.client.onnxfile import Client, read_client
from veil.config import DataConfig
from veil.data import IMAGE_SUFFIXES, DataError, ImageSet, check_labels, load_splits, read_named, read_npz, to_float, to_tensor_images
from veil.errors import StoreError
from veil.models.obfuscator import code_dtype, feature_shape, identity, quantised_bits
from veil.rundir import load_run
from veil.runtime import resolve_device
from veil.signals import StopSignals
from veil.store import idmap
from veil.store.format import (
    CODES,
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SHARD_NAME,
    STORED_DTYPES,
    check_complete,
    check_fingerprint,
    check_listing,
    checked_shards,
    id_hex,
    labels_digest,
    new_ids,
    next_shard_index,
    read_manifest,
    read_shard,
    remove_leftovers,
    shard_name,
    store_bytes,
    update_items_digest,
    utc_now,
    write_manifest,
    write_shard,
)
from veil.store.location import LOCK, Location, exists, locate, make_folder, names, remove, writer_lock
from veil.train import Stopped
from veil.version import __version__

# ----------------------------------------------------------------------------- sources

NAMED = ("mnist", "fashion-mnist", "cifar10", "cifar100")
# later: training images in neither defender nor attacker (data.n_later); validation: test images not among the users' (data.n_test)
SPLITS = ("all", "defender", "attacker", "test", "later", "validation")
SPEC_HELP = (
    "SOURCE[:SPLIT], SOURCE = run | mnist | fashion-mnist | cifar10 | cifar100 | npz:FILE.npz | folder:DIR, "
    "SPLIT = all | defender | attacker | test | later | validation (e.g. cifar10:test, run:test, npz:demo/cifar10-2k.npz, folder:photos/)"
)
IDENTITY = ("format", "obfuscator", "dataset", "features", "shard_size", "count", "labels_sha256")  # what a resumed run must match


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
    files: list[str] | None = None  # an image folder's files, in item order (only for the id map, never stored)

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


def _relative(path: Path) -> str:
    """What a relative path that was not found is relative to."""
    return "" if path.is_absolute() else f" (relative to the working directory, {Path.cwd()})"


def folder_source(path: Path, image_size: int) -> Source:
    """One sub-folder per class, decoded batch by batch (the files are listed, never all held)."""
    if not path.is_dir():
        raise DataError(f"image folder not found: {path}{_relative(path)}")
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

    return Source("folder", "all", [d.name for d in class_dirs], torch.tensor(labels, dtype=torch.long), 1 if mode == "L" else 3, read,
                  [str(f) for f in files])


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
            raise DataError(f"--data: .npz file not found: {path}{_relative(path)}")
        images, labels, classes = read_npz(path, Path(data.cache_dir) if data.cache_dir else None)
    else:  # a named dataset: every image, the official train split then the test split
        tr_images, tr_labels, classes = read_named(data, train=True)
        te_images, te_labels, _ = read_named(data, train=False)
        images, labels = np.concatenate([tr_images, te_images]), np.concatenate([tr_labels, te_labels])
    return in_memory_source(ImageSet(to_tensor_images(images, data.image_size, name), torch.from_numpy(labels), classes), name, "all")


# ----------------------------------------------------------------------------- writing


def _new_manifest(source: Source, identity: dict, shape: tuple[int, ...], dtype: str, bits: int, shard_size: int) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "veil_version": __version__,
        "store_id": secrets.token_hex(16),  # names this store to its id maps; says nothing about its items
        "created_utc": utc_now(),
        "obfuscator": identity,
        "dataset": {"name": source.name, "split": source.split, "classes": list(source.classes)},
        "features": {"shape": list(shape), "dtype": dtype, **({"bits": bits} if dtype in CODES else {})},
        "shard_size": shard_size,
        "count": len(source),
        "labels_sha256": labels_digest(source.labels),
        "shards": [],
        "complete": False,
        "erasures": [],  # [{"utc": ..., "ids": [hex, ...]}]: ids only (erase.py)
        "appends": [],  # [{"utc": ..., "dataset": {...}, "count": n}]
        "pending": [],
        "retired": [],
    }


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


def _resume_point(loc: Location, manifest: dict, digest, log) -> list[str]:  # noqa: ANN001
    """Check the shards an interrupted run listed (their items go into `digest`) and return their ids (hex), which an
    id map keeps; delete every other shard and temporary file in the folder: the interrupted run's unfinished work
    (it held the store's lock, so they are nobody else's)."""
    ids: list[str] = []
    for i in range(len(manifest["shards"])):
        shard = read_shard(loc, manifest, i, decode=False)
        update_items_digest(digest, shard["features"], shard["labels"])
        ids += id_hex(shard["ids"])
    listed = {s["file"] for s in manifest["shards"]}
    for name in names(loc):
        if (SHARD_NAME.fullmatch(name) and name not in listed) or (name.startswith(".") and name.endswith(".tmp")):
            remove(loc, name)
    log(f"resuming {loc.url}: {len(manifest['shards'])} shards ({len(ids)} of {manifest['count']} items) checked and kept")
    return ids


@dataclass
class Encoder:
    """What turns a source's items into stored features: a run's obfuscator (on `device`) or a client file
    (onnxruntime, veil.client), and how its output is kept."""

    obfuscator: torch.nn.Module | None  # None: `client` encodes
    device: torch.device
    shape: tuple[int, ...]  # C x H x W
    dtype: str  # a key of STORED_DTYPES
    bits: int  # > 0: a quantising obfuscator, stored as its integer codes
    batch_size: int
    data: str  # the --data spec, for messages
    client: Client | None = None  # its output is already what the store keeps
    against: str = ""  # --run RUN or --client FILE, for messages


def encode(enc: Encoder, source: Source, a: int, b: int, bar) -> torch.Tensor:  # noqa: ANN001
    """Items [a, b) of the source -> their stored features, (b - a) x C x H x W, batch by batch."""
    stored = STORED_DTYPES[enc.dtype]
    features = torch.empty((b - a, *enc.shape), dtype=stored)  # one shard, filled batch by batch
    for s in range(a, b, enc.batch_size):
        e = min(b, s + enc.batch_size)
        if enc.client is not None:
            out_batch = enc.client.run(source.read(s, e))
        else:
            out_batch = enc.obfuscator(to_float(source.read(s, e).to(enc.device)))  # N x C x H x W
            if enc.dtype in CODES:
                out_batch = torch.round(out_batch * (2**enc.bits - 1))  # the codes, exactly
        if enc.dtype not in CODES:
            _check_representable(out_batch, enc.dtype, enc.data, s)
        features[s - a : e - a] = out_batch.to(stored).cpu()
        bar.update(e - s)
    return features


def item_names(source: Source, data: str, a: int, b: int) -> list[str]:
    """What the id map calls items [a, b): an image folder's file paths, else `SPEC#INDEX` (index in the source as read)."""
    return source.files[a:b] if source.files is not None else [f"{data}#{i}" for i in range(a, b)]


@dataclass
class Origin:
    """Where a store's features come from: a run's obfuscator, or a client file (veil export)."""

    against: str  # --run RUN or --client FILE, for messages
    identity: dict  # the manifest's `obfuscator` section
    data: DataConfig  # how the run drew its splits (a client keeps them, less every path)
    seed: int
    channels: int
    bits: int
    shape: tuple[int, ...]  # C x H x W
    dtype: str  # how the features are kept by default
    device: torch.device
    obfuscator: torch.nn.Module | None = None
    client: Client | None = None


def run_origin(run_dir: str | Path, device: str, log) -> Origin:  # noqa: ANN001
    dev = resolve_device(device)
    run = load_run(run_dir, dev)
    if not run.summary:
        log(f"note: {run_dir} has not finished training; its latest checkpoint is used")
    m, bits = run.config.model, quantised_bits(run.obfuscator)
    shape = feature_shape(run.channels, run.config.data.image_size, m.width, m.split, run.obfuscator.out_channels)
    return Origin(f"--run {run_dir}", identity(run.obfuscator, run.config.data.image_size), run.config.data, run.config.seed, run.channels,
                  bits, shape, code_dtype(bits), dev, obfuscator=run.obfuscator)


def client_origin(path: str | Path, spec: DataSpec, dtype: str) -> Origin:
    c = read_client(path)
    if spec.kind == "run":
        raise DataError(f"--data run:{spec.split}: a client holds no run to read splits from; name the data instead (e.g. cifar10:test, npz:FILE.npz:test)")
    features, known = c.meta["veil_features"], {f.name for f in dataclasses.fields(DataConfig)}
    if dtype not in ("auto", features["dtype"]):
        raise StoreError(f"--dtype {dtype}: client {path} outputs {features['dtype']}, which is what the store keeps; leave --dtype at auto")
    identity = c.meta["veil_obfuscator"] | {"fingerprint": c.fingerprint}
    return Origin(f"--client {path}", identity, DataConfig(**{k: v for k, v in c.meta["veil_data"].items() if k in known}), c.meta["veil_seed"],
                  identity["in_channels"], identity["feature_bits"], tuple(features["shape"]), features["dtype"], torch.device("cpu"), client=c)


def obfuscate(
    run_dir: str | Path | None, data: str, out: str | Path | None = None, dtype: str = "auto", shard_size: int = 4096, batch_size: int = 500,
    name: str = "", device: str = "auto", progress: bool = True, bench: bool = False, append: str | Path | None = None,
    id_map: str | Path | None = None, log=print, client: str | Path | None = None,  # noqa: ANN001
) -> dict:
    """Images -> a new store at `out` (resuming an interrupted one), or added to the store `append`. Returns counts and timings.
    The features come from a run's obfuscator (`run_dir`) or from a client file (`client`, veil export: onnxruntime,
    no PyTorch weights); a store made either way records the same fingerprint, so the two mix.
    dtype auto: a quantising obfuscator's integer codes, else float16. id_map: a file outside the store that
    records which source item got which id (idmap.py)."""
    if (out is None) == (append is None):
        raise StoreError("give --out STORE (a new store) or --append STORE (add to one), not both")
    if (run_dir is None) == (client is None):
        raise StoreError("give --run RUN (a run's obfuscator) or --client FILE.onnx (an exported one), not both")
    if dtype not in ("auto", *DTYPES):
        raise StoreError(f"--dtype must be one of auto, {', '.join(DTYPES)}, got '{dtype}'")
    if shard_size < 1 or batch_size < 1:
        raise StoreError(f"--shard-size and --batch-size must be >= 1, got {shard_size} and {batch_size}")
    if bench and client is not None:
        raise StoreError("--bench times the PyTorch obfuscator of --run; a client's speed is measured by benchmarks/client_speed.py")
    loc = locate(out if append is None else append)
    if id_map is not None:
        idmap.check_outside(id_map, loc)
    old = read_manifest(loc) if append is not None else None  # before the run and the images are read: a bad store fails fast
    spec = parse_spec(data)
    origin = client_origin(client, spec, dtype) if client is not None else run_origin(run_dir, device, log)
    if old is not None:
        check_fingerprint(old, origin.identity["fingerprint"], loc.url, origin.against)
    t0 = time.perf_counter()
    source = open_source(spec, origin.data, origin.seed, name)
    open_seconds = time.perf_counter() - t0  # reading (and for named data, decoding) the images held in memory
    if source.channels != origin.channels:
        raise DataError(f"--data {data}: images have {source.channels} channel(s), the obfuscator of {origin.against.split(' ', 1)[1]} takes {origin.channels}")
    if len(source) == 0:
        raise DataError(f"--data {data}: no images")
    check_labels(source.labels.numpy(), source.classes, f"--data {data}")  # a store's labels are class indices, as verify checks
    dtype = origin.dtype if dtype == "auto" else dtype
    manifest = _new_manifest(source, origin.identity, origin.shape, dtype, origin.bits, shard_size)
    enc = Encoder(origin.obfuscator, origin.device, origin.shape, dtype, origin.bits, batch_size, data, origin.client, origin.against)
    if old is not None:
        return _append(loc, manifest, enc, source, data, id_map, progress, log) | {"open_seconds": open_seconds}
    make_folder(loc)
    with writer_lock(loc, "veil obfuscate"), StopSignals() as stop:
        return _create(loc, manifest, enc, source, data, id_map, progress, log, stop, bench, open_seconds)


def _create(loc: Location, manifest: dict, enc: Encoder, source: Source, data: str, id_map: str | Path | None, progress: bool, log,  # noqa: ANN001
            stop: StopSignals, bench: bool, open_seconds: float) -> dict:
    """Write a new store, or finish an interrupted one; the caller holds the store's lock."""
    shard_size, n_shards = manifest["shard_size"], -(-len(source) // manifest["shard_size"])
    first, kept_ids, resumed = 0, [], exists(loc, MANIFEST)
    digest = hashlib.sha256()  # items_sha256 of the store's items, shard by shard
    if resumed:
        old = read_manifest(loc)
        diff = _describe_difference({k: old.get(k) for k in IDENTITY}, {k: manifest.get(k) for k in IDENTITY})
        if diff:
            raise StoreError(f"{loc.url} already holds another store ({diff}); choose another --out")
        if old["complete"]:
            log(f"{loc.url} is already complete ({old['count']} items); nothing to do")
            return {"items": old["count"], "written": 0, "shards": len(old["shards"]), "bytes": store_bytes(loc, old), "seconds": 0.0}
        manifest = {**old, "pending": [shard_name(k) for k in range(len(old["shards"]), n_shards)], "retired": []}
        kept_ids = _resume_point(loc, manifest, digest, log)
        first = len(manifest["shards"])
    else:
        foreign = [n for n in names(loc) if n != LOCK and not (n.startswith(f".{MANIFEST}.") and n.endswith(".tmp"))]
        if foreign:
            raise StoreError(f"{loc.url}: exists, is not empty and holds no {MANIFEST}; choose another --out")
        for n in names(loc):  # a kill during the very first manifest write leaves only its temporary file
            if n != LOCK:
                remove(loc, n)
        manifest = {**manifest, "pending": [shard_name(k) for k in range(n_shards)]}
    if id_map is not None:
        if "store_id" not in manifest:
            raise StoreError(f"{loc.url}: made by an older Veil (store format 1, no store id); an id map needs a store made by this version")
        if resumed:
            idmap.check_covers(id_map, manifest, kept_ids)
        else:
            idmap.check_new(id_map)
    write_manifest(loc, manifest)  # before the first shard (on resume, naming the shards still to come): a kill from here on is resumable
    if id_map is not None:
        idmap.start(id_map, manifest, kept_ids, resume=resumed)

    n_bench = min(len(source) - first * shard_size, shard_size)  # one shard's worth: memory stays bounded
    bare_before = bare_forward_seconds(enc.obfuscator, source, first * shard_size, n_bench, enc.batch_size, enc.device) if bench else None
    start_time, start_cpu = time.perf_counter(), time.process_time()
    written = 0
    with torch.inference_mode(), tqdm(total=len(source), initial=first * shard_size, desc="obfuscate", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for index in range(first, n_shards):
            a, b = index * shard_size, min(len(source), (index + 1) * shard_size)
            features, ids, labels = encode(enc, source, a, b, bar), new_ids(b - a), source.labels[a:b].clone()
            entry = write_shard(loc, shard_name(index), {"features": features, "labels": labels, "ids": ids}, index)
            update_items_digest(digest, features, labels)
            if id_map is not None:
                idmap.add(id_map, id_hex(ids), item_names(source, data, a, b))  # before the manifest lists the items
            manifest["shards"].append(entry)
            manifest["pending"] = manifest["pending"][1:]
            manifest["complete"] = index + 1 == n_shards
            if manifest["complete"]:
                manifest["items_sha256"] = digest.hexdigest()
            write_manifest(loc, manifest)  # after the shard: a listed shard is always whole
            written += b - a
            if stop.signum and manifest["complete"]:
                log(f"signal {stop.signum} arrived while the last shard was written; {loc.url} is complete")
            elif stop.signum:
                raise Stopped(f"stopped after shard {index + 1} of {n_shards} ({b} of {len(source)} items written to {loc.url}); "
                              f"run the same command again to finish it", stop.signum)
    seconds, cpu_seconds = time.perf_counter() - start_time, time.process_time() - start_cpu
    result = {"items": len(source), "written": written, "shards": n_shards, "bytes": store_bytes(loc, manifest),
              "seconds": seconds, "cpu_seconds": cpu_seconds, "open_seconds": open_seconds}
    if bench:
        # Timed before and after the store is written, and averaged, so that a change in machine load
        # during the run does not land on one side of the ratio only.
        bare_after = bare_forward_seconds(enc.obfuscator, source, first * shard_size, n_bench, enc.batch_size, enc.device)
        result["bare_images"] = n_bench
        result["bare_seconds"] = (bare_before[0] + bare_after[0]) / 2
        result["bare_cpu_seconds"] = (bare_before[1] + bare_after[1]) / 2
    return result


def _append(loc: Location, new: dict, enc: Encoder, source: Source, data: str, id_map: str | Path | None, progress: bool, log) -> dict:  # noqa: ANN001
    """Add a source's items to a complete store as new shards, holding its lock; the manifest, replaced last, lists them."""
    with writer_lock(loc, "veil obfuscate --append"), StopSignals() as stop:
        old = read_manifest(loc)  # again, under the lock: the store as it is now
        check_fingerprint(old, new["obfuscator"]["fingerprint"], loc.url, enc.against)
        check_complete(loc, old)
        for key, what in (("features", "feature shape and dtype"), ("dataset", "classes")):
            a, b = old[key], new[key]
            if key == "dataset":
                a, b = a["classes"], b["classes"]
            if a != b:
                raise StoreError(f"{loc.url}: {what} {a} differ from what --data {data} gives with {enc.against} ({b}); items appended must match")
        check_listing(loc, old)
        if id_map is not None and "store_id" not in old:
            raise StoreError(f"{loc.url}: made by an older Veil (store format 1, no store id); an id map needs a store made by this version")
        labels, ids = [], []
        for _, shard in checked_shards(loc, old, progress):  # the whole store checked before anything is added
            labels.append(shard["labels"])
            ids += id_hex(shard["ids"])
        if id_map is not None:
            idmap.start(id_map, old, ids, resume=True)  # this store's earlier entries are kept (if the file has them)
        remove_leftovers(loc, old)
        old = {**old, "pending": [], "retired": []}
        first, size = next_shard_index(loc, old), old["shard_size"]
        n_new = -(-len(source) // size)
        write_manifest(loc, {**old, "pending": [shard_name(first + k) for k in range(n_new)]})  # the old store, naming the shards about to be written
        start, entries, digest = time.perf_counter(), [], hashlib.sha256()

        def undo(error: Exception) -> None:
            """Raise `error` with the store as it was: the new shards deleted, the manifest without them, the id map without their lines."""
            for entry in entries:
                remove(loc, entry["file"])
            write_manifest(loc, old)
            if id_map is not None:
                idmap.start(id_map, old, ids, resume=True)
            raise error

        with torch.inference_mode(), tqdm(total=len(source), desc="append", unit="img", disable=not progress, dynamic_ncols=True) as bar:
            for k in range(n_new):
                a, b = k * size, min(len(source), (k + 1) * size)
                features, new_id, new_labels = encode(enc, source, a, b, bar), new_ids(b - a), source.labels[a:b].clone()
                entries.append(write_shard(loc, shard_name(first + k), {"features": features, "labels": new_labels, "ids": new_id}, first + k))
                update_items_digest(digest, features, new_labels)
                if id_map is not None:
                    idmap.add(id_map, id_hex(new_id), item_names(source, data, a, b))
                if stop.signum:
                    undo(Stopped(f"stopped before the append was committed: {loc.url} is as it was; run the same command again", stop.signum))
        before = [("the store's first items", old.get("items_sha256"))] + [(f"the items appended on {e['utc']}", e.get("items_sha256")) for e in old["appends"]]
        repeat = next((what for what, d in before if d == digest.hexdigest()), None)
        if repeat:
            undo(StoreError(f"--data {data}: these {len(source)} items are exactly {repeat} of {loc.url}; appending them again would store "
                            f"each twice (nothing was added)"))
        manifest = {
            **old, "veil_version": __version__, "format_version": FORMAT_VERSION,
            "shards": old["shards"] + entries, "count": old["count"] + len(source),
            "labels_sha256": labels_digest(torch.cat([*labels, source.labels])),
            "appends": old["appends"] + [{"utc": utc_now(), "dataset": {k: new["dataset"][k] for k in ("name", "split")}, "count": len(source),
                                          "items_sha256": digest.hexdigest()}],
            "pending": [], "retired": [],
        }
        write_manifest(loc, manifest)  # the commit: the new store
    seconds = time.perf_counter() - start
    if stop.signum:
        log(f"signal {stop.signum} arrived after the append was committed; it was finished first")
    log(f"appended {len(source)} items to {loc.url} as {n_new} new shards ({manifest['count']} items now)")
    return {"items": manifest["count"], "written": len(source), "shards": len(manifest["shards"]), "bytes": store_bytes(loc, manifest),
            "seconds": seconds, "cpu_seconds": seconds}


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
