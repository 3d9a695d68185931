"""The front door of the app: the hot runtime routes answered by a lean ASGI dispatcher, everything else by Starlette.

Reserve, commit and the other runtime calls are the server's whole load. Through Starlette each one crossed a
middleware stack, a router, a Request and a Response object, which cost several times what the rest of the request
does (HTTP parsing, the ledger's SQLite transaction). Here a request whose method and path match a runtime endpoint
is served directly: headers read once into a dict, the body read from `receive`, the handler called (it
authenticates and parses, and hands back the ledger work), that work run under the workers' write lock in a batch
with the other calls of the moment (writelock.py), the JSON response sent in one start and one body message.
Every other request (admin, health, unknown routes, wrong methods, trailing slashes, lifespan) goes to the Starlette
app unchanged, which also holds the runtime paths so that it answers their 405s and redirects as before.

What a client sees is the same either way: the correlation headers (X-Request-Id, X-Cycles-Trace-Id, and
X-Cycles-Tenant once a tenant key authenticated, errors included), the protocol's error body, 413 / 400 on bad bodies.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from .auth import Principal
from .errors import error_body, error_status, new_request_id, protocol_error, trace_id_from
from .wire import path_id, read_body
from .writelock import WriteLock

RESERVATIONS = "/v1/reservations"
RESERVATION_ACTIONS = ("commit", "release", "extend")


class Call:
    """One runtime request, as its handler needs it: headers (lower-case names, first value wins, as Starlette's
    `headers.get`), the raw query string, the reservation id of the path ("" on paths without one), the body;
    `tenant` is set once a tenant key authenticated (for the X-Cycles-Tenant response header)."""

    __slots__ = ("headers", "query_string", "reservation_id", "body", "tenant", "request_id", "trace_id", "client")

    def __init__(self, headers: dict[str, str], query_string: bytes, reservation_id: str) -> None:
        self.headers = headers
        self.query_string = query_string
        self.reservation_id = reservation_id
        self.body = b""
        self.tenant: str | None = None
        self.request_id = self.trace_id = ""
        self.client: str | None = None  # the peer's address, for the audit log

    def seen(self, principal: Principal) -> Principal:
        if principal.tenant is not None:
            self.tenant = principal.tenant
        return principal


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A runtime route: `path` in Starlette's syntax, the handler and its success status. The handler prepares the
    call (authenticate, parse) and returns the ledger work, which the dispatcher runs under the write lock."""

    method: str
    path: str
    handler: Callable[[Call], Callable[[], BaseModel]]
    status: int = 200

    @property
    def reads_body(self) -> bool:
        return self.method == "POST"


def route_path(scope: Scope) -> str:
    """The path below the app's root_path (Starlette's get_route_path)."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        if path == root:
            return ""
        if path[len(root)] == "/":
            return path[len(root) :]
    return path


def split_reservation_path(path: str) -> tuple[str, str | None] | None:
    """("/v1/reservations/{reservation_id}[/action]", id) for a path under /v1/reservations/<id>, as Starlette's
    `[^/]+` path parameter matches it; None for anything else."""
    rest = path[len(RESERVATIONS) + 1 :]
    rid, slash, action = rest.partition("/")
    if not rid:
        return None
    if not slash:
        return RESERVATIONS + "/{reservation_id}", rid
    if action in RESERVATION_ACTIONS:
        return f"{RESERVATIONS}/{{reservation_id}}/{action}", rid
    return None


def read_headers(scope: Scope) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in scope["headers"]:
        key = name.decode("latin-1")
        if key not in headers:
            headers[key] = value.decode("latin-1")
    return headers


class RuntimeDispatcher:
    """ASGI app: the runtime `endpoints` served directly, their ledger work under `write_lock`; anything else passed
    to `fallback` (the Starlette app, whose `state` this app shares)."""

    def __init__(self, endpoints: list[Endpoint], fallback: ASGIApp, write_lock: WriteLock) -> None:
        self.fallback = fallback
        self.write_lock = write_lock
        # told (method, route, seconds, response model or exception) of every runtime request: server metrics
        self.observe: Callable[[str, str, float, object], None] | None = None
        self.state = getattr(fallback, "state", None)
        self.endpoints: dict[tuple[str, str], Endpoint] = {}
        for e in endpoints:
            self.endpoints[e.method, e.path] = e
            if e.method == "GET":  # as Starlette does; uvicorn sends no body for HEAD
                self.endpoints["HEAD", e.path] = e

    def match(self, method: str, path: str) -> tuple[Endpoint, str | None] | None:
        endpoint = self.endpoints.get((method, path))
        if endpoint is not None:
            return endpoint, None
        if path.startswith(RESERVATIONS + "/"):
            found = split_reservation_path(path)
            if found is not None and (endpoint := self.endpoints.get((method, found[0]))) is not None:
                return endpoint, found[1]
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            found = self.match(scope["method"], route_path(scope))
            if found is not None:
                await self.serve(found[0], found[1], scope, receive, send)
                return
        await self.fallback(scope, receive, send)

    async def serve(self, endpoint: Endpoint, rid: str | None, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        headers = read_headers(scope)
        call = Call(headers, scope["query_string"], rid or "")
        request_id = new_request_id()
        trace_id = trace_id_from(headers.get("traceparent"), headers.get("x-cycles-trace-id"))
        call.request_id, call.trace_id = request_id, trace_id
        client = scope.get("client")
        call.client = client[0] if client else None
        try:
            if rid is not None:
                path_id(rid, "reservation_id")
            if endpoint.reads_body:
                call.body = await read_body(receive, headers)
            status = endpoint.status
            model = await self.write_lock.run(endpoint.handler(call))
            # model_dump_json's bytes, without its wrapper's decode to str (and our encode back)
            body = model.__pydantic_serializer__.to_json(model, exclude_none=True)
            outcome: object = model
        except ClientDisconnect:
            return  # nobody to answer
        except Exception as exc:
            error = protocol_error(exc, request_id, scope["method"], scope["path"])
            status, body = error_status(error), error_body(error, request_id, trace_id)
            outcome = error
        response_headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            (b"x-request-id", request_id.encode()),
            (b"x-cycles-trace-id", trace_id.encode()),
        ]
        if call.tenant:
            response_headers.append((b"x-cycles-tenant", call.tenant.encode()))
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        await send({"type": "http.response.body", "body": body})
        if self.observe is not None:
            self.observe(scope["method"], endpoint.path, time.perf_counter() - started, outcome)
