"""OpenTelemetry spans for the guard's reserve, commit and release (the optional extra `otel`: opentelemetry-api).

    pip install 'cycles[otel]'      # plus an SDK and exporter of your choice, configured as usual

Each call the guard sends to the budget authority is a span, `cycles.reserve`, `cycles.commit` or `cycles.release`,
a child of whatever span is current (the agent's step, the LangChain run), with:

    cycles.reservation.id, cycles.reservation.decision (ALLOW, ALLOW_WITH_CAPS, DENY), .reason_code,
    cycles.reservation.unit, .amount.estimate, .amount.actual (what was charged), .scope (the scope path)

and, when the guarded call is a model call (`cycles.calls.ModelCall`: every integration's), the GenAI semantic
conventions: gen_ai.operation.name, gen_ai.request.model, gen_ai.request.max_tokens, gen_ai.response.model,
gen_ai.usage.input_tokens, gen_ai.usage.output_tokens. A denial ends its span with status ERROR and the exception
recorded.

Without opentelemetry installed nothing is imported (one failed import, once) and each hook costs a function call
that returns None; with the API but no SDK, spans are non-recording and no attribute is computed.
`CYCLES_OTEL=0` turns the spans off.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .guard import Reservation

_tracer: Any = None
_off = os.environ.get("CYCLES_OTEL", "") in ("0", "false", "no")


def tracer() -> Any:
    """The `cycles` tracer, or None when opentelemetry is not installed (or CYCLES_OTEL=0)."""
    global _tracer, _off
    if _tracer is None and not _off:
        try:
            from opentelemetry import trace
        except ImportError:
            _off = True
            return None
        from . import __version__

        _tracer = trace.get_tracer("cycles", __version__)
    return _tracer


def start(operation: str) -> Any:
    """A started span `cycles.<operation>`, or None (no opentelemetry). End it with `end`."""
    t = _tracer if _tracer is not None else (None if _off else tracer())
    if t is None:
        return None
    return t.start_span("cycles." + operation)


def end(span: Any, r: Reservation, exc: BaseException | None = None, *, actual: int | None = None) -> None:
    """Describe `r` on `span` (when it records) and end it; `exc`: the call failed with it."""
    if span is None:
        return
    try:
        if span.is_recording():
            span.set_attributes(_attributes(r, exc, actual))
            if exc is not None:
                from opentelemetry.trace import Status, StatusCode

                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, getattr(exc, "code", type(exc).__name__)))
    finally:
        span.end()


def _attributes(r: Reservation, exc: BaseException | None, actual: int | None) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    details = getattr(exc, "details", None) or {}
    denied = exc is not None and "reason_code" in details
    if r.id:
        attrs["cycles.reservation.id"] = r.id
    decision = "DENY" if denied else (r.decision.value if hasattr(r.decision, "value") else r.decision)
    if decision:
        attrs["cycles.reservation.decision"] = decision
    reason = details.get("reason_code") if denied else r.reason_code
    if reason:
        attrs["cycles.reservation.reason_code"] = reason
    if r.estimate is not None:
        unit = r.estimate.unit
        attrs["cycles.reservation.unit"] = unit.value if hasattr(unit, "value") else unit
        attrs["cycles.reservation.amount.estimate"] = r.estimate.amount
    if actual is not None:
        attrs["cycles.reservation.amount.actual"] = actual
    elif r.charged is not None:
        attrs["cycles.reservation.amount.actual"] = r.charged.amount
    scope = details.get("scope") if denied else r.scope_path
    if scope is None and r.subject:
        from .scopes import format_scope

        scope = format_scope({k: v for k, v in r.subject.items() if isinstance(v, str)})
    if scope:
        attrs["cycles.reservation.scope"] = scope
    call = r.model_call
    if call is not None:
        kind = r.action.kind
        attrs["gen_ai.operation.name"] = "embeddings" if "embedding" in kind else "chat"
        attrs["gen_ai.request.model"] = call.model
        if call.max_output_tokens is not None:
            attrs["gen_ai.request.max_tokens"] = call.max_output_tokens
        if call.model_version:
            attrs["gen_ai.response.model"] = call.model_version
        usage = call.usage
        if usage.input_tokens or usage.output_tokens:
            attrs["gen_ai.usage.input_tokens"] = usage.input_tokens
            attrs["gen_ai.usage.output_tokens"] = usage.output_tokens
    return attrs
