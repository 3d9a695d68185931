"""The admin plane (PROTOCOL.md §7): tenants and their lifecycle, budgets, funding, freeze, API keys."""

import pytest

from cycles.errors import (
    BudgetExceeded,
    BudgetFrozen,
    DuplicateResource,
    Forbidden,
    IdempotencyMismatch,
    InvalidRequest,
    NotFound,
    ReservationExpired,
    TenantClosed,
    Unauthorized,
    UnitMismatch,
)

from .conftest import ADMIN_ONLY, TENANT_KEYS
from .helpers import (
    USD,
    amount,
    budgets,
    commit,
    decide,
    event,
    extend,
    fund,
    iso_ms,
    ledger_state,
    make_tenant,
    raises,
    refused,
    refused_each,
    release,
    reserve,
    set_status,
)

T, A = "tenant:acme", "tenant:acme/agent:bot"
SUBJECT = {"tenant": "acme", "agent": "bot"}
DEFAULT_PERMISSIONS = {
    "reservations:create", "reservations:commit", "reservations:release", "reservations:extend",
    "reservations:list", "balances:read", "budgets:read", "budgets:write", "policies:read", "policies:write",
}  # fmt: skip


# -------------------------------------------------------------------------------------------------------- tenants


def test_create_tenant_with_defaults(authority):
    tenant, created = authority.admin.create_tenant({"tenant_id": "acme", "name": "Acme"})
    assert created is True
    assert (tenant.tenant_id, tenant.name, tenant.status) == ("acme", "Acme", "ACTIVE")
    assert tenant.default_reservation_ttl_ms == 60_000
    assert tenant.max_reservation_ttl_ms == 3_600_000
    assert tenant.max_reservation_extensions == 10
    assert tenant.created_at
    assert authority.admin.get_tenant("acme") == tenant


def test_create_tenant_with_settings(authority):
    settings = {"default_commit_overage_policy": "REJECT", "default_reservation_ttl_ms": 5_000,
                "max_reservation_ttl_ms": 50_000, "max_reservation_extensions": 3, "metadata": {"tier": "gold"},
                "parent_tenant_id": "holding"}  # fmt: skip
    tenant = make_tenant(authority, **settings)
    got = authority.admin.get_tenant("acme")
    assert got == tenant
    assert {k: getattr(got, k) for k in settings} == settings


def test_create_tenant_again_is_idempotent_and_a_conflict_is_409(authority):
    first = make_tenant(authority, max_reservation_extensions=3)
    request = {"tenant_id": "acme", "name": "Acme", "max_reservation_extensions": 3}
    again, created = authority.admin.create_tenant(request)
    assert created is False and again == first
    with raises(DuplicateResource, "DUPLICATE_RESOURCE", 409):
        authority.admin.create_tenant({"tenant_id": "acme", "name": "Someone else"})
    assert authority.admin.get_tenant("acme") == first


INVALID_TENANTS = [
    {"tenant_id": "ab", "name": "x"},
    {"tenant_id": "Acme", "name": "x"},
    {"tenant_id": "ac_me", "name": "x"},
    {"tenant_id": "a" * 65, "name": "x"},
    {"tenant_id": "acme"},
    {"tenant_id": "acme", "name": "x", "default_reservation_ttl_ms": 20_000, "max_reservation_ttl_ms": 10_000},
    {"tenant_id": "acme", "name": "x", "max_reservation_ttl_ms": 999},
    {"tenant_id": "acme", "name": "x", "max_reservation_extensions": -1},
    {"tenant_id": "acme", "name": "x", "status": "ACTIVE"},
]


def test_invalid_tenants_are_400(authority):
    for request in INVALID_TENANTS:
        with raises(InvalidRequest, "INVALID_REQUEST", 400):
            authority.admin.create_tenant(request)
    assert authority.admin.list_tenants().tenants == []


def test_unknown_tenant_is_404(authority):
    with raises(NotFound, "NOT_FOUND", 404):
        authority.admin.get_tenant("nobody")
    with raises(NotFound, "NOT_FOUND", 404):
        authority.admin.update_tenant("nobody", {"name": "x"})


@pytest.mark.parametrize("limit", [1, 2, 5])
def test_list_tenants_pages_through_every_tenant_once(authority, limit):
    ids = [f"t-{i:02d}" for i in range(5)]
    for tid in reversed(ids):
        make_tenant(authority, tid)
    seen, cursor = [], None
    while True:
        page = authority.admin.list_tenants(cursor=cursor, limit=limit)
        assert len(page.tenants) <= limit
        seen += [t.tenant_id for t in page.tenants]
        if not page.has_more:
            assert page.next_cursor is None
            break
        cursor = page.next_cursor
    assert sorted(seen) == ids and len(seen) == 5


