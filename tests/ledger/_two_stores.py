"""Two ledgers on one SQLite file, each with its own connection, standing for two processes; budgets of 1,000 at
three levels of tenant acme. Shared by the tests of what a store remembers and of batches."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cycles.ledger import Ledger, SQLiteStore

USD = "USD_MICROCENTS"
AGENT = {"tenant": "acme", "workspace": "w", "agent": "a"}
SCOPES = ["tenant:acme", "tenant:acme/workspace:w", "tenant:acme/workspace:w/agent:a"]


def reserve(ledger: Ledger, key: str, estimate: int = 100) -> Any:
    return ledger.reserve(
        {
            "idempotency_key": key,
            "subject": AGENT,
            "action": {"kind": "llm.completion", "name": "gpt-4o"},
            "estimate": {"unit": USD, "amount": estimate},
        }
    )


def reserved(ledger: Ledger) -> dict[str, int]:
    rows = ledger.balances({"tenant": "acme", "include_children": True}).balances
    return {b.scope: b.reserved.amount for b in rows}


@contextmanager
def two_ledgers(path: Path) -> Iterator[tuple[Ledger, Ledger]]:
    first, second = Ledger(SQLiteStore(path)), Ledger(SQLiteStore(path))
    for scope in SCOPES:
        first.admin.create_budget({"scope": scope, "unit": USD, "allocated": {"unit": USD, "amount": 1_000}})
    try:
        yield first, second
    finally:
        first.store.close()
        second.store.close()
