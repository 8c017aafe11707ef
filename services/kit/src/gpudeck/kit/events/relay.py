"""The relay: moves committed outbox rows of one schema to JetStream, in order, then deletes them.

Exactly one relay works on a schema at a time, across replicas: the one holding a session
advisory lock on its own connection. The others retry the lock every `poll_interval`, so one
takes over within that time when the leader's connection goes away. While NATS is down rows
simply stay in the outbox.

Waking up: the leader LISTENs on the schema's channel. A writer that finds the outbox empty
notifies (see `gpudeck.kit.events.outbox`); one that finds rows does not, because the relay is
then busy, and after publishing anything the relay keeps reading the outbox every 5 ms for
`linger` seconds. So a commit is published within milliseconds whether events trickle or flow;
`poll_interval` is the safety net (a writer whose transaction outlasts the linger).

Each pass reads a batch in `id` order, publishes it without waiting between messages (the
acks come back in parallel), waits for all acks, and deletes the acknowledged rows in one
statement. A row whose ack is lost is published again later and JetStream drops the copy: the
`Nats-Msg-Id` header is the event id and the stream's duplicate window covers the retry.

Deleted rows leave dead index entries that every pass (it reads from the lowest id: a row with
a lower id may commit after a higher one) and every writer's emptiness probe walk past until a
VACUUM removes them. Autovacuum may be late or off, so after every `vacuum_every` deleted rows
(and at most once a second) the leader vacuums the outbox itself: a queue table stays small.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import psycopg
from nats.js.api import PubAck
from nats.js.errors import NoStreamResponseError
from psycopg import AsyncConnection, sql
from psycopg_pool import AsyncConnectionPool

from gpudeck.kit import metrics
from gpudeck.kit.events.bus import BusNotConnected, EventBus, Outgoing
from gpudeck.kit.events.outbox import channel, relay_lock_key

log = logging.getLogger(__name__)
T = TypeVar("T")
LINGER_POLL = 0.005  # how often the outbox is read while events flow
STOP_WAIT = 2.0  # seconds `stop` waits for the relay to end once cancelled


class Relay:
    """Publishes `schema`'s outbox to the bus; `await start()`, later `await stop()`."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        schema: str,
        bus: EventBus,
        *,
        batch: int = 500,
        poll_interval: float = 1.0,
        linger: float = 0.5,
        publish_timeout: float = 5.0,
        vacuum_every: int = 5_000,
    ) -> None:
        self.pool = pool
        self.schema = schema
        self.bus = bus
        self.batch = batch
        self.poll_interval = poll_interval
        self.linger = linger
        self.publish_timeout = publish_timeout
        self.vacuum_every = vacuum_every
        self.vacuums = 0  # VACUUMs of the outbox run since start
        self._deleted_since_vacuum = 0
        self._vacuumed_at = 0.0
        self.published = 0  # events acknowledged by JetStream since start
        self.leading = False
        self._task: asyncio.Task[None] | None = None
        self._metrics_at = 0.0
        table = sql.Identifier(schema, "outbox")
        self._select = sql.SQL(
            "SELECT id, event_id, type, data, created_at FROM {} WHERE id > %s ORDER BY id LIMIT %s"
        ).format(table)
        self._delete = sql.SQL("DELETE FROM {} WHERE id = ANY(%s)").format(table)
        self._stats = sql.SQL("SELECT count(*), min(created_at) FROM {}").format(table)
        self._listen = sql.SQL("LISTEN {}").format(sql.Identifier(channel(schema)))
        self._vacuum = sql.SQL("VACUUM {}").format(table)

    async def start(self) -> None:
        """Start relaying in the background; returns at once."""
        if self._task is not None:
            raise RuntimeError("Relay.start() was already called")
        self._task = asyncio.create_task(self._run(), name=f"relay {self.schema}")

    async def stop(self) -> None:
        """Stop relaying; rows not yet acknowledged stay in the outbox for the next leader."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        # Bounded: a statement to a database that does not answer may not end even so (its
        # connection is left to close on its own).
        await asyncio.wait({task}, timeout=STOP_WAIT)
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.warning("relay stopped on an error", extra={"error": repr(task.exception())})
        self.leading = False

    async def _run(self) -> None:
        while True:
            try:
                conn = await self._connect()
            except psycopg.Error as exc:
                log.warning("relay cannot connect to the database", extra={"error": str(exc)})
                await asyncio.sleep(self.poll_interval)
                continue
            try:
                async with conn:
                    await self._lead(conn)
            except psycopg.Error as exc:
                log.warning("relay lost its database connection", extra={"error": str(exc)})
                await asyncio.sleep(self.poll_interval)
            except Exception:  # a bug must not stop the events for good: log it, start over
                log.exception("relay failed; restarting")
                await asyncio.sleep(self.poll_interval)
            finally:
                self.leading = False

    async def _connect(self) -> AsyncConnection[Any]:
        """A connection of its own, like the pool's: it holds a session lock and a LISTEN."""
        conninfo = await _resolve(self.pool.conninfo)
        kwargs = await _resolve(self.pool.kwargs) or {}
        return await AsyncConnection.connect(conninfo, **{**kwargs, "autocommit": True})

    async def _lead(self, conn: AsyncConnection[Any]) -> None:
        """Become the leader on `conn` (waiting for it), then relay until the connection fails."""
        key = relay_lock_key(self.schema)
        while True:
            cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (key,))
            row = await cur.fetchone()
            if row is not None and row[0]:
                break
            await asyncio.sleep(self.poll_interval)
        self.leading = True
        log.info("relay leading", extra={"schema": self.schema})
        # A lost DELETE only means publishing again, which JetStream and the inboxes absorb:
        # no need to wait for it to reach the disk.
        await conn.execute("SET synchronous_commit TO off")
        await conn.execute(self._listen)
        busy_at = -self.linger
        while True:
            if not self.bus.connected:
                await self._update_metrics(conn)
                await self.bus.wait_connected(self.poll_interval)
                continue
            published = await self._drain(conn)
            if published is None:
                # Publishing failed: wait before retrying, a little less if NATS comes back.
                await self._update_metrics(conn)
                await self.bus.wait_connected(self.poll_interval)
                await asyncio.sleep(min(0.2, self.poll_interval))
                continue
            metrics.OUTBOX_PENDING.set(0)
            metrics.OUTBOX_LAG.set(0)
            now = time.monotonic()
            if published:
                busy_at = now
                self._deleted_since_vacuum += published
                if self._deleted_since_vacuum >= self.vacuum_every and now - self._vacuumed_at >= 1:
                    await conn.execute(self._vacuum)
                    self.vacuums += 1
                    self._deleted_since_vacuum = 0
                    self._vacuumed_at = time.monotonic()
            # While events flow, writers seeing rows in the outbox do not notify: keep looking.
            lingering = now - busy_at < self.linger
            await self._wait(conn, LINGER_POLL if lingering else self.poll_interval)

    async def _wait(self, conn: AsyncConnection[Any], seconds: float) -> None:
        """Until a notification arrives or `seconds` pass."""
        async for _ in conn.notifies(timeout=seconds, stop_after=1):
            pass
        # Notifications already received are covered by the pass about to start.
        async for _ in conn.notifies(timeout=0):
            pass

    async def _drain(self, conn: AsyncConnection[Any]) -> int | None:
        """Publish the outbox until it is empty; return how many, or None if a publish failed."""
        last = 0
        published = 0
        while True:
            cur = await conn.execute(self._select, (last, self.batch))
            rows = await cur.fetchall()
            if not rows:
                return published
            metrics.OUTBOX_LAG.set(_age(rows[0][4]))
            messages = [
                Outgoing(self.bus.subject_for(type_), bytes(data), event_id)
                for _id, event_id, type_, data, _created in rows
            ]
            try:
                results = await self.bus.publish_many(messages, ack_timeout=self.publish_timeout)
            except BusNotConnected:
                return None
            done = [row[0] for row, result in zip(rows, results, strict=True) if _acked(result)]
            if done:
                await conn.execute(self._delete, (done,))
                self.published += len(done)
                published += len(done)
                by_type = Counter(
                    r[2] for r, result in zip(rows, results, strict=True) if _acked(result)
                )
                for type_, count in by_type.items():
                    metrics.EVENTS_PUBLISHED.labels(type=type_).inc(count)
            if len(done) < len(rows):
                await self._publish_failed(rows, results)
                return None
            if len(rows) < self.batch:
                return published
            last = rows[-1][0]
            await self._update_metrics(conn)

    async def _publish_failed(self, rows: list[Any], results: list[PubAck | BaseException]) -> None:
        errors = [r for r in results if isinstance(r, BaseException)]
        log.warning(
            "publishing outbox events failed; will retry",
            extra={"schema": self.schema, "failed": len(errors), "error": repr(errors[0])},
        )
        if any(isinstance(e, NoStreamResponseError) for e in errors):
            # Nothing stores the subject: the stream is gone (a new, empty NATS server?).
            with contextlib.suppress(Exception):
                await self.bus.ensure_stream()

    async def _update_metrics(self, conn: AsyncConnection[Any]) -> None:
        """Set OUTBOX_PENDING and OUTBOX_LAG, at most once a second (a count scans the table)."""
        now = time.monotonic()
        if now - self._metrics_at < 1.0:
            return
        self._metrics_at = now
        cur = await conn.execute(self._stats)
        row = await cur.fetchone()
        pending, oldest = row if row is not None else (0, None)
        metrics.OUTBOX_PENDING.set(pending)
        metrics.OUTBOX_LAG.set(_age(oldest) if oldest is not None else 0.0)


async def _resolve(value: T | Callable[[], T] | Callable[[], Awaitable[T]]) -> T:
    """A pool setting given as a value or as a (possibly async) callable returning it."""
    if not callable(value):
        return value
    result = value()
    return await result if inspect.isawaitable(result) else result


def _acked(result: PubAck | BaseException) -> bool:
    return isinstance(result, PubAck)


def _age(created_at: datetime) -> float:
    return max(0.0, time.time() - created_at.timestamp())
