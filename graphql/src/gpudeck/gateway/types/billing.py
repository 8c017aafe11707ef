"""What was spent and what is owed: expenditure, spending trend, monthly breakdown, the billing
card with invoices, the plan card; `changePlan` and `addCredits`."""

from __future__ import annotations

import uuid
from datetime import date, datetime

import grpc
import strawberry

from gpudeck.gateway.context import Info
from gpudeck.gateway.errors import Arguments
from gpudeck.gateway.money import convert_parts, parse_amount
from gpudeck.gateway.permissions import BillingWriter, require
from gpudeck.gateway.types.common import (
    Conversion,
    Money,
    OptionalKey,
    check_first,
    timestamp,
    when,
)
from gpudeck.gateway.types.wallet import Transaction
from gpudeck.proto.common.v1 import money_pb2
from gpudeck.proto.wallet.v1 import wallet_pb2

PDF_PATH = "/invoices/{id}.pdf"


def _date(text: str) -> date | None:
    return date.fromisoformat(text) if text else None


def _conversion(
    m: wallet_pb2.Expenditure | wallet_pb2.WalletSummary,
) -> money_pb2.Conversion | None:
    return m.conversion if m.HasField("conversion") else None


def percent_change(current: int, previous: int) -> float | None:
    """(current − previous) / |previous| × 100, to 2 decimals: positive when spending grew, even
    from a negative (refunded) period; None when `previous` is zero. Every change percent the
    gateway shows is this one (the wallet's PeriodTotal.change_percent is the same, unrounded)."""
    return round((current - previous) * 100 / abs(previous), 2) if previous else None


@strawberry.type(description="A period's total and its change against the period before.")
class PeriodTotal:
    total: Money
    change_percent: float | None = strawberry.field(
        description="Percent, 2 decimals; null when the period before spent nothing."
    )

    @classmethod
    def from_pb(cls, m: wallet_pb2.PeriodTotal) -> PeriodTotal:
        return cls(
            total=Money.from_pb(m.total),
            change_percent=round(m.change_percent, 2) if m.HasField("change_percent") else None,
        )


@strawberry.type(
    description=(
        "Spending: this billing period (calendar month) so far, the last 7 days (UTC days, "
        "today so far included) against the 7 full days before, the last 30 days, and the last "
        "calendar month against the one before."
    )
)
class Expenditure:
    current_period: Money
    last_7_days: PeriodTotal
    last_30_days: Money
    last_month: PeriodTotal
    next_invoice_date: date | None
    conversion: Conversion | None

    @classmethod
    def from_pb(cls, m: wallet_pb2.Expenditure) -> Expenditure:
        return cls(
            current_period=Money.from_pb(m.current_period),
            last_7_days=PeriodTotal.from_pb(m.last_7_days),
            last_30_days=Money.from_pb(m.last_30_days),
            last_month=PeriodTotal.from_pb(m.last_month),
            next_invoice_date=_date(m.next_invoice_date),
            conversion=Conversion.from_pb(m.conversion) if m.HasField("conversion") else None,
        )


async def load_expenditure(info: Info, organization_id: str, display: str) -> Expenditure:
    return Expenditure.from_pb(
        await info.context.loaders.expenditure.load((organization_id, display))
    )


@strawberry.type
class AmountByType:
    resource_type: str
    amount: Money


@strawberry.type(
    description="One day's spending (UTC), in total and by resource type; `conversion`: the rate "
    "its amounts were shown with in the display currency (null when not converted)."
)
class DaySpend:
    date: date
    total: Money
    by_resource_type: list[AmountByType]
    # On each item, as the list is the field's type (a contract): the whole trend's rate.
    conversion: Conversion | None


@strawberry.type(
    description="One month's spending (YYYY-MM), in total and by resource type; `conversion`: "
    "the rate its amounts were shown with in the display currency (null when not converted)."
)
class MonthSpend:
    month: str
    total: Money
    by_resource_type: list[AmountByType]
    conversion: Conversion | None


def _by_type(parts: list[wallet_pb2.AmountByType]) -> list[AmountByType]:
    return [
        AmountByType(resource_type=p.resource_type, amount=Money.from_pb(p.amount)) for p in parts
    ]


