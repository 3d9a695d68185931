"""Bad input is a 4xx with the protocol's ErrorResponse body, never a 5xx, and writes nothing."""

from __future__ import annotations

import json

import pytest

from .conftest import USD, usd
from .test_runtime import ACTION

SUBJECT = {"tenant": "acme"}
GOOD = {"idempotency_key": "k", "subject": SUBJECT, "action": ACTION, "estimate": usd(5)}


@pytest.fixture
def h(admin, acme_key, server):
    admin.admin.create_budget({"scope": "tenant:acme", "unit": USD, "allocated": usd(1_000)})
    return {"X-Cycles-API-Key": acme_key}


def assert_nothing_written(server):
    ledger = server.ledger
    assert ledger.list_reservations({}, tenant="acme").reservations == []
    b = ledger.balances({"tenant": "acme"}, tenant="acme").balances[0]
    assert (b.allocated.amount, b.spent.amount, b.reserved.amount, b.debt.amount) == (1_000, 0, 0, 0)


def assert_error(response, status=400, code="INVALID_REQUEST"):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code and body["message"] and body["request_id"] and len(body["trace_id"]) == 32
    return body


RAW_BODIES = {
    "malformed": b'{"idempotency_key": ',
    "trailing garbage": json.dumps(GOOD).encode() + b"}",
    "array": b"[1, 2]",
    "string": b'"hello"',
    "number": b"42",
    "null": b"null",
    "empty": b"",
    "whitespace": b"   ",
    "NaN": json.dumps({**GOOD, "estimate": {"unit": USD, "amount": float("nan")}}).encode(),
    "Infinity": b'{"idempotency_key": "k", "subject": {"tenant": "acme"}, "action": {"kind": "a", "name": "b"}, '
    b'"estimate": {"unit": "USD_MICROCENTS", "amount": Infinity}}',
    "invalid utf-8": b'{"idempotency_key": "\xff\xfe", "subject": {"tenant": "acme"}}',
    "lone surrogate": b'{"idempotency_key": "\\ud800", "subject": {"tenant": "acme"}, "action": {"kind": "a", '
    b'"name": "b"}, "estimate": {"unit": "USD_MICROCENTS", "amount": 1}}',
    "surrogate in metadata": json.dumps({**GOOD, "metadata": {"x": "\\ud83d"}}).encode().replace(b"\\\\", b"\\"),
    "deep nesting": json.dumps({**GOOD, "metadata": {"a": json.loads("[" * 40 + "1" + "]" * 40)}}).encode(),
    "very deep nesting": b'{"metadata": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
    "5000 digit integer": b'{"idempotency_key": "k", "subject": {"tenant": "acme"}, "action": {"kind": "a", '
    b'"name": "b"}, "estimate": {"unit": "USD_MICROCENTS", "amount": ' + b"9" * 5000 + b"}}",
}


@pytest.mark.parametrize("name", list(RAW_BODIES))
def test_malformed_bodies(raw, h, server, name):
    response = raw.post("/v1/reservations", content=RAW_BODIES[name], headers={**h, "Content-Type": "application/json"})
    assert_error(response)
    assert_nothing_written(server)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          "application/xml", ""])  # fmt: skip
def test_wrong_content_type(raw, h, server, content_type):
    response = raw.post("/v1/reservations", content=json.dumps(GOOD), headers={**h, "Content-Type": content_type})
    assert_error(response)
    assert_nothing_written(server)


def test_json_content_type_variants_are_accepted(raw, h):
    for i, ct in enumerate(("application/json; charset=utf-8", "APPLICATION/JSON", "application/vnd.cycles+json")):
        body = json.dumps({**GOOD, "idempotency_key": f"ct{i}"})
        assert raw.post("/v1/reservations", content=body, headers={**h, "Content-Type": ct}).status_code == 200


