"""The id map: which source item got which store id, in a file kept outside the store.

An erasure request names an image ("my photo, photos/jane/0001.png"); the store knows its items
only by random ids and holds no names or paths. `veil obfuscate --id-map FILE` therefore writes,
apart from the store, one JSON line per item it stores:

    {"format": "veil-id-map", "store_id": "9c1e...", "obfuscator": "<fingerprint>"}   first line: which store
    {"id": "3f9c0b...", "item": "photos/cat/0001.png"}       an image folder's file, as listed
    {"id": "a01b7e...", "item": "cifar10:test#17"}           else SPEC#INDEX: the index in the --data source as read

`veil erase STORE --id-map FILE --items ITEM...` resolves items to ids (an id map of another store
is refused), and once the store has erased them removes their lines from the map as well.

The map links the store back to its sources, so it is personal data wherever the sources are. It
belongs with whoever holds the images and answers erasure requests (the data controller), never
with the store's users, and never inside the store: a path inside the store's folder is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from veil.errors import StoreError
from veil.io import atomic_write_text
from veil.store.location import Location

FORMAT = "veil-id-map"


def check_outside(path: str | Path, loc: Location) -> None:
    """Refuse an id map inside the store's own folder: the store must hold no names or paths."""
    if loc.local and Path(path).resolve().is_relative_to(Path(loc.root).resolve()):
        raise StoreError(f"--id-map {path}: inside the store {loc.url}; the id map links items to their sources and must be kept apart from the store")


def header(manifest: dict) -> dict:
    return {"format": FORMAT, "store_id": manifest["store_id"], "obfuscator": manifest["obfuscator"]["fingerprint"]}


def read(path: str | Path) -> tuple[dict, list[tuple[str, str]]]:
    """(header, [(id, item)]) of an id map. A last line cut short by a kill (no newline) is left out."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"--id-map {path}: file not found")
    text = path.read_text()
    lines = text.split("\n")
    lines = lines[:-1]  # after the last newline: '' or a line cut short by a kill
    try:
        head = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        head = None
    if not isinstance(head, dict) or head.get("format") != FORMAT or not isinstance(head.get("store_id"), str):
        raise StoreError(f"{path}: not a Veil id map (its first line should be {{\"format\": \"{FORMAT}\", \"store_id\": ...}})")
    entries = []
    for n, line in enumerate(lines[1:], start=2):
        try:
            row = json.loads(line)
            entries.append((row["id"], row["item"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise StoreError(f"{path}: line {n} is damaged (expected {{\"id\": ..., \"item\": ...}})") from None
    return head, entries


def check_store(path: str | Path, head: dict, manifest: dict, store: str) -> None:
    if head["store_id"] != manifest.get("store_id"):
        raise StoreError(f"{path}: id map of store {head['store_id'][:12]}..., but {store} is store {str(manifest.get('store_id'))[:12]}...; "
                         f"use the id map written with this store")


def check_new(path: str | Path) -> None:
    """A new store's id map must be a new file: refuse one that exists (it is another store's, or that store's own)."""
    path = Path(path)
    if path.exists():
        head, _ = read(path)
        raise StoreError(f"--id-map {path}: already exists (the id map of store {head['store_id'][:12]}...); choose another file")


def check_covers(path: str | Path, manifest: dict, ids: list[str]) -> None:
    """Resuming a new store: its id map must hold a line for every item already written (an interrupted run given no
    id map, or another one, would leave those items without one)."""
    if not ids:
        return
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"--id-map {path}: not found, but {len(ids)} items of the store are already written without it; "
                         f"finish the store as it was started (the same --id-map, or none)")
    head, entries = read(path)
    check_store(path, head, manifest, "the store")
    have = {i for i, _ in entries}
    missing = sum(i not in have for i in ids)
    if missing:
        raise StoreError(f"--id-map {path}: has no line for {missing} of the {len(ids)} items already written; "
                         f"finish the store as it was started (the same --id-map, or none)")


def start(path: str | Path, manifest: dict, keep_ids: list[str], resume: bool) -> None:
    """Begin the id map of a store: a new file, or (resume) this store's existing map, keeping only the entries of ids in keep_ids
    (lines of items an interrupted run wrote but never listed are dropped)."""
    path = Path(path)
    kept: list[tuple[str, str]] = []
    if not resume:
        check_new(path)
    if path.exists():
        head, entries = read(path)
        check_store(path, head, manifest, "the store")
        keep = set(keep_ids)
        kept = [e for e in entries if e[0] in keep]
    rewrite(path, header(manifest), kept)


def add(path: str | Path, ids: list[str], items: list[str]) -> None:
    """Append lines for newly stored items, flushed to disk before the store's manifest lists them."""
    with open(path, "a") as fh:
        fh.write("".join(json.dumps({"id": i, "item": item}) + "\n" for i, item in zip(ids, items)))
        fh.flush()
        os.fsync(fh.fileno())


def rewrite(path: str | Path, head: dict, entries: list[tuple[str, str]]) -> None:
    atomic_write_text(path, "".join(json.dumps(x) + "\n" for x in [head, *({"id": i, "item": item} for i, item in entries)]))


def resolve(path: str | Path, entries: list[tuple[str, str]], items: list[str]) -> list[str]:
    """The ids of the named items (every id an item got); an item the map does not hold is an error."""
    by_item: dict[str, list[str]] = {}
    for i, item in entries:
        by_item.setdefault(item, []).append(i)
    missing = [item for item in items if item not in by_item]
    if missing:
        raise StoreError(f"{path}: no item {missing[0]!r}{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''} "
                         f"(never stored, or already erased and removed from the map); items are file paths as listed, or SPEC#INDEX")
    return [i for item in items for i in by_item[item]]
