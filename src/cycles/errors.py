"""One exception hierarchy for every failure a caller can meet.

Each protocol error code has one class carrying its HTTP status, so the embedded ledger, the HTTP client and the
server raise and map the very same types. Denials (`BudgetDenied` and its subclasses) say which scope refused, how
much was asked and how much was left.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "CyclesError",
    "InvalidRequest",
    "UnitMismatch",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "BudgetDenied",
    "BudgetExceeded",
    "BudgetFrozen",
    "BudgetClosed",
    "OverdraftLimitExceeded",
    "DebtOutstanding",
    "TenantClosed",
    "ToolNotAllowed",
    "ReservationFinalized",
    "IdempotencyMismatch",
    "DuplicateResource",
    "MaxExtensionsExceeded",
    "ReservationExpired",
    "LimitExceeded",
    "InternalError",
    "StoreBusy",
    "StoreUnavailable",
    "TransportError",
    "error_for_code",
]


class CyclesError(Exception):
    """Base class of every cycles error. `code` and `status` follow the Cycles protocol's ErrorResponse."""

    code: ClassVar[str] = "INTERNAL_ERROR"
    status: ClassVar[int] = 500

    def __init__(
        self,
        message: str = "",
        *,
        details: dict[str, Any] | None = None,
        request_id: str | None = None,
        trace_id: str | None = None,
        code: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        self.details: dict[str, Any] = dict(details or {})
        self.request_id = request_id
        self.trace_id = trace_id
        if code is not None:  # an unknown code from a remote server keeps its own name
            self.code = code  # type: ignore[misc]
        if status is not None:
            self.status = status  # type: ignore[misc]

    def to_body(self, request_id: str, trace_id: str | None = None) -> dict[str, Any]:
        """The protocol's ErrorResponse body for this error."""
        body: dict[str, Any] = {"error": self.code, "message": self.message, "request_id": request_id}
        if trace_id:
            body["trace_id"] = trace_id
        if self.details:
            body["details"] = self.details
        return body

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class InvalidRequest(CyclesError):
    code = "INVALID_REQUEST"
    status = 400


class UnitMismatch(CyclesError):
    code = "UNIT_MISMATCH"
    status = 400


class Unauthorized(CyclesError):
    code = "UNAUTHORIZED"
    status = 401


class Forbidden(CyclesError):
    code = "FORBIDDEN"
    status = 403


class NotFound(CyclesError):
    code = "NOT_FOUND"
    status = 404


class BudgetDenied(CyclesError):
    """The budget authority refused the spend. Catch this to handle every kind of denial at once."""

    status = 409

    @property
    def scope(self) -> str | None:
        return self.details.get("scope")

    @property
    def unit(self) -> str | None:
        return self.details.get("unit")

    @property
    def requested(self) -> int | None:
        return self.details.get("requested")

    @property
    def remaining(self) -> int | None:
        return self.details.get("remaining")


class BudgetExceeded(BudgetDenied):
    code = "BUDGET_EXCEEDED"


class BudgetFrozen(BudgetDenied):
    code = "BUDGET_FROZEN"


class BudgetClosed(BudgetDenied):
    code = "BUDGET_CLOSED"


class OverdraftLimitExceeded(BudgetDenied):
    code = "OVERDRAFT_LIMIT_EXCEEDED"


class DebtOutstanding(BudgetDenied):
    code = "DEBT_OUTSTANDING"


class TenantClosed(BudgetDenied):
    code = "TENANT_CLOSED"


class DuplicateResource(CyclesError):
    """Admin plane: a tenant, budget or key with that identity already exists (and differs)."""

    code = "DUPLICATE_RESOURCE"
    status = 409


class ToolNotAllowed(BudgetDenied):
    """The authority answered ALLOW_WITH_CAPS and the caps' tool allowlist / denylist excludes this tool (a guarded
    call whose action kind starts with "tool"). Raised by the client; not a wire error code."""

    code = "TOOL_NOT_ALLOWED"

    @classmethod
    def for_tool(cls, name: str, allowlist: list[str] | None, denylist: list[str] | None) -> ToolNotAllowed:
        listed = f"allowlist {allowlist}" if allowlist else f"denylist {denylist}"
        return cls(
            f"TOOL_NOT_ALLOWED: tool {name!r} is excluded by the budget authority's caps ({listed})",
            details={"tool": name, "tool_allowlist": allowlist, "tool_denylist": denylist},
        )


class ReservationFinalized(CyclesError):
    code = "RESERVATION_FINALIZED"
    status = 409


class IdempotencyMismatch(CyclesError):
    code = "IDEMPOTENCY_MISMATCH"
    status = 409


class MaxExtensionsExceeded(CyclesError):
    code = "MAX_EXTENSIONS_EXCEEDED"
    status = 409


class ReservationExpired(CyclesError):
    code = "RESERVATION_EXPIRED"
    status = 410


class LimitExceeded(CyclesError):
    """Throttling (429), never a budget decision."""

    code = "LIMIT_EXCEEDED"
    status = 429


class InternalError(CyclesError):
    code = "INTERNAL_ERROR"
    status = 500


class StoreBusy(InternalError):
    """The store stayed locked by another writer for longer than its busy timeout."""


class StoreUnavailable(InternalError):
    """The store cannot be reached right now (Redis down, restarting or too slow): 503, try again shortly. The
    operation may or may not have happened; a retry with the same idempotency key settles which."""

    status = 503


class TransportError(CyclesError):
    """The budget authority could not be reached, or answered something that is not the protocol."""

    code = "TRANSPORT_ERROR"
    status = 0


_BY_CODE: dict[str, type[CyclesError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        UnitMismatch,
        Unauthorized,
        Forbidden,
        NotFound,
        BudgetExceeded,
        BudgetFrozen,
        BudgetClosed,
        OverdraftLimitExceeded,
        DebtOutstanding,
        TenantClosed,
        ReservationFinalized,
        IdempotencyMismatch,
        DuplicateResource,
        MaxExtensionsExceeded,
        ReservationExpired,
        LimitExceeded,
        InternalError,
    )
}


def error_for_code(
    code: str,
    message: str = "",
    *,
    status: int | None = None,
    details: dict[str, Any] | None = None,
    request_id: str | None = None,
    trace_id: str | None = None,
) -> CyclesError:
    """Build the typed exception for a protocol error code (an unknown code gives a plain CyclesError)."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return CyclesError(message, code=code, status=status, details=details, request_id=request_id, trace_id=trace_id)
    error = cls(message, details=details, request_id=request_id, trace_id=trace_id)
    if status is not None and status != error.status:  # e.g. 413 carries INVALID_REQUEST
        error.status = status  # type: ignore[misc]
    return error
