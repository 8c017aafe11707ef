"""The wallet: its summary (balance, held, spendable, run rate), transactions and low-balance
thresholds; `topUpWallet`, `setLowBalanceThresholds`; the `walletUpdated` subscription."""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import time
from collections.abc import AsyncGenerator, Awaitable
from datetime import UTC, datetime
from typing import TypeVar

import grpc
import strawberry

from gpudeck.gateway.context import Info
from gpudeck.gateway.errors import BAD_USER_INPUT, Arguments, GatewayError, rpc_details
from gpudeck.gateway.ids import canonical_id
from gpudeck.gateway.live import Watch
from gpudeck.gateway.money import parse_amount, parse_currency
from gpudeck.gateway.permissions import BillingReader, BillingWriter, require
from gpudeck.gateway.types import account as accounts
from gpudeck.gateway.types.common import Conversion, Money, OptionalKey, check_first, when
from gpudeck.proto.common.v1 import money_pb2
from gpudeck.proto.wallet.v1 import wallet_pb2

log = logging.getLogger(__name__)
T = TypeVar("T")

# How often a live subscription checks its token again, and re-reads while NATS is down.
RECHECK_SECONDS = 5.0
# What a live view waits out (the wallet restarting, or shedding load under a burst of reads).
TRANSIENT = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
)


@strawberry.type(description="Run rate of one resource type (pod, vm, nfs_volume, ...).")
class RunRateByType:
    resource_type: str
    per_hour: Money


@strawberry.type(description="What running resources cost now: per hour, day and 30 days.")
class RunRate:
    per_hour: Money
    per_day: Money
    per_month: Money
    by_resource_type: list[RunRateByType]


@strawberry.type(
    description=(
        "The wallet card. `balance` is everything the organization can spend (cash and "
        "unexpired credits), `spendable` = balance - heldBalance. `hoursRemaining` is null when "
        "nothing runs; `serviceStatus` is available, warning, critical or paused."
    )
)
class Wallet:
    organization_id: strawberry.ID
    currency: str = strawberry.field(description="The currency of every amount here.")
    wallet_currency: str
    balance: Money
    held_balance: Money
    spendable: Money
    credits: Money
    run_rate: RunRate
    hours_remaining: float | None
    service_status: str
    conversion: Conversion | None = strawberry.field(
        description="The rate used when shown in another currency than the wallet's."
    )

    @classmethod
    def from_pb(cls, m: wallet_pb2.WalletSummary) -> Wallet:
        rate = m.run_rate
        return cls(
            organization_id=strawberry.ID(m.organization_id),
            currency=m.currency,
            wallet_currency=m.wallet_currency or m.currency,
            balance=Money.from_pb(m.balance),
            held_balance=Money.from_pb(m.held_balance),
            spendable=Money.from_pb(m.spendable),
            credits=Money.from_pb(m.credits),
            run_rate=RunRate(
                per_hour=Money.from_pb(rate.per_hour),
                per_day=Money.from_pb(rate.per_day),
                per_month=Money.from_pb(rate.per_month),
                by_resource_type=[
                    RunRateByType(resource_type=t.resource_type, per_hour=Money.from_pb(t.per_hour))
                    for t in rate.by_resource_type
                ],
            ),
            hours_remaining=m.hours_remaining if m.HasField("hours_remaining") else None,
            service_status=m.service_status,
            conversion=Conversion.from_pb(m.conversion) if m.HasField("conversion") else None,
        )


async def load_wallet(info: Info, organization_id: str, display: str) -> Wallet:
    return Wallet.from_pb(await info.context.loaders.summary.load((organization_id, display)))


@strawberry.enum(description="What a ledger transaction was.")
class TransactionKind(enum.Enum):
    TOPUP = "TOPUP"
    CHARGE = "CHARGE"
    REFUND = "REFUND"
    ADJUSTMENT = "ADJUSTMENT"
    CREDIT_GRANT = "CREDIT_GRANT"
    USAGE = "USAGE"
    CREDIT_EXPIRY = "CREDIT_EXPIRY"
    OTHER = "OTHER"  # a kind this gateway does not know yet


# Kinds that take money from the balance (their `amount` is what they took); an adjustment's
# amount carries its own sign; the other kinds add.
TAKING = {TransactionKind.CHARGE, TransactionKind.USAGE, TransactionKind.CREDIT_EXPIRY}


