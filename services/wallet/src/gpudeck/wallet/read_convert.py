"""Between protobuf messages and the read models, usage records, rates and alert settings.

Amounts go out through a `Display`: in the wallet currency, or converted to the display
currency with the stored rate it names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime

from gpudeck.kit.errors import FailedPrecondition
from gpudeck.proto.common.v1.money_pb2 import Conversion as ConversionPb
from gpudeck.proto.common.v1.money_pb2 import Money
from gpudeck.proto.wallet.v1 import wallet_pb2 as pb
from gpudeck.wallet import readmodels as rm
from gpudeck.wallet.alert_settings import AutoTopUp, PendingTopUp, ThresholdSettings
from gpudeck.wallet.convert import timestamp
from gpudeck.wallet.rates import Conversion, ExchangeRate, format_rate
from gpudeck.wallet.usage import Analytics, DimensionUsage, UsageRecord

INT64_MAX = 2**63 - 1  # what Money.amount (int64) holds


def rfc3339(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def exchange_rate(rate: ExchangeRate) -> pb.ExchangeRate:
    return pb.ExchangeRate(
        id=rate.id,
        base=rate.base,
        quote=rate.quote,
        rate=format_rate(rate.rate),
        as_of=timestamp(rate.as_of),
        source=rate.source,
    )


@dataclass(frozen=True)
class Display:
    """How amounts of the wallet currency are shown."""

    conversion: Conversion

    @property
    def currency(self) -> str:
        return self.conversion.target

    def money(self, amount: int) -> Money:
        """`amount` shown; FailedPrecondition naming the display currency when the rate makes it
        more than a Money can hold (a rate far off, or a huge balance)."""
        return self.shown(self.conversion.apply(amount))

    def shown(self, shown: int) -> Money:
        """An amount already in the display currency, checked as `money` checks it."""
        if not -INT64_MAX <= shown <= INT64_MAX:
            c = self.conversion
            rate = format_rate(c.rate.rate) if c.rate is not None else "1"
            raise FailedPrecondition(
                f"an amount of {c.source} is too large to show in {c.target} at the exchange"
                f" rate {rate}: check the rate, or leave display_currency out",
                field="display_currency",
                reason="AMOUNT_TOO_LARGE",
            )
        return Money(amount=shown, currency=self.conversion.target)

    def split(self, total: int, parts: Sequence[int]) -> tuple[Money, list[Money]]:
        """`total` and its `parts` shown so that, when the parts add up to the total, the shown
        parts add up to the shown total too: each is rounded, then the micro-units the rounding
        lost or invented go to the parts it moved most (largest remainders). Parts that do not
        add up to the total (a breakdown of some of it) are rounded each on its own."""
        shown_total = self.conversion.apply(total)
        shown = [self.conversion.apply(p) for p in parts]
        gap = shown_total - sum(shown)
        if gap and sum(parts) == total:
            # rounding error of each part: exact − shown; give +1 to the largest, −1 to the least
            errors = [self.conversion.exact(p) - s for p, s in zip(parts, shown, strict=True)]
            order = sorted(range(len(shown)), key=lambda i: errors[i], reverse=gap > 0)
            for i in order[: abs(gap)]:
                shown[i] += 1 if gap > 0 else -1
        return self.shown(shown_total), [self.shown(s) for s in shown]

    def by_type(
        self, total: int, parts: tuple[tuple[str, int], ...]
    ) -> tuple[Money, list[pb.AmountByType]]:
        """A total and its breakdown by resource type, shown so that they add up (`split`)."""
        shown_total, shown = self.split(total, [a for _, a in parts])
        return shown_total, [
            pb.AmountByType(resource_type=t, amount=m)
            for (t, _), m in zip(parts, shown, strict=True)
        ]

    def conversion_pb(self) -> ConversionPb | None:
        """The stored rate used, or None when nothing was converted."""
        rate = self.conversion.rate
        if rate is None:
            return None
        return ConversionPb(
            base=rate.base,
            quote=rate.quote,
            rate=format_rate(rate.rate),
            rate_id=rate.id,
            as_of=rfc3339(rate.as_of),
        )


def summary(s: rm.Summary, d: Display) -> pb.WalletSummary:
    st = s.state
    balance, held = d.money(st.balance), d.money(st.held_balance)
    message = pb.WalletSummary(
        organization_id=str(st.organization_id),
        currency=d.currency,
        balance=balance,
        held_balance=held,
        # balance − held as shown, so the converted card adds up too
        spendable=Money(amount=balance.amount - held.amount, currency=d.currency),
        credits=d.money(st.credits),
        run_rate=run_rate(s.run_rate, d),
        service_status=s.service_status,
        conversion=d.conversion_pb(),
        wallet_currency=st.currency,
    )
    if s.hours_remaining is not None:
        message.hours_remaining = s.hours_remaining
    return message


def run_rate(r: rm.RunRate, d: Display) -> pb.RunRate:
    """The hourly rate shown, its projections from the rate as shown (× 24, × 720, as in the
    wallet currency), and its breakdown adding up to it (`Display.split`)."""
    per_hour, by_type = d.split(r.per_hour, [rate for _, rate in r.by_resource_type])
    return pb.RunRate(
        per_hour=per_hour,
        per_day=d.shown(per_hour.amount * rm.HOURS_PER_DAY),
        per_month=d.shown(per_hour.amount * rm.HOURS_PER_MONTH),
        by_resource_type=[
            pb.RunRateByType(resource_type=t, per_hour=m)
            for (t, _), m in zip(r.by_resource_type, by_type, strict=True)
        ],
    )


def period_total(p: rm.PeriodTotal, d: Display) -> pb.PeriodTotal:
    message = pb.PeriodTotal(total=d.money(p.total))
    if p.change_percent is not None:
        message.change_percent = p.change_percent
    return message


def expenditure(e: rm.Expenditure, d: Display) -> pb.Expenditure:
    return pb.Expenditure(
        current_period=d.money(e.current_period),
        last_7_days=period_total(e.last_7_days, d),
        last_30_days=d.money(e.last_30_days),
        last_month=period_total(e.last_month, d),
        conversion=d.conversion_pb(),
        next_invoice_date=e.next_invoice_date.isoformat(),
    )


def trend(days: list[rm.Spend], d: Display) -> pb.SpendingTrend:
    def day_spend(day: rm.Spend) -> pb.DaySpend:
        total, by_type = d.by_type(day.total, day.by_resource_type)
        return pb.DaySpend(date=day.start.isoformat(), total=total, by_resource_type=by_type)

    return pb.SpendingTrend(days=[day_spend(day) for day in days], conversion=d.conversion_pb())


def month_label(start: date) -> str:
    return f"{start.year:04d}-{start.month:02d}"


def monthly(months: list[rm.Spend], d: Display) -> pb.MonthlyBreakdown:
    def month_spend(m: rm.Spend) -> pb.MonthSpend:
        total, by_type = d.by_type(m.total, m.by_resource_type)
        return pb.MonthSpend(month=month_label(m.start), total=total, by_resource_type=by_type)

    return pb.MonthlyBreakdown(
        months=[month_spend(m) for m in months], conversion=d.conversion_pb()
    )


def resource_costs(costs: list[rm.ResourceCost], d: Display) -> pb.ResourceCosts:
    return pb.ResourceCosts(
        resources=[
            pb.ResourceCost(
                resource_id=c.resource_id,
                resource_type=c.resource_type,
                project_id=str(c.project_id or ""),
                total=d.money(c.total),
                first_charged_at=timestamp(c.first_charged_at),
                last_charged_at=timestamp(c.last_charged_at),
            )
            for c in costs
        ],
        conversion=d.conversion_pb(),
    )


def usage_record(r: UsageRecord, d: Display) -> pb.UsageRecord:
    e = r.event
    return pb.UsageRecord(
        event_id=e.event_id,
        organization_id=str(e.organization_id),
        project_id=str(e.project_id or ""),
        meter=e.meter,
        quantity=e.quantity,
        cost=d.money(r.cost),
        dimensions=dict(e.dimensions),
        success=e.success,
        latency_ms=e.latency_ms,
        at=timestamp(r.at),
        transaction_id=str(r.transaction_id or ""),
        unit_price=d.money(e.unit_price).amount,  # in the currency of `cost`
    )


def dimension_usage(u: DimensionUsage, d: Display, cost: Money | None = None) -> pb.DimensionUsage:
    """`cost`: its cost as shown, when shown as part of a total (`Display.split`)."""
    return pb.DimensionUsage(
        dimension=u.dimension,
        value=u.value,
        quantity=float(u.quantity),
        cost=cost or d.money(u.cost),
        calls=u.calls,
        errors=u.errors,
    )


def today_parts(
    total: int, parts: tuple[DimensionUsage, ...], d: Display
) -> tuple[Money, list[pb.DimensionUsage]]:
    """Today's cost and a breakdown of it, shown so that they add up when all of it is there."""
    shown_total, costs = d.split(total, [u.cost for u in parts])
    return shown_total, [dimension_usage(u, d, c) for u, c in zip(parts, costs, strict=True)]


