"""Small builders so conformance tests read like the protocol."""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from datetime import UTC
from typing import Any

import pytest

USD = "USD_MICROCENTS"
ACTION = {"kind": "llm.completion", "name": "gpt-4o"}
_keys = itertools.count()


def key(prefix: str = "k") -> str:
    return f"{prefix}-{next(_keys)}"


def amount(n: int, unit: str = USD) -> dict[str, Any]:
    return {"unit": unit, "amount": n}


def budgets(authority, allocations: dict[str, int], unit: str = USD, **extra: Any) -> None:
    """Create one budget per scope: `budgets(a, {"tenant:acme": 1000, "tenant:acme/agent:bot": 500})`."""
    for scope, allocated in allocations.items():
        authority.admin.create_budget({"scope": scope, "unit": unit, "allocated": amount(allocated, unit), **extra})


def reserve(authority, subject: dict[str, str], estimate: int, *, tenant: str = "acme", unit: str = USD, **body: Any):
    request = {
        "idempotency_key": body.pop("idempotency_key", None) or key("r"),
        "subject": subject,
        "action": body.pop("action", ACTION),
        "estimate": amount(estimate, unit),
        **body,
    }
    return authority.reserve(request, tenant=tenant)


def commit(authority, reservation_id: str, actual: int, *, tenant: str = "acme", unit: str = USD, **body: Any):
    request = {"idempotency_key": body.pop("idempotency_key", None) or key("c"), "actual": amount(actual, unit), **body}
    return authority.commit(reservation_id, request, tenant=tenant)


def release(authority, reservation_id: str, *, tenant: str = "acme", **body: Any):
    request = {"idempotency_key": body.pop("idempotency_key", None) or key("rel"), **body}
    return authority.release(reservation_id, request, tenant=tenant)


def extend(authority, reservation_id: str, by_ms: int, *, tenant: str = "acme", **body: Any):
    request = {"idempotency_key": body.pop("idempotency_key", None) or key("x"), "extend_by_ms": by_ms, **body}
    return authority.extend(reservation_id, request, tenant=tenant)


def event(authority, subject: dict[str, str], actual: int, *, tenant: str = "acme", unit: str = USD, **body: Any):
    request = {
        "idempotency_key": body.pop("idempotency_key", None) or key("e"),
        "subject": subject,
        "action": body.pop("action", ACTION),
        "actual": amount(actual, unit),
        **body,
    }
    return authority.event(request, tenant=tenant)


def ledger_state(authority, scope: str, unit: str = USD, tenant: str = "acme") -> dict[str, int | bool]:
    """allocated/spent/reserved/debt/remaining/is_over_limit of one ledger, read through balances."""
    fields = dict(part.split(":", 1) for part in scope.split("/"))
    rows = [
        b
        for b in authority.balances({**fields, "include_children": False}, tenant=tenant).balances
        if b.scope == scope and b.remaining.unit == unit
    ]
    assert len(rows) == 1, f"no {unit} ledger at {scope}"
    b = rows[0]
    return {
        "allocated": b.allocated.amount, "spent": b.spent.amount, "reserved": b.reserved.amount,
        "debt": b.debt.amount, "remaining": b.remaining.amount, "is_over_limit": b.is_over_limit,
    }  # fmt: skip


# --------------------------------------------------------------------------------------------- more builders / probes
OTHER = "other"  # a second tenant, for isolation tests


def decide(authority, subject: dict[str, str], estimate: int, *, tenant: str = "acme", unit: str = USD, **body: Any):
    request = {
        "idempotency_key": body.pop("idempotency_key", None) or key("d"),
        "subject": subject,
        "action": body.pop("action", ACTION),
        "estimate": amount(estimate, unit),
        **body,
    }
    return authority.decide(request, tenant=tenant)


def fund(authority, scope: str, operation: str, n: int, *, unit: str = USD, tenant: str | None = None, **body: Any):
    """Admin funding: `fund(a, "tenant:acme", "CREDIT", 100)`."""
    request = {"operation": operation, "amount": amount(n, unit), **body}
    return authority.admin.fund(scope, unit, request, tenant=tenant)