def bad_fields():
    big = "x" * 300
    return {
        "unknown top-level field": {**GOOD, "surprise": True},
        "unknown nested field": {**GOOD, "estimate": {**usd(5), "currency": "EUR"}},
        "unknown subject field": {**GOOD, "subject": {"tenant": "acme", "team": "x"}},
        "missing idempotency_key": {k: v for k, v in GOOD.items() if k != "idempotency_key"},
        "empty idempotency_key": {**GOOD, "idempotency_key": ""},
        "long idempotency_key": {**GOOD, "idempotency_key": "k" * 257},
        "negative amount": {**GOOD, "estimate": usd(-1)},
        "amount over int64": {**GOOD, "estimate": usd(2**63)},
        "amount 2**200": {**GOOD, "estimate": usd(2**200)},
        "float amount": {**GOOD, "estimate": usd(1.5)},
        "integral float amount": {**GOOD, "estimate": usd(5.0)},
        "string amount": {**GOOD, "estimate": usd("5")},
        "bool amount": {**GOOD, "estimate": usd(True)},
        "unknown unit": {**GOOD, "estimate": {"unit": "EUR", "amount": 5}},
        "ttl too large": {**GOOD, "ttl_ms": 10**12},
        "ttl too small": {**GOOD, "ttl_ms": 1},
        "grace negative": {**GOOD, "grace_period_ms": -1},
        "dry_run string": {**GOOD, "dry_run": "yes"},
        "bad overage policy": {**GOOD, "overage_policy": "WHATEVER"},
        "subject without levels": {**GOOD, "subject": {"dimensions": {"a": "b"}}},
        "subject value with slash": {**GOOD, "subject": {"tenant": "acme", "agent": "a/b"}},
        "subject value with colon": {**GOOD, "subject": {"tenant": "acme", "agent": "a:b"}},
        "subject value too long": {**GOOD, "subject": {"tenant": "acme", "agent": "a" * 129}},
        "subject null": {**GOOD, "subject": None},
        "subject list": {**GOOD, "subject": ["tenant", "acme"]},
        "action name too long": {**GOOD, "action": {"kind": "k", "name": big * 2}},
        "too many tags": {**GOOD, "action": {**ACTION, "tags": ["t"] * 11}},
        "too many dimensions": {**GOOD, "subject": {"tenant": "acme", "dimensions": {f"d{i}": "v" for i in range(17)}}},
        "metadata not an object": {**GOOD, "metadata": [1, 2]},
    }


@pytest.mark.parametrize("name", list(bad_fields()))
def test_bad_fields(raw, h, server, name):
    body = assert_error(raw.post("/v1/reservations", json=bad_fields()[name], headers=h))
    assert_nothing_written(server)
    assert "details" not in body or isinstance(body["details"], dict)


def test_bad_bodies_on_every_post_route(raw, h, server):
    rid = raw.post("/v1/reservations", json=GOOD, headers=h).json()["reservation_id"]
    for path in (f"/v1/reservations/{rid}/commit", f"/v1/reservations/{rid}/release",
                 f"/v1/reservations/{rid}/extend", "/v1/decide", "/v1/events"):  # fmt: skip
        for content in (b"{", b"[]", json.dumps({"idempotency_key": "x", "extra": 1}).encode()):
            assert_error(raw.post(path, content=content, headers={**h, "Content-Type": "application/json"}))
        assert_error(raw.post(path, json={"idempotency_key": "x", "actual": usd(2**64),
                                          "extend_by_ms": 10**20}, headers=h))  # fmt: skip
    assert raw.get(f"/v1/reservations/{rid}", headers=h).json()["status"] == "ACTIVE"


def test_oversized_bodies_are_413(raw, h, server):
    big = {**GOOD, "metadata": {"blob": "x" * (70 * 1024)}}
    response = raw.post("/v1/reservations", json=big, headers=h)
    assert_error(response, 413)

    def chunks():  # no Content-Length: the limit holds while streaming
        yield json.dumps(GOOD)[:-1].encode() + b', "metadata": {"blob": "'
        for _ in range(80):
            yield b"y" * 1024
        yield b'"}}'

    streamed = raw.post("/v1/reservations", content=chunks(), headers={**h, "Content-Type": "application/json"})
    assert_error(streamed, 413)
    status, head = raw_request(server.url, "POST", "/v1/reservations", {**h, "Content-Length": "999999999"},
                               json.dumps(GOOD).encode())  # fmt: skip
    assert status == 413 and b"x-cycles-trace-id" in head.lower()
    assert_nothing_written(server)
    just_under = {**GOOD, "metadata": {"blob": "z" * (60 * 1024)}}
    assert raw.post("/v1/reservations", json=just_under, headers=h).status_code == 200


