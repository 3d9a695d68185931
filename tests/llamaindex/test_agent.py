"""A real FunctionAgent and ReActAgent (llama-index-core's AgentWorkflow machinery) around a model that never stops
calling tools:
the budget stops it after exactly the calls it allows, with the denied model call never made, whether the model's
budget or a guarded tool's runs out; guarded tools debit their toolset scope; ALLOW_WITH_CAPS caps are honoured;
inside `cycles.run(limit=...)` the whole run draws from one hold."""

from typing import Any

import pytest
from cycles_llamaindex import CyclesCallbackHandler, ToolNotAllowed, guard_tool
from llama_index.core.agent.workflow import FunctionAgent, ReActAgent
from llama_index.core.callbacks import CallbackManager
from llama_index.core.tools import FunctionTool
from llama_index.core.workflow import Context

import cycles
from cycles.pricing import default_pricing

from ..integrations import spent
from .fakes import MODEL, UsageLLM

# llama-index's workflow runtime inspects pydantic models' deprecated attributes on every step
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:inspect"),
    pytest.mark.filterwarnings("ignore:is_running called from within a step:DeprecationWarning"),  # ReActAgent's own
]

PRICING = default_pricing()
USAGE = {"prompt_tokens": 200, "completion_tokens": 20}
A = PRICING.cost(MODEL, USAGE).amount  # what each model call costs
E = cycles.usd(0.0001)  # the handler's estimate per model call
T = cycles.usd(0.00001)  # a guarded tool's estimate (and, with no actual, its cost)


class Tools:
    """Real FunctionTools that count their executions."""

    def __init__(self) -> None:
        self.runs: dict[str, int] = {"search": 0, "delete_everything": 0}

        def search(query: str) -> str:
            """Search the web."""
            self.runs["search"] += 1
            return f"results for {query}"

        def delete_everything(query: str) -> str:
            """Delete everything matching the query."""
            self.runs["delete_everything"] += 1
            return "deleted"

        self.search = FunctionTool.from_defaults(search)
        self.delete_everything = FunctionTool.from_defaults(delete_everything)


def agent_for(client: cycles.Client, tools: list[Any], **llm: Any) -> tuple[FunctionAgent, UsageLLM, Any]:
    handler = CyclesCallbackHandler(client, estimate=E)
    model = UsageLLM(
        tool_names=llm.pop("tool_names", ["search"]), fixed_usage=USAGE, callback_manager=CallbackManager([handler])
    )
    for key, value in llm.items():
        setattr(model, key, value)
    return FunctionAgent(tools=tools, llm=model), model, handler


async def run_agent(agent: FunctionAgent) -> Any:
    return await agent.run("research forever", max_iterations=100)


def budget_for(calls: int) -> int:
    """An agent budget that admits exactly `calls` model calls (each followed by one guarded tool call): before call
    k the budget has B - (k-1)(A+T) left; call `calls` still finds E, the next one E - 1."""
    return calls * (A + T.amount) + E.amount - 1


@pytest.mark.parametrize("streaming", [True, False], ids=["astream_chat", "achat"])
@pytest.mark.parametrize("calls", [1, 4])
async def test_agent_stops_after_exactly_the_calls_the_budget_allows(
    client: cycles.Client, calls: int, streaming: bool
) -> None:
    client.budgets.set("tenant:acme", cycles.usd(1))
    client.budgets.set("tenant:acme/agent:bot", cycles.Amount(unit="USD_MICROCENTS", amount=budget_for(calls)))
    client.budgets.set("tenant:acme/agent:bot/toolset:search", cycles.usd(1))
    tools = Tools()
    agent, model, handler = agent_for(client, [guard_tool(tools.search, estimate=T, client=client)])
    agent.streaming = streaming

    with cycles.scope(agent="bot"), pytest.raises(cycles.BudgetExceeded) as denied:
        await run_agent(agent)

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


async def test_a_denied_tool_stops_the_agent_at_its_next_model_call(client: cycles.Client) -> None:
    """FunctionAgent turns a tool's exception into text and carries on; on_denied="stop" (the default) makes the
    agent's next model call raise the tool's denial before it is made."""
    client.budgets.set("tenant:acme", cycles.usd(1))
    client.budgets.set("tenant:acme/toolset:search", cycles.Amount(unit="USD_MICROCENTS", amount=3 * T.amount))
    tools = Tools()
    agent, model, handler = agent_for(client, [guard_tool(tools.search, estimate=T, client=client)])

    with pytest.raises(cycles.BudgetExceeded) as denied:
        await run_agent(agent)

    assert denied.value.scope == "tenant:acme/toolset:search"
    assert tools.runs["search"] == 3
    assert model.calls == 4  # the 4th model call asked for the tool that was denied; the 5th was never made
    assert spent(client, "tenant:acme/toolset:search") == 3 * T.amount
    assert spent(client, "tenant:acme") == 4 * A + 3 * T.amount
    assert client.reservations(status="ACTIVE") == [] and handler.in_flight() == 0