@pytest.mark.parametrize("limit", [0, -1])
def test_list_tenants_limit_below_one_is_400(authority, limit):
    make_tenant(authority)
    with raises(InvalidRequest, "INVALID_REQUEST", 400):
        authority.admin.list_tenants(limit=limit)


def test_update_tenant_settings(authority):
    make_tenant(authority)
    updated = authority.admin.update_tenant("acme", {"name": "Acme Inc", "max_reservation_extensions": 1,
                                                     "default_commit_overage_policy": "REJECT"})  # fmt: skip
    assert (updated.name, updated.max_reservation_extensions, updated.default_commit_overage_policy) == (
        "Acme Inc", 1, "REJECT",
    )  # fmt: skip
    assert authority.admin.get_tenant("acme") == updated


def test_update_tenant_rejects_default_ttl_above_max(authority):
    before = make_tenant(authority)
    with raises(InvalidRequest, "INVALID_REQUEST", 400):
        authority.admin.update_tenant("acme", {"max_reservation_ttl_ms": 10_000, "default_reservation_ttl_ms": 20_000})
    assert authority.admin.get_tenant("acme") == before


@pytest.mark.embedded_only(TENANT_KEYS)
def test_suspend_and_reactivate(authority):
    make_tenant(authority)
    budgets(authority, {T: 1_000})
    k = authority.admin.create_api_key({"tenant_id": "acme", "name": "ci"})
    suspended = set_status(authority, "acme", "SUSPENDED")
    assert suspended.status == "SUSPENDED" and suspended.suspended_at
    with raises(Unauthorized, "UNAUTHORIZED", 401):
        authority.admin.authenticate(k.key_secret)
    with refused(authority, Forbidden, "FORBIDDEN", 403):
        reserve(authority, SUBJECT, 1)
    assert decide(authority, SUBJECT, 1).reason_code == "TENANT_SUSPENDED"
    assert set_status(authority, "acme", "ACTIVE").status == "ACTIVE"
    assert authority.admin.authenticate(k.key_secret).tenant_id == "acme"
    assert reserve(authority, SUBJECT, 1).decision == "ALLOW"


@pytest.mark.embedded_only(TENANT_KEYS)
def test_suspended_tenant_extends_existing_reservations(authority):
    make_tenant(authority)
    budgets(authority, {T: 1_000})
    r = reserve(authority, SUBJECT, 10)
    set_status(authority, "acme", "SUSPENDED")
    assert extend(authority, r.reservation_id, 1_000).expires_at_ms == r.expires_at_ms + 1_000


# ------------------------------------------------------------------------------------------- closing a tenant


@pytest.fixture
def closed(authority):
    """acme with a committed, a live and a released reservation, an API key and two budgets; then CLOSED."""
    make_tenant(authority)
    make_tenant(authority, "other")
    budgets(authority, {T: 1_000, A: 500, "tenant:other": 1_000})
    done = reserve(authority, SUBJECT, 100)
    commit(authority, done.reservation_id, 40)
    live = reserve(authority, SUBJECT, 200)
    gone = reserve(authority, SUBJECT, 50)
    release(authority, gone.reservation_id)
    theirs = reserve(authority, {"tenant": "other"}, 70, tenant="other")
    k = authority.admin.create_api_key({"tenant_id": "acme", "name": "ci"})
    k_other = authority.admin.create_api_key({"tenant_id": "other", "name": "ci"})
    tenant = set_status(authority, "acme", "CLOSED")
    return {"tenant": tenant, "done": done, "live": live, "gone": gone, "key": k, "theirs": theirs, "k_other": k_other}


@pytest.mark.embedded_only(TENANT_KEYS)
def test_close_cascades(authority, closed):
    assert closed["tenant"].status == "CLOSED" and closed["tenant"].closed_at
    live = authority.get_reservation(closed["live"].reservation_id, tenant="acme")
    assert live.status == "RELEASED" and live.finalized_at_ms is not None  # active holds released
    assert authority.get_reservation(closed["done"].reservation_id, tenant="acme").status == "COMMITTED"
    assert ledger_state(authority, T) == {
        "allocated": 1_000, "spent": 40, "reserved": 0, "debt": 0, "remaining": 960, "is_over_limit": False,
    }  # fmt: skip
    assert {b.status for b in authority.admin.list_budgets(tenant_id="acme").ledgers} == {"CLOSED"}
    assert [k.status for k in authority.admin.list_api_keys(tenant_id="acme").keys] == ["REVOKED"]
    with raises(Unauthorized, "UNAUTHORIZED", 401):
        authority.admin.authenticate(closed["key"].key_secret)


