"""What observability costs: side by side in one run, on the embedded SQLite file ledger.

- a guarded call (reserve + commit) with no opentelemetry, with the API but no SDK (non-recording spans), and with
  the SDK recording every span (BatchSpanProcessor into memory);
- a denied reserve, which now writes its reservation.denied event (and one queued delivery per subscription), with
  0 and with 5 matching webhook subscriptions;
- one runtime request's Prometheus bookkeeping (latency histogram + decision counter), per process and in the
  multiprocess mode of `cycles serve --workers N`.

Run: python benchmarks/observability.py [--calls N] [--no-record]
"""

from __future__ import annotations

import sys

sys.path.append(sys.path.pop(0))  # this folder last: benchmarks/http.py must not shadow the stdlib `http` package

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from _report import record

import cycles
from cycles import telemetry

ROUNDS = 5


def p50_us(fn, calls: int) -> float:
    """Median over interleavable rounds of each round's p50, in µs."""
    rounds = []
    for _ in range(ROUNDS):
        samples = []
        for _ in range(calls // ROUNDS):
            t0 = time.perf_counter_ns()
            fn()
            samples.append(time.perf_counter_ns() - t0)
        rounds.append(statistics.median(samples) / 1000)
    return statistics.median(rounds)


def guarded_calls(directory: Path, calls: int) -> dict[str, float]:
    client = cycles.Client(store=f"sqlite:///{directory / 'guard.db'}", tenant="bench", journal=False)
    client.budgets.set("tenant:bench", cycles.usd(10**6))

    def call() -> None:
        with client.reserve(cycles.usd(0.01), action=("tool.search", "web")) as r:
            r.commit(cycles.usd(0.005))

    out = {}
    telemetry._off, telemetry._tracer = True, None
    out["no opentelemetry"] = p50_us(call, calls)
    telemetry._off = False
    out["opentelemetry-api, no SDK"] = p50_us(call, calls)
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))  # the usual setup: export off the call's thread
    trace.set_tracer_provider(provider)
    out["SDK recording every span (BatchSpanProcessor)"] = p50_us(call, calls)
    provider.shutdown()
    client.close()
    return out


def denials(directory: Path, calls: int) -> dict[str, float]:
    from cycles.ledger import Ledger, SQLiteStore
    from cycles.ledger.webhooks import Webhooks

    out = {}
    for subscriptions in (0, 5):
        ledger = Ledger(SQLiteStore(directory / f"deny{subscriptions}.db"))
        ledger.admin.create_budget({"scope": "tenant:bench", "unit": "USD_MICROCENTS",
                                    "allocated": {"unit": "USD_MICROCENTS", "amount": 10}})  # fmt: skip
        hooks = Webhooks(ledger, allow_private=True)
        for i in range(subscriptions):
            hooks.create({"url": f"http://127.0.0.1:9/{i}", "event_types": ["reservation.denied"]}, tenant=None)
        counter = iter(range(10**9))

        def deny(ledger: Ledger = ledger, counter=counter) -> None:  # type: ignore[no-untyped-def]
            try:
                ledger.reserve({"idempotency_key": f"k{next(counter)}", "subject": {"tenant": "bench"},
                                "action": {"kind": "tool", "name": "x"},
                                "estimate": {"unit": "USD_MICROCENTS", "amount": 1000}})  # fmt: skip
            except cycles.BudgetExceeded:
                pass

        out[f"{subscriptions} subscriptions"] = p50_us(deny, calls)
        ledger.store.close()
    return out


METRICS_SNIPPET = """
import time, statistics
from cycles.server import metrics
from cycles.models import ReservationCreateResponse
m = ReservationCreateResponse.model_validate({"decision": "ALLOW", "reservation_id": "r", "expires_at_ms": 1,
    "reserved": {"unit": "USD_MICROCENTS", "amount": 1}, "scope_path": "tenant:a", "affected_scopes": ["tenant:a"]})
rounds = []
for _ in range(5):
    t = time.perf_counter()
    for _ in range(20000):
        metrics.observe_call("POST", "/v1/reservations", 0.001, m)
    rounds.append((time.perf_counter() - t) / 20000 * 1e6)
print(statistics.median(rounds))
"""


def metrics_cost() -> dict[str, float]:
    out = {}
    for label, multiproc in (("one process", False), ("multiprocess mode (--workers N)", True)):
        here = str(Path(__file__).parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p and p != here)}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        with tempfile.TemporaryDirectory() as d:
            if multiproc:
                env["PROMETHEUS_MULTIPROC_DIR"] = d
            run = subprocess.run(
                [sys.executable, "-c", METRICS_SNIPPET], capture_output=True, text=True, env=env, cwd=d
            )
            if run.returncode != 0:
                raise RuntimeError(run.stderr)
            out[label] = float(run.stdout.strip())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=5_000)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        guard = guarded_calls(Path(d), args.calls)
        deny = denials(Path(d), args.calls)
    prom = metrics_cost()
    base = guard["no opentelemetry"]
    lines = ["| what | µs (p50) | vs. baseline |", "|---|---|---|"]
    for name, us in guard.items():
        lines.append(f"| guarded call (reserve + commit, SQLite file), {name} | {us:.0f} | {us / base:.2f}× |")
    first = deny["0 subscriptions"]
    for name, us in deny.items():
        lines.append(f"| denied reserve + its reservation.denied event, {name} | {us:.0f} | {us / first:.2f}× |")
    for name, us in prom.items():
        lines.append(f"| Prometheus bookkeeping of one runtime request, {name} | {us:.1f} | — |")
    load = os.getloadavg()[0]
    text = "\n".join(lines) + (
        f"\n\n{args.calls:,} calls per case in {ROUNDS} rounds (median of the rounds' p50). The event of a denial is "
        "written in the same transaction as the answer (the outbox); a subscription adds one queued delivery row. "
        f"Load average at the end: {load:.1f} (2 cores shared with other work)."
    )
    print(text)
    if not args.no_record:
        record("observability", text)


if __name__ == "__main__":
    main()
