"""`cycles serve --store redis://...`: several worker processes on one Redis, the sweep lease, and failures: a server
killed with SIGKILL under load, Redis paused (SIGSTOP) and restarted mid-load.

What must hold: every commit a client saw acknowledged is in Redis afterwards; requests that meet an unreachable
Redis get a 503 with the protocol's error body; the same requests, repeated with their idempotency keys once Redis
is back, settle exactly; the ledger identity holds at every level.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from cycles import Client
from cycles.ledger import Ledger
from cycles.ledger.redis import open_redis
from cycles.server.sweep import Sweeper

from ..interop._server import CyclesServe

pytestmark = pytest.mark.slow

USD = "USD_MICROCENTS"
LEVELS = ["tenant:acme", "tenant:acme/workspace:prod", "tenant:acme/workspace:prod/agent:bot"]
SUBJECT = {"tenant": "acme", "workspace": "prod", "agent": "bot"}
ACTION = {"kind": "llm.completion", "name": "gpt-4o"}
X = 7_919
B = 1_000_003  # the workspace's budget: B // X reserves fit


def usd(n: int) -> dict[str, Any]:
    return {"unit": USD, "amount": n}


def setup_tenant(server: CyclesServe, allocations: list[int]) -> str:
    with Client(server.url, admin_api_key=server.admin_key, journal=False) as admin:
        admin.tenants.create("acme", "Acme")
        for scope, amount in zip(LEVELS, allocations, strict=True):
            admin.transport.admin.create_budget(
                {"scope": scope, "unit": USD, "allocated": usd(amount), "tenant_id": "acme"}
            )
        return admin.keys.create("acme", "redis test").key_secret


def reserve_body(key: str, **extra: Any) -> dict[str, Any]:
    return {
        "idempotency_key": key,
        "subject": SUBJECT,
        "action": ACTION,
        "estimate": usd(X),
        "ttl_ms": 600_000,
        **extra,
    }


def stored(url: str) -> dict[str, dict[str, Any]]:
    """Every record of tenant acme as stored (below the rules, no sweep): key -> data."""
    import redis

    r = redis.Redis.from_url(url, decode_responses=True)
    try:
        return {k: json.loads(r.hget(k, "d")) for k in r.keys("{t:acme}:*") if r.type(k) == "hash"}
    finally:
        r.close()


def assert_settled(url: str, allocations: list[int]) -> dict[str, dict[str, Any]]:
    """The ledger identity at every level, and budgets that agree with the reservations: reserved = the ACTIVE
    estimates, spent = what was charged. Returns the reservations by id."""
    records = stored(url)
    reservations = {d["reservation_id"]: d for k, d in records.items() if ":r:" in k}
    budgets = {d["scope"]: d for k, d in records.items() if ":b:" in k}
    assert set(budgets) == set(LEVELS)
    held = sum(r["estimate"] for r in reservations.values() if r["status"] == "ACTIVE")
    charged = sum(r["committed"] for r in reservations.values() if r["status"] == "COMMITTED")
    for scope, allocated in zip(LEVELS, allocations, strict=True):
        b = budgets[scope]
        assert b["allocated"] == allocated and b["debt"] == 0, b
        assert (b["reserved"], b["spent"]) == (held, charged), (scope, b, held, charged)
        assert allocated - b["spent"] - b["reserved"] - b["debt"] >= 0
    return reservations


# ------------------------------------------------------------------------------------------ several workers
def test_two_workers_on_one_redis_admit_exactly_what_fits(tmp_path: Path, redis_url: str) -> None:
    allocations = [10 * B, B, 3 * B]
    with CyclesServe(
        tmp_path, workers=2, store=redis_url, sweep_interval=0.2, extra_args=("--keep-alive", "60")
    ) as server:
        assert len(server.worker_pids()) == 2
        key = setup_tenant(server, allocations)

        async def reserve_all(n: int) -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, headers={"X-Cycles-API-Key": key}, timeout=60) as c:
                return await asyncio.gather(
                    *(c.post("/v1/reservations", json=reserve_body(f"r-{i}")) for i in range(n))
                )

        responses = asyncio.run(reserve_all(200))
        codes = [r.status_code for r in responses]
        assert codes.count(200) == B // X, codes
        assert {r.json()["error"] for r in responses if r.status_code != 200} == {"BUDGET_EXCEEDED"}
        reservations = assert_settled(redis_url, allocations)
        assert sum(r["status"] == "ACTIVE" for r in reservations.values()) == B // X

        # one worker holds the sweep lease, and it expires holds without anyone reading them
        import redis

        holder = redis.Redis.from_url(redis_url, decode_responses=True).get("cycles:lease:sweep")
        assert holder is not None and int(holder.split(":")[1]) in server.worker_pids()
        first = next(r.json()["reservation_id"] for r in responses if r.status_code == 200)
        with httpx.Client(base_url=server.url, headers={"X-Cycles-API-Key": key}) as c:
            released = c.post(f"/v1/reservations/{first}/release", json={"idempotency_key": "rel"})
            assert released.status_code == 200, released.text
            short = c.post("/v1/reservations", json=reserve_body("short", ttl_ms=1_000, grace_period_ms=0))
            assert short.status_code == 200, short.text
        rid = short.json()["reservation_id"]
        deadline = time.monotonic() + 30
        while stored(redis_url)[f"{{t:acme}}:r:{rid}"]["status"] != "EXPIRED":
            assert time.monotonic() < deadline, "the sweeper never expired the short reservation"
            time.sleep(0.2)
        assert_settled(redis_url, allocations)


def test_one_sweeper_at_a_time_holds_the_lease(redis_url: str, clock: Any) -> None:
    """Two processes' sweepers on one Redis: only the lease holder sweeps; when it stops, the other takes over."""
    stores = [open_redis(redis_url), open_redis(redis_url)]
    ledgers = [Ledger(store, clock=clock) for store in stores]
    ledgers[0].admin.create_budget({"scope": "tenant:acme", "unit": USD, "allocated": usd(1_000)})

    def hold(key: str) -> None:
        ledgers[0].reserve(
            {"idempotency_key": key, "subject": {"tenant": "acme"}, "action": ACTION, "estimate": usd(10),
             "ttl_ms": 1_000, "grace_period_ms": 0}
        )  # fmt: skip

    async def scenario() -> None:
        first, second = Sweeper(ledgers[0], 0.05), Sweeper(ledgers[1], 0.05)
        hold("a")
        clock.advance(2_000)
        assert await first.sweep_once() == 1 and first.leader
        hold("b")
        clock.advance(2_000)
        assert await second.sweep_once() == 0 and not second.leader, "the lease is held: the second must not sweep"
        await first.stop()  # drops the lease
        assert await second.sweep_once() == 1 and second.leader
        assert await first.sweep_once() == 0 and not first.leader
        await second.stop()

    try:
        asyncio.run(scenario())
    finally:
        for store in stores:
            store.close()
