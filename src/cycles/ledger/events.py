"""Events of state transitions (an outbox), their webhook fan-out, and the audit log, written by the rules.

The rules call `emit(tx, now, ...)` inside the transaction of the change that caused the event, so an event exists
exactly when its change does: never dropped when the server is busy, never sent for a change that rolled back. The
write is one INSERT (and one per matching webhook subscription), so it never blocks the operation; delivery happens
later, from the outbox, by the webhook worker (cycles.server.webhooks).

Who caused a change comes from `current_actor`, a ContextVar the HTTP layer sets for the request (admin key or
tenant key, source IP, request and trace ids); the embedded ledger leaves it empty.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from ..errors import Forbidden, InvalidRequest, NotFound
from . import rules  # a module reference: rules imports this module too
from .store import AuditFilter, AuditRecord, DeliveryRecord, EventFilter, OutboxEvent, Transaction, WebhookRecord

if TYPE_CHECKING:
    from .rules import Ledger

SYSTEM_TENANT = "__system__"
ADMIN_TENANT = "__admin__"
# what a subscription owned by a concrete tenant may select (the spec's TENANT-ACCESSIBLE BOUNDARY)
TENANT_CATEGORIES = ("budget", "reservation", "tenant")


@dataclass(frozen=True, slots=True)
class Actor:
    """Who is acting: `type` is the spec's actor type (admin, api_key, system, ...)."""

    type: str
    key_id: str | None = None
    source_ip: str | None = None
    user_agent: str | None = None
    request_id: str | None = None
    trace_id: str | None = None

    def body(self) -> dict[str, Any]:
        return {k: v for k, v in (("type", self.type), ("key_id", self.key_id), ("source_ip", self.source_ip)) if v}


SYSTEM = Actor("system")
current_actor: ContextVar[Actor | None] = ContextVar("cycles_actor", default=None)


def emit(
    tx: Transaction,
    now: int,
    event_type: str,
    tenant_id: str,
    data: dict[str, Any],
    *,
    scope: str | None = None,
    actor: Actor | None = None,
    source: str = "cycles-server",
    correlation_id: str | None = None,
) -> OutboxEvent:
    """Add an event to the outbox and queue one delivery per ACTIVE subscription that selects it."""
    who = actor or current_actor.get()
    event = OutboxEvent(
        event_id=rules.new_id("evt_"),
        event_type=event_type,
        tenant_id=tenant_id,
        created_at_ms=now,
        scope=scope,
        data=data,
        actor=who.body() if who is not None else None,
        source=source,
        correlation_id=correlation_id,
        request_id=who.request_id if who is not None else None,
        trace_id=who.trace_id if who is not None else None,
    )
    tx.add_event(event)
    for sub in tx.webhooks_for(tenant_id):
        if selects(sub, event):
            queue_delivery(tx, sub, event, now)
    return event


def queue_delivery(tx: Transaction, sub: WebhookRecord, event: OutboxEvent, now: int) -> DeliveryRecord:
    d = DeliveryRecord(
        delivery_id=rules.new_id("del_"),
        subscription_id=sub.subscription_id,
        event_id=event.event_id,
        event_type=event.event_type,
        created_at_ms=now,
        next_attempt_at_ms=now,
    )
    tx.put_delivery(d)
    return d


def selects(sub: WebhookRecord, event: OutboxEvent) -> bool:
    """Types and categories are additive; a scope filter (a glob, or a prefix) must match the event's scope."""
    if event.event_type not in sub.event_types and event.category not in sub.event_categories:
        return False
    if sub.scope_filter:
        scope = event.scope or ""
        pattern = sub.scope_filter
        return fnmatchcase(scope, pattern) or scope == pattern or scope.startswith(pattern.rstrip("/") + "/")
    return True


def event_body(e: OutboxEvent) -> dict[str, Any]:
    """The spec's Event as plain data (no None values)."""
    body: dict[str, Any] = {
        "event_id": e.event_id,
        "event_type": e.event_type,
        "category": e.category,
        "timestamp": rules.iso(e.created_at_ms),
        "tenant_id": e.tenant_id,
        "source": e.source,
        "data": e.data,
    }
    for name in ("scope", "actor", "correlation_id", "request_id", "trace_id"):
        if (value := getattr(e, name)) is not None:
            body[name] = value
    return body


def audit(
    tx: Transaction,
    now: int,
    operation: str,
    *,
    tenant_id: str | None,
    resource_type: str,
    resource_id: str | None,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    status: int = 200,
    error_code: str | None = None,
    actor: Actor | None = None,
) -> AuditRecord:
    """One audit log entry, in the transaction of the action it records (failed actions: in their own)."""
    who = actor or current_actor.get()
    entry = AuditRecord(
        log_id=rules.new_id("log_"),
        tenant_id=tenant_id or ADMIN_TENANT,
        created_at_ms=now,
        operation=operation,
        status=status,
        resource_type=resource_type,
        resource_id=resource_id,
        key_id=who.key_id if who is not None else None,
        error_code=error_code,
        request_id=who.request_id if who is not None else None,
        trace_id=who.trace_id if who is not None else None,
        source_ip=who.source_ip if who is not None else None,
        user_agent=who.user_agent if who is not None else None,
        before=before,
        after=after,
    )
    tx.add_audit(entry)
    return entry


def audit_body(a: AuditRecord) -> dict[str, Any]:
    """The spec's AuditLogEntry; `before` / `after` and the actor type go in its metadata."""
    body: dict[str, Any] = {
        "log_id": a.log_id,
        "timestamp": rules.iso(a.created_at_ms),
        "tenant_id": a.tenant_id,
        "operation": a.operation,
        "status": a.status,
    }
    for name in ("key_id", "user_agent", "source_ip", "resource_type", "resource_id", "error_code", "request_id",
                 "trace_id"):  # fmt: skip
        if (value := getattr(a, name)) is not None:
            body[name] = value
    body["metadata"] = {"before": a.before, "after": a.after}
    return body


