"""Expiry: a reservation not settled by expires_at + grace becomes EXPIRED and its hold returns to every scope."""

from cycles.errors import ReservationExpired

from .helpers import budgets, commit, decide, event, extend, iso_ms, ledger_state, refused, release, reserve

SUBJECT = {"tenant": "acme", "workspace": "prod", "agent": "bot"}
T, W, A = "tenant:acme", "tenant:acme/workspace:prod", "tenant:acme/workspace:prod/agent:bot"


def fresh(allocated):
    return {
        "allocated": allocated, "spent": 0, "reserved": 0, "debt": 0, "remaining": allocated, "is_over_limit": False,
    }  # fmt: skip


def expired(authority):
    return refused(authority, ReservationExpired, "RESERVATION_EXPIRED", 410)


def test_expired_hold_returns_to_every_scope(authority, clock):
    budgets(authority, {T: 1_000, W: 800, A: 500})
    reserve(authority, SUBJECT, 300, ttl_ms=10_000, grace_period_ms=2_000)
    clock.advance(12_001)
    assert ledger_state(authority, T) == fresh(1_000)
    assert ledger_state(authority, W) == fresh(800)
    assert ledger_state(authority, A) == fresh(500)


def test_hold_stays_through_the_grace_window(authority, clock):
    budgets(authority, {T: 1_000})
    r = reserve(authority, SUBJECT, 300, ttl_ms=10_000, grace_period_ms=2_000)
    clock.advance(12_000)  # exactly expires_at + grace: still ACTIVE
    assert ledger_state(authority, T)["reserved"] == 300
    assert authority.get_reservation(r.reservation_id, tenant="acme").status == "ACTIVE"


def test_sweep_counts_what_it_expires(authority, clock):
    budgets(authority, {T: 1_000})
    reserve(authority, SUBJECT, 100, ttl_ms=1_000, grace_period_ms=0)
    reserve(authority, SUBJECT, 100, ttl_ms=2_000, grace_period_ms=0)
    reserve(authority, SUBJECT, 100, ttl_ms=60_000, grace_period_ms=0)
    clock.advance(2_001)
    assert authority.sweep() == 2
    assert authority.sweep() == 0
    assert ledger_state(authority, T)["reserved"] == 100
    clock.advance(60_000)
    assert authority.sweep() == 1
    assert ledger_state(authority, T) == fresh(1_000)


def test_sweep_ignores_settled_and_live_reservations(authority, clock):
    budgets(authority, {T: 1_000})
    r1 = reserve(authority, SUBJECT, 100, ttl_ms=1_000, grace_period_ms=0)
    r2 = reserve(authority, SUBJECT, 100, ttl_ms=1_000, grace_period_ms=0)
    commit(authority, r1.reservation_id, 40)
    release(authority, r2.reservation_id)
    reserve(authority, SUBJECT, 100, ttl_ms=1_000, grace_period_ms=5_000)
    clock.advance(5_000)
    assert authority.sweep() == 0
    assert ledger_state(authority, T) == {**fresh(1_000), "spent": 40, "reserved": 100, "remaining": 860}


def test_default_grace_is_five_seconds(authority, clock):
    budgets(authority, {T: 1_000})
    r = reserve(authority, SUBJECT, 100, ttl_ms=1_000)
    clock.advance(6_000)
    assert authority.sweep() == 0
    clock.advance(1)
    assert authority.sweep() == 1
    with expired(authority):
        commit(authority, r.reservation_id, 10)


def test_get_of_an_expired_reservation_is_410(authority, clock):
    budgets(authority, {T: 1_000})
    r = reserve(authority, SUBJECT, 100, ttl_ms=1_000, grace_period_ms=0)
    clock.advance(1_001)
    with expired(authority):
        authority.get_reservation(r.reservation_id, tenant="acme")


def test_expired_rows_are_normal_rows_in_listings(authority, clock):
    budgets(authority, {T: 1_000})
    r = reserve(authority, SUBJECT, 100, ttl_ms=1_000, grace_period_ms=0)
    live = reserve(authority, SUBJECT, 100)
    clock.advance(1_001)
    rows = authority.list_reservations({"status": "EXPIRED"}, tenant="acme").reservations
    assert [(x.reservation_id, x.status) for x in rows] == [(r.reservation_id, "EXPIRED")]
    assert rows[0].finalized_at_ms is None and rows[0].committed is None
    active = authority.list_reservations({"status": "ACTIVE"}, tenant="acme").reservations
    assert [x.reservation_id for x in active] == [live.reservation_id]
    # an expired row has no finalized_at_ms, so a finalized window excludes it
    window = {"finalized_from": iso_ms(0), "finalized_to": iso_ms(clock.now + 10**9)}
    assert authority.list_reservations(window, tenant="acme").reservations == []


