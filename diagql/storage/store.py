"""The persistent cache: results that cost a pass over the data, kept on disk between sessions.

An entry is one ``.npz`` file (storage/entry_file.py), ``<root>/<kind>/<key>.npz``, holding the
caller's arrays and a JSON header (format version, kind, key, caller's metadata). Only what
numpy can load without pickle is stored, so a planted file cannot run code. Entries are written
to a unique temporary file and renamed into place, so concurrent sessions never see half an
entry; a file that does not load, or whose header does not match, is reported, removed and
recomputed, never trusted.

Writes leave the query's critical path: ``store`` hands the entry to a writer thread
(storage/writer.py), and until it lands it is served from memory to every Cache of the process.
"""
from __future__ import annotations

import errno
import json
import os
import re
import stat
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from diagql._version import __version__
from diagql.errors import DiagQLError, DiagQLWarning
from diagql.storage import entry_file, writer
from diagql.storage.writer import Job, Writer, absolute

T = TypeVar("T")
FORMAT_VERSION = 1
_HEADER = "__diagql__"
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
# The kinds of entry, each a folder of the root: only these are listed, evicted and cleared,
# so that a cache directory named where the user keeps files of their own (--cache-dir .)
# never loses one of theirs (a project's data/features.npz was evicted as an entry).
KINDS = frozenset({"activations", "auxiliary", "catalog", "index", "profile", "sample"})


DEFAULT_LIMIT = 2 * 1024 ** 3  # bytes on disk, all entries together
_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024 ** 2, "mb": 1024 ** 2,
          "mib": 1024 ** 2, "g": 1024 ** 3, "gb": 1024 ** 3, "gib": 1024 ** 3,
          "t": 1024 ** 4, "tb": 1024 ** 4, "tib": 1024 ** 4}
STALE_TEMP = 3600.0  # seconds after which a writer's temporary file is an abandoned one
# What reading an entry back costs (Cache.load from the page cache), measured on the development
# machine (docs/ARCHITECTURE.md, "Storage"): 0.25 ms, then 2-6 GB/s for 16-94 MB entries read
# by storage/entry_file.py; a Cache updates the rate from its own large loads.
READ_FIXED = 0.0003
READ_RATE = 2.5e9  # bytes per second
_RATE_MIN_BYTES = 1024 ** 2  # loads smaller than this measure the fixed cost, not the rate


@dataclass(frozen=True)
class Entry:
    """One file of the cache, as SHOW CACHE lists it."""

    kind: str
    key: str
    path: Path
    bytes: int
    used: float  # last read or write (the file's modification time), for LRU eviction


