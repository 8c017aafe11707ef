"""Exchange rates and conversions: any amount in INR or USD, saying which stored rate was used.

A rate is stored as "1 base = rate quote", with history. Of the rates of a pair whose `as_of`
has come, in either direction, the newest wins (a rate dated in the future is scheduled: it
applies from then on); at the same `as_of`, the one stored last. Converting base → quote
multiplies by the rate; with a quote → base rate, the amount is divided by it instead
(`Conversion.inverse`). Either way the result is rounded half away from zero to the micro-unit,
once per amount. A top-up in another currency multiplies by the rate its transaction records
(`Conversion.factor`: an inverse rate's inverse, rounded to 12 places), so payment × recorded
rate gives its amount. The platform has no internet: rates come from admins (SetExchangeRate)
or from a `RateProvider` a deployment plugs in.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation, localcontext
from typing import Protocol

from gpudeck.kit.errors import FailedPrecondition, InvalidArgument, echo
from gpudeck.wallet.money import check_currency
from gpudeck.wallet.text import check_text

RATE_PLACES = 12  # numeric(24, 12)
RATE_MAX = Decimal(10) ** 12
_PLAIN_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]+)?")
Pair = tuple[str, str]


@dataclass(frozen=True)
class ExchangeRate:
    """A stored rate: 1 `base` = `rate` `quote` as of `as_of`."""

    id: int
    base: str
    quote: str
    rate: Decimal
    as_of: datetime
    source: str = "admin"


@dataclass(frozen=True)
class NewRate:
    """A rate to store (from an admin or a provider); `as_of` None means now."""

    base: str
    quote: str
    rate: Decimal
    as_of: datetime | None = None
    source: str = "admin"


class RateProvider(Protocol):
    """A live feed of exchange rates. None ships: the platform runs without internet access."""

    name: str

    async def fetch(self, pairs: Sequence[Pair]) -> Sequence[NewRate]: ...

    def stored(self) -> None:
        """Called once what the last fetch returned is committed."""


@dataclass(frozen=True)
class Conversion:
    """How amounts in `source` become amounts in `target`; `rate` None means the same currency."""

    source: str
    target: str
    rate: ExchangeRate | None = None
    inverse: bool = False  # the stored rate is target → source: amounts are divided by it

    @property
    def converts(self) -> bool:
        return self.rate is not None

    @property
    def factor(self) -> Decimal:
        """1 `source` = factor `target` (rounded to 12 places when inverted)."""
        if self.rate is None:
            return Decimal(1)
        if not self.inverse:
            return self.rate.rate
        with localcontext() as ctx:
            ctx.prec = 50
            return (1 / self.rate.rate).quantize(Decimal(1).scaleb(-RATE_PLACES), ROUND_HALF_UP)

    def exact(self, amount: int) -> Decimal:
        """`amount` micro-units of `source` in micro-units of `target`, unrounded."""
        if self.rate is None:
            return Decimal(amount)
        with localcontext() as ctx:
            ctx.prec = 60
            return Decimal(amount) / self.rate.rate if self.inverse else amount * self.rate.rate

    def apply(self, amount: int) -> int:
        """`amount` micro-units of `source` in micro-units of `target`, rounded half up."""
        if self.rate is None:
            return amount
        with localcontext() as ctx:
            ctx.prec = 60
            return int(self.exact(amount).quantize(Decimal(1), rounding=ROUND_HALF_UP))

    def apply_factor(self, amount: int) -> int:
        """`amount` × `factor` (the rate as a transaction records it), rounded half up."""
        if self.rate is None:
            return amount
        with localcontext() as ctx:
            ctx.prec = 60
            return int((amount * self.factor).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def conversion(
    source: str,
    target: str,
    latest: Mapping[Pair, ExchangeRate],
    *,
    field: str = "display_currency",
) -> Conversion:
    """The conversion from `source` to `target` with the newest of the latest rates of the two
    directions (`latest`: by pair); FailedPrecondition naming `field` when neither is stored."""
    if source == target:
        return Conversion(source, target)
    direct = latest.get((source, target))
    inverse = latest.get((target, source))
    if direct is not None and (inverse is None or _newer(direct, inverse)):
        return Conversion(source, target, direct)
    if inverse is not None:
        return Conversion(source, target, inverse, inverse=True)
    raise FailedPrecondition(
        f"no exchange rate between {source} and {target} is set",
        field=field,
        reason="EXCHANGE_RATE_MISSING",
    )


def _newer(a: ExchangeRate, b: ExchangeRate) -> bool:
    return (a.as_of, a.id) > (b.as_of, b.id)


def parse_rate(text: str, *, field: str = "rate") -> Decimal:
    """A positive decimal with at most 12 places and below 1e12, written out in ASCII digits
    ("83.25"; not "1_000", "1e3" or "８３"); InvalidArgument otherwise."""
    if not isinstance(text, str) or not _PLAIN_DECIMAL.fullmatch(text.strip()):
        raise InvalidArgument(f"{field} is not a decimal number: {echo(text)}", field=field)
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise InvalidArgument(
            f"{field} is not a decimal number: {echo(text)}", field=field
        ) from None
    if not value.is_finite() or value <= 0:
        raise InvalidArgument(f"{field} must be a positive number, got {echo(text)}", field=field)
    if value >= RATE_MAX:
        raise InvalidArgument(f"{field} is too large: {echo(text)}", field=field)
    if value != value.quantize(Decimal(1).scaleb(-RATE_PLACES), ROUND_HALF_UP):
        raise InvalidArgument(
            f"{field} has more than {RATE_PLACES} decimal places: {echo(text)}", field=field
        )
    return value


def check_new_rate(rate: NewRate) -> NewRate:
    """Validate a rate to store: two different supported currencies and a sane rate."""
    base = check_currency(rate.base, field="base")
    quote = check_currency(rate.quote, field="quote")
    if base == quote:
        raise InvalidArgument(f"base and quote are both {base}", field="quote")
    value = parse_rate(format(rate.rate, "f"))  # plain digits, however the Decimal was made
    source = check_text(rate.source.strip(), "source", max_length=100) or "admin"
    if rate.as_of is not None and rate.as_of.tzinfo is None:
        raise InvalidArgument("as_of must carry a time zone", field="as_of")
    return NewRate(base, quote, value, rate.as_of, source)


def format_rate(rate: Decimal) -> str:
    """A rate as plain decimal text without trailing zeros: 83.500000000000 → "83.5"."""
    if rate == rate.to_integral_value():
        return str(int(rate))
    text = format(rate, "f").rstrip("0")
    return text if not text.endswith(".") else text[:-1]
