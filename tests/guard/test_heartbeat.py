"""The heartbeat (PROTOCOL.md section 4, "Heartbeat"): the delay formula, and a long call kept alive in real time.

Real-time tests wait on conditions with generous deadlines and never assert durations."""

from __future__ import annotations

import time

import pytest

import cycles
from cycles import heartbeat
from cycles.client.local import LocalTransport
from cycles.heartbeat import next_delay_ms

from .helpers import CENT, assert_settled


def _formula(remaining_ttl, rtt, max_rtt, timeout):
    """PROTOCOL.md 4: lead_floor = max(0, remaining_ttl - rtt); attempt_budget = max(timeout, 1000, 2 max_rtt);
    safety = max(1000, 2 max_rtt); next_delay = max(0, lead_floor - (2 attempt_budget + safety))."""
    lead_floor = max(0, remaining_ttl - rtt)
    attempt_budget = max(timeout, 1000, 2 * max_rtt)
    safety = max(1000, 2 * max_rtt)
    return max(0, lead_floor - (2 * attempt_budget + safety))


@pytest.mark.parametrize(
    ("remaining_ttl", "rtt", "max_rtt", "timeout", "expected"),
    [
        (60_000, 0, 0, 5_000, 49_000),  # attempt budget = timeout: 60000 - (10000 + 1000)
        (60_000, 10, 10, 5_000, 48_990),  # the round trip comes off the lead
        (60_000, 10, 10, 100, 56_990),  # attempt budget floors at 1000: 59990 - 3000
        (10_000, 100, 800, 100, 5_100),  # 2 max_rtt drives attempt budget and safety: 9900 - (3200 + 1600)
        (10_000, 100, 800, 2_000, 4_300),  # timeout drives attempt budget: 9900 - (4000 + 1600)
        (3_000, 0, 0, 100, 0),  # exactly at the floor
        (3_000, 5, 5, 100, 0),  # below it: clamped to 0
        (500, 900, 900, 100, 0),  # the round trip is longer than the TTL: lead floor 0
        (0, 0, 0, 0, 0),
    ],
)
def test_next_delay_ms_follows_the_protocol_formula(remaining_ttl, rtt, max_rtt, timeout, expected):
    assert _formula(remaining_ttl, rtt, max_rtt, timeout) == expected
    assert next_delay_ms(remaining_ttl, rtt, max_rtt, timeout) == expected


def test_next_delay_ms_grid():
    for remaining_ttl in (0, 999, 3_000, 4_001, 30_000, 3_600_000):
        for rtt, max_rtt in ((0, 0), (3, 700), (600, 600), (2_500, 2_500)):
            for timeout in (0, 100, 1_000, 5_000, 30_000):
                args = (remaining_ttl, rtt, max_rtt, timeout)
                assert next_delay_ms(*args) == _formula(*args), args


def _wait_for(predicate, deadline_s: float = 15.0) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_long_call_is_kept_alive_past_its_original_expiry(store_url):
    c = cycles.Client(store=store_url, tenant="acme", timeout=0.1)
    try:
        c.budgets.set("tenant:acme", cycles.usd(1))
        with c.reserve(cycles.usd(0.05), ttl_ms=3_000, grace_period_ms=0) as r:
            original = r.expires_at_ms
            assert _wait_for(lambda: c.stats.heartbeats >= 1)
            assert r.expires_at_ms >= original + 3_000
            # hold the call (real time) until its original expiry has passed
            assert _wait_for(lambda: time.time() * 1000 > original + 250)
            [detail] = c.reservations(status="ACTIVE")
            assert detail.expires_at_ms == r.expires_at_ms > original
            r.record(cycles.usd(0.02))
        assert c.stats.heartbeat_failures == 0
        assert c.stats.expired_settled == 0  # a normal commit: the hold was still alive
        [detail] = c.reservations()
        assert detail.status == "COMMITTED" and detail.committed == cycles.usd(0.02)
        assert_settled(c, 2 * CENT)
    finally:
        c.close()


