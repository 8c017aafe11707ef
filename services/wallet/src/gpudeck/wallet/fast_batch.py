"""The set-based fast path of `post_transfers`: the common transfers of a batch in one statement
(the SQL function `post_transfer_batch`: migrations/007_post_transfer_batch.sql, wrapped by
017_one_key_one_request.sql).

Which transfers take it: top-ups, charges, usage and adjustments in the wallet currency (refunds
read the spending history: general path), from callers (keyed, no overdraft), of organizations
whose every transfer in the batch is such one. Under the wallets' locks the function leaves
(DEFER) to the general path, with the organization's later items: organizations with credits,
an item whose key the organization used for a hold, plan change or credit purchase, and a
top-up of an organization not KYC-verified (the KYC limit counts all it ever added, which the
general path reads). `post_transfers` runs that path next in the same transaction; a repeated
key within the batch goes there too and finds the first one's transaction. Tests run the same
transfers through both paths and compare them (tests/test_fast_batch_parity.py).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

import psycopg
from google.protobuf.timestamp_pb2 import Timestamp
from psycopg import AsyncConnection
from psycopg.pq import TransactionStatus

from gpudeck.kit.errors import DomainError, NotFound
from gpudeck.wallet import events
from gpudeck.wallet.alerts import Thresholds, crossed_by, level_for
from gpudeck.wallet.fast_transfer import FAST_KINDS
from gpudeck.wallet.idempotency import key_reused
from gpudeck.wallet.ids import uuid7
from gpudeck.wallet.ledger import (
    SPENDING,
    Kind,
    Outcome,
    PostingView,
    TransferRequest,
    posted_in_wallet_currency,
    short_of_funds,
)
from gpudeck.wallet.organizations_store import lock_wallet_rows

if TYPE_CHECKING:
    from gpudeck.wallet.ledger_store import LedgerStore

Conn = AsyncConnection[Any]

# Binary parameters and results: arrays of a thousand items cost a fifth of their text form.
POST_BATCH = """
SELECT * FROM post_transfer_batch(
    %b::uuid[], %b::int[], %b::uuid[], %b::text[], %b::bigint[], %b::text[], %b::text[],
    %b::uuid[], %b::text[], %b::text[], %b::text[], %b::text[], %b::bytea[], %b::text[],
    %b::text[], %b::text[], %b::bytea[], %b::text, %b::boolean)