def test_close_leaves_other_tenants_alone(authority, closed):
    assert authority.get_reservation(closed["theirs"].reservation_id, tenant="other").status == "ACTIVE"
    assert authority.admin.get_budget("tenant:other", USD).status == "ACTIVE"
    assert ledger_state(authority, "tenant:other", tenant="other")["reserved"] == 70
    assert authority.admin.authenticate(closed["k_other"].key_secret).tenant_id == "other"
    assert reserve(authority, {"tenant": "other"}, 1, tenant="other").decision == "ALLOW"


@pytest.mark.embedded_only(TENANT_KEYS)
def test_closed_tenant_refuses_every_live_mutation(authority, closed):
    rid = closed["live"].reservation_id
    for attempt in (
        lambda: reserve(authority, SUBJECT, 1),
        lambda: commit(authority, rid, 1),
        lambda: release(authority, rid),
        lambda: extend(authority, rid, 1_000),
        lambda: event(authority, SUBJECT, 1),
        lambda: commit(authority, closed["done"].reservation_id, 1),  # TENANT_CLOSED beats FINALIZED
        lambda: release(authority, closed["gone"].reservation_id),
    ):
        with refused(authority, TenantClosed, "TENANT_CLOSED", 409):
            attempt()


@pytest.mark.embedded_only(TENANT_KEYS)
def test_closed_tenant_gets_deny_from_dry_run_and_decide(authority, closed):
    assert reserve(authority, SUBJECT, 1, dry_run=True).reason_code == "TENANT_CLOSED"
    d = decide(authority, SUBJECT, 1)
    assert (d.decision, d.reason_code) == ("DENY", "TENANT_CLOSED")


@pytest.mark.embedded_only(TENANT_KEYS)
def test_closed_tenant_can_still_read(authority, closed):
    rows = authority.list_reservations({}, tenant="acme").reservations
    assert {r.status for r in rows} == {"COMMITTED", "RELEASED"} and len(rows) == 3
    assert len(authority.balances({"tenant_id": "acme"}, tenant="acme").balances) == 2
    assert authority.admin.get_tenant("acme").status == "CLOSED"


def test_closing_is_irreversible(authority, closed):
    for change in ({"status": "ACTIVE"}, {"status": "SUSPENDED"}, {"name": "again"}):
        with raises(TenantClosed, "TENANT_CLOSED", 409):
            authority.admin.update_tenant("acme", change)
    assert authority.admin.get_tenant("acme") == closed["tenant"]


@pytest.mark.embedded_only(TENANT_KEYS)
def test_closed_tenant_gets_no_new_budgets_or_keys(authority, closed):
    with refused(authority, TenantClosed, "TENANT_CLOSED", 409):
        authority.admin.create_budget({"scope": "tenant:acme/workspace:new", "unit": USD, "allocated": amount(1)})
    with raises(TenantClosed, "TENANT_CLOSED", 409):
        authority.admin.create_api_key({"tenant_id": "acme", "name": "late"})
    assert len(authority.admin.list_api_keys(tenant_id="acme").keys) == 1


@pytest.mark.embedded_only(TENANT_KEYS)
def test_tenant_closed_beats_expired(authority, clock):
    make_tenant(authority)
    budgets(authority, {T: 1_000})
    r = reserve(authority, SUBJECT, 100, ttl_ms=1_000, grace_period_ms=0)
    clock.advance(1_001)
    with refused(authority, ReservationExpired, "RESERVATION_EXPIRED", 410):
        commit(authority, r.reservation_id, 1)
    set_status(authority, "acme", "CLOSED")
    with refused(authority, TenantClosed, "TENANT_CLOSED", 409):
        commit(authority, r.reservation_id, 1)
    with refused(authority, TenantClosed, "TENANT_CLOSED", 409):
        extend(authority, r.reservation_id, 1_000)


# -------------------------------------------------------------------------------------------------------- budgets


def test_create_budget(authority):
    b = authority.admin.create_budget({"scope": A, "unit": USD, "allocated": amount(500),
                                       "overdraft_limit": amount(50), "commit_overage_policy": "REJECT"})  # fmt: skip
    assert (b.scope, b.unit, b.tenant_id, b.status) == (A, USD, "acme", "ACTIVE")
    assert b.ledger_id and b.created_at
    assert (b.allocated.amount, b.remaining.amount, b.reserved.amount, b.spent.amount, b.debt.amount) == (
        500, 500, 0, 0, 0,
    )  # fmt: skip
    assert b.overdraft_limit.amount == 50 and b.commit_overage_policy == "REJECT" and b.is_over_limit is False
    assert authority.admin.get_budget(A, USD) == b


