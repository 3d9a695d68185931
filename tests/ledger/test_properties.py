"""Property tests of the ledger: a hypothesis state machine checks PROTOCOL.md section 8 after every step.

The machine drives one `Ledger(SQLiteStore(":memory:"))` (and, in TestRedisLedgerStateMachine, one Ledger on a Redis
store) on a movable clock over a hierarchy

    tenant:acme                                  always budgeted
    tenant:acme/workspace:w                      budgeted or not
    tenant:acme/workspace:w/agent:a              budgeted or not
    tenant:acme/workspace:w/agent:b              budgeted or not (sibling of agent:a)
    tenant:acme/workspace:w/agent:c              never budgeted

with random interleavings of reserve, commit, release, extend, event, fund, overdraft-limit updates, freeze,
time travel, sweep, dry_run, decide, reads and idempotent replays. It keeps its own model of every budget and
reservation and predicts each outcome (success, or the set of acceptable error codes when the protocol leaves the
order between scopes open) from the model, then compares.

After every step the state is observed through the public read API (`balances`, `admin.list_budgets`,
`list_reservations`) on a *copy* of the database, because reads sweep expired reservations and sweeping the real
ledger would hide the hot path's lazy expiry. The raw tables of the real ledger are checked too.

Runs derandomized by default (reproducible CI); set CYCLES_PROPERTY_RANDOM=1 (and CYCLES_PROPERTY_EXAMPLES=N) to
explore new examples (CYCLES_PROPERTY_STEPS=N for longer runs).
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import event as note
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, multiple, precondition, rule

from cycles.errors import CyclesError
from cycles.ledger import Ledger, SQLiteStore
from tests.conftest import Clock  # the movable clock

USD = "USD_MICROCENTS"
TENANT = "acme"
T = "tenant:acme"
W = "tenant:acme/workspace:w"
A = "tenant:acme/workspace:w/agent:a"
B = "tenant:acme/workspace:w/agent:b"
C = "tenant:acme/workspace:w/agent:c"
CHAINS = {"T": [T], "W": [T, W], "A": [T, W, A], "B": [T, W, B], "C": [T, W, C]}
SUBJECTS = {
    "T": {"tenant": TENANT},
    "W": {"tenant": TENANT, "workspace": "w"},
    "A": {"tenant": TENANT, "workspace": "w", "agent": "a"},
    "B": {"tenant": TENANT, "workspace": "w", "agent": "b"},
    "C": {"tenant": TENANT, "workspace": "w", "agent": "c"},
}
OPTIONAL = (W, A, B)
ACTION = {"kind": "llm.completion", "name": "gpt-4o"}
MAX_TTL_MS = 3_600_000  # default tenant max_reservation_ttl_ms (no tenant record here)
MAX_EXTENSIONS = 10
DEFAULT_TTL_MS = 60_000
DEFAULT_GRACE_MS = 5_000
POLICIES = ("REJECT", "ALLOW_IF_AVAILABLE", "ALLOW_WITH_OVERDRAFT")
OVERDRAFT = "ALLOW_WITH_OVERDRAFT"
FINALIZED = ("COMMITTED", "RELEASED")
TERMINAL = ("COMMITTED", "RELEASED", "EXPIRED")


def amt(n: int, unit: str = USD) -> dict[str, Any]:
    return {"unit": unit, "amount": n}


@dataclass
class MBudget:
    allocated: int
    od: int
    spent: int = 0
    debt: int = 0
    over: bool = False
    status: str = "ACTIVE"


@dataclass
class MRes:
    rid: str
    est: int
    scopes: list[str]  # budgeted scopes, fixed at reserve time
    expires: int
    grace: int
    policy: str
    reserve_req: dict[str, Any]
    reserve_body: dict[str, Any]
    status: str = "ACTIVE"  # ACTIVE | COMMITTED | RELEASED (EXPIRED is derived from the clock)
    extensions: int = 0
    committed: int | None = None
    final_kind: str | None = None
    final_req: dict[str, Any] | None = None
    final_body: dict[str, Any] | None = None


@dataclass
class View:
    """What the public read API shows (after its sweep): budgets by scope, reservations by id."""

    budgets: dict[str, dict[str, Any]]
    reservations: dict[str, dict[str, Any]]


@dataclass
class Outcome:
    codes: set[str] = field(default_factory=set)  # acceptable error codes; empty => must succeed
    charged: int | None = None
    moves: dict[str, tuple[int, int]] | None = None  # scope -> (spent delta, debt delta)
    flags: list[str] | None = None  # scopes newly flagged is_over_limit


class LedgerMachine(RuleBasedStateMachine):
    reservations = Bundle("reservations")

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock(start_ms=1_700_000_000_000)
        self.store, self.copy_store = self.open_stores()
        self.ledger = Ledger(self.store, clock=self.clock)
        self.copy = Ledger(self.copy_store, clock=self.clock)
        self.budgets: dict[str, MBudget] = {}
        self.res: dict[str, MRes] = {}
        self.events: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self.extends: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
        self.decisions: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self.keys = itertools.count()
        self.seen_expires: dict[str, int] = {}
        self._view_key: tuple[int, int] | None = None
        self._view: View | None = None

    def teardown(self) -> None:
        self.store.close()
        self.copy_store.close()

    # ------------------------------------------------------------------------------------------------ model
    @property
    def now(self) -> int:
        return self.clock.now

    def key(self, prefix: str) -> str:
        return f"{prefix}-{next(self.keys)}"

    def live(self, r: MRes) -> bool:
        return r.status == "ACTIVE" and self.now <= r.expires + r.grace

    def mstatus(self, r: MRes) -> str:
        if r.status != "ACTIVE":
            return r.status
        return "ACTIVE" if self.live(r) else "EXPIRED"

    def m_reserved(self, scope: str) -> int:
        return sum(r.est for r in self.res.values() if self.live(r) and scope in r.scopes)

    def m_remaining(self, scope: str) -> int:
        b = self.budgets[scope]
        return b.allocated - b.spent - self.m_reserved(scope) - b.debt

    def budgeted(self, subject_key: str) -> list[str]:
        return [s for s in CHAINS[subject_key] if s in self.budgets]

    def subject(self, subject_key: str, drop_tenant: bool, dims: bool) -> dict[str, Any]:
        subject = dict(SUBJECTS[subject_key])
        if drop_tenant and len(subject) > 1:
            del subject["tenant"]  # the effective tenant fills it in
        if dims:
            subject["dimensions"] = {"run_id": "run-1", "cost_center": "cc.7"}
        return subject

    def reserve_denials(self, scopes: list[str], est: int) -> set[str]:
        """§4 per-scope order (frozen, over limit, debt with no overdraft, remaining); scopes in any order."""
        codes = set()
        for s in scopes:
            b = self.budgets[s]
            if b.status == "FROZEN":
                codes.add("BUDGET_FROZEN")
            elif b.over:
                codes.add("OVERDRAFT_LIMIT_EXCEEDED")
            elif b.debt > 0 and b.od == 0:
                codes.add("DEBT_OUTSTANDING")
            elif self.m_remaining(s) < est:
                codes.add("BUDGET_EXCEEDED")
        return codes

    def predict_charge(self, scopes: list[str], held: int, overage: int, policy: str) -> Outcome:
        """§4 commit/event overage rules with the §9 decisions (deficit check, funded part to spent)."""
        rem = {s: self.m_remaining(s) for s in scopes}
        if overage == 0 or all(rem[s] >= overage for s in scopes):
            return Outcome(charged=held + overage, moves={s: (held + overage, 0) for s in scopes}, flags=[])
        short = [s for s in scopes if rem[s] < overage]
        if policy == OVERDRAFT and all(self.budgets[s].od > 0 for s in short):
            for s in short:
                b = self.budgets[s]
                if b.debt + overage - max(rem[s], 0) > b.od:
                    return Outcome(codes={"OVERDRAFT_LIMIT_EXCEEDED"})
            moves = {}
            for s in scopes:
                funded = min(overage, max(rem[s], 0))
                moves[s] = (held + funded, overage - funded)
            return Outcome(charged=held + overage, moves=moves, flags=[])
        # ALLOW_IF_AVAILABLE, or overdraft onto a short scope without an overdraft limit
        capped = min(overage, min(max(rem[s], 0) for s in scopes))
        return Outcome(charged=held + capped, moves={s: (held + capped, 0) for s in scopes}, flags=short)

    @staticmethod
    def shape(outcome: Outcome, actual: int, otherwise: str) -> str:
        """A label for hypothesis statistics: was the charge capped, did it create debt?"""
        if outcome.charged is not None and outcome.charged < actual:
            return "capped"
        return "debt" if any(d for _, d in (outcome.moves or {}).values()) else otherwise

    def apply(self, outcome: Outcome) -> None:
        assert outcome.moves is not None and outcome.flags is not None
        for s, (dspent, ddebt) in outcome.moves.items():
            self.budgets[s].spent += dspent
            self.budgets[s].debt += ddebt
        for s in outcome.flags:
            self.budgets[s].over = True

    # ------------------------------------------------------------------------------------- the store's own view
    # (the few places that look at the store itself, below the rules; RedisLedgerMachine has its own)
    def open_stores(self) -> tuple[Any, Any]:
        """The ledger's store and an empty one to copy it into."""
        return SQLiteStore(":memory:"), SQLiteStore(":memory:")

    def raw(self) -> Any:
        """Every row of every table of the real ledger (no sweep, no copy)."""
        db = self.store._db
        assert db is not None
        return tuple(
            tuple(db.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall())
            for table in ("budgets", "reservations", "idempotency", "events", "tenants", "api_keys")
        )

    def changes(self) -> Any:
        """Changes whenever the real ledger's data does."""
        assert self.store._db is not None
        return self.store._db.total_changes

    def copy_to_observer(self) -> None:
        assert self.store._db is not None and self.copy_store._db is not None
        self.store._db.backup(self.copy_store._db)

    def due_count(self) -> int:
        """ACTIVE reservations past expires + grace, read below the rules."""
        db = self.store._db
        assert db is not None
        return db.execute(
            "SELECT COUNT(*) FROM reservations WHERE status = 'ACTIVE' AND expires_at_ms + grace_ms < ?", (self.now,)
        ).fetchone()[0]

    def stored_reservations(self) -> list[tuple[str, str, int, list[str], int, int]]:
        """(id, status, estimate, budgeted scopes, expires_at_ms, grace_ms) of every stored reservation."""
        db = self.store._db
        assert db is not None
        return [
            (rid, status, est, json.loads(scopes), expires, grace)
            for rid, status, est, scopes, expires, grace in db.execute(
                "SELECT reservation_id, status, estimate, budgeted_scopes, expires_at_ms, grace_ms FROM reservations"
            )
        ]

    def stored_reserved(self) -> dict[str, int]:
        """scope -> reserved, as stored."""
        db = self.store._db
        assert db is not None
        return dict(db.execute("SELECT scope, reserved FROM budgets").fetchall())

    # ---------------------------------------------------------------------------------------------- observe
    def observe(self) -> View:
        cache_key = (self.changes(), self.now)
        if cache_key == self._view_key and self._view is not None:
            return self._view
        self.copy_to_observer()
        balances = self.copy.balances(
            {"tenant": TENANT, "include_children": True, "limit": 200}, tenant=TENANT
        ).balances
        ledgers = {b.scope: b for b in self.copy.admin.list_budgets(tenant_id=TENANT, limit=200).ledgers}
        budgets = {}
        for b in balances:
            assert b.scope == b.scope_path
            units = {b.remaining.unit, b.reserved.unit, b.spent.unit, b.allocated.unit, b.debt.unit}
            assert units == {USD}, f"one unit per Balance (inv. 16): {units}"
            row = {
                "allocated": b.allocated.amount,
                "spent": b.spent.amount,
                "reserved": b.reserved.amount,
                "debt": b.debt.amount,
                "remaining": b.remaining.amount,
                "od": b.overdraft_limit.amount,
                "over": b.is_over_limit,
                "status": ledgers[b.scope].status,
            }
            led = ledgers[b.scope]
            assert (led.allocated.amount, led.spent.amount, led.reserved.amount, led.debt.amount) == (
                row["allocated"], row["spent"], row["reserved"], row["debt"],
            ), "admin ledger and runtime balance disagree"  # fmt: skip
            assert led.remaining.amount == row["remaining"]
            budgets[b.scope] = row
        assert set(budgets) == set(ledgers)
        rows = self.copy.list_reservations({"tenant": TENANT, "limit": 200}, tenant=TENANT).reservations
        reservations = {
            r.reservation_id: {
                "status": r.status,
                "reserved": r.reserved.amount,
                "expires": r.expires_at_ms,
                "committed": r.committed.amount if r.committed is not None else None,
                "scope_path": r.scope_path,
                "affected_scopes": r.affected_scopes,
            }
            for r in rows
        }
        assert len(reservations) == len(rows) < 200
        self._view_key, self._view = cache_key, View(budgets, reservations)
        return self._view

    # ---------------------------------------------------------------------------------------------- checks
    def expect_failure(self, exc: CyclesError, codes: set[str], pre_raw: tuple, what: str) -> None:
        note(f"{what.split()[0]} -> {exc.code}")
        assert codes, f"{what}: unexpected {exc.code} ({exc.message})"
        assert exc.code in codes, f"{what}: got {exc.code} ({exc.message}), expected one of {sorted(codes)}"
        assert self.raw() == pre_raw, f"{what}: a refused request ({exc.code}) changed the database"

    def check_uniform(self, pre: View, post: View, scopes: list[str], delta: int | None = None) -> None:
        """Inv. 5: the op's budgeted scopes all move by one delta (`delta` when given); no other scope moves."""
        deltas = {s: post.budgets[s]["remaining"] - pre.budgets[s]["remaining"] for s in post.budgets}
        for s, d in deltas.items():
            if s not in scopes:
                assert d == 0, f"scope {s} outside the op's scopes {scopes} moved by {d}"
                assert post.budgets[s] == pre.budgets[s], f"scope {s} outside the op's scopes changed"
        moved = {deltas[s] for s in scopes}
        assert len(moved) <= 1, f"budgeted scopes moved by different deltas: {deltas}"
        if delta is not None:
            assert moved <= {delta}, f"expected remaining delta {delta}, got {deltas}"

    def check_no_new_negatives(self, pre: View, post: View) -> None:
        """Inv. 3: without overdraft or admin shrinks, remaining >= 0 stays >= 0 and debt stays constant."""
        for s, b in post.budgets.items():
            if pre.budgets[s]["remaining"] >= 0:
                assert b["remaining"] >= 0, f"{s}: remaining went negative without overdraft"
            assert b["debt"] == pre.budgets[s]["debt"], f"{s}: debt changed without overdraft or repayment"

    def check_debt_growth(self, pre: View, post: View, may_grow: bool) -> None:
        for s, b in post.budgets.items():
            if not may_grow:
                assert b["debt"] <= pre.budgets[s]["debt"], f"{s}: debt grew outside ALLOW_WITH_OVERDRAFT"

    def check_unchanged(self, pre: View, post: View, what: str) -> None:
        assert post.budgets == pre.budgets, f"{what} changed balances"
        assert post.reservations == pre.reservations, f"{what} changed reservations"

    # ------------------------------------------------------------------------------------------------ setup
    @initialize(
        on=st.tuples(st.booleans(), st.booleans(), st.booleans()),
        allocs=st.lists(
            st.sampled_from((0, 300, 1_000, 2_500, 10_000)) | st.integers(0, 5_000), min_size=4, max_size=4
        ),
        ods=st.lists(st.sampled_from([0, 100, 500, 2_000]) | st.integers(0, 600), min_size=4, max_size=4),
    )
    def setup(self, on: tuple[bool, bool, bool], allocs: list[int], ods: list[int]) -> None:
        scopes = [T] + [s for s, present in zip(OPTIONAL, on, strict=True) if present]
        for scope, allocated, od in zip(scopes, allocs, ods, strict=False):
            body = {"scope": scope, "unit": USD, "allocated": amt(allocated), "overdraft_limit": amt(od)}
            created = self.ledger.admin.create_budget(body, tenant=TENANT)
            assert created.remaining.amount == allocated and created.reserved.amount == 0
            self.budgets[scope] = MBudget(allocated=allocated, od=od)

    # -------------------------------------------------------------------------------------------- reserve
    @rule(
        target=reservations,
        who=st.sampled_from(sorted(CHAINS)),
        est=st.integers(0, 100) | st.integers(0, 400),
        policy=st.sampled_from((None, *POLICIES)),
        ttl=st.sampled_from((None, 1_000, 2_500, 10_000, 60_000, 7_200_000)),
        grace=st.sampled_from((None, 0, 1, 1_000, 60_000)),
        drop_tenant=st.booleans(),
        dims=st.booleans(),
        dry_run=st.sampled_from((False, False, False, True)),
    )
    def reserve(self, who, est, policy, ttl, grace, drop_tenant, dims, dry_run):
        scopes = self.budgeted(who)
        req: dict[str, Any] = {
            "idempotency_key": self.key("r"),
            "subject": self.subject(who, drop_tenant, dims),
            "action": ACTION,
            "estimate": amt(est),
        }
        if policy is not None:
            req["overage_policy"] = policy
        if ttl is not None:
            req["ttl_ms"] = ttl
        if grace is not None:
            req["grace_period_ms"] = grace
        if dry_run:
            req["dry_run"] = True
        codes = self.reserve_denials(scopes, est)
        pre, pre_raw = self.observe(), self.raw()
        try:
            resp = self.ledger.reserve(req, tenant=TENANT)
        except CyclesError as exc:
            assert not dry_run, f"dry_run raised {exc.code}: budget-state denials must be 200 DENY"
            self.expect_failure(exc, codes, pre_raw, "reserve")
            return multiple()
        assert resp.affected_scopes == CHAINS[who], "inv. 14: canonical prefix chain, dimensions ignored"
        assert resp.scope_path == CHAINS[who][-1]
        post = self.observe()
        if dry_run:
            self.check_unchanged(pre, post, "dry_run")
            assert resp.reservation_id is None and resp.expires_at_ms is None and resp.remaining_ttl_ms is None
            if codes:
                assert resp.decision == "DENY" and resp.reason_code in codes, (resp.decision, resp.reason_code, codes)
            else:
                assert resp.decision == "ALLOW" and resp.reason_code is None, (resp.decision, resp.reason_code)
            return multiple()
        assert not codes, f"reserve succeeded but expected one of {sorted(codes)}"
        assert resp.decision == "ALLOW" and resp.reservation_id and resp.reservation_id not in self.res
        note("reserve ok")
        assert resp.reserved is not None and resp.reserved.amount == est
        ttl_eff = min(ttl if ttl is not None else DEFAULT_TTL_MS, MAX_TTL_MS)
        assert resp.expires_at_ms == self.now + ttl_eff
        assert resp.remaining_ttl_ms == ttl_eff
        self.res[resp.reservation_id] = MRes(
            rid=resp.reservation_id,
            est=est,
            scopes=scopes,
            expires=self.now + ttl_eff,
            grace=grace if grace is not None else DEFAULT_GRACE_MS,
            policy=policy or "ALLOW_IF_AVAILABLE",
            reserve_req=req,
            reserve_body=resp.dump(),
        )
        self.check_uniform(pre, post, scopes, delta=-est)
        self.check_no_new_negatives(pre, post)
        for s in scopes:
            assert post.budgets[s]["reserved"] == pre.budgets[s]["reserved"] + est
        return resp.reservation_id

    @rule(r=reservations, same=st.booleans())
    def replay_reserve(self, r, same):
        """Inv. 10: same key + same payload => the original body (remaining_ttl_ms recomputed); else 409."""
        m = self.res[r]
        req = json.loads(json.dumps(m.reserve_req))
        if not same:
            req["estimate"] = amt(m.est + 1)
        pre_raw = self.raw()
        try:
            resp = self.ledger.reserve(req, tenant=TENANT)
        except CyclesError as exc:
            self.expect_failure(exc, set() if same else {"IDEMPOTENCY_MISMATCH"}, pre_raw, "replayed reserve")
            return
        assert same, "a changed payload under a used key must be 409 IDEMPOTENCY_MISMATCH"
        body = resp.dump()
        expected = dict(m.reserve_body)
        expected["remaining_ttl_ms"] = max(0, expected["expires_at_ms"] - self.now) if self.live(m) else 0
        assert body == expected
        assert self.raw() == pre_raw, "a replayed reserve mutated the database"

    # --------------------------------------------------------------------------------------------- commit
    def commit_codes(self, m: MRes) -> set[str]:
        status = self.mstatus(m)
        if status in FINALIZED:
            return {"RESERVATION_FINALIZED"}
        if status == "EXPIRED":
            return {"RESERVATION_EXPIRED"}
        return set()

    @rule(
        r=reservations,
        how=st.sampled_from(("below", "equal", "above")),
        k=st.one_of(st.integers(0, 150), st.integers(0, 3_000)),
    )
    def commit(self, r, how, k):
        m = self.res[r]
        if how == "below" and m.est > 0:
            actual = k % m.est
        elif how == "above":
            actual = m.est + 1 + k
        else:
            actual = m.est
        self.do_commit(r, actual, how)

    @rule(r=reservations, delta=st.integers(-30, 120))
    def commit_near_remaining(self, r, delta):
        """An overage close to what the tightest scope still has: the capping and overdraft edges."""
        m = self.res[r]
        tightest = min((self.m_remaining(s) for s in m.scopes), default=0)
        actual = m.est + max(1, tightest + delta)
        self.do_commit(r, actual, "above")

    def do_commit(self, r: str, actual: int, how: str) -> None:
        m = self.res[r]
        outcome = Outcome(codes=self.commit_codes(m))
        if not outcome.codes:
            if any(self.budgets[s].status == "FROZEN" for s in m.scopes):
                outcome.codes.add("BUDGET_FROZEN")
            overage = max(0, actual - m.est)
            if overage and m.policy == "REJECT":
                outcome.codes.add("BUDGET_EXCEEDED")
            if not outcome.codes and actual <= m.est:
                outcome = Outcome(charged=actual, moves={s: (actual, 0) for s in m.scopes}, flags=[])
            elif not outcome.codes:
                outcome = self.predict_charge(m.scopes, m.est, overage, m.policy)
        req = {"idempotency_key": self.key("c"), "actual": amt(actual)}
        pre, pre_raw = self.observe(), self.raw()
        try:
            resp = self.ledger.commit(r, req, tenant=TENANT)
        except CyclesError as exc:
            self.expect_failure(exc, outcome.codes, pre_raw, f"commit {actual} of {m.est} ({m.policy})")
            return
        assert not outcome.codes, f"commit succeeded, expected one of {sorted(outcome.codes)}"
        charged = resp.charged.amount
        assert resp.status == "COMMITTED"
        assert charged == outcome.charged, f"charged {charged}, expected {outcome.charged} ({m.policy})"
        note(f"commit ok {m.policy} {self.shape(outcome, actual, how)}")
        # inv. 7
        if actual <= m.est:
            assert charged == actual
            assert (resp.released.amount if resp.released else 0) == m.est - actual
        else:
            assert m.est <= charged <= actual
            assert resp.released is None
        self.apply(outcome)
        m.status, m.committed = "COMMITTED", charged
        m.final_kind, m.final_req, m.final_body = "commit", req, resp.dump()
        post = self.observe()
        if charged < actual:
            assert any(post.budgets[s]["over"] for s in m.scopes), "capped charge without is_over_limit"
        # inv. 6: reserved falls by est, spent+debt rises by charged, on every budgeted scope
        for s in m.scopes:
            assert post.budgets[s]["reserved"] == pre.budgets[s]["reserved"] - m.est
            rise = post.budgets[s]["spent"] + post.budgets[s]["debt"] - pre.budgets[s]["spent"] - pre.budgets[s]["debt"]
            assert rise == charged
        self.check_uniform(pre, post, m.scopes, delta=m.est - charged)
        self.check_debt_growth(pre, post, may_grow=m.policy == OVERDRAFT)
        if m.policy != OVERDRAFT:
            self.check_no_new_negatives(pre, post)

    @rule(r=reservations, unit=st.sampled_from(("TOKENS", "CREDITS")))
    def commit_wrong_unit(self, r, unit):
        """Inv. 16: a commit in another unit is 400 UNIT_MISMATCH (after liveness) and changes nothing."""
        m = self.res[r]
        codes = self.commit_codes(m) or {"UNIT_MISMATCH"}
        pre_raw = self.raw()
        try:
            self.ledger.commit(r, {"idempotency_key": self.key("c"), "actual": amt(m.est, unit)}, tenant=TENANT)
        except CyclesError as exc:
            self.expect_failure(exc, codes, pre_raw, "commit in another unit")
            if exc.code == "UNIT_MISMATCH":
                assert exc.status == 400
            return
        raise AssertionError("a commit in another unit succeeded")

    # -------------------------------------------------------------------------------------------- release
    @rule(r=reservations, reason=st.sampled_from((None, "done")))
    def release(self, r, reason):
        m = self.res[r]
        codes = self.commit_codes(m)
        req: dict[str, Any] = {"idempotency_key": self.key("rel")}
        if reason:
            req["reason"] = reason
        pre, pre_raw = self.observe(), self.raw()
        try:
            resp = self.ledger.release(r, req, tenant=TENANT)
        except CyclesError as exc:
            self.expect_failure(exc, codes, pre_raw, "release")
            return
        assert not codes, f"release succeeded, expected one of {sorted(codes)}"
        assert resp.status == "RELEASED" and resp.released.amount == m.est
        m.status = "RELEASED"
        note("release ok")
        m.final_kind, m.final_req, m.final_body = "release", req, resp.dump()
        post = self.observe()
        self.check_uniform(pre, post, m.scopes, delta=m.est)
        self.check_no_new_negatives(pre, post)
        for s in m.scopes:
            assert post.budgets[s]["reserved"] == pre.budgets[s]["reserved"] - m.est
            assert post.budgets[s]["spent"] == pre.budgets[s]["spent"]

    @rule(r=reservations, same=st.booleans())
    def replay_finalize(self, r, same):
        """Inv. 10/11: replaying the winning commit/release returns its body; another payload is 409."""
        m = self.res[r]
        if m.final_req is None:
            return
        req = dict(m.final_req)
        if not same:
            if m.final_kind == "commit":
                req["actual"] = amt(req["actual"]["amount"] + 1)
            else:
                req["reason"] = "another reason"
        op = self.ledger.commit if m.final_kind == "commit" else self.ledger.release
        pre_raw = self.raw()
        try:
            resp = op(r, req, tenant=TENANT)
        except CyclesError as exc:
            self.expect_failure(exc, set() if same else {"IDEMPOTENCY_MISMATCH"}, pre_raw, "replayed finalize")
            return
        assert same, "a changed payload under the finalizing key must be 409 IDEMPOTENCY_MISMATCH"
        assert resp.dump() == m.final_body
        assert self.raw() == pre_raw, "a replay mutated the database"

    # --------------------------------------------------------------------------------------------- extend
    @rule(r=reservations, by=st.sampled_from((1, 1_000, 5_000, 30_000, 86_400_000)), times=st.sampled_from((1, 1, 12)))
    def extend(self, r, by, times):
        m = self.res[r]
        for _ in range(times):
            status = self.mstatus(m)
            if status in FINALIZED:
                codes = {"RESERVATION_FINALIZED"}
            elif status == "EXPIRED" or self.now > m.expires:
                codes = {"RESERVATION_EXPIRED"}  # inv. 13: no grace for extend
            elif m.extensions >= MAX_EXTENSIONS:
                codes = {"MAX_EXTENSIONS_EXCEEDED"}
            else:
                codes = set()
            pre, pre_raw = self.observe(), self.raw()
            try:
                req = {"idempotency_key": self.key("x"), "extend_by_ms": by}
                resp = self.ledger.extend(r, req, tenant=TENANT)
            except CyclesError as exc:
                self.expect_failure(exc, codes, pre_raw, f"extend #{m.extensions + 1}")
                return
            assert not codes, f"extend succeeded, expected one of {sorted(codes)}"
            new = max(m.expires, min(m.expires + by, self.now + MAX_TTL_MS))
            assert resp.status == "ACTIVE" and resp.expires_at_ms == new, (resp.expires_at_ms, new)
            assert resp.remaining_ttl_ms == new - self.now
            m.expires, m.extensions = new, m.extensions + 1
            self.extends.append((r, req, resp.dump()))
            note("extend ok")
            post = self.observe()
            assert post.budgets == pre.budgets, "extend changed balances"

    # ---------------------------------------------------------------------------------------------- event
    @rule(
        who=st.sampled_from(sorted(CHAINS)),
        actual=st.integers(0, 300),
        policy=st.sampled_from((None, *POLICIES)),
        drop_tenant=st.booleans(),
    )
    def event(self, who, actual, policy, drop_tenant):
        self.do_event(who, actual, policy, drop_tenant)

    @rule(
        who=st.sampled_from(sorted(CHAINS)),
        delta=st.integers(-30, 120),
        policy=st.sampled_from((OVERDRAFT, OVERDRAFT, "REJECT", "ALLOW_IF_AVAILABLE")),
    )
    def event_near_remaining(self, who, delta, policy):
        """A direct debit close to what the tightest scope still has: REJECT, capping and overdraft edges."""
        tightest = min(self.m_remaining(s) for s in self.budgeted(who))
        self.do_event(who, max(0, tightest + delta), policy, False)

    def do_event(self, who: str, actual: int, policy: str | None, drop_tenant: bool) -> None:
        scopes = self.budgeted(who)
        policy_eff = policy or "ALLOW_IF_AVAILABLE"
        outcome = Outcome()
        if any(self.budgets[s].status == "FROZEN" for s in scopes):
            outcome.codes.add("BUDGET_FROZEN")
        if policy_eff == "REJECT" and any(self.m_remaining(s) < actual for s in scopes):
            outcome.codes.add("BUDGET_EXCEEDED")
        if not outcome.codes:
            outcome = self.predict_charge(scopes, 0, actual, policy_eff)
        req: dict[str, Any] = {
            "idempotency_key": self.key("e"),
            "subject": self.subject(who, drop_tenant, False),
            "action": ACTION,
            "actual": amt(actual),
        }
        if policy is not None:
            req["overage_policy"] = policy
        pre, pre_raw = self.observe(), self.raw()
        try:
            resp = self.ledger.event(req, tenant=TENANT)
        except CyclesError as exc:
            self.expect_failure(exc, outcome.codes, pre_raw, f"event {actual} ({policy_eff})")
            return
        assert not outcome.codes, f"event succeeded, expected one of {sorted(outcome.codes)}"
        assert resp.status == "APPLIED" and resp.charged is not None
        charged = resp.charged.amount
        assert charged == outcome.charged, f"event charged {charged}, expected {outcome.charged} ({policy_eff})"
        note(f"event ok {policy_eff} {self.shape(outcome, actual, 'full')}")
        assert charged <= actual
        self.apply(outcome)
        self.events.append((req, resp.dump()))
        post = self.observe()
        if charged < actual:
            assert any(post.budgets[s]["over"] for s in scopes), "capped event without is_over_limit"
        for s in scopes:
            rise = post.budgets[s]["spent"] + post.budgets[s]["debt"] - pre.budgets[s]["spent"] - pre.budgets[s]["debt"]
            assert rise == charged
        returned = {b.scope: b for b in resp.balances or []}
        assert set(returned) == set(scopes), "event balances must list the budgeted scopes"
        for s, b in returned.items():
            assert b.remaining.amount == post.budgets[s]["remaining"]
            assert b.is_over_limit == post.budgets[s]["over"]
        self.check_uniform(pre, post, scopes, delta=-charged)
        self.check_debt_growth(pre, post, may_grow=policy_eff == OVERDRAFT)
        if policy_eff != OVERDRAFT:
            self.check_no_new_negatives(pre, post)

    @precondition(lambda self: bool(self.events))
    @rule(i=st.integers(0, 1_000))
    def replay_event(self, i):
        req, body = self.events[i % len(self.events)]
        pre = self.observe()
        resp = self.ledger.event(req, tenant=TENANT)
        assert resp.dump() == body, "a replayed event must return the original body"
        self.check_unchanged(pre, self.observe(), "a replayed event")  # (events sweep first, like reads)

    # ---------------------------------------------------------------------------------------------- admin
    @rule(
        i=st.integers(0, 3),
        op=st.sampled_from(("CREDIT", "DEBIT", "RESET", "RESET_SPENT", "REPAY_DEBT")),
        a=st.integers(0, 1_500),
        spent=st.one_of(st.none(), st.integers(0, 500)),
    )
    def fund(self, i, op, a, spent):
        scope = sorted(self.budgets)[i % len(self.budgets)]
        b = self.budgets[scope]
        rem = self.m_remaining(scope)
        codes: set[str] = set()
        new = MBudget(**vars(b))
        if b.status != "ACTIVE":
            codes.add("BUDGET_FROZEN")
        elif op == "CREDIT":
            new.allocated += a
        elif op == "DEBIT":
            if a > rem:
                codes.add("BUDGET_EXCEEDED")
            new.allocated -= a
        elif op == "RESET":
            new.allocated = a
        elif op == "RESET_SPENT":
            new.allocated, new.spent = a, spent or 0
        elif op == "REPAY_DEBT":
            a %= b.debt + 2  # mostly a legal repayment, sometimes one more than the debt
            if a > b.debt:
                codes.add("INVALID_REQUEST")
            new.debt -= a
        new_rem = new.allocated - new.spent - self.m_reserved(scope) - new.debt
        if new.over and new.debt <= new.od and new_rem >= 0:
            new.over = False
        req: dict[str, Any] = {"operation": op, "amount": amt(a), "idempotency_key": self.key("f")}
        if op == "RESET_SPENT" and spent is not None:
            req["spent"] = amt(spent)
        pre, pre_raw = self.observe(), self.raw()
        try:
            resp = self.ledger.admin.fund(scope, USD, req, tenant=TENANT)
        except CyclesError as exc:
            self.expect_failure(exc, codes, pre_raw, f"fund {op} {a} at {scope}")
            return
        assert not codes, f"fund {op} succeeded, expected one of {sorted(codes)}"
        assert resp.previous_remaining.amount == rem and resp.new_remaining.amount == new_rem
        assert resp.new_allocated.amount == new.allocated and resp.new_debt.amount == new.debt
        self.budgets[scope] = new
        note(f"fund ok {op}")
        post = self.observe()
        self.check_uniform(pre, post, [scope], delta=new_rem - rem)
        self.check_debt_growth(pre, post, may_grow=False)
        if op in ("CREDIT", "DEBIT"):
            self.check_no_new_negatives(pre, post)
        if op == "REPAY_DEBT":
            assert post.budgets[scope]["remaining"] == pre.budgets[scope]["remaining"] + a

    @rule(i=st.integers(0, 3), od=st.sampled_from((0, 50, 200, 1_000)) | st.integers(0, 600))
    def update_overdraft_limit(self, i, od):
        scope = sorted(self.budgets)[i % len(self.budgets)]
        b = self.budgets[scope]
        pre = self.observe()
        led = self.ledger.admin.update_budget(scope, USD, {"overdraft_limit": amt(od)}, tenant=TENANT)
        b.od = od
        if b.debt <= od and self.m_remaining(scope) >= 0:
            b.over = False
        elif b.debt > od:
            b.over = True
        assert led.overdraft_limit.amount == od and led.is_over_limit == b.over
        post = self.observe()
        for s in post.budgets:
            assert post.budgets[s]["remaining"] == pre.budgets[s]["remaining"]

    @rule(i=st.integers(0, 3), frozen=st.sampled_from((True, False, False, False)))
    def freeze(self, i, frozen):
        scope = sorted(self.budgets)[i % len(self.budgets)]
        op = self.ledger.admin.freeze if frozen else self.ledger.admin.unfreeze
        led = op(scope, USD, tenant=TENANT)
        self.budgets[scope].status = "FROZEN" if frozen else "ACTIVE"
        assert led.status == self.budgets[scope].status

    # ------------------------------------------------------------------------------------------------ time
    @rule(ms=st.sampled_from((1, 999, 1_000, 4_999, 5_000, 30_000, 61_000, 3_600_001)))
    def advance(self, ms):
        pre = self.observe()
        self.clock.advance(ms)
        self.check_time_travel(pre)

    @rule(r=reservations, to=st.sampled_from(("expires", "expires+1", "deadline", "deadline+1")))
    def advance_to(self, r, to):
        """Land exactly on (or just past) a reservation's expiry or grace deadline: the 13th invariant's edges."""
        m = self.res[r]
        target = {"expires": m.expires, "expires+1": m.expires + 1, "deadline": m.expires + m.grace,
                  "deadline+1": m.expires + m.grace + 1}[to]  # fmt: skip
        if target <= self.now:
            return
        pre = self.observe()
        self.clock.advance(target - self.now)
        self.check_time_travel(pre)

    def check_time_travel(self, pre: View) -> None:
        post = self.observe()
        for s, b in post.budgets.items():
            freed = pre.budgets[s]["reserved"] - b["reserved"]
            assert freed >= 0
            assert b["remaining"] == pre.budgets[s]["remaining"] + freed
            assert {k: v for k, v in b.items() if k not in ("reserved", "remaining")} == {
                k: v for k, v in pre.budgets[s].items() if k not in ("reserved", "remaining")
            }

    @rule()
    def sweep(self):
        due = self.due_count()
        pre = self.observe()
        assert self.ledger.sweep() == due
        self.check_unchanged(pre, self.observe(), "sweep")

    # ------------------------------------------------------------------------------------------------ reads
    @rule(
        who=st.sampled_from(sorted(CHAINS)),
        est=st.integers(0, 700),
        unit=st.sampled_from((USD, USD, "TOKENS")),
    )
    def decide(self, who, est, unit):
        codes = self.reserve_denials(self.budgeted(who), est)
        pre = self.observe()
        req = {"idempotency_key": self.key("d"), "subject": SUBJECTS[who], "action": ACTION, "estimate": amt(est, unit)}
        try:
            resp = self.ledger.decide(req, tenant=TENANT)
        except CyclesError as exc:
            assert unit != USD and exc.code == "UNIT_MISMATCH", exc
        else:
            assert unit == USD, "decide in a unit with no budget must be 400 UNIT_MISMATCH"
            if codes:
                assert resp.decision == "DENY" and resp.reason_code in codes, (resp, codes)
            else:
                assert resp.decision == "ALLOW" and resp.reason_code is None, resp
            assert resp.affected_scopes == CHAINS[who]
            self.decisions.append((req, resp.dump()))
        self.check_unchanged(pre, self.observe(), "decide")

    @precondition(lambda self: bool(self.decisions))
    @rule(i=st.integers(0, 1_000))
    def replay_decide(self, i):
        """§3 idempotency: a decide replay returns the old decision, whatever the budgets say now."""
        req, body = self.decisions[i % len(self.decisions)]
        pre = self.observe()
        assert self.ledger.decide(req, tenant=TENANT).dump() == body
        self.check_unchanged(pre, self.observe(), "a replayed decide")

    @precondition(lambda self: bool(self.extends))
    @rule(i=st.integers(0, 1_000), same=st.booleans())
    def replay_extend(self, i, same):
        """Same key + payload => the original body, remaining_ttl_ms recomputed (0 unless ACTIVE); else 409."""
        rid, req, body = self.extends[i % len(self.extends)]
        m = self.res[rid]
        if not same:
            req = {**req, "extend_by_ms": 2 if req["extend_by_ms"] == 1 else 1}
        pre, pre_raw = self.observe(), self.raw()
        try:
            resp = self.ledger.extend(rid, req, tenant=TENANT)
        except CyclesError as exc:
            self.expect_failure(exc, set() if same else {"IDEMPOTENCY_MISMATCH"}, pre_raw, "replayed extend")
            return
        assert same, "a changed payload under a used extend key must be 409 IDEMPOTENCY_MISMATCH"
        expected = dict(body)
        expected["remaining_ttl_ms"] = max(0, body["expires_at_ms"] - self.now) if self.mstatus(m) == "ACTIVE" else 0
        assert resp.dump() == expected
        self.check_unchanged(pre, self.observe(), "a replayed extend")

    @rule(who=st.sampled_from(sorted(CHAINS)), unit=st.sampled_from(("TOKENS", "RISK_POINTS")))
    def event_wrong_unit(self, who, unit):
        """Inv. 16: an event in a unit no derived scope has a budget in is 400 UNIT_MISMATCH, no mutation."""
        pre_raw = self.raw()
        req = {"idempotency_key": self.key("e"), "subject": SUBJECTS[who], "action": ACTION, "actual": amt(1, unit)}
        try:
            self.ledger.event(req, tenant=TENANT)
        except CyclesError as exc:
            self.expect_failure(exc, {"UNIT_MISMATCH"}, pre_raw, "event in another unit")
            return
        raise AssertionError("an event in a unit without budgets succeeded")

    @rule(r=reservations)
    def get_reservation(self, r):
        m = self.res[r]
        pre = self.observe()
        try:
            d = self.ledger.get_reservation(r, tenant=TENANT)
        except CyclesError as exc:
            assert exc.code == "RESERVATION_EXPIRED" and self.mstatus(m) == "EXPIRED", exc
        else:
            assert d.status == self.mstatus(m) and d.expires_at_ms == m.expires and d.reserved.amount == m.est
            assert (d.committed.amount if d.committed else None) == m.committed
            assert (d.finalized_at_ms is not None) == (m.status in FINALIZED)
        self.check_unchanged(pre, self.observe(), "get_reservation")

    @rule()
    def read_balances(self):
        """The real ledger's read (which sweeps) shows what the copy showed."""
        pre = self.observe()
        rows = self.ledger.balances({"tenant": TENANT, "include_children": True}, tenant=TENANT).balances
        for b in rows:
            assert b.remaining.amount == pre.budgets[b.scope]["remaining"]
            assert b.reserved.amount == pre.budgets[b.scope]["reserved"]
        self.check_unchanged(pre, self.observe(), "balances")

    @rule(op=st.sampled_from(("commit", "release", "extend", "get")))
    def unknown_reservation(self, op):
        pre_raw = self.raw()
        rid = "res_does_not_exist"
        try:
            if op == "commit":
                self.ledger.commit(rid, {"idempotency_key": self.key("c"), "actual": amt(1)}, tenant=TENANT)
            elif op == "release":
                self.ledger.release(rid, {"idempotency_key": self.key("rel")}, tenant=TENANT)
            elif op == "extend":
                self.ledger.extend(rid, {"idempotency_key": self.key("x"), "extend_by_ms": 1}, tenant=TENANT)
            else:
                self.ledger.get_reservation(rid, tenant=TENANT)
        except CyclesError as exc:
            assert exc.code == "NOT_FOUND" and exc.status == 404
            if op != "get":
                assert self.raw() == pre_raw
            return
        raise AssertionError(f"{op} of an unknown reservation succeeded")

    # ------------------------------------------------------------------------------------------- invariants
    @invariant()
    def section_8_invariants(self):
        if not self.budgets:
            return
        view = self.observe()
        assert set(view.budgets) == set(self.budgets)
        for s, b in view.budgets.items():
            # 1. the ledger identity, at every level
            assert b["remaining"] == b["allocated"] - b["spent"] - b["reserved"] - b["debt"], (s, b)
            # 3. no negative reserved / spent / debt
            assert b["reserved"] >= 0 and b["spent"] >= 0 and b["debt"] >= 0, (s, b)
            # 2. reserved = sum of estimates of ACTIVE, not yet expired reservations touching the scope
            assert b["reserved"] == self.m_reserved(s), (s, b["reserved"], self.m_reserved(s))
            # 8. debt above the overdraft limit => over limit
            if b["debt"] > b["od"]:
                assert b["over"], (s, b)
            m = self.budgets[s]
            model = {"allocated": m.allocated, "spent": m.spent, "debt": m.debt, "od": m.od, "over": m.over,
                     "status": m.status}  # fmt: skip
            assert {k: b[k] for k in model} == model, (s, b, model)
        # reservations: statuses (11: terminal states absorbing), expiry (13: non-decreasing), amounts
        assert set(view.reservations) == set(self.res)
        for rid, r in self.res.items():
            o = view.reservations[rid]
            assert o["status"] == self.mstatus(r), (rid, o["status"], self.mstatus(r))
            assert o["expires"] == r.expires and o["reserved"] == r.est and o["committed"] == r.committed
            assert o["expires"] >= self.seen_expires.get(rid, 0)
            self.seen_expires[rid] = o["expires"]
            assert r.extensions <= MAX_EXTENSIONS
        # the real (unswept) tables: reserved = sum of estimates of rows still ACTIVE; past-due rows only lag
        held: dict[str, int] = dict.fromkeys(self.budgets, 0)
        for rid, status, est, scopes, expires, grace in self.stored_reservations():
            m = self.res[rid]
            if status == "ACTIVE":
                for s in scopes:
                    held[s] += est
                assert m.status == "ACTIVE", (rid, status, m.status)
            elif status == "EXPIRED":
                assert self.mstatus(m) == "EXPIRED" and self.now > expires + grace
            else:
                assert status == m.status
        for scope, reserved in self.stored_reserved().items():
            assert reserved == held[scope], (scope, reserved, held[scope])


