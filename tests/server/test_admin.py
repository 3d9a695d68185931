"""The admin plane over HTTP: tenants, budgets, funding, freeze, API keys (happy paths and their main refusals)."""

from __future__ import annotations

import pytest

from cycles import errors

from .conftest import ADMIN_KEY, USD, usd


def test_tenants(admin, raw):
    a = admin.admin
    tenant, created = a.create_tenant({"tenant_id": "acme", "name": "Acme", "max_reservation_extensions": 3})
    assert created and tenant.tenant_id == "acme" and tenant.status == "ACTIVE"
    again, created = a.create_tenant({"tenant_id": "acme", "name": "Acme", "max_reservation_extensions": 3})
    assert not created and again.created_at == tenant.created_at
    h = {"X-Admin-API-Key": ADMIN_KEY}
    assert raw.post("/v1/admin/tenants", json={"tenant_id": "acme", "name": "Acme", "max_reservation_extensions": 3},
                    headers=h).status_code == 200  # fmt: skip
    assert raw.post("/v1/admin/tenants", json={"tenant_id": "zeta", "name": "Z"}, headers=h).status_code == 201
    with pytest.raises(errors.DuplicateResource):
        a.create_tenant({"tenant_id": "acme", "name": "Other name"})
    assert a.get_tenant("acme").max_reservation_extensions == 3
    with pytest.raises(errors.NotFound):
        a.get_tenant("nobody")
    for i in range(3):
        a.create_tenant({"tenant_id": f"t-{i}", "name": f"T{i}"})
    page = a.list_tenants(limit=2)
    assert len(page.tenants) == 2 and page.has_more
    rest = a.list_tenants(cursor=page.next_cursor, limit=200)
    assert {t.tenant_id for t in page.tenants + rest.tenants} == {"acme", "zeta", "t-0", "t-1", "t-2"}
    updated = a.update_tenant("acme", {"name": "Acme Corp", "status": "SUSPENDED"})
    assert updated.name == "Acme Corp" and updated.status == "SUSPENDED" and updated.suspended_at
    assert a.update_tenant("acme", {"status": "ACTIVE"}).status == "ACTIVE"
    closed = a.update_tenant("acme", {"status": "CLOSED"})
    assert closed.status == "CLOSED"
    with pytest.raises(errors.TenantClosed):
        a.update_tenant("acme", {"status": "ACTIVE"})


def test_budgets_fund_freeze(admin):
    a = admin.admin
    a.create_tenant({"tenant_id": "acme", "name": "Acme"})
    b = a.create_budget({"scope": "tenant:acme", "unit": USD, "allocated": usd(1_000), "overdraft_limit": usd(50)})
    assert b.allocated.amount == 1_000 and b.remaining.amount == 1_000 and b.overdraft_limit.amount == 50
    assert b.tenant_id == "acme" and b.status == "ACTIVE" and b.ledger_id
    a.create_budget({"scope": "tenant:acme/agent:bot", "unit": USD, "allocated": usd(100)})
    a.create_budget({"scope": "tenant:acme", "unit": "TOKENS", "allocated": {"unit": "TOKENS", "amount": 9}})
    with pytest.raises(errors.DuplicateResource):
        a.create_budget({"scope": "tenant:acme", "unit": USD, "allocated": usd(1)})

    assert a.get_budget("tenant:acme/agent:bot", USD).allocated.amount == 100
    with pytest.raises(errors.NotFound):
        a.get_budget("tenant:acme/agent:nobody", USD)
    assert len(a.list_budgets(tenant_id="acme").ledgers) == 3
    assert [x.unit for x in a.list_budgets(tenant_id="acme", unit="TOKENS").ledgers] == ["TOKENS"]
    assert [x.scope for x in a.list_budgets(scope_prefix="tenant:acme/agent").ledgers] == ["tenant:acme/agent:bot"]
    page = a.list_budgets(limit=2)
    assert page.has_more and len(a.list_budgets(cursor=page.next_cursor).ledgers) == 1

    f = a.fund("tenant:acme", USD, {"operation": "CREDIT", "amount": usd(500), "idempotency_key": "f1"})
    assert (f.previous_allocated.amount, f.new_allocated.amount, f.new_remaining.amount) == (1_000, 1_500, 1_500)
    assert a.fund("tenant:acme", USD, {"operation": "CREDIT", "amount": usd(500), "idempotency_key": "f1"}) == f
    assert a.fund("tenant:acme", USD, {"operation": "DEBIT", "amount": usd(200)}).new_allocated.amount == 1_300
    assert a.fund("tenant:acme", USD, {"operation": "RESET", "amount": usd(800)}).new_allocated.amount == 800
    with pytest.raises(errors.BudgetExceeded):
        a.fund("tenant:acme", USD, {"operation": "DEBIT", "amount": usd(10_000)})

    u = a.update_budget("tenant:acme", USD, {"commit_overage_policy": "REJECT", "overdraft_limit": usd(0)})
    assert u.commit_overage_policy == "REJECT" and u.overdraft_limit.amount == 0
    assert a.freeze("tenant:acme", USD).status == "FROZEN"
    with pytest.raises(errors.BudgetFrozen):
        a.fund("tenant:acme", USD, {"operation": "CREDIT", "amount": usd(1)})
    assert a.unfreeze("tenant:acme", USD).status == "ACTIVE"


