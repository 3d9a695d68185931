"""A real `cycles serve` killed with SIGKILL between claiming a webhook delivery and sending it: after a restart the
delivery arrives (at least once, never zero), because a claim is a lease in the store, not a pop (SQLite and Redis)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time

import httpx
import pytest
import redis

from ..interop._server import CyclesServe
from .conftest import USD, usd

pytestmark = pytest.mark.slow

ARGS = ("--webhook-interval", "0.1", "--webhook-lease", "1", "--webhook-allow-private")


def wait_until(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def deliveries(server: CyclesServe) -> list[tuple[str, int, int]]:
    """(status, lease_until_ms, attempts) of every delivery, read straight from the store's SQLite file or Redis."""
    if server.store.startswith("redis"):
        r = redis.Redis.from_url(server.store, decode_responses=True)
        try:
            found = [json.loads(r.hget(k, "d")) for k in r.scan_iter("{t:*}:d:*")]
        finally:
            r.close()
        return [(d["status"], d["lease_until_ms"], d["attempts"]) for d in found]
    with sqlite3.connect(server.db) as c:
        return c.execute("SELECT status, lease_until_ms, json_extract(body, '$.attempts') FROM deliveries").fetchall()


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_delivery_survives_kill_9_between_claim_and_send(tmp_path, receiver, monkeypatch, request, kind):
    store = request.getfixturevalue("redis_url") if kind == "redis" else None
    monkeypatch.setenv("CYCLES_WEBHOOK_STALL_AFTER_CLAIM", "300")  # the test-only hook: hold after claiming
    server = CyclesServe(tmp_path, sweep_interval=0, extra_args=ARGS, store=store).start()
    try:
        with httpx.Client(base_url=server.url, headers={"X-Admin-API-Key": server.admin_key}) as admin:
            admin.post("/v1/admin/tenants", json={"tenant_id": "acme", "name": "Acme"}).raise_for_status()
            created = admin.post("/v1/admin/webhooks", params={"tenant_id": "acme"},
                                 json={"url": receiver.url, "event_types": ["budget.created"]})  # fmt: skip
            assert created.status_code == 201, created.text
            secret = created.json()["signing_secret"]
            admin.post("/v1/admin/budgets", json={"scope": "tenant:acme", "unit": USD, "allocated": usd(10),
                                                  "tenant_id": "acme"}).raise_for_status()  # fmt: skip
            event_id = admin.get("/v1/admin/events", params={"event_type": "budget.created"}).json()["events"][0][
                "event_id"
            ]
        wait_until(lambda: "holding 1 claimed deliveries" in server.log)
        ((status, lease, attempts),) = deliveries(server)
        assert status == "PENDING" and lease > 0 and attempts == 0  # claimed, not sent
        os.killpg(server.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
        server.proc.wait(10)  # type: ignore[union-attr]
    finally:
        server.kill()
    assert receiver.deliveries == []

    monkeypatch.delenv("CYCLES_WEBHOOK_STALL_AFTER_CLAIM")
    with CyclesServe(tmp_path, sweep_interval=0, extra_args=ARGS, store=store) as restarted:
        got = receiver.wait_for(1, timeout=30)
        assert len(got) >= 1  # at least once: never zero
        assert all(d.headers["x-cycles-event-id"] == event_id for d in got)
        assert receiver.signed(secret) == got
        wait_until(lambda: deliveries(restarted)[0][0] == "SUCCESS")
