from .helpers import budgets, commit, ledger_state, reserve

SUBJECT = {"tenant": "acme", "workspace": "prod", "agent": "bot"}
SCOPES = ["tenant:acme", "tenant:acme/workspace:prod", "tenant:acme/workspace:prod/agent:bot"]


def test_reserve_commit_debits_every_level(authority):
    budgets(authority, {scope: 1_000 for scope in SCOPES})
    r = reserve(authority, SUBJECT, 300)
    assert r.decision == "ALLOW" and r.affected_scopes == SCOPES
    commit(authority, r.reservation_id, 120)
    for scope in SCOPES:
        assert ledger_state(authority, scope) == {
            "allocated": 1_000, "spent": 120, "reserved": 0, "debt": 0, "remaining": 880, "is_over_limit": False,
        }  # fmt: skip
