"""Run budgets: `with cycles.run(limit=..., client=client) as run:` reserves the limit once, guarded calls draw from
it in process, the sum of the actuals is committed at the end. Without a limit a run only attributes."""

from __future__ import annotations

import asyncio
import contextvars
import threading

import pytest

import cycles

from .helpers import CENT, assert_settled, ledger


def _guarded(client, estimate=cycles.usd(0.01), **kwargs):
    @cycles.guard(estimate=estimate, client=client, **kwargs)
    def call(ran: list) -> str:
        ran.append(True)
        return "ok"

    return call


def test_hundred_calls_fit_the_hundred_and_first_is_denied_before_running(client):
    call = _guarded(client)
    ran: list = []
    with cycles.run(limit=cycles.usd(1), client=client) as run:
        assert cycles.current_run() is run
        assert run.remaining == 100 * CENT and run.spent == 0 and run.calls == 0
        [detail] = client.reservations(status="ACTIVE")
        assert detail.reserved == cycles.usd(1)
        assert detail.subject.dimensions == {"run_id": run.run_id}
        assert (detail.action.kind, detail.action.name) == ("agent.run", run.run_id)
        assert ledger(client) == {"tenant:acme": (0, 100 * CENT)}
        for i in range(100):
            assert call(ran) == "ok"
            assert run.spent == (i + 1) * CENT
        assert (run.spent, run.remaining, run.calls) == (100 * CENT, 0, 100)
        with pytest.raises(cycles.BudgetExceeded) as info:
            call(ran)
        assert info.value.requested == 1 * CENT and info.value.remaining == 0
        assert len(ran) == 100
        assert run.calls == 100
        assert len(client.reservations()) == 1  # one reservation for the whole run
        assert ledger(client) == {"tenant:acme": (0, 100 * CENT)}  # nothing committed before the end
    assert cycles.current_run() is None
    [detail] = client.reservations()
    assert detail.status == "COMMITTED" and detail.committed == cycles.usd(1)
    assert_settled(client, 100 * CENT)


def test_run_commits_the_sum_of_actuals_and_unused_limit_returns(client):
    call = _guarded(client, estimate=cycles.usd(0.05), actual=cycles.usd(0.02))
    ran: list = []
    with cycles.run(limit=cycles.usd(1), client=client) as run:
        with pytest.raises(cycles.BudgetExceeded):
            while True:
                call(ran)
        # each call holds 0.05 and spends 0.02: 48 calls leave 0.04, less than one estimate
        assert (len(ran), run.calls, run.spent, run.remaining) == (48, 48, 96 * CENT, 4 * CENT)
        with client.reserve(cycles.usd(0.04), actual=cycles.usd(0.01)):
            assert run.remaining == 0  # an estimate in flight counts against the run
        assert (run.calls, run.spent, run.remaining) == (49, 97 * CENT, 3 * CENT)
    assert client.reservations()[0].committed == cycles.usd(0.97)
    assert_settled(client, 97 * CENT)


def test_run_records_released_calls_as_zero_spend(client):
    with cycles.run(limit=cycles.usd(1), client=client) as run:
        with pytest.raises(ValueError):
            with client.reserve(cycles.usd(0.30)):
                raise ValueError
        with client.reserve(cycles.usd(0.30)) as r:
            r.record(cycles.usd(0.10))
    assert (run.calls, run.spent, run.remaining) == (2, 10 * CENT, 90 * CENT)
    assert_settled(client, 10 * CENT)


def test_exception_inside_a_run_still_commits_what_was_spent(client):
    call = _guarded(client)
    with pytest.raises(RuntimeError, match="agent crashed"):
        with cycles.run(limit=cycles.usd(1), client=client) as run:
            for _ in range(3):
                call([])
            raise RuntimeError("agent crashed")
    assert run.spent == 3 * CENT
    [detail] = client.reservations()
    assert detail.status == "COMMITTED" and detail.committed == cycles.usd(0.03)
    assert cycles.current_run() is None and cycles.current_scope() == {}
    assert_settled(client, 3 * CENT)