class Cache:
    """Entries by (kind, key) under one directory; ``root=None`` is a cache that holds nothing.

    ``limit`` bounds the bytes of all entries together: after a write, the least recently
    used entries (by the time they were last read or written) are removed until the rest fit.
    """

    def __init__(self, root: str | os.PathLike | None, limit: int = DEFAULT_LIMIT,
                 asked: bool = False):
        self.root = None if root is None else Path(root)
        self.limit, self.asked = limit, asked  # asked: a directory the user named
        self.skipped = self.evictions = 0  # skipped: cheaper to recompute than to read back
        self.by_kind: dict[str, dict[str, int]] = {}  # kind -> {"hits": n, "misses": n}
        self.read_rate = READ_RATE
        self._writer = Writer(self.root, lambda path: self._evict(keep=path))
        self._stopped: str | None = None  # the write failure warned about (write_failure)

    @property
    def writes(self) -> int:
        """Entries this Cache wrote that landed on disk."""
        return self._writer.writes

    @classmethod
    def resolve(cls, cache_dir=None, limit=None) -> "Cache":
        """``None``: ``$DIAGQL_CACHE_DIR``, else the platform's cache dir; ``False``: no cache;
        a path: that directory (created on the first write). ``limit``: bytes or a size such
        as ``"500MB"``; default ``$DIAGQL_CACHE_LIMIT``, else 2 GiB."""
        limit = parse_size(limit if limit is not None else
                           os.environ.get("DIAGQL_CACHE_LIMIT") or DEFAULT_LIMIT)
        return cls(cache_root(cache_dir), limit, asked=cache_dir not in (None, False))

    @property
    def hits(self) -> int:
        return sum(counts["hits"] for counts in self.by_kind.values())

    @property
    def misses(self) -> int:
        return sum(counts["misses"] for counts in self.by_kind.values())

    def _count(self, kind: str, outcome: str) -> None:
        self.by_kind.setdefault(kind, {"hits": 0, "misses": 0})[outcome] += 1

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def path(self, kind: str, key: str) -> Path:
        if kind not in KINDS or not _NAME.match(key):
            raise ValueError(f"a cache kind of KINDS and a file-name safe key: {kind!r}, {key!r}")
        return self.root / kind / f"{key}.npz"

    def load(self, kind: str, key: str, decode: Callable[[dict], T] | None = None
             ) -> dict[str, np.ndarray] | T | None:
        """The arrays stored under (kind, key), or None: absent, disabled, or not trustworthy.

        An entry still on its way to disk is served from memory (copies, as a read gives).
        ``decode`` turns the arrays into the caller's object, raising KeyError, TypeError or
        ValueError when they do not fit (a field missing, wrong lengths): that entry is
        damaged too, and reported, removed and counted as a miss like one that does not load.
        """
        if self.root is None:
            return None
        self._report()
        path = self.path(kind, key)
        job = writer.PENDING.get(absolute(path))
        started = time.perf_counter()
        try:
            if job is not None:
                arrays = {name: value.copy() for name, value in job.payload.items()
                          if name != _HEADER}
            else:
                with open(path, "rb", buffering=0, opener=_regular_file) as file:
                    arrays = _read(file, kind, key)
        except (FileNotFoundError, NotADirectoryError):
            self._count(kind, "misses")
            return None
        except OSError as exc:  # unreadable (permissions): skip it, but leave it alone
            warnings.warn(f"cannot read the cache entry {path}: {exc}; recomputing it",
                          DiagQLWarning, stacklevel=2)
            self._count(kind, "misses")
            return None
        except Exception as exc:  # noqa: BLE001 - whatever a damaged file raises, it is a miss
            self._reject(path, kind, f"{type(exc).__name__}: {exc}")
            return None
        if job is None:
            self._measure_read(arrays, time.perf_counter() - started)
        if decode is not None:
            try:
                arrays = decode(arrays)
            except (KeyError, TypeError, ValueError) as exc:
                self._reject(path, kind, str(exc) if isinstance(exc, ValueError) else
                             f"{type(exc).__name__}: {exc}")
                return None
        self._count(kind, "hits")
        try:
            os.utime(path)  # recently used: the last to be evicted
        except OSError:
            pass  # still pending (it lands with a fresh time), or evicted meanwhile
        return arrays

    def _measure_read(self, arrays: dict[str, np.ndarray], seconds: float) -> None:
        size = sum(value.nbytes for value in arrays.values())
        if size >= _RATE_MIN_BYTES and seconds > READ_FIXED:
            self.read_rate = size / (seconds - READ_FIXED)

    def read_seconds(self, size: int) -> float:
        """What loading an entry of ``size`` bytes is expected to cost."""
        return READ_FIXED + size / self.read_rate

    def _reject(self, path: Path, kind: str, reason: str) -> None:
        """Report a damaged or foreign entry and remove it, so that the next store replaces it."""
        self._count(kind, "misses")
        warnings.warn(f"ignoring the damaged cache entry {path} ({reason}); recomputing it",
                      DiagQLWarning, stacklevel=3)
        job = writer.PENDING.get(absolute(path))
        if job is not None:
            job.cancelled = True
        try:
            path.unlink()
        except OSError:
            pass  # read-only or already gone: it will be detected again, never used

    def store(self, kind: str, key: str, arrays: dict[str, np.ndarray], meta: dict,
              seconds: float | None = None, replaces: list[str] | tuple = ()) -> bool:
        """Hand an entry to this Cache's writer thread, which writes it atomically; return at
        once. The caller must not change the arrays afterwards (they are written as they are
        then). ``seconds``: what computing the entry cost; when reading it back would cost
        more, it is not written (False). ``replaces``: keys of the same kind that this entry
        takes the place of, removed once it has landed. On a failure (read-only, disk full)
        the cache warns once and stops writing: the caller already has its result, and DiagQL
        works without a cache."""
        if not self._writer.writable:
            self._report()
            return False
        path = self.path(kind, key)
        payload = {name: np.asarray(value) for name, value in arrays.items()}
        size = sum(value.nbytes for value in payload.values())
        if size > self.limit:
            return False  # it could only be kept by evicting everything else: it would not fit
        if seconds is not None and seconds < self.read_seconds(size):
            self.skipped += 1
            return False
        header = {"format": FORMAT_VERSION, "kind": kind, "key": key, "diagql": __version__,
                  "created": time.time(), "meta": meta}
        payload[_HEADER] = np.array(json.dumps(header, default=str))
        old = tuple(absolute(self.path(kind, other)) for other in replaces if other != key)
        self._writer.put(Job(absolute(path), payload, replaces=old))  # one key for every spelling
        return True

    def load_parts(self, kind: str, prefix: str, decode: Callable[[dict], T] | None = None
                   ) -> list[tuple[str, dict[str, np.ndarray] | T]]:
        """(key, value) of every part ``<prefix>-<part>`` of an entry kept in parts (on disk or
        on its way there) that loads and decodes, as ``load`` gives them; none is one miss."""
        keys = [] if self.root is None else part_keys(self.path(kind, prefix))
        if not keys and self.root is not None:
            self._count(kind, "misses")
        loaded = ((key, self.load(kind, key, decode)) for key in keys)
        return [(key, value) for key, value in loaded if value is not None]

    def _report(self) -> None:
        """Warn, in the caller's thread, about a write that failed in the writer thread."""
        failure, self._writer.failure = self._writer.failure, None
        if failure is not None:
            self._stopped = failure  # for SHOW CACHE (``write_failure``), after the warning
            warnings.warn(failure, DiagQLWarning, stacklevel=3)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until this Cache's handed-over entries are on disk (or dropped after a failure,
        which this then warns about); False if ``timeout`` seconds passed first."""
        done = self._writer.flush(timeout)
        self._report()
        return done

    def _settle(self, cancel: bool = False) -> None:
        """Wait for every Cache of this process to land (or, ``cancel``, drop those not yet
        started) the entries it was handed for this directory."""
        jobs = writer.PENDING.under(absolute(self.root))
        for job in jobs:
            job.cancelled = job.cancelled or cancel
        for job in jobs:
            job.done.wait()
        self._report()

    # --- what is there, and making room -------------------------------------------------------

    def entries(self) -> list[Entry]:
        """Every entry on disk (oldest use first), once the pending writes have landed;
        temporary files of writers are left out."""
        if self.root is None:
            return []
        self._settle()
        return _list(self.root)

    def usage(self) -> int:
        return sum(entry.bytes for entry in self.entries())

    def evict(self, keep: Path | None = None) -> list[Entry]:
        """Remove the least recently used entries until the rest fit within the limit."""
        if self.root is None:
            return []
        self._settle()
        return self._evict(keep)

    def _evict(self, keep: Path | None = None) -> list[Entry]:
        entries = _list(self.root)
        total = sum(entry.bytes for entry in entries)
        removed = []
        keep = None if keep is None else absolute(keep)
        for entry in entries:
            if total <= self.limit:
                break
            if absolute(entry.path) == keep:
                continue
            try:
                entry.path.unlink()
            except OSError:
                continue
            total -= entry.bytes
            removed.append(entry)
        self.evictions += len(removed)
        if keep is not None:
            remove_abandoned(self.root)
        return removed

    def clear(self) -> tuple[list[Entry], list[tuple[Entry, OSError]]]:
        """Remove every entry (a session that has one loaded keeps its copy in memory); entries
        handed over but not yet being written are dropped, those in flight land first. The
        entries removed, and those not (a read-only directory) with why."""
        removed, kept = [], []
        if self.root is not None:
            self._settle(cancel=True)
            for entry in _list(self.root):
                try:
                    entry.path.unlink()
                    removed.append(entry)
                except FileNotFoundError:  # another process cleared it
                    pass
                except OSError as exc:
                    kept.append((entry, exc))
        return removed, kept

    @property
    def write_failure(self) -> str | None:
        """Why this cache stopped writing (a read-only or full disk), or None while it writes."""
        return None if self._writer.writable else (self._writer.failure or self._stopped)

    def __repr__(self) -> str:
        where = "disabled" if self.root is None else str(self.root)
        return (f"<diagql.Cache {where}: {self.hits} hits, {self.misses} misses, "
                f"{self.writes} writes>")


def cache_root(cache_dir=None) -> Path | None:
    """Where a cache keeps its entries: ``None``: ``$DIAGQL_CACHE_DIR``, else the platform's
    cache dir; ``False``: nowhere (None); a path: that directory."""
    if cache_dir is False:
        return None
    if cache_dir is None:
        cache_dir = os.environ.get("DIAGQL_CACHE_DIR") or default_cache_dir()
    if not isinstance(cache_dir, (str, os.PathLike)) or not os.fspath(cache_dir).strip():
        raise DiagQLError(f"cache_dir must be a path, None (the default place) or False (no "
                          f"cache), not {cache_dir!r}")
    # Absolute now: a notebook's %cd must not move it (nor its eviction) to another folder.
    return Path(os.path.expanduser(os.fspath(cache_dir))).absolute()


def touch(cache: Cache, kind: str, key: str) -> None:
    """Mark an entry of ``cache`` used now, as reading it would, without reading it (for
    least-recently-used eviction)."""
    if cache.root is None:
        return
    try:
        os.utime(cache.path(kind, key))
    except OSError:
        pass  # absent or still pending: nothing to mark


def _list(root: Path) -> list[Entry]:
    """Every entry on disk under ``root``, oldest use first; writers' temporary files left out."""
    if not root.is_dir():
        return []
    found = []
    for kind_dir in root.iterdir():
        if not (kind_dir.name in KINDS and kind_dir.is_dir()):
            continue
        for path in kind_dir.glob("*.npz"):
            if not _NAME.match(path.stem):
                continue  # .tmp-* files of a write in progress
            try:
                stat = path.stat()
            except OSError:
                continue  # removed meanwhile
            found.append(Entry(kind_dir.name, path.stem, path, stat.st_size, stat.st_mtime))
    return sorted(found, key=lambda e: (e.used, str(e.path)))


