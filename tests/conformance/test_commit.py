"""POST /v1/reservations/{id}/commit: settlement and the ledger math of every overage policy."""

import pytest

from cycles.errors import (
    BudgetExceeded,
    BudgetFrozen,
    InvalidRequest,
    NotFound,
    OverdraftLimitExceeded,
    ReservationFinalized,
    TenantClosed,
    UnitMismatch,
)

from .conftest import TENANT_KEYS
from .helpers import (
    USD,
    amount,
    budgets,
    commit,
    key,
    ledger_state,
    make_tenant,
    refused,
    refused_each,
    release,
    reserve,
    set_status,
)

SUBJECT = {"tenant": "acme", "agent": "bot"}
T, A = "tenant:acme", "tenant:acme/agent:bot"


def budget(authority, scope, allocated, overdraft=0, **extra):
    authority.admin.create_budget(
        {"scope": scope, "unit": USD, "allocated": amount(allocated), "overdraft_limit": amount(overdraft), **extra}
    )


def ledger(allocated, spent=0, reserved=0, debt=0, over=False):
    return {
        "allocated": allocated, "spent": spent, "reserved": reserved, "debt": debt,
        "remaining": allocated - spent - reserved - debt, "is_over_limit": over,
    }  # fmt: skip


def status_of(authority, reservation_id):
    return authority.get_reservation(reservation_id, tenant="acme").status


# --------------------------------------------------------------------------------------------- actual <= estimate


def test_commit_below_estimate_releases_the_rest(authority, clock):
    budgets(authority, {T: 1_000, A: 500})
    r = reserve(authority, SUBJECT, 100)
    clock.advance(1_500)
    c = commit(authority, r.reservation_id, 60, metadata={"model": "gpt-4o"},
               metrics={"tokens_input": 10, "tokens_output": 20, "latency_ms": 5, "model_version": "v1"})  # fmt: skip
    assert c.status == "COMMITTED"
    assert c.charged.model_dump() == amount(60)
    assert c.released.model_dump() == amount(40)
    assert ledger_state(authority, T) == ledger(1_000, spent=60)
    assert ledger_state(authority, A) == ledger(500, spent=60)
    got = authority.get_reservation(r.reservation_id, tenant="acme")
    assert got.status == "COMMITTED"
    assert got.committed.model_dump() == amount(60)
    assert got.finalized_at_ms == clock.now
    assert got.committed_metadata == {"model": "gpt-4o"}
    assert got.expires_at_ms == r.expires_at_ms and got.reserved.amount == 100


def test_commit_of_exactly_the_estimate_releases_nothing(authority):
    budgets(authority, {T: 1_000})
    r = reserve(authority, SUBJECT, 100)
    c = commit(authority, r.reservation_id, 100)
    assert c.charged.amount == 100 and c.released is None
    assert ledger_state(authority, T) == ledger(1_000, spent=100)


def test_commit_zero_releases_everything(authority):
    budgets(authority, {T: 1_000})
    r = reserve(authority, SUBJECT, 100)
    c = commit(authority, r.reservation_id, 0)
    assert c.charged.amount == 0 and c.released.amount == 100
    assert ledger_state(authority, T) == ledger(1_000)


def test_commit_only_touches_its_own_hold(authority):
    budgets(authority, {T: 1_000})
    r1 = reserve(authority, SUBJECT, 100)
    reserve(authority, SUBJECT, 200)
    commit(authority, r1.reservation_id, 30)
    assert ledger_state(authority, T) == ledger(1_000, spent=30, reserved=200)


# ------------------------------------------------------------------------------------------------------- REJECT


def test_reject_refuses_any_overage_and_keeps_the_reservation_active(authority):
    budgets(authority, {T: 1_000})
    r = reserve(authority, SUBJECT, 100, overage_policy="REJECT")
    with refused(authority, BudgetExceeded, "BUDGET_EXCEEDED", 409):
        commit(authority, r.reservation_id, 101)
    assert status_of(authority, r.reservation_id) == "ACTIVE"
    assert commit(authority, r.reservation_id, 100).charged.amount == 100
    assert ledger_state(authority, T) == ledger(1_000, spent=100)


# ------------------------------------------------------------------------------------------- ALLOW_IF_AVAILABLE


