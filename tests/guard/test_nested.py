"""Nested guards never double-count (guard.py module docstring): an inner guard of the same client and unit draws
from the enclosing hold in process; the outer commits the sum of the inner actuals unless given its own."""

from __future__ import annotations

import asyncio

import pytest

import cycles

from .helpers import CENT, assert_settled, ledger


def test_inner_guard_draws_from_the_outer_hold_without_reserving(client):
    @cycles.guard(estimate=cycles.usd(0.03), client=client)
    def tool():
        inner = cycles.current_reservation()
        assert inner.status == "NESTED"
        assert len(client.reservations()) == 1  # no second reservation
        assert ledger(client)["tenant:acme"] == (0, 10 * CENT)
        return inner

    with client.reserve(cycles.usd(0.10), action=("agent.step", "plan")) as outer:
        first = tool()
        with client.reserve(cycles.usd(0.05)) as second:
            second.commit(cycles.usd(0.02))
        assert cycles.current_reservation() is outer
        assert len(client.reservations()) == 1
    assert first.status == "COMMITTED" and first.charged == cycles.usd(0.03)
    assert second.status == "COMMITTED" and second.charged == cycles.usd(0.02)
    [detail] = client.reservations()
    assert detail.reservation_id == outer.id
    assert detail.committed == cycles.usd(0.05)  # the sum of the inner actuals, not the outer estimate
    assert_settled(client, 5 * CENT)


async def test_inner_guard_draws_from_the_outer_hold_async(client):
    @cycles.guard(estimate=cycles.usd(0.03), actual=lambda result: result, client=client)
    async def tool(cost):
        await asyncio.sleep(0)
        return cost

    async with client.reserve(cycles.usd(0.10)) as outer:
        costs = await asyncio.gather(tool(cycles.usd(0.01)), tool(cycles.usd(0.02)), tool(cycles.usd(0.03)))
        assert len(client.reservations()) == 1
    assert costs == [cycles.usd(0.01), cycles.usd(0.02), cycles.usd(0.03)]
    assert outer.charged == cycles.usd(0.06)
    assert_settled(client, 6 * CENT)


def test_inner_estimate_that_does_not_fit_is_denied(client):
    ran = []
    with client.reserve(cycles.usd(0.10)) as outer:
        with pytest.raises(cycles.BudgetExceeded) as info:
            with client.reserve(cycles.usd(0.11)):
                ran.append(True)
        err = info.value
        assert (err.requested, err.remaining) == (11 * CENT, 10 * CENT)
        assert err.scope == f"reservation:{outer.id}"
        with client.reserve(cycles.usd(0.06)) as middle:
            # a guard inside a nested guard draws from that one's estimate
            with pytest.raises(cycles.BudgetExceeded) as info:
                with client.reserve(cycles.usd(0.07)):
                    ran.append(True)
            assert (info.value.requested, info.value.remaining) == (7 * CENT, 6 * CENT)
            assert info.value.scope
            with client.reserve(cycles.usd(0.02)):
                pass
        assert middle.charged == cycles.usd(0.02)
        with client.reserve(cycles.usd(0.08)):  # 0.02 used: 0.08 fits exactly
            pass
        with pytest.raises(cycles.BudgetExceeded):
            with client.reserve(cycles.usd(0.01)):
                ran.append(True)
        assert len(client.reservations()) == 1
    assert ran == []
    assert outer.charged == cycles.usd(0.10)
    assert_settled(client, 10 * CENT)


async def test_concurrent_inner_calls_share_the_outer_estimate(client):
    holding = asyncio.Event()
    release = asyncio.Event()

    async def holder():
        async with client.reserve(cycles.usd(0.06)):
            holding.set()
            await release.wait()

    ran = []
    async with client.reserve(cycles.usd(0.10)) as outer:
        task = asyncio.create_task(holder())
        await holding.wait()
        with pytest.raises(cycles.BudgetExceeded) as info:
            async with client.reserve(cycles.usd(0.05)):  # 0.06 in flight in the sibling task: 0.04 left
                ran.append(True)
        assert (info.value.requested, info.value.remaining) == (5 * CENT, 4 * CENT)
        async with client.reserve(cycles.usd(0.04)):
            pass
        release.set()
        await task
        assert len(client.reservations()) == 1
    assert ran == []
    assert outer.charged == cycles.usd(0.10)
    assert_settled(client, 10 * CENT)


def test_outer_actual_wins_over_the_inner_sum(client):
    with client.reserve(cycles.usd(0.10)) as outer:
        with client.reserve(cycles.usd(0.03)):
            pass
        outer.commit(cycles.usd(0.07))
    assert outer.charged == cycles.usd(0.07)
    with client.reserve(cycles.usd(0.10), actual=cycles.usd(0.08)):
        with client.reserve(cycles.usd(0.03)):
            pass
    assert_settled(client, 15 * CENT)


def test_outer_without_inner_calls_commits_its_estimate(client):
    with client.reserve(cycles.usd(0.10)) as outer:
        pass
    assert outer.charged == cycles.usd(0.10)
    assert_settled(client, 10 * CENT)


def test_failed_inner_call_draws_nothing(client):
    with client.reserve(cycles.usd(0.10)) as outer:
        with pytest.raises(ValueError):
            with client.reserve(cycles.usd(0.04)) as failed:
                raise ValueError
        assert failed.status == "RELEASED"
        with client.reserve(cycles.usd(0.10)):  # the failed call's draw came back
            pass
    assert outer.charged == cycles.usd(0.10)
    assert_settled(client, 10 * CENT)


