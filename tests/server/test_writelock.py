"""The workers' write lock: the ledger work handed over in one event loop iteration runs as one batch under the lock,
which is let go right after it; a worker that finds the lock taken keeps serving while a thread waits for it.
Another worker is played by a second open file description of the lock file, as another process would hold it."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cycles.server.writelock import WriteLock

fcntl = pytest.importorskip("fcntl")


def other_worker(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)


def free(path: Path) -> bool:
    """Whether another worker could take the lock now."""
    fd = other_worker(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing drops a lock taken here
    return True


@pytest.fixture
def path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "db.write.lock"


def test_work_handed_over_together_runs_in_one_batch_under_the_lock(path: Path) -> None:
    lock = WriteLock(str(path))
    seen: list[tuple[str, bool]] = []

    def work(name: str) -> str:
        seen.append((name, free(path)))
        if name == "bad":
            raise ValueError(name)
        return name.upper()

    async def main() -> list[object]:
        results = await asyncio.gather(
            lock.run(lambda: work("a")), lock.run(lambda: work("bad")), lock.run(lambda: work("c")),
            return_exceptions=True,
        )  # fmt: skip
        assert free(path)  # let go right after the batch
        return results

    results = asyncio.run(main())
    assert results[0] == "A" and results[2] == "C"
    assert isinstance(results[1], ValueError)  # each caller gets its own outcome; the others still ran
    assert seen == [("a", False), ("bad", False), ("c", False)]  # in arrival order, all under the lock


def test_a_taken_lock_parks_the_work_not_the_event_loop(path: Path) -> None:
    lock = WriteLock(str(path))
    holder = other_worker(path)
    fcntl.flock(holder, fcntl.LOCK_EX)
    ticks: list[int] = []
    ran: list[str] = []

    async def ticker() -> None:  # other requests of this worker, served meanwhile (no timers: no timing to lose)
        for i in range(20):
            ticks.append(i)
            await asyncio.sleep(0)

    async def main() -> None:
        first = asyncio.ensure_future(lock.run(lambda: ran.append("first") or "first"))
        await asyncio.sleep(0.02)
        assert ran == [] and not first.done()  # waiting for the other worker
        late = asyncio.ensure_future(lock.run(lambda: ran.append("late") or "late"))  # joins the waiting batch
        ticking = asyncio.ensure_future(ticker())
        await asyncio.sleep(0.03)
        assert len(ticks) >= 3  # the loop kept running while the lock was taken
        assert ran == []
        fcntl.flock(holder, fcntl.LOCK_UN)  # the other worker lets go
        assert await first == "first" and await late == "late"
        assert ran == ["first", "late"]
        assert free(path)
        await ticking

    try:
        asyncio.run(main())
    finally:
        os.close(holder)


def test_work_whose_caller_is_gone_is_not_done(path: Path) -> None:
    lock = WriteLock(str(path))
    holder = other_worker(path)
    fcntl.flock(holder, fcntl.LOCK_EX)
    ran: list[str] = []

    async def main() -> None:
        gone = asyncio.ensure_future(lock.run(lambda: ran.append("gone")))
        kept = asyncio.ensure_future(lock.run(lambda: ran.append("kept")))
        await asyncio.sleep(0.01)
        gone.cancel()
        fcntl.flock(holder, fcntl.LOCK_UN)
        await kept
        with pytest.raises(asyncio.CancelledError):
            await gone

    try:
        asyncio.run(main())
    finally:
        os.close(holder)
    assert ran == ["kept"]


def test_without_a_path_the_work_runs_at_once() -> None:
    async def main() -> int:
        return await WriteLock(None).run(lambda: 42)

    assert asyncio.run(main()) == 42


def test_a_batch_runs_inside_one_store_batch_and_answers_after_it_ends(path: Path) -> None:
    events: list[str] = []

    @contextmanager
    def together() -> Iterator[None]:
        events.append("begin")
        yield
        events.append("commit")

    lock = WriteLock(str(path), together)

    async def call(name: str) -> str:
        result = await lock.run(lambda: events.append(name) or name)
        events.append(f"answered {name}")
        return result

    async def main() -> None:
        assert await asyncio.gather(call("a"), call("b")) == ["a", "b"]

    asyncio.run(main())
    assert events == ["begin", "a", "b", "commit", "answered a", "answered b"]


def test_a_batch_that_does_not_commit_answers_every_call_with_the_error(path: Path) -> None:
    @contextmanager
    def failing() -> Iterator[None]:
        yield
        raise OSError("disk full")

    lock = WriteLock(str(path), failing)

    async def main() -> list[object]:
        return await asyncio.gather(lock.run(lambda: "a"), lock.run(lambda: 1 / 0), return_exceptions=True)

    results = asyncio.run(main())
    assert [type(r) for r in results] == [OSError, OSError]  # none of the batch happened, whatever each call did
    assert free(path)


def test_a_batch_that_cannot_begin_answers_every_call_with_the_error(path: Path) -> None:
    @contextmanager
    def busy() -> Iterator[None]:
        raise OSError("store busy")
        yield  # pragma: no cover

    lock = WriteLock(str(path), busy)
    ran: list[str] = []

    async def main() -> list[object]:
        return await asyncio.gather(lock.run(lambda: ran.append("a")), lock.run(lambda: ran.append("b")),
                                    return_exceptions=True)  # fmt: skip

    results = asyncio.run(main())
    assert [type(r) for r in results] == [OSError, OSError] and ran == []
    assert free(path)
