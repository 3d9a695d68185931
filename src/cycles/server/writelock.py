"""One worker process at a time does ledger work on a SQLite file: an exclusive `flock` on `<db>.write.lock`, taken
once per batch of runtime calls.

SQLite serialises writers itself, but a writer that finds the file locked sleeps in its busy handler (1, 2, 5, 10,
... ms) and rechecks, while the holder needs a fraction of a millisecond: under load the workers' event loops spent
their time asleep, and p99 grew to hundreds of milliseconds. A `flock` waiter wakes the moment the holder lets go.

How the lock is used, and why:
- A runtime handler only prepares its call (authenticate, parse) and hands the ledger work to `await lock.run(work)`.
  The work of every call handed over in the same event loop iteration runs together, in one batch, with the lock
  held for just that batch. HTTP parsing, JSON and the responses happen outside it, so both workers do that part at
  the same time; only the ledger work takes turns.
- A batch is one SQLite transaction (`Store.batch`: a savepoint per call, so each call is still all or nothing):
  the file's changes are written once per batch, not once per call, and no answer leaves before the batch is
  committed.
- The lock changes hands once per batch, not once per call: a worker's store forgets what it remembers (records,
  SQLite's page cache) whenever another process wrote since its last transaction, and such a cold transaction costs
  about 80 µs more.
- A worker that finds the lock taken waits for it on a thread of its own, never on its event loop: a worker blocked
  in `flock` could not even read or answer requests, so the two workers used to take turns at everything.

Only the runtime calls take it; admin calls and the sweep (worker threads, rare) rely on SQLite's busy timeout.
In-memory stores and platforms without fcntl need no lock: `run` then does the work at once, in its own transaction.

A store whose transactions are optimistic and remote (Redis) needs no lock either, but gains from the batches: the
calls handed over in one event loop iteration are committed together, in one round trip (`batch_only`). There a
call of the batch may fail alone (`batch.failed`: what it read was changed by another process): the failed ones run
again together (`batch.retry()`), then each by itself, before anyone is answered. The round trip is not waited for
with the event loop blocked: the batch is sent (`batch.send()`, a future of its answers) and the loop goes on
reading requests, writing answers and running the next batch, which reads what the batches on their way wrote, as
they will have written it (checked at its own commit like any read). At most FLYING batches are on their way at
once; a batch with failed calls waits until none is (they would read its guesses) and runs them again then.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar

from ..ledger import Ledger

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("cycles.server")

T = TypeVar("T")
FLYING = 2  # batch_only batches on their way at once: the next one runs while one is on its round trip


def lock_file_for(ledger: Ledger, purpose: str) -> str | None:
    """`<db>.<purpose>.lock` beside a SQLite file; None for an in-memory store or without fcntl (no lock needed)."""
    path = getattr(ledger.store, "path", None)
    if not path or path == ":memory:" or fcntl is None:
        return None
    return f"{path}.{purpose}.lock"


class WriteLock:
    """`await lock.run(work)`: `work()` called under the lock, in a batch with the other work handed over in the same
    event loop iteration, inside `together()` (the store's `batch`); its result (or exception) returned. For one
    event loop. Opened lazily in the process that uses it: a lock file descriptor inherited across fork would be one
    lock shared by both processes."""

    def __init__(
        self,
        path: str | None,
        together: Callable[[], AbstractContextManager[Any]] = nullcontext,
        *,
        batch_only: bool = False,
    ) -> None:
        self.path = path
        self.together = together
        self.batch_only = batch_only  # batches without a lock (see the module docstring)
        self._fd: int | None = None
        self._pid = 0
        self._batch: list[tuple[Callable[[], Any], asyncio.Future[Any]]] = []
        self.on_batch: Callable[[int], None] | None = None  # told each batch's size (server metrics)
        self._waiter: ThreadPoolExecutor | None = None  # the thread that waits in flock while another worker holds it
        self._flying = 0  # batch_only batches on their round trip
        self._scheduled = False  # a batch_only batch is to run in this loop iteration
        # batch_only batches with failed calls, run again (and answered) once no batch is on its way
        self._parked: list[tuple[list[tuple[Callable[[], Any], asyncio.Future[Any]]], dict[Any, Any], Any]] = []

    def _open(self) -> int | None:
        if self._pid != os.getpid():
            self._pid, self._fd, self._batch, self._waiter = os.getpid(), None, [], None
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)  # type: ignore[arg-type]
            except OSError as exc:
                log.warning("cannot open write lock %s (%s): relying on the store's busy timeout", self.path, exc)
        return self._fd

    async def run(self, work: Callable[[], T]) -> T:
        if not self.batch_only and (self.path is None or self._open() is None):
            return work()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        self._batch.append((work, done))
        if self.batch_only:
            self._next(loop)  # run once the loop has gathered the rest
        elif len(self._batch) == 1:  # the first of this batch: run it once the loop has gathered the rest
            loop.call_soon(self._take, loop)
        return await done

    def _take(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # type: ignore[arg-type]
        except BlockingIOError:  # another worker's batch: wait on the thread; calls arriving meanwhile join this one
            if self._waiter is None:
                self._waiter = ThreadPoolExecutor(1, thread_name_prefix="cycles-write-lock")
            waited = loop.run_in_executor(self._waiter, fcntl.flock, self._fd, fcntl.LOCK_EX)
            waited.add_done_callback(self._taken)
            return
        except BaseException as exc:
            self._fail(exc)
            raise
        self._run_batch()

    def _taken(self, waited: asyncio.Future[None]) -> None:
        if waited.cancelled() or waited.exception() is not None:
            self._fail(asyncio.CancelledError() if waited.cancelled() else waited.exception())  # type: ignore[arg-type]
        else:
            self._run_batch()

    def _run_batch(self) -> None:
        batch, self._batch = self._batch, []
        if self.on_batch is not None:
            self.on_batch(len(batch))
        outcomes: dict[asyncio.Future[Any], tuple[bool, Any]] = {}  # caller -> (succeeded, result or exception)
        failure: Exception | None = None
        try:
            try:
                with self.together() as together:
                    for work, done in batch:
                        if done.cancelled():  # nobody waits for it any more: not done at all
                            continue
                        if together is not None:
                            together.current = done  # tags the work's transactions (an optimistic store's batch)
                        outcomes[done] = _attempt(work)
            except Exception as exc:  # the batch did not begin, or did not commit: none of it happened
                failure = exc
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)  # type: ignore[arg-type]
        except BaseException:
            self._answer(batch, {}, asyncio.CancelledError())
            raise
        self._answer(batch, outcomes, failure)  # only now that the batch is committed

    def _run_remote(self, loop: asyncio.AbstractEventLoop) -> None:
        """A batch on an optimistic remote store (batch_only): its calls run, then it is sent (`together.send()`)
        and the loop carries on; `_landed` settles it and answers its calls."""
        self._scheduled = False
        if not self._batch or self._flying >= FLYING or self._parked:
            return
        batch, self._batch = self._batch, []
        if self.on_batch is not None:
            self.on_batch(len(batch))
        outcomes: dict[asyncio.Future[Any], tuple[bool, Any]] = {}  # caller -> (succeeded, result or exception)
        try:
            with self.together() as together:
                for work, done in batch:
                    if done.cancelled():  # nobody waits for it any more: not done at all
                        continue
                    together.current = done  # tags the work's transactions
                    outcomes[done] = _attempt(work)
            sent = together.send()  # None: nothing to send, or sent and settled already
        except Exception as exc:  # the batch did not begin, or could not be sent: none of it happened
            self._answer(batch, {}, exc)
            self._next(loop)
            return
        except BaseException:
            self._answer(batch, {}, asyncio.CancelledError())
            raise
        if sent is None:
            self._settled(batch, outcomes, together)
        else:
            self._flying += 1
            sent.add_done_callback(lambda landed: self._landed(batch, outcomes, together, landed))
        self._next(loop)

    def _landed(
        self,
        batch: list[tuple[Callable[[], Any], asyncio.Future[Any]]],
        outcomes: dict[asyncio.Future[Any], tuple[bool, Any]],
        together: Any,
        landed: asyncio.Future[Any],
    ) -> None:
        self._flying -= 1
        try:
            try:
                answers = landed.result()
            except BaseException:
                together.abandon()
                raise
            together.settle(answers)
        except Exception as exc:  # the round trip failed: none of the batch is known to have happened
            self._answer(batch, {}, exc)
        except BaseException:
            self._answer(batch, {}, asyncio.CancelledError())
            raise
        else:
            self._settled(batch, outcomes, together)
        self._next(asyncio.get_running_loop())

    def _settled(
        self,
        batch: list[tuple[Callable[[], Any], asyncio.Future[Any]]],
        outcomes: dict[asyncio.Future[Any], tuple[bool, Any]],
        together: Any,
    ) -> None:
        if together.failed:  # run again once no batch is on its way (they would read its guesses)
            self._parked.append((batch, outcomes, together))
        else:
            self._answer(batch, outcomes, None)
        if self._parked and not self._flying:
            parked, self._parked = self._parked, []
            for batch, outcomes, together in parked:
                failure: Exception | None = None
                try:
                    _run_failed(batch, outcomes, together)
                except Exception as exc:
                    failure = exc
                except BaseException:
                    self._answer(batch, {}, asyncio.CancelledError())
                    raise
                self._answer(batch, outcomes, failure)

    def _next(self, loop: asyncio.AbstractEventLoop) -> None:
        """The calls that arrived meanwhile: the next batch, once one may go (in this loop iteration, after the
        calls arriving in it)."""
        if self._batch and not self._scheduled and self._flying < FLYING and not self._parked:
            self._scheduled = True
            loop.call_soon(self._run_remote, loop)

    @staticmethod
    def _answer(
        batch: list[tuple[Callable[[], Any], asyncio.Future[Any]]],
        outcomes: dict[asyncio.Future[Any], tuple[bool, Any]],
        failure: BaseException | None,
    ) -> None:
        for _, done in batch:
            if done.done():
                continue
            # the batch's failure wins over each call's own outcome: none of the batch happened
            succeeded, outcome = (False, failure) if failure is not None else outcomes.get(done, (False, None))
            if succeeded:
                done.set_result(outcome)
            elif outcome is None or isinstance(outcome, asyncio.CancelledError):
                done.cancel()
            else:
                done.set_exception(outcome)

    def _fail(self, exc: BaseException) -> None:
        batch, self._batch = self._batch, []
        self._answer(batch, {}, exc)


def _run_failed(
    batch: list[tuple[Callable[[], Any], asyncio.Future[Any]]],
    outcomes: dict[asyncio.Future[Any], tuple[bool, Any]],
    together: Any,
) -> None:
    """An optimistic store's calls that failed alone at the batch's end (others changed what they read): again,
    together (with the store's turn on what they contended for), then each by itself."""
    for _round in range(3):
        failed = [(w, d) for w, d in batch if d in together.failed]
        if not failed:
            break
        with together.retry() as together:
            for work, done in failed:
                together.current = done
                outcomes[done] = _attempt(work)
    for work, done in batch:
        if done in together.failed:
            outcomes[done] = _attempt(work)


def _attempt(work: Callable[[], Any]) -> tuple[bool, Any]:
    try:
        return True, work()
    except Exception as exc:
        return False, exc
