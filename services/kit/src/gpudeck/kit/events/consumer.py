"""Durable JetStream consumers whose handlers take effect exactly once per event id.

A `Consumer` pulls with explicit acks (`gpudeck.kit.events.pull`). For each event it inserts
`(event_id, consumer)` into the schema's `inbox` and, only if that row is new, calls the handler
on the same connection, in the same transaction; the transaction commits, then the message is
acked. A redelivered or re-published event finds its inbox row and is acked unhandled.

The messages of one fetch share one transaction (one commit per batch, not per event). When a
handler raises, that transaction is rolled back, the failing message is retried (`nak` with
exponential backoff) or, after `max_deliver` deliveries, dead-lettered (`dead_letters` row, then
`term`), and the rest of the batch is handled again without it. Database errors (connection
lost, serialization failure) are retried without counting towards dead-lettering. A message
that is not an Event is dead-lettered at once.

The next batch is fetched while one is handled. With `concurrency` > 1, that many batches are
handled at once, each on its own connection: more throughput, but events of one subject may
then be handled out of order (as they are anyway across replicas sharing the durable consumer).
With the default of 1, a subject's events are handled in order, except around a retry.

Several subjects: NATS 2.9 has no multi-filter consumers, so each subject pattern gets its own
JetStream consumer, named `durable` when there is one pattern and `<durable>-<pattern slug>`
otherwise ("wallet.balance.*" → "billing-wallet_balance_any"), each with its own fetch loop.
The inbox is keyed by `durable`, so an event matched by two overlapping patterns is still
handled once.

`stop()` stops fetching, lets the handlers in hand finish and commit, acks their events, and
`nak`s the rest so another replica gets them at once. To make that work on NATS 2.9 it first
lets the pull request in flight end: a stop takes up to `fetch_timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, NotFoundError
from psycopg import AsyncConnection, sql
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from gpudeck.kit import metrics
from gpudeck.kit.events.bus import EventBus
from gpudeck.kit.events.envelope import InvalidEvent, parse_event
from gpudeck.kit.events.pull import Puller
from gpudeck.proto.events.v1.envelope_pb2 import Event

log = logging.getLogger(__name__)

Handler = Callable[[AsyncConnection[Any], Event], Awaitable[None]]

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_PATTERN = re.compile(r"^(>|([A-Za-z0-9_-]+|\*)(\.([A-Za-z0-9_-]+|\*))*(\.>)?)$")
_PRUNE_EVERY = 3600.0


def consumer_names(durable: str, subjects: Sequence[str]) -> dict[str, str]:
    """The JetStream consumer name for each subject pattern of a `Consumer`."""
    if not _NAME.match(durable):
        raise ValueError(f"durable {durable!r} may hold only letters, digits, '_' and '-'")
    patterns = list(dict.fromkeys(subjects))
    if not patterns:
        raise ValueError("a consumer needs at least one subject")
    for pattern in patterns:
        if not _PATTERN.match(pattern):
            raise ValueError(f"subject {pattern!r} must be dotted tokens, '*' or a final '>'")
    if len(patterns) == 1:
        return {patterns[0]: durable}
    names = {p: f"{durable}-{_slug(p)}" for p in patterns}
    if len(set(names.values())) != len(names):
        raise ValueError(f"subjects {patterns} give two JetStream consumers the same name")
    return names


def _slug(pattern: str) -> str:
    return pattern.replace(".", "_").replace("*", "any").replace(">", "all")


@dataclass
class _Item:
    msg: Msg
    event: Event
    fresh: bool = False  # its inbox row was inserted by the attempt that committed


class _HandlerFailed(Exception):
    def __init__(self, index: int, error: Exception) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error


class Consumer:
    """A durable pull consumer of `subjects` (event types or patterns below the prefix).

    `await start()` runs it in the background; `await stop()` ends it gracefully.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool,
        schema: str,
        bus: EventBus,
        *,
        durable: str,
        subjects: Sequence[str],
        handler: Handler,
        batch: int = 100,
        concurrency: int = 1,
        max_deliver: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 60.0,
        ack_wait: float = 30.0,
        fetch_timeout: float = 1.0,
        inbox_retention: float | None = 7 * 86400.0,
    ) -> None:
        if batch < 1 or concurrency < 1 or max_deliver < 1:
            raise ValueError("batch, concurrency and max_deliver must be at least 1")
        self.pool = pool
        self.schema = schema
        self.bus = bus
        self.durable = durable
        self.names = consumer_names(durable, subjects)
        self.handler = handler
        self.batch = batch
        self.concurrency = concurrency
        self.max_deliver = max_deliver
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.ack_wait = ack_wait
        self.fetch_timeout = fetch_timeout
        self.inbox_retention = inbox_retention
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        inbox = sql.Identifier(schema, "inbox")
        self._claim = sql.SQL(
            "INSERT INTO {} (event_id, consumer) SELECT unnest(%s::text[]), %s"
            " ON CONFLICT DO NOTHING RETURNING event_id"
        ).format(inbox)
        self._unclaim = sql.SQL("DELETE FROM {} WHERE consumer = %s AND event_id = ANY(%s)").format(
            inbox
        )
        self._prune = sql.SQL(
            "DELETE FROM {} WHERE consumer = %s AND handled_at < now() - make_interval(secs => %s)"
        ).format(inbox)
        self._seen = sql.SQL(
            "INSERT INTO {} (name) VALUES (%s) ON CONFLICT DO NOTHING RETURNING name"
        ).format(sql.Identifier(schema, "consumers"))
        self._bury_sql = sql.SQL(
            "INSERT INTO {} (consumer, subject, event_id, data, error, deliveries)"
            " VALUES (%s, %s, %s, %s, %s, %s)"
        ).format(sql.Identifier(schema, "dead_letters"))

    async def start(self) -> None:
        """Start `concurrency` fetch loops per subject pattern, and the inbox pruning."""
        if self._tasks:
            raise RuntimeError("Consumer.start() was already called")
        self._stopping.clear()
        for subject, name in self.names.items():
            for _ in range(self.concurrency):
                self._tasks.append(asyncio.create_task(self._run(subject, name), name=name))
        if self.inbox_retention:
            self._tasks.append(asyncio.create_task(self._prune_inbox(self.inbox_retention)))

    async def stop(self) -> None:
        """Stop fetching, finish the event in hand, and return once every loop has ended."""
        self._stopping.set()
        tasks, self._tasks = self._tasks, []
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- the fetch loop -------------------------------------------------------------------

    async def _run(self, subject: str, name: str) -> None:
        """Fetch batches and hand each to one of `concurrency` workers, fetching the next batch
        while they work: one pull request in flight at a time, whatever the concurrency."""
        sub: Puller | None = None
        fetch: asyncio.Future[list[Msg]] | None = None
        workers: set[asyncio.Task[None]] = set()
        free = asyncio.Semaphore(self.concurrency)
        leftovers: list[Msg] = []  # fetched, not handled: given back when stopping
        generation = -1
        stopping: asyncio.Future[Any] = asyncio.ensure_future(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                if sub is None or generation != self.bus.generation:
                    # New connection or broken subscription: recreate it (nats.py issue 504).
                    await _release(sub, fetch, [])
                    sub, fetch = None, None
                    if not await self.bus.wait_connected(1.0):
                        continue
                    generation = self.bus.generation
                    try:
                        sub = await self._subscribe(subject, name)
                    except Exception as exc:
                        log.warning(
                            "cannot subscribe", extra={"consumer": name, "error": repr(exc)}
                        )
                        await self._pause(1.0)
                        continue
                if fetch is None:
                    fetch = self._fetch(sub)
                if not await _first(fetch, stopping, cancel=False):
                    break  # the fetch goes on: _release waits for it
                done, fetch = fetch, None
                try:
                    msgs = _fetched(done)
                except Exception as exc:
                    log.warning(
                        "fetch failed; resubscribing", extra={"consumer": name, "error": repr(exc)}
                    )
                    await _release(sub, None, [])
                    sub = None
                    await self._pause(0.5)
                    continue
                if not msgs:
                    continue
                slot = asyncio.ensure_future(free.acquire())
                if not await _first(slot, stopping) or self._stopping.is_set():
                    leftovers += msgs
                    break
                fetch = self._fetch(sub)  # the next batch comes while this one is handled
                worker = asyncio.create_task(self._work(msgs, free, leftovers))
                workers.add(worker)
                worker.add_done_callback(workers.discard)
        finally:
            stopping.cancel()
            await asyncio.gather(*workers, return_exceptions=True)  # each finishes its event
            await _release(sub, fetch, leftovers, wait=self.fetch_timeout + 1.0)

    async def _work(self, msgs: list[Msg], free: asyncio.Semaphore, leftovers: list[Msg]) -> None:
        try:
            leftovers += await self._process(msgs)
        except Exception:  # _process handles failures itself: this is a bug, keep consuming
            log.exception("consumer failed on a batch", extra={"consumer": self.durable})
        finally:
            free.release()

    async def _subscribe(self, subject: str, name: str) -> Puller:
        js = self.bus.js
        stream = self.bus.config.stream
        async with self.pool.connection() as conn:  # noted once, whoever made it
            cur = await conn.execute(self._seen, (name,))
            first_time = await cur.fetchone() is not None
        try:
            await js.consumer_info(stream, name)  # it exists: resume where it is
        except NotFoundError:
            await self._create(subject, name, first_time=first_time)
        puller = Puller(self.bus.nc, stream, name)
        await puller.open()
        return puller

    async def _create(self, subject: str, name: str, *, first_time: bool) -> None:
        """Make the durable: from the start of the stream the first time; made again (it was
        lost), from the oldest event the inbox still remembers, so that no event whose inbox
        row was pruned takes effect twice (one older that was never handled is skipped: the
        consumer was gone for longer than the retention)."""
        js = self.bus.js
        stream = self.bus.config.stream
        since = None
        if not first_time and self.inbox_retention:
            since = datetime.now(UTC) - timedelta(seconds=self.inbox_retention)
            log.warning(
                "consumer made again: resuming from the inbox's retention, not the stream start",
                extra={"consumer": name, "since": since.isoformat()},
            )
        config = ConsumerConfig(
            name=name,
            durable_name=name,
            filter_subject=self.bus.subject_for(subject),
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            deliver_policy=DeliverPolicy.ALL if since is None else DeliverPolicy.BY_START_TIME,
            opt_start_time=since,
        )
        try:
            await js.add_consumer(stream, config)
        except APIError as exc:
            # It exists with settings the server will not change: use it as it is.
            try:
                await js.consumer_info(stream, name)
            except NotFoundError:
                raise exc from None
            log.warning(
                "consumer exists with other settings; using them",
                extra={"consumer": name, "error": repr(exc)},
            )

    def _fetch(self, sub: Puller) -> asyncio.Future[list[Msg]]:
        return asyncio.ensure_future(sub.fetch(self.batch, self.fetch_timeout))

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    # --- handling -------------------------------------------------------------------------

    async def _process(self, msgs: list[Msg]) -> list[Msg]:
        """Handle, retry or bury `msgs`; return those left untouched because of a stop."""
        items: list[_Item] = []
        for msg in msgs:
            try:
                items.append(_Item(msg, parse_event(msg.data)))
            except InvalidEvent as exc:
                await self._bury(msg, None, str(exc))
        while items:
            if self._stopping.is_set():
                return [item.msg for item in items]
            try:
                done, error = await self._attempt(items)
            except Exception as exc:  # the database, not a handler: retry them all later
                log.warning(
                    "cannot handle events; will retry",
                    extra={"consumer": self.durable, "error": repr(exc)},
                )
                for item in items:
                    await self._retry(item, exc, counts=False)
                return []
            if error is None:
                for item in items[:done]:
                    await _quietly(item.msg.ack())
                fresh = sum(item.fresh for item in items[:done])
                if fresh:
                    metrics.EVENTS_HANDLED.labels(consumer=self.durable, outcome="handled").inc(
                        fresh
                    )
                if done - fresh:
                    metrics.EVENTS_HANDLED.labels(consumer=self.durable, outcome="duplicate").inc(
                        done - fresh
                    )
                return [item.msg for item in items[done:]]  # not reached: stopping
            await self._retry(items[done], error, counts=not _transient(error))
            del items[done]
        return []

    async def _attempt(self, items: list[_Item]) -> tuple[int, Exception | None]:
        """Handle `items` in order in one transaction.

        Returns (n, None) once items[:n] are committed (n < len(items) only when stopping), or
        (k, error) when the handler raised on items[k]: then nothing was committed.
        """
        async with self.pool.connection() as conn:
            try:
                async with conn.transaction():
                    cur = await conn.execute(
                        self._claim, ([item.event.id for item in items], self.durable)
                    )
                    fresh = {row[0] for row in await cur.fetchall()}
                    for index, item in enumerate(items):
                        if index and self._stopping.is_set():
                            if fresh:  # claimed, not handled: leave them for a redelivery
                                await conn.execute(self._unclaim, (self.durable, list(fresh)))
                            return index, None
                        item.fresh = item.event.id in fresh
                        if not item.fresh:
                            continue
                        fresh.discard(item.event.id)
                        try:
                            await self.handler(conn, item.event)
                        except Exception as exc:
                            raise _HandlerFailed(index, exc) from exc
            except _HandlerFailed as failed:
                return failed.index, failed.error
        return len(items), None

    async def _retry(self, item: _Item, error: Exception, *, counts: bool) -> None:
        """`nak` with backoff, or dead-letter if the handler failed `max_deliver` times."""
        delivered = _deliveries(item.msg)
        if counts and delivered >= self.max_deliver:
            await self._bury(item.msg, item.event.id, f"{type(error).__name__}: {error}")
            return
        if counts:
            log.warning(
                "handler failed; will retry",
                exc_info=error,
                extra={"consumer": self.durable, "event_id": item.event.id, "delivered": delivered},
            )
        metrics.EVENTS_HANDLED.labels(consumer=self.durable, outcome="retried").inc()
        await _quietly(item.msg.nak(delay=self._delay(delivered)))

    def _delay(self, delivered: int) -> float:
        return float(min(self.backoff * 2 ** max(0, delivered - 1), self.max_backoff))

    async def _bury(self, msg: Msg, event_id: str | None, error: str) -> None:
        """Write `msg` to `dead_letters` and `term` it (or `nak` it if that write fails)."""
        delivered = _deliveries(msg)
        try:
            async with self.pool.connection() as conn, conn.transaction():
                await conn.execute(
                    self._bury_sql,
                    (self.durable, msg.subject, event_id, msg.data, error, delivered),
                )
        except Exception as exc:
            log.warning(
                "cannot dead-letter; will retry",
                extra={"consumer": self.durable, "error": repr(exc)},
            )
            await _quietly(msg.nak(delay=self._delay(delivered)))
            return
        log.error(
            "event dead-lettered",
            extra={
                "consumer": self.durable,
                "subject": msg.subject,
                "event_id": event_id,
                "error": error,
            },
        )
        metrics.EVENTS_HANDLED.labels(consumer=self.durable, outcome="dead").inc()
        await _quietly(msg.term())

    async def _prune_inbox(self, retention: float) -> None:
        """Forget inbox rows older than `retention` seconds, at start and then hourly."""
        while not self._stopping.is_set():
            try:
                async with self.pool.connection() as conn, conn.transaction():
                    await conn.execute(self._prune, (self.durable, retention))
            except Exception as exc:
                log.warning("cannot prune the inbox", extra={"error": repr(exc)})
            await self._pause(_PRUNE_EVERY)


def _transient(error: Exception) -> bool:
    """Database trouble (lost connection, serialization failure, deadlock), not the event's."""
    return isinstance(error, psycopg.OperationalError | PoolTimeout)


def _deliveries(msg: Msg) -> int:
    try:
        return int(msg.metadata.num_delivered)
    except Exception:
        return 1


async def _first(
    future: asyncio.Future[Any], stopping: asyncio.Future[Any], *, cancel: bool = True
) -> bool:
    """Wait for `future` or for the stop; whether `future` finished (a stop may come too).
    If it did not, it is cancelled, unless `cancel` is false."""
    waiting: set[asyncio.Future[Any]] = {future, stopping}
    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    if future.done():
        return True
    if cancel:
        future.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await future
    return False


def _fetched(fetch: asyncio.Future[list[Msg]]) -> list[Msg]:
    """The messages of a finished fetch; raises if it failed."""
    error = fetch.exception()
    if error is not None:
        raise error
    return fetch.result()


async def _release(
    sub: Puller | None,
    fetch: asyncio.Future[list[Msg]] | None,
    held: list[Msg],
    *,
    wait: float = 0.0,
) -> None:
    """Give up a subscription: end its fetch, unsubscribe, then `nak` what was held.

    Waiting (at most `wait` seconds) for the fetch rather than cancelling it matters on NATS 2.9:
    its pull request stays on the server until it expires, and the nak'ed messages would be
    redelivered to it, that is to a dead inbox, until their ack wait runs out. Newer servers drop
    a pull request whose inbox lost its subscriber, but NATS 2.9 does not.
    """
    if fetch is not None:
        if not fetch.done() and wait > 0:
            await asyncio.wait({fetch}, timeout=wait)
        if not fetch.done():
            fetch.cancel()
            await asyncio.wait({fetch})
        if not fetch.cancelled():
            with contextlib.suppress(Exception):
                held = held + _fetched(fetch)
    if sub is not None:
        try:
            held = held + await sub.close()
        except Exception as exc:
            log.debug("unsubscribing failed", extra={"error": repr(exc)})
    for msg in held:
        await _quietly(msg.nak())


async def _quietly(action: Awaitable[Any] | None) -> None:
    """Await an ack, nak, term or unsubscribe; a failure only means a later redelivery."""
    if action is None:
        return
    try:
        await action
    except Exception as exc:
        log.debug("NATS call failed", extra={"error": repr(exc)})
