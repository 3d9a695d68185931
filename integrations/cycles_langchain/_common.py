"""What the handler, the tool guard and the model guard share: the subject of a call (handler arguments, the run's
config metadata), the model and max output tokens LangChain reports for a call, and usage read off its result."""

from __future__ import annotations

import contextvars
import json
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

from cycles.context import merge, subject_fields
from cycles.errors import ToolNotAllowed
from cycles.models import Amount, Caps
from cycles.pricing import Pricing, TokenUsage, UnknownModelPrice, normalize_usage, prompt_text
from cycles.scopes import LEVELS, parse_scope

log = logging.getLogger("cycles.langchain")

META_PREFIX = "cycles_"
META_SCOPE = "cycles_scope"  # "workspace:prod/agent:bot"
META_DIMENSIONS = "cycles_dimensions"  # {"customer": "c-42"}
META_LEVELS = {META_PREFIX + level: level for level in LEVELS}  # cycles_tenant ... cycles_toolset
META_KEYS = frozenset((META_SCOPE, META_DIMENSIONS, *META_LEVELS))

MODEL_KEYS = ("model", "model_name", "model_id", "deployment_name", "azure_deployment")
MAX_TOKENS_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "max_new_tokens", "num_predict")

_UNSAFE_SCOPE_CHARS = re.compile(r"[^a-zA-Z0-9_.-]")


# ------------------------------------------------------------------------------------------------ subjects


def handler_subject(scope: str | None, subject: dict[str, Any]) -> dict[str, Any]:
    """Validate subject keyword arguments once (unknown levels raise TypeError, bad scope strings InvalidRequest)."""
    return subject_fields(scope, **subject)


