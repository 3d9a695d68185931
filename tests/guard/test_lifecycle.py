"""The lifecycle table of DESIGN.md, row by row, through `client.reserve(...)` (sync `with` and `async with`).

Every scenario ends by reading the ledger back through the public API: exact spent and reserved at each level, and
nothing left ACTIVE.
"""

from __future__ import annotations

import asyncio

import pytest

import cycles

from .helpers import CENT, assert_settled, ledger

# ------------------------------------------------------------------------------------------------------- denials


@pytest.fixture
def denials(client: cycles.Client) -> cycles.Client:
    """agent:small has $0.05 left; agent:frozen is frozen; agent:over is over its (zero) overdraft limit."""
    client.budgets.set("tenant:acme/agent:small", cycles.usd(0.05))
    client.budgets.set("tenant:acme/agent:frozen", cycles.usd(1))
    client.budgets.freeze("tenant:acme/agent:frozen")
    client.budgets.set("tenant:acme/agent:over", cycles.usd(0.10))
    # ALLOW_IF_AVAILABLE commit of 0.30 against 0.10: capped, the scope is marked over its limit
    with client.reserve(cycles.usd(0.10), agent="over", actual=cycles.usd(0.30)):
        pass
    assert client.budgets.get("tenant:acme/agent:over").is_over_limit
    return client


# agent, exception type, requested, remaining at the refusing scope
DENIAL_CASES = [
    ("small", cycles.BudgetExceeded, cycles.usd(0.06).amount, 5 * CENT),
    ("frozen", cycles.BudgetFrozen, cycles.usd(0.06).amount, 100 * CENT),
    ("over", cycles.OverdraftLimitExceeded, cycles.usd(0.06).amount, 0),
]


def _denial_spent() -> dict[str, int]:
    # what the fixture itself spent: 0.10 at agent:over and the tenant
    return {"tenant:acme": 10 * CENT, "tenant:acme/agent:over": 10 * CENT}


@pytest.mark.parametrize(("agent", "exc_type", "requested", "remaining"), DENIAL_CASES)
def test_denial_raises_typed_exception_and_body_never_runs(denials, agent, exc_type, requested, remaining):
    ran = []
    with pytest.raises(exc_type) as info:
        with denials.reserve(cycles.usd(0.06), agent=agent):
            ran.append(True)
    assert ran == []
    err = info.value
    assert isinstance(err, cycles.BudgetDenied) and isinstance(err, cycles.CyclesError)
    assert err.scope == f"tenant:acme/agent:{agent}"
    assert err.requested == requested
    assert err.remaining == remaining
    assert err.unit == "USD_MICROCENTS"
    assert err.status == 409
    assert f"tenant:acme/agent:{agent}" in str(err)
    assert cycles.current_reservation() is None
    assert_settled(denials, _denial_spent())


@pytest.mark.parametrize(("agent", "exc_type", "requested", "remaining"), DENIAL_CASES)
async def test_denial_raises_typed_exception_and_body_never_runs_async(denials, agent, exc_type, requested, remaining):
    ran = []
    with pytest.raises(exc_type) as info:
        async with denials.reserve(cycles.usd(0.06), agent=agent):
            ran.append(True)
    assert ran == []
    assert info.value.scope == f"tenant:acme/agent:{agent}"
    assert info.value.requested == requested
    assert info.value.remaining == remaining
    assert_settled(denials, _denial_spent())


def test_denial_at_tenant_level_reports_the_tenant_scope(client):
    with pytest.raises(cycles.BudgetExceeded) as info:
        with client.reserve(cycles.usd(10.01), agent="bot"):
            pytest.fail("body ran")
    assert info.value.scope == "tenant:acme"
    assert info.value.requested == cycles.usd(10.01).amount
    assert info.value.remaining == cycles.usd(10).amount
    assert_settled(client, 0)


# ------------------------------------------------------------------------------------------------------ success


@pytest.fixture
def bot(client: cycles.Client) -> cycles.Client:
    client.budgets.set("tenant:acme/agent:bot", cycles.usd(1))
    return client


