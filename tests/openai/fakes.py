"""A fake OpenAI-compatible provider behind `httpx2.MockTransport`: real `openai` clients talk to it over the SDK's
own HTTP stack and get real-shaped JSON and SSE back (chat completions, responses, embeddings). Only the provider is
fake: it counts the requests that reached it, keeps the JSON bodies it was sent and the usage it billed."""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx2
import openai

from cycles.pricing import prompt_text

MODEL = "gpt-4o-mini"  # priced from the genai-prices catalog
EMBEDDING_MODEL = "text-embedding-3-small"


def words(text: str) -> int:
    return len(text.split())


class FakeOpenAI:
    """Answers `reply` (or a tool call when `tool_call` names a tool); bills input tokens = 2 x prompt words + 5 (of
    which `cached` are cached), output tokens = reply words (+ 7 per tool call, + `reasoning`).

    `fail(n, status)` makes the next n requests answer `status` (with a retry-after of 1 ms so the SDK retries at
    once)."""

    def __init__(self, reply: str = "Budgets keep agents honest.", *, cached: int = 0, reasoning: int = 0) -> None:
        self.reply = reply
        self.cached = cached
        self.reasoning = reasoning
        self.tool_call: str | None = None
        self.ending = "completed"  # how a responses stream ends: completed, incomplete or failed
        self.failed_usage = True  # a failed response still reports what it used
        self.cut_after: int | None = None  # drop the connection after this many stream events
        self.requests: list[dict[str, Any]] = []  # every JSON body that reached the provider (retries included)
        self.billed: list[dict[str, int]] = []  # usage of every answer it produced
        self._failures: list[int] = []
        self._lock = threading.Lock()
        self._ids = 0

    # ------------------------------------------------------------------------------------------- clients
    def transport(self) -> httpx2.MockTransport:
        return httpx2.MockTransport(self.handle)

    def client(self, **kwargs: Any) -> openai.OpenAI:
        http = httpx2.Client(transport=self.transport(), base_url="https://api.openai.test/v1")
        return openai.OpenAI(api_key="sk-test", base_url="https://api.openai.test/v1", http_client=http, **kwargs)

    def async_client(self, **kwargs: Any) -> openai.AsyncOpenAI:
        http = httpx2.AsyncClient(transport=self.transport(), base_url="https://api.openai.test/v1")
        return openai.AsyncOpenAI(api_key="sk-test", base_url="https://api.openai.test/v1", http_client=http, **kwargs)

    def fail(self, times: int = 1, status: int = 500) -> None:
        self._failures.extend([status] * times)

    @property
    def calls(self) -> int:
        return len(self.requests)

    # ------------------------------------------------------------------------------------------- answers
    def usage_for(self, prompt: Any, output: str, tool_calls: int = 0) -> dict[str, int]:
        inp = 2 * words(prompt_text(prompt)) + 5
        out = words(output) + 7 * tool_calls + self.reasoning
        return {"input": inp, "output": out}

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content) if request.content else {}
        with self._lock:
            self.requests.append(body)
            self._ids += 1
            n = self._ids
            status = self._failures.pop(0) if self._failures else None
        if status is not None:
            error = {"error": {"message": "overloaded", "type": "server_error", "code": None}}
            return httpx2.Response(status, json=error, headers={"retry-after-ms": "1"})
        path = request.url.path  # /v1/chat/completions, or Azure's /openai/deployments/<model>/chat/completions
        if path.endswith("/chat/completions"):
            return self.chat(body, n)
        if path.endswith("/responses"):
            return self.responses(body, n)
        if path.endswith("/embeddings"):
            return self.embeddings(body)
        if path.endswith("/completions"):
            return self.completions(body, n)
        return httpx2.Response(404, json={"error": {"message": f"no route {path}", "type": "invalid_request_error"}})

    def _bill(self, usage: dict[str, int]) -> None:
        with self._lock:
            self.billed.append(usage)

    def chat_usage(self, usage: dict[str, int]) -> dict[str, Any]:
        return {
            "prompt_tokens": usage["input"],
            "completion_tokens": usage["output"],
            "total_tokens": usage["input"] + usage["output"],
            "prompt_tokens_details": {"cached_tokens": min(self.cached, usage["input"]), "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning, "audio_tokens": 0},
        }

    def chat(self, body: dict[str, Any], n: int) -> httpx2.Response:
        model = body.get("model", MODEL)
        tool = self.tool_call if body.get("tools") else None
        text = "" if tool else self.reply
        usage = self.usage_for(body.get("messages"), text, 1 if tool else 0)
        base = {"id": f"chatcmpl-{n}", "created": 1_700_000_000, "model": f"{model}-2024-07-18"}
        calls = [
            {
                "index": 0,
                "id": f"call_{n:04d}",
                "type": "function",
                "function": {"name": tool, "arguments": json.dumps({"query": f"q{n}"})},
            }
        ]
        if not body.get("stream"):
            self._bill(usage)
            message: dict[str, Any] = {"role": "assistant", "content": text or None, "refusal": None}
            if tool:
                message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
            choice = {"index": 0, "message": message, "finish_reason": "tool_calls" if tool else "stop"}
            answer = {**base, "object": "chat.completion", "choices": [choice], "usage": self.chat_usage(usage)}
            return httpx2.Response(200, json=answer)
        include = (body.get("stream_options") or {}).get("include_usage")
        chunk = {**base, "object": "chat.completion.chunk"}
        events = [{**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
        if tool:
            events.append({**chunk, "choices": [{"index": 0, "delta": {"tool_calls": calls}}]})
        for i, word in enumerate(text.split()):
            events.append({**chunk, "choices": [{"index": 0, "delta": {"content": (" " if i else "") + word}}]})
        events.append(
            {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls" if tool else "stop"}]}
        )
        if include:
            events.append({**chunk, "choices": [], "usage": self.chat_usage(usage)})
        return self._sse(events, lambda: self._bill(usage), named=False)

    def responses(self, body: dict[str, Any], n: int) -> httpx2.Response:
        model = body.get("model", MODEL)
        prompt = [v for k in ("instructions", "input") if (v := body.get(k)) is not None]
        usage = self.usage_for(prompt, self.reply)
        item = {
            "type": "message",
            "id": f"msg_{n}",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": self.reply, "annotations": []}],
        }
        response = {
            "id": f"resp_{n}",
            "object": "response",
            "created_at": 1_700_000_000,
            "model": f"{model}-2024-07-18",
            "status": "completed",
            "output": [item],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": {
                "input_tokens": usage["input"],
                "output_tokens": usage["output"],
                "total_tokens": usage["input"] + usage["output"],
                "input_tokens_details": {"cached_tokens": min(self.cached, usage["input"])},
                "output_tokens_details": {"reasoning_tokens": self.reasoning},
            },
        }
        if body.get("background"):
            return httpx2.Response(200, json={**response, "status": "queued", "output": [], "usage": None})
        if not body.get("stream"):
            self._bill(usage)
            return httpx2.Response(200, json=response)
        started = {**response, "status": "in_progress", "output": [], "usage": None}
        empty = {**item, "status": "in_progress", "content": []}
        part = {"type": "output_text", "text": "", "annotations": []}
        common = {"item_id": item["id"], "output_index": 0, "content_index": 0}
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": started},
            {"type": "response.in_progress", "response": started},
            {"type": "response.output_item.added", "output_index": 0, "item": empty},
            {"type": "response.content_part.added", **common, "part": part},
        ]
        for i, word in enumerate(self.reply.split()):
            events.append({"type": "response.output_text.delta", **common, "delta": (" " if i else "") + word})
        events += [
            {"type": "response.output_text.done", **common, "text": self.reply},
            {"type": "response.content_part.done", **common, "part": item["content"][0]},
            {"type": "response.output_item.done", "output_index": 0, "item": item},
            {"type": f"response.{self.ending}", "response": self._ended(response)},
        ]
        for i, event in enumerate(events):
            event["sequence_number"] = i
        return self._sse(events, lambda: self._bill(usage), named=True)

    def _ended(self, response: dict[str, Any]) -> dict[str, Any]:
        if self.ending == "incomplete":
            return {**response, "status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}}
        if self.ending == "failed":
            error = {"code": "server_error", "message": "the model crashed"}
            usage = response["usage"] if self.failed_usage else None
            return {**response, "status": "failed", "error": error, "output": [], "usage": usage}
        return response

    def completions(self, body: dict[str, Any], n: int) -> httpx2.Response:
        """The legacy text completions route."""
        usage = self.usage_for(body.get("prompt"), self.reply)
        self._bill(usage)
        choice = {"index": 0, "text": self.reply, "finish_reason": "stop", "logprobs": None}
        answer = {"id": f"cmpl-{n}", "object": "text_completion", "created": 1_700_000_000, "model": body["model"]}
        return httpx2.Response(200, json={**answer, "choices": [choice], "usage": self.chat_usage(usage)})

    def embeddings(self, body: dict[str, Any]) -> httpx2.Response:
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        tokens = sum(len(t) if isinstance(t, list) else words(t) + 1 for t in inputs)  # token ids count as given
        self._bill({"input": tokens, "output": 0})
        data = [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(inputs))]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return httpx2.Response(200, json={"object": "list", "data": data, "model": body["model"], "usage": usage})

    def _sse(self, events: list[dict[str, Any]], done: Any, *, named: bool) -> httpx2.Response:
        cut = self.cut_after

        def lines() -> Any:
            for i, event in enumerate(events):
                if cut is not None and i == cut:
                    raise httpx2.ReadError("connection reset by peer")
                prefix = f"event: {event['type']}\n" if named else ""
                yield f"{prefix}data: {json.dumps(event)}\n\n".encode()
            if self.ending == "completed" or self.failed_usage:
                done()  # billed once the provider produced every token
            if not named:
                yield b"data: [DONE]\n\n"

        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, stream=_Body(lines()))


class _Body(httpx2.SyncByteStream, httpx2.AsyncByteStream):
    """An SSE body sent chunk by chunk, to sync and async clients alike."""

    def __init__(self, chunks: Any) -> None:
        self._chunks = chunks

    def __iter__(self) -> Any:
        yield from self._chunks

    async def __aiter__(self) -> Any:
        for chunk in self._chunks:
            yield chunk
