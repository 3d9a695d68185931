"""Fixtures for the guard suite: a real Client on a real SQLite file, with a funded tenant."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import cycles
from cycles.client import set_default_client

pytest.register_assert_rewrite(f"{__package__}.helpers")

ENV = (
    "CYCLES_BASE_URL",
    "CYCLES_API_KEY",
    "CYCLES_STORE",
    "CYCLES_JOURNAL",
    "CYCLES_FAIL_OPEN",
    "CYCLES_TENANT",
    "CYCLES_WORKSPACE",
    "CYCLES_APP",
    "CYCLES_WORKFLOW",
    "CYCLES_AGENT",
    "CYCLES_TOOLSET",
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No CYCLES_* variable of the developer's shell leaks in; no default client survives a test."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    set_default_client(None)
    yield
    set_default_client(None)


@pytest.fixture
def store_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture
def client(store_url: str) -> Iterator[cycles.Client]:
    """tenant:acme funded with $10, on a SQLite file."""
    c = cycles.Client(store=store_url, tenant="acme")
    c.budgets.set("tenant:acme", cycles.usd(10))
    yield c
    c.close()


@pytest.fixture
def mem_client() -> Iterator[cycles.Client]:
    """tenant:acme funded with $10, in memory."""
    c = cycles.Client(store="sqlite://:memory:", tenant="acme")
    c.budgets.set("tenant:acme", cycles.usd(10))
    yield c
    c.close()
