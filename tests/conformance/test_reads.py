"""GET /v1/reservations/{id}, GET /v1/reservations (filters, windows, sort, cursors) and GET /v1/balances."""

import pytest

from cycles.errors import Forbidden, InvalidRequest, NotFound

from .helpers import (
    USD,
    all_balances,
    all_reservations,
    budgets,
    commit,
    iso_ms,
    refused,
    refused_each,
    release,
    reserve,
)

SORTS = ["reservation_id", "tenant", "scope_path", "status", "reserved", "created_at_ms", "expires_at_ms"]


def sort_key(row, sort_by):
    return {
        "reservation_id": row.reservation_id,
        "tenant": row.subject.tenant,
        "scope_path": row.scope_path,
        "status": row.status,
        "reserved": row.reserved.amount,
        "created_at_ms": row.created_at_ms,
        "expires_at_ms": row.expires_at_ms,
    }[sort_by]


# --------------------------------------------------------------------------------------------- a small population

SPECS = {  # name: (subject below tenant:acme, estimate, ttl_ms)
    "r0": ({"workspace": "prod", "agent": "a"}, 10, 10_000),
    "r1": ({"workspace": "prod", "agent": "b"}, 30, 10_000),
    "r2": ({"workspace": "dev", "agent": "a"}, 20, 20_000),
    "r3": ({"workspace": "dev", "app": "x"}, 40, 3_000),
    "r4": ({"workspace": "prod", "agent": "a", "toolset": "t"}, 50, 30_000),
    "r5": ({"workflow": "wf"}, 60, 15_000),
}


@pytest.fixture
def population(authority, clock):
    """Six reservations created one second apart from t0 (r0 at t0 ... r5 at t0+5s), grace 0; r0 committed at t0+6s,
    r1 released at t0+7s, r3 expired (at t0+6s); the clock is left at t0+8s. Plus one reservation of another tenant."""
    budgets(authority, {"tenant:acme": 10_000, "tenant:other": 10_000})
    t0 = clock.now
    made = {}
    for name, (fields, estimate, ttl) in SPECS.items():
        r = reserve(authority, {"tenant": "acme", **fields}, estimate, ttl_ms=ttl, grace_period_ms=0,
                    idempotency_key=f"key-{name}", metadata={"name": name})  # fmt: skip
        made[name] = r
        clock.advance(1_000)
    reserve(authority, {"tenant": "other", "workspace": "prod"}, 5, tenant="other")
    commit(authority, made["r0"].reservation_id, 7, metadata={"done": True})
    clock.advance(1_000)
    release(authority, made["r1"].reservation_id)
    clock.advance(1_000)
    assert clock.now == t0 + 8_000
    ids = {name: r.reservation_id for name, r in made.items()}
    return {"t0": t0, "ids": ids, "names": {v: k for k, v in ids.items()}, "made": made}


def names(population, rows):
    return sorted(population["names"][r.reservation_id] for r in rows)


def listing(authority, query):
    return authority.list_reservations(query, tenant="acme").reservations


# ---------------------------------------------------------------------------------------------------------- get


def test_get_returns_the_detail(authority, population):
    p = population
    got = authority.get_reservation(p["ids"]["r0"], tenant="acme")
    assert got.status == "COMMITTED"
    assert got.committed.amount == 7
    assert got.reserved.amount == 10
    assert got.created_at_ms == p["t0"]
    assert got.expires_at_ms == p["t0"] + 10_000
    assert got.finalized_at_ms == p["t0"] + 6_000
    assert got.scope_path == "tenant:acme/workspace:prod/agent:a"
    assert got.affected_scopes == ["tenant:acme", "tenant:acme/workspace:prod", "tenant:acme/workspace:prod/agent:a"]
    assert got.idempotency_key == "key-r0"
    assert got.metadata == {"name": "r0"}
    assert got.committed_metadata == {"done": True}
    released = authority.get_reservation(p["ids"]["r1"], tenant="acme")
    assert released.status == "RELEASED" and released.finalized_at_ms == p["t0"] + 7_000 and released.committed is None
    active = authority.get_reservation(p["ids"]["r2"], tenant="acme")
    assert active.status == "ACTIVE" and active.finalized_at_ms is None and active.committed is None


