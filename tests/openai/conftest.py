"""The OpenAI integration runs on a real Client over a temp SQLite file, embedded or over real HTTP on loopback
(`cycles serve`'s app on the shared live server); add an authority by adding a `CLIENTS` entry. ALLOW_WITH_CAPS
comes from the authority's own policies (`set_caps`)."""

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
ADMIN_KEY = "openai-tests-admin-key"
CLIENTS = ["embedded", "http"]


def _embedded(tmp_path: Path) -> Iterator[cycles.Client]:
    client = cycles.Client(store=f"sqlite:///{tmp_path / 'cycles.db'}", tenant=TENANT)
    yield client
    client.close()


def _http(tmp_path: Path) -> Iterator[cycles.Client]:
    pytest.importorskip("uvicorn")
    pytest.importorskip("starlette")
    from cycles.client.http import HttpTransport
    from cycles.server import create_app
    from cycles.server.testing import shared_server

    ledger = Ledger(open_store(f"sqlite:///{tmp_path / 'cycles.db'}"))
    live, dispatcher = shared_server()
    prefix = dispatcher.add(create_app(ledger, admin_api_key=ADMIN_KEY, sweep_interval=None))
    url = live.url + prefix
    admin = HttpTransport(url, admin_api_key=ADMIN_KEY)
    admin.admin.create_tenant({"tenant_id": TENANT, "name": "Acme"})
    key = admin.admin.create_api_key({"tenant_id": TENANT, "name": "openai tests"}).key_secret
    admin.close()
    client = cycles.Client(transport=HttpTransport(url, api_key=key, admin_api_key=ADMIN_KEY), tenant=TENANT)
    yield client
    client.close()
    dispatcher.remove(prefix)
    ledger.store.close()


@pytest.fixture(params=CLIENTS)
def client(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[cycles.Client]:
    """A real cycles.Client for tenant acme, on its own SQLite file."""
    yield from {"embedded": _embedded, "http": _http}[request.param](tmp_path)


class RecordingTransport(LocalTransport):
    """The embedded ledger, keeping the commit requests it was sent (the ledger accepts commit metrics but does
    not store them, so a test reads them here)."""

    def __init__(self, ledger: Ledger) -> None:
        super().__init__(ledger)
        self.commits: list[CommitRequest] = []

    def commit(self, reservation_id: str, request: CommitRequest) -> Any:
        self.commits.append(request)
        return super().commit(reservation_id, request)

    async def acommit(self, reservation_id: str, request: CommitRequest) -> Any:
        return self.commit(reservation_id, request)


@pytest.fixture
def recording_client(tmp_path: Path) -> Iterator[tuple[cycles.Client, RecordingTransport]]:
    """An embedded client whose transport records the commits it sends."""
    transport = RecordingTransport(Ledger(open_store(f"sqlite:///{tmp_path / 'recorded.db'}"), default_tenant=TENANT))
    client = cycles.Client(transport=transport, tenant=TENANT)
    yield client, transport
    client.close()


@pytest.fixture
def set_caps() -> Callable[..., None]:
    """`set_caps(client, max_tokens=64)`: a policy of the budget authority under which every reservation of the
    tenant is answered ALLOW_WITH_CAPS with those caps."""

    def create(client: cycles.Client, **caps: Any) -> None:
        client.policies.create("*", name="openai tests", caps=Caps(**caps))

    return create
