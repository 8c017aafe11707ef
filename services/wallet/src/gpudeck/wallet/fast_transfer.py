"""The fast path of single transfers: one statement (the SQL function `post_transfer`, in
migrations/005_post_transfer.sql) that follows the same rules as `ledger.Book`; tests run the same
transfers through both and compare them."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import psycopg
from google.protobuf.timestamp_pb2 import Timestamp
from psycopg import AsyncConnection

from gpudeck.kit.errors import Conflict, DomainError, InvalidArgument, NotFound
from gpudeck.wallet import events
from gpudeck.wallet.alerts import Thresholds, level_for
from gpudeck.wallet.idempotency import key_reused
from gpudeck.wallet.ids import uuid7
from gpudeck.wallet.ledger import (
    PLATFORM_ACCOUNT,
    InsufficientFunds,
    Kind,
    PostingView,
    Transaction,
    TransferRequest,
    kyc_required,
    posted_in_wallet_currency,
    validate,
)
from gpudeck.wallet.ledger_rows import FIND_KEYS

if TYPE_CHECKING:
    from gpudeck.wallet.ledger_store import LedgerStore

Conn = AsyncConnection[Any]

POST_TRANSFER = "SELECT * FROM post_transfer(" + ", ".join(["%s"] * 20) + ")"
# Refunds go back where the latest spending came from (`refunds`): the general path reads that.
FAST_KINDS = (Kind.TOPUP, Kind.CHARGE, Kind.USAGE, Kind.ADJUSTMENT)


async def post_one(store: LedgerStore, conn: Conn, request: TransferRequest) -> Transaction:
    """Post one transfer in one statement (the `post_transfer` SQL function), the fast path
    of the Transfer RPC; kinds it does not handle go through `post_transfers`.

    Run it outside a transaction: the statement is its own. Raises the refusal."""
    validate(request)
    currency = await currency_of(store, conn, request.organization_id)
    request = request.in_wallet_terms(currency)
    if (
        request.kind not in FAST_KINDS
        or request.lines
        or (request.currency and request.currency != currency and request.kind is Kind.TOPUP)
    ):
        return await _post_general(store, conn, request)
    tx_id = uuid7()
    stamp = Timestamp()
    stamp.GetCurrentTime()
    event = events.transaction_posted(request, tx_id, request.amount, currency, stamp)
    platform = PLATFORM_ACCOUNT[request.kind]
    try:
        cur = await conn.execute(
            POST_TRANSFER,
            (
                tx_id, request.organization_id, request.kind.value, request.amount,
                request.currency, request.description, request.project_id,
                request.resource_type, request.resource_id, request.reference, request.key,
                request.fingerprint if request.record_key else None, request.actor, platform,
                request.allow_overdraft, event.id, event.type, event.SerializeToString(),
                store.outbox_channel, store.policy.kyc_limits.of(currency),
            ),
        )  # fmt: skip
    except psycopg.errors.NumericValueOutOfRange:  # a balance past a bigint: the planner
        return await _post_general(store, conn, request)  # says which (the statement undid all)
    except psycopg.errors.RaiseException as exc:
        earlier = await _earlier(store, conn, request)
        if earlier is not None:  # refused now (say KYC was revoked), accepted the first time
            return earlier
        error = refusal(exc, currency)
        if isinstance(error, InsufficientFunds) and await _holds_past_their_time(
            conn, request.organization_id
        ):  # the statement counted them as held: the general path expires them first
            return await _post_general(store, conn, request)
        raise error from None
    row = await cur.fetchone()
    assert row is not None
    (tx_id, replayed, created_at, currency, balance, _credits, _held, rate, level,
     wa, ca, wh, ch, below, codes, amounts, befores, afters) = row  # fmt: skip
    by = {request.organization_id: request.actor}  # who crossed a threshold, if it did
    if replayed:
        # The first call's level check ran after its commit, and may have been lost with it
        # (a crash, a dropped connection): the retry makes sure of it (no event if it ran).
        async with conn.transaction():
            await store.refresh_levels(conn, [request.organization_id], actors=by)
        return (await store.load_transactions(conn, [tx_id]))[tx_id]
    thresholds = Thresholds(wa, ca, wh, ch)
    new_level = level_for(balance, rate, thresholds, store.policy.depletion_seconds)
    if new_level != level or (below and balance < below):
        async with conn.transaction():
            await store.refresh_levels(conn, [request.organization_id], created_at, actors=by)
    # Noted for the announcer once its level is checked: a check lost after the commit (the
    # connection dropped) leaves the wallet to the sweep, which checks it before announcing.
    store.mark_changed([request.organization_id])
    postings = tuple(
        PostingView(c, a, b, f) for c, a, b, f in zip(codes, amounts, befores, afters, strict=True)
    )
    return posted_in_wallet_currency(request, tx_id, currency, balance, created_at, postings)


async def _post_general(store: LedgerStore, conn: Conn, request: TransferRequest) -> Transaction:
    """Post through the general path (`LedgerStore.post_transfers`); raises the refusal."""
    async with conn.transaction():
        [outcome] = await store.post_transfers(conn, [request], fast_path=False)
    if outcome.error is not None:
        raise outcome.error
    assert outcome.transaction is not None
    return outcome.transaction


async def _holds_past_their_time(conn: Conn, organization_id: uuid.UUID) -> bool:
    """Whether the organization has open holds the sweep is yet to expire."""
    cur = await conn.execute(
        "SELECT EXISTS (SELECT 1 FROM holds WHERE organization_id = %s AND status = 'open'"
        " AND expires_at <= now())",
        (organization_id,),
    )
    row = await cur.fetchone()
    return bool(row and row[0])


async def _earlier(store: LedgerStore, conn: Conn, request: TransferRequest) -> Transaction | None:
    """The transaction an earlier call with the same key and payload wrote, if any: a retry is
    answered with it whatever the wallet's state is now. A key used for another request is
    refused as such (key_reused), before any other refusal, as the general path does."""
    if not request.record_key:
        return None
    cur = await conn.execute(FIND_KEYS, ([request.organization_id], [request.key]))
    row = await cur.fetchone()
    if row is None:
        return None
    if row[2] != request.fingerprint:
        raise key_reused(request.key)
    if row[3] is None:
        return None
    return (await store.load_transactions(conn, [row[3]]))[row[3]]


async def currency_of(store: LedgerStore, conn: Conn, organization_id: uuid.UUID) -> str:
    """The wallet currency of an organization (cached: it never changes)."""
    currency = (await store.wallet_currencies(conn, {organization_id})).get(organization_id)
    if currency is None:
        raise NotFound(f"organization {organization_id} not found", field="organization_id")
    return currency


REFUSALS: dict[str, type[DomainError]] = {
    "NOT_FOUND": NotFound,
    "INVALID_ARGUMENT": InvalidArgument,
}


def refusal(exc: psycopg.errors.RaiseException, currency: str) -> DomainError:
    """The domain error a `post_transfer` refusal stands for (its HINT is '<CODE>:<field>')."""
    code, _, field = (exc.diag.message_hint or "").partition(":")
    message = exc.diag.message_primary or str(exc)
    if code == "INSUFFICIENT_FUNDS":  # the function names the currency once: say it twice
        return InsufficientFunds(f"{message} {currency}")
    if code == "KYC_REQUIRED":
        return kyc_required(message)
    if code == "ABORTED":
        return Conflict(message, field=field or None, reason="IDEMPOTENCY_KEY_REUSED")
    return REFUSALS.get(code, DomainError)(message, field=field or None)