def test_budget_exceeded_escaping_the_run_still_commits(client):
    call = _guarded(client, estimate=cycles.usd(0.40))
    with pytest.raises(cycles.BudgetExceeded):
        with cycles.run(limit=cycles.usd(1), client=client):
            while True:
                call([])
    assert_settled(client, 80 * CENT)


def test_run_limit_denied_at_enter(client):
    ran = []
    with pytest.raises(cycles.BudgetExceeded) as info:
        with cycles.run(limit=cycles.usd(11), client=client):
            ran.append(True)
    assert ran == []
    assert info.value.scope == "tenant:acme"
    assert cycles.current_run() is None
    assert cycles.current_scope() == {}
    assert_settled(client, 0)


def test_run_subject_fields(client):
    client.budgets.set("tenant:acme/agent:bot", cycles.usd(1))
    call = _guarded(client)
    with cycles.run(limit=cycles.usd(0.5), client=client, agent="bot", run_id="r-1") as run:
        assert run.run_id == "r-1"
        call([])
        assert ledger(client)["tenant:acme/agent:bot"] == (0, 50 * CENT)
    [detail] = client.reservations()
    assert detail.subject.agent == "bot"
    assert detail.subject.dimensions == {"run_id": "r-1"}
    assert_settled(client, {"tenant:acme": 1 * CENT, "tenant:acme/agent:bot": 1 * CENT})


async def test_async_run(client):
    @cycles.guard(estimate=cycles.usd(0.10), actual=lambda r: cycles.usd(0.03), client=client)
    async def call():
        await asyncio.sleep(0)
        return 1

    async with cycles.run(limit=cycles.usd(0.25), client=client) as run:
        assert cycles.current_run() is run
        for _ in range(6):
            await call()
        # 6 * 0.03 = 0.18 spent, 0.07 left: the 7th estimate (0.10) does not fit
        with pytest.raises(cycles.BudgetExceeded):
            await call()
        assert (run.calls, run.spent, run.remaining) == (6, 18 * CENT, 7 * CENT)
        assert len(client.reservations()) == 1
    assert_settled(client, 18 * CENT)


async def test_cancelled_run_commits_what_was_spent(client):
    inside = asyncio.Event()

    async def agent():
        async with cycles.run(limit=cycles.usd(1), client=client):
            async with client.reserve(cycles.usd(0.10), actual=cycles.usd(0.04)):
                pass
            inside.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(agent())
    await inside.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_settled(client, 4 * CENT)


# --------------------------------------------------------------------------------------------------- concurrency


