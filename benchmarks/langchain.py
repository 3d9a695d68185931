"""LangChain handler overhead: a `prompt | fake chat model | parser` chain invoked with and without
`CyclesCallbackHandler` on the embedded store (:memory:), side by side in one process. Prints the ratio and the
microseconds the handler adds per call (p50; target: at most 200), also under ainvoke and inside a run budget.

It also measures the floor under any per-call reservation here, in the same rounds: what LangChain itself adds for a
handler that does nothing (its callback dispatch, the same handler flags), and what the SQLite statements of one
reserve and one commit cost with no Python logic around them (benchmarks/ledger.py's bare pair, :memory:).
Run: python benchmarks/langchain.py."""

from __future__ import annotations

import sys

sys.path.append(sys.path.pop(0))  # this folder last: the sibling http.py must not shadow the stdlib `http` package

import argparse
import asyncio
import os
import statistics
from collections import defaultdict
from typing import Any

from _report import Samples, atimed, bench_client, p50, record, timed
from cycles_langchain import CyclesCallbackHandler
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.prompts import ChatPromptTemplate
from ledger import Bare
from pydantic import Field

import cycles

TARGET_US = 200
USAGE = {"input_tokens": 42, "output_tokens": 12, "total_tokens": 54}


class FakeModel(GenericFakeChatModel):
    """A provider that answers at once and reports usage."""

    model: str = "gpt-4o-mini"
    messages: Any = Field(default_factory=lambda: iter(()))

    def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None, **kwargs: Any) -> ChatResult:
        message = AIMessage(content="a short answer of some words", usage_metadata=dict(USAGE))  # type: ignore[arg-type]
        return ChatResult(generations=[ChatGeneration(message=message)])


class NoopHandler(BaseCallbackHandler):
    """LangChain's own cost of a handler: CyclesCallbackHandler's flags and model events, doing nothing."""

    raise_error = run_inline = True
    ignore_chain = ignore_retriever = ignore_retry = ignore_custom_event = True
    ignore_llm = ignore_chat_model = ignore_agent = False

    def on_chat_model_start(self, serialized: Any, messages: Any, *, run_id: Any, **kwargs: Any) -> None:
        pass

    def on_llm_end(self, response: Any, *, run_id: Any, **kwargs: Any) -> None:
        pass


ROUNDS = 10


def measure(calls: int) -> dict[str, tuple[float, float]]:
    """Per case, the median over ROUNDS rounds of each round's p50 (wall, CPU); within a round the cases are called
    in turn, call by call, so that drift and load spikes hit them alike."""
    client = bench_client()
    prompt = ChatPromptTemplate.from_messages([("system", "Be brief."), ("human", "Tell me about {topic}.")])
    chain = prompt | FakeModel() | StrOutputParser()
    handler = CyclesCallbackHandler(client, workspace="w", agent="a")
    x = {"topic": "budgets"}
    bare_cfg: dict[str, Any] = {}
    guarded_cfg = {"callbacks": [handler]}
    per_round = max(1, calls // ROUNDS)
    rounds: dict[str, list[tuple[float, float]]] = defaultdict(list)
    noop_cfg = {"callbacks": [NoopHandler()]}
    sql = Bare(":memory:")

    def bare() -> Any:
        return chain.invoke(x, bare_cfg)

    def guarded() -> Any:
        return chain.invoke(x, guarded_cfg)

    def noop() -> Any:
        return chain.invoke(x, noop_cfg)

    async def abare() -> Any:
        return await chain.ainvoke(x, bare_cfg)

    async def aguarded() -> Any:
        return await chain.ainvoke(x, guarded_cfg)

    def keep(samples: dict[str, Samples], prefix: str = "") -> None:
        for name, s in samples.items():
            rounds[prefix + name].append(p50(s))

    for i in range(ROUNDS + 1):
        warm_up = i == 0  # the first round only warms up
        n = 200 if warm_up else per_round
        together = timed({"bare": bare, "guarded": guarded, "noop": noop, "sql": lambda: sql.pairs(1)}, n)
        with cycles.run(limit=cycles.usd(10**5), client=client, workspace="w", agent="a"):
            in_run = timed({"bare": bare, "guarded": guarded}, n)
        in_async = asyncio.run(atimed({"bare": abare, "guarded": aguarded}, n))
        if not warm_up:
            keep(together)
            keep(in_run, "run_")
            keep(in_async, "async_")
    assert client.reservations(status="ACTIVE") == []
    client.close()
    return {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in rounds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=5_000)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    m = measure(args.calls)
    ok = lambda value: "✓" if value <= TARGET_US else "✗"  # noqa: E731
    rows = [
        ("invoke, :memory: (reserve + commit)", "bare", "guarded"),
        ("ainvoke, :memory: (reserve + commit)", "async_bare", "async_guarded"),
        ("invoke inside `cycles.run(limit=...)` (drawn in process)", "run_bare", "run_guarded"),
    ]
    lines = [
        "| chain call, p50 | without handler µs | with handler µs | ratio | µs added per call | target "
        "| CPU µs added |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, without, with_ in rows:
        (w0, c0), (w1, c1) = m[without], m[with_]
        added = w1 - w0
        target = f"≤ {TARGET_US} {ok(added)}"
        lines.append(f"| {label} | {w0:.0f} | {w1:.0f} | {w1 / w0:.2f}x | {added:.0f} | {target} | {c1 - c0:.0f} |")
    dispatch, sql = m["noop"][0] - m["bare"][0], m["sql"][0]
    added = m["guarded"][0] - m["bare"][0]
    lines += [
        "",
        "The floor under any per-call reservation, measured in the same rounds:",
        "",
        "| part of the invoke row's added time | µs |",
        "|---|---|",
        f"| LangChain's callback dispatch for a handler that does nothing | {dispatch:.0f} |",
        f"| the SQLite statements of one reserve and one commit, no Python around them | {sql:.0f} |",
        f"| floor: the two together | {dispatch + sql:.0f} |",
        f"| cycles' own Python: pricing, guard, client, ledger rules (added minus floor) | {added - dispatch - sql:.0f} |",
    ]
    lines += [
        "",
        "`prompt | fake chat model (reports usage_metadata) | StrOutputParser`, 3 budgeted levels, estimate priced "
        f"from the prompt (genai-prices, gpt-4o-mini), commit priced from usage. {args.calls:,} calls per case in "
        f"{ROUNDS} rounds, the cases of a round called in turn, call by call; per case the median of the rounds' p50, "
        "added = with minus without (wall "
        "clock; the CPU column is this thread's CPU time, which does not count waiting for a core). Load average "
        f"at the end: {os.getloadavg()[0]:.1f} (2 cores shared with other work: absolute figures move run to run).",
    ]
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        record("langchain", table)


if __name__ == "__main__":
    main()
