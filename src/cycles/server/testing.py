"""Serving a ledger over real HTTP on loopback, for tests, notebooks and demos.

    with LiveServer(create_app(ledger, admin_api_key="k")) as server:     # uvicorn in a background thread
        client = cycles.Client(server.url, api_key=...)

    with serve_authority(Ledger(store, clock=clock)) as authority:       # the Ledger API, over HTTP
        authority.reserve({...}, tenant="acme")

`HttpAuthority` has the interface of `cycles.ledger.Ledger` (runtime calls with `tenant=`, `.admin`, `.sweep()`),
implemented over the HTTP API, so a suite written against the ledger runs unchanged against the server. `tenant=X`
picks an API key of tenant X, created on first use through the admin API (with a tenant record named X when none
exists, and every permission). What HTTP cannot express is documented on the class.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import uvicorn
from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

from ..client.http import HttpAdmin, HttpTransport
from ..errors import InvalidRequest, NotFound
from ..ledger import Ledger
from ..ledger.store import TenantRecord
from ..models import (
    PERMISSIONS,
    BalanceResponse,
    CommitResponse,
    DecisionRequest,
    DecisionResponse,
    EventCreateRequest,
    EventCreateResponse,
    ReleaseResponse,
    ReservationCreateRequest,
    ReservationCreateResponse,
    ReservationDetail,
    ReservationExtendResponse,
    ReservationListResponse,
    Tenant,
    parse,
)
from .app import create_app
from .protocol import H11NoDelayProtocol

__all__ = ["LiveServer", "Dispatcher", "HttpAuthority", "serve_authority", "shared_server"]


class LiveServer:
    """uvicorn serving `app` on a free loopback port in a daemon thread. `lifespan="on"` runs the app's lifespan
    (the expiry sweep); stop() shuts down gracefully."""

    def __init__(self, app: ASGIApp, *, host: str = "127.0.0.1", port: int = 0, lifespan: str = "on") -> None:
        self.app = app
        self.host = host
        self.port = port
        self.config = uvicorn.Config(
            app, host=host, port=port, lifespan=lifespan, log_level="warning", access_log=False,
            timeout_graceful_shutdown=5, http=H11NoDelayProtocol,
        )  # fmt: skip
        self.server = uvicorn.Server(self.config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> LiveServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, name=f"cycles-live-server-{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the live server exited during startup")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the live server did not start within {timeout}s")
            time.sleep(0.005)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        if self._thread is not None:
            self.server.should_exit = True
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class Dispatcher:
    """One ASGI app serving many: `/t/<name>/...` goes to the app registered as <name> (its root_path is set, so
    the app routes `/...`). Lets one live server host a fresh app per test."""

    def __init__(self) -> None:
        self.apps: dict[str, ASGIApp] = {}

    def add(self, app: ASGIApp) -> str:
        name = os.urandom(6).hex()
        self.apps[name] = app
        return f"/t/{name}"

    def remove(self, prefix: str) -> None:
        self.apps.pop(prefix.rsplit("/", 1)[-1], None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path: str = scope["path"]
        parts = path.split("/", 3)  # "", "t", name, rest
        app = self.apps.get(parts[2]) if len(parts) >= 3 and parts[1] == "t" else None
        if app is None:
            if scope["type"] == "http":
                headers = [(b"content-type", b"text/plain")]
                await send({"type": "http.response.start", "status": 404, "headers": headers})
                await send({"type": "http.response.body", "body": b"no app mounted here"})
            return
        prefix = f"/t/{parts[2]}"
        await app({**scope, "root_path": scope.get("root_path", "") + prefix}, receive, send)


_shared: tuple[LiveServer, Dispatcher] | None = None
_shared_lock = threading.Lock()


def shared_server() -> tuple[LiveServer, Dispatcher]:
    """A process-wide live server (started on first use, a daemon thread) and its Dispatcher."""
    global _shared
    with _shared_lock:
        if _shared is None:
            dispatcher = Dispatcher()
            _shared = (LiveServer(dispatcher, lifespan="off").start(), dispatcher)
        return _shared


def _tenant_field(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        subject = getattr(value, "subject", None)
        return getattr(subject, "tenant", None)
    if isinstance(value, Mapping):
        subject = value.get("subject")
        if isinstance(subject, BaseModel):
            return getattr(subject, "tenant", None)
        if isinstance(subject, Mapping) and isinstance(subject.get("tenant"), str):
            return subject["tenant"]
    return None


class _AuthorityAdmin(HttpAdmin):
    def __init__(self, authority: HttpAuthority) -> None:
        super().__init__(authority.transport, key_for=authority.key_for)
        self.authority = authority

    def create_tenant(self, request: Any) -> tuple[Tenant, bool]:
        """A tenant this adapter created implicitly (for a key) counts as not created yet: the explicit create
        applies its settings and reports created=True, as the embedded ledger would."""
        a = self.authority
        data = request.model_dump(exclude_unset=True) if isinstance(request, BaseModel) else dict(request)
        tenant_id = data.get("tenant_id")
        with a._lock:
            implicit = tenant_id in a._implicit
        if not implicit:
            return super().create_tenant(request)
        changes = {k: v for k, v in data.items() if k not in ("tenant_id", "parent_tenant_id")}
        tenant = self.update_tenant(tenant_id, changes)
        with a._lock:
            a._implicit.discard(tenant_id)
        return tenant, True


class HttpAuthority:
    """The `cycles.ledger.Ledger` interface over a live Cycles server.

    `tenant=X` on a runtime call uses an API key of tenant X; `tenant=None` uses the admin key where the protocol
    allows it (get/list/release of reservations) and otherwise the key of the subject's (or reservation's) tenant.
    `.admin` takes the same `tenant=` keyword (a tenant key instead of the admin key). `.sweep()` calls the served
    ledger in-process, so it needs `ledger`.

    Differences HTTP imposes: keys of a SUSPENDED or CLOSED tenant fail authentication (401 Unauthorized where the
    embedded ledger answers 403 / 409 TENANT_CLOSED); admin-only routes (tenant create/update, budget update,
    freeze/unfreeze, API keys) refuse tenant keys (401); tenant ids that are not valid tenant-record ids get their
    record written straight into the served store.
    """

    kind = "http"

    def __init__(self, base_url: str, admin_api_key: str, *, ledger: Ledger | None = None, timeout: float = 10.0):
        self.base_url = base_url
        self.ledger = ledger
        self.transport = HttpTransport(base_url, admin_api_key=admin_api_key, timeout=timeout)
        self._keys: dict[str, str] = {}
        self._owners: dict[str, str] = {}  # reservation id -> tenant, for calls made without tenant=
        self._implicit: set[str] = set()
        self._lock = threading.RLock()
        self.admin = _AuthorityAdmin(self)

    # ------------------------------------------------------------------------------------------------ keys
    def key_for(self, tenant: str) -> str:
        with self._lock:
            key = self._keys.get(tenant)
            if key is None:
                self._ensure_tenant(tenant)
                created = HttpAdmin.create_api_key(
                    self.admin, {"tenant_id": tenant, "name": "conformance", "permissions": list(PERMISSIONS)}
                )
                key = self._keys[tenant] = created.key_secret
            return key

    def _ensure_tenant(self, tenant: str) -> None:
        try:
            self.admin.get_tenant(tenant)
            return
        except (NotFound, InvalidRequest):
            pass
        try:
            HttpAdmin.create_tenant(self.admin, {"tenant_id": tenant, "name": tenant})
        except InvalidRequest:
            if self.ledger is None:
                raise
            with self.ledger.begin(sweep=False) as (tx, now):  # an id the tenant API refuses: write the record
                if tx.get_tenant(tenant) is None:
                    tx.put_tenant(TenantRecord(tenant_id=tenant, name=tenant, created_at_ms=now, updated_at_ms=now))
        self._implicit.add(tenant)

    def _as(self, tenant: str | None) -> dict[str, str]:
        return self.transport.auth_headers(api_key=self.key_for(tenant)) if tenant is not None else {}

    def _admin(self) -> dict[str, str]:
        return self.transport.auth_headers(admin=True)

    def _subject_tenant(self, request: Any, tenant: str | None, model: type[BaseModel]) -> str:
        owner = tenant or _tenant_field(request)
        if owner is None:
            parse(model, request)  # invalid input: the ledger's own 400
            raise InvalidRequest("subject has no tenant and no effective tenant is configured")
        return owner

    def _owner(self, reservation_id: str, tenant: str | None) -> dict[str, str]:
        if tenant is not None:
            return self._as(tenant)
        with self._lock:
            owner = self._owners.get(reservation_id)
        if owner is None:  # not made through this adapter: ask the server (unknown / expired raise as the ledger)
            detail = self._call("GET", f"/v1/reservations/{reservation_id}", ReservationDetail, self._admin())
            owner = detail.subject.tenant
        return self._as(owner) if owner else self._admin()

    def _call(self, method: str, path: str, model: type[Any], headers: dict[str, str], **kw: Any) -> Any:
        from urllib.parse import quote

        if path.startswith("/v1/reservations/"):
            head, _, rest = path[len("/v1/reservations/") :].partition("/")
            path = "/v1/reservations/" + quote(head, safe="") + ("/" + rest if rest else "")
        return self.transport.request(method, path, model, headers=headers, **kw)[0]

    # -------------------------------------------------------------------------------------------- runtime
    def reserve(self, request: Any, *, tenant: str | None = None) -> ReservationCreateResponse:
        owner = self._subject_tenant(request, tenant, ReservationCreateRequest)
        response = self._call("POST", "/v1/reservations", ReservationCreateResponse, self._as(owner), body=request)
        if response.reservation_id:
            with self._lock:
                self._owners[response.reservation_id] = owner
        return response

    def commit(self, reservation_id: str, request: Any, *, tenant: str | None = None) -> CommitResponse:
        headers = self._owner(reservation_id, tenant)
        return self._call("POST", f"/v1/reservations/{reservation_id}/commit", CommitResponse, headers, body=request)

    def release(self, reservation_id: str, request: Any, *, tenant: str | None = None) -> ReleaseResponse:
        headers = self._as(tenant) if tenant is not None else self._admin()
        return self._call("POST", f"/v1/reservations/{reservation_id}/release", ReleaseResponse, headers, body=request)

    def extend(self, reservation_id: str, request: Any, *, tenant: str | None = None) -> ReservationExtendResponse:
        headers = self._owner(reservation_id, tenant)
        path = f"/v1/reservations/{reservation_id}/extend"
        return self._call("POST", path, ReservationExtendResponse, headers, body=request)

    def decide(self, request: Any, *, tenant: str | None = None) -> DecisionResponse:
        owner = self._subject_tenant(request, tenant, DecisionRequest)
        return self._call("POST", "/v1/decide", DecisionResponse, self._as(owner), body=request)

    def event(self, request: Any, *, tenant: str | None = None) -> EventCreateResponse:
        owner = self._subject_tenant(request, tenant, EventCreateRequest)
        return self._call("POST", "/v1/events", EventCreateResponse, self._as(owner), body=request)

    def get_reservation(self, reservation_id: str, *, tenant: str | None = None) -> ReservationDetail:
        headers = self._as(tenant) if tenant is not None else self._admin()
        return self._call("GET", f"/v1/reservations/{reservation_id}", ReservationDetail, headers)

    def list_reservations(self, query: Any = None, *, tenant: str | None = None) -> ReservationListResponse:
        headers = self._as(tenant) if tenant is not None else self._admin()
        return self._call("GET", "/v1/reservations", ReservationListResponse, headers, query=_query(query))

    def balances(self, query: Any = None, *, tenant: str | None = None) -> BalanceResponse:
        q = _query(query)
        owner = tenant or q.get("tenant") or q.get("tenant_id")
        if owner is None:
            raise InvalidRequest("tenant is required")
        return self._call("GET", "/v1/balances", BalanceResponse, self._as(owner), query=q)

    def sweep(self) -> int:
        if self.ledger is None:
            raise RuntimeError("sweep() needs the served ledger (HttpAuthority(..., ledger=...))")
        return self.ledger.sweep()

    def close(self) -> None:
        self.transport.close()


def _query(query: Any) -> dict[str, Any]:
    if query is None:
        return {}
    if isinstance(query, BaseModel):
        return query.model_dump(mode="json", by_alias=True, exclude_unset=True, exclude_none=True)
    return dict(query)


@contextmanager
def serve_authority(
    ledger: Ledger, *, admin_api_key: str | None = None, wrap: Callable[[ASGIApp], ASGIApp] | None = None
) -> Iterator[HttpAuthority]:
    """`ledger` served on the shared live server (no timer sweep: tests call `.sweep()`), as an HttpAuthority.
    `wrap` may put ASGI middleware (e.g. a response recorder) around the app."""
    admin_api_key = admin_api_key or "admin-" + os.urandom(16).hex()
    server, dispatcher = shared_server()
    app = create_app(ledger, admin_api_key=admin_api_key, sweep_interval=None)
    prefix = dispatcher.add(wrap(app) if wrap is not None else app)
    authority = HttpAuthority(server.url + prefix, admin_api_key, ledger=ledger)
    try:
        yield authority
    finally:
        authority.close()
        dispatcher.remove(prefix)