# ------------------------------------------------------------------------------------------------------ listings
CATEGORIES = ("budget", "tenant", "api_key", "policy", "reservation", "system", "webhook")
_EVENT_SORTS = {"timestamp": "created_at_ms", "event_type": "event_type", "category": "category", "scope": "scope",
                "tenant_id": "tenant_id"}  # fmt: skip


def _page_params(query: Mapping[str, str], high: int) -> tuple[bool, int]:
    direction = query.get("sort_dir") or "desc"
    if direction not in ("asc", "desc"):
        raise InvalidRequest(f"sort_dir must be asc or desc, got {direction!r}")
    text = query.get("limit") or "50"
    if not text.isdigit() or not 1 <= int(text) <= high:
        raise InvalidRequest(f"limit must be an integer between 1 and {high}")
    return direction == "desc", int(text)


def _window(query: Mapping[str, str]) -> tuple[int | None, int | None]:
    low, high = rules.parse_time_ms(query.get("from"), "from"), rules.parse_time_ms(query.get("to"), "to")
    if low is not None and high is not None and low > high:
        raise InvalidRequest("from is after to")
    return low, high


def list_events(ledger: Ledger, query: Mapping[str, str], *, tenant: str | None = None) -> dict[str, Any]:
    """GET /v1/admin/events (tenant=None) or /v1/events (a tenant's own): the EventListResponse, newest first by
    default, a cursor per page."""
    if tenant is not None and query.get("tenant_id") not in (None, "", tenant):
        raise Forbidden(f"tenant_id {query['tenant_id']!r} is not the authenticated tenant")
    category = query.get("category") or None
    if category is not None and category not in CATEGORIES:
        raise InvalidRequest(f"category must be one of {', '.join(CATEGORIES)}, got {category!r}")
    sort_by = query.get("sort_by") or "timestamp"
    if sort_by not in _EVENT_SORTS:
        raise InvalidRequest(f"sort_by must be one of {', '.join(_EVENT_SORTS)}, got {sort_by!r}")
    descending, limit = _page_params(query, 100)
    flt = EventFilter(
        tenant_id=tenant or query.get("tenant_id") or None,
        event_type=query.get("event_type") or None,
        category=category,
        scope=query.get("scope") or None,
        correlation_id=query.get("correlation_id") or None,
        request_id=query.get("request_id") or None,
        trace_id=query.get("trace_id") or None,
        created=_window(query),
    )
    query_hash = rules.canonical_json([_fields(flt), sort_by, descending])
    cursor = query.get("cursor")
    after = tuple(rules.decode_cursor(cursor, query_hash)) if cursor else None
    column = _EVENT_SORTS[sort_by]
    with ledger.store.transaction(readonly=True) as tx:
        rows = tx.list_events(flt, column, descending, after, limit + 1)  # type: ignore[arg-type]
    more = len(rows) > limit
    rows = rows[:limit]
    body: dict[str, Any] = {"events": [event_body(e) for e in rows], "has_more": more}
    if more:
        last = rows[-1]
        value = last.category if column == "category" else getattr(last, column)
        body["next_cursor"] = rules.encode_cursor([value, last.event_id], query_hash)
    return body


def get_event(ledger: Ledger, event_id: str, *, tenant: str | None = None) -> dict[str, Any]:
    with ledger.store.transaction(readonly=True) as tx:
        e = tx.get_event(event_id)
    if e is None or (tenant is not None and e.tenant_id != tenant):
        raise NotFound(f"event {event_id!r} not found", details={"event_id": event_id})
    return event_body(e)


def list_audit_logs(ledger: Ledger, query: Mapping[str, str]) -> dict[str, Any]:
    """GET /v1/admin/audit/logs: the AuditLogListResponse (list filters take comma-separated values)."""
    sort_by = query.get("sort_by") or "timestamp"
    if sort_by != "timestamp":
        raise InvalidRequest("this server sorts audit logs by timestamp only")
    descending, limit = _page_params(query, 200)

    def status(name: str) -> int | None:
        text = query.get(name)
        if not text:
            return None
        if not text.isdigit() or not 100 <= int(text) <= 599:
            raise InvalidRequest(f"{name} must be an HTTP status between 100 and 599")
        return int(text)

    exact = status("status")
    flt = AuditFilter(
        tenant_id=query.get("tenant_id") or None,
        key_id=query.get("key_id") or None,
        operations=[v for v in (query.get("operation") or "").split(",") if v],
        resource_types=[v for v in (query.get("resource_type") or "").split(",") if v],
        resource_id=query.get("resource_id") or None,
        status=(exact, exact) if exact is not None else (status("status_min"), status("status_max")),
        created=_window(query),
    )
    query_hash = rules.canonical_json([_fields(flt), descending])
    cursor = query.get("cursor")
    after = tuple(rules.decode_cursor(cursor, query_hash)) if cursor else None
    with ledger.store.transaction(readonly=True) as tx:
        rows = tx.list_audit(flt, descending, after, limit + 1)  # type: ignore[arg-type]
    more = len(rows) > limit
    rows = rows[:limit]
    body: dict[str, Any] = {"logs": [audit_body(a) for a in rows], "has_more": more}
    if more:
        body["next_cursor"] = rules.encode_cursor([rows[-1].created_at_ms, rows[-1].log_id], query_hash)
    return body


def _fields(record: Any) -> dict[str, Any]:
    return {name: getattr(record, name) for name in record.__slots__}
