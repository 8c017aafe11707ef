"""Group commit of single transfers: concurrent calls share a transaction, yet each gets its own
answer; a refusal or a failed group sinks no other call; a caller giving up cancels nothing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from gpudeck.wallet.group_commit import GroupCommit
from gpudeck.wallet.ledger import InsufficientFunds, Kind, TransferRequest
from gpudeck.wallet.ledger_store import LedgerStore

NewOrg = Callable[..., Awaitable[uuid.UUID]]


async def balance(pool: AsyncConnectionPool, org: uuid.UUID) -> int:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT balance FROM wallets WHERE organization_id = %s", (org,))
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def test_concurrent_calls_share_transactions_and_each_gets_its_answer(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    groups = GroupCommit(wallet_pool, LedgerStore(), writers=1)
    org = await new_org()
    await groups.post(TransferRequest("seed", org, Kind.TOPUP, 1_000_000))
    calls = [TransferRequest(f"c{i}", org, Kind.CHARGE, 10_000) for i in range(40)]
    calls.insert(20, TransferRequest("big", org, Kind.CHARGE, 10**12))
    calls.append(TransferRequest("c7", org, Kind.CHARGE, 10_000))  # a retry within the rush
    results = await asyncio.gather(*(groups.post(c) for c in calls), return_exceptions=True)
    assert groups.largest_group > 1
    assert isinstance(results[20], InsufficientFunds)
    posted = [r for i, r in enumerate(results) if i != 20]
    assert not any(isinstance(r, BaseException) for r in posted)
    assert posted[-1].id == posted[7].id  # type: ignore[union-attr]
    assert len({r.id for r in posted}) == 40  # type: ignore[union-attr]
    assert await balance(wallet_pool, org) == 1_000_000 - 40 * 10_000


async def test_a_group_that_fails_as_a_whole_posts_its_calls_one_by_one(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LedgerStore()
    groups = GroupCommit(wallet_pool, store, writers=1)
    org = await new_org()
    original = store.post_independent
    failed = []

    async def fail_once(conn: Any, requests: Any) -> Any:
        if not failed and len(requests) > 1:
            failed.append(len(requests))
            raise RuntimeError("the group's transaction broke")
        return await original(conn, requests)

    monkeypatch.setattr(store, "post_independent", fail_once)
    results = await asyncio.gather(
        *(groups.post(TransferRequest(f"k{i}", org, Kind.TOPUP, 1_000)) for i in range(10))
    )
    assert failed  # a group was tried, failed, and its calls went alone
    assert len({r.id for r in results}) == 10
    assert await balance(wallet_pool, org) == 10_000


async def test_a_caller_giving_up_does_not_cancel_its_transfer(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    groups = GroupCommit(wallet_pool, LedgerStore())
    org = await new_org()
    calls = [
        asyncio.create_task(groups.post(TransferRequest(f"g{i}", org, Kind.TOPUP, 1_000)))
        for i in range(5)
    ]
    await asyncio.sleep(0)
    calls[2].cancel()
    await asyncio.gather(*calls, return_exceptions=True)
    while groups._running:
        await asyncio.sleep(0.01)
    assert await balance(wallet_pool, org) == 5_000


async def test_calls_after_a_writer_stopped_start_another(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    """A writer's task outlives its last look at the queue by a step or two: writers are counted
    off at that look, so a call in between starts a writer instead of waiting for a stopped one."""
    groups = GroupCommit(wallet_pool, LedgerStore(), writers=1)
    org = await new_org()
    seen = []
    for i in range(30):
        call = asyncio.ensure_future(groups.post(TransferRequest(f"s{i}", org, Kind.TOPUP, 1)))
        await asyncio.wait_for(call, 5)
        seen.append(groups._writing)  # the writer counted itself off when the queue was empty
    assert seen == [0] * 30
    assert await balance(wallet_pool, org) == 30
