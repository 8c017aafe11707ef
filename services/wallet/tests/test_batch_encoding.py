"""The batch path's hand-built encodings (COPY text, events, answers) say what the generic
ones (psycopg's write_row, protobuf constructors) would."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf.any_pb2 import Any as AnyPb
from google.protobuf.timestamp_pb2 import Timestamp
from psycopg_pool import AsyncConnectionPool

from gpudeck.proto.common.v1.money_pb2 import Money
from gpudeck.proto.events.v1.envelope_pb2 import Event
from gpudeck.proto.wallet.v1 import events_pb2 as events_pb
from gpudeck.proto.wallet.v1 import wallet_pb2 as pb
from gpudeck.wallet import convert, events
from gpudeck.wallet.ledger import Kind, PostingView, Transaction, TransferRequest
from gpudeck.wallet.ledger_store import COPY_THRESHOLD, LedgerStore

NewOrg = Callable[..., Awaitable[uuid.UUID]]
AWKWARD = "tab\there, new\nline, back\\slash, \\N, cr\r, \\x00ff, é"
ROW = (
    "SELECT organization_id, kind, amount, currency, payment_amount, payment_currency,"
    " exchange_rate, description, project_id, resource_type, resource_id, reference,"
    " idempotency_key, fingerprint, actor, balance_after FROM transactions"
    " WHERE organization_id = %s ORDER BY idempotency_key"
)


async def new_project(pool: AsyncConnectionPool, org: uuid.UUID) -> uuid.UUID:
    project = uuid.uuid4()
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO projects (id, organization_id, name) VALUES (%s, %s, 'batch')",
            (project, org),
        )
    return project


def requests(org: uuid.UUID, count: int, project: uuid.UUID) -> list[TransferRequest]:
    out = []
    for i in range(count):
        kind = (Kind.TOPUP, Kind.CHARGE, Kind.ADJUSTMENT)[i % 3]
        out.append(
            TransferRequest(
                f"key\t{i:04}\\{AWKWARD}",
                org,
                kind,
                {Kind.TOPUP: 1_000 + i, Kind.CHARGE: 100 + i}.get(kind, -5),
                description=f"{AWKWARD} {i}",
                project_id=project if i % 2 else None,
                resource_type="pod",  # a label: COPY escapes are tried on the free text
                resource_id=f"r\\{i}",
                reference=AWKWARD,
                actor="user:\ttab",
                record_key=i % 5 != 0,
            )
        )
    return out


async def stored_rows(
    pool: AsyncConnectionPool, org: uuid.UUID, sent: list[TransferRequest]
) -> list[tuple[Any, ...]]:
    """The rows of `org`, its id left out, its project's id as "project", and each fingerprint
    checked against its request's."""
    fingerprints = {r.key: r.fingerprint for r in sent}
    async with pool.connection() as conn:
        cur = await conn.execute(ROW, (org,))
        rows = await cur.fetchall()
    return [
        (
            *row[1:8],
            row[8] and "project",
            *row[9:13],
            row[13] and bytes(row[13]) == fingerprints[row[12]],
            *row[14:],
        )
        for row in rows
    ]


