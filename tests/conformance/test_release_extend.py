"""POST /v1/reservations/{id}/release and /extend."""

import pytest

from cycles.errors import (
    InvalidRequest,
    MaxExtensionsExceeded,
    NotFound,
    ReservationExpired,
    ReservationFinalized,
    TenantClosed,
)

from .conftest import TENANT_KEYS
from .helpers import (
    budgets,
    commit,
    extend,
    key,
    ledger_state,
    make_tenant,
    refused,
    refused_each,
    release,
    reserve,
    set_status,
)

SUBJECT = {"tenant": "acme", "workspace": "prod", "agent": "bot"}
T, W, A = "tenant:acme", "tenant:acme/workspace:prod", "tenant:acme/workspace:prod/agent:bot"


def fresh(allocated):
    return {
        "allocated": allocated, "spent": 0, "reserved": 0, "debt": 0, "remaining": allocated, "is_over_limit": False,
    }  # fmt: skip


@pytest.fixture
def funded(authority):
    budgets(authority, {T: 1_000, A: 500})
    return authority


# ------------------------------------------------------------------------------------------------------- release


def test_release_returns_the_whole_hold_to_every_scope(funded, clock):
    r = reserve(funded, SUBJECT, 300)
    clock.advance(2_000)
    response = release(funded, r.reservation_id, reason="tool failed")
    assert response.status == "RELEASED"
    assert response.released.model_dump() == {"unit": "USD_MICROCENTS", "amount": 300}
    assert ledger_state(funded, T) == fresh(1_000)
    assert ledger_state(funded, A) == fresh(500)
    got = funded.get_reservation(r.reservation_id, tenant="acme")
    assert got.status == "RELEASED"
    assert got.finalized_at_ms == clock.now
    assert got.committed is None


def test_release_without_reason(funded):
    r = reserve(funded, SUBJECT, 10)
    assert release(funded, r.reservation_id).released.amount == 10


def test_release_only_returns_its_own_hold(funded):
    r1 = reserve(funded, SUBJECT, 100)
    reserve(funded, SUBJECT, 50)
    release(funded, r1.reservation_id)
    assert ledger_state(funded, A) == {**fresh(500), "reserved": 50, "remaining": 450}


def test_release_unknown_is_404(funded):
    with refused(funded, NotFound, "NOT_FOUND", 404):
        release(funded, "res_nope")


def test_release_after_release_with_another_key_is_finalized(funded):
    r = reserve(funded, SUBJECT, 100)
    release(funded, r.reservation_id)
    with refused(funded, ReservationFinalized, "RESERVATION_FINALIZED", 409):
        release(funded, r.reservation_id)


def test_release_after_commit_is_finalized(funded):
    r = reserve(funded, SUBJECT, 100)
    commit(funded, r.reservation_id, 40)
    with refused(funded, ReservationFinalized, "RESERVATION_FINALIZED", 409):
        release(funded, r.reservation_id)


def test_release_on_a_frozen_budget_is_allowed(funded):
    r = reserve(funded, SUBJECT, 100)
    funded.admin.freeze(A, "USD_MICROCENTS")
    release(funded, r.reservation_id)
    assert ledger_state(funded, A) == fresh(500)


@pytest.mark.embedded_only(TENANT_KEYS)
def test_release_for_a_closed_tenant(authority):
    make_tenant(authority)
    budgets(authority, {T: 1_000})
    r = reserve(authority, SUBJECT, 100)
    set_status(authority, "acme", "CLOSED")
    with refused(authority, TenantClosed, "TENANT_CLOSED", 409):
        release(authority, r.reservation_id)


@pytest.mark.embedded_only(TENANT_KEYS)
def test_release_for_a_suspended_tenant_still_settles(authority):
    make_tenant(authority)
    budgets(authority, {T: 1_000})
    r = reserve(authority, SUBJECT, 100)
    set_status(authority, "acme", "SUSPENDED")
    assert release(authority, r.reservation_id).released.amount == 100
    assert ledger_state(authority, T) == fresh(1_000)


def test_invalid_release_bodies_are_400(funded):
    r = reserve(funded, SUBJECT, 100)

    def attempt(body):
        funded.release(r.reservation_id, {"idempotency_key": key(), **body}, tenant="acme")

    cases = [{"reason": "r" * 257}, {"idempotency_key": ""}, {"extra": 1}]
    refused_each(funded, cases, attempt, InvalidRequest, "INVALID_REQUEST", 400)


# -------------------------------------------------------------------------------------------------------- extend


def test_extend_adds_to_the_current_expiry(funded, clock):
    r = reserve(funded, SUBJECT, 100, ttl_ms=10_000)
    clock.advance(4_000)
    x = extend(funded, r.reservation_id, 5_000)
    assert x.status == "ACTIVE"
    assert x.expires_at_ms == r.expires_at_ms + 5_000  # not now + 5000
    assert x.remaining_ttl_ms == x.expires_at_ms - clock.now == 11_000
    x2 = extend(funded, r.reservation_id, 1_000)
    assert x2.expires_at_ms == r.expires_at_ms + 6_000
    got = funded.get_reservation(r.reservation_id, tenant="acme")
    assert got.expires_at_ms == x2.expires_at_ms
    assert got.status == "ACTIVE" and got.reserved.amount == 100 and got.affected_scopes == [T, W, A]


def test_extend_never_changes_balances(funded):
    r = reserve(funded, SUBJECT, 100)
    before = (ledger_state(funded, T), ledger_state(funded, A))
    extend(funded, r.reservation_id, 30_000)
    assert (ledger_state(funded, T), ledger_state(funded, A)) == before


