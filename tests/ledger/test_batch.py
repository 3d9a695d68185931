"""`SQLiteStore.batch()`: the operations run inside share one commit (the server runs each batch of calls this way),
yet each stays all or nothing; nothing of a batch is seen by another connection before it ends, and a batch that
fails leaves nothing at all. Two stores on one file stand for two processes."""

from __future__ import annotations

import sqlite3

import pytest

from cycles.errors import BudgetExceeded, IdempotencyMismatch, StoreBusy
from cycles.ledger import Ledger, SQLiteStore

from ._two_stores import SCOPES, USD, reserve, reserved


def test_a_failed_operation_in_a_batch_undoes_only_itself(pair: tuple[Ledger, Ledger]) -> None:
    first, second = pair
    with first.store.batch():
        held = reserve(first, "a", 600)
        with pytest.raises(BudgetExceeded):
            reserve(first, "b", 500)  # 400 left: denied, and its savepoint rolled back
        reserve(first, "c", 300)
        with pytest.raises(IdempotencyMismatch):
            reserve(first, "a", 1)  # a replay with another payload, answered from inside the batch
        assert reserve(first, "a", 600).reservation_id == held.reservation_id  # a true replay
        first.commit(held.reservation_id, {"idempotency_key": "a-commit", "actual": {"unit": USD, "amount": 250}})
    assert reserved(second) == dict.fromkeys(SCOPES, 300)
    spent = {b.scope: b.spent.amount for b in second.balances({"tenant": "acme", "include_children": True}).balances}
    assert spent == dict.fromkeys(SCOPES, 250)
    assert [r.idempotency_key for r in second.list_reservations({"tenant": "acme"}).reservations] in (
        ["a", "c"],
        ["c", "a"],
    )


def test_nothing_of_a_batch_is_seen_before_it_ends(pair: tuple[Ledger, Ledger]) -> None:
    first, second = pair
    reader = sqlite3.connect(first.store.path)  # a plain reader: the ledger's reads sweep first, which writes

    def seen() -> list[int]:
        return [row[0] for row in reader.execute("SELECT reserved FROM budgets ORDER BY scope")]

    try:
        with first.store.batch():
            reserve(first, "a", 600)
            assert seen() == [0, 0, 0]  # WAL: another connection reads the last commit
        assert seen() == [600, 600, 600]
    finally:
        reader.close()


def test_a_batch_that_fails_leaves_nothing(pair: tuple[Ledger, Ledger]) -> None:
    first, second = pair
    with pytest.raises(RuntimeError, match="crash"), first.store.batch():
        reserve(first, "a", 600)
        raise RuntimeError("crash")
    assert reserved(first) == dict.fromkeys(SCOPES, 0)  # nor does first remember the rolled-back records
    assert reserved(second) == dict.fromkeys(SCOPES, 0)
    reserve(first, "a", 600)  # the key was never used
    assert reserved(second) == dict.fromkeys(SCOPES, 600)


def test_a_batch_holds_the_write_lock_and_does_not_nest(pair: tuple[Ledger, Ledger]) -> None:
    first, second = pair
    impatient = Ledger(SQLiteStore(first.store.path, busy_timeout=0.05))
    with first.store.batch():
        with pytest.raises(StoreBusy):
            reserve(impatient, "b", 1)  # another connection cannot write meanwhile
        impatient.store.close()
        with pytest.raises(RuntimeError, match="nest"), first.store.batch():
            pass
        reserve(first, "a", 100)  # the batch is still usable
    assert reserved(second) == dict.fromkeys(SCOPES, 100)