def part_keys(path: Path) -> list[str]:
    """The keys of the parts of the entry at ``path`` (``<key>-<part>.npz`` beside it), on disk
    or pending, sorted: an activation entry grows by appending one."""
    prefix = path.stem + "-"
    found = {job.path.stem for job in writer.PENDING.under(absolute(path.parent.parent))
             if job.path.parent.name == path.parent.name and job.path.stem.startswith(prefix)}
    if path.parent.is_dir():
        found.update(part.stem for part in path.parent.glob(prefix + "*.npz")
                     if _NAME.match(part.stem))
    return sorted(found)


def abandoned(root: Path) -> list[tuple[Path, int]]:
    """(path, bytes) of the temporary files under ``root`` that no writer will rename any
    more: a process killed, or one that stopped waiting at exit, mid-write. A writer names
    its process (writer.py): another process's that is no longer running left it (on this
    machine; one on another sharing the folder keeps it until STALE_TEMP has passed), and
    any older than STALE_TEMP is one. A killed process's had stayed, 193 MB of them unseen by
    SHOW CACHE and CLEAR CACHE, until a later write landed beside them an hour on."""
    found, now = [], time.time()
    for temp in root.glob("*/.tmp-*.npz") if root.is_dir() else ():
        try:
            stat = temp.stat()
        except OSError:
            continue
        if now - stat.st_mtime > STALE_TEMP or _writer_gone(temp.name):
            found.append((temp, stat.st_size))
    return found