def test_outer_failing_commits_what_its_inner_calls_spent(client):
    with pytest.raises(RuntimeError):
        with client.reserve(cycles.usd(0.10)) as outer:
            with client.reserve(cycles.usd(0.03), actual=cycles.usd(0.02)):
                pass
            raise RuntimeError("agent crashed after one tool call")
    assert outer.status == "COMMITTED" and outer.charged == cycles.usd(0.02)
    assert_settled(client, 2 * CENT)


def test_inner_record_then_failure_reports_the_partial_usage(client):
    with client.reserve(cycles.usd(0.10)) as outer:
        with pytest.raises(ValueError):
            with client.reserve(cycles.usd(0.05)) as inner:
                inner.record(cycles.usd(0.01))
                raise ValueError
    assert outer.charged == cycles.usd(0.01)
    assert_settled(client, 1 * CENT)


def test_inner_guard_in_another_unit_reserves_on_its_own(client):
    client.budgets.set("tenant:acme", cycles.tokens(10_000))
    with client.reserve(cycles.usd(0.10)) as outer:
        with client.reserve(cycles.tokens(500), actual=cycles.tokens(120)) as inner:
            assert inner.status == "ACTIVE" and inner.id != outer.id
            assert len(client.reservations(status="ACTIVE")) == 2
            assert ledger(client)["tenant:acme[TOKENS]"] == (0, 500)
    assert outer.charged == cycles.usd(0.10)  # the tokens call is not one of its inner calls
    assert_settled(client, {"tenant:acme": 10 * CENT, "tenant:acme[TOKENS]": 120})


def test_inner_guard_of_another_client_reserves_on_its_own(client, store_url):
    other = cycles.Client(store=store_url, tenant="acme")
    try:
        with client.reserve(cycles.usd(0.10)):
            with other.reserve(cycles.usd(0.03)) as inner:
                assert inner.status == "ACTIVE"
                assert len(client.reservations(status="ACTIVE")) == 2
    finally:
        other.close()
    assert_settled(client, 13 * CENT)


def test_inner_generator_draws_from_the_outer_hold(client):
    @cycles.guard(estimate=cycles.usd(0.04), client=client)
    def chunks():
        cycles.current_reservation().record(cycles.usd(0.01))
        yield "a"
        cycles.current_reservation().record(cycles.usd(0.02))
        yield "b"

    with client.reserve(cycles.usd(0.10)) as outer:
        assert list(chunks()) == ["a", "b"]
        gen = chunks()
        next(gen)
        gen.close()
        assert len(client.reservations()) == 1
    assert outer.charged == cycles.usd(0.03)
    assert_settled(client, 3 * CENT)


def test_dry_run_call_inside_an_outer_guard_holds_and_spends_nothing(client):
    """DESIGN.md: a dry run is evaluated and reported, nothing held. It must not draw from (or be charged to) the
    enclosing guard: the outer, with no real inner call, commits its own estimate."""
    ran = []
    with client.reserve(cycles.usd(0.10)) as outer:
        with client.reserve(cycles.usd(0.20), dry_run=True) as probe:  # would not fit the outer hold
            ran.append(probe.status)
    assert ran == ["SHADOW"]
    assert outer.charged == cycles.usd(0.10)
    assert_settled(client, 10 * CENT)


@pytest.mark.parametrize("settle", ["commit", "release"])
def test_guard_after_the_outer_settled_early_is_not_lost(client, settle):
    """An outer hold settled early (r.commit / r.release inside its block) can no longer carry inner spend: a guard
    entered afterwards must reach the ledger (reserve on its own, or be refused), never vanish."""
    with client.reserve(cycles.usd(0.10)) as outer:
        if settle == "commit":
            outer.commit(cycles.usd(0.05))
        else:
            outer.release()
        with client.reserve(cycles.usd(0.03)) as inner:
            pass
    assert inner.status == "COMMITTED" and inner.charged == cycles.usd(0.03)
    outer_spent = 5 * CENT if settle == "commit" else 0
    assert_settled(client, outer_spent + 3 * CENT)  # the inner call's 0.03 is in the ledger


def test_inner_guard_applies_the_caps_of_the_enclosing_hold(client):
    """ALLOW_WITH_CAPS caps are applied, not ignored (DESIGN.md). A guard drawn from an enclosing hold (a run budget,
    an outer guard) runs under the caps the authority gave that hold: its `caps` / `allows_tool` must say so."""
    client.policies.create("tenant:acme/agent:*", caps=cycles.Caps(max_tokens=64, tool_denylist=["shell"]))
    with cycles.run(limit=cycles.usd(1), client=client, agent="bot") as run:
        assert run.reservation.caps is not None and not run.reservation.allows_tool("shell")
        with client.reserve(cycles.usd(0.01)) as r:
            assert r.status == "NESTED"
            assert r.caps == run.reservation.caps
            assert not r.allows_tool("shell")
            assert r.allows_tool("search")
    with client.reserve(cycles.usd(0.10), agent="bot") as outer:
        with client.reserve(cycles.usd(0.01)) as inner:
            assert not inner.allows_tool("shell")
            assert inner.caps is not None and inner.caps.max_tokens == 64
    assert outer.charged == cycles.usd(0.01)