async def spending_trend(
    info: Info, organization_id: str, days: int, display: str
) -> list[DaySpend]:
    c = info.context.wallet
    request = wallet_pb2.GetSpendingTrendRequest(
        organization_id=organization_id, days=days, display_currency=display
    )
    trend = await c.wallet.GetSpendingTrend(request, metadata=c.metadata)
    conversion = Conversion.from_pb(trend.conversion)
    return [
        DaySpend(
            date=date.fromisoformat(d.date),
            total=Money.from_pb(d.total),
            by_resource_type=_by_type(list(d.by_resource_type)),
            conversion=conversion,
        )
        for d in trend.days
    ]


async def monthly_breakdown(
    info: Info, organization_id: str, months: int, display: str
) -> list[MonthSpend]:
    c = info.context.wallet
    request = wallet_pb2.GetMonthlyBreakdownRequest(
        organization_id=organization_id, months=months, display_currency=display
    )
    breakdown = await c.wallet.GetMonthlyBreakdown(request, metadata=c.metadata)
    conversion = Conversion.from_pb(breakdown.conversion)
    return [
        MonthSpend(
            month=m.month,
            total=Money.from_pb(m.total),
            by_resource_type=_by_type(list(m.by_resource_type)),
            conversion=conversion,
        )
        for m in breakdown.months
    ]


@strawberry.type(description="What one resource has cost since it was created.")
class ResourceCost:
    resource_id: str
    resource_type: str
    project_id: strawberry.ID | None
    total: Money
    first_charged_at: datetime | None
    last_charged_at: datetime | None


@strawberry.type(description="Cost per resource, most recently charged first.")
class ResourceCosts:
    resources: list[ResourceCost]
    conversion: Conversion | None


async def resource_costs(
    info: Info,
    organization_id: str,
    first: int | None,
    resource_ids: list[str] | None,
    display: str,
) -> ResourceCosts:
    c = info.context.wallet
    request = wallet_pb2.GetResourceCostsRequest(
        organization_id=organization_id,
        resource_ids=resource_ids or [],
        display_currency=display,
        limit=check_first(first, maximum=1000),
    )
    costs = await c.wallet.GetResourceCosts(request, metadata=c.metadata)
    return ResourceCosts(
        resources=[
            ResourceCost(
                resource_id=r.resource_id,
                resource_type=r.resource_type,
                project_id=strawberry.ID(r.project_id) if r.project_id else None,
                total=Money.from_pb(r.total),
                first_charged_at=when(r.first_charged_at, r.HasField("first_charged_at")),
                last_charged_at=when(r.last_charged_at, r.HasField("last_charged_at")),
            )
            for r in costs.resources
        ],
        conversion=Conversion.from_pb(costs.conversion),
    )


@strawberry.type
class InvoiceLine:
    resource_type: str
    description: str
    amount: Money


@strawberry.type(
    description=(
        "A monthly invoice. Its amounts are in the currency it was issued in (the wallet's), "
        "whatever the display currency: an issued invoice never changes, not even with "
        "exchange rates. `pdfUrl` is this gateway's path to its PDF, fetched with the same "
        "Authorization header."
    )
)
class Invoice:
    id: strawberry.ID
    period: str
    period_start: date | None
    period_end: date | None
    total: Money
    status: str = strawberry.field(description="open or paid")
    issued_at: datetime | None
    paid_at: datetime | None
    lines: list[InvoiceLine]
    pdf_url: str

    @classmethod
    def from_pb(cls, m: wallet_pb2.Invoice) -> Invoice:
        return cls(
            id=strawberry.ID(m.id),
            period=m.period,
            period_start=_date(m.period_start),
            period_end=_date(m.period_end),
            total=Money.from_pb(m.total),
            status=m.status,
            issued_at=when(m.issued_at, m.HasField("issued_at")),
            paid_at=when(m.paid_at, m.HasField("paid_at")),
            lines=[
                InvoiceLine(
                    resource_type=line.resource_type,
                    description=line.description,
                    amount=Money.from_pb(line.amount),
                )
                for line in m.lines
            ],
            pdf_url=PDF_PATH.format(id=m.id),
        )


