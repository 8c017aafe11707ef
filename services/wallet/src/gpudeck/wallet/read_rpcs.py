"""gRPC ⇄ domain for what dashboards read, usage records, exchange rates, alerts settings."""

from __future__ import annotations

from functools import cached_property
from typing import Any, TypeAlias

from gpudeck.kit.errors import InvalidArgument
from gpudeck.kit.logs import actor
from gpudeck.proto.wallet.v1 import wallet_pb2 as pb
from gpudeck.wallet import convert, read_convert
from gpudeck.wallet import readmodels as rm
from gpudeck.wallet import readmodels_store as store
from gpudeck.wallet.alerts import Thresholds
from gpudeck.wallet.deps import Wallet
from gpudeck.wallet.invoices import next_invoice_date
from gpudeck.wallet.once import earlier_answer, once
from gpudeck.wallet.rates import Conversion, NewRate, parse_rate
from gpudeck.wallet.read_convert import Display
from gpudeck.wallet.text import check_text
from gpudeck.wallet.thresholds_store import ThresholdStore
from gpudeck.wallet.usage import UsageEvent, check_recent, check_top
from gpudeck.wallet.usage_store import UsageStore

# grpc.aio.ServicerContext, which these calls never use (no grpc stubs needed).
Ctx: TypeAlias = Any
MAX_RESOURCE_IDS = 1000


