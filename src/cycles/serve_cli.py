"""`cycles serve`: run the Cycles server (runtime API under /v1, admin API under /v1/admin) with uvicorn."""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Annotated

import typer

DEFAULT_STORE = "sqlite:///.cycles/cycles.db"


def serve(
    ctx: typer.Context,
    store: Annotated[
        str | None,
        typer.Option(
            envvar="CYCLES_STORE",
            show_default=DEFAULT_STORE,
            help="Ledger store URL: sqlite:///path/to/cycles.db, sqlite://:memory: or redis://host:port/0.",
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to bind; 0.0.0.0 for every interface.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 7878,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes sharing the store (1 = in-process).")] = 1,
    admin_api_key: Annotated[
        str | None,
        typer.Option(
            envvar="CYCLES_ADMIN_API_KEY",
            show_default=False,
            help="Secret of the X-Admin-API-Key header. Without one the /v1/admin routes are not mounted. "
            "Prefer the environment variable: command lines are visible to other users.",
        ),
    ] = None,
    sweep_interval: Annotated[
        float, typer.Option(min=0.0, help="Seconds between expiry sweeps (one worker sweeps at a time); 0 = off.")
    ] = 1.0,
    webhook_interval: Annotated[
        float, typer.Option(min=0.0, help="Seconds between webhook delivery rounds (every worker delivers); 0 = off.")
    ] = 1.0,
    webhook_lease: Annotated[
        float, typer.Option(min=1.0, help="Seconds a claimed webhook delivery stays claimed before it is retried.")
    ] = 30.0,
    webhook_allow_private: Annotated[
        bool,
        typer.Option(
            envvar="CYCLES_WEBHOOK_ALLOW_PRIVATE",
            help="Accept webhook targets on private, loopback and link-local addresses (refused by default).",
        ),
    ] = False,
    log_level: Annotated[str, typer.Option(help="critical, error, warning, info, debug.")] = "info",
    graceful_timeout: Annotated[
        float, typer.Option(min=0.0, help="Seconds in-flight requests get to finish on shutdown (SIGINT/SIGTERM).")
    ] = 10.0,
    keep_alive: Annotated[
        int,
        typer.Option(
            min=1, help="Seconds an idle keep-alive connection stays open; above a load balancer's idle timeout."
        ),
    ] = 5,
) -> None:
    """Serve the Cycles protocol v0 over HTTP on a ledger store.

    Options:
      --store            ledger store URL (env CYCLES_STORE; default sqlite:///.cycles/cycles.db)
      --host / --port    where to listen (default 127.0.0.1:7878)
      --workers N        worker processes (N > 1 needs a file or Redis store; one of them runs the expiry sweep)
      --admin-api-key    X-Admin-API-Key secret (env CYCLES_ADMIN_API_KEY); without it no admin routes
      --sweep-interval   seconds between expiry sweeps (default 1; 0 disables the timer)
      --webhook-interval seconds between webhook delivery rounds (default 1; 0 disables delivery)
      --webhook-lease    seconds a claimed delivery stays claimed (default 30)
      --webhook-allow-private  accept private/loopback webhook targets (env CYCLES_WEBHOOK_ALLOW_PRIVATE)
      --log-level        uvicorn log level (default info)
      --graceful-timeout seconds to finish in-flight requests on shutdown (default 10)
      --keep-alive       seconds an idle keep-alive connection stays open (default 5)

    Endpoints: POST and GET /v1/reservations, GET /v1/reservations/ID, POST /v1/reservations/ID/commit, release
    and extend, POST /v1/decide, GET /v1/balances, POST and GET /v1/events, /v1/webhooks; /v1/admin/tenants,
    budgets, policies, api-keys, events, webhooks and audit/logs; GET /v1/auth/introspect; GET /healthz and /readyz;
    GET /metrics (Prometheus) and /dashboard (a read-only page; admin key).
    """
    import uvicorn

    root = ctx.find_root().obj if ctx is not None else None  # `cycles --store X serve`: the global option
    store = store or getattr(root, "store", None) or DEFAULT_STORE

    if workers > 1 and (":memory:" in store):
        raise typer.BadParameter(
            "an in-memory store cannot be shared by several workers: use a sqlite file", param_hint="--store"
        )
    # the factory reads its settings from the environment, so every worker process builds the same app
    os.environ["CYCLES_STORE"] = store
    os.environ["CYCLES_SWEEP_INTERVAL"] = str(sweep_interval)
    os.environ["CYCLES_WEBHOOK_INTERVAL"] = str(webhook_interval)
    os.environ["CYCLES_WEBHOOK_LEASE_MS"] = str(int(webhook_lease * 1000))
    os.environ["CYCLES_WEBHOOK_ALLOW_PRIVATE"] = "1" if webhook_allow_private else "0"
    if admin_api_key:
        os.environ["CYCLES_ADMIN_API_KEY"] = admin_api_key
    else:
        os.environ.pop("CYCLES_ADMIN_API_KEY", None)
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # /metrics sums every worker's samples (server/metrics.py): a fresh directory they all write to
        import atexit
        import shutil
        import tempfile

        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory = tempfile.mkdtemp(prefix="cycles-metrics-")
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    if workers == 1:
        from .server.app import served_app  # fail fast (bad store URL, missing extra) before binding the port

        app: object = served_app()
    else:
        app = "cycles.server.app:served_app"
    config = dict(
        host=host,
        port=port,
        log_level=log_level.lower(),
        timeout_graceful_shutdown=graceful_timeout,
        timeout_keep_alive=keep_alive,
        server_header=False,
        access_log=log_level.lower() in ("trace", "debug", "info"),  # above info its lines are dropped: skip the work
        **_fast_io(),
    )
    from .server import workers as worker_processes

    if workers > 1 and worker_processes.supported():  # Linux: a listening socket per worker (server/workers.py)
        try:
            code = worker_processes.serve({"app": app, "factory": True, **config}, workers, graceful_timeout)
        except OSError as exc:
            raise typer.BadParameter(f"cannot listen on {host}:{port}: {exc}", param_hint="--port") from None
        raise typer.Exit(code)
    # uvicorn re-raises SIGTERM once it has shut down gracefully; exit 0 then, as a finished service should
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(app, factory=workers > 1, workers=workers if workers > 1 else None, **config)  # type: ignore[arg-type]


def _fast_io() -> dict[str, str]:
    """uvloop + httptools when installed (the server extra): about half the CPU per request of asyncio + h11.
    Otherwise h11 on asyncio. Either way through cycles.server.protocol: one send per response, and TCP_NODELAY also
    on the sockets of --workers N (asyncio leaves Nagle on there, which stalls keep-alive requests ~40 ms)."""
    try:
        import httptools  # noqa: F401
        import uvloop  # noqa: F401
    except ImportError:
        return {"http": "cycles.server.protocol:H11NoDelayProtocol"}
    return {"http": "cycles.server.protocol:HttpToolsCoalescedProtocol", "loop": "uvloop"}


def main() -> None:  # `python -m cycles.serve_cli`
    typer.run(serve)


if __name__ == "__main__":
    main()
