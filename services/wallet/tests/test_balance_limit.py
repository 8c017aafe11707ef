"""A transfer that would take a balance past what a ledger account holds (a bigint) is refused
as FAILED_PRECONDITION naming `amount`, alone and with nothing written, on every path: the
planner, the single fast path, a group of concurrent calls, and a batch in one transaction
(whose other items still post). It used to fail as INTERNAL, and take its whole batch with it.

The store tests run in a database of their own: they lift a wallet's cash to near the limit by
hand (honestly it takes 9,223 top-ups of the largest amount, which would also push a shared
platform account to its limit for every other test), which the run's ledger audits must not see.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import pytest
from psycopg_pool import AsyncConnectionPool

from gpudeck.kit.errors import FailedPrecondition
from gpudeck.wallet.deps import Wallet as Deps
from gpudeck.wallet.ledger import BALANCE_LIMIT, Account, Book, Kind, TransferRequest, Wallet

USD = 1_000_000
NewOrg = Callable[..., Awaitable[uuid.UUID]]


def _book(cash: int, platform: int) -> tuple[Book, Wallet, Account]:
    org = uuid.uuid4()
    wallet = Wallet(org, "USD", Account(1, cash), [], cash, 0, 0)
    funding = Account(9, platform, "platform")
    return Book(wallets={org: wallet}, platform={"funding:USD": funding}), wallet, funding


def _top_up(org: uuid.UUID, amount: int) -> TransferRequest:
    return TransferRequest(
        key=uuid.uuid4().hex, organization_id=org, kind=Kind.TOPUP, amount=amount
    )


@pytest.mark.parametrize(
    ("cash", "platform"),
    [(BALANCE_LIMIT - 5, 0), (0, -(BALANCE_LIMIT - 5))],
    ids=["wallet", "platform"],
)
def test_the_planner_refuses_a_balance_past_the_limit_and_moves_nothing(
    cash: int, platform: int
) -> None:
    book, wallet, funding = _book(cash, platform)
    with pytest.raises(FailedPrecondition) as err:
        book.apply(_top_up(wallet.organization_id, 6), uuid.uuid4())
    assert (err.value.field, err.value.reason) == ("amount", "BALANCE_LIMIT")
    assert (wallet.balance, wallet.cash.balance, funding.balance) == (cash, cash, platform)
    book.apply(_top_up(wallet.organization_id, 5), uuid.uuid4())  # up to the limit is fine
    assert (wallet.balance, funding.balance) == (cash + 5, platform - 5)


@pytest.fixture(scope="module")
def wallet_pool(own_wallet_pool: AsyncConnectionPool) -> AsyncConnectionPool:
    """This module's own database (overrides the run's `wallet_pool`, so `new_org` uses it)."""
    return own_wallet_pool


async def _near_the_limit(pool: AsyncConnectionPool, new_org: NewOrg, room: int) -> uuid.UUID:
    """An organization whose cash (and wallet balance) is `room` short of the limit."""
    org = await new_org()
    async with pool.connection() as conn, conn.transaction():
        await conn.execute(
            "UPDATE ledger_accounts SET balance = %s WHERE id ="
            " (SELECT cash_account_id FROM wallets WHERE organization_id = %s)",
            (BALANCE_LIMIT - room, org),
        )
        await conn.execute(
            "UPDATE wallets SET balance = %s WHERE organization_id = %s",
            (BALANCE_LIMIT - room, org),
        )
    return org


async def _state(pool: AsyncConnectionPool, org: uuid.UUID) -> tuple[int, int]:
    """(wallet balance, transactions) of `org`."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT w.balance, (SELECT count(*) FROM transactions t WHERE t.organization_id = %s)"
            " FROM wallets w WHERE w.organization_id = %s",
            (org, org),
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _is_the_limit(exc: BaseException | None) -> bool:
    return (
        isinstance(exc, FailedPrecondition)
        and (exc.field, exc.reason) == ("amount", "BALANCE_LIMIT")
        and "most a ledger account holds" in exc.message
    )


async def test_a_single_transfer_past_the_limit_is_refused_and_writes_nothing(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    deps = Deps(wallet_pool)
    org = await _near_the_limit(wallet_pool, new_org, 10 * USD)
    with pytest.raises(FailedPrecondition) as err:
        await deps.transfers.post(_top_up(org, 11 * USD))
    assert _is_the_limit(err.value)
    assert await _state(wallet_pool, org) == (BALANCE_LIMIT - 10 * USD, 0)
    tx = await deps.transfers.post(_top_up(org, 10 * USD))
    assert tx.balance_after == BALANCE_LIMIT


async def test_concurrent_calls_past_the_limit_are_refused_one_by_one(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    """Calls at once are written as a group (one statement); the ones that do not fit fail
    alone, the others post."""
    deps = Deps(wallet_pool)
    org = await _near_the_limit(wallet_pool, new_org, 10 * USD)
    amounts = [4 * USD] * 6  # room for two of them
    results = await asyncio.gather(
        *(deps.transfers.post(_top_up(org, a)) for a in amounts), return_exceptions=True
    )
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(refused) == 4 and all(_is_the_limit(r) for r in refused), results
    assert await _state(wallet_pool, org) == (BALANCE_LIMIT - 2 * USD, 2)


async def test_a_batch_item_past_the_limit_fails_alone(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    deps = Deps(wallet_pool)
    org, other = await _near_the_limit(wallet_pool, new_org, 10 * USD), await new_org()
    batch = [
        _top_up(other, USD),
        _top_up(org, 11 * USD),
        TransferRequest(uuid.uuid4().hex, org, Kind.CHARGE, USD, resource_type="pod"),
        _top_up(org, 1 * USD),
    ]
    async with wallet_pool.connection() as conn, conn.transaction():
        outcomes = await deps.ledger.post_transfers(conn, batch)
    assert [o.error is None for o in outcomes] == [True, False, True, True]
    assert _is_the_limit(outcomes[1].error)
    assert await _state(wallet_pool, org) == (BALANCE_LIMIT - 10 * USD, 2)
    assert await _state(wallet_pool, other) == (USD, 1)
