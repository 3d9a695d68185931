"""`cycles webhook ...` and `cycles events` as a user runs them: on the embedded store, and against a server."""

from __future__ import annotations

from ..cli.conftest import Cli, clean_env
from .conftest import ADMIN_KEY


def test_webhooks_and_events_on_the_embedded_store(tmp_path, receiver):
    cli = Cli(tmp_path)
    allow = clean_env(CYCLES_WEBHOOK_ALLOW_PRIVATE="1")
    cli("tenant", "create", "acme")
    created = cli("webhook", "create", receiver.url, "--tenant-id", "acme", "-e", "budget.exhausted", "--json",
                  env=allow).json()  # fmt: skip
    sid = created["subscription"]["subscription_id"]
    assert created["signing_secret"] and created["subscription"]["event_types"] == ["budget.exhausted"]
    listed = cli("webhook", "list", "--json").json()["subscriptions"]
    assert [w["subscription_id"] for w in listed] == [sid]
    table = cli("webhook", "list").out
    assert sid in table and "budget.exhausted" in table

    cli("budget", "set", "tenant:acme", "10usd")
    kinds = [e["event_type"] for e in cli("events", "--json").json()["events"]]
    assert "budget.created" in kinds and "tenant.created" in kinds
    only = cli("events", "--type", "tenant.created", "--json").json()["events"]
    assert [e["tenant_id"] for e in only] == ["acme"]
    assert "tenant.created" in cli("events").out

    refused = cli.run("webhook", "create", receiver.url, "-e", "budget.exhausted")  # loopback, not allowed
    assert refused.code == 2 and "non-public address" in refused.error_line
    assert cli.run("webhook", "create", receiver.url).code == 2  # no --event
    assert cli("webhook", "deliveries", sid, "--json").json() == {"deliveries": [], "has_more": False}
    cli("webhook", "delete", sid)
    assert cli("webhook", "list", "--json").json()["subscriptions"] == []


def test_webhooks_against_a_server(served, receiver, tmp_path):
    cli = Cli(tmp_path)
    remote = ("--url", served.url, "--api-key", ADMIN_KEY)
    cli(*remote, "tenant", "create", "acme", store=False)
    created = cli(*remote, "webhook", "create", receiver.url, "--tenant-id", "acme", "-e", "reservation.denied",
                  "--json", store=False).json()  # fmt: skip
    sid = created["subscription"]["subscription_id"]
    assert [w["subscription_id"] for w in cli(*remote, "webhook", "list", "--json", store=False).json()[
        "subscriptions"]] == [sid]  # fmt: skip
    events = cli(*remote, "events", "--tenant-id", "acme", "--json", store=False).json()["events"]
    assert [e["event_type"] for e in events] == ["tenant.created"]
    missing = cli.run(*remote, "webhook", "delete", "whsub_nope", store=False)
    assert missing.code == 1 and "NOT_FOUND" in missing.error_line
