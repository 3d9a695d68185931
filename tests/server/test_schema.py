"""Response bodies against the official OpenAPI schemas (skipped when ../shared/spec is absent).

The `server` fixture already checks every response a test provokes; this module provokes each runtime response
shape on purpose, checks it explicitly, and checks that the checker catches violations.
"""

from __future__ import annotations

import pytest

from .conftest import ADMIN_KEY, USD, Exchange, check_exchanges, response_schema, usd
from .test_runtime import ACTION, SUBJECT, reserve_body


@pytest.fixture
def flow(schemas, admin, acme_key, raw):
    for scope, n in (("tenant:acme", 10_000), ("tenant:acme/workspace:prod", 5_000)):
        admin.admin.create_budget({"scope": scope, "unit": USD, "allocated": usd(n), "overdraft_limit": usd(100)})
    return raw, {"X-Cycles-API-Key": acme_key}


def test_every_runtime_response_shape(flow, schemas, clock):
    raw, h = flow
    seen: list[tuple[str, int]] = []

    def check(response, name, plane="runtime"):
        schemas.check(response.json(), name, plane)
        seen.append((name, response.status_code))
        return response.json()

    r = check(raw.post("/v1/reservations", json=reserve_body("r", 300), headers=h), "ReservationCreateResponse")
    rid = r["reservation_id"]
    check(raw.post("/v1/reservations", json=reserve_body("dry", 300, dry_run=True), headers=h),
          "ReservationCreateResponse")  # fmt: skip
    check(raw.post("/v1/reservations", json=reserve_body("deny", 10**9, dry_run=True), headers=h),
          "ReservationCreateResponse")  # fmt: skip
    check(raw.get(f"/v1/reservations/{rid}", headers=h), "ReservationDetail")
    check(raw.post(f"/v1/reservations/{rid}/extend", json={"idempotency_key": "x", "extend_by_ms": 1000}, headers=h),
          "ReservationExtendResponse")  # fmt: skip
    check(
        raw.post(
            f"/v1/reservations/{rid}/commit",
            json={
                "idempotency_key": "c",
                "actual": usd(100),
                "metrics": {"tokens_input": 5, "custom": {"a": 1}},
                "metadata": {"m": 1},
            },
            headers=h,
        ),
        "CommitResponse",
    )
    rid2 = raw.post("/v1/reservations", json=reserve_body("r2", 10, metadata={"k": "v"}), headers=h).json()
    check(raw.post(f"/v1/reservations/{rid2['reservation_id']}/release", json={"idempotency_key": "rel"}, headers=h),
          "ReleaseResponse")  # fmt: skip
    rid3 = raw.post("/v1/reservations", json=reserve_body("r3", 10, ttl_ms=1000, grace_period_ms=0), headers=h)
    clock.advance(2_000)
    check(raw.get("/v1/reservations", params={"include": "metadata,committed_metadata,evidence"}, headers=h),
          "ReservationListResponse")  # fmt: skip
    check(raw.get(f"/v1/reservations/{rid3.json()['reservation_id']}", headers=h), "ErrorResponse")  # 410
    check(raw.post("/v1/decide", json=reserve_body("d", 1), headers=h), "DecisionResponse")
    check(raw.post("/v1/decide", json=reserve_body("d2", 10**9), headers=h), "DecisionResponse")
    check(
        raw.post(
            "/v1/events",
            json={"idempotency_key": "e", "subject": SUBJECT, "action": ACTION, "actual": usd(20), "client_time_ms": 1},
            headers=h,
        ),
        "EventCreateResponse",
    )
    check(raw.get("/v1/balances", params={"tenant": "acme", "include_children": "true", "limit": 1}, headers=h),
          "BalanceResponse")  # fmt: skip
    check(raw.get("/v1/balances", params={"tenant_id": "acme"}, headers=h), "BalanceListResponse", "admin")
    for status, response in (
        (409, raw.post("/v1/reservations", json=reserve_body("big", 10**9), headers=h)),
        (400, raw.post("/v1/reservations", json={"x": 1}, headers=h)),
        (401, raw.get("/v1/balances", params={"tenant": "acme"})),
        (404, raw.get("/v1/reservations/res_nope", headers=h)),
        (413, raw.post("/v1/decide", content=b"{" + b" " * 70_000 + b"}",
                       headers={**h, "Content-Type": "application/json"})),
    ):  # fmt: skip
        assert response.status_code == status
        check(response, "ErrorResponse")
    assert len(seen) == 19


def test_admin_response_shapes(schemas, admin, raw):
    if schemas._docs["admin"] is None:
        pytest.skip("governance spec not available")
    h = {"X-Admin-API-Key": ADMIN_KEY}
    schemas.check(raw.post("/v1/admin/tenants", json={"tenant_id": "acme", "name": "A"}, headers=h).json(), "Tenant",
                  "admin")  # fmt: skip
    schemas.check(raw.get("/v1/admin/tenants", headers=h).json(), "TenantListResponse", "admin")
    body = {"scope": "tenant:acme", "unit": USD, "allocated": usd(5), "tenant_id": "acme"}
    schemas.check(raw.post("/v1/admin/budgets", json=body, headers=h).json(), "BudgetLedger", "admin")
    q = {"scope": "tenant:acme", "unit": USD, "tenant_id": "acme"}
    schemas.check(raw.post("/v1/admin/budgets/fund", params=q, json={"operation": "CREDIT", "amount": usd(1)},
                           headers=h).json(), "BudgetFundingResponse", "admin")  # fmt: skip
    key = raw.post("/v1/admin/api-keys", json={"tenant_id": "acme", "name": "k"}, headers=h).json()
    schemas.check(key, "ApiKeyCreateResponse", "admin")
    schemas.check(raw.get("/v1/admin/api-keys", headers=h).json(), "ApiKeyListResponse", "admin")
    schemas.check(raw.get("/v1/auth/introspect", headers={"X-Cycles-API-Key": key["key_secret"]}).json(),
                  "AuthIntrospectResponse", "admin")  # fmt: skip
    schemas.check(raw.delete(f"/v1/admin/api-keys/{key['key_id']}", headers=h).json(), "ApiKey", "admin")


def test_the_checker_catches_violations(schemas):
    headers = {"x-request-id": "req_1", "x-cycles-trace-id": "a" * 32, "content-type": "application/json"}
    good = Exchange("POST", "/v1/decide", 200, headers, b'{"decision": "ALLOW"}')
    assert check_exchanges([good]) == []
    extra = Exchange("POST", "/v1/decide", 200, headers, b'{"decision": "ALLOW", "surprise": 1}')
    wrong = Exchange("POST", "/v1/reservations", 409, headers, b'{"error": "NOPE", "message": "m", "request_id": "x"}')
    no_trace = Exchange("GET", "/healthz", 200, {**headers, "x-cycles-trace-id": "XYZ"}, b"{}")
    crash = Exchange("GET", "/v1/balances", 500, headers, b'{"error": "INTERNAL_ERROR", "message": "m", '
                     b'"request_id": "req_1", "trace_id": "' + b"a" * 32 + b'"}')  # fmt: skip
    for exchange in (extra, wrong, no_trace, crash):
        assert check_exchanges([exchange]), exchange
    assert response_schema("GET", "/v1/reservations/abc", 200, {}) == ("runtime", "ReservationDetail")
    assert response_schema("GET", "/v1/admin/budgets/lookup", 200, {}) == ("admin", "BudgetLedger")
