"""Model calls and tool calls: the one budget primitive every integration maps its framework's events onto.

    call = ModelCall(client, "gpt-4o-mini", prompt=messages, tools=tools, max_output_tokens=512, agent="bot")
    call.begin()                         # reserve the worst case: prompt tokens + max output tokens, priced
    send(max_tokens=call.max_output_tokens, tools=call.allowed(tools, name_of))   # ALLOW_WITH_CAPS applied
    call.output(chunk_text, usage=chunk_usage)                                    # a stream, as it goes
    call.finish(error)                   # commit the priced usage / release / commit what a cut stream produced

A model call's lifecycle, the same for LangChain, LlamaIndex and the OpenAI SDK:
- success commits the priced usage the provider reported (else the prompt plus the output text, counted);
- a failure after the provider reported usage (a stream cut short) commits that usage; a failure after output was
  produced without usage commits the estimate (the provider may bill for what it produced); otherwise it releases;
- settling after a failure never masks the call's own error (a settle error is logged, the call's error raised).

A tool call is a plain `Reservation` under the toolset scope named after the tool (`tool_call`); ALLOW_WITH_CAPS
tool allow/deny lists are enforced by the guard when it is admitted.

Subjects: integrations take subject levels as keyword arguments (`handler_subject`) and per-run overrides from their
framework's tags or metadata (`tags_subject`: keys `cycles_scope`, `cycles_<level>`, `cycles_dimensions`).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from .context import current_scope, merge, subject_fields
from .errors import BudgetDenied, ToolNotAllowed
from .guard import Reservation
from .models import Action, Amount
from .pricing import Pricing, TokenUsage, UnknownModelPrice, default_pricing, normalize_usage, prompt_text
from .scopes import LEVELS, parse_scope

__all__ = [
    "MAX_TOKENS_KEYS",
    "ModelCall",
    "action",
    "admit_tool",
    "denied_message",
    "estimate_call",
    "handler_subject",
    "max_tokens_from",
    "priced_actual",
    "scope_value",
    "tags_subject",
    "tool_call",
    "with_tags",
]

log = logging.getLogger("cycles")
T = TypeVar("T")

EstimateFn = Callable[[str, Any, "int | None"], Amount]

TAG_PREFIX = "cycles_"
TAG_SCOPE = "cycles_scope"  # "workspace:prod/agent:bot"
TAG_DIMENSIONS = "cycles_dimensions"  # {"customer": "c-42"}
TAG_LEVELS = {TAG_PREFIX + level: level for level in LEVELS}  # cycles_tenant ... cycles_toolset
TAG_KEYS = frozenset((TAG_SCOPE, TAG_DIMENSIONS, *TAG_LEVELS))

# the names providers and frameworks give a request's output limit
MAX_TOKENS_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "max_new_tokens", "num_predict")

_UNSAFE_SCOPE_CHARS = re.compile(r"[^a-zA-Z0-9_.-]")


# ------------------------------------------------------------------------------------------------ subjects


def handler_subject(scope: str | None, subject: dict[str, Any]) -> dict[str, Any]:
    """Validate subject keyword arguments once (unknown levels raise TypeError, bad scope strings InvalidRequest)."""
    return subject_fields(scope, **subject)


def tags_subject(tags: Mapping[str, Any] | None) -> dict[str, Any]:
    """Subject fields from a framework's per-run tags or metadata: `cycles_scope`, `cycles_<level>`,
    `cycles_dimensions`."""
    if not tags:
        return {}
    out: dict[str, Any] = {}
    scope = tags.get(TAG_SCOPE)
    if scope:
        out.update(parse_scope(scope))
    for key, level in TAG_LEVELS.items():
        value = tags.get(key)
        if value:
            out[level] = value
    dimensions = tags.get(TAG_DIMENSIONS)
    if dimensions:
        out["dimensions"] = {str(k): str(v) for k, v in dimensions.items()}
    return out


def with_tags(base: dict[str, Any], tags: Mapping[str, Any] | None) -> dict[str, Any]:
    """A call's explicit subject: the integration's arguments, overridden by the run's tags (the client then puts
    its defaults and the ambient `cycles.scope` underneath)."""
    if not tags or TAG_KEYS.isdisjoint(tags):  # the usual case: only the framework's own metadata
        return base
    return merge(base, tags_subject(tags))


def scope_value(name: str) -> str:
    """A tool (or model) name as a scope value (letters, digits, '_', '.', '-'; at most 128 characters)."""
    return _UNSAFE_SCOPE_CHARS.sub("_", name)[:128] or "tool"


_actions: dict[tuple[str, str], Action] = {}


def action(kind: str, name: str) -> Action:
    """The Action of a call, validated once per (kind, name) (an integration sends the same few again and again)."""
    found = _actions.get((kind, name))
    if found is None:
        if len(_actions) > 1024:
            _actions.clear()
        found = _actions[(kind, name)] = Action(kind=kind, name=name[:256])
    return found


# ----------------------------------------------------------------------------------------------- estimates

_NO_USAGE = TokenUsage()  # immutable: every call starts from this one instead of building its own


def max_tokens_from(source: Mapping[str, Any] | None, keys: Iterable[str] = MAX_TOKENS_KEYS) -> int | None:
    """A request's output limit: the first positive integer among `keys` in `source`."""
    if not source:
        return None
    for key in keys:
        value = source.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


