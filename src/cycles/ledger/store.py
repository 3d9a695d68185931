"""What the ledger rules need from a store, and the records it keeps.

The rules (rules.py, admin.py) run every operation inside one `Store.transaction()`: they read records, decide, and
write changes back through the `Transaction` methods. A store only has to make each transaction atomic and isolated
(SQLite: BEGIN IMMEDIATE); it holds no budget logic of its own.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar


@dataclass(slots=True)
class BudgetRecord:
    """One ledger: a (scope, unit) pair. `remaining` is derived, so the ledger identity always holds."""

    scope: str
    unit: str
    tenant_id: str
    ledger_id: str
    allocated: int
    spent: int = 0
    reserved: int = 0
    debt: int = 0
    overdraft_limit: int = 0
    is_over_limit: bool = False
    status: str = "ACTIVE"
    commit_overage_policy: str | None = None
    rollover_policy: str = "NONE"
    period_start: str | None = None
    period_end: str | None = None
    metadata: dict[str, Any] | None = None
    created_at_ms: int = 0
    updated_at_ms: int = 0

    @property
    def remaining(self) -> int:
        return self.allocated - self.spent - self.reserved - self.debt


@dataclass(slots=True)
class ReservationRecord:
    reservation_id: str
    tenant: str
    idempotency_key: str
    subject: dict[str, Any]
    action: dict[str, Any]
    unit: str
    estimate: int
    scope_path: str
    budgeted_scopes: list[str]
    status: str
    created_at_ms: int
    expires_at_ms: int
    grace_ms: int
    overage_policy: str
    extensions: int = 0
    committed: int | None = None
    finalized_at_ms: int | None = None
    metadata: dict[str, Any] | None = None
    committed_metadata: dict[str, Any] | None = None
    # idempotency of the reserve that created it and of the commit/release that finalized it, kept on the row
    # itself: the hottest operations then need no separate idempotency lookups
    reserve_fingerprint: str = ""
    reserve_response: str = ""
    finalize_key: str | None = None
    finalize_fingerprint: str | None = None
    finalize_response: str | None = None

    @property
    def affected_scopes(self) -> list[str]:
        from ..scopes import affected_scopes  # derived, never stored

        return affected_scopes(self.subject)


@dataclass(slots=True)
class TenantRecord:
    tenant_id: str
    name: str
    status: str = "ACTIVE"
    parent_tenant_id: str | None = None
    default_commit_overage_policy: str | None = None
    default_reservation_ttl_ms: int = 60_000
    max_reservation_ttl_ms: int = 3_600_000
    max_reservation_extensions: int = 10
    reservation_expiry_policy: str = "AUTO_RELEASE"
    metadata: dict[str, str] | None = None
    created_at_ms: int = 0
    updated_at_ms: int = 0
    suspended_at_ms: int | None = None
    closed_at_ms: int | None = None


@dataclass(slots=True)
class ApiKeyRecord:
    key_id: str
    tenant_id: str
    key_hash: str
    key_prefix: str
    name: str
    permissions: list[str]
    created_at_ms: int
    expires_at_ms: int
    status: str = "ACTIVE"
    description: str | None = None
    scope_filter: list[str] | None = None
    metadata: dict[str, Any] | None = None
    last_used_at_ms: int | None = None
    revoked_at_ms: int | None = None
    revoked_reason: str | None = None


@dataclass(slots=True)
class EventRecord:
    event_id: str
    tenant: str
    subject: dict[str, Any]
    action: dict[str, Any]
    unit: str
    actual: int
    charged: int
    scope_path: str
    created_at_ms: int
    metadata: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class PolicyRecord:
    policy_id: str
    tenant_id: str
    name: str
    scope_pattern: str
    priority: int
    status: str
    created_at_ms: int
    updated_at_ms: int
    body: dict[str, Any] = field(default_factory=dict)  # caps, commit_overage_policy, ttl override, dates...


@dataclass(slots=True)
class ReservationFilter:
    """Store-level filter of a reservation listing; windows are inclusive ms bounds."""

    tenant: str
    levels: dict[str, str] = field(default_factory=dict)
    idempotency_key: str | None = None
    status: str | None = None
    created: tuple[int | None, int | None] = (None, None)
    expires: tuple[int | None, int | None] = (None, None)
    finalized: tuple[int | None, int | None] = (None, None)


@dataclass(slots=True)
class OutboxEvent:
    """A state transition (the admin spec's Event): written by the rules in the transaction that made the change,
    so it exists exactly when the change does. Webhook deliveries are made from these (see DeliveryRecord)."""

    event_id: str
    event_type: str
    tenant_id: str
    created_at_ms: int
    scope: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    actor: dict[str, Any] | None = None
    source: str = "cycles-server"
    correlation_id: str | None = None
    request_id: str | None = None
    trace_id: str | None = None

    @property
    def category(self) -> str:
        return self.event_type.split(".", 1)[0]


@dataclass(slots=True)
class EventFilter:
    """Store-level filter of an event listing; `created` is an inclusive ms window."""

    tenant_id: str | None = None
    event_type: str | None = None
    category: str | None = None
    scope: str | None = None
    correlation_id: str | None = None
    request_id: str | None = None
    trace_id: str | None = None
    created: tuple[int | None, int | None] = (None, None)


@dataclass(slots=True)
class AuditRecord:
    """One admin action (or admin-key release): who, when, on what, with what outcome, and the resource before and
    after it (None when it did not exist, or the action failed)."""

    log_id: str
    tenant_id: str
    created_at_ms: int
    operation: str
    status: int
    resource_type: str | None = None
    resource_id: str | None = None
    key_id: str | None = None
    error_code: str | None = None
    request_id: str | None = None
    trace_id: str | None = None
    source_ip: str | None = None
    user_agent: str | None = None
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None


@dataclass(slots=True)
class AuditFilter:
    tenant_id: str | None = None
    key_id: str | None = None
    operations: list[str] = field(default_factory=list)
    resource_types: list[str] = field(default_factory=list)
    resource_id: str | None = None
    status: tuple[int | None, int | None] = (None, None)
    created: tuple[int | None, int | None] = (None, None)


@dataclass(slots=True)
class WebhookRecord:
    subscription_id: str
    tenant_id: str  # "__system__": receives every tenant's events
    url: str
    signing_secret: str
    event_types: list[str]
    created_at_ms: int
    updated_at_ms: int
    event_categories: list[str] = field(default_factory=list)
    status: str = "ACTIVE"  # ACTIVE, PAUSED, DISABLED (auto, after disable_after_failures in a row)
    name: str | None = None
    description: str | None = None
    scope_filter: str | None = None
    headers: dict[str, str] | None = None
    retry_policy: dict[str, Any] = field(default_factory=dict)
    disable_after_failures: int = 10
    consecutive_failures: int = 0
    last_triggered_at_ms: int | None = None
    last_success_at_ms: int | None = None
    last_failure_at_ms: int | None = None
    metadata: dict[str, Any] | None = None


@dataclass(slots=True)
class DeliveryRecord:
    """One event to one subscription. The worker claims it with a lease (`lease_until_ms`): a worker that dies
    between claim and send leaves it claimable again once the lease runs out, so it is sent at least once."""

    delivery_id: str
    subscription_id: str
    event_id: str
    event_type: str
    created_at_ms: int
    status: str = "PENDING"  # PENDING, RETRYING, SUCCESS, FAILED
    attempts: int = 0
    next_attempt_at_ms: int = 0
    lease_until_ms: int = 0
    attempted_at_ms: int | None = None
    completed_at_ms: int | None = None
    response_status: int | None = None
    response_time_ms: int | None = None
    error_message: str | None = None


class DuplicateKey(Exception):
    """`insert_reservation` found the (tenant, idempotency_key) pair taken: the caller replays the original.
    (An optimistic store may raise it when the transaction ends, from `with store.transaction()`.)"""


class Conflict(Exception):
    """An optimistic store's transaction read records that changed before it could commit; nothing was written.
    `retrying` runs the whole operation again."""


CONFLICT_ATTEMPTS = 50
F = TypeVar("F", bound=Callable[..., Any])


def retrying(operation: F) -> F:
    """Run `operation` again while its transaction meets a Conflict: at once the first time (the store has just
    refreshed what changed); after that with this process's turn on the contended records when the store offers one
    (`Conflict.take_turn`: others' commits there wait meanwhile, so no process starves), else after a short random
    pause. Bounded: StoreBusy after CONFLICT_ATTEMPTS."""

    @functools.wraps(operation)
    def run(*args: Any, **kwargs: Any) -> Any:
        give_back: Callable[[], None] | None = None
        try:
            for attempt in range(CONFLICT_ATTEMPTS):
                try:
                    return operation(*args, **kwargs)
                except Conflict as conflict:
                    take_turn = getattr(conflict, "take_turn", None)
                    if attempt and take_turn is not None and give_back is None:
                        give_back = take_turn()
                    elif attempt:
                        time.sleep(random.uniform(0, min(0.0002 * 2**attempt, 0.02)))
        finally:
            if give_back is not None:
                give_back()
        from ..errors import StoreBusy

        raise StoreBusy(f"the records of this operation kept changing under {CONFLICT_ATTEMPTS} attempts")

    return run  # type: ignore[return-value]


def retrying_methods(cls: type) -> type:
    """Class decorator: every public method of `cls` runs under `retrying` (one operation each)."""
    for name, value in list(vars(cls).items()):
        if not name.startswith("_") and callable(value) and not isinstance(value, staticmethod | classmethod):
            setattr(cls, name, retrying(value))
    return cls


class Transaction(Protocol):
    """Reads and writes inside one atomic operation.

    The budget and reservation records a transaction hands out stay current: `move` and `set_over_limit` change
    them as well as the stored ledgers, so the rules read the new balances off the records they hold.
    """

    def now_ms(self) -> int: ...

    # idempotency: per (tenant, endpoint, key) the request's fingerprint and the response sent
    def get_idempotent(self, tenant: str, endpoint: str, key: str) -> tuple[str, str] | None: ...
    def put_idempotent(self, tenant: str, endpoint: str, key: str, fingerprint: str, response: str) -> None: ...

    # tenants
    def get_tenant(self, tenant_id: str) -> TenantRecord | None: ...
    def put_tenant(self, tenant: TenantRecord) -> None: ...
    def list_tenants(self, after: str | None, limit: int) -> list[TenantRecord]: ...

    # budgets
    def get_budgets(self, unit: str, scopes: Sequence[str]) -> Sequence[BudgetRecord]:
        """The ledgers that exist among `scopes`, in the order of `scopes` (root first on a scope path)."""
        ...

    def budget_units(self, scopes: Sequence[str]) -> list[str]: ...
    def insert_budget(self, budget: BudgetRecord) -> None: ...
    def save_budget(self, budget: BudgetRecord) -> None: ...
    def move(self, budgets: Sequence[BudgetRecord], *, reserved: int = 0, spent: int = 0, debt: int = 0) -> None:
        """Add the same deltas to every given ledger in one write, and to these records (handed out by this
        transaction's `get_budgets`), so the rules read what they wrote."""
        ...

    def set_over_limit(self, unit: str, scopes: Sequence[str], flag: bool) -> None: ...
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
    ) -> list[BudgetRecord]: ...

    # reservations
    def insert_reservation(self, reservation: ReservationRecord) -> None:
        """Raises DuplicateKey when the reservation's (tenant, idempotency_key) is taken."""
        ...

    def get_reservation(self, reservation_id: str) -> ReservationRecord | None: ...
    def get_reservation_by_key(self, tenant: str, idempotency_key: str) -> ReservationRecord | None: ...
    def save_reservation(self, reservation: ReservationRecord) -> None: ...
    def due_reservations(self, now_ms: int, limit: int) -> list[ReservationRecord]: ...
    def active_reservations(self, tenant: str) -> list[ReservationRecord]: ...
    def query_reservations(
        self, flt: ReservationFilter, sort_by: str, descending: bool, after: tuple[Any, str] | None, limit: int
    ) -> list[ReservationRecord]: ...

    # events
    def insert_event(self, event: EventRecord) -> None: ...

    # the outbox: events of state transitions, added in the transaction of the change
    def add_event(self, event: OutboxEvent) -> None: ...
    def get_event(self, event_id: str) -> OutboxEvent | None: ...
    def list_events(
        self, flt: EventFilter, sort_by: str, descending: bool, after: tuple[Any, str] | None, limit: int
    ) -> list[OutboxEvent]:
        """Sorted by `sort_by` (event_type, category, scope, tenant_id or created_at_ms), then event_id; `after`
        is the (sort value, event_id) of the last row of the previous page."""
        ...

    # the audit log
    def add_audit(self, entry: AuditRecord) -> None: ...
    def list_audit(
        self, flt: AuditFilter, descending: bool, after: tuple[int, str] | None, limit: int
    ) -> list[AuditRecord]:
        """By (created_at_ms, log_id); `after` as in list_events."""
        ...

    # webhooks: subscriptions, and their deliveries claimed under a lease
    def put_webhook(self, webhook: WebhookRecord) -> None: ...
    def get_webhook(self, subscription_id: str) -> WebhookRecord | None: ...
    def delete_webhook(self, subscription_id: str) -> None: ...
    def list_webhooks(self, tenant_id: str | None, after: str | None, limit: int) -> list[WebhookRecord]:
        """By subscription_id; `tenant_id=None`: every tenant's."""
        ...

    def webhooks_for(self, tenant_id: str) -> list[WebhookRecord]:
        """The ACTIVE subscriptions an event of this tenant may go to: the tenant's and the __system__ ones."""
        ...

    def put_delivery(self, delivery: DeliveryRecord) -> None: ...
    def claim_deliveries(self, now_ms: int, lease_ms: int, limit: int) -> list[DeliveryRecord]:
        """Up to `limit` PENDING or RETRYING deliveries due by `now_ms` and not leased past it, oldest first, each
        leased until now_ms + lease_ms (written before the transaction ends): a claim, never a pop."""
        ...

    def list_deliveries(
        self, subscription_id: str, status: str | None, after: tuple[int, str] | None, limit: int
    ) -> list[DeliveryRecord]:
        """Newest first, by (created_at_ms, delivery_id)."""
        ...

    # policies
    def policies(self, tenant_id: str) -> list[PolicyRecord]: ...
    def get_policy(self, policy_id: str) -> PolicyRecord | None: ...
    def put_policy(self, policy: PolicyRecord) -> None: ...

    # api keys
    def insert_key(self, key: ApiKeyRecord) -> None: ...
    def get_key(self, key_id: str) -> ApiKeyRecord | None: ...
    def get_key_by_hash(self, key_hash: str) -> ApiKeyRecord | None: ...
    def save_key(self, key: ApiKeyRecord) -> None: ...
    def list_keys(self, tenant_id: str | None, after: str | None, limit: int) -> list[ApiKeyRecord]: ...


class Store(Protocol):
    url: str

    def transaction(self, *, readonly: bool = False) -> AbstractContextManager[Transaction]: ...

    def batch(self) -> AbstractContextManager[None]:
        """The transactions run inside (by this thread) may share one commit at the end; each stays all or nothing
        on its own. Nothing of the batch is durable, or seen by others, before the block ends without error."""
        ...

    def close(self) -> None: ...