async def test_a_denied_tool_answers_with_a_message_and_the_agent_carries_on(client: cycles.Client) -> None:
    client.budgets.set("tenant:acme", cycles.usd(1))
    client.budgets.set("tenant:acme/toolset:search", cycles.Amount(unit="USD_MICROCENTS", amount=T.amount))
    tools = Tools()
    guarded = guard_tool(tools.search, estimate=T, client=client, on_denied="message")
    agent, model, _ = agent_for(client, [guarded], max_tool_calls=3)

    result = await run_agent(agent)

    assert tools.runs["search"] == 1 and model.calls == 4  # 3 tool calls asked for, 1 admitted; then the answer
    assert str(result).startswith("word")
    outputs = [c.tool_output for c in result.tool_calls]
    assert [o.is_error for o in outputs] == [False, True, True]
    assert "Budget exhausted: the tool 'search' was not run" in outputs[1].content
    assert "[cycles stop" not in outputs[1].content


async def test_the_tool_stop_works_without_budget_on_the_model(client: cycles.Client) -> None:
    """The stop comes from the tool's denial itself: the model's own budget has plenty left."""
    client.budgets.set("tenant:acme", cycles.usd(10))
    client.budgets.set("tenant:acme/toolset:search", cycles.Amount(unit="USD_MICROCENTS", amount=0))
    tools = Tools()
    agent, model, _ = agent_for(client, [guard_tool(tools.search, estimate=T, client=client)])
    with pytest.raises(cycles.BudgetExceeded):
        await run_agent(agent)
    assert tools.runs["search"] == 0 and model.calls == 1


async def test_guarded_tool_needing_the_context_still_gets_it(client: cycles.Client) -> None:
    client.budgets.set("tenant:acme", cycles.usd(1))
    seen: list[Any] = []

    async def remember(ctx: Context, query: str) -> str:
        """Remember a query in the agent's context."""
        seen.append(ctx)
        return "remembered"

    guarded = guard_tool(FunctionTool.from_defaults(remember), estimate=T, client=client)
    assert isinstance(guarded, FunctionTool) and guarded.requires_context
    agent, _, _ = agent_for(client, [guarded], tool_names=["remember"], max_tool_calls=1)
    await run_agent(agent)
    assert len(seen) == 1 and isinstance(seen[0], Context)
    [r] = [r for r in client.reservations() if r.action.kind == "tool.call"]
    assert r.scope_path == "tenant:acme/toolset:remember" and r.committed == T


# ------------------------------------------------------------------------------------------------------ caps


async def test_allowlist_caps_stop_the_agent_at_an_excluded_guarded_tool(client: cycles.Client, set_caps: Any) -> None:
    client.budgets.set("tenant:acme", cycles.usd(1))
    set_caps(client, tool_allowlist=["search"])
    tools = Tools()
    guarded = [guard_tool(t, estimate=T, client=client) for t in (tools.search, tools.delete_everything)]
    agent, model, _ = agent_for(client, guarded, tool_names=["search", "delete_everything"])

    with pytest.raises(ToolNotAllowed):
        await run_agent(agent)

    assert tools.runs == {"search": 1, "delete_everything": 0}
    assert model.calls == 2
    # the model was only offered the tools the caps allow
    assert {t["function"]["name"] for kw in model.call_kwargs for t in kw["tools"]} == {"search"}
    assert client.reservations(status="ACTIVE") == []
    statuses = {(r.action.name, r.status) for r in client.reservations() if r.action.kind == "tool.call"}
    assert statuses == {("search", "COMMITTED"), ("delete_everything", "RELEASED")}


async def test_denylist_caps_answer_with_a_message(client: cycles.Client, set_caps: Any) -> None:
    client.budgets.set("tenant:acme", cycles.usd(1))
    set_caps(client, tool_denylist=["delete_everything"])
    tools = Tools()
    guarded = [
        guard_tool(t, estimate=T, client=client, on_denied="message") for t in (tools.search, tools.delete_everything)
    ]
    agent, model, _ = agent_for(client, guarded, tool_names=["search", "delete_everything"], max_tool_calls=2)
    result = await run_agent(agent)
    first, second = result.tool_calls
    assert not first.tool_output.is_error
    assert second.tool_output.is_error and "'delete_everything' was not run" in second.tool_output.content
    assert tools.runs == {"search": 1, "delete_everything": 0}
    assert model.calls == 3 and str(result).startswith("word")