"""


def fits(request: TransferRequest, currency: str | None) -> bool:
    """Whether a transfer may take the fast path (`currency`: its wallet's, if known): callers'
    keyed transfers that may not overdraw, and the wallet's own metered usage of one resource
    (usage is never refused for funds; unkeyed, it records no fingerprint)."""
    metered = request.kind is Kind.USAGE
    return (
        request.kind in FAST_KINDS
        and not request.lines
        and (request.record_key or metered)
        and (not request.allow_overdraft or metered)
        and (not request.currency or currency is None or request.currency == currency)
    )


async def post_fast(
    store: LedgerStore,
    conn: Conn,
    requests: Sequence[TransferRequest],
    valid: list[int],
    outcomes: list[Outcome | None],
    now: datetime | None = None,
    *,
    wallets_locked: bool = False,
) -> list[int]:
    """Post what fits of `requests[i] for i in valid` set-based, filling `outcomes`; return the
    indexes left for the general path, in order. `now`: the transaction's own time, when the
    caller knows it (its events are dated with it, as the ledger's rows are). `wallets_locked`:
    the caller's transaction holds every one of their wallets already."""
    currencies = await store.wallet_currencies(conn, {requests[i].organization_id for i in valid})
    unfit = {
        requests[i].organization_id
        for i in valid
        if not fits(requests[i], currencies.get(requests[i].organization_id))
    }
    # A key sent twice in the batch: the second use is decided by the first (its replay, its
    # refusal, or a conflict), which the general path does in order. Sent there alone, it was
    # decided again after every fast item: a refused first use could be posted the second time.
    seen: set[tuple[uuid.UUID, str]] = set()
    for i in valid:
        scoped = (requests[i].organization_id, requests[i].key)
        if scoped in seen:
            unfit.add(scoped[0])
        seen.add(scoped)
    fast = [i for i in valid if requests[i].organization_id not in unfit]
    rest = [i for i in valid if requests[i].organization_id in unfit]
    if not fast:
        return rest
    if rest and not wallets_locked and conn.info.transaction_status == TransactionStatus.INTRANS:
        # The statement locks the fast organizations, the general path the rest after it: two
        # batches split the other way round locked in opposite orders and deadlocked. All of
        # them first, in order, as everywhere.
        await lock_wallet_rows(conn, list({requests[i].organization_id for i in valid}))
    orgs = sorted({requests[i].organization_id for i in fast})
    slot = {org: n for n, org in enumerate(orgs, start=1)}
    stamp = Timestamp()
    if now is not None:
        stamp.FromDatetime(now)
    else:
        stamp.GetCurrentTime()
    chosen = [requests[i] for i in fast]
    ids = [uuid7() for _ in chosen]
    built = [
        events.transaction_posted(
            r, tx_id, r.amount, currencies.get(r.organization_id, ""), stamp, event_id=event_id
        )
        for r, tx_id, event_id in zip(chosen, ids, events.random_ids(len(chosen)), strict=True)
    ]
    params = (
        ids,
        [slot[r.organization_id] for r in chosen],
        orgs,
        [r.kind.value for r in chosen],
        [r.amount for r in chosen],
        [r.currency for r in chosen],
        [r.description for r in chosen],
        [r.project_id for r in chosen],
        [r.resource_type for r in chosen],
        [r.resource_id for r in chosen],
        [r.reference for r in chosen],
        [r.key for r in chosen],
        [r.fingerprint if r.record_key else None for r in chosen],
        [r.actor for r in chosen],
        [e.id for e in built],
        [e.type for e in built],
        [e.SerializeToString() for e in built],
        store.outbox_channel,
        # Top-ups of organizations not KYC-verified go to the general path (the function
        # reads who is verified under the wallets' locks), which applies their limit.
        store.policy.kyc_limits.any(),
    )
    try:
        async with _undoable(conn):
            cur = await conn.cursor(binary=True).execute(POST_BATCH, params)
            row = await cur.fetchone()
    except psycopg.errors.NumericValueOutOfRange:  # a balance past a bigint: the planner
        return sorted(valid)  # refuses that item alone (the statement wrote nothing)
    assert row is not None
    (created_at, statuses, found_ids, afters, cash_befores, plat_befores, plat_slots, plat_codes,
     cash_codes, org_currencies, balances, rates, levels, wa, ca, wh, ch, below) = row  # fmt: skip
    replays: dict[int, uuid.UUID] = {}
    deferred: set[int] = set()
    touched: set[int] = set()  # organization slots (0-based) that moved
    for n, i in enumerate(fast):
        status = statuses[n]
        request = requests[i]
        k = slot[request.organization_id] - 1
        if status == "OK":
            touched.add(k)
            delta = -request.amount if request.kind in SPENDING else request.amount
            cash, platform = cash_befores[n], plat_befores[n]
            postings = (
                PostingView(cash_codes[k], delta, cash, cash + delta),
                PostingView(plat_codes[plat_slots[n] - 1], -delta, platform, platform - delta),
            )
            outcomes[i] = Outcome(
                transaction=posted_in_wallet_currency(
                    request, ids[n], org_currencies[k], afters[n], created_at, postings
                )
            )
        elif status == "REPLAY":
            replays[i] = found_ids[n]
        elif status == "DEFER":
            deferred.add(i)
        else:
            error = _refusal(status, request, org_currencies[k], afters[n])
            outcomes[i] = Outcome(error=error)
    if replays:
        stored = await store.load_transactions(conn, list(replays.values()))
        for i, tx_id in replays.items():
            outcomes[i] = Outcome(transaction=stored[tx_id])

    def level_of(k: int, balance: int) -> str:
        thresholds = Thresholds(wa[k], ca[k], wh[k], ch[k])
        return level_for(balance, rates[k], thresholds, store.policy.depletion_seconds)

    crossing = {k for k in touched if level_of(k, balances[k]) != levels[k]}
    moved = [
        orgs[k] for k in sorted(touched) if k in crossing or (below[k] and balances[k] < below[k])
    ]
    # A replay's first call may have lost its level check (run after its commit when the batch
    # is its own transaction): check its wallet again (no event if the level stands).
    moved = sorted({*moved, *(requests[i].organization_id for i in replays)})
    if moved:
        # Who moved each wallet: the last caller, or of a level crossed, the one that crossed.
        actors = {requests[i].organization_id: requests[i].actor for i in fast}
        moves: dict[int, list[tuple[int, str]]] = {k: [] for k in crossing}
        for n, i in enumerate(fast):
            k = slot[requests[i].organization_id] - 1
            if k in moves and statuses[n] == "OK":
                moves[k].append((afters[n], requests[i].actor))
        for k, mine in moves.items():
            actors[orgs[k]] = crossed_by(mine, functools.partial(level_of, k))
        async with conn.transaction():  # a savepoint in the caller's, or its own
            await store.refresh_levels(conn, moved, created_at, actors=actors)
    store.mark_changed(orgs[k] for k in touched)  # once their levels are checked: see post_one
    return sorted(deferred.union(rest))


@asynccontextmanager
async def _undoable(conn: Conn) -> AsyncIterator[None]:
    """Within a transaction, a savepoint: a statement that fails must not spoil the caller's.
    Outside one the statement is its own transaction, and undoes itself."""
    if conn.info.transaction_status == TransactionStatus.INTRANS:
        async with conn.transaction():
            yield
    else:
        yield


def _refusal(
    status: str, request: TransferRequest, currency: str | None, spendable: int | None
) -> DomainError:
    if status == "NOT_FOUND":
        return NotFound(
            f"organization {request.organization_id} not found", field="organization_id"
        )
    if status == "ABORTED":
        return key_reused(request.key)
    if status == "INSUFFICIENT_FUNDS":
        return short_of_funds(spendable or 0, request.amount, currency or "")
    return DomainError(f"transfer not posted: {status}")