def test_get_unknown_is_404(authority, population):
    with refused(authority, NotFound, "NOT_FOUND", 404):
        authority.get_reservation("res_unknown", tenant="acme")


# --------------------------------------------------------------------------------------------------------- list


def window(p, field, low, high):
    query = {}
    if low is not None:
        query[f"{field}from" if field else "from"] = iso_ms(p["t0"] + low)
    if high is not None:
        query[f"{field}to" if field else "to"] = iso_ms(p["t0"] + high)
    return query


FILTERS = [
    ({}, ["r0", "r1", "r2", "r3", "r4", "r5"]),
    ({"tenant": "acme"}, ["r0", "r1", "r2", "r3", "r4", "r5"]),
    ({"status": "ACTIVE"}, ["r2", "r4", "r5"]),
    ({"status": "COMMITTED"}, ["r0"]),
    ({"status": "RELEASED"}, ["r1"]),
    ({"status": "EXPIRED"}, ["r3"]),
    ({"workspace": "prod"}, ["r0", "r1", "r4"]),
    ({"agent": "a"}, ["r0", "r2", "r4"]),
    ({"workspace": "prod", "agent": "a"}, ["r0", "r4"]),
    ({"app": "x"}, ["r3"]),
    ({"workflow": "wf"}, ["r5"]),
    ({"toolset": "t"}, ["r4"]),
    ({"status": "ACTIVE", "workspace": "prod"}, ["r4"]),
    ({"idempotency_key": "key-r2"}, ["r2"]),
    ({"idempotency_key": "nope"}, []),
    ({"workspace": "nope"}, []),
    ({"status": "", "agent": "", "from": "", "to": "", "idempotency_key": ""}, ["r0", "r1", "r2", "r3", "r4", "r5"]),
    ({"colour": "red"}, ["r0", "r1", "r2", "r3", "r4", "r5"]),
]


def test_list_filters(authority, population):
    for query, expected in FILTERS:
        assert names(population, listing(authority, query)) == expected, query


WINDOWS = [  # (field prefix, low offset, high offset) relative to t0, inclusive
    ("", 1_000, 3_000, ["r1", "r2", "r3"]),
    ("", 4_000, None, ["r4", "r5"]),
    ("", None, 0, ["r0"]),
    ("", 1_001, 1_999, []),
    ("expires_", 5_000, 11_000, ["r0", "r1", "r3"]),  # expire at t0 + 10s, 11s, 6s
    ("expires_", 20_000, None, ["r2", "r4", "r5"]),  # 22s, 34s, 20s
    ("expires_", None, 5_999, []),
    ("finalized_", 6_000, 6_000, ["r0"]),
    ("finalized_", 0, 10**9, ["r0", "r1"]),  # rows never finalized are excluded
    ("finalized_", None, 6_999, ["r0"]),
    ("finalized_", 7_000, None, ["r1"]),
]


def test_list_time_windows_are_inclusive(authority, population):
    for field, low, high, expected in WINDOWS:
        query = window(population, field, low, high)
        assert names(population, listing(authority, query)) == expected, query


def test_windows_combine_with_filters(authority, population):
    query = {**window(population, "", 0, 3_000), "agent": "a", "status": "ACTIVE"}
    assert names(population, listing(authority, query)) == ["r2"]


def test_window_lower_after_upper_is_400(authority, population):
    cases = [window(population, field, 2_000, 1_000) for field in ("", "expires_", "finalized_")]
    refused_each(authority, cases, lambda q: listing(authority, q), InvalidRequest, "INVALID_REQUEST", 400)


def test_bad_timestamp_is_400(authority, population):
    cases = [{"from": "yesterday"}, {"expires_to": "2024-13-45"}, {"finalized_from": "soon"}]
    refused_each(authority, cases, lambda q: listing(authority, q), InvalidRequest, "INVALID_REQUEST", 400)


def test_default_sort_is_created_at_descending(authority, population):
    rows = listing(authority, {})
    assert [population["names"][r.reservation_id] for r in rows] == ["r5", "r4", "r3", "r2", "r1", "r0"]