def _bot_spent(amount: int) -> dict[str, int]:
    return {"tenant:acme": amount, "tenant:acme/agent:bot": amount}


def test_held_inside_the_block_at_every_level(bot):
    with bot.reserve(cycles.usd(0.05), agent="bot", action=("llm.completion", "gpt-4o")) as r:
        assert r.status == "ACTIVE" and r.id is not None and r.decision == "ALLOW"
        assert cycles.current_reservation() is r
        assert ledger(bot) == {"tenant:acme": (0, 5 * CENT), "tenant:acme/agent:bot": (0, 5 * CENT)}
        [active] = bot.reservations(status="ACTIVE")
        assert active.reservation_id == r.id
        assert active.action.kind == "llm.completion" and active.action.name == "gpt-4o"
        assert active.reserved == cycles.usd(0.05)
    assert cycles.current_reservation() is None
    assert r.status == "COMMITTED"
    assert_settled(bot, _bot_spent(5 * CENT))


def test_exit_commits_the_estimate_by_default(bot):
    with bot.reserve(cycles.usd(0.05), agent="bot") as r:
        pass
    assert r.charged == cycles.usd(0.05)
    [detail] = bot.reservations()
    assert detail.status == "COMMITTED" and detail.committed == cycles.usd(0.05)
    assert_settled(bot, _bot_spent(5 * CENT))


def test_explicit_commit_charges_the_actual_and_returns_the_rest(bot):
    with bot.reserve(cycles.usd(0.05), agent="bot") as r:
        charged = r.commit(cycles.usd(0.031))
        assert charged == cycles.usd(0.031)
        assert r.status == "COMMITTED"
        assert bot.reservations(status="ACTIVE") == []  # settled early, not again at exit
    assert r.charged == cycles.usd(0.031)
    assert_settled(bot, _bot_spent(cycles.usd(0.031).amount))


def test_commit_accepts_an_int_in_the_reservation_unit(bot):
    with bot.reserve(cycles.usd(0.05), agent="bot") as r:
        r.commit(1234)
    assert_settled(bot, _bot_spent(1234))


def test_record_is_committed_at_exit(bot):
    with bot.reserve(cycles.usd(0.05), agent="bot") as r:
        r.record(cycles.usd(0.01))
        r.record(cycles.usd(0.02))  # replaces, does not add
    assert r.charged == cycles.usd(0.02)
    assert_settled(bot, _bot_spent(2 * CENT))


def test_actual_argument_amount_and_callable(bot):
    with bot.reserve(cycles.usd(0.05), agent="bot", actual=cycles.usd(0.04)):
        pass
    usage = {"cost": 0}
    with bot.reserve(cycles.usd(0.05), agent="bot", actual=lambda: cycles.usd(usage["cost"])):
        usage["cost"] = 0.015  # read at exit, not at enter
    assert_settled(bot, _bot_spent(cycles.usd(0.04).amount + cycles.usd(0.015).amount))


def test_explicit_release_spends_nothing(bot):
    with bot.reserve(cycles.usd(0.05), agent="bot") as r:
        r.release()
        assert r.status == "RELEASED"
    assert [d.status for d in bot.reservations()] == ["RELEASED"]
    assert_settled(bot, 0)


def test_actual_in_another_unit_is_refused(bot):
    with pytest.raises(TypeError):
        with bot.reserve(cycles.usd(0.05), agent="bot") as r:
            r.commit(cycles.tokens(10))
    # the TypeError inside the block released the hold
    assert_settled(bot, 0)


def test_actual_argument_in_another_unit_still_settles_the_hold(bot):
    """The wrong-unit actual is refused (TypeError) when the block exits; the hold must not stay ACTIVE."""
    with pytest.raises(TypeError):
        with bot.reserve(cycles.usd(0.05), agent="bot", actual=cycles.tokens(10)):
            pass
    assert bot.reservations(status="ACTIVE") == []
    assert ledger(bot)["tenant:acme/agent:bot"][1] == 0


