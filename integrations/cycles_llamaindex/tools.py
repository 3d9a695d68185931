"""`guard_tool`: a LlamaIndex tool that reserves around every execution.

    search = guard_tool(search, estimate=cycles.usd(0.01))                 # same metadata and schema
    search = guard_tool(search, estimate=lambda args: ..., actual=lambda output: ...)
    search = guard_tool(search, estimate=cycles.usd(0.01), on_denied="message")     # tell the model, carry on

Each run (`call` / `acall` / `__call__`, sync and async) reserves `estimate` (an Amount, or a callable of the tool
input: the keyword arguments the agent calls it with) under the toolset scope named after the tool unless a toolset
is given. Success commits `actual` (an Amount, or a callable of the ToolOutput), default the estimate; an exception
releases the hold and propagates. While the tool runs its reservation is the current one: guarded calls inside it
(an LLM with a `CyclesCallbackHandler`, another guarded tool) draw from its hold.

A `FunctionTool` stays a `FunctionTool` (so an agent still passes it its `Context`); any other `BaseTool` is wrapped
in a `GuardedTool` with the same metadata.

A denial (`cycles.BudgetExceeded`, ..., or `ToolNotAllowed` when ALLOW_WITH_CAPS caps exclude the tool) depends on
`on_denied`:
- "stop" (default): FunctionAgent / AgentWorkflow turn every tool exception into text and carry on, so the tool
  answers with an error ToolOutput saying the budget is exhausted, marked so that the `CyclesCallbackHandler` of the
  agent's LLM raises that very denial at the next step's model call, before it is made: the agent run stops with
  the denial (`await handler` raises it). Without a handler on the agent's LLM this is "message";
- "message": the same error ToolOutput, and the model carries on without the tool;
- "raise": the denial raises out of the tool (for callers that run tools themselves).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from llama_index.core.instrumentation.dispatcher import active_instrument_tags
from llama_index.core.tools import AsyncBaseTool, BaseTool, FunctionTool, ToolMetadata, ToolOutput
from llama_index.core.tools.types import adapt_to_async_tool

from cycles import Action, Amount, BudgetDenied, Client, Reservation, default_client
from cycles.calls import admit_tool, denied_message, handler_subject, tool_call, with_tags

from ._common import stop_text

__all__ = ["GuardedFunctionTool", "GuardedTool", "guard_tool"]

OnDenied = Literal["stop", "message", "raise"]


class _Guard:
    """What a guarded tool reserves, and how it answers a denial."""

    __slots__ = ("name", "estimate", "actual", "client", "on_denied", "subject", "action")

    def __init__(
        self,
        name: str,
        estimate: Amount | Callable[[Any], Amount],
        actual: Amount | Callable[..., Amount] | None,
        client: Client | None,
        on_denied: OnDenied,
        subject: dict[str, Any],
        action: Action,
    ) -> None:
        self.name, self.estimate, self.actual, self.client = name, estimate, actual, client
        self.on_denied, self.subject, self.action = on_denied, subject, action

    def reservation(self) -> Reservation:
        return tool_call(
            self.client or default_client(),
            self.name,
            self.estimate,
            actual=self.actual,
            subject=with_tags(self.subject, active_instrument_tags.get()),
            call_action=self.action,
        )

    def denied(self, exc: BudgetDenied, tool_input: Any) -> ToolOutput:
        if self.on_denied == "raise":
            raise exc
        text = denied_message(self.name, exc)
        if self.on_denied == "stop":
            text += stop_text(exc)
        raw_input = tool_input if isinstance(tool_input, dict) else {"input": tool_input}
        return ToolOutput(
            content=text, tool_name=self.name, raw_input=raw_input, raw_output=text, is_error=True, exception=exc
        )

    def run(self, fn: Callable[[], ToolOutput], tool_input: Any) -> ToolOutput:
        reservation = self.reservation()
        try:
            reservation.begin(tool_input)
            admit_tool(reservation, self.name)
        except BudgetDenied as exc:
            return self.denied(exc, tool_input)
        try:
            with reservation.entered():
                output = fn()
        except BaseException as exc:
            reservation.finish(exc)
            raise
        reservation.finish(None, output)
        return output

    async def arun(self, fn: Callable[[], Any], tool_input: Any) -> ToolOutput:
        reservation = self.reservation()
        try:
            await reservation.abegin(tool_input)
            admit_tool(reservation, self.name)
        except BudgetDenied as exc:
            return self.denied(exc, tool_input)
        try:
            with reservation.entered():
                output = await fn()
        except BaseException as exc:
            await reservation.afinish(exc)
            raise
        await reservation.afinish(None, output)
        return output


def _tool_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """What the estimate callable gets: the keyword arguments (an agent's call), else the one positional input."""
    if kwargs or not args:
        return kwargs
    return args[0] if len(args) == 1 else args


class GuardedTool(AsyncBaseTool):
    """Any BaseTool behind a reservation per run, with the wrapped tool's metadata (see `guard_tool`)."""

    def __init__(self, tool: BaseTool, guard: _Guard) -> None:
        self.tool = tool
        self._async = adapt_to_async_tool(tool)
        self._guard = guard

    @property
    def metadata(self) -> ToolMetadata:
        return self.tool.metadata

    def call(self, *args: Any, **kwargs: Any) -> ToolOutput:
        return self._guard.run(lambda: self._async.call(*args, **kwargs), _tool_input(args, kwargs))

    async def acall(self, *args: Any, **kwargs: Any) -> ToolOutput:
        return await self._guard.arun(lambda: self._async.acall(*args, **kwargs), _tool_input(args, kwargs))


class GuardedFunctionTool(FunctionTool):
    """A FunctionTool (same function, metadata, context parameter and callbacks) behind a reservation per run."""

    _guard: _Guard

    def __init__(self, tool: FunctionTool, guard: _Guard) -> None:  # a copy of the tool's state, not a rebuild
        self.__dict__.update(tool.__dict__)
        self._guard = guard

    def call(self, *args: Any, **kwargs: Any) -> ToolOutput:
        return self._guard.run(lambda: FunctionTool.call(self, *args, **kwargs), _tool_input(args, kwargs))

    async def acall(self, *args: Any, **kwargs: Any) -> ToolOutput:
        return await self._guard.arun(lambda: FunctionTool.acall(self, *args, **kwargs), _tool_input(args, kwargs))


def guard_tool(
    tool: BaseTool,
    estimate: Amount | Callable[[Any], Amount],
    actual: Amount | Callable[..., Amount] | None = None,
    client: Client | None = None,
    on_denied: OnDenied = "stop",
    *,
    action: Action | tuple[str, str] | None = None,
    scope: str | None = None,
    **subject: Any,
) -> GuardedTool | GuardedFunctionTool:
    """Wrap a LlamaIndex tool so every execution is reserved, committed and settled (see the module docstring).

    Args:
        tool: a `FunctionTool` or any `BaseTool` (query engine tools, tool specs' tools, your own).
        estimate: an Amount, or `estimate(tool_input) -> Amount` (`tool_input`: the call's keyword arguments).
        actual: an Amount, or `actual(tool_output) -> Amount`; default the estimate.
        client: the `cycles.Client` (default: `cycles.default_client()` at call time).
        on_denied: "stop" (default), "message" or "raise" (see the module docstring).
        action: the reservation's action (default `("tool.call", tool name)`).
        scope, **subject: subject levels and dimensions; `toolset` defaults to the tool's name.
    """
    if on_denied not in ("stop", "message", "raise"):
        raise ValueError('on_denied must be "stop", "message" or "raise"')
    name = tool.metadata.get_name()
    if isinstance(action, tuple):
        action = Action(kind=action[0], name=action[1])
    guard = _Guard(
        name, estimate, actual, client, on_denied, handler_subject(scope, subject),
        action or Action(kind="tool.call", name=name[:256]),
    )  # fmt: skip
    if isinstance(tool, FunctionTool):
        return GuardedFunctionTool(tool, guard)
    return GuardedTool(tool, guard)
