"""Shared by the benchmark scripts: timing helpers and the RESULTS.md writer (one section per script)."""

from __future__ import annotations

import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).with_name("RESULTS.md")


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    """p50/p99 in microseconds."""
    ordered = sorted(samples_ns)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000  # noqa: E731
    return {"p50_us": pick(0.50), "p99_us": pick(0.99), "mean_us": statistics.fmean(ordered) / 1000}


class Samples:
    """Wall time and this thread's CPU time per call (CPU time does not count waiting for a core, so it stays
    meaningful on a loaded machine)."""

    def __init__(self) -> None:
        self.wall: list[int] = []
        self.cpu: list[int] = []


def timed(cases: dict[str, Any], calls: int) -> dict[str, Samples]:
    """Every case called in turn, call by call: the machine's speed drifts, and a drift then hits all cases alike."""
    wall, cpu, out = time.perf_counter_ns, time.thread_time_ns, {name: Samples() for name in cases}
    for _ in range(calls):
        for name, fn in cases.items():
            t0, c0 = wall(), cpu()
            fn()
            c1, t1 = cpu(), wall()
            out[name].cpu.append(c1 - c0)
            out[name].wall.append(t1 - t0)
    return out


async def atimed(cases: dict[str, Any], calls: int) -> dict[str, Samples]:
    """`timed` for coroutine functions."""
    wall, cpu, out = time.perf_counter_ns, time.thread_time_ns, {name: Samples() for name in cases}
    for _ in range(calls):
        for name, fn in cases.items():
            t0, c0 = wall(), cpu()
            await fn()
            c1, t1 = cpu(), wall()
            out[name].cpu.append(c1 - c0)
            out[name].wall.append(t1 - t0)
    return out


def p50(samples: Samples) -> tuple[float, float]:
    """(wall, CPU) p50 in microseconds."""
    return percentiles(samples.wall)["p50_us"], percentiles(samples.cpu)["p50_us"]


def bench_client() -> Any:
    """The embedded client every handler benchmark guards: :memory:, three budgeted levels (tenant, workspace w,
    agent a), funded far beyond what a run spends."""
    import cycles

    client = cycles.Client(store="sqlite://:memory:", tenant="bench")
    for scope in ("tenant:bench", "tenant:bench/workspace:w", "tenant:bench/workspace:w/agent:a"):
        client.budgets.set(scope, cycles.usd(10**6))
    return client


def machine() -> str:
    import os

    return (
        f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} cores, {platform.machine()}"
    )


def record(section: str, markdown: str) -> None:
    """Replace this script's section of RESULTS.md (keeps the other scripts' sections)."""
    text = (
        RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nEach section is rewritten by its script.\n"
    )
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    body = f"<!-- {section}:start -->\n## {section}\n\n_{stamp} · {machine()} · `python {' '.join(sys.argv)}`_\n\n{markdown.strip()}\n<!-- {section}:end -->"
    pattern = re.compile(rf"<!-- {re.escape(section)}:start -->.*?<!-- {re.escape(section)}:end -->", re.S)
    text = pattern.sub(lambda _m: body, text) if pattern.search(text) else text.rstrip() + "\n\n" + body + "\n"
    RESULTS.write_text(text)
