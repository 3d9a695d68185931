"""The background expiry sweep: `Ledger.sweep()` on a timer, by one process at a time.

Several worker processes may serve one SQLite file; the one holding an exclusive `flock` on `<db>.sweep.lock`
sweeps, the others try again each interval and take over when the holder exits (the lock dies with its process).
On a store with leases (Redis: many processes on many hosts) the sweeper holds a lease with its own owner token
instead, renewed every interval and lapsing a few intervals after its holder stops renewing it. Sweeping twice would
be harmless, only wasteful. Stores without a file (`:memory:`) sweep unconditionally.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from starlette.concurrency import run_in_threadpool

from ..ledger import Ledger
from .writelock import fcntl, lock_file_for

log = logging.getLogger("cycles.server")


def lock_path_for(ledger: Ledger) -> str | None:
    return lock_file_for(ledger, "sweep")


class Sweeper:
    def __init__(self, ledger: Ledger, interval: float, lock_path: str | None = None) -> None:
        self.ledger = ledger
        self.interval = interval
        self.lock_path = lock_path
        self.swept = 0  # reservations expired by this sweeper
        self._fd: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock_warned = False
        self._leases = hasattr(ledger.store, "hold_lease")
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(6).hex()}"
        self._leading = False

    @property
    def leader(self) -> bool:
        if self._leases:
            return self._leading
        return self.lock_path is None or fcntl is None or self._fd is not None

    def _lease_ms(self) -> int:
        return int(max(3 * self.interval, 5.0) * 1000)

    def _hold_lease(self) -> bool:
        """Take or renew the store's sweep lease; False while another process holds it."""
        leading = self.ledger.store.hold_lease("sweep", self._owner, self._lease_ms())  # type: ignore[attr-defined]
        if leading and not self._leading:
            log.info("this process (pid %d) now runs the expiry sweep", os.getpid())
        self._leading = leading
        return leading

    def _sweep_if_leader(self) -> int:
        return self.ledger.sweep() if self._hold_lease() else 0

    def _try_lead(self) -> bool:
        """Hold the sweep lock (non-blocking); True when this process may sweep."""
        if self.leader:
            return True
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)  # type: ignore[arg-type]
        except OSError as exc:
            if not self._lock_warned:
                log.warning("cannot open sweep lock %s (%s): sweeping without it", self.lock_path, exc)
                self._lock_warned = True
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        log.info("this process (pid %d) now runs the expiry sweep", os.getpid())
        return True

    async def sweep_once(self) -> int:
        if not self._leases and not self._try_lead():
            return 0
        try:
            n = await run_in_threadpool(self._sweep_if_leader if self._leases else self.ledger.sweep)
        except Exception as exc:  # a busy store or a transient error: try again next interval
            log.warning("expiry sweep failed: %s: %s", type(exc).__name__, exc)
            return 0
        self.swept += n
        if n:
            log.debug("expired %d reservation(s)", n)
        return n

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.sweep_once()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="cycles-expiry-sweep")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None
        if self._leading:
            try:
                await run_in_threadpool(self.ledger.store.drop_lease, "sweep", self._owner)  # type: ignore[attr-defined]
            except Exception as exc:  # the lease lapses by itself
                log.warning("could not drop the sweep lease: %s", exc)
            self._leading = False
