"""What LlamaIndex's events say about a call: the model and output limit its payload reports, the text of a
response, and the chunks of a stream as the instrumentation dispatcher reports them. Budget logic is in the core
(`cycles.calls`)."""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import AsyncGenerator, Generator, Mapping
from typing import TYPE_CHECKING, Any

from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import LLMChatInProgressEvent, LLMCompletionInProgressEvent
from llama_index.core.instrumentation.span_handlers import BaseSpanHandler

from cycles.calls import max_tokens_from
from cycles.errors import BudgetDenied
from cycles.pricing import TokenUsage, normalize_usage

if TYPE_CHECKING:
    from cycles.calls import ModelCall

log = logging.getLogger("cycles.llamaindex")

# --------------------------------------------------------------------------------------------- model calls


def model_name(serialized: Mapping[str, Any] | None, fallback: str = "unknown") -> str:
    """The model an LLM event names: `LLM.to_payload()` is its metadata (`model_name`), plus the class name."""
    if serialized:
        name = serialized.get("model_name") or serialized.get("model")
        if isinstance(name, str) and name and name != "unknown":
            return name
        name = serialized.get("class_name")
        if isinstance(name, str) and name:
            return name
    return fallback


def max_output_tokens(kwargs: Mapping[str, Any] | None, serialized: Mapping[str, Any] | None) -> int | None:
    """The request's output limit: a per-call `max_tokens` (or a sibling name), else the LLM's `num_output`."""
    return max_tokens_from(kwargs) or max_tokens_from(serialized, ("num_output", "max_tokens"))


def response_usage(response: Any) -> TokenUsage:
    """A ChatResponse's / CompletionResponse's usage: its `raw` usage or its `additional_kwargs` token counts (what
    LlamaIndex's provider integrations fill), else its message's `additional_kwargs` (where a CustomLLM's chat,
    built from its completion, carries them). Read field by field: looking a missing name up on a pydantic response
    costs microseconds."""
    raw = response.raw
    if raw is not None and (usage := normalize_usage(raw)):
        return usage
    if response.additional_kwargs and (usage := normalize_usage(response.additional_kwargs)):
        return usage
    message = getattr(response, "message", None)
    if message is not None and message.additional_kwargs:
        return normalize_usage(message.additional_kwargs)
    return TokenUsage()


def response_text(response: Any) -> str:
    """The text a ChatResponse / CompletionResponse generated (for a call whose provider reported no usage)."""
    message = getattr(response, "message", None)
    if message is not None:
        content = message.content or ""
        calls = (message.additional_kwargs or {}).get("tool_calls")
        return content + str(calls) if calls else content
    return getattr(response, "text", None) or ""


# --------------------------------------------------------------------------------------------------- streams


class Flight:
    """A call in flight, by the span of its LLM method (the span active when the callback starts): the legacy
    callbacks see a stream's start and end only, so its chunks (reported by the instrumentation dispatcher, keyed
    by that span) are fed to the call here, and a stream cut short commits the usage they reported. `stream` is the
    generator the method returned (the span's result), to tell when the LLM calls itself while it is iterated."""

    __slots__ = ("call", "model", "stream")

    def __init__(self, call: ModelCall, model: str) -> None:
        self.call = call
        self.model = model
        self.stream: Any = None

    def iterating_here(self) -> bool:
        """Its stream is running in this thread, below the caller (a call starting now is made from inside it)."""
        stream = self.stream
        frame = getattr(stream, "gi_frame", None) or getattr(stream, "ag_frame", None)
        if frame is None:  # no stream, or one that has finished
            return False
        caller = sys._getframe(1)
        while caller is not None:
            if caller is frame:
                return True
            caller = caller.f_back
        return False


in_flight: dict[str, Flight] = {}

_lock = threading.Lock()
_listening = False
_PROGRESS = (LLMChatInProgressEvent, LLMCompletionInProgressEvent)


class StreamProgress(BaseEventHandler):
    """Feeds each streamed chunk (text and cumulative usage) to the call in flight on its span."""

    @classmethod
    def class_name(cls) -> str:
        return "CyclesStreamProgress"

    def handle(self, event: Any, **kwargs: Any) -> None:
        if type(event) in _PROGRESS and (flight := in_flight.get(event.span_id)) is not None:  # type: ignore[arg-type]
            response = event.response
            flight.call.output(response.delta or "", response_usage(response))


class StreamSpans(BaseSpanHandler[Any]):
    """Keeps the generator an LLM method in flight returned (the only place LlamaIndex hands it out)."""

    @classmethod
    def class_name(cls) -> str:
        return "CyclesStreamSpans"

    def span_enter(self, *args: Any, **kwargs: Any) -> None:
        pass

    def span_exit(self, id_: str, bound_args: Any, instance: Any = None, result: Any = None, **kwargs: Any) -> None:
        if (flight := in_flight.get(id_)) is not None and isinstance(result, (Generator, AsyncGenerator)):
            flight.stream = result

    def span_drop(self, *args: Any, **kwargs: Any) -> None:
        pass

    def new_span(self, *args: Any, **kwargs: Any) -> None:
        return None

    def prepare_to_exit_span(self, *args: Any, **kwargs: Any) -> None:
        return None

    def prepare_to_drop_span(self, *args: Any, **kwargs: Any) -> None:
        return None


def listen_to_streams() -> None:
    """Put one StreamProgress and one StreamSpans on the root dispatcher (once per process)."""
    global _listening
    if _listening:
        return
    with _lock:
        if not _listening:
            root = get_dispatcher()
            root.add_event_handler(StreamProgress())
            root.add_span_handler(StreamSpans())
            _listening = True


# ----------------------------------------------------------------------------------------------- agent stops


# Denials of guarded tools (on_denied="stop") waiting for the agent's next model call, by the token their tool
# output carries: an agent turns a tool's answer into a message of the next request, whatever task or thread it
# ran in, so the token reaches the LLM gate where the handler raises the denial.
stops: dict[str, BudgetDenied] = {}
_STOP = re.compile(r"\[cycles stop ([0-9a-f]{12})\]")
MAX_STOPS = 1024


def stop_text(exc: BudgetDenied) -> str:
    """The mark a stopping tool output ends with."""
    if len(stops) >= MAX_STOPS:  # left by agents that ended otherwise
        stops.clear()
    token = os.urandom(6).hex()
    stops[token] = exc
    return f" [cycles stop {token}]"


def pending_stop(prompt: Any) -> BudgetDenied | None:
    """The denial a stopping tool output carries (once) in the latest turn of a request: the messages after the
    last assistant message (a FunctionAgent's tool results, a ReAct observation), or a completion's prompt."""
    if isinstance(prompt, str):
        texts: list[str] = [prompt]
    else:
        texts = []
        for message in reversed(prompt or ()):
            if getattr(message, "role", None) == "assistant":
                break
            texts.append(message.content or "")
    for text in texts:
        if "[cycles stop " in text:
            for token in _STOP.findall(text):
                if (exc := stops.pop(token, None)) is not None:
                    return exc
    return None
