"""Ledger throughput: reserve+commit pairs per second, one thread, a 3-level hierarchy, on a SQLite file and in
memory, with p50/p99 per operation, side by side with a bare SQLite pair: the same statements on the same schema with
no Python logic at all (the floor for any ledger on this machine). Run: python benchmarks/ledger.py [--pairs N].

With `--store redis://host:port/0` (it is flushed!) it compares the stores' CPU instead, as `cycles serve` runs them
(its collector tuning too): calls in batches of 16 (`Store.batch`: one transaction on SQLite, one round trip on Redis), CPU time of this thread
per reserve+commit pair, for the SQLite file, that Redis and the bare pair, interleaved rounds (section
"ledger-stores" of RESULTS.md). The ledger minus the bare pair is what the rules and records cost in Python: what
any store adds to it is the store's own.

The machine is a shared 2-core VM whose speed moves minute to minute, so each store runs in interleaved rounds
(ledger, then bare) and the table reports the median round, with the slowest and fastest rounds beside it."""

from __future__ import annotations

import sys

sys.path.append(sys.path.pop(0))  # this folder last: the sibling http.py must not shadow the stdlib `http` package

import argparse
import os
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _report import percentiles, record

from cycles.ledger import Ledger, SQLiteStore
from cycles.ledger.sqlite import _BUDGET_COLS, _INSERT_RESERVATION, SCHEMA
from cycles.models import Action, Amount, CommitRequest, ReservationCreateRequest, Subject

SCOPES = ["tenant:acme", "tenant:acme/workspace:prod", "tenant:acme/workspace:prod/agent:bot"]
USD = "USD_MICROCENTS"
TARGETS = {"file": 3_000, "memory": 6_000}
ROUNDS = 5


def connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    if path != ":memory:":
        db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    return db


