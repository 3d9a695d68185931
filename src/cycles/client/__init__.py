"""`cycles.Client`: one interface to the budget authority, embedded or over HTTP.

`Client()` uses CYCLES_BASE_URL when set (a Cycles server), otherwise the embedded ledger on CYCLES_STORE (default
`sqlite:///.cycles/cycles.db` in the working directory, created on first use).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..amounts import parse_amount
from ..context import subject_fields, under_scope
from ..errors import InvalidRequest
from ..guard import ActionArg, EstimateArg, Reservation, as_action, as_amount
from ..heartbeat import Heartbeat
from ..journal import Journal, ReplayReport
from ..ledger import Ledger, open_store
from ..models import (
    Amount,
    ApiKey,
    ApiKeyCreateResponse,
    Balance,
    BudgetFundingResponse,
    BudgetLedger,
    Caps,
    DecisionRequest,
    DecisionResponse,
    EventCreateRequest,
    EventCreateResponse,
    Policy,
    ReservationDetail,
    Tenant,
    parse,
)
from ..scopes import LEVELS, format_scope, parse_scope
from .base import Transport
from .local import LocalTransport

__all__ = ["Client", "Stats", "Transport", "default_client", "set_default_client"]

log = logging.getLogger("cycles")

DEFAULT_STORE = "sqlite:///.cycles/cycles.db"
DEFAULT_JOURNAL = ".cycles/journal"
DEFAULT_TENANT = "default"
ENV_LEVELS = {level: f"CYCLES_{level.upper()}" for level in LEVELS}


@dataclass
class Stats:
    """What the client did besides plain reserve/commit: worth a metric each."""

    fail_open: int = 0  # calls run unguarded because the authority was unreachable (fail_open=True)
    shadow_denied: int = 0  # dry-run (shadow mode) calls that would have been denied
    commit_retries: int = 0  # commit attempts repeated with the same key
    expired_settled: int = 0  # commits that met 410 and were settled as events
    heartbeats: int = 0  # successful extensions
    heartbeat_failures: int = 0


def _amount(value: Amount | str | dict[str, Any]) -> Amount:
    return parse_amount(value) if isinstance(value, str) else as_amount(value, "amount")


class Client:
    """Reserve, commit and release against hierarchical budgets; administer tenants, budgets and keys.

    Subject levels given here (or in CYCLES_TENANT, CYCLES_WORKSPACE, ...) are defaults under the ambient
    `cycles.scope(...)` and per-call arguments.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        admin_api_key: str | None = None,
        store: str | None = None,
        transport: Transport | None = None,
        fail_open: bool | None = None,
        shadow: bool = False,
        timeout: float = 5.0,
        clock: Any = None,
        journal: str | os.PathLike[str] | bool | None = None,
        recover: bool = True,
        **subject: Any,
    ) -> None:
        env = os.environ
        self.timeout = timeout
        self.defaults: dict[str, Any] = {
            level: value for level in LEVELS if (value := subject.pop(level, None) or env.get(ENV_LEVELS[level]))
        }
        if subject:
            raise TypeError(f"unknown Client argument(s): {', '.join(subject)}")
        if base_url is None and store is None:  # an explicit store means embedded, whatever the environment says
            base_url = env.get("CYCLES_BASE_URL")
        if transport is not None:
            self.transport = transport
        elif base_url:
            from .http import HttpTransport

            self.transport = HttpTransport(
                base_url,
                api_key=api_key or env.get("CYCLES_API_KEY"),
                admin_api_key=admin_api_key or env.get("CYCLES_ADMIN_API_KEY"),
                timeout=timeout,
            )
        else:
            self.defaults.setdefault("tenant", DEFAULT_TENANT)
            url = store or env.get("CYCLES_STORE") or DEFAULT_STORE
            self.transport = LocalTransport(
                Ledger(open_store(url), clock=clock, default_tenant=self.defaults["tenant"])
            )
        self.fail_open = (
            fail_open if fail_open is not None else env.get("CYCLES_FAIL_OPEN", "").lower() in ("1", "true")
        )
        self.shadow = shadow
        self.journal = self._journal(journal, base_url)
        self.stats = Stats()
        self.heartbeat = Heartbeat(self)
        self.budgets = Budgets(self)
        self.tenants = Tenants(self)
        self.keys = Keys(self)
        self.policies = Policies(self)
        if recover and self.journal is not None:
            self.recover()

    def _journal(self, setting: Any, base_url: str | None) -> Journal | None:
        """On by default against a server (a commit crosses the network); opt-in for the embedded ledger, whose
        commits are local transactions. CYCLES_JOURNAL names a directory, or 0 to turn it off."""
        env = os.environ.get("CYCLES_JOURNAL")
        if setting is None and env is not None:
            setting = False if env.lower() in ("0", "false", "off", "") else env
        if setting is None:
            setting = bool(base_url)
        if setting is False:
            return None
        directory = DEFAULT_JOURNAL if setting is True else setting
        authority = getattr(self.transport, "url", type(self.transport).__name__)
        return Journal(directory, authority=authority, principal=self.tenant)

    def recover(self, *, deadline_s: float = 5.0) -> ReplayReport:
        """Send again the settlements a crash or exhausted retries left in the journal (same idempotency keys)."""
        if self.journal is None:
            return ReplayReport()
        report = self.journal.replay(self.transport, deadline_s=deadline_s)
        if report.settled or report.dropped or report.quarantined:
            log.info("cycles journal replay: %s", report)
        return report

    @property
    def tenant(self) -> str | None:
        return self.defaults.get("tenant")

    def subject(self, explicit: dict[str, Any] | None = None) -> dict[str, Any]:
        """The subject of a call: client defaults < ambient cycles.scope(...) < explicit fields."""
        return under_scope(self.defaults, explicit)

    # ----------------------------------------------------------------------------------------------- runtime
    def reserve(
        self,
        estimate: EstimateArg,
        *,
        action: ActionArg = None,
        actual: Any = None,
        ttl_ms: int | None = None,
        grace_period_ms: int | None = None,
        overage_policy: str | None = None,
        dry_run: bool | None = None,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        scope: str | None = None,
        **subject: Any,
    ) -> Reservation:
        """A guarded call: `with client.reserve(cycles.usd(0.05), action=("llm.completion", "gpt-4o")) as r:`
        (or `async with`). Reserves on enter; commits on success, releases on failure."""
        return Reservation(
            self,
            estimate,
            action=action,
            subject=subject_fields(scope, **subject),
            actual=actual,
            ttl_ms=ttl_ms,
            grace_period_ms=grace_period_ms,
            overage_policy=overage_policy,
            dry_run=dry_run,
            metadata=metadata,
            idempotency_key=idempotency_key,
        )

    def _decision_request(
        self, estimate: Amount, action: ActionArg, scope: str | None, subject: Any
    ) -> DecisionRequest:
        body = {
            "idempotency_key": os.urandom(16).hex(),
            "subject": self.subject(subject_fields(scope, **subject)),
            "action": as_action(action),
            "estimate": _amount(estimate),
        }
        return parse(DecisionRequest, body)

    def decide(
        self, estimate: Amount, *, action: ActionArg = None, scope: str | None = None, **subject: Any
    ) -> DecisionResponse:
        """Would this spend be allowed right now? Nothing is held."""
        return self.transport.decide(self._decision_request(estimate, action, scope, subject))

    async def adecide(
        self, estimate: Amount, *, action: ActionArg = None, scope: str | None = None, **subject: Any
    ) -> DecisionResponse:
        return await self.transport.adecide(self._decision_request(estimate, action, scope, subject))

    def _event_request(
        self, actual: Amount, action: ActionArg, scope: str | None, key: str | None, policy: str | None, subject: Any
    ) -> EventCreateRequest:
        body: dict[str, Any] = {
            "idempotency_key": key or os.urandom(16).hex(),
            "subject": self.subject(subject_fields(scope, **subject)),
            "action": as_action(action),
            "actual": _amount(actual),
        }
        if policy:
            body["overage_policy"] = policy
        return parse(EventCreateRequest, body)

    def event(
        self,
        actual: Amount,
        *,
        action: ActionArg = None,
        scope: str | None = None,
        idempotency_key: str | None = None,
        overage_policy: str | None = None,
        **subject: Any,
    ) -> EventCreateResponse:
        """Record spend that happened without a reservation (direct debit)."""
        return self.transport.event(
            self._event_request(actual, action, scope, idempotency_key, overage_policy, subject)
        )

    async def aevent(
        self,
        actual: Amount,
        *,
        action: ActionArg = None,
        scope: str | None = None,
        idempotency_key: str | None = None,
        overage_policy: str | None = None,
        **subject: Any,
    ) -> EventCreateResponse:
        return await self.transport.aevent(
            self._event_request(actual, action, scope, idempotency_key, overage_policy, subject)
        )

    def _balance_query(self, scope: str | None, include_children: bool, levels: dict[str, Any]) -> dict[str, Any]:
        fields = {**self.scope_fields(scope), **levels} if scope else dict(levels)
        if not fields and self.tenant:
            fields["tenant"] = self.tenant
        return {**fields, "include_children": include_children}

    def balances(self, scope: str | None = None, *, include_children: bool = True, **levels: Any) -> list[Balance]:
        """Balances at a scope (default: the client's tenant) and, by default, every scope below it."""
        query = self._balance_query(scope, include_children, levels)
        return all_pages(lambda cursor: self.transport.balances({**query, "cursor": cursor, "limit": 200}), "balances")

    async def abalances(
        self, scope: str | None = None, *, include_children: bool = True, **levels: Any
    ) -> list[Balance]:
        query, out, cursor = self._balance_query(scope, include_children, levels), [], None
        while True:
            page = await self.transport.abalances({**query, "cursor": cursor, "limit": 200})
            out += page.balances
            if not page.has_more or not page.next_cursor:
                return out
            cursor = page.next_cursor

    def reservations(self, *, limit: int | None = None, **filters: Any) -> list[ReservationDetail]:
        """Reservations of the client's tenant, newest first; filters as in GET /v1/reservations."""
        query = {k: v for k, v in filters.items() if v is not None}
        if "tenant" not in query and self.tenant:
            query["tenant"] = self.tenant
        out = all_pages(
            lambda cursor: self.transport.list_reservations({**query, "cursor": cursor, "limit": 200}),
            "reservations",
            stop_at=limit,
        )
        return out[:limit] if limit is not None else out

    def get_reservation(self, reservation_id: str) -> ReservationDetail:
        return self.transport.get_reservation(reservation_id)

    # -------------------------------------------------------------------------------------------------- misc
    def scope_fields(self, scope: str) -> dict[str, str]:
        """Parse a scope string; one without a tenant is taken to be under the client's tenant."""
        fields = parse_scope(scope)
        if "tenant" not in fields:
            if not self.tenant:
                raise InvalidRequest(f"scope {scope!r} has no tenant and the client has no default tenant")
            fields = {"tenant": self.tenant, **fields}
        return fields

    def scope_path(self, scope: str) -> str:
        return format_scope(self.scope_fields(scope))

    def close(self) -> None:
        self.heartbeat.close()
        self.transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<cycles.Client {getattr(self.transport, 'url', type(self.transport).__name__)} tenant={self.tenant}>"


