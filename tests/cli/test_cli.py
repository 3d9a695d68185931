"""The `cycles` command end to end: a real subprocess through the real entry point, a real SQLite file per test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import cycles

from .conftest import Cli, clean_env

USD = 100_000_000  # USD_MICROCENTS per dollar


def amount(body: dict, field: str) -> int:
    return body[field]["amount"]


def by_scope(balances: list[dict]) -> dict[str, dict]:
    return {b["scope_path"]: b for b in balances}


# ------------------------------------------------------------------------------------------------- entry point


def test_help_lists_every_command(cli: Cli) -> None:
    out = cli("--help").out
    for command in ("tenant", "budget", "key", "balances", "reservations", "demo"):
        assert command in out


def test_console_script_is_installed(cli: Cli) -> None:
    script = Path(sys.executable).parent / "cycles"
    if not script.exists():
        pytest.skip("console script not installed next to this interpreter")
    import subprocess

    proc = subprocess.run(
        [str(script), "--store", cli.store, "tenant", "list", "--json"],
        capture_output=True, text=True, cwd=cli.tmp, env=clean_env(), timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("{")


def test_store_from_environment(cli: Cli) -> None:
    env = clean_env(CYCLES_STORE=cli.store)
    cli("budget", "set", "tenant:envy", "3usd", store=False, env=env)
    # the same file, named on the command line this time
    assert amount(cli.json("balances", "tenant:envy")["balances"][0], "allocated") == 3 * USD


def test_default_store_is_in_the_working_directory(cli: Cli) -> None:
    cli("budget", "set", "tenant:local", "1usd", store=False)
    assert (cli.tmp / ".cycles" / "cycles.db").exists()
    assert not cli.db.exists()


def test_global_json_flag(cli: Cli) -> None:
    cli("tenant", "create", "acme")
    assert [t["tenant_id"] for t in cli("--json", "tenant", "list").json()["tenants"]] == ["acme"]


def test_unreachable_server_is_one_line_error(cli: Cli) -> None:
    r = cli.run("--url", "http://127.0.0.1:9", "balances", "tenant:acme", store=False)
    assert r.code == 1
    assert r.error_line.startswith("error:")


# ------------------------------------------------------------------------------------------------------ tenants


def test_tenant_create_list_and_lifecycle(cli: Cli) -> None:
    created = cli.json("tenant", "create", "acme", "--name", "Acme Inc")
    assert created["tenant_id"] == "acme" and created["name"] == "Acme Inc" and created["status"] == "ACTIVE"
    cli("tenant", "create", "globex")
    assert cli.json("tenant", "create", "acme", "--name", "Acme Inc")["status"] == "ACTIVE"  # same again: no-op

    tenants = {t["tenant_id"]: t for t in cli.json("tenant", "list")["tenants"]}
    assert set(tenants) == {"acme", "globex"} and tenants["globex"]["name"] == "globex"
    table = cli("tenant", "list").out
    assert "acme" in table and "Acme Inc" in table and "ACTIVE" in table

    assert cli.json("tenant", "suspend", "acme")["status"] == "SUSPENDED"
    assert cli.json("tenant", "activate", "acme")["status"] == "ACTIVE"

    refused = cli.run("tenant", "close", "acme")  # irreversible: needs --yes when not interactive
    assert refused.code == 2 and "--yes" in refused.error_line
    assert cli.json("tenant", "list")["tenants"][0]["status"] == "ACTIVE"
    assert cli.json("tenant", "close", "acme", "--yes")["status"] == "CLOSED"

    r = cli.run("tenant", "suspend", "nobody")
    assert r.code == 1 and "NOT_FOUND" in r.error_line


# ------------------------------------------------------------------------------------------------------ budgets


def test_budget_set_fund_and_list(cli: Cli) -> None:
    root = cli.json("budget", "set", "tenant:acme", "10usd")
    assert root["scope"] == "tenant:acme" and amount(root, "allocated") == 10 * USD and root["status"] == "ACTIVE"

    ws = cli.json(
        "budget", "set", "tenant:acme/workspace:prod", "$2.50",
        "--overdraft", "1usd", "--policy", "allow_with_overdraft",
    )  # fmt: skip
    assert amount(ws, "allocated") == 250_000_000
    assert amount(ws, "overdraft_limit") == 1 * USD
    assert ws["commit_overage_policy"] == "ALLOW_WITH_OVERDRAFT"
    tokens = cli.json("budget", "set", "tenant:acme/workspace:prod/agent:bot", "5000tokens")
    assert tokens["unit"] == "TOKENS" and amount(tokens, "allocated") == 5000

    # set again: a new allocation, the budget's settings kept
    again = cli.json("budget", "set", "tenant:acme/workspace:prod", "3usd")
    assert amount(again, "allocated") == 3 * USD and again["commit_overage_policy"] == "ALLOW_WITH_OVERDRAFT"

    credit = cli.json("budget", "fund", "tenant:acme", "5usd")
    assert credit["operation"] == "CREDIT"
    assert amount(credit, "previous_allocated") == 10 * USD and amount(credit, "new_allocated") == 15 * USD
    debit = cli.json("budget", "fund", "tenant:acme", "$0.50", "--op", "debit")
    assert amount(debit, "new_allocated") == 1_450_000_000
    reset = cli.json("budget", "fund", "tenant:acme", "20usd", "--op", "RESET_SPENT", "--reason", "new month")
    assert amount(reset, "new_allocated") == 20 * USD and amount(reset, "new_spent") == 0
    bot = cli.json("budget", "fund", "tenant:acme/workspace:prod/agent:bot", "1000tokens")
    assert amount(bot, "new_allocated") == 6000

    ledgers = cli.json("budget", "list")["ledgers"]
    assert [(lg["scope"], lg["unit"]) for lg in ledgers] == [
        ("tenant:acme", "USD_MICROCENTS"),
        ("tenant:acme/workspace:prod", "USD_MICROCENTS"),
        ("tenant:acme/workspace:prod/agent:bot", "TOKENS"),
    ]
    cli("budget", "set", "tenant:globex", "1usd")
    assert len(cli.json("budget", "list")["ledgers"]) == 4
    assert [lg["scope"] for lg in cli.json("budget", "list", "--tenant", "globex")["ledgers"]] == ["tenant:globex"]
    assert [lg["unit"] for lg in cli.json("budget", "list", "--unit", "tokens")["ledgers"]] == ["TOKENS"]

    table = cli("budget", "list").out
    for text in ("tenant:acme", "└ workspace:prod", "└ agent:bot", "$20.00", "6,000 tokens", "ACTIVE"):
        assert text in table
    assert "CREDIT" in cli("budget", "fund", "tenant:globex", "1usd").out


def test_scope_without_tenant_uses_the_tenant_option(cli: Cli) -> None:
    cli("--tenant", "acme", "budget", "set", "workspace:prod", "2usd")
    assert [lg["scope"] for lg in cli.json("budget", "list")["ledgers"]] == ["tenant:acme/workspace:prod"]
    env = clean_env(CYCLES_TENANT="acme")
    funded = cli("budget", "fund", "workspace:prod", "1usd", "--json", env=env).json()
    assert funded["new_allocated"]["amount"] == 3 * USD


def test_budget_freeze_and_unfreeze(cli: Cli) -> None:
    cli("budget", "set", "tenant:acme", "10usd")
    cli("budget", "set", "tenant:acme/agent:bot", "5000tokens")
    assert cli.json("budget", "freeze", "tenant:acme")["status"] == "FROZEN"
    assert cli.json("budget", "freeze", "tenant:acme/agent:bot", "--unit", "tokens")["status"] == "FROZEN"
    assert "FROZEN" in cli("budget", "list").out

    frozen = cli.run("budget", "fund", "tenant:acme", "1usd")
    assert frozen.code == 1 and "BUDGET_FROZEN" in frozen.error_line
    with cycles.Client(store=cli.store) as client:  # a frozen budget refuses spend
        with pytest.raises(cycles.BudgetFrozen):
            with client.reserve(cycles.usd(0.01), scope="tenant:acme"):
                pass

    assert cli.json("budget", "unfreeze", "tenant:acme", "--unit", "USD_MICROCENTS")["status"] == "ACTIVE"
    assert cli.json("budget", "unfreeze", "tenant:acme/agent:bot", "--unit", "TOKENS")["status"] == "ACTIVE"
    assert amount(cli.json("budget", "fund", "tenant:acme", "1usd"), "new_allocated") == 11 * USD

    missing = cli.run("budget", "freeze", "tenant:nobody")
    assert missing.code == 1 and "NOT_FOUND" in missing.error_line


# ------------------------------------------------------------------------------------------------ runtime reads


def test_balances_table_and_json(cli: Cli) -> None:
    cli("budget", "set", "tenant:acme", "10usd")
    cli("budget", "set", "tenant:acme/workspace:prod", "4usd")
    cli("budget", "set", "tenant:acme/workspace:prod/app:chat/agent:bot", "2usd")
    cli("budget", "set", "tenant:globex", "1usd")
    with cycles.Client(store=cli.store) as client:
        scope = "tenant:acme/workspace:prod/app:chat/agent:bot"
        with client.reserve(cycles.usd(0.5), action=("llm.completion", "m"), scope=scope) as r:
            r.commit(cycles.usd(0.25))

    every = by_scope(cli.json("balances")["balances"])  # no scope, no tenant: every tenant with budgets
    assert set(every) == {
        "tenant:acme", "tenant:acme/workspace:prod", "tenant:acme/workspace:prod/app:chat/agent:bot", "tenant:globex"
    }  # fmt: skip
    bot = every["tenant:acme/workspace:prod/app:chat/agent:bot"]
    assert amount(bot, "spent") == 25_000_000 and amount(bot, "remaining") == 175_000_000
    assert amount(every["tenant:acme"], "spent") == 25_000_000 and amount(every["tenant:acme"], "reserved") == 0
    assert bot["is_over_limit"] is False and amount(bot, "debt") == 0

    sub = by_scope(cli.json("balances", "tenant:acme/workspace:prod")["balances"])
    assert set(sub) == {"tenant:acme/workspace:prod", "tenant:acme/workspace:prod/app:chat/agent:bot"}
    assert set(by_scope(cli.json("--tenant", "globex", "balances")["balances"])) == {"tenant:globex"}

    table = cli("balances").out
    for text in ("scope", "allocated", "spent", "reserved", "debt", "remaining", "over"):
        assert text in table
    assert "tenant:acme" in table and "tenant:globex" in table
    assert "└ workspace:prod" in table and "└ app:chat/agent:bot" in table  # under its nearest budgeted ancestor
    assert "$0.25" in table and "$1.75" in table and "$9.75" in table

    assert cli("balances", "tenant:nobody").out.strip() == "no budgets"


def test_reservations(cli: Cli) -> None:
    cli("budget", "set", "tenant:acme", "10usd")
    with cycles.Client(store=cli.store) as client:
        for _ in range(3):
            with client.reserve(cycles.usd(0.1), action=("llm.completion", "gpt-test"), scope="tenant:acme/agent:bot"):
                pass
        held = client.reserve(cycles.usd(0.5), action=("tool.search", "web"), scope="tenant:acme/agent:bot").begin()
        held_id = held.id

    rows = cli.json("reservations")["reservations"]
    assert len(rows) == 4
    created = [r["created_at_ms"] for r in rows]
    assert created == sorted(created, reverse=True)  # newest first
    active = cli.json("reservations", "--status", "active")["reservations"]
    assert [r["reservation_id"] for r in active] == [held_id]
    assert active[0]["reserved"]["amount"] == 50_000_000
    assert len(cli.json("reservations", "--status", "COMMITTED")["reservations"]) == 3
    assert len(cli.json("reservations", "--limit", "2")["reservations"]) == 2
    assert len(cli.json("--tenant", "acme", "reservations")["reservations"]) == 4
    assert cli.json("reservations", "--tenant", "globex")["reservations"] == []

    assert amount(cli.json("balances", "tenant:acme")["balances"][0], "reserved") == 50_000_000
    table = cli("reservations").out
    assert held_id in table and "ACTIVE" in table and "COMMITTED" in table
    assert "tool.search:web" in table and "llm.completion:gpt-test" in table and "$0.50" in table


# ----------------------------------------------------------------------------------------------------- api keys


def test_keys_create_list_revoke(cli: Cli) -> None:
    cli("tenant", "create", "acme")
    made = cli("key", "create", "acme", "ci-bot")
    secret_line = [line for line in made.out.splitlines() if line.startswith("secret: ")]
    assert len(secret_line) == 1 and secret_line[0].split()[1].startswith("cyc_live_")
    assert "shown only once" in made.err
    secret = secret_line[0].split()[1]

    scoped = cli(
        "key", "create", "acme", "reader", "-p", "balances:read", "--permission", "reservations:list", "--json"
    )
    body = scoped.json()
    assert body["key_secret"].startswith("cyc_live_") and body["tenant_id"] == "acme"
    assert body["permissions"] == ["balances:read", "reservations:list"]
    assert "shown only once" in scoped.err

    listing = cli("key", "list", "acme", "--json")
    keys = {k["key_id"]: k for k in listing.json()["keys"]}
    assert len(keys) == 2 and body["key_id"] in keys and keys[body["key_id"]]["name"] == "reader"
    assert secret not in listing.out and body["key_secret"] not in listing.out  # secrets are never shown again
    assert all(k["status"] == "ACTIVE" for k in keys.values())

    revoked = cli.json("key", "revoke", body["key_id"], "--reason", "rotated")
    assert revoked["status"] == "REVOKED" and revoked["revoked_reason"] == "rotated"
    statuses = {k["key_id"]: k["status"] for k in cli.json("key", "list")["keys"]}
    assert statuses[body["key_id"]] == "REVOKED" and list(statuses.values()).count("ACTIVE") == 1
    table = cli("key", "list").out
    assert "REVOKED" in table and "reader" in table and secret not in table

    unknown = cli.run("key", "create", "nobody", "x")
    assert unknown.code == 1 and "NOT_FOUND" in unknown.error_line
    bad = cli.run("key", "create", "acme", "x", "-p", "everything")
    assert bad.code == 2 and "everything" in bad.error_line
    missing = cli.run("key", "revoke", "key_nope")
    assert missing.code == 1 and "NOT_FOUND" in missing.error_line
    assert len(cli.json("key", "list", "acme")["keys"]) == 2


# -------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["budget", "set", "tenant:acme", "10 bananas"], 2, "cannot read amount '10 bananas'"),
        (["budget", "set", "tenant:acme", "ten usd"], 2, "cannot read amount"),
        (["budget", "set", "tenant:acme", "99999999999999999999usd"], 2, "cannot read amount"),
        (["budget", "set", "agent:x/tenant:y", "1usd"], 2, "agent:x/tenant:y"),
        (["budget", "set", "tenant:acme/agent:b@d", "1usd"], 2, "b@d"),
        (["budget", "set", "planet:mars", "1usd"], 2, "planet:mars"),
        (["budget", "set", "tenant:acme", "5usd", "--policy", "SOMETIMES"], 2, "SOMETIMES"),
        (["budget", "set", "tenant:acme", "5usd", "--overdraft", "100tokens"], 2, "--overdraft"),
        (["budget", "set", "tenant:acme", "5usd", "--overdraft", "lots"], 2, "cannot read amount 'lots'"),
        (["budget", "fund", "tenant:acme", "1usd", "--op", "STEAL"], 2, "STEAL"),
        (["budget", "fund", "tenant:acme", "1usd", "--spent", "1usd"], 2, "--spent"),
        (["budget", "fund", "tenant:acme", "5bananas"], 2, "cannot read amount"),
        (["budget", "fund", "tenant:acme", "100usd", "--op", "DEBIT"], 1, "BUDGET_EXCEEDED"),
        (["budget", "fund", "tenant:acme", "1usd", "--op", "REPAY_DEBT"], 2, "repay"),
        (["budget", "fund", "tenant:acme", "100tokens"], 1, "NOT_FOUND"),
        (["budget", "freeze", "tenant:acme", "--unit", "bananas"], 2, "unknown unit 'bananas'"),
        (["budget", "list", "--unit", "doubloons"], 2, "doubloons"),
        (["balances", "agent:x/tenant:y"], 2, "agent:x/tenant:y"),
        (["reservations", "--status", "LOST"], 2, "LOST"),
        (["reservations", "--limit", "0"], 2, "--limit"),
        (["tenant", "create", "A!"], 2, "tenant_id"),
        (["demo", "--guarded", "--unguarded"], 2, "--unguarded"),
    ],
)
def test_bad_input_fails_cleanly_and_changes_nothing(cli: Cli, args: list[str], code: int, says: str) -> None:
    with cycles.Client(store=cli.store) as client:  # setup in process: the command under test is the subprocess
        client.tenants.create("acme")
        client.budgets.set("tenant:acme", "10usd", commit_overage_policy="REJECT")
        client.budgets.set("tenant:acme/agent:bot", "2usd")
    before = (cli.json("balances"), cli.json("budget", "list"))

    r = cli.run(*args)
    assert r.code == code, r
    assert says in r.error_line
    assert r.out == ""

    assert (cli.json("balances"), cli.json("budget", "list")) == before
    with cycles.Client(store=cli.store) as client:
        assert [(t.tenant_id, t.status) for t in client.tenants.list()] == [("acme", "ACTIVE")]


def test_usage_errors_exit_2_without_traceback(cli: Cli) -> None:
    r = cli.run("budget", "set", "tenant:acme")  # missing AMOUNT
    assert r.code == 2 and "Traceback" not in r.err
    r = cli.run("no-such-command")
    assert r.code == 2 and "Traceback" not in r.err
    assert cli.json("budget", "list")["ledgers"] == []


def test_bad_store_url_is_one_line_error(cli: Cli) -> None:
    r = cli.run("--store", "postgres://nope", "balances", store=False)
    assert r.code == 2 and "postgres://nope" in r.error_line
