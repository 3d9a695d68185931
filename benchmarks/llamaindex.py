"""LlamaIndex handler overhead: `llm.chat(messages)` on a fake LLM (answers at once, reports OpenAI-style usage)
with and without `CyclesCallbackHandler` on its CallbackManager, on the embedded store (:memory:), side by side in
one process; also under achat and inside a run budget.

It measures the floor under any per-call reservation here in the same rounds: what LlamaIndex itself adds for a
handler that does nothing (its CallbackManager dispatch to a handler with the same event filters), plus what the
SQLite statements of one reserve and one commit cost with no Python logic around them (benchmarks/ledger.py's bare
pair, :memory:). Target: the handler adds at most 2x that floor. Run: python benchmarks/llamaindex.py."""

from __future__ import annotations

import sys

sys.path.append(sys.path.pop(0))  # this folder last: the sibling http.py must not shadow the stdlib `http` package

import argparse
import asyncio
import os
import random
import statistics
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from _report import Samples, atimed, bench_client, p50, record, timed
from cycles_llamaindex import CyclesCallbackHandler
from ledger import Bare
from llama_index.core.callbacks import CallbackManager, CBEventType
from llama_index.core.callbacks.base_handler import BaseCallbackHandler
from llama_index.core.llms import (
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    CustomLLM,
    LLMMetadata,
)
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback

import cycles
from cycles.calls import ModelCall

TARGET_RATIO = 2.0  # the handler's added time, at most this times the floor
USAGE = {"prompt_tokens": 42, "completion_tokens": 12, "total_tokens": 54}
IGNORED = [event for event in CBEventType if event is not CBEventType.LLM]


class FakeLLM(CustomLLM):
    """A provider that answers at once and reports usage (chat and completion implemented directly, as real
    provider integrations do)."""

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name="gpt-4o-mini", num_output=256, is_chat_model=True)

    def _answer(self) -> ChatResponse:
        return ChatResponse(
            message=ChatMessage(role="assistant", content="a short answer of some words"),
            raw={"model": "gpt-4o-mini-2024-07-18", "usage": USAGE},
        )

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._answer()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._answer()

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return CompletionResponse(text="a short answer", additional_kwargs=dict(USAGE))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        yield self.complete(prompt)


class NoopHandler(BaseCallbackHandler):
    """LlamaIndex's own cost of a handler: CyclesCallbackHandler's event filters, doing nothing."""

    def __init__(self) -> None:
        super().__init__(event_starts_to_ignore=IGNORED, event_ends_to_ignore=IGNORED)

    def on_event_start(
        self, event_type: Any, payload: Any = None, event_id: str = "", parent_id: str = "", **kw: Any
    ) -> str:
        return event_id

    def on_event_end(self, event_type: Any, payload: Any = None, event_id: str = "", **kwargs: Any) -> None:
        pass

    def start_trace(self, trace_id: str | None = None) -> None:
        pass

    def end_trace(self, trace_id: str | None = None, trace_map: Any = None) -> None:
        pass


ROUNDS = 10