def test_budget_defaults(authority):
    b = authority.admin.create_budget({"scope": T, "unit": "TOKENS", "allocated": amount(9, "TOKENS")})
    assert b.overdraft_limit.amount == 0 and b.commit_overage_policy is None and b.remaining.unit == "TOKENS"


def test_duplicate_budget_is_409_but_another_unit_is_fine(authority):
    budgets(authority, {T: 100})
    with refused(authority, DuplicateResource, "DUPLICATE_RESOURCE", 409):
        budgets(authority, {T: 200})
    budgets(authority, {T: 300}, unit="CREDITS")
    assert ledger_state(authority, T)["allocated"] == 100
    assert ledger_state(authority, T, "CREDITS")["allocated"] == 300


BAD_SCOPES = [
    "agent:bot",
    "workspace:w/tenant:acme",
    "tenant:acme/colour:red",
    "tenant:ac me",
    "tenant:acme/",
    "",
    "tenant:acme//agent:x",
    "tenant:acme/agent:a/agent:b",
    "tenant:acme/agent:bot/workspace:w",
    "tenant",
]


def test_invalid_budget_scopes_are_400(authority):
    def attempt(scope):
        authority.admin.create_budget({"scope": scope, "unit": USD, "allocated": amount(1)})

    refused_each(authority, BAD_SCOPES, attempt, InvalidRequest, "INVALID_REQUEST", 400)


def test_invalid_budgets_are_400(authority):
    def attempt(change):
        authority.admin.create_budget({"scope": T, "unit": USD, "allocated": amount(1), **change})

    cases = [
        {"allocated": {"unit": USD, "amount": -1}},
        {"unit": "EUR", "allocated": {"unit": "EUR", "amount": 1}},
        {"tenant_id": "other"},
        {"rollover_policy": "SOMETIMES"},
        {"extra": 1},
    ]
    refused_each(authority, cases, attempt, InvalidRequest, "INVALID_REQUEST", 400)


def test_budget_amounts_in_another_unit_are_unit_mismatch(authority):
    with refused(authority, UnitMismatch, "UNIT_MISMATCH", 400):
        authority.admin.create_budget({"scope": T, "unit": USD, "allocated": amount(1, "TOKENS")})
    with refused(authority, UnitMismatch, "UNIT_MISMATCH", 400):
        authority.admin.create_budget(
            {"scope": T, "unit": USD, "allocated": amount(1), "overdraft_limit": amount(1, "TOKENS")}
        )


@pytest.mark.embedded_only(ADMIN_ONLY)
def test_tenant_key_manages_only_its_own_budgets(authority):
    b = authority.admin.create_budget({"scope": T, "unit": USD, "allocated": amount(10)}, tenant="acme")
    assert b.tenant_id == "acme"
    budgets(authority, {"tenant:other": 10})
    with refused(authority, Forbidden, "FORBIDDEN", 403):
        authority.admin.create_budget({"scope": "tenant:other/agent:x", "unit": USD, "allocated": amount(1)},
                                      tenant="acme")  # fmt: skip
    for attempt in (
        lambda: authority.admin.get_budget("tenant:other", USD, tenant="acme"),
        lambda: authority.admin.update_budget("tenant:other", USD, {"overdraft_limit": amount(5)}, tenant="acme"),
        lambda: authority.admin.freeze("tenant:other", USD, tenant="acme"),
        lambda: fund(authority, "tenant:other", "CREDIT", 5, tenant="acme"),
        lambda: authority.admin.list_budgets(tenant="acme", tenant_id="other"),
    ):
        with refused(authority, Forbidden, "FORBIDDEN", 403):
            attempt()
    assert [x.scope for x in authority.admin.list_budgets(tenant="acme").ledgers] == [T]


def test_unknown_budget_is_404(authority):
    budgets(authority, {T: 10})
    for attempt in (
        lambda: authority.admin.get_budget(A, USD),
        lambda: authority.admin.get_budget(T, "TOKENS"),
        lambda: authority.admin.update_budget(A, USD, {"commit_overage_policy": "REJECT"}),
        lambda: authority.admin.freeze(A, USD),
        lambda: authority.admin.unfreeze(A, USD),
        lambda: fund(authority, A, "CREDIT", 1),
    ):
        with refused(authority, NotFound, "NOT_FOUND", 404):
            attempt()


