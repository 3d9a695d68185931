"""POST /v1/reservations (live): scopes, all-or-nothing holds, denials, units, TTLs, validation, tenancy."""

import pytest

from cycles.errors import (
    BudgetExceeded,
    BudgetFrozen,
    Forbidden,
    InvalidRequest,
    NotFound,
    TenantClosed,
    UnitMismatch,
)

from .conftest import TENANT_KEYS
from .helpers import (
    ACTION,
    USD,
    amount,
    budgets,
    key,
    ledger_state,
    make_tenant,
    refused,
    refused_each,
    reserve,
    set_status,
)

SUBJECT = {"tenant": "acme", "workspace": "prod", "agent": "bot"}
T, W, A = "tenant:acme", "tenant:acme/workspace:prod", "tenant:acme/workspace:prod/agent:bot"
SCOPES = [T, W, A]


def state(authority, scope):
    return ledger_state(authority, scope)


def fresh(allocated):
    return {
        "allocated": allocated, "spent": 0, "reserved": 0, "debt": 0, "remaining": allocated, "is_over_limit": False,
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------------ success


def test_success_response_and_hold_on_every_budgeted_scope(authority, clock):
    budgets(authority, {T: 1_000, W: 800, A: 500})
    r = reserve(authority, SUBJECT, 300, ttl_ms=30_000)
    assert r.decision == "ALLOW"
    assert r.reservation_id
    assert r.reserved.model_dump() == amount(300)
    assert r.affected_scopes == SCOPES
    assert r.scope_path == A
    assert r.expires_at_ms == clock.now + 30_000
    assert r.remaining_ttl_ms == 30_000
    assert r.reason_code is None and r.caps is None
    for scope, allocated in ((T, 1_000), (W, 800), (A, 500)):
        assert state(authority, scope) == {**fresh(allocated), "reserved": 300, "remaining": allocated - 300}


def test_reservation_is_readable_after_reserve(authority, clock):
    budgets(authority, {T: 1_000})
    r = reserve(authority, SUBJECT, 10, idempotency_key="the-key", metadata={"run": "r1"})
    got = authority.get_reservation(r.reservation_id, tenant="acme")
    assert got.status == "ACTIVE"
    assert got.reserved.model_dump() == amount(10)
    assert got.subject.model_dump(exclude_none=True) == SUBJECT
    assert got.action.model_dump(exclude_none=True) == ACTION
    assert (got.created_at_ms, got.expires_at_ms) == (clock.now, r.expires_at_ms)
    assert (got.scope_path, got.affected_scopes) == (A, SCOPES)
    assert got.idempotency_key == "the-key"
    assert got.metadata == {"run": "r1"}
    assert got.committed is None and got.finalized_at_ms is None


def test_affected_scopes_follow_the_canonical_order_and_skip_absent_levels(authority):
    budgets(authority, {T: 1_000})
    full = {"toolset": "t", "agent": "a", "workflow": "wf", "app": "ap", "workspace": "ws", "tenant": "acme"}
    r = reserve(authority, full, 1)
    assert r.affected_scopes == [
        "tenant:acme",
        "tenant:acme/workspace:ws",
        "tenant:acme/workspace:ws/app:ap",
        "tenant:acme/workspace:ws/app:ap/workflow:wf",
        "tenant:acme/workspace:ws/app:ap/workflow:wf/agent:a",
        "tenant:acme/workspace:ws/app:ap/workflow:wf/agent:a/toolset:t",
    ]
    gappy = reserve(authority, {"tenant": "acme", "toolset": "t", "workspace": "ws"}, 1)
    assert gappy.affected_scopes == ["tenant:acme", "tenant:acme/workspace:ws", "tenant:acme/workspace:ws/toolset:t"]
    assert gappy.scope_path == "tenant:acme/workspace:ws/toolset:t"


def test_dimensions_never_affect_scopes(authority):
    budgets(authority, {T: 1_000, A: 100})
    r = reserve(authority, {**SUBJECT, "dimensions": {"run_id": "r-1", "region": "eu"}}, 40)
    assert r.affected_scopes == SCOPES
    assert state(authority, A)["reserved"] == 40
    got = authority.get_reservation(r.reservation_id, tenant="acme")
    assert got.subject.dimensions == {"run_id": "r-1", "region": "eu"}  # accepted and round-tripped


def test_scope_values_may_use_letters_digits_dot_dash_underscore(authority):
    budgets(authority, {T: 1_000, "tenant:acme/agent:Bot_1.v-2": 100})
    r = reserve(authority, {"tenant": "acme", "agent": "Bot_1.v-2"}, 5)
    assert r.scope_path == "tenant:acme/agent:Bot_1.v-2"
    assert state(authority, "tenant:acme/agent:Bot_1.v-2")["reserved"] == 5


def test_subject_without_tenant_uses_the_effective_tenant(authority):
    budgets(authority, {T: 1_000, "tenant:acme/agent:bot": 100})
    r = reserve(authority, {"agent": "bot"}, 25)
    assert r.affected_scopes == [T, "tenant:acme/agent:bot"]
    assert state(authority, "tenant:acme/agent:bot")["reserved"] == 25
    assert authority.get_reservation(r.reservation_id, tenant="acme").subject.tenant == "acme"


def test_unbudgeted_levels_are_skipped(authority):
    budgets(authority, {T: 1_000, A: 500})  # no budget at the workspace level
    r = reserve(authority, SUBJECT, 200)
    assert r.affected_scopes == SCOPES  # every derived scope is reported ...
    assert state(authority, T)["reserved"] == 200  # ... the budgeted ones are held
    assert state(authority, A)["reserved"] == 200
    assert authority.balances({"tenant": "acme", "workspace": "prod"}, tenant="acme").balances == []


def test_only_the_leaf_budgeted_is_enough(authority):
    budgets(authority, {A: 50})
    reserve(authority, SUBJECT, 50)
    assert state(authority, A) == {**fresh(50), "reserved": 50, "remaining": 0}


def test_budgets_off_the_path_are_not_touched(authority):
    budgets(authority, {T: 1_000, "tenant:acme/workspace:dev": 100, "tenant:acme/workspace:prod/agent:other": 100})
    budgets(authority, {"tenant:acme/workspace:prod/agent:bot/toolset:web": 100})  # below the subject's scope
    reserve(authority, SUBJECT, 70)
    assert state(authority, T)["reserved"] == 70
    for scope in ("tenant:acme/workspace:dev", "tenant:acme/workspace:prod/agent:other", A + "/toolset:web"):
        assert state(authority, scope) == fresh(100)


def test_estimate_zero_is_legal(authority):
    budgets(authority, {T: 0})
    r = reserve(authority, SUBJECT, 0)
    assert r.decision == "ALLOW" and r.reserved.amount == 0
    assert state(authority, T) == fresh(0)


def test_exact_fit_is_allowed_and_one_more_is_not(authority):
    budgets(authority, {T: 1_000, A: 300})
    reserve(authority, SUBJECT, 100)
    with refused(authority, BudgetExceeded, "BUDGET_EXCEEDED", 409):
        reserve(authority, SUBJECT, 201)
    reserve(authority, SUBJECT, 200)
    assert state(authority, A)["remaining"] == 0
    with refused(authority, BudgetExceeded, "BUDGET_EXCEEDED", 409):
        reserve(authority, SUBJECT, 1)


@pytest.mark.parametrize("short", SCOPES)
def test_a_denial_at_any_level_changes_no_level(authority, short):
    budgets(authority, {scope: (50 if scope == short else 1_000) for scope in SCOPES})
    with refused(authority, BudgetExceeded, "BUDGET_EXCEEDED", 409) as info:
        reserve(authority, SUBJECT, 51)
    assert info.value.details["scope"] == short
    for scope in SCOPES:
        assert state(authority, scope) == fresh(50 if scope == short else 1_000)


def test_denial_is_409_under_every_overage_policy(authority):
    budgets(authority, {T: 10})
    for policy in ("REJECT", "ALLOW_IF_AVAILABLE", "ALLOW_WITH_OVERDRAFT"):
        with refused(authority, BudgetExceeded, "BUDGET_EXCEEDED", 409):
            reserve(authority, SUBJECT, 11, overage_policy=policy)


def test_overdraft_limit_does_not_allow_reserving_beyond_remaining(authority):
    authority.admin.create_budget({"scope": T, "unit": USD, "allocated": amount(10), "overdraft_limit": amount(1_000)})
    with refused(authority, BudgetExceeded, "BUDGET_EXCEEDED", 409):
        reserve(authority, SUBJECT, 11, overage_policy="ALLOW_WITH_OVERDRAFT")


def test_holds_add_up(authority):
    budgets(authority, {T: 100})
    for _ in range(4):
        reserve(authority, SUBJECT, 25)
    assert state(authority, T) == {**fresh(100), "reserved": 100, "remaining": 0}
    with refused(authority, BudgetExceeded, "BUDGET_EXCEEDED", 409):
        reserve(authority, SUBJECT, 1)


@pytest.mark.parametrize("frozen", SCOPES)
def test_frozen_budget_at_any_level(authority, frozen):
    budgets(authority, {scope: 1_000 for scope in SCOPES})
    authority.admin.freeze(frozen, USD)
    with refused(authority, BudgetFrozen, "BUDGET_FROZEN", 409) as info:
        reserve(authority, SUBJECT, 1)
    assert info.value.details["scope"] == frozen
    authority.admin.unfreeze(frozen, USD)
    assert reserve(authority, SUBJECT, 1).decision == "ALLOW"


def test_frozen_beats_exceeded_on_one_scope(authority):
    budgets(authority, {T: 10})
    authority.admin.freeze(T, USD)
    with refused(authority, BudgetFrozen, "BUDGET_FROZEN", 409):
        reserve(authority, SUBJECT, 11)


# ------------------------------------------------------------------------------------------------------- units


def test_no_budget_anywhere_is_not_found(authority):
    with refused(authority, NotFound, "NOT_FOUND", 404):
        reserve(authority, SUBJECT, 1)


def test_budget_only_in_another_unit_is_unit_mismatch(authority):
    budgets(authority, {T: 1_000})  # USD
    budgets(authority, {A: 1_000}, unit="CREDITS")
    with refused(authority, UnitMismatch, "UNIT_MISMATCH", 400) as info:
        reserve(authority, SUBJECT, 1, unit="TOKENS")
    assert info.value.details["requested_unit"] == "TOKENS"
    assert sorted(info.value.details["expected_units"]) == ["CREDITS", USD]


def test_other_unit_off_the_path_is_not_found(authority):
    budgets(authority, {"tenant:acme/workspace:dev": 1_000, A + "/toolset:web": 1_000})  # not derived scopes
    with refused(authority, NotFound, "NOT_FOUND", 404):
        reserve(authority, SUBJECT, 1)


def test_each_unit_has_its_own_ledgers(authority):
    budgets(authority, {T: 1_000})
    budgets(authority, {A: 5_000}, unit="TOKENS")
    r = reserve(authority, SUBJECT, 4_000, unit="TOKENS")
    assert r.reserved.model_dump() == amount(4_000, "TOKENS")
    assert ledger_state(authority, A, "TOKENS")["reserved"] == 4_000
    assert state(authority, T) == fresh(1_000)  # the USD ledger is not a TOKENS budget
    reserve(authority, SUBJECT, 100)  # USD: only the tenant ledger
    assert state(authority, T)["reserved"] == 100
    assert ledger_state(authority, A, "TOKENS")["reserved"] == 4_000


def test_scope_values_compare_as_given(authority):
    budgets(authority, {T: 1_000})
    with refused(authority, NotFound, "NOT_FOUND", 404, tenants=("acme", "Acme")):
        reserve(authority, {"tenant": "Acme"}, 1, tenant="Acme")


# ------------------------------------------------------------------------------------------------------- TTL


@pytest.mark.parametrize("ttl", [1_000, 60_000, 3_600_000])
def test_ttl_bounds_accepted(authority, clock, ttl):
    budgets(authority, {T: 1_000})
    r = reserve(authority, SUBJECT, 1, ttl_ms=ttl)
    assert (r.expires_at_ms, r.remaining_ttl_ms) == (clock.now + ttl, ttl)


def test_default_ttl_is_60s(authority, clock):
    budgets(authority, {T: 1_000})
    r = reserve(authority, SUBJECT, 1)
    assert (r.expires_at_ms, r.remaining_ttl_ms) == (clock.now + 60_000, 60_000)


def test_ttl_is_capped_at_one_hour_by_default(authority, clock):
    budgets(authority, {T: 1_000})
    r = reserve(authority, SUBJECT, 1, ttl_ms=86_400_000)
    assert (r.expires_at_ms, r.remaining_ttl_ms) == (clock.now + 3_600_000, 3_600_000)


def test_ttl_is_capped_by_the_tenant_maximum(authority, clock):
    make_tenant(authority, max_reservation_ttl_ms=10_000, default_reservation_ttl_ms=5_000)
    budgets(authority, {T: 1_000})
    assert reserve(authority, SUBJECT, 1, ttl_ms=20_000).expires_at_ms == clock.now + 10_000
    assert reserve(authority, SUBJECT, 1, ttl_ms=8_000).expires_at_ms == clock.now + 8_000


def test_tenant_maximum_can_allow_a_day(authority, clock):
    make_tenant(authority, max_reservation_ttl_ms=86_400_000)
    budgets(authority, {T: 1_000})
    assert reserve(authority, SUBJECT, 1, ttl_ms=86_400_000).expires_at_ms == clock.now + 86_400_000


def test_tenant_default_ttl_applies_when_ttl_is_omitted(authority, clock):
    make_tenant(authority, default_reservation_ttl_ms=7_000)
    budgets(authority, {T: 1_000})
    r = reserve(authority, SUBJECT, 1)
    assert (r.expires_at_ms, r.remaining_ttl_ms) == (clock.now + 7_000, 7_000)
    assert reserve(authority, SUBJECT, 1, ttl_ms=2_000).expires_at_ms == clock.now + 2_000  # explicit wins


# ------------------------------------------------------------------------------------------------- bad input


INVALID = [
    {"ttl_ms": 999},
    {"ttl_ms": 86_400_001},
    {"ttl_ms": "60000"},
    {"grace_period_ms": -1},
    {"grace_period_ms": 60_001},
    {"estimate": {"unit": USD, "amount": -1}},
    {"estimate": {"unit": USD, "amount": 1.5}},
    {"estimate": {"unit": "EUR", "amount": 1}},
    {"estimate": {"unit": USD, "amount": 2**63}},
    {"overage_policy": "SOMETIMES"},
    {"dry_run": "yes"},
    {"surprise": 1},
    {"idempotency_key": ""},
    {"idempotency_key": "k" * 257},
    {"subject": {"dimensions": {"a": "b"}}},
    {"subject": {"tenant": "acme", "agent": "bad value"}},
    {"subject": {"tenant": "acme", "agent": "a/b"}},
    {"subject": {"tenant": "acme", "agent": "x" * 129}},
    {"subject": {"tenant": "acme", "colour": "red"}},
    {"action": {"kind": "llm.completion"}},
    {"action": {"kind": "k" * 65, "name": "n"}},
    {"action": {**ACTION, "tags": [f"t{i}" for i in range(11)]}},
    {"action": {**ACTION, "tags": ["t" * 65]}},
    {"action": {"kind": "llm.completion", "name": "n" * 257}},
    {"subject": {"tenant": "acme", "dimensions": {f"k{i}": "v" for i in range(17)}}},
    {"subject": {"tenant": "acme", "dimensions": {"k": "v" * 257}}},
    {"metadata": "not an object"},
]


def test_invalid_requests_are_400(authority):
    budgets(authority, {T: 1_000})

    def attempt(change):
        request = {"idempotency_key": key(), "subject": SUBJECT, "action": ACTION, "estimate": amount(1), **change}
        authority.reserve(request, tenant="acme")

    refused_each(authority, INVALID, attempt, InvalidRequest, "INVALID_REQUEST", 400)


def test_required_fields(authority):
    budgets(authority, {T: 1_000})

    def attempt(missing):
        request = {"idempotency_key": key(), "subject": SUBJECT, "action": ACTION, "estimate": amount(1)}
        del request[missing]
        authority.reserve(request, tenant="acme")

    refused_each(authority, ["idempotency_key", "subject", "action", "estimate"], attempt,
                 InvalidRequest, "INVALID_REQUEST", 400)  # fmt: skip


def test_v0126_fields_are_tolerated(authority):
    budgets(authority, {T: 1_000})
    r = reserve(authority, SUBJECT, 1, action={**ACTION, "policy_keys": ["p"]}, observe_mode="ENFORCE")
    assert r.decision == "ALLOW"


# ----------------------------------------------------------------------------------------------------- tenancy


def test_subject_tenant_must_be_the_effective_tenant(authority):
    budgets(authority, {T: 1_000, "tenant:other": 1_000})
    with refused(authority, Forbidden, "FORBIDDEN", 403):
        reserve(authority, {"tenant": "other"}, 1, tenant="acme")


@pytest.mark.embedded_only(TENANT_KEYS)
def test_suspended_tenant_cannot_reserve(authority):
    make_tenant(authority)
    budgets(authority, {T: 1_000})
    set_status(authority, "acme", "SUSPENDED")
    with refused(authority, Forbidden, "FORBIDDEN", 403):
        reserve(authority, SUBJECT, 1)
    set_status(authority, "acme", "ACTIVE")
    assert reserve(authority, SUBJECT, 1).decision == "ALLOW"


@pytest.mark.embedded_only(TENANT_KEYS)
def test_closed_tenant_cannot_reserve(authority):
    make_tenant(authority)
    budgets(authority, {T: 1_000})
    set_status(authority, "acme", "CLOSED")
    with refused(authority, TenantClosed, "TENANT_CLOSED", 409):
        reserve(authority, SUBJECT, 1)
