"""`cycles demo`: the runaway agent.

A support bot works a ticket in a loop, evaluate -> refine -> evaluate ..., and never converges: its evaluator always
finds one more thing to improve. Every step is a (simulated) model call costing exactly $0.01.

- Unguarded, nothing stops it but a timeout: it burns money at its call rate for as long as it is left running.
- Guarded by cycles, with $1.00 budgets at tenant, workspace, app, workflow and agent level, it is stopped at
  exactly 100 calls and $1.00 spent by a clean `cycles.BudgetExceeded`, and the ledger shows $1.00 spent at every
  level.

This module is a showcase, so the agent talks to cycles only through the public API: `cycles.Client`,
`cycles.guard`, `cycles.scope`, `cycles.usd`. By default it runs on a throwaway embedded store, so every run starts
from the same state; given a store or a server, it resets the demo budgets first (budgets.set + RESET_SPENT).
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

import cycles

__all__ = ["DEMO_SCOPE", "COST_PER_CALL", "BUDGET", "SupportBot", "SimulatedModel", "Meter", "run_demo"]

DEMO_TENANT = "demo"
DEMO_SCOPE = "tenant:demo/workspace:support/app:helpdesk/workflow:ticket-triage/agent:support-bot"
COST_PER_CALL = cycles.usd("0.01")
BUDGET = cycles.usd("1.00")
ACTION = ("llm.completion", "demo-model")
AGENT_PERMISSIONS = (  # what the demo agent's key may do on a server: spend and read, nothing else
    "reservations:create", "reservations:commit", "reservations:release", "reservations:extend",
    "reservations:list", "balances:read",
)  # fmt: skip
SAFETY_MAX_CALLS = 100_000  # the guarded loop must never run away, whatever the store holds
TICKET = "Customer #4821: I was charged twice for my March invoice. Please refund the duplicate."


def level_scopes(scope: str = DEMO_SCOPE) -> dict[str, str]:
    """{"tenant": "tenant:demo", "workspace": "tenant:demo/workspace:support", ...}: one budget per level."""
    parts = scope.split("/")
    return {part.partition(":")[0]: "/".join(parts[: i + 1]) for i, part in enumerate(parts)}


def usd_text(microcents: float) -> str:
    """Dollars to the cent: projections and rates are estimates, not ledger figures."""
    cents = int(round(microcents / (cycles.MICROCENTS_PER_USD // 100)))
    return cycles.format_amount("USD_MICROCENTS", cents * (cycles.MICROCENTS_PER_USD // 100))


# --------------------------------------------------------------------------------------------------- the agent


class OutOfTime(Exception):
    """The operator pulled the plug on the unguarded agent (the only thing that stops it)."""


class SimulatedModel:
    """Stands in for the LLM provider: canned answers, paced like an API at `calls_per_second` (0 = flat out)."""

    def __init__(self, calls_per_second: float, deadline: float | None = None) -> None:
        self.interval = 1.0 / calls_per_second if calls_per_second > 0 else 0.0
        self.deadline = deadline
        self._next = time.monotonic()

    def __call__(self, step: str, ticket: str, draft: str) -> str:
        now = time.monotonic()
        if self.deadline is not None and now >= self.deadline:
            raise OutOfTime()
        if self.interval:
            if self._next > now:
                time.sleep(self._next - now)
            self._next = max(self._next, now) + self.interval
        if step == "evaluate":
            return "NEEDS_WORK: good, but the tone could be warmer and the refund timeline more precise."
        return f"{draft or 'Hello, thanks for reaching out.'} (refined)"


class SupportBot:
    """evaluate -> refine -> evaluate ... until the evaluator approves the draft, which it never does."""

    def __init__(self, llm: Callable[[str, str, str], str], on_call: Callable[[], None] | None = None) -> None:
        self.llm = llm
        self.on_call = on_call or (lambda: None)

    def solve(self, ticket: str) -> str:
        draft = ""
        for step in itertools.cycle(("evaluate", "refine")):
            reply = self.llm(step, ticket, draft)
            self.on_call()
            if step == "evaluate" and reply.startswith("APPROVED"):
                return draft
            if step == "refine":
                draft = reply[:200]
        raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------------ measurement


@dataclass
class Meter:
    """What one run did, live: calls, spend, how fast, why it stopped."""

    label: str
    calls: int = 0
    spent: int = 0  # USD_MICROCENTS
    started: float | None = None
    ended: float | None = None
    stopped_by: str | None = None
    message: str | None = None
    cap: int | None = None  # the most this run can ever spend (its budget), if any
    extra: dict[str, Any] = field(default_factory=dict)

    def start(self) -> None:
        self.started = time.monotonic()

    def count(self) -> None:
        self.calls += 1
        self.spent += COST_PER_CALL.amount

    def stop(self, stopped_by: str, message: str) -> None:
        self.ended = time.monotonic()
        self.stopped_by, self.message = stopped_by, message

    @property
    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.ended or time.monotonic()) - self.started

    @property
    def rate(self) -> float | None:
        """USD_MICROCENTS per second while it ran."""
        return self.spent / self.elapsed if self.calls and self.elapsed > 0 else None

    def projected(self, seconds: float) -> float | None:
        """Cost of leaving it running for `seconds`: its burn rate, or its budget if it has one."""
        if self.rate is None:
            return None if self.cap is None else float(self.cap)
        burn = self.rate * seconds
        return min(burn, self.cap) if self.cap is not None else burn

    def summary(self) -> dict[str, Any]:
        hour, day = self.projected(3600), self.projected(86400)
        return {
            "calls": self.calls,
            "spent_usd_microcents": self.spent,
            "stopped_by": self.stopped_by,
            "message": self.message,
            "seconds": round(self.elapsed, 3),
            "projected_per_hour_usd_microcents": None if hour is None else int(hour),
            "projected_per_day_usd_microcents": None if day is None else int(day),
            **self.extra,
        }


def render(unguarded: Meter | None, guarded: Meter | None) -> Panel:
    """The side-by-side board: calls, spend, burn rate, projected cost per hour and per day."""
    meters = [m for m in (unguarded, guarded) if m is not None]
    table = Table(show_header=True, expand=False, box=None, padding=(0, 1))
    table.add_column("")
    for m in meters:
        table.add_column(m.label, justify="right", style="red" if m is unguarded else "green")

    def row(name: str, cell: Callable[[Meter], Any]) -> None:
        table.add_row(name, *(cell(m) if m.started is not None else Text("waiting", style="dim") for m in meters))

    def money_or_dash(value: float | None, capped: bool) -> str:
        if value is None:
            return "-"
        return f"{usd_text(value)} (capped)" if capped else usd_text(value)

    row("model calls", lambda m: f"{m.calls:,}")
    row("spent", lambda m: usd_text(m.spent))
    row("burn rate", lambda m: "-" if m.rate is None else f"{usd_text(m.rate)}/s")
    row("projected per hour", lambda m: money_or_dash(m.projected(3600), m.cap is not None))
    row("projected per day", lambda m: money_or_dash(m.projected(86400), m.cap is not None))
    if guarded is not None and guarded.cap:
        table.add_row(
            "budget used",
            *(
                ProgressBar(total=guarded.cap, completed=min(guarded.spent, guarded.cap), width=24)
                if m is guarded
                else ""
                for m in meters
            ),
        )

    def status(m: Meter) -> Text:
        if m.stopped_by is None:
            return Text("running", style="yellow")
        return Text(f"stopped: {m.stopped_by}", style="bold")

    row("time", lambda m: f"{m.elapsed:.1f}s")
    row("status", status)
    return Panel(
        table, title="runaway agent: evaluate -> refine, forever, at $0.01 a call", title_align="left", expand=False
    )


# ------------------------------------------------------------------------------------------------------- runs


def run_unguarded(seconds: float, calls_per_second: float, meter: Meter) -> Meter:
    """No budget: the loop runs until the operator's timeout."""
    model = SimulatedModel(calls_per_second, deadline=time.monotonic() + seconds)
    meter.start()
    try:
        SupportBot(model, on_call=meter.count).solve(TICKET)
    except OutOfTime:
        meter.stop("TIMEOUT", f"killed by the operator after {seconds:g}s: nothing else would have stopped it")
    return meter


