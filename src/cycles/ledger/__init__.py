"""The budget authority: Cycles v0 rules (rules.py, admin.py) over a pluggable store (sqlite.py, later redis)."""

from __future__ import annotations

from collections.abc import Callable

from ..errors import InvalidRequest
from .admin import Admin
from .rules import Ledger
from .sqlite import SQLiteStore
from .store import Store

__all__ = ["Admin", "Ledger", "SQLiteStore", "Store", "open_store", "open_ledger"]


def open_store(url: str) -> Store:
    """A store from its URL: `sqlite:///path.db`, `sqlite://:memory:`."""
    if url.startswith("sqlite:") or url == ":memory:":
        from .sqlite import open_sqlite

        return open_sqlite(url)
    raise InvalidRequest(f"unsupported store url {url!r}: use sqlite:///path/to/cycles.db or sqlite://:memory:")


def open_ledger(url: str, *, clock: Callable[[], int] | None = None, default_tenant: str | None = None) -> Ledger:
    return Ledger(open_store(url), clock=clock, default_tenant=default_tenant)
