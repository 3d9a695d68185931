"""The admin plane as a Python API: tenants, budgets and their funding, API keys (PROTOCOL.md section 7).

`tenant` on a call is the authenticated tenant of a tenant key (it may only touch its own budgets and keys);
`tenant=None` is the admin. Like the runtime rules, each call is one store transaction.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from ..amounts import format_amount
from ..errors import (
    BudgetExceeded,
    BudgetFrozen,
    DuplicateResource,
    Forbidden,
    InvalidRequest,
    NotFound,
    TenantClosed,
    Unauthorized,
    UnitMismatch,
)
from ..models import (
    DEFAULT_PERMISSIONS,
    Amount,
    ApiKey,
    ApiKeyCreateRequest,
    ApiKeyCreateResponse,
    ApiKeyListResponse,
    ApiKeyUpdateRequest,
    BudgetCreateRequest,
    BudgetFundingRequest,
    BudgetFundingResponse,
    BudgetLedger,
    BudgetListResponse,
    BudgetUpdateRequest,
    Policy,
    PolicyCreateRequest,
    PolicyListResponse,
    PolicyUpdateRequest,
    SignedAmount,
    Tenant,
    TenantCreateRequest,
    TenantListResponse,
    TenantUpdateRequest,
    Unit,
)
from ..scopes import format_scope, parse_scope
from . import events
from .rules import (
    canonical_json,
    check_int64,
    decode_cursor,
    encode_cursor,
    fingerprint,
    iso,
    new_id,
    parse,
    parse_time_ms,
)
from .store import ApiKeyRecord, BudgetRecord, PolicyRecord, TenantRecord, Transaction, retrying_methods

if TYPE_CHECKING:
    from .rules import Ledger

KEY_ALPHABET = string.ascii_letters + string.digits
KEY_LIFETIME_MS = 365 * 24 * 3600 * 1000


def hash_secret(secret: str) -> str:
    """Key secrets carry 190 random bits, so a plain SHA-256 is safe to store and fast to look up."""
    return hashlib.sha256(secret.encode()).hexdigest()


def tenant_model(t: TenantRecord) -> Tenant:
    return Tenant(
        tenant_id=t.tenant_id,
        name=t.name,
        status=t.status,  # type: ignore[arg-type]
        created_at=iso(t.created_at_ms),  # type: ignore[arg-type]
        parent_tenant_id=t.parent_tenant_id,
        default_commit_overage_policy=t.default_commit_overage_policy,  # type: ignore[arg-type]
        default_reservation_ttl_ms=t.default_reservation_ttl_ms,
        max_reservation_ttl_ms=t.max_reservation_ttl_ms,
        max_reservation_extensions=t.max_reservation_extensions,
        reservation_expiry_policy=t.reservation_expiry_policy,  # type: ignore[arg-type]
        metadata=t.metadata,
        updated_at=iso(t.updated_at_ms),
        suspended_at=iso(t.suspended_at_ms),
        closed_at=iso(t.closed_at_ms),
    )


def ledger_model(b: BudgetRecord) -> BudgetLedger:
    u = b.unit
    return BudgetLedger(
        ledger_id=b.ledger_id,
        tenant_id=b.tenant_id,
        scope=b.scope,
        scope_path=b.scope,
        unit=u,  # type: ignore[arg-type]
        allocated=Amount(unit=u, amount=b.allocated),  # type: ignore[arg-type]
        remaining=SignedAmount(unit=u, amount=b.remaining),  # type: ignore[arg-type]
        reserved=Amount(unit=u, amount=b.reserved),  # type: ignore[arg-type]
        spent=Amount(unit=u, amount=b.spent),  # type: ignore[arg-type]
        debt=Amount(unit=u, amount=b.debt),  # type: ignore[arg-type]
        overdraft_limit=Amount(unit=u, amount=b.overdraft_limit),  # type: ignore[arg-type]
        is_over_limit=b.is_over_limit,
        commit_overage_policy=b.commit_overage_policy,  # type: ignore[arg-type]
        status=b.status,  # type: ignore[arg-type]
        rollover_policy=b.rollover_policy,  # type: ignore[arg-type]
        period_start=b.period_start,
        period_end=b.period_end,
        created_at=iso(b.created_at_ms),  # type: ignore[arg-type]
        updated_at=iso(b.updated_at_ms),
    )


def policy_model(p: PolicyRecord) -> Policy:
    return Policy.model_validate(
        {
            **p.body,
            "policy_id": p.policy_id,
            "name": p.name,
            "scope_pattern": p.scope_pattern,
            "priority": p.priority,
            "status": p.status,
            "created_at": iso(p.created_at_ms),
            "updated_at": iso(p.updated_at_ms),
        }
    )


def key_model(k: ApiKeyRecord) -> ApiKey:
    return ApiKey(
        key_id=k.key_id,
        tenant_id=k.tenant_id,
        key_prefix=k.key_prefix,
        status=k.status,  # type: ignore[arg-type]
        created_at=iso(k.created_at_ms),  # type: ignore[arg-type]
        expires_at=iso(k.expires_at_ms),  # type: ignore[arg-type]
        name=k.name,
        description=k.description,
        permissions=k.permissions,
        scope_filter=k.scope_filter,
        metadata=k.metadata,
        revoked_at=iso(k.revoked_at_ms),
        revoked_reason=k.revoked_reason,
    )


def snapshot(model: BaseModel) -> dict[str, Any]:
    """A resource as the audit log keeps it before and after a change (secrets are never in these models)."""
    return model.model_dump(mode="json", exclude_none=True)


def _budget_state(b: BudgetRecord) -> dict[str, Any]:
    return {"allocated": b.allocated, "remaining": b.remaining, "debt": b.debt, "spent": b.spent,
            "reserved": b.reserved, "status": b.status}  # fmt: skip


_FUNDING_EVENTS = {
    "CREDIT": "budget.funded", "DEBIT": "budget.debited", "RESET": "budget.reset",
    "RESET_SPENT": "budget.reset_spent", "REPAY_DEBT": "budget.debt_repaid",
}  # fmt: skip


@retrying_methods  # each public method is one operation, run again on a store.Conflict
class Admin:
    """Every change here writes, in its own transaction, an audit log entry (actor, time, resource before and
    after) and an event of the admin spec's EventType (events.py)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    @staticmethod
    def _record(
        tx: Transaction,
        now: int,
        operation: str,
        resource: tuple[str, str],
        before: BaseModel | None,
        after: BaseModel | None,
        *,
        tenant: str | None,
        event: tuple[str, str, dict[str, Any]] | None,
        scope: str | None = None,
        status: int = 200,
    ) -> None:
        """Audit `operation` on `resource` (type, id) by the authenticated `tenant` (None: the admin key), and emit
        `event` (type, owning tenant, data)."""
        events.audit(
            tx, now, operation, tenant_id=tenant, resource_type=resource[0], resource_id=resource[1],
            before=snapshot(before) if before is not None else None,
            after=snapshot(after) if after is not None else None, status=status,
        )  # fmt: skip
        if event is not None:
            event_type, owner, data = event
            events.emit(tx, now, event_type, owner, data, scope=scope)

    # ---------------------------------------------------------------------------------------------------- tenants
    def create_tenant(self, request: TenantCreateRequest | Mapping[str, Any]) -> tuple[Tenant, bool]:
        """Create a tenant; returns (tenant, created). The same request again returns the existing tenant."""
        req = parse(TenantCreateRequest, request)
        with self.ledger.begin() as (tx, now):
            existing = tx.get_tenant(req.tenant_id)
            fields = req.model_dump(exclude_none=True)
            record = TenantRecord(**fields, created_at_ms=now, updated_at_ms=now)
            if existing is not None:
                same = all(getattr(existing, k) == getattr(record, k) for k in fields)
                if not same:
                    raise DuplicateResource(f"tenant {req.tenant_id!r} already exists with different settings")
                return tenant_model(existing), False
            if record.default_reservation_ttl_ms > record.max_reservation_ttl_ms:
                raise InvalidRequest("default_reservation_ttl_ms exceeds max_reservation_ttl_ms")
            tx.put_tenant(record)
            created = tenant_model(record)
            data = {"tenant_id": record.tenant_id, "new_status": record.status}
            self._record(tx, now, "createTenant", ("tenant", record.tenant_id), None, created, tenant=None,
                         status=201, event=("tenant.created", record.tenant_id, data))  # fmt: skip
            return created, True

    def get_tenant(self, tenant_id: str) -> Tenant:
        with self.ledger.begin() as (tx, _now):
            return tenant_model(self._tenant(tx, tenant_id))

    def list_tenants(self, *, cursor: str | None = None, limit: int = 50) -> TenantListResponse:
        _check_limit(limit)
        after = decode_cursor(cursor, "tenants")[0] if cursor else None
        with self.ledger.begin() as (tx, _now):
            rows = tx.list_tenants(after, limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        return TenantListResponse(
            tenants=[tenant_model(t) for t in rows],
            next_cursor=encode_cursor([rows[-1].tenant_id], "tenants") if more else None,
            has_more=more,
        )

    def update_tenant(self, tenant_id: str, request: TenantUpdateRequest | Mapping[str, Any]) -> Tenant:
        """Change settings or status. CLOSED is final and cascades: budgets closed, keys revoked, holds released."""
        req = parse(TenantUpdateRequest, request)
        with self.ledger.begin() as (tx, now):
            t = self._tenant(tx, tenant_id)
            before = tenant_model(t)
            changes = req.model_dump(exclude_none=True)
            status = changes.pop("status", None)
            if t.status == "CLOSED" and (changes or (status and status != "CLOSED")):
                raise TenantClosed(f"tenant {tenant_id!r} is closed; closing is irreversible")
            for name, value in changes.items():
                setattr(t, name, value)
            if t.default_reservation_ttl_ms > t.max_reservation_ttl_ms:
                raise InvalidRequest("default_reservation_ttl_ms exceeds max_reservation_ttl_ms")
            if status and status != t.status:
                t.status = status
                if status == "SUSPENDED":
                    t.suspended_at_ms = now
                elif status == "CLOSED":
                    t.closed_at_ms = now
                    self._close_cascade(tx, t, now)
            t.updated_at_ms = now
            tx.put_tenant(t)
            after = tenant_model(t)
            if before.status != t.status:
                kind = {"SUSPENDED": "suspended", "CLOSED": "closed", "ACTIVE": "reactivated"}[t.status]
            else:
                kind = "settings_changed" if changes else "updated"
            data = {"tenant_id": tenant_id, "previous_status": before.status, "new_status": t.status,
                    "changed_fields": sorted(changes) + (["status"] if before.status != t.status else [])}  # fmt: skip
            self._record(tx, now, "updateTenant", ("tenant", tenant_id), before, after, tenant=None,
                         event=("tenant." + kind, tenant_id, data))  # fmt: skip
            return after

    def _close_cascade(self, tx: Transaction, t: TenantRecord, now: int) -> None:
        owner, why = t.tenant_id, f"tenant_close:{t.tenant_id}"
        for r in tx.active_reservations(owner):
            tx.move(tx.get_budgets(r.unit, r.budgeted_scopes), reserved=-r.estimate)
            r.status, r.finalized_at_ms = "RELEASED", now
            r.committed_metadata = {"release_reason": "tenant closed"}
            tx.save_reservation(r)
            data = {"reservation_id": r.reservation_id, "scope": r.scope_path, "unit": r.unit,
                    "estimated_amount": r.estimate}  # fmt: skip
            events.emit(tx, now, "reservation.released_via_tenant_cascade", owner, data, scope=r.scope_path,
                        correlation_id=why)  # fmt: skip
        after: tuple[str, str] | None = None
        while rows := tx.list_budgets(tenant_id=owner, after=after, limit=500):
            for b in rows:
                previous = _budget_state(b)
                b.status, b.updated_at_ms = "CLOSED", now
                tx.save_budget(b)
                data = {"ledger_id": b.ledger_id, "scope": b.scope, "unit": b.unit, "operation": "STATUS_CHANGE",
                        "previous_state": previous, "new_state": _budget_state(b)}  # fmt: skip
                events.emit(tx, now, "budget.closed_via_tenant_cascade", owner, data, scope=b.scope,
                            correlation_id=why)  # fmt: skip
            after = (rows[-1].scope, rows[-1].unit)
        for k in tx.list_keys(owner, None, 1_000_000):
            if k.status == "ACTIVE":
                k.status, k.revoked_at_ms, k.revoked_reason = "REVOKED", now, "tenant closed"
                tx.save_key(k)
                data = {"key_id": k.key_id, "key_name": k.name, "previous_status": "ACTIVE", "new_status": "REVOKED"}
                events.emit(tx, now, "api_key.revoked_via_tenant_cascade", owner, data, correlation_id=why)

    @staticmethod
    def _tenant(tx: Transaction, tenant_id: str) -> TenantRecord:
        t = tx.get_tenant(tenant_id)
        if t is None:
            raise NotFound(f"tenant {tenant_id!r} not found", details={"tenant_id": tenant_id})
        return t

    # ---------------------------------------------------------------------------------------------------- budgets
    @staticmethod
    def _scope(scope: str, tenant: str | None) -> tuple[str, str]:
        """Canonical scope text and its tenant; a tenant key may only name its own tenant's scopes."""
        fields = parse_scope(scope)
        if "tenant" not in fields:
            raise InvalidRequest(f"budget scope {scope!r} must be rooted at tenant:<id>")
        if tenant is not None and fields["tenant"] != tenant:
            raise Forbidden(f"scope {scope!r} belongs to another tenant")
        return format_scope(fields), fields["tenant"]

    def _budget(self, tx: Transaction, scope: str, unit: str | Unit, tenant: str | None) -> BudgetRecord:
        scope, _owner = self._scope(scope, tenant)
        unit = _unit(unit)
        found = tx.get_budgets(unit, [scope])
        if not found:
            raise NotFound(f"no {unit} budget at {scope}", details={"scope": scope, "unit": unit})
        return found[0]

    def create_budget(
        self, request: BudgetCreateRequest | Mapping[str, Any], *, tenant: str | None = None
    ) -> BudgetLedger:
        req = parse(BudgetCreateRequest, request)
        scope, owner = self._scope(req.scope, tenant)
        if req.tenant_id is not None and req.tenant_id != owner:
            raise InvalidRequest(f"scope {scope!r} is not under tenant_id {req.tenant_id!r}")
        for name, amount in (("allocated", req.allocated), ("overdraft_limit", req.overdraft_limit)):
            if amount is not None and amount.unit != req.unit:
                raise UnitMismatch(f"{name} is in {amount.unit}, the budget in {req.unit}")
        with self.ledger.begin() as (tx, now):
            t = tx.get_tenant(owner)
            if t is not None and t.status == "CLOSED":
                raise TenantClosed(f"tenant {owner!r} is closed")
            if tx.get_budgets(req.unit, [scope]):
                raise DuplicateResource(f"a {req.unit} budget already exists at {scope}")
            b = BudgetRecord(
                scope=scope,
                unit=req.unit,
                tenant_id=owner,
                ledger_id=new_id("led_"),
                allocated=req.allocated.amount,
                overdraft_limit=req.overdraft_limit.amount if req.overdraft_limit else 0,
                commit_overage_policy=req.commit_overage_policy,
                rollover_policy=req.rollover_policy,
                period_start=req.period_start,
                period_end=req.period_end,
                metadata=req.metadata,
                created_at_ms=now,
                updated_at_ms=now,
            )
            tx.insert_budget(b)
            created = ledger_model(b)
            data = {"ledger_id": b.ledger_id, "scope": scope, "unit": b.unit, "operation": "CREATE",
                    "new_state": _budget_state(b)}  # fmt: skip
            self._record(tx, now, "createBudget", ("budget", b.ledger_id), None, created, tenant=tenant, status=201,
                         event=("budget.created", owner, data), scope=scope)  # fmt: skip
            return created

    def get_budget(self, scope: str, unit: str | Unit, *, tenant: str | None = None) -> BudgetLedger:
        with self.ledger.begin() as (tx, _now):
            return ledger_model(self._budget(tx, scope, unit, tenant))

    def list_budgets(
        self,
        *,
        tenant: str | None = None,
        tenant_id: str | None = None,
        scope_prefix: str | None = None,
        unit: str | Unit | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> BudgetListResponse:
        if tenant is not None and tenant_id is not None and tenant_id != tenant:
            raise Forbidden(f"tenant_id {tenant_id!r} is not the authenticated tenant")
        _check_limit(limit)
        owner = tenant or tenant_id
        unit_value = _unit(unit) if unit is not None else None
        query_hash = canonical_json([owner, scope_prefix, unit_value])
        after = decode_cursor(cursor, query_hash) if cursor else None
        with self.ledger.begin() as (tx, _now):
            rows = tx.list_budgets(
                tenant_id=owner,
                scope_prefix=scope_prefix,
                unit=unit_value,
                after=(after[0], after[1]) if after else None,
                limit=limit + 1,
            )
        more = len(rows) > limit
        rows = rows[:limit]
        return BudgetListResponse(
            ledgers=[ledger_model(b) for b in rows],
            next_cursor=encode_cursor([rows[-1].scope, rows[-1].unit], query_hash) if more else None,
            has_more=more,
        )

    def update_budget(
        self,
        scope: str,
        unit: str | Unit,
        request: BudgetUpdateRequest | Mapping[str, Any],
        *,
        tenant: str | None = None,
    ) -> BudgetLedger:
        req = parse(BudgetUpdateRequest, request)
        with self.ledger.begin() as (tx, now):
            b = self._budget(tx, scope, unit, tenant)
            before, previous = ledger_model(b), _budget_state(b)
            if req.overdraft_limit is not None:
                if req.overdraft_limit.unit != b.unit:
                    raise UnitMismatch(f"overdraft_limit is in {req.overdraft_limit.unit}, the budget in {b.unit}")
                b.overdraft_limit = req.overdraft_limit.amount
                if b.debt <= b.overdraft_limit and b.remaining >= 0:
                    b.is_over_limit = False
                elif b.debt > b.overdraft_limit:
                    b.is_over_limit = True
            if req.commit_overage_policy is not None:
                b.commit_overage_policy = req.commit_overage_policy
            if req.metadata is not None:
                b.metadata = req.metadata
            b.updated_at_ms = now
            tx.save_budget(b)
            after = ledger_model(b)
            data = {"ledger_id": b.ledger_id, "scope": b.scope, "unit": b.unit, "operation": "UPDATE",
                    "previous_state": previous, "new_state": _budget_state(b)}  # fmt: skip
            self._record(tx, now, "updateBudget", ("budget", b.ledger_id), before, after, tenant=tenant,
                         event=("budget.updated", b.tenant_id, data), scope=b.scope)  # fmt: skip
            return after

    def freeze(self, scope: str, unit: str | Unit, *, tenant: str | None = None) -> BudgetLedger:
        return self._set_status(scope, unit, "FROZEN", tenant)

    def unfreeze(self, scope: str, unit: str | Unit, *, tenant: str | None = None) -> BudgetLedger:
        return self._set_status(scope, unit, "ACTIVE", tenant)

    def _set_status(self, scope: str, unit: str | Unit, status: str, tenant: str | None) -> BudgetLedger:
        with self.ledger.begin() as (tx, now):
            b = self._budget(tx, scope, unit, tenant)
            if b.status == "CLOSED":
                raise DuplicateResource(f"budget {b.scope} is closed")
            if b.status != status:
                before, previous = ledger_model(b), _budget_state(b)
                b.status, b.updated_at_ms = status, now
                tx.save_budget(b)
                data = {"ledger_id": b.ledger_id, "scope": b.scope, "unit": b.unit, "operation": "STATUS_CHANGE",
                        "previous_state": previous, "new_state": _budget_state(b)}  # fmt: skip
                kind = "frozen" if status == "FROZEN" else "unfrozen"
                self._record(tx, now, "freezeBudget" if status == "FROZEN" else "unfreezeBudget",
                             ("budget", b.ledger_id), before, ledger_model(b), tenant=tenant,
                             event=("budget." + kind, b.tenant_id, data), scope=b.scope)  # fmt: skip
            return ledger_model(b)

    def fund(
        self,
        scope: str,
        unit: str | Unit,
        request: BudgetFundingRequest | Mapping[str, Any],
        *,
        tenant: str | None = None,
    ) -> BudgetFundingResponse:
        """CREDIT, DEBIT, RESET, RESET_SPENT or REPAY_DEBT one ledger; idempotent when a key is given."""
        req = parse(BudgetFundingRequest, request)
        fp = fingerprint(req)
        with self.ledger.begin() as (tx, now):
            b = self._budget(tx, scope, unit, tenant)
            endpoint = f"fund:{b.scope}:{b.unit}"
            if req.idempotency_key is not None:
                hit = self.ledger._replay(tx, b.tenant_id, endpoint, req.idempotency_key, fp, BudgetFundingResponse)
                if hit is not None:
                    return hit
            if b.status != "ACTIVE":
                raise BudgetFrozen(f"budget {b.scope} is {b.status}: funding is blocked", details={"scope": b.scope})
            for name, amount in (("amount", req.amount), ("spent", req.spent)):
                if amount is not None and amount.unit != b.unit:
                    raise UnitMismatch(f"{name} is in {amount.unit}, the budget in {b.unit}")
            before = (b.allocated, b.remaining, b.debt, b.spent)
            before_model, previous = ledger_model(b), _budget_state(b)
            a = req.amount.amount
            if req.operation == "CREDIT":
                b.allocated += a
            elif req.operation == "DEBIT":
                if a > b.remaining:
                    raise BudgetExceeded(
                        f"cannot debit {format_amount(b.unit, a)} from {b.scope}: "
                        f"only {format_amount(b.unit, b.remaining)} remaining",
                        details={"scope": b.scope, "unit": b.unit, "requested": a, "remaining": b.remaining},
                    )
                b.allocated -= a
            elif req.operation == "RESET":
                b.allocated = a
            elif req.operation == "RESET_SPENT":
                b.allocated = a
                b.spent = req.spent.amount if req.spent is not None else 0
            elif req.operation == "REPAY_DEBT":
                if a > b.debt:
                    raise InvalidRequest(f"cannot repay {a}: the debt at {b.scope} is {b.debt}")
                b.debt -= a
            check_int64(b)
            if b.is_over_limit and b.debt <= b.overdraft_limit and b.remaining >= 0:
                b.is_over_limit = False
            b.updated_at_ms = now
            tx.save_budget(b)
            u = b.unit
            response = BudgetFundingResponse(
                operation=req.operation,
                previous_allocated=Amount(unit=u, amount=before[0]),  # type: ignore[arg-type]
                new_allocated=Amount(unit=u, amount=b.allocated),  # type: ignore[arg-type]
                previous_remaining=SignedAmount(unit=u, amount=before[1]),  # type: ignore[arg-type]
                new_remaining=SignedAmount(unit=u, amount=b.remaining),  # type: ignore[arg-type]
                previous_debt=Amount(unit=u, amount=before[2]),  # type: ignore[arg-type]
                new_debt=Amount(unit=u, amount=b.debt),  # type: ignore[arg-type]
                previous_spent=Amount(unit=u, amount=before[3]),  # type: ignore[arg-type]
                new_spent=Amount(unit=u, amount=b.spent),  # type: ignore[arg-type]
                timestamp=iso(now),
            )
            if req.idempotency_key is not None:
                self.ledger._remember(tx, b.tenant_id, endpoint, req.idempotency_key, fp, response)
            data = {"ledger_id": b.ledger_id, "scope": b.scope, "unit": u, "operation": req.operation,
                    "previous_state": previous, "new_state": _budget_state(b)}  # fmt: skip
            if req.operation == "RESET_SPENT":
                data["spent_override_provided"] = req.spent is not None
            if req.reason:
                data["reason"] = req.reason
            event = (_FUNDING_EVENTS[req.operation], b.tenant_id, data)
            self._record(tx, now, "fundBudget", ("budget", b.ledger_id), before_model, ledger_model(b),
                         tenant=tenant, event=event, scope=b.scope)  # fmt: skip
            return response

    # --------------------------------------------------------------------------------------------------- policies
    def create_policy(self, request: PolicyCreateRequest | Mapping[str, Any], *, tenant: str | None = None) -> Policy:
        """Caps, overage policy and TTL overrides for the scopes a pattern matches (highest priority wins)."""
        req = parse(PolicyCreateRequest, request)
        if tenant is not None and req.tenant_id not in (None, tenant):
            raise Forbidden("a tenant key may only create policies for its own tenant")
        owner = tenant or req.tenant_id
        if owner is None:
            raise InvalidRequest("tenant_id is required")
        for name in ("effective_from", "effective_until"):
            parse_time_ms(getattr(req, name), name)
        with self.ledger.begin() as (tx, now):
            body = req.model_dump(
                mode="json", exclude_none=True, exclude={"name", "scope_pattern", "tenant_id", "priority"}
            )
            p = PolicyRecord(new_id("pol_"), owner, req.name, req.scope_pattern, req.priority, "ACTIVE", now, now, body)
            tx.put_policy(p)
            created = policy_model(p)
            data = {"policy_id": p.policy_id, "name": p.name, "scope_pattern": p.scope_pattern}
            self._record(tx, now, "createPolicy", ("policy", p.policy_id), None, created, tenant=tenant, status=201,
                         event=("policy.created", owner, data))  # fmt: skip
            return created

    def list_policies(self, *, tenant: str | None = None, tenant_id: str | None = None) -> PolicyListResponse:
        if tenant is not None and tenant_id not in (None, tenant):
            raise Forbidden(f"tenant_id {tenant_id!r} is not the authenticated tenant")
        owner = tenant or tenant_id
        if owner is None:
            raise InvalidRequest("tenant_id is required")
        with self.ledger.begin() as (tx, _now):
            return PolicyListResponse(policies=[policy_model(p) for p in tx.policies(owner)], has_more=False)

    def update_policy(
        self, policy_id: str, request: PolicyUpdateRequest | Mapping[str, Any], *, tenant: str | None = None
    ) -> Policy:
        req = parse(PolicyUpdateRequest, request)
        with self.ledger.begin() as (tx, now):
            p = tx.get_policy(policy_id)
            if p is None or (tenant is not None and p.tenant_id != tenant):
                raise NotFound(f"policy {policy_id!r} not found", details={"policy_id": policy_id})
            before = policy_model(p)
            changes = req.model_dump(mode="json", exclude_none=True)
            changed = sorted(changes)
            p.name = changes.pop("name", p.name)
            p.priority = changes.pop("priority", p.priority)
            p.status = changes.pop("status", p.status)
            p.body.update(changes)
            p.updated_at_ms = now
            tx.put_policy(p)
            after = policy_model(p)
            data = {"policy_id": p.policy_id, "name": p.name, "scope_pattern": p.scope_pattern,
                    "changed_fields": changed}  # fmt: skip
            self._record(tx, now, "updatePolicy", ("policy", p.policy_id), before, after, tenant=tenant,
                         event=("policy.updated", p.tenant_id, data))  # fmt: skip
            return after

    # --------------------------------------------------------------------------------------------------- api keys
    def create_api_key(
        self, request: ApiKeyCreateRequest | Mapping[str, Any], *, tenant: str | None = None
    ) -> ApiKeyCreateResponse:
        """A new key; its secret is in this response only (the store keeps a hash)."""
        req = parse(ApiKeyCreateRequest, request)
        if tenant is not None and req.tenant_id != tenant:
            raise Forbidden("a tenant key may only create keys for its own tenant")
        secret = "cyc_live_" + "".join(secrets.choice(KEY_ALPHABET) for _ in range(32))
        with self.ledger.begin() as (tx, now):
            t = tx.get_tenant(req.tenant_id)
            if t is None:
                raise NotFound(f"tenant {req.tenant_id!r} not found", details={"tenant_id": req.tenant_id})
            if t.status == "CLOSED":
                raise TenantClosed(f"tenant {req.tenant_id!r} is closed")
            expires = parse_time_ms(req.expires_at, "expires_at") if req.expires_at else now + KEY_LIFETIME_MS
            if expires is not None and expires <= now:
                raise InvalidRequest("expires_at must be in the future")
            k = ApiKeyRecord(
                key_id=new_id("key_"),
                tenant_id=req.tenant_id,
                key_hash=hash_secret(secret),
                key_prefix=secret[:14],
                name=req.name,
                permissions=list(req.permissions if req.permissions is not None else DEFAULT_PERMISSIONS),
                created_at_ms=now,
                expires_at_ms=expires,  # type: ignore[arg-type]
                description=req.description,
                scope_filter=req.scope_filter,
                metadata=req.metadata,
            )
            tx.insert_key(k)
            data = {"key_id": k.key_id, "key_name": k.name, "new_status": k.status, "permissions": k.permissions}
            self._record(tx, now, "createApiKey", ("api_key", k.key_id), None, key_model(k), tenant=tenant,
                         status=201, event=("api_key.created", k.tenant_id, data))  # fmt: skip
        return ApiKeyCreateResponse(
            key_id=k.key_id,
            key_secret=secret,
            key_prefix=k.key_prefix,
            tenant_id=k.tenant_id,
            created_at=iso(k.created_at_ms),  # type: ignore[arg-type]
            expires_at=iso(k.expires_at_ms),  # type: ignore[arg-type]
            permissions=k.permissions,
        )

    def list_api_keys(
        self, *, tenant: str | None = None, tenant_id: str | None = None, cursor: str | None = None, limit: int = 50
    ) -> ApiKeyListResponse:
        if tenant is not None and tenant_id is not None and tenant_id != tenant:
            raise Forbidden(f"tenant_id {tenant_id!r} is not the authenticated tenant")
        _check_limit(limit)
        owner = tenant or tenant_id
        after = decode_cursor(cursor, f"keys:{owner}")[0] if cursor else None
        with self.ledger.begin() as (tx, _now):
            rows = tx.list_keys(owner, after, limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        return ApiKeyListResponse(
            keys=[key_model(k) for k in rows],
            next_cursor=encode_cursor([rows[-1].key_id], f"keys:{owner}") if more else None,
            has_more=more,
        )

    def _key(self, tx: Transaction, key_id: str, tenant: str | None) -> ApiKeyRecord:
        k = tx.get_key(key_id)
        if k is None or (tenant is not None and k.tenant_id != tenant):
            raise NotFound(f"api key {key_id!r} not found", details={"key_id": key_id})
        return k

    def update_api_key(
        self, key_id: str, request: ApiKeyUpdateRequest | Mapping[str, Any], *, tenant: str | None = None
    ) -> ApiKey:
        req = parse(ApiKeyUpdateRequest, request)
        with self.ledger.begin() as (tx, now):
            k = self._key(tx, key_id, tenant)
            if k.status != "ACTIVE":
                raise DuplicateResource(f"api key {key_id!r} is {k.status}")
            before = key_model(k)
            changes = req.model_dump(exclude_none=True)
            for name, value in changes.items():
                setattr(k, name, value)
            tx.save_key(k)
            after = key_model(k)
            event = None
            if "permissions" in changes and list(before.permissions or []) != list(k.permissions):
                data = {"key_id": k.key_id, "key_name": k.name, "permissions": k.permissions}
                event = ("api_key.permissions_changed", k.tenant_id, data)
            self._record(tx, now, "updateApiKey", ("api_key", k.key_id), before, after, tenant=tenant, event=event)
            return after

    def revoke_api_key(self, key_id: str, reason: str | None = None, *, tenant: str | None = None) -> ApiKey:
        """Permanent. Revoking a revoked key again is a no-op."""
        with self.ledger.begin() as (tx, now):
            k = self._key(tx, key_id, tenant)
            if k.status == "ACTIVE":
                before = key_model(k)
                k.status, k.revoked_at_ms, k.revoked_reason = "REVOKED", now, reason
                tx.save_key(k)
                data = {"key_id": k.key_id, "key_name": k.name, "previous_status": "ACTIVE", "new_status": "REVOKED"}
                self._record(tx, now, "revokeApiKey", ("api_key", k.key_id), before, key_model(k), tenant=tenant,
                             event=("api_key.revoked", k.tenant_id, data))  # fmt: skip
            return key_model(k)

    def authenticate(self, secret: str) -> ApiKeyRecord:
        """The active key with this secret, or Unauthorized (unknown, revoked, expired, tenant not active)."""
        if not secret or len(secret) > 256:
            raise Unauthorized("missing or malformed API key")
        digest = hash_secret(secret)
        with self.ledger.store.transaction(readonly=True) as tx:
            now = self.ledger._now(tx)
            k = tx.get_key_by_hash(digest)
            t = tx.get_tenant(k.tenant_id) if k is not None else None
        if k is None or not hmac.compare_digest(k.key_hash, digest):
            raise Unauthorized("invalid API key")
        if k.status != "ACTIVE" or now > k.expires_at_ms:
            raise Unauthorized(f"API key {k.key_prefix}... is {'expired' if k.status == 'ACTIVE' else k.status}")
        if t is not None and t.status != "ACTIVE":
            raise Unauthorized(f"tenant {k.tenant_id!r} is {t.status}")
        return k


def _unit(unit: str | Unit) -> str:
    try:
        return Unit(unit).value
    except ValueError:
        raise InvalidRequest(f"unknown unit {unit!r}: one of {', '.join(u.value for u in Unit)}") from None


def _check_limit(limit: int) -> None:
    if not isinstance(limit, int) or not 1 <= limit <= 200:
        raise InvalidRequest(f"limit must be between 1 and 200, got {limit!r}")
