"""Webhook subscriptions over the admin and tenant APIs, delivered by the worker to a real loopback receiver."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from cycles.errors import InvalidRequest
from cycles.ledger import Ledger
from cycles.ledger.webhooks import Webhooks
from cycles.server import create_app
from cycles.server.testing import LiveServer
from cycles.server.webhooks import WebhookWorker

from .conftest import USD, tenant_key, usd
from .test_admin_api import reserve_body


def setup_acme(admin: httpx.Client, served: Any, *permissions: str) -> httpx.Client:
    acme = served.client(**{"X-Cycles-API-Key": tenant_key(admin, "acme", *permissions)})
    r = admin.post("/v1/admin/budgets", json={"scope": "tenant:acme", "unit": USD, "allocated": usd(100),
                                              "tenant_id": "acme"})  # fmt: skip
    assert r.status_code == 201
    return acme


def subscribe(admin: httpx.Client, url: str, **fields: Any) -> dict[str, Any]:
    body = {"url": url, "event_types": ["reservation.denied", "budget.exhausted"], **fields}
    r = admin.post("/v1/admin/webhooks", params={"tenant_id": "acme"}, json=body)
    assert r.status_code == 201, r.text
    return r.json()


def deliver(served: Any) -> int:
    """One round of the app's delivery worker (the app's own Webhooks, on the test's clock)."""
    worker = WebhookWorker(served.ledger, served.app.state.webhooks)

    async def once() -> int:
        try:
            return await worker.run_once()
        finally:
            await worker.stop()

    return asyncio.run(once())


def test_subscriptions_through_the_admin_api(served, admin, receiver):
    setup_acme(admin, served)
    created = subscribe(admin, receiver.url, name="alerts", retry_policy={"max_retries": 2})
    sub = created["subscription"]
    assert created["signing_secret"].startswith("whsec_") and "signing_secret" not in sub
    assert sub["tenant_id"] == "acme" and sub["status"] == "ACTIVE" and sub["retry_policy"]["max_retries"] == 2
    sid = sub["subscription_id"]
    assert admin.get(f"/v1/admin/webhooks/{sid}").json() == sub
    listed = admin.get("/v1/admin/webhooks", params={"tenant_id": "acme"}).json()
    assert [s["subscription_id"] for s in listed["subscriptions"]] == [sid]
    paused = admin.patch(f"/v1/admin/webhooks/{sid}", json={"status": "PAUSED", "event_types": ["budget.exhausted"]})
    assert paused.status_code == 200 and paused.json()["status"] == "PAUSED"
    assert paused.json()["event_types"] == ["budget.exhausted"]
    assert admin.delete(f"/v1/admin/webhooks/{sid}").status_code == 204
    assert admin.get(f"/v1/admin/webhooks/{sid}").status_code == 404
    kinds = [e["event_type"] for e in admin.get("/v1/admin/events", params={"category": "webhook"}).json()["events"]]
    assert kinds == ["webhook.deleted", "webhook.paused", "webhook.created"]
    logs = admin.get("/v1/admin/audit/logs", params={"resource_type": "webhook"}).json()["logs"]
    ops = [x["operation"] for x in logs]
    assert ops == ["deleteWebhookSubscription", "updateWebhookSubscription", "createWebhookSubscription"]


def test_bad_subscriptions_are_refused(served, admin, receiver):
    setup_acme(admin, served)
    for body, needle in (
        ({"url": receiver.url, "event_types": ["api_key.created"]}, "tenant"),  # admin telemetry to a tenant: no
        ({"url": receiver.url, "event_types": ["reservation.denied"], "event_categories": ["system"]}, "tenant"),
        ({"url": receiver.url, "event_types": ["no.such"]}, "unknown event type"),
        ({"url": "ftp://example.com/x", "event_types": ["reservation.denied"]}, "http(s)"),
        ({"url": receiver.url, "event_types": []}, "event_types"),
    ):
        r = admin.post("/v1/admin/webhooks", params={"tenant_id": "acme"}, json=body)
        assert r.status_code == 400 and needle in r.text, (body, r.text)
    assert admin.post("/v1/admin/webhooks", params={"tenant_id": "nobody"},
                      json={"url": receiver.url, "event_types": ["reservation.denied"]}).status_code == 404  # fmt: skip
    system = admin.post("/v1/admin/webhooks", json={"url": receiver.url, "event_types": ["api_key.created"]})
    assert system.status_code == 201 and system.json()["subscription"]["tenant_id"] == "__system__"


def test_private_targets_are_refused_unless_allowed(ledger):
    strict = Webhooks(ledger)
    for url in ("http://127.0.0.1:9/hook", "http://localhost/hook", "http://10.1.2.3/x", "http://[::1]/x",
                "http://169.254.169.254/latest/meta-data"):  # fmt: skip
        with pytest.raises(InvalidRequest, match="non-public address"):
            strict.create({"url": url, "event_types": ["reservation.denied"]}, tenant=None)
    allowed = Webhooks(ledger, allow_private=True)
    assert allowed.create({"url": "http://127.0.0.1:9/hook", "event_types": ["reservation.denied"]}, tenant=None)


def test_tenant_plane_webhooks(served, admin, receiver):
    acme = setup_acme(admin, served, "reservations:create", "webhooks:read", "webhooks:write")
    created = acme.post("/v1/webhooks", json={"url": receiver.url, "event_types": ["reservation.denied"]})
    assert created.status_code == 201 and created.json()["subscription"]["tenant_id"] == "acme"
    assert acme.post("/v1/webhooks", json={"url": receiver.url, "event_types": ["policy.created"]}).status_code == 400
    assert len(acme.get("/v1/webhooks").json()["subscriptions"]) == 1
    beta = served.client(**{"X-Cycles-API-Key": tenant_key(admin, "beta", "webhooks:read")})
    sid = created.json()["subscription"]["subscription_id"]
    assert beta.get(f"/v1/webhooks/{sid}").status_code == 404  # another tenant's subscription is not there
    assert beta.get("/v1/webhooks").json()["subscriptions"] == []