async def test_copied_rows_equal_inserted_rows(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    copied_org, inserted_org = await new_org(), await new_org()
    large = requests(copied_org, COPY_THRESHOLD + 10, await new_project(wallet_pool, copied_org))
    async with wallet_pool.connection() as conn, conn.transaction():
        await LedgerStore().post_transfers(conn, large)
    small = requests(
        inserted_org, COPY_THRESHOLD + 10, await new_project(wallet_pool, inserted_org)
    )
    for start in range(0, len(small), COPY_THRESHOLD // 2):  # below the threshold: INSERTs
        async with wallet_pool.connection() as conn, conn.transaction():
            await LedgerStore().post_transfers(conn, small[start : start + COPY_THRESHOLD // 2])
    copied = await stored_rows(wallet_pool, copied_org, large)
    assert copied == await stored_rows(wallet_pool, inserted_org, small)
    assert len(copied) == COPY_THRESHOLD + 10
    assert copied[1][6] == f"{AWKWARD} 1" and copied[1][7] == "project"
    assert copied[0][12] is None and copied[1][12] is True


async def test_copied_postings_keep_their_balances(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    org = await new_org()
    store = LedgerStore()
    async with wallet_pool.connection() as conn, conn.transaction():
        sent = requests(org, COPY_THRESHOLD + 1, await new_project(wallet_pool, org))
        outcomes = await store.post_transfers(conn, sent)
    answered = {o.transaction.id: o.transaction for o in outcomes if o.transaction}
    async with wallet_pool.connection() as conn:
        stored = await store.load_transactions(conn, list(answered))
    assert stored.keys() == answered.keys()
    for tx_id, tx in answered.items():
        assert stored[tx_id].postings == tx.postings
        assert stored[tx_id].description == tx.description


def reference_event(
    request: TransferRequest, tx_id: uuid.UUID, amount: int, currency: str, at: Timestamp
) -> Event:
    """The event as protobuf's constructors build it."""
    payload = events_pb.TransactionPosted(
        transaction_id=str(tx_id),
        kind=request.kind.value,
        amount=Money(amount=amount, currency=currency),
        resource_type=request.resource_type,
        resource_id=request.resource_id,
    )
    return Event(
        id="",
        type=events.TRANSACTION_EVENT[request.kind],
        source=events.SOURCE,
        organization_id=str(request.organization_id),
        project_id=str(request.project_id or ""),
        actor=request.actor or "system",
        time=at,
        payload=AnyPb(type_url=events.TRANSACTION_TYPE_URL, value=payload.SerializeToString()),
    )


def test_transaction_event_equals_the_one_built_by_constructors() -> None:
    at = Timestamp()
    at.FromDatetime(datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC))
    sent = [
        *requests(uuid.uuid4(), 6, uuid.uuid4()),
        TransferRequest("z", uuid.uuid4(), Kind.TOPUP, 0),
    ]
    for request in sent:
        tx_id = uuid.uuid4()
        built = events.transaction_posted(request, tx_id, request.amount, "USD", at, event_id="e")
        expected = reference_event(request, tx_id, request.amount, "USD", at)
        expected.id = "e"
        assert Event.FromString(built.SerializeToString()) == expected
        assert built.SerializeToString() == expected.SerializeToString()


def test_random_ids_are_version_4_uuids() -> None:
    ids = events.random_ids(500)
    assert len(set(ids)) == 500
    for text in ids:
        parsed = uuid.UUID(text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == text


def reference_answer(tx: Transaction, postings: bool) -> pb.Transaction:
    """The answer as protobuf's constructors build it."""
    created = Timestamp()
    created.FromDatetime(tx.created_at)
    message = pb.Transaction(
        id=str(tx.id),
        organization_id=str(tx.organization_id),
        kind=convert.KIND_TO_PROTO[tx.kind],
        amount=Money(amount=tx.amount, currency=tx.currency),
        exchange_rate=tx.exchange_rate or "",
        description=tx.description,
        resource_type=tx.resource_type,
        resource_id=tx.resource_id,
        project_id=str(tx.project_id or ""),
        balance_after=Money(amount=tx.balance_after, currency=tx.currency),
        created_at=created,
        idempotency_key=tx.idempotency_key,
        actor=tx.actor,
        postings=[
            pb.Posting(
                account=p.account,
                amount=p.amount,
                balance_before=p.balance_before,
                balance_after=p.balance_after,
                currency=tx.currency,
            )
            for p in (tx.postings if postings else ())
        ],
    )
    if tx.payment_amount is not None:
        message.payment_amount.CopyFrom(
            Money(amount=tx.payment_amount, currency=tx.payment_currency or "")
        )
    return message


def test_answers_equal_the_ones_built_by_constructors() -> None:
    base = Transaction(
        id=uuid.uuid4(), organization_id=uuid.uuid4(), kind=Kind.TOPUP, amount=0,
        currency="USD", payment_amount=None, payment_currency=None, exchange_rate=None,
        description=AWKWARD, project_id=None, resource_type="pod", resource_id="", reference="",
        idempotency_key="k", actor="", balance_after=0,
        created_at=datetime(2026, 1, 2, tzinfo=UTC) + timedelta(microseconds=7),
        postings=(PostingView("a", -5, 10, 5), PostingView("b", 5, 0, 5)),
    )  # fmt: skip
    with_payment = Transaction(
        **{**vars(base), "payment_amount": 0, "payment_currency": "EUR", "exchange_rate": "1.1"}
    )
    in_project = Transaction(**{**vars(base), "project_id": uuid.uuid4(), "amount": 12})
    for tx in (base, with_payment, in_project):
        for postings in (True, False):
            built = convert.transaction(tx, postings=postings)
            assert built == reference_answer(tx, postings)
            assert built.SerializeToString() == reference_answer(tx, postings).SerializeToString()
