"""How low can a guarded model call go? The least Python any embedded reserve+commit can run under protocol v0,
side by side with the bare SQLite pair (the floor the handler targets are ratios to) and with the real path, in one
process, CPU time, interleaved rounds.

The rows, each a reserve then a commit on three budgeted levels, :memory::
- bare: benchmarks/ledger.py's bare pair, the ledger's own SQL statements with constant values and no Python logic;
- least ledger: the same statements, plus only what any ledger must do per operation: a fingerprint of the request
  for idempotency (sha256 of its canonical JSON), the remaining-budget checks on in-memory counters, a sortable id,
  the response JSON stored for replays. No models, no records, no tenant, policy, overdraft or event rules, no
  retry or lock layers: a bound, not a ledger;
- least guarded call: the least ledger, plus the least a client guard does around a model call: the estimate priced
  from the prompt (cycles.pricing), the two protocol requests validated (pydantic, as every client sends them), the
  heartbeat watch, the usage normalised and priced;
- cycles ModelCall: the real thing (cycles.calls.ModelCall on cycles.Client's embedded ledger).

What it shows: the least guarded call already costs about twice the bare pair, so a target of "added at most 2x the
floor" leaves no room for the ledger's actual rules at all. Run: python benchmarks/bound.py [--calls N]."""

from __future__ import annotations

import sys

sys.path.append(sys.path.pop(0))  # this folder last: the sibling http.py must not shadow the stdlib `http` package

import argparse
import hashlib
import os
import statistics
import threading
import time
from typing import Any

from _report import bench_client, record
from ledger import SCOPES, USD, Bare, connect
from pydantic_core import to_json

from cycles.calls import ModelCall, action, estimate_call, priced_actual
from cycles.ids import new_id, new_key
from cycles.ledger.sqlite import _BUDGET_COLS, _INSERT_RESERVATION, SCHEMA
from cycles.models import CommitRequest, ReservationCreateRequest, Subject
from cycles.pricing import default_pricing, normalize_usage

MODEL = "gpt-4o-mini"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about budgets."}]
USAGE = {"prompt_tokens": 42, "completion_tokens": 12, "total_tokens": 54}
SUBJECT = {"tenant": "acme", "workspace": "prod", "agent": "bot"}


class Counters:
    __slots__ = ("scope", "allocated", "spent", "reserved", "debt", "status")

    def __init__(self, scope: str) -> None:
        self.scope, self.allocated, self.spent, self.reserved, self.debt, self.status = scope, 10**15, 0, 0, 0, "ACTIVE"


class LeastLedger:
    """The bare pair's statements with the least Python a ledger needs around them (module docstring)."""

    def __init__(self) -> None:
        self.db = connect(":memory:")
        self.db.executescript(SCHEMA)
        for scope in SCOPES:
            values = (scope, USD, "acme", "led", 10**15, 0, 0, 0, 0, 0, "ACTIVE", None, "NONE", None, None, None, 0, 0)
            self.db.execute(f"INSERT INTO budgets ({_BUDGET_COLS}) VALUES ({','.join('?' * 18)})", values)
        self.chain = [Counters(scope) for scope in SCOPES]
        self.lock = threading.Lock()
        self.holds: dict[str, int] = {}
        self.subject, self.action = to_json(SUBJECT).decode(), '{"kind":"llm.completion","name":"gpt-4o-mini"}'
        self.scopes = to_json(SCOPES).decode()

    def reserve(self, key: str, estimate: int) -> dict[str, Any]:
        request = {"idempotency_key": key, "subject": SUBJECT, "estimate": {"unit": USD, "amount": estimate}}
        fingerprint = hashlib.sha256(to_json(request)).hexdigest()
        with self.lock:
            db = self.db
            db.execute("BEGIN IMMEDIATE")
            try:
                for b in self.chain:
                    if b.status != "ACTIVE" or b.allocated - b.spent - b.reserved - b.debt < estimate:
                        raise RuntimeError("denied")
                now = time.time_ns() // 1_000_000
                rid = new_id("res_")
                body = {
                    "decision": "ALLOW", "reservation_id": rid, "reserved": {"unit": USD, "amount": estimate},
                    "expires_at_ms": now + 60_000, "remaining_ttl_ms": 60_000, "scope_path": SCOPES[-1],
                    "affected_scopes": SCOPES,
                }  # fmt: skip
                db.executemany(Bare.MOVE, [(estimate, 0, 0, b.scope, USD) for b in self.chain])
                db.execute(
                    _INSERT_RESERVATION,
                    (
                        rid, "acme", key, self.subject, self.action, USD, estimate, SCOPES[-1], self.scopes,
                        "ACTIVE", now, now + 60_000, 0, "ALLOW_IF_AVAILABLE", 0, None, fingerprint,
                        to_json(body).decode(), "prod", None, None, "bot", None,
                    ),
                )  # fmt: skip
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            for b in self.chain:
                b.reserved += estimate
            self.holds[rid] = estimate
        return body

    def commit(self, rid: str, key: str, actual: int) -> dict[str, Any]:
        fingerprint = hashlib.sha256(to_json({"idempotency_key": key, "actual": {"unit": USD, "amount": actual}}))
        with self.lock:
            db = self.db
            db.execute("BEGIN IMMEDIATE")
            estimate, now = self.holds.pop(rid), time.time_ns() // 1_000_000
            body = {"status": "COMMITTED", "charged": {"unit": USD, "amount": actual}}
            if actual < estimate:
                body["released"] = {"unit": USD, "amount": estimate - actual}
            db.executemany(Bare.MOVE, [(-estimate, actual, 0, b.scope, USD) for b in self.chain])
            db.execute(
                Bare.SETTLE,
                ("COMMITTED", now, 0, actual, now, None, key, fingerprint.hexdigest(), to_json(body).decode(), rid),
            )
            db.execute("COMMIT")
            for b in self.chain:
                b.reserved -= estimate
                b.spent += actual
        return body


