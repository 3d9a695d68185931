"""One worker process at a time does ledger work on a SQLite file: an exclusive `flock` on `<db>.write.lock`, taken
by the runtime calls and kept until the event loop's next turn.

SQLite serialises writers itself, but a writer that finds the file locked sleeps in its busy handler (1, 2, 5, 10,
... ms) and rechecks, while the holder needs a fraction of a millisecond: under load the workers' event loops spent
their time asleep, and p99 grew to hundreds of milliseconds. A blocked `flock` wakes the moment the holder lets go.

Why until the next turn, not just around each call: a worker's store forgets what it remembers (records, SQLite's
page cache) whenever another process wrote to the file since its last transaction, and such a cold transaction costs
about 80 µs more. Handed back and forth around every call, the lock made about one transaction in four cold at 32
clients; kept for the rest of an event loop iteration, it changes hands once per batch of requests (those that
arrived together), and under one in ten is cold, with fewer flock calls. Nothing waits on it longer than one
iteration of the holder's loop, whose runtime handlers run inline and never await.

Only the runtime calls, made inline on the event loop, take it; admin calls and the sweep (worker threads, rare) still
rely on the busy timeout. In-memory stores and platforms without fcntl need no lock.
"""

from __future__ import annotations

import asyncio
import logging
import os
from types import TracebackType

from ..ledger import Ledger

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("cycles.server")


def lock_file_for(ledger: Ledger, purpose: str) -> str | None:
    """`<db>.<purpose>.lock` beside a SQLite file; None for an in-memory store or without fcntl (no lock needed)."""
    path = getattr(ledger.store, "path", None)
    if not path or path == ":memory:" or fcntl is None:
        return None
    return f"{path}.{purpose}.lock"


def write_lock_path_for(ledger: Ledger) -> str | None:
    return lock_file_for(ledger, "write")


class WriteLock:
    """`with lock:` holds the file lock (a no-op without a path): on an event loop until its next iteration, elsewhere
    until the block ends. For one thread: the event loop's. Opened lazily in the process that uses it: a lock file
    descriptor inherited across fork would be one lock shared by both processes."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._fd: int | None = None
        self._pid = 0
        self._held = False  # until release(), scheduled on the loop that took it
        self._release_on_exit = False  # taken outside an event loop

    def _open(self) -> int | None:
        if self._pid != os.getpid():
            self._pid, self._fd, self._held = os.getpid(), None, False
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)  # type: ignore[arg-type]
            except OSError as exc:
                log.warning("cannot open write lock %s (%s): relying on the store's busy timeout", self.path, exc)
        return self._fd

    def __enter__(self) -> None:
        if self.path is None or (self._held and self._pid == os.getpid()) or (fd := self._open()) is None:
            return
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._held = True
        try:
            asyncio.get_running_loop().call_soon(self.release)
        except RuntimeError:  # no event loop in this thread
            self._release_on_exit = True

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._release_on_exit:
            self._release_on_exit = False
            self.release()

    def release(self) -> None:
        if self._held and self._fd is not None and self._pid == os.getpid():
            self._held = False
            fcntl.flock(self._fd, fcntl.LOCK_UN)
