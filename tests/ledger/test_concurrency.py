"""Concurrency on a SQLite file and on a Redis store: no oversubscription (PROTOCOL.md section 8, invariants 4, 10,
11), exact settlement, idempotent races, and (SQLite) StoreBusy instead of a hang when another process holds the
write lock.

Hierarchy: tenant:acme / workspace:w / agent:a (and sibling agent:b). N reserves of X against a budget B, with B not
a multiple of X and N * X > B, must let exactly min(N, B // X) through, whatever the interleaving.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import random
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from cycles.errors import CyclesError, StoreBusy
from cycles.ledger import Ledger, SQLiteStore

from . import dump
from ._workers import hold_write_lock, open_shared_store, reserve_worker

USD = "USD_MICROCENTS"
ACTION = {"kind": "llm.completion", "name": "gpt-4o"}
T, W = "tenant:acme", "tenant:acme/workspace:w"
A, B_ = "tenant:acme/workspace:w/agent:a", "tenant:acme/workspace:w/agent:b"
SCOPES = [T, W, A, B_]
AGENT_A = {"tenant": "acme", "workspace": "w", "agent": "a"}
AGENT_B = {"tenant": "acme", "workspace": "w", "agent": "b"}
X = 70
BUDGET = 1_000  # 1000 // 70 == 14, 1000 % 70 == 20
N = 40  # 40 * 70 == 2800 > 1000
WINNERS = min(N, BUDGET // X)
THREADS = 8
ROOMY = 100 * BUDGET


def amt(n: int) -> dict[str, Any]:
    return {"unit": USD, "amount": n}


def reserve_request(key: str, subject: dict[str, str], estimate: int = X) -> dict[str, Any]:
    return {"idempotency_key": key, "subject": subject, "action": ACTION, "estimate": amt(estimate)}


@pytest.fixture
def sqlite_path(tmp_path: Path) -> str:
    return str(tmp_path / "ledger.db")


@pytest.fixture(params=["sqlite", "redis"])
def db_path(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where the ledgers of a test meet: a SQLite file, or a Redis URL (the session's redis-server, emptied)."""
    if request.param == "redis":
        return request.getfixturevalue("redis_url")
    return str(tmp_path / "ledger.db")


@pytest.fixture
def stores() -> Iterator[list[Any]]:
    """Every store a test opens, closed at the end."""
    opened: list[Any] = []
    yield opened
    for store in opened:
        store.close()


def open_ledger(path: str, clock: Callable[[], int], opened: list[Any], busy_timeout: float = 60.0) -> Ledger:
    store = open_shared_store(path, busy_timeout)
    opened.append(store)
    return Ledger(store, clock=clock)


def stored_rows(path: str) -> tuple[list[tuple[int, list[str]]], dict[str, int], int]:
    """Below the rules: (estimate, budgeted scopes) of each ACTIVE reservation, scope -> stored reserved, and the
    number of events."""
    if path.startswith("redis://"):
        import redis

        r = redis.Redis.from_url(path, decode_responses=True)
        try:
            hashes = {key: r.hgetall(key) for key in r.keys("{t:acme}:*") if r.type(key) == "hash"}
        finally:
            r.close()
        records = {key: json.loads(h["d"]) for key, h in hashes.items()}
        active = [
            (d["estimate"], d["budgeted_scopes"]) for k, d in records.items() if ":r:" in k and d["status"] == "ACTIVE"
        ]
        reserved = {}
        for key, h in hashes.items():
            if ":b:" in key:  # the counters the commit script moves live beside the record, remaining with them
                d, held, spent = records[key], int(h["r"]), int(h["s"])
                assert int(h["m"]) == d["allocated"] - spent - held - d["debt"], (key, h)
                reserved[d["scope"]] = held
        return active, reserved, sum(1 for k in records if ":e:" in k)
    db = sqlite3.connect(path)
    try:
        active = [
            (estimate, json.loads(scopes))
            for estimate, scopes in db.execute(
                "SELECT estimate, budgeted_scopes FROM reservations WHERE status='ACTIVE'"
            )
        ]
        reserved = dict(db.execute("SELECT scope, reserved FROM budgets").fetchall())
        return active, reserved, db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    finally:
        db.close()


