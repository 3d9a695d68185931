"""HttpTransport against misbehaving servers, and cycles.Client over HTTP end to end."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

import cycles
from cycles import errors
from cycles.client.http import HttpTransport
from cycles.server.testing import LiveServer

from .conftest import ADMIN_KEY, USD, usd
from .test_runtime import reserve_body

DECIDE = reserve_body("k", 1)


async def odd(request: Request) -> Response:
    kind = request.path_params["kind"]
    if kind == "html404":
        return PlainTextResponse("<html>not here</html>", 404, media_type="text/html")
    if kind == "bad-gateway":
        return PlainTextResponse("upstream down", 502)
    if kind == "empty500":
        return Response(b"", 500)
    if kind == "garbage200":
        return PlainTextResponse("{not json", 200)
    if kind == "wrong-shape200":
        return JSONResponse({"decision": "MAYBE"})
    if kind == "throttled":
        return JSONResponse({"error": "LIMIT_EXCEEDED", "message": "slow down", "request_id": "r"}, 429,
                            headers={"Retry-After": "3"})  # fmt: skip
    if kind == "future-code":
        return JSONResponse({"error": "QUOTA_EXHAUSTED", "message": "new", "request_id": "r", "details": {"a": 1}},
                            409)  # fmt: skip
    if kind == "teapot":
        return JSONResponse({"unexpected": True}, 418)
    raise AssertionError(kind)


@pytest.fixture(scope="module")
def odd_server():
    app = Starlette(routes=[Route("/{kind}/v1/decide", odd, methods=["POST"])])
    with LiveServer(app, lifespan="off") as live:
        yield live


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("html404", errors.TransportError),
        ("bad-gateway", errors.InternalError),
        ("empty500", errors.InternalError),
        ("garbage200", errors.TransportError),
        ("wrong-shape200", errors.TransportError),
        ("teapot", errors.TransportError),
        ("throttled", errors.LimitExceeded),
    ],
)
def test_non_protocol_answers(odd_server, kind, expected):
    t = HttpTransport(f"{odd_server.url}/{kind}", api_key="k")
    with pytest.raises(expected) as info:
        t.decide(DECIDE)
    assert type(info.value) is expected
    if kind == "throttled":
        assert info.value.details["retry_after_ms"] == 3000 and info.value.status == 429
    with pytest.raises(expected):
        asyncio.run(t.adecide(DECIDE))
    t.close()


def test_unknown_error_codes_keep_their_name(odd_server):
    with pytest.raises(errors.CyclesError) as info:
        HttpTransport(f"{odd_server.url}/future-code").decide(DECIDE)
    assert info.value.code == "QUOTA_EXHAUSTED" and info.value.status == 409 and info.value.details == {"a": 1}


def test_connection_refused_is_transport_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    t = HttpTransport(f"http://127.0.0.1:{port}", api_key="k", timeout=2)
    with pytest.raises(errors.TransportError) as info:
        t.decide(DECIDE)
    assert info.value.status == 0
    with pytest.raises(errors.TransportError):
        asyncio.run(t.abalances({"tenant": "a"}))


def test_timeout_is_transport_error():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True)
    thread.start()
    t = HttpTransport(f"http://127.0.0.1:{listener.getsockname()[1]}", api_key="k", timeout=0.2)
    try:
        with pytest.raises(errors.TransportError) as info:
            t.reserve(DECIDE)
        assert "timed out" in info.value.message
    finally:
        t.close()
        for conn, _ in accepted:
            conn.close()
        listener.close()


def test_base_url_must_be_http():
    with pytest.raises(ValueError):
        HttpTransport("localhost:7878")


def test_client_over_http_end_to_end(server, monkeypatch):
    monkeypatch.setenv("CYCLES_ADMIN_API_KEY", ADMIN_KEY)
    admin = cycles.Client(server.url, tenant="acme")
    admin.tenants.create("acme")
    key = admin.keys.create("acme", "agent").key_secret
    admin.budgets.set("tenant:acme", cycles.usd(1))
    admin.budgets.set("tenant:acme", cycles.usd(2))  # exists: RESET
    assert admin.budgets.get("tenant:acme").allocated.amount == 2 * cycles.MICROCENTS_PER_USD
    admin.close()

    monkeypatch.delenv("CYCLES_ADMIN_API_KEY")
    client = cycles.Client(server.url, api_key=key, tenant="acme", agent="bot")
    assert "HttpTransport" in repr(client.transport) or server.url in repr(client)
    with client.reserve(cycles.usd(0.5), action=("llm.completion", "gpt-4o")) as r:
        r.commit(actual=cycles.usd(0.25))
    with pytest.raises(cycles.BudgetExceeded):
        with client.reserve(cycles.usd(5), action=("llm.completion", "gpt-4o")):
            pass
    spent = {b.scope: b.spent.amount for b in client.balances()}
    assert spent["tenant:acme"] == cycles.MICROCENTS_PER_USD // 4
    assert client.reservations()[0].status == "COMMITTED"

    async def run_async() -> None:
        async with client.reserve(cycles.usd(0.1), action=("tool.search", "web")) as r:
            r.commit(actual=cycles.usd(0.05))
        assert (await client.adecide(cycles.usd(0.1), action=("tool.search", "web"))).decision == "ALLOW"

    asyncio.run(run_async())
    client.close()


def test_default_admin_key_from_env(monkeypatch):
    monkeypatch.setenv("CYCLES_ADMIN_API_KEY", "from-env")
    assert HttpTransport("http://h").admin_api_key == "from-env"
    assert HttpTransport("http://h", admin_api_key="given").admin_api_key == "given"
    t = HttpTransport("http://h", api_key="k", timeout=1.5)
    assert t.timeout == 1.5 and t.api_key == "k"


def test_budget_calls_with_only_a_tenant_key(server, admin):
    admin.admin.create_tenant({"tenant_id": "acme", "name": "Acme"})
    key = admin.admin.create_api_key({"tenant_id": "acme", "name": "k"}).key_secret
    client = cycles.Client(server.url, api_key=key, tenant="acme")
    client.transport.admin_api_key = None
    client.budgets.set("tenant:acme/agent:bot", cycles.usd(1))
    client.budgets.fund("tenant:acme/agent:bot", cycles.usd(1))
    assert [b.allocated.amount for b in client.budgets.list()] == [2 * cycles.MICROCENTS_PER_USD]
    with pytest.raises(errors.Unauthorized):
        client.budgets.freeze("tenant:acme/agent:bot")  # admin only
    client.close()


def test_events_and_async_balances(server, admin, acme):
    admin.admin.create_budget({"scope": "tenant:acme", "unit": USD, "allocated": usd(100)})

    async def go() -> None:
        e = await acme.aevent({"idempotency_key": "e", "subject": {"tenant": "acme"},
                               "action": {"kind": "k", "name": "n"}, "actual": usd(7)})  # fmt: skip
        assert e.charged.amount == 7
        results = await asyncio.gather(*(acme.adecide(reserve_body(f"d{i}", 1) | {"subject": {"tenant": "acme"}})
                                         for i in range(20)))  # fmt: skip
        assert {r.decision for r in results} == {"ALLOW"}
        await acme.aclose()

    asyncio.run(go())
    assert acme.balances({"tenant": "acme"}).balances[0].spent.amount == 7
