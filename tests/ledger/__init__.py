"""Ledger tests: bad input, concurrency, properties, remembered records."""

from __future__ import annotations

import sqlite3


def dump(path: str) -> list[str]:
    """The whole SQLite file as SQL text: two dumps are equal only if nothing in the file changed."""
    db = sqlite3.connect(path)
    try:
        return list(db.iterdump())
    finally:
        db.close()
