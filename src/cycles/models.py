"""Wire types of the Cycles protocol v0 (pydantic v2).

Requests forbid unknown fields (the spec's `additionalProperties: false`); responses ignore them, so our client keeps
working against a newer server. Money and counts are strict int64 integers: no floats, no numeric strings.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from enum import Enum
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainSerializer, ValidationError, model_validator

from .errors import InvalidRequest

INT64_MAX = 2**63 - 1
LEVELS = ("tenant", "workspace", "app", "workflow", "agent", "toolset")
SCOPE_VALUE = re.compile(r"^[a-zA-Z0-9_.-]+$")
_NO_LEVELS = (None,) * len(LEVELS)

NonNegativeInt64 = Annotated[int, Field(strict=True, ge=0, le=INT64_MAX)]
SignedInt64 = Annotated[int, Field(strict=True, ge=-INT64_MAX - 1, le=INT64_MAX)]
IdempotencyKey = Annotated[str, Field(min_length=1, max_length=256)]


def _sorted_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted_keys(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted_keys(v) for v in value]
    return value


def _iso_datetime(value: str) -> str:
    from datetime import datetime

    try:
        if "T" not in value.upper():
            raise ValueError
        datetime.fromisoformat(value.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"must be an ISO-8601 date-time like 2026-01-31T00:00:00Z, not {value!r}") from None
    return value


DateTime = Annotated[str, AfterValidator(_iso_datetime)]


# Free-form maps serialise with sorted keys, so a model's JSON is canonical (RFC 8785 for this protocol's integers
# and strings) and an idempotency fingerprint is a plain hash of it.
JsonObject = Annotated[dict[str, Any], PlainSerializer(_sorted_keys, when_used="json")]


class Unit(str, Enum):
    USD_MICROCENTS = "USD_MICROCENTS"
    TOKENS = "TOKENS"
    CREDITS = "CREDITS"
    RISK_POINTS = "RISK_POINTS"


class Decision(str, Enum):
    ALLOW = "ALLOW"
    ALLOW_WITH_CAPS = "ALLOW_WITH_CAPS"
    DENY = "DENY"


class OveragePolicy(str, Enum):
    REJECT = "REJECT"
    ALLOW_IF_AVAILABLE = "ALLOW_IF_AVAILABLE"
    ALLOW_WITH_OVERDRAFT = "ALLOW_WITH_OVERDRAFT"


class ReservationStatus(str, Enum):
    ACTIVE = "ACTIVE"
    COMMITTED = "COMMITTED"
    RELEASED = "RELEASED"
    EXPIRED = "EXPIRED"


# Fields are typed with Literals (validated faster than Enums); the Enums above accept and compare equal to them.
UnitName = Literal["USD_MICROCENTS", "TOKENS", "CREDITS", "RISK_POINTS"]
DecisionName = Literal["ALLOW", "ALLOW_WITH_CAPS", "DENY"]
OveragePolicyName = Literal["REJECT", "ALLOW_IF_AVAILABLE", "ALLOW_WITH_OVERDRAFT"]
StatusName = Literal["ACTIVE", "COMMITTED", "RELEASED", "EXPIRED"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=True)

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="ignore", use_enum_values=True)

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


# ----------------------------------------------------------------------------------------------------- building blocks


class Amount(_Request):
    unit: UnitName
    amount: NonNegativeInt64


class SignedAmount(_Request):
    unit: UnitName
    amount: SignedInt64


class Subject(_Request):
    """Who spends: the six standard levels (at least one) and free-form dimensions that never affect scopes."""

    # scope values: letters, digits, '_', '.' and '-' (checked by pydantic-core, not in Python: this is hot)
    tenant: str | None = Field(None, max_length=128, pattern=SCOPE_VALUE.pattern)
    workspace: str | None = Field(None, max_length=128, pattern=SCOPE_VALUE.pattern)
    app: str | None = Field(None, max_length=128, pattern=SCOPE_VALUE.pattern)
    workflow: str | None = Field(None, max_length=128, pattern=SCOPE_VALUE.pattern)
    agent: str | None = Field(None, max_length=128, pattern=SCOPE_VALUE.pattern)
    toolset: str | None = Field(None, max_length=128, pattern=SCOPE_VALUE.pattern)
    dimensions: (
        Annotated[dict[str, Annotated[str, Field(max_length=256)]], PlainSerializer(_sorted_keys, when_used="json")]
        | None
    ) = Field(None, max_length=16)

    @model_validator(mode="after")
    def _at_least_one_level(self) -> Subject:
        if (self.tenant, self.workspace, self.app, self.workflow, self.agent, self.toolset) == _NO_LEVELS:
            raise ValueError("subject needs at least one of " + ", ".join(LEVELS))
        return self


class Action(_Request):
    kind: str = Field(max_length=64)
    name: str = Field(max_length=256)
    tags: list[Annotated[str, Field(max_length=64)]] | None = Field(None, max_length=10)
    policy_keys: list[str] | None = Field(None, exclude=True)  # v0.1.26, tolerated and ignored


class Caps(_Request):
    max_tokens: NonNegativeInt64 | None = None
    max_steps_remaining: NonNegativeInt64 | None = None
    tool_allowlist: list[Annotated[str, Field(max_length=256)]] | None = Field(None, max_length=256)
    tool_denylist: list[Annotated[str, Field(max_length=256)]] | None = Field(None, max_length=256)
    cooldown_ms: NonNegativeInt64 | None = None

    def allows_tool(self, name: str) -> bool:
        """A non-empty allowlist wins over the denylist; names compare case-sensitively."""
        if self.tool_allowlist:
            return name in self.tool_allowlist
        return not (self.tool_denylist and name in self.tool_denylist)


class Balance(_Response):
    scope: str
    scope_path: str
    remaining: SignedAmount
    reserved: Amount | None = None
    spent: Amount | None = None
    allocated: Amount | None = None
    debt: Amount | None = None
    overdraft_limit: Amount | None = None
    is_over_limit: bool = False


class StandardMetrics(_Request):
    tokens_input: NonNegativeInt64 | None = None
    tokens_output: NonNegativeInt64 | None = None
    latency_ms: NonNegativeInt64 | None = None
    model_version: str | None = Field(None, max_length=128)
    custom: JsonObject | None = None


# ------------------------------------------------------------------------------------------------------------ runtime


class ReservationCreateRequest(_Request):
    idempotency_key: IdempotencyKey
    subject: Subject
    action: Action
    estimate: Amount
    ttl_ms: int = Field(60_000, strict=True, ge=1_000, le=86_400_000)
    grace_period_ms: int = Field(5_000, strict=True, ge=0, le=60_000)
    overage_policy: OveragePolicyName = "ALLOW_IF_AVAILABLE"
    dry_run: bool = Field(False, strict=True)
    metadata: JsonObject | None = None
    observe_mode: str | None = Field(None, exclude=True)  # v0.1.26, tolerated and ignored


class ReservationCreateResponse(_Response):
    decision: DecisionName
    affected_scopes: list[str]
    reservation_id: str | None = None
    reserved: Amount | None = None
    expires_at_ms: int | None = None
    remaining_ttl_ms: int | None = None
    scope_path: str | None = None
    caps: Caps | None = None
    balances: list[Balance] | None = None
    reason_code: str | None = None
    retry_after_ms: int | None = None


class CommitRequest(_Request):
    idempotency_key: IdempotencyKey
    actual: Amount
    metrics: StandardMetrics | None = None
    metadata: JsonObject | None = None


class CommitResponse(_Response):
    status: Literal["COMMITTED"] = "COMMITTED"
    charged: Amount
    released: Amount | None = None
    balances: list[Balance] | None = None


class ReleaseRequest(_Request):
    idempotency_key: IdempotencyKey
    reason: str | None = Field(None, max_length=256)


class ReleaseResponse(_Response):
    status: Literal["RELEASED"] = "RELEASED"
    released: Amount
    balances: list[Balance] | None = None


class ReservationExtendRequest(_Request):
    idempotency_key: IdempotencyKey
    extend_by_ms: int = Field(strict=True, ge=1, le=86_400_000)
    metadata: JsonObject | None = None


class ReservationExtendResponse(_Response):
    status: Literal["ACTIVE"] = "ACTIVE"
    expires_at_ms: int
    remaining_ttl_ms: int | None = None
    balances: list[Balance] | None = None


class DecisionRequest(_Request):
    idempotency_key: IdempotencyKey
    subject: Subject
    action: Action
    estimate: Amount
    metadata: JsonObject | None = None


class DecisionResponse(_Response):
    decision: DecisionName
    caps: Caps | None = None
    reason_code: str | None = None
    retry_after_ms: int | None = None
    affected_scopes: list[str] | None = None


class EventCreateRequest(_Request):
    idempotency_key: IdempotencyKey
    subject: Subject
    action: Action
    actual: Amount
    overage_policy: OveragePolicyName = "ALLOW_IF_AVAILABLE"
    metrics: StandardMetrics | None = None
    client_time_ms: NonNegativeInt64 | None = None
    metadata: JsonObject | None = None


class EventCreateResponse(_Response):
    status: Literal["APPLIED"] = "APPLIED"
    event_id: str
    charged: Amount | None = None
    balances: list[Balance] | None = None


class ReservationDetail(_Response):
    reservation_id: str
    status: StatusName
    subject: Subject
    action: Action
    reserved: Amount
    created_at_ms: int
    expires_at_ms: int
    scope_path: str
    affected_scopes: list[str]
    idempotency_key: str | None = None
    committed: Amount | None = None
    finalized_at_ms: int | None = None
    metadata: JsonObject | None = None
    committed_metadata: JsonObject | None = None


ReservationSummary = ReservationDetail


class ReservationListResponse(_Response):
    reservations: list[ReservationDetail]
    next_cursor: str | None = None
    has_more: bool | None = None


class BalanceResponse(_Response):
    balances: list[Balance]
    next_cursor: str | None = None
    has_more: bool | None = None


class ReservationQuery(_Request):
    """Filters, sort and page of GET /v1/reservations. An empty string means unset."""

    idempotency_key: str | None = None
    status: StatusName | None = None
    tenant: str | None = None
    workspace: str | None = None
    app: str | None = None
    workflow: str | None = None
    agent: str | None = None
    toolset: str | None = None
    from_: str | None = Field(None, alias="from")
    to: str | None = None
    expires_from: str | None = None
    expires_to: str | None = None
    finalized_from: str | None = None
    finalized_to: str | None = None
    sort_by: Literal[
        "reservation_id", "tenant", "scope_path", "status", "reserved", "created_at_ms", "expires_at_ms"
    ] = "created_at_ms"
    sort_dir: Literal["asc", "desc"] = "desc"
    include: str | None = None
    limit: int = Field(50, ge=1, le=200)
    cursor: str | None = None

    model_config = ConfigDict(extra="ignore", populate_by_name=True, use_enum_values=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_is_unset(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v != ""}
        return data


class BalanceQuery(_Request):
    """GET /v1/balances: the runtime shape (subject levels) or the admin shape (tenant_id, scope_prefix, unit)."""

    tenant: str | None = None
    workspace: str | None = None
    app: str | None = None
    workflow: str | None = None
    agent: str | None = None
    toolset: str | None = None
    include_children: bool = False
    tenant_id: str | None = None
    scope_prefix: str | None = None
    unit: UnitName | None = None
    limit: int = Field(50, ge=1, le=200)
    cursor: str | None = None

    model_config = ConfigDict(extra="ignore", use_enum_values=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_is_unset(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v != ""}
        return data


# -------------------------------------------------------------------------------------------------------------- admin

TenantStatus = Literal["ACTIVE", "SUSPENDED", "CLOSED"]
BudgetStatus = Literal["ACTIVE", "FROZEN", "CLOSED"]
RolloverPolicy = Literal["NONE", "CARRY_FORWARD", "CAP_AT_ALLOCATED"]
ExpiryPolicy = Literal["AUTO_RELEASE", "MANUAL_CLEANUP", "GRACE_ONLY"]
FundingOperation = Literal["CREDIT", "DEBIT", "RESET", "REPAY_DEBT", "RESET_SPENT"]
Ttl = Annotated[int, Field(strict=True, ge=1_000, le=86_400_000)]

PERMISSIONS = (
    "reservations:create", "reservations:commit", "reservations:release", "reservations:extend",
    "reservations:list", "balances:read", "budgets:read", "budgets:write", "policies:read", "policies:write",
    "webhooks:read", "webhooks:write", "events:read", "admin:read", "admin:write", "admin:tenants:read",
    "admin:tenants:write", "admin:budgets:read", "admin:budgets:write", "admin:policies:read",
    "admin:policies:write", "admin:apikeys:read", "admin:apikeys:write", "admin:webhooks:read",
    "admin:webhooks:write", "admin:events:read", "admin:audit:read",
)  # fmt: skip
DEFAULT_PERMISSIONS = (
    "reservations:create", "reservations:commit", "reservations:release", "reservations:extend",
    "reservations:list", "balances:read", "budgets:read", "budgets:write", "policies:read", "policies:write",
)  # fmt: skip
Permission = Literal[PERMISSIONS]  # type: ignore[valid-type]


class TenantCreateRequest(_Request):
    tenant_id: str = Field(pattern=r"^[a-z0-9-]+$", min_length=3, max_length=64)
    name: str = Field(max_length=256)
    parent_tenant_id: str | None = None
    metadata: dict[str, str] | None = None
    default_commit_overage_policy: OveragePolicyName | None = None
    default_reservation_ttl_ms: Ttl | None = None
    max_reservation_ttl_ms: Ttl | None = None
    max_reservation_extensions: NonNegativeInt64 | None = None
    reservation_expiry_policy: ExpiryPolicy | None = None


class TenantUpdateRequest(_Request):
    name: str | None = Field(None, max_length=256)
    status: TenantStatus | None = None
    metadata: dict[str, str] | None = None
    default_commit_overage_policy: OveragePolicyName | None = None
    default_reservation_ttl_ms: Ttl | None = None
    max_reservation_ttl_ms: Ttl | None = None
    max_reservation_extensions: NonNegativeInt64 | None = None
    reservation_expiry_policy: ExpiryPolicy | None = None


class Tenant(_Response):
    tenant_id: str
    name: str
    status: TenantStatus
    created_at: str
    parent_tenant_id: str | None = None
    default_commit_overage_policy: OveragePolicyName | None = None
    default_reservation_ttl_ms: int = 60_000
    max_reservation_ttl_ms: int = 3_600_000
    max_reservation_extensions: int = 10
    reservation_expiry_policy: ExpiryPolicy = "AUTO_RELEASE"
    metadata: dict[str, str] | None = None
    updated_at: str | None = None
    suspended_at: str | None = None
    closed_at: str | None = None


class TenantListResponse(_Response):
    tenants: list[Tenant]
    next_cursor: str | None = None
    has_more: bool | None = None


class BudgetCreateRequest(_Request):
    scope: str = Field(min_length=1, max_length=1024)
    unit: UnitName
    allocated: Amount
    tenant_id: str | None = None
    overdraft_limit: Amount | None = None
    commit_overage_policy: OveragePolicyName | None = None
    rollover_policy: RolloverPolicy = "NONE"
    period_start: DateTime | None = None
    period_end: DateTime | None = None
    metadata: JsonObject | None = None


class BudgetUpdateRequest(_Request):
    overdraft_limit: Amount | None = None
    commit_overage_policy: OveragePolicyName | None = None
    metadata: JsonObject | None = None


class BudgetLedger(_Response):
    ledger_id: str
    scope: str
    unit: UnitName
    allocated: Amount
    remaining: SignedAmount
    status: BudgetStatus
    created_at: str
    tenant_id: str | None = None
    scope_path: str | None = None
    reserved: Amount | None = None
    spent: Amount | None = None
    debt: Amount | None = None
    overdraft_limit: Amount | None = None
    is_over_limit: bool = False
    commit_overage_policy: OveragePolicyName | None = None
    rollover_policy: RolloverPolicy | None = None
    period_start: DateTime | None = None
    period_end: DateTime | None = None
    updated_at: str | None = None


class BudgetListResponse(_Response):
    ledgers: list[BudgetLedger]
    next_cursor: str | None = None
    has_more: bool | None = None


class BudgetFundingRequest(_Request):
    operation: FundingOperation
    amount: Amount
    spent: Amount | None = None
    reason: str | None = Field(None, max_length=512)
    idempotency_key: IdempotencyKey | None = None
    metadata: JsonObject | None = None


class BudgetFundingResponse(_Response):
    operation: str
    previous_allocated: Amount
    new_allocated: Amount
    previous_remaining: SignedAmount
    new_remaining: SignedAmount
    previous_debt: Amount | None = None
    new_debt: Amount | None = None
    previous_spent: Amount | None = None
    new_spent: Amount | None = None
    timestamp: str | None = None


class ApiKeyCreateRequest(_Request):
    tenant_id: str = Field(min_length=1, max_length=64)
    name: str = Field(min_length=1, max_length=256)
    description: str | None = Field(None, max_length=1024)
    permissions: list[Permission] | None = None  # type: ignore[valid-type]
    scope_filter: list[str] | None = None
    expires_at: DateTime | None = None
    metadata: JsonObject | None = None


class ApiKeyUpdateRequest(_Request):
    name: str | None = Field(None, max_length=256)
    description: str | None = Field(None, max_length=1024)
    permissions: list[Permission] | None = None  # type: ignore[valid-type]
    scope_filter: list[str] | None = None
    metadata: JsonObject | None = None


class ApiKey(_Response):
    key_id: str
    tenant_id: str
    key_prefix: str
    status: Literal["ACTIVE", "REVOKED", "EXPIRED"]
    created_at: str
    expires_at: str
    name: str | None = None
    description: str | None = None
    permissions: list[str] | None = None
    scope_filter: list[str] | None = None
    last_used_at: str | None = None
    revoked_at: str | None = None
    revoked_reason: str | None = None
    metadata: JsonObject | None = None


class ApiKeyCreateResponse(_Response):
    key_id: str
    key_secret: str
    key_prefix: str
    tenant_id: str
    created_at: str
    expires_at: str
    permissions: list[str] | None = None


class ApiKeyListResponse(_Response):
    keys: list[ApiKey]
    next_cursor: str | None = None
    has_more: bool | None = None


class RateLimits(_Request):
    max_reservations_per_minute: int | None = Field(None, strict=True, ge=1)
    max_commits_per_minute: int | None = Field(None, strict=True, ge=1)


class ReservationTtlOverride(_Request):
    default_ttl_ms: int | None = Field(None, strict=True, ge=1_000, le=86_400_000)
    max_ttl_ms: int | None = Field(None, strict=True, ge=1_000, le=86_400_000)
    max_extensions: NonNegativeInt64 | None = None


class PolicyCreateRequest(_Request):
    """Caps (and overage policy) for the scopes a pattern matches: "tenant:acme" (exactly), "tenant:acme/*"
    (everything below), "agent:*" (that level anywhere). The highest priority matching policy wins."""

    name: str = Field(min_length=1, max_length=256)
    scope_pattern: str = Field(min_length=1, max_length=1024)
    tenant_id: str | None = None
    description: str | None = Field(None, max_length=1024)
    priority: NonNegativeInt64 = 0
    caps: Caps | None = None
    commit_overage_policy: OveragePolicyName | None = None
    reservation_ttl_override: ReservationTtlOverride | None = None
    rate_limits: RateLimits | None = None
    effective_from: DateTime | None = None
    effective_until: DateTime | None = None


class PolicyUpdateRequest(_Request):
    name: str | None = Field(None, max_length=256)
    description: str | None = Field(None, max_length=1024)
    priority: NonNegativeInt64 | None = None
    caps: Caps | None = None
    commit_overage_policy: OveragePolicyName | None = None
    reservation_ttl_override: ReservationTtlOverride | None = None
    rate_limits: RateLimits | None = None
    effective_from: DateTime | None = None
    effective_until: DateTime | None = None
    status: Literal["ACTIVE", "DISABLED"] | None = None


class Policy(_Response):
    policy_id: str
    scope_pattern: str
    status: Literal["ACTIVE", "DISABLED"]
    created_at: str
    name: str | None = None
    description: str | None = None
    priority: int = 0
    caps: Caps | None = None
    commit_overage_policy: OveragePolicyName | None = None
    reservation_ttl_override: ReservationTtlOverride | None = None
    rate_limits: RateLimits | None = None
    effective_from: DateTime | None = None
    effective_until: DateTime | None = None
    updated_at: str | None = None


class PolicyListResponse(_Response):
    policies: list[Policy]
    next_cursor: str | None = None
    has_more: bool | None = None


M = TypeVar("M", bound=BaseModel)


def parse(model: type[M], value: M | Mapping[str, Any]) -> M:
    """Accept a model or a plain mapping; malformed input becomes INVALID_REQUEST listing what is wrong."""
    if isinstance(value, model):
        return value
    try:
        return model.__pydantic_validator__.validate_python(value)  # model_validate without its wrapper
    except ValidationError as exc:
        problems = [
            {"field": ".".join(str(p) for p in err["loc"]) or "(body)", "problem": err["msg"]}
            for err in exc.errors(include_url=False, include_input=False, include_context=False)
        ]
        text = "; ".join(f"{p['field']}: {p['problem']}" for p in problems)
        raise InvalidRequest(f"invalid {model.__name__}: {text}", details={"errors": problems}) from None