@strawberry.type(
    description=(
        "One ledger transaction, in the wallet currency; a top-up also keeps what was paid "
        "(`paymentAmount`, in its own currency) and the `exchangeRate` used. `amount` is what "
        "moved (an adjustment's with its sign); `balanceChange` what it did to the balance: "
        "negative for charges, usage and expired credits; of it, `creditsChange` moved "
        "credits and `cashChange` cash (a charge paid partly with credits shows both). "
        "`reference`: the caller's, e.g. a payment id."
    )
)
class Transaction:
    id: strawberry.ID
    kind: TransactionKind
    amount: Money
    balance_change: Money | None = strawberry.field(description="null for a kind not known here")
    cash_change: Money
    credits_change: Money
    reference: str
    payment_amount: Money | None
    exchange_rate: str | None
    description: str
    resource_type: str
    resource_id: str
    project_id: strawberry.ID | None
    balance_after: Money
    created_at: datetime | None
    actor: str

    @classmethod
    def from_pb(cls, m: wallet_pb2.Transaction) -> Transaction:
        name = wallet_pb2.TransferKind.Name(m.kind)
        kind = TransactionKind(name) if name in TransactionKind.__members__ else None
        return cls(
            id=strawberry.ID(m.id),
            kind=kind or TransactionKind.OTHER,
            amount=Money.from_pb(m.amount),
            balance_change=None
            if kind is None
            else Money.from_pb(
                money_pb2.Money(amount=-m.amount.amount, currency=m.amount.currency)
                if kind in TAKING
                else m.amount
            ),
            cash_change=_moved(m, ":cash"),
            credits_change=_moved(m, ":credit:"),
            reference=m.reference,
            payment_amount=Money.from_pb(m.payment_amount)
            if m.HasField("payment_amount")
            else None,
            exchange_rate=m.exchange_rate or None,
            description=m.description,
            resource_type=m.resource_type,
            resource_id=m.resource_id,
            project_id=strawberry.ID(m.project_id) if m.project_id else None,
            balance_after=Money.from_pb(m.balance_after),
            created_at=when(m.created_at, m.HasField("created_at")),
            actor=m.actor,
        )


def _moved(m: wallet_pb2.Transaction, part: str) -> Money:
    """What the transaction moved on the organization's accounts of one kind (":cash" or
    ":credit:"), from its postings."""
    own = f"org:{m.organization_id}"
    moved = sum(
        p.amount for p in m.postings if p.account.startswith(own) and part in p.account[len(own) :]
    )
    return Money.from_pb(money_pb2.Money(amount=moved, currency=m.amount.currency))


async def load_transaction(info: Info, organization_id: str, transaction_id: str) -> Transaction:
    c = info.context.wallet
    request = wallet_pb2.GetTransactionRequest(
        organization_id=organization_id, transaction_id=transaction_id
    )
    return Transaction.from_pb(await c.wallet.GetTransaction(request, metadata=c.metadata))


MAX_TRANSACTIONS = 500  # the wallet's page limit
MAX_HOLDS = 500


@strawberry.type(
    description=(
        "Money set aside for a pending operation (a pod starting, a purchase): part of the "
        "held balance until it is captured, voided or expires."
    )
)
class Hold:
    id: strawberry.ID
    amount: Money
    description: str
    resource_type: str
    resource_id: str
    project_id: strawberry.ID | None
    created_at: datetime | None
    expires_at: datetime | None

    @classmethod
    def from_pb(cls, m: wallet_pb2.Hold) -> Hold:
        return cls(
            id=strawberry.ID(m.id),
            amount=Money.from_pb(m.amount),
            description=m.description,
            resource_type=m.resource_type,
            resource_id=m.resource_id,
            project_id=strawberry.ID(m.project_id) if m.project_id else None,
            created_at=when(m.created_at, m.HasField("created_at")),
            expires_at=when(m.expires_at, m.HasField("expires_at")),
        )


MAX_METERS = 1000


@strawberry.type(
    description=(
        "What a resource costs while it runs (a pod, a volume, a bucket): its meter, billed "
        "per second at `hourlyRate`, in the wallet currency."
    )
)
class Meter:
    id: strawberry.ID
    resource_id: str
    resource_type: str
    project_id: strawberry.ID | None
    hourly_rate: Money
    total_charged: Money = strawberry.field(description="Everything it was charged so far.")
    opened_at: datetime | None
    closed_at: datetime | None = strawberry.field(description="null: still running")
    billed_until: datetime | None

    @classmethod
    def from_pb(cls, m: wallet_pb2.Meter) -> Meter:
        return cls(
            id=strawberry.ID(m.id),
            resource_id=m.resource_id,
            resource_type=m.resource_type,
            project_id=strawberry.ID(m.project_id) if m.project_id else None,
            hourly_rate=Money.from_pb(money_pb2.Money(amount=m.hourly_rate, currency=m.currency)),
            total_charged=Money.from_pb(
                money_pb2.Money(amount=m.total_charged, currency=m.currency)
            ),
            opened_at=when(m.opened_at, m.HasField("opened_at")),
            closed_at=when(m.closed_at, m.HasField("closed_at")),
            billed_until=when(m.billed_until, m.HasField("billed_until")),
        )


