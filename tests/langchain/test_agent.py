"""A tool-calling agent loop written with langchain-core primitives (bind_tools, invoke, run the tool calls, append
ToolMessages) around a model that never answers: the budget stops it after exactly the calls it allows, with the
model call denied before it is made; guarded tools debit their toolset scope; ALLOW_WITH_CAPS caps are honoured."""

from __future__ import annotations

from typing import Any

import pytest
from cycles_langchain import CyclesCallbackHandler, ToolNotAllowed, guard_model, guard_tool
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import BaseTool, tool

import cycles
from cycles.pricing import default_pricing

from ..integrations import spent
from .fakes import MODEL, ToolCallingChatModel, UsageChatModel

PRICING = default_pricing()
USAGE = {"input_tokens": 200, "output_tokens": 20, "total_tokens": 220}
A = PRICING.cost(MODEL, USAGE).amount  # what each model call costs
E = cycles.usd(0.0001)  # the handler's estimate per model call
T = cycles.usd(0.00001)  # a guarded tool's estimate (and, with no actual, its cost)


def agent_loop(
    model: Any, tools: list[BaseTool], question: str, config: dict[str, Any], max_steps: int = 100
) -> list[BaseMessage]:
    by_name = {t.name: t for t in tools}
    bound = model.bind_tools(tools)
    messages: list[BaseMessage] = [HumanMessage(question)]
    for _ in range(max_steps):
        ai = bound.invoke(messages, config)
        messages.append(ai)
        if not ai.tool_calls:
            break
        for call in ai.tool_calls:
            messages.append(by_name[call["name"]].invoke(call, config))
    return messages


async def aagent_loop(
    model: Any, tools: list[BaseTool], question: str, config: dict[str, Any], max_steps: int = 100
) -> list[BaseMessage]:
    by_name = {t.name: t for t in tools}
    bound = model.bind_tools(tools)
    messages: list[BaseMessage] = [HumanMessage(question)]
    for _ in range(max_steps):
        ai = await bound.ainvoke(messages, config)
        messages.append(ai)
        if not ai.tool_calls:
            break
        for call in ai.tool_calls:
            messages.append(await by_name[call["name"]].ainvoke(call, config))
    return messages


class Tools:
    """Real @tool functions that count their executions."""

    def __init__(self) -> None:
        self.runs: dict[str, int] = {"search": 0, "delete_everything": 0}

        @tool
        def search(query: str) -> str:
            """Search the web."""
            self.runs["search"] += 1
            return f"results for {query}"

        @tool
        def delete_everything(query: str) -> str:
            """Delete everything matching the query."""
            self.runs["delete_everything"] += 1
            return "deleted"

        self.search, self.delete_everything = search, delete_everything


def budget_for(calls: int) -> int:
    """An agent budget that admits exactly `calls` model calls (each followed by one guarded tool call): before call
    k the budget has B - (k-1)(A+T) left; call `calls` still finds E, the next one E - 1."""
    return calls * (A + T.amount) + E.amount - 1


@pytest.mark.parametrize("calls", [1, 4])
def test_agent_loop_stops_after_exactly_the_calls_the_budget_allows(client: cycles.Client, calls: int) -> None:
    client.budgets.set("tenant:acme", cycles.usd(1))
    client.budgets.set("tenant:acme/agent:bot", cycles.Amount(unit="USD_MICROCENTS", amount=budget_for(calls)))
    client.budgets.set("tenant:acme/agent:bot/toolset:search", cycles.usd(1))
    model = ToolCallingChatModel(fixed_usage=USAGE)
    tools = Tools()
    guarded = [guard_tool(tools.search, estimate=T, client=client)]
    handler = CyclesCallbackHandler(client, estimate=E)

    with cycles.scope(agent="bot"), pytest.raises(cycles.BudgetExceeded) as denied:
        agent_loop(model, guarded, "research forever", {"callbacks": [handler]})

    assert denied.value.scope == "tenant:acme/agent:bot"
    assert denied.value.remaining == E.amount - 1
    assert model.calls == calls  # the denied call never reached the provider
    assert tools.runs["search"] == calls
    assert spent(client, "tenant:acme/agent:bot") == calls * (A + T.amount)
    assert spent(client, "tenant:acme/agent:bot/toolset:search") == calls * T.amount
    reservations = client.reservations()
    assert sorted(r.action.kind for r in reservations) == ["llm.completion"] * calls + ["tool.call"] * calls
    assert {r.status for r in reservations} == {"COMMITTED"}
    assert {r.scope_path for r in reservations if r.action.kind == "tool.call"} == {
        "tenant:acme/agent:bot/toolset:search"
    }
    assert handler.in_flight() == 0