def test_commit_and_release_in_grace_succeed(authority, clock):
    budgets(authority, {T: 1_000})
    r1 = reserve(authority, SUBJECT, 100, ttl_ms=1_000, grace_period_ms=3_000)
    r2 = reserve(authority, SUBJECT, 100, ttl_ms=1_000, grace_period_ms=3_000)
    clock.advance(4_000)  # exactly the end of grace
    assert commit(authority, r1.reservation_id, 80).charged.amount == 80
    assert release(authority, r2.reservation_id).released.amount == 100
    assert ledger_state(authority, T) == {**fresh(1_000), "spent": 80, "remaining": 920}


def test_commit_past_grace_is_410_even_before_any_sweep(authority, clock):
    budgets(authority, {T: 1_000})
    r = reserve(authority, SUBJECT, 100, ttl_ms=1_000, grace_period_ms=0)
    clock.advance(1_001)
    with expired(authority):
        commit(authority, r.reservation_id, 10)
    with expired(authority):
        release(authority, r.reservation_id)
    with expired(authority):
        extend(authority, r.reservation_id, 1_000)
    assert ledger_state(authority, T) == fresh(1_000)


def test_settling_a_swept_reservation_is_410(authority, clock):
    budgets(authority, {T: 1_000})
    r = reserve(authority, SUBJECT, 100, ttl_ms=1_000, grace_period_ms=0)
    clock.advance(1_001)
    assert authority.sweep() == 1
    for attempt in (
        lambda: commit(authority, r.reservation_id, 10),
        lambda: release(authority, r.reservation_id),
        lambda: extend(authority, r.reservation_id, 1_000),
    ):
        with expired(authority):
            attempt()


def test_an_expired_hold_frees_budget_for_a_new_reservation(authority, clock):
    budgets(authority, {T: 100})
    reserve(authority, SUBJECT, 100, ttl_ms=1_000, grace_period_ms=0)
    clock.advance(1_001)
    assert reserve(authority, SUBJECT, 100).decision == "ALLOW"  # no read or sweep in between


def test_an_expired_hold_frees_budget_for_an_overage(authority, clock):
    budgets(authority, {T: 100})
    reserve(authority, SUBJECT, 50, ttl_ms=1_000, grace_period_ms=0)
    r2 = reserve(authority, SUBJECT, 50, ttl_ms=60_000)
    clock.advance(1_001)
    assert commit(authority, r2.reservation_id, 100).charged.amount == 100  # the expired 50 came back first
    assert ledger_state(authority, T) == {**fresh(100), "spent": 100, "remaining": 0}


def test_an_expired_hold_frees_budget_for_an_event(authority, clock):
    budgets(authority, {T: 100})
    reserve(authority, SUBJECT, 100, ttl_ms=1_000, grace_period_ms=0)
    clock.advance(1_001)
    assert event(authority, SUBJECT, 100, overage_policy="REJECT").charged.amount == 100


def test_decide_sees_expired_holds_as_gone(authority, clock):
    budgets(authority, {T: 100})
    reserve(authority, SUBJECT, 100, ttl_ms=1_000, grace_period_ms=0)
    assert decide(authority, SUBJECT, 1).decision == "DENY"
    clock.advance(1_001)
    assert decide(authority, SUBJECT, 100).decision == "ALLOW"
    assert reserve(authority, SUBJECT, 100, dry_run=True).decision == "ALLOW"


def test_extension_moves_the_expiry(authority, clock):
    budgets(authority, {T: 1_000})
    r = reserve(authority, SUBJECT, 100, ttl_ms=1_000, grace_period_ms=0)
    extend(authority, r.reservation_id, 5_000)
    clock.advance(1_001)
    assert authority.sweep() == 0
    assert ledger_state(authority, T)["reserved"] == 100
    clock.advance(5_000)
    assert authority.sweep() == 1
    assert ledger_state(authority, T)["reserved"] == 0


def test_grace_bounds(authority, clock):
    budgets(authority, {T: 1_000})
    longest = reserve(authority, SUBJECT, 100, ttl_ms=1_000, grace_period_ms=60_000)
    none = reserve(authority, SUBJECT, 100, ttl_ms=1_000, grace_period_ms=0)
    clock.advance(1_000)
    assert commit(authority, none.reservation_id, 1).charged.amount == 1  # at expires_at exactly
    clock.advance(60_000)
    assert commit(authority, longest.reservation_id, 1).charged.amount == 1  # at expires_at + 60 s exactly


def test_grace_is_per_reservation(authority, clock):
    budgets(authority, {T: 1_000})
    short = reserve(authority, SUBJECT, 100, ttl_ms=1_000, grace_period_ms=0)
    long = reserve(authority, SUBJECT, 100, ttl_ms=1_000, grace_period_ms=60_000)
    clock.advance(1_001)
    with expired(authority):
        release(authority, short.reservation_id)
    assert release(authority, long.reservation_id).released.amount == 100