async def list_meters(
    info: Info, organization_id: str, first: int | None, open_only: bool
) -> list[Meter]:
    c = info.context.wallet
    request = wallet_pb2.ListMetersRequest(
        organization_id=organization_id,
        open_only=open_only,
        limit=check_first(first, maximum=MAX_METERS) or 100,
    )
    answer = await c.wallet.ListMeters(request, metadata=c.metadata)
    return [Meter.from_pb(m) for m in answer.meters]


async def load_service_status(info: Info, organization_id: str) -> str:
    """The wallet card's service status alone (no amounts)."""
    return (await info.context.loaders.summary.load((organization_id, ""))).service_status


async def list_holds(info: Info, organization_id: str, first: int | None) -> list[Hold]:
    c = info.context.wallet
    request = wallet_pb2.ListHoldsRequest(
        organization_id=organization_id, limit=check_first(first, maximum=MAX_HOLDS)
    )
    answer = await c.wallet.ListHolds(request, metadata=c.metadata)
    return [Hold.from_pb(h) for h in answer.holds]


async def list_transactions(
    info: Info,
    organization_id: str,
    first: int | None,
    before: str | None,
    kinds: list[TransactionKind] | None,
) -> list[Transaction]:
    known = [wallet_pb2.TransferKind.Value(k.value) for k in kinds or () if k.value != "OTHER"]
    if kinds and not known:  # only OTHER: none of the wallet's kinds is unknown here
        return []
    c = info.context.wallet
    request = wallet_pb2.ListTransactionsRequest(
        organization_id=organization_id,
        limit=check_first(first, maximum=MAX_TRANSACTIONS),
        before_id=before or "",
        kinds=known,
    )
    answer = await c.wallet.ListTransactions(request, metadata=c.metadata)
    return [Transaction.from_pb(t) for t in answer.transactions]


@strawberry.type(
    description=(
        "Low-balance alert thresholds (in the wallet currency; null: not set) and the level "
        "the wallet is at now: ok, warning, critical or depleted."
    )
)
class Thresholds:
    warning_amount: Money | None
    critical_amount: Money | None
    warning_hours: float | None
    critical_hours: float | None
    level: str

    @classmethod
    def from_pb(cls, m: wallet_pb2.Thresholds, currency: str) -> Thresholds:
        return cls(
            warning_amount=Money.of(m.warning_amount, currency) if m.warning_amount else None,
            critical_amount=Money.of(m.critical_amount, currency) if m.critical_amount else None,
            warning_hours=m.warning_hours or None,
            critical_hours=m.critical_hours or None,
            level=m.level,
        )


async def load_thresholds(info: Info, organization_id: str) -> Thresholds:
    loaders = info.context.loaders
    organization = await loaders.organization.load(organization_id)
    found = await loaders.thresholds.load(organization_id)
    return Thresholds.from_pb(found, organization.currency)


@strawberry.type(
    description=(
        "The auto top-up rule: when the balance falls below `below`, request `amount` (wallet "
        "currency); `pending` is the request waiting for its payment, if any. It never fires "
        "twice while one is pending."
    )
)
class AutoTopUp:
    enabled: bool
    below: Money
    amount: Money
    pending_amount: Money | None
    pending_since: datetime | None
    disabled_reason: str | None = strawberry.field(
        description="Why the rule turned itself off (null when it did not): after 3 automatic "
        "top-ups in a row failed. Saving the rule (setAutoTopUp) clears it."
    )

    @classmethod
    def from_pb(cls, m: wallet_pb2.AutoTopUp, currency: str) -> AutoTopUp:
        pending = m.pending if m.HasField("pending") and m.pending.id else None
        return cls(
            enabled=m.enabled,
            below=Money.of(m.below, currency),
            amount=Money.of(m.amount, currency),
            pending_amount=Money.of(pending.amount.amount, currency) if pending else None,
            pending_since=pending.created_at.ToDatetime(UTC) if pending else None,
            disabled_reason=m.disabled_reason or None,
        )


async def load_auto_topup(info: Info, organization_id: str) -> AutoTopUp:
    c = info.context.wallet
    organization = await info.context.loaders.organization.load(organization_id)
    rule = await c.wallet.GetAutoTopUp(
        wallet_pb2.GetAutoTopUpRequest(organization_id=organization_id), metadata=c.metadata
    )
    return AutoTopUp.from_pb(rule, organization.currency)


