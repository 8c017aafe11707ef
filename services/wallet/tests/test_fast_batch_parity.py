"""A whole batch through the set-based fast path (SQL function post_transfer_batch) ends as the
same batch planned with ledger.Book: the same answers per item, postings, balances and rollups.

The batch mixes what the fast path must get right (order within an organization, refusals part
way, repeated keys, retries of earlier calls) with what it must leave to the planner (an
organization with credits, another currency, unknown organizations)."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg_pool import AsyncConnectionPool

from gpudeck.wallet import fast_batch
from gpudeck.wallet.ledger import Kind, KycLimits, Outcome, TransferRequest
from gpudeck.wallet.ledger_store import LedgerStore, Policy

NewOrg = Callable[..., Awaitable[uuid.UUID]]
STORE = LedgerStore(policy=Policy(kyc_limits=KycLimits(other=1_000_000)))


def answer(outcome: Outcome) -> tuple[Any, ...]:
    """An outcome without ids or times: a transaction's postings (platform accounts are shared
    with the rest of the run, so only their amounts), or the refusal's type and field."""
    if outcome.error is not None:
        return (type(outcome.error).__name__, outcome.error.field)
    tx = outcome.transaction
    assert tx is not None
    postings = tuple(
        (p.amount, None, None) if p.account.startswith("platform:")
        else (p.amount, p.balance_before, p.balance_after)
        for p in tx.postings
    )  # fmt: skip
    return (tx.kind, tx.amount, tx.currency, tx.balance_after, tx.payment_amount, postings)


async def run(pool: AsyncConnectionPool, new_org: NewOrg, *, fast_path: bool) -> list[Any]:
    a, b, with_credits = await new_org(), await new_org(), await new_org()
    unverified, inr = await new_org(kyc="unverified"), await new_org(currency="INR")
    d = await new_org()
    later = datetime.now(UTC) + timedelta(days=30)
    seed = [
        TransferRequest("seed-b", b, Kind.TOPUP, 5_000_000),
        TransferRequest("seed-c", with_credits, Kind.CREDIT_GRANT, 1_000_000, credit_expires_at=later),
        TransferRequest("seed-c2", with_credits, Kind.TOPUP, 2_000_000),
    ]  # fmt: skip
    batch = [
        TransferRequest("1", a, Kind.TOPUP, 3_000_000),
        TransferRequest("2", a, Kind.CHARGE, 1_000_000, resource_type="pod", resource_id="p1"),
        TransferRequest("3", a, Kind.CHARGE, 2_500_000),  # 2 left: refused
        TransferRequest("4", a, Kind.USAGE, 2_500_000, resource_type="vm"),  # usage may overdraw
        TransferRequest("5", b, Kind.REFUND, 100_000, resource_type="pod", resource_id="p9"),
        TransferRequest("2", a, Kind.CHARGE, 1_000_000, resource_type="pod", resource_id="p1"),
        TransferRequest("1", a, Kind.TOPUP, 999),  # the key of another payload
        TransferRequest("6", unverified, Kind.TOPUP, 2_000_000),  # above the KYC limit
        TransferRequest("6b", unverified, Kind.TOPUP, 500_000),
        TransferRequest("7", with_credits, Kind.CHARGE, 1_500_000),  # credits first
        TransferRequest("8", with_credits, Kind.TOPUP, 1_000),
        TransferRequest("9", uuid.uuid4(), Kind.TOPUP, 1),  # no such organization
        TransferRequest("10", inr, Kind.CHARGE, 5, currency="USD"),  # not the wallet currency
        TransferRequest("11", b, Kind.ADJUSTMENT, -50_000),
        TransferRequest("seed-b", b, Kind.TOPUP, 5_000_000),  # a retry of an earlier call
        TransferRequest("12", b, Kind.CHARGE, 200_000, resource_type="pod", resource_id="p9"),
        TransferRequest("13", b, Kind.CHARGE, 300_000, resource_type="nfs_volume", resource_id="p9"),
        # A key whose first use is refused: its second use is refused alike, though the
        # wallet could pay it by then; the same key with another payload is a conflict.
        TransferRequest("d0", d, Kind.TOPUP, 50),
        TransferRequest("dK", d, Kind.CHARGE, 100),
        TransferRequest("d1", d, Kind.TOPUP, 100),
        TransferRequest("dK", d, Kind.CHARGE, 100),
        TransferRequest("dJ", d, Kind.CHARGE, 1_000),
        TransferRequest("dJ", d, Kind.CHARGE, 10),
    ]  # fmt: skip
    async with pool.connection() as conn, conn.transaction():
        seeded = await STORE.post_transfers(conn, seed, fast_path=fast_path)
        outcomes = await STORE.post_transfers(conn, batch, fast_path=fast_path)
    assert all(o.error is None for o in seeded)
    first, again = outcomes[1].transaction, outcomes[5].transaction
    assert first is not None and again is not None and first.id == again.id
    retried, seeded_tx = outcomes[14].transaction, seeded[0].transaction
    assert retried is not None and seeded_tx is not None and retried.id == seeded_tx.id
    orgs = [a, b, with_credits, unverified, inr, d]
    async with pool.connection() as conn:
        wallets = await (
            await conn.execute(
                "SELECT balance, credits, held_balance FROM wallets"
                " WHERE organization_id = ANY(%s) ORDER BY array_position(%s, organization_id)",
                (orgs, orgs),
            )
        ).fetchall()
        spend = await (
            await conn.execute(
                "SELECT array_position(%s, organization_id), resource_type, amount"
                " FROM daily_spend WHERE organization_id = ANY(%s) ORDER BY 1, 2",
                (orgs, orgs),
            )
        ).fetchall()
        costs = await (
            await conn.execute(
                "SELECT array_position(%s, organization_id), resource_id, resource_type, total"
                " FROM resource_costs WHERE organization_id = ANY(%s) ORDER BY 1, 2",
                (orgs, orgs),
            )
        ).fetchall()
        ledger = await (
            await conn.execute(
                "SELECT count(*), sum(p.amount) FROM postings p"
                " JOIN transactions t ON t.id = p.transaction_id WHERE t.organization_id = ANY(%s)",
                (orgs,),
            )
        ).fetchone()
    return [[answer(o) for o in outcomes], wallets, spend, costs, ledger]


