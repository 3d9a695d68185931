"""Fixtures every integration suite shares (tests/langchain, tests/llamaindex, tests/openai import them in their
conftest): a real Client over a temp SQLite ledger on the test's clock, embedded or over real HTTP on loopback
(`cycles serve`'s app on the shared live server), so every test taking `client` runs on both. ALLOW_WITH_CAPS comes
from the authority's own policies (`set_caps`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import cycles
from cycles.client.local import LocalTransport
from cycles.ledger import Ledger, open_store
from cycles.models import Caps, CommitRequest

TENANT = "acme"
ADMIN_KEY = "integration-tests-admin-key"
CLIENTS = ["embedded", "http"]


@pytest.fixture
def ledger(tmp_path: Path, clock: Any) -> Iterator[Ledger]:
    """The budget authority's ledger: a SQLite file, on the test's clock (tests expire holds with `ledger.sweep()`
    after moving it)."""
    ledger = Ledger(open_store(f"sqlite:///{tmp_path / 'cycles.db'}"), clock=clock, default_tenant=TENANT)
    yield ledger
    ledger.store.close()


def _embedded(ledger: Ledger) -> Iterator[cycles.Client]:
    client = cycles.Client(transport=LocalTransport(ledger), tenant=TENANT)
    yield client
    client.close()


def _http(ledger: Ledger) -> Iterator[cycles.Client]:
    pytest.importorskip("uvicorn")
    pytest.importorskip("starlette")
    from cycles.client.http import HttpTransport
    from cycles.server.testing import serve_authority

    with serve_authority(ledger, admin_api_key=ADMIN_KEY) as authority:
        key = authority.key_for(TENANT)
        client = cycles.Client(
            transport=HttpTransport(authority.base_url, api_key=key, admin_api_key=ADMIN_KEY), tenant=TENANT
        )
        yield client
        client.close()


@pytest.fixture(params=CLIENTS)
def client(request: pytest.FixtureRequest, ledger: Ledger) -> Iterator[cycles.Client]:
    """A real cycles.Client for tenant acme on `ledger`: in process, or through `cycles serve` over HTTP."""
    yield from {"embedded": _embedded, "http": _http}[request.param](ledger)


class RecordingTransport(LocalTransport):
    """The embedded ledger, keeping the commit requests it was sent (the ledger does not store commit metrics)."""

    def __init__(self, ledger: Ledger) -> None:
        super().__init__(ledger)
        self.commits: list[CommitRequest] = []

    def commit(self, reservation_id: str, request: CommitRequest) -> Any:
        self.commits.append(request)
        return super().commit(reservation_id, request)

    async def acommit(self, reservation_id: str, request: CommitRequest) -> Any:
        return self.commit(reservation_id, request)


@pytest.fixture
def recording_client(ledger: Ledger) -> Iterator[tuple[cycles.Client, RecordingTransport]]:
    """An embedded client whose transport records the commits it sends."""
    transport = RecordingTransport(ledger)
    client = cycles.Client(transport=transport, tenant=TENANT)
    yield client, transport
    client.close()


@pytest.fixture
def set_caps() -> Callable[..., None]:
    """`set_caps(client, max_tokens=64)`: a policy under which every reservation of the tenant is answered
    ALLOW_WITH_CAPS with those caps."""

    def create(client: cycles.Client, **caps: Any) -> None:
        client.policies.create("*", name="integration tests", caps=Caps(**caps))

    return create


@pytest.fixture
def funded(client: cycles.Client) -> cycles.Client:
    """`client` with $10 for the tenant and $5 for its agent `bot`."""
    client.budgets.set("tenant:acme", cycles.usd(10))
    client.budgets.set("tenant:acme/agent:bot", cycles.usd(5))
    return client


def spent(client: cycles.Client, scope: str = "tenant:acme") -> int:
    """What the scope's ledger has spent (0 when nothing yet)."""
    path = client.scope_path(scope)
    balance = next(b for b in client.balances(scope, include_children=False) if b.scope == path)
    return balance.spent.amount if balance.spent else 0


def active(client: cycles.Client) -> list[Any]:
    return client.reservations(status="ACTIVE")
