"""POST /v1/events: direct debits under every overage policy."""

import pytest

from cycles.errors import (
    BudgetExceeded,
    BudgetFrozen,
    Forbidden,
    InvalidRequest,
    NotFound,
    OverdraftLimitExceeded,
    TenantClosed,
    UnitMismatch,
)

from .conftest import TENANT_KEYS
from .helpers import (
    ACTION,
    USD,
    amount,
    budgets,
    event,
    key,
    ledger_state,
    make_tenant,
    refused,
    refused_each,
    set_status,
)

SUBJECT = {"tenant": "acme", "workspace": "prod", "agent": "bot"}
T, W, A = "tenant:acme", "tenant:acme/workspace:prod", "tenant:acme/workspace:prod/agent:bot"


def budget(authority, scope, allocated, overdraft=0):
    authority.admin.create_budget(
        {"scope": scope, "unit": USD, "allocated": amount(allocated), "overdraft_limit": amount(overdraft)}
    )


def ledger(allocated, spent=0, reserved=0, debt=0, over=False):
    return {
        "allocated": allocated, "spent": spent, "reserved": reserved, "debt": debt,
        "remaining": allocated - spent - reserved - debt, "is_over_limit": over,
    }  # fmt: skip


def test_event_debits_every_budgeted_scope(authority):
    budgets(authority, {T: 1_000, A: 500})  # workspace not budgeted
    e = event(authority, SUBJECT, 120, metadata={"src": "batch"}, client_time_ms=5,
              metrics={"tokens_input": 1, "custom": {"x": 1}})  # fmt: skip
    assert e.status == "APPLIED"
    assert e.event_id
    assert e.charged.model_dump() == amount(120)
    assert ledger_state(authority, T) == ledger(1_000, spent=120)
    assert ledger_state(authority, A) == ledger(500, spent=120)
    if e.balances is not None:
        assert {b.scope: b.remaining.amount for b in e.balances} == {T: 880, A: 380}


def test_events_get_distinct_ids_and_add_up(authority):
    budgets(authority, {T: 1_000})
    ids = {event(authority, SUBJECT, 100).event_id for _ in range(3)}
    assert len(ids) == 3
    assert ledger_state(authority, T) == ledger(1_000, spent=300)


def test_event_zero(authority):
    budgets(authority, {T: 1_000})
    assert event(authority, SUBJECT, 0).charged.amount == 0
    assert ledger_state(authority, T) == ledger(1_000)


def test_event_subject_without_tenant(authority):
    budgets(authority, {T: 1_000})
    event(authority, {"agent": "bot"}, 10)
    assert ledger_state(authority, T)["spent"] == 10


# ---------------------------------------------------------------------------------------------------- REJECT


def test_reject_refuses_when_any_scope_is_short(authority):
    budgets(authority, {T: 1_000, A: 100})
    with refused(authority, BudgetExceeded, "BUDGET_EXCEEDED", 409) as info:
        event(authority, SUBJECT, 101, overage_policy="REJECT")
    assert info.value.details["scope"] == A
    assert event(authority, SUBJECT, 100, overage_policy="REJECT").charged.amount == 100
    assert ledger_state(authority, A) == ledger(100, spent=100)
    assert ledger_state(authority, T) == ledger(1_000, spent=100)


# ------------------------------------------------------------------------------------------ ALLOW_IF_AVAILABLE


def test_allow_if_available_is_the_default_and_caps(authority):
    budgets(authority, {T: 1_000, W: 300, A: 100})
    e = event(authority, SUBJECT, 250)  # A can give only 100
    assert e.charged.amount == 100
    assert ledger_state(authority, T) == ledger(1_000, spent=100, over=False)
    assert ledger_state(authority, W) == ledger(300, spent=100, over=False)
    assert ledger_state(authority, A) == ledger(100, spent=100, over=True)


def test_allow_if_available_covered_in_full(authority):
    budgets(authority, {T: 1_000, A: 300})
    assert event(authority, SUBJECT, 300, overage_policy="ALLOW_IF_AVAILABLE").charged.amount == 300
    assert ledger_state(authority, A) == ledger(300, spent=300, over=False)


def test_allow_if_available_with_nothing_left_charges_nothing(authority):
    budgets(authority, {T: 100})
    event(authority, SUBJECT, 100)
    e = event(authority, SUBJECT, 50)
    assert e.charged.amount == 0
    assert ledger_state(authority, T) == ledger(100, spent=100, over=True)


# ---------------------------------------------------------------------------------------- ALLOW_WITH_OVERDRAFT


