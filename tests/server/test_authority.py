"""The `http_authority` fixture: the Ledger interface over HTTP, as the conformance suite will use it."""

from __future__ import annotations

import pytest

from cycles import errors

from .conftest import USD, usd
from .test_runtime import ACTION

SUBJECT = {"tenant": "acme", "agent": "bot"}


def test_ledger_interface_over_http(http_authority, clock):
    a = http_authority
    assert a.kind == "http"
    a.admin.create_budget({"scope": "tenant:acme", "unit": USD, "allocated": usd(1_000)})
    r = a.reserve({"idempotency_key": "r", "subject": SUBJECT, "action": ACTION, "estimate": usd(100),
                   "ttl_ms": 1_000, "grace_period_ms": 0}, tenant="acme")  # fmt: skip
    # tenant=None: the owner's key (commit/extend), the admin key (get/list/release)
    assert a.extend(r.reservation_id, {"idempotency_key": "x", "extend_by_ms": 1_000}).status == "ACTIVE"
    assert a.get_reservation(r.reservation_id).status == "ACTIVE"
    assert a.list_reservations({"tenant": "acme"}).reservations[0].reservation_id == r.reservation_id
    with pytest.raises(errors.InvalidRequest):
        a.list_reservations({})  # the admin view needs a tenant, as Ledger(tenant=None) without a default
    clock.advance(2_001)
    assert a.sweep() == 1
    assert a.list_reservations({"status": "EXPIRED"}, tenant="acme").reservations[0].status == "EXPIRED"
    e = a.event({"idempotency_key": "e", "subject": SUBJECT, "action": ACTION, "actual": usd(5)})  # tenant from subject
    assert e.charged.amount == 5
    decided = a.decide({"idempotency_key": "d", "subject": SUBJECT, "action": ACTION, "estimate": usd(1)})
    assert decided.decision == "ALLOW"
    assert a.balances({"tenant": "acme"}).balances[0].spent.amount == 5
    with pytest.raises(errors.InvalidRequest):
        a.reserve({"idempotency_key": "n", "subject": {"agent": "bot"}, "action": ACTION, "estimate": usd(1)})
    with pytest.raises(errors.InvalidRequest):
        a.reserve({"idempotency_key": "n", "subject": {"agent": "bot"}, "action": ACTION, "estimate": "bad"})


def test_explicit_tenant_after_implicit(http_authority):
    a = http_authority
    a.admin.create_budget({"scope": "tenant:acme", "unit": USD, "allocated": usd(1_000)})
    a.balances({"tenant": "acme"}, tenant="acme")  # makes tenant acme (and a key) implicitly
    tenant, created = a.admin.create_tenant({"tenant_id": "acme", "name": "Acme", "max_reservation_extensions": 1})
    assert created and tenant.name == "Acme" and tenant.max_reservation_extensions == 1
    assert a.admin.create_tenant({"tenant_id": "acme", "name": "Acme", "max_reservation_extensions": 1})[1] is False


def test_tenant_ids_the_tenant_api_refuses(http_authority):
    a = http_authority
    a.admin.create_budget({"scope": "tenant:T1", "unit": USD, "allocated": usd(10)})
    r = a.reserve({"idempotency_key": "r", "subject": {"tenant": "T1"}, "action": ACTION, "estimate": usd(3)},
                  tenant="T1")  # fmt: skip
    assert r.decision == "ALLOW" and a.get_reservation(r.reservation_id, tenant="T1").reserved.amount == 3


def test_tenant_scoped_admin_calls(http_authority):
    a = http_authority
    a.admin.create_budget({"scope": "tenant:acme", "unit": USD, "allocated": usd(10)}, tenant="acme")
    with pytest.raises(errors.Forbidden):
        a.admin.create_budget({"scope": "tenant:other", "unit": USD, "allocated": usd(10)}, tenant="acme")
    funded = a.admin.fund("tenant:acme", USD, {"operation": "CREDIT", "amount": usd(5)}, tenant="acme")
    assert funded.new_allocated.amount == 15
    assert a.admin.get_budget("tenant:acme", USD).allocated.amount == 15