def prepare_budgets(client: cycles.Client) -> None:
    """$1.00 at each level of the demo scope, from a clean slate (so repeated runs give the same result)."""
    try:
        tenant = client.tenants.create(DEMO_TENANT, name="cycles runaway-agent demo")
    except cycles.DuplicateResource:
        tenant = client.tenants.get(DEMO_TENANT)
    if tenant.status == "SUSPENDED":
        client.tenants.activate(DEMO_TENANT)
    for scope in level_scopes().values():
        try:
            if client.budgets.get(scope).status == "FROZEN":
                client.budgets.unfreeze(scope)
        except cycles.NotFound:
            pass
        client.budgets.set(scope, BUDGET)
        client.budgets.fund(scope, BUDGET, operation="RESET_SPENT")  # allocated $1.00, spent $0.00


def run_guarded(client: cycles.Client, calls_per_second: float, meter: Meter) -> Meter:
    """The same agent with every model call guarded: reserve $0.01 before it, commit $0.01 after."""
    model = SimulatedModel(calls_per_second)

    @cycles.guard(estimate=COST_PER_CALL, actual=COST_PER_CALL, action=ACTION, client=client)
    def call_model(step: str, ticket: str, draft: str) -> str:
        return model(step, ticket, draft)

    def counted() -> None:
        meter.count()
        if meter.calls >= SAFETY_MAX_CALLS:
            raise OutOfTime()

    meter.cap = BUDGET.amount
    meter.start()
    with cycles.scope(DEMO_SCOPE):
        try:
            SupportBot(call_model, on_call=counted).solve(TICKET)  # never returns: only the budget ends it
        except cycles.BudgetDenied as exc:
            meter.stop(exc.code, exc.message)
            meter.extra.update(exception=type(exc).__name__, denied_scope=exc.scope)
        except OutOfTime:
            meter.stop("SAFETY_CAP", f"stopped by the demo's safety cap of {SAFETY_MAX_CALLS:,} calls")
    return meter


