"""The embedded store: SQLite, one BEGIN IMMEDIATE transaction per ledger operation.

BEGIN IMMEDIATE takes the write lock up front, so two processes on one file serialise instead of both reading a
balance and both spending it. WAL lets readers proceed meanwhile; synchronous=NORMAL keeps every committed operation
across a process crash (only a power cut can lose the last few). A writer that cannot get the lock within
`busy_timeout` seconds gets `StoreBusy`, never a hang.

The hot path reads almost nothing from disk: the store remembers the tenant, policy, budget and active reservation
records it has read or written (`_Known`), and trusts them while no other connection has written to the file
(`PRAGMA data_version`, checked once per transaction under the write lock). Anything else forgets them: another
connection's commit, a rollback, or an admin write through this connection.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic_core import from_json, to_json

from ..errors import InvalidRequest, StoreBusy
from .store import (
    ApiKeyRecord,
    AuditFilter,
    AuditRecord,
    BudgetRecord,
    DeliveryRecord,
    DuplicateKey,
    EventFilter,
    EventRecord,
    OutboxEvent,
    PolicyRecord,
    ReservationFilter,
    ReservationRecord,
    TenantRecord,
    WebhookRecord,
)

SCHEMA_VERSION = 1  # PRAGMA user_version: bump, and migrate, when the tables change
SCHEMA = """
CREATE TABLE IF NOT EXISTS budgets (
    scope TEXT NOT NULL, unit TEXT NOT NULL, tenant_id TEXT NOT NULL, ledger_id TEXT NOT NULL,
    allocated INTEGER NOT NULL, spent INTEGER NOT NULL, reserved INTEGER NOT NULL, debt INTEGER NOT NULL,
    overdraft_limit INTEGER NOT NULL, is_over_limit INTEGER NOT NULL, status TEXT NOT NULL,
    commit_overage_policy TEXT, rollover_policy TEXT NOT NULL, period_start TEXT, period_end TEXT, metadata TEXT,
    created_at_ms INTEGER NOT NULL, updated_at_ms INTEGER NOT NULL,
    PRIMARY KEY (scope, unit)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS budgets_tenant ON budgets (tenant_id, scope, unit);

CREATE TABLE IF NOT EXISTS reservations (
    reservation_id TEXT PRIMARY KEY, tenant TEXT NOT NULL,
    workspace TEXT, app TEXT, workflow TEXT, agent TEXT, toolset TEXT,
    idempotency_key TEXT NOT NULL, subject TEXT NOT NULL, action TEXT NOT NULL,
    unit TEXT NOT NULL, estimate INTEGER NOT NULL, scope_path TEXT NOT NULL,
    budgeted_scopes TEXT NOT NULL, status TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL, expires_at_ms INTEGER NOT NULL, grace_ms INTEGER NOT NULL,
    overage_policy TEXT NOT NULL, extensions INTEGER NOT NULL, committed INTEGER, finalized_at_ms INTEGER,
    metadata TEXT, committed_metadata TEXT, reserve_fingerprint TEXT NOT NULL, reserve_response TEXT NOT NULL,
    finalize_key TEXT, finalize_fingerprint TEXT, finalize_response TEXT
);
CREATE INDEX IF NOT EXISTS reservations_due ON reservations (expires_at_ms + grace_ms) WHERE status = 'ACTIVE';
CREATE INDEX IF NOT EXISTS reservations_tenant ON reservations (tenant, created_at_ms);
CREATE UNIQUE INDEX IF NOT EXISTS reservations_key ON reservations (tenant, idempotency_key);

CREATE TABLE IF NOT EXISTS idempotency (
    tenant TEXT NOT NULL, endpoint TEXT NOT NULL, key TEXT NOT NULL,
    fingerprint TEXT NOT NULL, response TEXT NOT NULL,
    PRIMARY KEY (tenant, endpoint, key)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS tenants (
    tenant_id TEXT PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL, parent_tenant_id TEXT,
    default_commit_overage_policy TEXT, default_reservation_ttl_ms INTEGER NOT NULL,
    max_reservation_ttl_ms INTEGER NOT NULL, max_reservation_extensions INTEGER NOT NULL,
    reservation_expiry_policy TEXT NOT NULL, metadata TEXT, created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL, suspended_at_ms INTEGER, closed_at_ms INTEGER
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS events (
    event_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, subject TEXT NOT NULL, action TEXT NOT NULL,
    unit TEXT NOT NULL, actual INTEGER NOT NULL, charged INTEGER NOT NULL, scope_path TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL, metadata TEXT, extra TEXT
);

CREATE TABLE IF NOT EXISTS policies (
    policy_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, name TEXT NOT NULL, scope_pattern TEXT NOT NULL,
    priority INTEGER NOT NULL, status TEXT NOT NULL, created_at_ms INTEGER NOT NULL, updated_at_ms INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS policies_tenant ON policies (tenant_id);

CREATE TABLE IF NOT EXISTS outbox (
    event_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, event_type TEXT NOT NULL, category TEXT NOT NULL,
    scope TEXT, created_at_ms INTEGER NOT NULL, correlation_id TEXT, request_id TEXT, trace_id TEXT,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_time ON outbox (created_at_ms, event_id);
CREATE INDEX IF NOT EXISTS outbox_tenant ON outbox (tenant_id, created_at_ms);

CREATE TABLE IF NOT EXISTS audit_log (
    log_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, key_id TEXT, operation TEXT NOT NULL, resource_type TEXT,
    resource_id TEXT, status INTEGER NOT NULL, created_at_ms INTEGER NOT NULL, body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_time ON audit_log (created_at_ms, log_id);

CREATE TABLE IF NOT EXISTS webhooks (
    subscription_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, status TEXT NOT NULL, body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS webhooks_tenant ON webhooks (tenant_id, status);

CREATE TABLE IF NOT EXISTS deliveries (
    delivery_id TEXT PRIMARY KEY, subscription_id TEXT NOT NULL, status TEXT NOT NULL,
    next_attempt_at_ms INTEGER NOT NULL, lease_until_ms INTEGER NOT NULL, created_at_ms INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (next_attempt_at_ms) WHERE status IN ('PENDING', 'RETRYING');
CREATE INDEX IF NOT EXISTS deliveries_subscription ON deliveries (subscription_id, created_at_ms);

CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, key_hash TEXT NOT NULL UNIQUE, key_prefix TEXT NOT NULL,
    name TEXT NOT NULL, permissions TEXT NOT NULL, created_at_ms INTEGER NOT NULL, expires_at_ms INTEGER NOT NULL,
    status TEXT NOT NULL, description TEXT, scope_filter TEXT, metadata TEXT, last_used_at_ms INTEGER,
    revoked_at_ms INTEGER, revoked_reason TEXT
);
"""

_BUDGET_COLS = (
    "scope, unit, tenant_id, ledger_id, allocated, spent, reserved, debt, overdraft_limit, is_over_limit, status, "
    "commit_overage_policy, rollover_policy, period_start, period_end, metadata, created_at_ms, updated_at_ms"
)
_RES_COLS = (
    "reservation_id, tenant, idempotency_key, subject, action, unit, estimate, scope_path, budgeted_scopes, status, "
    " created_at_ms, expires_at_ms, grace_ms, overage_policy, extensions, committed, "
    "finalized_at_ms, metadata, committed_metadata, reserve_fingerprint, reserve_response, finalize_key, "
    "finalize_fingerprint, finalize_response"
)
# a new reservation: its settlement columns (committed, finalize_*, ...) start NULL
_INSERT_RESERVATION = (
    "INSERT INTO reservations (reservation_id, tenant, idempotency_key, subject, action, unit, estimate, scope_path, "
    "budgeted_scopes, status, created_at_ms, expires_at_ms, grace_ms, overage_policy, extensions, metadata, "
    "reserve_fingerprint, reserve_response, workspace, app, workflow, agent, toolset) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SELECT_RESERVATION = f"SELECT {_RES_COLS} FROM reservations WHERE reservation_id = ?"
_TENANT_COLS = (
    "tenant_id, name, status, parent_tenant_id, default_commit_overage_policy, default_reservation_ttl_ms, "
    "max_reservation_ttl_ms, max_reservation_extensions, reservation_expiry_policy, metadata, created_at_ms, "
    "updated_at_ms, suspended_at_ms, closed_at_ms"
)
_KEY_COLS = (
    "key_id, tenant_id, key_hash, key_prefix, name, permissions, created_at_ms, expires_at_ms, status, description, "
    "scope_filter, metadata, last_used_at_ms, revoked_at_ms, revoked_reason"
)
_LEVEL_COLUMNS = ("tenant", "workspace", "app", "workflow", "agent", "toolset")
_SORT_COLUMNS = {
    "reservation_id": "reservation_id",
    "tenant": "tenant",
    "scope_path": "scope_path",
    "status": "status",
    "reserved": "estimate",
    "created_at_ms": "created_at_ms",
    "expires_at_ms": "expires_at_ms",
}


def _dumps(value: Any) -> str:
    return to_json(value).decode()


_loads = from_json  # pydantic-core's JSON: several times faster than the json module on these small payloads


def _dump(value: Any) -> str | None:
    return None if value is None else _dumps(value)


def _load(text: str | None) -> Any:
    return None if text is None else _loads(text)


def _budget(row: tuple) -> BudgetRecord:
    b = BudgetRecord(*row)
    b.is_over_limit = bool(b.is_over_limit)
    b.metadata = _load(row[15])
    return b


def _reservation(row: tuple) -> ReservationRecord:
    r = ReservationRecord(*row)
    r.subject = _loads(row[3])
    r.action = _loads(row[4])
    r.budgeted_scopes = _loads(row[8])
    r.metadata = _load(row[17])
    r.committed_metadata = _load(row[18])
    return r


def _tenant(row: tuple) -> TenantRecord:
    t = TenantRecord(*row)
    t.metadata = _load(row[9])
    return t


def _key(row: tuple) -> ApiKeyRecord:
    k = ApiKeyRecord(*row)
    k.permissions = _loads(row[5])
    k.scope_filter = _load(row[10])
    k.metadata = _load(row[11])
    return k


_EVENT_SORT = {
    "event_type": "event_type",
    "category": "category",
    "scope": "scope",
    "tenant_id": "tenant_id",
    "created_at_ms": "created_at_ms",
}


def _fields(record: Any) -> dict[str, Any]:
    return {name: getattr(record, name) for name in record.__slots__}


def _equal(**columns: Any) -> tuple[list[str], list[Any]]:
    """WHERE terms `column = ?` for the given values that are not None."""
    given = {c: v for c, v in columns.items() if v is not None}
    return [f"{c} = ?" for c in given], list(given.values())


def _window(where: list[str], args: list[Any], column: str, bounds: tuple[Any, Any]) -> None:
    low, high = bounds
    if low is not None:
        where.append(f"{column} >= ?")
        args.append(low)
    if high is not None:
        where.append(f"{column} <= ?")
        args.append(high)


class _Process:
    """This process's id, kept current across fork without a getpid() system call per transaction."""

    pid = os.getpid()


os.register_at_fork(after_in_child=lambda: setattr(_Process, "pid", os.getpid()))


@functools.cache
def _placeholders(n: int) -> str:
    return ",".join("?" * n)


KNOWN_LIMIT = 10_000  # records remembered per kind; past it, start over (a cache, not a copy of the ledger)


class _Known:
    """Records this connection read or wrote, exact while nobody else writes (see the module docstring).

    Budgets and reservations form an identity map: the records a transaction hands out are the ones `move`,
    `set_over_limit` and `save_reservation` keep current, so the rules never hold a stale copy.
    """

    __slots__ = ("budgets", "chains", "tenants", "policies", "reservations", "full")

    def __init__(self) -> None:
        self.budgets: dict[tuple[str, str], BudgetRecord | None] = {}  # (unit, scope); None: no such budget
        self.chains: dict[tuple[str, tuple[str, ...]], tuple[BudgetRecord, ...]] = {}  # get_budgets' answers
        self.tenants: dict[str, TenantRecord | None] = {}
        self.policies: dict[str, list[PolicyRecord]] = {}
        self.reservations: dict[str, ReservationRecord] = {}  # ACTIVE only
        self.full = False  # past KNOWN_LIMIT somewhere: start over when the transaction ends

    def forget(self) -> None:
        self.budgets.clear()
        self.chains.clear()
        self.tenants.clear()
        self.policies.clear()
        self.reservations.clear()
        self.full = False

    def note(self, kind: dict[Any, Any]) -> None:
        if len(kind) > KNOWN_LIMIT:  # not cleared now: records handed out must stay current until commit
            self.full = True


class SQLiteTransaction:
    __slots__ = ("_db", "_known")

    def __init__(self, db: sqlite3.Connection, known: _Known) -> None:
        self._db = db
        self._known = known

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    # ------------------------------------------------------------------------------------------------ idempotency
    def get_idempotent(self, tenant: str, endpoint: str, key: str) -> tuple[str, str] | None:
        return self._db.execute(
            "SELECT fingerprint, response FROM idempotency WHERE tenant = ? AND endpoint = ? AND key = ?",
            (tenant, endpoint, key),
        ).fetchone()

    def put_idempotent(self, tenant: str, endpoint: str, key: str, fingerprint: str, response: str) -> None:
        self._db.execute(
            "INSERT INTO idempotency (tenant, endpoint, key, fingerprint, response) VALUES (?, ?, ?, ?, ?)",
            (tenant, endpoint, key, fingerprint, response),
        )

    # ---------------------------------------------------------------------------------------------------- tenants
    def get_tenant(self, tenant_id: str) -> TenantRecord | None:
        known = self._known.tenants
        if tenant_id in known:
            return known[tenant_id]
        row = self._db.execute(f"SELECT {_TENANT_COLS} FROM tenants WHERE tenant_id = ?", (tenant_id,)).fetchone()
        known[tenant_id] = t = None if row is None else _tenant(row)
        self._known.note(known)
        return t

    def put_tenant(self, t: TenantRecord) -> None:
        self._known.forget()
        self._db.execute(
            f"INSERT OR REPLACE INTO tenants ({_TENANT_COLS}) VALUES ({_placeholders(14)})",
            (
                t.tenant_id, t.name, t.status, t.parent_tenant_id, t.default_commit_overage_policy,
                t.default_reservation_ttl_ms, t.max_reservation_ttl_ms, t.max_reservation_extensions,
                t.reservation_expiry_policy, _dump(t.metadata), t.created_at_ms, t.updated_at_ms,
                t.suspended_at_ms, t.closed_at_ms,
            ),
        )  # fmt: skip

    def list_tenants(self, after: str | None, limit: int) -> list[TenantRecord]:
        rows = self._db.execute(
            f"SELECT {_TENANT_COLS} FROM tenants WHERE tenant_id > ? ORDER BY tenant_id LIMIT ?", (after or "", limit)
        ).fetchall()
        return [_tenant(r) for r in rows]

    # ---------------------------------------------------------------------------------------------------- budgets
    def get_budgets(self, unit: str, scopes: Sequence[str]) -> tuple[BudgetRecord, ...]:
        known = self._known
        key = (unit, tuple(scopes))
        found = known.chains.get(key)  # every operation on a subject asks for the same scopes: one lookup
        if found is None:
            found = known.chains[key] = tuple(self._budget_records(unit, scopes))
            known.note(known.chains)
        return found

    def _budget_records(self, unit: str, scopes: Sequence[str]) -> list[BudgetRecord]:
        known = self._known.budgets
        try:
            found = [known[unit, scope] for scope in scopes]
        except KeyError:
            rows = self._db.execute(
                f"SELECT {_BUDGET_COLS} FROM budgets WHERE unit = ? AND scope IN ({_placeholders(len(scopes))})",
                (unit, *scopes),
            ).fetchall()
            read = {row[0]: row for row in rows}
            found = []
            for scope in scopes:
                b = known.get((unit, scope))  # a record already handed out stays the one kept current
                if b is None and scope in read:
                    b = _budget(read[scope])
                known[unit, scope] = b
                found.append(b)
            self._known.note(known)
        return [b for b in found if b is not None]

    def budget_units(self, scopes: Sequence[str]) -> list[str]:
        rows = self._db.execute(
            f"SELECT DISTINCT unit FROM budgets WHERE scope IN ({_placeholders(len(scopes))}) ORDER BY unit",
            tuple(scopes),
        ).fetchall()
        return [r[0] for r in rows]

    def _budget_values(self, b: BudgetRecord) -> tuple:
        return (
            b.scope, b.unit, b.tenant_id, b.ledger_id, b.allocated, b.spent, b.reserved, b.debt, b.overdraft_limit,
            int(b.is_over_limit), b.status, b.commit_overage_policy, b.rollover_policy, b.period_start, b.period_end,
            _dump(b.metadata), b.created_at_ms, b.updated_at_ms,
        )  # fmt: skip

    def insert_budget(self, b: BudgetRecord) -> None:
        self._known.forget()
        self._db.execute(f"INSERT INTO budgets ({_BUDGET_COLS}) VALUES ({_placeholders(18)})", self._budget_values(b))

    def save_budget(self, b: BudgetRecord) -> None:
        self._known.forget()
        self._db.execute(f"REPLACE INTO budgets ({_BUDGET_COLS}) VALUES ({_placeholders(18)})", self._budget_values(b))

    def move(self, budgets: Sequence[BudgetRecord], *, reserved: int = 0, spent: int = 0, debt: int = 0) -> None:
        # one primary-key update per ledger, in one call: cheaper than `scope IN (...)`, which builds a temporary
        # b-tree of the listed values on every execution
        self._db.executemany(
            "UPDATE budgets SET reserved = reserved + ?, spent = spent + ?, debt = debt + ? "
            "WHERE scope = ? AND unit = ?",
            [(reserved, spent, debt, b.scope, b.unit) for b in budgets],
        )
        # the records remembered are these same objects (an identity map); a zero delta is skipped, not added
        if reserved:
            for b in budgets:
                b.reserved += reserved
        if spent:
            for b in budgets:
                b.spent += spent
        if debt:
            for b in budgets:
                b.debt += debt

    def set_over_limit(self, unit: str, scopes: Sequence[str], flag: bool) -> None:
        self._db.execute(
            f"UPDATE budgets SET is_over_limit = ? WHERE unit = ? AND scope IN ({_placeholders(len(scopes))})",
            (int(flag), unit, *scopes),
        )
        known = self._known.budgets
        for scope in scopes:
            if (b := known.get((unit, scope))) is not None:
                b.is_over_limit = flag

    def list_budgets(
        self,
        *,
        tenant_id: str | None = None,
        scope: str | None = None,
        children: bool = False,
        scope_prefix: str | None = None,
        unit: str | None = None,
        after: tuple[str, str] | None = None,
        limit: int = 50,
    ) -> list[BudgetRecord]:
        where, args = [], []
        if tenant_id is not None:
            where.append("tenant_id = ?")
            args.append(tenant_id)
        if scope is not None and children:  # the scope and every path below it: '0' sorts right after '/'
            where.append("(scope = ? OR (scope > ? AND scope < ?))")
            args += [scope, scope + "/", scope + "0"]
        elif scope is not None:
            where.append("scope = ?")
            args.append(scope)
        if scope_prefix:
            where.append("scope >= ? AND scope < ?")
            args += [scope_prefix, scope_prefix + "\U0010ffff"]
        if unit is not None:
            where.append("unit = ?")
            args.append(unit)
        if after is not None:
            where.append("(scope, unit) > (?, ?)")
            args += list(after)
        sql = f"SELECT {_BUDGET_COLS} FROM budgets"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._db.execute(sql + " ORDER BY scope, unit LIMIT ?", (*args, limit)).fetchall()
        return [_budget(r) for r in rows]

    # ----------------------------------------------------------------------------------------------- reservations
    def insert_reservation(self, r: ReservationRecord) -> None:
        s = r.subject
        try:
            self._db.execute(
                _INSERT_RESERVATION,
                (
                    r.reservation_id, r.tenant, r.idempotency_key, _dumps(s), _dumps(r.action), r.unit, r.estimate,
                    r.scope_path, _dumps(r.budgeted_scopes), r.status, r.created_at_ms, r.expires_at_ms, r.grace_ms,
                    r.overage_policy, r.extensions, _dump(r.metadata), r.reserve_fingerprint, r.reserve_response,
                    s.get("workspace"), s.get("app"), s.get("workflow"), s.get("agent"), s.get("toolset"),
                ),
            )  # fmt: skip
        except sqlite3.IntegrityError:
            raise DuplicateKey(r.tenant, r.idempotency_key) from None
        self._remember(r)

    def _remember(self, r: ReservationRecord) -> None:
        known = self._known.reservations
        if r.status != "ACTIVE":
            known.pop(r.reservation_id, None)
            return
        known[r.reservation_id] = r
        self._known.note(known)

    def get_reservation(self, reservation_id: str) -> ReservationRecord | None:
        if (r := self._known.reservations.get(reservation_id)) is not None:
            return r
        row = self._db.execute(_SELECT_RESERVATION, (reservation_id,)).fetchone()
        if row is None:
            return None
        self._remember(r := _reservation(row))
        return r

    def get_reservation_by_key(self, tenant: str, idempotency_key: str) -> ReservationRecord | None:
        row = self._db.execute(
            f"SELECT {_RES_COLS} FROM reservations WHERE tenant = ? AND idempotency_key = ?", (tenant, idempotency_key)
        ).fetchone()
        return None if row is None else _reservation(row)

    def save_reservation(self, r: ReservationRecord) -> None:
        self._db.execute(
            "UPDATE reservations SET status = ?, expires_at_ms = ?, extensions = ?, committed = ?, "
            "finalized_at_ms = ?, committed_metadata = ?, finalize_key = ?, finalize_fingerprint = ?, "
            "finalize_response = ? WHERE reservation_id = ?",
            (
                r.status, r.expires_at_ms, r.extensions, r.committed, r.finalized_at_ms,
                _dump(r.committed_metadata), r.finalize_key, r.finalize_fingerprint, r.finalize_response,
                r.reservation_id,
            ),
        )  # fmt: skip
        self._remember(r)  # replaces any copy kept before (a sweep saves the copy it read)

    def due_reservations(self, now_ms: int, limit: int) -> list[ReservationRecord]:
        rows = self._db.execute(
            f"SELECT {_RES_COLS} FROM reservations WHERE status = 'ACTIVE' AND expires_at_ms + grace_ms < ? LIMIT ?",
            (now_ms, limit),
        ).fetchall()
        return [_reservation(r) for r in rows]

    def active_reservations(self, tenant: str) -> list[ReservationRecord]:
        rows = self._db.execute(
            f"SELECT {_RES_COLS} FROM reservations WHERE status = 'ACTIVE' AND tenant = ?", (tenant,)
        ).fetchall()
        return [_reservation(r) for r in rows]

    def query_reservations(
        self, flt: ReservationFilter, sort_by: str, descending: bool, after: tuple[Any, str] | None, limit: int
    ) -> list[ReservationRecord]:
        where, args = ["tenant = ?"], [flt.tenant]
        for level, value in flt.levels.items():
            if level != "tenant":
                where.append(f"{level} = ?")
                args.append(value)
        if flt.idempotency_key is not None:
            where.append("idempotency_key = ?")
            args.append(flt.idempotency_key)
        if flt.status is not None:
            where.append("status = ?")
            args.append(flt.status)
        for column, (low, high) in (
            ("created_at_ms", flt.created),
            ("expires_at_ms", flt.expires),
            ("finalized_at_ms", flt.finalized),
        ):
            if low is not None:
                where.append(f"{column} >= ?")
                args.append(low)
            if high is not None:
                where.append(f"{column} <= ?")
                args.append(high)
        column = _SORT_COLUMNS[sort_by]
        op, direction = ("<", "DESC") if descending else (">", "ASC")
        if after is not None:
            where.append(f"({column}, reservation_id) {op} (?, ?)")
            args += list(after)
        rows = self._db.execute(
            f"SELECT {_RES_COLS} FROM reservations WHERE {' AND '.join(where)} "
            f"ORDER BY {column} {direction}, reservation_id {direction} LIMIT ?",
            (*args, limit),
        ).fetchall()
        return [_reservation(r) for r in rows]

    # ----------------------------------------------------------------------------------------------------- events
    def insert_event(self, e: EventRecord) -> None:
        self._db.execute(
            "INSERT INTO events (event_id, tenant, subject, action, unit, actual, charged, scope_path, created_at_ms, "
            "metadata, extra) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                e.event_id, e.tenant, _dumps(e.subject), _dumps(e.action), e.unit, e.actual, e.charged, e.scope_path,
                e.created_at_ms, _dump(e.metadata), _dump(e.extra or None),
            ),
        )  # fmt: skip

    # ----------------------------------------------------------------------------------------------------- outbox
    # the observability records are stored whole as JSON next to the columns their listings filter and sort on
    def add_event(self, e: OutboxEvent) -> None:
        self._db.execute(
            "INSERT INTO outbox (event_id, tenant_id, event_type, category, scope, created_at_ms, correlation_id, "
            "request_id, trace_id, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                e.event_id, e.tenant_id, e.event_type, e.category, e.scope, e.created_at_ms, e.correlation_id,
                e.request_id, e.trace_id, _dumps(_fields(e)),
            ),
        )  # fmt: skip

    def get_event(self, event_id: str) -> OutboxEvent | None:
        row = self._db.execute("SELECT body FROM outbox WHERE event_id = ?", (event_id,)).fetchone()
        return None if row is None else OutboxEvent(**_loads(row[0]))

    def list_events(
        self, flt: EventFilter, sort_by: str, descending: bool, after: tuple[Any, str] | None, limit: int
    ) -> list[OutboxEvent]:
        where, args = _equal(
            tenant_id=flt.tenant_id, event_type=flt.event_type, category=flt.category, scope=flt.scope,
            correlation_id=flt.correlation_id, request_id=flt.request_id, trace_id=flt.trace_id,
        )  # fmt: skip
        _window(where, args, "created_at_ms", flt.created)
        column = _EVENT_SORT[sort_by]
        rows = self._page("outbox", "event_id", column, where, args, descending, after, limit)
        return [OutboxEvent(**_loads(row[0])) for row in rows]

    def _page(
        self,
        table: str,
        key: str,
        column: str,
        where: list[str],
        args: list[Any],
        descending: bool,
        after: tuple[Any, str] | None,
        limit: int,
    ) -> list[tuple]:
        """One keyset page of `table` ordered by (column, key)."""
        op, order = ("<", "DESC") if descending else (">", "ASC")
        if after is not None:
            where.append(f"(COALESCE({column}, ''), {key}) {op} (?, ?)")
            args += [after[0] if after[0] is not None else "", after[1]]
        sql = f"SELECT body FROM {table}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY COALESCE({column}, '') {order}, {key} {order} LIMIT ?"
        return self._db.execute(sql, (*args, limit)).fetchall()

    # ------------------------------------------------------------------------------------------------------ audit
    def add_audit(self, a: AuditRecord) -> None:
        self._db.execute(
            "INSERT INTO audit_log (log_id, tenant_id, key_id, operation, resource_type, resource_id, status, "
            "created_at_ms, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                a.log_id, a.tenant_id, a.key_id, a.operation, a.resource_type, a.resource_id, a.status,
                a.created_at_ms, _dumps(_fields(a)),
            ),
        )  # fmt: skip

    def list_audit(
        self, flt: AuditFilter, descending: bool, after: tuple[int, str] | None, limit: int
    ) -> list[AuditRecord]:
        where, args = _equal(tenant_id=flt.tenant_id, key_id=flt.key_id, resource_id=flt.resource_id)
        for column, values in (("operation", flt.operations), ("resource_type", flt.resource_types)):
            if values:
                where.append(f"{column} IN ({_placeholders(len(values))})")
                args += values
        _window(where, args, "status", flt.status)
        _window(where, args, "created_at_ms", flt.created)
        rows = self._page("audit_log", "log_id", "created_at_ms", where, args, descending, after, limit)
        return [AuditRecord(**_loads(row[0])) for row in rows]

    # --------------------------------------------------------------------------------------------------- webhooks
    def put_webhook(self, w: WebhookRecord) -> None:
        self._db.execute(
            "REPLACE INTO webhooks (subscription_id, tenant_id, status, body) VALUES (?, ?, ?, ?)",
            (w.subscription_id, w.tenant_id, w.status, _dumps(_fields(w))),
        )

    def get_webhook(self, subscription_id: str) -> WebhookRecord | None:
        row = self._db.execute("SELECT body FROM webhooks WHERE subscription_id = ?", (subscription_id,)).fetchone()
        return None if row is None else WebhookRecord(**_loads(row[0]))

    def delete_webhook(self, subscription_id: str) -> None:
        self._db.execute("DELETE FROM webhooks WHERE subscription_id = ?", (subscription_id,))
        self._db.execute(
            "UPDATE deliveries SET status = 'FAILED' WHERE subscription_id = ? AND status IN ('PENDING', 'RETRYING')",
            (subscription_id,),
        )

    def list_webhooks(self, tenant_id: str | None, after: str | None, limit: int) -> list[WebhookRecord]:
        where, args = _equal(tenant_id=tenant_id)
        rows = self._page("webhooks", "subscription_id", "subscription_id", where, args, False,
                          (after, after) if after else None, limit)  # fmt: skip
        return [WebhookRecord(**_loads(row[0])) for row in rows]

    def webhooks_for(self, tenant_id: str) -> list[WebhookRecord]:
        rows = self._db.execute(
            "SELECT body FROM webhooks WHERE tenant_id IN (?, '__system__') AND status = 'ACTIVE'", (tenant_id,)
        ).fetchall()
        return [WebhookRecord(**_loads(row[0])) for row in rows]

    def put_delivery(self, d: DeliveryRecord) -> None:
        self._db.execute(
            "REPLACE INTO deliveries (delivery_id, subscription_id, status, next_attempt_at_ms, lease_until_ms, "
            "created_at_ms, body) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                d.delivery_id, d.subscription_id, d.status, d.next_attempt_at_ms, d.lease_until_ms, d.created_at_ms,
                _dumps(_fields(d)),
            ),
        )  # fmt: skip

    def claim_deliveries(self, now_ms: int, lease_ms: int, limit: int) -> list[DeliveryRecord]:
        rows = self._db.execute(
            "SELECT body FROM deliveries WHERE status IN ('PENDING', 'RETRYING') AND next_attempt_at_ms <= ? "
            "AND lease_until_ms <= ? ORDER BY next_attempt_at_ms, created_at_ms, delivery_id LIMIT ?",
            (now_ms, now_ms, limit),
        ).fetchall()
        claimed = []
        for (body,) in rows:
            d = DeliveryRecord(**_loads(body))
            d.lease_until_ms = now_ms + lease_ms
            self.put_delivery(d)
            claimed.append(d)
        return claimed

    def list_deliveries(
        self, subscription_id: str, status: str | None, after: tuple[int, str] | None, limit: int
    ) -> list[DeliveryRecord]:
        where, args = _equal(subscription_id=subscription_id, status=status)
        rows = self._page("deliveries", "delivery_id", "created_at_ms", where, args, True, after, limit)
        return [DeliveryRecord(**_loads(row[0])) for row in rows]

    # --------------------------------------------------------------------------------------------------- policies
    def policies(self, tenant_id: str) -> list[PolicyRecord]:
        known = self._known.policies
        if (found := known.get(tenant_id)) is not None:
            return found
        rows = self._db.execute(
            "SELECT policy_id, tenant_id, name, scope_pattern, priority, status, created_at_ms, updated_at_ms, body "
            "FROM policies WHERE tenant_id = ? ORDER BY priority DESC, created_at_ms DESC, policy_id",
            (tenant_id,),
        ).fetchall()
        known[tenant_id] = found = [PolicyRecord(*row[:8], _loads(row[8])) for row in rows]
        self._known.note(known)
        return found

    def get_policy(self, policy_id: str) -> PolicyRecord | None:
        row = self._db.execute(
            "SELECT policy_id, tenant_id, name, scope_pattern, priority, status, created_at_ms, updated_at_ms, body "
            "FROM policies WHERE policy_id = ?",
            (policy_id,),
        ).fetchone()
        return None if row is None else PolicyRecord(*row[:8], _loads(row[8]))

    def put_policy(self, p: PolicyRecord) -> None:
        self._known.forget()
        self._db.execute(
            "REPLACE INTO policies (policy_id, tenant_id, name, scope_pattern, priority, status, created_at_ms, "
            "updated_at_ms, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                p.policy_id, p.tenant_id, p.name, p.scope_pattern, p.priority, p.status, p.created_at_ms,
                p.updated_at_ms, _dumps(p.body),
            ),
        )  # fmt: skip

    # --------------------------------------------------------------------------------------------------- api keys
    def _key_values(self, k: ApiKeyRecord) -> tuple:
        return (
            k.key_id, k.tenant_id, k.key_hash, k.key_prefix, k.name, _dumps(k.permissions), k.created_at_ms,
            k.expires_at_ms, k.status, k.description, _dump(k.scope_filter), _dump(k.metadata), k.last_used_at_ms,
            k.revoked_at_ms, k.revoked_reason,
        )  # fmt: skip

    def insert_key(self, k: ApiKeyRecord) -> None:
        self._db.execute(f"INSERT INTO api_keys ({_KEY_COLS}) VALUES ({_placeholders(15)})", self._key_values(k))

    def save_key(self, k: ApiKeyRecord) -> None:
        self._db.execute(f"REPLACE INTO api_keys ({_KEY_COLS}) VALUES ({_placeholders(15)})", self._key_values(k))

    def get_key(self, key_id: str) -> ApiKeyRecord | None:
        row = self._db.execute(f"SELECT {_KEY_COLS} FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
        return None if row is None else _key(row)

    def get_key_by_hash(self, key_hash: str) -> ApiKeyRecord | None:
        row = self._db.execute(f"SELECT {_KEY_COLS} FROM api_keys WHERE key_hash = ?", (key_hash,)).fetchone()
        return None if row is None else _key(row)

    def list_keys(self, tenant_id: str | None, after: str | None, limit: int) -> list[ApiKeyRecord]:
        sql, args = f"SELECT {_KEY_COLS} FROM api_keys WHERE key_id > ?", [after or ""]
        if tenant_id is not None:
            sql += " AND tenant_id = ?"
            args.append(tenant_id)
        rows = self._db.execute(sql + " ORDER BY key_id LIMIT ?", (*args, limit)).fetchall()
        return [_key(r) for r in rows]


class SQLiteStore:
    """A SQLite file (or `:memory:`) holding every ledger table.

    One connection per process, shared by its threads under a lock: SQLite serialises writers anyway, and one
    connection avoids the cost of a connection per thread. After a fork the child opens its own connection.
    """

    def __init__(self, path: str | os.PathLike[str] = ":memory:", *, busy_timeout: float = 5.0) -> None:
        self.path = str(path)
        self.url = "sqlite://:memory:" if self.path == ":memory:" else f"sqlite:///{self.path}"
        self.busy_timeout = busy_timeout
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        self._pid = -1
        self._known = _Known()
        self._data_version = -1
        self._shared = self.path != ":memory:"  # only a file can be written by another connection
        self._batching = False  # a batch is open (by the thread holding _lock): transactions are savepoints
        self._connect()

    def _connect(self) -> sqlite3.Connection:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
        try:
            db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            if self.path != ":memory:":
                db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            db.executescript("BEGIN IMMEDIATE;" + SCHEMA + "COMMIT;")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                db.close()
                raise InvalidRequest(f"{self.path} holds ledger schema v{version}; this cycles reads v{SCHEMA_VERSION}")
        except sqlite3.OperationalError as exc:
            db.close()
            raise self._busy(exc) from exc
        self._db, self._pid = db, _Process.pid
        self._tx = SQLiteTransaction(db, self._known)  # stateless beyond these two: one serves every transaction
        self._known.forget()
        return db

    def _busy(self, exc: sqlite3.OperationalError) -> Exception:
        if "locked" in str(exc) or "busy" in str(exc):
            return StoreBusy(f"ledger store {self.path} stayed locked by another writer for over {self.busy_timeout}s")
        return exc

    def transaction(self, *, readonly: bool = False) -> _Atomic:
        """One atomic operation. Writers take the write lock up front (BEGIN IMMEDIATE); read-only work does not."""
        return _Atomic(self, readonly)

    def batch(self) -> _Batch:
        """`with store.batch():` the transactions this thread runs inside share one commit at the end (a SAVEPOINT
        each, still all or nothing one by one). Writing the file's changes once per batch instead of once per
        operation is most of what an operation costs on a file: the server runs each batch of calls this way."""
        return _Batch(self)

    def close(self) -> None:
        with self._lock:
            if self._db is not None and self._pid == _Process.pid:
                self._db.close()
            self._db = None


class _Atomic:
    """`with store.transaction() as tx:` commit on success, roll back on any exception. A class rather than a
    @contextmanager generator: every guarded call runs two of these."""

    __slots__ = ("_store", "_readonly")

    def __init__(self, store: SQLiteStore, readonly: bool) -> None:
        self._store, self._readonly = store, readonly

    def __enter__(self) -> SQLiteTransaction:
        store = self._store
        store._lock.acquire()
        if store._batching:  # inside this thread's batch (the lock is re-entrant): a savepoint of it
            try:
                store._db.execute("SAVEPOINT operation")  # type: ignore[union-attr]
            except BaseException:
                store._lock.release()
                raise
            return store._tx
        try:
            _begin(store, "BEGIN" if self._readonly else "BEGIN IMMEDIATE")
        except BaseException:
            store._lock.release()
            raise
        return store._tx

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        store = self._store
        db = store._db
        assert db is not None  # set by __enter__, under the lock this holds
        try:
            if store._batching:
                if exc_type is not None:
                    store._known.forget()  # records may hold changes that are being rolled back
                    if db.in_transaction:  # else SQLite rolled back the whole batch itself: its commit will fail
                        db.execute("ROLLBACK TO operation")
                if db.in_transaction:
                    db.execute("RELEASE operation")
                return
            _end(store, db, exc_type is None)
        finally:
            store._lock.release()


class _Batch:
    """`with store.batch():` one BEGIN IMMEDIATE ... COMMIT around the transactions run inside (SQLiteStore.batch)."""

    __slots__ = ("_store",)

    def __init__(self, store: SQLiteStore) -> None:
        self._store = store

    def __enter__(self) -> None:
        store = self._store
        store._lock.acquire()
        try:
            if store._batching:
                raise RuntimeError("batches do not nest")
            _begin(store, "BEGIN IMMEDIATE")
        except BaseException:
            store._lock.release()
            raise
        store._batching = True

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        store = self._store
        store._batching = False
        try:
            _end(store, store._db, exc_type is None)  # type: ignore[arg-type]
        finally:
            store._lock.release()


def _begin(store: SQLiteStore, begin: str) -> sqlite3.Connection:
    """Begin a transaction (the caller holds store._lock); forget what may be stale."""
    db = store._db if store._pid == _Process.pid and store._db is not None else store._connect()
    try:
        db.execute(begin)
    except sqlite3.OperationalError as exc:
        raise store._busy(exc) from exc
    try:
        known = store._known
        if known.full:
            known.forget()
        if store._shared:
            version = db.execute("PRAGMA data_version").fetchone()[0]
            if version != store._data_version:  # another connection wrote: what we remember may be stale
                known.forget()
                store._data_version = version
    except BaseException:
        store._known.forget()
        db.execute("ROLLBACK")
        raise
    return db


def _end(store: SQLiteStore, db: sqlite3.Connection, commit: bool) -> None:
    """Commit (or roll back) the transaction begun by _begin."""
    if not commit:
        store._known.forget()  # records may hold changes that are being rolled back
        if db.in_transaction:
            db.execute("ROLLBACK")
        return
    try:
        db.execute("COMMIT")
    except sqlite3.OperationalError as error:
        store._known.forget()
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise store._busy(error) from error


def open_sqlite(url: str) -> SQLiteStore:
    """`sqlite:///relative/or/absolute.db`, `sqlite:////abs/path.db`, `sqlite://:memory:`."""
    if url in ("sqlite://:memory:", "sqlite:///:memory:", ":memory:"):
        return SQLiteStore(":memory:")
    if not url.startswith("sqlite:///"):
        raise InvalidRequest(f"not a sqlite store url: {url!r} (expected sqlite:///path or sqlite://:memory:)")
    return SQLiteStore(url[len("sqlite:///") :])