def test_list_budgets_filters_and_pages(authority):
    budgets(authority, {T: 1, A: 2, "tenant:acme/workspace:w": 3, "tenant:other": 4})
    budgets(authority, {T: 5}, unit="TOKENS")
    scopes = lambda response: sorted((b.scope, b.unit) for b in response.ledgers)  # noqa: E731
    assert len(authority.admin.list_budgets().ledgers) == 5
    assert scopes(authority.admin.list_budgets(tenant_id="acme")) == [
        (T, "TOKENS"), (T, USD), (A, USD), ("tenant:acme/workspace:w", USD),
    ]  # fmt: skip
    assert scopes(authority.admin.list_budgets(tenant_id="acme", unit="TOKENS")) == [(T, "TOKENS")]
    assert scopes(authority.admin.list_budgets(scope_prefix="tenant:acme/")) == [
        (A, USD), ("tenant:acme/workspace:w", USD),
    ]  # fmt: skip
    seen, cursor = [], None
    while True:
        page = authority.admin.list_budgets(tenant_id="acme", limit=1, cursor=cursor)
        seen += [(b.scope, b.unit) for b in page.ledgers]
        if not page.has_more:
            break
        cursor = page.next_cursor
    assert sorted(seen) == scopes(authority.admin.list_budgets(tenant_id="acme")) and len(seen) == 4
    for bad in ({"limit": 0}, {"limit": 201}, {"unit": "EUR"}, {"cursor": "nope"}):
        with raises(InvalidRequest, "INVALID_REQUEST", 400):
            authority.admin.list_budgets(**bad)


def test_update_budget(authority):
    budgets(authority, {T: 100})
    b = authority.admin.update_budget(T, USD, {"overdraft_limit": amount(30), "commit_overage_policy": "REJECT"})
    assert b.overdraft_limit.amount == 30 and b.commit_overage_policy == "REJECT"
    assert authority.admin.get_budget(T, USD) == b
    with refused(authority, UnitMismatch, "UNIT_MISMATCH", 400):
        authority.admin.update_budget(T, USD, {"overdraft_limit": amount(30, "TOKENS")})
    with refused(authority, InvalidRequest, "INVALID_REQUEST", 400):
        authority.admin.update_budget(T, USD, {"allocated": amount(5)})  # funding is not an update


def test_freeze_and_unfreeze(authority):
    budgets(authority, {T: 1_000})
    r = reserve(authority, SUBJECT, 100)
    assert authority.admin.freeze(T, USD).status == "FROZEN"
    assert authority.admin.freeze(T, USD).status == "FROZEN"  # freezing twice is harmless
    assert authority.admin.get_budget(T, USD).status == "FROZEN"
    with refused(authority, BudgetFrozen, "BUDGET_FROZEN", 409):
        reserve(authority, SUBJECT, 1)
    with refused(authority, BudgetFrozen, "BUDGET_FROZEN", 409):
        commit(authority, r.reservation_id, 1)
    with refused(authority, BudgetFrozen, "BUDGET_FROZEN", 409):
        fund(authority, T, "CREDIT", 1)
    b = authority.admin.update_budget(T, USD, {"overdraft_limit": amount(7)})  # properties may still change
    assert b.overdraft_limit.amount == 7 and b.status == "FROZEN"
    assert authority.admin.unfreeze(T, USD).status == "ACTIVE"
    assert commit(authority, r.reservation_id, 1).charged.amount == 1
    assert reserve(authority, SUBJECT, 1).decision == "ALLOW"


# -------------------------------------------------------------------------------------------------------- funding


@pytest.fixture
def used(authority):
    """T: allocated 1000, spent 200, reserved 100, remaining 700."""
    budgets(authority, {T: 1_000})
    event(authority, SUBJECT, 200)
    reserve(authority, SUBJECT, 100)
    return authority


