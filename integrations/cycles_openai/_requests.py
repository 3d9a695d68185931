"""What an OpenAI API request asks for (model, prompt, output limit, tools) and what its answer reports (usage, text),
read off the JSON body the SDK built and the objects it parsed. Budget logic is in the core (`cycles.calls`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cycles.calls import ModelCall

# the routes a guarded client reserves for: path -> (kind, the body's prompt fields, its output limit keys)
ROUTES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "/chat/completions": ("llm.completion", ("messages",), ("max_completion_tokens", "max_tokens")),
    "/responses": ("llm.completion", ("instructions", "input"), ("max_output_tokens",)),
    "/completions": ("llm.completion", ("prompt",), ("max_tokens",)),
    "/embeddings": ("llm.embedding", ("input",), ()),
}
# the key a cap is written to when the request set no output limit
CAP_KEYS = {
    "/chat/completions": "max_completion_tokens",
    "/responses": "max_output_tokens",
    "/completions": "max_tokens",
}
# chat and legacy completions report a stream's usage only when asked to
USAGE_STREAMS = frozenset(("/chat/completions", "/completions"))


def body_of(options: Any) -> dict[str, Any] | None:
    """The JSON body the request will send (its `extra_body` included), or None for one we do not guard."""
    body = options.json_data
    if not isinstance(body, Mapping):
        return None
    extra = options.extra_json
    return {**body, **extra} if extra else body  # type: ignore[return-value]


def prompt_of(route: str, body: Mapping[str, Any]) -> Any:
    fields = ROUTES[route][1]
    if len(fields) == 1:
        return body.get(fields[0])
    return [value for name in fields if (value := body.get(name)) is not None]


def max_tokens_of(route: str, body: Mapping[str, Any]) -> tuple[str | None, int | None]:
    """The request's output limit and the key it is under."""
    for key in ROUTES[route][2]:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return key, value
    return None, None


def token_inputs(value: Any) -> int | None:
    """Embedding inputs given as token ids: how many tokens they are (None for text)."""
    if isinstance(value, list) and value:
        first = value[0]
        if isinstance(first, int):
            return len(value)
        if isinstance(first, list):
            return sum(len(v) for v in value)
    return None


def tool_name(tool: Any) -> str | None:
    """A tool's name as ALLOW_WITH_CAPS lists name it: a function's name, else a built-in tool's type."""
    if not isinstance(tool, Mapping):
        return None
    function = tool.get("function")
    if isinstance(function, Mapping) and isinstance(function.get("name"), str):
        return function["name"]  # chat
    name = tool.get("name") or tool.get("type")  # responses: function tools carry their name; built-ins their type
    return name if isinstance(name, str) else None


def capped_body(route: str, body: Mapping[str, Any], call: ModelCall, limit_key: str | None) -> dict[str, Any] | None:
    """The body with ALLOW_WITH_CAPS applied (output limit lowered, tools the caps exclude removed), or None when the
    caps change nothing."""
    caps = call.reservation.caps
    if caps is None or route == "/embeddings":
        return None
    changed: dict[str, Any] = {}
    if call.capped:
        changed[limit_key or CAP_KEYS[route]] = call.max_output_tokens
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        kept = call.allowed(tools, tool_name)
        if len(kept) != len(tools):
            changed["tools"] = kept
            choice = body.get("tool_choice")
            named = tool_name(choice) if isinstance(choice, Mapping) else None
            if not kept or (named is not None and named not in {tool_name(t) for t in kept}):
                changed["tool_choice"] = None  # it names a tool the caps removed: let the model choose
    if not changed:
        return None
    out = {**body, **changed}
    if not out.get("tools"):
        out.pop("tools", None)
        out.pop("parallel_tool_calls", None)
    if out.get("tool_choice", 0) is None:
        del out["tool_choice"]
    return out


# ------------------------------------------------------------------------------------------------- answers


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def answer_text(answer: Any) -> str:
    """The text an answer generated (chat choices and tool call arguments, responses output, completions), for a
    provider that reports no usage."""
    parts: list[str] = []
    for choice in _get(answer, "choices") or ():
        message = _get(choice, "message") or _get(choice, "delta")
        if message is None:
            parts.append(_get(choice, "text") or "")
            continue
        parts.append(_get(message, "content") or "")
        for call in _get(message, "tool_calls") or ():
            parts.append(_get(_get(call, "function"), "arguments") or "")
    for item in _get(answer, "output") or ():
        for content in _get(item, "content") or ():
            parts.append(_get(content, "text") or "")
        parts.append(_get(item, "arguments") or "")
    return "".join(p for p in parts if isinstance(p, str))


def observe(call: ModelCall, answer: Any) -> None:
    """Record a parsed answer (or a raw JSON one) on the call: its usage, else its text; and the model version."""
    usage = _get(answer, "usage")
    call.output("" if usage else answer_text(answer), usage)
    version = _get(answer, "model")
    if isinstance(version, str):
        call.model_version = version
