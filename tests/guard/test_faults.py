"""An unreachable authority at reserve (fail closed / fail open), commit retries with the same idempotency key, and a
commit that meets RESERVATION_EXPIRED (settled as an event).

`FaultyTransport` is a real transport: the embedded one, with scripted network faults in front of some calls.
"""

from __future__ import annotations

import asyncio
import importlib

import pytest

import cycles
from cycles.client.local import LocalTransport

from .helpers import CENT, assert_settled, ledger

ATTEMPTS = importlib.import_module("cycles.guard").RESERVE_ATTEMPTS


class FaultyTransport(LocalTransport):
    """The embedded transport of `inner`, failing like a network would.

    reserve_failures: the next N reserve ATTEMPTS raise TransportError without reaching the ledger (the guard tries
    RESERVE_ATTEMPTS times per call, same key, before it fails closed or open).
    commit_failures: the next N commits raise TransportError without reaching the ledger.
    lost_commit_responses: the next N commits reach the ledger, then the answer is lost (TransportError).
    """

    def __init__(
        self,
        inner: LocalTransport,
        *,
        reserve_failures: int = 0,
        commit_failures: int = 0,
        lost_commit_responses: int = 0,
    ) -> None:
        super().__init__(inner.ledger)
        self.reserve_failures = reserve_failures
        self.commit_failures = commit_failures
        self.lost_commit_responses = lost_commit_responses
        self.commit_keys: list[str] = []
        self.event_requests: list = []

    def _before_reserve(self) -> None:
        if self.reserve_failures:
            self.reserve_failures -= 1
            raise cycles.TransportError("connection refused")

    def reserve(self, request):
        self._before_reserve()
        return super().reserve(request)

    async def areserve(self, request):
        self._before_reserve()
        return await super().areserve(request)

    def _commit(self, reservation_id, request):
        self.commit_keys.append(request.idempotency_key)
        if self.commit_failures:
            self.commit_failures -= 1
            raise cycles.TransportError("connection reset")
        response = super().commit(reservation_id, request)
        if self.lost_commit_responses:
            self.lost_commit_responses -= 1
            raise cycles.TransportError("read timeout")
        return response

    def commit(self, reservation_id, request):
        return self._commit(reservation_id, request)

    async def acommit(self, reservation_id, request):
        return self._commit(reservation_id, request)

    def event(self, request):
        self.event_requests.append(request)
        return super().event(request)

    async def aevent(self, request):
        self.event_requests.append(request)
        return await super().aevent(request)

    def close(self) -> None:  # the store belongs to the client that opened it
        pass


@pytest.fixture
def faulty_client():
    """faulty_client(client, **faults) -> (a Client on a FaultyTransport over `client`'s ledger, the transport)."""
    made: list[cycles.Client] = []

    def make(client: cycles.Client, **kwargs) -> tuple[cycles.Client, FaultyTransport]:
        """`unreachable_calls=N`: the next N guarded calls find the authority unreachable on every attempt."""
        fail_open = kwargs.pop("fail_open", None)
        kwargs["reserve_failures"] = kwargs.get("reserve_failures", 0) + ATTEMPTS * kwargs.pop("unreachable_calls", 0)
        transport = FaultyTransport(client.transport, **kwargs)
        c = cycles.Client(transport=transport, tenant="acme", fail_open=fail_open)
        made.append(c)
        return c, transport

    yield make
    for c in made:
        c.close()  # stops its heartbeat; FaultyTransport.close leaves the shared store open


# ------------------------------------------------------------------------------------------ unreachable at reserve


def test_unreachable_at_reserve_fails_closed_by_default(faulty_client, client):
    c, _ = faulty_client(client, unreachable_calls=1)
    ran = []
    with pytest.raises(cycles.TransportError):
        with c.reserve(cycles.usd(0.05)):
            ran.append(True)
    assert ran == []
    assert c.stats.fail_open == 0
    assert_settled(client, 0)


async def test_unreachable_at_reserve_fails_closed_by_default_async(faulty_client, client):
    c, _ = faulty_client(client, unreachable_calls=1)

    @cycles.guard(estimate=cycles.usd(0.05), client=c)
    async def call():
        pytest.fail("ran unguarded")

    with pytest.raises(cycles.TransportError):
        await call()
    assert_settled(client, 0)


def test_fail_open_runs_the_call_unguarded_and_counts_it(faulty_client, client):
    c, _ = faulty_client(client, unreachable_calls=1, fail_open=True)
    ran = []
    with c.reserve(cycles.usd(0.05)) as r:
        ran.append(True)
        assert r.status == "UNGUARDED"
        assert client.reservations() == []
    assert ran == [True]
    assert c.stats.fail_open == 1
    assert_settled(client, 0)
    # once the authority is back, calls are guarded again
    with c.reserve(cycles.usd(0.05)) as r:
        assert r.status == "ACTIVE"
    assert c.stats.fail_open == 1
    assert_settled(client, 5 * CENT)


async def test_fail_open_async(faulty_client, client):
    c, _ = faulty_client(client, unreachable_calls=2, fail_open=True)
    ran = []
    async with c.reserve(cycles.usd(0.05)):
        ran.append(1)

    @cycles.guard(estimate=cycles.usd(0.05), client=c)
    async def call():
        ran.append(2)
        return "ok"

    assert await call() == "ok"
    assert ran == [1, 2]
    assert c.stats.fail_open == 2
    assert_settled(client, 0)


def test_fail_open_from_environment(faulty_client, client, monkeypatch):
    monkeypatch.setenv("CYCLES_FAIL_OPEN", "true")
    c, _ = faulty_client(client, unreachable_calls=1)
    with c.reserve(cycles.usd(0.05)) as r:
        assert r.status == "UNGUARDED"
    assert c.stats.fail_open == 1


