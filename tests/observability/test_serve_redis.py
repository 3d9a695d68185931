"""`cycles serve --store redis://...` (two worker processes on one Redis): the webhook worker delivers what the
outbox holds to a real loopback receiver, /metrics counts both workers' decisions, and /dashboard shows the Redis
ledger's balances and events."""

from __future__ import annotations

import httpx
import pytest

from cycles.ledger.redis import open_redis
from cycles.ledger.store import EventFilter

from ..interop._server import CyclesServe
from .conftest import USD, tenant_key, usd
from .test_admin_api import reserve_body
from .test_dashboard import Cells
from .test_metrics import scrape, value

pytestmark = pytest.mark.slow

ARGS = ("--webhook-interval", "0.1", "--webhook-allow-private")


def test_serve_on_redis_delivers_webhooks_and_serves_metrics_and_the_page(tmp_path, redis_url, receiver):
    with CyclesServe(tmp_path, workers=2, store=redis_url, sweep_interval=0, extra_args=ARGS) as server:
        with httpx.Client(base_url=server.url, headers={"X-Admin-API-Key": server.admin_key}) as admin:
            key = tenant_key(admin, "acme")
            selects = {"url": receiver.url, "event_types": ["budget.created", "reservation.denied"]}
            created = admin.post("/v1/admin/webhooks", params={"tenant_id": "acme"}, json=selects)
            assert created.status_code == 201, created.text
            secret = created.json()["signing_secret"]
            admin.post("/v1/admin/budgets", json={"scope": "tenant:acme", "unit": USD, "allocated": usd(100),
                                                  "tenant_id": "acme"}).raise_for_status()  # fmt: skip
            with httpx.Client(base_url=server.url, headers={"X-Cycles-API-Key": key}) as acme:
                assert acme.post("/v1/reservations", json=reserve_body("small", 30)).is_success
                assert acme.post("/v1/reservations", json=reserve_body("big", 1_000)).status_code == 409

            got = receiver.wait_for(2)
            assert sorted(d.event["event_type"] for d in got) == ["budget.created", "reservation.denied"]
            assert receiver.signed(secret) == got

            samples = scrape(admin)
            assert value(samples, "cycles_reservations_total", decision="ALLOW", reason_code="") == 1
            assert value(samples, "cycles_reservations_total", decision="DENY", reason_code="BUDGET_EXCEEDED") == 1

            page = admin.get("/dashboard")
            assert page.status_code == 200
            cells = Cells()
            cells.feed(page.text)

    store = open_redis(redis_url)  # what the page showed is what Redis holds
    try:
        with store.transaction(readonly=True) as tx:
            (b,) = tx.list_budgets(tenant_id="acme")
            events = tx.list_events(EventFilter(), "created_at_ms", True, None, 100)
    finally:
        store.close()
    shown = {c: getattr(b, c) for c in Cells.COLUMNS}
    assert cells.balances[("tenant:acme", USD)] == shown and b.reserved == usd(30)["amount"]
    assert {d.event["event_id"] for d in got} <= set(cells.events) <= {e.event_id for e in events}
