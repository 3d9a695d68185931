"""`@cycles.guard(...)` on def, async def, generators and async generators."""

from __future__ import annotations

import asyncio
import contextlib
import inspect

import pytest

import cycles

from .helpers import CENT, assert_settled, ledger

# ----------------------------------------------------------------------------------------------------- functions


def test_function_estimate_gets_the_arguments_and_action_defaults_to_qualname(client):
    seen = []

    def estimate(q, *, n=1):
        seen.append((q, n))
        return cycles.usd(0.01 * n)

    @cycles.guard(estimate=estimate, client=client)
    def search(q, *, n=1):
        """Search the web."""
        r = cycles.current_reservation()
        assert r is not None and r.status == "ACTIVE"
        assert client.reservations(status="ACTIVE")[0].reserved == cycles.usd(0.01 * n)
        return f"results for {q}"

    assert search("cats", n=3) == "results for cats"
    assert seen == [("cats", 3)]
    assert search.__name__ == "search"
    assert search.__doc__ == "Search the web."
    assert search.__qualname__.endswith("<locals>.search")
    assert search.__wrapped__ is not None
    assert inspect.signature(search) == inspect.signature(search.__wrapped__)
    [detail] = client.reservations()
    assert detail.action.kind == "function"
    assert detail.action.name == search.__qualname__
    assert detail.status == "COMMITTED"
    assert cycles.current_reservation() is None
    assert_settled(client, 3 * CENT)


def test_function_action_subject_and_actual_from_result(client):
    client.budgets.set("tenant:acme/agent:bot", cycles.usd(1))

    @cycles.guard(
        estimate=cycles.usd(0.05),
        action=("tool.search", "web"),
        actual=lambda result: cycles.usd(result["cost"]),
        client=client,
        agent="bot",
    )
    def search(q):
        return {"q": q, "cost": 0.02}

    assert search("x") == {"q": "x", "cost": 0.02}
    [detail] = client.reservations()
    assert (detail.action.kind, detail.action.name) == ("tool.search", "web")
    assert detail.subject.agent == "bot"
    assert detail.committed == cycles.usd(0.02)
    assert_settled(client, {"tenant:acme": 2 * CENT, "tenant:acme/agent:bot": 2 * CENT})


def test_function_actual_amount_and_zero_argument_callable(client):
    @cycles.guard(estimate=cycles.usd(0.05), actual=cycles.usd(0.01), client=client)
    def a():
        return "a"

    @cycles.guard(estimate=cycles.usd(0.05), actual=lambda: cycles.usd(0.02), client=client)
    def b():
        return "b"

    assert (a(), b()) == ("a", "b")
    assert_settled(client, 3 * CENT)


def test_function_record_and_exception(client):
    @cycles.guard(estimate=cycles.usd(0.05), actual=cycles.usd(0.04), client=client)
    def fails(partial):
        if partial:
            cycles.current_reservation().record(cycles.usd(0.01))
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        fails(False)
    with pytest.raises(ValueError):
        fails(True)
    assert sorted(d.status for d in client.reservations()) == ["COMMITTED", "RELEASED"]
    assert_settled(client, 1 * CENT)


def test_failing_actual_callable_still_settles_the_hold(client):
    """Every path settles (DESIGN.md): an `actual` callable that raises on the result must not leave the hold
    ACTIVE until it expires. The error itself propagates."""

    @cycles.guard(estimate=cycles.usd(0.05), actual=lambda result: cycles.usd(result["cost"]), client=client)
    def call():
        return {}  # no "cost": the actual callable raises KeyError

    with pytest.raises(KeyError):
        call()
    assert client.reservations(status="ACTIVE") == []
    assert ledger(client)["tenant:acme"][1] == 0


async def test_failing_actual_callable_still_settles_the_hold_async(client):
    @cycles.guard(estimate=cycles.usd(0.05), actual=lambda result: cycles.usd(result["cost"]), client=client)
    async def call():
        return {}

    with pytest.raises(KeyError):
        await call()
    assert client.reservations(status="ACTIVE") == []
    assert ledger(client)["tenant:acme"][1] == 0


