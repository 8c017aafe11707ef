"""A RateProvider that reads a JSON file an operator keeps up to date (from any feed they have:
the platform itself has no internet). Set GPUDECK_RATES_FILE; the wallet imports it every
GPUDECK_RATES_INTERVAL seconds (default 300) when the file has changed.

    {"as_of": "2026-11-22T09:00:00Z", "rates": {"USD/INR": "83.25"}}

`as_of` is optional (the file's modification time otherwise). Each rate is stored with history
and the source "file:<name>", like one set by SetExchangeRate. A file that cannot be read or
parsed is logged and skipped: the rates stored before stay in use.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from gpudeck.kit.errors import InvalidArgument
from gpudeck.wallet.rates import NewRate, Pair, check_new_rate

log = logging.getLogger(__name__)


class RatesFileError(ValueError):
    pass


class FileRateProvider:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = f"file:{path.name}"
        self._stored_stamp: float | None = None  # mtime of the version last stored
        self._fetched_stamp: float | None = None  # mtime of the version last read

    async def fetch(self, pairs: Sequence[Pair]) -> Sequence[NewRate]:
        """The file's rates for `pairs` (all of them when empty); nothing when the version
        stored last (`stored`) is still the file's. Raises RatesFileError for a file that is
        not as documented."""
        try:
            stamp = self.path.stat().st_mtime
        except OSError as exc:
            raise RatesFileError(f"cannot read {self.path}: {exc.strerror}") from None
        if stamp == self._stored_stamp:
            return []
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise RatesFileError(f"cannot read {self.path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise RatesFileError(f"{self.path} is not UTF-8 text") from None
        rates = parse(text, default_as_of=datetime.fromtimestamp(stamp, UTC))
        self._fetched_stamp = stamp
        wanted = set(pairs)
        return [r for r in rates if not wanted or (r.base, r.quote) in wanted]

    def stored(self) -> None:
        """What the last fetch returned is committed: until the file changes, fetch returns
        nothing. (A fetch whose rates were not stored, say the transaction failed, is read
        again next time.)"""
        self._stored_stamp = self._fetched_stamp


def parse(text: str, *, default_as_of: datetime) -> list[NewRate]:
    try:
        document = json.loads(text)
    except ValueError as exc:  # JSONDecodeError, or a number past Python's 4,300 digits
        raise RatesFileError(f"not JSON: {exc}") from None
    except RecursionError:  # "[[[[…": nested deeper than the parser goes
        raise RatesFileError("not JSON as documented: nested too deep") from None
    if not isinstance(document, dict) or not isinstance(document.get("rates"), dict):
        raise RatesFileError('expected {"rates": {"USD/INR": "83.25", ...}}')
    as_of = default_as_of
    if document.get("as_of") is not None:
        try:
            as_of = datetime.fromisoformat(str(document["as_of"]).replace("Z", "+00:00"))
        except ValueError:
            raise RatesFileError(f"as_of is not an ISO 8601 time: {document['as_of']!r}") from None
        if as_of.tzinfo is None:
            raise RatesFileError("as_of must carry a time zone")
    rates = []
    for pair, value in document["rates"].items():
        base, _, quote = str(pair).partition("/")
        try:
            rate = Decimal(str(value))
        except ArithmeticError:
            raise RatesFileError(f"rate {pair!r}: {value!r} is not a number") from None
        try:
            rates.append(check_new_rate(NewRate(base, quote, rate, as_of)))
        except (InvalidArgument, ArithmeticError) as exc:
            raise RatesFileError(f"rate {pair!r}: {exc}") from None
    return rates