# -------------------------------------------------------------------------------------------- run budgets


async def test_agent_inside_a_run_stops_at_the_run_limit(client: cycles.Client) -> None:
    client.budgets.set("tenant:acme", cycles.usd(1))
    tools = Tools()
    agent, model, handler = agent_for(client, [guard_tool(tools.search, estimate=T, client=client)])
    limit = cycles.Amount(unit="USD_MICROCENTS", amount=budget_for(3))
    async with cycles.run(limit=limit, client=client) as run:
        with pytest.raises(cycles.BudgetExceeded):
            await run_agent(agent)
        assert run.remaining == E.amount - 1
        [held] = client.reservations(status="ACTIVE")  # only the run's hold: every call drew from it
        assert held.action.kind == "agent.run"
    assert model.calls == tools.runs["search"] == 3
    assert run.calls == 6 and run.spent == 3 * (A + T.amount)
    [r] = client.reservations()
    assert r.status == "COMMITTED" and r.committed.amount == 3 * (A + T.amount)
    assert handler.in_flight() == 0


# ------------------------------------------------------------------------------------------------- ReActAgent


def react_agent_for(client: cycles.Client, tools: list[Any], **llm: Any) -> tuple[ReActAgent, UsageLLM, Any]:
    """A ReActAgent (text actions, no function calling) on a model that always asks for `search` in ReAct text."""
    handler = CyclesCallbackHandler(client, estimate=E)
    model = UsageLLM(react_tool="search", fixed_usage=USAGE, callback_manager=CallbackManager([handler]), **llm)
    return ReActAgent(tools=tools, llm=model), model, handler


@pytest.mark.parametrize("streaming", [True, False], ids=["astream_chat", "achat"])
async def test_react_agent_stops_after_exactly_the_calls_the_budget_allows(
    client: cycles.Client, streaming: bool
) -> None:
    calls = 3
    client.budgets.set("tenant:acme", cycles.usd(1))
    client.budgets.set("tenant:acme/agent:bot", cycles.Amount(unit="USD_MICROCENTS", amount=budget_for(calls)))
    client.budgets.set("tenant:acme/agent:bot/toolset:search", cycles.usd(1))
    tools = Tools()
    agent, model, handler = react_agent_for(client, [guard_tool(tools.search, estimate=T, client=client)])
    agent.streaming = streaming

    with cycles.scope(agent="bot"), pytest.raises(cycles.BudgetExceeded) as denied:
        await run_agent(agent)

    assert denied.value.scope == "tenant:acme/agent:bot"
    assert model.calls == calls and tools.runs["search"] == calls  # the denied call never reached the provider
    assert spent(client, "tenant:acme/agent:bot") == calls * (A + T.amount)
    assert spent(client, "tenant:acme/agent:bot/toolset:search") == calls * T.amount
    assert {r.status for r in client.reservations()} == {"COMMITTED"} and handler.in_flight() == 0


async def test_react_agent_stops_at_its_next_model_call_when_a_guarded_tool_is_denied(client: cycles.Client) -> None:
    """ReActAgent, too, turns a tool's exception into an observation and carries on: the stop comes at its next
    model call, before that call is made."""
    client.budgets.set("tenant:acme", cycles.usd(1))
    client.budgets.set("tenant:acme/toolset:search", cycles.Amount(unit="USD_MICROCENTS", amount=2 * T.amount))
    tools = Tools()
    agent, model, handler = react_agent_for(client, [guard_tool(tools.search, estimate=T, client=client)])
    agent.streaming = False

    with pytest.raises(cycles.BudgetExceeded) as denied:
        await run_agent(agent)

    assert denied.value.scope == "tenant:acme/toolset:search"
    assert tools.runs["search"] == 2 and model.calls == 3  # the third action was denied; no fourth model call
    assert spent(client, "tenant:acme") == 3 * A + 2 * T.amount
    assert client.reservations(status="ACTIVE") == [] and handler.in_flight() == 0


async def test_react_agent_answers_when_the_budget_suffices(client: cycles.Client) -> None:
    client.budgets.set("tenant:acme", cycles.usd(1))
    tools = Tools()
    agent, model, handler = react_agent_for(
        client, [guard_tool(tools.search, estimate=T, client=client)], max_tool_calls=2
    )
    result = await run_agent(agent)
    assert str(result).endswith("word word") and tools.runs["search"] == 2 and model.calls == 3
    assert spent(client, "tenant:acme") == 3 * A + 2 * T.amount and handler.in_flight() == 0