def test_function_denied_never_runs(client):
    ran = []

    @cycles.guard(estimate=lambda n: cycles.usd(n), client=client)
    def spend(n):
        ran.append(n)

    with pytest.raises(cycles.BudgetExceeded) as info:
        spend(11)
    assert ran == []
    assert info.value.scope == "tenant:acme"
    assert info.value.requested == cycles.usd(11).amount
    assert info.value.remaining == cycles.usd(10).amount
    assert_settled(client, 0)


def test_function_keyboard_interrupt_settles(client):
    @cycles.guard(estimate=cycles.usd(0.05), client=client)
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        interrupted()
    assert [d.status for d in client.reservations()] == ["RELEASED"]
    assert_settled(client, 0)


def test_method_action_name_and_estimate_gets_self(client):
    class Tool:
        price = cycles.usd(0.02)

        @cycles.guard(estimate=lambda self, q: self.price, client=client)
        def search(self, q):
            return q.upper()

    assert Tool().search("x") == "X"
    [detail] = client.reservations()
    assert detail.action.name.endswith("Tool.search")
    assert detail.committed == cycles.usd(0.02)
    assert_settled(client, 2 * CENT)


def test_default_client_is_used_when_none_given(client):
    cycles.set_default_client(client)
    assert cycles.default_client() is client

    @cycles.guard(estimate=cycles.usd(0.02))
    def f():
        return 1

    assert f() == 1
    assert_settled(client, 2 * CENT)


def test_ambient_scope_is_read_at_call_time(client):
    client.budgets.set("tenant:acme/workflow:wf", cycles.usd(1))

    @cycles.guard(estimate=cycles.usd(0.01), client=client)
    def f():
        return cycles.current_reservation().subject

    with cycles.scope(workflow="wf"):
        assert f() == {"tenant": "acme", "workflow": "wf"}
    assert f() == {"tenant": "acme"}
    assert_settled(client, {"tenant:acme": 2 * CENT, "tenant:acme/workflow:wf": 1 * CENT})


def test_decorator_dry_run(client):
    ran = []

    @cycles.guard(estimate=cycles.usd(100), dry_run=True, client=client)
    def f():
        ran.append(True)
        return "ok"

    assert f() == "ok"
    assert ran == [True]
    assert client.stats.shadow_denied == 1
    assert client.reservations() == []
    assert_settled(client, 0)


# ---------------------------------------------------------------------------------------------------- coroutines


async def test_coroutine_function(client):
    @cycles.guard(estimate=lambda x: cycles.usd(0.01 * x), actual=lambda result: cycles.usd(result), client=client)
    async def work(x):
        """Async work."""
        await asyncio.sleep(0)
        assert ledger(client)["tenant:acme"] == (0, x * CENT)
        return 0.01

    assert inspect.iscoroutinefunction(work)
    assert work.__name__ == "work" and work.__doc__ == "Async work."
    assert await work(4) == 0.01
    [detail] = client.reservations()
    assert (detail.action.kind, detail.action.name) == ("function", work.__qualname__)
    assert detail.reserved == cycles.usd(0.04)
    assert_settled(client, 1 * CENT)


async def test_coroutine_exception_denial_and_default_commit(client):
    ran = []

    @cycles.guard(estimate=lambda amount, fail=False: amount, client=client)
    async def work(amount, fail=False):
        ran.append(amount)
        if fail:
            raise ValueError
        return "done"

    with pytest.raises(ValueError):
        await work(cycles.usd(0.02), fail=True)
    with pytest.raises(cycles.BudgetExceeded):
        await work(cycles.usd(20))
    assert await work(cycles.usd(0.03)) == "done"
    assert ran == [cycles.usd(0.02), cycles.usd(0.03)]
    assert sorted(d.status for d in client.reservations()) == ["COMMITTED", "RELEASED"]
    assert_settled(client, 3 * CENT)