class Bare:
    """The ledger's hot-path statements with constant values: reserve = BEGIN IMMEDIATE, one update per budgeted
    level, the reservation insert, COMMIT; commit = BEGIN IMMEDIATE, the level updates, the reservation update,
    COMMIT."""

    MOVE = "UPDATE budgets SET reserved = reserved + ?, spent = spent + ?, debt = debt + ? WHERE scope = ? AND unit = ?"
    SETTLE = (
        "UPDATE reservations SET status = ?, expires_at_ms = ?, extensions = ?, committed = ?, finalized_at_ms = ?, "
        "committed_metadata = ?, finalize_key = ?, finalize_fingerprint = ?, finalize_response = ? "
        "WHERE reservation_id = ?"
    )

    def __init__(self, path: str) -> None:
        self.db = connect(path)
        self.db.executescript(SCHEMA)
        for scope in SCOPES:
            values = (scope, USD, "acme", "led", 10**15, 0, 0, 0, 0, 0, "ACTIVE", None, "NONE", None, None, None, 0, 0)
            self.db.execute(f"INSERT INTO budgets ({_BUDGET_COLS}) VALUES ({','.join('?' * 18)})", values)
        self.seq = 0

    def pairs(self, n: int, batch: int = 1) -> float:
        """n pairs; `batch` reserves in one transaction, then their commits in another (the server's batches)."""
        db, start = self.db, time.perf_counter()
        fp = "f" * 64
        for _ in range(n // batch):
            held = []
            db.execute("BEGIN IMMEDIATE")
            for _ in range(batch):
                self.seq += 1
                rid, now = f"res_{self.seq:025x}", 1_763_900_000_000 + self.seq
                db.executemany(self.MOVE, [(5_000_000, 0, 0, scope, USD) for scope in SCOPES])
                db.execute(
                    _INSERT_RESERVATION,
                    (
                        rid, "acme", f"r{self.seq}", '{"tenant":"acme","workspace":"prod","agent":"bot"}',
                        '{"kind":"llm.completion","name":"gpt-4o"}', USD, 5_000_000, SCOPES[-1], '["' + '","'.join(SCOPES) + '"]',
                        "ACTIVE", now, now + 60_000, 0, "ALLOW_IF_AVAILABLE", 0, None, fp, '{"decision":"ALLOW"}',
                        "prod", None, None, "bot", None,
                    ),
                )  # fmt: skip
                held.append((rid, now))
            db.execute("COMMIT")
            db.execute("BEGIN IMMEDIATE")
            for rid, now in held:
                db.executemany(self.MOVE, [(-5_000_000, 3_100_000, 0, scope, USD) for scope in SCOPES])
                db.execute(self.SETTLE, ("COMMITTED", now + 60_000, 0, 3_100_000, now, None, f"c{rid}", fp, "{}", rid))
            db.execute("COMMIT")
        return n // batch * batch / (time.perf_counter() - start)


class Pairs:
    """The real ledger: Ledger.reserve then Ledger.commit, requests built inside the timed loop."""

    def __init__(self, path: str) -> None:
        self.ledger = Ledger(SQLiteStore(path))
        for scope in SCOPES:
            self.ledger.admin.create_budget({"scope": scope, "unit": USD, "allocated": {"unit": USD, "amount": 10**15}})
        self.seq = 0
        self.reserve_ns: list[int] = []
        self.commit_ns: list[int] = []

    def pairs(self, n: int) -> float:
        ledger, clock = self.ledger, time.perf_counter_ns
        subject = Subject(tenant="acme", workspace="prod", agent="bot")
        action = Action(kind="llm.completion", name="gpt-4o")
        estimate, actual = Amount(unit=USD, amount=5_000_000), Amount(unit=USD, amount=3_100_000)
        start = time.perf_counter()
        for _ in range(n):
            self.seq += 1
            request = ReservationCreateRequest(
                idempotency_key=f"r{self.seq}", subject=subject, action=action, estimate=estimate
            )
            t0 = clock()
            r = ledger.reserve(request)
            t1 = clock()
            ledger.commit(r.reservation_id, CommitRequest(idempotency_key=f"c{self.seq}", actual=actual))  # type: ignore[arg-type]
            t2 = clock()
            self.reserve_ns.append(t1 - t0)
            self.commit_ns.append(t2 - t1)
        return n / (time.perf_counter() - start)


def measure(name: str, tmp: str, pairs: int) -> dict[str, float]:
    path = lambda stem: ":memory:" if name == "memory" else str(Path(tmp) / f"{stem}.db")  # noqa: E731
    ledger, bare = Pairs(path("ledger")), Bare(path("bare"))
    ledger.pairs(500), bare.pairs(500)  # warm-up
    ledger.reserve_ns.clear(), ledger.commit_ns.clear()
    per_round = max(1, pairs // ROUNDS)
    rates, floors = [], []
    for _ in range(ROUNDS):
        rates.append(ledger.pairs(per_round))
        floors.append(bare.pairs(per_round))
    res, com = percentiles(ledger.reserve_ns), percentiles(ledger.commit_ns)
    ledger.ledger.store.close()
    bare.db.close()
    return {
        "rate": statistics.median(rates), "low": min(rates), "high": max(rates), "bare": statistics.median(floors),
        "reserve_p50": res["p50_us"], "reserve_p99": res["p99_us"], "commit_p50": com["p50_us"],
        "commit_p99": com["p99_us"],
    }  # fmt: skip


BATCH = 16


def batched_cpu(ledger: Ledger, pairs: int, seq: list[int]) -> float:
    """CPU µs per pair (this thread) of `pairs` reserve+commit pairs in batches of BATCH, as the server runs them."""
    subject = Subject(tenant="acme", workspace="prod", agent="bot")
    action = Action(kind="llm.completion", name="gpt-4o")
    estimate, actual = Amount(unit=USD, amount=5_000_000), Amount(unit=USD, amount=3_100_000)
    store = ledger.store
    start = time.thread_time_ns()
    for _ in range(pairs // BATCH):
        ids = []
        with store.batch() as batch:
            for _ in range(BATCH):
                seq[0] += 1
                request = ReservationCreateRequest(
                    idempotency_key=f"r{seq[0]}", subject=subject, action=action, estimate=estimate
                )
                ids.append(ledger.reserve(request).reservation_id)
        assert batch is None or not batch.failed  # one process: nothing to conflict with
        with store.batch() as batch:
            for rid in ids:
                seq[0] += 1
                ledger.commit(rid, CommitRequest(idempotency_key=f"c{seq[0]}", actual=actual))  # type: ignore[arg-type]
        assert batch is None or not batch.failed
    return (time.thread_time_ns() - start) / (pairs // BATCH * BATCH) / 1000


class LeastRedis:
    """The bare pair's counterpart on Redis: what any store that keeps these records in Redis must send per
    operation, with no Python logic around it: one script per operation (three budget counters moved, the
    reservation written, its TTL index), 16 operations per round trip, the replies read. No versions, no checks, no
    cache: a bound, not a store."""

    SCRIPT = """
    for i = 1, 3 do redis.call('HINCRBY', KEYS[i], 'r', ARGV[1]) redis.call('HINCRBY', KEYS[i], 's', ARGV[2]) end
    redis.call('HSET', KEYS[4], 'd', ARGV[3])
    if ARGV[4] == '1' then redis.call('ZADD', KEYS[5], ARGV[5], KEYS[4]) else redis.call('ZREM', KEYS[5], KEYS[4]) end
    return 0
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        self.sha = client.script_load(self.SCRIPT)
        self.budgets = [f"{{t:acme}}:b:{USD}:{scope}" for scope in SCOPES]
        self.seq = 0

    def pairs(self, n: int, batch: int = BATCH) -> None:
        fp = "f" * 64
        for _ in range(n // batch):
            held = []
            pipe = self.client.pipeline(transaction=False)
            for _ in range(batch):
                self.seq += 1
                rid, now = f"res_{self.seq:025x}", 1_763_900_000_000 + self.seq
                record = (
                    f'{{"reservation_id":"{rid}","tenant":"acme","idempotency_key":"r{self.seq}","subject":{{"tenant":'
                    f'"acme","workspace":"prod","agent":"bot"}},"action":{{"kind":"llm.completion","name":"gpt-4o"}},'
                    f'"unit":"{USD}","estimate":5000000,"status":"ACTIVE","created_at_ms":{now},"expires_at_ms":'
                    f'{now + 60_000},"reserve_fingerprint":"{fp}","reserve_response":"{{\\"decision\\":\\"ALLOW\\"}}"}}'
                )
                key = f"{{t:acme}}:r:{rid}"
                pipe.evalsha(self.sha, 5, *self.budgets, key, "{t:acme}:ttl", 5_000_000, 0, record, "1", now + 60_000)
                held.append((key, record))
            pipe.execute()
            pipe = self.client.pipeline(transaction=False)
            for key, record in held:
                settled = record.replace('"ACTIVE"', '"COMMITTED"')
                pipe.evalsha(self.sha, 5, *self.budgets, key, "{t:acme}:ttl", -5_000_000, 3_100_000, settled, "0", 0)
            pipe.execute()


def compare_stores(url: str, pairs: int, record_it: bool) -> None:
    import redis

    from cycles.ledger import open_store
    from cycles.server.app import tune_gc

    tune_gc()  # the collector as `cycles serve` runs it

    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    with tempfile.TemporaryDirectory() as tmp:
        ledgers = {"SQLite file": Pairs(str(Path(tmp) / "ledger.db")).ledger, "Redis": Ledger(open_store(url))}
        for scope in SCOPES:
            ledgers["Redis"].admin.create_budget(
                {"scope": scope, "unit": USD, "allocated": {"unit": USD, "amount": 10**15}}
            )
        bare = Bare(str(Path(tmp) / "bare.db"))
        least = LeastRedis(redis.Redis.from_url(url))
        seq = [0]
        per_round = max(BATCH, pairs // ROUNDS)
        cpu: dict[str, list[float]] = {name: [] for name in [*ledgers, "bare pair", "least Redis pair"]}
        for ledger in ledgers.values():
            batched_cpu(ledger, 1_000, seq)  # warm-up
        bare.pairs(1_000, BATCH)
        least.pairs(1_000)
        for _ in range(ROUNDS):
            for name, ledger in ledgers.items():
                cpu[name].append(batched_cpu(ledger, per_round, seq))
            for name, floor in (("bare pair", bare), ("least Redis pair", least)):
                start = time.thread_time_ns()
                floor.pairs(per_round, BATCH)
                cpu[name].append((time.thread_time_ns() - start) / (per_round // BATCH * BATCH) / 1000)
        for ledger in ledgers.values():
            ledger.store.close()
        bare.db.close()
        least.client.close()
    med = {name: statistics.median(values) for name, values in cpu.items()}
    rules = med["SQLite file"] - med["bare pair"]
    lines = [
        "| ledger, batches of 16 | CPU µs per pair (median round) | slowest / fastest round | beyond the rules |",
        "|---|---|---|---|",
    ]
    for name, values in cpu.items():
        beyond = f"{med[name] - rules:.0f}" if name in ledgers else "—"
        lines.append(f"| {name} | {med[name]:.0f} | {max(values):.0f} / {min(values):.0f} | {beyond} |")
    lines.append(
        f"\n{pairs:,} pairs per row in {ROUNDS} rounds, rows interleaved, one thread, three budgeted levels; CPU time "
        "of this thread (redis-server's own is not counted). The rules and records cost the SQLite ledger minus the "
        f"bare pair, about {rules:.0f} µs; 'beyond the rules' is each store's own share: SQLite's statements, or the "
        "Redis store's versioned records, commit plan, script payloads, round trip and replies. The least Redis pair "
        "is the bare pair's counterpart (benchmarks/ledger.py LeastRedis): the same writes as one script per "
        "operation, 16 to a round trip, with no versions, checks or cache: the floor under any Redis store's share. "
        f"Load average at the end: {os.getloadavg()[0]:.1f}."
    )
    table = "\n".join(lines)
    print(table)
    if record_it:
        record("ledger-stores", table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=20_000)
    parser.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--store", help="redis://host:port/db: compare the stores' CPU per pair (it is flushed!)")
    args = parser.parse_args()
    if args.store:
        compare_stores(args.store, args.pairs, not args.no_record)
        return
    with tempfile.TemporaryDirectory() as tmp:
        rows = [(name, measure(name, tmp, args.pairs)) for name in ("file", "memory")]
    lines = [
        "| store | reserve+commit pairs/s (median round) | slowest / fastest round | target | bare SQLite pairs/s "
        "| ledger / bare | reserve p50 / p99 µs | commit p50 / p99 µs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in rows:
        ok = "✓" if s["rate"] >= TARGETS[name] else "✗"
        lines.append(
            f"| {name} | {s['rate']:,.0f} | {s['low']:,.0f} / {s['high']:,.0f} | {TARGETS[name]:,} {ok} "
            f"| {s['bare']:,.0f} | {s['rate'] / s['bare']:.2f} | {s['reserve_p50']:.0f} / {s['reserve_p99']:.0f} "
            f"| {s['commit_p50']:.0f} / {s['commit_p99']:.0f} |"
        )
    lines.append(
        f"\n{args.pairs:,} pairs per store in {ROUNDS} rounds, one thread, three budgeted levels, each operation its "
        "own BEGIN IMMEDIATE transaction (WAL, synchronous=NORMAL on the file). The bare pair runs the ledger's own "
        "statements (three budget updates and the reservation insert, then three budget updates and the reservation "
        "update) with no Python logic. Load average at the end: "
        f"{os.getloadavg()[0]:.1f} (2 cores shared with other work: absolute figures move run to run). Reference: "
        "the Java reference server's best published reserve+commit is 14.9 ms p50 over HTTP."
    )
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        record("ledger", table)


if __name__ == "__main__":
    main()
