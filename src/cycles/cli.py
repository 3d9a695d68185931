"""The `cycles` command: tenants, budgets, API keys, balances, reservations, the runaway-agent demo (and serve).

Every command goes through `cycles.Client`: the embedded ledger on --store (else CYCLES_STORE, else
sqlite:///.cycles/cycles.db), or a Cycles server on --url (else CYCLES_BASE_URL). Amounts are written like `10usd`,
`$2.50`, `5000tokens`, `10credits`. Tables are for people; `--json` prints the protocol's JSON for machines.

A failure is ONE line on stderr (`error: ...`) and a non-zero exit code: 2 for bad input or usage, 1 for anything
else the budget authority refused or could not do. Bad input is rejected before anything is written.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NoReturn

import typer
from pydantic import BaseModel, ValidationError
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

import cycles
from cycles.errors import error_for_code
from cycles.models import PERMISSIONS, Amount, Unit
from cycles.serve_cli import serve

__all__ = ["app", "main", "Globals", "balance_table", "parse_amount_arg", "parse_unit_arg"]

POLICIES = ("REJECT", "ALLOW_IF_AVAILABLE", "ALLOW_WITH_OVERDRAFT")
FUNDING_OPERATIONS = ("CREDIT", "DEBIT", "RESET", "RESET_SPENT", "REPAY_DEBT")
RESERVATION_STATUSES = ("ACTIVE", "COMMITTED", "RELEASED", "EXPIRED")
UNIT_NAMES = {
    "usd": Unit.USD_MICROCENTS,
    "$": Unit.USD_MICROCENTS,
    "microcents": Unit.USD_MICROCENTS,
    "usd_microcents": Unit.USD_MICROCENTS,
    "tokens": Unit.TOKENS,
    "token": Unit.TOKENS,
    "credits": Unit.CREDITS,
    "credit": Unit.CREDITS,
    "risk_points": Unit.RISK_POINTS,
    "riskpoints": Unit.RISK_POINTS,
    "risk-points": Unit.RISK_POINTS,
}


class BadInput(Exception):
    """Input the CLI itself refuses (exit 2), before it talks to the budget authority."""


# ------------------------------------------------------------------------------------------------------ plumbing


@dataclass
class Globals:
    """The global options, shared by every command (ctx.obj). `cycles serve` reads `store` from here too."""

    store: str | None = None  # --store; None = CYCLES_STORE, else the Client default
    url: str | None = None  # --url; None = CYCLES_BASE_URL (read by cycles.Client)
    api_key: str | None = None  # --api-key / CYCLES_ADMIN_API_KEY: the server's admin key (X-Admin-API-Key)
    tenant_key: str | None = None  # --tenant-key / CYCLES_API_KEY: a tenant key (X-Cycles-API-Key), runtime calls
    tenant: str | None = None  # --tenant / CYCLES_TENANT
    json: bool = False
    _client: cycles.Client | None = field(default=None, repr=False)

    @property
    def remote(self) -> bool:
        return bool(self.url or os.environ.get("CYCLES_BASE_URL"))

    def client(self) -> cycles.Client:
        if self._client is None:
            subject = {"tenant": self.tenant} if self.tenant else {}
            try:
                # journal=False: the CLI settles nothing of its own, and must not replay (or create) the commit
                # journal of an application that happens to share the working directory.
                self._client = cycles.Client(
                    self.url,
                    api_key=self.tenant_key,
                    admin_api_key=self.api_key,
                    store=None if self.url else self.store,
                    journal=False,
                    **subject,
                )
            except ImportError as exc:  # the HTTP transport is an optional part
                raise cycles.TransportError(f"cannot talk to a Cycles server: {exc}") from None
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _globals(ctx: typer.Context) -> Globals:
    obj = ctx.find_root().obj
    assert isinstance(obj, Globals)
    return obj


def _want_json(ctx: typer.Context, flag: bool) -> bool:
    return flag or _globals(ctx).json


def _console() -> Console:
    """Rich output for people. Not a terminal (a pipe, a test): wide, so tables are not squeezed to 80 columns."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console(highlight=False)
    return Console(width=200, highlight=False)


def _dump(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list | tuple):
        return [_dump(v) for v in value]
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    return value


def emit_json(value: Any) -> None:
    sys.stdout.write(json.dumps(_dump(value), indent=2) + "\n")
    sys.stdout.flush()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _validation_text(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg']}"
        for err in exc.errors(include_url=False, include_input=False, include_context=False)
    )


