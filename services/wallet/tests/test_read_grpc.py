"""What the dashboards read, over gRPC against the real database: the wallet card, expenditure,
the spending trend, the monthly breakdown and per-resource costs, to the micro-unit. Older spend
is written straight into the rollup tables, which are the read model."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta

import grpc
import pytest
from psycopg_pool import AsyncConnectionPool

from gpudeck.proto.common.v1.money_pb2 import Money
from gpudeck.proto.wallet.v1 import wallet_pb2 as pb
from gpudeck.proto.wallet.v1.wallet_pb2_grpc import WalletServiceStub
from gpudeck.wallet.invoices import next_invoice_date
from gpudeck.wallet.readmodels import month_start

NewOrg = Callable[..., Awaitable[uuid.UUID]]
USD = 1_000_000


async def transfer(
    stub: WalletServiceStub, org: uuid.UUID, kind: int, amount: int, **kw: str
) -> pb.Transaction:
    return await stub.Transfer(
        pb.TransferRequest(
            idempotency_key=uuid.uuid4().hex,
            organization_id=str(org),
            kind=kind,  # type: ignore[arg-type]
            amount=Money(amount=amount),
            **kw,
        ),
        timeout=5,
    )


async def today(pool: AsyncConnectionPool) -> date:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT (now() AT TIME ZONE 'UTC')::date")
        row = await cur.fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


async def backdate(
    pool: AsyncConnectionPool, org: uuid.UUID, rows: list[tuple[date, str, int]]
) -> None:
    async with pool.connection() as conn:
        for day, rtype, amount in rows:
            await conn.execute(
                "INSERT INTO daily_spend (organization_id, day, resource_type, amount)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (organization_id, day, resource_type)"
                " DO UPDATE SET amount = daily_spend.amount + excluded.amount",
                (org, day, rtype, amount),
            )


async def test_summary_after_top_up_and_charges(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org("USD")
    await transfer(wallet_stub, org, pb.TOPUP, 100 * USD)
    await transfer(wallet_stub, org, pb.CHARGE, 10 * USD, resource_type="pod")
    await transfer(wallet_stub, org, pb.CHARGE, 2_500_000, resource_type="vm")
    await wallet_stub.CreateHold(
        pb.CreateHoldRequest(
            idempotency_key="h1", organization_id=str(org), amount=7 * USD, timeout_seconds=60
        ),
        timeout=5,
    )
    s = await wallet_stub.GetWalletSummary(
        pb.GetWalletSummaryRequest(organization_id=str(org)), timeout=5
    )
    assert (s.currency, s.wallet_currency, s.organization_id) == ("USD", "USD", str(org))
    assert s.balance == Money(amount=87_500_000, currency="USD")
    assert s.held_balance.amount == 7 * USD and s.spendable.amount == 80_500_000
    assert s.run_rate.per_hour.amount == 0 and not s.HasField("hours_remaining")
    assert [t.resource_type for t in s.run_rate.by_resource_type] == [
        "pod",
        "vm",
        "nfs_volume",
        "object_storage",
    ]
    assert s.service_status == "available"


async def test_open_meters_make_the_run_rate_by_type_and_hours_remaining(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org("USD")
    await transfer(wallet_stub, org, pb.TOPUP, 1000 * USD)
    for meter_id, rtype, rate in [
        (f"pod:{org}:a", "pod", 3_600_000),
        (f"pod:{org}:b", "pod", 400_000),
        (f"vm:{org}", "vm", 1_000_000),
        (f"nfs:{org}", "nfs_volume", 36_000),
    ]:
        await wallet_stub.OpenMeter(
            pb.OpenMeterRequest(
                meter_id=meter_id,
                organization_id=str(org),
                resource_id=meter_id,
                resource_type=rtype,
                hourly_rate=rate,
            ),
            timeout=5,
        )
    await wallet_stub.CloseMeter(pb.CloseMeterRequest(meter_id=f"pod:{org}:b"), timeout=5)
    s = await wallet_stub.GetWalletSummary(
        pb.GetWalletSummaryRequest(organization_id=str(org)), timeout=5
    )
    per_hour = 3_600_000 + 1_000_000 + 36_000
    assert s.run_rate.per_hour.amount == per_hour
    assert s.run_rate.per_day.amount == per_hour * 24
    assert s.run_rate.per_month.amount == per_hour * 24 * 30
    assert {t.resource_type: t.per_hour.amount for t in s.run_rate.by_resource_type} == {
        "pod": 3_600_000,
        "vm": 1_000_000,
        "nfs_volume": 36_000,
        "object_storage": 0,
    }
    # The billing loop moves the balance; hours remaining follows the balance it is shown with.
    assert s.hours_remaining == pytest.approx(s.balance.amount / per_hour)
    assert 200 < s.hours_remaining <= 1000 * USD / per_hour


async def test_expenditure_and_trend_are_exact(
    wallet_stub: WalletServiceStub, wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    org = await new_org("USD")
    await transfer(wallet_stub, org, pb.TOPUP, 100 * USD)
    await transfer(wallet_stub, org, pb.CHARGE, 10 * USD, resource_type="pod", resource_id="p1")
    await transfer(wallet_stub, org, pb.CHARGE, 5 * USD, resource_type="vm", resource_id="v1")
    await transfer(wallet_stub, org, pb.CHARGE, 2_500_000, resource_type="pod", resource_id="p1")
    d = await today(wallet_pool)
    this_month, last_month = month_start(d), month_start(d, -1)
    eight_days_ago = d - timedelta(days=8)
    backdated = [
        (eight_days_ago, "pod", 10 * USD),  # the previous 7 days
        (last_month + timedelta(days=3), "vm", 40 * USD),  # last month
        (month_start(d, -2) + timedelta(days=1), "nfs_volume", 20 * USD),  # the month before
    ]
    await backdate(wallet_pool, org, backdated)
    today_spend = 17_500_000

    def total(start: date, end: date) -> int:
        amount = sum(a for day, _, a in backdated if start <= day <= end)
        return amount + (today_spend if start <= d <= end else 0)

    e = await wallet_stub.GetExpenditure(
        pb.GetExpenditureRequest(organization_id=str(org)), timeout=5
    )
    assert e.current_period == Money(amount=total(this_month, d), currency="USD")
    last_7, previous_7 = (
        total(d - timedelta(days=6), d),
        total(d - timedelta(days=13), d - timedelta(days=7)),
    )
    assert (last_7, previous_7) == (today_spend, 10 * USD)
    assert e.last_7_days.total.amount == today_spend
    assert e.last_7_days.change_percent == pytest.approx(75.0)  # 17.5 vs 10
    assert e.last_30_days.amount == total(d - timedelta(days=29), d)
    assert e.last_month.total.amount == total(last_month, this_month - timedelta(days=1))
    previous = total(month_start(d, -2), last_month - timedelta(days=1))
    assert e.last_month.change_percent == pytest.approx(
        (e.last_month.total.amount - previous) * 100 / previous
    )
    assert e.next_invoice_date == next_invoice_date(datetime.now(UTC)).isoformat()

    trend = await wallet_stub.GetSpendingTrend(
        pb.GetSpendingTrendRequest(organization_id=str(org), days=7), timeout=5
    )
    assert [x.date for x in trend.days] == [
        (d - timedelta(days=6 - i)).isoformat() for i in range(7)
    ]
    assert [x.total.amount for x in trend.days] == [0] * 6 + [today_spend]
    by_type = {t.resource_type: t.amount.amount for t in trend.days[-1].by_resource_type}
    assert by_type == {"pod": 12_500_000, "vm": 5 * USD, "nfs_volume": 0, "object_storage": 0}
    assert all(len(x.by_resource_type) == 4 for x in trend.days)

    longer = await wallet_stub.GetSpendingTrend(
        pb.GetSpendingTrendRequest(organization_id=str(org), days=9), timeout=5
    )
    assert longer.days[0].date == eight_days_ago.isoformat()
    assert longer.days[0].total.amount == 10 * USD


async def test_monthly_breakdown_and_resource_costs(
    wallet_stub: WalletServiceStub, wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    org = await new_org("USD")
    await transfer(wallet_stub, org, pb.TOPUP, 100 * USD)
    await transfer(wallet_stub, org, pb.CHARGE, 3 * USD, resource_type="pod", resource_id="p1")
    await transfer(wallet_stub, org, pb.CHARGE, 4 * USD, resource_type="pod", resource_id="p1")
    await transfer(wallet_stub, org, pb.CHARGE, 1 * USD, resource_type="vm", resource_id="v1")
    d = await today(wallet_pool)
    await backdate(
        wallet_pool,
        org,
        [(month_start(d, -1), "vm", 6 * USD), (month_start(d, -1) + timedelta(days=9), "vm", 1)],
    )
    months = await wallet_stub.GetMonthlyBreakdown(
        pb.GetMonthlyBreakdownRequest(organization_id=str(org), months=3), timeout=5
    )
    assert [m.month for m in months.months] == [
        month_start(d, i).strftime("%Y-%m") for i in (-2, -1, 0)
    ]
    assert [m.total.amount for m in months.months] == [0, 6 * USD + 1, 8 * USD]
    assert {t.resource_type: t.amount.amount for t in months.months[2].by_resource_type} == {
        "pod": 7 * USD,
        "vm": 1 * USD,
        "nfs_volume": 0,
        "object_storage": 0,
    }
    costs = await wallet_stub.GetResourceCosts(
        pb.GetResourceCostsRequest(organization_id=str(org)), timeout=5
    )
    assert {(r.resource_id, r.resource_type, r.total.amount) for r in costs.resources} == {
        ("p1", "pod", 7 * USD),
        ("v1", "vm", 1 * USD),
    }
    one = await wallet_stub.GetResourceCosts(
        pb.GetResourceCostsRequest(organization_id=str(org), resource_ids=["p1"]), timeout=5
    )
    [p1] = one.resources
    assert p1.first_charged_at.ToDatetime() <= p1.last_charged_at.ToDatetime()


async def test_refunds_lower_the_spend(wallet_stub: WalletServiceStub, new_org: NewOrg) -> None:
    org = await new_org("USD")
    await transfer(wallet_stub, org, pb.TOPUP, 10 * USD)
    await transfer(wallet_stub, org, pb.CHARGE, 4 * USD, resource_type="pod")
    await transfer(wallet_stub, org, pb.REFUND, 1 * USD, resource_type="pod")
    e = await wallet_stub.GetExpenditure(
        pb.GetExpenditureRequest(organization_id=str(org)), timeout=5
    )
    assert e.last_7_days.total.amount == 3 * USD


@pytest.mark.parametrize(
    "call",
    [
        lambda s, org: s.GetWalletSummary(pb.GetWalletSummaryRequest(organization_id=org)),
        lambda s, org: s.GetExpenditure(pb.GetExpenditureRequest(organization_id=org)),
        lambda s, org: s.GetSpendingTrend(pb.GetSpendingTrendRequest(organization_id=org)),
        lambda s, org: s.GetUsageAnalytics(pb.GetUsageAnalyticsRequest(organization_id=org)),
    ],
)
async def test_an_unknown_organization_is_not_found(
    wallet_stub: WalletServiceStub, call: Callable[[WalletServiceStub, str], Awaitable[object]]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(wallet_stub, str(uuid.uuid4()))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "organization" in (err.value.details() or "")


async def test_trend_days_out_of_range_are_invalid(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org("USD")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet_stub.GetSpendingTrend(
            pb.GetSpendingTrendRequest(organization_id=str(org), days=400), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "days" in (err.value.details() or "")


async def test_the_status_is_the_one_of_the_balance_shown(
    wallet_stub: WalletServiceStub, wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    """A fast-path transfer commits its balance, then the level a moment later: read in
    between, the card showed the new balance with the old status (40 left, "available")."""
    org = await new_org()
    await transfer(wallet_stub, org, pb.TOPUP, 100 * USD)
    await wallet_stub.SetThresholds(
        pb.SetThresholdsRequest(organization_id=str(org), critical_amount=50 * USD), timeout=5
    )
    async with wallet_pool.connection() as conn:  # the charge's balance, its level not yet
        await conn.execute(
            "UPDATE wallets SET balance = balance - %s WHERE organization_id = %s",
            (60 * USD, org),
        )
    try:
        s = await wallet_stub.GetWalletSummary(pb.GetWalletSummaryRequest(organization_id=str(org)))
    finally:  # the ledger's own balance again (audit.check reads every wallet)
        async with wallet_pool.connection() as conn:
            await conn.execute(
                "UPDATE wallets SET balance = balance + %s WHERE organization_id = %s",
                (60 * USD, org),
            )
    assert (s.balance.amount, s.service_status) == (40 * USD, "critical")
