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


async def test_a_foreign_top_up_uses_the_inverse_rate_when_only_that_is_set(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    org = await new_org(currency="USD")
    async with wallet_pool.connection() as conn:
        async with conn.transaction(force_rollback=True):  # the rates table is shared
            await conn.execute("DELETE FROM exchange_rates")
            await conn.execute(
                "INSERT INTO exchange_rates (base, quote, rate, as_of, source)"
                " VALUES ('USD', 'INR', 80, now(), 'test')"
            )
            [outcome] = await LedgerStore().post_transfers(
                conn, [TransferRequest("inr-topup", org, Kind.TOPUP, 1_000_000_000, "INR")]
            )
            assert outcome.error is None, outcome.error
            tx = outcome.transaction
            assert tx is not None
            assert tx.amount == 12_500_000  # 1,000 INR at 80 INR per USD
            assert (tx.payment_amount, tx.payment_currency) == (1_000_000_000, "INR")
            assert tx.exchange_rate is not None and float(tx.exchange_rate) == 0.0125
            await conn.execute("DELETE FROM exchange_rates")
            [outcome] = await LedgerStore().post_transfers(
                conn, [TransferRequest("inr-topup-2", org, Kind.TOPUP, 1_000_000_000, "INR")]
            )
            assert outcome.error is not None and outcome.error.field == "currency"


def test_ids_made_in_one_process_only_grow() -> None:
    from gpudeck.wallet.ids import uuid7

    ids = [uuid7() for _ in range(20_000)]  # many share a millisecond
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert {i.version for i in ids} == {7} and {i.variant for i in ids} == {uuid.RFC_4122}


async def test_a_refused_credit_grant_leaves_its_key_usable(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    """A grant's account is opened before the grant is decided; a refused grant (another
    currency) left it behind, and every later use of the key failed its whole batch."""
    store = LedgerStore()
    org, other = await new_org(), await new_org()
    async with wallet_pool.connection() as conn, conn.transaction():
        [refused] = await store.post_transfers(
            conn, [TransferRequest("g1", org, Kind.CREDIT_GRANT, 5_000_000, currency="INR")]
        )
    assert refused.error is not None and refused.error.field == "currency"
    batch = [TransferRequest(f"x{i}", other, Kind.TOPUP, 1) for i in range(999)]
    batch.append(TransferRequest("g1", org, Kind.CREDIT_GRANT, 5_000_000))  # corrected
    async with wallet_pool.connection() as conn, conn.transaction():
        outcomes = await store.post_transfers(conn, batch)
    assert all(o.error is None for o in outcomes), [o.error for o in outcomes if o.error]
    async with wallet_pool.connection() as conn:
        cur = await conn.execute(
            "SELECT organization_id, balance, credits FROM wallets WHERE organization_id = ANY(%s)",
            ([org, other],),
        )
        rows = {row[0]: row[1:] for row in await cur.fetchall()}
    assert rows == {org: (5_000_000, 5_000_000), other: (999, 0)}


async def test_two_organizations_granting_under_one_key_keep_their_own_credits(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    """Keys are each organization's own: two grants under "welcome" in one batch (or one group
    of concurrent calls) both went to the account opened last, the other wallet's credits with
    no account behind them."""
    from gpudeck.wallet.audit import check

    store = LedgerStore()
    a, b, c, d = [await new_org() for _ in range(4)]
    await post(
        wallet_pool,
        TransferRequest("welcome", a, Kind.CREDIT_GRANT, 5_000_000),
        TransferRequest("welcome", b, Kind.CREDIT_GRANT, 7_000_000),
    )
    async with wallet_pool.connection() as conn:
        await store.post_independent(
            conn,
            [
                TransferRequest("welcome", c, Kind.CREDIT_GRANT, 1_000_000),
                TransferRequest("welcome", d, Kind.CREDIT_GRANT, 2_000_000),
            ],
        )
        cur = await conn.execute(
            "SELECT organization_id, sum(balance) FROM ledger_accounts"
            " WHERE organization_id = ANY(%s) AND kind = 'credit' GROUP BY 1",
            ([a, b, c, d],),
        )
        credit_accounts = dict(await cur.fetchall())
        assert await check(conn) == []
    assert credit_accounts == {a: 5_000_000, b: 7_000_000, c: 1_000_000, d: 2_000_000}
    [spent] = await post(wallet_pool, TransferRequest("spend", a, Kind.CHARGE, 5_000_000))
    assert spent.transaction is not None
    assert [p.account for p in spent.transaction.postings if p.amount < 0] == [
        f"org:{a}:credit:welcome"
    ]