def test_extended_reservation_outlives_its_original_deadline(funded, clock):
    r = reserve(funded, SUBJECT, 100, ttl_ms=10_000, grace_period_ms=0)
    extend(funded, r.reservation_id, 20_000)
    clock.advance(25_000)
    assert commit(funded, r.reservation_id, 60).charged.amount == 60


def test_extend_at_exactly_expires_at_is_allowed(funded, clock):
    r = reserve(funded, SUBJECT, 100, ttl_ms=10_000)
    clock.advance(10_000)
    assert extend(funded, r.reservation_id, 1_000).expires_at_ms == r.expires_at_ms + 1_000


def test_extend_in_the_grace_window_is_expired(funded, clock):
    r = reserve(funded, SUBJECT, 100, ttl_ms=10_000, grace_period_ms=5_000)
    clock.advance(10_001)
    with refused(funded, ReservationExpired, "RESERVATION_EXPIRED", 410):
        extend(funded, r.reservation_id, 1_000)
    assert commit(funded, r.reservation_id, 10).charged.amount == 10  # commit still allowed in grace


def test_extend_after_commit_or_release_is_finalized(funded):
    r1 = reserve(funded, SUBJECT, 100)
    r2 = reserve(funded, SUBJECT, 100)
    commit(funded, r1.reservation_id, 10)
    release(funded, r2.reservation_id)
    for r in (r1, r2):
        with refused(funded, ReservationFinalized, "RESERVATION_FINALIZED", 409):
            extend(funded, r.reservation_id, 1_000)


def test_extend_unknown_is_404(funded):
    with refused(funded, NotFound, "NOT_FOUND", 404):
        extend(funded, "res_nope", 1_000)


def test_default_limit_is_ten_extensions(funded):
    r = reserve(funded, SUBJECT, 100, ttl_ms=1_000)
    last = None
    for _ in range(10):
        last = extend(funded, r.reservation_id, 1_000)
    assert last.expires_at_ms == r.expires_at_ms + 10_000
    with refused(funded, MaxExtensionsExceeded, "MAX_EXTENSIONS_EXCEEDED", 409):
        extend(funded, r.reservation_id, 1_000)
    assert funded.get_reservation(r.reservation_id, tenant="acme").expires_at_ms == last.expires_at_ms
    assert commit(funded, r.reservation_id, 1).charged.amount == 1  # still a live reservation


@pytest.mark.parametrize("limit", [0, 2])
def test_tenant_limits_extensions(authority, limit):
    make_tenant(authority, max_reservation_extensions=limit)
    budgets(authority, {T: 1_000})
    r = reserve(authority, SUBJECT, 100)
    for _ in range(limit):
        extend(authority, r.reservation_id, 1_000)
    with refused(authority, MaxExtensionsExceeded, "MAX_EXTENSIONS_EXCEEDED", 409):
        extend(authority, r.reservation_id, 1_000)


def test_extension_is_clamped_to_now_plus_the_tenant_maximum(authority, clock):
    make_tenant(authority, max_reservation_ttl_ms=10_000, default_reservation_ttl_ms=10_000)
    budgets(authority, {T: 1_000})
    r = reserve(authority, SUBJECT, 100)
    assert r.expires_at_ms == clock.now + 10_000
    clock.advance(4_000)
    x = extend(authority, r.reservation_id, 60_000)
    assert x.expires_at_ms == clock.now + 10_000  # clamped (and the returned value is authoritative)
    assert x.remaining_ttl_ms == 10_000
    assert authority.get_reservation(r.reservation_id, tenant="acme").expires_at_ms == x.expires_at_ms


def test_extension_is_clamped_to_one_hour_without_a_tenant_record(funded, clock):
    r = reserve(funded, SUBJECT, 100, ttl_ms=3_600_000)
    clock.advance(1_000)
    x = extend(funded, r.reservation_id, 86_400_000)
    assert x.expires_at_ms == clock.now + 3_600_000


def test_clamping_never_shortens_a_reservation(authority, clock):
    make_tenant(authority, max_reservation_ttl_ms=10_000, default_reservation_ttl_ms=10_000)
    budgets(authority, {T: 1_000})
    r = reserve(authority, SUBJECT, 100)
    authority.admin.update_tenant("acme", {"max_reservation_ttl_ms": 2_000, "default_reservation_ttl_ms": 1_000})
    x = extend(authority, r.reservation_id, 5_000)
    assert x.expires_at_ms >= r.expires_at_ms


@pytest.mark.embedded_only(TENANT_KEYS)
def test_extend_for_a_closed_tenant(authority):
    make_tenant(authority)
    budgets(authority, {T: 1_000})
    r = reserve(authority, SUBJECT, 100)
    set_status(authority, "acme", "CLOSED")
    with refused(authority, TenantClosed, "TENANT_CLOSED", 409):
        extend(authority, r.reservation_id, 1_000)


def test_invalid_extend_bodies_are_400(funded):
    r = reserve(funded, SUBJECT, 100)

    def attempt(body):
        funded.extend(r.reservation_id, {"idempotency_key": key(), **body}, tenant="acme")

    cases = [{"extend_by_ms": 0}, {"extend_by_ms": 86_400_001}, {"extend_by_ms": "1000"}, {},
             {"extend_by_ms": 5, "x": 1}]  # fmt: skip
    refused_each(funded, cases, attempt, InvalidRequest, "INVALID_REQUEST", 400)


@pytest.mark.parametrize("by", [1, 86_400_000])
def test_extend_bounds_accepted(funded, by):
    r = reserve(funded, SUBJECT, 100)
    assert extend(funded, r.reservation_id, by).expires_at_ms > r.expires_at_ms