def test_sort(authority, population):
    for sort_by in SORTS:
        for direction in ("asc", "desc"):
            rows = listing(authority, {"sort_by": sort_by, "sort_dir": direction})
            values = [sort_key(r, sort_by) for r in rows]
            assert values == sorted(values, reverse=direction == "desc"), (sort_by, direction)
            assert names(population, rows) == ["r0", "r1", "r2", "r3", "r4", "r5"]


def test_sort_created_ascending(authority, population):
    rows = listing(authority, {"sort_by": "created_at_ms", "sort_dir": "asc"})
    assert [population["names"][r.reservation_id] for r in rows] == ["r0", "r1", "r2", "r3", "r4", "r5"]


def test_sort_by_reserved_descending(authority, population):
    rows = listing(authority, {"sort_by": "reserved", "sort_dir": "desc"})
    assert [population["names"][r.reservation_id] for r in rows] == ["r5", "r4", "r3", "r1", "r2", "r0"]


def test_invalid_list_queries_are_400(authority, population):
    cases = [{"sort_by": "amount"}, {"sort_dir": "up"}, {"status": "PENDING"}, {"limit": 0}, {"limit": 201},
             {"cursor": "not-a-cursor"}]  # fmt: skip
    refused_each(authority, cases, lambda q: listing(authority, q), InvalidRequest, "INVALID_REQUEST", 400)


@pytest.mark.parametrize(("sort_by", "direction"), [("created_at_ms", "desc"), ("reserved", "asc"),
                                                    ("status", "asc"), ("tenant", "desc"), ("scope_path", "desc"),
                                                    ("expires_at_ms", "asc"), ("reservation_id", "desc")])  # fmt: skip
def test_cursor_pagination_returns_each_row_once_in_order(authority, population, sort_by, direction):
    for limit in (1, 4):
        paginate(authority, {"sort_by": sort_by, "sort_dir": direction}, limit)


def paginate(authority, query, limit):
    whole = [r.reservation_id for r in listing(authority, {**query, "limit": 200})]
    pages, cursor = [], None
    while True:
        page = authority.list_reservations({**query, "limit": limit, **({"cursor": cursor} if cursor else {})},
                                           tenant="acme")  # fmt: skip
        assert len(page.reservations) <= limit
        pages.append([r.reservation_id for r in page.reservations])
        if not page.has_more:
            assert page.next_cursor is None
            break
        assert len(page.reservations) == limit and page.next_cursor
        cursor = page.next_cursor
    flat = [rid for page in pages for rid in page]
    assert flat == whole
    assert len(set(flat)) == 6


def test_pagination_with_a_filter(authority, population):
    rows = all_reservations(authority, {"workspace": "prod", "sort_by": "reserved", "sort_dir": "asc"}, limit=1)
    assert [population["names"][r.reservation_id] for r in rows] == ["r0", "r1", "r4"]


def test_list_default_limit_is_50(authority):
    budgets(authority, {"tenant:acme": 10_000})
    for _ in range(51):
        reserve(authority, {"tenant": "acme"}, 1)
    page = authority.list_reservations({}, tenant="acme")
    assert len(page.reservations) == 50 and page.has_more and page.next_cursor
    rest = authority.list_reservations({"cursor": page.next_cursor}, tenant="acme")
    assert len(rest.reservations) == 1 and not rest.has_more


def test_last_page_has_no_cursor(authority, population):
    page = authority.list_reservations({"limit": 6}, tenant="acme")
    assert len(page.reservations) == 6 and not page.has_more and page.next_cursor is None


def test_cursor_is_bound_to_its_query(authority, population):
    first = authority.list_reservations({"limit": 2}, tenant="acme")
    assert first.next_cursor
    changes = [
        {"from": "1970-01-01T00:00:00Z"},
        {"expires_to": "2999-01-01T00:00:00Z"},
        {"status": "ACTIVE"},
        {"workspace": "prod"},
        {"sort_by": "reserved"},
        {"sort_dir": "asc"},
    ]

    def attempt(change):
        listing(authority, {"limit": 2, "cursor": first.next_cursor, **change})

    refused_each(authority, changes, attempt, InvalidRequest, "INVALID_REQUEST", 400)


def test_cursor_is_not_bound_to_include_or_limit(authority, population):
    first = authority.list_reservations({"limit": 2}, tenant="acme")
    rest = authority.list_reservations({"limit": 10, "cursor": first.next_cursor, "include": "metadata"}, tenant="acme")
    assert len(rest.reservations) == 4
    assert all(r.metadata is not None for r in rest.reservations)