def test_fail_open_never_overrides_a_denial(faulty_client, client):
    c, _ = faulty_client(client, fail_open=True)
    with pytest.raises(cycles.BudgetExceeded):
        with c.reserve(cycles.usd(11)):
            pytest.fail("ran")
    assert c.stats.fail_open == 0
    assert_settled(client, 0)


def test_a_reserve_whose_answer_was_lost_is_retried_with_the_same_key(faulty_client, client, monkeypatch):
    monkeypatch.setattr(importlib.import_module("cycles.guard"), "COMMIT_BACKOFF_S", 0)
    c, transport = faulty_client(client, reserve_failures=ATTEMPTS - 1)  # fails, then the last attempt gets through
    with c.reserve(cycles.usd(0.05)) as r:
        assert r.status == "ACTIVE"
    assert transport.reserve_failures == 0
    assert len(client.reservations()) == 1
    assert_settled(client, 5 * CENT)


# ------------------------------------------------------------------------------------------------ commit retries


@pytest.mark.parametrize("mode", ["commit_failures", "lost_commit_responses"])
def test_commit_retried_with_the_same_key(faulty_client, client, mode):
    c, t = faulty_client(client, **{mode: 1})
    with c.reserve(cycles.usd(0.05)) as r:
        r.record(cycles.usd(0.03))
    assert len(t.commit_keys) == 2
    assert t.commit_keys[0] == t.commit_keys[1]
    assert c.stats.commit_retries == 1
    assert r.status == "COMMITTED" and r.charged == cycles.usd(0.03)
    [detail] = client.reservations()
    assert detail.status == "COMMITTED" and detail.committed == cycles.usd(0.03)
    assert_settled(client, 3 * CENT)  # committed once


@pytest.mark.parametrize("mode", ["commit_failures", "lost_commit_responses"])
async def test_commit_retried_with_the_same_key_async(faulty_client, client, mode):
    c, t = faulty_client(client, **{mode: 2})
    async with c.reserve(cycles.usd(0.05), actual=cycles.usd(0.04)):
        pass
    assert len(t.commit_keys) == 3 and len(set(t.commit_keys)) == 1
    assert c.stats.commit_retries == 2
    assert_settled(client, 4 * CENT)


def test_explicit_commit_retried_too(faulty_client, client):
    c, t = faulty_client(client, lost_commit_responses=1)
    with c.reserve(cycles.usd(0.05)) as r:
        assert r.commit(cycles.usd(0.01)) == cycles.usd(0.01)
    assert len(t.commit_keys) == 2 and len(set(t.commit_keys)) == 1
    assert_settled(client, 1 * CENT)


# ------------------------------------------------------------------------------------------- expired at commit


@pytest.fixture
def clocked(store_url, clock):
    """A client whose ledger runs on the test's clock (tests/conftest.py), $10 at tenant:acme and agent:bot."""
    c = cycles.Client(store=store_url, tenant="acme", clock=clock)
    c.budgets.set("tenant:acme", cycles.usd(10))
    c.budgets.set("tenant:acme/agent:bot", cycles.usd(1))
    yield c
    c.close()


def _expired_checks(clocked, c, t, r, actual):
    assert c.stats.expired_settled == 1
    assert r.status == "COMMITTED" and r.charged == actual
    [event] = t.event_requests
    assert event.actual == actual
    assert event.idempotency_key == t.commit_keys[0]  # the settlement reuses the commit's key
    assert event.subject.agent == "bot"
    [detail] = clocked.reservations()
    assert detail.status == "EXPIRED"
    assert_settled(clocked, {"tenant:acme": actual.amount, "tenant:acme/agent:bot": actual.amount})


def test_commit_after_expiry_is_settled_as_an_event(faulty_client, clocked, clock):
    c, t = faulty_client(clocked)
    with c.reserve(cycles.usd(0.05), agent="bot", ttl_ms=1_000, grace_period_ms=500) as r:
        assert ledger(clocked)["tenant:acme/agent:bot"] == (0, 5 * CENT)
        clock.advance(1_000 + 500 + 1)
        r.record(cycles.usd(0.02))
    _expired_checks(clocked, c, t, r, cycles.usd(0.02))


async def test_commit_after_expiry_is_settled_as_an_event_async(faulty_client, clocked, clock):
    c, t = faulty_client(clocked)
    async with c.reserve(cycles.usd(0.05), agent="bot", ttl_ms=1_000, grace_period_ms=0) as r:
        clock.advance(5_000)
        await asyncio.sleep(0)
        await r.acommit(cycles.usd(0.04))
    _expired_checks(clocked, c, t, r, cycles.usd(0.04))


def test_commit_inside_the_grace_window_is_a_normal_commit(faulty_client, clocked, clock):
    c, t = faulty_client(clocked)
    with c.reserve(cycles.usd(0.05), agent="bot", ttl_ms=1_000, grace_period_ms=500) as r:
        clock.advance(1_000 + 500)
    assert c.stats.expired_settled == 0
    assert t.event_requests == []
    assert [d.status for d in clocked.reservations()] == ["COMMITTED"]
    assert_settled(clocked, {"tenant:acme": 5 * CENT, "tenant:acme/agent:bot": 5 * CENT})
    assert r.charged == cycles.usd(0.05)


def test_release_after_expiry_is_quiet(clocked, clock):
    with pytest.raises(ValueError):
        with clocked.reserve(cycles.usd(0.05), agent="bot", ttl_ms=1_000, grace_period_ms=0):
            clock.advance(2_000)
            raise ValueError  # the release meets 410: the hold already went back
    assert clocked.stats.expired_settled == 0
    assert_settled(clocked, 0)
