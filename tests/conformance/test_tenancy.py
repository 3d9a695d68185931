"""Tenant isolation (PROTOCOL.md §1, invariant 15): tenant A never reads or mutates tenant B's data (403)."""

import pytest

from cycles.errors import Forbidden

from .helpers import ACTION, amount, budgets, commit, decide, event, extend, ledger_state, refused, release, reserve

THEIRS = {"tenant": "other", "agent": "bot"}


@pytest.fixture
def theirs(authority):
    """A reservation of tenant `other`; acme has a budget of its own."""
    budgets(authority, {"tenant:acme": 1_000, "tenant:other": 1_000})
    return reserve(authority, THEIRS, 100, tenant="other")


@pytest.mark.parametrize(
    "attempt",
    [
        lambda a, rid: a.get_reservation(rid, tenant="acme"),
        lambda a, rid: commit(a, rid, 10, tenant="acme"),
        lambda a, rid: release(a, rid, tenant="acme"),
        lambda a, rid: extend(a, rid, 1_000, tenant="acme"),
    ],
    ids=["get", "commit", "release", "extend"],
)
def test_another_tenants_reservation_is_403(authority, theirs, attempt):
    with refused(authority, Forbidden, "FORBIDDEN", 403):
        attempt(authority, theirs.reservation_id)
    assert authority.get_reservation(theirs.reservation_id, tenant="other").status == "ACTIVE"


def test_owner_can_still_settle_after_a_foreign_attempt(authority, theirs):
    with refused(authority, Forbidden, "FORBIDDEN", 403):
        commit(authority, theirs.reservation_id, 10, tenant="acme", idempotency_key="same")
    assert commit(authority, theirs.reservation_id, 10, tenant="other", idempotency_key="same").charged.amount == 10


def test_a_foreign_commit_of_a_finalized_reservation_is_still_403(authority, theirs):
    c = commit(authority, theirs.reservation_id, 10, tenant="other", idempotency_key="c")
    with refused(authority, Forbidden, "FORBIDDEN", 403):  # not a replay for someone else
        commit(authority, theirs.reservation_id, 10, tenant="acme", idempotency_key="c")
    assert c.charged.amount == 10


@pytest.mark.parametrize(
    "attempt",
    [
        lambda a: reserve(a, THEIRS, 1, tenant="acme"),
        lambda a: reserve(a, THEIRS, 1, tenant="acme", dry_run=True),
        lambda a: decide(a, THEIRS, 1, tenant="acme"),
        lambda a: event(a, THEIRS, 1, tenant="acme"),
        lambda a: a.list_reservations({"tenant": "other"}, tenant="acme"),
        lambda a: a.balances({"tenant": "other"}, tenant="acme"),
        lambda a: a.balances({"tenant_id": "other"}, tenant="acme"),
    ],
    ids=["reserve", "dry_run", "decide", "event", "list", "balances", "balances-admin-shape"],
)
def test_naming_another_tenant_is_403(authority, theirs, attempt):
    with refused(authority, Forbidden, "FORBIDDEN", 403):
        attempt(authority)


def test_subject_tenant_is_compared_as_given(authority):
    budgets(authority, {"tenant:acme": 1_000})
    with refused(authority, Forbidden, "FORBIDDEN", 403):
        reserve(authority, {"tenant": "ACME"}, 1, tenant="acme")


def test_listing_and_balances_only_show_the_own_tenant(authority, theirs):
    mine = reserve(authority, {"tenant": "acme"}, 5)
    assert [r.reservation_id for r in authority.list_reservations({}, tenant="acme").reservations] == [
        mine.reservation_id
    ]
    assert [r.reservation_id for r in authority.list_reservations({}, tenant="other").reservations] == [
        theirs.reservation_id
    ]
    assert [b.scope for b in authority.balances({"tenant_id": "acme"}, tenant="acme").balances] == ["tenant:acme"]
    assert [b.scope for b in authority.balances({"tenant": "other"}, tenant="other").balances] == ["tenant:other"]


def test_idempotency_keys_do_not_leak_across_tenants(authority):
    budgets(authority, {"tenant:acme": 1_000, "tenant:other": 1_000})
    request = {"idempotency_key": "k", "subject": {"agent": "bot"}, "action": ACTION, "estimate": amount(10)}
    mine = authority.reserve(request, tenant="acme")
    theirs = authority.reserve(request, tenant="other")  # same body, same key, other tenant: a new reservation
    assert mine.reservation_id != theirs.reservation_id
    assert theirs.affected_scopes == ["tenant:other", "tenant:other/agent:bot"]
    assert ledger_state(authority, "tenant:other", tenant="other")["reserved"] == 10
    rows = authority.list_reservations({"idempotency_key": "k"}, tenant="acme").reservations
    assert [r.reservation_id for r in rows] == [mine.reservation_id]
