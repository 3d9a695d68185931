"""`CyclesCallbackHandler`: every LLM call of LlamaIndex, reserved before it is made.

    handler = CyclesCallbackHandler(agent="bot")
    llm = OpenAI(model="gpt-4o-mini", callback_manager=CallbackManager([handler]))      # per LLM
    Settings.callback_manager = CallbackManager([handler])                               # or for Settings.llm

It runs on the legacy `CallbackManager` because that is where a handler can stop a call: LlamaIndex calls
`on_event_start` unguarded, right before the provider, so a denial raised there (`cycles.BudgetExceeded`, ...)
propagates out of `chat` / `complete` / `stream_chat` / `achat` / `astream_chat` / ... and the call is never made.
(The instrumentation dispatcher swallows every exception of its handlers: it can only observe.)

On LLM start the handler reserves the call's worst case: the prompt's tokens (messages or prompt, plus the tool
schemas sent) and the output limit (a per-call `max_tokens`, else the LLM's `num_output`), priced by
`cycles.pricing`, or the `estimate=` you give. On end it commits the priced usage of the response (its `raw` usage,
or the token counts in `additional_kwargs`; a stream's last chunk), with tokens and model version as metrics; on an
exception it releases the hold. A stream closed early (GeneratorExit) commits the usage its chunks reported (the
handler follows the chunks through the instrumentation dispatcher), else the estimate. A stream that is never
iterated gets no end event from LlamaIndex: its hold expires with its TTL (the heartbeat extends it only up to the
tenant's maximum number of extensions).

Calls are keyed by LlamaIndex's event id, so parallel calls never collide. An LLM that delegates to itself (a
`CustomLLM`'s `chat` calls its `complete`, its `astream_chat` its `stream_chat`) reports two or three LLM events for
one provider call: an event of the same model that starts inside an unanswered call (within its trace, or from
inside its stream in the same thread) is that call's own and is not reserved again; streams started side by side
before any is read are each reserved.

The subject of a call, most specific last: the client's defaults, the ambient `cycles.scope(...)`, the handler's
keyword arguments, and LlamaIndex's `instrument_tags({...})` (`cycles_<level>` keys such as `{"cycles_agent": "bot"}`,
`cycles_scope`, `cycles_dimensions`). Inside `cycles.run(limit=...)` (or a guarded tool) calls draw from that hold.

Agents: FunctionAgent / AgentWorkflow turn a tool's exception into text and carry on, so a `guard_tool` denied with
`on_denied="stop"` (the default) marks its error output, and the handler raises that denial at the agent's next
model call, before it is made (see `cycles_llamaindex.tools`).

Caps: ALLOW_WITH_CAPS `max_tokens` is applied to the request (LlamaIndex passes the call's keyword arguments to the
provider after the start event, so the handler lowers `max_tokens` there), and tool schemas the caps' allow/deny
lists exclude are taken out of the request's `tools`.

Where it reaches: an LLM built with `callback_manager=CallbackManager([handler])`; or every LLM built after
`Settings.callback_manager = CallbackManager([handler])` is set (a `CallbackManager()` without handlers copies
Settings'), and `Settings.llm` itself. An LLM built before, with its own callback manager, is not guarded by
Settings: attach the handler to it.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable
from typing import Any

from llama_index.core.callbacks.base import global_stack_trace_ids
from llama_index.core.callbacks.base_handler import BaseCallbackHandler
from llama_index.core.callbacks.schema import CBEventType, EventPayload
from llama_index.core.instrumentation.dispatcher import active_instrument_tags
from llama_index.core.instrumentation.span import active_span_id

from cycles import Amount, Caps, Client, default_client
from cycles.calls import ModelCall, handler_subject, with_tags
from cycles.pricing import Pricing, default_pricing

from ._common import (
    Flight,
    in_flight,
    listen_to_streams,
    max_output_tokens,
    model_name,
    pending_stop,
    response_text,
    response_usage,
    stops,
)

__all__ = ["CyclesCallbackHandler"]

EstimateFn = Callable[[str, Any, "int | None"], Amount]

MAX_OPEN = 1024  # calls in flight before the handler looks for lapsed ones

_IGNORED = [event for event in CBEventType if event is not CBEventType.LLM]

# The model call started last in this context, so an LLM calling itself is reserved once:
# (handler, its flight, model, the callback manager's trace depth inside the call).
_outer: contextvars.ContextVar[tuple[Any, Flight, str, int] | None] = contextvars.ContextVar(
    "cycles_llamaindex_outer", default=None
)


def _tool_name(spec: Any) -> str | None:
    """The name of a tool as a request carries it: an OpenAI-style schema dict, or a LlamaIndex tool."""
    if isinstance(spec, dict):
        function = spec.get("function")
        name = function.get("name") if isinstance(function, dict) else spec.get("name")
        return name if isinstance(name, str) else None
    metadata = getattr(spec, "metadata", None)
    return getattr(metadata, "name", None)


class CyclesCallbackHandler(BaseCallbackHandler):
    """Reserve before every LlamaIndex LLM call; commit the priced usage; settle every path.

    Args:
        client: the `cycles.Client` (default: `cycles.default_client()` at call time).
        pricing: a `cycles.pricing.Pricing` (default: the shared catalog pricing).
        estimate: a fixed `Amount` per call, or `estimate(model, prompt, max_output_tokens) -> Amount` (`prompt`
            is the call's messages, or its prompt text for a completion); default: priced from the request.
        unit: the unit calls are priced in (USD_MICROCENTS, or TOKENS which needs no price).
        max_tokens_param: the keyword the LLM takes its per-call output limit as (where caps are applied).
        scope, **subject: subject levels (`tenant`, `workspace`, `app`, `workflow`, `agent`, `toolset`) and
            `dimensions`, or a scope string.
    """

    def __init__(
        self,
        client: Client | None = None,
        *,
        pricing: Pricing | None = None,
        estimate: Amount | EstimateFn | None = None,
        unit: str = "USD_MICROCENTS",
        max_tokens_param: str = "max_tokens",
        scope: str | None = None,
        **subject: Any,
    ) -> None:
        super().__init__(event_starts_to_ignore=_IGNORED, event_ends_to_ignore=_IGNORED)
        self._client = client
        self.pricing = pricing or default_pricing()
        self.estimate = estimate
        self.unit = unit
        self.max_tokens_param = max_tokens_param
        self.subject = handler_subject(scope, subject)
        self._calls: dict[str, tuple[Flight, str | None]] = {}  # event id -> (the call in flight, its span)
        self._nested: set[str] = set()
        listen_to_streams()

    @property
    def client(self) -> Client:
        return self._client or default_client()

    def caps_for(self, event_id: str) -> Caps | None:
        """The ALLOW_WITH_CAPS caps of an in-flight call."""
        found = self._calls.get(event_id)
        return found[0].call.reservation.caps if found is not None else None

    def in_flight(self) -> int:
        """Calls reserved and not yet settled (0 once every call has ended)."""
        return len(self._calls)

    def start_trace(self, trace_id: str | None = None) -> None:
        pass

    def end_trace(self, trace_id: str | None = None, trace_map: dict[str, list[str]] | None = None) -> None:
        pass

    # ------------------------------------------------------------------------------------------------- start
    def on_event_start(
        self,
        event_type: CBEventType,
        payload: dict[str, Any] | None = None,
        event_id: str = "",
        parent_id: str = "",
        **kwargs: Any,
    ) -> str:
        if event_type is not CBEventType.LLM or payload is None:
            return event_id
        serialized = payload.get(EventPayload.SERIALIZED)
        model = model_name(serialized)
        depth = len(global_stack_trace_ids.get())
        if self._inner(model, depth):
            if len(self._nested) >= MAX_OPEN:  # inner events of streams nobody iterated
                self._nested.clear()
            self._nested.add(event_id)
            return event_id
        request = payload.get(EventPayload.ADDITIONAL_KWARGS)
        if request is None:
            request = {}
        messages = payload.get(EventPayload.MESSAGES)
        prompt = messages if messages is not None else payload.get(EventPayload.PROMPT, "")
        if stops and (denial := pending_stop(prompt)) is not None:  # a guarded tool of this agent was denied
            raise denial
        tools = request.get("tools")
        call = ModelCall(
            self.client,
            model,
            prompt=prompt,
            tools=tools,
            max_output_tokens=max_output_tokens(request, serialized),
            estimate=self.estimate,
            pricing=self.pricing,
            unit=self.unit,
            subject=with_tags(self.subject, active_instrument_tags.get()),
            idempotency_key=f"llamaindex-{event_id}" if event_id else None,
        ).begin()  # a denial raises here, before the provider is called
        if call.reservation.caps is not None:
            self._apply_caps(call, request, tools)
        span = active_span_id.get()
        if len(self._calls) >= MAX_OPEN:
            self._forget_lapsed()
        flight = Flight(call, model)
        self._calls[event_id] = (flight, span)
        if span is not None:
            in_flight[span] = flight
        _outer.set((self, flight, model, depth))
        return event_id

    def _inner(self, model: str, depth: int) -> bool:
        """This LLM event is an LLM calling itself for a call already reserved (a CustomLLM's chat through its
        complete, its astream_chat through its stream_chat): an unanswered call of the same model started it, from
        inside its `as_trace` (this event is deeper), or from inside its stream, running in this thread right now."""
        outer = _outer.get()
        if outer is not None and outer[0] is self and depth > outer[3] and outer[2] == model:
            call = outer[1].call
            if not call.produced and call.reservation.active:
                return True
        for flight, _ in tuple(self._calls.values()):  # a snapshot: other threads start and end calls meanwhile
            if (
                flight.stream is not None
                and flight.model == model
                and not flight.call.produced
                and flight.iterating_here()
            ):
                return True
        return False

    def _forget_lapsed(self) -> None:
        """Drop the calls whose hold is gone without an end event (streams nobody iterated: their hold expired, or
        the enclosing one they drew from was settled), so a long-lived handler does not keep them forever."""
        now_ms = time.time_ns() // 1_000_000
        for event_id, (flight, span) in list(self._calls.items()):
            r = flight.call.reservation
            if not r.active or (r.status == "ACTIVE" and r.expires_at_ms is not None and r.expires_at_ms < now_ms):
                self._calls.pop(event_id, None)
                if span is not None:
                    in_flight.pop(span, None)

    def _apply_caps(self, call: ModelCall, request: dict[str, Any], tools: Any) -> None:
        # LlamaIndex sends the call's keyword arguments (this very dict) to the provider after the start event
        if call.capped:
            request[self.max_tokens_param] = call.max_output_tokens
        if tools:
            request["tools"] = call.allowed(tools, _tool_name)

    # --------------------------------------------------------------------------------------------------- end
    def on_event_end(
        self,
        event_type: CBEventType,
        payload: dict[str, Any] | None = None,
        event_id: str = "",
        **kwargs: Any,
    ) -> None:
        if event_type is not CBEventType.LLM:
            return
        found = self._calls.pop(event_id, None)
        if found is None:
            self._nested.discard(event_id)
            return
        flight, span = found
        call = flight.call
        if span is not None:
            in_flight.pop(span, None)
        outer = _outer.get()
        if outer is not None and outer[1] is flight:
            _outer.set(None)
        payload = payload or {}
        error = payload.get(EventPayload.EXCEPTION)
        if error is not None:
            if isinstance(error, GeneratorExit):  # closed after a chunk: the provider may bill what it produced
                call.output()
            call.finish(error)
            return
        response = payload.get(EventPayload.RESPONSE)
        if response is None:
            response = payload.get(EventPayload.COMPLETION)
        if response is not None:
            # the text is only counted when no usage is reported (a stream's chunks brought theirs already)
            usage = response_usage(response)
            call.output("" if usage or call.produced else response_text(response), usage)
            raw = getattr(response, "raw", None)
            version = raw.get("model") if isinstance(raw, dict) else getattr(raw, "model", None)
            if isinstance(version, str):
                call.model_version = version
        call.finish()