def measure(calls: int, rounds: int) -> dict[str, float]:
    bare, least = Bare(":memory:"), LeastLedger()
    client = bench_client()
    pricing, call_action = default_pricing(), action("llm.completion", MODEL)
    subject = Subject.model_validate(SUBJECT)
    heartbeat = client.heartbeat

    class Held:  # what the heartbeat keeps alive
        ttl_ms = None

    def least_ledger() -> None:
        key = new_key()
        least.commit(least.reserve(key, 5_000_000)["reservation_id"], key + ":commit", 3_100_000)

    def least_guarded() -> None:
        estimate = estimate_call(pricing, None, USD, MODEL, MESSAGES, None, 256)
        key, held = new_key(), Held()
        ReservationCreateRequest.model_validate(
            {"idempotency_key": key, "subject": subject, "action": call_action, "estimate": estimate}
        )
        reserved = least.reserve(key, estimate.amount)
        heartbeat.watch(held, reserved["remaining_ttl_ms"], 0.0001)  # type: ignore[arg-type]
        actual = priced_actual(pricing, MODEL, estimate, normalize_usage(USAGE), MESSAGES, "")
        metrics = {"latency_ms": 0, "model_version": MODEL, "tokens_input": 42, "tokens_output": 12}
        request = {"idempotency_key": key + ":commit", "actual": {"unit": USD, "amount": actual}, "metrics": metrics}
        CommitRequest.model_validate(request)
        least.commit(reserved["reservation_id"], key + ":commit", actual)
        heartbeat.forget(held)  # type: ignore[arg-type]

    def model_call() -> None:
        call = ModelCall(
            client, MODEL, prompt=MESSAGES, max_output_tokens=256, subject={"workspace": "w", "agent": "a"}
        )
        call.begin()
        call.output("", USAGE)
        call.finish()

    cases = {"bare": lambda: bare.pairs(1), "least ledger": least_ledger, "least guarded call": least_guarded,
             "cycles ModelCall": model_call}  # fmt: skip
    for fn in cases.values():  # warm up
        for _ in range(500):
            fn()
    per_round = max(1, calls // rounds)
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            c0 = time.thread_time_ns()
            for _ in range(per_round):
                fn()
            samples[name].append((time.thread_time_ns() - c0) / per_round / 1000)
    client.close()
    return {name: statistics.median(v) for name, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    m = measure(args.calls, args.rounds)
    floor = m["bare"]
    lines = ["| reserve + commit, :memory: | CPU µs | ÷ bare pair |", "|---|---|---|"]
    lines += [f"| {name} | {us:.1f} | {us / floor:.2f}x |" for name, us in m.items()]
    lines += [
        "",
        f"{args.calls:,} pairs per row in {args.rounds} rounds, rows interleaved round by round; per row the median "
        "round's mean CPU time per pair (this thread). `least ledger` and `least guarded call` are bounds, not "
        "implementations: no tenant, policy, overdraft, event or replay rules (see the script's docstring). "
        f"Load average at the end: {os.getloadavg()[0]:.1f}.",
    ]
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        record("bound", table)


if __name__ == "__main__":
    main()