async def resolve_set_auto_top_up(
    info: Info,
    organization_id: strawberry.ID,
    enabled: bool,
    below: str,
    amount: str,
    idempotency_key: OptionalKey = None,
) -> AutoTopUp:
    org = str(organization_id)
    c = info.context.wallet
    request = wallet_pb2.SetAutoTopUpRequest(
        organization_id=org,
        enabled=enabled,
        below=parse_amount(below, field="below", allow_zero=not enabled),
        amount=parse_amount(amount, field="amount", allow_zero=not enabled),
        idempotency_key=idempotency_key or "",
    )
    saved = await c.wallet.SetAutoTopUp(request, metadata=c.metadata)
    organization = await info.context.loaders.organization.load(org)
    return AutoTopUp.from_pb(saved, organization.currency)


@strawberry.type(
    description=(
        "What a top-up did: its transaction (on a retry with the same key, the first one, "
        "with the balance right after it) and the wallet as it is now."
    )
)
class TopUpPayload:
    transaction: Transaction
    wallet: Wallet = strawberry.field(description="The wallet now (not as of the transaction).")


def _hours(value: float | None, field: str) -> float:
    if value is None:
        return 0.0
    if not math.isfinite(value) or value < 0:
        raise GatewayError(
            f"{field} must be zero or more hours, got {value}", code=BAD_USER_INPUT, field=field
        )
    return value


async def resolve_top_up_wallet(
    info: Info,
    organization_id: strawberry.ID,
    amount: str,
    currency: str,
    idempotency_key: str,
) -> TopUpPayload:
    micro = parse_amount(amount, field="amount")
    paid_in = parse_currency(currency, field="currency")
    if not idempotency_key.strip():
        raise GatewayError(
            "idempotencyKey must not be empty", code=BAD_USER_INPUT, field="idempotencyKey"
        )
    c = info.context.wallet
    request = wallet_pb2.TransferRequest(
        idempotency_key=idempotency_key,
        organization_id=str(organization_id),
        kind=wallet_pb2.TOPUP,
        amount=money_pb2.Money(amount=micro, currency=paid_in),
        description="Wallet top-up",
    )
    transaction = await c.wallet.Transfer(request, metadata=c.metadata)
    summary = await c.wallet.GetWalletSummary(
        wallet_pb2.GetWalletSummaryRequest(organization_id=str(organization_id)),
        metadata=c.metadata,
    )
    return TopUpPayload(
        transaction=Transaction.from_pb(transaction), wallet=Wallet.from_pb(summary)
    )


async def resolve_set_low_balance_thresholds(
    info: Info,
    organization_id: strawberry.ID,
    warning_amount: str | None = strawberry.UNSET,
    critical_amount: str | None = strawberry.UNSET,
    warning_hours: float | None = strawberry.UNSET,
    critical_hours: float | None = strawberry.UNSET,
    idempotency_key: OptionalKey = None,
) -> Thresholds:
    org = str(organization_id)
    c = info.context.wallet
    request = wallet_pb2.SetThresholdsRequest(
        organization_id=org, idempotency_key=idempotency_key or ""
    )
    # Only the thresholds given change: the wallet merges them under its lock.
    if warning_amount is not strawberry.UNSET:
        request.warning_amount = _amount(warning_amount, "warningAmount")
        request.fields.append("warning_amount")
    if critical_amount is not strawberry.UNSET:
        request.critical_amount = _amount(critical_amount, "criticalAmount")
        request.fields.append("critical_amount")
    if warning_hours is not strawberry.UNSET:
        request.warning_hours = _hours(warning_hours, "warningHours")
        request.fields.append("warning_hours")
    if critical_hours is not strawberry.UNSET:
        request.critical_hours = _hours(critical_hours, "criticalHours")
        request.fields.append("critical_hours")
    if not request.fields:
        current = await info.context.loaders.thresholds.load(org)
        organization = await info.context.loaders.organization.load(org)
        return Thresholds.from_pb(current, organization.currency)
    saved = await c.wallet.SetThresholds(request, metadata=c.metadata)
    organization = await info.context.loaders.organization.load(org)
    return Thresholds.from_pb(saved, organization.currency)


