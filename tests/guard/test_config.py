"""Client configuration from the environment (the same variables as the other Cycles clients, plus CYCLES_STORE)."""

from __future__ import annotations

import pytest

import cycles

from .helpers import CENT, assert_settled


@pytest.fixture
def env_client(tmp_path, monkeypatch):
    db = tmp_path / "env" / "ledger.db"
    db.parent.mkdir()
    monkeypatch.setenv("CYCLES_STORE", f"sqlite:///{db}")
    monkeypatch.setenv("CYCLES_TENANT", "acme")
    monkeypatch.setenv("CYCLES_WORKSPACE", "prod")
    monkeypatch.setenv("CYCLES_APP", "shop")
    monkeypatch.setenv("CYCLES_WORKFLOW", "refund")
    monkeypatch.setenv("CYCLES_AGENT", "bot")
    monkeypatch.setenv("CYCLES_TOOLSET", "web")
    c = cycles.Client()
    yield c, db
    c.close()


def test_environment_configures_store_tenant_and_levels(env_client):
    c, db = env_client
    assert c.tenant == "acme"
    assert db.exists()
    c.budgets.set("tenant:acme", cycles.usd(1))
    c.budgets.set("tenant:acme/workspace:prod/app:shop/workflow:refund/agent:bot/toolset:web", cycles.usd(0.5))
    with c.reserve(cycles.usd(0.05)) as r:
        assert r.subject == {
            "tenant": "acme",
            "workspace": "prod",
            "app": "shop",
            "workflow": "refund",
            "agent": "bot",
            "toolset": "web",
        }
    [detail] = c.reservations()
    assert detail.scope_path == "tenant:acme/workspace:prod/app:shop/workflow:refund/agent:bot/toolset:web"
    assert len(detail.affected_scopes) == 6
    # a second client on the same environment sees the same ledger
    other = cycles.Client()
    try:
        assert_settled(
            other,
            {
                "tenant:acme": 5 * CENT,
                "tenant:acme/workspace:prod/app:shop/workflow:refund/agent:bot/toolset:web": 5 * CENT,
            },
        )
    finally:
        other.close()


def test_arguments_and_scope_override_the_environment(env_client):
    c, db = env_client
    c.budgets.set("tenant:acme", cycles.usd(1))
    explicit = cycles.Client(agent="other", toolset=None)
    try:
        with explicit.reserve(cycles.usd(0.01)) as r:
            assert r.subject["agent"] == "other"
            assert r.subject["toolset"] == "web"  # None means "not given": the environment still applies
        with cycles.scope(agent="ambient"):
            with explicit.reserve(cycles.usd(0.01)) as r:
                assert r.subject["agent"] == "ambient"
            with explicit.reserve(cycles.usd(0.01), agent="kwarg") as r:
                assert r.subject["agent"] == "kwarg"
    finally:
        explicit.close()
    assert_settled(c, 3 * CENT)


def test_default_store_is_created_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = cycles.Client()
    try:
        assert c.tenant == "default"
        c.budgets.set("tenant:default", cycles.usd(1))
        with c.reserve(cycles.usd(0.02)) as r:
            assert r.subject == {"tenant": "default"}
        assert (tmp_path / ".cycles" / "cycles.db").is_file()
        assert_settled(c, {"tenant:default": 2 * CENT})
    finally:
        c.close()
    # the embedded ledger keeps no commit journal unless asked
    assert not (tmp_path / ".cycles" / "journal").exists()


def test_default_client_is_built_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CYCLES_STORE", f"sqlite:///{tmp_path / 'd.db'}")
    monkeypatch.setenv("CYCLES_TENANT", "acme")
    monkeypatch.setenv("CYCLES_AGENT", "bot")
    c = cycles.default_client()
    try:
        assert cycles.default_client() is c
        c.budgets.set("tenant:acme", cycles.usd(1))

        @cycles.guard(estimate=cycles.usd(0.01))
        def f():
            return cycles.current_reservation().subject

        assert f() == {"tenant": "acme", "agent": "bot"}
        with cycles.run(limit=cycles.usd(0.1)) as run:
            f()
        assert run.client is c and run.spent == 1 * CENT
        assert_settled(c, 2 * CENT)
    finally:
        c.close()


def test_unknown_client_argument_is_refused():
    with pytest.raises(TypeError):
        cycles.Client(store="sqlite://:memory:", planet="earth")


def test_memory_store(mem_client):
    with mem_client.reserve(cycles.usd(0.01)):
        pass
    assert_settled(mem_client, 1 * CENT)
