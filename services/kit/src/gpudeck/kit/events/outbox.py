"""The transactional outbox: events are rows written in the transaction of the change they
announce, so an event is published if and only if that change commits.

`Outbox(schema).add(conn, event)` inserts the row and, when the outbox held no committed row,
`pg_notify`s the schema's channel: the notification is delivered at commit (and dropped on
rollback), which wakes an idle relay at once. When the outbox does hold rows the relay is busy
with them and keeps reading the outbox for a while (`Relay.linger`), so the writer skips the
notification. That matters: PostgreSQL serializes the commits of notifying transactions (a
global lock held through the commit's WAL flush), which caps one-event transactions at about
1/fsync-time per second when every one of them notifies.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

from psycopg import AsyncConnection, sql
from psycopg.pq import PipelineStatus, TransactionStatus

from gpudeck.kit.events.envelope import check_type
from gpudeck.proto.events.v1.envelope_pb2 import Event

# Above this many events `add_many` uses COPY.
COPY_ABOVE = 64
# The largest event the outbox takes: under NATS's default max_payload (1 MiB), with room for
# headers. A larger one could never be published, and the relay would stop at it for good.
MAX_EVENT_BYTES = 1_000_000


def channel(schema: str) -> str:
    """The LISTEN/NOTIFY channel announcing new rows in `schema`'s outbox."""
    return f"gpudeck_outbox.{schema}"


def relay_lock_key(schema: str) -> int:
    """The advisory lock key held by the one relay working on `schema`'s outbox."""
    digest = hashlib.sha256(f"gpudeck.relay.{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class Outbox:
    """The `outbox` table of one schema; the schema is explicit, search_path is not relied on."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        table = sql.Identifier(schema, "outbox")
        # One statement, one round trip: the data-modifying CTE runs although nothing reads it,
        # and min(id) (an index probe) sees the outbox as it was before this insert.
        notify = sql.SQL(" SELECT pg_notify(%s, '') WHERE (SELECT min(id) FROM {}) IS NULL").format(
            table
        )
        self._notify = notify  # alone, before a COPY: it must not see the copied rows
        self._add = (
            sql.SQL(
                "WITH added AS (INSERT INTO {} (event_id, type, data) VALUES (%s, %s, %s))"
            ).format(table)
            + notify
        )
        self._add_many = (
            sql.SQL(
                "WITH added AS (INSERT INTO {} (event_id, type, data)"
                " SELECT * FROM unnest(%s::text[], %s::text[], %s::bytea[]))"
            ).format(table)
            + notify
        )
        self._copy = sql.SQL("COPY {} (event_id, type, data) FROM STDIN").format(table)
        self._channel = channel(schema)

    async def add(self, conn: AsyncConnection[Any], event: Event) -> None:
        """Write `event` within the caller's open transaction on `conn`."""
        _check_in_transaction(conn)
        data = _checked_size(event, event.SerializeToString())
        await conn.execute(self._add, (event.id, check_type(event.type), data, self._channel))

    async def add_many(self, conn: AsyncConnection[Any], events: Sequence[Event]) -> None:
        """Write `events`, in this order, within the caller's open transaction on `conn`.

        Many events go in with COPY (far cheaper than arrays of bytea), except in pipeline mode
        (COPY cannot be pipelined); a few with one INSERT.
        """
        if not events:
            return
        _check_in_transaction(conn)
        datas = [_checked_size(e, e.SerializeToString()) for e in events]
        if len(events) > COPY_ABOVE and conn.info.pipeline_status == PipelineStatus.OFF:
            await conn.execute(self._notify, (self._channel,))
            async with conn.cursor().copy(self._copy) as copy:
                await copy.write(_copy_text(events, datas))
            return
        ids = [e.id for e in events]
        types = [check_type(e.type) for e in events]
        await conn.execute(self._add_many, (ids, types, datas, self._channel))


# Event ids and types that need no escaping in COPY's text format (types are checked anyway).
_PLAIN_ID = re.compile(r"^[A-Za-z0-9._:-]+$")


def _copy_text(events: Sequence[Event], datas: Sequence[bytes]) -> str:
    """The events (serialized: `datas`) as COPY text rows (id, type, bytea in hex): one
    buffer, one write."""
    rows = []
    for e, data in zip(events, datas, strict=True):
        if not _PLAIN_ID.match(e.id):
            raise ValueError(f"event id {e.id!r} must be letters, digits, '.', ':', '_' or '-'")
        rows.append(f"{e.id}\t{check_type(e.type)}\t\\\\x{data.hex()}\n")
    return "".join(rows)


def _checked_size(event: Event, data: bytes) -> bytes:
    if len(data) > MAX_EVENT_BYTES:
        raise ValueError(
            f"event {event.type} is {len(data)} bytes: more than the {MAX_EVENT_BYTES} an"
            " outbox event may hold (NATS would refuse it)"
        )
    return data


def _check_in_transaction(conn: AsyncConnection[Any]) -> None:
    # In autocommit mode outside `conn.transaction()` the row would commit on its own, apart
    # from the change it announces: that is the bug the outbox exists to prevent.
    if conn.autocommit and conn.info.transaction_status == TransactionStatus.IDLE:
        raise RuntimeError("Outbox.add needs the caller's transaction: use `conn.transaction()`")