@pytest.mark.parametrize("recorded", [None, 1 * CENT])
async def test_coroutine_cancelled(client, recorded):
    inside = asyncio.Event()

    @cycles.guard(estimate=cycles.usd(0.05), client=client)
    async def slow():
        if recorded is not None:
            cycles.current_reservation().record(recorded)
        inside.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(slow())
    await inside.wait()
    assert ledger(client)["tenant:acme"] == (0, 5 * CENT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_settled(client, recorded or 0)


# ---------------------------------------------------------------------------------------------------- generators


@pytest.fixture
def stream(client):
    seen = []

    @cycles.guard(estimate=lambda n, record=True: cycles.usd(0.01 * n), client=client)
    def stream(n, record=True):
        """Yield n chunks, recording a cent per chunk."""
        for i in range(n):
            if record:
                cycles.current_reservation().record((i + 1) * CENT)
            received = yield i
            if received is not None:
                seen.append(received)
        return "end"

    stream.seen = seen
    return stream


def test_generator_reserves_at_first_step_and_commits_the_recorded_usage_when_exhausted(client, stream):
    assert inspect.isgeneratorfunction(stream)
    assert stream.__name__ == "stream" and stream.__doc__.startswith("Yield n")
    gen = stream(3)
    assert client.reservations() == []  # nothing reserved before the first step
    assert next(gen) == 0
    [active] = client.reservations(status="ACTIVE")
    assert active.reserved == cycles.usd(0.03)
    assert (active.action.kind, active.action.name) == ("function", stream.__qualname__)
    assert cycles.current_reservation() is None  # the reservation does not leak to the consumer between steps
    assert list(gen) == [1, 2]
    assert_settled(client, 3 * CENT)


def test_exhausted_generator_without_record_commits_the_estimate(client, stream):
    assert list(stream(4, record=False)) == [0, 1, 2, 3]
    assert_settled(client, 4 * CENT)


def test_generator_return_value_and_send(client, stream):
    def consumer():
        result = yield from stream(2)
        return result

    gen = consumer()
    assert next(gen) == 0
    assert gen.send("a") == 1
    with pytest.raises(StopIteration) as stop:
        gen.send("b")
    assert stop.value.value == "end"
    assert stream.seen == ["a", "b"]
    assert_settled(client, 2 * CENT)


@pytest.mark.parametrize(("record", "spent"), [(True, 2 * CENT), (False, 0)])
def test_generator_closed_early_settles(client, stream, record, spent):
    gen = stream(5, record=record)
    assert [next(gen), next(gen)] == [0, 1]
    gen.close()
    [detail] = client.reservations()
    assert detail.status == ("COMMITTED" if record else "RELEASED")
    assert_settled(client, spent)


def test_generator_break_settles(client, stream):
    for item in stream(5):
        if item == 2:
            break
    # the for loop dropped the last reference: the generator is finalised and settled (CPython)
    assert_settled(client, 3 * CENT)


def test_generator_raising_settles(client):
    @cycles.guard(estimate=cycles.usd(0.05), client=client)
    def broken(record):
        if record:
            cycles.current_reservation().record(cycles.usd(0.01))
        yield 1
        raise ValueError("cut")

    for record in (False, True):
        gen = broken(record)
        assert next(gen) == 1
        with pytest.raises(ValueError, match="cut"):
            next(gen)
    assert_settled(client, 1 * CENT)


def test_generator_throw_reaches_the_generator(client):
    handled = []

    @cycles.guard(estimate=cycles.usd(0.05), client=client)
    def resilient():
        try:
            yield 1
        except KeyError as exc:
            handled.append(exc)
        yield 2

    gen = resilient()
    assert next(gen) == 1
    assert gen.throw(KeyError("k")) == 2
    assert len(handled) == 1
    assert client.reservations(status="ACTIVE") != []
    with pytest.raises(ValueError):
        gen.throw(ValueError("unhandled"))
    assert_settled(client, 0)


def test_generator_denied_never_runs(client):
    ran = []

    @cycles.guard(estimate=cycles.usd(11), client=client)
    def gen():
        ran.append(True)
        yield 1

    g = gen()
    with pytest.raises(cycles.BudgetExceeded):
        next(g)
    assert ran == []
    assert_settled(client, 0)


# ---------------------------------------------------------------------------------------------- async generators


@pytest.fixture
def astream(client):
    @cycles.guard(estimate=lambda n, record=True: cycles.usd(0.01 * n), client=client)
    async def astream(n, record=True):
        """Async chunks."""
        for i in range(n):
            if record:
                cycles.current_reservation().record((i + 1) * CENT)
            await asyncio.sleep(0)
            yield i

    return astream


async def test_async_generator_exhausted_commits(client, astream):
    assert inspect.isasyncgenfunction(astream)
    assert astream.__name__ == "astream" and astream.__doc__ == "Async chunks."
    agen = astream(3)
    assert client.reservations() == []
    assert await agen.__anext__() == 0
    assert client.reservations(status="ACTIVE")[0].reserved == cycles.usd(0.03)
    assert cycles.current_reservation() is None
    assert [i async for i in agen] == [1, 2]
    assert_settled(client, 3 * CENT)
    assert [i async for i in astream(2, record=False)] == [0, 1]
    assert_settled(client, 5 * CENT)


@pytest.mark.parametrize(("record", "spent"), [(True, 2 * CENT), (False, 0)])
async def test_async_generator_aclose_settles(client, astream, record, spent):
    agen = astream(5, record=record)
    assert [await agen.__anext__(), await agen.__anext__()] == [0, 1]
    await agen.aclose()
    [detail] = client.reservations()
    assert detail.status == ("COMMITTED" if record else "RELEASED")
    assert_settled(client, spent)


async def test_async_generator_break_in_aclosing_settles(client, astream):
    async with contextlib.aclosing(astream(5)) as agen:
        async for item in agen:
            if item == 1:
                break
    assert_settled(client, 2 * CENT)


async def test_async_generator_break_without_aclosing_is_finalised_and_settles(client, astream):
    async for item in astream(5):
        if item == 2:
            break
    # asyncio's async-generator finaliser schedules aclose() on the loop
    for _ in range(50):
        if not client.reservations(status="ACTIVE"):
            break
        await asyncio.sleep(0)
    assert_settled(client, 3 * CENT)


async def test_async_generator_raising_and_athrow(client):
    @cycles.guard(estimate=cycles.usd(0.05), client=client)
    async def agen(record):
        if record:
            cycles.current_reservation().record(cycles.usd(0.02))
        yield 1
        raise ValueError("cut")

    for record in (False, True):
        g = agen(record)
        assert await g.__anext__() == 1
        with pytest.raises(ValueError):
            await g.__anext__()
    g = agen(False)
    assert await g.__anext__() == 1
    with pytest.raises(KeyError):
        await g.athrow(KeyError("from the consumer"))
    assert_settled(client, 2 * CENT)


async def test_async_generator_consumer_task_cancelled(client, astream):
    inside = asyncio.Event()

    @cycles.guard(estimate=cycles.usd(0.05), client=client)
    async def waits():
        cycles.current_reservation().record(cycles.usd(0.01))
        yield 1
        inside.set()
        await asyncio.Event().wait()
        yield 2

    async def consume():
        return [i async for i in waits()]

    task = asyncio.create_task(consume())
    await inside.wait()
    assert len(client.reservations(status="ACTIVE")) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_settled(client, 1 * CENT)


async def test_async_generator_denied_never_runs(client):
    ran = []

    @cycles.guard(estimate=cycles.usd(11), client=client)
    async def agen():
        ran.append(True)
        yield 1

    with pytest.raises(cycles.BudgetExceeded):
        await agen().__anext__()
    assert ran == []
    assert_settled(client, 0)
