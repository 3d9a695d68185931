"""Lifespan, expiry sweep (one sweeper per store file), health checks, and `serve` as a real process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cycles.errors import StoreBusy
from cycles.ledger import Ledger, SQLiteStore
from cycles.server import app_from_env, create_app
from cycles.server.sweep import Sweeper, lock_path_for
from cycles.server.testing import LiveServer

from .conftest import ADMIN_KEY, USD, usd
from .test_runtime import reserve_body


def status_in_store(ledger: Ledger, rid: str) -> str:
    with ledger.store.transaction() as tx:  # a raw read: ledger reads would sweep first
        return tx.get_reservation(rid).status


def test_background_sweep_expires_reservations(ledger, clock):
    app = create_app(ledger, admin_api_key=ADMIN_KEY, sweep_interval=0.02)
    ledger.admin.create_budget({"scope": "tenant:acme", "unit": USD, "allocated": usd(100)})
    r = ledger.reserve(reserve_body("r", 40, ttl_ms=1_000, grace_period_ms=0) | {"subject": {"tenant": "acme"}},
                       tenant="acme")  # fmt: skip
    with LiveServer(app) as live:
        sweeper = app.state.sweeper
        assert httpx.get(f"{live.url}/healthz").status_code == 200
        clock.advance(1_001)
        deadline = time.monotonic() + 10
        while sweeper.swept == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sweeper.swept == 1 and sweeper.leader
        assert status_in_store(ledger, r.reservation_id) == "EXPIRED"
    assert sweeper._task is None and sweeper._fd is None  # stopped with the lifespan, lock released


def test_one_sweeper_per_store_file(tmp_path, clock):
    path = tmp_path / "shared.db"
    first, second = Ledger(SQLiteStore(path), clock=clock), Ledger(SQLiteStore(path), clock=clock)
    lock = lock_path_for(first)
    assert lock == f"{path}.sweep.lock" and lock_path_for(Ledger(SQLiteStore(":memory:"))) is None
    first.admin.create_budget({"scope": "tenant:acme", "unit": USD, "allocated": usd(100)})
    for i in range(3):
        first.reserve(reserve_body(f"r{i}", 1, ttl_ms=1_000, grace_period_ms=0) | {"subject": {"tenant": "acme"}},
                      tenant="acme")  # fmt: skip
    a, b = Sweeper(first, 1.0, lock), Sweeper(second, 1.0, lock)

    async def scenario() -> None:
        clock.advance(2_000)
        assert await a.sweep_once() == 3 and a.leader
        assert await b.sweep_once() == 0 and not b.leader  # the lock is held: b does not even look
        await a.stop()
        assert await b.sweep_once() == 0 and b.leader  # took over (nothing left to expire)
        await b.stop()

    asyncio.run(scenario())


def test_sweep_errors_are_survived(caplog):
    class Busy:
        url, path = "sqlite:///busy.db", None

        def transaction(self):
            raise StoreBusy("locked")

    sweeper = Sweeper(Ledger(Busy()), 1.0)  # type: ignore[arg-type]
    with caplog.at_level("WARNING", logger="cycles.server"):
        assert asyncio.run(sweeper.sweep_once()) == 0
    assert "expiry sweep failed" in caplog.text


def test_readyz_reports_an_unreachable_store():
    class Broken:
        url, path = "sqlite:///broken.db", None

        def transaction(self):
            raise StoreBusy("locked")

    app = create_app(Ledger(Broken()), admin_api_key=None, sweep_interval=None)  # type: ignore[arg-type]
    with LiveServer(app) as live:
        assert httpx.get(f"{live.url}/healthz").status_code == 200
        ready = httpx.get(f"{live.url}/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "unavailable"
        assert len(ready.headers["x-cycles-trace-id"]) == 32


def test_unexpected_errors_are_500_with_the_protocol_body(tmp_path):
    class Exploding(Ledger):
        def decide(self, *a, **kw):
            raise RuntimeError("boom: secret internals")

    ledger = Exploding(SQLiteStore(tmp_path / "x.db"))
    ledger.admin.create_tenant({"tenant_id": "acme", "name": "A"})
    key = ledger.admin.create_api_key({"tenant_id": "acme", "name": "k"}).key_secret
    with LiveServer(create_app(ledger, admin_api_key=None, sweep_interval=None), lifespan="off") as live:
        response = httpx.post(f"{live.url}/v1/decide", json=reserve_body("d", 1), headers={"X-Cycles-API-Key": key})
    assert response.status_code == 500
    body = response.json()
    assert body["error"] == "INTERNAL_ERROR" and "secret internals" not in body["message"]
    assert body["request_id"] == response.headers["x-request-id"]


def test_app_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CYCLES_STORE", f"sqlite:///{tmp_path}/env.db")
    monkeypatch.setenv("CYCLES_ADMIN_API_KEY", "env-admin")
    monkeypatch.setenv("CYCLES_SWEEP_INTERVAL", "0")
    app = app_from_env()
    assert app.state.admin_enabled and app.state.sweeper is None
    assert app.state.ledger.store.path == f"{tmp_path}/env.db"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_with_two_workers(tmp_path):
    port = free_port()
    env = {**os.environ, "CYCLES_ADMIN_API_KEY": "serve-admin"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cycles.serve_cli", "--store", f"sqlite:///{tmp_path}/served.db", "--port", str(port),
         "--workers", "2", "--sweep-interval", "0.1", "--log-level", "warning", "--graceful-timeout", "2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
            time.sleep(0.1)
        from cycles.client.http import HttpTransport

        admin = HttpTransport(url, admin_api_key="serve-admin")
        admin.admin.create_tenant({"tenant_id": "acme", "name": "Acme"})
        key = admin.admin.create_api_key({"tenant_id": "acme", "name": "k"}).key_secret
        admin.admin.create_budget({"scope": "tenant:acme", "unit": USD, "allocated": usd(1_000)})
        t = HttpTransport(url, api_key=key)
        for i in range(20):  # spread over both workers
            r = t.reserve(reserve_body(f"r{i}", 10) | {"subject": {"tenant": "acme"}})
            t.commit(r.reservation_id, {"idempotency_key": f"c{i}", "actual": usd(5)})
        assert t.balances({"tenant": "acme"}).balances[0].spent.amount == 100
        assert Path(f"{tmp_path}/served.db.sweep.lock").exists()
        t.close()
        admin.close()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            output = proc.communicate(timeout=30)[0].decode()
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, output
    assert "serve-admin" not in output


def test_serve_is_a_typer_command():
    import typer
    from typer.testing import CliRunner

    from cycles.serve_cli import serve

    app = typer.Typer()
    app.command()(serve)
    app.command("other")(lambda: None)  # a group, as in the cycles CLI
    result = CliRunner().invoke(app, ["serve", "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--store", "--host", "--port", "--workers", "--admin-api-key", "--sweep-interval"):
        assert option in result.output
    refused = CliRunner().invoke(app, ["serve", "--store", "sqlite://:memory:", "--workers", "2"])
    assert refused.exit_code != 0 and "in-memory" in refused.output
