"""gRPC ⇄ domain for plans, credits and invoices: decode, call the store, encode.

Adding credits is its own call (AddCredits) rather than a Transfer: it is a purchase, so it is
always a CREDIT_GRANT with credit_source "purchase", in the wallet currency, and it follows the
KYC limit of money coming in; Transfer's CREDIT_GRANT stays the operators' tool for promotions.
"""

from __future__ import annotations

import asyncio
from datetime import UTC
from functools import cached_property
from typing import Any, TypeAlias

from gpudeck.kit.errors import InvalidArgument
from gpudeck.kit.logs import actor
from gpudeck.proto.wallet.v1 import wallet_pb2 as pb
from gpudeck.wallet import convert, pdf
from gpudeck.wallet.deps import Wallet
from gpudeck.wallet.invoices import Invoice, billable_period, next_invoice_date
from gpudeck.wallet.invoices_store import InvoiceStore
from gpudeck.wallet.ledger import Kind, TransferRequest, check_client_key
from gpudeck.wallet.ledger_store import db_now
from gpudeck.wallet.live_actor import require_live_actor
from gpudeck.wallet.plans import ChangePlanRequest, Plan, PlanStatus, next_month_start
from gpudeck.wallet.plans_store import PURCHASE_SOURCE, PlanStore

# grpc.aio.ServicerContext, which these calls never use: left untyped so this module needs no
# grpc stubs (generic with them, missing without).
Ctx: TypeAlias = Any
MAX_INVOICES = 120