def ledger(allocated, spent=200, reserved=100, debt=0, over=False):
    return {
        "allocated": allocated, "spent": spent, "reserved": reserved, "debt": debt,
        "remaining": allocated - spent - reserved - debt, "is_over_limit": over,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("operation", "n", "extra", "after"),
    [
        ("CREDIT", 300, {}, ledger(1_300)),
        ("CREDIT", 0, {}, ledger(1_000)),
        ("DEBIT", 300, {}, ledger(700)),
        ("DEBIT", 700, {}, ledger(300)),  # down to remaining 0
        ("RESET", 500, {}, ledger(500)),
        ("RESET", 2_000, {}, ledger(2_000)),
        ("RESET_SPENT", 800, {"spent": amount(50)}, ledger(800, spent=50)),
        ("RESET_SPENT", 800, {}, ledger(800, spent=0)),
    ],
)
def test_funding_operations(used, operation, n, extra, after):
    response = fund(used, T, operation, n, reason="test", **extra)
    assert response.operation == operation
    assert (response.previous_allocated.amount, response.new_allocated.amount) == (1_000, after["allocated"])
    assert (response.previous_remaining.amount, response.new_remaining.amount) == (700, after["remaining"])
    assert (response.previous_spent.amount, response.new_spent.amount) == (200, after["spent"])
    assert (response.previous_debt.amount, response.new_debt.amount) == (0, 0)
    assert ledger_state(used, T) == after


def test_debit_beyond_remaining_is_budget_exceeded(used):
    with refused(used, BudgetExceeded, "BUDGET_EXCEEDED", 409):
        fund(used, T, "DEBIT", 701)


def test_credit_leaves_debt_alone(authority):
    authority.admin.create_budget({"scope": T, "unit": USD, "allocated": amount(100), "overdraft_limit": amount(100)})
    event(authority, SUBJECT, 150, overage_policy="ALLOW_WITH_OVERDRAFT")  # debt 50
    response = fund(authority, T, "CREDIT", 200)
    assert (response.previous_debt.amount, response.new_debt.amount) == (50, 50)
    assert (response.previous_remaining.amount, response.new_remaining.amount) == (-50, 150)
    assert ledger_state(authority, T)["debt"] == 50


def test_repay_debt(authority):
    authority.admin.create_budget({"scope": T, "unit": USD, "allocated": amount(100), "overdraft_limit": amount(100)})
    event(authority, SUBJECT, 150, overage_policy="ALLOW_WITH_OVERDRAFT")  # debt 50
    with refused(authority, InvalidRequest, "INVALID_REQUEST", 400):
        fund(authority, T, "REPAY_DEBT", 51)
    response = fund(authority, T, "REPAY_DEBT", 50)
    assert (response.previous_debt.amount, response.new_debt.amount) == (50, 0)
    assert (response.previous_allocated.amount, response.new_allocated.amount) == (100, 100)
    assert ledger_state(authority, T) == {
        "allocated": 100, "spent": 100, "reserved": 0, "debt": 0, "remaining": 0, "is_over_limit": False,
    }  # fmt: skip
    with refused(authority, InvalidRequest, "INVALID_REQUEST", 400):
        fund(authority, T, "REPAY_DEBT", 1)


def test_funding_in_another_unit_is_unit_mismatch(used):
    with refused(used, UnitMismatch, "UNIT_MISMATCH", 400):
        used.admin.fund(T, USD, {"operation": "CREDIT", "amount": amount(5, "TOKENS")})
    with refused(used, UnitMismatch, "UNIT_MISMATCH", 400):
        used.admin.fund(T, USD, {"operation": "RESET_SPENT", "amount": amount(5), "spent": amount(1, "TOKENS")})


def test_invalid_funding_is_400(used):
    cases = [
        {"operation": "GIFT", "amount": amount(1)},
        {"operation": "CREDIT", "amount": {"unit": USD, "amount": -1}},
        {"operation": "CREDIT"},
        {"operation": "CREDIT", "amount": amount(1), "idempotency_key": ""},
        {"operation": "CREDIT", "amount": amount(1), "extra": 1},
    ]
    refused_each(used, cases, lambda body: used.admin.fund(T, USD, body), InvalidRequest, "INVALID_REQUEST", 400)


def test_funding_is_idempotent_with_a_key(used):
    first = fund(used, T, "CREDIT", 100, idempotency_key="f-1")
    again = fund(used, T, "CREDIT", 100, idempotency_key="f-1")
    assert again == first
    assert ledger_state(used, T)["allocated"] == 1_100
    with refused(used, IdempotencyMismatch, "IDEMPOTENCY_MISMATCH", 409):
        fund(used, T, "CREDIT", 101, idempotency_key="f-1")
    with refused(used, IdempotencyMismatch, "IDEMPOTENCY_MISMATCH", 409):
        fund(used, T, "DEBIT", 100, idempotency_key="f-1")
    used.admin.freeze(T, USD)
    assert fund(used, T, "CREDIT", 100, idempotency_key="f-1") == first  # the replay beats the freeze


def test_funding_keys_are_per_budget(used):
    budgets(used, {A: 10})
    fund(used, T, "CREDIT", 100, idempotency_key="f")
    fund(used, A, "CREDIT", 5, idempotency_key="f")
    assert (ledger_state(used, T)["allocated"], ledger_state(used, A)["allocated"]) == (1_100, 15)


