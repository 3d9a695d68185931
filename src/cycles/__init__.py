"""cycles: hard budgets for AI agents, on the Cycles protocol v0.

Reserve a call's worst case before it runs, commit what it really cost, release what it did not use, against
hierarchical budgets (tenant > workspace > app > workflow > agent > toolset).
"""

from .amounts import MICROCENTS_PER_USD, credits, format_amount, parse_amount, risk_points, tokens, usd
from .client import Client, Stats, default_client, set_default_client
from .context import current_reservation, current_run, current_scope, scope, wrap
from .errors import (
    BudgetClosed,
    BudgetDenied,
    BudgetExceeded,
    BudgetFrozen,
    CyclesError,
    DebtOutstanding,
    DuplicateResource,
    Forbidden,
    IdempotencyMismatch,
    InternalError,
    InvalidRequest,
    LimitExceeded,
    MaxExtensionsExceeded,
    NotFound,
    OverdraftLimitExceeded,
    ReservationExpired,
    ReservationFinalized,
    StoreBusy,
    TenantClosed,
    ToolNotAllowed,
    TransportError,
    Unauthorized,
    UnitMismatch,
)
from .guard import Reservation, Run, guard, run
from .models import Action, Amount, Balance, Caps, Decision, OveragePolicy, Subject, Unit

__version__ = "0.1.0"

__all__ = [
    # client and guard
    "Client",
    "Reservation",
    "Run",
    "Stats",
    "guard",
    "run",
    "scope",
    "wrap",
    "current_reservation",
    "current_run",
    "current_scope",
    "default_client",
    "set_default_client",
    # amounts
    "MICROCENTS_PER_USD",
    "usd",
    "tokens",
    "credits",
    "risk_points",
    "format_amount",
    "parse_amount",
    # wire types
    "Action",
    "Amount",
    "Balance",
    "Caps",
    "Decision",
    "OveragePolicy",
    "Subject",
    "Unit",
    # errors
    "CyclesError",
    "BudgetDenied",
    "BudgetExceeded",
    "BudgetFrozen",
    "BudgetClosed",
    "DebtOutstanding",
    "OverdraftLimitExceeded",
    "TenantClosed",
    "ToolNotAllowed",
    "ReservationExpired",
    "ReservationFinalized",
    "IdempotencyMismatch",
    "MaxExtensionsExceeded",
    "DuplicateResource",
    "InvalidRequest",
    "UnitMismatch",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "LimitExceeded",
    "InternalError",
    "StoreBusy",
    "TransportError",
]
