"""What the dashboards read, computed from rollups: period totals, spending per day and month by
resource type, the run rate and how long the balance lasts. Plain values in and out, no I/O.

Days are UTC calendar days, periods include both ends: "last 7 days" is today and the 6 days
before it, compared with the 7 days before those; "last month" is the last calendar month,
compared with the month before it. A change in % is None when the earlier period spent nothing.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from gpudeck.kit.errors import InvalidArgument
from gpudeck.wallet.alerts import SERVICE_STATUS, hours_remaining
from gpudeck.wallet.metering import RESOURCE_TYPES

HOURS_PER_DAY = 24
HOURS_PER_MONTH = 24 * 30
MAX_TREND_DAYS = 366
MAX_MONTHS = 36


@dataclass(frozen=True)
class DayAmount:
    """One rollup row: what was spent on a resource type on a day (or in a month: its 1st)."""

    day: date
    resource_type: str
    amount: int


@dataclass(frozen=True)
class Period:
    """From `start` to `end`, both included."""

    start: date
    end: date

    def __contains__(self, day: object) -> bool:
        return isinstance(day, date) and self.start <= day <= self.end


def month_start(day: date, months: int = 0) -> date:
    """The first day of `day`'s month, moved by `months` (negative: earlier)."""
    index = day.year * 12 + day.month - 1 + months
    return date(index // 12, index % 12 + 1, 1)


@dataclass(frozen=True)
class Periods:
    """The periods the expenditure card compares, for the day `ending(today)`."""

    current_month: Period
    last_7_days: Period
    previous_7_days: Period
    last_30_days: Period
    last_month: Period
    month_before: Period

    @classmethod
    def ending(cls, today: date) -> Periods:
        this_month = month_start(today)
        last_month = month_start(today, -1)
        return cls(
            current_month=Period(this_month, today),
            last_7_days=Period(today - timedelta(days=6), today),
            previous_7_days=Period(today - timedelta(days=13), today - timedelta(days=7)),
            last_30_days=Period(today - timedelta(days=29), today),
            last_month=Period(last_month, this_month - timedelta(days=1)),
            month_before=Period(month_start(today, -2), last_month - timedelta(days=1)),
        )

    @property
    def earliest(self) -> date:
        """The first day any of the periods needs."""
        return min(p.start for p in self.named().values())

    def named(self) -> dict[str, Period]:
        return {
            "current_month": self.current_month,
            "last_7_days": self.last_7_days,
            "previous_7_days": self.previous_7_days,
            "last_30_days": self.last_30_days,
            "last_month": self.last_month,
            "month_before": self.month_before,
        }

    def totals(self, rows: Iterable[DayAmount]) -> dict[str, int]:
        """What each named period spent, from daily rows."""
        totals = dict.fromkeys(self.named(), 0)
        for row in rows:
            for name, period in self.named().items():
                if row.day in period:
                    totals[name] += row.amount
        return totals


def change_percent(current: int, previous: int) -> float | None:
    """(current - previous) / previous * 100; None when `previous` is zero."""
    if previous == 0:
        return None
    return (current - previous) * 100 / abs(previous)


@dataclass(frozen=True)
class PeriodTotal:
    total: int
    change_percent: float | None = None


@dataclass(frozen=True)
class Expenditure:
    current_period: int  # this calendar month so far
    last_7_days: PeriodTotal
    last_30_days: int
    last_month: PeriodTotal
    next_invoice_date: date


def expenditure(totals: Mapping[str, int], today: date, next_invoice: date) -> Expenditure:
    """The expenditure card from what each of `Periods.ending(today).named()` spent."""
    return Expenditure(
        current_period=totals["current_month"],
        last_7_days=PeriodTotal(
            totals["last_7_days"],
            change_percent(totals["last_7_days"], totals["previous_7_days"]),
        ),
        last_30_days=totals["last_30_days"],
        last_month=PeriodTotal(
            totals["last_month"], change_percent(totals["last_month"], totals["month_before"])
        ),
        next_invoice_date=next_invoice,
    )


@dataclass(frozen=True)
class Spend:
    """What was spent on a day (or in a month), in total and per resource type."""

    start: date
    total: int
    by_resource_type: tuple[tuple[str, int], ...]


def series_types(resource_types: Iterable[str]) -> tuple[str, ...]:
    """The resource types a chart shows: the four standard ones, then any other seen, sorted."""
    others = sorted(set(resource_types) - set(RESOURCE_TYPES))
    return (*RESOURCE_TYPES, *others)


def _series(rows: Iterable[DayAmount], starts: list[date]) -> list[Spend]:
    cells: dict[tuple[date, str], int] = defaultdict(int)
    wanted = set(starts)
    for row in rows:
        if row.day in wanted:
            cells[(row.day, row.resource_type)] += row.amount
    types = series_types(t for _, t in cells)
    result = []
    for start in starts:
        parts = tuple((t, cells.get((start, t), 0)) for t in types)
        result.append(Spend(start, sum(a for _, a in parts), parts))
    return result


def check_days(days: int) -> int:
    """How many days a trend covers: 0 means 7; at most 366."""
    days = days or 7
    if not 1 <= days <= MAX_TREND_DAYS:
        raise InvalidArgument(
            f"days must be between 1 and {MAX_TREND_DAYS}, got {days}", field="days"
        )
    return days


def check_months(months: int) -> int:
    """How many months a breakdown covers: 0 means 6; at most 36."""
    months = months or 6
    if not 1 <= months <= MAX_MONTHS:
        raise InvalidArgument(
            f"months must be between 1 and {MAX_MONTHS}, got {months}", field="months"
        )
    return months


def trend_start(today: date, days: int) -> date:
    return today - timedelta(days=days - 1)


def trend(rows: Iterable[DayAmount], today: date, days: int) -> list[Spend]:
    """Spend per day for the `days` days ending today, oldest first; missing days are zeros."""
    start = trend_start(today, days)
    return _series(rows, [start + timedelta(days=i) for i in range(days)])


def monthly(rows: Iterable[DayAmount], today: date, months: int) -> list[Spend]:
    """Spend per calendar month (rows dated the 1st of their month) for the `months` months
    ending with this one, oldest first; missing months are zeros."""
    return _series(rows, [month_start(today, -i) for i in range(months - 1, -1, -1)])


@dataclass(frozen=True)
class ResourceCost:
    """What one resource has cost since it was created."""

    resource_id: str
    resource_type: str
    project_id: uuid.UUID | None
    total: int
    first_charged_at: datetime
    last_charged_at: datetime


def check_limit(limit: int, *, default: int = 100, maximum: int = 1000) -> int:
    limit = limit or default
    if not 1 <= limit <= maximum:
        raise InvalidArgument(f"limit must be between 1 and {maximum}, got {limit}", field="limit")
    return limit


@dataclass(frozen=True)
class RunRate:
    """What running resources cost: micro-units per hour, in total and per resource type."""

    per_hour: int
    by_resource_type: tuple[tuple[str, int], ...] = ()

    @property
    def per_day(self) -> int:
        return self.per_hour * HOURS_PER_DAY

    @property
    def per_month(self) -> int:
        """30 days."""
        return self.per_hour * HOURS_PER_MONTH


def run_rate(per_hour: int, by_type: Mapping[str, int]) -> RunRate:
    return RunRate(per_hour, tuple((t, by_type.get(t, 0)) for t in series_types(by_type)))


@dataclass(frozen=True)
class WalletState:
    """A wallet row: the totals the ledger keeps in step with its entries."""

    organization_id: uuid.UUID
    currency: str
    balance: int
    credits: int
    held_balance: int
    run_rate: int
    level: str


@dataclass(frozen=True)
class Summary:
    state: WalletState
    run_rate: RunRate
    hours_remaining: float | None
    service_status: str

    @property
    def spendable(self) -> int:
        return self.state.balance - self.state.held_balance


def summary(state: WalletState, by_type: Mapping[str, int]) -> Summary:
    """The wallet card: run rate from open meters, hours the balance lasts, service status."""
    return Summary(
        state=state,
        run_rate=run_rate(state.run_rate, by_type),
        hours_remaining=hours_remaining(state.balance, state.run_rate),
        service_status=SERVICE_STATUS.get(state.level, "available"),
    )
