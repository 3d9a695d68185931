"""A server's requests leave no cyclic garbage: every record, transaction and batch a reserve+commit makes is freed
by reference counting when it ends. `cycles serve` relies on it: it runs the collector rarely (app.tune_gc), which
is only harmless while requests leave nothing for it to find. Real HTTP on loopback, 16 clients at once (so the
server batches), on SQLite and on Redis (whose batches are sent on the event loop's connection)."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

import httpx
import pytest

from cycles import Client
from cycles.ledger import Ledger, open_store
from cycles.server import create_app
from cycles.server.testing import LiveServer

from .conftest import ADMIN_KEY, USD, usd

SUBJECT = {"tenant": "acme", "workspace": "prod"}


def funded(url: str) -> str:
    with Client(url, admin_api_key=ADMIN_KEY, journal=False) as admin:
        admin.tenants.create("acme", "Acme")
        for scope in ("tenant:acme", "tenant:acme/workspace:prod"):
            admin.transport.admin.create_budget({"scope": scope, "unit": USD, "allocated": usd(10**12),
                                                 "tenant_id": "acme"})  # fmt: skip
        return admin.keys.create("acme", "garbage test").key_secret


async def pairs(url: str, key: str, prefix: str, clients: int = 16, each: int = 5) -> None:
    async with httpx.AsyncClient(base_url=url, headers={"X-Cycles-API-Key": key}) as c:

        async def client(n: int) -> None:
            for i in range(each):
                body = {"idempotency_key": f"{prefix}r{n}-{i}", "subject": SUBJECT,
                        "action": {"kind": "llm.completion", "name": "gpt-4o"}, "estimate": usd(1_000)}  # fmt: skip
                reserved = await c.post("/v1/reservations", json=body)
                assert reserved.status_code == 200, reserved.text
                rid = reserved.json()["reservation_id"]
                done = await c.post(f"/v1/reservations/{rid}/commit",
                                    json={"idempotency_key": f"{prefix}c{n}-{i}", "actual": usd(900)})  # fmt: skip
                assert done.status_code == 200, done.text

        await asyncio.gather(*(client(n) for n in range(clients)))


def ours(garbage: list[Any]) -> list[str]:
    return sorted({type(o).__qualname__ for o in garbage if type(o).__module__.startswith("cycles")})


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_reserves_and_commits_leave_no_cyclic_garbage(tmp_path: Path, kind: str, request: pytest.FixtureRequest):
    url = f"sqlite:///{tmp_path / 'cycles.db'}" if kind == "sqlite" else request.getfixturevalue("redis_url")
    ledger = Ledger(open_store(url))
    app = create_app(ledger, admin_api_key=ADMIN_KEY, sweep_interval=None, webhook_interval=None)
    with LiveServer(app, lifespan="off") as live:
        key = funded(live.url)
        asyncio.run(pairs(live.url, key, "warm-"))  # connections, caches and lazy imports settle
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds is kept in gc.garbage instead of freed
        try:
            asyncio.run(pairs(live.url, key, "measured-"))
            gc.collect()
            found = ours(gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    ledger.store.close()
    assert found == []