def level_balances(client: cycles.Client) -> dict[str, cycles.Balance]:
    """The ledger's balance at each level of the demo scope."""
    rows = client.balances(f"tenant:{DEMO_TENANT}")
    by_scope = {b.scope_path: b for b in rows if b.remaining.unit == "USD_MICROCENTS"}
    return {level: by_scope[scope] for level, scope in level_scopes().items() if scope in by_scope}


class Authority:
    """Where the demo's budgets live. Embedded: one client does everything. A Cycles server: the admin key (from
    CYCLES_ADMIN_API_KEY) sets up the budgets and mints a key for the demo tenant, which the agent then spends with;
    the key is revoked at the end."""

    def __init__(self, store: str | None, url: str | None, workdir: str, admin_api_key: str | None = None) -> None:
        self._minted: str | None = None
        # journal=False: each demo call commits at once, and the demo leaves nothing in the working directory
        self.url = url or os.environ.get("CYCLES_BASE_URL")
        if self.url:
            self.where = f"the Cycles server at {self.url}"
            self.admin = cycles.Client(self.url, admin_api_key=admin_api_key, tenant=DEMO_TENANT, journal=False)
            self.runtime: cycles.Client | None = None
        else:
            if store:
                self.where = f"the store {store}"
            else:
                store, self.where = f"sqlite:///{os.path.join(workdir, 'demo.db')}", "a fresh embedded store"
            self.admin = self.runtime = cycles.Client(store=store, tenant=DEMO_TENANT, journal=False)

    def prepare(self) -> cycles.Client:
        """Budgets from a clean slate; returns the client the agent spends through."""
        prepare_budgets(self.admin)
        if self.runtime is None:
            key = self.admin.keys.create(DEMO_TENANT, "cycles-demo", permissions=list(AGENT_PERMISSIONS))
            self._minted = key.key_id
            self.runtime = cycles.Client(self.url, api_key=key.key_secret, tenant=DEMO_TENANT, journal=False)
        return self.runtime

    def close(self) -> None:
        try:
            if self._minted is not None:
                self.admin.keys.revoke(self._minted, "cycles demo finished")
        finally:
            if self.runtime is not None and self.runtime is not self.admin:
                self.runtime.close()
            self.admin.close()