def raw_request(url: str, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
    """A request written by hand on a socket (for headers httpx will not send)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    lines = [f"{method} {parts.path}{path} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close",
             *(f"{k}: {v}" for k, v in headers.items())]  # fmt: skip
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head = data.split(b"\r\n\r\n", 1)[0]
    return int(head.split(b" ", 2)[1]), head


def test_absurd_ids(raw, h, server):
    for rid in ("r" * 129, "r" * 5000):
        assert_error(raw.get(f"/v1/reservations/{rid}", headers=h))
        assert_error(raw.post(f"/v1/reservations/{rid}/commit", json={"idempotency_key": "c", "actual": usd(1)},
                              headers=h))  # fmt: skip
    for rid in ("%00", "%F0%9F%92%A5", "..", "%2e%2e", "a%20b", "'; DROP TABLE reservations; --", "r" * 128):
        response = raw.get(f"/v1/reservations/{rid}", headers=h)
        assert response.status_code in (400, 404), rid
        assert response.json()["error"] in ("NOT_FOUND", "INVALID_REQUEST")
    assert_error(raw.get("/v1/reservations/a/b/c", headers=h), 404, "NOT_FOUND")
    assert_nothing_written(server)


ABSURD_QUERIES = [
    {"limit": "0"}, {"limit": "-1"}, {"limit": "201"}, {"limit": str(10**30)}, {"limit": "abc"}, {"limit": "1.5"},
    {"status": "WHATEVER"}, {"sort_by": "password"}, {"sort_dir": "sideways"}, {"cursor": "not-a-cursor"},
    {"cursor": "e30"}, {"from": "yesterday"}, {"from": "2030-01-02T00:00:00Z", "to": "2030-01-01T00:00:00Z"},
    {"expires_from": "3000-01-01", "expires_to": "2000-01-01"}, {"from": "9" * 30}, {"to": "9" * 400},
    {"finalized_from": "0001-01-01T00:00:00+14:00"}, {"from": "9999-12-31T23:59:59-14:00"},
]  # fmt: skip


@pytest.mark.parametrize("query", ABSURD_QUERIES, ids=lambda q: json.dumps(q)[:60])
def test_absurd_list_queries(raw, h, query):
    response = raw.get("/v1/reservations", params=query, headers=h)
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert_error(response)


@pytest.mark.parametrize(
    "query",
    [{}, {"limit": "0"}, {"limit": str(10**30)}, {"include_children": "maybe"}, {"cursor": "zzz", "tenant": "acme"},
     {"unit": "EUR"}, {"tenant": "acme", "agent": "x" * 10_000}, {"scope_prefix": "x" * 5000, "limit": "-5"}],
    ids=lambda q: json.dumps(q)[:60],
)  # fmt: skip
def test_absurd_balance_queries(raw, h, query):
    response = raw.get("/v1/balances", params=query, headers=h)
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert_error(response)


def test_admin_bad_input(raw, server):
    from .conftest import ADMIN_KEY

    h = {"X-Admin-API-Key": ADMIN_KEY}
    assert_error(raw.post("/v1/admin/tenants", content=b"{", headers={**h, "Content-Type": "application/json"}))
    assert_error(raw.post("/v1/admin/tenants", json={"tenant_id": "UPPER", "name": "x"}, headers=h))
    assert_error(raw.post("/v1/admin/tenants", json={"tenant_id": "ok-1", "name": "x", "evil": 1}, headers=h))
    assert_error(raw.get("/v1/admin/tenants", params={"limit": "9" * 40}, headers=h))
    assert_error(raw.get("/v1/admin/tenants", params={"cursor": "!!"}, headers=h))
    assert_error(raw.get("/v1/admin/tenants/" + "t" * 200, headers=h))
    assert_error(raw.get("/v1/admin/budgets/lookup", headers=h))
    assert_error(raw.get("/v1/admin/budgets/lookup", params={"scope": "nope", "unit": USD}, headers=h))
    assert_error(raw.get("/v1/admin/budgets/lookup", params={"scope": "tenant:a", "unit": "EUR"}, headers=h))
    assert_error(raw.post("/v1/admin/budgets", json={"scope": "tenant:a", "unit": USD, "allocated": usd(1)},
                          headers=h))  # admin create without tenant_id  # fmt: skip
    assert_error(raw.post("/v1/admin/budgets", json={"scope": "agent:x", "unit": USD, "allocated": usd(1),
                                                     "tenant_id": "a"}, headers=h))  # fmt: skip
    assert_error(raw.post("/v1/admin/budgets/fund", params={"scope": "tenant:a", "unit": USD},
                          json={"operation": "CREDIT", "amount": usd(1)}, headers=h))  # no tenant_id  # fmt: skip
    assert_error(raw.post("/v1/admin/api-keys", json={"tenant_id": "a", "name": "k", "permissions": ["root"]},
                          headers=h))  # fmt: skip
    assert_error(raw.get("/v1/admin/api-keys", params={"limit": "0"}, headers=h))
    assert_error(raw.delete("/v1/admin/api-keys/k", params={"reason": "r" * 600}, headers=h))
    raw.post("/v1/admin/tenants", json={"tenant_id": "acme", "name": "Acme"}, headers=h)
    for when in ("9" * 25, "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "soon"):
        assert_error(raw.post("/v1/admin/api-keys", json={"tenant_id": "acme", "name": "k", "expires_at": when},
                              headers=h))  # fmt: skip
        assert_error(raw.post("/v1/admin/policies", json={"tenant_id": "acme", "name": "p", "scope_pattern": "agent:*",
                                                          "effective_until": when}, headers=h))  # fmt: skip
    assert raw.get("/v1/admin/api-keys", params={"tenant_id": "acme"}, headers=h).json()["keys"] == []