def test_include_maps(authority, population):
    rid = population["ids"]["r0"]
    plain = {r.reservation_id: r for r in listing(authority, {})}[rid]
    assert plain.metadata is None and plain.committed_metadata is None
    both = {r.reservation_id: r for r in listing(authority, {"include": "metadata,committed_metadata,bogus"})}[rid]
    assert both.metadata == {"name": "r0"} and both.committed_metadata == {"done": True}
    only = {r.reservation_id: r for r in listing(authority, {"include": "committed_metadata"})}[rid]
    assert only.metadata is None and only.committed_metadata == {"done": True}


def test_summaries_carry_the_detail_fields(authority, population):
    rows = {r.reservation_id: r for r in listing(authority, {})}
    detail = authority.get_reservation(population["ids"]["r0"], tenant="acme")
    summary = rows[population["ids"]["r0"]]
    assert summary.model_dump(exclude={"metadata", "committed_metadata"}) == detail.model_dump(
        exclude={"metadata", "committed_metadata"}
    )


def test_list_is_tenant_scoped(authority, population):
    theirs = authority.list_reservations({}, tenant="other").reservations
    assert len(theirs) == 1 and theirs[0].subject.tenant == "other"
    assert population["names"].keys().isdisjoint(r.reservation_id for r in theirs)
    with refused(authority, Forbidden, "FORBIDDEN", 403):
        authority.list_reservations({"tenant": "other"}, tenant="acme")


# ------------------------------------------------------------------------------------------------------ balances

LEDGERS = {
    "tenant:acme": 1_000,
    "tenant:acme/workspace:prod": 500,
    "tenant:acme/workspace:prod/agent:bot": 100,
    "tenant:acme/workspace:prod2": 50,
    "tenant:acme/workspace:prod-x": 60,
    "tenant:acme/workspace:dev": 10,
}


@pytest.fixture
def ledgers(authority):
    budgets(authority, LEDGERS)
    budgets(authority, {"tenant:acme": 5_000}, unit="TOKENS")
    budgets(authority, {"tenant:other": 999, "tenant:other/workspace:prod": 9})
    reserve(authority, {"tenant": "acme", "workspace": "prod", "agent": "bot"}, 30)
    return authority


def rows_of(response_or_rows):
    rows = response_or_rows.balances if hasattr(response_or_rows, "balances") else response_or_rows
    return sorted((b.scope, b.remaining.unit) for b in rows)


BALANCE_QUERIES = [
    ({"tenant": "acme"}, [("tenant:acme", "TOKENS"), ("tenant:acme", USD)]),
    ({"tenant": "acme", "workspace": "prod"}, [("tenant:acme/workspace:prod", USD)]),
    ({"workspace": "prod"}, [("tenant:acme/workspace:prod", USD)]),
    (
        {"workspace": "prod", "include_children": True},
        [("tenant:acme/workspace:prod", USD), ("tenant:acme/workspace:prod/agent:bot", USD)],
    ),
    ({"workspace": "prod", "agent": "bot"}, [("tenant:acme/workspace:prod/agent:bot", USD)]),
    ({"agent": "bot"}, []),  # tenant:acme/agent:bot has no ledger
    ({"workspace": "nope", "include_children": True}, []),
    (
        {"tenant": "acme", "include_children": True},
        sorted([(s, USD) for s in LEDGERS] + [("tenant:acme", "TOKENS")]),
    ),
    ({"tenant_id": "acme"}, sorted([(s, USD) for s in LEDGERS] + [("tenant:acme", "TOKENS")])),
    ({"tenant_id": "acme", "unit": "TOKENS"}, [("tenant:acme", "TOKENS")]),
    ({"unit": "TOKENS"}, [("tenant:acme", "TOKENS")]),
]


def test_balance_queries(ledgers):
    for query, expected in BALANCE_QUERIES:
        assert rows_of(ledgers.balances(query, tenant="acme")) == expected, query


