"""Fake LLM providers for the LangChain tests: stock langchain-core fakes, subclassed to report usage the way real
providers do (usage_metadata on the message, and spread over streamed chunks) and to count the calls that reached
the "provider". Only the provider is fake; everything else is real langchain-core."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from typing import Any

from langchain_core.language_models.fake import FakeListLLM
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, LLMResult
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field, PrivateAttr

from cycles.pricing import TokenUsage, prompt_text

MODEL = "gpt-4o-mini"  # priced from the genai-prices catalog


def words(text: str) -> int:
    return len(text.split())


class UsageChatModel(GenericFakeChatModel):
    """Answers "reply <n words>"; reports input tokens = 2 x prompt words + 5, output tokens = reply words.
    Streams word by word: the first chunk carries the input tokens, every word chunk one output token."""

    model: str = MODEL
    messages: Iterator[AIMessage | str] = Field(default_factory=lambda: iter(()))
    _calls: list[dict[str, Any]] = PrivateAttr(default_factory=list)  # kwargs of every call the provider saw
    _usages: list[dict[str, int]] = PrivateAttr(default_factory=list)  # usage it reported, per completed call

    @property
    def calls(self) -> int:
        return len(self._calls)

    @property
    def call_kwargs(self) -> list[dict[str, Any]]:
        return list(self._calls)

    @property
    def usages(self) -> list[dict[str, int]]:
        return list(self._usages)

    def reply(self, messages: list[BaseMessage]) -> AIMessage:
        n = 2 + words(prompt_text(messages)) % 5
        return AIMessage(content=" ".join(["word"] * n))

    def usage_for(self, messages: list[BaseMessage], message: AIMessage) -> dict[str, int]:
        inp = 2 * words(prompt_text(messages)) + 5
        out = words(message.content) if isinstance(message.content, str) else 0
        out += 7 * len(message.tool_calls)
        return {"input_tokens": inp, "output_tokens": out, "total_tokens": inp + out}

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> ChatResult:
        self._calls.append(kwargs)
        message = self.reply(messages)
        usage = self.usage_for(messages, message)
        message.usage_metadata = usage  # type: ignore[assignment]
        message.response_metadata = {"model_name": f"{self.model}-2024-07-18"}
        self._usages.append(usage)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> Iterator[ChatGenerationChunk]:
        self._calls.append(kwargs)
        message = self.reply(messages)
        usage = self.usage_for(messages, message)
        content = message.content
        assert isinstance(content, str)
        parts = list(itertools.chain.from_iterable((w, " ") for w in content.split()))[:-1]
        for i, part in enumerate(parts):
            out = 1 if part.strip() else 0
            inp = usage["input_tokens"] if i == 0 else 0
            chunk = AIMessageChunk(
                content=part,
                usage_metadata={"input_tokens": inp, "output_tokens": out, "total_tokens": inp + out},
                chunk_position="last" if i == len(parts) - 1 else None,
            )
            yield ChatGenerationChunk(message=chunk)
        self._usages.append(usage)


class ToolCallingChatModel(UsageChatModel):
    """A model that never answers: every call asks for a tool (cycling through `tool_names`), with fresh call ids."""

    tool_names: list[str] = Field(default_factory=lambda: ["search"])
    fixed_usage: dict[str, int] | None = None  # report this usage on every call (else it grows with the prompt)
    _ids: Any = PrivateAttr(default_factory=itertools.count)
    _lock: Any = PrivateAttr(default_factory=threading.Lock)

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    def reply(self, messages: list[BaseMessage]) -> AIMessage:
        with self._lock:
            n = next(self._ids)
        name = self.tool_names[n % len(self.tool_names)]
        return AIMessage(content="", tool_calls=[{"name": name, "args": {"query": f"q{n}"}, "id": f"call_{n:04d}"}])

    def usage_for(self, messages: list[BaseMessage], message: AIMessage) -> dict[str, int]:
        return dict(self.fixed_usage) if self.fixed_usage else super().usage_for(messages, message)


class NoUsageChatModel(UsageChatModel):
    """A provider that reports no usage at all."""

    def usage_for(self, messages: list[BaseMessage], message: AIMessage) -> dict[str, int]:
        return {}

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> ChatResult:
        result = super()._generate(messages, stop, run_manager, **kwargs)
        result.generations[0].message.usage_metadata = None  # type: ignore[union-attr]
        return result


class FailingChatModel(UsageChatModel):
    """The provider fails (after being called)."""

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> ChatResult:
        self._calls.append(kwargs)
        raise ConnectionError("provider unavailable")

    def _stream(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> Iterator[ChatGenerationChunk]:
        self._calls.append(kwargs)
        raise ConnectionError("provider unavailable")
        yield  # a generator


class UsageLLM(FakeListLLM):
    """A legacy text-completion LLM reporting OpenAI-style `llm_output["token_usage"]` per prompt."""

    model_name: str = MODEL
    responses: list[str] = Field(default_factory=lambda: ["a completion of five words"])
    _prompts: list[str] = PrivateAttr(default_factory=list)

    @property
    def calls(self) -> int:
        return len(self._prompts)

    def usage(self, prompt: str) -> TokenUsage:
        return TokenUsage(input_tokens=words(prompt) + 3, output_tokens=5)

    def _generate(self, prompts: list[str], stop: Any = None, run_manager: Any = None, **kwargs: Any) -> LLMResult:
        result = super()._generate(prompts, stop=stop, run_manager=run_manager, **kwargs)
        self._prompts.extend(prompts)
        usage = self.usage(prompts[0])
        result.llm_output = {
            "token_usage": {"prompt_tokens": usage.input_tokens, "completion_tokens": usage.output_tokens},
            "model_name": self.model_name,
        }
        return result
