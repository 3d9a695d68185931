"""Correlation ids and the protocol's error body.

Every response carries `X-Request-Id` (one per HTTP request) and `X-Cycles-Trace-Id` (32 lowercase hex, W3C Trace
Context compatible): taken from a valid `traceparent`, else from a valid incoming `X-Cycles-Trace-Id`, else random.
Malformed correlation headers are ignored, never rejected. Errors are the protocol's ErrorResponse
`{error, message, request_id, trace_id, details?}` with the exception's HTTP status.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import CyclesError, InternalError, InvalidRequest, NotFound

log = logging.getLogger("cycles.server")

_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


class PayloadTooLarge(InvalidRequest):
    """A request body over the server's limit: 413, with the protocol's INVALID_REQUEST body."""

    status = 413


def new_trace_id() -> str:
    while True:
        trace = os.urandom(16).hex()
        if trace != _ZERO_TRACE:  # all-zero is invalid in W3C Trace Context: re-roll
            return trace


def new_request_id() -> str:
    return "req_" + os.urandom(12).hex()


def trace_id_from(traceparent: str | None, cycles_trace_id: str | None) -> str:
    """The trace id of a request, by the protocol's precedence (traceparent, X-Cycles-Trace-Id, random)."""
    if traceparent:
        m = _TRACEPARENT.fullmatch(traceparent.strip())
        if m and m.group(1) != _ZERO_TRACE and m.group(2) != _ZERO_SPAN:
            return m.group(1)
    if cycles_trace_id:
        value = cycles_trace_id.strip()
        if _TRACE_ID.fullmatch(value) and value != _ZERO_TRACE:
            return value
    return new_trace_id()


def error_body(exc: CyclesError, request_id: str, trace_id: str) -> bytes:
    return json.dumps(exc.to_body(request_id, trace_id), ensure_ascii=False, default=str).encode()


def error_response(exc: CyclesError, request_id: str, trace_id: str) -> Response:
    return Response(error_body(exc, request_id, trace_id), status_code=error_status(exc), media_type="application/json")


def error_status(exc: CyclesError) -> int:
    return exc.status if 400 <= exc.status <= 599 else 500


def protocol_error(exc: Exception, request_id: str, method: str, path: str) -> CyclesError:
    """The protocol error a request's exception is answered with, logged as it deserves: a number too large for the
    store (Python int -> SQLite INTEGER) is the request's fault; anything unexpected is a 500 whose details stay in
    the log (with the request id; never the request's headers or body)."""
    if isinstance(exc, CyclesError):
        if exc.status >= 500:
            log.error("request %s failed: %s %s", request_id, exc.code, exc.message)
        return exc
    if isinstance(exc, OverflowError):
        log.warning("request %s: number out of range: %s", request_id, exc)
        return InvalidRequest("a number in the request is out of range")
    log.error("request %s: unhandled error on %s %s", request_id, method, path, exc_info=exc)
    return InternalError("internal error")


def _ids(request: Request) -> tuple[str, str]:
    state = request.scope.get("state") or {}
    return state.get("request_id") or new_request_id(), state.get("trace_id") or new_trace_id()


async def cycles_error_handler(request: Request, exc: Exception) -> Response:
    """CyclesError and OverflowError raised by a Starlette route."""
    request_id, trace_id = _ids(request)
    return error_response(protocol_error(exc, request_id, request.method, request.url.path), request_id, trace_id)


async def http_error_handler(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (unknown route, wrong method) in the protocol's shape."""
    assert isinstance(exc, HTTPException)
    request_id, trace_id = _ids(request)
    if exc.status_code == 404:
        error: CyclesError = NotFound(f"no such endpoint: {request.method} {request.url.path}")
    elif exc.status_code == 405:
        error = InvalidRequest(f"method {request.method} is not allowed on {request.url.path}", status=405)
    elif exc.status_code >= 500:
        error = InternalError(str(exc.detail))
    else:
        error = InvalidRequest(str(exc.detail), status=exc.status_code)
    response = error_response(error, request_id, trace_id)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


class CorrelationMiddleware:
    """Assigns the request and trace ids, puts them on every response, and turns any unhandled exception into a
    500 INTERNAL_ERROR body (logged with its request id; the request's headers and body are never logged)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        traceparent = cycles_trace = None
        for name, value in scope["headers"]:
            if name == b"traceparent":
                traceparent = value.decode("latin-1")
            elif name == b"x-cycles-trace-id":
                cycles_trace = value.decode("latin-1")
        trace_id = trace_id_from(traceparent, cycles_trace)
        request_id = new_request_id()
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"], state["trace_id"] = request_id, trace_id
        ids = [(b"x-request-id", request_id.encode()), (b"x-cycles-trace-id", trace_id.encode())]
        started = False

        async def send_with_ids(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [*message.get("headers", ()), *ids]
                tenant = state.get("tenant")
                if tenant:
                    headers.append((b"x-cycles-tenant", tenant.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_ids)
        except Exception:
            log.exception("request %s: unhandled error on %s %s", request_id, scope.get("method"), scope.get("path"))
            if started:
                raise
            body = error_body(InternalError("internal error"), request_id, trace_id)
            await send_with_ids(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                }
            )
            await send_with_ids({"type": "http.response.body", "body": body})
