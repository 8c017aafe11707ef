"""How a batch of planned transactions is written: its rows (INSERT from arrays, or COPY for
large batches), the new balances, the spending rollups; and how rows read back become
`Transaction`s."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from psycopg import AsyncConnection

from gpudeck.proto.events.v1.envelope_pb2 import Event
from gpudeck.wallet.ledger import Book, Kind, PlannedTransaction, PostingView, Transaction

Conn = AsyncConnection[Any]

# Earlier uses of these (organization, key) pairs: the transaction with the key (its fingerprint
# and id), or else a hold, capture, void, plan change or credit purchase with it (the
# idempotency table: its fingerprint, no id; see migrations/017_one_key_one_request.sql). A
# LATERAL probe per key, so the plan is an index lookup however small the table was when the
# statement was prepared (a cached hash join over a scan of a then-small table grows with it).
FIND_KEYS = """
SELECT k.o, k.key, coalesce(t.fingerprint, i.fingerprint), t.id
FROM unnest(%s::uuid[], %s::text[]) AS k (o, key)
LEFT JOIN LATERAL (
    SELECT t.fingerprint, t.id FROM transactions t
    WHERE t.organization_id = k.o AND t.idempotency_key = k.key LIMIT 1
) t ON true
LEFT JOIN LATERAL (
    SELECT i.fingerprint FROM idempotency i WHERE i.scope = k.o::text AND i.key = k.key LIMIT 1
) i ON true
WHERE t.id IS NOT NULL OR i.fingerprint IS NOT NULL
"""
TRANSACTION_COLUMNS = (
    "id, organization_id, kind, amount, currency, payment_amount, payment_currency,"
    " exchange_rate, description, project_id, resource_type, resource_id, reference,"
    " idempotency_key, fingerprint, actor, balance_after, created_at"
)
INSERT_TRANSACTIONS = f"""
INSERT INTO transactions ({TRANSACTION_COLUMNS})
SELECT * FROM unnest(%s::uuid[], %s::uuid[], %s::text[], %s::bigint[], %s::text[], %s::bigint[],
    %s::text[], %s::text[], %s::text[], %s::uuid[], %s::text[], %s::text[], %s::text[], %s::text[],
    %s::bytea[], %s::text[], %s::bigint[], %s::timestamptz[])
"""
INSERT_POSTINGS = """
INSERT INTO postings (transaction_id, account_id, amount, balance_before, balance_after)
SELECT * FROM unnest(%s::uuid[], %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[])
"""


@dataclass
class Batch:
    """What one transaction of the store collects before it writes."""

    now: datetime
    planned: list[PlannedTransaction] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


def transaction_rows(batch: Batch) -> list[tuple[Any, ...]]:
    rows = []
    for p in batch.planned:
        r = p.request
        rows.append(
            (
                p.id, r.organization_id, r.kind.value, p.amount, p.currency,
                p.payment_amount, p.payment_currency, p.exchange_rate, r.description,
                r.project_id, r.resource_type, r.resource_id, r.reference, r.key,
                r.fingerprint if r.record_key else None, r.actor, p.balance_after, batch.now,
            )
        )  # fmt: skip
    return rows


def posting_rows(batch: Batch) -> list[tuple[Any, ...]]:
    return [
        (p.id, x.account_id, x.amount, x.balance_before, x.balance_after)
        for p in batch.planned
        for x in p.postings
    ]


async def insert_rows(conn: Conn, batch: Batch) -> None:
    """Small batches: INSERTs from arrays (they pipeline; COPY does not)."""
    tx_rows = transaction_rows(batch)
    await conn.execute(INSERT_TRANSACTIONS, [list(col) for col in zip(*tx_rows, strict=True)])
    post_rows = posting_rows(batch)
    await conn.execute(INSERT_POSTINGS, [list(col) for col in zip(*post_rows, strict=True)])


async def copy_rows(conn: Conn, batch: Batch) -> None:
    """Large batches: COPY, the fastest way in; each table's rows go as one text buffer."""
    cursor = conn.cursor()
    async with cursor.copy(f"COPY transactions ({TRANSACTION_COLUMNS}) FROM STDIN") as copy:
        await copy.write(transactions_copy_text(batch))
    async with cursor.copy(
        "COPY postings (transaction_id, account_id, amount, balance_before, balance_after)"
        " FROM STDIN"
    ) as copy:
        await copy.write(postings_copy_text(batch))


# COPY's text format: these characters are written as backslash escapes, None as \N.
_COPY_ESCAPES = str.maketrans(
    {"\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\v": "\\v", "\f": "\\f", "\r": "\\r"}
)
NULL = "\\N"


def copy_text(value: str) -> str:
    """`value` as a field of COPY's text format."""
    return value.translate(_COPY_ESCAPES)


def transactions_copy_text(batch: Batch) -> str:
    """The rows of `transaction_rows(batch)`, as COPY text."""
    now = copy_text(batch.now.isoformat())
    orgs: dict[uuid.UUID, str] = {}
    lines = []
    for p in batch.planned:
        r = p.request
        org = orgs.get(r.organization_id)
        if org is None:
            org = orgs[r.organization_id] = str(r.organization_id)
        fingerprint = "\\\\x" + r.fingerprint.hex() if r.record_key else NULL
        fields = (
            str(p.id), org, r.kind.value, str(p.amount), copy_text(p.currency),
            NULL if p.payment_amount is None else str(p.payment_amount),
            NULL if p.payment_currency is None else copy_text(p.payment_currency),
            NULL if p.exchange_rate is None else copy_text(p.exchange_rate),
            copy_text(r.description), NULL if r.project_id is None else str(r.project_id),
            copy_text(r.resource_type), copy_text(r.resource_id), copy_text(r.reference),
            copy_text(r.key), fingerprint, copy_text(r.actor), str(p.balance_after), now,
        )  # fmt: skip
        lines.append("\t".join(fields))
    lines.append("")
    return "\n".join(lines)