def test_api_keys(server, admin):
    a = admin.admin
    a.create_tenant({"tenant_id": "acme", "name": "Acme"})
    created = a.create_api_key({"tenant_id": "acme", "name": "agent", "permissions": ["balances:read"],
                                "description": "d", "metadata": {"team": "x"}})  # fmt: skip
    assert created.key_secret.startswith("cyc_live_") and created.permissions == ["balances:read"]
    assert created.key_secret.startswith(created.key_prefix)
    listed = a.list_api_keys(tenant_id="acme").keys
    assert [k.key_id for k in listed] == [created.key_id] and listed[0].status == "ACTIVE"
    assert all("secret" not in k.model_dump() or k.model_dump().get("key_secret") is None for k in listed)
    for i in range(2):
        a.create_api_key({"tenant_id": "acme", "name": f"k{i}"})
    page = a.list_api_keys(limit=2)
    assert page.has_more and len(a.list_api_keys(cursor=page.next_cursor).keys) == 1

    changed = a.update_api_key(created.key_id, {"permissions": ["balances:read", "reservations:list"], "name": "n"})
    assert changed.permissions == ["balances:read", "reservations:list"] and changed.name == "n"
    t = server.transport(api_key=created.key_secret, admin_api_key="")
    assert t.list_reservations({}).reservations == []
    revoked = a.revoke_api_key(created.key_id, reason="rotated")
    assert revoked.status == "REVOKED" and revoked.revoked_reason == "rotated"
    assert a.revoke_api_key(created.key_id).status == "REVOKED"  # no-op
    with pytest.raises(errors.DuplicateResource):
        a.update_api_key(created.key_id, {"name": "again"})
    with pytest.raises(errors.Unauthorized):
        t.list_reservations({})
    with pytest.raises(errors.NotFound):
        a.revoke_api_key("key_nope")
    with pytest.raises(errors.NotFound):
        a.create_api_key({"tenant_id": "ghost", "name": "k"})


