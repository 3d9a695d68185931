"""Events are written by the rules in the transaction of the change that caused them (the outbox)."""

from __future__ import annotations

from typing import Any

import pytest

from cycles.errors import BudgetDenied, BudgetExceeded, CyclesError
from cycles.ledger import Ledger, events
from cycles.ledger.store import EventFilter

from .conftest import USD, usd

SUBJECT = {"tenant": "acme", "agent": "bot"}
ACTION = {"kind": "llm.completion", "name": "gpt-4o"}


def reserve(ledger: Ledger, key: str, amount: int, **extra: Any) -> str:
    body = {"idempotency_key": key, "subject": SUBJECT, "action": ACTION, "estimate": usd(amount), **extra}
    return ledger.reserve(body).reservation_id


def outbox(ledger: Ledger, **filters: Any) -> list[Any]:
    with ledger.store.transaction(readonly=True) as tx:
        return tx.list_events(EventFilter(**filters), "created_at_ms", False, None, 1000)


def types(ledger: Ledger) -> list[str]:
    return [e.event_type for e in outbox(ledger)]


@pytest.fixture
def funded(ledger: Ledger) -> Ledger:
    ledger.admin.create_budget({"scope": "tenant:acme", "unit": USD, "allocated": usd(1_000)})
    ledger.admin.create_budget({"scope": "tenant:acme/agent:bot", "unit": USD, "allocated": usd(500),
                                "overdraft_limit": usd(300)})  # fmt: skip
    return ledger


def test_admin_changes_are_events(funded):
    assert types(funded) == ["budget.created", "budget.created"]
    funded.admin.fund("tenant:acme", USD, {"operation": "CREDIT", "amount": usd(250), "reason": "top-up"})
    e = outbox(funded, event_type="budget.funded")[0]
    assert e.scope == "tenant:acme" and e.data["reason"] == "top-up"
    assert e.data["previous_state"]["allocated"] == 1_000 and e.data["new_state"]["allocated"] == 1_250


def test_a_denial_is_an_event_and_changes_nothing_else(funded):
    before = funded.balances({"tenant": "acme", "agent": "bot"})
    with pytest.raises(BudgetExceeded):
        reserve(funded, "big", 600)
    (denied,) = outbox(funded, event_type="reservation.denied")
    assert denied.tenant_id == "acme" and denied.category == "reservation"
    assert denied.data["reason_code"] == "BUDGET_EXCEEDED"
    assert denied.data["scope"] == "tenant:acme/agent:bot"
    assert denied.data["requested_amount"] == 600 and denied.data["remaining"] == 500
    assert denied.data["subject"]["agent"] == "bot"
    assert funded.balances({"tenant": "acme", "agent": "bot"}) == before


def test_a_replayed_reserve_is_not_a_denial(funded):
    reserve(funded, "k", 500)  # takes everything: the replay below would be denied if it were new
    assert reserve(funded, "k", 500)
    assert "reservation.denied" not in types(funded)


def test_exhaustion_is_one_event_when_remaining_reaches_zero(funded):
    rid = reserve(funded, "a", 300)
    assert "budget.exhausted" not in types(funded)
    reserve(funded, "b", 200)  # the agent's 500 are now all held
    exhausted = outbox(funded, event_type="budget.exhausted")
    assert [(e.scope, e.data["remaining"]) for e in exhausted] == [("tenant:acme/agent:bot", 0)]
    funded.commit(rid, {"idempotency_key": "c", "actual": usd(300)})
    assert len(outbox(funded, event_type="budget.exhausted")) == 1  # already at zero: no new crossing


def test_commit_overage_into_debt(funded):
    rid = reserve(funded, "r", 400, overage_policy="ALLOW_WITH_OVERDRAFT")
    funded.commit(rid, {"idempotency_key": "c", "actual": usd(650)})
    (overage,) = outbox(funded, event_type="reservation.commit_overage")
    assert overage.data == {
        "reservation_id": rid, "scope": "tenant:acme/agent:bot", "unit": USD, "estimated_amount": 400,
        "actual_amount": 650, "overage": 250, "overage_policy": "ALLOW_WITH_OVERDRAFT", "debt_incurred": 150,
    }  # fmt: skip
    (debt,) = outbox(funded, event_type="budget.debt_incurred")
    assert debt.scope == "tenant:acme/agent:bot" and debt.data["debt_incurred"] == 150
    assert debt.data["total_debt"] == 150 and debt.data["reservation_id"] == rid
    with pytest.raises(BudgetDenied) as refused:  # the agent is in debt: new holds are refused, an event too
        reserve(funded, "after", 1)
    assert outbox(funded, event_type="reservation.denied")[-1].data["reason_code"] == refused.value.code


def test_over_limit_is_entered_once(funded):
    rid = reserve(funded, "r", 450)  # ALLOW_IF_AVAILABLE: the overage is capped at what is left, flagged
    funded.commit(rid, {"idempotency_key": "c", "actual": usd(900)})
    entered = outbox(funded, event_type="budget.over_limit_entered")
    assert [e.scope for e in entered] == ["tenant:acme/agent:bot"]
    assert entered[0].data["is_over_limit"] is True


def test_expiry_is_an_event_of_the_sweeper(funded, clock):
    rid = reserve(funded, "r", 100, ttl_ms=1_000, grace_period_ms=0)
    clock.advance(5_000)
    assert funded.sweep() == 1
    (expired,) = outbox(funded, event_type="reservation.expired")
    assert expired.data["reservation_id"] == rid and expired.data["estimated_amount"] == 100
    assert expired.actor == {"type": "system"} and expired.source == "expiry-sweeper"
    assert expired.correlation_id == rid


def test_a_change_that_rolls_back_leaves_no_event(funded):
    rid = reserve(funded, "r", 100, overage_policy="REJECT")
    count = len(outbox(funded))
    with pytest.raises(CyclesError):
        funded.commit(rid, {"idempotency_key": "c", "actual": usd(200)})  # REJECT: refused, the hold stays
    assert len(outbox(funded)) == count


def test_events_carry_the_actor_in_context(funded):
    token = events.current_actor.set(events.Actor("admin", request_id="req-1", source_ip="10.0.0.1"))
    try:
        funded.admin.freeze("tenant:acme", USD)
    finally:
        events.current_actor.reset(token)
    (frozen,) = outbox(funded, event_type="budget.frozen")
    assert frozen.actor == {"type": "admin", "source_ip": "10.0.0.1"} and frozen.request_id == "req-1"
