"""guard_tool and guard_model on their own: the same tool to the model, every execution reserved (sync and async),
idempotent per tool call, settled on every path; guard_model's streams."""

from __future__ import annotations

from typing import Any

import pytest
from cycles_langchain import CyclesCallbackHandler, GuardedTool, guard_model, guard_tool
from langchain_core.messages import ToolMessage
from langchain_core.messages.ai import add_usage
from langchain_core.tools import StructuredTool, Tool, tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, Field

import cycles
from cycles.pricing import default_pricing

from .fakes import MODEL, UsageChatModel

PRICING = default_pricing()
T = cycles.usd(0.001)


@pytest.fixture
def funded(client: cycles.Client) -> cycles.Client:
    client.budgets.set("tenant:acme", cycles.usd(1))
    return client


class WeatherArgs(BaseModel):
    city: str = Field(description="City name")
    days: int = Field(default=1, description="Forecast days")


def weather(city: str, days: int = 1) -> str:
    """Weather forecast for a city."""
    return f"{city}: sunny for {days} days"


async def aweather(city: str, days: int = 1) -> str:
    return f"{city}: sunny for {days} days (async)"


def structured() -> StructuredTool:
    return StructuredTool.from_function(
        func=weather, coroutine=aweather, name="weather", description="Weather forecast.", args_schema=WeatherArgs
    )


@pytest.mark.parametrize(
    "make",
    [
        structured,
        lambda: tool(weather),
        lambda: Tool(name="echo", description="Echo the input.", func=lambda s: s),
    ],
)
def test_guarded_tool_looks_the_same_to_the_model(make: Any) -> None:
    original = make()
    guarded = guard_tool(original, estimate=T)
    assert isinstance(guarded, GuardedTool)
    assert (guarded.name, guarded.description) == (original.name, original.description)
    assert guarded.args == original.args
    assert convert_to_openai_tool(guarded) == convert_to_openai_tool(original)
    assert guarded.tool_call_schema.model_json_schema() == original.tool_call_schema.model_json_schema()  # type: ignore[union-attr]


def test_guarded_tool_reserves_each_run(funded: cycles.Client) -> None:
    guarded = guard_tool(structured(), estimate=T, client=funded, agent="bot")
    assert guarded.invoke({"city": "Oslo", "days": 2}) == "Oslo: sunny for 2 days"
    out = guarded.invoke({"name": "weather", "args": {"city": "Rome"}, "id": "call_1", "type": "tool_call"})
    assert isinstance(out, ToolMessage) and out.tool_call_id == "call_1" and out.content == "Rome: sunny for 1 days"
    reservations = funded.reservations()
    assert [r.status for r in reservations] == ["COMMITTED", "COMMITTED"]
    assert {r.scope_path for r in reservations} == {"tenant:acme/agent:bot/toolset:weather"}
    assert {(r.action.kind, r.action.name) for r in reservations} == {("tool.call", "weather")}
    assert all(r.committed == T for r in reservations)


async def test_guarded_tool_async(funded: cycles.Client) -> None:
    guarded = guard_tool(structured(), estimate=T, client=funded)
    assert await guarded.ainvoke({"city": "Oslo"}) == "Oslo: sunny for 1 days (async)"
    [r] = funded.reservations()
    assert r.status == "COMMITTED" and r.committed == T


def test_tool_call_id_keys_idempotency(funded: cycles.Client) -> None:
    guarded = guard_tool(structured(), estimate=T, client=funded)
    call = {"name": "weather", "args": {"city": "Rome"}, "id": "call_retry", "type": "tool_call"}
    guarded.invoke(call)
    guarded.invoke(call)  # a retried step replays the same tool call: charged once
    [r] = funded.reservations()
    assert r.idempotency_key == "langchain-tool-call_retry"
    balance = next(b for b in funded.balances("tenant:acme") if b.scope == "tenant:acme")
    assert balance.spent == T


def test_estimate_and_actual_callables(funded: cycles.Client) -> None:
    guarded = guard_tool(
        structured(),
        estimate=lambda args: cycles.usd(0.001 * args["days"]),
        actual=lambda output: cycles.usd(0.0001 * len(output)),
        client=funded,
    )
    out = guarded.invoke({"city": "Oslo", "days": 3})
    [r] = funded.reservations()
    assert r.reserved == cycles.usd(0.003)
    assert r.committed == cycles.usd(0.0001 * len(out))


