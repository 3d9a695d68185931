"""Observability over real parts: a ledger on the test's clock (on SQLite, Redis and Redis Cluster), the app on the
shared loopback server (every response checked against the official schemas when ../shared/spec is present), and a
real webhook receiver."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from cycles.ledger import Ledger, SQLiteStore
from cycles.server import create_app
from cycles.server.testing import shared_server
from cycles.server.webhooks import verify

from ..server.conftest import ADMIN_KEY, USD, Recorder, _maybe_schemas, check_exchanges, usd

__all__ = ["ADMIN_KEY", "USD", "usd"]


def observed_schema(method: str, path: str, status: int) -> str | None:
    """The admin-spec schema of a response on the observability routes."""
    parts = path.strip("/").split("/")
    if parts[:2] == ["v1", "admin"]:
        parts = ["v1", *parts[2:]]
    if status >= 400:
        return "ErrorResponse" if parts[1:2] in (["events"], ["webhooks"], ["audit"]) else None
    if parts[1:] == ["audit", "logs"]:
        return "AuditLogListResponse"
    if parts[1:2] == ["events"] and method == "GET":
        return "EventListResponse" if len(parts) == 2 else "Event"
    if parts[1:2] == ["webhooks"]:
        if len(parts) == 2:
            return "WebhookCreateResponse" if method == "POST" else "WebhookListResponse"
        if len(parts) == 3:
            return None if method == "DELETE" else "WebhookSubscription"
        return {"test": "WebhookTestResponse", "deliveries": "WebhookDeliveryListResponse"}.get(parts[3])
    return None


@dataclass
class Served:
    url: str
    ledger: Ledger
    recorder: Recorder
    clients: list[httpx.Client] = field(default_factory=list)

    def client(self, **headers: str) -> httpx.Client:
        c = httpx.Client(base_url=self.url, headers=headers, timeout=10)
        self.clients.append(c)
        return c


STORES = ["sqlite", "redis", "redis-cluster"]


@pytest.fixture(params=STORES)
def store_kind(request: pytest.FixtureRequest) -> str:
    """The store the outbox, audit log and webhooks are kept in: every test of them runs on each (a module about
    something else, such as the page or the spans, pins "sqlite" by overriding this fixture)."""
    return request.param


@pytest.fixture
def ledger(request: pytest.FixtureRequest, tmp_path: Path, clock: Any, store_kind: str) -> Iterator[Ledger]:
    if store_kind == "sqlite":
        store: Any = SQLiteStore(tmp_path / "cycles.db")
    else:
        from cycles.ledger.redis import open_redis

        store = open_redis(request.getfixturevalue("redis_url" if store_kind == "redis" else "redis_cluster_url"))
    yield Ledger(store, clock=clock)
    store.close()


@pytest.fixture
def served(ledger: Ledger) -> Iterator[Served]:
    """The app (no background timers: tests drive the sweep and the webhook worker) on the shared live server."""
    app = create_app(
        ledger, admin_api_key=ADMIN_KEY, sweep_interval=None, webhook_interval=None, webhook_allow_private=True
    )
    recorder = Recorder(app)
    live, dispatcher = shared_server()
    prefix = dispatcher.add(recorder)
    served = Served(live.url + prefix, ledger, recorder)
    served.app = app  # type: ignore[attr-defined]
    yield served
    dispatcher.remove(prefix)
    for c in served.clients:
        c.close()
    problems = check_exchanges(recorder.exchanges)
    schemas = _maybe_schemas()
    if schemas is not None and schemas._docs["admin"] is not None:
        for x in recorder.exchanges:
            name = observed_schema(x.method, x.path, x.status)
            if name is not None and x.headers.get("content-type", "").startswith("application/json"):
                for problem in schemas.errors(json.loads(x.body), name, "admin"):
                    problems.append(f"{x.method} {x.path} -> {x.status}: admin {name}: {problem}")
    assert not problems, "responses off the spec:\n" + "\n".join(problems)


@pytest.fixture
def admin(served: Served) -> httpx.Client:
    return served.client(**{"X-Admin-API-Key": ADMIN_KEY})


def tenant_key(admin: httpx.Client, tenant: str, *permissions: str) -> str:
    admin.post("/v1/admin/tenants", json={"tenant_id": tenant, "name": tenant.title()}).raise_for_status()
    body: dict[str, Any] = {"tenant_id": tenant, "name": f"{tenant} key"}
    if permissions:
        body["permissions"] = list(permissions)
    response = admin.post("/v1/admin/api-keys", json=body)
    response.raise_for_status()
    return response.json()["key_secret"]


# ------------------------------------------------------------------------------------------------ the receiver


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> dict[str, Any]:
        return json.loads(self.body)


class Receiver:
    """A webhook endpoint on loopback: keeps every POST, answers `status` (settable), checks signatures."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.status = 200
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with receiver.arrived:
                    receiver.deliveries.append(Delivery({k.lower(): v for k, v in self.headers.items()}, body))
                    receiver.arrived.notify_all()
                self.send_response(receiver.status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Delivery]:
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.deliveries) >= count, timeout=timeout)
            return list(self.deliveries)

    def signed(self, secret: str) -> list[Delivery]:
        """The deliveries whose X-Cycles-Signature is a valid HMAC of their body under `secret`."""
        return [d for d in self.deliveries if verify(secret, d.body, d.headers.get("x-cycles-signature", ""))]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()