def test_scope_prefix(ledgers):
    rows = [scope for scope, _ in rows_of(ledgers.balances({"scope_prefix": "tenant:acme/workspace:"}, tenant="acme"))]
    assert "tenant:acme/workspace:prod" in rows and "tenant:acme/workspace:dev" in rows
    assert "tenant:acme/workspace:prod/agent:bot" in rows
    assert "tenant:acme" not in rows and not any(s.startswith("tenant:other") for s in rows)
    prefixed = ledgers.balances({"scope_prefix": "tenant:acme/workspace:prod/"}, tenant="acme")
    assert rows_of(prefixed) == [("tenant:acme/workspace:prod/agent:bot", USD)]


def test_balance_fields(ledgers):
    [b] = ledgers.balances({"workspace": "prod", "agent": "bot"}, tenant="acme").balances
    assert b.scope == b.scope_path == "tenant:acme/workspace:prod/agent:bot"
    assert (b.allocated.amount, b.reserved.amount, b.spent.amount, b.debt.amount) == (100, 30, 0, 0)
    assert b.remaining.amount == 70
    assert b.overdraft_limit.amount == 0 and b.is_over_limit is False
    units = {b.remaining.unit, b.allocated.unit, b.reserved.unit, b.spent.unit, b.debt.unit, b.overdraft_limit.unit}
    assert units == {USD}


def test_balance_identity_holds_for_every_row(ledgers):
    for b in all_balances(ledgers, {"tenant_id": "acme"}):
        assert b.remaining.amount == b.allocated.amount - b.spent.amount - b.reserved.amount - b.debt.amount


@pytest.mark.parametrize("query", [{"tenant_id": "acme"}, {"tenant": "acme", "include_children": True}])
def test_balance_pagination_returns_each_row_once(ledgers, query):
    for limit in (1, 2, 3):
        paginate_balances(ledgers, query, limit)


def paginate_balances(ledgers, query, limit):
    whole = rows_of(ledgers.balances({**query, "limit": 200}, tenant="acme"))
    seen, cursor, pages = [], None, 0
    while True:
        page = ledgers.balances({**query, "limit": limit, **({"cursor": cursor} if cursor else {})}, tenant="acme")
        pages += 1
        assert len(page.balances) <= limit
        seen += [(b.scope, b.remaining.unit) for b in page.balances]
        if not page.has_more:
            assert page.next_cursor is None
            break
        cursor = page.next_cursor
        assert cursor and len(page.balances) == limit
    assert len(seen) == len(set(seen)) == 7
    assert sorted(seen) == whole
    assert pages == -(-7 // limit)


def test_balance_cursor_is_bound_to_its_query(ledgers):
    first = ledgers.balances({"tenant_id": "acme", "limit": 2}, tenant="acme")
    with refused(ledgers, InvalidRequest, "INVALID_REQUEST", 400):
        ledgers.balances({"tenant_id": "acme", "unit": USD, "limit": 2, "cursor": first.next_cursor}, tenant="acme")
    with refused(ledgers, InvalidRequest, "INVALID_REQUEST", 400):
        ledgers.balances({"tenant_id": "acme", "cursor": "garbage"}, tenant="acme")


def test_invalid_balance_queries_are_400(ledgers):
    cases = [{}, {"include_children": True}, {"tenant": "acme", "limit": 0}, {"tenant": "acme", "limit": 201},
             {"unit": "EUR"}]  # fmt: skip
    refused_each(ledgers, cases, lambda q: ledgers.balances(q, tenant="acme"), InvalidRequest, "INVALID_REQUEST", 400)


def test_balances_of_another_tenant_are_403(ledgers):
    cases = [{"tenant": "other"}, {"tenant_id": "other"}, {"tenant": "other", "agent": "x"}]
    refused_each(ledgers, cases, lambda q: ledgers.balances(q, tenant="acme"), Forbidden, "FORBIDDEN", 403)


def test_balances_are_tenant_scoped(ledgers):
    assert rows_of(ledgers.balances({"tenant_id": "other"}, tenant="other")) == [
        ("tenant:other", USD), ("tenant:other/workspace:prod", USD),
    ]  # fmt: skip
    assert not any(s.startswith("tenant:other") for s, _ in rows_of(all_balances(ledgers, {"tenant_id": "acme"})))
    assert rows_of(ledgers.balances({"workspace": "prod"}, tenant="other")) == [("tenant:other/workspace:prod", USD)]