def test_funding_without_a_key_applies_every_time(used):
    fund(used, T, "CREDIT", 100)
    fund(used, T, "CREDIT", 100)
    assert ledger_state(used, T)["allocated"] == 1_200


def test_all_funding_operations_replay(used):
    for i, (operation, n, extra) in enumerate(
        [("CREDIT", 10, {}), ("DEBIT", 10, {}), ("RESET", 900, {}), ("RESET_SPENT", 900, {"spent": amount(100)})]
    ):
        first = fund(used, T, operation, n, idempotency_key=f"op-{i}", **extra)
        state = ledger_state(used, T)
        assert fund(used, T, operation, n, idempotency_key=f"op-{i}", **extra) == first
        assert ledger_state(used, T) == state


# ------------------------------------------------------------------------------------------------------- API keys


def test_create_api_key(authority, clock):
    make_tenant(authority)
    k = authority.admin.create_api_key({"tenant_id": "acme", "name": "ci", "description": "build bot"})
    assert k.tenant_id == "acme" and k.key_id
    assert k.key_secret.startswith(("cyc_live_", "cyc_test_")) and len(k.key_secret) == len("cyc_live_") + 32
    assert k.key_secret.startswith(k.key_prefix) and len(k.key_prefix) < len(k.key_secret)
    assert set(k.permissions) == DEFAULT_PERMISSIONS
    assert k.created_at and k.expires_at
    assert authority.admin.authenticate(k.key_secret).key_id == k.key_id


def test_key_secrets_are_unique(authority):
    make_tenant(authority)
    secrets = {authority.admin.create_api_key({"tenant_id": "acme", "name": f"k{i}"}).key_secret for i in range(5)}
    assert len(secrets) == 5


def test_api_key_with_explicit_permissions_and_scope_filter(authority):
    make_tenant(authority)
    k = authority.admin.create_api_key({"tenant_id": "acme", "name": "ro", "permissions": ["balances:read"],
                                        "scope_filter": ["workspace:eng"]})  # fmt: skip
    assert k.permissions == ["balances:read"]
    [listed] = authority.admin.list_api_keys(tenant_id="acme").keys
    assert listed.permissions == ["balances:read"] and listed.scope_filter == ["workspace:eng"]


def test_invalid_api_keys_are_400(authority):
    make_tenant(authority)
    for body in (
        {"tenant_id": "acme", "name": ""},
        {"tenant_id": "acme", "name": "x", "permissions": ["everything"]},
        {"tenant_id": "acme"},
        {"tenant_id": "acme", "name": "x", "extra": 1},
    ):
        with raises(InvalidRequest, "INVALID_REQUEST", 400):
            authority.admin.create_api_key(body)
    assert authority.admin.list_api_keys(tenant_id="acme").keys == []


def test_api_key_for_an_unknown_tenant_is_404(authority):
    with raises(NotFound, "NOT_FOUND", 404):
        authority.admin.create_api_key({"tenant_id": "nobody", "name": "x"})


def test_list_api_keys_never_shows_secrets(authority):
    make_tenant(authority)
    make_tenant(authority, "other")
    mine = authority.admin.create_api_key({"tenant_id": "acme", "name": "a"})
    authority.admin.create_api_key({"tenant_id": "other", "name": "b"})
    [listed] = authority.admin.list_api_keys(tenant_id="acme").keys
    assert listed.key_id == mine.key_id and listed.status == "ACTIVE" and listed.name == "a"
    assert mine.key_secret not in str(listed.model_dump())
    assert len(authority.admin.list_api_keys().keys) == 2


def test_list_api_keys_pages(authority):
    make_tenant(authority)
    made = {authority.admin.create_api_key({"tenant_id": "acme", "name": f"k{i}"}).key_id for i in range(5)}
    seen, cursor = [], None
    while True:
        page = authority.admin.list_api_keys(tenant_id="acme", limit=2, cursor=cursor)
        seen += [k.key_id for k in page.keys]
        if not page.has_more:
            break
        cursor = page.next_cursor
    assert sorted(seen) == sorted(made)


def test_list_api_keys_limit_below_one_is_400(authority):
    make_tenant(authority)
    authority.admin.create_api_key({"tenant_id": "acme", "name": "k"})
    with raises(InvalidRequest, "INVALID_REQUEST", 400):
        authority.admin.list_api_keys(tenant_id="acme", limit=0)


