"""X-Request-Id and X-Cycles-Trace-Id on every response, trace propagation, X-Idempotency-Key."""

from __future__ import annotations

import re

import pytest

from cycles import errors

from .conftest import ADMIN_KEY, USD, usd
from .test_runtime import reserve_body

TRACE = re.compile(r"[0-9a-f]{32}")
TP_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TP_TRACE}-00f067aa0ba902b7-01"


@pytest.fixture
def key(admin, acme_key):
    admin.admin.create_budget({"scope": "tenant:acme", "unit": USD, "allocated": usd(1_000)})
    return acme_key


def requests(key):
    h = {"X-Cycles-API-Key": key}
    return [
        ("GET", "/healthz", None, {}),
        ("GET", "/readyz", None, {}),
        ("POST", "/v1/reservations", reserve_body("h1", 1) | {"subject": {"tenant": "acme"}}, h),  # 200
        ("POST", "/v1/reservations", reserve_body("h2", 10**6) | {"subject": {"tenant": "acme"}}, h),  # 409
        ("POST", "/v1/reservations", {"nope": 1}, h),  # 400
        ("GET", "/v1/reservations/res_missing", None, h),  # 404
        ("GET", "/v1/balances", None, {}),  # 401
        ("GET", "/v1/balances?tenant=acme", None, h),
        ("GET", "/v1/admin/tenants", None, {"X-Admin-API-Key": ADMIN_KEY}),
        ("GET", "/v1/nowhere", None, {}),  # 404 route
        ("PUT", "/v1/decide", None, h),  # 405
    ]


def test_every_response_carries_request_and_trace_ids(raw, key):
    seen = set()
    for method, path, body, headers in requests(key):
        response = raw.request(method, path, json=body, headers=headers)
        rid, trace = response.headers.get("x-request-id"), response.headers.get("x-cycles-trace-id")
        assert rid and TRACE.fullmatch(trace), (method, path, response.status_code)
        assert rid not in seen
        seen.add(rid)
        if response.status_code >= 400:
            body = response.json()
            assert body["request_id"] == rid and body["trace_id"] == trace and body["error"] and body["message"]
            assert set(body) <= {"error", "message", "request_id", "trace_id", "details"}


def test_tenant_header_on_tenant_responses(raw, key):
    response = raw.get("/v1/balances", params={"tenant": "acme"}, headers={"X-Cycles-API-Key": key})
    assert response.headers["x-cycles-tenant"] == "acme"


def test_traceparent_wins_then_x_cycles_trace_id(raw, key):
    for method, path, body, headers in requests(key):
        both = raw.request(method, path, json=body, headers={**headers, "traceparent": TRACEPARENT,
                                                             "X-Cycles-Trace-Id": "a" * 32})  # fmt: skip
        assert both.headers["x-cycles-trace-id"] == TP_TRACE
        flat = raw.request(method, path, json=body, headers={**headers, "X-Cycles-Trace-Id": "b" * 32})
        assert flat.headers["x-cycles-trace-id"] == "b" * 32
        if flat.status_code >= 400:
            assert flat.json()["trace_id"] == "b" * 32


@pytest.mark.parametrize(
    "traceparent",
    [
        "garbage",
        f"01-{TP_TRACE}-00f067aa0ba902b7-01",  # unknown version
        f"00-{'0' * 32}-00f067aa0ba902b7-01",  # all-zero trace id
        f"00-{TP_TRACE}-{'0' * 16}-01",  # all-zero span id
        f"00-{TP_TRACE.upper()}-00f067aa0ba902b7-01",  # uppercase
        f"00-{TP_TRACE}-00f067aa0ba902b7",  # no flags
        "",
    ],
)
def test_malformed_correlation_headers_are_ignored(raw, key, traceparent):
    h = {"X-Cycles-API-Key": key, "traceparent": traceparent}
    fallback = raw.get("/v1/balances", params={"tenant": "acme"}, headers={**h, "X-Cycles-Trace-Id": "c" * 32})
    assert fallback.status_code == 200 and fallback.headers["x-cycles-trace-id"] == "c" * 32
    for bad in ("0" * 32, "C" * 32, "c" * 31, "xyz", "c" * 33):
        response = raw.get("/v1/balances", params={"tenant": "acme"}, headers={**h, "X-Cycles-Trace-Id": bad})
        assert response.status_code == 200
        trace = response.headers["x-cycles-trace-id"]
        assert TRACE.fullmatch(trace) and trace not in ("0" * 32, TP_TRACE)


def test_client_errors_carry_the_ids(acme, admin):
    admin.admin.create_budget({"scope": "tenant:acme", "unit": USD, "allocated": usd(10)})
    with pytest.raises(errors.BudgetExceeded) as info:
        acme.reserve(reserve_body("big", 11) | {"subject": {"tenant": "acme"}})
    assert info.value.request_id.startswith("req_") and TRACE.fullmatch(info.value.trace_id)
    assert info.value.details["scope"] == "tenant:acme" and info.value.remaining == 10


def test_idempotency_header_must_match_the_body(raw, key, server):
    h = {"X-Cycles-API-Key": key}
    body = reserve_body("body-key", 5) | {"subject": {"tenant": "acme"}}
    mismatch = raw.post("/v1/reservations", json=body, headers={**h, "X-Idempotency-Key": "other-key"})
    assert mismatch.status_code == 409 and mismatch.json()["error"] == "IDEMPOTENCY_MISMATCH"
    assert raw.get("/v1/reservations", headers=h).json()["reservations"] == []  # nothing written
    ok = raw.post("/v1/reservations", json=body, headers={**h, "X-Idempotency-Key": "body-key"})
    assert ok.status_code == 200
    rid = ok.json()["reservation_id"]
    for path, payload in ((f"/v1/reservations/{rid}/extend", {"idempotency_key": "x", "extend_by_ms": 1000}),
                          (f"/v1/reservations/{rid}/commit", {"idempotency_key": "c", "actual": usd(1)}),
                          (f"/v1/reservations/{rid}/release", {"idempotency_key": "r"}),
                          ("/v1/decide", reserve_body("d", 1)),
                          ("/v1/events", {"idempotency_key": "e", "subject": {"tenant": "acme"},
                                          "action": body["action"], "actual": usd(1)})):  # fmt: skip
        response = raw.post(path, json=payload, headers={**h, "X-Idempotency-Key": "different"})
        assert response.status_code == 409 and response.json()["error"] == "IDEMPOTENCY_MISMATCH", path
    assert server.ledger.balances({"tenant": "acme"}, tenant="acme").balances[0].spent.amount == 0


def test_runtime_paths_answer_other_methods_like_every_route(raw, key):
    """The runtime routes are served by their own dispatcher, in front of Starlette: wrong methods, HEAD and
    trailing slashes still get Starlette's answers, in the protocol's error shape."""
    h = {"X-Cycles-API-Key": key}
    wrong = raw.delete("/v1/reservations/res_x/commit", headers=h)
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert wrong.json()["error"] == "INVALID_REQUEST" and wrong.headers["x-request-id"]
    get = raw.get("/v1/balances", params={"tenant": "acme"}, headers=h)
    head = raw.head("/v1/balances", params={"tenant": "acme"}, headers=h)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == get.headers["content-length"]
    assert head.headers["x-cycles-tenant"] == "acme" and TRACE.fullmatch(head.headers["x-cycles-trace-id"])
    slash = raw.post("/v1/decide/", json=reserve_body("s", 1), headers=h)
    assert slash.status_code == 307 and slash.headers["location"].endswith("/v1/decide")
    assert raw.post("/v1/reservations/res_x/cancel", json={}, headers=h).status_code == 404
