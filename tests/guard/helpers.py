"""Ledger checks through the public API only."""

from __future__ import annotations

import cycles

CENT = cycles.usd(0.01).amount  # 1_000_000 USD_MICROCENTS
USD = "USD_MICROCENTS"


def ledger(client: cycles.Client) -> dict[str, tuple[int, int]]:
    """{scope: (spent, reserved)} for every budget of the client's tenant; non-USD units keyed "scope[UNIT]"."""
    out: dict[str, tuple[int, int]] = {}
    for b in client.balances():
        unit = b.remaining.unit
        key = b.scope if unit == USD else f"{b.scope}[{unit}]"
        out[key] = (b.spent.amount if b.spent else 0, b.reserved.amount if b.reserved else 0)
    return out


def assert_settled(client: cycles.Client, spent: dict[str, int] | int = 0) -> None:
    """Nothing ACTIVE, nothing reserved anywhere, and exactly `spent` at each scope (0 where not listed).

    An int is the spend of tenant:acme (and of every other scope listed by the ledger must then be 0)."""
    if isinstance(spent, int):
        spent = {"tenant:acme": spent}
    assert client.reservations(status="ACTIVE") == []
    got = ledger(client)
    assert set(spent) <= set(got), f"unknown scopes {set(spent) - set(got)}"
    assert got == {scope: (spent.get(scope, 0), 0) for scope in got}


def reservations(client: cycles.Client) -> list:
    """Every reservation of the tenant, oldest first."""
    return sorted(client.reservations(), key=lambda r: (r.created_at_ms, r.reservation_id))
