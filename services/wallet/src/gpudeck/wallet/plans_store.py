"""All SQL of plans and credits: the catalog, an organization's plan, plan changes, purchases.

Lock order as everywhere: the organization's wallet row first (which serializes its idempotency
keys), then its organization row. Money moves only through `LedgerStore.post_transfers`, in the
caller's transaction: a refused transfer raises, and the caller's rollback undoes the rest.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection

from gpudeck.kit.errors import InvalidArgument, NotFound, echo
from gpudeck.wallet import idempotency, plan_events
from gpudeck.wallet.ledger import (
    InsufficientFunds,
    Kind,
    Transaction,
    TransferRequest,
    validate,
)
from gpudeck.wallet.ledger_store import LedgerStore, db_now, lock_wallets
from gpudeck.wallet.money import check_currency
from gpudeck.wallet.plans import (
    DEFAULT_PLAN,
    ChangePlanRequest,
    CreditGrant,
    Plan,
    PlanChange,
    PlanStatus,
    billing_month,
    check_plan_code,
    credits_key,
    fee_key,
    plan_change,
    plan_renewal,
)

Conn = AsyncConnection[Any]
PURCHASE_SOURCE = "purchase"

CATALOG = {
    "USD": "SELECT code, name, 'USD', monthly_fee_usd, credits_usd, position FROM plans",
    "INR": "SELECT code, name, 'INR', monthly_fee_inr, credits_inr, position FROM plans",
}
ORGANIZATION = """
SELECT o.plan_code, w.currency, w.credits, o.kyc_status
FROM organizations o JOIN wallets w ON w.organization_id = o.id
WHERE o.id = %s AND o.deleted_at IS NULL
"""


class PlanStore:
    """Reads the catalog and changes plans; posts fees, plan credits and purchased credits."""

    def __init__(self, ledger: LedgerStore) -> None:
        self.ledger = ledger
        self.outbox = ledger.outbox

    async def list_plans(self, conn: Conn, currency: str) -> list[Plan]:
        code = check_currency(currency)
        cur = await conn.execute(CATALOG[code] + " ORDER BY position, code")
        return [Plan(*row) for row in await cur.fetchall()]

    async def plan(self, conn: Conn, code: str, currency: str) -> Plan:
        """The plan `code` priced in `currency`; InvalidArgument naming plan_code if unknown."""
        wanted = check_plan_code(code)
        plans = await self.list_plans(conn, currency)
        for plan in plans:
            if plan.code == wanted:
                return plan
        known = ", ".join(p.code for p in plans)
        raise InvalidArgument(
            f"plan_code must be one of {known}, got {echo(code)}", field="plan_code"
        )

    async def wallet_currency(self, conn: Conn, organization_id: uuid.UUID) -> str:
        return (await _organization(conn, organization_id))[1]

    async def status(self, conn: Conn, organization_id: uuid.UUID) -> PlanStatus:
        """The organization's plan and its available credits (the wallet's unexpired credits)."""
        plan_code, currency, credits, _ = await _organization(conn, organization_id)
        return PlanStatus(await self._current(conn, plan_code, currency), credits)

    async def credit_grants(self, conn: Conn, organization_id: uuid.UUID) -> list[CreditGrant]:
        """The grants of credits with money left and not expired, in the order they are
        spent: the first to expire first."""
        cur = await conn.execute(
            "SELECT balance, coalesce(credit_source, ''), expires_at, created_at"
            " FROM ledger_accounts WHERE organization_id = %s AND kind = 'credit'"
            " AND balance > 0 AND (expires_at IS NULL OR expires_at > now())"
            " ORDER BY expires_at NULLS LAST, id",
            (organization_id,),
        )
        return [CreditGrant(*row) for row in await cur.fetchall()]

    async def change(self, conn: Conn, request: ChangePlanRequest) -> PlanStatus:
        """Change the organization's plan by the rule of `plans`; idempotent by request key."""
        request.validate()
        org = request.organization_id
        now = await db_now(conn)
        found = await self._lock_plan(conn, org, now)
        if found is None:
            raise NotFound(f"organization {org} not found", field="organization_id")
        previous, currency = found
        scope, fingerprint = str(org), request.fingerprint()
        earlier = await idempotency.recall_in_wallet(conn, org, request.key, fingerprint)
        if earlier is not None:
            return PlanStatus.from_json(earlier)
        target = await self.plan(conn, request.plan_code, currency)
        paid = await self._paid_this_month(conn, org, target.code, month=billing_month(now))
        change = plan_change(org, previous, target, now, paid_this_month=paid, actor=request.actor)
        await self._post(conn, change.transfers, now)
        if change.changes_anything:
            await self._switch(conn, change, actor=request.actor)
        status = PlanStatus(
            plan=target,
            available_credits=await _credits(conn, org),
            charged=change.charged,
            credits_granted=change.credits_granted,
            previous_plan_code=previous.code,
        )
        await idempotency.remember(conn, scope, request.key, fingerprint, status.to_json())
        return status

    async def due_renewals(
        self, conn: Conn, now: datetime, *, after: uuid.UUID | None = None, limit: int = 500
    ) -> list[uuid.UUID]:
        """Organizations on a paid plan that paid for no plan in the month of `now` (one that
        moved down from a plan it paid for this month pays the lower one from the next), in id
        order, the first `limit` of those past `after`."""
        month = billing_month(now)
        cur = await conn.execute(
            "SELECT o.id FROM organizations o"
            " JOIN wallets w ON w.organization_id = o.id"
            " JOIN plans p ON p.code = o.plan_code"
            " WHERE o.deleted_at IS NULL"
            "   AND CASE w.currency WHEN 'INR' THEN p.monthly_fee_inr + p.credits_inr"
            "       ELSE p.monthly_fee_usd + p.credits_usd END > 0"
            "   AND NOT EXISTS (SELECT 1 FROM transactions t WHERE t.organization_id = o.id"
            "       AND t.idempotency_key = ANY(%s))"
            "   AND o.id > coalesce(%s, '00000000-0000-0000-0000-000000000000'::uuid)"
            " ORDER BY o.id LIMIT %s",
            (await self._month_keys(conn, month), after, limit),
        )
        return [row[0] for row in await cur.fetchall()]

    async def renew(self, conn: Conn, organization_id: uuid.UUID, now: datetime) -> str:
        """Renew the organization's plan for the month of `now` by the rule of `plans`, in the
        caller's transaction: "renewed", "downgraded" (it could not pay), or "" (nothing due)."""
        org = organization_id
        found = await self._lock_plan(conn, org, now)
        if found is None:
            return ""
        plan, currency = found
        month = billing_month(now)
        if not plan.paid or await self._paid_this_month(conn, org, month=month):
            return ""
        renewal = plan_renewal(org, plan, now)
        try:
            async with conn.transaction():
                await self._post(conn, renewal.transfers, now)
        except InsufficientFunds:
            default = await self._current(conn, DEFAULT_PLAN, currency)
            await self._switch(conn, PlanChange(org, plan, default, renewal.month, ()), "system")
            return "downgraded"
        event = plan_events.plan_changed(
            renewal, actor="system", event_type=plan_events.PLAN_RENEWED
        )
        await self.outbox.add(conn, event)
        return "renewed"

    async def add_credits(self, conn: Conn, request: TransferRequest) -> tuple[Transaction, int]:
        """Post a purchase of credits (a CREDIT_GRANT from "purchase"); its transaction and the
        credits available after it. Past the KYC limit (all the money it added) the organization
        must be KYC-verified (the ledger checks)."""
        if request.kind is not Kind.CREDIT_GRANT or request.credit_source != PURCHASE_SOURCE:
            raise InvalidArgument("a purchase is a credit grant from purchase", field="kind")
        now = await db_now(conn)
        validate(request)
        _, currency, _, _ = await _organization(conn, request.organization_id)
        if request.currency and request.currency != currency:
            raise InvalidArgument(
                f"currency {request.currency} is not the wallet currency {currency}",
                field="currency",
            )
        request = request.in_wallet_terms(currency)
        try:  # a retry is answered even after its expiry passed: the ledger checks new ones
            [transaction] = await self._post(conn, [request], now)
        except InvalidArgument as exc:
            if exc.field == "credit_expires_at":  # AddCredits calls it expires_at
                raise InvalidArgument(
                    "expires_at must be in the future", field="expires_at"
                ) from None
            raise
        # A retry answers as the first call did: the credits available then, not now. (The
        # post above locked the wallet, so a concurrent first call has committed its answer.)
        scope = str(request.organization_id)
        earlier = await idempotency.recall_in_wallet(
            conn, request.organization_id, request.key, request.fingerprint
        )
        if earlier is not None:
            return transaction, int(earlier["available_credits"])
        available = await _credits(conn, request.organization_id)
        await idempotency.remember(
            conn, scope, request.key, request.fingerprint, {"available_credits": available}
        )
        return transaction, available

    async def _post(
        self, conn: Conn, transfers: Sequence[TransferRequest], now: datetime
    ) -> list[Transaction]:
        """Post all of `transfers` or raise the first refusal (the caller rolls back)."""
        if not transfers:
            return []
        outcomes = await self.ledger.post_transfers(conn, transfers, now=now)
        for outcome in outcomes:
            if outcome.error is not None:
                raise outcome.error
        return [o.transaction for o in outcomes if o.transaction is not None]

    async def _lock_plan(
        self, conn: Conn, organization_id: uuid.UUID, now: datetime
    ) -> tuple[Plan, str] | None:
        """Lock the organization's wallet, then its row; its plan and wallet currency (None
        when there is no such live organization)."""
        locked = await lock_wallets(conn, [organization_id], now)
        cur = await conn.execute(
            "SELECT plan_code FROM organizations WHERE id = %s AND deleted_at IS NULL FOR UPDATE",
            (organization_id,),
        )
        row = await cur.fetchone()
        if row is None or organization_id not in locked:
            return None
        currency = locked[organization_id].wallet.currency
        return await self._current(conn, row[0], currency), currency

    async def _switch(self, conn: Conn, change: PlanChange, actor: str) -> None:
        """Put the organization on `change.plan` and announce it."""
        await conn.execute(
            "UPDATE organizations SET plan_code = %s WHERE id = %s",
            (change.plan.code, change.organization_id),
        )
        await self.outbox.add(conn, plan_events.plan_changed(change, actor=actor))

    async def _current(self, conn: Conn, plan_code: str, currency: str) -> Plan:
        """The organization's current plan; a code no longer in the catalog counts as free."""
        try:
            return await self.plan(conn, plan_code, currency)
        except InvalidArgument:
            return Plan(plan_code, plan_code.title(), currency, 0, 0, 0)

    async def _paid_this_month(
        self, conn: Conn, organization_id: uuid.UUID, plan_code: str = "", *, month: str
    ) -> bool:
        """Whether the fee or credits of the plan (of any plan, without `plan_code`) for
        `month` are already in the ledger (whose transactions are unique by organization and
        key)."""
        keys = (
            [fee_key(plan_code, month), credits_key(plan_code, month)]
            if plan_code
            else await self._month_keys(conn, month)
        )
        cur = await conn.execute(
            "SELECT 1 FROM transactions WHERE organization_id = %s AND idempotency_key = ANY(%s)"
            " LIMIT 1",
            (organization_id, keys),
        )
        return await cur.fetchone() is not None

    async def paid_this_month(self, conn: Conn, organization_id: uuid.UUID, now: datetime) -> bool:
        """Whether the organization paid for a plan in the month of `now` (else its renewal is
        due: the hourly loop charges it)."""
        keys = await self._month_keys(conn, billing_month(now))
        cur = await conn.execute(
            "SELECT EXISTS (SELECT 1 FROM transactions WHERE organization_id = %s"
            " AND idempotency_key = ANY(%s))",
            (organization_id, keys),
        )
        row = await cur.fetchone()
        return bool(row and row[0])

    async def _month_keys(self, conn: Conn, month: str) -> list[str]:
        """The ledger keys of every plan's fee and credits for `month`."""
        cur = await conn.execute("SELECT code FROM plans ORDER BY code")
        codes = [row[0] for row in await cur.fetchall()]
        return [key for c in codes for key in (fee_key(c, month), credits_key(c, month))]


async def _organization(conn: Conn, organization_id: uuid.UUID) -> tuple[str, str, int, str]:
    cur = await conn.execute(ORGANIZATION, (organization_id,))
    row = await cur.fetchone()
    if row is None:
        raise NotFound(f"organization {organization_id} not found", field="organization_id")
    return row[0], row[1], row[2], row[3]


async def _credits(conn: Conn, organization_id: uuid.UUID) -> int:
    """The credits available now: as `credit_grants` sums them (past their expiry they count no
    more, swept or not yet)."""
    cur = await conn.execute(
        "SELECT coalesce(sum(balance), 0) FROM ledger_accounts"
        " WHERE organization_id = %s AND kind = 'credit' AND balance > 0"
        " AND (expires_at IS NULL OR expires_at > now())",
        (organization_id,),
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0
