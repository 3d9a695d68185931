"""Ambient subject: `cycles.scope(...)` nesting and merging, visibility across asyncio tasks and threads, and how
client defaults < ambient scope < explicit arguments make a reservation's subject."""

from __future__ import annotations

import asyncio
import threading

import pytest

import cycles

from .helpers import CENT, assert_settled


def test_nested_scopes_merge_inner_wins_and_restore():
    assert cycles.current_scope() == {}
    with cycles.scope(workflow="refund", agent="planner") as outer:
        assert outer == {"workflow": "refund", "agent": "planner"}
        with cycles.scope(agent="executor", toolset="web"):
            assert cycles.current_scope() == {"workflow": "refund", "agent": "executor", "toolset": "web"}
        assert cycles.current_scope() == {"workflow": "refund", "agent": "planner"}
    assert cycles.current_scope() == {}


def test_scope_string_and_dimensions_merge():
    with cycles.scope("tenant:acme/agent:bot", dimensions={"user": "u1", "env": "dev"}):
        assert cycles.current_scope() == {"tenant": "acme", "agent": "bot", "dimensions": {"user": "u1", "env": "dev"}}
        with cycles.scope("workflow:wf", agent="other", dimensions={"env": "prod"}):
            assert cycles.current_scope() == {
                "tenant": "acme",
                "workflow": "wf",
                "agent": "other",
                "dimensions": {"user": "u1", "env": "prod"},
            }


def test_scope_restored_after_an_exception():
    with pytest.raises(ValueError):
        with cycles.scope(agent="a"):
            raise ValueError
    assert cycles.current_scope() == {}


def test_bad_scopes_are_refused():
    with pytest.raises(cycles.InvalidRequest):
        with cycles.scope("agent:bot/tenant:acme"):  # out of canonical order
            pass
    with pytest.raises(cycles.InvalidRequest):
        with cycles.scope("planet:earth"):
            pass
    with pytest.raises(TypeError):
        with cycles.scope(planet="earth"):
            pass
    assert cycles.current_scope() == {}


def test_current_scope_is_a_copy():
    with cycles.scope(agent="a"):
        cycles.current_scope()["agent"] = "mutated"
        assert cycles.current_scope() == {"agent": "a"}


async def test_scope_visible_in_gathered_tasks_and_not_leaking_back():
    async def child(i: int) -> dict:
        await asyncio.sleep(0)
        with cycles.scope(toolset=f"t{i}"):
            await asyncio.sleep(0)
            return cycles.current_scope()

    with cycles.scope(agent="bot"):
        results = await asyncio.gather(*(child(i) for i in range(5)))
        assert cycles.current_scope() == {"agent": "bot"}
    assert results == [{"agent": "bot", "toolset": f"t{i}"} for i in range(5)]


def test_scope_invisible_in_a_bare_thread_visible_through_wrap():
    seen: dict = {}

    def look(key: str) -> None:
        seen[key] = cycles.current_scope()

    with cycles.scope(agent="bot"):
        bare = threading.Thread(target=look, args=("bare",))
        wrapped_fn = cycles.wrap(look)
        wrapped = threading.Thread(target=wrapped_fn, args=("wrapped",))
        bare.start(), wrapped.start()
        bare.join(), wrapped.join()
    # wrap captured the context when it was called: it still carries the scope after the block
    again = threading.Thread(target=wrapped_fn, args=("later",))
    again.start()
    again.join()
    assert seen == {"bare": {}, "wrapped": {"agent": "bot"}, "later": {"agent": "bot"}}
    assert wrapped_fn.__name__ == "look"


# --------------------------------------------------------------------------------------------- reservation subject


@pytest.fixture
def tree(client):
    client.budgets.set("tenant:acme/workflow:wf", cycles.usd(5))
    client.budgets.set("tenant:acme/workflow:wf/agent:a", cycles.usd(1))
    client.budgets.set("tenant:acme/workflow:wf/agent:b", cycles.usd(1))
    return client


def test_reservation_subject_reflects_the_merge(tree):
    with cycles.scope(workflow="wf", agent="a", dimensions={"user": "u1"}):
        with cycles.scope(agent="b"):
            with tree.reserve(cycles.usd(0.05)) as r:
                assert r.subject == {"tenant": "acme", "workflow": "wf", "agent": "b", "dimensions": {"user": "u1"}}
    [detail] = tree.reservations()
    assert detail.subject.agent == "b" and detail.subject.dimensions == {"user": "u1"}
    assert detail.scope_path == "tenant:acme/workflow:wf/agent:b"
    assert detail.affected_scopes == ["tenant:acme", "tenant:acme/workflow:wf", "tenant:acme/workflow:wf/agent:b"]
    assert_settled(
        tree,
        {"tenant:acme": 5 * CENT, "tenant:acme/workflow:wf": 5 * CENT, "tenant:acme/workflow:wf/agent:b": 5 * CENT},
    )


