"""GET /v1/admin/events, /v1/events and /v1/admin/audit/logs over real HTTP (responses checked against the
official admin spec by the `served` fixture)."""

from __future__ import annotations

from typing import Any

import httpx

from .conftest import ADMIN_KEY, USD, tenant_key, usd


def reserve_body(key: str, amount: int, tenant: str = "acme") -> dict[str, Any]:
    return {"idempotency_key": key, "subject": {"tenant": tenant, "agent": "bot"},
            "action": {"kind": "llm.completion", "name": "gpt-4o"}, "estimate": usd(amount)}  # fmt: skip


def pages(client: httpx.Client, path: str, key: str, **params: Any) -> list[list[dict[str, Any]]]:
    """Every page of a cursor listing."""
    out, cursor = [], None
    while True:
        response = client.get(path, params={**params, **({"cursor": cursor} if cursor else {})})
        assert response.status_code == 200, response.text
        body = response.json()
        out.append(body[key])
        if not body["has_more"]:
            assert "next_cursor" not in body
            return out
        cursor = body["next_cursor"]


def world(admin: httpx.Client, served: Any) -> httpx.Client:
    """Tenants acme and beta with budgets; acme's key; five denials for acme, one for beta."""
    acme = served.client(**{"X-Cycles-API-Key": tenant_key(admin, "acme", "reservations:create", "events:read")})
    beta = served.client(**{"X-Cycles-API-Key": tenant_key(admin, "beta")})
    for tenant, amount in (("acme", 100), ("beta", 100)):
        r = admin.post("/v1/admin/budgets", json={"scope": f"tenant:{tenant}", "unit": USD, "allocated": usd(amount),
                                                  "tenant_id": tenant})  # fmt: skip
        assert r.status_code == 201, r.text
    for i in range(5):
        assert acme.post("/v1/reservations", json=reserve_body(f"d{i}", 1_000)).status_code == 409
    assert beta.post("/v1/reservations", json=reserve_body("d", 1_000, "beta")).status_code == 409
    return acme


def test_events_filters_and_cursor_pages(served, admin, clock):
    world(admin, served)
    everything = [e for page in pages(admin, "/v1/admin/events", "events", limit=100) for e in page]
    kinds = [e["event_type"] for e in everything]
    assert kinds.count("reservation.denied") == 6 and kinds.count("tenant.created") == 2
    assert kinds.count("api_key.created") == 2 and kinds.count("budget.created") == 2
    stamps = [e["timestamp"] for e in everything]
    assert stamps == sorted(stamps, reverse=True)  # newest first by default

    denied = pages(admin, "/v1/admin/events", "events", event_type="reservation.denied", tenant_id="acme", limit=2)
    assert [len(p) for p in denied] == [2, 2, 1]
    ids = [e["event_id"] for p in denied for e in p]
    assert len(set(ids)) == 5  # every event once, none twice
    first = denied[0][0]
    assert first["category"] == "reservation" and first["scope"] == "tenant:acme"
    assert first["data"]["reason_code"] == "BUDGET_EXCEEDED" and first["data"]["requested_amount"] == 1_000

    ascending = pages(admin, "/v1/admin/events", "events", category="budget", sort_dir="asc", limit=1)
    assert [p[0]["scope"] for p in ascending] == ["tenant:acme", "tenant:beta"]
    one = admin.get(f"/v1/admin/events/{first['event_id']}").json()
    assert one == first

    bad = admin.get("/v1/admin/events", params={"category": "nope"})
    assert bad.status_code == 400 and bad.json()["error"] == "INVALID_REQUEST"
    stale = admin.get("/v1/admin/events", params={"cursor": admin.get(
        "/v1/admin/events", params={"limit": 1}).json()["next_cursor"], "tenant_id": "beta"})  # fmt: skip
    assert stale.status_code == 400  # a cursor belongs to its query
    assert admin.get("/v1/admin/events/evt_missing").status_code == 404


def test_a_tenant_lists_only_its_own_events(served, admin):
    acme = world(admin, served)
    mine = [e for p in pages(acme, "/v1/events", "events") for e in p]
    assert mine and {e["tenant_id"] for e in mine} == {"acme"}
    assert acme.get("/v1/events", params={"tenant_id": "beta"}).status_code == 403
    no_perm = served.client(**{"X-Cycles-API-Key": tenant_key(admin, "gamma")})
    assert no_perm.get("/v1/events").status_code == 403  # events:read is not a default permission
    assert acme.get("/v1/admin/events").status_code == 401  # the admin plane wants the admin key


