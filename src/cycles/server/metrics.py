"""Prometheus metrics of `cycles serve`, at GET /metrics (prometheus-client, part of the `server` extra).

    cycles_reservations_total{decision, reason_code}   reserve answers: ALLOW, ALLOW_WITH_CAPS, DENY (+ reason)
    cycles_commits_total{outcome}                      commits: committed, or the error code that refused one
    cycles_releases_total{outcome}                     releases, likewise
    cycles_expirations_total                           reservations expired (by the timer's sweep or a read's)
    cycles_request_duration_seconds{method, route}     latency per route template ("unmatched": no route served it)
    cycles_batch_size                                  runtime calls run together in one store transaction

`cycles serve --workers N` runs N processes. They share the figures through prometheus-client's multiprocess mode:
`cycles serve` points PROMETHEUS_MULTIPROC_DIR at a fresh directory before the workers start (or uses yours), each
worker writes its samples there, and whichever worker answers /metrics reports the sum over all of them. With one
worker (or the app embedded elsewhere) the figures are the process's own.
"""

from __future__ import annotations

import os
import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import CyclesError

RESERVATIONS = Counter("cycles_reservations", "Reserve answers by decision and reason code.",
                       ["decision", "reason_code"])  # fmt: skip
COMMITS = Counter("cycles_commits", "Commits, by outcome (committed, or the refusing error code).", ["outcome"])
RELEASES = Counter("cycles_releases", "Releases, by outcome (released, or the refusing error code).", ["outcome"])
EXPIRATIONS = Counter("cycles_expirations", "Reservations expired by the sweep.")
LATENCY = Histogram(
    "cycles_request_duration_seconds", "Time to answer a request, per route.", ["method", "route"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)  # fmt: skip
BATCH = Histogram("cycles_batch_size", "Runtime calls run in one store transaction.",
                  buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))  # fmt: skip


_children: dict[tuple[Any, ...], Any] = {}  # labelled series by (metric, labels): labels() costs a lock and a lookup


def _child(metric: Any, *labels: str) -> Any:
    key = (metric, *labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


def observe_call(method: str, route: str, seconds: float, result: Any) -> None:
    """One runtime request answered (dispatch.py): its latency, and what it decided (about 6 µs in multiprocess
    mode, 2 µs without)."""
    _child(LATENCY, method, route).observe(seconds)
    if method != "POST":
        return
    error = result if isinstance(result, BaseException) else None
    if route == "/v1/reservations":
        if error is None:
            decision = getattr(result, "decision", None)
            reason = getattr(result, "reason_code", None) or ""
            _child(RESERVATIONS, getattr(decision, "value", decision) or "ALLOW", reason).inc()
        elif isinstance(error, CyclesError) and "reason_code" in error.details:
            _child(RESERVATIONS, "DENY", str(error.details["reason_code"])).inc()
        elif isinstance(error, CyclesError) and error.status == 409:
            _child(RESERVATIONS, "DENY", error.code).inc()
    elif route.endswith("/commit"):
        _child(COMMITS, "committed" if error is None else getattr(error, "code", "INTERNAL_ERROR")).inc()
    elif route.endswith("/release"):
        _child(RELEASES, "released" if error is None else getattr(error, "code", "INTERNAL_ERROR")).inc()


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class TimedApp:
    """ASGI wrapper timing the requests of the Starlette app (admin, health, metrics, the page) by the template of
    the route they matched; labels stay bounded whatever paths and methods clients send."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or "unmatched"  # set by Starlette's router
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"
            _child(LATENCY, method, route).observe(elapsed)


def registry() -> Any:
    """The registry /metrics reports: every worker's samples in multiprocess mode, else this process's."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        from prometheus_client import REGISTRY

        return REGISTRY
    from prometheus_client import multiprocess

    collected = CollectorRegistry()
    multiprocess.MultiProcessCollector(collected, path=directory)
    return collected


async def metrics_endpoint(request: Request) -> Response:
    return Response(generate_latest(registry()), media_type=CONTENT_TYPE_LATEST)
