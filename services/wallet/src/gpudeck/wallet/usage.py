"""Usage events (per call, per token) and the analytics read from their rollups.

An event counts `quantity` units of a meter ("tokens", "api_calls") at `unit_price` micro-units
per 1,000,000 units: cost = quantity * unit_price / 1,000,000, rounded half away from zero to the
micro-unit (the quantity is taken as the shortest decimal that prints it, 0.1 as 0.1: `exact`;
it is stored and summed so, and ten events of 0.1 sum to 1). Events are de-duplicated by
`event_id` within their organization. The dimensions model, provider, region and api are kept in the
hourly rollup, which feeds a daily one per model and all-time totals per dimension value (so the
dashboard's cost does not grow with history); `resource_type` and `resource_id` say what the
charge is for in the spending rollups (default "api").
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal, localcontext

from gpudeck.kit.errors import InvalidArgument
from gpudeck.wallet.money import MAX_AMOUNT
from gpudeck.wallet.text import check_label, check_text

DIMENSIONS = ("model", "provider", "region", "api")
DEFAULT_RESOURCE_TYPE = "api"
PRICE_UNITS = 1_000_000  # unit_price is per this many units of quantity
MAX_QUANTITY = 1e15
MAX_DIMENSIONS = 32
FUTURE_SKEW = timedelta(minutes=5)
HOURS_SHOWN = 48
DEFAULT_TOP, MAX_TOP = 5, 100
DEFAULT_RECENT, MAX_RECENT = 50, 500


def exact(quantity: float | Decimal) -> Decimal:
    """A quantity as the shortest decimal that prints it (0.1 as 0.1): how it is priced, stored
    and summed."""
    return quantity if isinstance(quantity, Decimal) else Decimal(repr(quantity))


def cost(quantity: float, unit_price: int) -> int:
    """quantity * unit_price / 1,000,000 in micro-units, rounded half away from zero."""
    with localcontext(prec=60):  # exact for every quantity and price taken (28 digits is not)
        owed = exact(quantity) * unit_price / PRICE_UNITS
        return int(owed.quantize(Decimal(1), rounding=ROUND_HALF_UP))


@dataclass(frozen=True)
class UsageEvent:
    event_id: str
    organization_id: uuid.UUID
    meter: str
    quantity: float
    unit_price: int
    dimensions: Mapping[str, str] = field(default_factory=dict)
    project_id: uuid.UUID | None = None
    success: bool = True
    latency_ms: int = 0
    at: datetime | None = None  # None: now

    @property
    def cost(self) -> int:
        return cost(self.quantity, self.unit_price)

    @property
    def resource_type(self) -> str:
        return self.dimensions.get("resource_type") or DEFAULT_RESOURCE_TYPE

    @property
    def resource_id(self) -> str:
        return self.dimensions.get("resource_id", "")

    def same_as(self, retry: UsageEvent) -> bool:
        """Whether `retry` is this event sent again (its time counts only when it has one)."""
        at = self.at if retry.at is not None else None
        return replace(self, dimensions=dict(self.dimensions), at=at) == replace(
            retry, dimensions=dict(retry.dimensions)
        )

    def rollup_dimensions(self) -> tuple[str, ...]:
        """The values of model, provider, region, api ("" when absent)."""
        return tuple(self.dimensions.get(d, "") for d in DIMENSIONS)


def _text(value: str, name: str, limit: int, *, required: bool = False) -> None:
    if required and not value.strip():
        raise InvalidArgument(f"{name} is required", field=name)
    check_text(value, name, max_length=limit)


def validate(event: UsageEvent) -> UsageEvent:
    """Check an event before it is recorded; InvalidArgument naming the field."""
    _text(event.event_id, "event_id", 200, required=True)
    _text(event.meter, "meter", 100, required=True)
    if not math.isfinite(event.quantity) or event.quantity < 0:
        raise InvalidArgument(
            f"quantity must be a finite number ≥ 0, got {event.quantity!r}", field="quantity"
        )
    if event.quantity > MAX_QUANTITY:
        raise InvalidArgument("quantity is too large", field="quantity")
    if event.unit_price < 0:
        raise InvalidArgument(f"unit_price must be ≥ 0, got {event.unit_price}", field="unit_price")
    if event.unit_price > MAX_AMOUNT:  # a price a display currency can still show
        raise InvalidArgument(
            f"unit_price is too large: at most {MAX_AMOUNT} micro-units per 1,000,000 units",
            field="unit_price",
        )
    if event.latency_ms < 0:
        raise InvalidArgument("latency_ms must be ≥ 0", field="latency_ms")
    if len(event.dimensions) > MAX_DIMENSIONS:
        raise InvalidArgument(f"at most {MAX_DIMENSIONS} dimensions", field="dimensions")
    for key, value in event.dimensions.items():
        _text(key, "dimensions", 64, required=True)
        _text(value, f"dimensions.{key}", 200)
        if key == "resource_type":
            check_label(value, "dimensions.resource_type")
    if event.cost > MAX_AMOUNT:
        raise InvalidArgument("quantity * unit_price is too large", field="unit_price")
    if event.at is not None and event.at.tzinfo is None:
        raise InvalidArgument("at must carry a time zone", field="at")
    return event


def event_time(at: datetime | None, now: datetime) -> datetime:
    """When the event happened: `at`, or now; refused if it lies in the future."""
    if at is None:
        return now
    if at > now + FUTURE_SKEW:
        raise InvalidArgument(f"at {at.isoformat()} is in the future", field="at")
    return at


@dataclass(frozen=True)
class UsageRecord:
    """A recorded event as callers see it."""

    event: UsageEvent
    at: datetime
    cost: int
    currency: str
    transaction_id: uuid.UUID | None


# ------------------------------------------------------------------ analytics


def check_top(top: int) -> int:
    top = top or DEFAULT_TOP
    if not 1 <= top <= MAX_TOP:
        raise InvalidArgument(f"top must be between 1 and {MAX_TOP}, got {top}", field="top")
    return top


def check_recent(recent: int) -> int:
    recent = recent or DEFAULT_RECENT
    if not 1 <= recent <= MAX_RECENT:
        raise InvalidArgument(
            f"recent must be between 1 and {MAX_RECENT}, got {recent}", field="recent"
        )
    return recent


def hour_start(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def day_start(at: datetime) -> datetime:
    return hour_start(at).replace(hour=0)


@dataclass(frozen=True)
class DimensionUsage:
    dimension: str  # model, provider, region, api (and meter, for today's usage per meter)
    value: str
    quantity: Decimal  # summed exactly (`exact`)
    cost: int
    calls: int
    errors: int


@dataclass(frozen=True)
class HourCount:
    hour: datetime
    success: int
    errors: int


@dataclass(frozen=True)
class Calls:
    """Calls in a window: how many, how many failed, the summed latency of those that measured
    one (latency_ms > 0: 0 means not measured, e.g. a per-token meter), and how many did."""

    calls: int = 0
    errors: int = 0
    latency_ms_sum: int = 0
    latency_calls: int = 0

    @property
    def success_rate(self) -> float | None:
        """0..1; None without calls."""
        return (self.calls - self.errors) / self.calls if self.calls else None

    @property
    def average_latency_ms(self) -> float | None:
        """Over the calls that measured a latency; None without any."""
        return self.latency_ms_sum / self.latency_calls if self.latency_calls else None


def hourly(counts: Mapping[datetime, tuple[int, int]], now: datetime) -> list[HourCount]:
    """Successes and errors for each of the 48 hours ending with the current one, oldest first;
    `counts` maps an hour's start to (calls, errors); hours without calls are zeros."""
    last = hour_start(now)
    hours = [last - timedelta(hours=i) for i in range(HOURS_SHOWN - 1, -1, -1)]
    normalized = {hour_start(h): c for h, c in counts.items()}
    result = []
    for hour in hours:
        calls, errors = normalized.get(hour, (0, 0))
        result.append(HourCount(hour, calls - errors, errors))
    return result