def test_tool_error_releases_and_propagates(funded: cycles.Client) -> None:
    @tool
    def broken(x: str) -> str:
        """Always fails."""
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        guard_tool(broken, estimate=T, client=funded).invoke({"x": "1"})
    [r] = funded.reservations()
    assert r.status == "RELEASED"


def test_denial_raises_or_answers(client: cycles.Client) -> None:
    client.budgets.set("tenant:acme", cycles.usd(0.0001))
    runs: list[str] = []

    @tool
    def costly(x: str) -> str:
        """Costs money."""
        runs.append(x)
        return x

    with pytest.raises(cycles.BudgetExceeded):
        guard_tool(costly, estimate=T, client=client).invoke({"x": "a"})
    polite = guard_tool(costly, estimate=T, client=client, on_denied="message")
    text = polite.invoke({"x": "b"})
    assert isinstance(text, str) and text.startswith("Budget exhausted") and "BUDGET_EXCEEDED" in text
    message = polite.invoke({"name": "costly", "args": {"x": "c"}, "id": "call_9", "type": "tool_call"})
    assert isinstance(message, ToolMessage) and message.status == "error" and message.tool_call_id == "call_9"
    assert runs == [] and client.reservations() == []


def test_model_call_inside_a_guarded_tool_draws_from_its_hold(funded: cycles.Client) -> None:
    model = UsageChatModel()
    handler = CyclesCallbackHandler(funded)

    @tool
    def summarise(text: str) -> str:
        """Summarise with a model."""
        return str(model.invoke(f"summarise {text}", {"callbacks": [handler]}).content)

    guard_tool(summarise, estimate=cycles.usd(0.01), client=funded).invoke({"text": "a b c"})
    [r] = funded.reservations()  # one hold: the model call drew from the tool's
    assert r.action.kind == "tool.call"
    assert r.committed.amount == PRICING.cost(MODEL, model.usages[0]).amount  # the tool committed what it spent
    assert handler.in_flight() == 0


def test_unknown_on_denied_is_rejected() -> None:
    with pytest.raises(ValueError):
        guard_tool(structured(), estimate=T, on_denied="ignore")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- guard_model


def test_guard_model_invoke_commits_priced_usage(funded: cycles.Client) -> None:
    model = UsageChatModel()
    guarded = guard_model(model, client=funded, agent="bot")
    guarded.invoke("hello there")
    guarded.batch(["one", "two", "three"])
    reservations = funded.reservations()
    assert len(reservations) == 4 == model.calls
    assert {r.scope_path for r in reservations} == {"tenant:acme/agent:bot"}
    assert sum(r.committed.amount for r in reservations) == sum(PRICING.cost(MODEL, u).amount for u in model.usages)


async def test_guard_model_ainvoke_and_astream(funded: cycles.Client) -> None:
    model = UsageChatModel()
    guarded = guard_model(model, client=funded)
    await guarded.ainvoke("hello")
    chunks = [c async for c in guarded.astream("hello stream")]
    assert len(chunks) > 2
    reservations = funded.reservations()
    assert {r.status for r in reservations} == {"COMMITTED"}
    assert sum(r.committed.amount for r in reservations) == sum(PRICING.cost(MODEL, u).amount for u in model.usages)


def test_guard_model_stream_abandoned_commits_partial_usage(funded: cycles.Client) -> None:
    model = UsageChatModel()
    stream = guard_model(model, client=funded).stream("a long question " * 4)
    first, second = next(stream), next(stream)
    stream.close()
    [r] = funded.reservations()
    assert r.status == "COMMITTED"
    assert r.committed == PRICING.cost(MODEL, add_usage(first.usage_metadata, second.usage_metadata))


def test_guard_model_denial_stops_the_call(client: cycles.Client) -> None:
    client.budgets.set("tenant:acme", cycles.usd(0.000001))
    model = UsageChatModel()
    with pytest.raises(cycles.BudgetExceeded):
        guard_model(model, client=client).invoke("hi")
    with pytest.raises(cycles.BudgetExceeded):
        list(guard_model(model, client=client).stream("hi"))
    assert model.calls == 0


def test_guard_model_in_a_chain(funded: cycles.Client) -> None:
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate

    model = UsageChatModel()
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | guard_model(model, client=funded) | StrOutputParser()
    assert chain.invoke({"q": "what"}).startswith("word")
    assert "".join(chain.stream({"q": "stream it"})).startswith("word")
    assert len(funded.reservations(status="COMMITTED")) == 2 == model.calls
