"""Process entry points for tests/ledger/test_concurrency.py.

They live in their own small module so a `spawn`ed child imports only this (and cycles), never pytest's test
module. Each child opens its own Ledger on the shared SQLite file (or Redis URL), with a fixed clock.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from cycles.errors import CyclesError
from cycles.ledger import Ledger, SQLiteStore, Store


def open_shared_store(path: str, busy_timeout: float = 60.0) -> Store:
    """A store on `path`: a SQLite file, or a Redis URL."""
    if path.startswith("redis://"):
        from cycles.ledger.redis import open_redis

        return open_redis(path)
    return SQLiteStore(path, busy_timeout=busy_timeout)


def reserve_worker(
    path: str, now_ms: int, subject: dict[str, str], x: int, n: int, prefix: str, barrier: Any, results: Any
) -> None:
    """Open a Ledger on `path`, wait for the others, then try `n` reserves of `x`; report ("ok", id) / ("err", code)."""
    out: list[tuple[str, str]] = []
    store = open_shared_store(path)
    try:
        ledger = Ledger(store, clock=lambda: now_ms)
        barrier.wait()
        for i in range(n):
            request = {
                "idempotency_key": f"{prefix}-{i}",
                "subject": subject,
                "action": {"kind": "llm.completion", "name": "gpt-4o"},
                "estimate": {"unit": "USD_MICROCENTS", "amount": x},
            }
            try:
                out.append(("ok", ledger.reserve(request, tenant="acme").reservation_id or ""))
            except CyclesError as exc:
                out.append(("err", exc.code))
    except Exception as exc:  # reported, so the parent fails with the cause rather than a missing result
        out.append(("crash", repr(exc)))
    finally:
        store.close()
        results.put((prefix, out))


def hold_write_lock(path: str, locked: Any, release: Any) -> None:
    """Take SQLite's write lock on `path` with a raw connection and keep it until `release` is set."""
    db = sqlite3.connect(path, isolation_level=None, timeout=30)
    try:
        db.execute("BEGIN IMMEDIATE")
        locked.set()
        release.wait(120)
        db.execute("ROLLBACK")
    finally:
        db.close()
