"""Bad input: every malformed request is 400 INVALID_REQUEST, names the problem, and changes NOTHING.

"Nothing" is checked on the whole SQLite file: `iterdump()` before and after each refused request must be identical.
The valid base bodies are exercised too (test_base_requests_are_valid), so each bad case differs from an accepted
request only by the one defect it names.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from cycles.errors import CyclesError, InvalidRequest
from cycles.ledger import Ledger, SQLiteStore

from . import dump

USD = "USD_MICROCENTS"
ACTION = {"kind": "llm.completion", "name": "gpt-4o"}
AGENT = {"tenant": "acme", "workspace": "w", "agent": "a"}
INT64_MAX = 2**63 - 1
DROP = object()  # remove the field instead of setting it


def amt(n: Any, unit: Any = USD) -> dict[str, Any]:
    return {"unit": unit, "amount": n}


BASE: dict[str, dict[str, Any]] = {
    "reserve": {"idempotency_key": "k-new", "subject": AGENT, "action": ACTION, "estimate": amt(10)},
    "commit": {"idempotency_key": "k-new", "actual": amt(10)},
    "release": {"idempotency_key": "k-new"},
    "extend": {"idempotency_key": "k-new", "extend_by_ms": 1_000},
    "event": {"idempotency_key": "k-new", "subject": AGENT, "action": ACTION, "actual": amt(10)},
    "decide": {"idempotency_key": "k-new", "subject": AGENT, "action": ACTION, "estimate": amt(10)},
    "create_budget": {"scope": "tenant:acme/workspace:new", "unit": USD, "allocated": amt(10)},
    "fund": {"scope": "tenant:acme", "unit": USD, "body": {"operation": "CREDIT", "amount": amt(10)}},
    "update_budget": {"scope": "tenant:acme", "unit": USD, "body": {"overdraft_limit": amt(10)}},
    "balances": {"tenant": "acme"},
    "list_reservations": {"tenant": "acme"},
}


@dataclass
class World:
    ledger: Ledger
    path: str
    reservation_id: str


OPS: dict[str, Callable[[World, dict[str, Any]], Any]] = {
    "reserve": lambda w, b: w.ledger.reserve(b, tenant="acme"),
    "commit": lambda w, b: w.ledger.commit(w.reservation_id, b, tenant="acme"),
    "release": lambda w, b: w.ledger.release(w.reservation_id, b, tenant="acme"),
    "extend": lambda w, b: w.ledger.extend(w.reservation_id, b, tenant="acme"),
    "event": lambda w, b: w.ledger.event(b, tenant="acme"),
    "decide": lambda w, b: w.ledger.decide(b, tenant="acme"),
    "create_budget": lambda w, b: w.ledger.admin.create_budget(b, tenant="acme"),
    "fund": lambda w, b: w.ledger.admin.fund(b["scope"], b["unit"], b["body"], tenant="acme"),
    "update_budget": lambda w, b: w.ledger.admin.update_budget(b["scope"], b["unit"], b["body"], tenant="acme"),
    "balances": lambda w, b: w.ledger.balances(b, tenant="acme"),
    "list_reservations": lambda w, b: w.ledger.list_reservations(b, tenant="acme"),
}


def patched(op: str, path: str, value: Any) -> dict[str, Any]:
    """The base body of `op` with one field (dotted path) set to `value`, or removed when `value` is DROP."""
    body = copy.deepcopy(BASE[op])
    *parents, last = path.split(".")
    target = body
    for name in parents:
        target = target[name]
    if value is DROP:
        del target[last]
    else:
        target[last] = value
    return body


CASES: list[Any] = []


def case(op: str, path: str, value: Any, needle: str, name: str) -> None:
    CASES.append(pytest.param(op, patched(op, path, value), needle, id=f"{op}-{name}"))


# ---- amounts: negative, beyond int64, floats, numeric strings, booleans, null, missing, unknown unit
BAD_AMOUNTS = [
    (-1, "negative"),
    (-(2**63), "int64-min"),
    (2**63, "int64-max-plus-1"),
    (2**64, "2-pow-64"),
    (10.0, "float-integral"),
    (10.5, "float"),
    (float("nan"), "nan"),
    (float("inf"), "inf"),
    ("10", "numeric-string"),
    ("1e3", "exponent-string"),
    (True, "bool-true"),
    (False, "bool-false"),
    (None, "null"),
    ([10], "list"),
]
AMOUNT_SITES = [
    ("reserve", "estimate"),
    ("commit", "actual"),
    ("event", "actual"),
    ("decide", "estimate"),
    ("create_budget", "allocated"),
    ("create_budget", "overdraft_limit"),
    ("fund", "body.amount"),
    ("update_budget", "body.overdraft_limit"),
]
for op, site in AMOUNT_SITES:
    needle = site.split(".")[-1]
    for value, name in BAD_AMOUNTS:
        case(op, site, amt(value), needle, f"{site}-{name}")
    case(op, site, amt(10, "EUR"), "unit", f"{site}-unit-EUR")
    case(op, site, amt(10, "usd_microcents"), "unit", f"{site}-unit-lowercase")
    case(op, site, {"unit": USD}, needle, f"{site}-amount-missing")
    case(op, site, {"amount": 10}, needle, f"{site}-unit-missing")
    case(op, site, {"unit": USD, "amount": 10, "currency": "usd"}, "currency", f"{site}-extra-field")
    case(op, site, 10, needle, f"{site}-bare-number")
case("create_budget", "unit", "EUR", "unit", "unit-EUR")
case("create_budget", "unit", None, "unit", "unit-null")
case("fund", "unit", "EUR", "unit", "unit-EUR")
case("update_budget", "unit", "tokens", "unit", "unit-lowercase")
case("balances", "unit", "EUR", "unit", "unit-EUR")

# ---- subjects: empty, dimensions-only, bad characters, too long, wrong types, unknown levels
SUBJECT_SITES = ("reserve", "event", "decide")
BAD_SUBJECTS = [
    ({}, "subject", "empty"),
    ({"dimensions": {"cost_center": "cc1"}}, "subject", "dimensions-only"),
    ({"tenant": "acme", "agent": "bad agent"}, "agent", "space"),
    ({"tenant": "acme", "agent": "a/b"}, "agent", "slash"),
    ({"tenant": "acme", "agent": "a:b"}, "agent", "colon"),
    ({"tenant": "acme", "agent": "a\nb"}, "agent", "newline"),
    ({"tenant": "acme", "agent": "\u00e9t\u00e9"}, "agent", "non-ascii"),
    ({"tenant": "acme", "agent": ""}, "agent", "empty-value"),
    ({"tenant": "acme", "agent": "a" * 129}, "agent", "129-chars"),
    ({"tenant": "ac me"}, "tenant", "tenant-space"),
    ({"tenant": "acme", "workspace": "w" * 200}, "workspace", "workspace-200-chars"),
    ({"tenant": "acme", "toolset": "x*y"}, "toolset", "toolset-star"),
    ({"tenant": "acme", "agent": 5}, "agent", "int-value"),
    ({"tenant": None, "agent": None, "dimensions": {"d": "v"}}, "subject", "only-nulls"),
    ({"tenant": "acme", "team": "x"}, "team", "unknown-level"),
    ({"tenant": "acme", "dimensions": {f"d{i}": "v" for i in range(17)}}, "dimensions", "17-dimensions"),
    ({"tenant": "acme", "dimensions": {"d": "v" * 257}}, "dimensions", "dimension-value-257"),
    ({"tenant": "acme", "dimensions": {"d": 1}}, "dimensions", "dimension-value-int"),
    ({"tenant": "acme", "dimensions": ["d"]}, "dimensions", "dimensions-list"),
    ("tenant:acme", "subject", "string"),
    (None, "subject", "null"),
    (DROP, "subject", "missing"),
]
for op in SUBJECT_SITES:
    for subject, needle, name in BAD_SUBJECTS:
        case(op, "subject", subject, needle, f"subject-{name}")

# ---- actions
for op in SUBJECT_SITES:
    case(op, "action.kind", "k" * 65, "kind", "action-kind-65")
    case(op, "action.name", "n" * 257, "name", "action-name-257")
    case(op, "action.tags", [f"t{i}" for i in range(11)], "tags", "action-11-tags")
    case(op, "action.tags", ["t" * 65], "tags", "action-tag-65")
    case(op, "action.kind", DROP, "kind", "action-kind-missing")
    case(op, "action.name", DROP, "name", "action-name-missing")
    case(op, "action.risk", "high", "risk", "action-extra-field")
    case(op, "action", DROP, "action", "action-missing")

# ---- ttl_ms, grace_period_ms, extend_by_ms out of range or of the wrong type
for value, name in [(999, "999"), (0, "0"), (-1, "negative"), (86_400_001, "86400001"), (2**63, "huge"),
                    (60_000.0, "float"), ("60000", "string"), (True, "bool"), (None, "null")]:  # fmt: skip
    case("reserve", "ttl_ms", value, "ttl_ms", f"ttl_ms-{name}")
for value, name in [(-1, "negative"), (60_001, "60001"), (1.5, "float"), ("0", "string"), (False, "bool"),
                    (None, "null")]:  # fmt: skip
    case("reserve", "grace_period_ms", value, "grace_period_ms", f"grace_period_ms-{name}")
for value, name in [(0, "0"), (-1, "negative"), (86_400_001, "86400001"), (1_000.0, "float"), ("1000", "string"),
                    (True, "bool"), (None, "null"), (DROP, "missing")]:  # fmt: skip
    case("extend", "extend_by_ms", value, "extend_by_ms", f"extend_by_ms-{name}")

# ---- overage policies and other enums
for op in ("reserve", "event"):
    for value, name in [("ALLOW", "unknown"), ("reject", "lowercase"), ("", "empty"), (None, "null"), (1, "int")]:
        case(op, "overage_policy", value, "overage_policy", f"overage_policy-{name}")
case("create_budget", "commit_overage_policy", "SOMETIMES", "commit_overage_policy", "commit_overage_policy")
case("update_budget", "body.commit_overage_policy", "SOMETIMES", "commit_overage_policy", "commit_overage_policy")
case("create_budget", "rollover_policy", "FOREVER", "rollover_policy", "rollover_policy")
case("fund", "body.operation", "WITHDRAW", "operation", "operation-unknown")
case("fund", "body.operation", "credit", "operation", "operation-lowercase")
case("fund", "body.operation", DROP, "operation", "operation-missing")
case("reserve", "dry_run", "true", "dry_run", "dry_run-string")
case("reserve", "dry_run", 1, "dry_run", "dry_run-int")

# ---- idempotency keys: empty, 257 chars, wrong type, missing
for op in ("reserve", "commit", "release", "extend", "event", "decide"):
    case(op, "idempotency_key", "", "idempotency_key", "key-empty")
    case(op, "idempotency_key", "k" * 257, "idempotency_key", "key-257")
    case(op, "idempotency_key", 12345, "idempotency_key", "key-int")
    case(op, "idempotency_key", DROP, "idempotency_key", "key-missing")
case("fund", "body.idempotency_key", "", "idempotency_key", "key-empty")
case("fund", "body.idempotency_key", "k" * 257, "idempotency_key", "key-257")

# ---- unknown fields, in every request body
for op in ("reserve", "commit", "release", "extend", "event", "decide", "create_budget"):
    case(op, "surprise", 1, "surprise", "unknown-field")
case("fund", "body.surprise", 1, "surprise", "unknown-field")
case("update_budget", "body.surprise", 1, "surprise", "unknown-field")
case("decide", "dry_run", True, "dry_run", "dry_run-not-a-decide-field")
case("commit", "metrics", {"tokens_input": 1, "cost": 2}, "cost", "metrics-unknown-field")
case("event", "metrics", {"latency_ms": 1, "cost": 2}, "cost", "metrics-unknown-field")

# ---- other bounded fields
case("commit", "metrics", {"latency_ms": -1}, "latency_ms", "metrics-latency-negative")
case("commit", "metrics", {"tokens_output": 1.5}, "tokens_output", "metrics-tokens-float")
case("commit", "metrics", {"model_version": "m" * 129}, "model_version", "metrics-model-version-129")
case("event", "client_time_ms", -1, "client_time_ms", "client-time-negative")
case("release", "reason", "r" * 257, "reason", "reason-257")
case("reserve", "metadata", "not-an-object", "metadata", "metadata-string")
case("commit", "actual", DROP, "actual", "actual-missing")
case("reserve", "estimate", DROP, "estimate", "estimate-missing")

# ---- budget scopes: malformed, out of canonical order, unknown level, bad characters, no tenant root
BAD_SCOPES = [
    ("tenant:acme//agent:x", "empty-segment"),
    ("agent:x/tenant:acme", "out-of-order"),
    ("tenant:acme/agent:x/workspace:w", "out-of-order-below-root"),
    ("tenant:acme/workspace:w/workspace:v", "repeated-level"),
    ("team:x", "unknown-level-root"),
    ("tenant:acme/team:x", "unknown-level"),
    ("tenant:ac me", "space"),
    ("tenant:acme/agent:a b", "space-in-agent"),
    ("tenant:acme/agent:a\u00e9", "non-ascii"),
    ("workspace:w", "missing-tenant-root"),
    ("workspace:w/agent:a", "missing-tenant-root-deep"),
    ("", "empty"),
    ("tenant:", "empty-value"),
    ("tenant", "no-colon"),
    ("tenant:acme/", "trailing-slash"),
    ("/tenant:acme", "leading-slash"),
    ("tenant:acme:x", "colon-in-value"),
    ("Tenant:acme", "capitalised-level"),
    ("tenant:acme/agent:" + "a" * 129, "value-129-chars"),
]
for scope, name in BAD_SCOPES:
    case("create_budget", "scope", scope, "scope", f"scope-{name}")
    if scope:  # the fund/update scope is a query parameter, not a body field
        case("fund", "scope", scope, "scope", f"scope-{name}")
        case("update_budget", "scope", scope, "scope", f"scope-{name}")
case("create_budget", "scope", None, "scope", "scope-null")
case("create_budget", "scope", DROP, "scope", "scope-missing")
case("create_budget", "tenant_id", "other", "tenant_id", "tenant_id-mismatch")

# ---- read queries
case("balances", "tenant", DROP, "tenant", "no-level")
case("balances", "limit", 0, "limit", "limit-0")
case("balances", "limit", 201, "limit", "limit-201")
case("balances", "cursor", "garbage!", "cursor", "cursor-garbage")
case("list_reservations", "limit", 0, "limit", "limit-0")
case("list_reservations", "limit", 201, "limit", "limit-201")
case("list_reservations", "sort_by", "cost", "sort_by", "sort_by-unknown")
case("list_reservations", "sort_dir", "up", "sort_dir", "sort_dir-unknown")
case("list_reservations", "status", "PENDING", "status", "status-unknown")
case("list_reservations", "from", "yesterday", "from", "from-not-a-date")
case("list_reservations", "cursor", "garbage!", "cursor", "cursor-garbage")
CASES.append(
    pytest.param(
        "list_reservations",
        {"tenant": "acme", "from": "2030-01-02T00:00:00Z", "to": "2030-01-01T00:00:00Z"},
        "from",
        id="list_reservations-from-after-to",
    )
)


# --------------------------------------------------------------------------------------------------- tests
@pytest.fixture
def world(tmp_path, clock) -> World:
    path = str(tmp_path / "ledger.db")
    ledger = Ledger(SQLiteStore(path), clock=clock)
    for scope in ("tenant:acme", "tenant:acme/workspace:w", "tenant:acme/workspace:w/agent:a"):
        ledger.admin.create_budget({"scope": scope, "unit": USD, "allocated": amt(1_000)}, tenant="acme")
    held = ledger.reserve({**BASE["reserve"], "idempotency_key": "held"}, tenant="acme")
    ledger.commit(
        ledger.reserve({**BASE["reserve"], "idempotency_key": "done"}, tenant="acme").reservation_id,
        {"idempotency_key": "done-commit", "actual": amt(4)},
        tenant="acme",
    )
    ledger.event({**BASE["event"], "idempotency_key": "spent"}, tenant="acme")
    yield World(ledger, path, held.reservation_id or "")
    ledger.store.close()


@pytest.mark.parametrize("op", sorted(OPS))
def test_base_requests_are_valid(world, op):
    """Positive control: each base request is accepted, so every bad case fails for its own defect."""
    OPS[op](world, copy.deepcopy(BASE[op]))


def test_case_table_is_not_empty():
    assert len(CASES) > 300
    assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"


@pytest.mark.parametrize("op,body,needle", CASES)
def test_bad_input_is_invalid_request_and_changes_nothing(world, op, body, needle):
    before = dump(world.path)
    with pytest.raises(CyclesError) as caught:
        OPS[op](world, body)
    exc = caught.value
    assert isinstance(exc, InvalidRequest), f"{type(exc).__name__} {exc.code}: {exc.message}"
    assert exc.code == "INVALID_REQUEST" and exc.status == 400
    assert needle.lower() in exc.message.lower(), f"message does not name {needle!r}: {exc.message}"
    assert exc.to_body("req-1")["error"] == "INVALID_REQUEST"
    assert dump(world.path) == before, "a refused request changed the database"


# ------------------------------------------------------------------------------------------ the int64 edge
def test_amounts_at_the_int64_limit_are_accepted(world):
    """Positive control of the range: exactly 2**63 - 1 is a legal amount (refused for budget, not for form)."""
    before = dump(world.path)
    with pytest.raises(CyclesError) as caught:
        world.ledger.reserve({**BASE["reserve"], "estimate": amt(INT64_MAX)}, tenant="acme")
    assert caught.value.code == "BUDGET_EXCEEDED"
    # a denial changes no ledger state; the only new row is its reservation.denied event in the outbox
    added = [line for line in dump(world.path) if line not in before]
    assert len(added) == 1 and added[0].startswith('INSERT INTO "outbox"') and "reservation.denied" in added[0]
    decision = world.ledger.decide({**BASE["decide"], "estimate": amt(INT64_MAX)}, tenant="acme")
    assert decision.decision == "DENY" and decision.reason_code == "BUDGET_EXCEEDED"


def int64_world(ledger: Ledger) -> str:
    """A budget of 2**63-1 with an overdraft limit of 2**63-1, fully spent, then RESET to 0: remaining = -(2**63-1).

    Returns a live ALLOW_WITH_OVERDRAFT reservation (estimate 0) taken before the spend."""
    ledger.admin.create_budget(
        {"scope": "tenant:big", "unit": USD, "allocated": amt(INT64_MAX), "overdraft_limit": amt(INT64_MAX)},
        tenant="big",
    )
    subject = {"tenant": "big"}
    rid = ledger.reserve(
        {"idempotency_key": "r", "subject": subject, "action": ACTION, "estimate": amt(0),
         "overage_policy": "ALLOW_WITH_OVERDRAFT"},
        tenant="big",
    ).reservation_id  # fmt: skip
    ledger.event({"idempotency_key": "e", "subject": subject, "action": ACTION, "actual": amt(INT64_MAX)}, tenant="big")
    funded = ledger.admin.fund("tenant:big", USD, {"operation": "RESET", "amount": amt(0)}, tenant="big")
    assert funded.new_remaining.amount == -INT64_MAX
    return rid or ""


def test_overdraft_event_beyond_int64_is_a_clean_refusal(world):
    """An overdraft event whose debt would push remaining below -2**63 must be refused with a protocol error (and
    change nothing), not escape as a pydantic ValidationError (HTTP 500). Balance.remaining is an int64."""
    int64_world(world.ledger)
    before = dump(world.path)
    try:
        response = world.ledger.event(
            {"idempotency_key": "e2", "subject": {"tenant": "big"}, "action": ACTION, "actual": amt(INT64_MAX),
             "overage_policy": "ALLOW_WITH_OVERDRAFT"},
            tenant="big",
        )  # fmt: skip
    except CyclesError as exc:
        assert exc.status in (400, 409), exc
        assert dump(world.path) == before
    else:  # accepted: then every balance it reports, and every later read, must stay in the int64 range
        for b in response.balances or []:
            assert -(2**63) <= b.remaining.amount <= INT64_MAX
    rows = world.ledger.balances({"tenant": "big"}, tenant="big").balances
    assert all(-(2**63) <= b.remaining.amount for b in rows)


def test_overdraft_commit_beyond_int64_does_not_poison_the_ledger(world):
    """A commit may not store a ledger whose remaining is below -2**63: afterwards balances, get_budget and even the
    funding that should repair it would all fail. Either the commit is refused (409/400, nothing changes) or the
    ledger stays readable and fundable."""
    rid = int64_world(world.ledger)
    before = dump(world.path)
    try:
        world.ledger.commit(rid, {"idempotency_key": "c", "actual": amt(INT64_MAX)}, tenant="big")
    except CyclesError as exc:
        assert exc.status in (400, 409), exc
        assert dump(world.path) == before
    world.ledger.balances({"tenant": "big"}, tenant="big")
    world.ledger.admin.get_budget("tenant:big", USD, tenant="big")
    world.ledger.admin.fund("tenant:big", USD, {"operation": "CREDIT", "amount": amt(1)}, tenant="big")