def postings_copy_text(batch: Batch) -> str:
    """The rows of `posting_rows(batch)`, as COPY text."""
    return "".join(
        f"{tx_id}\t{x.account_id}\t{x.amount}\t{x.balance_before}\t{x.balance_after}\n"
        for p in batch.planned
        for tx_id in (str(p.id),)
        for x in p.postings
    )


async def update_balances(
    conn: Conn, planned: Sequence[PlannedTransaction], book: Book, now: datetime
) -> None:
    final: dict[int, int] = {}
    for p in planned:
        for post in p.postings:
            final[post.account_id] = post.balance_after
    ids = sorted(final)
    await conn.execute(
        "UPDATE ledger_accounts a SET balance = v.b"
        " FROM unnest(%s::bigint[], %s::bigint[]) AS v(id, b) WHERE a.id = v.id",
        (ids, [final[i] for i in ids]),
    )
    orgs = sorted({p.request.organization_id for p in planned})
    wallets = [book.wallets[o] for o in orgs]
    await conn.execute(
        "UPDATE wallets w SET balance = v.b, credits = v.c, changed_at = %s, updated_at = %s"
        " FROM unnest(%s::uuid[], %s::bigint[], %s::bigint[]) AS v(o, b, c)"
        " WHERE w.organization_id = v.o",
        (now, now, orgs, [w.balance for w in wallets], [w.credit_total for w in wallets]),
    )


async def roll_up(conn: Conn, planned: Sequence[PlannedTransaction], now: datetime) -> None:
    day = now.astimezone(UTC).date()
    daily: dict[tuple[uuid.UUID, str], int] = defaultdict(int)
    costs: dict[tuple[uuid.UUID, str], tuple[str, uuid.UUID | None, int]] = {}
    for p in planned:
        org = p.request.organization_id
        for line in p.spend:
            daily[(org, line.resource_type)] += line.amount
            if line.resource_id:
                _, _, total = costs.get((org, line.resource_id), ("", None, 0))
                costs[(org, line.resource_id)] = (
                    line.resource_type,
                    line.project_id,
                    total + line.amount,
                )
    if daily:
        keys = sorted(daily)
        await conn.execute(
            "INSERT INTO daily_spend (organization_id, day, resource_type, amount)"
            " SELECT o, %s, t, a"
            " FROM unnest(%s::uuid[], %s::text[], %s::bigint[]) AS v(o, t, a)"
            " ON CONFLICT (organization_id, day, resource_type)"
            " DO UPDATE SET amount = daily_spend.amount + excluded.amount",
            (day, [k[0] for k in keys], [k[1] for k in keys], [daily[k] for k in keys]),
        )
    if costs:
        keys2 = sorted(costs)
        # Binary parameters: a tick's ten thousand meters dump five times faster than as text.
        await conn.cursor(binary=True).execute(
            "INSERT INTO resource_costs (organization_id, resource_id, resource_type,"
            " project_id, total, first_charged_at, last_charged_at)"
            " SELECT o, r, t, p, a, %b, %b"
            " FROM unnest(%b::uuid[], %b::text[], %b::text[], %b::uuid[], %b::bigint[])"
            " AS v(o, r, t, p, a)"
            " ON CONFLICT (organization_id, resource_id) DO UPDATE"
            " SET total = resource_costs.total + excluded.total,"
            " last_charged_at = excluded.last_charged_at",
            (
                now,
                now,
                [k[0] for k in keys2],
                [k[1] for k in keys2],
                [costs[k][0] for k in keys2],
                [costs[k][1] for k in keys2],
                [costs[k][2] for k in keys2],
            ),
        )


def transaction_from_row(row: Sequence[Any], postings: list[PostingView]) -> Transaction:
    (tx_id, org, kind, amount, currency, pay_amount, pay_currency, rate, description, project,
     rtype, rid, reference, key, actor, balance_after, created_at) = row  # fmt: skip
    return Transaction(
        id=tx_id,
        organization_id=org,
        kind=Kind(kind),
        amount=amount,
        currency=currency,
        payment_amount=pay_amount,
        payment_currency=pay_currency,
        exchange_rate=rate,
        description=description,
        project_id=project,
        resource_type=rtype,
        resource_id=rid,
        reference=reference,
        idempotency_key=key,
        actor=actor,
        balance_after=balance_after,
        created_at=created_at,
        postings=tuple(postings),
    )


def view(p: PlannedTransaction, now: datetime) -> Transaction:
    r = p.request
    return Transaction(
        id=p.id,
        organization_id=r.organization_id,
        kind=r.kind,
        amount=p.amount,
        currency=p.currency,
        payment_amount=p.payment_amount,
        payment_currency=p.payment_currency,
        exchange_rate=p.exchange_rate,
        description=r.description,
        project_id=r.project_id,
        resource_type=r.resource_type,
        resource_id=r.resource_id,
        reference=r.reference,
        idempotency_key=r.key,
        actor=r.actor,
        balance_after=p.balance_after,
        created_at=now,
        postings=tuple(
            PostingView(x.account_code, x.amount, x.balance_before, x.balance_after)
            for x in p.postings
        ),
    )
