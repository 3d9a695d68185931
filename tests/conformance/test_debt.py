"""Debt and over-limit (PROTOCOL.md §4 "Debt/over-limit", §9): what they block, what they do not, what clears them."""

from cycles.errors import BudgetExceeded, OverdraftLimitExceeded

from .helpers import USD, amount, commit, decide, event, fund, ledger_state, refused, release, reserve

SUBJECT = {"tenant": "acme", "agent": "bot"}
T, A = "tenant:acme", "tenant:acme/agent:bot"


def budget(authority, scope, allocated, overdraft=0):
    authority.admin.create_budget(
        {"scope": scope, "unit": USD, "allocated": amount(allocated), "overdraft_limit": amount(overdraft)}
    )


def in_debt(authority, debt=50, overdraft=100):
    """A at allocated 200 with `debt` of debt (remaining -debt), T at 10_000 and clean."""
    budget(authority, T, 10_000)
    budget(authority, A, 200, overdraft=overdraft)
    event(authority, SUBJECT, 200 + debt, overage_policy="ALLOW_WITH_OVERDRAFT")
    assert ledger_state(authority, A) == {
        "allocated": 200, "spent": 200, "reserved": 0, "debt": debt, "remaining": -debt, "is_over_limit": False,
    }  # fmt: skip


def over_limit_by_capping(authority):
    """A flagged over-limit by an ALLOW_IF_AVAILABLE commit that could not be covered; remaining 0, no debt."""
    budget(authority, T, 10_000)
    budget(authority, A, 200)
    r = reserve(authority, SUBJECT, 150)
    commit(authority, r.reservation_id, 500)
    assert ledger_state(authority, A) == {
        "allocated": 200, "spent": 200, "reserved": 0, "debt": 0, "remaining": 0, "is_over_limit": True,
    }  # fmt: skip


def test_debt_within_a_limit_shows_as_negative_remaining(authority):
    in_debt(authority)
    with refused(authority, BudgetExceeded, "BUDGET_EXCEEDED", 409):
        reserve(authority, SUBJECT, 1)
    assert decide(authority, SUBJECT, 1).reason_code == "BUDGET_EXCEEDED"


def test_debt_within_a_limit_does_not_block_once_remaining_covers(authority):
    in_debt(authority)  # debt 50, overdraft limit 100
    fund(authority, A, "CREDIT", 150)  # remaining 100, debt still 50
    assert ledger_state(authority, A)["debt"] == 50
    r = reserve(authority, SUBJECT, 100)  # §9: with a limit > 0 the debt only lowers remaining
    assert r.decision == "ALLOW"
    with refused(authority, BudgetExceeded, "BUDGET_EXCEEDED", 409):
        reserve(authority, SUBJECT, 1)


def test_debt_above_a_lowered_limit_is_over_limit(authority):
    in_debt(authority)
    fund(authority, A, "CREDIT", 1_000)  # plenty remaining, debt 50
    authority.admin.update_budget(A, USD, {"overdraft_limit": amount(10)})  # debt 50 > limit 10
    assert ledger_state(authority, A)["is_over_limit"] is True
    with refused(authority, OverdraftLimitExceeded, "OVERDRAFT_LIMIT_EXCEEDED", 409):
        reserve(authority, SUBJECT, 1)
    assert decide(authority, SUBJECT, 1).reason_code == "OVERDRAFT_LIMIT_EXCEEDED"
    assert reserve(authority, SUBJECT, 1, dry_run=True).reason_code == "OVERDRAFT_LIMIT_EXCEEDED"


def test_over_limit_beats_debt_outstanding_when_the_limit_drops_to_zero(authority):
    in_debt(authority)
    fund(authority, A, "CREDIT", 1_000)
    authority.admin.update_budget(A, USD, {"overdraft_limit": amount(0)})  # debt 50, limit 0, over the limit
    with refused(authority, OverdraftLimitExceeded, "OVERDRAFT_LIMIT_EXCEEDED", 409):
        reserve(authority, SUBJECT, 1)
    assert decide(authority, SUBJECT, 1).reason_code == "OVERDRAFT_LIMIT_EXCEEDED"


def test_repaying_the_debt_clears_over_limit(authority):
    in_debt(authority)
    fund(authority, A, "CREDIT", 1_000)
    authority.admin.update_budget(A, USD, {"overdraft_limit": amount(0)})
    fund(authority, A, "REPAY_DEBT", 50)
    assert ledger_state(authority, A) == {
        "allocated": 1_200, "spent": 200, "reserved": 0, "debt": 0, "remaining": 1_000, "is_over_limit": False,
    }  # fmt: skip
    assert reserve(authority, SUBJECT, 1).decision == "ALLOW"