def all_pages(fetch: Callable[[str | None], Any], field: str, stop_at: int | None = None) -> list[Any]:
    """Every item of a cursor-paginated listing: `fetch(cursor)` returns one page; `field` names its items."""
    out: list[Any] = []
    cursor = None
    while stop_at is None or len(out) < stop_at:
        page = fetch(cursor)
        out += getattr(page, field)
        if not page.has_more or not page.next_cursor:
            break
        cursor = page.next_cursor
    return out


class Budgets:
    """client.budgets: create, fund, freeze and read budgets. Scopes are strings like "tenant:acme/agent:bot"."""

    def __init__(self, client: Client) -> None:
        self._client = client

    @property
    def _admin(self) -> Any:
        return self._client.transport.admin

    def set(
        self,
        scope: str,
        amount: Amount | str,
        *,
        overdraft_limit: Amount | str | None = None,
        commit_overage_policy: str | None = None,
    ) -> BudgetLedger:
        """Create the budget, or set its allocation (RESET) if it exists. Spent, reserved and debt are kept."""
        from ..errors import DuplicateResource

        path, value = self._client.scope_path(scope), _amount(amount)
        body: dict[str, Any] = {"scope": path, "unit": value.unit, "allocated": value}
        if overdraft_limit is not None:
            body["overdraft_limit"] = _amount(overdraft_limit)
        if commit_overage_policy is not None:
            body["commit_overage_policy"] = commit_overage_policy
        try:
            return self._admin.create_budget(body)
        except DuplicateResource:
            self.fund(path, value, operation="RESET")
            if overdraft_limit is not None or commit_overage_policy is not None:
                update = {k: body[k] for k in ("overdraft_limit", "commit_overage_policy") if k in body}
                return self._admin.update_budget(path, value.unit, update)
            return self.get(path, value.unit)

    def fund(
        self, scope: str, amount: Amount | str, *, operation: str = "CREDIT", idempotency_key: str | None = None,
        spent: Amount | str | None = None, reason: str | None = None,
    ) -> BudgetFundingResponse:  # fmt: skip
        """CREDIT (default), DEBIT, RESET, RESET_SPENT or REPAY_DEBT."""
        value = _amount(amount)
        body: dict[str, Any] = {"operation": operation, "amount": value}
        if idempotency_key:
            body["idempotency_key"] = idempotency_key
        if spent is not None:
            body["spent"] = _amount(spent)
        if reason:
            body["reason"] = reason
        return self._admin.fund(self._client.scope_path(scope), value.unit, body)

    def get(self, scope: str, unit: str = "USD_MICROCENTS") -> BudgetLedger:
        return self._admin.get_budget(self._client.scope_path(scope), unit)

    def list(
        self, *, tenant: str | None = None, scope_prefix: str | None = None, unit: str | None = None
    ) -> list[BudgetLedger]:
        return all_pages(
            lambda cursor: self._admin.list_budgets(
                tenant_id=tenant, scope_prefix=scope_prefix, unit=unit, cursor=cursor, limit=200
            ),
            "ledgers",
        )

    def update(self, scope: str, unit: str = "USD_MICROCENTS", **changes: Any) -> BudgetLedger:
        if isinstance(changes.get("overdraft_limit"), str):
            changes["overdraft_limit"] = parse_amount(changes["overdraft_limit"])
        return self._admin.update_budget(self._client.scope_path(scope), unit, changes)

    def freeze(self, scope: str, unit: str = "USD_MICROCENTS") -> BudgetLedger:
        return self._admin.freeze(self._client.scope_path(scope), unit)

    def unfreeze(self, scope: str, unit: str = "USD_MICROCENTS") -> BudgetLedger:
        return self._admin.unfreeze(self._client.scope_path(scope), unit)