# The JSON of the last tool schemas estimated, by identity: a bound model passes the same list on every call, and
# encoding it costs tens of microseconds a call.
_last_tools: tuple[Any, str] = (None, "")


def _tools_text(tools: Any) -> str:
    global _last_tools
    last, text = _last_tools
    if last is not tools:
        text = json.dumps(tools, default=str)
        _last_tools = (tools, text)
    return text


def estimate_call(
    pricing: Pricing,
    estimate: Amount | EstimateFn | None,
    unit: str,
    model: str,
    prompt: Any,
    tools: Any,
    max_out: int | None,
    *,
    prompt_tokens: int | None = None,
    choices: int = 1,
) -> Amount:
    """A model call's estimate: `estimate` as given (an Amount, or `estimate(model, prompt, max_output_tokens)`),
    else its prompt (and tool schemas, sent with every request; or `prompt_tokens` when the caller knows them) plus
    its max output tokens for each of its `choices` completions, priced."""
    if estimate is None:
        if prompt_tokens is None:
            text = prompt_text(prompt)
            if tools:
                text += "\n" + _tools_text(tools)
            prompt_tokens = pricing.count_tokens(text, model)
        if choices > 1:  # n completions, each up to the limit
            max_out = (max_out if max_out is not None else pricing.default_max_output_tokens) * choices
        return pricing.estimate(model, prompt_tokens=prompt_tokens, max_output_tokens=max_out, unit=unit)
    if callable(estimate):
        return estimate(model, prompt, max_out)
    return estimate


def priced_actual(
    pricing: Pricing, model: str, estimate: Amount, usage: TokenUsage, prompt: Any, text: str | Callable[[], str]
) -> int:
    """A finished call's cost in the estimate's unit, as an integer (commit and record take it as it is): from its
    usage; with none reported, its prompt plus its output text (`text`, or a callable producing it), counted; in a
    unit pricing cannot produce (or for a model without a price), the estimate."""
    unit = estimate.unit
    if unit not in ("USD_MICROCENTS", "TOKENS"):
        return estimate.amount
    try:
        if usage:
            return pricing.cost_amount(model, usage, unit)
        output = text() if callable(text) else text
        return pricing.estimate(
            model, prompt=prompt, max_output_tokens=pricing.count_tokens(output, model), unit=unit
        ).amount
    except UnknownModelPrice as exc:
        log.warning("cycles: %s; committing the estimate", exc)
    return estimate.amount


# --------------------------------------------------------------------------------------------- model calls