def test_update_api_key(authority):
    make_tenant(authority)
    k = authority.admin.create_api_key({"tenant_id": "acme", "name": "ci"})
    updated = authority.admin.update_api_key(k.key_id, {"name": "ci-2", "permissions": ["balances:read"],
                                                        "scope_filter": ["agent:*"]})  # fmt: skip
    assert (updated.name, updated.permissions, updated.scope_filter) == ("ci-2", ["balances:read"], ["agent:*"])
    assert authority.admin.list_api_keys(tenant_id="acme").keys == [updated]
    assert authority.admin.authenticate(k.key_secret).key_id == k.key_id  # same secret still works
    with raises(InvalidRequest, "INVALID_REQUEST", 400):
        authority.admin.update_api_key(k.key_id, {"permissions": ["root"]})
    with raises(InvalidRequest, "INVALID_REQUEST", 400):
        authority.admin.update_api_key(k.key_id, {"tenant_id": "other"})
    with raises(NotFound, "NOT_FOUND", 404):
        authority.admin.update_api_key("key_nope", {"name": "x"})
    assert authority.admin.list_api_keys(tenant_id="acme").keys == [updated]


def test_revoke_api_key(authority):
    make_tenant(authority)
    k = authority.admin.create_api_key({"tenant_id": "acme", "name": "ci"})
    revoked = authority.admin.revoke_api_key(k.key_id, "leaked")
    assert (revoked.status, revoked.revoked_reason) == ("REVOKED", "leaked") and revoked.revoked_at
    with raises(Unauthorized, "UNAUTHORIZED", 401):
        authority.admin.authenticate(k.key_secret)
    again = authority.admin.revoke_api_key(k.key_id, "again")
    assert again.status == "REVOKED" and again.revoked_reason == "leaked"  # permanent, a no-op the second time
    with raises(DuplicateResource, "DUPLICATE_RESOURCE", 409):
        authority.admin.update_api_key(k.key_id, {"name": "resurrect"})
    with raises(NotFound, "NOT_FOUND", 404):
        authority.admin.revoke_api_key("key_nope")


@pytest.mark.embedded_only(ADMIN_ONLY)
def test_tenant_key_manages_only_its_own_keys(authority):
    make_tenant(authority)
    make_tenant(authority, "other")
    theirs = authority.admin.create_api_key({"tenant_id": "other", "name": "theirs"})
    with raises(Forbidden, "FORBIDDEN", 403):
        authority.admin.create_api_key({"tenant_id": "other", "name": "x"}, tenant="acme")
    with raises(Forbidden, "FORBIDDEN", 403):
        authority.admin.list_api_keys(tenant="acme", tenant_id="other")
    with raises(NotFound, "NOT_FOUND", 404):  # another tenant's key does not exist for this tenant
        authority.admin.update_api_key(theirs.key_id, {"name": "mine now"}, tenant="acme")
    with raises(NotFound, "NOT_FOUND", 404):
        authority.admin.revoke_api_key(theirs.key_id, tenant="acme")
    assert authority.admin.list_api_keys(tenant="acme").keys == []
    [still] = authority.admin.list_api_keys(tenant_id="other").keys
    assert (still.name, still.status) == ("theirs", "ACTIVE")
    mine = authority.admin.create_api_key({"tenant_id": "acme", "name": "mine"}, tenant="acme")
    assert [k.key_id for k in authority.admin.list_api_keys(tenant="acme").keys] == [mine.key_id]


def test_authenticate_rejects_unknown_secrets(authority):
    make_tenant(authority)
    authority.admin.create_api_key({"tenant_id": "acme", "name": "ci"})
    for secret in ("", "cyc_live_" + "x" * 32, "garbage", "x" * 300):
        with raises(Unauthorized, "UNAUTHORIZED", 401):
            authority.admin.authenticate(secret)


def test_expired_key_fails_authentication(authority, clock):
    make_tenant(authority)
    k = authority.admin.create_api_key({"tenant_id": "acme", "name": "tmp", "expires_at": iso_ms(clock.now + 60_000)})
    assert authority.admin.authenticate(k.key_secret).tenant_id == "acme"
    clock.advance(60_001)
    with raises(Unauthorized, "UNAUTHORIZED", 401):
        authority.admin.authenticate(k.key_secret)


def test_authenticated_key_record(authority):
    make_tenant(authority)
    k = authority.admin.create_api_key({"tenant_id": "acme", "name": "ci", "permissions": ["reservations:create"]})
    record = authority.admin.authenticate(k.key_secret)
    assert (record.key_id, record.tenant_id, list(record.permissions)) == (k.key_id, "acme", ["reservations:create"])