def analytics(a: Analytics, d: Display) -> pb.UsageAnalytics:
    today_cost, by_model = today_parts(a.today_cost, a.today_by_model, d)
    by_meter = today_parts(a.today_cost, a.today_by_meter, d)[1]
    message = pb.UsageAnalytics(
        today_quantity=float(a.today_quantity),
        today_cost=today_cost,
        today_by_model=by_model,
        today_by_meter=by_meter,
        top_models_30_days=[dimension_usage(u, d) for u in a.top_models_30_days],
        calls_24h=a.last_24h.calls,
        hourly_48h=[
            pb.HourCount(hour=rfc3339(h.hour), success=h.success, errors=h.errors)
            for h in a.hourly_48h
        ],
        all_time=[dimension_usage(u, d) for u in a.all_time],
        recent=[usage_record(r, d) for r in a.recent],
        conversion=d.conversion_pb(),
    )
    if a.last_24h.success_rate is not None:
        message.success_rate_24h = a.last_24h.success_rate
    if a.last_24h.average_latency_ms is not None:
        message.average_latency_ms_24h = a.last_24h.average_latency_ms
    return message


def thresholds(t: ThresholdSettings) -> pb.Thresholds:
    return pb.Thresholds(
        organization_id=str(t.organization_id),
        warning_amount=t.thresholds.warning_amount,
        critical_amount=t.thresholds.critical_amount,
        warning_hours=t.thresholds.warning_hours,
        critical_hours=t.thresholds.critical_hours,
        level=t.level,
    )


def pending_topup(p: PendingTopUp) -> pb.PendingTopUp:
    return pb.PendingTopUp(
        id=str(p.id),
        organization_id=str(p.organization_id),
        amount=Money(amount=p.amount, currency=p.currency),
        status=p.status,
        created_at=timestamp(p.created_at),
        transaction_id=str(p.transaction_id or ""),
    )


def auto_topup(a: AutoTopUp) -> pb.AutoTopUp:
    return pb.AutoTopUp(
        organization_id=str(a.organization_id),
        enabled=a.enabled,
        below=a.below,
        amount=a.amount,
        pending=pending_topup(a.pending) if a.pending else None,
        disabled_reason=a.disabled_reason,
    )
