"""LangChain handler overhead: a `prompt | fake chat model | parser` chain invoked with and without
`CyclesCallbackHandler` on the embedded store (:memory:), side by side in one process. Prints the ratio and the
microseconds the handler adds per call (p50; target: at most 200), also under ainvoke and inside a run budget.
Run: python benchmarks/langchain.py."""

from __future__ import annotations

import sys

sys.path.append(sys.path.pop(0))  # this folder last: the sibling http.py must not shadow the stdlib `http` package

import argparse
import asyncio
import os
import statistics
import time
from typing import Any

from _report import percentiles, record
from cycles_langchain import CyclesCallbackHandler
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.prompts import ChatPromptTemplate
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


class Samples:
    """Wall time and this thread's CPU time per call (CPU time does not count waiting for a core, so it stays
    meaningful on a loaded machine)."""

    def __init__(self) -> None:
        self.wall: list[int] = []
        self.cpu: list[int] = []

    def __iadd__(self, other: Samples) -> Samples:
        self.wall += other.wall
        self.cpu += other.cpu
        return self


def timed(fn: Any, calls: int) -> Samples:
    wall, cpu, out = time.perf_counter_ns, time.thread_time_ns, Samples()
    for _ in range(calls):
        t0, c0 = wall(), cpu()
        fn()
        out.cpu.append(cpu() - c0)
        out.wall.append(wall() - t0)
    return out


async def atimed(fn: Any, calls: int) -> Samples:
    wall, cpu, out = time.perf_counter_ns, time.thread_time_ns, Samples()
    for _ in range(calls):
        t0, c0 = wall(), cpu()
        await fn()
        out.cpu.append(cpu() - c0)
        out.wall.append(wall() - t0)
    return out


def p50(samples: Samples) -> tuple[float, float]:
    return percentiles(samples.wall)["p50_us"], percentiles(samples.cpu)["p50_us"]


ROUNDS = 10


def measure(calls: int) -> dict[str, tuple[float, float]]:
    """Per case, the median over ROUNDS interleaved rounds of each round's p50 (wall, CPU): drift and load spikes
    hit every case of a round alike."""
    client = cycles.Client(store="sqlite://:memory:", tenant="bench")
    for scope in ("tenant:bench", "tenant:bench/workspace:w", "tenant:bench/workspace:w/agent:a"):
        client.budgets.set(scope, cycles.usd(10**6))
    prompt = ChatPromptTemplate.from_messages([("system", "Be brief."), ("human", "Tell me about {topic}.")])
    chain = prompt | FakeModel() | StrOutputParser()
    handler = CyclesCallbackHandler(client, workspace="w", agent="a")
    x = {"topic": "budgets"}
    bare_cfg: dict[str, Any] = {}
    guarded_cfg = {"callbacks": [handler]}
    per_round = max(1, calls // ROUNDS)
    rounds: dict[str, list[tuple[float, float]]] = {k: [] for k in ("bare", "guarded", "run", "abare", "aguarded")}

    def bare() -> Any:
        return chain.invoke(x, bare_cfg)

    def guarded() -> Any:
        return chain.invoke(x, guarded_cfg)

    async def abare() -> Any:
        return await chain.ainvoke(x, bare_cfg)

    async def aguarded() -> Any:
        return await chain.ainvoke(x, guarded_cfg)

    async def async_round(warm_up: bool) -> None:
        n = 100 if warm_up else per_round
        samples = (await atimed(abare, n), await atimed(aguarded, n))
        if not warm_up:
            rounds["abare"].append(p50(samples[0]))
            rounds["aguarded"].append(p50(samples[1]))

    for i in range(ROUNDS + 1):
        warm_up = i == 0  # the first round only warms up
        n = 200 if warm_up else per_round
        b, g = timed(bare, n), timed(guarded, n)
        with cycles.run(limit=cycles.usd(10**5), client=client, workspace="w", agent="a"):
            r = timed(guarded, n)
        asyncio.run(async_round(warm_up))
        if not warm_up:
            rounds["bare"].append(p50(b))
            rounds["guarded"].append(p50(g))
            rounds["run"].append(p50(r))
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
        ("ainvoke, :memory: (reserve + commit)", "abare", "aguarded"),
        ("invoke inside `cycles.run(limit=...)` (drawn in process)", "bare", "run"),
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
    lines += [
        "",
        "`prompt | fake chat model (reports usage_metadata) | StrOutputParser`, 3 budgeted levels, estimate priced "
        f"from the prompt (genai-prices, gpt-4o-mini), commit priced from usage. {args.calls:,} calls per case in "
        f"{ROUNDS} interleaved rounds; per case the median of the rounds' p50, added = with minus without (wall "
        "clock; the CPU column is this thread's CPU time, which does not count waiting for a core). Load average "
        f"at the end: {os.getloadavg()[0]:.1f} (2 cores shared with other work: absolute figures move run to run).",
    ]
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        record("langchain", table)


if __name__ == "__main__":
    main()
