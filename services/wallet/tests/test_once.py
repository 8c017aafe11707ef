"""A key is one request in its organization: an account call and a money call with one key at
once cannot both be done (the account call holds the wallet while its key is being written)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import pytest
from psycopg_pool import AsyncConnectionPool

from gpudeck.kit.errors import Conflict
from gpudeck.proto.wallet.v1 import account_pb2 as pb
from gpudeck.wallet.ledger import Kind, TransferRequest
from gpudeck.wallet.ledger_store import LedgerStore
from gpudeck.wallet.once import once

NewOrg = Callable[..., Awaitable[uuid.UUID]]


async def test_an_account_call_and_a_transfer_with_one_key_at_once_do_not_both_happen(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    org = await new_org()
    ledger = LedgerStore()
    acting, done = asyncio.Event(), asyncio.Event()

    async def rename() -> pb.Organization:
        acting.set()
        await done.wait()  # the transfer comes while the account call is under way
        return pb.Organization(id=str(org), name="renamed")

    request = pb.UpdateOrganizationRequest(
        organization_id=str(org), name="renamed", idempotency_key="K"
    )

    async def account_call() -> None:
        async with wallet_pool.connection() as conn, conn.transaction():
            await once(conn, f"org:{org}", request, pb.Organization, rename)

    async def transfer() -> None:
        async with wallet_pool.connection() as conn:
            await ledger.post_one(conn, TransferRequest("K", org, Kind.TOPUP, 5))

    first = asyncio.create_task(account_call())
    await acting.wait()
    second = asyncio.create_task(transfer())
    await asyncio.sleep(0.3)
    assert not second.done()  # it waits for the wallet the account call holds
    done.set()
    await first
    with pytest.raises(Conflict):
        await second
    async with wallet_pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM transactions WHERE organization_id = %s AND idempotency_key = 'K'",
            (org,),
        )
        assert await cur.fetchone() == (0,)