def test_every_admin_action_is_audited_with_before_and_after(served, admin):
    admin.post("/v1/admin/tenants", json={"tenant_id": "acme", "name": "Acme"}).raise_for_status()
    key = admin.post("/v1/admin/api-keys", json={"tenant_id": "acme", "name": "k"}).json()
    acme = served.client(**{"X-Cycles-API-Key": key["key_secret"]})
    created = acme.post("/v1/admin/budgets", json={"scope": "tenant:acme", "unit": USD, "allocated": usd(100)})
    assert created.status_code == 201
    funded = admin.post("/v1/admin/budgets/fund", params={"scope": "tenant:acme", "unit": USD, "tenant_id": "acme"},
                        json={"operation": "CREDIT", "amount": usd(50)})  # fmt: skip
    assert funded.status_code == 200
    refused = admin.post("/v1/admin/budgets/fund", params={"scope": "tenant:acme", "unit": USD, "tenant_id": "acme"},
                         json={"operation": "DEBIT", "amount": usd(10_000)})  # fmt: skip
    assert refused.status_code == 409
    admin.patch("/v1/admin/tenants/acme", json={"status": "SUSPENDED"}).raise_for_status()

    logs = [entry for p in pages(admin, "/v1/admin/audit/logs", "logs", sort_dir="asc") for entry in p]
    assert [(x["operation"], x["status"]) for x in logs] == [
        ("createTenant", 201), ("createApiKey", 201), ("createBudget", 201), ("fundBudget", 200),
        ("fundBudget", 409), ("updateTenant", 200),
    ]  # fmt: skip
    by_tenant_key = logs[2]
    assert by_tenant_key["tenant_id"] == "acme" and by_tenant_key["key_id"] == key["key_id"]
    assert by_tenant_key["metadata"]["before"] is None
    assert by_tenant_key["metadata"]["after"]["allocated"]["amount"] == 100
    fund = logs[3]
    assert fund["tenant_id"] == "__admin__" and fund["resource_type"] == "budget"
    assert fund["metadata"]["before"]["allocated"]["amount"] == 100
    assert fund["metadata"]["after"]["allocated"]["amount"] == 150
    assert fund["request_id"] and len(fund["trace_id"]) == 32 and fund["source_ip"] == "127.0.0.1"
    assert logs[4]["error_code"] == "BUDGET_EXCEEDED" and logs[4]["metadata"] == {"before": None, "after": None}
    suspend = logs[5]
    assert (suspend["metadata"]["before"]["status"], suspend["metadata"]["after"]["status"]) == ("ACTIVE", "SUSPENDED")

    only = admin.get("/v1/admin/audit/logs", params={"operation": "fundBudget", "status_min": 400}).json()["logs"]
    assert [x["status"] for x in only] == [409]
    assert admin.get("/v1/admin/audit/logs", params={"status": "99"}).status_code == 400
    assert acme.get("/v1/admin/audit/logs").status_code == 401


def test_an_admin_key_release_is_audited(served, admin):
    acme = served.client(**{"X-Cycles-API-Key": tenant_key(admin, "acme")})
    admin.post("/v1/admin/budgets", json={"scope": "tenant:acme", "unit": USD, "allocated": usd(100),
                                          "tenant_id": "acme"}).raise_for_status()  # fmt: skip
    rid = acme.post("/v1/reservations", json=reserve_body("r", 40)).json()["reservation_id"]
    other = acme.post("/v1/reservations", json=reserve_body("s", 10)).json()["reservation_id"]
    assert acme.post(f"/v1/reservations/{other}/release", json={"idempotency_key": "t"}).status_code == 200
    released = admin.post(f"/v1/reservations/{rid}/release", json={"idempotency_key": "x", "reason": "stuck"})
    assert released.status_code == 200, released.text
    logs = admin.get("/v1/admin/audit/logs", params={"operation": "releaseReservation"}).json()["logs"]
    assert len(logs) == 1  # the tenant's own release is not an admin action
    (entry,) = logs
    assert entry["resource_id"] == rid and entry["tenant_id"] == "__admin__"
    assert entry["request_id"] == released.headers["x-request-id"]
    assert entry["metadata"]["before"]["status"] == "ACTIVE" and entry["metadata"]["after"]["status"] == "RELEASED"


def test_without_admin_key_no_admin_plane(ledger):
    from cycles.server import create_app
    from cycles.server.testing import LiveServer

    with LiveServer(create_app(ledger, admin_api_key=None, sweep_interval=None, webhook_interval=None)) as live:
        with httpx.Client(base_url=live.url) as raw:
            assert raw.get("/v1/admin/events", headers={"X-Admin-API-Key": ADMIN_KEY}).status_code == 404
            assert raw.get("/v1/events").status_code == 401  # the tenant route is there, and wants a key