def test_raising_the_limit_back_clears_over_limit(authority):
    in_debt(authority)
    fund(authority, A, "CREDIT", 1_000)
    authority.admin.update_budget(A, USD, {"overdraft_limit": amount(10)})
    assert ledger_state(authority, A)["is_over_limit"] is True
    authority.admin.update_budget(A, USD, {"overdraft_limit": amount(50)})  # debt 50 <= limit 50
    assert ledger_state(authority, A)["is_over_limit"] is False
    assert reserve(authority, SUBJECT, 1).decision == "ALLOW"


def test_over_limit_blocks_new_reservations_even_when_remaining_covers(authority):
    over_limit_by_capping(authority)
    with refused(authority, OverdraftLimitExceeded, "OVERDRAFT_LIMIT_EXCEEDED", 409):
        reserve(authority, SUBJECT, 1)  # remaining 0 too, but over-limit is checked first
    budget(authority, "tenant:acme/agent:bot/toolset:t", 100)
    assert reserve(authority, {"tenant": "acme", "toolset": "t"}, 1).decision == "ALLOW"  # other paths unaffected


def test_over_limit_does_not_block_existing_reservations_or_events(authority):
    budget(authority, T, 10_000)
    budget(authority, A, 300)
    r1 = reserve(authority, SUBJECT, 150)
    r2 = reserve(authority, SUBJECT, 50)
    r3 = reserve(authority, SUBJECT, 40)  # A remaining 60
    commit(authority, r1.reservation_id, 500)  # capped at +60, A over-limit
    assert ledger_state(authority, A)["is_over_limit"] is True
    assert commit(authority, r2.reservation_id, 30).charged.amount == 30
    assert release(authority, r3.reservation_id).released.amount == 40
    assert event(authority, SUBJECT, 5).charged.amount == 5
    assert ledger_state(authority, A) == {
        "allocated": 300, "spent": 245, "reserved": 0, "debt": 0, "remaining": 55, "is_over_limit": True,
    }  # fmt: skip
    with refused(authority, OverdraftLimitExceeded, "OVERDRAFT_LIMIT_EXCEEDED", 409):
        reserve(authority, SUBJECT, 1)


def test_debt_does_not_block_existing_reservations_or_events(authority):
    budget(authority, T, 10_000)
    budget(authority, A, 300, overdraft=100)
    r1 = reserve(authority, SUBJECT, 100)
    r2 = reserve(authority, SUBJECT, 100)
    event(authority, SUBJECT, 150, overage_policy="ALLOW_WITH_OVERDRAFT")  # remaining 100 -> debt 50
    assert ledger_state(authority, A)["debt"] == 50
    assert commit(authority, r1.reservation_id, 100).charged.amount == 100
    assert release(authority, r2.reservation_id).released.amount == 100
    assert event(authority, SUBJECT, 10).charged.amount == 10
    assert ledger_state(authority, A) == {
        "allocated": 300, "spent": 210, "reserved": 0, "debt": 50, "remaining": 40, "is_over_limit": False,
    }  # fmt: skip


def test_funding_clears_over_limit(authority):
    over_limit_by_capping(authority)
    fund(authority, A, "CREDIT", 100)
    assert ledger_state(authority, A)["is_over_limit"] is False
    assert reserve(authority, SUBJECT, 100).decision == "ALLOW"


def test_funding_that_leaves_debt_above_the_limit_keeps_over_limit(authority):
    in_debt(authority, debt=80)
    authority.admin.update_budget(A, USD, {"overdraft_limit": amount(20)})  # debt 80 > 20
    fund(authority, A, "REPAY_DEBT", 50)  # debt 30, still > 20
    assert ledger_state(authority, A)["is_over_limit"] is True
    fund(authority, A, "REPAY_DEBT", 10)  # debt 20 <= 20, but remaining -20 < 0
    assert ledger_state(authority, A)["is_over_limit"] is True
    fund(authority, A, "CREDIT", 20)  # remaining 0
    assert ledger_state(authority, A)["is_over_limit"] is False


def test_repaying_debt_raises_remaining(authority):
    in_debt(authority)
    response = fund(authority, A, "REPAY_DEBT", 30)
    assert (response.previous_debt.amount, response.new_debt.amount) == (50, 20)
    assert (response.previous_remaining.amount, response.new_remaining.amount) == (-50, -20)
    assert ledger_state(authority, A)["remaining"] == -20