def measure(calls: int) -> dict[str, tuple[float, float]]:
    """Per case, the median over ROUNDS rounds of each round's p50 (wall, CPU); within a round the cases are called
    in turn, call by call, so that drift and load spikes hit them alike."""
    client = bench_client()
    handler = CyclesCallbackHandler(client, workspace="w", agent="a")
    plain = FakeLLM(callback_manager=CallbackManager([]))
    guarded_llm = FakeLLM(callback_manager=CallbackManager([handler]))
    noop_llm = FakeLLM(callback_manager=CallbackManager([NoopHandler()]))
    messages = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="Tell me about budgets."),
    ]
    per_round = max(1, calls // ROUNDS)
    rounds: dict[str, list[tuple[float, float]]] = defaultdict(list)
    sql = Bare(":memory:")

    def bare() -> Any:
        return plain.chat(messages)

    def guarded() -> Any:
        return guarded_llm.chat(messages)

    def noop() -> Any:
        return noop_llm.chat(messages)

    subject = handler.subject

    def core() -> Any:  # the same reservation made with the core primitive directly, no LlamaIndex handler
        call = ModelCall(client, "gpt-4o-mini", prompt=messages, max_output_tokens=256, subject=subject).begin()
        response = plain.chat(messages)
        call.output("", response.raw["usage"])
        call.finish()
        return response

    async def abare() -> Any:
        return await plain.achat(messages)

    async def aguarded() -> Any:
        return await guarded_llm.achat(messages)

    def keep(samples: dict[str, Samples], prefix: str = "") -> None:
        for name, s in samples.items():
            rounds[prefix + name].append(p50(s))

    for i in range(ROUNDS + 1):
        warm_up = i == 0  # the first round only warms up
        n = 200 if warm_up else per_round
        cases = [("bare", bare), ("guarded", guarded), ("noop", noop), ("core", core), ("sql", lambda: sql.pairs(1))]
        random.Random(i).shuffle(cases)  # each round in another order: no case always follows the same one
        together = timed(dict(cases), n)
        # the dispatch cost is a few µs: measured apart from the cases that run SQLite, whose cache churn would
        # otherwise land on whichever case follows them
        dispatch = timed(dict(random.Random(-i).sample([("bare", bare), ("noop", noop)], 2)), n)
        with cycles.run(limit=cycles.usd(10**5), client=client, workspace="w", agent="a"):
            in_run = timed({"bare": bare, "guarded": guarded}, n)
        in_async = asyncio.run(atimed({"bare": abare, "guarded": aguarded}, n))
        if not warm_up:
            keep(together)
            keep(dispatch, "dispatch_")
            keep(in_run, "run_")
            keep(in_async, "async_")
    assert client.reservations(status="ACTIVE") == [] and handler.in_flight() == 0
    client.close()
    return {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in rounds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=5_000)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    m = measure(args.calls)
    # the floor comparisons use CPU time: on this shared machine wall time waits for a core at random
    dispatch, sql = m["dispatch_noop"][1] - m["dispatch_bare"][1], m["sql"][1]
    floor = dispatch + sql
    ok = lambda added: "✓" if added <= TARGET_RATIO * floor else "✗"  # noqa: E731
    rows = [
        ("chat, :memory: (reserve + commit)", "bare", "guarded"),
        ("achat, :memory: (reserve + commit)", "async_bare", "async_guarded"),
        ("chat inside `cycles.run(limit=...)` (drawn in process)", "run_bare", "run_guarded"),
    ]
    lines = [
        "| LLM call, p50 | without handler µs | with handler µs | ratio | µs added per call | CPU µs added "
        "| CPU added / floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, without, with_ in rows:
        (w0, c0), (w1, c1) = m[without], m[with_]
        added, cpu_added = w1 - w0, c1 - c0
        vs = f"{cpu_added / floor:.2f}x" + (f" {ok(cpu_added)}" if "run" not in without else "")
        lines.append(f"| {label} | {w0:.0f} | {w1:.0f} | {w1 / w0:.2f}x | {added:.0f} | {cpu_added:.0f} | {vs} |")
    added = m["guarded"][1] - m["bare"][1]
    integration = m["guarded"][1] - m["core"][1]
    lines += [
        "",
        "The floor under any per-call reservation, measured in the same rounds, in CPU time (target: added ≤ "
        f"{TARGET_RATIO:g}x floor):",
        "",
        "| part of the chat row's added CPU time | µs |",
        "|---|---|",
        f"| LlamaIndex's CallbackManager dispatch to a handler that does nothing | {dispatch:.0f} |",
        f"| the SQLite statements of one reserve and one commit, no Python around them | {sql:.0f} |",
        f"| floor: the two together | {floor:.0f} |",
        f"| cycles' own Python: handler, pricing, guard, client, ledger rules (added minus floor) | {added - floor:.0f} |",
        f"| of which the handler's own mapping (added minus the same `ModelCall` made directly) | {integration:.0f} |",
        "",
        "`FakeLLM.chat` (a CustomLLM implementing chat directly, reporting `raw['usage']`), 3 budgeted levels, "
        "estimate priced from the messages plus `num_output` (genai-prices, gpt-4o-mini), commit priced from the "
        f"usage. {args.calls:,} calls per case in {ROUNDS} rounds, the cases of a round called in turn, call by call, in an order shuffled each round; "
        "per case the median of the rounds' p50, added = with minus without (wall clock; the CPU column is this "
        "thread's CPU time). The handler's stream listener sits on the root dispatcher in every case (it is "
        "process-wide), so its per-event type check is in all rows alike. Load average at the end: "
        f"{os.getloadavg()[0]:.1f} (2 cores shared with other work: absolute figures move run to run).",
    ]
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        record("llamaindex", table)


if __name__ == "__main__":
    main()