class PlanRpcs:
    wallet: Wallet

    @cached_property
    def _plans(self) -> PlanStore:
        return PlanStore(self.wallet.ledger)

    @cached_property
    def _invoices(self) -> InvoiceStore:
        return InvoiceStore(self.wallet.ledger.outbox)

    # ------------------------------------------------------------------ plans, credits

    async def ListPlans(self, request: pb.ListPlansRequest, context: Ctx) -> pb.ListPlansResponse:
        org = convert.optional_id(request.organization_id, "organization_id")
        async with self.wallet.pool.connection() as conn:
            currency = request.currency
            if not currency and org is not None:
                currency = await self._plans.wallet_currency(conn, org)
            if not currency:
                raise InvalidArgument("currency or organization_id is required", field="currency")
            plans = await self._plans.list_plans(conn, currency)
        return pb.ListPlansResponse(plans=[_plan(p) for p in plans])

    async def GetPlan(self, request: pb.GetPlanRequest, context: Ctx) -> pb.PlanStatus:
        org = convert.parse_id(request.organization_id, "organization_id")
        async with self.wallet.pool.connection() as conn, conn.transaction():
            current = await self._plans.status(conn, org)
            grants = await self._plans.credit_grants(conn, org)
            now = await db_now(conn)
            paid = current.plan.paid and await self._plans.paid_this_month(conn, org, now)
        status = _status(current)
        currency = status.available_credits.currency
        # What the grants hold now: credits past their expiry count no more, swept or not yet.
        status.available_credits.amount = sum(g.available for g in grants)
        status.credit_grants.extend(
            pb.CreditGrant(
                available=convert.money(g.available, currency),
                source=g.source,
                expires_at=convert.timestamp(g.expires_at),
                granted_at=convert.timestamp(g.granted_at),
            )
            for g in grants
        )
        if current.plan.paid:  # today while this month's renewal is still due (after midnight)
            today = now.astimezone(UTC).date()
            status.renews_on = (next_month_start(today) if paid else today).isoformat()
        return status

    async def ChangePlan(self, request: pb.ChangePlanRequest, context: Ctx) -> pb.PlanStatus:
        change = ChangePlanRequest(
            key=check_client_key(request.idempotency_key),
            organization_id=convert.parse_id(request.organization_id, "organization_id"),
            plan_code=request.plan_code,
            actor=actor.get(),
        ).validate()
        async with self.wallet.pool.connection() as conn, conn.transaction():
            await require_live_actor(conn)
            status = await self._plans.change(conn, change)
        return _status(status, change=True)

    async def AddCredits(
        self, request: pb.AddCreditsRequest, context: Ctx
    ) -> pb.AddCreditsResponse:
        if not request.HasField("amount"):
            raise InvalidArgument("amount is required", field="amount")
        purchase = TransferRequest(
            key=check_client_key(request.idempotency_key),
            organization_id=convert.parse_id(request.organization_id, "organization_id"),
            kind=Kind.CREDIT_GRANT,
            amount=request.amount.amount,
            currency=request.amount.currency.strip().upper(),
            description="Credits purchased",
            credit_expires_at=convert.optional_time(request, "expires_at"),
            credit_source=PURCHASE_SOURCE,
            reference=request.reference,
            actor=actor.get(),
        )
        async with self.wallet.pool.connection() as conn, conn.transaction():
            await require_live_actor(conn)
            tx, available = await self._plans.add_credits(conn, purchase)
        return pb.AddCreditsResponse(
            transaction=convert.transaction(tx),
            available_credits=convert.money(available, tx.currency),
        )

    # ------------------------------------------------------------------ invoices

    async def ListInvoices(
        self, request: pb.ListInvoicesRequest, context: Ctx
    ) -> pb.ListInvoicesResponse:
        org = convert.parse_id(request.organization_id, "organization_id")
        limit = min(max(request.limit or 24, 1), MAX_INVOICES)
        async with self.wallet.pool.connection() as conn:
            invoices = await self._invoices.list_invoices(conn, org, limit=limit)
            now = await db_now(conn)
        return pb.ListInvoicesResponse(
            invoices=[_invoice(i) for i in invoices],
            next_invoice_date=next_invoice_date(now).isoformat(),
        )

    async def GetInvoice(self, request: pb.GetInvoiceRequest, context: Ctx) -> pb.Invoice:
        invoice_id = convert.parse_id(request.invoice_id, "invoice_id")
        org = convert.optional_id(request.organization_id, "organization_id")
        async with self.wallet.pool.connection() as conn:
            return _invoice(await self._invoices.get(conn, invoice_id, org))

    async def GenerateInvoices(
        self, request: pb.GenerateInvoicesRequest, context: Ctx
    ) -> pb.ListInvoicesResponse:
        org = convert.optional_id(request.organization_id, "organization_id")
        async with self.wallet.pool.connection() as conn, conn.transaction():
            now = await db_now(conn)
            period = billable_period(request.period, now)
            invoices = await self._invoices.generate(conn, period, org)
        return pb.ListInvoicesResponse(
            invoices=[_invoice(i) for i in invoices],
            next_invoice_date=next_invoice_date(now).isoformat(),
        )

    async def MarkInvoicePaid(self, request: pb.MarkInvoicePaidRequest, context: Ctx) -> pb.Invoice:
        invoice_id = convert.parse_id(request.invoice_id, "invoice_id")
        org = convert.optional_id(request.organization_id, "organization_id")
        async with self.wallet.pool.connection() as conn, conn.transaction():
            return _invoice(await self._invoices.mark_paid(conn, invoice_id, org))

    async def RenderInvoicePdf(
        self, request: pb.RenderInvoicePdfRequest, context: Ctx
    ) -> pb.InvoicePdf:
        invoice_id = convert.parse_id(request.invoice_id, "invoice_id")
        org = convert.optional_id(request.organization_id, "organization_id")
        async with self.wallet.pool.connection() as conn:
            invoice = await self._invoices.get(conn, invoice_id, org)
        document = await asyncio.to_thread(pdf.render, invoice, self.wallet.settings.invoice_font)
        return pb.InvoicePdf(pdf=document, filename=pdf.filename(invoice))


def _plan(p: Plan) -> pb.Plan:
    return pb.Plan(
        code=p.code,
        name=p.name,
        monthly_fee=convert.money(p.monthly_fee, p.currency),
        included_credits=convert.money(p.included_credits, p.currency),
    )


def _status(s: PlanStatus, *, change: bool = False) -> pb.PlanStatus:
    currency = s.plan.currency
    message = pb.PlanStatus(
        plan=_plan(s.plan), available_credits=convert.money(s.available_credits, currency)
    )
    if change:
        message.charged.CopyFrom(convert.money(s.charged, currency))
        message.credits_granted.CopyFrom(convert.money(s.credits_granted, currency))
        message.previous_plan_code = s.previous_plan_code
    return message


def _invoice(i: Invoice) -> pb.Invoice:
    return pb.Invoice(
        id=str(i.id),
        organization_id=str(i.organization_id),
        organization_name=i.organization_name,
        period=str(i.period),
        period_start=i.period.start.isoformat(),
        period_end=i.period.last_day.isoformat(),
        lines=[
            pb.InvoiceLine(
                resource_type=x.resource_type,
                description=x.description,
                amount=convert.money(x.amount, i.currency),
            )
            for x in i.lines
        ],
        total=convert.money(i.total, i.currency),
        status=i.status,
        issued_at=convert.timestamp(i.issued_at),
        paid_at=convert.timestamp(i.paid_at),
    )


__all__: list[Any] = ["PlanRpcs"]
