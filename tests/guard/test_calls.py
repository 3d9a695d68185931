"""`cycles.calls`: the model-call and tool-call primitive every integration maps its framework's events onto.

Each case runs on a real Client over a SQLite file and reads the ledger back: the estimate held, the priced usage
committed, and nothing left ACTIVE on any path.
"""

from __future__ import annotations

import pytest

import cycles
from cycles.calls import ModelCall, admit_tool, denied_message, tags_subject, tool_call, with_tags
from cycles.pricing import Pricing, TokenUsage

from .helpers import assert_settled, reservations

# $1 and $2 per million input and output tokens: 100 and 200 microcents a token
PRICING = Pricing({"m": (1, 2)})
IN, OUT = 100, 200


def call(client: cycles.Client, **kwargs) -> ModelCall:
    kwargs.setdefault("prompt", "x" * 400)  # 100 tokens at 4 characters a token
    kwargs.setdefault("max_output_tokens", 50)
    return ModelCall(client, "m", pricing=PRICING, **kwargs)


def test_the_estimate_is_the_prompt_plus_the_output_limit_priced(client):
    c = call(client, tools=[{"name": "search"}]).begin()
    tools_tokens = -(-len('\n[{"name": "search"}]') // 4)
    assert c.estimate == cycles.Amount(unit="USD_MICROCENTS", amount=(100 + tools_tokens) * IN + 50 * OUT)
    assert client.balances("tenant:acme")[0].reserved.amount == c.estimate.amount
    c.finish()


def test_known_prompt_tokens_n_completions_and_input_only_calls(client):
    def held(**kwargs) -> int:
        c = call(client, **kwargs).begin()
        c.finish(RuntimeError("not sent"))  # released: nothing produced
        return c.estimate.amount

    assert held(prompt_tokens=10) == 10 * IN + 50 * OUT  # not counted again
    assert held(choices=3) == 100 * IN + 3 * 50 * OUT  # each completion up to the limit
    assert held(choices=2, max_output_tokens=None) == 100 * IN + 2 * 1024 * OUT
    embedding = call(client, kind="llm.embedding", max_output_tokens=0).begin()  # priced as its input alone
    assert embedding.estimate.amount == 100 * IN
    embedding.output(usage=TokenUsage(input_tokens=80))
    embedding.finish()
    assert_settled(client, 80 * IN)  # committed at the reported input tokens; the others released


def test_success_commits_the_priced_usage_with_metrics(client):
    c = call(client).begin()
    c.output("hello", usage={"prompt_tokens": 90, "completion_tokens": 7})
    c.model_version = "m-2026"
    c.finish()
    assert_settled(client, 90 * IN + 7 * OUT)
    (r,) = reservations(client)
    assert r.committed.amount == 90 * IN + 7 * OUT
    assert c.reservation.metrics.tokens_input == 90 and c.reservation.metrics.tokens_output == 7
    assert c.reservation.metrics.model_version == "m-2026"


def test_a_finished_call_is_freed_at_once_not_left_to_the_garbage_collector(client):
    """The reservation knows its call (spans name the model) only weakly: a cycle between the two would make every
    finished call cyclic garbage, and a busy agent's heap a collector's work."""
    import gc
    import weakref

    gc.collect()
    gc.disable()
    try:
        c = call(client).begin()
        assert c.reservation.model_call is c
        c.output("hi", usage={"prompt_tokens": 90, "completion_tokens": 7})
        c.finish()
        freed, reservation_freed = weakref.ref(c), weakref.ref(c.reservation)
        del c
        assert freed() is None and reservation_freed() is None  # by reference counting alone: the collector is off
    finally:
        gc.enable()
    assert_settled(client, 90 * IN + 7 * OUT)


def test_success_without_usage_counts_the_prompt_and_the_output_text(client):
    c = call(client).begin()
    c.output("y" * 40)  # 10 tokens
    c.finish()
    assert_settled(client, 100 * IN + 10 * OUT)


def test_a_failure_after_usage_commits_that_usage(client):
    c = call(client).begin()
    c.output("partial", usage=TokenUsage(input_tokens=100, output_tokens=3))
    c.finish(ConnectionError("stream cut"))
    assert_settled(client, 100 * IN + 3 * OUT)


def test_a_failure_after_output_without_usage_commits_the_estimate(client):
    c = call(client).begin()
    c.output("partial")
    c.finish(GeneratorExit())
    assert_settled(client, 100 * IN + 50 * OUT)


def test_a_failure_before_any_output_releases(client):
    c = call(client).begin()
    c.finish(TimeoutError())
    assert_settled(client, 0)
    assert reservations(client)[0].status == "RELEASED"


def test_an_explicit_actual_wins(client):
    c = call(client).begin()
    c.output("cached", usage={"prompt_tokens": 90, "completion_tokens": 7})
    c.finish(actual=0)
    assert_settled(client, 0)
    assert reservations(client)[0].status == "COMMITTED"


async def test_async_begin_and_finish(client):
    c = await call(client).abegin()
    c.output("ok", usage={"input_tokens": 10, "output_tokens": 2})
    await c.afinish()
    assert_settled(client, 10 * IN + 2 * OUT)


async def test_async_failure_releases(client):
    c = await call(client).abegin()
    await c.afinish(RuntimeError())
    assert_settled(client, 0)


def test_a_denial_raises_at_begin_and_holds_nothing(client):
    client.budgets.set("tenant:acme/agent:poor", cycles.usd(0.000001))
    c = call(client, subject={"agent": "poor"})
    with pytest.raises(cycles.BudgetExceeded) as info:
        c.begin()
    assert info.value.scope == "tenant:acme/agent:poor"
    assert_settled(client, 0)


def test_a_settle_error_after_a_failure_does_not_mask_it(client, caplog):
    c = call(client).begin()
    c.output("partial", usage={"prompt_tokens": 10, "completion_tokens": 1})
    client.budgets.freeze("tenant:acme")  # a frozen budget refuses the commit
    c.finish(ValueError("the call's own error"))  # logged, not raised
    assert "could not settle" in caplog.text


def test_a_settle_error_after_success_raises(client):
    c = call(client).begin()
    client.budgets.freeze("tenant:acme")
    with pytest.raises(cycles.BudgetFrozen):
        c.finish()


def test_inside_a_run_budget_it_draws_in_process(client):
    with cycles.run(limit=cycles.usd(1), client=client) as run:
        c = call(client).begin()
        assert c.reservation.status == "NESTED"
        c.output("ok", usage={"prompt_tokens": 10, "completion_tokens": 1})
        c.finish()
        assert run.spent == 10 * IN + 1 * OUT
    assert_settled(client, {"tenant:acme": 10 * IN + 1 * OUT})


# ------------------------------------------------------------------------------------------------------- caps


@pytest.fixture
def capped(client):
    caps = {"max_tokens": 20, "tool_allowlist": ["search", "lookup"]}
    client.policies.create("tenant:acme/agent:capped", caps=caps)
    client.policies.create("tenant:acme/agent:capped/*", caps=caps)  # its tools' toolset scopes
    return client


def test_caps_lower_the_output_limit(capped):
    c = call(capped, subject={"agent": "capped"}).begin()
    assert c.max_output_tokens == 20 and c.capped
    assert c.allowed([{"n": "search"}, {"n": "shell"}, {"n": None}], lambda t: t["n"]) == [{"n": "search"}, {"n": None}]
    assert not c.allows_tool("shell")
    c.finish()


def test_caps_above_the_request_leave_it_alone(capped):
    c = call(capped, subject={"agent": "capped"}, max_output_tokens=10).begin()
    assert c.max_output_tokens == 10 and not c.capped
    c.finish()


def test_without_caps_everything_passes(client):
    c = call(client, max_output_tokens=None).begin()
    assert c.max_output_tokens is None and not c.capped
    assert c.allowed(["a", "b"], str) == ["a", "b"]
    c.finish()


# ------------------------------------------------------------------------------------------------- tool calls


def test_a_tool_call_reserves_under_its_toolset(client):
    with tool_call(client, "web search!", cycles.usd(0.01)) as r:
        admit_tool(r, "web search!")
    assert_settled(client, cycles.usd(0.01).amount)
    assert reservations(client)[0].scope_path == "tenant:acme/toolset:web_search_"


def test_a_tool_call_keeps_a_given_toolset(client):
    with cycles.scope(toolset="kit"):
        with tool_call(client, "search", cycles.usd(0.01)):
            pass
    assert reservations(client)[0].scope_path == "tenant:acme/toolset:kit"


def test_a_tool_the_caps_exclude_is_refused_and_given_back(capped):
    r = tool_call(capped, "shell", cycles.usd(0.01), subject={"agent": "capped"})
    with pytest.raises(cycles.ToolNotAllowed):
        r.begin()  # a tool.* action is checked when admitted
    r = tool_call(
        capped,
        "shell",
        cycles.usd(0.01),
        subject={"agent": "capped"},
        call_action=cycles.Action(kind="custom", name="x"),
    )
    r.begin()
    with pytest.raises(cycles.ToolNotAllowed):
        admit_tool(r, "shell")
    assert_settled(capped, 0)


def test_denied_message_names_the_tool_and_the_reason(client):
    client.budgets.set("tenant:acme/toolset:search", cycles.usd(0))
    with pytest.raises(cycles.BudgetExceeded) as info:
        tool_call(client, "search", cycles.usd(0.01)).begin()
    text = denied_message("search", info.value)
    assert text.startswith("Budget exhausted: the tool 'search' was not run (BUDGET_EXCEEDED")


# --------------------------------------------------------------------------------------------------- subjects


def test_tags_give_subject_fields():
    tags = {"cycles_scope": "workspace:prod", "cycles_agent": "bot", "cycles_dimensions": {"run": 7}, "other": 1}
    assert tags_subject(tags) == {"workspace": "prod", "agent": "bot", "dimensions": {"run": "7"}}
    assert with_tags({"agent": "a", "app": "x"}, tags) == {
        "agent": "bot",
        "app": "x",
        "workspace": "prod",
        "dimensions": {"run": "7"},
    }
    base = {"agent": "a"}
    assert with_tags(base, {"ls_model_name": "gpt"}) is base  # nothing of ours: no copy
