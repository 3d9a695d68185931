"""OpenAI SDK guard overhead: the same `openai.OpenAI` client (over an in-process httpx2.MockTransport answering a
real-shaped chat completion at once) called plain and through `cycles_openai.guard(...)` on the embedded store
(:memory:), side by side in one process. Prints the microseconds the guard adds per call (p50), sync, async, streamed
and inside a run budget, against the floor measured in the same rounds: the SQLite statements of one reserve and one
commit with no Python around them (benchmarks/ledger.py's bare pair, :memory:). Target: added at most 2x the floor.
Run: python benchmarks/openai.py."""

from __future__ import annotations

import sys

sys.path.append(sys.path.pop(0))  # this folder last: this file must not shadow the `openai` package it measures

import argparse
import asyncio
import json
import os
import statistics
from collections import defaultdict
from typing import Any

import httpx2
import openai
from _report import Samples, atimed, bench_client, p50, record, timed
from cycles_openai import guard
from ledger import Bare

import cycles
from cycles.calls import ModelCall

TARGET_FLOOR_RATIO = 2.0
MODEL = "gpt-4o-mini"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about budgets."}]
USAGE = {"prompt_tokens": 42, "completion_tokens": 12, "total_tokens": 54}
ANSWER = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": MODEL,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "A short answer."}, "finish_reason": "stop"}
        ],
        "usage": USAGE,
    }
).encode()
CHUNK = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1_700_000_000, "model": MODEL}
SSE = (
    b"".join(
        f"data: {json.dumps(event)}\n\n".encode()
        for event in (
            {**CHUNK, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "A short"}}]},
            {**CHUNK, "choices": [{"index": 0, "delta": {"content": " answer."}, "finish_reason": "stop"}]},
            {**CHUNK, "choices": [], "usage": USAGE},
        )
    )
    + b"data: [DONE]\n\n"
)
JSON = {"content-type": "application/json"}
EVENTS = {"content-type": "text/event-stream"}


def provider(request: httpx2.Request) -> httpx2.Response:
    """Answers at once: the JSON completion, or the SSE stream when asked to stream."""
    if b'"stream":true' in request.content.replace(b" ", b""):
        return httpx2.Response(200, headers=EVENTS, content=SSE)
    return httpx2.Response(200, headers=JSON, content=ANSWER)


ROUNDS = 10


def measure(calls: int) -> dict[str, tuple[float, float]]:
    """Per case, the median over ROUNDS rounds of each round's p50 (wall, CPU)."""
    client = bench_client()
    plain = openai.OpenAI(api_key="sk-bench", http_client=httpx2.Client(transport=httpx2.MockTransport(provider)))
    guarded = guard(plain, client, workspace="w", agent="a")
    aplain = openai.AsyncOpenAI(
        api_key="sk-bench", http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(provider))
    )
    aguarded = guard(aplain, client, workspace="w", agent="a")
    sql = Bare(":memory:")
    per_round = max(1, calls // ROUNDS)
    rounds: dict[str, list[tuple[float, float]]] = defaultdict(list)

    def call(llm: Any) -> Any:
        return lambda: llm.chat.completions.create(model=MODEL, messages=MESSAGES)

    def stream(llm: Any) -> Any:
        def go() -> None:
            for _ in llm.chat.completions.create(
                model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
            ):
                pass

        return go

    def acall(llm: Any) -> Any:
        async def go() -> Any:
            return await llm.chat.completions.create(model=MODEL, messages=MESSAGES)

        return go

    settings = guarded.cycles

    def core() -> Any:  # the same reservation made with the core primitive directly around the plain client
        call = ModelCall(client, MODEL, prompt=MESSAGES, pricing=settings.pricing, subject=settings.subject).begin()
        answer = plain.chat.completions.create(model=MODEL, messages=MESSAGES)
        call.output("", answer.usage)
        call.finish()
        return answer

    def keep(samples: dict[str, Samples], prefix: str = "") -> None:
        for name, s in samples.items():
            rounds[prefix + name].append(p50(s))

    for i in range(ROUNDS + 1):
        warm_up = i == 0  # the first round only warms up
        n = 200 if warm_up else per_round
        together = timed({"bare": call(plain), "guarded": call(guarded), "core": core, "sql": lambda: sql.pairs(1)}, n)
        streamed = timed({"bare": stream(plain), "guarded": stream(guarded)}, max(1, n // 2))
        with cycles.run(limit=cycles.usd(10**5), client=client, workspace="w", agent="a"):
            in_run = timed({"bare": call(plain), "guarded": call(guarded)}, n)
        in_async = asyncio.run(atimed({"bare": acall(aplain), "guarded": acall(aguarded)}, n))
        if not warm_up:
            keep(together)
            keep(streamed, "stream_")
            keep(in_run, "run_")
            keep(in_async, "async_")
    assert client.reservations(status="ACTIVE") == []
    client.close()
    return {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in rounds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=3_000)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    m = measure(args.calls)
    floor = m["sql"][0]
    rows = [
        ("chat.completions.create, :memory: (reserve + commit)", "bare", "guarded"),
        ("async create, :memory: (reserve + commit)", "async_bare", "async_guarded"),
        ("create(stream=True), read to the end", "stream_bare", "stream_guarded"),
        ("create inside `cycles.run(limit=...)` (drawn in process)", "run_bare", "run_guarded"),
    ]
    lines = [
        "| call, p50 | unguarded µs | guarded µs | µs added per call | added / floor | target ≤ 2x floor "
        "| CPU µs added |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, without, with_ in rows:
        (w0, c0), (w1, c1) = m[without], m[with_]
        added = w1 - w0
        ratio = added / floor
        ok = "✓" if ratio <= TARGET_FLOOR_RATIO else "✗"
        lines.append(f"| {label} | {w0:.0f} | {w1:.0f} | {added:.0f} | {ratio:.2f}x | {ok} | {c1 - c0:.0f} |")
    lines += [
        "",
        f"Floor, measured in the same rounds: the SQLite statements of one reserve and one commit with no Python "
        f"around them (benchmarks/ledger.py's bare pair, :memory:): **{floor:.0f} µs**. Of the create row's added "
        f"time, the integration's own share (guarded minus the same `cycles.calls.ModelCall` made directly around the "
        f"plain client): **{m['guarded'][0] - m['core'][0]:.0f} µs** wall, {m['guarded'][1] - m['core'][1]:.0f} µs CPU; "
        "the rest is the core's pricing, reserve and commit.",
        "",
        "The same `openai.OpenAI` / `AsyncOpenAI` client over an in-process `httpx2.MockTransport` that answers a "
        "real-shaped chat completion (or SSE stream) at once, plain and guarded (`cycles_openai.guard`), 3 budgeted "
        "levels, estimate priced from the messages (genai-prices, gpt-4o-mini), commit priced from `usage`. "
        f"{args.calls:,} calls per case in {ROUNDS} rounds, the cases of a round called in turn, call by call; per "
        "case the median of the rounds' p50, added = guarded minus unguarded (wall clock; the CPU column is this "
        f"thread's CPU time). Load average at the end: {os.getloadavg()[0]:.1f} (2 cores shared with other work: "
        "absolute figures move run to run).",
    ]
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        record("openai", table)


if __name__ == "__main__":
    main()
