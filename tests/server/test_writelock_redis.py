"""The write lock's batches on a real Redis (batch_only, `store.batch(deferred=True)`): a batch's round trip is not
waited for with the event loop blocked; the next batch runs meanwhile and reads what the one on its way wrote; a
batch whose calls failed runs them again once no batch is on its way, and they settle exactly.

Each runs on a standalone Redis over TCP, over TLS, and on a 3-node Redis Cluster (a connection per primary). Redis
is held still with `CLIENT PAUSE ... WRITE` (reads go on, commit scripts wait; on a cluster, every node), so what
happens while a batch is on its way is seen without any timing."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterator
from typing import Any

import pytest

from cycles.ledger import Ledger
from cycles.ledger.redis import open_redis
from cycles.server.writelock import WriteLock

from ..redis_server import redis_client

redis = pytest.importorskip("redis")

USD = "USD_MICROCENTS"
ACTION = {"kind": "llm.completion", "name": "gpt-4o"}


def usd(n: int) -> dict[str, Any]:
    return {"unit": USD, "amount": n}


def reserve(ledger: Ledger, key: str, amount: int = 100) -> Any:
    body = {"idempotency_key": key, "subject": {"tenant": "acme"}, "action": ACTION, "estimate": usd(amount)}
    return ledger.reserve(body, tenant="acme")


@pytest.fixture
def url(any_redis_url: str) -> str:
    return any_redis_url


@pytest.fixture
def ledgers(url: str, clock: Any) -> Iterator[tuple[Ledger, Ledger]]:
    stores = [open_redis(url), open_redis(url)]
    out = (Ledger(stores[0], clock=clock), Ledger(stores[1], clock=clock))
    out[1].admin.create_budget({"scope": "tenant:acme", "unit": USD, "allocated": usd(1_000)})
    yield out
    for s in stores:
        s.close()


@pytest.fixture
def pause(url: str) -> Iterator[Any]:
    """pause(): Redis (every node of a cluster) stops running writes (commit scripts) until unpause(), or 5 s at
    most."""
    client = redis_client(url)
    nodes = [n.redis_connection for n in client.get_primaries()] if isinstance(client, redis.RedisCluster) else [client]

    class Pause:
        def __call__(self) -> None:
            for node in nodes:
                node.execute_command("CLIENT", "PAUSE", 5000, "WRITE")

        def unpause(self) -> None:
            for node in nodes:
                node.execute_command("CLIENT", "UNPAUSE")

    pauser = Pause()
    yield pauser
    pauser.unpause()
    client.close()


def lock_for(ledger: Ledger) -> WriteLock:
    return WriteLock(None, functools.partial(ledger.store.batch, deferred=True), batch_only=True)


class Recorded:
    """`work(name, key)`: a reserve on `ledger`, noting in `ran` each time the lock runs it (runs again included)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.ran: list[str] = []

    def __call__(self, name: str, key: str) -> Any:
        self.ran.append(name)
        return reserve(self.ledger, key)


def reserved(url: str) -> int:
    """The tenant budget's reserved counter as Redis holds it (a plain read: it goes on while Redis is paused)."""
    client = redis_client(url)
    try:
        return int(client.hget("{t:acme}:b:USD_MICROCENTS:tenant:acme", "r"))
    finally:
        client.close()


async def turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_the_event_loop_runs_on_while_a_batch_is_on_its_way(ledgers, pause, url) -> None:
    a, b = ledgers
    lock = lock_for(a)
    ticks: list[int] = []

    async def ticker() -> None:  # the worker's other requests, served meanwhile
        for i in range(50):
            ticks.append(i)
            await asyncio.sleep(0)

    async def main() -> None:
        await lock.run(lambda: reserve(a, "warm"))  # the store's connection is open, its records known
        pause()
        first = asyncio.ensure_future(lock.run(lambda: reserve(a, "k1")))
        await asyncio.ensure_future(ticker())
        assert not first.done()  # its commit waits for Redis, and the loop ran the ticker to its end meanwhile
        assert reserved(url) == 100
        pause.unpause()
        await first
        assert reserved(url) == 200

    asyncio.run(main())


