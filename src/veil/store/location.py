"""Where a feature store lives: a local folder or any fsspec URL, and the few file operations it needs.

    locate("stores/c10")             a local folder: written under a temporary name, fsynced, renamed
    locate("file:///data/c10")       the same
    locate("s3://bucket/c10")        any fsspec filesystem whose package is installed (s3fs, gcsfs, ...);
    locate("memory://c10")           memory:// (fsspec's own, in this process) is what the tests use

A local write is atomic: a reader sees the old file or the new one, never half of one. Object
stores (S3, GCS, Azure) have no rename, but a single upload becomes visible whole or not at all,
so a file is written under its final name. The store relies on nothing more: it writes new shards
under new names and the manifest last, so the manifest always lists whole shards (format.py). On a
backend whose writes are neither renamed nor atomic (an FTP or SFTP server, say), a kill during
the manifest's own write can leave it damaged; `veil verify` then says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import fsspec
from fsspec.registry import known_implementations

from veil.errors import StoreError
from veil.io import atomic_write_bytes


@dataclass(frozen=True)
class Location:
    url: str  # as given: messages name it
    root: str  # the folder: a local path, or the path inside `fs`
    fs: object | None  # an fsspec filesystem; None for a local folder (plain files, atomic rename)

    @property
    def local(self) -> bool:
        return self.fs is None


def locate(store: str | Path | Location) -> Location:
    """A path or URL -> Location; a URL whose filesystem package is missing is one clear StoreError."""
    if isinstance(store, Location):
        return store
    text = str(store)
    protocol, sep, rest = text.partition("://")
    if not sep:
        return Location(text, text, None)
    if protocol == "file":
        return Location(text, rest, None)
    try:
        fs, root = fsspec.core.url_to_fs(text)
    except ImportError:
        package = known_implementations.get(protocol, {}).get("class", "?").split(".")[0]
        raise StoreError(f"{text}: '{protocol}://' needs the {package} package, which is not installed (pip install {package})") from None
    except ValueError as e:
        raise StoreError(f"{text}: no filesystem for '{protocol}://' ({e}); a store is a local folder or an fsspec URL such as s3://bucket/store") from None
    return Location(text, root.rstrip("/"), fs)


def where(loc: Location, name: str = "") -> str:
    """What a message calls a file of the store (or the store itself)."""
    if not name:
        return loc.url
    return str(Path(loc.root) / name) if loc.local else f"{loc.url.rstrip('/')}/{name}"


def _path(loc: Location, name: str) -> str:
    return str(Path(loc.root) / name) if loc.local else f"{loc.root}/{name}"


def is_folder(loc: Location) -> bool:
    return Path(loc.root).is_dir() if loc.local else loc.fs.isdir(loc.root)


def make_folder(loc: Location) -> None:
    if loc.local:
        Path(loc.root).mkdir(parents=True, exist_ok=True)
    else:
        loc.fs.makedirs(loc.root, exist_ok=True)


def exists(loc: Location, name: str) -> bool:
    return Path(_path(loc, name)).is_file() if loc.local else loc.fs.isfile(_path(loc, name))


def names(loc: Location) -> list[str]:
    """The names of what the store's folder holds, sorted (temporary files included)."""
    if loc.local:
        return sorted(p.name for p in Path(loc.root).iterdir()) if Path(loc.root).is_dir() else []
    if not loc.fs.isdir(loc.root):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in loc.fs.ls(loc.root, detail=False))


def read_bytes(loc: Location, name: str) -> bytes:
    """The whole file; FileNotFoundError if it is not there."""
    if loc.local:
        return Path(_path(loc, name)).read_bytes()
    return loc.fs.cat_file(_path(loc, name))


def write_bytes(loc: Location, name: str, data: bytes) -> None:
    """Locally: a temporary name, fsync, rename (atomic). Elsewhere: one upload under the final name."""
    if loc.local:
        atomic_write_bytes(_path(loc, name), data)
    else:
        loc.fs.pipe_file(_path(loc, name), data)


def remove(loc: Location, name: str) -> None:
    """Delete a file if it is there."""
    if loc.local:
        Path(_path(loc, name)).unlink(missing_ok=True)
    elif loc.fs.isfile(_path(loc, name)):
        loc.fs.rm_file(_path(loc, name))


def size(loc: Location, name: str) -> int:
    return Path(_path(loc, name)).stat().st_size if loc.local else loc.fs.size(_path(loc, name))