class FlakyExtend(LocalTransport):
    """The embedded transport; the first extend fails as if the network dropped it."""

    def __init__(self, inner: LocalTransport) -> None:
        super().__init__(inner.ledger)
        self.extend_keys: list[str] = []

    def extend(self, reservation_id, request):
        self.extend_keys.append(request.idempotency_key)
        if len(self.extend_keys) == 1:
            raise cycles.TransportError("connection reset")
        return super().extend(reservation_id, request)

    def close(self) -> None:
        pass


def test_heartbeat_retries_a_transient_failure_with_the_same_key(client):
    transport = FlakyExtend(client.transport)
    c = cycles.Client(transport=transport, tenant="acme", timeout=0.1)
    try:
        with c.reserve(cycles.usd(0.05), ttl_ms=3_000) as r:
            original = r.expires_at_ms
            assert _wait_for(lambda: c.stats.heartbeats >= 1)
            assert c.stats.heartbeat_failures == 1
            assert transport.extend_keys[0] == transport.extend_keys[1]  # a retry, not a new extension
            assert r.expires_at_ms >= original + 3_000
    finally:
        c.heartbeat.close()
    assert_settled(client, 5 * CENT)


def test_a_queued_watch_is_kept_alive_too(store_url, monkeypatch):
    """A watch whose first beat is far off is queued without the lock and taken in by the thread within a tick. With
    the threshold at 0 every watch here takes that path; the thread idles between the two calls and the second wakes
    it."""
    monkeypatch.setattr(heartbeat, "LAZY_MS", 0.0)
    monkeypatch.setattr(heartbeat, "TICK_S", 0.05)
    c = cycles.Client(store=store_url, tenant="acme", timeout=0.1)
    try:
        c.budgets.set("tenant:acme", cycles.usd(1))
        with c.reserve(cycles.usd(0.01)):  # a short call: queued, and usually settled before the thread looks
            pass
        assert _wait_for(lambda: c.heartbeat._thread is not None and not c.heartbeat._queued)
        time.sleep(0.25)  # a few ticks with nothing queued or on the heap...
        assert _wait_for(lambda: not c.heartbeat._ticking)  # ...and the thread idles until the next watch wakes it
        with c.reserve(cycles.usd(0.05), ttl_ms=3_000) as r:
            original = r.expires_at_ms
            assert _wait_for(lambda: c.stats.heartbeats >= 1)
            assert r.expires_at_ms >= original + 3_000
        assert c.stats.heartbeat_failures == 0
        assert_settled(c, 6 * CENT)
    finally:
        c.close()


def test_a_settled_call_is_not_kept_alive_by_its_queued_watch(store_url, monkeypatch):
    """Settling forgets the watch and lets go of the reservation at once: its entry, queued or on the heap, is dropped
    only when the thread next meets it, and must not keep the call's objects alive until then."""
    import gc
    import weakref

    monkeypatch.setattr(heartbeat, "TICK_S", 60.0)  # the thread does not look at the queue again during the test
    c = cycles.Client(store=store_url, tenant="acme")
    try:
        c.budgets.set("tenant:acme", cycles.usd(1))
        running = c.reserve(cycles.usd(0.02)).begin()  # still watched: the thread keeps its heap (and queue) as is
        assert _wait_for(lambda: c.heartbeat._thread is not None and not c.heartbeat._queued)  # taken in, idle
        r = c.reserve(cycles.usd(0.01)).begin()  # begin, not start: no current-reservation context holds it
        r.commit(cycles.usd(0.004))
        gone = weakref.ref(r)
        del r
        gc.collect()  # nothing cyclic holds it either
        assert gone() is None
        running.commit(cycles.usd(0.001))
        assert_settled(c, cycles.usd(0.005).amount)
    finally:
        c.close()
