"""The SQLite store remembers the records it read or wrote (sqlite.py, `_Known`) and must never act on a stale one:
another connection's write, a rolled-back transaction and an admin write through the same connection all make it
read again. Two stores on one file stand for two processes (each has its own connection)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cycles.errors import BudgetExceeded, BudgetFrozen, ReservationFinalized, TenantClosed
from cycles.ledger import Ledger, SQLiteStore

from ._two_stores import SCOPES, USD, reserve, reserved


def test_another_connections_spend_is_seen(pair: tuple[Ledger, Ledger]) -> None:
    first, second = pair
    reserve(first, "a1", 600)  # first now remembers the budgets
    reserve(second, "b1", 300)
    with pytest.raises(BudgetExceeded) as denied:
        reserve(first, "a2", 200)  # 1,000 - 600 - 300 = 100 left, whatever first remembered
    assert denied.value.details["remaining"] == 100
    assert reserved(first) == dict.fromkeys(SCOPES, 900)


def test_another_connections_freeze_and_funding_are_seen(pair: tuple[Ledger, Ledger]) -> None:
    first, second = pair
    reserve(first, "a1")
    second.admin.freeze(SCOPES[1], USD)
    with pytest.raises(BudgetFrozen):
        reserve(first, "a2")
    second.admin.unfreeze(SCOPES[1], USD)
    second.admin.fund(SCOPES[2], USD, {"operation": "CREDIT", "amount": {"unit": USD, "amount": 5_000}})
    with pytest.raises(BudgetExceeded):
        reserve(first, "a3", 2_000)  # the agent could pay, the workspace still cannot
    assert reserve(first, "a4", 900).decision == "ALLOW"


def test_another_connections_commit_is_seen(pair: tuple[Ledger, Ledger]) -> None:
    first, second = pair
    held = reserve(first, "a1")  # first remembers the ACTIVE reservation
    second.commit(held.reservation_id, {"idempotency_key": "c-second", "actual": {"unit": USD, "amount": 40}})
    with pytest.raises(ReservationFinalized):
        first.commit(held.reservation_id, {"idempotency_key": "c-first", "actual": {"unit": USD, "amount": 40}})
    assert reserved(first) == dict.fromkeys(SCOPES, 0)


def test_another_connections_tenant_status_is_seen(pair: tuple[Ledger, Ledger]) -> None:
    first, second = pair
    second.admin.create_tenant({"tenant_id": "acme", "name": "Acme"})
    reserve(first, "a1")  # first remembers the ACTIVE tenant
    second.admin.update_tenant("acme", {"status": "CLOSED"})
    with pytest.raises(TenantClosed):
        reserve(first, "a2")


def test_a_rolled_back_transaction_leaves_nothing_remembered(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "ledger.db")
    ledger = Ledger(store)
    for scope in SCOPES:
        ledger.admin.create_budget({"scope": scope, "unit": USD, "allocated": {"unit": USD, "amount": 1_000}})
    reserve(ledger, "a1")
    with pytest.raises(RuntimeError), store.transaction() as tx:
        budgets = tx.get_budgets(USD, SCOPES)
        tx.move(budgets, reserved=500)
        assert [b.reserved for b in budgets] == [600, 600, 600]  # the records handed out follow the write
        raise RuntimeError("the caller fails after writing")
    with store.transaction() as tx:
        assert [b.reserved for b in tx.get_budgets(USD, SCOPES)] == [100, 100, 100]
    assert reserved(ledger) == dict.fromkeys(SCOPES, 100)
    store.close()


def test_an_admin_write_through_the_same_connection_is_seen() -> None:
    ledger = Ledger(SQLiteStore(":memory:"))
    for scope in SCOPES:
        ledger.admin.create_budget({"scope": scope, "unit": USD, "allocated": {"unit": USD, "amount": 1_000}})
    reserve(ledger, "a1", 900)
    ledger.admin.fund(SCOPES[0], USD, {"operation": "DEBIT", "amount": {"unit": USD, "amount": 50}})
    with pytest.raises(BudgetExceeded) as denied:
        reserve(ledger, "a2", 100)
    assert denied.value.details["remaining"] == 50
    ledger.admin.create_policy(
        {"tenant_id": "acme", "name": "caps", "scope_pattern": "tenant:acme/*", "caps": {"max_tokens": 64}}
    )
    assert reserve(ledger, "a3", 10).caps.max_tokens == 64


def test_a_replayed_reserve_wins_over_a_denial(tmp_path: Path) -> None:
    """The key is looked up only when a new reservation fails: a replay must still win over the denial."""
    ledger = Ledger(SQLiteStore(tmp_path / "ledger.db"))
    for scope in SCOPES:
        ledger.admin.create_budget({"scope": scope, "unit": USD, "allocated": {"unit": USD, "amount": 1_000}})
    first = reserve(ledger, "same", 800)
    again = reserve(ledger, "same", 800)  # 200 left: a new reservation of 800 would be denied
    assert again.reservation_id == first.reservation_id
    assert reserved(ledger) == dict.fromkeys(SCOPES, 800)
