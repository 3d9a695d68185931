"""`RedisStore.batch()`: the transactions of a batch commit together in one round trip, each all or nothing; one
whose reads another process changed fails alone, with every later one that read its writes, and is listed in
`batch.failed` (the server runs those again by themselves)."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest

from cycles.errors import BudgetExceeded
from cycles.ledger import Ledger
from cycles.ledger.redis import open_redis

USD = "USD_MICROCENTS"
ACTION = {"kind": "llm.completion", "name": "gpt-4o"}


def usd(n: int) -> dict[str, Any]:
    return {"unit": USD, "amount": n}


def reserve(ledger: Ledger, key: str, tenant: str = "acme", amount: int = 100) -> str:
    body = {"idempotency_key": key, "subject": {"tenant": tenant}, "action": ACTION, "estimate": usd(amount)}
    return ledger.reserve(body, tenant=tenant).reservation_id  # type: ignore[return-value]


@pytest.fixture
def ledgers(redis_url: str, clock: Any):
    stores = [open_redis(redis_url), open_redis(redis_url)]
    out = [Ledger(s, clock=clock) for s in stores]
    for tenant in ("acme", "other"):
        out[0].admin.create_budget({"scope": f"tenant:{tenant}", "unit": USD, "allocated": usd(1_000)})
    yield out
    for s in stores:
        s.close()


def reserved(ledger: Ledger, tenant: str = "acme") -> int:
    return ledger.balances({"tenant": tenant}, tenant=tenant).balances[0].reserved.amount


def test_a_batch_commits_together_and_later_transactions_see_earlier_writes(ledgers) -> None:
    a, b = ledgers
    reserve(a, "warm")  # a knows the budget now (its cache)
    with a.store.batch() as batch:
        for i in range(5):
            batch.current = i
            reserve(a, f"k{i}")
        assert reserved(b) == 100, "nothing of a batch is seen by others before it ends"
    assert batch.failed == set()
    assert reserved(b) == 600


def test_a_conflict_fails_its_transaction_and_those_that_read_its_writes_only(ledgers) -> None:
    a, b = ledgers
    reserve(a, "warm")
    reserve(a, "warm-other", tenant="other")
    with a.store.batch() as batch:
        batch.current = "first"
        reserve(a, "k1")
        batch.current = "unrelated"
        reserve(a, "k2", tenant="other")
        b.admin.freeze("tenant:acme", USD, tenant="acme")  # another process changes acme's budget meanwhile
        b.admin.unfreeze("tenant:acme", USD, tenant="acme")
        batch.current = "second"
        reserve(a, "k3")  # read the first one's writes
    assert batch.failed == {"first", "second"}
    assert reserved(b) == 100 and reserved(b, "other") == 200  # acme: warm; other: both
    # run again by themselves, they settle exactly
    reserve(a, "k1")
    reserve(a, "k3")
    assert reserved(b) == 300


def test_moves_of_one_budget_by_two_processes_do_not_conflict(ledgers) -> None:
    """Reserves and commits only move the counters (the script adds its deltas): another process's moves of the
    same budget meanwhile fail nothing, and both land."""
    a, b = ledgers
    held = reserve(a, "warm")
    with a.store.batch() as batch:
        batch.current = "first"
        reserve(a, "k1")
        reserve(b, "meanwhile", amount=50)
        b.commit(held, {"idempotency_key": "c", "actual": usd(30)}, tenant="acme")
        batch.current = "second"
        reserve(a, "k2")
    assert batch.failed == set()
    assert reserved(a) == reserved(b) == 250
    balance = b.balances({"tenant": "acme"}, tenant="acme").balances[0]
    assert (balance.spent.amount, balance.remaining.amount) == (30, 1_000 - 30 - 250)


def test_moves_that_would_overdraw_fail_and_run_again_on_the_real_balance(ledgers) -> None:
    """A move that lowers remaining commits only if remaining stays above zero: one decided on a stale balance
    fails, runs again on the real one and is refused; a move down to exactly zero checks the exact version."""
    a, b = ledgers
    reserve(a, "warm", amount=100)  # a's cache: 900 left
    reserve(b, "other", amount=800)  # 100 left, a does not know
    with a.store.batch() as batch:
        batch.current = "stale"
        reserve(a, "too-much", amount=500)
    assert batch.failed == {"stale"}
    with pytest.raises(BudgetExceeded):
        reserve(a, "too-much", amount=500)
    reserve(a, "exact", amount=100)  # down to zero: allowed, on the exact balance
    with pytest.raises(BudgetExceeded):
        reserve(b, "none-left", amount=1)
    assert reserved(a) == 1_000


def test_a_settled_batch_and_its_transactions_are_freed_by_reference_counting(ledgers) -> None:
    """A batch's transactions hold their batch while it runs; once it is settled it lets them go, so neither is
    cyclic garbage (left to the collector, a batch's records cost a server a sixth of its CPU)."""
    a, _b = ledgers
    reserve(a, "warm")
    gc.collect()
    gc.disable()
    try:
        with a.store.batch() as batch:
            for i in range(3):
                batch.current = i
                reserve(a, f"k{i}")
        freed = weakref.ref(batch)  # (each transaction holds it: it outlives none of them)
        del batch
        assert freed() is None
    finally:
        gc.enable()
    assert reserved(a) == 400