@strawberry.type
class Mutation:
    top_up_wallet = strawberry.mutation(
        resolver=resolve_top_up_wallet,
        description=(
            "Add money to the wallet: `amount` (a decimal string) paid in `currency`, converted "
            "to the wallet currency. A retry with the same `idempotencyKey` and payload returns "
            "the first transaction; the same key with another payload is a CONFLICT."
        ),
        extensions=require(BillingWriter("organization_id")),
    )

    set_auto_top_up = strawberry.mutation(
        resolver=resolve_set_auto_top_up,
        description=(
            "Set the auto top-up rule: below and amount are decimal strings in the wallet "
            "currency; enabled=false turns it off."
        ),
        extensions=require(BillingWriter("organization_id")),
    )

    set_low_balance_thresholds = strawberry.mutation(
        resolver=resolve_set_low_balance_thresholds,
        description=(
            "Set the low-balance thresholds: amounts as decimal strings in the wallet currency, "
            "hours of run rate left. An argument left out keeps its value; null or 0 clears it."
        ),
        extensions=[*require(BillingWriter("organization_id")), Arguments()],
    )


def _amount(value: str | None, field: str) -> int:
    return 0 if value is None else parse_amount(value, field=field, allow_zero=True)


async def resolve_wallet_updated(
    info: Info,
    organization_id: strawberry.ID,
    display_currency: str | None = None,
) -> AsyncGenerator[Wallet, None]:
    """Checks the arguments before the stream starts (a bad one is the subscription's error,
    not an event's), in the caller's preferred display currency when none is given. (Arguments
    of a subscription's root field are not made canonical by `CanonicalIds`: done here.)"""
    org = canonical_id(str(organization_id))
    display = await accounts.display_for(info, org, display_currency)
    if display and display_currency is None and await rate_missing(info, org, display) is not None:
        display = ""  # a saved preference no rate converts to: the wallet's own, as `organization`
    return wallet_updates(info, org, display)


async def rate_missing(
    info: Info, organization_id: str, display: str
) -> grpc.aio.AioRpcError | None:
    """The wallet's EXCHANGE_RATE_MISSING when no rate converts the organization's amounts to
    `display` (one error at `organization` for an asked displayCurrency, rather than one per
    amount), else None. Asks for the summary in `display` (the `wallet` field reuses it); any
    other failure is left to the fields that need it."""
    try:
        await info.context.loaders.summary.load((organization_id, display))
    except grpc.aio.AioRpcError as error:
        if rpc_details(error).get("reason") == "EXCHANGE_RATE_MISSING":
            return error
    return None


async def wallet_updates(info: Info, org: str, display: str) -> AsyncGenerator[Wallet, None]:
    """Each summary is read fresh (fresh DataLoaders; the subscribers one event wakes share one
    read) and pushed when it differs from the last. The token is checked again at least every
    RECHECK_SECONDS: a revoked one ends the subscription with UNAUTHENTICATED. While the wallet
    is unreachable the subscription stays, and reads again at each check until a read works.
    A summary converted to another currency is read at each check too: exchange rates change
    (or a scheduled one comes due) with no event of the wallet's."""
    context = info.context
    live = context.live

    async def read() -> wallet_pb2.WalletSummary:
        return await context.fresh_loaders().summary.load((org, display))

    watching = live.watching(org) if live is not None else contextlib.nullcontext(Watch(org))
    last: wallet_pb2.WalletSummary | None = None
    with watching as watch:
        summary: wallet_pb2.WalletSummary | None = await read()
        while True:
            if summary is not None and summary != last:
                last = summary
                yield Wallet.from_pb(summary)
            stale = summary is None  # a change may have gone unread: read at the next check
            converted = last is not None and last.currency != (
                last.wallet_currency or last.currency
            )
            while True:
                woken = await watch.wait(RECHECK_SECONDS)
                if not await _passing(context.reauthenticate()):
                    stale = stale or woken
                    continue
                if woken or stale or converted or live is None or not live.connected:
                    break
            if live is None:
                summary = await _passing(read())
                continue
            # Keyed so a read is shared only by those it began after: the event's subscribers,
            # or those checking in the same RECHECK_SECONDS.
            when = "woken" if woken else int(time.monotonic() // RECHECK_SECONDS)
            key = (org, display, live.generation(org), when)
            summary = await _passing(live.shared_read(key, read))


async def _passing(call: Awaitable[T]) -> T | None:
    """The result of `call`, or None when the wallet is unreachable right now (logged)."""
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        if exc.code() not in TRANSIENT:
            raise
        log.warning("wallet unreachable for a live view", extra={"code": exc.code().name})
        return None


@strawberry.type
class Subscription:
    wallet_updated = strawberry.subscription(
        resolver=resolve_wallet_updated,
        description=(
            "The wallet summary now, then each time its balance, held balance or run rate "
            "changes (at most about once a second)."
        ),
        extensions=require(BillingReader("organization_id")),
    )
