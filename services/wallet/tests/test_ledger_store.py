from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

from psycopg_pool import AsyncConnectionPool

from gpudeck.wallet.ledger import Kind, Outcome, TransferRequest
from gpudeck.wallet.ledger_store import LedgerStore

NewOrg = Callable[..., Awaitable[uuid.UUID]]


async def post(pool: AsyncConnectionPool, *requests: TransferRequest) -> list[Outcome]:
    async with pool.connection() as conn, conn.transaction():
        return await LedgerStore().post_transfers(conn, list(requests))


async def test_topup_then_charge_moves_the_balance(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    org = await new_org()
    [top] = await post(wallet_pool, TransferRequest("t1", org, Kind.TOPUP, 10_000_000))
    assert top.error is None and top.transaction is not None
    assert top.transaction.balance_after == 10_000_000
    [charge] = await post(
        wallet_pool, TransferRequest("c1", org, Kind.CHARGE, 2_500_000, resource_type="pod")
    )
    assert charge.transaction is not None
    assert charge.transaction.balance_after == 7_500_000
    assert sum(p.amount for p in charge.transaction.postings) == 0
