"""Money rules: integer micro-units, the currencies we hold, and decimal text for people.

1 unit = 1,000,000 micro-units. Conversions round half away from zero to the micro-unit.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

from gpudeck.kit.errors import InvalidArgument, echo

MICRO = 1_000_000
CURRENCIES = ("INR", "USD")
# The largest amount one call may move: 1e9 units. Sums of many stay far inside int64.
MAX_AMOUNT = 10**15


def check_currency(currency: str, *, field: str = "currency") -> str:
    code = currency.strip().upper()
    if code not in CURRENCIES:
        raise InvalidArgument(
            f"{field} must be one of {', '.join(CURRENCIES)}, got {echo(currency)}", field=field
        )
    return code


def check_amount(amount: int, *, field: str = "amount", allow_negative: bool = False) -> int:
    """A positive (or, for corrections, non-zero) amount no larger than MAX_AMOUNT."""
    if amount == 0 or (amount < 0 and not allow_negative):
        rule = "must not be zero" if allow_negative else "must be positive"
        raise InvalidArgument(f"{field} {rule}, got {format_micro(amount)}", field=field)
    if abs(amount) > MAX_AMOUNT:
        raise InvalidArgument(
            f"{field} is too large: at most {format_micro(MAX_AMOUNT)} per call", field=field
        )
    return amount


def format_micro(amount: int) -> str:
    """12500000 → "12.500000"."""
    sign = "-" if amount < 0 else ""
    whole, frac = divmod(abs(amount), MICRO)
    return f"{sign}{whole}.{frac:06d}"


def convert(amount: int, rate: Decimal) -> int:
    """`amount` times `rate`, rounded half away from zero to the micro-unit."""
    return int((Decimal(amount) * rate).quantize(Decimal(1), rounding=ROUND_HALF_UP))