def describe_error(exc: BaseException) -> tuple[str, int]:
    """(one-line message, exit code) for an error a user can meet."""
    if isinstance(exc, cycles.CyclesError):
        message = exc.message
        if not isinstance(exc, cycles.InvalidRequest) and not message.startswith(exc.code):
            message = f"{exc.code}: {message}"
        return _one_line(message), 2 if exc.status == 400 else 1
    if isinstance(exc, ValidationError):
        return _one_line(_validation_text(exc)), 2
    if isinstance(exc, BadInput | ValueError):
        return _one_line(str(exc)), 2
    if isinstance(exc, sqlite3.Error):
        return _one_line(f"store error: {exc}"), 1
    return _one_line(f"{type(exc).__name__}: {exc}"), 1


def _fail(message: str, code: int) -> NoReturn:
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    raise typer.Exit(code)


class CyclesGroup(TyperGroup):
    """Every command runs inside this group's invoke: a failure a user can meet ends as one `error: ...` line on
    stderr and exit 2 (bad input) or 1, never a traceback. Usage errors stay typer's own (exit 2)."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (cycles.CyclesError, ValidationError, ValueError, BadInput, sqlite3.Error) as exc:
            _fail(*describe_error(exc))


# ------------------------------------------------------------------------------------------------ input parsing


def parse_amount_arg(text: str) -> Amount:
    """`10usd`, `$2.50`, `5000tokens`, `10credits` -> Amount; a one-line ValueError otherwise."""
    try:
        return cycles.parse_amount(text)
    except cycles.InvalidRequest as exc:  # e.g. beyond the int64 range
        problems = "; ".join(e["problem"] for e in (exc.details or {}).get("errors", [])) or str(exc)
        raise ValueError(f"cannot read amount {text!r}: {problems}") from None


def parse_unit_arg(text: str) -> str:
    key = text.strip().lower()
    if key in UNIT_NAMES:
        return UNIT_NAMES[key].value
    if text.strip().upper() in Unit.__members__:
        return text.strip().upper()
    raise BadInput(f"unknown unit {text!r}: use usd, tokens, credits or risk_points")


def _choice(text: str, allowed: Sequence[str], what: str) -> str:
    value = text.strip().upper().replace("-", "_")
    if value not in allowed:
        raise BadInput(f"unknown {what} {text!r}: use one of {', '.join(allowed)}")
    return value


def _check_scope(client: cycles.Client, scope: str) -> str:
    """The canonical scope path (a scope without a tenant is under the client's tenant); InvalidRequest if bad."""
    return client.scope_path(scope)


# ---------------------------------------------------------------------------------------------------- rendering


def money(value: Any) -> str:
    if value is None:
        return "-"
    return cycles.format_amount(value.unit, value.amount)


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def _tree_labels(paths: Iterable[str]) -> dict[str, str]:
    """Indent each scope under the nearest shown ancestor; show the part of the path below that ancestor."""
    shown = set(paths)
    labels: dict[str, str] = {}
    for path in shown:
        parts = path.split("/")
        ancestors = ["/".join(parts[:i]) for i in range(1, len(parts))]
        present = [a for a in ancestors if a in shown]
        if present:
            nearest = present[-1]
            labels[path] = " " * (len(present) - 1) + "└ " + path[len(nearest) + 1 :]
        else:
            labels[path] = path
    return labels


def balance_table(rows: Sequence[Any], *, title: str | None = None, status: bool = False) -> Table:
    """A tree-ish table of Balance (or BudgetLedger) rows: scope, allocated, spent, reserved, debt, remaining,
    over-limit (and status, for ledgers)."""
    rows = sorted(rows, key=lambda b: ((b.scope_path or b.scope), b.unit if hasattr(b, "unit") else b.remaining.unit))
    labels = _tree_labels({r.scope_path or r.scope for r in rows})
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0))
    table.add_column("scope", overflow="fold", min_width=min(40, max((len(v) for v in labels.values()), default=5)))
    if status:  # right after the scope: the columns at the end are the ones a narrow terminal cuts
        table.add_column("status", no_wrap=True)
    for name in ("allocated", "spent", "reserved", "debt", "remaining"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("over", no_wrap=True)
    for b in rows:
        cells = [
            escape(labels[b.scope_path or b.scope]),
            *([b.status if b.status == "ACTIVE" else f"[yellow]{b.status}[/]"] if status else []),
            money(b.allocated),
            money(b.spent),
            money(b.reserved),
            money(b.debt),
            money(b.remaining) if b.remaining.amount >= 0 else f"[red]{money(b.remaining)}[/]",
            "[red]yes[/]" if b.is_over_limit else "",
        ]
        table.add_row(*cells)
    return table


def _tenant_table(tenants: Sequence[Any]) -> Table:
    table = Table()
    for name in ("tenant", "name", "status", "created"):
        table.add_column(name, overflow="fold")
    for t in tenants:
        status = t.status if t.status == "ACTIVE" else f"[yellow]{t.status}[/]"
        table.add_row(escape(t.tenant_id), escape(t.name), status, t.created_at)
    return table


def _key_table(keys: Sequence[Any]) -> Table:
    table = Table()
    for name in ("key id", "tenant", "name", "prefix", "status", "permissions", "expires"):
        table.add_column(name, overflow="fold")
    for k in keys:
        status = k.status if k.status == "ACTIVE" else f"[yellow]{k.status}[/]"
        perms = ", ".join(k.permissions or [])
        table.add_row(k.key_id, escape(k.tenant_id), escape(k.name or ""), k.key_prefix, status, perms, k.expires_at)
    return table


def _reservation_table(reservations: Sequence[Any]) -> Table:
    table = Table()
    for name in ("reservation", "status", "scope", "action", "reserved", "committed", "created", "expires"):
        table.add_column(name, overflow="fold", justify="right" if name in ("reserved", "committed") else "left")
    for r in reservations:
        table.add_row(
            r.reservation_id,
            r.status,
            escape(r.scope_path),
            escape(f"{r.action.kind}:{r.action.name}"),
            money(r.reserved),
            money(r.committed),
            _when(r.created_at_ms),
            _when(r.expires_at_ms),
        )
    return table


# ---------------------------------------------------------------------------------------------------- the app

app = typer.Typer(
    name="cycles",
    cls=CyclesGroup,
    help="Hard budgets for AI agents (Cycles protocol v0): tenants, budgets, keys, balances, reservations, demo.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
tenant_app = typer.Typer(help="Create, list, suspend, reactivate and close tenants.", no_args_is_help=True)
budget_app = typer.Typer(help="Create, fund, freeze and list budgets.", no_args_is_help=True)
key_app = typer.Typer(help="Create, revoke and list tenant API keys.", no_args_is_help=True)
app.add_typer(tenant_app, name="tenant")
app.add_typer(budget_app, name="budget")
app.add_typer(key_app, name="key")
webhook_app = typer.Typer(
    help="Webhook subscriptions: create, list, delete, and their deliveries.", no_args_is_help=True
)
app.add_typer(webhook_app, name="webhook")

JsonFlag = typer.Option(False, "--json", help="Print machine JSON to stdout instead of a table.")


@app.callback()
def _root(
    ctx: typer.Context,
    store: str | None = typer.Option(
        None,
        "--store",
        help="Embedded store URL (sqlite:///path.db). Default: CYCLES_STORE, else sqlite:///.cycles/cycles.db.",
    ),
    url: str | None = typer.Option(
        None, "--url", help="A Cycles server (http://host:port). Default: CYCLES_BASE_URL; unset = embedded store."
    ),
    api_key: str | None = typer.Option(
        None,
        "--api-key",
        envvar="CYCLES_ADMIN_API_KEY",
        show_envvar=True,
        help="Admin key of the --url server (admin commands: tenant, budget, key).",
    ),
    tenant_key: str | None = typer.Option(
        None,
        "--tenant-key",
        envvar="CYCLES_API_KEY",
        show_envvar=True,
        help="Tenant API key for the --url server (runtime reads: balances, reservations).",
    ),
    tenant: str | None = typer.Option(
        None, "--tenant", envvar="CYCLES_TENANT", show_envvar=True, help="Tenant for scopes written without one."
    ),
    json_out: bool = typer.Option(False, "--json", help="Machine JSON output for every command."),
) -> None:
    """Hard budgets for AI agents: reserve before every model or tool call, commit the real cost."""
    g = Globals(store=store, url=url, api_key=api_key, tenant_key=tenant_key, tenant=tenant, json=json_out)
    ctx.obj = g
    ctx.call_on_close(g.close)


# ------------------------------------------------------------------------------------------------------ tenants


@tenant_app.command("create")
def tenant_create(
    ctx: typer.Context,
    tenant_id: str = typer.Argument(..., metavar="ID", help="Lower-case letters, digits and '-', 3 to 64 long."),
    name: str | None = typer.Option(None, "--name", help="Display name (default: the id)."),
    json_out: bool = JsonFlag,
) -> None:
    """Create a tenant (creating the same tenant again is a no-op)."""
    t = _globals(ctx).client().tenants.create(tenant_id, name=name)
    if _want_json(ctx, json_out):
        return emit_json(t)
    _console().print(_tenant_table([t]))


@tenant_app.command("list")
def tenant_list(ctx: typer.Context, json_out: bool = JsonFlag) -> None:
    """List tenants."""
    tenants = _globals(ctx).client().tenants.list()
    if _want_json(ctx, json_out):
        return emit_json({"tenants": tenants})
    _console().print(_tenant_table(tenants) if tenants else "no tenants")


def _tenant_status(ctx: typer.Context, tenant_id: str, action: str, json_out: bool) -> None:
    tenants = _globals(ctx).client().tenants
    t = getattr(tenants, action)(tenant_id)
    if _want_json(ctx, json_out):
        return emit_json(t)
    _console().print(_tenant_table([t]))


@tenant_app.command("suspend")
def tenant_suspend(
    ctx: typer.Context, tenant_id: str = typer.Argument(..., metavar="ID"), json_out: bool = JsonFlag
) -> None:
    """Suspend a tenant: no new reservations until it is activated again."""
    _tenant_status(ctx, tenant_id, "suspend", json_out)


@tenant_app.command("activate")
def tenant_activate(
    ctx: typer.Context, tenant_id: str = typer.Argument(..., metavar="ID"), json_out: bool = JsonFlag
) -> None:
    """Reactivate a suspended tenant."""
    _tenant_status(ctx, tenant_id, "activate", json_out)


@tenant_app.command("close")
def tenant_close(
    ctx: typer.Context,
    tenant_id: str = typer.Argument(..., metavar="ID"),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    json_out: bool = JsonFlag,
) -> None:
    """Close a tenant for good: its budgets close, its keys are revoked, its open reservations released."""
    if not yes:
        if not sys.stdin.isatty():
            raise BadInput(f"closing tenant {tenant_id!r} is irreversible: pass --yes to confirm")
        if not typer.confirm(f"Close tenant {tenant_id!r}? This cannot be undone", default=False):
            raise BadInput("not confirmed; nothing changed")
    _tenant_status(ctx, tenant_id, "close", json_out)


# ------------------------------------------------------------------------------------------------------ budgets


def _ledger_out(ctx: typer.Context, ledger: Any, json_out: bool) -> None:
    if _want_json(ctx, json_out):
        return emit_json(ledger)
    _console().print(balance_table([ledger], status=True))


@budget_app.command("set")
def budget_set(
    ctx: typer.Context,
    scope: str = typer.Argument(
        ..., metavar="SCOPE", help="tenant:acme/workspace:prod/agent:bot (no tenant: the --tenant one)."
    ),
    amount: str = typer.Argument(..., metavar="AMOUNT", help="Allocation: 10usd, $2.50, 5000tokens, 10credits."),
    overdraft: str | None = typer.Option(None, "--overdraft", help="Overdraft limit, in the same unit."),
    policy: str | None = typer.Option(
        None, "--policy", help="Commit overage policy: REJECT, ALLOW_IF_AVAILABLE or ALLOW_WITH_OVERDRAFT."
    ),
    json_out: bool = JsonFlag,
) -> None:
    """Create a budget, or set the allocation of an existing one (spent, reserved and debt are kept)."""
    client = _globals(ctx).client()
    value = parse_amount_arg(amount)
    limit = parse_amount_arg(overdraft) if overdraft is not None else None
    if limit is not None and limit.unit != value.unit:
        raise BadInput(f"--overdraft is in {limit.unit}, the amount in {value.unit}: use the same unit")
    policy_name = _choice(policy, POLICIES, "policy") if policy is not None else None
    path = _check_scope(client, scope)
    ledger = client.budgets.set(path, value, overdraft_limit=limit, commit_overage_policy=policy_name)
    _ledger_out(ctx, ledger, json_out)


@budget_app.command("fund")
def budget_fund(
    ctx: typer.Context,
    scope: str = typer.Argument(..., metavar="SCOPE"),
    amount: str = typer.Argument(..., metavar="AMOUNT", help="10usd, $2.50, 5000tokens, 10credits."),
    op: str = typer.Option("CREDIT", "--op", help="CREDIT, DEBIT, RESET, RESET_SPENT or REPAY_DEBT."),
    spent: str | None = typer.Option(None, "--spent", help="With RESET_SPENT: the new spent figure (default 0)."),
    reason: str | None = typer.Option(None, "--reason", help="Recorded with the funding operation."),
    idempotency_key: str | None = typer.Option(None, "--idempotency-key", help="Make a retry of this call a no-op."),
    json_out: bool = JsonFlag,
) -> None:
    """Credit, debit, reset, reset spent or repay debt on a budget."""
    client = _globals(ctx).client()
    value = parse_amount_arg(amount)
    operation = _choice(op, FUNDING_OPERATIONS, "funding operation")
    spent_value = parse_amount_arg(spent) if spent is not None else None
    if spent_value is not None and operation != "RESET_SPENT":
        raise BadInput("--spent only goes with --op RESET_SPENT")
    if spent_value is not None and spent_value.unit != value.unit:
        raise BadInput(f"--spent is in {spent_value.unit}, the amount in {value.unit}: use the same unit")
    path = _check_scope(client, scope)
    result = client.budgets.fund(
        path, value, operation=operation, spent=spent_value, reason=reason, idempotency_key=idempotency_key
    )
    if _want_json(ctx, json_out):
        return emit_json(result)
    table = Table(title=f"{operation} {money(value)} at {escape(path)}", title_justify="left")
    for name in ("", "before", "after"):
        table.add_column(name, justify="right" if name else "left")
    table.add_row("allocated", money(result.previous_allocated), money(result.new_allocated))
    table.add_row("remaining", money(result.previous_remaining), money(result.new_remaining))
    if result.previous_spent is not None or result.new_spent is not None:
        table.add_row("spent", money(result.previous_spent), money(result.new_spent))
    if result.previous_debt is not None or result.new_debt is not None:
        table.add_row("debt", money(result.previous_debt), money(result.new_debt))
    _console().print(table)


def _freeze(ctx: typer.Context, scope: str, unit: str, action: str, json_out: bool) -> None:
    client = _globals(ctx).client()
    unit_name = parse_unit_arg(unit)
    path = _check_scope(client, scope)
    ledger = getattr(client.budgets, action)(path, unit_name)
    _ledger_out(ctx, ledger, json_out)


UnitOption = typer.Option("usd", "--unit", help="usd, tokens, credits or risk_points.")


@budget_app.command("freeze")
def budget_freeze(
    ctx: typer.Context,
    scope: str = typer.Argument(..., metavar="SCOPE"),
    unit: str = UnitOption,
    json_out: bool = JsonFlag,
) -> None:
    """Freeze a budget: reservations and funding are refused until it is unfrozen."""
    _freeze(ctx, scope, unit, "freeze", json_out)


@budget_app.command("unfreeze")
def budget_unfreeze(
    ctx: typer.Context,
    scope: str = typer.Argument(..., metavar="SCOPE"),
    unit: str = UnitOption,
    json_out: bool = JsonFlag,
) -> None:
    """Unfreeze a frozen budget."""
    _freeze(ctx, scope, unit, "unfreeze", json_out)


@budget_app.command("list")
def budget_list(
    ctx: typer.Context,
    tenant: str | None = typer.Option(None, "--tenant", help="Only this tenant's budgets (default: all)."),
    unit: str | None = typer.Option(None, "--unit", help="Only budgets in this unit."),
    json_out: bool = JsonFlag,
) -> None:
    """List budgets (ledgers) with their status."""
    g = _globals(ctx)
    unit_name = parse_unit_arg(unit) if unit is not None else None
    ledgers = g.client().budgets.list(tenant=tenant or g.tenant, unit=unit_name)
    if _want_json(ctx, json_out):
        return emit_json({"ledgers": ledgers})
    _console().print(balance_table(ledgers, status=True) if ledgers else "no budgets")


# ------------------------------------------------------------------------------------------------ runtime reads


def _known_tenants(client: cycles.Client) -> list[str] | None:
    """Tenants that have budgets (an admin listing); None when this client may not list them."""
    try:
        ledgers = client.budgets.list()
    except (cycles.Unauthorized, cycles.Forbidden, cycles.NotFound):
        return None
    return sorted({lg.tenant_id or lg.scope.split("/")[0].partition(":")[2] for lg in ledgers})


def _balances(client: cycles.Client, path: str, *, admin_fallback: bool) -> list[Any]:
    """Balances at a scope and below. The runtime read needs a tenant key; with only the admin key of a server, the
    admin listing of the same ledgers gives the same figures."""
    try:
        return client.balances(path)
    except cycles.Unauthorized as refused:
        if not admin_fallback:
            raise
        try:
            ledgers = client.budgets.list(tenant=path.split("/")[0].partition(":")[2])
        except (cycles.Unauthorized, cycles.Forbidden):
            raise refused from None
    below = [lg for lg in ledgers if lg.scope == path or lg.scope.startswith(path + "/")]
    return [cycles.Balance.model_validate(lg.model_dump()) for lg in below]


@app.command("balances")
def balances_cmd(
    ctx: typer.Context,
    scope: str | None = typer.Argument(
        None, metavar="SCOPE", help="Scope to show with everything below it (default: every tenant)."
    ),
    json_out: bool = JsonFlag,
) -> None:
    """Balances as a tree: allocated, spent, reserved, debt, remaining, over-limit."""
    g = _globals(ctx)
    client = g.client()
    admin = g.remote and not g.tenant_key  # only an admin key: read the ledgers through the admin API
    if scope is not None:
        rows = _balances(client, _check_scope(client, scope), admin_fallback=admin)
    elif g.tenant is not None:
        rows = _balances(client, f"tenant:{g.tenant}", admin_fallback=admin)
    else:
        tenants = _known_tenants(client)
        if tenants is None:
            rows = client.balances()
        else:
            rows = [b for t in tenants for b in _balances(client, f"tenant:{t}", admin_fallback=admin)]
    if _want_json(ctx, json_out):
        return emit_json({"balances": rows})
    _console().print(balance_table(rows) if rows else "no budgets")


@app.command("reservations")
def reservations_cmd(
    ctx: typer.Context,
    status: str | None = typer.Option(None, "--status", help="ACTIVE, COMMITTED, RELEASED or EXPIRED."),
    limit: int = typer.Option(50, "--limit", help="At most this many, newest first."),
    tenant: str | None = typer.Option(None, "--tenant", help="Only this tenant (default: all with budgets)."),
    json_out: bool = JsonFlag,
) -> None:
    """Reservations, newest first."""
    g = _globals(ctx)
    if limit < 1:
        raise BadInput(f"--limit must be at least 1, not {limit}")
    status_name = _choice(status, RESERVATION_STATUSES, "status") if status is not None else None
    client = g.client()
    tenant = tenant or g.tenant
    if tenant is not None:
        rows = client.reservations(limit=limit, status=status_name, tenant=tenant)
    else:
        tenants = _known_tenants(client)
        if tenants is None:
            rows = client.reservations(limit=limit, status=status_name)
        else:
            rows = [r for t in tenants for r in client.reservations(limit=limit, status=status_name, tenant=t)]
            rows = sorted(rows, key=lambda r: (r.created_at_ms, r.reservation_id), reverse=True)[:limit]
    if _want_json(ctx, json_out):
        return emit_json({"reservations": rows})
    _console().print(_reservation_table(rows) if rows else "no reservations")


# ---------------------------------------------------------------------------------------------------- api keys


@key_app.command("create")
def key_create(
    ctx: typer.Context,
    tenant_id: str = typer.Argument(..., metavar="TENANT"),
    name: str = typer.Argument(..., metavar="NAME"),
    permission: list[str] | None = typer.Option(
        None, "--permission", "-p", help="Grant this permission (repeat); default: the runtime set."
    ),
    json_out: bool = JsonFlag,
) -> None:
    """Create an API key for a tenant. The secret is printed once: store it now."""
    perms = None
    if permission:
        unknown = [p for p in permission if p not in PERMISSIONS]
        if unknown:
            raise BadInput(
                f"unknown permission {unknown[0]!r}: use e.g. reservations:create, balances:read, admin:read"
            )
        perms = list(dict.fromkeys(permission))
    created = _globals(ctx).client().keys.create(tenant_id, name, permissions=perms)
    warning = "warning: the key secret is shown only once and cannot be retrieved again; store it now\n"
    if _want_json(ctx, json_out):
        emit_json(created)
        sys.stderr.write(warning)
        return
    console = _console()
    console.print(
        f"created key [bold]{created.key_id}[/] for tenant {escape(created.tenant_id)} (expires {created.expires_at})"
    )
    console.print(f"permissions: {', '.join(created.permissions or [])}")
    sys.stdout.write(f"secret: {created.key_secret}\n")
    sys.stdout.flush()
    sys.stderr.write(warning)


@key_app.command("revoke")
def key_revoke(
    ctx: typer.Context,
    key_id: str = typer.Argument(..., metavar="KEY_ID"),
    reason: str | None = typer.Option(None, "--reason"),
    json_out: bool = JsonFlag,
) -> None:
    """Revoke an API key (permanent)."""
    key = _globals(ctx).client().keys.revoke(key_id, reason)
    if _want_json(ctx, json_out):
        return emit_json(key)
    _console().print(_key_table([key]))


@key_app.command("list")
def key_list(
    ctx: typer.Context,
    tenant_id: str | None = typer.Argument(None, metavar="TENANT"),
    json_out: bool = JsonFlag,
) -> None:
    """List API keys (of one tenant, or all). Secrets are never shown again."""
    g = _globals(ctx)
    keys = g.client().keys.list(tenant_id or g.tenant)
    if _want_json(ctx, json_out):
        return emit_json({"keys": keys})
    _console().print(_key_table(keys) if keys else "no keys")


# ----------------------------------------------------------------------------------------- webhooks and events


def _observe(ctx: typer.Context, method: str, path: str, local: Any, **request: Any) -> Any:
    """An observability call: over HTTP with the admin key on --url, else `local(ledger)` on the embedded store."""
    transport = _globals(ctx).client().transport
    ledger = getattr(transport, "ledger", None)
    if ledger is not None:
        return local(ledger)
    import httpx

    headers = {"X-Admin-API-Key": transport.admin_api_key or ""}
    try:
        response = httpx.request(method, transport.url + path, headers=headers, timeout=30, **request)
    except httpx.HTTPError as exc:
        raise cycles.TransportError(f"cannot reach {transport.url}: {exc}") from None
    if response.status_code >= 400:
        try:
            body = response.json()
        except ValueError:
            body = {}
        raise error_for_code(
            body.get("error", "INTERNAL_ERROR"), body.get("message", response.text[:200]),
            status=response.status_code, details=body.get("details"),
        )  # fmt: skip
    return response.json() if response.content else None


def _local_webhooks(ledger: Any) -> Any:
    from cycles.ledger.webhooks import Webhooks

    allow = os.environ.get("CYCLES_WEBHOOK_ALLOW_PRIVATE", "") in ("1", "true", "yes")
    return Webhooks(ledger, allow_private=allow)


def _webhook_table(subs: Sequence[dict[str, Any]]) -> Table:
    table = Table("subscription", "tenant", "status", "url", "events", "failures")
    for w in subs:
        selectors = ", ".join([*w["event_types"], *(c + ".*" for c in w.get("event_categories", []))])
        table.add_row(w["subscription_id"], w["tenant_id"], w["status"], escape(w["url"]), selectors,
                      str(w["consecutive_failures"]))  # fmt: skip
    return table


@webhook_app.command("create")
def webhook_create(
    ctx: typer.Context,
    url: str = typer.Argument(..., metavar="URL", help="The endpoint events are POSTed to."),
    event: list[str] = typer.Option([], "--event", "-e", help="An event type to send, e.g. budget.exhausted (repeat)."),
    category: list[str] = typer.Option([], "--category", "-c", help="Every event of a category (repeat)."),
    tenant_id: str | None = typer.Option(None, "--tenant-id", help="The owner; omitted: __system__ (all tenants)."),
    scope_filter: str | None = typer.Option(None, "--scope-filter", help="Only events at or below this scope."),
    json_out: bool = JsonFlag,
) -> None:
    """Subscribe URL to events. The signing secret is printed once: store it now."""
    if not event:
        raise BadInput("give at least one --event (e.g. --event reservation.denied --event budget.exhausted)")
    body: dict[str, Any] = {"url": url, "event_types": list(dict.fromkeys(event))}
    if category:
        body["event_categories"] = list(dict.fromkeys(category))
    if scope_filter:
        body["scope_filter"] = scope_filter
    owner = tenant_id or _globals(ctx).tenant
    created = _observe(
        ctx, "POST", "/v1/admin/webhooks", lambda ledger: _local_webhooks(ledger).create(body, tenant=None,
                                                                                      tenant_id=owner),
        params={"tenant_id": owner} if owner else None, json=body,
    )  # fmt: skip
    if _want_json(ctx, json_out):
        return emit_json(created)
    _console().print(_webhook_table([created["subscription"]]))
    sys.stdout.write(f"signing secret: {created['signing_secret']}\n")
    sys.stdout.flush()
    sys.stderr.write("warning: the signing secret is shown only once; receivers verify X-Cycles-Signature with it\n")


@webhook_app.command("list")
def webhook_list(
    ctx: typer.Context,
    tenant_id: str | None = typer.Option(None, "--tenant-id", help="Only this owner's subscriptions."),
    json_out: bool = JsonFlag,
) -> None:
    """List webhook subscriptions."""
    query = {"tenant_id": tenant_id, "limit": "100"} if tenant_id else {"limit": "100"}
    page = _observe(ctx, "GET", "/v1/admin/webhooks", lambda ledger: _local_webhooks(ledger).list(query, tenant=None),
                    params=query)  # fmt: skip
    if _want_json(ctx, json_out):
        return emit_json(page)
    subs = page["subscriptions"]
    _console().print(_webhook_table(subs) if subs else "no webhook subscriptions")


@webhook_app.command("delete")
def webhook_delete(ctx: typer.Context, subscription_id: str = typer.Argument(..., metavar="ID")) -> None:
    """Delete a subscription (its pending deliveries are dropped)."""
    _observe(ctx, "DELETE", f"/v1/admin/webhooks/{subscription_id}",
             lambda ledger: _local_webhooks(ledger).delete(subscription_id, tenant=None))  # fmt: skip
    _console().print(f"deleted {escape(subscription_id)}")


@webhook_app.command("deliveries")
def webhook_deliveries(
    ctx: typer.Context, subscription_id: str = typer.Argument(..., metavar="ID"), json_out: bool = JsonFlag
) -> None:
    """The latest deliveries of a subscription: status, attempts, last response."""
    path = f"/v1/admin/webhooks/{subscription_id}/deliveries"
    page = _observe(ctx, "GET", path, lambda ledger: _local_webhooks(ledger).deliveries(subscription_id, {},
                                                                                         tenant=None))  # fmt: skip
    if _want_json(ctx, json_out):
        return emit_json(page)
    table = Table("delivery", "event", "type", "status", "attempts", "response", "error")
    for d in page["deliveries"]:
        table.add_row(d["delivery_id"], d["event_id"], d.get("event_type", ""), d["status"], str(d.get("attempts", 0)),
                      str(d.get("response_status", "")), escape(d.get("error_message", "")))  # fmt: skip
    _console().print(table if page["deliveries"] else "no deliveries")


@app.command("events")
def events_cmd(
    ctx: typer.Context,
    event_type: str | None = typer.Option(None, "--type", help="Only this event type, e.g. reservation.denied."),
    tenant_id: str | None = typer.Option(None, "--tenant-id", help="Only this tenant's events."),
    limit: int = typer.Option(20, "--limit", min=1, max=100, help="How many, newest first."),
    json_out: bool = JsonFlag,
) -> None:
    """Recent events (state transitions the budget authority recorded), newest first."""
    from cycles.ledger.events import list_events

    query = {k: v for k, v in (("event_type", event_type), ("tenant_id", tenant_id), ("limit", str(limit))) if v}
    page = _observe(ctx, "GET", "/v1/admin/events", lambda ledger: list_events(ledger, query), params=query)
    if _want_json(ctx, json_out):
        return emit_json(page)
    table = Table("time", "event", "tenant", "scope", "detail")
    for e in page["events"]:
        data = e.get("data", {})
        detail = data.get("reason_code") or data.get("operation") or data.get("new_status") or ""
        table.add_row(e["timestamp"], e["event_type"], e["tenant_id"], escape(e.get("scope", "")), str(detail))
    _console().print(table if page["events"] else "no events")


# -------------------------------------------------------------------------------------------------------- demo


@app.command("demo")
def demo_cmd(
    ctx: typer.Context,
    unguarded: bool = typer.Option(False, "--unguarded", help="Only the unguarded agent, until --seconds run out."),
    guarded: bool = typer.Option(False, "--guarded", help="Only the guarded agent."),
    seconds: float | None = typer.Option(
        None,
        "--seconds",
        help="How long the unguarded agent burns (default 3 with --unguarded, 2 before the guarded run).",
    ),
    calls_per_second: float = typer.Option(
        50.0, "--calls-per-second", help="Pace of the simulated model (0 = flat out)."
    ),
    no_live: bool = typer.Option(False, "--no-live", help="Plain output, no live display."),
    json_out: bool = JsonFlag,
) -> None:
    """The runaway agent: a support bot that never converges, burning $0.01 a call, stopped at $1.00 by cycles."""
    from .demo import run_demo

    g = _globals(ctx)
    if unguarded and guarded:
        raise BadInput("--unguarded and --guarded exclude each other (leave both out to run both)")
    if seconds is not None and seconds < 0:
        raise BadInput(f"--seconds must not be negative, not {seconds}")
    if calls_per_second < 0:
        raise BadInput(f"--calls-per-second must not be negative, not {calls_per_second}")
    want_json = _want_json(ctx, json_out)
    summary = run_demo(
        mode="unguarded" if unguarded else "guarded" if guarded else "both",
        seconds=seconds,
        calls_per_second=calls_per_second,
        store=g.store,
        url=g.url,
        admin_api_key=g.api_key,
        console=None if want_json else _console(),
        live=not (no_live or want_json),
    )
    if want_json:
        emit_json(summary)


# ------------------------------------------------------------------------------------------------------- serve
app.command("serve")(serve)  # `cycles serve`: the HTTP server (serve_cli.py); `cycles --store X serve` works too


def main(argv: Sequence[str] | None = None) -> None:
    """The `cycles` entry point."""
    app(args=list(argv) if argv is not None else None, prog_name="cycles")


if __name__ == "__main__":
    main()
