"""The Cycles v0 runtime rules, written once over any store.

Every operation is one store transaction: replay or refuse a reused idempotency key, check, then write. An error
raised anywhere inside rolls the whole transaction back, so a refused request changes nothing.

Where the protocol leaves a choice, this ledger decides:
- a new reservation is refused with DEBT_OUTSTANDING when a budgeted scope has debt and no overdraft limit, and with
  OVERDRAFT_LIMIT_EXCEEDED while a scope is over its limit; existing reservations still commit and release;
- ALLOW_WITH_OVERDRAFT checks each short scope's unfunded deficit against its overdraft limit; `spent` grows by the
  funded part only, the rest becomes debt, so remaining = allocated - spent - reserved - debt always holds. When a
  short scope has no overdraft limit the whole charge falls back to ALLOW_IF_AVAILABLE;
- ALLOW_IF_AVAILABLE caps an overage at what every scope still has and flags is_over_limit only on the scopes that
  could not cover it; REJECT refuses any commit above the estimate (409, the reservation stays ACTIVE);
- dry_run and decide report budget-state denials as DENY with a reason code; a wrong unit stays 400 UNIT_MISMATCH;
- a subject without a tenant takes the effective tenant; scope values compare as given (no case folding);
- tenant records are optional (embedded use needs none); a SUSPENDED tenant gets 403 on new reservations and events;
- reservation TTLs are capped by the tenant's max_reservation_ttl_ms (default 1 h); an extension adds to the current
  expiry, clamped to now + that maximum;
- reserve, commit, release and extend do not sweep expired reservations first (the hot path); they sweep when a
  decision depends on remaining budget that an expired hold may still occupy, and every read sweeps first, so no
  one observes a stale hold.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Any, TypeVar

from pydantic import BaseModel
from pydantic_core import to_json

from ..amounts import format_amount
from ..errors import (
    BudgetClosed,
    BudgetDenied,
    BudgetExceeded,
    BudgetFrozen,
    CyclesError,
    DebtOutstanding,
    Forbidden,
    IdempotencyMismatch,
    InternalError,
    InvalidRequest,
    MaxExtensionsExceeded,
    NotFound,
    OverdraftLimitExceeded,
    ReservationExpired,
    ReservationFinalized,
    TenantClosed,
    UnitMismatch,
)
from ..ids import new_id
from ..models import (
    INT64_MAX,
    Amount,
    Balance,
    BalanceQuery,
    BalanceResponse,
    CommitRequest,
    CommitResponse,
    Decision,
    DecisionRequest,
    DecisionResponse,
    EventCreateRequest,
    EventCreateResponse,
    ReleaseRequest,
    ReleaseResponse,
    ReservationCreateRequest,
    ReservationCreateResponse,
    ReservationDetail,
    ReservationExtendRequest,
    ReservationExtendResponse,
    ReservationListResponse,
    ReservationQuery,
    parse,
)
from ..scopes import LEVELS, affected_scopes, format_scope
from . import events
from .store import (
    BudgetRecord,
    DuplicateKey,
    EventRecord,
    PolicyRecord,
    ReservationFilter,
    ReservationRecord,
    Store,
    TenantRecord,
    Transaction,
    retrying_methods,
)

M = TypeVar("M", bound=BaseModel)

DEFAULT_TTL_MS = 60_000
MAX_TIME_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z: timestamps stay printable
DEFAULT_MAX_TTL_MS = 3_600_000
DEFAULT_MAX_EXTENSIONS = 10
SWEEP_BATCH = 500

_DENIALS: dict[str, type[BudgetDenied]] = {
    "BUDGET_EXCEEDED": BudgetExceeded,
    "BUDGET_FROZEN": BudgetFrozen,
    "BUDGET_CLOSED": BudgetClosed,
    "OVERDRAFT_LIMIT_EXCEEDED": OverdraftLimitExceeded,
    "DEBT_OUTSTANDING": DebtOutstanding,
}


# ------------------------------------------------------------------------------------------------------------ helpers


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces: RFC 8785 for the integer-and-string payloads of this protocol."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def fingerprint(request: BaseModel) -> str:
    """A digest of the canonical payload that a replay must match. The idempotency key is hashed too, which changes
    nothing (a fingerprint is only compared with one stored under the same key) and is cheaper than excluding it."""
    return _digest(type(request).__pydantic_serializer__.to_json(request, exclude_none=True))  # canonical: see models


def canonical(request: BaseModel) -> tuple[dict[str, Any], str]:
    """The request as canonical JSON-mode data, and its fingerprint: one serialisation serves both the rules (which
    read subject and action from it) and the digest (the same bytes `fingerprint` hashes)."""
    payload = type(request).__pydantic_serializer__.to_python(request, mode="json", exclude_none=True)
    return payload, _digest(to_json(payload))


def _digest(payload: bytes) -> str:
    # SHA-256 (OpenSSL, hardware-assisted): BLAKE2b runs fewer instructions here but took 10% longer, measured
    return hashlib.sha256(payload).hexdigest()


def stored(body: dict[str, Any]) -> str:
    """The JSON a replay returns: the validated response's own input (no None values), dumped without pydantic."""
    return to_json(body).decode()


def iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time_ms(text: str | None, field: str) -> int | None:
    """An ISO-8601 timestamp (or integer epoch ms) from a query string."""
    if text is None:
        return None
    if text.isdigit():
        ms = int(text)
    else:
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            ms = int(moment.timestamp() * 1000)
        except (ValueError, OverflowError):
            raise InvalidRequest(f"{field} must be an ISO-8601 timestamp, got {text!r}") from None
    if not 0 <= ms <= MAX_TIME_MS:
        raise InvalidRequest(f"{field} must fall between 1970 and 9999, got {text!r}")
    return ms


