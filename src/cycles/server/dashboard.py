"""GET /dashboard: a small read-only page of `cycles serve`: every budget's balance, and the latest events.

Plain HTML rendered on the server (no script, no external asset), refreshed by the browser every 10 seconds. It
shows every tenant's figures, so it takes the admin key: the X-Admin-API-Key header, or HTTP Basic authentication
with the admin key as the password (any user name), which is what a browser asks for. Each amount cell carries its
integer in `data-amount`, for scripts and tests.
"""

from __future__ import annotations

import base64
import binascii
from html import escape
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from ..amounts import format_amount
from ..ledger import Ledger
from ..ledger.events import event_body, keeps_events
from ..ledger.store import BudgetRecord, EventFilter, OutboxEvent, retrying
from .auth import Authenticator

MAX_BUDGETS = 1000
RECENT_EVENTS = 25
_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 2em; }
th, td { padding: 4px 10px; border-bottom: 1px solid #ddd; text-align: left; }
td.amount { text-align: right; font-variant-numeric: tabular-nums; }
tr.over td, td.negative { color: #b00020; }
h1 small { color: #888; font-weight: normal; font-size: 60%; }
"""


class Dashboard:
    def __init__(self, ledger: Ledger, auth: Authenticator) -> None:
        self.ledger = ledger
        self.auth = auth

    def _allowed(self, request: Request) -> bool:
        header = request.headers.get("x-admin-api-key")
        if header:
            return self.auth.is_admin_key(header)
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            _user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return bool(password) and self.auth.is_admin_key(password)

    async def page(self, request: Request) -> Response:
        if not self._allowed(request):
            return Response("the admin key is required", status_code=401,
                            headers={"www-authenticate": 'Basic realm="cycles dashboard"'})  # fmt: skip
        budgets, recent, now = await run_in_threadpool(self._read)
        return HTMLResponse(render(budgets, recent, now))

    @retrying  # an optimistic store (Redis) may find what it read changed meanwhile: read again
    def _read(self) -> tuple[list[BudgetRecord], list[OutboxEvent], int]:
        with self.ledger.begin() as (tx, now):  # reads sweep first: no expired hold shows as reserved
            budgets = tx.list_budgets(limit=MAX_BUDGETS)
            recent = tx.list_events(EventFilter(), "created_at_ms", True, None, RECENT_EVENTS) if (
                keeps_events(tx)
            ) else []  # fmt: skip
        return list(budgets), recent, now


def _amount(unit: str, value: int) -> str:
    css = "amount negative" if value < 0 else "amount"
    return f'<td class="{css}" data-amount="{value}">{escape(format_amount(unit, value))}</td>'


def render(budgets: list[BudgetRecord], recent: list[OutboxEvent], now: int) -> str:
    from ..ledger.rules import iso

    rows = []
    for b in budgets:
        css = ' class="over"' if b.is_over_limit else ""
        rows.append(
            f'<tr{css} data-scope="{escape(b.scope)}" data-unit="{escape(b.unit)}"><td>{escape(b.scope)}</td>'
            f"<td>{escape(b.unit)}</td>{_amount(b.unit, b.allocated)}{_amount(b.unit, b.spent)}"
            f"{_amount(b.unit, b.reserved)}{_amount(b.unit, b.debt)}{_amount(b.unit, b.remaining)}"
            f"<td>{escape(b.status)}</td></tr>"
        )
    events = []
    for e in recent:
        body = event_body(e)
        events.append(
            f'<tr data-event-id="{escape(e.event_id)}"><td>{escape(body["timestamp"])}</td>'
            f"<td>{escape(e.event_type)}</td><td>{escape(e.tenant_id)}</td><td>{escape(e.scope or '')}</td>"
            f"<td>{escape(_detail(e.data))}</td></tr>"
        )
    more = f"<p>showing the first {MAX_BUDGETS} budgets</p>" if len(budgets) >= MAX_BUDGETS else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="10">'
        f"<title>cycles: balances</title><style>{_STYLE}</style></head><body>"
        f"<h1>cycles <small>as of {escape(iso(now) or '')}</small></h1>"
        '<h2>Balances</h2><table id="balances"><thead><tr><th>scope</th><th>unit</th><th>allocated</th>'
        "<th>spent</th><th>reserved</th><th>debt</th><th>remaining</th><th>status</th></tr></thead><tbody>"
        + ("".join(rows) or '<tr><td colspan="8">no budgets yet</td></tr>')
        + f"</tbody></table>{more}"
        '<h2>Recent events</h2><table id="events"><thead><tr><th>time</th><th>event</th><th>tenant</th>'
        "<th>scope</th><th>detail</th></tr></thead><tbody>"
        + ("".join(events) or '<tr><td colspan="5">no events yet</td></tr>')
        + "</tbody></table></body></html>"
    )


def _detail(data: dict[str, Any]) -> str:
    for name in ("reason_code", "operation", "new_status"):
        if data.get(name):
            return str(data[name])
    return ""
