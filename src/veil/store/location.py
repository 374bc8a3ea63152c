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

One writer per store: every change (obfuscate into it, --append, erase) runs inside
`writer_lock(loc, command)`, which holds STORE/.veil-lock for as long as the change runs and
refuses a second writer at once, naming the holder (command, pid, host, start time). Readers take
no lock: they read the manifest, which changes only by one atomic replace. What the lock
guarantees, by backend:

    local folder (POSIX)   an OS lock (fcntl.flock) on the lock file: exclusive among the processes
                           of this machine; the kernel drops it when its holder exits or is killed,
                           so a dead holder never blocks the next writer (on a network file system,
                           only as far as its flock support goes)
    fsspec URLs, and a     a lock object, created by one exclusive create (fsspec's pipe_file
    local folder without   mode="create"; O_EXCL locally): atomic where the backend makes that a
    fcntl (Windows)        conditional write (memory://, a local folder; an object store package
                           only if its pipe_file implements mode="create" as one); otherwise fsspec
                           checks, then writes, and two writers starting in the same instant could
                           both pass. A holder that died leaves the object behind: when it was on
                           this host and its process is gone it is removed and taken over; from
                           another host Veil cannot tell, so the message names the object to delete
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import fsspec
from fsspec.registry import known_implementations

from veil.errors import StoreError
from veil.io import atomic_write_bytes

try:
    import fcntl  # POSIX: a lock the kernel releases when its holder dies
except ImportError:  # Windows: the lock object (writer_lock) for local folders too
    fcntl = None

LOCK = ".veil-lock"  # in the store's folder while a change runs: who holds it, as JSON


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


# ----------------------------------------------------------------------------- one writer per store


def _process_start(pid: int) -> int | None:
    """When a process started (clock ticks since boot, Linux), so that a reused pid is not taken for its holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the command name in (...) may hold spaces
    except (OSError, ValueError, IndexError):
        return None


def _holder(command: str) -> dict:
    return {"command": command, "pid": os.getpid(), "host": socket.gethostname(), "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "pid_start": _process_start(os.getpid()), "token": secrets.token_hex(8)}


def _describe(holder: dict | None) -> str:
    if not isinstance(holder, dict):
        return "its holder is not recorded yet"
    return f"`{holder.get('command', '?')}` by pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started_utc', '?')}"


def _parse(data: bytes) -> dict | None:
    try:
        holder = json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return holder if isinstance(holder, dict) else None


def _refusal(loc: Location, holder: dict | None, hint: str = "") -> StoreError:
    return StoreError(f"{loc.url}: another change holds this store's lock ({_describe(holder)}); one change (obfuscate, --append, erase) "
                      f"at a time: run this command again when it has finished{hint}")


def _gone(holder: dict | None) -> bool:
    """The holder's process ran on this host and no longer runs (another process under its pid does not count)."""
    if not isinstance(holder, dict) or holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False  # another user's process (alive), or not a pid at all: leave it to the user
    start = _process_start(holder["pid"])
    return holder.get("pid_start") is not None and start is not None and start != holder["pid_start"]


def _flock(loc: Location, holder: dict) -> int:
    """Take the OS lock on STORE/.veil-lock (never waiting) and record the holder in it; return its descriptor."""
    path = _path(loc, LOCK)
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = None
            for _ in range(20):  # the holder writes who it is just after taking the lock
                other = _parse(os.pread(fd, 4096, 0))
                if other is not None:
                    break
                time.sleep(0.02)
            os.close(fd)
            raise _refusal(loc, other) from None
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
            data = json.dumps(holder).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            return fd
        os.close(fd)  # the previous holder removed the file between our open and our lock: take the new one
    raise StoreError(f"{where(loc, LOCK)}: could not take the lock, the file kept being replaced")


def _read_lock_object(loc: Location) -> dict | None:
    try:
        return _parse(read_bytes(loc, LOCK))
    except FileNotFoundError:
        return None


def _create_exclusively(loc: Location, name: str, data: bytes) -> None:
    """Create a file that must not exist yet (FileExistsError if it does): O_EXCL locally, fsspec's create mode elsewhere."""
    if loc.local:
        fd = os.open(_path(loc, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return
    try:
        loc.fs.pipe_file(_path(loc, name), data, mode="create")
    except TypeError:  # a backend whose pipe_file takes no mode: check, then write (best effort)
        if loc.fs.isfile(_path(loc, name)):
            raise FileExistsError(_path(loc, name)) from None
        loc.fs.pipe_file(_path(loc, name), data)


def _take_lock_object(loc: Location, holder: dict) -> None:
    data = json.dumps(holder).encode()
    for attempt in range(2):
        try:
            _create_exclusively(loc, LOCK, data)
        except FileExistsError:
            other = _read_lock_object(loc)
            if attempt == 0 and _gone(other):
                remove(loc, LOCK)  # its holder died on this host: take it over
                continue
            raise _refusal(loc, other, f" (if that process is no longer running, delete {where(loc, LOCK)})") from None
        if _read_lock_object(loc) != holder:  # a backend without an atomic create let another writer in after us
            raise _refusal(loc, _read_lock_object(loc))
        return


@contextlib.contextmanager
def writer_lock(loc: Location, command: str):  # noqa: ANN201
    """Hold the store's one writer lock while a change runs (the module docstring says what each backend
    guarantees); a second writer is refused at once with a StoreError naming the holder. The store's
    folder must exist."""
    if not is_folder(loc):
        raise StoreError(f"store not found: {loc.url}")
    holder = _holder(command)
    if loc.local and fcntl is not None:
        fd = _flock(loc, holder)
        try:
            yield holder
        finally:
            Path(_path(loc, LOCK)).unlink(missing_ok=True)  # while still holding it: a writer that opened it retries (_flock)
            os.close(fd)
        return
    _take_lock_object(loc, holder)
    try:
        yield holder
    finally:
        if _read_lock_object(loc) == holder:
            remove(loc, LOCK)