def _writer_gone(name: str) -> bool:
    """Whether the process named in a temporary file's name has ended (on this machine)."""
    match = re.match(r"\.tmp-(\d+)-", name)
    if match is None or int(match.group(1)) == os.getpid():
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError, ValueError):  # another user's, or not a process id here
        return False
    return False


def remove_abandoned(root: Path) -> int:
    """Remove ``abandoned``'s files; the bytes they held."""
    removed = 0
    for temp, size in abandoned(root):
        try:
            temp.unlink()
            removed += size
        except OSError:
            pass
    return removed


def parse_size(value) -> int:
    """Bytes from an int or a text such as ``"500MB"``, ``"2 GiB"``, ``"1.5g"`` (powers of 1024)."""
    if isinstance(value, bool):
        raise DiagQLError(f"a cache size must be a number of bytes or a text like '500MB', "
                          f"not {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        if match is None or match.group(2).lower() not in _UNITS:
            raise DiagQLError(f"cannot read the cache size {value!r}: give bytes or a number "
                              f"with a unit, such as 500MB or 2GB")
        number, unit = float(match.group(1)), match.group(2).lower()
    size = number * _UNITS[unit]
    if not (size >= 0 and size < 2 ** 63):
        raise DiagQLError(f"the cache size {value!r} is out of range")
    return int(size)




def _read(file, kind: str, key: str) -> dict[str, np.ndarray]:
    """Every array of an entry, each checked against its digest; raises if foreign."""
    arrays = entry_file.read(file)
    header = json.loads(str(arrays.pop(_HEADER)))  # KeyError: no header, not ours
    if header.get("format") != FORMAT_VERSION:
        raise ValueError(f"format version {header.get('format')!r}, expected {FORMAT_VERSION}")
    if header.get("kind") != kind or header.get("key") != key:
        raise ValueError(f"it holds {header.get('kind')!r} {header.get('key')!r}")
    return arrays


def default_cache_dir() -> Path:
    """The platform's per-user cache directory, with a ``diagql`` folder in it."""
    home = Path.home()
    if sys.platform == "darwin":
        return home / "Library" / "Caches" / "diagql"
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local") / "diagql"
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says to ignore a relative path: it would depend on the working directory.
    base = Path(xdg) if xdg and os.path.isabs(xdg) else home / ".cache"
    return base / "diagql"


def _regular_file(path: str, flags: int) -> int:
    """Open an entry for reading only if it is a regular file: a named pipe put at its path
    had blocked the read forever (O_NONBLOCK opens one at once; a regular file ignores it)."""
    fd = os.open(path, flags | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    return fd
