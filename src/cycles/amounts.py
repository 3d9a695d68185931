"""Amount helpers: money is integer USD_MICROCENTS (1 USD = 100,000,000), never a float in the ledger."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

from .models import Amount, Unit, parse

__all__ = ["MICROCENTS_PER_USD", "usd", "tokens", "credits", "risk_points", "format_amount", "parse_amount"]

MICROCENTS_PER_USD = 100_000_000


def usd(dollars: float | int | str | Decimal) -> Amount:
    """`usd(0.25)` -> 25,000,000 USD_MICROCENTS. Decimal-exact for what you write; sub-microcent rounds half up."""
    value = Decimal(str(dollars)) * MICROCENTS_PER_USD
    return _amount(Unit.USD_MICROCENTS, int(value.to_integral_value(rounding=ROUND_HALF_UP)))


def _amount(unit: Unit, amount: int) -> Amount:
    """A negative or out-of-range amount is `cycles.InvalidRequest`, as everywhere else."""
    return parse(Amount, {"unit": unit, "amount": amount})


def tokens(count: int) -> Amount:
    return _amount(Unit.TOKENS, count)


def credits(count: int) -> Amount:
    return _amount(Unit.CREDITS, count)


def risk_points(count: int) -> Amount:
    return _amount(Unit.RISK_POINTS, count)


def format_amount(unit: str | Unit, amount: int) -> str:
    """People-facing text: `$0.05`, `4,000 tokens`."""
    unit = Unit(unit)
    if unit is Unit.USD_MICROCENTS:
        dollars = Decimal(amount) / MICROCENTS_PER_USD
        text = f"{abs(dollars):,.8f}".rstrip("0")
        whole, _, frac = text.partition(".")
        text = f"{whole}.{frac.ljust(2, '0')}"
        return f"-${text}" if amount < 0 else f"${text}"
    label = {Unit.TOKENS: "tokens", Unit.CREDITS: "credits", Unit.RISK_POINTS: "risk points"}[unit]
    return f"{amount:,} {label}"


_SUFFIXES = {
    "usd": Unit.USD_MICROCENTS,
    "$": Unit.USD_MICROCENTS,
    "microcents": Unit.USD_MICROCENTS,
    "tokens": Unit.TOKENS,
    "token": Unit.TOKENS,
    "credits": Unit.CREDITS,
    "credit": Unit.CREDITS,
    "risk_points": Unit.RISK_POINTS,
    "riskpoints": Unit.RISK_POINTS,
}


def parse_amount(text: str) -> Amount:
    """Parse `10usd`, `$2.50`, `0.05 usd`, `5000tokens`, `10credits`, `3risk_points`, `500microcents`."""
    raw = text.strip().lower().replace(",", "").replace(" ", "")
    if raw.startswith("$"):
        number, unit_text = raw[1:], "usd"
    else:
        for suffix in sorted(_SUFFIXES, key=len, reverse=True):
            if raw.endswith(suffix):
                number, unit_text = raw[: -len(suffix)], suffix
                break
        else:
            raise ValueError(f"cannot read amount {text!r}: write it like 10usd, $2.50, 5000tokens or 10credits")
    try:
        value = Decimal(number)
    except ArithmeticError:
        raise ValueError(f"cannot read amount {text!r}: {number!r} is not a number") from None
    if not value.is_finite() or value < 0:
        raise ValueError(f"amount {text!r} must be a non-negative number")
    unit = _SUFFIXES[unit_text]
    if unit_text in ("usd", "$"):
        return usd(value)
    if value != value.to_integral_value():
        raise ValueError(f"amount {text!r} must be a whole number of {unit.value}")
    return _amount(unit, int(value))
