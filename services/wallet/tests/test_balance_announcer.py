"""Which wallets the announcer looks at: those its process changed, by key, each round; all of
them in a sweep, which finds what another replica changed or a crashed process never announced."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

from psycopg_pool import AsyncConnectionPool

from gpudeck.wallet.alerts import Thresholds
from gpudeck.wallet.deps import Wallet
from gpudeck.wallet.ledger import Kind, TransferRequest
from gpudeck.wallet.thresholds_store import ThresholdStore
from gpudeck.wallet.workers import announce_balances

NewOrg = Callable[..., Awaitable[uuid.UUID]]


async def announced_at(pool: AsyncConnectionPool, org: uuid.UUID) -> float:
    """When the wallet was last announced (epoch seconds; -inf: never)."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT extract(epoch FROM announced_at)::float8 FROM wallet_announcements"
            " WHERE organization_id = %s",
            (org,),
        )
        row = await cur.fetchone()
    assert row is not None
    return float(row[0])


async def topped_up(pool: AsyncConnectionPool, new_org: NewOrg) -> tuple[Wallet, uuid.UUID]:
    """A wallet process's parts and an organization it has just topped up (and noted)."""
    wallet = Wallet(pool)
    org = await new_org()
    async with pool.connection() as conn:
        await wallet.ledger.post_one(conn, TransferRequest("t", org, Kind.TOPUP, 5))
    return wallet, org


async def test_a_transfer_notes_its_wallet_and_the_next_round_announces_it(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    wallet, org = await topped_up(wallet_pool, new_org)
    assert wallet.ledger.changed == {org}
    before = await announced_at(wallet_pool, org)
    assert await announce_balances(wallet) == 1  # only the noted wallet is looked at
    assert await announced_at(wallet_pool, org) > before
    assert wallet.ledger.changed == {org}  # looked at once more (a writer may still commit)
    assert await announce_balances(wallet) == 0  # nothing new: dropped
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


async def test_a_wallet_a_writer_holds_is_still_announced_with_its_committed_values(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    """A busy wallet is locked by one transfer after another; the announcer does not wait for a
    gap: it announces what is committed."""
    wallet = Wallet(wallet_pool)
    org = await new_org()
    async with wallet_pool.connection() as conn:
        await wallet.ledger.post_one(conn, TransferRequest("x", org, Kind.TOPUP, 7))
    async with wallet_pool.connection() as writer, writer.transaction():
        await writer.execute(
            "SELECT 1 FROM wallets WHERE organization_id = %s FOR UPDATE", (org,)
        )  # the next transfer, holding the row
        before = await announced_at(wallet_pool, org)
        assert await announce_balances(wallet) == 1
        assert await announced_at(wallet_pool, org) > before


async def test_a_change_committed_after_an_announcement_is_announced_later(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    """A transfer stamps changed_at with its transaction's start; one that started before an
    announcement and committed after it is still a change the next round announces."""
    wallet = Wallet(wallet_pool)
    org = await new_org()
    async with wallet_pool.connection() as conn:
        await wallet.ledger.post_one(conn, TransferRequest("early", org, Kind.TOPUP, 5))
    async with wallet_pool.connection() as writer, writer.transaction():
        await writer.execute("SELECT now()")  # this transaction's time is fixed from here
        await asyncio.sleep(0.05)
        assert await announce_balances(wallet) == 1  # announces the committed "early"
        await wallet.ledger.post_one(writer, TransferRequest("late", org, Kind.TOPUP, 5))
    await asyncio.sleep(1.1)
    wallet.ledger.mark_changed([org])
    assert await announce_balances(wallet) == 1  # "late" was not lost


async def test_a_sweep_does_not_wait_for_a_wallet_a_writer_holds(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    """The sweep checks levels under the wallets' locks, but skips one a writer holds (its
    writer checks its level): waiting, it held every wallet it had locked meanwhile, and stalled
    their transfers."""
    wallet, org = await topped_up(wallet_pool, new_org)
    async with wallet_pool.connection() as holder, holder.transaction():
        await holder.execute("SELECT 1 FROM wallets WHERE organization_id = %s FOR UPDATE", (org,))
        announced = await asyncio.wait_for(announce_balances(wallet, sweep=True), 10)
    assert announced >= 1  # the busy wallet is announced all the same, as committed


async def test_a_level_moved_by_settings_is_noted_for_the_live_view(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    wallet, org = await topped_up(wallet_pool, new_org)
    wallet.ledger.take_changed()
    async with wallet_pool.connection() as conn, conn.transaction():
        await ThresholdStore(wallet.ledger).set_thresholds(conn, org, Thresholds(warning_amount=10))
    assert org in wallet.ledger.take_changed()  # announced next round, not at the next sweep


async def test_a_change_in_flight_during_an_announcement_is_announced_by_the_next_rounds(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    """The general path notes a wallet before its commit. A round that ran before that commit
    announced the wallet's previous state and dropped the note: the change waited for the
    30-second sweep, and live views showed the old balance meanwhile."""
    wallet = Wallet(wallet_pool)
    org = await new_org()
    async with wallet_pool.connection() as conn, conn.transaction():
        request = TransferRequest("first", org, Kind.TOPUP, 5_000_000)
        await wallet.ledger.post_transfers(conn, [request], fast_path=False)
    async with wallet_pool.connection() as writer, writer.transaction():
        request = TransferRequest("second", org, Kind.TOPUP, 7_000_000)
        await wallet.ledger.post_transfers(writer, [request], fast_path=False)
        assert await announce_balances(wallet) == 1  # what is committed: the first top-up
    rounds = 0
    for _ in range(12):  # the announcer's rounds, every 0.25 s, for up to 3 s
        await asyncio.sleep(0.25)
        rounds += await announce_balances(wallet)
        if rounds:
            break
    assert rounds == 1
    async with wallet_pool.connection() as conn:
        cur = await conn.execute(
            "SELECT w.change_seq = a.announced_seq FROM wallets w"
            " JOIN wallet_announcements a USING (organization_id) WHERE organization_id = %s",
            (org,),
        )
        assert await cur.fetchone() == (True,)  # the second top-up announced too


async def test_a_hold_past_its_time_is_announced_as_holding_nothing(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    """The live view's wallet.balance.changed counted it held until the sweep expired it,
    while the card (and a charge of that money) already did not."""
    from gpudeck.kit.events import parse_event, unpack
    from gpudeck.proto.wallet.v1 import events_pb2 as pb
    from gpudeck.wallet.holds import HoldRequest

    wallet, org = await topped_up(wallet_pool, new_org)
    async with wallet_pool.connection() as conn, conn.transaction():
        await wallet.holds.create(conn, HoldRequest("h", org, 5, timeout_seconds=1))
    await asyncio.sleep(1.2)
    wallet.ledger.mark_changed([org])
    assert await announce_balances(wallet) == 1
    async with wallet_pool.connection() as conn:
        cur = await conn.execute("SELECT data FROM outbox ORDER BY id DESC LIMIT 20")
        [last] = [
            e for e in (parse_event(bytes(row[0])) for row in await cur.fetchall())
            if e.type == "wallet.balance.changed" and e.organization_id == str(org)
        ][:1]  # fmt: skip
    payload = unpack(last, pb.BalanceChanged)
    assert (payload.held_balance.amount, payload.spendable.amount) == (0, 5)