def test_overage_that_every_scope_covers_is_charged_in_full(authority):
    budgets(authority, {T: 1_000, A: 500})
    r = reserve(authority, SUBJECT, 100, overage_policy="ALLOW_IF_AVAILABLE")
    c = commit(authority, r.reservation_id, 250)
    assert c.charged.amount == 250 and c.released is None
    assert ledger_state(authority, T) == ledger(1_000, spent=250)
    assert ledger_state(authority, A) == ledger(500, spent=250)


def test_allow_if_available_is_the_default(authority):
    budgets(authority, {T: 1_000, A: 200})
    r = reserve(authority, SUBJECT, 150)  # no overage_policy
    assert commit(authority, r.reservation_id, 300).charged.amount == 200  # capped, not refused, no debt
    assert ledger_state(authority, A) == ledger(200, spent=200, over=True)


def test_allow_if_available_caps_the_overage_and_flags_only_the_short_scope(authority):
    budgets(authority, {T: 1_000, A: 200})
    r = reserve(authority, SUBJECT, 150, overage_policy="ALLOW_IF_AVAILABLE")  # A remaining 50
    c = commit(authority, r.reservation_id, 300)  # overage 150, A can add only 50
    assert c.charged.amount == 200 and c.released is None
    assert ledger_state(authority, T) == ledger(1_000, spent=200, over=False)
    assert ledger_state(authority, A) == ledger(200, spent=200, over=True)
    assert authority.get_reservation(r.reservation_id, tenant="acme").committed.amount == 200


def test_a_scope_that_covers_the_overage_exactly_is_not_flagged(authority):
    budgets(authority, {T: 300, A: 200})
    r = reserve(authority, SUBJECT, 150)  # remaining T 150, A 50
    assert commit(authority, r.reservation_id, 300).charged.amount == 200  # overage 150: T could, A could not
    assert ledger_state(authority, T) == ledger(300, spent=200, over=False)
    assert ledger_state(authority, A) == ledger(200, spent=200, over=True)


def test_allow_if_available_caps_at_the_smallest_remaining(authority):
    W = "tenant:acme/workspace:w"
    leaf = "tenant:acme/workspace:w/agent:bot"
    budgets(authority, {T: 120, W: 1_000, leaf: 160})
    r = reserve(authority, {"tenant": "acme", "workspace": "w", "agent": "bot"}, 100)  # remaining 20 / 900 / 60
    c = commit(authority, r.reservation_id, 200)  # overage 100: T has 20, leaf 60, W 900
    assert c.charged.amount == 120
    assert ledger_state(authority, T) == ledger(120, spent=120, over=True)
    assert ledger_state(authority, W) == ledger(1_000, spent=120, over=False)  # could cover: not flagged
    assert ledger_state(authority, leaf) == ledger(160, spent=120, over=True)  # could not cover 100: flagged


def test_allow_if_available_with_nothing_left_charges_the_estimate(authority):
    budgets(authority, {T: 100})
    r = reserve(authority, SUBJECT, 100)
    assert commit(authority, r.reservation_id, 500).charged.amount == 100
    assert ledger_state(authority, T) == ledger(100, spent=100, over=True)


# ----------------------------------------------------------------------------------------- ALLOW_WITH_OVERDRAFT


def test_overdraft_policy_without_shortfall_is_a_normal_commit(authority):
    budget(authority, T, 1_000, overdraft=100)
    r = reserve(authority, SUBJECT, 100, overage_policy="ALLOW_WITH_OVERDRAFT")
    assert commit(authority, r.reservation_id, 300).charged.amount == 300
    assert ledger_state(authority, T) == ledger(1_000, spent=300)


def test_overdraft_turns_the_unfunded_part_into_debt(authority):
    budget(authority, T, 1_000)
    budget(authority, A, 200, overdraft=100)
    r = reserve(authority, SUBJECT, 150, overage_policy="ALLOW_WITH_OVERDRAFT")  # A remaining 50
    c = commit(authority, r.reservation_id, 250)  # overage 100: 50 funded, 50 debt at A
    assert c.charged.amount == 250 and c.released is None
    assert ledger_state(authority, T) == ledger(1_000, spent=250)
    assert ledger_state(authority, A) == ledger(200, spent=200, debt=50)  # spent grows by the funded part only
    assert ledger_state(authority, A)["remaining"] == -50
    assert authority.get_reservation(r.reservation_id, tenant="acme").committed.amount == 250