def test_overdraft_event_creates_debt(authority):
    budget(authority, T, 1_000)
    budget(authority, A, 100, overdraft=100)
    e = event(authority, SUBJECT, 150, overage_policy="ALLOW_WITH_OVERDRAFT")
    assert e.charged.amount == 150
    assert ledger_state(authority, A) == ledger(100, spent=100, debt=50)
    assert ledger_state(authority, T) == ledger(1_000, spent=150)


def test_overdraft_event_beyond_the_limit_is_refused(authority):
    budget(authority, T, 1_000)
    budget(authority, A, 100, overdraft=100)
    with refused(authority, OverdraftLimitExceeded, "OVERDRAFT_LIMIT_EXCEEDED", 409):
        event(authority, SUBJECT, 201, overage_policy="ALLOW_WITH_OVERDRAFT")
    event(authority, SUBJECT, 200, overage_policy="ALLOW_WITH_OVERDRAFT")  # deficit 100: exactly the limit
    assert ledger_state(authority, A) == ledger(100, spent=100, debt=100)
    with refused(authority, OverdraftLimitExceeded, "OVERDRAFT_LIMIT_EXCEEDED", 409):
        event(authority, SUBJECT, 1, overage_policy="ALLOW_WITH_OVERDRAFT")


def test_overdraft_event_falls_back_where_a_short_scope_has_no_limit(authority):
    budget(authority, T, 120)
    budget(authority, A, 100, overdraft=500)
    e = event(authority, SUBJECT, 150, overage_policy="ALLOW_WITH_OVERDRAFT")
    assert e.charged.amount == 100  # capped at A's 100, no debt anywhere
    assert ledger_state(authority, T) == ledger(120, spent=100, over=True)
    assert ledger_state(authority, A) == ledger(100, spent=100, over=True)


def test_overdraft_event_covered_in_full_needs_no_debt(authority):
    budget(authority, T, 1_000, overdraft=10)
    assert event(authority, SUBJECT, 900, overage_policy="ALLOW_WITH_OVERDRAFT").charged.amount == 900
    assert ledger_state(authority, T) == ledger(1_000, spent=900)


# -------------------------------------------------------------------------------------------------------- errors


def test_event_in_the_wrong_unit_is_400(authority):
    budgets(authority, {T: 1_000})
    with refused(authority, UnitMismatch, "UNIT_MISMATCH", 400):
        event(authority, SUBJECT, 1, unit="TOKENS")


def test_event_without_any_budget_is_404(authority):
    with refused(authority, NotFound, "NOT_FOUND", 404):
        event(authority, SUBJECT, 1)


def test_event_on_a_frozen_budget(authority):
    budgets(authority, {T: 1_000, A: 1_000})
    authority.admin.freeze(T, USD)
    with refused(authority, BudgetFrozen, "BUDGET_FROZEN", 409):
        event(authority, SUBJECT, 1)


def test_event_for_another_tenant_is_403(authority):
    budgets(authority, {"tenant:other": 1_000})
    with refused(authority, Forbidden, "FORBIDDEN", 403):
        event(authority, {"tenant": "other"}, 1)


@pytest.mark.embedded_only(TENANT_KEYS)
def test_event_for_a_closed_tenant(authority):
    make_tenant(authority)
    budgets(authority, {T: 1_000})
    set_status(authority, "acme", "CLOSED")
    with refused(authority, TenantClosed, "TENANT_CLOSED", 409):
        event(authority, SUBJECT, 1)


@pytest.mark.embedded_only(TENANT_KEYS)
def test_event_for_a_suspended_tenant_is_403(authority):
    make_tenant(authority)
    budgets(authority, {T: 1_000})
    set_status(authority, "acme", "SUSPENDED")
    with refused(authority, Forbidden, "FORBIDDEN", 403):
        event(authority, SUBJECT, 1)


INVALID_EVENTS = [
    {"actual": {"unit": USD, "amount": -5}},
    {"client_time_ms": -1},
    {"overage_policy": "NEVER"},
    {"estimate": amount(1)},
    {"idempotency_key": "x" * 257},
    {"metrics": {"tokens_output": -1}},
]


def test_invalid_events_are_400(authority):
    budgets(authority, {T: 1_000})

    def attempt(change):
        request = {"idempotency_key": key(), "subject": SUBJECT, "action": ACTION, "actual": amount(1), **change}
        authority.event(request, tenant="acme")

    refused_each(authority, INVALID_EVENTS, attempt, InvalidRequest, "INVALID_REQUEST", 400)


def test_event_required_fields(authority):
    budgets(authority, {T: 1_000})

    def attempt(missing):
        request = {"idempotency_key": key(), "subject": SUBJECT, "action": ACTION, "actual": amount(1)}
        del request[missing]
        authority.event(request, tenant="acme")

    missing = ["idempotency_key", "subject", "action", "actual"]
    refused_each(authority, missing, attempt, InvalidRequest, "INVALID_REQUEST", 400)