# Weight the operations that move money: rules are drawn uniformly, so listing one twice doubles its share.
LedgerMachine.reserve_again = LedgerMachine.reserve  # type: ignore[attr-defined]
LedgerMachine.reserve_more = LedgerMachine.reserve  # type: ignore[attr-defined]
LedgerMachine.commit_again = LedgerMachine.commit  # type: ignore[attr-defined]

LedgerMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("CYCLES_PROPERTY_EXAMPLES", "200")),
    stateful_step_count=int(os.environ.get("CYCLES_PROPERTY_STEPS", "50")),
    deadline=None,
    derandomize=not os.environ.get("CYCLES_PROPERTY_RANDOM"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestLedgerStateMachine = LedgerMachine.TestCase


# the Redis store's observability keys (see the "Observability" block of cycles/ledger/redis.py), the pseudo-tenants'
# slots, and their pointers
OBSERVABILITY = re.compile(r"\{t:__\w+__\}|\{t:[^}]*\}:(o:|a:|d:|dl:|outbox$|audit$|webhooks$|due$)|cycles:(evid|wid):")


class RedisLedgerMachine(LedgerMachine):
    """The same machine on the Redis store: db 0 of the session's redis-server, observed through a copy in db 1."""

    url = ""  # set by the fixture below (the session's redis-server)

    def open_stores(self) -> tuple[Any, Any]:
        from cycles.ledger.redis import open_redis

        store, copy = open_redis(self.url), open_redis(self.url[: -len("/0")] + "/1")
        store.redis.flushdb()
        copy.redis.flushdb()
        return store, copy

    def raw(self) -> Any:
        """The ledger's keys and values (as SQLite's `raw`, not the outbox, audit log and webhooks: a refused request
        leaves an event there on purpose)."""
        r = self.store.redis
        keys = sorted(k for k in r.keys("*") if not OBSERVABILITY.match(k))
        pipe = r.pipeline(transaction=False)
        for key in keys:
            pipe.type(key)
        kinds = pipe.execute()
        pipe = r.pipeline(transaction=False)  # two round trips, however many keys the events and audit log add
        for key, kind in zip(keys, kinds, strict=True):
            if kind == "hash":
                pipe.hgetall(key)
            elif kind == "zset":
                pipe.zrange(key, 0, -1, withscores=True)
            else:
                pipe.get(key)
        values = pipe.execute()
        return tuple(
            (
                key,
                tuple(sorted(v.items()))
                if kind == "hash"
                else tuple(m for m in v if m[0][:2] != "__")
                if kind == "zset"
                else v,
            )
            for key, kind, v in zip(keys, kinds, values, strict=True)
        )

    def changes(self) -> Any:
        return self.raw()

    def copy_to_observer(self) -> None:
        r = self.store.redis
        copy = self.copy_store
        copy.redis.flushdb()
        pipe = r.pipeline(transaction=False)
        for key in r.keys("*"):
            pipe.copy(key, key, destination_db=1)
        pipe.execute()
        copy.cache.clear()  # the copy was replaced wholesale: what its store remembers is another history
        copy.pointers.clear()

    def _records(self, kind: str) -> list[dict[str, Any]]:
        r = self.store.redis
        return [json.loads(r.hget(key, "d")) for key in r.keys("{t:acme}:" + kind + ":*")]

    def due_count(self) -> int:
        return self.store.redis.zcount("{t:acme}:ttl", "-inf", f"({self.now}")

    def stored_reservations(self) -> list[tuple[str, str, int, list[str], int, int]]:
        return [
            (d["reservation_id"], d["status"], d["estimate"], d["budgeted_scopes"], d["expires_at_ms"], d["grace_ms"])
            for d in self._records("r")
        ]

    def stored_reserved(self) -> dict[str, int]:
        """The counters the commit script moves live beside the record, remaining with them."""
        r = self.store.redis
        out = {}
        for key in r.keys("{t:acme}:b:*"):
            h = r.hgetall(key)
            d, held, spent = json.loads(h["d"]), int(h["r"]), int(h["s"])
            assert int(h["m"]) == d["allocated"] - spent - held - d["debt"], (key, h)
            out[d["scope"]] = held
        return out


RedisLedgerMachine.TestCase.settings = settings(
    LedgerMachine.TestCase.settings,
    max_examples=int(os.environ.get("CYCLES_PROPERTY_EXAMPLES", "40")),
)


class TestRedisLedgerStateMachine(RedisLedgerMachine.TestCase):  # type: ignore[misc,valid-type]
    @pytest.fixture(autouse=True)
    def _redis(self, redis_session: Any) -> None:
        RedisLedgerMachine.url = redis_session.url
