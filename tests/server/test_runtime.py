"""The nine runtime endpoints through HttpTransport: successes, and errors as the embedded ledger's own types."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import pytest

from cycles import errors
from cycles.ledger import Ledger, SQLiteStore
from cycles.models import (
    CommitRequest,
    DecisionRequest,
    EventCreateRequest,
    ReleaseRequest,
    ReservationCreateRequest,
    ReservationExtendRequest,
)
from cycles.server.testing import serve_authority

from .conftest import USD, usd

SUBJECT = {"tenant": "acme", "workspace": "prod", "agent": "bot"}
ACTION = {"kind": "llm.completion", "name": "gpt-4o"}
SCOPES = ["tenant:acme", "tenant:acme/workspace:prod", "tenant:acme/workspace:prod/agent:bot"]


def reserve_body(key: str, amount: int, **extra: Any) -> dict[str, Any]:
    return {"idempotency_key": key, "subject": SUBJECT, "action": ACTION, "estimate": usd(amount), **extra}


@pytest.fixture
def funded(admin, acme):
    for scope, amount in zip(SCOPES, (10_000, 5_000, 1_000), strict=True):
        admin.admin.create_budget({"scope": scope, "unit": USD, "allocated": usd(amount)})
    return acme


def test_reserve_commit_release_extend_get_list(funded, clock):
    t = funded
    r = t.reserve(ReservationCreateRequest.model_validate(reserve_body("r1", 300)))
    assert r.decision == "ALLOW" and r.affected_scopes == SCOPES and r.scope_path == SCOPES[-1]
    assert r.reserved.amount == 300 and r.remaining_ttl_ms == 60_000 and r.expires_at_ms == clock.now + 60_000

    detail = t.get_reservation(r.reservation_id)
    assert detail.status == "ACTIVE" and detail.reserved.amount == 300 and detail.subject.agent == "bot"

    x = t.extend(r.reservation_id, ReservationExtendRequest(idempotency_key="x1", extend_by_ms=5_000))
    assert x.status == "ACTIVE" and x.expires_at_ms == r.expires_at_ms + 5_000

    c = t.commit(r.reservation_id, CommitRequest(idempotency_key="c1", actual=usd(120)))
    assert c.status == "COMMITTED" and c.charged.amount == 120 and c.released.amount == 180

    r2 = t.reserve(reserve_body("r2", 50))
    rel = t.release(r2.reservation_id, ReleaseRequest(idempotency_key="rel1", reason="not needed"))
    assert rel.status == "RELEASED" and rel.released.amount == 50

    listing = t.list_reservations({"status": "COMMITTED"})
    assert [x.reservation_id for x in listing.reservations] == [r.reservation_id]
    assert t.list_reservations({"idempotency_key": "r2"}).reservations[0].status == "RELEASED"
    assert len(t.list_reservations({}).reservations) == 2

    balances = {b.scope: b for b in t.balances({"tenant": "acme", "include_children": True}).balances}
    assert balances["tenant:acme/workspace:prod/agent:bot"].spent.amount == 120
    assert balances["tenant:acme/workspace:prod/agent:bot"].remaining.amount == 880


def test_replays_return_the_original(funded, clock):
    t = funded
    first = t.reserve(reserve_body("same", 100))
    clock.advance(10_000)
    again = t.reserve(reserve_body("same", 100))
    assert again.reservation_id == first.reservation_id and again.remaining_ttl_ms == 50_000
    commit = {"idempotency_key": "c", "actual": usd(100)}
    assert t.commit(first.reservation_id, commit) == t.commit(first.reservation_id, commit)
    with pytest.raises(errors.IdempotencyMismatch):
        t.reserve(reserve_body("same", 101))


def test_decide_and_dry_run(funded):
    t = funded
    d = t.decide(DecisionRequest.model_validate({**reserve_body("d1", 500)}))
    assert d.decision == "ALLOW" and d.affected_scopes == SCOPES
    deny = t.decide(reserve_body("d2", 5_000))
    assert deny.decision == "DENY" and deny.reason_code == "BUDGET_EXCEEDED"
    dry = t.reserve(reserve_body("dry", 5_000, dry_run=True))
    assert dry.decision == "DENY" and dry.reservation_id is None and dry.reason_code == "BUDGET_EXCEEDED"
    assert all(b.reserved.amount == 0 for b in t.balances({"tenant": "acme", "include_children": True}).balances)


def test_event_is_201_and_debits(funded, raw, acme_key):
    request = {"idempotency_key": "e1", "subject": SUBJECT, "action": ACTION, "actual": usd(70)}
    e = funded.event(EventCreateRequest.model_validate(request))
    assert e.status == "APPLIED" and e.event_id and e.charged.amount == 70
    body = {"idempotency_key": "e2", "subject": SUBJECT, "action": ACTION, "actual": usd(5)}
    response = raw.post("/v1/events", json=body, headers={"X-Cycles-API-Key": acme_key})
    assert response.status_code == 201 and response.json()["status"] == "APPLIED"


def test_balances_admin_shape(funded):
    page = funded.balances({"scope_prefix": "tenant:acme/workspace:prod", "unit": USD})
    assert sorted(b.scope for b in page.balances) == SCOPES[1:]
    page = funded.balances({"tenant_id": "acme", "limit": 1})
    assert len(page.balances) == 1 and page.has_more and page.next_cursor
    rest = funded.balances({"tenant_id": "acme", "limit": 5, "cursor": page.next_cursor})
    assert len(rest.balances) == 2 and not rest.has_more


def test_async_methods(funded):
    t = funded

    async def flow() -> None:
        r = await t.areserve(reserve_body("a1", 100))
        await t.aextend(r.reservation_id, {"idempotency_key": "ax", "extend_by_ms": 1_000})
        assert (await t.aget_reservation(r.reservation_id)).status == "ACTIVE"
        c = await t.acommit(r.reservation_id, {"idempotency_key": "ac", "actual": usd(40)})
        assert c.charged.amount == 40
        r2 = await t.areserve(reserve_body("a2", 10))
        assert (await t.arelease(r2.reservation_id, {"idempotency_key": "ar"})).released.amount == 10
        assert (await t.adecide(reserve_body("ad", 10))).decision == "ALLOW"
        e = await t.aevent({"idempotency_key": "ae", "subject": SUBJECT, "action": ACTION, "actual": usd(1)})
        assert e.charged.amount == 1
        assert len((await t.alist_reservations({})).reservations) == 2
        bals = await t.abalances({"workspace": "prod", "agent": "bot"})
        assert bals.balances[0].spent.amount == 41

    asyncio.run(flow())
    asyncio.run(t.adecide(reserve_body("again-on-a-new-loop", 1)))  # a new event loop gets its own client


# ------------------------------------------------------------------------------ errors identical to the ledger

A = "acme"


def _setup(a: Any) -> dict[str, Any]:
    for scope, amount in zip(SCOPES, (10_000, 5_000, 1_000), strict=True):
        a.admin.create_budget({"scope": scope, "unit": USD, "allocated": usd(amount)})
    r = a.reserve(reserve_body("base", 100, overage_policy="REJECT"), tenant=A)
    done = a.reserve(reserve_body("done", 10), tenant=A)
    a.commit(done.reservation_id, {"idempotency_key": "done-c", "actual": usd(10)}, tenant=A)
    return {"r": r.reservation_id, "done": done.reservation_id}


SCENARIOS: dict[str, tuple[type[errors.CyclesError], Callable[[Any, dict[str, Any]], Any]]] = {
    "budget exceeded": (errors.BudgetExceeded, lambda a, s: a.reserve(reserve_body("big", 2_000), tenant=A)),
    "unit mismatch": (errors.UnitMismatch, lambda a, s: a.reserve(
        {**reserve_body("u", 1), "estimate": {"unit": "TOKENS", "amount": 1}}, tenant=A)),
    "not found (no budget)": (errors.NotFound, lambda a, s: a.reserve(
        {**reserve_body("nf", 1), "subject": {"tenant": "other"}}, tenant="other")),
    "not found (reservation)": (errors.NotFound, lambda a, s: a.commit("res_nope", {"idempotency_key": "k",
                                                                                   "actual": usd(1)}, tenant=A)),
    "finalized": (errors.ReservationFinalized, lambda a, s: a.release(s["done"], {"idempotency_key": "x"},
                                                                      tenant=A)),
    "REJECT overage": (errors.BudgetExceeded, lambda a, s: a.commit(s["r"], {"idempotency_key": "o",
                                                                             "actual": usd(101)}, tenant=A)),
    "commit unit mismatch": (errors.UnitMismatch, lambda a, s: a.commit(
        s["r"], {"idempotency_key": "um", "actual": {"unit": "TOKENS", "amount": 1}}, tenant=A)),
    "idempotency mismatch": (errors.IdempotencyMismatch, lambda a, s: a.reserve(reserve_body("base", 99), tenant=A)),
    "forbidden subject": (errors.Forbidden, lambda a, s: a.reserve(
        {**reserve_body("f", 1), "subject": {"tenant": "other"}}, tenant=A)),
    "invalid request": (errors.InvalidRequest, lambda a, s: a.reserve({**reserve_body("i", 1), "bogus": 1}, tenant=A)),
    "negative amount": (errors.InvalidRequest, lambda a, s: a.reserve(reserve_body("n", -1), tenant=A)),
    "balances without filter": (errors.InvalidRequest, lambda a, s: a.balances({"include_children": True},
                                                                               tenant=A)),
    "list window inverted": (errors.InvalidRequest, lambda a, s: a.list_reservations(
        {"from": "2030-01-02T00:00:00Z", "to": "2030-01-01T00:00:00Z"}, tenant=A)),
    "extension past expiry": (errors.ReservationExpired, lambda a, s: (
        a._test_clock.advance(61_000), a.extend(s["r"], {"idempotency_key": "late", "extend_by_ms": 1_000},
                                                tenant=A))),
    "commit past grace": (errors.ReservationExpired, lambda a, s: (
        a._test_clock.advance(70_000), a.commit(s["r"], {"idempotency_key": "late", "actual": usd(1)},
                                                tenant=A))),
    "frozen budget": (errors.BudgetFrozen, lambda a, s: (
        a.admin.freeze("tenant:acme/workspace:prod", USD), a.reserve(reserve_body("fz", 1), tenant=A))),
    "max extensions": (errors.MaxExtensionsExceeded, lambda a, s: [
        a.extend(s["r"], {"idempotency_key": f"ext{i}", "extend_by_ms": 1}, tenant=A) for i in range(11)]),
}  # fmt: skip


def _ids(text: str) -> str:
    """Server-made ids differ between two runs: compare around them."""
    return re.sub(r"(res|evt|led|key)_[0-9a-f]{24,}", r"\1_*", text)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_errors_match_the_embedded_ledger(name, tmp_path, clock):
    expected, scenario = SCENARIOS[name]
    outcomes = []
    for kind in ("embedded", "http"):
        store = SQLiteStore(tmp_path / f"{kind}.db")
        ledger = Ledger(store, clock=type(clock)(clock.now))
        if kind == "embedded":
            authority: Any = ledger
            ctx = None
        else:
            ctx = serve_authority(ledger)
            authority = ctx.__enter__()
        authority._test_clock = ledger.clock
        try:
            state = _setup(authority)
            with pytest.raises(errors.CyclesError) as info:
                scenario(authority, state)
            exc = info.value
            outcomes.append((type(exc), exc.code, exc.status, _ids(exc.message), _ids(repr(exc.details))))
            if kind == "http":
                assert exc.request_id and exc.request_id.startswith("req_")
                assert exc.trace_id and len(exc.trace_id) == 32
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
            store.close()
    assert outcomes[0][0] is expected
    assert outcomes[0] == outcomes[1]
