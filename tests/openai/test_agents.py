"""CyclesRunHooks on real OpenAI Agents SDK runs driven by its offline `agents.testing.ScriptedModel`: every model
call reserved before it is made and committed at its priced usage, tools reserved by call id, the tool input
guardrail stopping a run on denial, concurrent runs sharing one hooks object."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

agents = pytest.importorskip("agents", reason="openai-agents is not installed (pip install 'cycles[openai-agents]')")

from agents import (  # noqa: E402
    Agent,
    ModelSettings,
    Runner,
    ToolInputGuardrailTripwireTriggered,
    function_tool,
    set_tracing_disabled,
)
from agents.testing import ModelStep, ScriptedModel, assistant_message  # noqa: E402
from agents.testing import function_call as call_tool  # noqa: E402
from agents.usage import Usage  # noqa: E402
from cycles_openai import guard as cycles_guard  # noqa: E402
from cycles_openai.agents import CyclesRunHooks  # noqa: E402
from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails  # noqa: E402

import cycles  # noqa: E402
from cycles.pricing import Pricing  # noqa: E402

from ..integrations import spent  # noqa: E402

set_tracing_disabled(True)  # offline: no trace export

MODEL = "gpt-4o-mini"
PRICING = Pricing(provider="openai")
TOOL_COST = cycles.usd(0.01)


def usage(inp: int, out: int, cached: int = 0) -> Usage:
    return Usage(
        requests=1,
        input_tokens=inp,
        input_tokens_details=InputTokensDetails(cached_tokens=cached, cache_write_tokens=0),
        output_tokens=out,
        output_tokens_details=OutputTokensDetails(reasoning_tokens=0),
        total_tokens=inp + out,
    )


def cost(u: Usage) -> int:
    return PRICING.cost(MODEL, u).amount


class Searches:
    """A real function tool that counts its runs."""

    def __init__(self) -> None:
        self.runs: list[str] = []

    def tool(self, guardrails: list[Any] | None = None) -> Any:
        def search(query: str) -> str:
            """Search the web."""
            self.runs.append(query)
            return f"results for {query}"

        return function_tool(search, tool_input_guardrails=guardrails)


def script(call_id: str = "call_1") -> tuple[list[ModelStep], list[Usage]]:
    """The model asks for `search` once, then answers."""
    usages = [usage(120, 18, cached=40), usage(180, 9)]
    steps = [
        ModelStep(output=[call_tool("search", {"query": "budgets"}, call_id=call_id)], usage=usages[0]),
        ModelStep(output=[assistant_message("Budgets keep agents honest.")], usage=usages[1]),
    ]
    return steps, usages


def test_run_reserves_models_and_tools_and_commits_priced_usage(funded: cycles.Client) -> None:
    steps, usages = script()
    searches = Searches()
    hooks = CyclesRunHooks(funded, model=MODEL, tool_estimates={"search": TOOL_COST}, agent="bot")
    agent = Agent(name="bot", model=ScriptedModel(steps), tools=[searches.tool()])
    result = asyncio.run(Runner.run(agent, "Tell me about budgets.", hooks=hooks))

    assert result.final_output == "Budgets keep agents honest."
    assert searches.runs == ["budgets"]
    rs = funded.reservations()
    assert {r.status for r in rs} == {"COMMITTED"} and len(rs) == 3
    models = [r for r in rs if r.action.kind == "llm.completion"]
    [tool] = [r for r in rs if r.action.kind == "tool.call"]
    assert sorted(r.committed.amount for r in models) == sorted(cost(u) for u in usages)
    assert tool.scope_path == "tenant:acme/agent:bot/toolset:search" and tool.committed == TOOL_COST
    assert spent(funded, "tenant:acme/agent:bot") == sum(cost(u) for u in usages) + TOOL_COST.amount
    assert hooks.in_flight() == 0


def test_max_tokens_of_the_agent_bounds_the_estimate(funded: cycles.Client) -> None:
    model = ScriptedModel([ModelStep(output=[assistant_message("ok")], usage=usage(10, 1))])
    hooks = CyclesRunHooks(funded, model=MODEL)
    agent = Agent(name="bot", instructions="Be terse.", model=model, model_settings=ModelSettings(max_tokens=30))
    asyncio.run(Runner.run(agent, "hi", hooks=hooks))
    [r] = funded.reservations()
    assert r.reserved == PRICING.estimate(MODEL, prompt=["Be terse.", "hi"], max_output_tokens=30)


def test_denied_model_call_raises_before_the_model_is_called(funded: cycles.Client) -> None:
    funded.budgets.set("tenant:acme/agent:poor", cycles.usd(0.000001))
    steps, _ = script()
    model = ScriptedModel(steps)
    hooks = CyclesRunHooks(funded, model=MODEL, agent="poor")
    with pytest.raises(cycles.BudgetExceeded):
        asyncio.run(Runner.run(Agent(name="poor", model=model), "hi", hooks=hooks))
    assert model.calls == ()
    assert funded.reservations() == []


def test_tool_guardrail_stops_the_run_on_denial(funded: cycles.Client) -> None:
    funded.budgets.set("tenant:acme/agent:bot/toolset:search", cycles.usd(0.001))  # less than one search
    steps, _ = script()
    searches = Searches()
    hooks = CyclesRunHooks(funded, model=MODEL, tool_estimates={"search": TOOL_COST}, agent="bot")
    agent = Agent(name="bot", model=ScriptedModel(steps), tools=[searches.tool([hooks.tool_guardrail()])])
    with pytest.raises(ToolInputGuardrailTripwireTriggered) as raised:
        asyncio.run(Runner.run(agent, "hi", hooks=hooks))
    assert isinstance(raised.value.output.output_info, cycles.BudgetExceeded)
    assert searches.runs == []
    assert funded.reservations(status="ACTIVE") == []
    assert hooks.in_flight() == 0


def test_tool_guardrail_can_tell_the_model_instead(funded: cycles.Client) -> None:
    funded.budgets.set("tenant:acme/agent:bot/toolset:search", cycles.usd(0.001))
    steps, usages = script()
    model = ScriptedModel(steps)
    searches = Searches()
    hooks = CyclesRunHooks(funded, model=MODEL, tool_estimates={"search": TOOL_COST}, agent="bot")
    agent = Agent(name="bot", model=model, tools=[searches.tool([hooks.tool_guardrail(on_denied="message")])])
    result = asyncio.run(Runner.run(agent, "hi", hooks=hooks))
    assert result.final_output == "Budgets keep agents honest." and searches.runs == []
    told = [i for i in model.last_call.input if isinstance(i, dict) and i.get("type") == "function_call_output"]
    assert "Budget exhausted" in told[0]["output"]
    assert spent(funded, "tenant:acme/agent:bot") == sum(cost(u) for u in usages)


def test_tool_excluded_by_caps_is_refused(funded: cycles.Client, set_caps: Callable[..., None]) -> None:
    set_caps(funded, tool_denylist=["search"])
    steps, _ = script()
    searches = Searches()
    hooks = CyclesRunHooks(funded, model=MODEL, tool_estimates={"search": TOOL_COST}, agent="bot")
    agent = Agent(name="bot", model=ScriptedModel(steps), tools=[searches.tool([hooks.tool_guardrail()])])
    with pytest.raises(ToolInputGuardrailTripwireTriggered) as raised:
        asyncio.run(Runner.run(agent, "hi", hooks=hooks))
    assert isinstance(raised.value.output.output_info, cycles.ToolNotAllowed)
    assert searches.runs == []
    assert funded.reservations(status="ACTIVE") == []


def test_concurrent_runs_never_share_state(funded: cycles.Client) -> None:
    hooks = CyclesRunHooks(funded, model=MODEL, tool_estimates={"search": TOOL_COST}, agent="bot")
    searches = Searches()
    tool = searches.tool([hooks.tool_guardrail()])
    billed: list[Usage] = []

    async def one(i: int) -> Any:
        steps, usages = script(call_id="call_1")  # every run's model uses the same call id
        billed.extend(usages)
        agent = Agent(name="bot", model=ScriptedModel(steps), tools=[tool])
        return await Runner.run(agent, f"question {i}", hooks=hooks)

    async def go() -> list[Any]:
        return await asyncio.gather(*(one(i) for i in range(8)))

    assert len(asyncio.run(go())) == 8
    assert len(searches.runs) == 8
    rs = funded.reservations()
    assert len(rs) == 24 and {r.status for r in rs} == {"COMMITTED"}
    assert spent(funded) == sum(cost(u) for u in billed) + 8 * TOOL_COST.amount
    assert hooks.in_flight() == 0


def test_release_open_after_a_model_error(funded: cycles.Client) -> None:
    model = ScriptedModel([ModelStep.raise_error(ConnectionError("provider down"))])
    hooks = CyclesRunHooks(funded, model=MODEL)

    async def go() -> int:
        try:
            await Runner.run(Agent(name="bot", model=model), "hi", hooks=hooks)
        except ConnectionError:
            pass
        return await hooks.release_open()

    assert asyncio.run(go()) == 1
    [r] = funded.reservations()
    assert r.status == "RELEASED" and hooks.in_flight() == 0


def test_a_failed_run_through_the_hooks_settles_its_own_holds_only(funded: cycles.Client) -> None:
    """`hooks.run`: the model call a failure left open (the SDK calls no hook for it) is released as the error
    propagates, while a concurrent run on the same hooks keeps its open tool hold and finishes normally."""
    hooks = CyclesRunHooks(funded, model=MODEL, tool_estimates={"search": TOOL_COST}, agent="bot")
    failed = asyncio.Event()
    steps, usages = script()

    @function_tool
    async def search(query: str) -> str:
        """Search the web."""
        await failed.wait()  # the other run fails while this tool's hold is open
        return f"results for {query}"

    async def failing() -> None:
        model = ScriptedModel([ModelStep.raise_error(ConnectionError("provider down"))])
        with pytest.raises(ConnectionError):
            await hooks.run(Agent(name="bot", model=model), "hi")
        failed.set()

    async def go() -> Any:
        working = asyncio.create_task(hooks.run(Agent(name="bot", model=ScriptedModel(steps), tools=[search]), "q"))
        while not hooks.in_flight():  # the working run holds its tool call
            await asyncio.sleep(0.001)
        await failing()
        return await working

    assert asyncio.run(go()).final_output == "Budgets keep agents honest."
    statuses = sorted(r.status for r in funded.reservations())
    assert statuses == ["COMMITTED", "COMMITTED", "COMMITTED", "RELEASED"]
    assert spent(funded) == sum(cost(u) for u in usages) + TOOL_COST.amount
    assert funded.reservations(status="ACTIVE") == [] and hooks.in_flight() == 0


def test_run_sync_releases_a_failed_model_call(funded: cycles.Client) -> None:
    model = ScriptedModel([ModelStep.raise_error(ConnectionError("provider down"))])
    hooks = CyclesRunHooks(funded, model=MODEL)
    with pytest.raises(ConnectionError):
        hooks.run_sync(Agent(name="bot", model=model), "hi")
    [r] = funded.reservations()
    assert r.status == "RELEASED" and hooks.in_flight() == 0


def test_streamed_runs_are_reserved_too(funded: cycles.Client) -> None:
    steps, usages = script()
    hooks = CyclesRunHooks(funded, model=MODEL, tool_estimates={"search": TOOL_COST}, agent="bot")
    searches = Searches()
    agent = Agent(name="bot", model=ScriptedModel(steps), tools=[searches.tool()])

    async def go() -> Any:
        result = Runner.run_streamed(agent, "Tell me about budgets.", hooks=hooks)
        async for _ in result.stream_events():
            pass
        return result.final_output

    assert asyncio.run(go()) == "Budgets keep agents honest."
    rs = funded.reservations()
    assert len(rs) == 3 and {r.status for r in rs} == {"COMMITTED"}
    assert spent(funded) == sum(cost(u) for u in usages) + TOOL_COST.amount
    assert hooks.in_flight() == 0


def test_a_failed_streamed_run_through_the_hooks_releases_its_model_call(funded: cycles.Client) -> None:
    model = ScriptedModel([ModelStep.raise_error(ConnectionError("provider down"))])
    hooks = CyclesRunHooks(funded, model=MODEL)

    async def go() -> None:
        result = hooks.run_streamed(Agent(name="bot", model=model), "hi")
        with pytest.raises(ConnectionError):
            async for _ in result.stream_events():
                pass

    asyncio.run(go())
    [r] = funded.reservations()
    assert r.status == "RELEASED" and hooks.in_flight() == 0


def test_a_cancelled_streamed_run_releases_its_open_tool_hold(funded: cycles.Client) -> None:
    """`result.cancel()` while a tool runs: the tool's hold is released by the time `stream_events()` ends; the
    model call that asked for the tool stays committed."""
    hooks = CyclesRunHooks(funded, model=MODEL, tool_estimates={"search": TOOL_COST}, agent="bot")
    steps, usages = script()
    started, never = asyncio.Event(), asyncio.Event()

    @function_tool
    async def search(query: str) -> str:
        """Search the web."""
        started.set()  # (its hold is taken before it starts)
        await never.wait()
        return f"results for {query}"

    async def go() -> None:
        result = hooks.run_streamed(Agent(name="bot", model=ScriptedModel(steps), tools=[search]), "q")
        async for _ in result.stream_events():
            await started.wait()
            result.cancel()

    asyncio.run(go())
    statuses = sorted(r.status for r in funded.reservations())
    assert statuses == ["COMMITTED", "RELEASED"]
    assert spent(funded) == cost(usages[0])
    assert funded.reservations(status="ACTIVE") == [] and hooks.in_flight() == 0


def test_a_streamed_run_through_the_hooks_commits_as_usual(funded: cycles.Client) -> None:
    steps, usages = script()
    hooks = CyclesRunHooks(funded, model=MODEL, tool_estimates={"search": TOOL_COST}, agent="bot")
    agent = Agent(name="bot", model=ScriptedModel(steps), tools=[Searches().tool()])

    async def go() -> Any:
        result = hooks.run_streamed(agent, "Tell me about budgets.")
        async for _ in result.stream_events():
            pass
        return result.final_output

    assert asyncio.run(go()) == "Budgets keep agents honest."
    assert {r.status for r in funded.reservations()} == {"COMMITTED"}
    assert spent(funded) == sum(cost(u) for u in usages) + TOOL_COST.amount and hooks.in_flight() == 0


def test_an_agent_on_a_guarded_client_is_reserved_per_request(funded: cycles.Client) -> None:
    """No hooks: the agent's model is an OpenAIResponsesModel on a guarded AsyncOpenAI (over the fake provider)."""
    from agents import OpenAIResponsesModel

    from .fakes import FakeOpenAI

    fake = FakeOpenAI()
    llm = cycles_guard(fake.async_client(), funded, agent="bot")
    agent = Agent(name="bot", model=OpenAIResponsesModel(model=MODEL, openai_client=llm))
    result = asyncio.run(Runner.run(agent, "Tell me about budgets."))
    assert result.final_output == fake.reply
    r = funded.reservations()[0]
    assert r.status == "COMMITTED" and r.scope_path == "tenant:acme/agent:bot"
    [u] = fake.billed
    assert r.committed.amount == PRICING.cost(MODEL, {"input_tokens": u["input"], "output_tokens": u["output"]}).amount


def test_a_model_reporting_no_usage_commits_its_counted_text(funded: cycles.Client) -> None:
    text = "A reply whose provider reported no usage at all."
    model = ScriptedModel([ModelStep(output=[assistant_message(text)])])  # Usage() : nothing reported
    hooks = CyclesRunHooks(funded, model=MODEL)
    asyncio.run(Runner.run(Agent(name="bot", model=model), "hi", hooks=hooks))
    [r] = funded.reservations()
    out = PRICING.count_tokens(text, MODEL)
    assert r.committed.amount == PRICING.estimate(MODEL, prompt=["hi"], max_output_tokens=out).amount
