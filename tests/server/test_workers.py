"""Concurrency over HTTP through `cycles serve --workers 2` (two processes on one SQLite file), and a graceful
shutdown: SIGTERM while requests are in flight lets them finish and the server exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from cycles import Client
from cycles.ledger import SQLiteStore

from ..interop._server import CyclesServe, cycles_command

pytestmark = pytest.mark.slow

USD = "USD_MICROCENTS"
TENANT = "acme"
LEVELS = ["tenant:acme", "tenant:acme/workspace:prod", "tenant:acme/workspace:prod/agent:bot"]
SUBJECT = {"tenant": "acme", "workspace": "prod", "agent": "bot"}
B = 1_000_003  # the budget the workspace level holds (the binding one); not a multiple of X
X = 7_919
N = 200  # N * X > B
ADMITTED = B // X  # 126


def usd(n: int) -> dict[str, Any]:
    return {"unit": USD, "amount": n}


def reserve_body(key: str, amount: int = X, **extra: Any) -> dict[str, Any]:
    return {
        "idempotency_key": key,
        "subject": SUBJECT,
        "action": {"kind": "llm.completion", "name": "gpt-4o"},
        "estimate": usd(amount),
        "ttl_ms": 600_000,
        **extra,
    }


def setup_tenant(server: CyclesServe, allocations: list[int]) -> str:
    """Tenant acme, a budget at each of the three levels, and an API key with the default permissions."""
    with Client(server.url, admin_api_key=server.admin_key, journal=False) as admin:
        admin.tenants.create(TENANT, "Acme")
        for scope, amount in zip(LEVELS, allocations, strict=True):
            admin.transport.admin.create_budget(
                {"scope": scope, "unit": USD, "allocated": usd(amount), "tenant_id": TENANT}
            )
        return admin.keys.create(TENANT, "workers test").key_secret


def ledgers(server: CyclesServe) -> dict[str, Any]:
    """Every budget of the tenant, by scope, read through the admin API."""
    with Client(server.url, admin_api_key=server.admin_key, journal=False) as admin:
        return {b.scope: b for b in admin.budgets.list(tenant=TENANT, unit=USD)}


def assert_identity(budgets: dict[str, Any]) -> None:
    for scope in LEVELS:
        b = budgets[scope]
        lhs = b.remaining.amount
        rhs = b.allocated.amount - b.spent.amount - b.reserved.amount - b.debt.amount
        assert lhs == rhs, f"{scope}: remaining {lhs} != allocated - spent - reserved - debt = {rhs}"


def test_concurrent_reserves_through_two_workers(tmp_path: Path) -> None:
    allocations = [10 * B, B, 3 * B]  # the workspace binds; the levels above and below have room to spare
    # Opening the 200 connections can outlast the default 5 s keep-alive on a busy machine; a connection the server
    # closes for idleness just as its reserve is sent fails with ReadError, so keep idle connections open longer.
    with CyclesServe(tmp_path, workers=2, extra_args=("--keep-alive", "60")) as server:
        assert len(server.worker_pids()) == 2
        key = setup_tenant(server, allocations)
        headers = {"X-Cycles-API-Key": key}

        async def fire() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=N, max_keepalive_connections=N)
            async with httpx.AsyncClient(base_url=server.url, headers=headers, limits=limits, timeout=60) as client:
                # one connection per request, opened before the burst, so the 200 reserves race for real
                await asyncio.gather(*(client.get("/healthz") for _ in range(N)))
                return await asyncio.gather(
                    *(client.post("/v1/reservations", json=reserve_body(f"burst-{i}")) for i in range(N))
                )

        responses = asyncio.run(fire())
        outcomes = Counter(r.status_code for r in responses)
        assert outcomes == {200: ADMITTED, 409: N - ADMITTED}, [r.text for r in responses if r.status_code >= 500]
        for r in responses:
            body = r.json()
            if r.status_code == 200:
                assert body["decision"] == "ALLOW" and body["reservation_id"]
                assert body["affected_scopes"] == LEVELS
            else:
                assert body["error"] == "BUDGET_EXCEEDED", body

        budgets = ledgers(server)
        assert_identity(budgets)
        for scope, allocated in zip(LEVELS, allocations, strict=True):
            b = budgets[scope]
            assert b.allocated.amount == allocated
            assert b.reserved.amount == ADMITTED * X, scope
            assert b.spent.amount == 0 and b.debt.amount == 0
            assert b.remaining.amount == allocated - ADMITTED * X

        # settle them all concurrently: even ones commit an actual below the estimate, odd ones release
        ids = [r.json()["reservation_id"] for r in responses if r.status_code == 200]
        actual = {rid: 1_000 + i for i, rid in enumerate(ids) if i % 2 == 0}

        async def settle() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=N, max_keepalive_connections=N)
            async with httpx.AsyncClient(base_url=server.url, headers=headers, limits=limits, timeout=60) as client:

                def one(i: int, rid: str) -> Any:
                    if rid in actual:
                        body = {"idempotency_key": f"commit-{i}", "actual": usd(actual[rid])}
                        return client.post(f"/v1/reservations/{rid}/commit", json=body)
                    return client.post(f"/v1/reservations/{rid}/release", json={"idempotency_key": f"release-{i}"})

                return await asyncio.gather(*(one(i, rid) for i, rid in enumerate(ids)))

        settled = asyncio.run(settle())
        assert [r.status_code for r in settled] == [200] * len(ids), [r.text for r in settled if r.status_code != 200]
        for rid, r in zip(ids, settled, strict=True):
            body = r.json()
            if rid in actual:
                assert body["status"] == "COMMITTED" and body["charged"]["amount"] == actual[rid]
                assert body["released"]["amount"] == X - actual[rid]
            else:
                assert body["status"] == "RELEASED" and body["released"]["amount"] == X

        spend = sum(actual.values())
        budgets = ledgers(server)
        assert_identity(budgets)
        for scope, allocated in zip(LEVELS, allocations, strict=True):
            b = budgets[scope]
            assert (b.spent.amount, b.reserved.amount, b.debt.amount) == (spend, 0, 0), scope
            assert b.remaining.amount == allocated - spend

        # the store agrees, read directly (a third process-level reader on the same file)
        store = SQLiteStore(server.db)
        try:
            with store.transaction(readonly=True) as tx:
                rows = [tx.get_reservation(rid) for rid in ids]
        finally:
            store.close()
        assert Counter(r.status for r in rows) == {"COMMITTED": len(actual), "RELEASED": len(ids) - len(actual)}


# ------------------------------------------------------------------------------------------------ graceful shutdown


def _partial_request(port: int, body: bytes, key: str, split: int) -> socket.socket:
    """A reserve that is provably inside the app: sent with `Expect: 100-continue`, so the server answers
    `100 Continue` when the handler starts reading the body; then the first `split` body bytes. The handler now
    waits for the rest: the request is in flight."""
    head = (
        f"POST /v1/reservations HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"X-Cycles-API-Key: {key}\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(head)
    interim = b""
    while b"\r\n\r\n" not in interim:
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError(f"closed before 100 Continue: {interim!r}")
        interim += chunk
    assert interim.startswith(b"HTTP/1.1 100"), interim
    sock.sendall(body[:split])
    return sock


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before a full response head: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed in the middle of the response body")
        rest += chunk
    return status, headers, rest[:length]


@pytest.mark.parametrize("workers", [2, 1])
def test_sigterm_lets_in_flight_requests_finish(tmp_path: Path, workers: int) -> None:
    in_flight = 8
    with CyclesServe(tmp_path, workers=workers, graceful_timeout=20) as server:
        key = setup_tenant(server, [10 * B, B, 3 * B])
        bodies = [json.dumps(reserve_body(f"inflight-{i}")).encode() for i in range(in_flight)]
        socks = [_partial_request(server.port, body, key, split=len(body) // 2) for body in bodies]
        server.terminate()
        time.sleep(1.0)  # let the shutdown begin (not observable from here): then it only waits for these
        assert server.proc is not None and server.proc.poll() is None, "exited with requests still in flight"
        for sock, body in zip(socks, bodies, strict=True):
            sock.sendall(body[len(body) // 2 :])
        results = []
        for sock in socks:
            try:
                results.append(_read_response(sock))
                assert sock.recv(1) == b"", "the connection stays open after shutdown"  # closed after the answer
            finally:
                sock.close()
        for status, _headers, raw in results:
            assert status == 200, raw
            answer = json.loads(raw)
            assert answer["decision"] == "ALLOW" and answer["reservation_id"]
        code = server.wait(timeout=30)
        assert "Traceback" not in server.log, server.log

    # everything the in-flight requests did is in the store
    store = SQLiteStore(server.db)
    try:
        with store.transaction(readonly=True) as tx:
            reserved = {b.scope: b.reserved for b in tx.get_budgets(USD, LEVELS)}
    finally:
        store.close()
    assert reserved == {scope: in_flight * X for scope in LEVELS}

    assert code == 0, server.log  # a graceful stop is a clean exit, with one worker or several


# ------------------------------------------------------------------------------------- the worker processes
def tcp_sockets(pid: int, port: int) -> dict[str, list[int]]:
    """The TCP sockets process `pid` holds on local `port`, by state ("LISTEN", "ESTABLISHED"): their inodes
    (from /proc: the process's socket descriptors matched with the kernel's TCP table)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    states = {"0A": "LISTEN", "01": "ESTABLISHED"}
    out: dict[str, list[int]] = {"LISTEN": [], "ESTABLISHED": []}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port, state, inode = int(fields[1].split(":")[1], 16), fields[3], int(fields[9])
        if local_port == port and inode in inodes and state in states:
            out[states[state]].append(inode)
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT workers are Linux's")
def test_each_worker_listens_on_its_own_socket_and_connections_spread_over_them(tmp_path: Path) -> None:
    """One listening socket shared by every worker lets the first to wake accept a whole burst of connections;
    a socket each (SO_REUSEPORT) lets the kernel spread them: 32 connections, both workers serve some."""
    with CyclesServe(tmp_path, workers=2, extra_args=("--keep-alive", "60")) as server:
        workers = server.worker_pids()
        assert len(workers) == 2
        listening = [tcp_sockets(pid, server.port)["LISTEN"] for pid in workers]
        assert all(len(inodes) == 1 for inodes in listening) and listening[0] != listening[1], listening
        connections = []
        try:
            for _ in range(32):
                sock = socket.create_connection(("127.0.0.1", server.port))
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
                assert sock.recv(4096).startswith(b"HTTP/1.1 200"), "a connection was not served"
                connections.append(sock)
            served = [len(tcp_sockets(pid, server.port)["ESTABLISHED"]) for pid in workers]
        finally:
            for sock in connections:
                sock.close()
        assert sum(served) == 32 and min(served) > 0, served  # (all on one: a chance of 1 in 2**31)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT workers are Linux's")
def test_a_worker_that_dies_is_replaced_and_a_second_server_cannot_take_the_port(tmp_path: Path) -> None:
    with CyclesServe(tmp_path, workers=2) as server:
        first, second = server.worker_pids()
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while first in (now := server.worker_pids()) or len(now) < 2:
            assert time.monotonic() < deadline, f"the dead worker was not replaced:\n{server.log}"
            time.sleep(0.1)
        assert second in now
        for _ in range(10):
            assert httpx.get(server.url + "/readyz").status_code == 200

        other = subprocess.run(
            [*cycles_command(), "serve", "--store", f"sqlite:///{tmp_path / 'other.db'}", "--host", "127.0.0.1",
             "--port", str(server.port), "--workers", "2", "--log-level", "warning"],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )  # fmt: skip
        assert other.returncode != 0 and "Address already in use" in other.stdout + other.stderr, other
