"""Which wallets the announcer looks at: those its process changed, by key, each round; all of
them in a sweep, which finds what another replica changed or a crashed process never announced."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

from psycopg_pool import AsyncConnectionPool

from gpudeck.wallet.deps import Wallet
from gpudeck.wallet.ledger import Kind, TransferRequest
from gpudeck.wallet.workers import announce_balances

NewOrg = Callable[..., Awaitable[uuid.UUID]]


async def announced_at(pool: AsyncConnectionPool, org: uuid.UUID) -> float:
    """When the wallet was last announced (epoch seconds; -inf: never)."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT extract(epoch FROM announced_at)::float8 FROM wallets"
            " WHERE organization_id = %s",
            (org,),
        )
        row = await cur.fetchone()
    assert row is not None
    return float(row[0])


async def test_a_transfer_notes_its_wallet_and_the_next_round_announces_it(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    wallet = Wallet(wallet_pool)
    org = await new_org()
    async with wallet_pool.connection() as conn:
        await wallet.ledger.post_one(conn, TransferRequest("t", org, Kind.TOPUP, 5))
    assert wallet.ledger.changed == {org}
    before = await announced_at(wallet_pool, org)
    assert await announce_balances(wallet) == 1  # only the noted wallet is looked at
    assert await announced_at(wallet_pool, org) > before
    assert wallet.ledger.changed == set()
    assert await announce_balances(wallet) == 0  # nothing noted: no query at all


async def test_a_wallet_changed_within_the_second_is_noted_again(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    wallet = Wallet(wallet_pool)
    org = await new_org()
    async with wallet_pool.connection() as conn:
        await wallet.ledger.post_one(conn, TransferRequest("a", org, Kind.TOPUP, 5))
        assert await announce_balances(wallet) == 1
        await wallet.ledger.post_one(conn, TransferRequest("b", org, Kind.TOPUP, 5))
    assert await announce_balances(wallet) == 0  # announced less than a second ago
    assert wallet.ledger.changed == {org}  # kept for a later round


async def test_a_sweep_finds_a_change_no_note_speaks_of(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    wallet = Wallet(wallet_pool)
    org = await new_org()
    async with wallet_pool.connection() as conn:  # as another replica would have changed it
        await conn.execute(
            "UPDATE wallets SET run_rate = 1, changed_at = now() WHERE organization_id = %s",
            (org,),
        )
    before = await announced_at(wallet_pool, org)
    assert await announce_balances(wallet) == 0
    while await announce_balances(wallet, sweep=True) == 500:
        pass
    assert await announced_at(wallet_pool, org) > before


async def test_a_change_not_committed_yet_is_noted_again_not_lost(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    """The ledger notes a wallet inside the writer's transaction; a round that runs before the
    commit sees neither the change nor the row (the writer holds it) and must keep the note."""
    wallet = Wallet(wallet_pool)
    org = await new_org()
    async with wallet_pool.connection() as conn:
        await wallet.ledger.post_one(conn, TransferRequest("v", org, Kind.TOPUP, 5))
    assert await announce_balances(wallet) == 1  # all said: nothing pending in the rows
    await asyncio.sleep(1.1)  # and due again, were anything to change
    async with wallet_pool.connection() as writer, writer.transaction():
        await wallet.ledger.post_one(writer, TransferRequest("w", org, Kind.TOPUP, 5))
        assert wallet.ledger.changed == {org}
        assert await announce_balances(wallet) == 0  # not committed: nothing to say yet
        assert wallet.ledger.changed == {org}  # but not forgotten
    before = await announced_at(wallet_pool, org)
    assert await announce_balances(wallet) == 1  # committed: the next round announces it
    assert await announced_at(wallet_pool, org) > before
    assert await announce_balances(wallet) == 0 and wallet.ledger.changed == set()
