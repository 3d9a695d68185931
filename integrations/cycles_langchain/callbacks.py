"""`CyclesCallbackHandler`: every chat model, LLM and tool call of a LangChain run, reserved before it is made.

    handler = CyclesCallbackHandler(agent="bot")
    chain.invoke(x, config={"callbacks": [handler]})

Before each model call (`on_chat_model_start` / `on_llm_start`) the handler reserves the call's worst case: the
prompt's tokens plus the request's max output tokens (else `Pricing.default_max_output_tokens`), priced by
`cycles.pricing`, or the `estimate=` you give. A denial raises (`cycles.BudgetExceeded`, ...) out of
`invoke` / `batch` / `stream` / `ainvoke` / `abatch` / `astream` before the provider is called. On end the priced
`usage_metadata` (else `llm_output["token_usage"]`) is committed with tokens and model version as metrics; an error
releases the hold; a stream closed early commits the usage LangChain passes with it, else the estimate when tokens
were already produced (the provider may bill for them), else releases.

Why a *sync* handler with `run_inline=True` and `raise_error=True`: LangChain swallows the errors of async handlers
under sync `invoke` (langchain_core.callbacks.manager._run_coros), and runs non-inline sync handlers in an executor
under `ainvoke`. A sync inline handler is the one shape whose denial stops the call on every path. Under the async
paths it calls the budget authority from the event loop thread: free on the embedded store (its async transport
is synchronous anyway), one blocking round trip over HTTP.

The subject of a call, most specific last: the client's defaults, the ambient `cycles.scope(...)`, the handler's
keyword arguments, the run's config metadata (`cycles_<level>` keys such as `{"cycles_agent": "bot"}`,
`cycles_scope="workspace:prod/agent:bot"`, `cycles_dimensions={...}`). Inside `cycles.run(limit=...)` (or a guarded
tool, or any enclosing guard of the same client and unit) calls draw from that hold in process instead.

Tools: with `tool_estimates={"search": cycles.usd(0.01)}` and/or `default_tool_estimate=`, tool runs are reserved
too (`on_tool_start`), under the toolset scope named after the tool unless a toolset is given, keyed by the tool
call id; a tool excluded by ALLOW_WITH_CAPS caps raises `ToolNotAllowed`. Tools wrapped by `guard_tool` are
skipped here (they hold their own reservation).

Caps: a callback cannot change a request that is already built, so `max_tokens` caps cannot be applied from here;
`caps_for(run_id)` exposes them and a warning is logged when a call asks for more. Use `guard_model(model)` where
caps must be applied: it reserves first and binds `max_tokens` from the caps.

LangChain behaviours worth knowing (langchain-core 1.7):
- every exception a callback raises is logged as a warning by `langchain_core.callbacks.manager` ("Error in
  CyclesCallbackHandler.on_chat_model_start callback: BudgetExceeded(...)") before it propagates;
- an LLM-cache hit is marked `usage_metadata["total_cost"] = 0`: it commits nothing;
- closing a `chain.stream(...)` early makes LangChain drain the steps upstream (for tracing), so the model's stream
  runs to its end and its full usage is committed; a model's own `stream()` closed early commits the partial usage;
- `aclose()` on a `chain.astream(...)` does not close the steps' async generators: the model's stream is closed
  (and its hold settled, with the partial usage) when Python finalises them (garbage collection, or the event loop
  shutting down), not at once;
- a legacy LLM's `batch` is one `generate()`: when one prompt is denied, the holds of the prompts started before it
  are released (LangChain never ends them).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler

from cycles import Amount, Caps, Client, Reservation, default_client
from cycles.calls import ModelCall, action, admit_tool, handler_subject, tool_call, with_tags
from cycles.pricing import Pricing, default_pricing

from ._common import cache_hit, consume_guarded, log, max_output_tokens, model_name, result_text, result_usage

__all__ = ["CyclesCallbackHandler"]

EstimateFn = Callable[[str, Any, "int | None"], Amount]
ToolEstimate = Amount | Callable[[Any], Amount]

MAX_OPEN_GROUPS = 256


class _Group:
    """The calls of one multi-prompt `generate` (legacy LLM `batch`): LangChain starts them one by one, and when one
    is denied the others never end, so their holds go back at once."""

    __slots__ = ("params", "size", "seen", "run_ids", "failed")

    def __init__(self, params: Any, size: int) -> None:
        self.params = params
        self.size = size
        self.seen = 0
        self.run_ids: list[UUID] = []
        self.failed: BaseException | None = None


class CyclesCallbackHandler(BaseCallbackHandler):
    """Reserve before every model and tool call of a LangChain run; commit priced usage; settle every path.

    Args:
        client: the `cycles.Client` (default: `cycles.default_client()` at call time).
        pricing: a `cycles.pricing.Pricing` (default: the shared catalog pricing).
        estimate: a fixed `Amount` per model call, or `estimate(model, prompt, max_output_tokens) -> Amount`
            (`prompt` is the call's messages, or its text for a legacy LLM); default: priced from the request.
        tool_estimates: `{tool_name: Amount or callable(tool_input) -> Amount}`; tools not listed use
            `default_tool_estimate`; with neither, tool calls are not reserved by the handler.
        unit: the unit model calls are priced in (USD_MICROCENTS, or TOKENS which needs no price).
        scope, **subject: subject levels (`tenant`, `workspace`, `app`, `workflow`, `agent`, `toolset`) and
            `dimensions`, or a scope string.
    """

    raise_error = True  # a denial propagates to the caller...
    run_inline = True  # ...and under ainvoke runs in the caller's task and context, before the call is made

    llm_action_kind = "llm.completion"
    tool_action_kind = "tool.call"

    def __init__(
        self,
        client: Client | None = None,
        *,
        pricing: Pricing | None = None,
        estimate: Amount | EstimateFn | None = None,
        tool_estimates: Mapping[str, ToolEstimate] | None = None,
        default_tool_estimate: ToolEstimate | None = None,
        unit: str = "USD_MICROCENTS",
        scope: str | None = None,
        **subject: Any,
    ) -> None:
        self._client = client
        self.pricing = pricing or default_pricing()
        self.estimate = estimate
        self.tool_estimates = dict(tool_estimates or {})
        self.default_tool_estimate = default_tool_estimate
        self.unit = unit
        self.subject = handler_subject(scope, subject)
        self._llm: dict[UUID, ModelCall] = {}
        self._tools: dict[UUID, Reservation] = {}
        self._groups: dict[int, _Group] = {}
        self._lock = threading.Lock()

    # LangChain asks these before every event: skip chain, retriever, retry and custom events entirely (tool events
    # are gated by `ignore_agent`, so that one stays False). Plain attributes: a property costs a call per event.
    ignore_chain = True
    ignore_retriever = True
    ignore_retry = True
    ignore_custom_event = True
    ignore_llm = False
    ignore_chat_model = False
    ignore_agent = False

    @property
    def client(self) -> Client:
        return self._client or default_client()

    def caps_for(self, run_id: UUID) -> Caps | None:
        """The ALLOW_WITH_CAPS caps of an in-flight model call (pass `run_id` in the call's config to know it)."""
        call = self._llm.get(run_id)
        return call.reservation.caps if call is not None else None

    def in_flight(self) -> int:
        """Model and tool calls reserved and not yet settled (0 once every run has ended)."""
        return len(self._llm) + len(self._tools)

    # ------------------------------------------------------------------------------------------------ models
    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[Any]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._start_llm(run_id, messages[0] if messages else [], metadata, kwargs)

    def on_llm_start(
        self,
        serialized: dict[str, Any],
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._start_llm(run_id, prompts[0] if prompts else "", metadata, kwargs)

    def _start_llm(self, run_id: UUID, prompt: Any, metadata: dict[str, Any] | None, kwargs: dict[str, Any]) -> None:
        params = kwargs.get("invocation_params")
        batch_size = kwargs.get("batch_size") or 1
        group = self._join_group(params, batch_size) if batch_size > 1 else None
        try:
            call = ModelCall(
                self.client,
                model_name(metadata, params),
                prompt=prompt,
                tools=params.get("tools") if params else None,
                max_output_tokens=max_output_tokens(params, metadata),
                estimate=self.estimate,
                pricing=self.pricing,
                unit=self.unit,
                subject=with_tags(self.subject, metadata),
                kind=self.llm_action_kind,
                idempotency_key=f"langchain-{run_id}",
            ).begin()
        except BaseException as exc:
            if group is not None:
                self._fail_group(group, exc)
            raise
        self._llm[run_id] = call
        if group is not None:
            group.run_ids.append(run_id)
        if call.capped:
            log.warning(
                "cycles: the budget authority caps %s at max_tokens=%d but the request asks for %s; a callback cannot "
                "change the request: use cycles_langchain.guard_model(model) to apply caps",
                call.model,
                call.max_output_tokens,
                call.requested_max_tokens or "the model default",
            )

    def on_llm_new_token(self, token: Any, *, chunk: Any = None, run_id: UUID, **kwargs: Any) -> None:
        call = self._llm.get(run_id)
        if call is not None:
            call.produced = True

    @staticmethod
    def _read(call: ModelCall, response: Any) -> None:
        """What the result says was used: its usage and model version, else its text (counted when settling)."""
        call.usage, call.model_version = result_usage(response)
        if not call.usage and (text := result_text(response)):
            call.output(text)

    def on_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:
        call = self._llm.pop(run_id, None)
        if call is None:
            return
        self._read(call, response)
        call.finish(actual=0 if cache_hit(response) else None)  # a cache hit spent nothing

    def on_llm_error(self, error: BaseException, *, run_id: UUID, response: Any = None, **kwargs: Any) -> None:
        call = self._llm.pop(run_id, None)
        if call is not None:
            self._read(call, response)  # a stream cut short: the usage reported, else the tokens produced
            call.finish(error)

    # ---------------------------------------------------------------------------------- batch (legacy LLMs)
    def _join_group(self, params: Any, size: int) -> _Group | None:
        if size <= 1 or params is None:
            return None
        key = id(params)  # LangChain passes the one invocation_params dict to every prompt of a generate()
        with self._lock:
            group = self._groups.get(key)
            if group is None or group.params is not params:
                if len(self._groups) >= MAX_OPEN_GROUPS:
                    self._groups.pop(next(iter(self._groups)))
                group = self._groups[key] = _Group(params, size)
            group.seen += 1
            if group.seen >= group.size:
                self._groups.pop(key, None)
            failed = group.failed
        if failed is not None:
            raise failed
        return group

    def _fail_group(self, group: _Group, exc: BaseException) -> None:
        with self._lock:
            group.failed = exc
            run_ids, group.run_ids = group.run_ids, []
        for run_id in run_ids:
            call = self._llm.pop(run_id, None)
            if call is not None:
                try:
                    call.reservation.release(reason="another call of the batch was denied")
                except Exception:
                    log.exception("cycles: could not release %s", call.reservation)

    # ------------------------------------------------------------------------------------------------- tools
    def _tool_estimate(self, name: str, tool_input: Any) -> Amount | None:
        estimate = self.tool_estimates.get(name, self.default_tool_estimate)
        if estimate is None:
            return None
        return estimate(tool_input) if callable(estimate) else estimate

    def on_tool_start(
        self,
        serialized: dict[str, Any],
        input_str: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        inputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        name = (serialized or {}).get("name") or kwargs.get("name") or "tool"
        if consume_guarded(name):
            return
        estimate = self._tool_estimate(name, inputs if inputs is not None else input_str)
        if estimate is None:
            return
        tool_call_id = kwargs.get("tool_call_id")
        reservation = tool_call(
            self.client,
            name,
            estimate,
            subject=with_tags(self.subject, metadata),
            call_action=action(self.tool_action_kind, name),
            idempotency_key=f"langchain-tool-{tool_call_id}" if tool_call_id else f"langchain-{run_id}",
        )
        reservation.begin()  # drawn from an enclosing hold, it carries that hold's caps
        admit_tool(reservation, name)
        self._tools[run_id] = reservation

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        reservation = self._tools.pop(run_id, None)
        if reservation is not None:
            reservation.commit()

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        reservation = self._tools.pop(run_id, None)
        if reservation is None:
            return
        try:
            reservation.release(reason=f"tool failed: {type(error).__name__}")
        except Exception:
            log.exception("cycles: could not release %s", reservation)