def metadata_subject(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """Subject fields from a run's config metadata: `cycles_scope`, `cycles_<level>`, `cycles_dimensions`."""
    if not metadata:
        return {}
    out: dict[str, Any] = {}
    scope = metadata.get(META_SCOPE)
    if scope:
        out.update(parse_scope(scope))
    for key, level in META_LEVELS.items():
        value = metadata.get(key)
        if value:
            out[level] = value
    dimensions = metadata.get(META_DIMENSIONS)
    if dimensions:
        out["dimensions"] = {str(k): str(v) for k, v in dimensions.items()}
    return out


def call_subject(base: dict[str, Any], metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """The guard's explicit subject for one call: the handler's arguments, overridden by the run's metadata (the
    client then puts its defaults and the ambient `cycles.scope` underneath)."""
    if not metadata or META_KEYS.isdisjoint(metadata):  # the usual case: only LangChain's own metadata
        return base
    return merge(base, metadata_subject(metadata))


def scope_value(name: str) -> str:
    """A tool name as a scope value (letters, digits, '_', '.', '-'; at most 128 characters)."""
    return _UNSAFE_SCOPE_CHARS.sub("_", name)[:128] or "tool"


# --------------------------------------------------------------------------------------------- model calls


def model_name(metadata: Mapping[str, Any] | None, params: Mapping[str, Any] | None, fallback: str = "unknown") -> str:
    """The model LangChain says a call uses: `ls_model_name` (which honours per-call overrides), else the provider's
    invocation parameters, else the model class's `_type`."""
    if metadata:
        name = metadata.get("ls_model_name")
        if isinstance(name, str) and name:
            return name
    if params:
        for key in MODEL_KEYS:
            name = params.get(key)
            if isinstance(name, str) and name:
                return name
        name = params.get("_type")
        if isinstance(name, str) and name:
            return name
    return fallback


def max_output_tokens(params: Mapping[str, Any] | None, metadata: Mapping[str, Any] | None) -> int | None:
    """The request's output limit: invocation parameters first (they include per-call and bound kwargs)."""
    for source, keys in ((params, MAX_TOKENS_KEYS), (metadata, ("ls_max_tokens",))):
        if not source or source.keys().isdisjoint(keys):
            continue
        for key in keys:
            value = source.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


# The JSON of the last tool schemas estimated, by identity: a bound model passes the same list on every call, and
# encoding it costs tens of microseconds a call.
_last_tools: tuple[Any, str] = (None, "")


def tools_text(tools: Any) -> str:
    """The tool schemas a request sends, as JSON text (to count their tokens)."""
    global _last_tools
    last, text = _last_tools
    if last is not tools:
        text = json.dumps(tools, default=str)
        _last_tools = (tools, text)
    return text


def estimate_call(
    pricing: Pricing,
    estimate: Any,
    unit: str,
    model: str,
    prompt: Any,
    tools: Any,
    max_out: int | None,
) -> Amount:
    """A model call's estimate: `estimate` as given (an Amount, or `estimate(model, prompt, max_output_tokens)`),
    else its prompt (and bound tool schemas, sent with every request) plus its max output tokens, priced."""
    if estimate is None:
        text = prompt_text(prompt)
        if tools:
            text += "\n" + tools_text(tools)
        tokens = pricing.count_tokens(text, model)
        return pricing.estimate(model, prompt_tokens=tokens, max_output_tokens=max_out, unit=unit)
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


def _first_usage(generations: Any) -> tuple[TokenUsage, str | None]:
    for group in generations or ():
        for generation in group:
            message = getattr(generation, "message", None)
            usage = getattr(message, "usage_metadata", None) if message is not None else None
            if usage:
                meta = getattr(message, "response_metadata", None) or {}
                version = meta.get("model_name") or meta.get("model")
                return normalize_usage(usage), version if isinstance(version, str) else None
            info = getattr(generation, "generation_info", None)
            if info:
                found = normalize_usage(info.get("usage") or info.get("token_usage"))
                if found:
                    return found, None
    return TokenUsage(), None


def result_usage(response: Any) -> tuple[TokenUsage, str | None]:
    """Usage and model version from an LLMResult: the first message's `usage_metadata` (with n > 1 completions every
    message carries the call's total, so it is read once), else `llm_output["token_usage" | "usage"]`."""
    if response is None:
        return TokenUsage(), None
    usage, version = _first_usage(getattr(response, "generations", None))
    output = getattr(response, "llm_output", None) or {}
    if not usage:
        usage = normalize_usage(output.get("token_usage") or output.get("usage"))
    if version is None:
        found = output.get("model_name") or output.get("model")
        version = found if isinstance(found, str) else None
    return usage, version


def cache_hit(response: Any) -> bool:
    """LangChain answered from its LLM cache: it marks the cached message's usage with `total_cost: 0`."""
    for group in getattr(response, "generations", None) or ():
        for generation in group:
            usage = getattr(getattr(generation, "message", None), "usage_metadata", None)
            return bool(usage) and usage.get("total_cost", None) == 0
    return False


def result_text(response: Any) -> str:
    """The text a result generated (for a call whose provider reported no usage)."""
    parts: list[str] = []
    for group in getattr(response, "generations", None) or ():
        for generation in group:
            text = getattr(generation, "text", "")
            if text:
                parts.append(text)
            message = getattr(generation, "message", None)
            for call in getattr(message, "tool_calls", None) or ():
                parts.append(str(call.get("args", "")))
        break  # the first prompt's generations (a result we settle is always one prompt's)
    return "".join(parts)


# ------------------------------------------------------------------------------------------ caps and tools


# A guarded tool (guard_tool) marks the tool run it is about to start, so a CyclesCallbackHandler on the same run does
# not reserve for it a second time: [tool name, consumed].
guarded_tool: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar(
    "cycles_langchain_guarded_tool", default=None
)


def consume_guarded(name: str) -> bool:
    """True (once) when this tool run is one a guard_tool wrapper already holds a reservation for."""
    mark = guarded_tool.get()
    if mark is not None and not mark[1] and mark[0] == name:
        mark[1] = True
        return True
    return False


def tool_not_allowed(name: str, caps: Caps) -> ToolNotAllowed:
    return ToolNotAllowed.for_tool(name, caps.tool_allowlist, caps.tool_denylist)
