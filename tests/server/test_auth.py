"""Authentication and authorization: who may call what, and for which tenant."""

from __future__ import annotations

import time

import pytest

from cycles import errors
from cycles.models import ReservationDetail as _Detail

from .conftest import ADMIN_KEY, USD, make_key, usd
from .test_runtime import ACTION, reserve_body

OTHER = {"tenant": "other", "agent": "bot"}


@pytest.fixture
def two_tenants(server, admin, acme):
    admin.admin.create_budget({"scope": "tenant:acme", "unit": USD, "allocated": usd(1_000)})
    admin.admin.create_budget({"scope": "tenant:other", "unit": USD, "allocated": usd(1_000)})
    other = server.transport(api_key=make_key(admin, "other"), admin_api_key="")
    return acme, other


def test_missing_wrong_and_revoked_keys_are_401(server, admin, acme, raw, acme_key):
    admin.admin.create_budget({"scope": "tenant:acme", "unit": USD, "allocated": usd(1_000)})
    for headers in ({}, {"X-Cycles-API-Key": "cyc_live_" + "x" * 32}, {"X-Cycles-API-Key": ""},
                    {"X-Cycles-API-Key": "k" * 5000}, {"X-Admin-API-Key": "wrong"}):  # fmt: skip
        response = raw.post("/v1/reservations", json=reserve_body("k", 1), headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["error"] == "UNAUTHORIZED"
    with pytest.raises(errors.Unauthorized):
        server.transport(api_key="cyc_live_nope", admin_api_key="").balances({"tenant": "acme"})

    key = admin.admin.list_api_keys(tenant_id="acme").keys[0]
    acme.reserve(reserve_body("before", 1))
    admin.admin.revoke_api_key(key.key_id, reason="leaked")
    with pytest.raises(errors.Unauthorized):
        acme.reserve(reserve_body("after", 1))
    with pytest.raises(errors.Unauthorized):
        acme.balances({"tenant": "acme"})


def test_remembered_keys_follow_changes_made_elsewhere_within_the_ttl(ledger):
    from cycles.server.auth import Authenticator

    ledger.admin.create_tenant({"tenant_id": "acme", "name": "Acme"})
    key = ledger.admin.create_api_key({"tenant_id": "acme", "name": "k"})
    headers = {"x-cycles-api-key": key.key_secret}
    auth = Authenticator(ledger, None, key_cache_seconds=0.2)
    assert auth.tenant(headers, None).tenant == "acme"
    ledger.admin.revoke_api_key(key.key_id)  # as another worker or the CLI would: this process is not told
    assert auth.tenant(headers, None).tenant == "acme"  # remembered, for at most key_cache_seconds
    time.sleep(0.25)
    with pytest.raises(errors.Unauthorized):
        auth.tenant(headers, None)

    other = ledger.admin.create_api_key({"tenant_id": "acme", "name": "other"})
    headers = {"x-cycles-api-key": other.key_secret}
    assert auth.tenant(headers, None).tenant == "acme"
    ledger.admin.update_tenant("acme", {"status": "SUSPENDED"})
    auth.forget_keys()  # what the admin routes do after changing a key or a tenant: refused at once
    with pytest.raises(errors.Unauthorized):
        auth.tenant(headers, None)


def test_expired_key_is_401(server, admin, clock):
    admin.admin.create_tenant({"tenant_id": "acme", "name": "Acme"})
    from cycles.ledger.rules import iso

    secret = admin.admin.create_api_key(
        {"tenant_id": "acme", "name": "short", "expires_at": iso(clock.now + 60_000)}
    ).key_secret
    t = server.transport(api_key=secret, admin_api_key="")
    assert t.balances({"tenant": "acme"}).balances == []
    clock.advance(60_001)
    with pytest.raises(errors.Unauthorized):
        t.balances({"tenant": "acme"})


@pytest.mark.parametrize("status", ["SUSPENDED", "CLOSED"])
def test_keys_of_suspended_or_closed_tenants_are_401(admin, acme, status):
    admin.admin.create_budget({"scope": "tenant:acme", "unit": USD, "allocated": usd(1_000)})
    r = acme.reserve(reserve_body("r", 1) | {"subject": {"tenant": "acme"}})
    admin.admin.update_tenant("acme", {"status": status})
    with pytest.raises(errors.Unauthorized):
        acme.commit(r.reservation_id, {"idempotency_key": "c", "actual": usd(1)})
    with pytest.raises(errors.Unauthorized):
        acme.get_reservation(r.reservation_id)
    if status == "SUSPENDED":
        admin.admin.update_tenant("acme", {"status": "ACTIVE"})
        assert acme.commit(r.reservation_id, {"idempotency_key": "c", "actual": usd(1)}).charged.amount == 1


def test_tenants_are_isolated(two_tenants):
    acme, other = two_tenants
    r = acme.reserve({"idempotency_key": "a", "subject": {"tenant": "acme"}, "action": ACTION, "estimate": usd(10)})
    rid = r.reservation_id
    for call in (
        lambda: other.get_reservation(rid),
        lambda: other.commit(rid, {"idempotency_key": "x", "actual": usd(1)}),
        lambda: other.release(rid, {"idempotency_key": "x"}),
        lambda: other.extend(rid, {"idempotency_key": "x", "extend_by_ms": 1000}),
        lambda: other.balances({"tenant": "acme"}),
        lambda: other.balances({"tenant_id": "acme"}),
        lambda: other.list_reservations({"tenant": "acme"}),
        lambda: other.reserve({"idempotency_key": "y", "subject": {"tenant": "acme"}, "action": ACTION,
                               "estimate": usd(1)}),
        lambda: other.decide({"idempotency_key": "y", "subject": {"tenant": "acme"}, "action": ACTION,
                              "estimate": usd(1)}),
        lambda: other.event({"idempotency_key": "y", "subject": {"tenant": "acme"}, "action": ACTION,
                             "actual": usd(1)}),
    ):  # fmt: skip
        with pytest.raises(errors.Forbidden):
            call()
    # a subject without a tenant is the key's tenant
    mine = other.reserve({"idempotency_key": "z", "subject": {"agent": "bot"}, "action": ACTION, "estimate": usd(5)})
    assert mine.affected_scopes[0] == "tenant:other"
    assert other.list_reservations({}).reservations[0].reservation_id == mine.reservation_id
    assert acme.get_reservation(rid).status == "ACTIVE"  # untouched


PERMISSION_CALLS = {
    "reservations:create": lambda t, rid: t.reserve(reserve_body("p", 1) | {"subject": {"tenant": "acme"}}),
    "reservations:commit": lambda t, rid: t.commit(rid, {"idempotency_key": "p", "actual": usd(1)}),
    "reservations:release": lambda t, rid: t.release(rid, {"idempotency_key": "p"}),
    "reservations:extend": lambda t, rid: t.extend(rid, {"idempotency_key": "p", "extend_by_ms": 1_000}),
    "reservations:list": lambda t, rid: t.get_reservation(rid),
    "balances:read": lambda t, rid: t.balances({"tenant": "acme"}),
}


@pytest.mark.parametrize("permission", list(PERMISSION_CALLS))
def test_each_route_needs_its_permission(server, admin, acme, permission):
    admin.admin.create_budget({"scope": "tenant:acme", "unit": USD, "allocated": usd(1_000)})
    rid = acme.reserve(reserve_body("r", 10) | {"subject": {"tenant": "acme"}}).reservation_id
    everything_else = [p for p in PERMISSION_CALLS if p != permission]
    lacking = server.transport(admin_api_key="", api_key=admin.admin.create_api_key(
        {"tenant_id": "acme", "name": "narrow", "permissions": everything_else}).key_secret)  # fmt: skip
    with pytest.raises(errors.Forbidden) as info:
        PERMISSION_CALLS[permission](lacking, rid)
    assert info.value.details["required"] == permission
    only = server.transport(admin_api_key="", api_key=admin.admin.create_api_key(
        {"tenant_id": "acme", "name": "only", "permissions": [permission]}).key_secret)  # fmt: skip
    PERMISSION_CALLS[permission](only, rid)


def test_decide_and_events_need_reservations_create(server, admin, acme):
    admin.admin.create_budget({"scope": "tenant:acme", "unit": USD, "allocated": usd(1_000)})
    t = server.transport(
        admin_api_key="",
        api_key=admin.admin.create_api_key(
            {"tenant_id": "acme", "name": "read-only", "permissions": ["balances:read", "reservations:list"]}
        ).key_secret,
    )
    with pytest.raises(errors.Forbidden):
        t.decide(reserve_body("d", 1))
    with pytest.raises(errors.Forbidden):
        t.event({"idempotency_key": "e", "subject": {"tenant": "acme"}, "action": ACTION, "actual": usd(1)})


def test_admin_read_covers_balances_read(server, admin):
    admin.admin.create_tenant({"tenant_id": "acme", "name": "Acme"})
    admin.admin.create_budget({"scope": "tenant:acme", "unit": USD, "allocated": usd(1_000)})
    t = server.transport(admin_api_key="", api_key=admin.admin.create_api_key(
        {"tenant_id": "acme", "name": "legacy", "permissions": ["admin:read"]}).key_secret)  # fmt: skip
    assert t.balances({"tenant": "acme"}).balances[0].allocated.amount == 1_000
    with pytest.raises(errors.Forbidden):
        t.reserve(reserve_body("x", 1))


def test_admin_key_on_get_list_release(server, admin, acme, raw):
    admin.admin.create_budget({"scope": "tenant:acme", "unit": USD, "allocated": usd(1_000)})
    rid = acme.reserve(reserve_body("r", 10) | {"subject": {"tenant": "acme"}}).reservation_id
    assert admin.request("GET", f"/v1/reservations/{rid}", _Detail, headers={"X-Admin-API-Key": ADMIN_KEY})[0]
    h = {"X-Admin-API-Key": ADMIN_KEY}
    missing = raw.get("/v1/reservations", headers=h)
    assert missing.status_code == 400
    assert missing.json()["message"] == "tenant query parameter is required when using admin key authentication"
    listed = raw.get("/v1/reservations", params={"tenant": "acme"}, headers=h)
    assert listed.status_code == 200 and listed.json()["reservations"][0]["reservation_id"] == rid
    released = raw.post(
        f"/v1/reservations/{rid}/release",
        json={"idempotency_key": "ops", "reason": "[INCIDENT_FORCE_RELEASE]"},
        headers=h,
    )
    assert released.status_code == 200 and released.json()["status"] == "RELEASED"
    # the admin key opens no other runtime route
    for method, path, body in (("POST", "/v1/reservations", reserve_body("a", 1)), ("GET", "/v1/balances?tenant=acme",
                               None), ("POST", f"/v1/reservations/{rid}/commit", {"idempotency_key": "c",
                               "actual": usd(1)})):  # fmt: skip
        assert raw.request(method, path, json=body, headers=h).status_code == 401


def test_admin_routes_refuse_tenant_keys(raw, acme_key):
    h = {"X-Cycles-API-Key": acme_key}
    for method, path, body in (
        ("GET", "/v1/admin/tenants", None),
        ("POST", "/v1/admin/tenants", {"tenant_id": "evil", "name": "Evil"}),
        ("PATCH", "/v1/admin/tenants/acme", {"status": "CLOSED"}),
        ("POST", "/v1/admin/api-keys", {"tenant_id": "acme", "name": "more"}),
        ("GET", "/v1/admin/api-keys", None),
        ("DELETE", "/v1/admin/api-keys/key_x", None),
        ("PATCH", "/v1/admin/budgets?scope=tenant:acme&unit=USD_MICROCENTS", {"commit_overage_policy": "REJECT"}),
        ("POST", "/v1/admin/budgets/freeze?scope=tenant:acme&unit=USD_MICROCENTS", None),
    ):
        response = raw.request(method, path, json=body, headers=h)
        assert response.status_code == 401, (method, path)
        assert response.json()["error"] == "UNAUTHORIZED"
    wrong_admin = raw.get("/v1/admin/tenants", headers={"X-Admin-API-Key": ADMIN_KEY + "x"})
    assert wrong_admin.status_code == 401


def test_tenant_key_manages_its_own_budgets(server, admin, acme, raw, acme_key):
    b = acme.admin.create_budget({"scope": "tenant:acme/agent:bot", "unit": USD, "allocated": usd(500)})
    assert b.tenant_id == "acme" and b.remaining.amount == 500
    funded = acme.admin.fund("tenant:acme/agent:bot", USD, {"operation": "CREDIT", "amount": usd(100)})
    assert funded.new_allocated.amount == 600
    assert acme.admin.get_budget("tenant:acme/agent:bot", USD).allocated.amount == 600
    assert [x.scope for x in acme.admin.list_budgets().ledgers] == ["tenant:acme/agent:bot"]
    with pytest.raises(errors.Forbidden):
        acme.admin.create_budget({"scope": "tenant:other", "unit": USD, "allocated": usd(1)})
    admin.admin.create_budget({"scope": "tenant:other", "unit": USD, "allocated": usd(1)})
    with pytest.raises(errors.Forbidden):
        acme.admin.fund("tenant:other", USD, {"operation": "CREDIT", "amount": usd(1)})
    with pytest.raises(errors.Forbidden):
        acme.admin.get_budget("tenant:other", USD)
    with pytest.raises(errors.Forbidden):
        acme.admin.list_budgets(tenant_id="other")
    no_write = server.transport(admin_api_key="", api_key=admin.admin.create_api_key(
        {"tenant_id": "acme", "name": "ro", "permissions": ["budgets:read"]}).key_secret)  # fmt: skip
    with pytest.raises(errors.Forbidden):
        no_write.admin.fund("tenant:acme/agent:bot", USD, {"operation": "CREDIT", "amount": usd(1)})
    assert no_write.admin.list_budgets().ledgers


def test_introspect(raw, acme_key, admin):
    tenant = raw.get("/v1/auth/introspect", headers={"X-Cycles-API-Key": acme_key}).json()
    assert tenant["auth_type"] == "tenant" and tenant["tenant_id"] == "acme"
    assert tenant["capabilities"]["manage_budgets"] and not tenant["capabilities"]["view_tenants"]
    adm = raw.get("/v1/auth/introspect", headers={"X-Admin-API-Key": ADMIN_KEY}).json()
    assert adm["auth_type"] == "admin" and adm["permissions"] == ["*"] and all(adm["capabilities"].values())
    assert "tenant_id" not in adm
    assert admin.admin.introspect()["auth_type"] == "admin"
    assert raw.get("/v1/auth/introspect").status_code == 401