async def test_async_success_paths(bot):
    async with bot.reserve(cycles.usd(0.05), agent="bot") as r1:
        assert cycles.current_reservation() is r1
        assert ledger(bot)["tenant:acme/agent:bot"] == (0, 5 * CENT)
    async with bot.reserve(cycles.usd(0.05), agent="bot") as r2:
        assert await r2.acommit(cycles.usd(0.01)) == cycles.usd(0.01)
    async with bot.reserve(cycles.usd(0.05), agent="bot") as r3:
        r3.record(cycles.usd(0.02))
    async with bot.reserve(cycles.usd(0.05), agent="bot", actual=cycles.usd(0.03)):
        pass
    async with bot.reserve(cycles.usd(0.05), agent="bot") as r5:
        await r5.arelease()
    assert [r.status for r in (r1, r2, r3, r5)] == ["COMMITTED", "COMMITTED", "COMMITTED", "RELEASED"]
    assert cycles.current_reservation() is None
    assert_settled(bot, _bot_spent((5 + 1 + 2 + 3) * CENT))


# ---------------------------------------------------------------------------------------------------- failures


def test_exception_releases_and_propagates(bot):
    with pytest.raises(ValueError, match="boom"):
        with bot.reserve(cycles.usd(0.05), agent="bot", actual=cycles.usd(0.04)) as r:
            raise ValueError("boom")
    assert r.status == "RELEASED"
    assert [d.status for d in bot.reservations()] == ["RELEASED"]
    assert_settled(bot, 0)


def test_exception_after_record_commits_the_partial_usage(bot):
    with pytest.raises(ValueError):
        with bot.reserve(cycles.usd(0.05), agent="bot") as r:
            r.record(cycles.usd(0.02))
            raise ValueError("cut mid-way")
    assert r.status == "COMMITTED" and r.charged == cycles.usd(0.02)
    assert_settled(bot, _bot_spent(2 * CENT))


async def test_exception_releases_async(bot):
    with pytest.raises(RuntimeError):
        async with bot.reserve(cycles.usd(0.05), agent="bot"):
            await asyncio.sleep(0)
            raise RuntimeError
    with pytest.raises(RuntimeError):
        async with bot.reserve(cycles.usd(0.05), agent="bot") as r:
            r.record(cycles.usd(0.03))
            raise RuntimeError
    assert_settled(bot, _bot_spent(3 * CENT))


def test_keyboard_interrupt_settles_then_propagates(bot):
    with pytest.raises(KeyboardInterrupt):
        with bot.reserve(cycles.usd(0.05), agent="bot") as r1:
            raise KeyboardInterrupt
    assert r1.status == "RELEASED"
    with pytest.raises(KeyboardInterrupt):
        with bot.reserve(cycles.usd(0.05), agent="bot") as r2:
            r2.record(cycles.usd(0.01))
            raise KeyboardInterrupt
    assert r2.status == "COMMITTED"
    assert_settled(bot, _bot_spent(1 * CENT))


async def test_keyboard_interrupt_settles_then_propagates_async(bot):
    with pytest.raises(KeyboardInterrupt):
        async with bot.reserve(cycles.usd(0.05), agent="bot") as r:
            await asyncio.sleep(0)
            raise KeyboardInterrupt
    assert r.status == "RELEASED"
    assert_settled(bot, 0)