async def resolve_invoices(root: Billing, info: Info, first: int | None = None) -> list[Invoice]:
    answer = await info.context.loaders.invoices.load(
        (root.organization_id, check_first(first, maximum=120))
    )
    return [Invoice.from_pb(i) for i in answer.invoices]


@strawberry.type(
    description=(
        "The billing card: this month so far against last month (`trendPercent`, null when "
        "last month spent nothing), the next invoice date and past invoices."
    )
)
class Billing:
    organization_id: strawberry.Private[str]
    expenditure: strawberry.Private[wallet_pb2.Expenditure]
    current_month_total: Money
    last_month_total: Money
    trend_percent: float | None
    next_invoice_date: date | None
    conversion: Conversion | None

    invoices = strawberry.field(
        resolver=resolve_invoices, description="Invoices, newest period first."
    )


async def load_billing(info: Info, organization_id: str, display: str) -> Billing:
    spent = await info.context.loaders.expenditure.load((organization_id, display))
    current, last = spent.current_period.amount, spent.last_month.total.amount
    return Billing(
        organization_id=organization_id,
        expenditure=spent,
        current_month_total=Money.from_pb(spent.current_period),
        last_month_total=Money.from_pb(spent.last_month.total),
        trend_percent=percent_change(current, last),
        next_invoice_date=_date(spent.next_invoice_date),
        conversion=Conversion.from_pb(spent.conversion) if spent.HasField("conversion") else None,
    )


@strawberry.type(description="A plan of the catalog.")
class PlanOption:
    code: str
    name: str
    monthly_fee: Money
    included_credits: Money
    conversion: Conversion | None = strawberry.field(
        description="The exchange rate its amounts were converted at; null when not converted."
    )

    @classmethod
    def from_pb(cls, m: wallet_pb2.Plan, conversion: money_pb2.Conversion | None) -> PlanOption:
        return cls(
            code=m.code,
            name=m.name,
            monthly_fee=Money.from_pb(m.monthly_fee, conversion),
            included_credits=Money.from_pb(m.included_credits, conversion),
            conversion=Conversion.from_pb(conversion) if conversion is not None else None,
        )


@strawberry.type(description="What is left of one grant of credits.")
class CreditGrant:
    available: Money
    source: str = strawberry.field(description="plan, promotion or purchase")
    expires_at: datetime | None = strawberry.field(description="null: never")
    granted_at: datetime | None

    @classmethod
    def from_pb(cls, m: wallet_pb2.CreditGrant, available: money_pb2.Money) -> CreditGrant:
        """`available`: `m.available` as shown (see Plan.from_pb)."""
        return cls(
            available=Money.from_pb(available),
            source=m.source,
            expires_at=when(m.expires_at, m.HasField("expires_at")),
            granted_at=when(m.granted_at, m.HasField("granted_at")),
        )


@strawberry.type(
    description=(
        "The plan card: the current plan and the credits available (the unexpired credit part "
        "of the balance), grant by grant in the order they are spent (the first to expire "
        "first); `renewsOn`: when a paid plan renews (null for a free one)."
    )
)
class Plan:
    code: str
    name: str
    monthly_fee: Money
    included_credits: Money
    available_credits: Money
    credit_grants: list[CreditGrant]
    renews_on: date | None
    conversion: Conversion | None

    @classmethod
    def from_pb(cls, m: wallet_pb2.PlanStatus, conversion: money_pb2.Conversion | None) -> Plan:
        # The grants add up to the credits available when converted too (convert_parts).
        available, grants = convert_parts(
            m.available_credits, [g.available for g in m.credit_grants], conversion
        )
        return cls(
            code=m.plan.code,
            name=m.plan.name,
            monthly_fee=Money.from_pb(m.plan.monthly_fee, conversion),
            included_credits=Money.from_pb(m.plan.included_credits, conversion),
            available_credits=Money.from_pb(available),
            credit_grants=[
                CreditGrant.from_pb(g, shown)
                for g, shown in zip(m.credit_grants, grants, strict=True)
            ],
            renews_on=_date(m.renews_on),
            conversion=Conversion.from_pb(conversion) if conversion is not None else None,
        )