def test_delivery_is_signed_and_carries_the_event_id(served, admin, receiver):
    acme = setup_acme(admin, served, "reservations:create")
    created = subscribe(admin, receiver.url, headers={"X-Team": "billing"})
    assert acme.post("/v1/reservations", json=reserve_body("big", 1_000)).status_code == 409
    assert deliver(served) == 1
    (got,) = receiver.wait_for(1)
    assert receiver.signed(created["signing_secret"]) == [got]
    assert not receiver.signed("some other secret")
    event = got.event
    assert got.headers["x-cycles-event-id"] == event["event_id"]
    assert got.headers["x-cycles-event-type"] == "reservation.denied" and got.headers["x-team"] == "billing"
    assert event["tenant_id"] == "acme" and event["data"]["reason_code"] == "BUDGET_EXCEEDED"
    assert admin.get(f"/v1/admin/events/{event['event_id']}").json() == event  # what was sent is the outbox's
    sid = created["subscription"]["subscription_id"]
    (d,) = admin.get(f"/v1/admin/webhooks/{sid}/deliveries").json()["deliveries"]
    assert d["status"] == "SUCCESS" and d["attempts"] == 1 and d["response_status"] == 200
    assert deliver(served) == 0  # delivered: not sent again


def test_failures_back_off_then_fail_then_disable(served, admin, receiver, clock):
    acme = setup_acme(admin, served, "reservations:create")
    policy = {"max_retries": 2, "initial_delay_ms": 1000, "backoff_multiplier": 2.0}
    created = subscribe(admin, receiver.url, disable_after_failures=3, retry_policy=policy)
    sid = created["subscription"]["subscription_id"]
    receiver.status = 500
    acme.post("/v1/reservations", json=reserve_body("big", 1_000))
    assert deliver(served) == 1
    (d,) = admin.get(f"/v1/admin/webhooks/{sid}/deliveries").json()["deliveries"]
    assert (d["status"], d["attempts"], d["response_status"]) == ("RETRYING", 1, 500)
    assert deliver(served) == 0  # the backoff has not run out
    clock.advance(1_000)
    assert deliver(served) == 1
    clock.advance(1_999)
    assert deliver(served) == 0  # the second delay is doubled
    clock.advance(1)
    assert deliver(served) == 1
    (d,) = admin.get(f"/v1/admin/webhooks/{sid}/deliveries").json()["deliveries"]
    assert (d["status"], d["attempts"], d["error_message"]) == ("FAILED", 3, "HTTP 500")
    sub = admin.get(f"/v1/admin/webhooks/{sid}").json()
    assert sub["status"] == "DISABLED" and sub["consecutive_failures"] == 3
    assert len(receiver.deliveries) == 3
    listed = admin.get("/v1/admin/events", params={"tenant_id": "__system__"}).json()["events"]
    system = {e["event_type"] for e in listed}
    assert {"webhook.disabled", "system.webhook_delivery_failed"} <= system

    acme.post("/v1/reservations", json=reserve_body("again", 1_000))  # a disabled subscription gets nothing new
    clock.advance(60_000)
    assert deliver(served) == 0
    receiver.status = 200
    resumed = admin.patch(f"/v1/admin/webhooks/{sid}", json={"status": "ACTIVE"}).json()
    assert resumed["status"] == "ACTIVE" and resumed["consecutive_failures"] == 0
    acme.post("/v1/reservations", json=reserve_body("third", 1_000))
    assert deliver(served) == 1 and receiver.deliveries[-1].headers["x-cycles-signature"]


def test_the_test_endpoint_sends_at_once(served, admin, receiver):
    setup_acme(admin, served)
    created = subscribe(admin, receiver.url)
    sid = created["subscription"]["subscription_id"]
    result = admin.post(f"/v1/admin/webhooks/{sid}/test").json()
    assert result["success"] is True and result["response_status"] == 200
    (got,) = receiver.wait_for(1)
    assert got.event["event_type"] == "system.webhook_test" and got.event["event_id"] == result["event_id"]
    assert receiver.signed(created["signing_secret"]) == [got]


def test_the_server_delivers_in_the_background(tmp_path, receiver):
    from cycles.ledger import SQLiteStore

    from .conftest import ADMIN_KEY

    ledger = Ledger(SQLiteStore(tmp_path / "bg.db"))
    app = create_app(ledger, admin_api_key=ADMIN_KEY, sweep_interval=None, webhook_interval=0.05,
                     webhook_allow_private=True)  # fmt: skip
    with LiveServer(app) as live, httpx.Client(base_url=live.url, headers={"X-Admin-API-Key": ADMIN_KEY}) as admin:
        admin.post("/v1/admin/tenants", json={"tenant_id": "acme", "name": "Acme"}).raise_for_status()
        created = subscribe(admin, receiver.url, event_types=["budget.created"])
        admin.post("/v1/admin/budgets", json={"scope": "tenant:acme", "unit": USD, "allocated": usd(5),
                                              "tenant_id": "acme"}).raise_for_status()  # fmt: skip
        (got,) = receiver.wait_for(1)
        assert got.event["event_type"] == "budget.created" and receiver.signed(created["signing_secret"]) == [got]
    ledger.store.close()