async def test_async_agent_loop_stops_after_exactly_the_calls_the_budget_allows(client: cycles.Client) -> None:
    client.budgets.set("tenant:acme", cycles.usd(1))
    client.budgets.set("tenant:acme/agent:bot", cycles.Amount(unit="USD_MICROCENTS", amount=budget_for(3)))
    model = ToolCallingChatModel(fixed_usage=USAGE)
    tools = Tools()
    handler = CyclesCallbackHandler(client, estimate=E, agent="bot")
    guarded = [guard_tool(tools.search, estimate=T, client=client, agent="bot")]
    with pytest.raises(cycles.BudgetExceeded):
        await aagent_loop(model, guarded, "research forever", {"callbacks": [handler]})
    assert model.calls == tools.runs["search"] == 3
    assert spent(client, "tenant:acme/agent:bot") == 3 * (A + T.amount)
    assert client.reservations(status="ACTIVE") == []


def test_agent_loop_inside_a_run_draws_from_the_run(client: cycles.Client) -> None:
    client.budgets.set("tenant:acme", cycles.usd(1))
    model = ToolCallingChatModel(fixed_usage=USAGE)
    tools = Tools()
    handler = CyclesCallbackHandler(client, estimate=E)
    guarded = [guard_tool(tools.search, estimate=T, client=client)]
    limit = cycles.Amount(unit="USD_MICROCENTS", amount=budget_for(5))
    with cycles.run(limit=limit, client=client, agent="bot") as run:
        with pytest.raises(cycles.BudgetExceeded):
            agent_loop(model, guarded, "research forever", {"callbacks": [handler]})
        [held] = client.reservations(status="ACTIVE")  # nothing but the run's own hold went to the authority
        assert held.action.kind == "agent.run"
    assert model.calls == tools.runs["search"] == 5
    assert run.calls == 10 and run.spent == 5 * (A + T.amount)
    [r] = client.reservations()
    assert r.status == "COMMITTED" and r.committed.amount == run.spent
    assert spent(client, "tenant:acme") == run.spent


def test_handler_reserves_tools_in_their_toolset(client: cycles.Client) -> None:
    client.budgets.set("tenant:acme", cycles.usd(1))
    client.budgets.set("tenant:acme/agent:bot/toolset:search", cycles.usd(1))
    model = ToolCallingChatModel(fixed_usage=USAGE)
    tools = Tools()
    handler = CyclesCallbackHandler(client, agent="bot", tool_estimates={"search": T})
    agent_loop(model, [tools.search], "go", {"callbacks": [handler]}, max_steps=3)
    tool_reservations = [r for r in client.reservations() if r.action.kind == "tool.call"]
    assert len(tool_reservations) == 3 == tools.runs["search"]
    assert {r.scope_path for r in tool_reservations} == {"tenant:acme/agent:bot/toolset:search"}
    assert sorted(r.idempotency_key for r in tool_reservations) == [f"langchain-tool-call_{n:04d}" for n in range(3)]
    assert spent(client, "tenant:acme/agent:bot/toolset:search") == 3 * T.amount
    assert handler.in_flight() == 0


def test_handler_does_not_reserve_twice_for_a_guarded_tool(client: cycles.Client) -> None:
    client.budgets.set("tenant:acme", cycles.usd(1))
    model = ToolCallingChatModel(fixed_usage=USAGE)
    tools = Tools()
    handler = CyclesCallbackHandler(client, default_tool_estimate=cycles.usd(0.5))
    agent_loop(
        model, [guard_tool(tools.search, estimate=T, client=client)], "go", {"callbacks": [handler]}, max_steps=2
    )
    assert sorted(r.action.kind for r in client.reservations()) == ["llm.completion"] * 2 + ["tool.call"] * 2
    assert spent(client, "tenant:acme") == 2 * (A + T.amount)


def test_handler_tool_denial_stops_the_tool(client: cycles.Client) -> None:
    client.budgets.set("tenant:acme", cycles.usd(1))
    client.budgets.set("tenant:acme/toolset:search", cycles.usd(0.000001))
    tools = Tools()
    handler = CyclesCallbackHandler(client, tool_estimates={"search": T})
    with pytest.raises(cycles.BudgetExceeded):
        tools.search.invoke({"query": "x"}, {"callbacks": [handler]})
    assert tools.runs["search"] == 0


# --------------------------------------------------------------------------------------------------- caps


