"""The feature store: obfuscated feature maps in safetensors shards, a manifest, and verify.

Why it exists (paper, Introduction): images may not be kept, but an obfuscated representation
may. `obfuscate` runs images through a run's frozen obfuscator and keeps only what comes out:

    STORE/manifest.json            what the store holds and how to check it (below)
    STORE/shard-00000.safetensors  features  N x C x H x W   float16 by default (the obfuscator's output)
                                   labels    N               int64
                                   ids       N x 16          uint8, a random opaque id per item
    STORE/shard-00001.safetensors  ...

No pixels and no file names or paths are stored: an item is known by a random 128-bit id (the
optional id map, kept outside the store, says which source item got which id: idmap.py).
The manifest records the store's own random id, the obfuscator's fingerprint (sha256 of its
weights), Veil's version, the dataset's name and class names, the count, byte size and sha256 of
every shard in item order, the sha256 of the label sequence, and the erasure log (erase.py).

STORE may be a local folder or any fsspec URL (location.py). Every change follows one rule: new
shards are written under new names, never over a listed one, and the manifest is replaced last.
A reader therefore sees the old store or the new one, whole. Shards that a change is writing are
named in the manifest's `pending` list first, and shards it replaced stay in `retired` until they
are deleted; verify ignores those two kinds of unlisted file (any other is reported), and the
next erase or append deletes them.

Writing is resumable from the first byte: a new store's manifest is written before its first
shard (`"complete": false`, no shards listed, every shard to come in `pending`); each shard is
then written and the manifest replaced to list it. A kill leaves at worst a temporary file or a
pending shard the manifest does not list; running the same command again checks the listed shards,
deletes the rest and writes them again. Memory holds one shard of features (`shard_size` items)
and one batch at a time.

One writer at a time: every change holds the store's lock (location.writer_lock), so two changes
never pick the same new shard name or delete each other's files. SIGTERM or Ctrl-C during a
change is noted (StopSignals) and acted on at the change's next safe point: after a whole shard of
a new store, or before an erase or append commits (after the commit it is finished first).

`items_sha256` (of the store's first items, and of each append) is the sha256 of the stored
features and labels of those items, in order: appending exactly the same items again is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from tqdm.auto import tqdm

from veil.errors import StoreError
from veil.store.location import Location, exists, is_folder, locate, names, read_bytes, remove, where, write_bytes

FORMAT = "veil-store"
FORMAT_VERSION = 2  # 2: store id, non-consecutive shard names (erase, append), pending/retired, erasure log
READS_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
ID_BYTES = 16  # 128-bit random ids: opaque, and collisions are out of the question
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# A quantising obfuscator's (model.feature_bits) features are stored as their integer codes, b bits in
# the smallest integer type that holds them; read_shard turns them back into the values f gave.
CODES = {"uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32}
STORED_DTYPES = {**DTYPES, **CODES}  # what a shard's features may hold
SHARD_NAME = re.compile(r"shard-(\d{5,})\.safetensors")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------- manifest


def update_items_digest(digest, features: torch.Tensor, labels: torch.Tensor) -> None:  # noqa: ANN001
    """Feed a shard's stored features (their bytes, any dtype) and labels into an items_sha256 digest."""
    digest.update(features.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(labels.to(torch.int64).numpy().tobytes())


def labels_digest(labels: torch.Tensor) -> str:
    """sha256 of the label sequence: a rerun must see the same items in the same order."""
    return hashlib.sha256(labels.to(torch.int64).numpy().tobytes()).hexdigest()


def read_manifest(store: str | Path | Location) -> dict:
    loc = locate(store)
    path = where(loc, MANIFEST)
    if not is_folder(loc):
        raise StoreError(f"store not found: {loc.url}")
    try:
        text = read_bytes(loc, MANIFEST).decode()
        manifest = json.loads(text)
    except FileNotFoundError:
        raise StoreError(f"{loc.url}: not a Veil store (no {MANIFEST})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path}: damaged ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{path}: not a Veil store manifest (format should be '{FORMAT}')")
    if manifest.get("format_version") not in READS_VERSIONS:
        raise StoreError(f"{path}: store format version {manifest.get('format_version')}, this Veil reads versions {', '.join(map(str, READS_VERSIONS))}")
    required = ("veil_version", "obfuscator", "dataset", "features", "shard_size", "count", "labels_sha256", "shards", "complete")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise StoreError(f"{path}: missing fields {', '.join(missing)}")
    for key in ("erasures", "appends", "pending", "retired"):  # version 1 has none of these
        manifest.setdefault(key, [])
    return manifest


def write_manifest(loc: Location, manifest: dict) -> None:
    """The commit point of every change: atomic locally, one whole upload on an object store."""
    write_bytes(loc, MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def erased_ids(manifest: dict) -> dict[str, str]:
    """Every id in the erasure log -> when it was erased (UTC)."""
    return {i: entry["utc"] for entry in manifest["erasures"] for i in entry["ids"]}


def id_hex(ids: torch.Tensor) -> list[str]:
    """N x 16 uint8 ids -> N hex strings."""
    return [row.tobytes().hex() for row in ids.numpy()]


# ----------------------------------------------------------------------------- reading and verifying


def read_shard(store: str | Path | Location, manifest: dict, index: int, decode: bool = True) -> dict[str, torch.Tensor]:
    """One shard, checked against the manifest (size, sha256, tensor shapes) before it is used.
    decode=False keeps a quantised store's integer codes as stored (to rewrite them bit for bit)."""
    loc = locate(store)
    entry = manifest["shards"][index]
    path = where(loc, entry["file"])
    try:
        data = read_bytes(loc, entry["file"])
    except FileNotFoundError:
        raise StoreError(f"{path}: shard missing (the manifest lists it with {entry['count']} items)") from None
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
    if bits and decode:  # integer codes -> the values in [0, 1] the obfuscator gave
        tensors["features"] = tensors["features"].float() / (2**bits - 1)
    return tensors


def check_fingerprint(manifest: dict, fingerprint: str, where: str, against: str) -> None:
    if manifest["obfuscator"]["fingerprint"] != fingerprint:
        raise StoreError(
            f"{where}: made by obfuscator {manifest['obfuscator']['fingerprint'][:16]}..., but {against} has obfuscator "
            f"{fingerprint[:16]}...; features from another obfuscator mean nothing to it"
        )


def check_complete(loc: Location, manifest: dict) -> None:
    if not manifest["complete"]:
        done = sum(s["count"] for s in manifest["shards"])
        raise StoreError(f"{loc.url}: incomplete ({done} of {manifest['count']} items written; `veil obfuscate` was interrupted); run the same command again to finish it")


def check_listing(loc: Location, manifest: dict) -> None:
    """Shard names well formed and listed once; every other shard file in the folder one that a change
    is writing (`pending`) or has replaced (`retired`), left by a kill: those are ignored."""
    listed = [s["file"] for s in manifest["shards"]]
    for name in listed + manifest["pending"] + manifest["retired"]:
        if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
            raise StoreError(f"{where(loc, MANIFEST)}: '{name}' is not a shard file name (shard-NNNNN.safetensors)")
    if len(set(listed)) != len(listed):
        raise StoreError(f"{where(loc, MANIFEST)}: a shard is listed twice")
    known = set(listed) | set(manifest["pending"]) | set(manifest["retired"])
    strays = [n for n in names(loc) if SHARD_NAME.fullmatch(n) and n not in known]
    if strays:
        raise StoreError(f"{where(loc, strays[0])}: not listed in the manifest (left by an interrupted run, or added later)")


def check_counts(loc: Location, manifest: dict) -> None:
    """What the manifest alone can say: a class list, whole item counts, and a total that is their sum."""
    path = where(loc, MANIFEST)
    classes = manifest["dataset"].get("classes") if isinstance(manifest["dataset"], dict) else None
    if not isinstance(classes, list) or not classes:
        raise StoreError(f"{path}: dataset.classes should be a list of class names, got {classes!r}")
    counts = [s.get("count") if isinstance(s, dict) else None for s in manifest["shards"]]
    if not all(isinstance(c, int) and c >= 0 for c in counts):
        raise StoreError(f"{path}: every shard's count should be a whole number >= 0, got {next(c for c in counts if not isinstance(c, int) or c < 0)!r}")
    if sum(counts) != manifest["count"]:
        raise StoreError(f"{path}: count is {manifest['count']} but its shards list {sum(counts)} items")


def check_label_range(loc: Location, manifest: dict, index: int, labels: torch.Tensor) -> None:
    """A shard's labels must index the store's classes."""
    n_classes = len(manifest["dataset"]["classes"])
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise StoreError(f"{where(loc, manifest['shards'][index]['file'])}: labels must be in 0..{n_classes - 1}, "
                         f"found {labels.min().item()}..{labels.max().item()}")


def checked_shards(loc: Location, manifest: dict, progress: bool = False, decode: bool = True):  # noqa: ANN201
    """Yield (index, tensors) of every shard, each checked (read_shard; labels in range; no erased id);
    once the last is read, check the total count and the labels' sha256 against the manifest."""
    digest, count = hashlib.sha256(), 0
    erased = erased_ids(manifest)
    for i in tqdm(range(len(manifest["shards"])), desc="verify", disable=not progress, leave=False):
        shard = read_shard(loc, manifest, i, decode)  # one shard at a time: memory stays bounded
        labels, path = shard["labels"], where(loc, manifest["shards"][i]["file"])
        digest.update(labels.numpy().tobytes())
        count += len(labels)
        check_label_range(loc, manifest, i, labels)
        if erased:
            back = [i for i in id_hex(shard["ids"]) if i in erased]
            if back:
                raise StoreError(f"{path}: holds id {back[0]}, which the erasure log says was erased on {erased[back[0]]}")
        yield i, shard
    if count != manifest["count"]:
        raise StoreError(f"{where(loc, MANIFEST)}: count is {manifest['count']} but the shards hold {count} items")
    if digest.hexdigest() != manifest["labels_sha256"]:
        raise StoreError(f"{where(loc, MANIFEST)}: labels_sha256 does not match the labels in the shards")


def verify(store: str | Path | Location, fingerprint: str | None = None, progress: bool = False) -> dict:
    """Recompute every checksum and check the manifest; raise StoreError naming the first bad file."""
    loc = locate(store)
    manifest = read_manifest(loc)
    if fingerprint is not None:
        check_fingerprint(manifest, fingerprint, loc.url, "this run")
    check_complete(loc, manifest)
    check_listing(loc, manifest)
    for _ in checked_shards(loc, manifest, progress):
        pass
    return manifest


def leftovers(store: str | Path | Location, manifest: dict) -> list[str]:
    """Files an interrupted change left (pending or retired shards, temporary files) that are still there."""
    loc = locate(store)
    present = set(names(loc))
    return sorted(n for n in present if n in set(manifest["pending"]) | set(manifest["retired"]) or (n.startswith(".") and n.endswith(".tmp")))


def remove_leftovers(loc: Location, manifest: dict) -> int:
    """Delete what an interrupted change left; the caller's next manifest drops the pending and retired lists."""
    found = leftovers(loc, manifest)
    for name in found:
        remove(loc, name)
    return len(found)


def next_shard_index(loc: Location, manifest: dict) -> int:
    """A shard number no listed, pending, retired or present file has used: names are never reused while a file may hold them."""
    used = [s["file"] for s in manifest["shards"]] + manifest["pending"] + manifest["retired"] + names(loc)
    return 1 + max((int(m.group(1)) for n in used if (m := SHARD_NAME.fullmatch(n))), default=-1)


def store_bytes(store: str | Path | Location, manifest: dict) -> int:
    loc = locate(store)
    return sum(s["bytes"] for s in manifest["shards"]) + len(read_bytes(loc, MANIFEST))


def iter_shards(store: str | Path | Location, manifest: dict):  # noqa: ANN201
    """Yield each shard's tensors in order, each checked against the manifest."""
    for i in range(len(manifest["shards"])):
        yield read_shard(store, manifest, i)


# ----------------------------------------------------------------------------- writing


def write_shard(loc: Location, name: str, tensors: dict[str, torch.Tensor], index: int) -> dict:
    """One shard under a new name (atomically where the backend can); returns its manifest entry.
    A name already taken is refused: a shard is never written over (the writer's lock keeps names apart)."""
    if exists(loc, name):
        raise StoreError(f"{where(loc, name)}: already exists; a new shard never replaces a file (is another program writing to the store?)")
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata={"format": FORMAT, "shard": str(index)})
    write_bytes(loc, name, data)
    return {"file": name, "count": len(tensors["labels"]), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def new_ids(n: int) -> torch.Tensor:
    """n random 128-bit ids (N x 16 uint8)."""
    return torch.frombuffer(bytearray(secrets.token_bytes(ID_BYTES * n)), dtype=torch.uint8).reshape(n, ID_BYTES)