async def test_explicit_arguments_override_ambient(tree):
    with cycles.scope(workflow="wf", agent="a"):
        async with tree.reserve(cycles.usd(0.01), agent="b") as r1:
            assert r1.subject["agent"] == "b"
        async with tree.reserve(cycles.usd(0.02), scope="workflow:wf/agent:b") as r2:
            assert r2.subject == {"tenant": "acme", "workflow": "wf", "agent": "b"}

        @cycles.guard(estimate=cycles.usd(0.04), client=tree, agent="b")
        async def guarded():
            return cycles.current_reservation().subject

        assert (await guarded())["agent"] == "b"
        async with tree.reserve(cycles.usd(0.08)) as r3:
            assert r3.subject["agent"] == "a"
    assert_settled(
        tree,
        {
            "tenant:acme": 15 * CENT,
            "tenant:acme/workflow:wf": 15 * CENT,
            "tenant:acme/workflow:wf/agent:a": 8 * CENT,
            "tenant:acme/workflow:wf/agent:b": 7 * CENT,
        },
    )


def test_client_defaults_are_under_the_ambient_scope(tree, store_url):
    c = cycles.Client(store=store_url, tenant="acme", workflow="wf", agent="a")
    try:
        with c.reserve(cycles.usd(0.01)) as r1:
            assert r1.subject == {"tenant": "acme", "workflow": "wf", "agent": "a"}
        with cycles.scope(agent="b"):
            with c.reserve(cycles.usd(0.02)) as r2:
                assert r2.subject == {"tenant": "acme", "workflow": "wf", "agent": "b"}
    finally:
        c.close()
    assert_settled(
        tree,
        {
            "tenant:acme": 3 * CENT,
            "tenant:acme/workflow:wf": 3 * CENT,
            "tenant:acme/workflow:wf/agent:a": 1 * CENT,
            "tenant:acme/workflow:wf/agent:b": 2 * CENT,
        },
    )


def test_scope_carried_into_a_thread_reaches_the_ledger(tree):
    def work():
        with tree.reserve(cycles.usd(0.03)) as r:
            return r.subject

    out: dict = {}
    with cycles.scope(workflow="wf", agent="a"):
        t1 = threading.Thread(target=lambda: out.setdefault("bare", work()))
        t2 = threading.Thread(target=cycles.wrap(lambda: out.setdefault("wrapped", work())))
        t1.start(), t2.start()
        t1.join(), t2.join()
    assert out == {"bare": {"tenant": "acme"}, "wrapped": {"tenant": "acme", "workflow": "wf", "agent": "a"}}
    assert_settled(
        tree,
        {"tenant:acme": 6 * CENT, "tenant:acme/workflow:wf": 3 * CENT, "tenant:acme/workflow:wf/agent:a": 3 * CENT},
    )


def test_repeated_subjects_stay_exact_and_bad_ones_are_still_refused(tree):
    """Validated subjects are reused from call to call: each call still gets its own, and a bad value is refused
    every time, also right after a good one."""
    for agent in ("a", "b", "a"):
        with tree.reserve(cycles.usd(0.01), workflow="wf", agent=agent):
            pass
    assert [r.subject.agent for r in reversed(tree.reservations())] == ["a", "b", "a"]
    for _ in range(2):
        with pytest.raises(cycles.InvalidRequest, match="subject.agent"):
            with tree.reserve(cycles.usd(0.01), workflow="wf", agent="not a scope value"):
                pass
    assert_settled(
        tree,
        {
            "tenant:acme": 3 * CENT,
            "tenant:acme/workflow:wf": 3 * CENT,
            "tenant:acme/workflow:wf/agent:a": 2 * CENT,
            "tenant:acme/workflow:wf/agent:b": CENT,
        },
    )


def test_a_bad_subject_or_amount_is_an_invalid_request_on_every_call(tree):
    """Not pydantic's ValidationError: the library's own typed error, naming the field, and nothing held."""
    bad = {"workflow": "wf", "agent": "not a scope value"}
    calls = [
        lambda: tree.reserve(cycles.usd(0.01), **bad).__enter__(),
        lambda: tree.decide(cycles.usd(0.01), **bad),
        lambda: tree.event(cycles.usd(0.01), **bad),
        lambda: tree.reserve(cycles.usd(0.01), agent="x" * 129).__enter__(),
    ]
    for call in calls:
        with pytest.raises(cycles.InvalidRequest) as refused:
            call()
        assert refused.value.details["errors"][0]["field"] == "subject.agent"
    with pytest.raises(cycles.InvalidRequest):
        with cycles.run(limit=cycles.usd(1), client=tree, **bad):
            pass
    for amount in (
        lambda: cycles.usd(-1),
        lambda: cycles.tokens(2**63),
        lambda: tree.reserve({"unit": "TOKENS", "amount": -5}).__enter__(),
    ):
        with pytest.raises(cycles.InvalidRequest) as refused:
            amount()
        assert refused.value.details["errors"][0]["field"] == "amount"
    assert tree.reservations() == []