def create_budgets(ledger: Ledger, tight: str) -> dict[str, int]:
    """A budget at every level; `tight` gets BUDGET, the others far more."""
    allocations = {scope: BUDGET if scope == tight else ROOMY for scope in SCOPES}
    for scope, allocated in allocations.items():
        ledger.admin.create_budget({"scope": scope, "unit": USD, "allocated": amt(allocated)}, tenant="acme")
    return allocations


def levels(ledger: Ledger) -> dict[str, dict[str, int]]:
    rows = ledger.balances({"tenant": "acme", "include_children": True}, tenant="acme").balances
    return {
        b.scope: {
            "allocated": b.allocated.amount, "spent": b.spent.amount, "reserved": b.reserved.amount,
            "debt": b.debt.amount, "remaining": b.remaining.amount,
        }
        for b in rows
    }  # fmt: skip


def check_levels(
    ledger: Ledger, path: str, allocations: dict[str, int], reserved: dict[str, int], spent: dict[str, int]
) -> None:
    """At every level: the ledger identity, the expected reserved and spent, no debt; raw rows agree."""
    seen = levels(ledger)
    assert set(seen) == set(SCOPES)
    for scope in SCOPES:
        b = seen[scope]
        assert b["remaining"] == b["allocated"] - b["spent"] - b["reserved"] - b["debt"], (scope, b)
        assert b == {
            "allocated": allocations[scope], "spent": spent[scope], "reserved": reserved[scope], "debt": 0,
            "remaining": allocations[scope] - spent[scope] - reserved[scope],
        }, scope  # fmt: skip
    active, stored_reserved, _events = stored_rows(path)
    held = Counter[str]()
    for estimate, scopes in active:
        for scope in scopes:
            held[scope] += estimate
    assert set(stored_reserved) == set(SCOPES)
    for scope, stored in stored_reserved.items():
        assert stored == held[scope], (scope, stored, held[scope])


def run_threads(tasks: list[Callable[[], Any]], threads: int = THREADS) -> list[tuple[str, Any]]:
    """Run the tasks on `threads` threads released together; each result is ("ok", value) or ("err", code)."""
    barrier = threading.Barrier(min(threads, len(tasks)))

    def call(task: Callable[[], Any]) -> tuple[str, Any]:
        try:
            return "ok", task()
        except CyclesError as exc:
            return "err", exc.code

    def lane(lane_tasks: list[Callable[[], Any]]) -> list[tuple[str, Any]]:
        barrier.wait(timeout=120)
        return [call(task) for task in lane_tasks]

    lanes = [tasks[i::threads] for i in range(threads) if tasks[i::threads]]
    with ThreadPoolExecutor(len(lanes)) as pool:
        per_lane = list(pool.map(lane, lanes))
    results: list[tuple[str, Any]] = [None] * len(tasks)  # type: ignore[list-item]
    for i, lane_results in enumerate(per_lane):
        for j, result in enumerate(lane_results):
            results[i + j * threads] = result
    return results


def thread_ledgers(
    mode: str, path: str, clock: Callable[[], int], opened: list[SQLiteStore], first: Ledger
) -> list[Ledger]:
    """`shared`: one Ledger for every thread (the brief's case); `per-thread`: one connection each, so SQLite's own
    locking (BEGIN IMMEDIATE) is what serialises them."""
    if mode == "shared":
        return [first] * THREADS
    return [open_ledger(path, clock, opened) for _ in range(THREADS)]


def concurrent_reserves(ledgers: list[Ledger], subject: dict[str, str]) -> list[tuple[str, Any]]:
    tasks = [
        (lambda i=i: ledgers[i % THREADS].reserve(reserve_request(f"r-{i}", subject), tenant="acme").reservation_id)
        for i in range(N)
    ]
    return run_threads(tasks)