class ReadRpcs:
    wallet: Wallet

    @cached_property
    def _usage(self) -> UsageStore:
        return UsageStore(self.wallet.ledger)

    @cached_property
    def _alerts(self) -> ThresholdStore:
        return ThresholdStore(self.wallet.ledger)

    async def GetWalletSummary(
        self, request: pb.GetWalletSummaryRequest, context: Ctx
    ) -> pb.WalletSummary:
        org = convert.parse_id(request.organization_id, "organization_id")
        async with self.wallet.pool.connection() as conn:
            depletion = self.wallet.ledger.policy.depletion_seconds
            state, _, by_type = await store.wallet(conn, org, depletion)
            display = Display(
                await store.conversion_to(conn, state.currency, request.display_currency)
            )
        return read_convert.summary(rm.summary(state, by_type), display)

    async def GetExpenditure(
        self, request: pb.GetExpenditureRequest, context: Ctx
    ) -> pb.Expenditure:
        org = convert.parse_id(request.organization_id, "organization_id")
        async with self.wallet.pool.connection() as conn:
            currency, now = await store.currency_and_now(conn, org)
            today = store.utc_day(now)
            totals = await store.period_totals(conn, org, rm.Periods.ending(today))
            display = Display(await store.conversion_to(conn, currency, request.display_currency))
        spent = rm.expenditure(totals, today, next_invoice_date(now))
        return read_convert.expenditure(spent, display)

    async def GetSpendingTrend(
        self, request: pb.GetSpendingTrendRequest, context: Ctx
    ) -> pb.SpendingTrend:
        org = convert.parse_id(request.organization_id, "organization_id")
        days = rm.check_days(request.days)
        async with self.wallet.pool.connection() as conn:
            currency, today = await store.currency_and_today(conn, org)
            rows = await store.daily(conn, org, rm.trend_start(today, days), today)
            display = Display(await store.conversion_to(conn, currency, request.display_currency))
        return read_convert.trend(rm.trend(rows, today, days), display)

    async def GetMonthlyBreakdown(
        self, request: pb.GetMonthlyBreakdownRequest, context: Ctx
    ) -> pb.MonthlyBreakdown:
        org = convert.parse_id(request.organization_id, "organization_id")
        months = rm.check_months(request.months)
        async with self.wallet.pool.connection() as conn:
            currency, today = await store.currency_and_today(conn, org)
            rows = await store.monthly(conn, org, rm.month_start(today, 1 - months))
            display = Display(await store.conversion_to(conn, currency, request.display_currency))
        return read_convert.monthly(rm.monthly(rows, today, months), display)

    async def GetResourceCosts(
        self, request: pb.GetResourceCostsRequest, context: Ctx
    ) -> pb.ResourceCosts:
        org = convert.parse_id(request.organization_id, "organization_id")
        if len(request.resource_ids) > MAX_RESOURCE_IDS:
            raise InvalidArgument(
                f"at most {MAX_RESOURCE_IDS} resource_ids per call", field="resource_ids"
            )
        for resource_id in request.resource_ids:  # what they were charged for is text too
            check_text(resource_id, "resource_ids")
        limit = rm.check_limit(request.limit) if not request.resource_ids else MAX_RESOURCE_IDS
        async with self.wallet.pool.connection() as conn:
            currency, _ = await store.currency_and_today(conn, org)
            costs = await store.resource_costs(conn, org, request.resource_ids, limit)
            display = Display(await store.conversion_to(conn, currency, request.display_currency))
        return read_convert.resource_costs(costs, display)

    async def GetUsageAnalytics(
        self, request: pb.GetUsageAnalyticsRequest, context: Ctx
    ) -> pb.UsageAnalytics:
        org = convert.parse_id(request.organization_id, "organization_id")
        top, recent = check_top(request.top), check_recent(request.recent)
        check_text(request.meter, "meter", max_length=100)
        async with self.wallet.pool.connection() as conn:
            currency, analytics = await self._usage.analytics(
                conn, org, top=top, recent=recent, meter=request.meter
            )
            display = Display(await store.conversion_to(conn, currency, request.display_currency))
        return read_convert.analytics(analytics, display)

    # ------------------------------------------------------------------ usage events

    async def RecordUsage(self, request: pb.RecordUsageRequest, context: Ctx) -> pb.UsageRecord:
        event = UsageEvent(
            event_id=request.event_id,
            organization_id=convert.parse_id(request.organization_id, "organization_id"),
            meter=request.meter,
            quantity=request.quantity,
            unit_price=request.unit_price,
            dimensions=dict(request.dimensions),
            project_id=convert.optional_id(request.project_id, "project_id"),
            success=request.success,
            latency_ms=request.latency_ms,
            at=convert.optional_time(request, "at"),
        )
        async with self.wallet.pool.connection() as conn, conn.transaction():
            record = await self._usage.record(conn, event, actor=actor.get())
        return read_convert.usage_record(
            record, Display(Conversion(record.currency, record.currency))
        )

    # ------------------------------------------------------------------ currencies

    async def SetExchangeRate(
        self, request: pb.SetExchangeRateRequest, context: Ctx
    ) -> pb.ExchangeRate:
        new = NewRate(
            base=request.base,
            quote=request.quote,
            rate=parse_rate(request.rate),
            as_of=convert.optional_time(request, "as_of"),
            source=request.source or actor.get() or "admin",
        )

        async def add() -> pb.ExchangeRate:
            return read_convert.exchange_rate(await store.add_rate(conn, new))

        # One scope for every pair (a key is one request, whichever pair it names), and the
        # pair as stored (a retry may spell "usd"): used twice, a key set two rates.
        sent = pb.SetExchangeRateRequest()
        sent.CopyFrom(request)
        sent.base, sent.quote = sent.base.strip().upper(), sent.quote.strip().upper()
        async with self.wallet.pool.connection() as conn, conn.transaction():
            # Keys were kept per pair as sent until 2026-12: a retry of a request answered then
            # gets that answer, not a second rate dated now (it could outdate a newer one).
            if request.idempotency_key:
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                    (f"rates {request.idempotency_key}",),
                )
                legacy = f"rate:{request.base}:{request.quote}"
                earlier = await earlier_answer(conn, legacy, request, pb.ExchangeRate)
                if earlier is not None:
                    return earlier
            return await once(conn, "rates", sent, pb.ExchangeRate, add)

    async def ListExchangeRates(
        self, request: pb.ListExchangeRatesRequest, context: Ctx
    ) -> pb.ListExchangeRatesResponse:
        limit = rm.check_limit(request.limit, default=50, maximum=500)
        async with self.wallet.pool.connection() as conn:
            rates = await store.list_rates(conn, request.base, request.quote, limit)
        return pb.ListExchangeRatesResponse(rates=[read_convert.exchange_rate(r) for r in rates])

    # ------------------------------------------------------------------ alerts, auto top-up

    async def SetThresholds(self, request: pb.SetThresholdsRequest, context: Ctx) -> pb.Thresholds:
        org = convert.parse_id(request.organization_id, "organization_id")
        thresholds = Thresholds(
            request.warning_amount,
            request.critical_amount,
            request.warning_hours,
            request.critical_hours,
        )

        async def save() -> pb.Thresholds:
            fields = list(request.fields)
            return read_convert.thresholds(
                await self._alerts.set_thresholds(conn, org, thresholds, fields)
            )

        async with self.wallet.pool.connection() as conn, conn.transaction():
            return await once(conn, f"org:{org}", request, pb.Thresholds, save)

    async def GetThresholds(self, request: pb.GetThresholdsRequest, context: Ctx) -> pb.Thresholds:
        org = convert.parse_id(request.organization_id, "organization_id")
        async with self.wallet.pool.connection() as conn:
            found = await self._alerts.get_thresholds(conn, org)
        return read_convert.thresholds(found)

    async def GetAutoTopUp(self, request: pb.GetAutoTopUpRequest, context: Ctx) -> pb.AutoTopUp:
        org = convert.parse_id(request.organization_id, "organization_id")
        async with self.wallet.pool.connection() as conn:
            return read_convert.auto_topup(await self._alerts.get_auto_topup(conn, org))

    async def SetAutoTopUp(self, request: pb.SetAutoTopUpRequest, context: Ctx) -> pb.AutoTopUp:
        org = convert.parse_id(request.organization_id, "organization_id")

        async def save() -> pb.AutoTopUp:
            rule = await self._alerts.set_auto_topup(
                conn, org, enabled=request.enabled, below=request.below, amount=request.amount
            )
            return read_convert.auto_topup(rule)

        async with self.wallet.pool.connection() as conn, conn.transaction():
            return await once(conn, f"org:{org}", request, pb.AutoTopUp, save)

    async def CompleteTopUp(
        self, request: pb.CompleteTopUpRequest, context: Ctx
    ) -> pb.PendingTopUp:
        pending_id = convert.parse_id(request.pending_top_up_id, "pending_top_up_id")
        async with self.wallet.pool.connection() as conn, conn.transaction():
            done = await self._alerts.complete_topup(
                conn,
                pending_id,
                succeeded=request.succeeded,
                reference=request.reference,
                actor=actor.get(),
            )
        return read_convert.pending_topup(done)
