"""Small builders so conformance tests read like the protocol."""

from __future__ import annotations

import itertools
from typing import Any

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
    rows = [b for b in authority.balances({**fields, "include_children": False}, tenant=tenant).balances
            if b.scope == scope and b.remaining.unit == unit]
    assert len(rows) == 1, f"no {unit} ledger at {scope}"
    b = rows[0]
    return {
        "allocated": b.allocated.amount, "spent": b.spent.amount, "reserved": b.reserved.amount,
        "debt": b.debt.amount, "remaining": b.remaining.amount, "is_over_limit": b.is_over_limit,
    }  # fmt: skip
