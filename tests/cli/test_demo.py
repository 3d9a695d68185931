"""`cycles demo` end to end: the runaway agent is stopped at exactly 100 calls and $1.00, at every budgeted level."""

from __future__ import annotations

from .conftest import Cli

USD = 100_000_000
CALL = 1_000_000  # $0.01 in USD_MICROCENTS
LEVELS = {
    "tenant": "tenant:demo",
    "workspace": "tenant:demo/workspace:support",
    "app": "tenant:demo/workspace:support/app:helpdesk",
    "workflow": "tenant:demo/workspace:support/app:helpdesk/workflow:ticket-triage",
    "agent": "tenant:demo/workspace:support/app:helpdesk/workflow:ticket-triage/agent:support-bot",
}


def assert_stopped_at_one_dollar(summary: dict) -> None:
    assert summary["calls"] == 100
    assert summary["spent_usd_microcents"] == 100_000_000
    assert summary["stopped_by"] == "BUDGET_EXCEEDED"
    assert summary["exception"] == "BudgetExceeded"
    assert summary["message"].startswith("BUDGET_EXCEEDED at tenant:demo")
    assert set(summary["balances"]) == set(LEVELS)
    for level, scope in LEVELS.items():
        b = summary["balances"][level]
        assert b["scope_path"] == scope
        assert b["allocated"]["amount"] == USD
        assert b["spent"]["amount"] == USD
        assert b["reserved"]["amount"] == 0
        assert b["remaining"]["amount"] == 0
        assert b["debt"]["amount"] == 0
        assert b["is_over_limit"] is False


def test_demo_json_default_run(cli: Cli) -> None:
    """The default run, as a user types it: the unguarded burn, then the guarded run, on a throwaway store."""
    summary = cli("demo", "--no-live", "--json", store=False).json()
    assert summary["mode"] == "both"
    assert_stopped_at_one_dollar(summary)
    unguarded = summary["unguarded"]
    assert unguarded["stopped_by"] == "TIMEOUT"
    assert unguarded["calls"] > 0
    assert unguarded["spent_usd_microcents"] == unguarded["calls"] * CALL
    assert not (cli.tmp / ".cycles").exists()  # the demo never touches the default store


def test_demo_on_a_store_is_repeatable_and_visible_in_the_ledger(cli: Cli) -> None:
    for _ in range(2):
        summary = cli.json("demo", "--guarded", "--no-live", "--calls-per-second", "0")
        assert summary["mode"] == "guarded" and "unguarded" not in summary
        assert_stopped_at_one_dollar(summary)

    balances = {b["scope_path"]: b for b in cli.json("balances", "tenant:demo")["balances"]}
    assert set(balances) == set(LEVELS.values())
    assert all(b["spent"]["amount"] == USD and b["remaining"]["amount"] == 0 for b in balances.values())

    reservations = cli.json("reservations", "--tenant", "demo", "--limit", "1000")["reservations"]
    assert len(reservations) == 200  # two runs of 100 calls; the refused 101st never held anything
    assert {r["status"] for r in reservations} == {"COMMITTED"}
    assert {r["committed"]["amount"] for r in reservations} == {CALL}
    assert {(r["action"]["kind"], r["action"]["name"]) for r in reservations} == {("llm.completion", "demo-model")}
    assert {r["scope_path"] for r in reservations} == {LEVELS["agent"]}


def test_demo_unguarded_only(cli: Cli) -> None:
    summary = cli.json("demo", "--unguarded", "--seconds", "0.3", "--no-live", store=False)
    assert summary["mode"] == "unguarded"
    assert summary["stopped_by"] == "TIMEOUT"
    assert summary["calls"] > 0 and summary["spent_usd_microcents"] == summary["calls"] * CALL
    assert summary["balances"] == {}


def test_demo_plain_output(cli: Cli) -> None:
    out = cli("demo", "--no-live", "--seconds", "0.2", "--calls-per-second", "0", store=False).out
    assert "BUDGET_EXCEEDED at tenant:demo: requested $0.01, remaining $0.00" in out
    assert "cycles.BudgetExceeded" in out
    assert "then call 101 was refused" in out
    assert "projected per hour" in out and "projected per day" in out
    assert "└ agent:support-bot" in out and "$1.00" in out


def test_demo_bad_options(cli: Cli) -> None:
    r = cli.run("demo", "--calls-per-second", "-1", store=False)
    assert r.code == 2 and "--calls-per-second" in r.error_line
    r = cli.run("demo", "--seconds", "-1", store=False)
    assert r.code == 2 and "--seconds" in r.error_line