def test_overdraft_checks_the_unfunded_deficit_not_the_whole_overage(authority):
    budget(authority, A, 200, overdraft=60)
    r = reserve(authority, SUBJECT, 150, overage_policy="ALLOW_WITH_OVERDRAFT")  # remaining 50
    assert commit(authority, r.reservation_id, 250).charged.amount == 250  # deficit 50 <= 60 (overage 100 > 60)
    assert ledger_state(authority, A) == ledger(200, spent=200, debt=50)


def test_overdraft_limit_exceeded_changes_nothing(authority):
    budget(authority, T, 1_000)
    budget(authority, A, 200, overdraft=40)
    r = reserve(authority, SUBJECT, 150, overage_policy="ALLOW_WITH_OVERDRAFT")  # remaining 50
    with refused(authority, OverdraftLimitExceeded, "OVERDRAFT_LIMIT_EXCEEDED", 409) as info:
        commit(authority, r.reservation_id, 250)  # deficit 50 > 40
    assert info.value.details["scope"] == A
    assert status_of(authority, r.reservation_id) == "ACTIVE"
    assert commit(authority, r.reservation_id, 240).charged.amount == 240  # deficit 40: exactly the limit
    assert ledger_state(authority, A) == ledger(200, spent=200, debt=40)
    assert ledger_state(authority, T) == ledger(1_000, spent=240)


def test_existing_debt_counts_against_the_limit(authority):
    budget(authority, T, 1_000)
    budget(authority, A, 200, overdraft=100)
    r1 = reserve(authority, SUBJECT, 100, overage_policy="ALLOW_WITH_OVERDRAFT")
    r2 = reserve(authority, SUBJECT, 100, overage_policy="ALLOW_WITH_OVERDRAFT")  # A remaining 0
    commit(authority, r1.reservation_id, 160)  # deficit 60
    assert ledger_state(authority, A) == ledger(200, spent=100, reserved=100, debt=60)
    with refused(authority, OverdraftLimitExceeded, "OVERDRAFT_LIMIT_EXCEEDED", 409):
        commit(authority, r2.reservation_id, 141)  # 60 + 41 > 100
    commit(authority, r2.reservation_id, 140)  # 60 + 40 = 100: allowed, not over the limit
    assert ledger_state(authority, A) == ledger(200, spent=200, debt=100, over=False)
    assert ledger_state(authority, T) == ledger(1_000, spent=300)


def test_short_scope_without_overdraft_falls_back_to_allow_if_available(authority):
    budget(authority, T, 120)  # no overdraft here
    budget(authority, A, 1_000, overdraft=500)
    r = reserve(authority, SUBJECT, 100, overage_policy="ALLOW_WITH_OVERDRAFT")  # T remaining 20
    assert commit(authority, r.reservation_id, 200).charged.amount == 120  # capped at T's 20, no debt anywhere
    assert ledger_state(authority, T) == ledger(120, spent=120, over=True)
    assert ledger_state(authority, A) == ledger(1_000, spent=120, over=False)


def test_fallback_flags_every_short_scope_and_makes_no_debt(authority):
    budget(authority, T, 120)
    budget(authority, A, 150, overdraft=500)
    r = reserve(authority, SUBJECT, 100, overage_policy="ALLOW_WITH_OVERDRAFT")  # remaining 20 / 50
    assert commit(authority, r.reservation_id, 200).charged.amount == 120
    assert ledger_state(authority, T) == ledger(120, spent=120, over=True)
    assert ledger_state(authority, A) == ledger(150, spent=120, over=True)


# --------------------------------------------------------------------------------------- overage policy source


def test_ledger_overage_policy_applies_when_the_request_has_none(authority):
    budget(authority, T, 1_000, commit_overage_policy="REJECT")
    r = reserve(authority, SUBJECT, 100)
    with refused(authority, BudgetExceeded, "BUDGET_EXCEEDED", 409):
        commit(authority, r.reservation_id, 101)


def test_request_overage_policy_beats_the_ledger(authority):
    budget(authority, T, 1_000, commit_overage_policy="REJECT")
    r = reserve(authority, SUBJECT, 100, overage_policy="ALLOW_IF_AVAILABLE")
    assert commit(authority, r.reservation_id, 150).charged.amount == 150


