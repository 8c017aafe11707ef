"""Deleting an organization: the account goes, the money history stays.

Refused (FAILED_PRECONDITION, nothing changed) while the organization still runs resources
(open meters), reserves funds (open holds) or has cash left in its wallet: money is never
dropped silently, and resources are never left running unbilled. Unspent credits (plan credits,
promotions) cannot be paid out; they are forfeited as a CREDIT_EXPIRY transaction, so the
ledger still balances and says where they went.

Then, in the same transaction: the organization is marked deleted (every read of it is
NOT_FOUND from now on), all its API tokens are revoked, and its wallet row is removed, so every
money call (transfers, holds, meters, usage) answers NOT_FOUND for it. Ledger accounts,
transactions, invoices and audit events are kept.
"""

from __future__ import annotations

import functools
import unicodedata
import uuid
from typing import Any

from psycopg import AsyncConnection

from gpudeck.kit.errors import FailedPrecondition, InvalidArgument
from gpudeck.wallet.accounts import Organization
from gpudeck.wallet.accounts_store import AccountStore
from gpudeck.wallet.ledger import Kind, TransferRequest
from gpudeck.wallet.ledger_store import LedgerStore, db_now, lock_wallets
from gpudeck.wallet.money import format_micro

Conn = AsyncConnection[Any]


async def delete_organization(
    accounts: AccountStore,
    ledger: LedgerStore,
    conn: Conn,
    org: uuid.UUID,
    *,
    confirm_name: str,
    actor: str = "",
) -> Organization:
    """Delete `org` in the caller's transaction; the organization as it was. Locks the wallet,
    then the organization: the order of every path that takes both."""
    now = await db_now(conn)
    locked = await lock_wallets(conn, [org], now)
    await accounts.lock_organization(conn, org)
    organization = await accounts.get_organization(conn, org)
    nfc = functools.partial(unicodedata.normalize, "NFC")  # names stored before NFC too
    if nfc(confirm_name.strip()) != nfc(organization.name):
        raise InvalidArgument(
            "confirm_name must be the organization's name, to confirm the deletion",
            field="confirm_name",
        )
    wallet = locked[org].wallet
    cur = await conn.execute(
        "SELECT count(*) FROM meters WHERE organization_id = %s AND closed_at IS NULL", (org,)
    )
    running = (await cur.fetchone() or (0,))[0]
    if running:
        raise _refused(org, f"still runs {running} metered resource(s); stop them first")
    await ledger.expire_due_holds(conn, locked)  # those past their time hold nothing
    if wallet.held_balance:
        raise _refused(
            org,
            f"has {format_micro(wallet.held_balance)} {wallet.currency} in open holds;"
            " capture or void them first",
        )
    cur = await conn.execute(
        "SELECT count(*) FROM pending_topups WHERE organization_id = %s AND status = 'pending'",
        (org,),
    )
    if (await cur.fetchone() or (0,))[0]:
        raise _refused(
            org, "has an automatic top-up waiting for its payment; complete or fail it first"
        )
    if wallet.cash.balance:
        raise _refused(
            org,
            f"has {format_micro(wallet.cash.balance)} {wallet.currency} of cash in its wallet;"
            " it must be spent, refunded or adjusted to zero first",
        )
    forfeits = [
        TransferRequest(
            key=f"organization-deleted:credit:{credit.id}",
            organization_id=org,
            kind=Kind.CREDIT_EXPIRY,
            amount=credit.balance,
            description="Credits forfeited: organization deleted",
            reference=str(credit.id),
            actor=actor or "system",
        )
        for credit in wallet.credits
        if credit.balance > 0
    ]
    if forfeits:
        for outcome in await ledger.post_transfers(conn, forfeits, now=now):
            if outcome.error is not None:
                raise outcome.error
    await accounts.close_organization(conn, org)
    await conn.execute("DELETE FROM wallets WHERE organization_id = %s", (org,))
    await conn.execute("DELETE FROM wallet_announcements WHERE organization_id = %s", (org,))
    ledger.currencies.pop(org, None)
    return organization


def _refused(org: uuid.UUID, why: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"organization {org} cannot be deleted: it {why}",
        field="organization_id",
        reason="ORGANIZATION_IN_USE",
    )
