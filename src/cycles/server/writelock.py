"""One ledger call at a time across the worker processes that serve one SQLite file: an exclusive `flock` on
`<db>.write.lock` held around each runtime call's ledger work.

SQLite serialises writers itself, but a writer that finds the file locked sleeps in its busy handler (1, 2, 5, 10,
... ms) and rechecks, while the holder needs a fraction of a millisecond: under load the workers' event loops spent
their time asleep, and p99 grew to hundreds of milliseconds. A blocked `flock` wakes the moment the holder lets go.
Only the runtime calls, made inline on the event loop, take it; admin calls and the sweep (worker threads, rare) still
rely on the busy timeout. In-memory stores and platforms without fcntl need no lock.
"""

from __future__ import annotations

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
    """`with lock:` holds the file lock (a no-op without a path). Opened lazily in the process that uses it: a lock
    file descriptor inherited across fork would be one lock shared by both processes."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._fd: int | None = None
        self._pid = 0

    def _open(self) -> int | None:
        if self._pid != os.getpid():
            self._pid, self._fd = os.getpid(), None
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)  # type: ignore[arg-type]
            except OSError as exc:
                log.warning("cannot open write lock %s (%s): relying on the store's busy timeout", self.path, exc)
        return self._fd

    def __enter__(self) -> None:
        if self.path is not None and (fd := self._open()) is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._fd is not None and self.path is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
