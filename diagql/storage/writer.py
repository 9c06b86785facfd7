"""The disk cache's writer thread: entries that Cache.store hands over are written whole in the
background, served from memory to every Cache of the process until they land, and awaited at
exit (docs/ARCHITECTURE.md, "Storage")."""
from __future__ import annotations

import atexit
import collections
import os
import sys
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diagql.errors import DiagQLWarning
from diagql.storage import entry_file

EXIT_WAIT = 30.0  # seconds a process waits at exit for its pending writes, then drops them


@dataclass(eq=False)
class Job:
    """One entry handed to a writer thread: its arrays (the header among them) until it lands."""

    path: Path
    payload: dict[str, np.ndarray]
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False  # CLEAR CACHE, or a rejected entry: skip it if not yet started
    replaces: tuple[Path, ...] = ()  # entries removed once this one has landed (merged parts)


class Pending:
    """The entries of every Cache of this process that are handed over but not yet on disk,
    by path: a second connection over the same directory loads them from here."""

    def __init__(self):
        self.lock = threading.Lock()
        self.jobs: dict[Path, Job] = {}

    def add(self, job: Job) -> None:
        with self.lock:
            self.jobs[job.path] = job  # the latest store of a path is what a load must see

    def get(self, path: Path) -> Job | None:
        with self.lock:
            return self.jobs.get(path)

    def finish(self, job: Job) -> None:
        with self.lock:
            if self.jobs.get(job.path) is job:
                del self.jobs[job.path]
        job.done.set()

    def under(self, root: Path) -> list[Job]:
        with self.lock:
            return [job for path, job in self.jobs.items() if path.parent.parent == root]


PENDING = Pending()
_WRITING: weakref.WeakSet = weakref.WeakSet()  # writers that have been handed entries


def _umask() -> int:
    """The process's umask (read by setting it, so set back at once), read when this module is
    imported, not from the writer thread: another thread making a file in between would get
    the mode set meanwhile (review KK1)."""
    return _UMASK


_UMASK = os.umask(0o022)
os.umask(_UMASK)


class Writer:
    """One Cache's writer thread and its queue: entries are written one at a time, in order,
    each to a temporary file that is renamed into place once whole."""

    def __init__(self, root: Path | None, written: Callable[[Path], object]):
        self.root = root
        self.written = written  # called in the writer thread after each entry lands
        self.writable = root is not None
        self.failure: str | None = None  # an error, for the Cache to warn about once
        self.writes = 0
        self.reset()

    def reset(self) -> None:
        self.cond = threading.Condition()
        self.queue: collections.deque[Job] = collections.deque()  # the first is in flight
        self.thread: threading.Thread | None = None

    def put(self, job: Job) -> None:
        PENDING.add(job)
        with self.cond:
            self.queue.append(job)
            if self.thread is None:
                self._start()

    def _start(self) -> None:
        # Called holding self.cond. The thread ends when the queue is empty (no idle thread
        # per connection); a daemon, so a process never hangs on it: atexit waits instead.
        _WRITING.add(self)
        thread = threading.Thread(target=self._drain, name="diagql-cache-writer", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # interpreter shutting down: no new threads, write here
            while self.queue:
                self._run(self.queue[0])
            return
        self.thread = thread

    def _drain(self) -> None:
        while True:
            with self.cond:
                if not self.queue:
                    self.thread = None
                    return
                job = self.queue[0]  # left in the queue until it lands: flush waits for it
            self._run(job)

    def _run(self, job: Job) -> None:
        try:
            # A job that a later store of the same path superseded is not written: only the
            # latest would stay (an activation entry grows with each query of a script).
            if self.writable and not job.cancelled and PENDING.get(job.path) is job:
                self._write(job)
        except Exception as exc:  # noqa: BLE001 - OSError, or a bug: either way, stop writing
            self.writable = False
            self.failure = (f"cache disabled: cannot write to {self.root} ({exc}); DiagQL "
                            f"works without it")
        finally:
            with self.cond:
                self.queue.popleft()
                self.cond.notify_all()
            PENDING.finish(job)

    def _write(self, job: Job) -> None:
        path, temp = job.path, None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # A unique name per writer: two sessions storing the same key never share a file;
            # its process id tells another process when it was abandoned (store.py).
            fd, temp = tempfile.mkstemp(prefix=f".tmp-{os.getpid()}-", suffix=".npz",
                                        dir=path.parent)
            with os.fdopen(fd, "wb") as file:
                entry_file.write(file, job.payload)
            # As any file the process makes (mkstemp's own are 0600): a cache directory that
            # several users share had been unreadable to all but each entry's writer.
            os.chmod(temp, 0o666 & ~_umask())
            try:
                os.replace(temp, path)  # only a whole file is ever renamed into place
            except PermissionError:
                if not path.exists():
                    raise
                # Windows: a reader holds the existing entry open; that entry is as good.
                os.unlink(temp)
            temp = None
        finally:
            if temp is not None:
                try:
                    os.unlink(temp)
                except OSError:
                    pass
        self.writes += 1
        for old in job.replaces:  # only now: until the merged entry is whole, they serve
            try:
                os.unlink(old)
            except OSError:
                pass  # evicted or cleared meanwhile
        try:
            self.written(path)
        except OSError:
            pass  # the directory changed under the eviction: the next write evicts

    def flush(self, timeout: float | None = None) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: not self.queue, timeout)


def absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))


def flush_pending() -> None:
    """Let the writes still pending land before the process ends, within EXIT_WAIT seconds;
    past that (or at a second Ctrl-C) they are dropped: the temporary file is never renamed.
    A write's failure not yet told is warned of, once. The command line calls it before it
    puts Python's warning printer back, so that the warning is its one line."""
    deadline = time.monotonic() + EXIT_WAIT
    try:
        for writer in list(_WRITING):
            if not writer.flush(timeout=max(0.0, deadline - time.monotonic())):
                print(f"diagql: gave up waiting for cache writes to {writer.root}; those "
                      f"entries will be recomputed", file=sys.stderr)
            elif writer.failure is not None:
                failure, writer.failure = writer.failure, None
                warnings.warn(failure, DiagQLWarning, stacklevel=1)
    except KeyboardInterrupt:
        pass


def _after_fork_in_child() -> None:
    # A forked child (a DataLoader worker) has no writer threads, and their locks may be held.
    global PENDING
    PENDING = Pending()
    for writer in list(_WRITING):
        writer.reset()
    _WRITING.clear()


atexit.register(flush_pending)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
