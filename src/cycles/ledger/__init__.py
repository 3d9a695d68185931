"""The budget authority: Cycles v0 rules (rules.py, admin.py) over a pluggable store (sqlite.py, redis.py)."""

from __future__ import annotations

from collections.abc import Callable

from ..errors import InvalidRequest
from .admin import Admin
from .rules import Ledger
from .sqlite import SQLiteStore
from .store import Store

__all__ = ["Admin", "Ledger", "SQLiteStore", "Store", "open_store", "open_ledger"]


def open_store(url: str) -> Store:
    """A store from its URL: `sqlite:///path.db`, `sqlite://:memory:`, `redis://host:port/0`,
    `redis+cluster://host:port`."""
    if url.startswith("sqlite:") or url == ":memory:":
        from .sqlite import open_sqlite

        return open_sqlite(url)
    if url.startswith(("redis://", "rediss://", "unix://", "redis+cluster://")):
        from .redis import open_redis

        return open_redis(url)
    raise InvalidRequest(
        f"unsupported store url {url!r}: use sqlite:///path/to/cycles.db, sqlite://:memory: or redis://host:port/0"
    )


def open_ledger(url: str, *, clock: Callable[[], int] | None = None, default_tenant: str | None = None) -> Ledger:
    return Ledger(open_store(url), clock=clock, default_tenant=default_tenant)
