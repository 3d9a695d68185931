"""The Redis store's part of observability where it differs from SQLite's: an event or audit entry kept in another
slot than its change (a pseudo-tenant's, on a Redis Cluster another node's) exists only once that change committed,
and webhook claims are per-owner leases that two workers never share. The behaviour itself is tested on every store
by tests/observability (parametrised) and tests/conformance."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from cycles.ledger.redis import RedisStore, open_redis
from cycles.ledger.store import (
    AuditFilter,
    AuditRecord,
    Conflict,
    DeliveryRecord,
    EventFilter,
    OutboxEvent,
    TenantRecord,
    WebhookRecord,
    retrying,
)

NOW = 1_800_000_000_000


@pytest.fixture
def stores(redis_cluster_url: str) -> Iterator[tuple[RedisStore, RedisStore]]:
    """Two stores on one cluster: two server processes."""
    a, b = open_redis(redis_cluster_url), open_redis(redis_cluster_url)
    yield a, b
    a.close()
    b.close()


def change_with_records(tx, n: int) -> None:  # type: ignore[no-untyped-def]
    t = tx.get_tenant("acme")
    t.name = f"Acme {n}"
    tx.put_tenant(t)
    tx.add_audit(AuditRecord(log_id=f"log_{n}", tenant_id="__admin__", created_at_ms=NOW + n,
                             operation="updateTenant", status=200))  # fmt: skip
    tx.add_event(OutboxEvent(event_id=f"evt_{n}", event_type="tenant.updated", tenant_id="__system__",
                             created_at_ms=NOW + n))  # fmt: skip


@retrying  # a read resting on a record this store's cache had stale is known only at its end: run it again
def read(store: RedisStore, what: Callable[[Any], Any]) -> Any:
    with store.transaction(readonly=True) as tx:
        found = what(tx)
    return found


def recorded(store: RedisStore) -> tuple[list[str], list[str]]:
    def both(tx: Any) -> tuple[list[str], list[str]]:
        logs = [a.log_id for a in tx.list_audit(AuditFilter(tenant_id="__admin__"), False, None, 100)]
        return logs, [e.event_id for e in tx.list_events(EventFilter(), "created_at_ms", False, None, 100)]

    return read(store, both)


def test_records_in_other_slots_exist_only_when_their_change_commits(stores) -> None:
    a, b = stores
    with a.transaction() as tx:
        tx.put_tenant(TenantRecord(tenant_id="acme", name="Acme"))
    slots = {a.redis.get_node_from_key(k).name for k in ("{t:acme}", "{t:__admin__}", "{t:__system__}")}
    assert len(slots) > 1  # the three records really are spread over the cluster

    with pytest.raises(Conflict):
        with a.transaction() as tx:
            change_with_records(tx, 1)
            with b.transaction() as other:  # another process changes the tenant before this commits
                t = other.get_tenant("acme")
                t.name = "Acme elsewhere"
                other.put_tenant(t)
    assert recorded(a) == ([], [])  # the change did not commit: neither did its audit entry nor its event

    with a.transaction() as tx:  # what `retrying` does next: run it again, on the current record
        change_with_records(tx, 2)
    assert recorded(a) == (["log_2"], ["evt_2"]) == recorded(b)
    assert read(b, lambda tx: tx.get_tenant("acme").name) == "Acme 2"
    assert read(b, lambda tx: tx.get_event("evt_2").tenant_id) == "__system__"


def queue(store: RedisStore, owners: list[str], per_owner: int) -> set[str]:
    ids = set()
    with store.transaction() as tx:
        for owner in owners:
            tx.put_webhook(WebhookRecord(subscription_id=f"whk_{owner}", tenant_id=owner, url="http://127.0.0.1/h",
                                         signing_secret="s", event_types=["budget.created"], created_at_ms=NOW,
                                         updated_at_ms=NOW))  # fmt: skip
    with store.transaction() as tx:
        for owner in owners:
            for i in range(per_owner):
                d = DeliveryRecord(delivery_id=f"del_{owner}_{i}", subscription_id=f"whk_{owner}",
                                   event_id=f"evt_{owner}_{i}", event_type="budget.created",
                                   created_at_ms=NOW + i, next_attempt_at_ms=NOW + i)  # fmt: skip
                tx.put_delivery(d)
                ids.add(d.delivery_id)
    return ids


def claim(store: RedisStore, now: int, limit: int = 100) -> list[DeliveryRecord]:
    with store.transaction() as tx:
        return tx.claim_deliveries(now, 1_000, limit)


def test_workers_share_the_due_deliveries_under_leases(stores) -> None:
    a, b = stores
    owners = ["acme", "globex", "initech", "__system__"]
    queued = queue(a, owners, 5)
    later = NOW + 10

    with ThreadPoolExecutor(2) as pool:  # two workers claim at once: each delivery goes to exactly one of them
        first, second = pool.map(lambda s: claim(s, later, 12), (a, b))
    got = [d.delivery_id for d in first] + [d.delivery_id for d in second]
    assert len(got) == len(set(got))
    rest = claim(a, later)
    assert sorted(got + [d.delivery_id for d in rest]) == sorted(queued)  # everything, once
    assert claim(b, later) == []  # all leased

    oldest = claim(a, later + 1_000, 4)  # the leases ran out: claimable again, oldest first, across owners
    assert [d.created_at_ms for d in oldest] == [NOW] * 4
    assert {d.subscription_id for d in oldest} == {f"whk_{o}" for o in owners}

    @retrying  # as Webhooks.settle runs: b's cache may hold what a's claims changed since
    def settle() -> None:
        with b.transaction() as tx:  # settled deliveries are never claimed again; the others still are
            for d in oldest:
                d.status, d.lease_until_ms, d.attempts = "SUCCESS", 0, 1
                tx.put_delivery(d)

    settle()
    again = claim(b, later + 2_000)
    assert len(again) == len(queued) - 4 and not {d.delivery_id for d in again} & {d.delivery_id for d in oldest}
    listed = read(a, lambda tx: tx.list_deliveries("whk_acme", "SUCCESS", None, 10))
    assert [d.delivery_id for d in listed] == ["del_acme_0"]
    newest = read(a, lambda tx: tx.list_deliveries("whk_acme", None, None, 2))
    assert [d.delivery_id for d in newest] == ["del_acme_4", "del_acme_3"]
