"""Policies: caps for the scopes a pattern matches (ALLOW_WITH_CAPS), highest priority wins."""

import pytest

from cycles.errors import Forbidden, InvalidRequest

from .helpers import ACTION, amount, budgets, key, reserve

SUBJECT = {"tenant": "acme", "workspace": "prod", "agent": "bot"}


@pytest.fixture
def funded(authority):
    budgets(authority, {"tenant:acme": 10_000})
    return authority


def caps_of(response):
    return response.caps.model_dump(exclude_none=True) if response.caps else None


def test_no_policy_means_plain_allow(funded):
    r = reserve(funded, SUBJECT, 100)
    assert r.decision == "ALLOW" and r.caps is None


@pytest.mark.parametrize(
    ("pattern", "applies"),
    [
        ("tenant:acme", False),  # exactly that scope: the reservation is deeper
        ("tenant:acme/*", True),
        ("agent:*", True),
        ("*/agent:bot", True),
        ("agent:other", False),
        ("tenant:acme/workspace:prod/agent:bot", True),
    ],
)
def test_scope_patterns(funded, pattern, applies):
    funded.admin.create_policy({"name": "p", "scope_pattern": pattern, "tenant_id": "acme", "caps": {"max_tokens": 64}})
    r = reserve(funded, SUBJECT, 100)
    assert (r.decision, caps_of(r)) == (("ALLOW_WITH_CAPS", {"max_tokens": 64}) if applies else ("ALLOW", None))


def test_highest_priority_wins_and_disabled_policies_do_not_apply(funded):
    low = funded.admin.create_policy(
        {"name": "low", "scope_pattern": "agent:*", "tenant_id": "acme", "caps": {"tool_denylist": ["shell"]}}
    )
    high = funded.admin.create_policy(
        {"name": "high", "scope_pattern": "agent:bot", "tenant_id": "acme", "priority": 10,
         "caps": {"max_tokens": 128, "tool_allowlist": ["search"]}}
    )  # fmt: skip
    assert caps_of(reserve(funded, SUBJECT, 1)) == {"max_tokens": 128, "tool_allowlist": ["search"]}
    funded.admin.update_policy(high.policy_id, {"status": "DISABLED"})
    assert caps_of(reserve(funded, SUBJECT, 1)) == {"tool_denylist": ["shell"]}
    assert [p.name for p in funded.admin.list_policies(tenant_id="acme").policies] == ["high", "low"]
    assert low.status == "ACTIVE"


def test_caps_in_dry_run_and_decide(funded):
    funded.admin.create_policy(
        {"name": "p", "scope_pattern": "agent:*", "tenant_id": "acme", "caps": {"max_tokens": 5}}
    )
    dry = reserve(funded, SUBJECT, 100, dry_run=True)
    assert dry.decision == "ALLOW_WITH_CAPS" and dry.caps.max_tokens == 5 and dry.reservation_id is None
    decided = funded.decide(
        {"idempotency_key": key("d"), "subject": SUBJECT, "action": ACTION, "estimate": amount(100)}, tenant="acme"
    )
    assert decided.decision == "ALLOW_WITH_CAPS" and decided.caps.max_tokens == 5


def test_policy_overage_policy_and_ttl_override(funded):
    funded.admin.create_policy(
        {"name": "p", "scope_pattern": "tenant:acme/*", "tenant_id": "acme", "commit_overage_policy": "REJECT",
         "reservation_ttl_override": {"max_ttl_ms": 5_000}}
    )  # fmt: skip
    r = reserve(funded, SUBJECT, 100, ttl_ms=60_000)
    assert r.remaining_ttl_ms == 5_000  # capped by the policy
    from cycles.errors import BudgetExceeded

    from .helpers import commit

    with pytest.raises(BudgetExceeded):  # REJECT from the policy: no commit above the estimate
        commit(funded, r.reservation_id, 101)


def test_policy_admin_errors(funded):
    with pytest.raises(InvalidRequest):
        funded.admin.create_policy({"name": "p", "scope_pattern": "agent:*"})  # admin must name the tenant
    with pytest.raises(Forbidden):
        funded.admin.create_policy({"name": "p", "scope_pattern": "agent:*", "tenant_id": "other"}, tenant="acme")
    with pytest.raises(InvalidRequest):
        funded.admin.create_policy(
            {"name": "p", "scope_pattern": "agent:*", "tenant_id": "acme", "caps": {"max_tokens": -1}}
        )
