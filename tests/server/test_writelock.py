"""The workers' write lock: on an event loop it is kept until the loop's next turn (one hand-over per batch of
requests), elsewhere it is released when the block ends. Observed through a second open file description of the lock
file, as another worker process would see it."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from cycles.server.writelock import WriteLock

fcntl = pytest.importorskip("fcntl")


def free(path: Path) -> bool:
    """Whether another open file description could take the lock now."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing drops a lock taken here
    return True


def test_outside_an_event_loop_the_lock_is_released_at_the_end_of_the_block(tmp_path: Path) -> None:
    path = tmp_path / "db.write.lock"
    lock = WriteLock(str(path))
    with lock:
        assert not free(path)
    assert free(path)


def test_on_an_event_loop_the_lock_is_kept_until_the_next_turn(tmp_path: Path) -> None:
    path = tmp_path / "db.write.lock"
    lock = WriteLock(str(path))

    async def main() -> None:
        with lock:
            assert not free(path)
        with pytest.raises(ZeroDivisionError):  # an error in a call keeps it too
            with lock:
                1 / 0  # noqa: B018
        assert not free(path)  # still held: calls of the same batch need no new flock
        await asyncio.sleep(0)  # the loop's next turn
        assert free(path)
        with lock:  # taken again afterwards
            assert not free(path)
        await asyncio.sleep(0)
        assert free(path)

    asyncio.run(main())


def test_without_a_path_the_lock_is_a_no_op() -> None:
    with WriteLock(None):
        pass