def test_the_next_batch_runs_meanwhile_and_reads_what_the_one_on_its_way_wrote(ledgers, pause, url) -> None:
    a, b = ledgers
    lock = lock_for(a)
    work = Recorded(a)
    ran = work.ran

    def read_budget() -> int:  # a transaction of the next batch: the budget as it reads it
        ran.append("read")
        with a.store.transaction() as tx:
            return tx.get_budgets(USD, ["tenant:acme"])[0].reserved

    async def main() -> None:
        await lock.run(lambda: reserve(a, "warm"))
        pause()
        first = asyncio.ensure_future(lock.run(lambda: work("first", "k1")))
        await turns(5)
        second = asyncio.ensure_future(lock.run(lambda: work("second", "k1")))  # the same reserve again
        third = asyncio.ensure_future(lock.run(read_budget))
        await turns(5)
        assert ran == ["first", "second", "read"]  # the next batch ran while the first one was on its way
        assert not first.done() and not second.done() and not third.done()
        pause.unpause()
        one, two, seen = await first, await second, await third
        assert seen == 200  # warm, and k1 of the batch that was on its way (checked once it had landed)
        assert two.reservation_id == one.reservation_id  # the same reserve: one hold
        assert reserved(url) == 200

    asyncio.run(main())


def test_failed_calls_run_again_once_no_batch_is_on_its_way(ledgers, pause, url) -> None:
    a, b = ledgers
    lock = lock_for(a)
    work = Recorded(a)
    ran = work.ran

    async def main() -> None:
        await lock.run(lambda: reserve(a, "warm"))  # a remembers the budget
        b.admin.freeze("tenant:acme", USD, tenant="acme")  # another process writes it meanwhile: a's copy is stale
        b.admin.unfreeze("tenant:acme", USD, tenant="acme")
        pause()
        first = asyncio.ensure_future(lock.run(lambda: work("first", "k1")))
        await turns(5)
        second = asyncio.ensure_future(lock.run(lambda: work("second", "k1")))  # reads what the first one wrote
        await turns(5)
        assert ran == ["first", "second"]
        pause.unpause()
        one, two = await first, await second
        # both failed at Redis and ran again, in order, once both batches had landed (the second one, a replay of
        # the first, until it ran by itself: a batch does not replay a reserve whose key another one took)
        assert ran[2] == "first" and ran[3:] and set(ran[3:]) == {"second"}
        assert two.reservation_id == one.reservation_id
        assert reserved(url) == 200  # warm and k1, once

    asyncio.run(main())


def test_a_store_serves_one_event_loop_after_another(ledgers, url) -> None:
    a, _b = ledgers
    for key in ("k1", "k2"):  # each asyncio.run is a new loop: the store opens a connection on each
        lock = lock_for(a)
        asyncio.run(lock.run(lambda key=key: reserve(a, key)))
    assert reserved(url) == 200


def test_a_cluster_batch_whose_slot_moved_meanwhile_still_commits(redis_cluster_url, clock) -> None:
    """The tenant's slot moves to another node (keys and all, as a resharding does) after the store mapped the
    cluster: the batch's script, written to the old node, is redirected (MOVED) and runs on the new one, once."""
    store = open_redis(redis_cluster_url)
    a = Ledger(store, clock=clock)
    try:
        a.admin.create_budget({"scope": "tenant:acme", "unit": USD, "allocated": usd(1_000)})
        lock = lock_for(a)

        async def main() -> Any:
            await lock.run(lambda: reserve(a, "warm"))  # the store's connections are open, the cluster mapped
            move_slot(redis_cluster_url, "{t:acme}")
            return await asyncio.wait_for(lock.run(lambda: reserve(a, "k1")), 60)  # (a hang guard, not a timing)

        assert asyncio.run(main()).decision == "ALLOW"
        assert reserved(redis_cluster_url) == 200
        assert (
            a.reserve(
                {"idempotency_key": "k1", "subject": {"tenant": "acme"}, "action": ACTION, "estimate": usd(100)},
                tenant="acme",
            ).decision
            == "ALLOW"
        )  # a replay: still 200
        assert reserved(redis_cluster_url) == 200
    finally:
        store.close()


def move_slot(url: str, tag: str) -> None:
    """Move the slot of hash tag `tag`, with its keys, to another primary (CLUSTER SETSLOT and MIGRATE, as
    `redis-cli --cluster reshard` does), telling every node."""
    cluster = redis_client(url)
    try:
        slot = cluster.keyslot(tag)
        source = cluster.get_node_from_key(tag)
        target = next(n for n in cluster.get_primaries() if n.name != source.name)
        src, dst = source.redis_connection, target.redis_connection
        src_id, dst_id = src.execute_command("CLUSTER", "MYID"), dst.execute_command("CLUSTER", "MYID")
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 10_000)
        if keys:
            src.execute_command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys)
        for node in cluster.get_primaries():
            node.redis_connection.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
    finally:
        cluster.close()


def test_a_deferred_batch_without_an_event_loop_is_sent_at_once(ledgers, url) -> None:
    a, _b = ledgers
    with a.store.batch(deferred=True) as batch:
        batch.current = "k1"
        reserve(a, "k1")
    assert batch.send() is None  # nothing to drive a connection: sent and settled here
    assert batch.failed == set() and reserved(url) == 100