@pytest.mark.parametrize("recorded", [None, 2 * CENT])
async def test_cancelled_task_settles_and_reraises(bot, recorded):
    inside = asyncio.Event()
    after = []

    async def call() -> None:
        async with bot.reserve(cycles.usd(0.05), agent="bot") as r:
            if recorded is not None:
                r.record(recorded)
            inside.set()
            await asyncio.Event().wait()  # blocks until cancelled
            after.append(True)

    task = asyncio.create_task(call())
    await inside.wait()
    assert ledger(bot)["tenant:acme/agent:bot"] == (0, 5 * CENT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    assert after == []
    [detail] = bot.reservations()
    assert detail.status == ("RELEASED" if recorded is None else "COMMITTED")
    assert_settled(bot, _bot_spent(recorded or 0))


# -------------------------------------------------------------------------------------------------------- caps


@pytest.fixture
def capped(client: cycles.Client) -> cycles.Client:
    client.policies.create("tenant:acme/agent:*", caps=cycles.Caps(max_tokens=256, tool_denylist=["shell", "rm"]))
    client.policies.create("tenant:acme/toolset:*", caps={"tool_allowlist": ["search"], "tool_denylist": ["search"]})
    return client


def test_caps_are_exposed_and_tools_checked(capped):
    with capped.reserve(cycles.usd(0.05), agent="bot") as r:
        assert r.decision == "ALLOW_WITH_CAPS"
        assert isinstance(r.caps, cycles.Caps)
        assert r.caps.max_tokens == 256
        assert not r.allows_tool("shell") and not r.allows_tool("rm")
        assert r.allows_tool("search") and r.allows_tool("Shell")  # case-sensitive
    with capped.reserve(cycles.usd(0.05), toolset="t") as r2:
        assert r2.allows_tool("search")  # a non-empty allowlist wins over the denylist
        assert not r2.allows_tool("browse")
    assert_settled(capped, 10 * CENT)


async def test_no_caps_on_plain_allow(capped):
    async with capped.reserve(cycles.usd(0.05)) as r:  # tenant level: no policy matches
        assert r.decision == "ALLOW"
        assert r.caps is None
        assert r.allows_tool("shell")
    assert_settled(capped, 5 * CENT)


def test_caps_model_allows_tool():
    assert cycles.Caps().allows_tool("x")
    assert not cycles.Caps(tool_denylist=["x"]).allows_tool("x")
    assert cycles.Caps(tool_denylist=["x"]).allows_tool("y")
    assert cycles.Caps(tool_allowlist=["y"]).allows_tool("y")
    assert not cycles.Caps(tool_allowlist=["y"]).allows_tool("x")
    assert cycles.Caps(tool_allowlist=[], tool_denylist=["x"]).allows_tool("y")  # empty allowlist: no effect


# ----------------------------------------------------------------------------------------------- shadow mode


@pytest.fixture
def shadow(client: cycles.Client, store_url: str):
    """A shadow-mode client on the same ledger file as `client`."""
    c = cycles.Client(store=store_url, tenant="acme", shadow=True)
    yield c
    c.close()


def test_shadow_client_would_be_denial_runs_and_holds_nothing(client, shadow):
    ran = []
    with shadow.reserve(cycles.usd(100)) as r:
        ran.append(True)
        assert r.status == "SHADOW"
        assert r.decision == "DENY" and r.reason_code == "BUDGET_EXCEEDED"
        assert r.id is None
        assert client.reservations() == []
        assert ledger(client) == {"tenant:acme": (0, 0)}
    assert ran == [True]
    assert shadow.stats.shadow_denied == 1
    # an allowed shadow call is not counted and holds nothing either
    with shadow.reserve(cycles.usd(0.05)) as r2:
        assert r2.decision == "ALLOW" and r2.id is None
        assert client.reservations() == []
    assert shadow.stats.shadow_denied == 1
    assert client.reservations() == []
    assert_settled(client, 0)


async def test_dry_run_per_call_async(client):
    ran = []
    async with client.reserve(cycles.usd(100), dry_run=True) as r:
        ran.append(True)
        assert r.decision == "DENY"
        assert ledger(client) == {"tenant:acme": (0, 0)}
    async with client.reserve(cycles.usd(100), dry_run=True) as r:
        r.record(cycles.usd(0.5))  # recorded usage of a dry run is not spent
        ran.append(True)
    assert ran == [True, True]
    assert client.stats.shadow_denied == 2
    assert client.reservations() == []
    assert_settled(client, 0)


def test_dry_run_false_overrides_a_shadow_client(client, shadow):
    with pytest.raises(cycles.BudgetExceeded):
        with shadow.reserve(cycles.usd(100), dry_run=False):
            pytest.fail("body ran")
    with shadow.reserve(cycles.usd(0.05), dry_run=False) as r:
        assert r.status == "ACTIVE"
    assert shadow.stats.shadow_denied == 0
    assert_settled(client, 5 * CENT)