class Tenants:
    """client.tenants: create, read, suspend, reactivate, close."""

    def __init__(self, client: Client) -> None:
        self._client = client

    @property
    def _admin(self) -> Any:
        return self._client.transport.admin

    def create(self, tenant_id: str, name: str | None = None, **settings: Any) -> Tenant:
        tenant, _created = self._admin.create_tenant({"tenant_id": tenant_id, "name": name or tenant_id, **settings})
        return tenant

    def get(self, tenant_id: str) -> Tenant:
        return self._admin.get_tenant(tenant_id)

    def list(self) -> list[Tenant]:
        return all_pages(lambda cursor: self._admin.list_tenants(cursor=cursor, limit=200), "tenants")

    def update(self, tenant_id: str, **changes: Any) -> Tenant:
        return self._admin.update_tenant(tenant_id, changes)

    def suspend(self, tenant_id: str) -> Tenant:
        return self.update(tenant_id, status="SUSPENDED")

    def activate(self, tenant_id: str) -> Tenant:
        return self.update(tenant_id, status="ACTIVE")

    def close(self, tenant_id: str) -> Tenant:
        """Irreversible: budgets closed, keys revoked, open reservations released."""
        return self.update(tenant_id, status="CLOSED")


class Policies:
    """client.policies: caps (max_tokens, tool allow/deny lists...) for the scopes a pattern matches."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def create(
        self, scope_pattern: str, *, name: str | None = None, caps: Caps | dict[str, Any] | None = None,
        priority: int = 0, tenant: str | None = None, **fields: Any,
    ) -> Policy:  # fmt: skip
        body: dict[str, Any] = {"name": name or scope_pattern, "scope_pattern": scope_pattern, "priority": priority}
        if caps is not None:
            body["caps"] = caps
        body["tenant_id"] = tenant or self._client.tenant
        return self._client.transport.admin.create_policy({**body, **fields})

    def list(self, tenant: str | None = None) -> list[Policy]:
        return self._client.transport.admin.list_policies(tenant_id=tenant or self._client.tenant).policies

    def update(self, policy_id: str, **changes: Any) -> Policy:
        return self._client.transport.admin.update_policy(policy_id, changes)

    def disable(self, policy_id: str) -> Policy:
        return self.update(policy_id, status="DISABLED")


class Keys:
    """client.keys: API keys for tenants (the secret is returned once, on create)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    @property
    def _admin(self) -> Any:
        return self._client.transport.admin

    def create(
        self, tenant_id: str, name: str, *, permissions: list[str] | None = None, **fields: Any
    ) -> ApiKeyCreateResponse:
        body = {"tenant_id": tenant_id, "name": name, **fields}
        if permissions is not None:
            body["permissions"] = permissions
        return self._admin.create_api_key(body)

    def revoke(self, key_id: str, reason: str | None = None) -> ApiKey:
        return self._admin.revoke_api_key(key_id, reason)

    def list(self, tenant_id: str | None = None) -> list[ApiKey]:
        return all_pages(
            lambda cursor: self._admin.list_api_keys(tenant_id=tenant_id, cursor=cursor, limit=200), "keys"
        )


_default: Client | None = None
_default_lock = threading.Lock()


def default_client() -> Client:
    """The process-wide client used by `cycles.guard` and `cycles.run` when none is given (built from the
    environment on first use)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Client()
    return _default


def set_default_client(client: Client | None) -> None:
    global _default
    with _default_lock:
        _default = client