def amount(unit: str, value: int) -> dict[str, Any]:
    return {"unit": unit, "amount": value}


def balance_body(b: BudgetRecord) -> dict[str, Any]:
    """A Balance as plain data: responses are validated once, whole, which is far cheaper than model by model."""
    u = b.unit
    return {
        "scope": b.scope,
        "scope_path": b.scope,
        "remaining": {"unit": u, "amount": b.remaining},
        "reserved": {"unit": u, "amount": b.reserved},
        "spent": {"unit": u, "amount": b.spent},
        "allocated": {"unit": u, "amount": b.allocated},
        "debt": {"unit": u, "amount": b.debt},
        "overdraft_limit": {"unit": u, "amount": b.overdraft_limit},
        "is_over_limit": b.is_over_limit,
    }


def balance(b: BudgetRecord) -> Balance:
    return Balance.model_validate(balance_body(b))


def encode_cursor(position: Sequence[Any], query_hash: str) -> str:
    raw = canonical_json({"p": list(position), "q": query_hash}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, query_hash: str) -> list[Any]:
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        position, cursor_hash = data["p"], data["q"]
    except (ValueError, KeyError, TypeError):
        raise InvalidRequest("cursor is not one this server issued") from None
    if cursor_hash != query_hash:
        raise InvalidRequest("cursor belongs to a different query: filters, windows and sort must stay the same")
    return position


INT64_MIN = -(2**63)


def check_int64(b: BudgetRecord, **new: int) -> None:
    """Refuse (400, nothing written) a change that would take a ledger outside the int64 range of the wire."""
    allocated, spent = new.get("allocated", b.allocated), new.get("spent", b.spent)
    reserved, debt = new.get("reserved", b.reserved), new.get("debt", b.debt)
    if max(allocated, spent, reserved, debt) > INT64_MAX or allocated - spent - reserved - debt < INT64_MIN:
        raise InvalidRequest(
            f"this operation would take the {b.unit} ledger at {b.scope} outside the int64 range",
            details={"scope": b.scope, "unit": b.unit},
        )


def pattern_matches(pattern: str, scope_path: str) -> bool:
    """Policy scope patterns: "tenant:acme" (that scope), "tenant:acme/*" (below it), "agent:*" or
    "*/agent:summarizer" (a level anywhere)."""
    if pattern.startswith(("tenant:", "*")):
        return fnmatchcase(scope_path, pattern)
    return fnmatchcase(scope_path, pattern) or fnmatchcase(scope_path, "*/" + pattern)


@dataclass(slots=True)
class Denial:
    reason_code: str
    scope: str
    budget: BudgetRecord | None
    requested: int

    def error(self, unit: str) -> BudgetDenied | NotFound:
        b = self.budget
        remaining = b.remaining if b is not None else 0
        details = {
            "scope": self.scope,
            "unit": unit,
            "requested": self.requested,
            "remaining": remaining,
            "reason_code": self.reason_code,
        }
        if self.reason_code == "BUDGET_NOT_FOUND":
            return NotFound(f"no {unit} budget at any scope of {self.scope}", details=details)
        if b is not None:
            details.update(debt=b.debt, overdraft_limit=b.overdraft_limit, is_over_limit=b.is_over_limit)
        message = (
            f"{self.reason_code} at {self.scope}: requested {format_amount(unit, self.requested)}, "
            f"remaining {format_amount(unit, remaining)}"
        )
        return _DENIALS.get(self.reason_code, BudgetExceeded)(message, details=details)


