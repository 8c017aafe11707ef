"""Money at the gateway's edge: decimal strings in and out, integer micro-units inside.

Clients send amounts as decimal strings ("12.5", at most 6 decimals) and get them back with
exactly 6 ("12.500000"); floats never carry money. `convert` applies an exchange rate the way
the wallet does (see wallet.proto, read models): multiplied when the rate's base is the source
currency, divided when it is the target, rounded half away from zero to the micro-unit. An
amount a Money cannot hold after conversion is refused as the wallet refuses it
(FAILED_PRECONDITION, reason AMOUNT_TOO_LARGE, field displayCurrency), not left to protobuf.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import ROUND_HALF_UP, Decimal, localcontext

from gpudeck.gateway.errors import BAD_USER_INPUT, FAILED_PRECONDITION, GatewayError
from gpudeck.kit.errors import echo
from gpudeck.proto.common.v1 import money_pb2

MICRO = 1_000_000
# The largest amount one call may move (the wallet's limit): 1e9 units.
MAX_AMOUNT = 10**15
# What an int64 holds: a Money's `amount`, a Long. Money is checked symmetrically, as the
# wallet checks it.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# The currencies wallets hold and amounts can be shown in (the wallet's CURRENCIES).
CURRENCIES = ("INR", "USD")
# ASCII digits only: str.isdigit-style matching would take "١٢" or "５" as numbers.
_DECIMAL = re.compile(r"^([0-9]+)(?:\.([0-9]*))?$|^\.([0-9]+)$")
_CURRENCY = re.compile(r"^[A-Za-z]{3}$")


def format_micro(amount: int) -> str:
    """12500000 → "12.500000"; -1 → "-0.000001"."""
    sign = "-" if amount < 0 else ""
    whole, fraction = divmod(abs(amount), MICRO)
    return f"{sign}{whole}.{fraction:06d}"


def parse_amount(text: str, *, field: str = "amount", allow_zero: bool = False) -> int:
    """A decimal string → micro-units. Refused with BAD_USER_INPUT naming `field`: anything but
    ASCII digits with an optional point ("1e3", "-5", "1,5", "５"), more than 6 decimals, zero
    (unless `allow_zero`), more than MAX_AMOUNT. Surrounding blanks are ignored and either side
    of the point may be empty ("5." is 5, ".5" is 0.5), as in most decimal inputs."""
    value = text.strip()
    match = _DECIMAL.match(value)
    if match is None:
        if value.startswith("-") and _DECIMAL.match(value[1:]):
            raise _bad(field, f"{field} must be positive, got {echo(text)}")
        raise _bad(field, f'{field} must be a decimal number like "12.50", got {echo(text)}')
    whole = (match.group(1) or "0").lstrip("0") or "0"  # "0005" is 5, not "too large"
    fraction = match.group(2) or match.group(3) or ""
    if len(fraction) > 6:
        raise _bad(field, f"{field} has more than 6 decimal places: {echo(text)}")
    if len(whole) > 16:
        raise _bad(field, f"{field} is too large: at most {format_micro(MAX_AMOUNT)}")
    micro = int(whole) * MICRO + int(fraction.ljust(6, "0"))
    if micro == 0 and not allow_zero:
        raise _bad(field, f"{field} must be positive, got {echo(text)}")
    if micro > MAX_AMOUNT:
        raise _bad(field, f"{field} is too large: at most {format_micro(MAX_AMOUNT)}")
    return micro


def parse_currency(text: str, *, field: str = "currency") -> str:
    """A three-letter code, upper-cased (which ones exist is the wallet's to say)."""
    value = text.strip().upper()
    if not _CURRENCY.match(value):
        raise _bad(field, f"{field} must be a three-letter currency code, got {echo(text)}")
    return value


def check_currency(text: str, *, field: str = "currency") -> str:
    """One of CURRENCIES, upper-cased; BAD_USER_INPUT naming `field` otherwise ("" too)."""
    value = text.strip().upper()
    if value not in CURRENCIES:
        raise _bad(field, f"{field} must be one of {', '.join(CURRENCIES)}, got {echo(text)}")
    return value


def convert(amount: money_pb2.Money, conversion: money_pb2.Conversion | None) -> money_pb2.Money:
    """`amount` in the currency `conversion` leads to (unchanged without one, or when the
    conversion does not start from the amount's currency). FAILED_PRECONDITION naming
    displayCurrency when the result is more than a Money holds (a rate far off): the wallet's
    own answer to the same amount, where an unchecked one would fail as INTERNAL."""
    exact = _exact(amount, conversion)
    if exact is None or conversion is None:
        return amount
    value, target = exact
    with localcontext() as ctx:
        ctx.prec = 60
        micro = int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))
    return _checked(micro, amount.currency, target, conversion)


def convert_parts(
    total: money_pb2.Money,
    parts: Sequence[money_pb2.Money],
    conversion: money_pb2.Conversion | None,
) -> tuple[money_pb2.Money, list[money_pb2.Money]]:
    """`total` and its `parts` converted so that, when the parts add up to the total, the
    converted parts add up to the converted total too (the wallet's `Display.split`: each
    rounded, then the micro-units the rounding lost or invented go to the parts it moved most).
    Each converted on its own, a card's lines missed its total by a micro-unit or two."""
    shown_total = convert(total, conversion)
    shown = [convert(p, conversion) for p in parts]
    gap = shown_total.amount - sum(m.amount for m in shown)
    if not gap or sum(p.amount for p in parts) != total.amount or conversion is None:
        return shown_total, shown
    errors = []
    for p, m in zip(parts, shown, strict=True):
        exact = _exact(p, conversion)
        errors.append(exact[0] - m.amount if exact is not None else Decimal(0))
    order = sorted(range(len(shown)), key=lambda i: errors[i], reverse=gap > 0)
    for i in order[: abs(gap)]:
        micro = shown[i].amount + (1 if gap > 0 else -1)
        shown[i] = _checked(micro, parts[i].currency, shown[i].currency, conversion)
    return shown_total, shown


def _exact(
    amount: money_pb2.Money, conversion: money_pb2.Conversion | None
) -> tuple[Decimal, str] | None:
    """`amount` in the other currency of `conversion`, unrounded, and that currency (None when
    nothing is converted)."""
    if conversion is None or not conversion.rate:
        return None
    rate = Decimal(conversion.rate)
    with localcontext() as ctx:
        ctx.prec = 60
        if amount.currency == conversion.base:
            return Decimal(amount.amount) * rate, conversion.quote
        if amount.currency == conversion.quote:
            return Decimal(amount.amount) / rate, conversion.base
    return None


def _checked(
    micro: int, source: str, target: str, conversion: money_pb2.Conversion
) -> money_pb2.Money:
    if not -INT64_MAX <= micro <= INT64_MAX:
        raise GatewayError(
            f"an amount of {source} is too large to show in {target} at the exchange"
            f" rate {conversion.rate}: check the rate, or leave displayCurrency out",
            code=FAILED_PRECONDITION,
            field="displayCurrency",
            reason="AMOUNT_TOO_LARGE",
        )
    return money_pb2.Money(amount=micro, currency=target)


def _bad(field: str, message: str) -> GatewayError:
    return GatewayError(message, code=BAD_USER_INPUT, field=field)