@dataclass(frozen=True)
class Analytics:
    today_quantity: Decimal
    today_cost: int
    today_by_model: tuple[DimensionUsage, ...]
    today_by_meter: tuple[DimensionUsage, ...]  # each meter counts in its own unit
    top_models_30_days: tuple[DimensionUsage, ...]
    last_24h: Calls
    hourly_48h: tuple[HourCount, ...]
    all_time: tuple[DimensionUsage, ...]
    recent: tuple[UsageRecord, ...]


def summed(rows: Iterable[DimensionUsage]) -> list[DimensionUsage]:
    """Rows of the same dimension and value added up (e.g. one model's usage on two meters)."""
    totals: dict[tuple[str, str], DimensionUsage] = {}
    for row in rows:
        key = (row.dimension, row.value)
        seen = totals.get(key)
        totals[key] = row if seen is None else DimensionUsage(
            row.dimension, row.value, exact(seen.quantity) + exact(row.quantity),
            seen.cost + row.cost,
            seen.calls + row.calls, seen.errors + row.errors,
        )  # fmt: skip
    return list(totals.values())


def by_quantity(rows: Iterable[DimensionUsage]) -> tuple[DimensionUsage, ...]:
    """Largest quantity first; ties by cost, then by value."""
    return tuple(sorted(rows, key=lambda r: (-r.quantity, -r.cost, r.value)))


def breakdown(
    combinations: Iterable[tuple[tuple[str, ...], DimensionUsage]],
) -> tuple[DimensionUsage, ...]:
    """Usage per dimension and value from usage per combination of (model, provider, region,
    api) values; values that are not set are left out. Ordered by dimension, then largest
    quantity first."""
    totals: dict[tuple[str, str], list[Decimal]] = {}
    for values, usage in combinations:
        for dimension, value in zip(DIMENSIONS, values, strict=True):
            if not value:
                continue
            t = totals.setdefault((dimension, value), [Decimal(0)] * 4)
            t[0] += exact(usage.quantity)
            t[1] += usage.cost
            t[2] += usage.calls
            t[3] += usage.errors
    return per_dimension(
        DimensionUsage(dim, value, q, int(c), int(n), int(e))
        for (dim, value), (q, c, n, e) in totals.items()
    )


def per_dimension(rows: Iterable[DimensionUsage]) -> tuple[DimensionUsage, ...]:
    """Ordered by dimension (model, provider, region, api), then largest quantity first."""
    return tuple(
        sorted(rows, key=lambda d: (DIMENSIONS.index(d.dimension), -d.quantity, -d.cost, d.value))
    )
