"""Idempotency on every mutating operation: replays, mismatches, and replays winning over later state."""

import pytest

from cycles.errors import BudgetExceeded, IdempotencyMismatch, ReservationFinalized

from .conftest import TENANT_KEYS
from .helpers import (
    USD,
    budgets,
    commit,
    decide,
    event,
    extend,
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


def same(a, b, *, ignore=("remaining_ttl_ms",)):
    return a.model_dump(exclude=set(ignore)) == b.model_dump(exclude=set(ignore))


@pytest.fixture
def funded(authority):
    budgets(authority, {T: 1_000, A: 500})
    return authority


def mismatch(authority):
    return refused(authority, IdempotencyMismatch, "IDEMPOTENCY_MISMATCH", 409)


# -------------------------------------------------------------------------------------------------------- reserve


def test_reserve_replay_returns_the_same_reservation_once(funded, clock):
    first = reserve(funded, SUBJECT, 100, idempotency_key="r-1", ttl_ms=30_000, metadata={"a": 1})
    clock.advance(10_000)
    again = reserve(funded, SUBJECT, 100, idempotency_key="r-1", ttl_ms=30_000, metadata={"a": 1})
    assert same(first, again)
    assert again.reservation_id == first.reservation_id
    assert again.remaining_ttl_ms == first.expires_at_ms - clock.now == 20_000  # recomputed
    assert ledger_state(funded, A)["reserved"] == 100  # held once
    assert len(funded.list_reservations({}, tenant="acme").reservations) == 1


def test_reserve_replay_after_settlement_has_zero_ttl(funded):
    first = reserve(funded, SUBJECT, 100, idempotency_key="r-1")
    commit(funded, first.reservation_id, 10)
    again = reserve(funded, SUBJECT, 100, idempotency_key="r-1")
    assert same(first, again) and again.remaining_ttl_ms == 0
    assert ledger_state(funded, A)["reserved"] == 0


def test_reserve_replay_after_expiry_has_zero_ttl(funded, clock):
    first = reserve(funded, SUBJECT, 100, idempotency_key="r-1", ttl_ms=1_000, grace_period_ms=0)
    clock.advance(5_000)
    again = reserve(funded, SUBJECT, 100, idempotency_key="r-1", ttl_ms=1_000, grace_period_ms=0)
    assert same(first, again) and again.remaining_ttl_ms == 0
    assert ledger_state(funded, A)["reserved"] == 0


def test_reserve_same_key_different_payload_is_a_mismatch(funded):
    reserve(funded, SUBJECT, 100, idempotency_key="r-1", ttl_ms=30_000, metadata={"a": 1})
    base = {"subject": SUBJECT, "estimate": 100, "ttl_ms": 30_000, "metadata": {"a": 1}}
    changes = [
        {"estimate": 101},
        {"ttl_ms": 30_001},
        {"overage_policy": "REJECT"},
        {"metadata": {"a": 2}},
        {"subject": {"tenant": "acme", "agent": "other"}},
        {"action": {"kind": "llm.completion", "name": "other"}},
        {"dry_run": True},  # dry_run and live share the key namespace
    ]

    def attempt(change):
        args = {**base, **change}
        subject, estimate = args.pop("subject"), args.pop("estimate")
        reserve(funded, subject, estimate, idempotency_key="r-1", **args)

    refused_each(funded, changes, attempt, IdempotencyMismatch, "IDEMPOTENCY_MISMATCH", 409)


def test_reserve_payload_comparison_is_canonical(funded):
    first = reserve(funded, SUBJECT, 100, idempotency_key="r-1", metadata={"a": 1, "b": {"c": 2, "d": 3}})
    again = reserve(funded, dict(reversed(SUBJECT.items())), 100, idempotency_key="r-1",
                    metadata={"b": {"d": 3, "c": 2}, "a": 1})  # fmt: skip
    assert again.reservation_id == first.reservation_id
    assert ledger_state(funded, A)["reserved"] == 100


def test_reserve_replay_beats_an_exhausted_budget(funded):
    first = reserve(funded, SUBJECT, 400, idempotency_key="r-1")
    reserve(funded, SUBJECT, 100)  # A now has nothing left
    assert same(first, reserve(funded, SUBJECT, 400, idempotency_key="r-1"))
    assert ledger_state(funded, A)["reserved"] == 500


def test_reserve_replay_beats_a_frozen_budget(funded):
    first = reserve(funded, SUBJECT, 100, idempotency_key="r-1")
    funded.admin.freeze(A, USD)
    assert same(first, reserve(funded, SUBJECT, 100, idempotency_key="r-1"))


@pytest.mark.embedded_only(TENANT_KEYS)
def test_reserve_replay_beats_a_closed_tenant(authority):
    make_tenant(authority)
    budgets(authority, {T: 1_000})
    first = reserve(authority, SUBJECT, 100, idempotency_key="r-1")
    set_status(authority, "acme", "CLOSED")
    again = reserve(authority, SUBJECT, 100, idempotency_key="r-1")
    assert same(first, again) and again.remaining_ttl_ms == 0  # the close released it


def test_refused_reserve_is_not_remembered(funded):
    with refused(funded, BudgetExceeded, "BUDGET_EXCEEDED", 409):
        reserve(funded, SUBJECT, 600, idempotency_key="r-1")
    funded.admin.fund(A, USD, {"operation": "CREDIT", "amount": {"unit": USD, "amount": 100}})
    assert reserve(funded, SUBJECT, 600, idempotency_key="r-1").decision == "ALLOW"


def test_keys_are_per_tenant(authority):
    budgets(authority, {T: 1_000, "tenant:other": 1_000})
    mine = reserve(authority, SUBJECT, 100, idempotency_key="shared")
    theirs = reserve(authority, {"tenant": "other"}, 200, idempotency_key="shared", tenant="other")
    assert mine.reservation_id != theirs.reservation_id
    assert ledger_state(authority, T)["reserved"] == 100
    assert ledger_state(authority, "tenant:other", tenant="other")["reserved"] == 200


def test_keys_are_per_endpoint(funded):
    r = reserve(funded, SUBJECT, 100, idempotency_key="k")
    e = event(funded, SUBJECT, 10, idempotency_key="k")
    d = decide(funded, SUBJECT, 10, idempotency_key="k")
    c = commit(funded, r.reservation_id, 50, idempotency_key="k")
    assert (e.status, d.decision, c.status) == ("APPLIED", "ALLOW", "COMMITTED")
    assert ledger_state(funded, A)["spent"] == 60


# --------------------------------------------------------------------------------------------------------- commit


def test_commit_replay_returns_the_same_body_and_charges_once(funded):
    r = reserve(funded, SUBJECT, 100)
    first = commit(funded, r.reservation_id, 60, idempotency_key="c-1", metadata={"m": 1})
    again = commit(funded, r.reservation_id, 60, idempotency_key="c-1", metadata={"m": 1})
    assert same(first, again, ignore=())
    assert ledger_state(funded, A)["spent"] == 60


@pytest.mark.embedded_only(TENANT_KEYS)
def test_commit_replay_beats_expiry_and_a_closed_tenant(authority, clock):
    make_tenant(authority)
    budgets(authority, {T: 1_000})
    r = reserve(authority, SUBJECT, 100, ttl_ms=1_000, grace_period_ms=0)
    first = commit(authority, r.reservation_id, 60, idempotency_key="c-1")
    clock.advance(10_000)
    assert same(first, commit(authority, r.reservation_id, 60, idempotency_key="c-1"), ignore=())
    set_status(authority, "acme", "CLOSED")
    assert same(first, commit(authority, r.reservation_id, 60, idempotency_key="c-1"), ignore=())


def test_commit_same_key_different_payload_is_a_mismatch(funded):
    r = reserve(funded, SUBJECT, 100)
    commit(funded, r.reservation_id, 60, idempotency_key="c-1")
    with mismatch(funded):
        commit(funded, r.reservation_id, 61, idempotency_key="c-1")
    with mismatch(funded):
        commit(funded, r.reservation_id, 60, idempotency_key="c-1", metadata={"x": 1})


def test_commit_with_another_key_after_commit_is_finalized(funded):
    r = reserve(funded, SUBJECT, 100)
    commit(funded, r.reservation_id, 60, idempotency_key="c-1")
    with refused(funded, ReservationFinalized, "RESERVATION_FINALIZED", 409):
        commit(funded, r.reservation_id, 60, idempotency_key="c-2")


def test_commit_key_is_per_reservation(funded):
    r1 = reserve(funded, SUBJECT, 100)
    r2 = reserve(funded, SUBJECT, 100)
    commit(funded, r1.reservation_id, 10, idempotency_key="c")
    commit(funded, r2.reservation_id, 20, idempotency_key="c")
    assert ledger_state(funded, A)["spent"] == 30


def test_refused_commit_is_not_remembered(funded):
    r = reserve(funded, SUBJECT, 100, overage_policy="REJECT")
    with refused(funded, BudgetExceeded, "BUDGET_EXCEEDED", 409):
        commit(funded, r.reservation_id, 150, idempotency_key="c-1")
    assert commit(funded, r.reservation_id, 90, idempotency_key="c-1").charged.amount == 90


# -------------------------------------------------------------------------------------------------------- release


def test_release_replay_returns_the_same_body_once(funded):
    r = reserve(funded, SUBJECT, 100)
    first = release(funded, r.reservation_id, idempotency_key="rel-1", reason="x")
    again = release(funded, r.reservation_id, idempotency_key="rel-1", reason="x")
    assert same(first, again, ignore=())
    assert ledger_state(funded, A)["remaining"] == 500


def test_release_same_key_different_payload_is_a_mismatch(funded):
    r = reserve(funded, SUBJECT, 100)
    release(funded, r.reservation_id, idempotency_key="rel-1", reason="x")
    with mismatch(funded):
        release(funded, r.reservation_id, idempotency_key="rel-1", reason="y")


@pytest.mark.embedded_only(TENANT_KEYS)
def test_release_replay_beats_a_closed_tenant(authority):
    make_tenant(authority)
    budgets(authority, {T: 1_000})
    r = reserve(authority, SUBJECT, 100)
    first = release(authority, r.reservation_id, idempotency_key="rel-1")
    set_status(authority, "acme", "CLOSED")
    assert same(first, release(authority, r.reservation_id, idempotency_key="rel-1"), ignore=())


def test_release_key_used_for_commit_is_finalized(funded):
    r = reserve(funded, SUBJECT, 100)
    commit(funded, r.reservation_id, 10, idempotency_key="k")
    with refused(funded, ReservationFinalized, "RESERVATION_FINALIZED", 409):
        release(funded, r.reservation_id, idempotency_key="k")
    r2 = reserve(funded, SUBJECT, 100)
    release(funded, r2.reservation_id, idempotency_key="k2")
    with refused(funded, ReservationFinalized, "RESERVATION_FINALIZED", 409):
        commit(funded, r2.reservation_id, 10, idempotency_key="k2")


# --------------------------------------------------------------------------------------------------------- extend


def test_extend_replay_extends_once_and_recomputes_ttl(funded, clock):
    r = reserve(funded, SUBJECT, 100, ttl_ms=10_000)
    first = extend(funded, r.reservation_id, 5_000, idempotency_key="x-1")
    clock.advance(3_000)
    again = extend(funded, r.reservation_id, 5_000, idempotency_key="x-1")
    assert same(first, again)
    assert again.expires_at_ms == r.expires_at_ms + 5_000
    assert again.remaining_ttl_ms == again.expires_at_ms - clock.now
    assert funded.get_reservation(r.reservation_id, tenant="acme").expires_at_ms == r.expires_at_ms + 5_000


def test_extend_replay_does_not_count_as_another_extension(authority):
    make_tenant(authority, max_reservation_extensions=1)
    budgets(authority, {T: 1_000})
    r = reserve(authority, SUBJECT, 100)
    first = extend(authority, r.reservation_id, 5_000, idempotency_key="x-1")
    assert same(first, extend(authority, r.reservation_id, 5_000, idempotency_key="x-1"))


def test_extend_replay_after_commit_has_zero_ttl(funded):
    r = reserve(funded, SUBJECT, 100)
    first = extend(funded, r.reservation_id, 5_000, idempotency_key="x-1")
    commit(funded, r.reservation_id, 10)
    again = extend(funded, r.reservation_id, 5_000, idempotency_key="x-1")
    assert same(first, again) and again.remaining_ttl_ms == 0


def test_extend_replay_after_expiry_has_zero_ttl(funded, clock):
    r = reserve(funded, SUBJECT, 100, ttl_ms=1_000, grace_period_ms=0)
    first = extend(funded, r.reservation_id, 1_000, idempotency_key="x-1")
    clock.advance(10_000)
    assert funded.sweep() == 1
    again = extend(funded, r.reservation_id, 1_000, idempotency_key="x-1")
    assert same(first, again) and again.remaining_ttl_ms == 0


@pytest.mark.embedded_only(TENANT_KEYS)
def test_extend_replay_beats_a_closed_tenant(authority):
    make_tenant(authority)
    budgets(authority, {T: 1_000})
    r = reserve(authority, SUBJECT, 100)
    first = extend(authority, r.reservation_id, 5_000, idempotency_key="x-1")
    set_status(authority, "acme", "CLOSED")
    assert same(first, extend(authority, r.reservation_id, 5_000, idempotency_key="x-1"))


def test_extend_same_key_different_payload_is_a_mismatch(funded):
    r = reserve(funded, SUBJECT, 100)
    extend(funded, r.reservation_id, 5_000, idempotency_key="x-1")
    with mismatch(funded):
        extend(funded, r.reservation_id, 6_000, idempotency_key="x-1")


def test_extend_key_is_per_reservation(funded):
    r1 = reserve(funded, SUBJECT, 100)
    r2 = reserve(funded, SUBJECT, 100)
    extend(funded, r1.reservation_id, 5_000, idempotency_key="x")
    x2 = extend(funded, r2.reservation_id, 7_000, idempotency_key="x")
    assert x2.expires_at_ms == r2.expires_at_ms + 7_000


# --------------------------------------------------------------------------------------------------------- decide


def test_decide_replay_returns_the_old_decision(funded):
    first = decide(funded, SUBJECT, 500, idempotency_key="d-1")
    reserve(funded, SUBJECT, 500)  # now it would be denied
    assert decide(funded, SUBJECT, 500).decision == "DENY"
    again = decide(funded, SUBJECT, 500, idempotency_key="d-1")
    assert same(first, again, ignore=()) and again.decision == "ALLOW"


def test_decide_same_key_different_payload_is_a_mismatch(funded):
    decide(funded, SUBJECT, 500, idempotency_key="d-1")
    with mismatch(funded):
        decide(funded, SUBJECT, 501, idempotency_key="d-1")


# ---------------------------------------------------------------------------------------------------------- event


def test_event_replay_returns_the_same_event_once(funded):
    first = event(funded, SUBJECT, 70, idempotency_key="e-1", metadata={"a": 1})
    again = event(funded, SUBJECT, 70, idempotency_key="e-1", metadata={"a": 1})
    assert same(first, again, ignore=())
    assert ledger_state(funded, A)["spent"] == 70


def test_event_same_key_different_payload_is_a_mismatch(funded):
    event(funded, SUBJECT, 70, idempotency_key="e-1")
    with mismatch(funded):
        event(funded, SUBJECT, 71, idempotency_key="e-1")
    with mismatch(funded):
        event(funded, SUBJECT, 70, idempotency_key="e-1", overage_policy="REJECT")


@pytest.mark.embedded_only(TENANT_KEYS)
def test_event_replay_beats_a_frozen_budget_and_a_closed_tenant(authority):
    make_tenant(authority)
    budgets(authority, {T: 1_000})
    first = event(authority, SUBJECT, 70, idempotency_key="e-1")
    authority.admin.freeze(T, USD)
    assert same(first, event(authority, SUBJECT, 70, idempotency_key="e-1"), ignore=())
    set_status(authority, "acme", "CLOSED")
    assert same(first, event(authority, SUBJECT, 70, idempotency_key="e-1"), ignore=())


def test_refused_event_is_not_remembered(funded):
    with refused(funded, BudgetExceeded, "BUDGET_EXCEEDED", 409):
        event(funded, SUBJECT, 600, idempotency_key="e-1", overage_policy="REJECT")
    funded.admin.fund(A, USD, {"operation": "CREDIT", "amount": {"unit": USD, "amount": 100}})
    assert event(funded, SUBJECT, 600, idempotency_key="e-1", overage_policy="REJECT").charged.amount == 600
