"""What LangChain's events say about a call: the model and max output tokens it reports, usage and text read off
its result, and the tool run a `guard_tool` already holds. Budget logic is in the core (`cycles.calls`)."""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Mapping
from typing import Any

from cycles.calls import max_tokens_from
from cycles.pricing import TokenUsage, normalize_usage

log = logging.getLogger("cycles.langchain")

MODEL_KEYS = ("model", "model_name", "model_id", "deployment_name", "azure_deployment")

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
    return max_tokens_from(params) or max_tokens_from(metadata, ("ls_max_tokens",))


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


# --------------------------------------------------------------------------------------------- guarded tools


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