async def test_a_batch_through_the_fast_path_ends_as_through_the_planner(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    fast = await run(wallet_pool, new_org, fast_path=True)
    planned = await run(wallet_pool, new_org, fast_path=False)
    assert fast == planned
    answers = fast[0]
    assert answers[2] == ("InsufficientFunds", "amount")
    assert answers[3][3] == -500_000  # usage overdrew
    assert answers[6] == ("Conflict", "idempotency_key")
    assert answers[7] == ("FailedPrecondition", "amount")  # KYC
    assert answers[9][5][0][0] == -1_000_000  # the credit account paid first
    assert answers[11] == ("NotFound", "organization_id")
    assert answers[12] == ("InvalidArgument", "currency")
    assert answers[18] == answers[20] == ("InsufficientFunds", "amount")
    assert answers[21] == ("InsufficientFunds", "amount")
    assert answers[22] == ("Conflict", "idempotency_key")
    assert fast[1][5][0] == 150  # d: both top-ups, no charge
    assert fast[4][1] == 0  # every transaction's postings sum to zero


async def test_the_fast_path_takes_the_common_transfers_and_leaves_the_rest(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    plain, with_credits = await new_org(), await new_org()
    async with wallet_pool.connection() as conn, conn.transaction():
        await STORE.post_transfers(
            conn, [TransferRequest("g", with_credits, Kind.CREDIT_GRANT, 10_000)]
        )
    batch = [TransferRequest(f"t{i}", plain, Kind.TOPUP, 1_000 + i) for i in range(50)]
    batch += [
        TransferRequest("c1", with_credits, Kind.TOPUP, 5),  # the organization has credits
        TransferRequest("t3", plain, Kind.TOPUP, 1_003),  # repeats a key of this batch...
        TransferRequest("x", plain, Kind.CREDIT_GRANT, 7),  # not a kind it takes...
    ]
    batch_b = [TransferRequest("y", plain, Kind.CHARGE, 1)]
    outcomes: list[Outcome | None] = [None] * len(batch)
    async with wallet_pool.connection() as conn, conn.transaction():
        rest = await fast_batch.post_fast(STORE, conn, batch, list(range(len(batch))), outcomes)
        assert rest == list(range(53))  # ...so all of `plain` goes to the planner
        assert outcomes == [None] * len(batch)
        del batch[-1]
        outcomes = [None] * len(batch)
        rest = await fast_batch.post_fast(STORE, conn, batch, list(range(len(batch))), outcomes)
        assert rest == list(range(52))  # ...so all of `plain` goes to the planner, in order
        assert outcomes == [None] * len(batch)
        del batch[-1]
        outcomes = [None] * len(batch)
        rest = await fast_batch.post_fast(STORE, conn, batch, list(range(len(batch))), outcomes)
        assert rest == [50]
        done = [o.transaction for o in outcomes[:50] if o is not None]
        assert len(done) == 50
        assert len({tx.postings[1].account for tx in done if tx}) == 1  # one platform shard
        befores = [tx.postings[0].balance_before for tx in done if tx]
        assert befores == [sum(1_000 + j for j in range(i)) for i in range(50)]
        outcomes_b: list[Outcome | None] = [None]
        assert await fast_batch.post_fast(STORE, conn, batch_b, [0], outcomes_b) == []
        assert outcomes_b[0] is not None and outcomes_b[0].transaction is not None