async def _display_conversion(
    info: Info, organization_id: str, display: str
) -> money_pb2.Conversion | None:
    """The rate the wallet uses for `display` now (None: no conversion)."""
    if not display:
        return None
    return _conversion(await info.context.loaders.summary.load((organization_id, display)))


async def load_plan(info: Info, organization_id: str, display: str) -> Plan:
    status = await info.context.loaders.plan.load(organization_id)
    return Plan.from_pb(status, await _display_conversion(info, organization_id, display))


async def list_plans(info: Info, organization_id: str, display: str) -> list[PlanOption]:
    c = info.context.wallet
    request = wallet_pb2.ListPlansRequest(organization_id=organization_id)
    answer = await c.wallet.ListPlans(request, metadata=c.metadata)
    conversion = await _display_conversion(info, organization_id, display)
    return [PlanOption.from_pb(p, conversion) for p in answer.plans]


@strawberry.type(
    description=(
        "What a plan change did: the monthly fee charged and credits granted by it (zero when "
        "already paid this month, for a downgrade, or a free plan)."
    )
)
class PlanChange:
    plan: Plan = strawberry.field(description="The plan card now, its credit grants included.")
    previous_plan_code: str
    charged: Money
    credits_granted: Money


@strawberry.type(description="Credits bought, and the credits available after.")
class AddCreditsPayload:
    transaction: Transaction
    available_credits: Money


def _key(value: str | None) -> str:
    return value.strip() if value and value.strip() else str(uuid.uuid4())


async def resolve_change_plan(
    info: Info,
    organization_id: strawberry.ID,
    plan_code: str,
    idempotency_key: OptionalKey = None,
) -> PlanChange:
    c = info.context.wallet
    request = wallet_pb2.ChangePlanRequest(
        idempotency_key=_key(idempotency_key),
        organization_id=str(organization_id),
        plan_code=plan_code,
    )
    status = await c.wallet.ChangePlan(request, metadata=c.metadata)
    try:  # the card now, grants included; the change is made whether or not this answers
        card = await c.wallet.GetPlan(
            wallet_pb2.GetPlanRequest(organization_id=str(organization_id)), metadata=c.metadata
        )
    except grpc.aio.AioRpcError:
        card = status
    return PlanChange(
        plan=Plan.from_pb(card, None),
        previous_plan_code=status.previous_plan_code,
        charged=Money.from_pb(status.charged),
        credits_granted=Money.from_pb(status.credits_granted),
    )


async def resolve_add_credits(
    info: Info,
    organization_id: strawberry.ID,
    amount: str,
    idempotency_key: str,
    reference: str | None = None,
    expires_at: datetime | None = None,
) -> AddCreditsPayload:
    micro = parse_amount(amount, field="amount")
    c = info.context.wallet
    request = wallet_pb2.AddCreditsRequest(
        idempotency_key=idempotency_key,
        organization_id=str(organization_id),
        amount=money_pb2.Money(amount=micro),
        reference=reference or "",
    )
    expiry = timestamp(expires_at, "expiresAt")
    if expiry is not None:
        request.expires_at.CopyFrom(expiry)
    answer = await c.wallet.AddCredits(request, metadata=c.metadata)
    return AddCreditsPayload(
        transaction=Transaction.from_pb(answer.transaction),
        available_credits=Money.from_pb(answer.available_credits),
    )


@strawberry.type
class Mutation:
    change_plan = strawberry.mutation(
        resolver=resolve_change_plan,
        description=(
            "Change the plan at once. An upgrade charges the new plan's monthly fee (refused "
            "with INSUFFICIENT_FUNDS when the wallet cannot pay it) and grants its credits."
        ),
        extensions=[*require(BillingWriter("organization_id")), Arguments(amount="")],
    )

    add_credits = strawberry.mutation(
        resolver=resolve_add_credits,
        description=(
            "Buy credits: `amount` (a decimal string) in the wallet currency. Money moves, so "
            "`idempotencyKey` is required: a retry with it returns the first purchase."
        ),
        extensions=require(BillingWriter("organization_id")),
    )