def assert_exact_winners(results: list[tuple[str, Any]], winners: int) -> list[str]:
    ids = [value for kind, value in results if kind == "ok"]
    refused = Counter(value for kind, value in results if kind == "err")
    assert len(ids) == winners, f"{len(ids)} reserves succeeded, expected exactly {winners}; refused: {refused}"
    assert refused == Counter({"BUDGET_EXCEEDED": len(results) - winners}), refused
    assert len(set(ids)) == len(ids)
    return ids


# --------------------------------------------------------------------------------------- reserves: threads
@pytest.mark.parametrize("mode", ["shared", "per-thread"])
@pytest.mark.parametrize("tight", [T, W, A], ids=["tenant", "workspace", "agent"])
def test_threads_reserve_exactly_what_fits(db_path, clock, stores, tight, mode):
    ledger = open_ledger(db_path, clock, stores)
    allocations = create_budgets(ledger, tight)
    results = concurrent_reserves(thread_ledgers(mode, db_path, clock, stores, ledger), AGENT_A)
    ids = assert_exact_winners(results, WINNERS)
    held = WINNERS * X
    check_levels(ledger, db_path, allocations, {T: held, W: held, A: held, B_: 0}, dict.fromkeys(SCOPES, 0))
    listed = ledger.list_reservations({"tenant": "acme", "status": "ACTIVE", "limit": 200}, tenant="acme")
    assert sorted(r.reservation_id for r in listed.reservations) == sorted(ids)


