"""`cycles serve --store redis://...`: several worker processes on one Redis, the sweep lease, and failures: a server
killed with SIGKILL under load, Redis paused (SIGSTOP) and restarted mid-load.

What must hold: every commit a client saw acknowledged is in Redis afterwards; requests that meet an unreachable
Redis get a 503 with the protocol's error body; the same requests, repeated with their idempotency keys once Redis
is back, settle exactly; the ledger identity holds at every level.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
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
from ..redis_server import redis_client, redis_cluster, redis_server

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
    r = redis_client(url, decode_responses=True)
    try:
        keys = r.keys("{t:acme}:*", target_nodes="all") if url.startswith("redis+cluster") else r.keys("{t:acme}:*")
        hashes = {k: r.hgetall(k) for k in keys if r.type(k) == "hash"}
    finally:
        r.close()
    records = {k: json.loads(h["d"]) for k, h in hashes.items()}
    for k, h in hashes.items():
        if ":b:" in k:  # the counters the commit script moves live beside the record, remaining with them
            d = records[k]
            d["reserved"], d["spent"] = int(h["r"]), int(h["s"])
            assert int(h["m"]) == d["allocated"] - d["spent"] - d["reserved"] - d["debt"], (k, h)
    return records


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
def test_two_workers_on_one_redis_admit_exactly_what_fits(tmp_path: Path, any_redis_url: str) -> None:
    """Over TCP, over TLS (batches on the event loop's own TLS connection) and on a Redis Cluster (the loop's
    connection to each primary)."""
    redis_url = any_redis_url
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
        holder = redis_client(redis_url, decode_responses=True).get("cycles:lease:sweep")
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


# ------------------------------------------------------------------------------------------------ failures
class Load:
    """`clients` clients doing reserve+commit pairs against a server until told to stop, recording what each
    request got: acknowledged commits, 503s (with their bodies), and the pairs left unfinished."""

    def __init__(self, url: str, key: str, clients: int = 8) -> None:
        self.url, self.key, self.clients = url, key, clients
        self.committed: dict[str, int] = {}  # reservation id -> actual, for every commit answered 200
        self.unfinished: list[int] = []  # pairs a request of which failed: redone later with the same keys
        self.unavailable: list[dict[str, Any]] = []  # 503 bodies
        self.other_errors: list[tuple[int, str]] = []
        self.statuses: list[tuple[float, int]] = []  # (time, status) of every response
        self.stop = False
        self._pairs = 0

    def actual(self, pair: int) -> int:
        return X - pair % 1_000

    async def pair(self, c: httpx.AsyncClient, pair: int) -> bool:
        """One reserve+commit with keys derived from `pair`; True when the commit was acknowledged."""
        reserved = await self.post(c, "/v1/reservations", reserve_body(f"r-{pair}"))
        if reserved is None:
            return False
        rid = reserved["reservation_id"]
        body = {"idempotency_key": f"c-{pair}", "actual": usd(self.actual(pair))}
        if await self.post(c, f"/v1/reservations/{rid}/commit", body) is None:
            return False
        self.committed[rid] = self.actual(pair)
        return True

    async def post(self, c: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        response = await c.post(path, json=body)
        self.statuses.append((time.monotonic(), response.status_code))
        if response.status_code == 200:
            return response.json()
        if response.status_code == 503:
            self.unavailable.append(response.json())
        else:
            self.other_errors.append((response.status_code, response.text))
        return None

    async def client(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, headers={"X-Cycles-API-Key": self.key}, timeout=30) as c:
            while not self.stop:
                pair = self._pairs
                self._pairs += 1
                try:
                    done = await self.pair(c, pair)
                except httpx.HTTPError:  # the server went away mid-request
                    done = False
                    await asyncio.sleep(0.05)
                if not done:
                    self.unfinished.append(pair)

    async def run(self, seconds: float, during: Any = None) -> None:
        """Load for `seconds`; `during` (a coroutine function) runs alongside, then the load stops."""
        tasks = [asyncio.create_task(self.client()) for _ in range(self.clients)]
        if during is not None:
            await during()
        await asyncio.sleep(seconds)
        self.stop = True
        await asyncio.gather(*tasks)

    async def redo(self) -> None:
        """Every unfinished pair again, with its own idempotency keys: each must now settle."""
        async with httpx.AsyncClient(base_url=self.url, headers={"X-Cycles-API-Key": self.key}, timeout=30) as c:
            for pair in self.unfinished:
                assert await self.pair(c, pair), (pair, self.other_errors[-1:], self.unavailable[-1:])
        self.unfinished = []


def check_committed(url: str, load: Load, allocations: list[int]) -> None:
    reservations = assert_settled(url, allocations)
    lost = [rid for rid in load.committed if reservations.get(rid, {}).get("status") != "COMMITTED"]
    assert not lost, f"{len(lost)} acknowledged commits are not in Redis: {lost[:5]}"
    for rid, actual in load.committed.items():
        assert reservations[rid]["committed"] == actual


def test_kill_9_of_a_server_under_load_loses_no_acknowledged_commit(tmp_path: Path) -> None:
    allocations = [10**15] * 3
    with redis_server("--appendonly", "yes", "--appendfsync", "always") as redis_proc:
        server = CyclesServe(tmp_path, store=redis_proc.url, sweep_interval=0.5).start()
        try:
            key = setup_tenant(server, allocations)
            load = Load(server.url, key)

            async def kill_soon() -> None:
                await asyncio.sleep(1.5)
                os.killpg(server.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]

            asyncio.run(load.run(0.5, during=kill_soon))
        finally:
            server.kill()
        assert len(load.committed) > 20, "the load never got going"
        check_committed(redis_proc.url, load, allocations)

        # a new server on the same Redis finishes what the killed one left half done
        with CyclesServe(tmp_path, store=redis_proc.url, sweep_interval=0.5) as again:
            redo = Load(again.url, key)
            redo.unfinished = load.unfinished
            asyncio.run(redo.redo())
            load.committed.update(redo.committed)
        check_committed(redis_proc.url, load, allocations)

        # and Redis itself killed: with appendfsync always, nothing acknowledged is lost either
        redis_proc.kill()
        redis_proc.start()
        check_committed(redis_proc.url, load, allocations)


def outage_under_load(tmp_path: Path, url: str, target: Any) -> None:
    """`cycles serve` on `url` under load while `target` (a RedisProcess) stops (SIGSTOP) for 2 s, then is killed
    and restarted: 503s with the protocol's body, never another error, recovery once it is back, and every
    acknowledged commit kept."""
    allocations = [10**15] * 3
    with CyclesServe(tmp_path, store=url, sweep_interval=0.5) as server:
        key = setup_tenant(server, allocations)
        load = Load(server.url, key)

        async def outages() -> None:
            await asyncio.sleep(1.0)
            target.process.send_signal(signal.SIGSTOP)
            await asyncio.sleep(2.0)
            target.process.send_signal(signal.SIGCONT)
            await asyncio.sleep(1.0)
            target.kill()
            await asyncio.sleep(1.0)
            await asyncio.to_thread(target.start)

        asyncio.run(load.run(1.5, during=outages))
        assert load.unavailable, "no request met the outage"
        assert not load.other_errors, load.other_errors[:3]
        for body in load.unavailable:
            assert body["error"] == "INTERNAL_ERROR" and "Redis" in body["message"] and body["request_id"], body
        last_503 = max(t for t, status in load.statuses if status == 503)
        assert any(t > last_503 and status == 200 for t, status in load.statuses), "no recovery after the outage"
        asyncio.run(load.redo())
        with httpx.Client(base_url=server.url) as c:
            assert c.get("/readyz").status_code == 200
    check_committed(url, load, allocations)


def test_redis_paused_and_restarted_mid_load_gives_503s_then_recovers(tmp_path: Path) -> None:
    with redis_server("--appendonly", "yes", "--appendfsync", "always") as redis_proc:
        outage_under_load(tmp_path, redis_proc.url + "?socket_timeout=0.5&socket_connect_timeout=0.5", redis_proc)


def test_a_cluster_node_paused_and_restarted_mid_load_gives_503s_then_recovers(tmp_path: Path) -> None:
    """The primary holding the tenant's slot: the server's connection to it (its batches go on the event loop's
    connection to each primary) fails with 503s, and is opened again once it is back."""
    with redis_cluster(3, "--appendonly", "yes", "--appendfsync", "always") as nodes:
        url = f"redis+cluster://127.0.0.1:{nodes[0].port}?socket_timeout=0.5&socket_connect_timeout=0.5"
        cluster = redis_client(url)
        owner = next(n for n in nodes if n.port == cluster.get_node_from_key("{t:acme}").port)
        cluster.close()
        outage_under_load(tmp_path, url, owner)
