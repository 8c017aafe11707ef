"""The one-statement fast paths (SQL functions post_transfer and post_transfer_batch) follow the
same rules as the in-memory planner (ledger.Book): the same transfers give the same postings and
balances. Whole batches through both are compared in test_fast_batch_parity.py."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest
from psycopg_pool import AsyncConnectionPool

from gpudeck.kit.errors import Conflict, DomainError, InvalidArgument
from gpudeck.wallet.ledger import InsufficientFunds, Kind, KycLimits, Transaction, TransferRequest
from gpudeck.wallet.ledger_store import LedgerStore, Policy

NewOrg = Callable[..., Awaitable[uuid.UUID]]
STORE = LedgerStore()


async def fast(pool: AsyncConnectionPool, request: TransferRequest) -> Transaction:
    async with pool.connection() as conn:
        return await STORE.post_one(conn, request)


async def planned(pool: AsyncConnectionPool, request: TransferRequest) -> Transaction:
    return await _posted(pool, request, fast_path=False)


async def set_based(pool: AsyncConnectionPool, request: TransferRequest) -> Transaction:
    return await _posted(pool, request, fast_path=True)


async def _posted(
    pool: AsyncConnectionPool, request: TransferRequest, *, fast_path: bool
) -> Transaction:
    async with pool.connection() as conn, conn.transaction():
        [outcome] = await STORE.post_transfers(conn, [request], fast_path=fast_path)
    if outcome.error is not None:
        raise outcome.error
    assert outcome.transaction is not None
    return outcome.transaction


PATHS = (fast, planned, set_based)


def shape(tx: Transaction) -> list[tuple[str, int, int | None, int | None]]:
    """Postings with the organization's id taken out of the account names; platform accounts
    are shared with the rest of the run, so only their amounts are compared."""
    out: list[tuple[str, int, int | None, int | None]] = []
    for p in tx.postings:
        kind = p.account.split(":")[2] if p.account.startswith("org:") else p.account.split(":")[1]
        if p.account.startswith("platform:"):
            out.append((kind, p.amount, None, None))
        else:
            out.append((kind, p.amount, p.balance_before, p.balance_after))
    return out


async def test_both_paths_post_the_same_entries(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    later = datetime.now(UTC) + timedelta(days=30)
    soon = datetime.now(UTC) + timedelta(days=1)
    results = []
    for post in PATHS:
        org = await new_org()
        steps = [
            TransferRequest("a", org, Kind.TOPUP, 10_000_000),
            TransferRequest("b", org, Kind.CREDIT_GRANT, 2_000_000, credit_expires_at=later),
            TransferRequest("c", org, Kind.CREDIT_GRANT, 1_000_000, credit_expires_at=soon),
            TransferRequest(
                "d", org, Kind.CHARGE, 2_500_000, resource_type="pod", resource_id="p1"
            ),
            TransferRequest("e", org, Kind.USAGE, 1_000_000, resource_type="vm"),
            TransferRequest("f", org, Kind.REFUND, 300_000, resource_type="pod", resource_id="p1"),
            TransferRequest("g", org, Kind.ADJUSTMENT, -200_000),
            TransferRequest("h", org, Kind.CHARGE, 9_700_000),
            TransferRequest("i", org, Kind.CHARGE, 9_600_000),
        ]
        run = []
        for step in steps:
            try:
                tx = await post(wallet_pool, step)
                run.append((tx.kind, tx.amount, tx.balance_after, shape(tx)))
            except DomainError as exc:
                run.append((type(exc).__name__, exc.field))
        async with wallet_pool.connection() as conn:
            cur = await conn.execute(
                "SELECT balance, credits FROM wallets WHERE organization_id = %s", (org,)
            )
            run.append(await cur.fetchone())
            cur = await conn.execute(
                "SELECT day, resource_type, amount FROM daily_spend WHERE organization_id = %s"
                " ORDER BY 2",
                (org,),
            )
            run.append([row[1:] for row in await cur.fetchall()])
        results.append(run)
    assert results[0] == results[1] == results[2]
    assert results[0][-4] == ("InsufficientFunds", "amount")
    assert results[0][-2] == (0, 0)


@pytest.mark.parametrize(
    ("second", "error"),
    [
        (TransferRequest("k", uuid.UUID(int=0), Kind.TOPUP, 2), Conflict),
        (TransferRequest("k2", uuid.UUID(int=0), Kind.CHARGE, 5, currency="INR"), InvalidArgument),
        (TransferRequest("k3", uuid.UUID(int=0), Kind.CHARGE, 10**9), InsufficientFunds),
        # The key of another request first, whatever else is wrong with it.
        (TransferRequest("k", uuid.UUID(int=0), Kind.CHARGE, 5, currency="INR"), Conflict),
        (TransferRequest("k", uuid.UUID(int=0), Kind.CHARGE, 10**9), Conflict),
    ],
)
async def test_both_paths_refuse_alike(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg, second: TransferRequest, error: type
) -> None:
    for post in PATHS:
        org = await new_org()
        await post(wallet_pool, TransferRequest("k", org, Kind.TOPUP, 1))
        with pytest.raises(error):
            await post(
                wallet_pool,
                TransferRequest(
                    second.key, org, second.kind, second.amount, currency=second.currency
                ),
            )


async def test_a_reused_key_is_named_before_the_kyc_limit(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    store = LedgerStore(policy=Policy(kyc_limits=KycLimits(other=1_000_000)))

    async def refusal(request: TransferRequest, fast_path: bool | None) -> DomainError | None:
        async with wallet_pool.connection() as conn:
            if fast_path is None:  # the single fast path
                try:
                    await store.post_one(conn, request)
                except DomainError as exc:
                    return exc
                return None
            async with conn.transaction():
                [outcome] = await store.post_transfers(conn, [request], fast_path=fast_path)
            return outcome.error

    for fast_path in (None, True, False):  # post_one, set-based, planned
        org = await new_org(kyc="unverified")
        assert await refusal(TransferRequest("k", org, Kind.TOPUP, 1), fast_path) is None
        over = TransferRequest("k", org, Kind.TOPUP, 2_000_000)  # another payload, over the limit
        assert isinstance(await refusal(over, fast_path), Conflict), fast_path