# ------------------------------------------------------------------------------------- reserves: processes
@pytest.mark.parametrize(
    "tight,subjects",
    [(A, [AGENT_A] * 4), (T, [AGENT_A, AGENT_B, AGENT_A, AGENT_B])],
    ids=["agent-one-subject", "tenant-sibling-agents"],
)
def test_processes_reserve_exactly_what_fits(db_path, clock, stores, tight, subjects):
    ledger = open_ledger(db_path, clock, stores)
    allocations = create_budgets(ledger, tight)
    ctx = mp.get_context("spawn")
    barrier, results_queue = ctx.Barrier(len(subjects)), ctx.Queue()
    procs = [
        ctx.Process(
            target=reserve_worker,
            args=(db_path, clock.now, subject, X, N // len(subjects), f"p{i}", barrier, results_queue),
        )
        for i, subject in enumerate(subjects)
    ]
    for p in procs:
        p.start()
    try:
        reports = dict(results_queue.get(timeout=240) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    crashes = [r for out in reports.values() for r in out if r[0] == "crash"]
    assert not crashes, crashes
    assert all(p.exitcode == 0 for p in procs)
    results = [r for out in reports.values() for r in out]
    assert len(results) == N
    assert_exact_winners(results, WINNERS)
    per_agent = Counter()
    for i, subject in enumerate(subjects):
        per_agent[subject["agent"]] += sum(1 for kind, _ in reports[f"p{i}"] if kind == "ok")
    reserved = {T: WINNERS * X, W: WINNERS * X, A: per_agent["a"] * X, B_: per_agent["b"] * X}
    check_levels(ledger, db_path, allocations, reserved, dict.fromkeys(SCOPES, 0))


# ------------------------------------------------------------------------------------ settlement: threads
@pytest.mark.parametrize("mode", ["shared", "per-thread"])
def test_concurrent_commits_and_releases_settle_exactly(db_path, clock, stores, mode):
    """Commits (below, at and just above the estimate), releases, and commit-vs-release races on the same
    reservations, all at once: at most one finalizer wins each reservation and the final ledger is exact."""
    ledger = open_ledger(db_path, clock, stores)
    allocations = create_budgets(ledger, A)
    ledgers = thread_ledgers(mode, db_path, clock, stores, ledger)
    ids = assert_exact_winners(concurrent_reserves(ledgers, AGENT_A), WINNERS)
    # the agent has 1000 - 14 * 70 = 20 left: two overages of 1 fit in any order, so every charge is exact
    plan: list[tuple[str, str, int]] = []  # (reservation id, op, actual)
    for i, rid in enumerate(ids):
        actual = X + 1 if i in (0, 3) else X - i
        if i % 3 == 0:
            plan.append((rid, "commit", actual))
        elif i % 3 == 1:
            plan.append((rid, "release", 0))
        else:  # race: both at once
            plan += [(rid, "commit", actual), (rid, "release", 0)]
    random.Random(7).shuffle(plan)

    def task(k: int, rid: str, op: str, actual: int) -> Callable[[], Any]:
        target = ledgers[k % THREADS]
        if op == "commit":
            return lambda: target.commit(rid, {"idempotency_key": f"c-{rid}", "actual": amt(actual)}, tenant="acme")
        return lambda: target.release(rid, {"idempotency_key": f"rel-{rid}"}, tenant="acme")

    results = run_threads([task(k, *step) for k, step in enumerate(plan)])
    won: dict[str, tuple[str, int]] = {}
    for (rid, op, actual), (kind, value) in zip(plan, results, strict=True):
        if kind == "ok":
            assert rid not in won, f"both commit and release won {rid}"
            won[rid] = (op, actual)
            if op == "commit":
                assert value.charged.amount == actual, "charged must equal actual while every scope can cover it"
            else:
                assert value.released.amount == X
        else:
            assert value == "RESERVATION_FINALIZED", (rid, op, value)
    assert set(won) == set(ids), "every reservation must be settled exactly once"
    spent_total = sum(actual for op, actual in won.values() if op == "commit")
    check_levels(
        ledger, db_path, allocations, dict.fromkeys(SCOPES, 0), {T: spent_total, W: spent_total, A: spent_total, B_: 0}
    )
    for rid, (op, actual) in won.items():
        detail = ledger.get_reservation(rid, tenant="acme")
        assert detail.status == ("COMMITTED" if op == "commit" else "RELEASED")
        assert (detail.committed.amount if detail.committed else None) == (actual if op == "commit" else None)


# ------------------------------------------------------------------------------------ idempotency: threads
@pytest.mark.parametrize("mode", ["shared", "per-thread"])
def test_identical_keyed_requests_mutate_once(db_path, clock, stores, mode):
    """Invariant 10 under concurrency: k identical keyed requests => one mutation, identical bodies."""
    ledger = open_ledger(db_path, clock, stores)
    allocations = create_budgets(ledger, A)
    ledgers = thread_ledgers(mode, db_path, clock, stores, ledger)

    def same(call: Callable[[Ledger], Any]) -> Any:
        results = run_threads([(lambda i=i: call(ledgers[i]).dump()) for i in range(THREADS)])
        assert all(kind == "ok" for kind, _ in results), results
        bodies = [body for _, body in results]
        assert all(body == bodies[0] for body in bodies), bodies
        return bodies[0]

    reserve = reserve_request("same-reserve", AGENT_A, 300)
    body = same(lambda lg: lg.reserve(reserve, tenant="acme"))
    rid = body["reservation_id"]
    listed = ledger.list_reservations({"tenant": "acme", "limit": 200}, tenant="acme").reservations
    assert [r.reservation_id for r in listed] == [rid], "one reservation, whatever the number of identical requests"
    check_levels(ledger, db_path, allocations, {T: 300, W: 300, A: 300, B_: 0}, dict.fromkeys(SCOPES, 0))

    commit = {"idempotency_key": "same-commit", "actual": amt(120)}
    body = same(lambda lg: lg.commit(rid, commit, tenant="acme"))
    assert body["charged"] == amt(120) and body["released"] == amt(180)
    check_levels(ledger, db_path, allocations, dict.fromkeys(SCOPES, 0), {T: 120, W: 120, A: 120, B_: 0})

    other = ledger.reserve(reserve_request("to-release", AGENT_B, 50), tenant="acme").reservation_id
    body = same(lambda lg: lg.release(other, {"idempotency_key": "same-release"}, tenant="acme"))
    assert body["released"] == amt(50)

    event = {"idempotency_key": "same-event", "subject": AGENT_A, "action": ACTION, "actual": amt(33)}
    body = same(lambda lg: lg.event(event, tenant="acme"))
    assert body["charged"] == amt(33)
    check_levels(ledger, db_path, allocations, dict.fromkeys(SCOPES, 0), {T: 153, W: 153, A: 153, B_: 0})
    assert stored_rows(db_path)[2] == 1


@pytest.mark.parametrize("mode", ["shared", "per-thread"])
def test_one_key_two_payloads_one_winner(db_path, clock, stores, mode):
    """Same key, two payloads, at once: one payload wins (its requests all get its body), the others 409."""
    ledger = open_ledger(db_path, clock, stores)
    allocations = create_budgets(ledger, A)
    ledgers = thread_ledgers(mode, db_path, clock, stores, ledger)
    payloads = [reserve_request("contested", AGENT_A, 100 if i % 2 else 200) for i in range(THREADS)]
    results = run_threads([(lambda i=i: ledgers[i].reserve(payloads[i], tenant="acme").dump()) for i in range(THREADS)])
    winners = {payloads[i]["estimate"]["amount"] for i, (kind, _) in enumerate(results) if kind == "ok"}
    assert len(winners) == 1, results
    estimate = winners.pop()
    for i, (kind, value) in enumerate(results):
        if payloads[i]["estimate"]["amount"] == estimate:
            assert kind == "ok" and value == results[[k for k, _ in results].index("ok")][1]
        else:
            assert (kind, value) == ("err", "IDEMPOTENCY_MISMATCH")
    listed = ledger.list_reservations({"tenant": "acme", "limit": 200}, tenant="acme").reservations
    assert len(listed) == 1 and listed[0].reserved.amount == estimate
    check_levels(ledger, db_path, allocations, {T: estimate, W: estimate, A: estimate, B_: 0}, dict.fromkeys(SCOPES, 0))


# ------------------------------------------------------------------------------------------- StoreBusy
def finishes(call: Callable[[], Any]) -> tuple[str, Any]:
    """Run `call` in a thread; a call that never returns fails the test instead of hanging it."""
    box: list[tuple[str, Any]] = []

    def run() -> None:
        try:
            box.append(("ok", call()))
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            box.append(("raised", exc))

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "the ledger hung on a locked store instead of raising StoreBusy"
    return box[0]


def test_locked_store_raises_store_busy_instead_of_hanging(sqlite_path, clock, stores):
    db_path = sqlite_path
    ledger = open_ledger(db_path, clock, stores, busy_timeout=0.2)
    create_budgets(ledger, A)
    held = ledger.reserve(reserve_request("before-lock", AGENT_A), tenant="acme").reservation_id
    before = dump(db_path)
    ctx = mp.get_context("spawn")
    locked, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=hold_write_lock, args=(db_path, locked, release))
    holder.start()
    try:
        assert locked.wait(120), "the lock-holding process never took the write lock"
        attempts: dict[str, Callable[[], Any]] = {
            "reserve": lambda: ledger.reserve(reserve_request("during-lock", AGENT_A), tenant="acme"),
            "commit": lambda: ledger.commit(held, {"idempotency_key": "c", "actual": amt(10)}, tenant="acme"),
            "release": lambda: ledger.release(held, {"idempotency_key": "rel"}, tenant="acme"),
            "event": lambda: ledger.event(
                {"idempotency_key": "e", "subject": AGENT_A, "action": ACTION, "actual": amt(5)}, tenant="acme"
            ),
            "fund": lambda: ledger.admin.fund(A, USD, {"operation": "CREDIT", "amount": amt(5)}, tenant="acme"),
            "sweep": ledger.sweep,
            "open": lambda: SQLiteStore(db_path, busy_timeout=0.2),
        }
        for name, attempt in attempts.items():
            kind, value = finishes(attempt)
            assert kind == "raised" and isinstance(value, StoreBusy), f"{name}: {kind} {value!r}"
            assert value.code == "INTERNAL_ERROR" and value.status == 500
    finally:
        release.set()
        holder.join(timeout=60)
        if holder.is_alive():
            holder.kill()
    assert holder.exitcode == 0
    assert dump(db_path) == before, "a StoreBusy refusal changed the database"
    # the lock is gone: the same ledger works again
    ok = ledger.reserve(reserve_request("after-lock", AGENT_A), tenant="acme")
    assert ok.decision == "ALLOW"
    assert levels(ledger)[A]["reserved"] == 2 * X
