"""The SQL of refunds: the spending history a refund gives back by (see `refunds`).

Only organizations that have had credit grants need it: without one every leg is cash. The
history is read newest first, a page at a time, until it covers what the batch refunds, so a
refund reads as much of a long ledger as it gives back, not all of it. Called with the wallets
locked, so no spending or refund of these organizations commits meanwhile.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from psycopg import AsyncConnection

from gpudeck.wallet.ledger import Account, Book, Kind, SpendLine, TransferRequest
from gpudeck.wallet.refunds import Leg, unspend

Conn = AsyncConnection[Any]
PAGE = 1000
NEWEST = (uuid.UUID(int=(1 << 128) - 1), (1 << 63) - 1)

WITH_GRANTS = (
    "SELECT DISTINCT organization_id FROM ledger_accounts"
    " WHERE kind = 'credit' AND organization_id = ANY(%s)"
)
# The organization's own legs of its charges, usage and refunds, newest first, before a cursor.
HISTORY = """
SELECT t.id, p.id, p.account_id, p.amount
FROM transactions t
JOIN postings p ON p.transaction_id = t.id
JOIN ledger_accounts a ON a.id = p.account_id AND a.organization_id = t.organization_id
WHERE t.organization_id = %s AND t.kind IN ('charge', 'usage', 'refund')
  AND (t.id, p.id) < (%s, %s)
ORDER BY t.id DESC, p.id DESC
LIMIT %s
"""
# The charges refunds name as their `reference`, with the one resource each paid for and how
# much of it earlier refunds naming it gave back (the wallets are locked: none commits meanwhile).
NAMED_CHARGES = """
SELECT t.organization_id, t.id, t.resource_type, t.resource_id, t.project_id,
       (t.amount - coalesce((SELECT sum(r.amount) FROM transactions r
                             WHERE r.organization_id = t.organization_id AND r.kind = 'refund'
                               AND r.reference <> '' AND r.reference = t.id::text), 0))::bigint
FROM transactions t
WHERE t.id = ANY(%s) AND t.organization_id = ANY(%s) AND t.kind IN ('charge', 'usage')
  AND t.resource_type <> ''
"""
SPENT_GRANTS = (
    "SELECT id, balance, kind, expires_at, code FROM ledger_accounts"
    " WHERE id = ANY(%s) AND kind = 'credit' ORDER BY id FOR UPDATE"
)


class RefundShares:
    """What each charge that refunds name has left to give back to its resource, taken as those
    refunds are posted (a refused one takes nothing). See `refund_shares`."""

    def __init__(
        self,
        named: dict[int, tuple[uuid.UUID, uuid.UUID]],
        charges: dict[tuple[uuid.UUID, uuid.UUID], list[Any]],
    ) -> None:
        self.named = named
        self.charges = charges

    def attributed(self, i: int, r: TransferRequest) -> TransferRequest:
        """`r` (`requests[i]`), counted against its charge's resource in the rollups for at most
        what the charge has left; the rest of a larger refund as any refund naming nothing
        ("other": its resource's cost would go below zero). The request's fields stay as sent
        (its fingerprint too: a retry sends the same)."""
        key = self.named.get(i)
        if key is None or key not in self.charges:
            return r
        rtype, rid, project, unrefunded = self.charges[key]
        part = max(0, min(r.amount, unrefunded))
        lines = [SpendLine(rtype, part, rid, project)] if part else []
        if part < r.amount:
            lines.append(SpendLine("other", r.amount - part))
        return replace(r, lines=tuple(lines))

    def taken(self, i: int, r: TransferRequest) -> None:
        """`r` was posted as `attributed` made it: its charge has its part less left."""
        key = self.named.get(i)
        if key is not None and key in self.charges:
            self.charges[key][3] -= max(0, min(r.amount, self.charges[key][3]))


async def refund_shares(
    conn: Conn, requests: Sequence[TransferRequest], indexes: Sequence[int]
) -> RefundShares:
    """The shares of the refunds among `requests[i] for i in indexes` (those to be posted, in
    order) that name one of their organization's charges (`reference`: the refunded
    transaction, as the wallet writes its ids) and no resource of their own: such a refund lowers
    that charge's resource in spending by type and cost per resource (it counted as "other").
    Read under the wallets' locks, so no other refund of these charges commits meanwhile."""
    named: dict[int, tuple[uuid.UUID, uuid.UUID]] = {}
    for i in indexes:
        r = requests[i]
        if r.kind is Kind.REFUND and r.reference and not (r.resource_type or r.resource_id):
            if not r.lines:
                try:
                    charge = uuid.UUID(r.reference)
                except ValueError:
                    continue
                # Only as the wallet writes ids: what earlier refunds gave back is found by the
                # reference as stored (another spelling of the id was capped by nothing).
                if str(charge) == r.reference:
                    named[i] = (r.organization_id, charge)
    if not named:
        return RefundShares({}, {})
    cur = await conn.execute(
        NAMED_CHARGES,
        (sorted({tx for _, tx in named.values()}), sorted({org for org, _ in named.values()})),
    )
    return RefundShares(named, {(org, tx): rest for org, tx, *rest in await cur.fetchall()})


async def load_spending(conn: Conn, book: Book, requests: Sequence[TransferRequest]) -> None:
    """Give `book` the spending history of the organizations with credit grants that
    `requests` refund, and the grants it names that have nothing left."""
    refunds: dict[uuid.UUID, int] = defaultdict(int)
    for request in requests:
        if request.kind is Kind.REFUND and request.organization_id in book.wallets:
            refunds[request.organization_id] += request.amount
    if not refunds:
        return
    cur = await conn.execute(WITH_GRANTS, (sorted(refunds),))
    named: set[int] = set()
    for (org,) in await cur.fetchall():
        history = await _history(conn, org, refunds[org])
        book.spending[org] = history[::-1]
        named.update(account_id for account_id, _ in history)
    wallets = [book.wallets[org] for org in book.spending]
    held = {a.id for w in wallets for a in (w.cash, *w.credits)}
    spent = sorted(named - held)
    if spent:
        cur = await conn.execute(SPENT_GRANTS, (spent,))
        for account_id, balance, kind, expires_at, code in await cur.fetchall():
            book.spent_credits[account_id] = Account(account_id, balance, kind, expires_at, code)


async def _history(conn: Conn, org: uuid.UUID, amount: int) -> list[Leg]:
    """Newest first, enough of it to give `amount` back (or all of it).

    Pages follow the transactions' ids (the index), but a transaction's id is taken before it
    waits for the wallet lock, so ids can be out of commit order by the length of a wait (or
    within a millisecond across replicas). Posting ids are drawn from a sequence after the lock:
    the legs are put in their order."""
    rows: list[Any] = []
    cursor = NEWEST
    while True:
        cur = await conn.execute(HISTORY, (org, *cursor, PAGE))
        page = await cur.fetchall()
        rows.extend(page)
        rows.sort(key=lambda row: row[1], reverse=True)
        legs = [(account_id, delta) for _, _, account_id, delta in rows]
        if len(page) < PAGE or unspend(amount, legs)[1] == 0:
            return legs
        cursor = (page[-1][0], page[-1][1])