def make_tenant(authority, tenant_id: str = "acme", **settings: Any):
    tenant, created = authority.admin.create_tenant({"tenant_id": tenant_id, "name": tenant_id.title(), **settings})
    assert created
    return tenant


def set_status(authority, tenant_id: str, status: str):
    return authority.admin.update_tenant(tenant_id, {"status": status})


def iso_ms(ms: int) -> str:
    """Epoch ms as the ISO-8601 text a query string carries."""
    from datetime import datetime

    text = datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def all_balances(authority, query: dict[str, Any], *, tenant: str = "acme", limit: int = 200) -> list:
    """Every Balance a query matches, following cursors to the end."""
    rows, cursor = [], None
    while True:
        page = authority.balances({**query, "limit": limit, **({"cursor": cursor} if cursor else {})}, tenant=tenant)
        rows += page.balances
        if not page.has_more:
            assert not page.next_cursor
            return rows
        cursor = page.next_cursor
        assert cursor


def all_reservations(authority, query: dict[str, Any] | None = None, *, tenant: str = "acme", limit: int = 200) -> list:
    """Every reservation a listing matches, following cursors to the end."""
    rows, cursor = [], None
    while True:
        q = {**(query or {}), "limit": limit, **({"cursor": cursor} if cursor else {})}
        page = authority.list_reservations(q, tenant=tenant)
        rows += page.reservations
        if not page.has_more:
            assert not page.next_cursor
            return rows
        cursor = page.next_cursor
        assert cursor


def world(authority, tenants: tuple[str, ...] = ("acme", OTHER)) -> dict[str, Any]:
    """Everything a tenant can observe: every ledger and every reservation (with its maps), per tenant."""
    seen: dict[str, Any] = {}
    for t in tenants:
        ledgers = all_balances(authority, {"tenant_id": t}, tenant=t)
        reservations = all_reservations(
            authority, {"sort_by": "reservation_id", "sort_dir": "asc", "include": "metadata,committed_metadata"},
            tenant=t,
        )  # fmt: skip
        seen[t] = {
            "ledgers": sorted((b.model_dump() for b in ledgers), key=lambda b: (b["scope"], b["remaining"]["unit"])),
            "reservations": [r.model_dump() for r in reservations],
        }
    return seen


@contextmanager
def refused(
    authority, error: type[BaseException], code: str, status: int, *, tenants: tuple[str, ...] = ("acme", OTHER)
):
    """`with refused(a, BudgetExceeded, "BUDGET_EXCEEDED", 409): ...`: that exact error, and nothing changed."""
    before = world(authority, tenants)
    with pytest.raises(error) as info:
        yield info
    assert type(info.value) is error, f"expected exactly {error.__name__}, got {type(info.value).__name__}"
    assert (info.value.code, info.value.status) == (code, status)
    assert world(authority, tenants) == before, "a refused operation changed state"


@contextmanager
def unchanged(authority, *, tenants: tuple[str, ...] = ("acme", OTHER)):
    """Balances and reservations are identical before and after the block."""
    before = world(authority, tenants)
    yield
    assert world(authority, tenants) == before


@contextmanager
def raises(error: type[BaseException], code: str, status: int):
    """`pytest.raises` of exactly that class, with the protocol's code and HTTP status."""
    with pytest.raises(error) as info:
        yield info
    assert type(info.value) is error, f"expected exactly {error.__name__}, got {type(info.value).__name__}"
    assert (info.value.code, info.value.status) == (code, status)


def refused_each(authority, cases, call, error: type[BaseException], code: str, status: int, **kw: Any) -> None:
    """`refused(...)` for every case in turn (`call(case)` must raise); a failure names its case."""
    for case in cases:
        try:
            with refused(authority, error, code, status, **kw):
                call(case)
        except (AssertionError, pytest.fail.Exception) as exc:
            raise AssertionError(f"case {case!r}: {exc}") from exc
