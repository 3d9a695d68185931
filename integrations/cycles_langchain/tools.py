"""`guard_tool`: a LangChain tool that reserves around every execution.

    search = guard_tool(search, estimate=cycles.usd(0.01))              # same name, description and args schema
    search = guard_tool(search, estimate=lambda args: cycles.usd(0.001) * ..., actual=lambda out: ...)
    search = guard_tool(search, estimate=cycles.usd(0.01), on_denied="message")   # tell the model, don't stop

Each run (`invoke` / `ainvoke` / `run` / `arun`, sync and async) reserves `estimate` (an Amount, or a callable of the
tool input) under the toolset scope named after the tool unless a toolset is given, keyed by the tool call id when
the tool is called with one (a retried tool call replays, it is not charged twice). Success commits `actual` (an
Amount, or a callable of the tool's output: a ToolMessage when called with a tool call, else its content), default
the estimate; an exception releases the hold and propagates.

A denial raises (`cycles.BudgetExceeded`, ... or `ToolNotAllowed` when ALLOW_WITH_CAPS caps exclude the tool), which
stops an agent; with `on_denied="message"` the tool is not run and answers with a ToolMessage (status "error")
saying the budget is exhausted, so the model can carry on without it.

While the tool runs its reservation is the current one: model calls and guarded calls inside it draw from its hold
(cycles' nested-guard rule), and a `CyclesCallbackHandler` on the same run does not reserve for it again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from langchain_core.messages import ToolMessage
from langchain_core.tools import BaseTool, Tool
from pydantic import PrivateAttr

from cycles import Action, Amount, BudgetDenied, Client, Reservation, default_client
from cycles.calls import admit_tool, denied_message, handler_subject, tool_call, with_tags

from ._common import guarded_tool

__all__ = ["GuardedSimpleTool", "GuardedTool", "guard_tool"]

OnDenied = Literal["raise", "message"]


class GuardedTool(BaseTool):
    """A proxy for `tool` with the same name, description and schema; every run is reserved (see `guard_tool`)."""

    tool: BaseTool

    _estimate: Amount | Callable[[Any], Amount] = PrivateAttr()
    _actual: Amount | Callable[..., Amount] | None = PrivateAttr(default=None)
    _client: Client | None = PrivateAttr(default=None)
    _on_denied: OnDenied = PrivateAttr(default="raise")
    _subject: dict[str, Any] = PrivateAttr(default_factory=dict)
    _action: Action = PrivateAttr()

    # ------------------------------------------------------------------------------- the wrapped tool's schema
    @property
    def args(self) -> dict[str, Any]:
        return self.tool.args

    @property
    def tool_call_schema(self) -> Any:
        return self.tool.tool_call_schema

    @property
    def is_single_input(self) -> bool:
        return self.tool.is_single_input

    def get_input_schema(self, config: Any = None) -> Any:
        return self.tool.get_input_schema(config)

    def get_output_schema(self, config: Any = None) -> Any:
        return self.tool.get_output_schema(config)

    def _run(self, *args: Any, **kwargs: Any) -> Any:  # never reached: run() delegates to the wrapped tool
        return self.tool._run(*args, **kwargs)

    # ------------------------------------------------------------------------------------------------ guard
    @property
    def client(self) -> Client:
        return self._client or default_client()

    def _reservation(self, tool_call_id: str | None, metadata: dict[str, Any] | None) -> Reservation:
        return tool_call(
            self.client,
            self.name,
            self._estimate,
            actual=self._actual,
            subject=with_tags(self._subject, metadata),
            call_action=self._action,
            idempotency_key=f"langchain-tool-{tool_call_id}" if tool_call_id else None,
        )

    def _denied(self, exc: BudgetDenied, tool_call_id: str | None) -> Any:
        if self._on_denied != "message":
            raise exc
        text = denied_message(self.name, exc)
        if tool_call_id:
            return ToolMessage(content=text, tool_call_id=tool_call_id, name=self.name, status="error")
        return text

    def run(self, tool_input: Any, *args: Any, **kwargs: Any) -> Any:
        tool_call_id = kwargs.get("tool_call_id")
        reservation = self._reservation(tool_call_id, kwargs.get("metadata"))
        try:
            reservation.begin(tool_input)
            admit_tool(reservation, self.name)
        except BudgetDenied as exc:
            return self._denied(exc, tool_call_id)
        token = guarded_tool.set([self.tool.name, False])
        try:
            with reservation.entered():
                output = self.tool.run(tool_input, *args, **kwargs)
        except BaseException as exc:
            reservation.finish(exc)
            raise
        finally:
            guarded_tool.reset(token)
        reservation.finish(None, output)
        return output

    async def arun(self, tool_input: Any, *args: Any, **kwargs: Any) -> Any:
        tool_call_id = kwargs.get("tool_call_id")
        reservation = self._reservation(tool_call_id, kwargs.get("metadata"))
        try:
            await reservation.abegin(tool_input)
            admit_tool(reservation, self.name)
        except BudgetDenied as exc:
            return self._denied(exc, tool_call_id)
        token = guarded_tool.set([self.tool.name, False])
        try:
            with reservation.entered():
                output = await self.tool.arun(tool_input, *args, **kwargs)
        except BaseException as exc:
            await reservation.afinish(exc)
            raise
        finally:
            guarded_tool.reset(token)
        await reservation.afinish(None, output)
        return output


class GuardedSimpleTool(GuardedTool, Tool):
    """A guarded single-input `Tool` (LangChain formats those for the model by type: this keeps that format)."""


def guard_tool(
    tool: BaseTool,
    estimate: Amount | Callable[[Any], Amount],
    actual: Amount | Callable[..., Amount] | None = None,
    client: Client | None = None,
    on_denied: OnDenied = "raise",
    *,
    action: Action | tuple[str, str] | None = None,
    scope: str | None = None,
    **subject: Any,
) -> GuardedTool:
    """Wrap a LangChain tool so every execution is reserved, committed and settled (see the module docstring).

    Args:
        tool: any `BaseTool` (`@tool` functions, `StructuredTool`, `Tool`, subclasses).
        estimate: an Amount, or `estimate(tool_input) -> Amount`.
        actual: an Amount, or `actual(output) -> Amount`; default the estimate.
        client: the `cycles.Client` (default: `cycles.default_client()` at call time).
        on_denied: "raise" (default: the denial stops the agent) or "message" (answer with a ToolMessage instead).
        action: the reservation's action (default `("tool.call", tool.name)`).
        scope, **subject: subject levels and dimensions; `toolset` defaults to the tool's name.
    """
    if on_denied not in ("raise", "message"):
        raise ValueError('on_denied must be "raise" or "message"')
    fields: dict[str, Any] = {}
    cls: type[GuardedTool] = GuardedTool
    if isinstance(tool, Tool):
        cls, fields = GuardedSimpleTool, {"func": tool.func, "coroutine": tool.coroutine}
    guarded = cls(
        tool=tool,
        name=tool.name,
        description=tool.description,
        args_schema=tool.args_schema,
        return_direct=tool.return_direct,
        response_format=tool.response_format,
        extras=tool.extras,
        **fields,
    )
    guarded._estimate = estimate
    guarded._actual = actual
    guarded._client = client
    guarded._on_denied = on_denied
    guarded._subject = handler_subject(scope, subject)
    if isinstance(action, tuple):
        action = Action(kind=action[0], name=action[1])
    guarded._action = action or Action(kind="tool.call", name=tool.name[:256])
    return guarded