def test_tenant_default_overage_policy_applies_last(authority):
    make_tenant(authority, default_commit_overage_policy="REJECT")
    budget(authority, T, 1_000)
    r = reserve(authority, SUBJECT, 100)
    with refused(authority, BudgetExceeded, "BUDGET_EXCEEDED", 409):
        commit(authority, r.reservation_id, 101)
    budget(authority, A, 1_000, commit_overage_policy="ALLOW_IF_AVAILABLE")  # a ledger policy beats the tenant's
    r2 = reserve(authority, SUBJECT, 100)
    assert commit(authority, r2.reservation_id, 150).charged.amount == 150


def test_overage_policy_is_fixed_at_reserve_time(authority):
    budget(authority, T, 1_000)
    r = reserve(authority, SUBJECT, 100)
    authority.admin.update_budget(T, USD, {"commit_overage_policy": "REJECT"})
    assert commit(authority, r.reservation_id, 150).charged.amount == 150


# -------------------------------------------------------------------------------------------------------- errors


def test_unknown_reservation_is_404(authority):
    budgets(authority, {T: 1_000})
    with refused(authority, NotFound, "NOT_FOUND", 404):
        commit(authority, "res_does_not_exist", 1)


def test_commit_in_another_unit_is_unit_mismatch(authority):
    budgets(authority, {T: 1_000})
    budgets(authority, {T: 1_000}, unit="TOKENS")
    r = reserve(authority, SUBJECT, 100)
    with refused(authority, UnitMismatch, "UNIT_MISMATCH", 400) as info:
        commit(authority, r.reservation_id, 50, unit="TOKENS")
    assert info.value.details["expected_units"] == [USD]
    assert commit(authority, r.reservation_id, 50).charged.amount == 50


def test_commit_after_commit_with_another_key_is_finalized(authority):
    budgets(authority, {T: 1_000})
    r = reserve(authority, SUBJECT, 100)
    commit(authority, r.reservation_id, 50)
    with refused(authority, ReservationFinalized, "RESERVATION_FINALIZED", 409):
        commit(authority, r.reservation_id, 50)


def test_commit_after_release_is_finalized(authority):
    budgets(authority, {T: 1_000})
    r = reserve(authority, SUBJECT, 100)
    release(authority, r.reservation_id)
    with refused(authority, ReservationFinalized, "RESERVATION_FINALIZED", 409):
        commit(authority, r.reservation_id, 50)


def test_commit_on_a_frozen_budget(authority):
    budgets(authority, {T: 1_000, A: 1_000})
    r = reserve(authority, SUBJECT, 100)
    authority.admin.freeze(A, USD)
    with refused(authority, BudgetFrozen, "BUDGET_FROZEN", 409):
        commit(authority, r.reservation_id, 50)
    authority.admin.unfreeze(A, USD)
    assert commit(authority, r.reservation_id, 50).charged.amount == 50


@pytest.mark.embedded_only(TENANT_KEYS)
def test_commit_for_a_closed_tenant(authority):
    make_tenant(authority)
    budgets(authority, {T: 1_000})
    r = reserve(authority, SUBJECT, 100)
    set_status(authority, "acme", "CLOSED")
    with refused(authority, TenantClosed, "TENANT_CLOSED", 409):  # beats FINALIZED (the close released it)
        commit(authority, r.reservation_id, 50)


@pytest.mark.embedded_only(TENANT_KEYS)
def test_commit_for_a_suspended_tenant_still_settles(authority):
    make_tenant(authority)
    budgets(authority, {T: 1_000})
    r = reserve(authority, SUBJECT, 100)
    set_status(authority, "acme", "SUSPENDED")
    assert commit(authority, r.reservation_id, 70).charged.amount == 70
    assert ledger_state(authority, T) == ledger(1_000, spent=70)


INVALID_COMMITS = [
    {"actual": {"unit": USD, "amount": -1}},
    {"actual": {"unit": USD, "amount": "5"}},
    {"actual": {"unit": USD}},
    {},
    {"actual": amount(5), "extra": True},
    {"actual": amount(5), "metrics": {"latency_ms": -1}},
    {"actual": amount(5), "metrics": {"model_version": "m" * 129}},
    {"actual": amount(5), "idempotency_key": ""},
]


def test_invalid_commit_bodies_are_400(authority):
    budgets(authority, {T: 1_000})
    r = reserve(authority, SUBJECT, 100)

    def attempt(body):
        authority.commit(r.reservation_id, {"idempotency_key": key(), **body}, tenant="acme")

    refused_each(authority, INVALID_COMMITS, attempt, InvalidRequest, "INVALID_REQUEST", 400)
    assert commit(authority, r.reservation_id, 5).charged.amount == 5
