"""The Redis store on a 3-node Redis Cluster: tenants spread over the nodes' slots, every operation works (runtime,
admin, reads, the sweep, a tenant's closing cascade), and no script or pipeline ever crosses slots (CROSSSLOT would
raise). The conformance suite also runs whole on the cluster (tests/conformance, authority "redis-cluster")."""

from __future__ import annotations

from typing import Any

import pytest

from cycles.errors import BudgetExceeded
from cycles.ledger import Ledger
from cycles.ledger.redis import open_redis, tag

USD = "USD_MICROCENTS"
ACTION = {"kind": "llm.completion", "name": "gpt-4o"}
TENANTS = [f"tenant-{i}" for i in range(12)]


def usd(n: int) -> dict[str, Any]:
    return {"unit": USD, "amount": n}


@pytest.fixture
def ledger(redis_cluster_url: str, clock: Any):
    store = open_redis(redis_cluster_url)
    assert store.cluster
    yield Ledger(store, clock=clock)
    store.close()


def test_tenants_spread_over_the_cluster_and_every_operation_works(ledger: Ledger, clock: Any) -> None:
    cluster = ledger.store.redis  # type: ignore[attr-defined]
    nodes = {cluster.get_node_from_key(tag(t) + ":tenant").name for t in TENANTS}
    assert len(nodes) == 3, f"12 tenants should land on all 3 nodes, got {nodes}"

    admin = ledger.admin
    held: dict[str, str] = {}
    for i, t in enumerate(TENANTS):
        admin.create_tenant({"tenant_id": t, "name": t.title()})
        for scope in (f"tenant:{t}", f"tenant:{t}/workspace:w", f"tenant:{t}/workspace:w/agent:a"):
            admin.create_budget({"scope": scope, "unit": USD, "allocated": usd(1_000_000)}, tenant=t)
        key = admin.create_api_key({"tenant_id": t, "name": "k"})
        assert ledger.admin.authenticate(key.key_secret).tenant_id == t
        admin.create_policy({"name": "caps", "scope_pattern": "agent:a", "caps": {"max_tokens": 100}}, tenant=t)
        subject = {"tenant": t, "workspace": "w", "agent": "a"}

        def reserve(k: str, amount: int, subject: dict[str, str] = subject, t: str = t, **extra: Any) -> str:
            body = {"idempotency_key": k, "subject": subject, "action": ACTION, "estimate": usd(amount), **extra}
            return ledger.reserve(body, tenant=t).reservation_id

        committed = reserve("c", 1_000)
        charged = ledger.commit(committed, {"idempotency_key": "c", "actual": usd(700 + i)}, tenant=t).charged
        assert charged.amount == 700 + i
        assert (
            ledger.reserve(
                {"idempotency_key": "c", "subject": subject, "action": ACTION, "estimate": usd(1_000)}, tenant=t
            ).reservation_id
            == committed
        )  # a replay
        released = reserve("r", 500)
        ledger.release(released, {"idempotency_key": "r"}, tenant=t)
        extended = reserve("e", 300, ttl_ms=10_000)
        ledger.extend(extended, {"idempotency_key": "e", "extend_by_ms": 5_000}, tenant=t)
        held[t] = reserve("h", 200, ttl_ms=1_000, grace_period_ms=0)  # swept below
        ledger.event({"idempotency_key": "ev", "subject": subject, "action": ACTION, "actual": usd(50)}, tenant=t)
        assert (
            ledger.decide(
                {"idempotency_key": "d", "subject": subject, "action": ACTION, "estimate": usd(1)}, tenant=t
            ).decision
            == "ALLOW_WITH_CAPS"
        )
        with pytest.raises(BudgetExceeded):
            reserve("too-much", 10**9)
        admin.fund(f"tenant:{t}/workspace:w/agent:a", USD, {"operation": "CREDIT", "amount": usd(10)}, tenant=t)

    clock.advance(30_000)
    assert ledger.sweep() == 2 * len(TENANTS)  # every tenant's short hold and extended one, across all slots
    for i, t in enumerate(TENANTS):
        listed = ledger.list_reservations({"tenant": t, "limit": 50}, tenant=t).reservations
        statuses = sorted(r.status for r in listed)
        assert statuses == ["COMMITTED", "EXPIRED", "EXPIRED", "RELEASED"], (t, statuses)
        for b in ledger.balances({"tenant": t, "include_children": True}, tenant=t).balances:
            assert b.reserved.amount == 0 and b.spent.amount == 700 + i + 50, (t, b)
            assert b.remaining.amount == b.allocated.amount - b.spent.amount - b.reserved.amount - b.debt.amount
    # the admin views across tenants (they walk every tenant's slot)
    assert [t.tenant_id for t in admin.list_tenants(limit=100).tenants] == sorted(TENANTS)
    assert len(admin.list_budgets(limit=200).ledgers) == 3 * len(TENANTS)
    assert len(admin.list_api_keys(limit=200).keys) == len(TENANTS)
    # closing a tenant cascades within its slot
    reserve_open = ledger.reserve(
        {"idempotency_key": "open", "subject": {"tenant": TENANTS[0]}, "action": ACTION, "estimate": usd(5)},
        tenant=TENANTS[0],
    ).reservation_id
    admin.update_tenant(TENANTS[0], {"status": "CLOSED"})
    assert ledger.get_reservation(reserve_open).status == "RELEASED"
    assert {b.status for b in admin.list_budgets(tenant_id=TENANTS[0]).ledgers} == {"CLOSED"}
