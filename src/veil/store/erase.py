"""Erasing items from a store on request (GDPR Art. 17), with a log that an audit can check.

    erase(store, ids)      -> the items with those ids are gone; every other item is kept bit for bit

Only the shards that hold an erased item are rewritten, each as a new shard under a new name;
then the manifest is replaced (the commit), then the old shards are deleted:

    1. manifest: the old store, with the new shards' names in `pending`
    2. each rewritten shard written (locally: a temporary name, then renamed)
    3. manifest: the new shard list, count, labels' sha256, the erasure log entry, the old shards in `retired`
    4. the retired shards deleted; manifest: `retired` emptied

A kill at any point leaves the old store (before 3) or the new one (from 3 on), and `veil verify`
passes on either: unlisted files are pending or retired ones, which verify ignores. Until step 4
has run, a retired shard still holds the erased items on disk; running the same erase again
(its ids are then reported as already erased) or any later erase or append deletes them.

The erasure log is the manifest's `erasures` list: when (UTC) and which ids, nothing else. It
lives in the manifest so that it is committed in the same atomic write as the shards that no
longer hold those ids (a separate file could disagree with the store after a kill); verify checks
that no shard holds a logged id.

An erase holds the store's lock (location.writer_lock): a second change started meanwhile is refused.
SIGTERM or Ctrl-C before step 3 stops it with the store unchanged (what step 2 wrote stays pending,
for the next change to delete); from step 3 on the erase is finished first.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import torch

from veil.errors import StoreError
from veil.signals import StopSignals
from veil.store import idmap
from veil.store.format import (
    FORMAT_VERSION,
    check_complete,
    check_listing,
    checked_shards,
    erased_ids,
    id_hex,
    labels_digest,
    next_shard_index,
    read_manifest,
    read_shard,
    remove_leftovers,
    shard_name,
    utc_now,
    write_manifest,
    write_shard,
)
from veil.store.location import Location, locate, remove, writer_lock
from veil.train import Stopped
from veil.version import __version__

ID_HEX = re.compile(r"[0-9a-f]{32}")


def parse_ids(args: list[str]) -> list[str]:
    """Each argument is an id (32 hex digits) or a file of ids, one per line (blank lines and # comments skipped)."""
    ids = []
    for arg in args:
        if ID_HEX.fullmatch(arg.lower()):
            ids.append(arg.lower())
            continue
        path = Path(arg)
        if not path.is_file():
            raise StoreError(f"--ids {arg!r}: neither an id (32 hex digits) nor a file of ids")
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            line = line.split("#", 1)[0].strip().lower()
            if line and not ID_HEX.fullmatch(line):
                raise StoreError(f"{path}: line {n}: {line[:40]!r} is not an id (32 hex digits)")
            if line:
                ids.append(line)
    return ids


def erase(store: str | Path | Location, ids: list[str] = (), id_map: str | Path | None = None, items: list[str] = (),
          progress: bool = False, log=print) -> dict:  # noqa: ANN001
    """Remove the items with these ids (and those the id map gives for `items`) from the store, holding its lock.
    An id that the store never held is an error and nothing is changed; one already erased is reported.
    SIGTERM / Ctrl-C before the commit stops with the store unchanged; after it, the erase is finished first."""
    loc = locate(store)
    with writer_lock(loc, "veil erase"), StopSignals() as stop:
        result = _erase(loc, ids, id_map, items, progress, log, stop)
    if result["stale"]:
        log(f"{len(result['stale'])} id-map line(s) named items that were never stored (left by an interrupted obfuscate or append); "
            f"removed from {id_map}")
    if stop.signum:
        log(f"signal {stop.signum} arrived after the erasure was committed; it was finished first")
    return result


def _erase(loc: Location, ids: list[str], id_map: str | Path | None, items: list[str], progress: bool, log, stop: StopSignals) -> dict:  # noqa: ANN001
    manifest = read_manifest(loc)
    check_complete(loc, manifest)
    check_listing(loc, manifest)
    wanted = list(dict.fromkeys(i.lower() for i in ids))
    map_entries, from_map = None, set()
    if id_map is not None:
        idmap.check_outside(id_map, loc)
        head, map_entries = idmap.read(id_map)
        idmap.check_store(id_map, head, manifest, loc.url)
        from_map = set(idmap.resolve(id_map, map_entries, list(items))) - set(wanted)
        wanted = list(dict.fromkeys(wanted + sorted(from_map)))
    elif items:
        raise StoreError("--items needs --id-map FILE, the map that `veil obfuscate --id-map` wrote for this store")
    if not wanted:
        raise StoreError("nothing to erase: give --ids ID|FILE ..., or --id-map FILE --items ITEM ...")
    bad = [i for i in wanted if not ID_HEX.fullmatch(i)]
    if bad:
        raise StoreError(f"id {bad[0]!r}: not an id (32 hex digits)")
    logged = erased_ids(manifest)
    already = {i: logged[i] for i in wanted if i in logged}
    todo = set(wanted) - set(already)

    # Pass 1: every shard checked (as verify does), the erased items found; nothing is written yet.
    start = time.perf_counter()
    labels, hits, seen = [], {}, set()  # per shard: its labels; shard index -> positions of erased items; ids found
    for k, shard in checked_shards(loc, manifest, progress):
        labels.append(shard["labels"])
        if todo:
            found = [(p, i) for p, i in enumerate(id_hex(shard["ids"])) if i in todo]
            if found:
                hits[k] = [p for p, _ in found]
                seen.update(i for _, i in found)
    n_found = sum(len(v) for v in hits.values())
    # An id-map line whose id the store never listed was written by an obfuscate or append killed before its
    # commit: that item was never stored, and its line goes with the erased ones.
    stale = (todo - seen) & from_map
    todo -= stale
    if seen != todo:
        unknown = sorted(todo - seen)
        raise StoreError(f"{loc.url}: {len(unknown)} id(s) not in the store and never erased from it: {', '.join(unknown[:3])}"
                         f"{', ...' if len(unknown) > 3 else ''}; nothing was erased")
    if stop.signum:
        raise Stopped(f"stopped before erasing anything: {loc.url} is unchanged; run the same command again", stop.signum)

    cleaned = remove_leftovers(loc, manifest)  # a retired shard of an interrupted erase may still hold erased items
    if not todo:
        if manifest["pending"] or manifest["retired"]:
            write_manifest(loc, {**manifest, "pending": [], "retired": []})
        _prune_map(id_map, map_entries, set(wanted))
        return {"erased": 0, "already": already, "shards_rewritten": 0, "cleaned": cleaned, "items": manifest["count"],
                "seconds": time.perf_counter() - start, "stale": sorted(stale)}

    # Pass 2: the shards that hold erased items, rewritten under new names; the manifest names them first.
    first = next_shard_index(loc, manifest)
    new_names = {k: shard_name(first + n) for n, k in enumerate(sorted(hits))}
    write_manifest(loc, {**manifest, "pending": list(new_names.values()), "retired": []})
    shards, kept_labels = [], []
    for k, entry in enumerate(manifest["shards"]):
        if stop.signum:  # before the commit: the shards written so far stay pending, for the next change to delete
            raise Stopped(f"stopped before the erasure was committed: {loc.url} is unchanged; run the same command again", stop.signum)
        if k not in hits:
            shards.append(entry)
            kept_labels.append(labels[k])
            continue
        shard = read_shard(loc, manifest, k, decode=False)  # the stored bytes' tensors: kept items stay bit for bit
        keep = torch.ones(entry["count"], dtype=torch.bool)
        keep[hits[k]] = False
        if keep.any():
            index = int(new_names[k][len("shard-") : -len(".safetensors")])
            shards.append(write_shard(loc, new_names[k], {key: t[keep] for key, t in shard.items()}, index))
            kept_labels.append(labels[k][keep])
    retired = [manifest["shards"][k]["file"] for k in sorted(hits)]
    new = {
        **manifest, "format_version": FORMAT_VERSION, "veil_version": __version__,
        "shards": shards, "count": manifest["count"] - n_found,
        "labels_sha256": labels_digest(torch.cat(kept_labels) if kept_labels else torch.zeros(0, dtype=torch.int64)),
        "erasures": manifest["erasures"] + [{"utc": utc_now(), "ids": sorted(todo)}],
        "pending": [], "retired": retired,
    }
    write_manifest(loc, new)  # the commit: from here on the store is the new one, and a signal waits until the erase is finished
    for name in retired:
        remove(loc, name)
    write_manifest(loc, {**new, "retired": []})
    _prune_map(id_map, map_entries, set(wanted))
    seconds = time.perf_counter() - start
    return {"erased": n_found, "already": already, "shards_rewritten": len(hits), "cleaned": cleaned, "items": new["count"], "seconds": seconds,
            "stale": sorted(stale)}


def _prune_map(id_map: str | Path | None, entries: list[tuple[str, str]] | None, erased: set[str]) -> None:
    """The id map's lines for erased items go too: they tie a source to the store."""
    if id_map is None or entries is None:
        return
    kept = [e for e in entries if e[0] not in erased]
    if len(kept) != len(entries):
        head, _ = idmap.read(id_map)
        idmap.rewrite(id_map, head, kept)