def run_demo(
    *,
    mode: str = "both",
    seconds: float | None = None,
    calls_per_second: float = 50.0,
    store: str | None = None,
    url: str | None = None,
    admin_api_key: str | None = None,
    console: Console | None = None,
    live: bool = True,
) -> dict[str, Any]:
    """Run the demo; returns the JSON summary. `mode`: "both" (unguarded burn, then guarded), "guarded",
    "unguarded". `console=None` prints nothing."""
    if seconds is None:
        seconds = 3.0 if mode == "unguarded" else 2.0
    unguarded = Meter("unguarded") if mode in ("both", "unguarded") else None
    guarded = Meter("guarded by cycles") if mode in ("both", "guarded") else None
    show_live = live and console is not None and console.is_terminal
    say = console.print if console is not None and not show_live else (lambda *a, **k: None)

    with tempfile.TemporaryDirectory(prefix="cycles-demo-") as workdir:
        authority = Authority(store, url, workdir, admin_api_key) if guarded is not None else None
        try:
            client = authority.prepare() if authority is not None else None
            live_view = (
                Live(get_renderable=lambda: render(unguarded, guarded), console=console, refresh_per_second=12)
                if show_live
                else None
            )
            if live_view is not None:
                live_view.start()
            try:
                if unguarded is not None:
                    say(f"unguarded: the support bot loops on its ticket for {seconds:g}s at $0.01 a call ...")
                    run_unguarded(seconds, calls_per_second, unguarded)
                if guarded is not None and client is not None and authority is not None:
                    say(f"guarded: the same bot, $1.00 budgets at each level of {DEMO_SCOPE}, on {authority.where} ...")
                    run_guarded(client, calls_per_second, guarded)
            finally:
                if live_view is not None:
                    live_view.stop()
            summary = _summary(mode, unguarded, guarded, client)
            if console is not None:
                _report(console, unguarded, guarded, client, show_live)
            return summary
        finally:
            if authority is not None:
                authority.close()


def _summary(mode: str, unguarded: Meter | None, guarded: Meter | None, client: cycles.Client | None) -> dict[str, Any]:
    head: dict[str, Any] = {
        "mode": mode,
        "scope": DEMO_SCOPE,
        "cost_per_call_usd_microcents": COST_PER_CALL.amount,
    }
    if guarded is None:
        assert unguarded is not None
        return {**head, **unguarded.summary(), "balances": {}}
    balances = level_balances(client) if client is not None else {}
    out = {
        **head,
        "budget_usd_microcents": BUDGET.amount,
        **guarded.summary(),
        "balances": {level: b.model_dump(mode="json") for level, b in balances.items()},
    }
    if unguarded is not None:
        out["unguarded"] = unguarded.summary()
    return out


def _report(
    console: Console, unguarded: Meter | None, guarded: Meter | None, client: cycles.Client | None, shown: bool
) -> None:
    if not shown:
        console.print(render(unguarded, guarded))
    if unguarded is not None and unguarded.rate is not None:
        hour, day = usd_text(unguarded.projected(3600) or 0), usd_text(unguarded.projected(86400) or 0)
        console.print(
            f"[red]unguarded[/]: {unguarded.calls:,} calls and {usd_text(unguarded.spent)} in "
            f"{unguarded.elapsed:.1f}s, and still going: left alone it costs {hour} an hour, {day} a day."
        )
    if guarded is not None:
        head = f"[green]guarded[/]: {guarded.calls:,} calls and {usd_text(guarded.spent)}"
        if "exception" in guarded.extra:
            refused = f"cycles.{guarded.extra['exception']}"
            head += f", then call {guarded.calls + 1} was refused before it ran, with {refused}:"
        console.print(head)
        console.print(f"  [bold]{escape(guarded.message or '')}[/]")
        if client is not None:
            from .cli import balance_table

            balances = list(level_balances(client).values())
            console.print(balance_table(balances, title="the ledger, every level of the demo scope"))
