"""Per-call and per-token usage (inference, API calls): today by model, the top models of 30
days, calls in the last 24 hours with success rate and latency, 48 hours by the hour, all-time
breakdowns and the most recent records. Read from the wallet's GetUsageAnalytics; counts are
Long, as the wallet keeps them (int64)."""

from __future__ import annotations

from datetime import datetime

import strawberry

from gpudeck.gateway.context import Info
from gpudeck.gateway.errors import BAD_USER_INPUT, GatewayError
from gpudeck.gateway.types.common import Conversion, Long, Money, when
from gpudeck.proto.wallet.v1 import wallet_pb2


@strawberry.type(description="Usage of one value of a dimension, e.g. model = llama-3-70b.")
class DimensionUsage:
    dimension: str
    value: str
    quantity: float
    cost: Money
    calls: Long
    errors: Long

    @classmethod
    def from_pb(cls, m: wallet_pb2.DimensionUsage) -> DimensionUsage:
        return cls(
            dimension=m.dimension,
            value=m.value,
            quantity=m.quantity,
            cost=Money.from_pb(m.cost),
            calls=Long(m.calls),
            errors=Long(m.errors),
        )


@strawberry.type(description="Calls that succeeded and failed in one hour (UTC).")
class HourCount:
    hour: datetime
    success: Long
    errors: Long


@strawberry.type
class Dimension:
    name: str
    value: str


@strawberry.type(description="One usage event as recorded.")
class UsageRecord:
    event_id: strawberry.ID
    project_id: strawberry.ID | None
    meter: str
    quantity: float
    unit_price: Money = strawberry.field(description="Per 1,000,000 units of quantity.")
    cost: Money
    dimensions: list[Dimension]
    success: bool
    latency_ms: int
    at: datetime | None
    transaction_id: strawberry.ID | None

    @classmethod
    def from_pb(cls, m: wallet_pb2.UsageRecord) -> UsageRecord:
        return cls(
            event_id=strawberry.ID(m.event_id),
            project_id=strawberry.ID(m.project_id) if m.project_id else None,
            meter=m.meter,
            quantity=m.quantity,
            unit_price=Money.of(m.unit_price, m.cost.currency),
            cost=Money.from_pb(m.cost),
            dimensions=[Dimension(name=k, value=v) for k, v in sorted(m.dimensions.items())],
            success=m.success,
            latency_ms=m.latency_ms,
            at=when(m.at, m.HasField("at")),
            transaction_id=strawberry.ID(m.transaction_id) if m.transaction_id else None,
        )


@strawberry.type(
    description=(
        "Usage analytics. `successRate24h` is 0..1 and null (as is `averageLatencyMs24h`) "
        "when there were no calls; `hourly48h` holds all 48 hours, oldest first."
    )
)
class Usage:
    today_quantity: float = strawberry.field(
        description="Today's quantity (UTC) of every meter added up; with `usage(meter:)` one "
        "meter's, in its unit. `todayByMeter` keeps the meters apart."
    )
    today_cost: Money
    today_by_model: list[DimensionUsage]
    today_by_meter: list[DimensionUsage] = strawberry.field(
        description='Today\'s usage per meter (`dimension` is "meter"), each in its own unit, '
        "largest quantity first."
    )
    top_models: list[DimensionUsage] = strawberry.field(
        description="The top models by quantity over the last 30 days."
    )
    calls_24h: Long = strawberry.field(
        description="Calls in the last 24 hours: the hour in progress and the 23 before it."
    )
    success_rate_24h: float | None = strawberry.field(
        description="0 to 1, over the same calls; null without any."
    )
    average_latency_ms_24h: float | None = strawberry.field(
        description="Over the same calls that measured a latency (latencyMs above 0); null "
        "without any."
    )
    hourly_48h: list[HourCount]
    all_time: list[DimensionUsage]
    recent: list[UsageRecord]
    conversion: Conversion | None

    @classmethod
    def from_pb(cls, m: wallet_pb2.UsageAnalytics) -> Usage:
        return cls(
            today_quantity=m.today_quantity,
            today_cost=Money.from_pb(m.today_cost),
            today_by_model=[DimensionUsage.from_pb(d) for d in m.today_by_model],
            today_by_meter=[DimensionUsage.from_pb(d) for d in m.today_by_meter],
            top_models=[DimensionUsage.from_pb(d) for d in m.top_models_30_days],
            calls_24h=Long(m.calls_24h),
            success_rate_24h=m.success_rate_24h if m.HasField("success_rate_24h") else None,
            average_latency_ms_24h=m.average_latency_ms_24h
            if m.HasField("average_latency_ms_24h")
            else None,
            hourly_48h=[
                HourCount(
                    hour=datetime.fromisoformat(h.hour.replace("Z", "+00:00")),
                    success=Long(h.success),
                    errors=Long(h.errors),
                )
                for h in m.hourly_48h
            ],
            all_time=[DimensionUsage.from_pb(d) for d in m.all_time],
            recent=[UsageRecord.from_pb(r) for r in m.recent],
            conversion=Conversion.from_pb(m.conversion) if m.HasField("conversion") else None,
        )


def positive(value: int, field: str) -> int:
    """`value` if at least 1 (upper limits are the wallet's to say); BAD_USER_INPUT otherwise."""
    if value < 1:
        raise GatewayError(
            f"{field} must be at least 1, got {value}", code=BAD_USER_INPUT, field=field
        )
    return value


async def load_usage(
    info: Info, organization_id: str, display: str, *, top: int, recent: int, meter: str | None
) -> Usage:
    c = info.context.wallet
    request = wallet_pb2.GetUsageAnalyticsRequest(
        organization_id=organization_id,
        top=positive(top, "top"),
        recent=positive(recent, "recent"),
        display_currency=display,
        meter=meter or "",
    )
    return Usage.from_pb(await c.wallet.GetUsageAnalytics(request, metadata=c.metadata))