def test_policies(server, admin, acme):
    admin.admin.create_budget({"scope": "tenant:acme", "unit": USD, "allocated": usd(1_000)})
    p = admin.admin.create_policy({"name": "cap", "scope_pattern": "agent:*", "tenant_id": "acme", "priority": 5,
                                   "caps": {"max_tokens": 64}})  # fmt: skip
    assert p.status == "ACTIVE" and p.caps.max_tokens == 64
    mine = acme.admin.create_policy({"name": "mine", "scope_pattern": "tenant:acme/*", "caps": {"cooldown_ms": 5}})
    assert [x.name for x in acme.admin.list_policies().policies] == ["cap", "mine"]
    assert len(admin.admin.list_policies(tenant_id="acme").policies) == 2
    with pytest.raises(errors.InvalidRequest):
        admin.admin.list_policies()  # the admin names the tenant
    with pytest.raises(errors.InvalidRequest):
        admin.admin.create_policy({"name": "x", "scope_pattern": "agent:*"})
    with pytest.raises(errors.Forbidden):
        acme.admin.create_policy({"name": "x", "scope_pattern": "agent:*", "tenant_id": "other"})
    r = acme.reserve({"idempotency_key": "r", "subject": {"tenant": "acme", "agent": "bot"},
                      "action": {"kind": "llm.completion", "name": "m"}, "estimate": usd(1)})  # fmt: skip
    assert r.decision == "ALLOW_WITH_CAPS" and r.caps.max_tokens == 64
    assert acme.admin.update_policy(p.policy_id, {"status": "DISABLED"}).status == "DISABLED"
    assert admin.admin.update_policy(mine.policy_id, {"priority": 9}).priority == 9
    with pytest.raises(errors.NotFound):
        acme.admin.update_policy("pol_nope", {"priority": 1})
    ro = server.transport(admin_api_key="", api_key=admin.admin.create_api_key(
        {"tenant_id": "acme", "name": "ro", "permissions": ["policies:read"]}).key_secret)  # fmt: skip
    assert len(ro.admin.list_policies().policies) == 2
    with pytest.raises(errors.Forbidden):
        ro.admin.create_policy({"name": "x", "scope_pattern": "agent:*"})


def test_validate_key_secrets(admin, clock, raw, acme_key):
    a = admin.admin
    record = a.authenticate(acme_key)
    assert record.tenant_id == "acme" and record.key_id.startswith("key_") and "balances:read" in record.permissions
    for secret in ("", "garbage", "cyc_live_" + "x" * 32, "x" * 300):
        with pytest.raises(errors.Unauthorized):
            a.authenticate(secret)
    a.revoke_api_key(record.key_id)
    with pytest.raises(errors.Unauthorized):
        a.authenticate(acme_key)
    body = raw.post("/v1/auth/validate", json={"key_secret": acme_key}, headers={"X-Admin-API-Key": ADMIN_KEY}).json()
    assert body["valid"] is False and body["reason"] and acme_key not in str(body)
    assert raw.post("/v1/auth/validate", json={"key_secret": acme_key}, headers={"X-Cycles-API-Key": acme_key})\
        .status_code == 401  # fmt: skip
    assert (
        raw.post("/v1/auth/validate", json={"key_secret": 5}, headers={"X-Admin-API-Key": ADMIN_KEY}).status_code == 400
    )


def test_no_admin_key_no_admin_routes(ledger, caplog):
    import httpx

    from cycles.server import create_app
    from cycles.server.testing import LiveServer

    with caplog.at_level("WARNING", logger="cycles.server"):
        app = create_app(ledger, admin_api_key=None, sweep_interval=None)
    assert "not mounted" in caplog.text
    with LiveServer(app, lifespan="off") as live:
        response = httpx.post(f"{live.url}/v1/admin/tenants", json={"tenant_id": "x", "name": "x"},
                              headers={"X-Admin-API-Key": ""})  # fmt: skip
        assert response.status_code == 404 and response.json()["error"] == "NOT_FOUND"
        admin_on_runtime = httpx.get(f"{live.url}/v1/reservations", params={"tenant": "a"},
                                     headers={"X-Admin-API-Key": "anything"})  # fmt: skip
        assert admin_on_runtime.status_code == 401
        assert httpx.get(f"{live.url}/healthz").json() == {"status": "ok"}


def test_secrets_are_not_logged(server, admin, caplog, raw):
    with caplog.at_level("DEBUG"):
        admin.admin.create_tenant({"tenant_id": "acme", "name": "Acme"})
        secret = admin.admin.create_api_key({"tenant_id": "acme", "name": "k"}).key_secret
        raw.get("/v1/balances", params={"tenant": "acme"}, headers={"X-Cycles-API-Key": secret})
        raw.get("/v1/balances", params={"tenant": "acme"}, headers={"X-Cycles-API-Key": secret + "x"})
        raw.get("/v1/admin/tenants", headers={"X-Admin-API-Key": ADMIN_KEY + "wrong"})
    assert secret not in caplog.text and ADMIN_KEY not in caplog.text