@pytest.mark.parametrize("carry", ["wrap", "copy_context"])
def test_threads_drawing_from_one_run_never_oversubscribe(client, carry):
    call = _guarded(client)
    barrier = threading.Barrier(8)
    allowed: list = []
    denied: list = []
    errors: list = []

    def worker() -> None:
        barrier.wait()
        for _ in range(20):
            try:
                call(allowed)
            except cycles.BudgetExceeded:
                denied.append(True)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

    with cycles.run(limit=cycles.usd(1), client=client) as run:
        if carry == "wrap":
            targets = [cycles.wrap(worker) for _ in range(8)]
        else:
            targets = [contextvars.copy_context().run for _ in range(8)]
        threads = [
            threading.Thread(target=t) if carry == "wrap" else threading.Thread(target=t, args=(worker,))
            for t in targets
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert (len(allowed), len(denied)) == (100, 60)  # floor($1 / $0.01) of 160 attempts
        assert (run.calls, run.spent, run.remaining) == (100, 100 * CENT, 0)
        assert len(client.reservations()) == 1
    assert_settled(client, 100 * CENT)


async def test_tasks_drawing_from_one_run_never_oversubscribe(client):
    @cycles.guard(estimate=cycles.usd(0.03), actual=cycles.usd(0.03), client=client)
    async def call():
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return True

    async def task() -> tuple[int, int]:
        ok = no = 0
        for _ in range(3):
            try:
                await call()
                ok += 1
            except cycles.BudgetExceeded:
                no += 1
        return ok, no

    async with cycles.run(limit=cycles.usd(1), client=client) as run:
        results = await asyncio.gather(*(task() for _ in range(50)))
        ok = sum(r[0] for r in results)
        assert ok == 33  # floor($1 / $0.03)
        assert sum(r[1] for r in results) == 150 - 33
        assert (run.calls, run.spent, run.remaining) == (33, 99 * CENT, 1 * CENT)
        assert len(client.reservations()) == 1
    assert client.reservations()[0].committed == cycles.usd(0.99)
    assert_settled(client, 99 * CENT)


def test_bare_thread_does_not_see_the_run(client):
    seen = {}

    def worker() -> None:
        seen["run"] = cycles.current_run()
        with client.reserve(cycles.usd(0.02)) as r:
            seen["status"] = r.status

    with cycles.run(limit=cycles.usd(1), client=client) as run:
        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert seen == {"run": None, "status": "ACTIVE"}  # reserved on its own, not drawn from the run
        assert run.calls == 0
        t = threading.Thread(target=cycles.wrap(worker))
        t.start()
        t.join()
        assert seen == {"run": run, "status": "NESTED"}
        assert run.calls == 1
    assert len(client.reservations()) == 2
    assert_settled(client, 4 * CENT)


# ------------------------------------------------------------------------------------------------ without limit


def test_run_without_limit_only_attributes(client):
    call = _guarded(client, estimate=cycles.usd(0.05), actual=cycles.usd(0.02))
    with cycles.run(client=client) as run:
        assert run.remaining is None
        assert client.reservations() == []  # nothing reserved up front
        for _ in range(3):
            call([])
        with pytest.raises(ValueError):
            with client.reserve(cycles.usd(0.05)):
                raise ValueError
        assert (run.calls, run.spent) == (4, 6 * CENT)
    details = client.reservations()
    assert len(details) == 4  # each call reserved on its own
    assert all(d.subject.dimensions == {"run_id": run.run_id} for d in details)
    assert sorted(d.status for d in details) == ["COMMITTED"] * 3 + ["RELEASED"]
    assert_settled(client, 6 * CENT)


async def test_run_without_limit_async_tasks(client):
    @cycles.guard(estimate=cycles.usd(0.02), client=client)
    async def call():
        await asyncio.sleep(0)

    async with cycles.run(client=client) as run:
        await asyncio.gather(*(call() for _ in range(10)))
        assert (run.calls, run.spent) == (10, 20 * CENT)
    assert len(client.reservations()) == 10
    assert_settled(client, 20 * CENT)


def test_run_counts_other_units_separately(client):
    client.budgets.set("tenant:acme", cycles.tokens(1_000))
    with cycles.run(limit=cycles.usd(1), client=client) as run:
        with client.reserve(cycles.tokens(100), actual=cycles.tokens(40)) as r:
            assert r.status == "ACTIVE"  # another unit: reserved on its own, not drawn from the run
        with client.reserve(cycles.usd(0.05)):
            pass
        assert run.spent_by_unit == {"TOKENS": 40, "USD_MICROCENTS": 5 * CENT}
        assert (run.spent, run.calls, run.remaining) == (5 * CENT, 2, 95 * CENT)
    assert_settled(client, {"tenant:acme": 5 * CENT, "tenant:acme[TOKENS]": 40})


def test_nested_guards_inside_a_run_count_once(client):
    @cycles.guard(estimate=cycles.usd(0.02), client=client)
    def tool():
        return 1

    @cycles.guard(estimate=cycles.usd(0.10), client=client)
    def step():
        return tool() + tool()

    with cycles.run(limit=cycles.usd(1), client=client) as run:
        assert step() == 2
        assert (run.calls, run.spent) == (1, 4 * CENT)  # the step, which spent what its two tools spent
    assert_settled(client, 4 * CENT)


# --------------------------------------------------------------------------------------------- dry run in a run


def test_dry_run_call_inside_a_run_does_not_raise_or_spend(client):
    """DESIGN.md: dry_run is evaluated and reported, nothing held, the call runs; a would-be denial does not raise."""
    ran = []
    with cycles.run(limit=cycles.usd(0.05), client=client) as run:
        with client.reserve(cycles.usd(0.10), dry_run=True):
            ran.append(True)
        assert run.spent == 0
    assert ran == [True]
    assert_settled(client, 0)
