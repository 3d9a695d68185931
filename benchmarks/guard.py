"""Guard overhead: a guarded no-op against a bare call on the embedded store (SQLite file and :memory:), and a call
drawn from a run budget. Prints the microseconds each adds per call (p50). Run: python benchmarks/guard.py."""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from _report import percentiles, record

import cycles

TARGETS_US = {"file": 400, "memory": 200, "run": 10}
ROUNDS = 5
EST = cycles.usd(0.01)


def noop() -> int:
    return 1


def timed(fn, calls: int) -> list[int]:
    clock = time.perf_counter_ns
    samples = []
    for _ in range(calls):
        t0 = clock()
        fn()
        samples.append(clock() - t0)
    return samples


def measure(store: str, calls: int) -> dict[str, float]:
    """Interleaved rounds (bare, guarded, drawn from a run), each case the median of its rounds' p50: the shared VM's
    speed moves minute to minute, and a case measured all at once would catch only one of its moods."""
    client = cycles.Client(store=store, tenant="bench")
    client.budgets.set("tenant:bench", cycles.usd(10**6))
    client.budgets.set("tenant:bench/workspace:w", cycles.usd(10**6))
    client.budgets.set("tenant:bench/workspace:w/agent:a", cycles.usd(10**6))
    guarded = cycles.guard(estimate=EST, action=("tool.noop", "noop"), client=client, workspace="w", agent="a")(noop)
    timed(guarded, 300)  # warm-up
    per_round = max(1, calls // ROUNDS)
    bare, guard, drawn = [], [], []
    for _ in range(ROUNDS):
        bare.append(percentiles(timed(noop, per_round))["p50_us"])
        guard.append(percentiles(timed(guarded, per_round))["p50_us"])
        with cycles.run(limit=cycles.usd(10**5), client=client, workspace="w", agent="a"):
            timed(guarded, 100)
            drawn.append(percentiles(timed(guarded, per_round * 5))["p50_us"])
    client.close()
    b = statistics.median(bare)
    return {"bare": b, "guarded": statistics.median(guard) - b, "run": statistics.median(drawn) - b}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=5_000)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        file = measure(f"sqlite:///{Path(tmp) / 'guard.db'}", args.calls)
        memory = measure("sqlite://:memory:", args.calls)
    ok = lambda value, target: "✓" if value <= target else "✗"  # noqa: E731
    lines = [
        "| what | µs added per call (p50) | target |",
        "|---|---|---|",
        f"| guarded call, SQLite file (reserve + commit) | {file['guarded']:.0f} | ≤ {TARGETS_US['file']} {ok(file['guarded'], TARGETS_US['file'])} |",
        f"| guarded call, :memory: (reserve + commit) | {memory['guarded']:.0f} | ≤ {TARGETS_US['memory']} {ok(memory['guarded'], TARGETS_US['memory'])} |",
        f"| call drawn from a run budget (:memory:) | {memory['run']:.1f} | ≤ {TARGETS_US['run']} {ok(memory['run'], TARGETS_US['run'])} |",
        f"| call drawn from a run budget (file) | {file['run']:.1f} | ≤ {TARGETS_US['run']} {ok(file['run'], TARGETS_US['run'])} |",
        "",
        f"Bare no-op call: {memory['bare']:.2f} µs. Guarded with `@cycles.guard` (3 budgeted levels); "
        f"{args.calls:,} calls each in {ROUNDS} interleaved rounds; per case the median of the rounds' p50, minus "
        f"the bare call's. Load average at the end: {os.getloadavg()[0]:.1f} (2 cores shared with other work).",
    ]
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        record("guard", table)


if __name__ == "__main__":
    main()
