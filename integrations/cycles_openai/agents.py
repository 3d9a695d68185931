"""cycles for the OpenAI Agents SDK: `CyclesRunHooks` reserves every model and tool call of a run.

    from agents import Agent, Runner, function_tool
    from cycles_openai.agents import CyclesRunHooks

    hooks = CyclesRunHooks(agent="researcher", tool_estimates={"search": cycles.usd(0.01)})
    search = function_tool(search_fn, tool_input_guardrails=[hooks.tool_guardrail()])
    result = await hooks.run(Agent(name="researcher", tools=[search]), "...")   # Runner.run(..., hooks=hooks)

- `on_llm_start` reserves the call's worst case (instructions and input items counted, plus the agent's
  `model_settings.max_tokens`, else `Pricing.default_max_output_tokens`), priced for the agent's model name (or
  `model=` when the agent's model object names none); a denial raises out of `Runner.run` before the model is called;
- `on_llm_end` commits the priced `response.usage` (cached input and reasoning tokens included);
- tools with an estimate (`tool_estimates` / `default_tool_estimate`) are reserved under the toolset scope named
  after the tool, keyed by the tool call id (`on_tool_start`), and committed at their `actual` (default the estimate)
  on `on_tool_end`; a tool the ALLOW_WITH_CAPS caps exclude raises `ToolNotAllowed`;
- `tool_guardrail()` reserves a tool call in the SDK's tool input guardrail instead, before `on_tool_start`: a denial
  stops the run with `ToolInputGuardrailTripwireTriggered` (or, with `on_denied="message"`, tells the model the tool
  was not run and lets the run go on);
- every call is keyed by its own run's context and the agent (tools: the tool context and call id), so one hooks
  object serves concurrent runs;
- the SDK calls no hook for a model call that raises, so run through the hooks (`await hooks.run(agent, input)`,
  `hooks.run_sync(...)` or `hooks.run_streamed(...)`, which are `Runner.run...(..., hooks=hooks)`): when the run
  raises or is cancelled, the holds it left open are released before the error propagates (a streamed run's before
  `stream_events()` ends), and other runs' holds are left alone. Runs started with `Runner.run(...,
  hooks=hooks)` directly can call `release_open()` (every run's open holds), or leave them to their TTL.

Use these hooks *or* a guarded `AsyncOpenAI` client for the agent's model, not both (they would reserve one call
twice): the hooks work for any model the SDK drives; only the client can apply ALLOW_WITH_CAPS `max_tokens` and tool
caps to the request itself (a hook runs after the SDK built it; tool caps are still enforced when a tool starts).
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable, Mapping
from typing import Any, Literal

from agents import RunHooks, ToolGuardrailFunctionOutput, ToolInputGuardrail, ToolInputGuardrailData

from cycles import Amount, Client, Reservation, default_client
from cycles.calls import ModelCall, admit_tool, denied_message, handler_subject, tool_call
from cycles.errors import BudgetDenied
from cycles.pricing import Pricing

from ._requests import answer_text
from .client import openai_pricing

__all__ = ["CyclesRunHooks"]

ToolEstimate = Amount | Callable[[Any], Amount]

# The holds the current `CyclesRunHooks.run` opened (hooks run in the run's task, or in tasks copied from it)
_opened: contextvars.ContextVar[list[ModelCall | Reservation] | None] = contextvars.ContextVar(
    "cycles_agents_run", default=None
)


def _model_name(agent: Any, fallback: str | None) -> str:
    model = getattr(agent, "model", None)
    if isinstance(model, str) and model:
        return model
    name = getattr(model, "model", None)  # OpenAIResponsesModel, OpenAIChatCompletionsModel
    if isinstance(name, str) and name:
        return name
    if fallback:
        return fallback
    from agents.models import get_default_model

    return get_default_model()


class CyclesRunHooks(RunHooks[Any]):
    """Reserve before every model (and, with an estimate, tool) call of an Agents SDK run (module docstring).

    Args:
        client: the `cycles.Client` (default: `cycles.default_client()` at call time).
        model: the model name to price calls with when the agent's model object names none.
        pricing, estimate, unit: as for `cycles_openai.Settings`.
        tool_estimates: `{tool_name: Amount or callable(arguments_json) -> Amount}`; tools not listed use
            `default_tool_estimate`; with neither, tool calls are not reserved.
        tool_actuals: `{tool_name: Amount or callable(result) -> Amount}` (default: the estimate).
        scope, **subject: subject levels and dimensions, or a scope string.
    """

    def __init__(
        self,
        client: Client | None = None,
        *,
        model: str | None = None,
        pricing: Pricing | None = None,
        estimate: Amount | Any = None,
        unit: str = "USD_MICROCENTS",
        tool_estimates: Mapping[str, ToolEstimate] | None = None,
        default_tool_estimate: ToolEstimate | None = None,
        tool_actuals: Mapping[str, ToolEstimate] | None = None,
        scope: str | None = None,
        **subject: Any,
    ) -> None:
        self._client = client
        self.model = model
        self.pricing = pricing or openai_pricing()
        self.estimate = estimate
        self.unit = unit
        self.tool_estimates = dict(tool_estimates or {})
        self.default_tool_estimate = default_tool_estimate
        self.tool_actuals = dict(tool_actuals or {})
        self.subject = handler_subject(scope, subject)
        self._llm: dict[tuple[int, int], ModelCall] = {}
        self._tools: dict[tuple[int, str], Reservation] = {}
        self._lock = threading.Lock()

    @property
    def client(self) -> Client:
        return self._client or default_client()

    def in_flight(self) -> int:
        """Model and tool calls reserved and not yet settled."""
        return len(self._llm) + len(self._tools)

    # ------------------------------------------------------------------------------------------------ models
    async def on_llm_start(self, context: Any, agent: Any, system_prompt: str | None, input_items: Any) -> None:
        settings = getattr(agent, "model_settings", None)
        max_tokens = getattr(settings, "max_tokens", None)
        call = ModelCall(
            self.client,
            _model_name(agent, self.model),
            prompt=[p for p in (system_prompt, input_items) if p],
            max_output_tokens=max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else None,
            estimate=self.estimate,
            pricing=self.pricing,
            unit=self.unit,
            subject=self.subject,
        )
        await call.abegin()  # a denial raises out of Runner.run, before the model is called
        with self._lock:
            self._llm[(id(context), id(agent))] = call
        if (opened := _opened.get()) is not None:
            opened.append(call)

    async def on_llm_end(self, context: Any, agent: Any, response: Any) -> None:
        with self._lock:
            call = self._llm.pop((id(context), id(agent)), None)
        if call is None:
            return
        usage = getattr(response, "usage", None)
        if usage is not None and not getattr(usage, "total_tokens", 1):
            usage = None  # a model that reports no usage: its output text is counted instead
        call.output("" if usage else answer_text(response), usage)
        await call.afinish()

    # ------------------------------------------------------------------------------------------------- tools
    def _tool_estimate(self, name: str) -> ToolEstimate | None:
        return self.tool_estimates.get(name, self.default_tool_estimate)

    def _tool_reservation(self, context: Any, name: str) -> Reservation | None:
        estimate = self._tool_estimate(name)
        if estimate is None:
            return None
        return tool_call(self.client, name, estimate, actual=self.tool_actuals.get(name), subject=self.subject)

    async def _hold_tool(self, context: Any, name: str) -> None:
        key = (id(context), getattr(context, "tool_call_id", ""))
        if key in self._tools:  # the tool guardrail already holds it
            return
        reservation = self._tool_reservation(context, name)
        if reservation is None:
            return
        await reservation.abegin(getattr(context, "tool_arguments", None))
        admit_tool(reservation, name)
        with self._lock:
            self._tools[key] = reservation
        if (opened := _opened.get()) is not None:
            opened.append(reservation)

    async def on_tool_start(self, context: Any, agent: Any, tool: Any) -> None:
        await self._hold_tool(context, tool.name)

    async def on_tool_end(self, context: Any, agent: Any, tool: Any, result: Any) -> None:
        with self._lock:
            reservation = self._tools.pop((id(context), getattr(context, "tool_call_id", "")), None)
        if reservation is not None:
            await reservation.afinish(None, result)

    def tool_guardrail(self, on_denied: Literal["raise", "message"] = "raise") -> ToolInputGuardrail[Any]:
        """A tool input guardrail reserving the tool call before it starts: on denial the run stops
        (`ToolInputGuardrailTripwireTriggered`, the denial as `output_info`), or with `on_denied="message"` the
        model is told the tool was not run. Settled by these hooks' `on_tool_end` (pass them to the run)."""
        if on_denied not in ("raise", "message"):
            raise ValueError('on_denied must be "raise" or "message"')

        async def cycles_budget(data: ToolInputGuardrailData) -> ToolGuardrailFunctionOutput:
            name = data.context.tool_name
            try:
                await self._hold_tool(data.context, name)
            except BudgetDenied as exc:
                if on_denied == "message":
                    return ToolGuardrailFunctionOutput.reject_content(denied_message(name, exc), output_info=exc)
                return ToolGuardrailFunctionOutput.raise_exception(output_info=exc)
            return ToolGuardrailFunctionOutput.allow()

        return ToolInputGuardrail(guardrail_function=cycles_budget, name="cycles_budget")

    # -------------------------------------------------------------------------------------------------- runs
    async def run(self, starting_agent: Any, input: Any, **kwargs: Any) -> Any:
        """`Runner.run(starting_agent, input, hooks=self, **kwargs)`; if the run raises (a model call failed, a
        guardrail tripped, the task was cancelled), the holds this run left open are settled before the error
        propagates: a model call that produced nothing is released, a tool hold too."""
        from agents import Runner

        opened: list[ModelCall | Reservation] = []
        token = _opened.set(opened)
        try:
            return await Runner.run(starting_agent, input, hooks=self, **kwargs)
        except BaseException as exc:
            await self._settle(opened, exc)
            raise
        finally:
            _opened.reset(token)

    def run_sync(self, starting_agent: Any, input: Any, **kwargs: Any) -> Any:
        """`run` from synchronous code (as `Runner.run_sync`: not inside a running event loop)."""
        return asyncio.run(self.run(starting_agent, input, **kwargs))

    def run_streamed(self, starting_agent: Any, input: Any, **kwargs: Any) -> Any:
        """`Runner.run_streamed(starting_agent, input, hooks=self, **kwargs)` (call it inside a running event loop);
        if the run fails or is cancelled (`result.cancel()`, the consumer stops), the holds this run left open are
        settled before `stream_events()` ends or raises. The run's task is wrapped the way the SDK wraps it for its
        own cleanups: `stream_events()` waits for the wrapper, and cancelling the wrapper cancels the run."""
        from agents import Runner

        opened: list[ModelCall | Reservation] = []
        token = _opened.set(opened)  # the run's task copies this context when it is created
        try:
            result = Runner.run_streamed(starting_agent, input, hooks=self, **kwargs)
        finally:
            _opened.reset(token)
        run = result.run_loop_task
        if run is None:  # pragma: no cover - every SDK version we support starts one
            return result

        async def settled() -> Any:
            try:
                return await run
            except BaseException as exc:
                if not run.done():  # this wrapper was cancelled: so is the run
                    run.cancel()
                    await asyncio.wait((run,))
                await self._settle(opened, exc)
                raise

        wrapper = asyncio.get_running_loop().create_task(settled())
        wrapper.add_done_callback(lambda w: run.cancel() if w.cancelled() and not run.done() else None)
        result.run_loop_task = wrapper
        return result

    async def _settle(self, opened: list[ModelCall | Reservation], error: BaseException) -> None:
        """Settle the holds among `opened` that no end hook took (by identity: other runs' holds are never
        touched)."""
        mine = {id(hold) for hold in opened}
        await self._release(lambda hold: id(hold) in mine, error, f"run failed: {type(error).__name__}")

    async def release_open(self, reason: str = "run ended") -> int:
        """Release every hold still open, of every run (a model call that raised never reaches on_llm_end); how
        many. With concurrent runs on these hooks prefer `run()`, which settles only its own run's holds."""
        return await self._release(lambda _hold: True, RuntimeError(reason), reason)

    async def _release(self, chosen: Callable[[Any], bool], error: BaseException, reason: str) -> int:
        """Take the open holds `chosen` picks out of these hooks (no end hook settles them twice), then settle
        them: a model call as a failure (released unless it produced output), a tool hold released."""
        with self._lock:
            calls = [(k, c) for k, c in self._llm.items() if chosen(c)]
            tools = [(k, r) for k, r in self._tools.items() if chosen(r)]
            for key, _ in calls:
                del self._llm[key]
            for key, _ in tools:
                del self._tools[key]
        for _, call in calls:
            await call.afinish(error)
        for _, reservation in tools:
            if reservation.active:
                await reservation.arelease(reason=reason)
        return len(calls) + len(tools)