class ModelCall:
    """One model call's hold: reserved from its request, committed from its normalised usage (module docstring).

    Args:
        client: the `cycles.Client`.
        model: the model name (prices it; the action's name).
        prompt: the request's messages or text (its tokens are counted for the estimate and the no-usage fallback).
        tools: the tool schemas the request sends (counted too).
        max_output_tokens: the request's output limit (else `pricing.default_max_output_tokens`).
        estimate: an Amount, or `estimate(model, prompt, max_output_tokens) -> Amount`; default priced.
        pricing, unit: how the call is priced (USD_MICROCENTS, or TOKENS which needs no price).
        subject: explicit subject fields (the client adds its defaults and the ambient scope).
        kind: the action kind (`llm.completion`, `llm.embedding`: with `max_output_tokens=0`, input only, ...).
        idempotency_key, ttl_ms: as for `Reservation`.
        prompt_tokens: the prompt's token count when the caller knows it (else counted from `prompt` and `tools`).
        choices: how many completions the request asks for (each may produce up to the output limit).
    """

    __slots__ = (
        "reservation",
        "model",
        "prompt",
        "requested_max_tokens",
        "pricing",
        "usage",
        "model_version",
        "produced",
        "_text",
        "_started",
        "__weakref__",
    )

    def __init__(
        self,
        client: Any,
        model: str,
        *,
        prompt: Any = None,
        tools: Any = None,
        max_output_tokens: int | None = None,
        estimate: Amount | EstimateFn | None = None,
        pricing: Pricing | None = None,
        unit: str = "USD_MICROCENTS",
        subject: dict[str, Any] | None = None,
        kind: str = "llm.completion",
        idempotency_key: str | None = None,
        ttl_ms: int | None = None,
        prompt_tokens: int | None = None,
        choices: int = 1,
    ) -> None:
        self.pricing = pricing = pricing or default_pricing()
        self.model = model
        self.prompt = prompt
        self.requested_max_tokens = max_output_tokens
        self.reservation = Reservation(
            client,
            estimate_call(
                pricing,
                estimate,
                unit,
                model,
                prompt,
                tools,
                max_output_tokens,
                prompt_tokens=prompt_tokens,
                choices=choices,
            ),
            action=action(kind, model),
            subject=subject,
            idempotency_key=idempotency_key,
            ttl_ms=ttl_ms,
        )
        self.reservation.model_call = self  # for telemetry: spans name the model and its usage
        self.usage = _NO_USAGE
        self.model_version: str | None = None
        self.produced = False
        self._text: list[str] = []
        self._started = 0.0

    def __repr__(self) -> str:
        return f"<ModelCall {self.model} {self.reservation!r}>"

    # ----------------------------------------------------------------------------------------------- begin
    def begin(self) -> ModelCall:
        """Reserve (or draw from the enclosing hold: a run budget, a guarded tool). A denial raises here."""
        self._started = time.monotonic()
        self.reservation.begin()
        return self

    async def abegin(self) -> ModelCall:
        self._started = time.monotonic()
        await self.reservation.abegin()
        return self

    @property
    def estimate(self) -> Amount:
        estimate = self.reservation.estimate
        assert estimate is not None
        return estimate

    # -------------------------------------------------------------------------------------------------- caps
    @property
    def max_output_tokens(self) -> int | None:
        """The output limit to send: the request's, lowered to an ALLOW_WITH_CAPS `max_tokens` cap."""
        caps = self.reservation.caps
        cap = caps.max_tokens if caps is not None else None
        requested = self.requested_max_tokens
        if cap is not None and (requested is None or requested > cap):
            return cap
        return requested

    @property
    def capped(self) -> bool:
        """The caps lower the request's output limit (the request must be changed to honour them)."""
        return self.max_output_tokens != self.requested_max_tokens

    def allows_tool(self, name: str) -> bool:
        return self.reservation.allows_tool(name)

    def allowed(self, tools: Iterable[T], name: Callable[[T], str | None]) -> list[T]:
        """The tools the caps let the model see (`name(tool)` reads a tool's name; unnamed ones stay)."""
        caps = self.reservation.caps
        if caps is None:
            return list(tools)
        return [tool for tool in tools if (found := name(tool)) is None or caps.allows_tool(found)]

    # ---------------------------------------------------------------------------------------------- output
    def output(self, text: str = "", usage: Any = None) -> None:
        """Output seen so far: a chunk's text, and the call's usage so far when the provider reports it (the
        cumulative figure, normalised here). From now a call cut short commits that usage, else the estimate."""
        self.produced = True
        if text:
            self._text.append(text)
        if usage is not None:
            found = normalize_usage(usage)
            if found:
                self.usage = found

    def actual(self) -> int:
        """What the call cost so far, priced (see `priced_actual`)."""
        return priced_actual(
            self.pricing, self.model, self.estimate, self.usage, self.prompt, lambda: "".join(self._text)
        )

    def _metrics(self) -> dict[str, Any] | None:
        if self.reservation.status != "ACTIVE":  # drawn from an enclosing hold (or shadow): nothing carries them
            return None
        metrics: dict[str, Any] = {
            "latency_ms": int((time.monotonic() - self._started) * 1000),
            "model_version": (self.model_version or self.model)[:128],
        }
        if self.usage:
            metrics["tokens_input"] = self.usage.input_tokens
            metrics["tokens_output"] = self.usage.output_tokens
        return metrics

    def _outcome(self, error: BaseException | None, actual: int | None) -> int | None:
        """What to commit (None: release)."""
        if actual is not None:
            return actual
        if error is None or self.usage:
            return self.actual()
        if self.produced:  # output without usage: the provider may bill up to the estimate
            return self.estimate.amount
        return None

    # ---------------------------------------------------------------------------------------------- finish
    def finish(self, error: BaseException | None = None, *, actual: int | None = None) -> None:
        """Settle: commit the priced usage (or `actual`), or release (see the module docstring)."""
        r = self.reservation
        if not r.active:
            return
        try:
            used = self._outcome(error, actual)
            if used is None:
                r.release(reason=f"call failed: {type(error).__name__}")
            else:
                r.commit(used, metrics=self._metrics())
        except Exception:
            if error is None:
                raise
            log.exception("cycles: could not settle %s after %s", r, type(error).__name__)

    async def afinish(self, error: BaseException | None = None, *, actual: int | None = None) -> None:
        r = self.reservation
        if not r.active:
            return
        try:
            used = self._outcome(error, actual)
            if used is None:
                await r.arelease(reason=f"call failed: {type(error).__name__}")
            else:
                await r.acommit(used, metrics=self._metrics())
        except Exception:
            if error is None:
                raise
            log.exception("cycles: could not settle %s after %s", r, type(error).__name__)


