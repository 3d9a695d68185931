"""Fake providers for the LlamaIndex tests: a FunctionCallingLLM and an embedding model that report usage the way
real ones do (token counts in a response's `raw` usage or `additional_kwargs`, cumulative on streamed chunks) and
count the calls that reached the "provider". Only the provider is fake; everything around it is llama-index-core."""

from __future__ import annotations

import asyncio
import itertools
import re
import threading
import time
from collections.abc import AsyncGenerator, Generator, Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.llms import CustomLLM
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.tools import ToolSelection

from cycles.pricing import prompt_text

MODEL = "gpt-4o-mini"  # priced from the genai-prices catalog
EMBEDDING_MODEL = "text-embedding-3-small"


def words(text: str) -> int:
    return len(text.split())


class UsageLLM(FunctionCallingLLM):
    """Answers "word word ..." (2 to 6 words); reports input tokens = 2 x prompt words + 5, output tokens = reply
    words (+7 per tool call): chat in `raw["usage"]` (OpenAI style), completions in `additional_kwargs`. Streams
    word by word, every chunk with the usage so far. With `tool_names`, every chat given tools asks for a tool."""

    model: str = MODEL
    num_output: int = 256
    tool_names: list[str] = Field(default_factory=list)
    max_tool_calls: int | None = None  # then it answers in text
    fixed_usage: dict[str, int] | None = None  # report this usage on every call (else it grows with the prompt)
    react_tool: str | None = None  # answer in ReAct text instead: always "Action: <react_tool>" (up to max_tool_calls)
    fail: bool = False  # the provider fails (after being called)
    report: bool = True  # False: a provider that reports no usage at all
    delay: float = 0.0  # seconds achat, or a stream before its first chunk, waits

    _calls: list[dict[str, Any]] = PrivateAttr(default_factory=list)  # kwargs of every call the provider saw
    _usages: list[dict[str, int]] = PrivateAttr(default_factory=list)  # usage reported per completed call
    _ids: Any = PrivateAttr(default_factory=itertools.count)
    _lock: Any = PrivateAttr(default_factory=threading.Lock)

    @classmethod
    def class_name(cls) -> str:
        return "UsageLLM"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            model_name=self.model, num_output=self.num_output, is_chat_model=True, is_function_calling_model=True
        )

    @property
    def calls(self) -> int:
        return len(self._calls)

    @property
    def call_kwargs(self) -> list[dict[str, Any]]:
        return list(self._calls)

    @property
    def usages(self) -> list[dict[str, int]]:
        return list(self._usages)

    # ------------------------------------------------------------------------------------------ the "provider"
    def _answer(self, prompt: Any, kwargs: dict[str, Any]) -> tuple[str, list[ToolSelection], dict[str, int]]:
        with self._lock:
            self._calls.append(dict(kwargs))
            n = next(self._ids)
        if self.fail:
            raise ConnectionError("provider unavailable")
        calls: list[ToolSelection] = []
        more_tools = self.max_tool_calls is None or n < self.max_tool_calls
        if self.tool_names and kwargs.get("tools") and more_tools:
            name = self.tool_names[n % len(self.tool_names)]
            calls = [ToolSelection(tool_id=f"call_{n:04d}", tool_name=name, tool_kwargs={"query": f"q{n}"})]
            text = ""
        elif self.react_tool and more_tools:
            text = f'Thought: I need a tool.\nAction: {self.react_tool}\nAction Input: {{"query": "q{n}"}}'
        elif self.react_tool:
            text = "Thought: I can answer without using any more tools.\nAnswer: word word"
        else:
            text = " ".join(["word"] * (2 + words(prompt_text(prompt)) % 5))
        if self.fixed_usage:
            usage = dict(self.fixed_usage)
        else:
            usage = {
                "prompt_tokens": 2 * words(prompt_text(prompt)) + 5,
                "completion_tokens": words(text) + 7 * len(calls),
            }
        return text, calls, usage

    def _done(self, usage: dict[str, int]) -> None:
        with self._lock:
            self._usages.append(usage)

    def _chat(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatResponse:
        text, calls, usage = self._answer(messages, kwargs)
        self._done(usage)
        extra = {"tool_calls": calls} if calls else {}
        message = ChatMessage(role=MessageRole.ASSISTANT, content=text, additional_kwargs=extra)
        raw = {"model": f"{self.model}-2024-07-18", "usage": usage} if self.report else {}
        return ChatResponse(message=message, raw=raw)

    def _chunks(
        self, prompt: Any, kwargs: dict[str, Any]
    ) -> Generator[tuple[str, str, dict[str, int], dict[str, Any]]]:
        """(delta, text so far, usage so far, message extras): one chunk a word; the last carries the tool calls."""
        text, calls, usage = self._answer(prompt, kwargs)
        if self.delay:
            time.sleep(self.delay)
        parts = re.findall(r"\s*\S+", text) or [""]  # a word and the white space before it
        said = ""
        for i, delta in enumerate(parts):
            said += delta
            last = i == len(parts) - 1
            so_far = usage if last else {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": i + 1}
            yield delta, said, so_far if self.report else {}, {"tool_calls": calls} if last and calls else {}
        self._done(usage)

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._chat(messages, kwargs)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        if self.delay:
            await asyncio.sleep(self.delay)
        return self._chat(messages, kwargs)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        def gen() -> ChatResponseGen:
            for delta, said, usage, extra in self._chunks(messages, kwargs):
                yield ChatResponse(
                    message=ChatMessage(role="assistant", content=said, additional_kwargs=extra),
                    delta=delta,
                    raw={"usage": usage},
                )

        return gen()

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        async def gen() -> AsyncGenerator[ChatResponse, None]:
            for delta, said, usage, extra in self._chunks(messages, kwargs):
                yield ChatResponse(
                    message=ChatMessage(role="assistant", content=said, additional_kwargs=extra),
                    delta=delta,
                    raw={"usage": usage},
                )

        return gen()

    def _complete(self, prompt: str, kwargs: dict[str, Any]) -> CompletionResponse:
        text, _, usage = self._answer(prompt, kwargs)
        self._done(usage)
        return CompletionResponse(text=text, additional_kwargs=dict(usage) if self.report else {})

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._complete(prompt, kwargs)

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._complete(prompt, kwargs)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        def gen() -> CompletionResponseGen:
            for delta, said, usage, _ in self._chunks(prompt, kwargs):
                yield CompletionResponse(text=said, delta=delta, additional_kwargs=usage)

        return gen()

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        async def gen() -> AsyncGenerator[CompletionResponse, None]:
            for delta, said, usage, _ in self._chunks(prompt, kwargs):
                yield CompletionResponse(text=said, delta=delta, additional_kwargs=usage)

        return gen()

    # ----------------------------------------------------------------------------------------- tool calling
    def _prepare_chat_with_tools(
        self,
        tools: Sequence[Any],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(ChatMessage(role="user", content=user_msg) if isinstance(user_msg, str) else user_msg)
        return {"messages": messages, "tools": [t.metadata.to_openai_tool() for t in tools], **kwargs}

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        calls = response.message.additional_kwargs.get("tool_calls", [])
        if not calls and error_on_no_tool_call:
            raise ValueError("no tool call")
        return calls


class DelegatingLLM(CustomLLM):
    """A stock CustomLLM: its chat and stream_chat go through its own complete / stream_complete (two LLM events
    for one provider call). Reports usage like UsageLLM's completions."""

    inner: UsageLLM = Field(default_factory=UsageLLM)

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name=self.inner.model, num_output=self.inner.num_output)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self.inner._complete(prompt, kwargs)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        def gen() -> CompletionResponseGen:
            for delta, said, usage, _ in self.inner._chunks(prompt, kwargs):
                yield CompletionResponse(text=said, delta=delta, additional_kwargs=usage)

        return gen()


class CountingEmbedding(MockEmbedding):
    """MockEmbedding that reports the tokens of every batch it embedded (one per word, + 1 per text)."""

    model_name: str = EMBEDDING_MODEL
    _batches: list[list[str]] = PrivateAttr(default_factory=list)
    _lock: Any = PrivateAttr(default_factory=threading.Lock)

    @staticmethod
    def tokens(texts: list[str]) -> int:
        return sum(words(t) + 1 for t in texts)

    @property
    def batches(self) -> list[list[str]]:
        return list(self._batches)

    def _record(self, texts: list[str]) -> None:
        with self._lock:
            self._batches.append(list(texts))

    def _get_query_embedding(self, query: str) -> list[float]:
        self._record([query])
        return super()._get_query_embedding(query)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        self._record([query])
        return super()._get_query_embedding(query)

    def _get_text_embedding(self, text: str) -> list[float]:
        self._record([text])
        return super()._get_text_embedding(text)

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        self._record(texts)
        return [super(CountingEmbedding, self)._get_text_embedding(t) for t in texts]

    async def _aget_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._get_text_embeddings(texts)