@retrying_methods  # an optimistic store (Redis) may ask for an operation to run again: see store.Conflict
class Ledger:
    """The budget authority's runtime operations (reserve, commit, release, extend, decide, event, reads).

    `tenant` on every call is the effective tenant (the API key's tenant over HTTP). A subject without a tenant uses
    it; a subject naming another tenant is FORBIDDEN. `clock` returns epoch milliseconds; tests move it, production
    leaves it to the store.
    """

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], int] | None = None,
        default_tenant: str | None = None,
    ) -> None:
        from .admin import Admin  # admin operations share this ledger's store, clock and sweep

        self.store = store
        self.clock = clock
        self.default_tenant = default_tenant
        self.admin = Admin(self)
        self.on_expired: Callable[[int], None] | None = None  # told how many each sweep expired (server metrics)

    # ------------------------------------------------------------------------------------------- transactions
    def _now(self, tx: Transaction) -> int:
        return self.clock() if self.clock is not None else tx.now_ms()

    @contextmanager
    def begin(self, *, sweep: bool = True) -> Iterator[tuple[Transaction, int]]:
        """`with ledger.begin() as (tx, now)`: one store transaction, expired reservations swept first.

        The hot paths (reserve, commit, release, extend) open the store transaction themselves and sweep only when a
        decision depends on remaining budget that expired holds may still occupy; every read sweeps, so nothing
        observes a stale hold.
        """
        with self.store.transaction() as tx:
            now = self._now(tx)
            if sweep:
                self._sweep(tx, now)
            yield tx, now

    def sweep(self) -> int:
        """Expire every reservation past expires_at + grace; returns how many. Servers call this on a timer."""
        with self.store.transaction() as tx:
            return self._sweep(tx, self._now(tx))

    def _sweep(self, tx: Transaction, now: int) -> int:
        total = 0
        while due := tx.due_reservations(now, SWEEP_BATCH):
            for r in due:
                self._expire(tx, r, now)
            total += len(due)
            if len(due) < SWEEP_BATCH:
                break
        if total and self.on_expired is not None:
            self.on_expired(total)
        return total

    def _expire(self, tx: Transaction, r: ReservationRecord, now: int) -> None:
        r.status = "EXPIRED"
        tx.save_reservation(r)
        tx.move(tx.get_budgets(r.unit, r.budgeted_scopes), reserved=-r.estimate)
        events.emit(
            tx, now, "reservation.expired", r.tenant,
            {
                "reservation_id": r.reservation_id, "scope": r.scope_path, "unit": r.unit,
                "estimated_amount": r.estimate, "created_at": iso(r.created_at_ms), "expired_at": iso(now),
                "ttl_ms": r.expires_at_ms - r.created_at_ms, "extensions_used": r.extensions,
            },
            scope=r.scope_path, actor=events.SYSTEM, source="expiry-sweeper", correlation_id=r.reservation_id,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------------ helpers
    def _subject(self, fields: dict[str, Any], tenant: str | None) -> dict[str, Any]:
        """The subject's fields (a request's canonical data, see `canonical`) with the effective tenant filled in."""
        effective = tenant or self.default_tenant
        if "tenant" not in fields:
            if effective is None:
                raise InvalidRequest("subject has no tenant and no effective tenant is configured")
            fields["tenant"] = effective
        elif tenant is not None and fields["tenant"] != tenant:
            raise Forbidden(f"subject.tenant {fields['tenant']!r} is not the authenticated tenant {tenant!r}")
        return fields

    @staticmethod
    def _owned(tx: Transaction, reservation_id: str, tenant: str | None) -> ReservationRecord:
        r = tx.get_reservation(reservation_id)
        if r is None:
            raise NotFound(f"reservation {reservation_id!r} not found", details={"reservation_id": reservation_id})
        if tenant is not None and r.tenant != tenant:
            raise Forbidden(f"reservation {reservation_id!r} belongs to another tenant")
        return r

    @staticmethod
    def _same_payload(stored: str | None, fp: str, key: str) -> None:
        if stored != fp:
            raise IdempotencyMismatch(
                f"idempotency key {key!r} was already used with a different payload",
                details={"idempotency_key": key},
            )

    @classmethod
    def _replay(cls, tx: Transaction, tenant: str, endpoint: str, key: str, fp: str, model: type[M]) -> M | None:
        hit = tx.get_idempotent(tenant, endpoint, key)
        if hit is None:
            return None
        cls._same_payload(hit[0], fp, key)
        return model.model_validate_json(hit[1])

    @staticmethod
    def _remember(tx: Transaction, tenant: str, endpoint: str, key: str, fp: str, response: BaseModel) -> None:
        tx.put_idempotent(tenant, endpoint, key, fp, response.model_dump_json(exclude_none=True))

    @staticmethod
    def _tenant_open(tx: Transaction, tenant: str) -> TenantRecord | None:
        t = tx.get_tenant(tenant)
        if t is not None and t.status == "CLOSED":
            raise TenantClosed(f"tenant {tenant!r} is closed", details={"tenant": tenant})
        return t

    @staticmethod
    def _live(r: ReservationRecord, now: int, *, grace: bool = True) -> None:
        """Refuse finalized or expired reservations (commit/release allow the grace window, extend does not)."""
        if r.status in ("COMMITTED", "RELEASED"):
            raise ReservationFinalized(
                f"reservation {r.reservation_id} is already {r.status}", details={"status": r.status}
            )
        deadline = r.expires_at_ms + (r.grace_ms if grace else 0)
        if r.status == "EXPIRED" or now > deadline:
            raise ReservationExpired(
                f"reservation {r.reservation_id} expired at {iso(r.expires_at_ms)}",
                details={"expires_at_ms": r.expires_at_ms},
            )

    @staticmethod
    def _policy(tx: Transaction, tenant: str, scope_path: str, now: int) -> PolicyRecord | None:
        """The highest-priority active policy whose pattern matches the scope path (store order: priority desc)."""
        for p in tx.policies(tenant):
            if p.status != "ACTIVE" or not pattern_matches(p.scope_pattern, scope_path):
                continue
            start = parse_time_ms(p.body.get("effective_from"), "effective_from")
            until = parse_time_ms(p.body.get("effective_until"), "effective_until")
            if (start is None or start <= now) and (until is None or now <= until):
                return p
        return None

    def _evaluate(
        self, tx: Transaction, unit: str, scopes: list[str], estimate: int, *, blocking: bool = True
    ) -> tuple[Sequence[BudgetRecord], Denial | None]:
        """Check every budgeted scope, root first (§4 order): frozen, closed, over limit, debt, remaining.

        `blocking=False` (events) skips the debt and over-limit checks, which do not block direct debits.
        """
        budgets = tx.get_budgets(unit, scopes)
        if not budgets:
            units = tx.budget_units(scopes)
            if units:
                raise UnitMismatch(
                    f"no {unit} budget at {scopes[-1]} or above; budgets there are in {', '.join(units)}",
                    details={"scope": scopes[-1], "requested_unit": unit, "expected_units": units},
                )
            return budgets, Denial("BUDGET_NOT_FOUND", scopes[-1], None, estimate)
        for b in budgets:
            if b.status == "FROZEN":
                return budgets, Denial("BUDGET_FROZEN", b.scope, b, estimate)
            if b.status == "CLOSED":
                return budgets, Denial("BUDGET_CLOSED", b.scope, b, estimate)
            if blocking:
                if b.is_over_limit:
                    return budgets, Denial("OVERDRAFT_LIMIT_EXCEEDED", b.scope, b, estimate)
                if b.debt > 0 and b.overdraft_limit == 0:
                    return budgets, Denial("DEBT_OUTSTANDING", b.scope, b, estimate)
                if b.remaining < estimate:
                    return budgets, Denial("BUDGET_EXCEEDED", b.scope, b, estimate)
        return budgets, None

    def _move(
        self, tx: Transaction, budgets: Sequence[BudgetRecord], *, reserved: int = 0, spent: int = 0, debt: int = 0
    ) -> None:
        """Apply the same deltas to every budget in one store write (which updates the records too); a ledger whose
        remaining drops to zero or below gets a budget.exhausted event."""
        if not budgets:
            return
        # Each new counter is >= 0 and allocated >= 0, so while their new sum stays within int64 none can leave it
        # and remaining cannot fall below INT64_MIN: one sum per ledger, the full check only near the edge.
        limit = INT64_MAX - max(reserved + spent + debt, 0)
        for b in budgets:
            if b.reserved + b.spent + b.debt > limit:
                check_int64(b, reserved=b.reserved + reserved, spent=b.spent + spent, debt=b.debt + debt)
        tx.move(budgets, reserved=reserved, spent=spent, debt=debt)
        drop = reserved + spent + debt
        if drop > 0:
            for b in budgets:
                if b.remaining <= 0 < b.remaining + drop:
                    self._budget_event(tx, "budget.exhausted", b, threshold=1.0, direction="rising")

    def _budget_event(self, tx: Transaction, event_type: str, b: BudgetRecord, **data: Any) -> None:
        """A budget.* event about one ledger (rare: only computed when a ledger crosses a line)."""
        body = {"scope": b.scope, "unit": b.unit, "allocated": b.allocated, "remaining": b.remaining,
                "spent": b.spent, "reserved": b.reserved, **data}  # fmt: skip
        events.emit(tx, self._now(tx), event_type, b.tenant_id, body, scope=b.scope)

    def _flag_over_limit(self, tx: Transaction, budgets: Sequence[BudgetRecord]) -> None:
        if budgets:
            entering = [b for b in budgets if not b.is_over_limit]
            tx.set_over_limit(budgets[0].unit, [b.scope for b in budgets], True)
            for b in entering:
                self._budget_event(tx, "budget.over_limit_entered", b, debt=b.debt, overdraft_limit=b.overdraft_limit,
                              is_over_limit=True)  # fmt: skip

    def _charge(
        self,
        tx: Transaction,
        budgets: Sequence[BudgetRecord],
        *,
        held: int,
        overage: int,
        policy: str,
        reservation_id: str | None = None,
    ) -> int:
        """Turn a hold of `held` into spend, plus `overage` beyond it, under an overage policy (§4, §9).

        Returns what was charged. REJECT is decided by the caller (commit and event differ).
        """
        if overage == 0 or all(b.remaining >= overage for b in budgets):
            self._move(tx, budgets, reserved=-held, spent=held + overage)
            return held + overage
        short = [b for b in budgets if b.remaining < overage]
        if policy == "ALLOW_WITH_OVERDRAFT" and all(b.overdraft_limit > 0 for b in short):
            for b in short:
                deficit = overage - max(b.remaining, 0)
                if b.debt + deficit > b.overdraft_limit:
                    raise OverdraftLimitExceeded(
                        f"OVERDRAFT_LIMIT_EXCEEDED at {b.scope}: debt {format_amount(b.unit, b.debt)} + "
                        f"{format_amount(b.unit, deficit)} exceeds the overdraft limit "
                        f"{format_amount(b.unit, b.overdraft_limit)}",
                        details={
                            "scope": b.scope, "unit": b.unit, "requested": overage, "remaining": b.remaining,
                            "debt": b.debt, "overdraft_limit": b.overdraft_limit,
                        },
                    )  # fmt: skip
            # spent grows by the funded part only, the rest becomes debt: the ledger identity keeps holding
            for b in budgets:
                funded = min(overage, max(b.remaining, 0))
                self._move(tx, [b], reserved=-held, spent=held + funded, debt=overage - funded)
                if overage > funded:
                    data = {"debt_incurred": overage - funded, "total_debt": b.debt,
                            "overdraft_limit": b.overdraft_limit, "overage_policy": policy}  # fmt: skip
                    if reservation_id is not None:
                        data["reservation_id"] = reservation_id
                    self._budget_event(tx, "budget.debt_incurred", b, **data)
            return held + overage
        # ALLOW_IF_AVAILABLE (and overdraft onto a scope without overdraft): charge what every scope still has
        capped = min(overage, min(max(b.remaining, 0) for b in budgets))
        self._move(tx, budgets, reserved=-held, spent=held + capped)
        self._flag_over_limit(tx, short)
        return held + capped

    # ------------------------------------------------------------------------------------------------ reserve
    def reserve(
        self, request: ReservationCreateRequest | Mapping[str, Any], *, tenant: str | None = None
    ) -> ReservationCreateResponse:
        req = parse(ReservationCreateRequest, request)
        payload, fp = canonical(req)
        subject = self._subject(payload["subject"], tenant)
        owner, key = subject["tenant"], req.idempotency_key
        try:
            with self.store.transaction() as tx:  # the hot path: no sweep first (see begin)
                now = self._now(tx)
                if req.dry_run:  # persists nothing, so a reused key must be looked for up front
                    prior = tx.get_reservation_by_key(owner, key)
                    if prior is not None:
                        return self._replay_reserve(prior, fp, key, now)
                return self._reserve(tx, req, subject, payload["action"], fp, now)
        except (DuplicateKey, CyclesError) as exc:
            # A replay wins over whatever a new reservation met. The key is looked up only now, after the attempt
            # rolled back, which spares every first-time reserve a read.
            if req.dry_run or isinstance(exc, IdempotencyMismatch | InternalError):
                raise
            with self.store.transaction() as tx:
                prior = tx.get_reservation_by_key(owner, key)
                if prior is not None:
                    return self._replay_reserve(prior, fp, key, self._now(tx))
                if isinstance(exc, BudgetDenied):  # nothing changed, but the operator hears of it
                    self._denied(tx, exc, subject, payload["action"], req.estimate.unit, req.estimate.amount)
            raise exc from None

    def _denied(
        self, tx: Transaction, exc: BudgetDenied, subject: dict[str, Any], action: dict[str, Any], unit: str, asked: int
    ) -> None:
        details = exc.details
        scope = details.get("scope") or format_scope(subject)
        data = {
            "scope": scope, "unit": unit, "reason_code": details.get("reason_code", exc.code),
            "requested_amount": asked, "action": action, "subject": subject,
        }  # fmt: skip
        if "remaining" in details:
            data["remaining"] = details["remaining"]
        events.emit(tx, self._now(tx), "reservation.denied", subject["tenant"], data, scope=scope)

    def _replay_reserve(self, prior: ReservationRecord, fp: str, key: str, now: int) -> ReservationCreateResponse:
        self._same_payload(prior.reserve_fingerprint, fp, key)
        replay = ReservationCreateResponse.model_validate_json(prior.reserve_response)
        live = prior.status == "ACTIVE"
        replay.remaining_ttl_ms = max(0, replay.expires_at_ms - now) if live else 0  # type: ignore[operator]
        return replay

    def _reserve(
        self,
        tx: Transaction,
        req: ReservationCreateRequest,
        subject: dict[str, Any],
        action: dict[str, Any],
        fp: str,
        now: int,
    ) -> ReservationCreateResponse:
        scopes = affected_scopes(subject)
        unit, estimate = req.estimate.unit, req.estimate.amount
        owner = subject["tenant"]
        t = tx.get_tenant(owner)
        if t is not None and t.status != "ACTIVE":
            if req.dry_run:
                return ReservationCreateResponse(
                    decision=Decision.DENY, affected_scopes=scopes, scope_path=scopes[-1],
                    reason_code="TENANT_CLOSED" if t.status == "CLOSED" else "TENANT_SUSPENDED",
                )  # fmt: skip
            if t.status == "CLOSED":
                raise TenantClosed(f"tenant {owner!r} is closed", details={"tenant": owner})
            raise Forbidden(f"tenant {owner!r} is suspended: no new reservations")
        budgets, denial = self._evaluate(tx, unit, scopes, estimate)
        if denial is not None and denial.reason_code == "BUDGET_EXCEEDED" and self._sweep(tx, now):
            budgets, denial = self._evaluate(tx, unit, scopes, estimate)  # expired holds came back
        policy = None if denial else self._policy(tx, owner, scopes[-1], now)
        caps = policy.body.get("caps") if policy is not None else None
        if req.dry_run:
            return ReservationCreateResponse.model_validate(
                {
                    "decision": "DENY" if denial else ("ALLOW_WITH_CAPS" if caps else "ALLOW"),
                    "caps": caps,
                    "affected_scopes": scopes,
                    "scope_path": scopes[-1],
                    "reason_code": denial.reason_code if denial else None,
                    "reserved": None if denial else amount(unit, estimate),
                    "balances": [balance_body(b) for b in budgets] or None,
                }
            )
        if denial is not None:
            raise denial.error(unit)
        ttl_override = (policy.body.get("reservation_ttl_override") if policy is not None else None) or {}
        default_ttl = ttl_override.get("default_ttl_ms") or (
            t.default_reservation_ttl_ms if t is not None else DEFAULT_TTL_MS
        )
        max_ttl = ttl_override.get("max_ttl_ms") or (t.max_reservation_ttl_ms if t is not None else DEFAULT_MAX_TTL_MS)
        ttl = min(req.ttl_ms if "ttl_ms" in req.model_fields_set else default_ttl, max_ttl)
        # overage policy precedence: request > policy > ledger (deepest first) > tenant default > ALLOW_IF_AVAILABLE
        overage = req.overage_policy if "overage_policy" in req.model_fields_set else None
        overage = overage or (policy.body.get("commit_overage_policy") if policy is not None else None)
        overage = overage or next((b.commit_overage_policy for b in reversed(budgets) if b.commit_overage_policy), None)
        overage = overage or (t.default_commit_overage_policy if t is not None else None) or "ALLOW_IF_AVAILABLE"
        r = ReservationRecord(
            reservation_id=new_id("res_"),
            tenant=owner,
            idempotency_key=req.idempotency_key,
            subject=subject,
            action=action,
            unit=unit,
            estimate=estimate,
            scope_path=scopes[-1],
            budgeted_scopes=[b.scope for b in budgets],
            status="ACTIVE",
            created_at_ms=now,
            expires_at_ms=now + ttl,
            grace_ms=req.grace_period_ms,
            overage_policy=overage,
            metadata=req.metadata,
        )
        body = {
            "decision": "ALLOW_WITH_CAPS" if caps else "ALLOW",
            "reservation_id": r.reservation_id,
            "reserved": amount(unit, estimate),
            "expires_at_ms": r.expires_at_ms,
            "remaining_ttl_ms": ttl,
            "scope_path": r.scope_path,
            "affected_scopes": scopes,
        }
        if caps:
            body["caps"] = caps
        # model_validate minus its Python wrapper, here and in commit and release: a sixth of the cost, every call
        response = ReservationCreateResponse.__pydantic_validator__.validate_python(body)
        r.reserve_fingerprint, r.reserve_response = fp, stored(body)
        self._move(tx, budgets, reserved=estimate)
        tx.insert_reservation(r)
        return response

    # ------------------------------------------------------------------------------------------------- commit
    def commit(
        self, reservation_id: str, request: CommitRequest | Mapping[str, Any], *, tenant: str | None = None
    ) -> CommitResponse:
        req = parse(CommitRequest, request)
        fp = fingerprint(req)
        with self.store.transaction() as tx:  # the hot path: no sweep first (see begin)
            now = self._now(tx)
            r = self._owned(tx, reservation_id, tenant)
            if r.status == "COMMITTED" and r.finalize_key == req.idempotency_key:
                self._same_payload(r.finalize_fingerprint, fp, req.idempotency_key)
                return CommitResponse.model_validate_json(r.finalize_response)  # type: ignore[arg-type]
            self._tenant_open(tx, r.tenant)
            self._live(r, now)
            actual = req.actual.amount
            if req.actual.unit != r.unit:
                raise UnitMismatch(
                    f"reservation {reservation_id} is in {r.unit}, the commit is in {req.actual.unit}",
                    details={"scope": r.scope_path, "requested_unit": req.actual.unit, "expected_units": [r.unit]},
                )
            budgets = tx.get_budgets(r.unit, r.budgeted_scopes)
            for b in budgets:
                if b.status in ("FROZEN", "CLOSED"):
                    raise Denial("BUDGET_" + b.status, b.scope, b, actual).error(r.unit)
            overage = max(0, actual - r.estimate)
            if overage and r.overage_policy == "REJECT":
                raise BudgetExceeded(
                    f"actual {format_amount(r.unit, actual)} exceeds the reserved "
                    f"{format_amount(r.unit, r.estimate)} and the overage policy is REJECT",
                    details={"scope": r.scope_path, "unit": r.unit, "requested": actual, "reserved": r.estimate},
                )
            if overage:
                if self._sweep(tx, now):  # the overage draws on remaining budget: free expired holds first
                    budgets = tx.get_budgets(r.unit, r.budgeted_scopes)
                debt_before = budgets[-1].debt if budgets else 0
                charged = self._charge(
                    tx, budgets, held=r.estimate, overage=overage, policy=r.overage_policy,
                    reservation_id=r.reservation_id,
                )  # fmt: skip
                events.emit(
                    tx, now, "reservation.commit_overage", r.tenant,
                    {
                        "reservation_id": r.reservation_id, "scope": r.scope_path, "unit": r.unit,
                        "estimated_amount": r.estimate, "actual_amount": actual, "overage": overage,
                        "overage_policy": r.overage_policy,
                        "debt_incurred": (budgets[-1].debt - debt_before) if budgets else 0,
                    },
                    scope=r.scope_path, correlation_id=r.reservation_id,
                )  # fmt: skip
            else:
                self._move(tx, budgets, reserved=-r.estimate, spent=actual)
                charged = actual
            body = {"status": "COMMITTED", "charged": amount(r.unit, charged)}
            if actual < r.estimate:
                body["released"] = amount(r.unit, r.estimate - actual)
            response = CommitResponse.__pydantic_validator__.validate_python(body)
            r.status, r.committed, r.finalized_at_ms = "COMMITTED", charged, now
            r.committed_metadata = req.metadata
            r.finalize_key, r.finalize_fingerprint = req.idempotency_key, fp
            r.finalize_response = stored(body)
            tx.save_reservation(r)
            return response

    # ------------------------------------------------------------------------------------------------ release
    def release(
        self,
        reservation_id: str,
        request: ReleaseRequest | Mapping[str, Any],
        *,
        tenant: str | None = None,
        audited: events.Actor | None = None,
    ) -> ReleaseResponse:
        """`audited`: the admin releasing with its key; the release is then in the audit log, before and after."""
        req = parse(ReleaseRequest, request)
        fp = fingerprint(req)
        with self.store.transaction() as tx:  # the hot path: no sweep first (see begin)
            now = self._now(tx)
            r = self._owned(tx, reservation_id, tenant)
            if r.status == "RELEASED" and r.finalize_key == req.idempotency_key:
                self._same_payload(r.finalize_fingerprint, fp, req.idempotency_key)
                return ReleaseResponse.model_validate_json(r.finalize_response)  # type: ignore[arg-type]
            self._tenant_open(tx, r.tenant)
            self._live(r, now)
            before = detail(r, include=("metadata", "committed_metadata")) if audited is not None else None
            budgets = tx.get_budgets(r.unit, r.budgeted_scopes)
            self._move(tx, budgets, reserved=-r.estimate)
            body = {"status": "RELEASED", "released": amount(r.unit, r.estimate)}
            response = ReleaseResponse.__pydantic_validator__.validate_python(body)
            r.status, r.finalized_at_ms = "RELEASED", now
            if req.reason:
                r.committed_metadata = {"release_reason": req.reason}
            r.finalize_key, r.finalize_fingerprint = req.idempotency_key, fp
            r.finalize_response = stored(body)
            tx.save_reservation(r)
            if before is not None:
                after = detail(r, include=("metadata", "committed_metadata"))
                events.audit(
                    tx, now, "releaseReservation", tenant_id=None, resource_type="reservation",
                    resource_id=reservation_id, before=before.model_dump(mode="json", exclude_none=True),
                    after=after.model_dump(mode="json", exclude_none=True), actor=audited,
                )  # fmt: skip
            return response

    # ------------------------------------------------------------------------------------------------- extend
    def extend(
        self, reservation_id: str, request: ReservationExtendRequest | Mapping[str, Any], *, tenant: str | None = None
    ) -> ReservationExtendResponse:
        req = parse(ReservationExtendRequest, request)
        fp = fingerprint(req)
        with self.store.transaction() as tx:  # the hot path: no sweep first (see begin)
            now = self._now(tx)
            r = self._owned(tx, reservation_id, tenant)
            endpoint = "extend:" + reservation_id
            replay = self._replay(tx, r.tenant, endpoint, req.idempotency_key, fp, ReservationExtendResponse)
            if replay is not None:
                replay.remaining_ttl_ms = max(0, replay.expires_at_ms - now) if r.status == "ACTIVE" else 0
                return replay
            t = self._tenant_open(tx, r.tenant)
            self._live(r, now, grace=False)
            limit = t.max_reservation_extensions if t is not None else DEFAULT_MAX_EXTENSIONS
            if r.extensions >= limit:
                raise MaxExtensionsExceeded(
                    f"reservation {reservation_id} was already extended {r.extensions} times (limit {limit})",
                    details={"extensions": r.extensions, "max_extensions": limit},
                )
            max_ttl = t.max_reservation_ttl_ms if t is not None else DEFAULT_MAX_TTL_MS
            r.expires_at_ms = max(r.expires_at_ms, min(r.expires_at_ms + req.extend_by_ms, now + max_ttl))
            r.extensions += 1
            tx.save_reservation(r)
            response = ReservationExtendResponse.model_validate(
                {"status": "ACTIVE", "expires_at_ms": r.expires_at_ms, "remaining_ttl_ms": r.expires_at_ms - now}
            )
            self._remember(tx, r.tenant, endpoint, req.idempotency_key, fp, response)
            return response

    # ------------------------------------------------------------------------------------------------- decide
    def decide(self, request: DecisionRequest | Mapping[str, Any], *, tenant: str | None = None) -> DecisionResponse:
        req = parse(DecisionRequest, request)
        payload, fp = canonical(req)
        subject = self._subject(payload["subject"], tenant)
        scopes = affected_scopes(subject)
        with self.begin() as (tx, now):
            owner = subject["tenant"]
            replay = self._replay(tx, owner, "decide", req.idempotency_key, fp, DecisionResponse)
            if replay is not None:
                return replay
            t = tx.get_tenant(owner)
            if t is not None and t.status != "ACTIVE":
                reason = "TENANT_CLOSED" if t.status == "CLOSED" else "TENANT_SUSPENDED"
                response = DecisionResponse(decision=Decision.DENY, reason_code=reason, affected_scopes=scopes)
            else:
                _budgets, denial = self._evaluate(tx, req.estimate.unit, scopes, req.estimate.amount)
                policy = None if denial else self._policy(tx, owner, scopes[-1], now)
                caps = policy.body.get("caps") if policy is not None else None
                response = DecisionResponse.model_validate(
                    {
                        "decision": "DENY" if denial else ("ALLOW_WITH_CAPS" if caps else "ALLOW"),
                        "caps": caps,
                        "reason_code": denial.reason_code if denial else None,
                        "affected_scopes": scopes,
                    }
                )
            self._remember(tx, owner, "decide", req.idempotency_key, fp, response)
            return response

    # -------------------------------------------------------------------------------------------------- event
    def event(
        self, request: EventCreateRequest | Mapping[str, Any], *, tenant: str | None = None
    ) -> EventCreateResponse:
        req = parse(EventCreateRequest, request)
        payload, fp = canonical(req)
        subject = self._subject(payload["subject"], tenant)
        scopes = affected_scopes(subject)
        unit, actual = req.actual.unit, req.actual.amount
        with self.begin() as (tx, now):
            owner = subject["tenant"]
            replay = self._replay(tx, owner, "event", req.idempotency_key, fp, EventCreateResponse)
            if replay is not None:
                return replay
            t = self._tenant_open(tx, owner)
            if t is not None and t.status == "SUSPENDED":
                raise Forbidden(f"tenant {owner!r} is suspended")
            budgets, denial = self._evaluate(tx, unit, scopes, actual, blocking=False)
            if denial is not None:
                raise denial.error(unit)
            policy = req.overage_policy
            if policy == "REJECT":
                short = next((b for b in budgets if b.remaining < actual), None)
                if short is not None:
                    raise Denial("BUDGET_EXCEEDED", short.scope, short, actual).error(unit)
            charged = self._charge(tx, budgets, held=0, overage=actual, policy=policy)
            event = EventRecord(
                event_id=new_id("evt_"),
                tenant=owner,
                subject=subject,
                action=payload["action"],
                unit=unit,
                actual=actual,
                charged=charged,
                scope_path=scopes[-1],
                created_at_ms=now,
                metadata=req.metadata,
                extra={"metrics": req.metrics.dump()} if req.metrics else {},
            )
            tx.insert_event(event)
            response = EventCreateResponse.model_validate(
                {
                    "status": "APPLIED",
                    "event_id": event.event_id,
                    "charged": amount(unit, charged),
                    "balances": [balance_body(b) for b in budgets],
                }
            )
            self._remember(tx, owner, "event", req.idempotency_key, fp, response)
            return response

    # -------------------------------------------------------------------------------------------------- reads
    def get_reservation(self, reservation_id: str, *, tenant: str | None = None) -> ReservationDetail:
        """One reservation. `tenant=None` is the admin view (any tenant)."""
        with self.begin() as (tx, _now):
            r = self._owned(tx, reservation_id, tenant)
        if r.status == "EXPIRED":
            raise ReservationExpired(f"reservation {reservation_id} expired at {iso(r.expires_at_ms)}")
        return detail(r, include=("metadata", "committed_metadata"))

    def list_reservations(
        self, query: ReservationQuery | Mapping[str, Any] | None = None, *, tenant: str | None = None
    ) -> ReservationListResponse:
        q = parse(ReservationQuery, query or {})
        if tenant is not None and q.tenant is not None and q.tenant != tenant:
            raise Forbidden(f"tenant {q.tenant!r} is not the authenticated tenant")
        owner = tenant or q.tenant or self.default_tenant
        if owner is None:
            raise InvalidRequest("tenant is required to list reservations")
        windows = {}
        for name, (low, high) in {
            "created": ("from_", "to"),
            "expires": ("expires_from", "expires_to"),
            "finalized": ("finalized_from", "finalized_to"),
        }.items():
            lo, hi = parse_time_ms(getattr(q, low), low.rstrip("_")), parse_time_ms(getattr(q, high), high)
            if lo is not None and hi is not None and lo > hi:
                raise InvalidRequest(f"{low.rstrip('_')} is after {high}")
            windows[name] = (lo, hi)
        flt = ReservationFilter(
            tenant=owner,
            levels={level: v for level in LEVELS if (v := getattr(q, level)) is not None},
            idempotency_key=q.idempotency_key,
            status=q.status,
            **windows,
        )
        query_hash = hashlib.sha256(
            canonical_json([flt.levels, flt.idempotency_key, flt.status, windows, q.sort_by, q.sort_dir]).encode()
        ).hexdigest()[:16]
        after = tuple(decode_cursor(q.cursor, query_hash)) if q.cursor else None
        include = {token.strip() for token in (q.include or "").split(",")}
        with self.begin() as (tx, _now):
            rows = tx.query_reservations(flt, q.sort_by, q.sort_dir == "desc", after, q.limit + 1)  # type: ignore[arg-type]
        more = len(rows) > q.limit
        rows = rows[: q.limit]
        cursor = None
        if more:
            last = rows[-1]
            value = last.estimate if q.sort_by == "reserved" else getattr(last, q.sort_by)
            cursor = encode_cursor([value, last.reservation_id], query_hash)
        return ReservationListResponse(
            reservations=[detail(r, include=include) for r in rows], next_cursor=cursor, has_more=more
        )

    def balances(
        self, query: BalanceQuery | Mapping[str, Any] | None = None, *, tenant: str | None = None
    ) -> BalanceResponse:
        """Runtime shape: the ledgers at the subject's scope (and below, with include_children).
        Admin shape: tenant_id / scope_prefix / unit."""
        q = parse(BalanceQuery, query or {})
        levels = {level: v for level in LEVELS if (v := getattr(q, level)) is not None}
        for name, value in (("tenant", q.tenant), ("tenant_id", q.tenant_id)):
            if tenant is not None and value is not None and value != tenant:
                raise Forbidden(f"{name} {value!r} is not the authenticated tenant")
        if not levels and q.tenant_id is None and q.scope_prefix is None and q.unit is None:
            raise InvalidRequest("give at least one of tenant, workspace, app, workflow, agent, toolset")
        owner = tenant or q.tenant or q.tenant_id or self.default_tenant
        if levels and "tenant" not in levels:
            if owner is None:
                raise InvalidRequest("tenant is required")
            levels["tenant"] = owner
        query_hash = hashlib.sha256(canonical_json(q.model_dump(exclude={"cursor", "limit"})).encode()).hexdigest()[:16]
        after = decode_cursor(q.cursor, query_hash) if q.cursor else None
        with self.begin() as (tx, _now):
            rows = tx.list_budgets(
                tenant_id=owner,
                scope=format_scope(levels) if levels else None,
                children=q.include_children,
                scope_prefix=q.scope_prefix,
                unit=q.unit,
                after=(after[0], after[1]) if after else None,
                limit=q.limit + 1,
            )
        more = len(rows) > q.limit
        rows = rows[: q.limit]
        cursor = encode_cursor([rows[-1].scope, rows[-1].unit], query_hash) if more else None
        return BalanceResponse(balances=[balance(b) for b in rows], next_cursor=cursor, has_more=more)


def detail(r: ReservationRecord, include: Any = ()) -> ReservationDetail:
    return ReservationDetail(
        reservation_id=r.reservation_id,
        status=r.status,  # type: ignore[arg-type]
        subject=r.subject,  # type: ignore[arg-type]
        action=r.action,  # type: ignore[arg-type]
        reserved=Amount(unit=r.unit, amount=r.estimate),  # type: ignore[arg-type]
        created_at_ms=r.created_at_ms,
        expires_at_ms=r.expires_at_ms,
        scope_path=r.scope_path,
        affected_scopes=r.affected_scopes,
        idempotency_key=r.idempotency_key,
        committed=Amount(unit=r.unit, amount=r.committed) if r.committed is not None else None,  # type: ignore[arg-type]
        finalized_at_ms=r.finalized_at_ms,
        metadata=r.metadata if "metadata" in include else None,
        committed_metadata=r.committed_metadata if "committed_metadata" in include else None,
    )