# ---------------------------------------------------------------------------------------------- tool calls


def tool_call(
    client: Any,
    name: str,
    estimate: Amount | Callable[..., Amount],
    *,
    actual: Amount | Callable[..., Amount] | None = None,
    subject: dict[str, Any] | None = None,
    call_action: Action | None = None,
    idempotency_key: str | None = None,
) -> Reservation:
    """A tool run's Reservation: under the toolset scope named after the tool unless the subject (or the ambient
    scope) names one. Admit it with `admit_tool` once it has begun."""
    subject = subject or {}
    if "toolset" not in subject and "toolset" not in current_scope():
        subject = {**subject, "toolset": scope_value(name)}
    return Reservation(
        client,
        estimate,
        action=call_action or action("tool.call", name),
        subject=subject,
        actual=actual,
        idempotency_key=idempotency_key,
    )


def admit_tool(reservation: Reservation, name: str) -> None:
    """ALLOW_WITH_CAPS: a tool the caps' allow/deny lists exclude gets its hold back and is refused (a hold drawn
    from an enclosing one, such as a run budget, carries that hold's caps)."""
    caps = reservation.caps
    if caps is not None and not caps.allows_tool(name):
        reservation.release(reason="tool not allowed by caps")
        raise ToolNotAllowed.for_tool(name, caps.tool_allowlist, caps.tool_denylist)


def denied_message(name: str, exc: BudgetDenied) -> str:
    """What a tool says to the model instead of running, when its integration is told not to stop the agent."""
    return f"Budget exhausted: the tool {name!r} was not run ({exc.message})."