@pytest.mark.parametrize(
    "caps", [{"tool_allowlist": ["search"]}, {"tool_denylist": ["delete_everything"]}], ids=["allowlist", "denylist"]
)
def test_caps_exclude_a_guarded_tool_and_stop_the_agent(
    client: cycles.Client, caps: dict[str, Any], set_caps: Any
) -> None:
    client.budgets.set("tenant:acme", cycles.usd(1))
    set_caps(client, **caps)
    model = ToolCallingChatModel(fixed_usage=USAGE, tool_names=["search", "delete_everything"])
    tools = Tools()
    guarded = [guard_tool(t, estimate=T, client=client) for t in (tools.search, tools.delete_everything)]
    with pytest.raises(ToolNotAllowed) as denied:
        agent_loop(model, guarded, "clean up", {"callbacks": [CyclesCallbackHandler(client)]})
    assert isinstance(denied.value, cycles.BudgetDenied)
    assert tools.runs == {"search": 1, "delete_everything": 0}
    statuses = {(r.action.kind, r.action.name, r.status) for r in client.reservations()}
    assert ("tool.call", "delete_everything", "RELEASED") in statuses
    assert ("tool.call", "search", "COMMITTED") in statuses
    assert client.reservations(status="ACTIVE") == []


def test_caps_denied_tool_answers_with_a_message(client: cycles.Client, set_caps: Any) -> None:
    client.budgets.set("tenant:acme", cycles.usd(1))
    set_caps(client, tool_allowlist=["search"])
    model = ToolCallingChatModel(fixed_usage=USAGE, tool_names=["search", "delete_everything"])
    tools = Tools()
    guarded = [
        guard_tool(t, estimate=T, client=client, on_denied="message") for t in (tools.search, tools.delete_everything)
    ]
    messages = agent_loop(model, guarded, "clean up", {"callbacks": [CyclesCallbackHandler(client)]}, max_steps=4)
    results = [m for m in messages if isinstance(m, ToolMessage)]
    assert [m.status for m in results] == ["success", "error", "success", "error"]
    assert "TOOL_NOT_ALLOWED" in str(results[1].content)
    assert results[1].tool_call_id == "call_0001" and results[1].name == "delete_everything"
    assert tools.runs == {"search": 2, "delete_everything": 0}


def test_caps_exclude_a_tool_reserved_by_the_handler(client: cycles.Client, set_caps: Any) -> None:
    client.budgets.set("tenant:acme", cycles.usd(1))
    set_caps(client, tool_denylist=["delete_everything"])
    tools = Tools()
    handler = CyclesCallbackHandler(client, default_tool_estimate=T)
    tools.search.invoke({"query": "fine"}, {"callbacks": [handler]})
    with pytest.raises(ToolNotAllowed):
        tools.delete_everything.invoke({"query": "x"}, {"callbacks": [handler]})
    assert tools.runs == {"search": 1, "delete_everything": 0}
    assert client.reservations(status="ACTIVE") == []


def test_caps_of_a_run_apply_to_the_tools_drawn_from_it(client: cycles.Client, set_caps: Any) -> None:
    client.budgets.set("tenant:acme", cycles.usd(1))
    set_caps(client, tool_allowlist=["search"])
    tools = Tools()
    guarded = guard_tool(tools.delete_everything, estimate=T, client=client)
    with cycles.run(limit=cycles.usd(0.01), client=client):
        with pytest.raises(ToolNotAllowed):
            guarded.invoke({"query": "x"})
    assert tools.runs["delete_everything"] == 0


def test_guard_model_applies_max_tokens_caps(client: cycles.Client, set_caps: Any) -> None:
    client.budgets.set("tenant:acme", cycles.usd(1))
    set_caps(client, max_tokens=50)
    model = UsageChatModel()
    guarded = guard_model(model, client=client)
    handler = CyclesCallbackHandler(client)
    out = guarded.invoke("hello", {"callbacks": [handler]})
    guarded.bind(max_tokens=20).invoke("hello")  # already under the cap: left alone
    guard_model(model.bind(max_tokens=500), client=client).invoke("hello")  # over it: clamped
    assert [kw.get("max_tokens") for kw in model.call_kwargs] == [50, 20, 50]
    assert isinstance(out, AIMessage)
    # with the handler on the same run, its reservation drew from guard_model's: one hold per call
    reservations = client.reservations()
    assert len(reservations) == 3 and {r.status for r in reservations} == {"COMMITTED"}
    assert sum(r.committed.amount for r in reservations) == sum(PRICING.cost(MODEL, u).amount for u in model.usages)
    assert handler.in_flight() == 0


def test_guard_model_inside_a_run_draws_from_it_and_applies_the_runs_caps(client: cycles.Client, set_caps: Any) -> None:
    client.budgets.set("tenant:acme", cycles.usd(1))
    set_caps(client, max_tokens=30)
    model = UsageChatModel()
    with cycles.run(limit=cycles.usd(0.01), client=client) as run:
        guard_model(model, client=client).invoke("hello")
    assert model.call_kwargs[0].get("max_tokens") == 30
    assert run.calls == 1 and run.spent == PRICING.cost(MODEL, model.usages[0]).amount
    [r] = client.reservations()  # only the run's hold went to the authority
    assert r.action.kind == "agent.run" and r.committed.amount == run.spent
