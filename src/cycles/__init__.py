"""cycles: hard budgets for AI agents, on the Cycles protocol v0."""

from .amounts import credits, format_amount, parse_amount, risk_points, tokens, usd
from .errors import *  # noqa: F403
from .errors import __all__ as _errors_all
from .models import Action, Amount, Balance, Caps, Decision, OveragePolicy, Subject, Unit

__version__ = "0.1.0"

__all__ = [
    "Action",
    "Amount",
    "Balance",
    "Caps",
    "Decision",
    "OveragePolicy",
    "Subject",
    "Unit",
    "credits",
    "format_amount",
    "parse_amount",
    "risk_points",
    "tokens",
    "usd",
    *_errors_all,
]
