"""dry_run reservations and POST /v1/decide: full evaluation, no mutation, budget-state denials as 200 DENY."""

import pytest

from cycles.errors import Forbidden, InvalidRequest, UnitMismatch

from .conftest import TENANT_KEYS
from .helpers import (
    ACTION,
    USD,
    amount,
    budgets,
    commit,
    decide,
    key,
    ledger_state,
    make_tenant,
    refused,
    refused_each,
    release,
    reserve,
    set_status,
    unchanged,
)

SUBJECT = {"tenant": "acme", "workspace": "prod", "agent": "bot"}
T, W, A = "tenant:acme", "tenant:acme/workspace:prod", "tenant:acme/workspace:prod/agent:bot"
SCOPES = [T, W, A]


def exceeded(authority):
    budgets(authority, {T: 1_000, A: 10})


def frozen(authority):
    budgets(authority, {T: 1_000, A: 1_000})
    authority.admin.freeze(A, USD)


def not_found(authority):
    budgets(authority, {"tenant:acme/workspace:other": 1_000})


def tenant_closed(authority):
    make_tenant(authority)
    budgets(authority, {T: 1_000})
    set_status(authority, "acme", "CLOSED")


def tenant_suspended(authority):
    make_tenant(authority)
    budgets(authority, {T: 1_000})
    set_status(authority, "acme", "SUSPENDED")


DENIALS = [
    (exceeded, "BUDGET_EXCEEDED"),
    (frozen, "BUDGET_FROZEN"),
    (not_found, "BUDGET_NOT_FOUND"),
    pytest.param(tenant_closed, "TENANT_CLOSED", marks=pytest.mark.embedded_only(TENANT_KEYS)),
    pytest.param(tenant_suspended, "TENANT_SUSPENDED", marks=pytest.mark.embedded_only(TENANT_KEYS)),
]


def overdraft_exceeded(authority):
    """A scope flagged over-limit whose remaining would still cover the estimate."""
    budgets(authority, {T: 1_000, A: 200})
    r1 = reserve(authority, SUBJECT, 100)
    r2 = reserve(authority, SUBJECT, 100)
    commit(authority, r1.reservation_id, 300)  # nothing left to cap with: A over-limit
    release(authority, r2.reservation_id)  # remaining 100 again, still over-limit (no funding)
    assert ledger_state(authority, A)["is_over_limit"] is True
    assert ledger_state(authority, A)["remaining"] == 100


DENIALS.append((overdraft_exceeded, "OVERDRAFT_LIMIT_EXCEEDED"))


# -------------------------------------------------------------------------------------------------------- dry_run


def test_dry_run_allow_holds_nothing(authority):
    budgets(authority, {T: 1_000, A: 500})
    with unchanged(authority):
        r = reserve(authority, SUBJECT, 500, dry_run=True)
    assert r.decision == "ALLOW"
    assert r.reservation_id is None and r.expires_at_ms is None and r.remaining_ttl_ms is None
    assert r.affected_scopes == SCOPES
    assert r.scope_path == A
    assert r.reason_code is None
    assert reserve(authority, SUBJECT, 500).decision == "ALLOW"  # the whole budget is still there


def test_dry_run_balances_are_the_pre_state_when_present(authority):
    budgets(authority, {T: 1_000, A: 500})
    r = reserve(authority, SUBJECT, 100, dry_run=True)
    if r.balances is not None:
        assert {b.scope: b.remaining.amount for b in r.balances} == {T: 1_000, A: 500}


@pytest.mark.parametrize(
    ("setup", "reason"), DENIALS, ids=[d.values[1] if hasattr(d, "values") else d[1] for d in DENIALS]
)
def test_dry_run_reports_budget_state_denials_as_deny(authority, setup, reason):
    setup(authority)
    with unchanged(authority):
        r = reserve(authority, SUBJECT, 50, dry_run=True)
    assert r.decision == "DENY"
    assert r.reason_code == reason
    assert r.affected_scopes == SCOPES
    assert r.reservation_id is None and r.expires_at_ms is None and r.remaining_ttl_ms is None


def test_dry_run_in_the_wrong_unit_is_400(authority):
    budgets(authority, {T: 1_000})
    with refused(authority, UnitMismatch, "UNIT_MISMATCH", 400):
        reserve(authority, SUBJECT, 1, unit="TOKENS", dry_run=True)


def test_dry_run_validity_errors_stay_400(authority):
    budgets(authority, {T: 1_000})
    with refused(authority, InvalidRequest, "INVALID_REQUEST", 400):
        reserve(authority, SUBJECT, 1, dry_run=True, ttl_ms=10)


def test_dry_run_for_another_tenant_is_403(authority):
    budgets(authority, {"tenant:other": 1_000})
    with refused(authority, Forbidden, "FORBIDDEN", 403):
        reserve(authority, {"tenant": "other"}, 1, dry_run=True)


def test_dry_run_does_not_hold_so_repeats_all_allow(authority):
    budgets(authority, {T: 100})
    with unchanged(authority):
        for _ in range(3):
            assert reserve(authority, SUBJECT, 100, dry_run=True).decision == "ALLOW"


# --------------------------------------------------------------------------------------------------------- decide


def test_decide_allow(authority):
    budgets(authority, {T: 1_000, A: 500})
    with unchanged(authority):
        d = decide(authority, SUBJECT, 500, metadata={"why": "probe"})
    assert d.decision == "ALLOW"
    assert d.reason_code is None and d.caps is None
    assert d.affected_scopes == SCOPES


def test_decide_holds_nothing(authority):
    budgets(authority, {T: 100})
    with unchanged(authority):
        assert decide(authority, SUBJECT, 100).decision == "ALLOW"
        assert decide(authority, SUBJECT, 100).decision == "ALLOW"
    assert reserve(authority, SUBJECT, 100).decision == "ALLOW"


@pytest.mark.parametrize(
    ("setup", "reason"), DENIALS, ids=[d.values[1] if hasattr(d, "values") else d[1] for d in DENIALS]
)
def test_decide_reports_budget_state_denials_as_deny(authority, setup, reason):
    setup(authority)
    with unchanged(authority):
        d = decide(authority, SUBJECT, 50)
    assert d.decision == "DENY"
    assert d.reason_code == reason


def test_decide_in_the_wrong_unit_is_400(authority):
    budgets(authority, {T: 1_000})
    with refused(authority, UnitMismatch, "UNIT_MISMATCH", 400):
        decide(authority, SUBJECT, 1, unit="TOKENS")


def test_decide_for_another_tenant_is_403(authority):
    budgets(authority, {"tenant:other": 1_000})
    with refused(authority, Forbidden, "FORBIDDEN", 403):
        decide(authority, {"tenant": "other"}, 1)


INVALID_DECIDES = [
    {"estimate": {"unit": USD, "amount": -1}},
    {"ttl_ms": 60_000},  # not a decide field
    {"subject": {"dimensions": {"a": "b"}}},
    {"idempotency_key": ""},
]


def test_invalid_decide_requests_are_400(authority):
    budgets(authority, {T: 1_000})

    def attempt(change):
        request = {"idempotency_key": key(), "subject": SUBJECT, "action": ACTION, "estimate": amount(1), **change}
        authority.decide(request, tenant="acme")

    refused_each(authority, INVALID_DECIDES, attempt, InvalidRequest, "INVALID_REQUEST", 400)


def test_decide_exact_fit_and_one_more(authority):
    budgets(authority, {T: 1_000, A: 300})
    assert decide(authority, SUBJECT, 300).decision == "ALLOW"
    assert decide(authority, SUBJECT, 301).decision == "DENY"
