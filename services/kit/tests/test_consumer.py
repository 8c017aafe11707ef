"""Consumers against the real PostgreSQL and NATS: a handler's effect happens once per event id,
failures are retried with backoff, then dead-lettered; garbage is dead-lettered; stop drains."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.wrappers_pb2 import StringValue
from nats.js.errors import NotFoundError
from prometheus_client import REGISTRY
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from gpudeck.cli.embedded import EmbeddedNats, free_port
from gpudeck.kit.config import EventsConfig
from gpudeck.kit.events import Consumer, Event, EventBus, new_event

Start = Callable[..., Awaitable[Consumer]]


@pytest.fixture
async def schema(pool: AsyncConnectionPool, kit_schema: str) -> str:
    """The kit's tables and an `effects` table the handlers write to."""
    async with pool.connection() as conn:
        await conn.execute(f"CREATE TABLE {kit_schema}.effects (event_id text NOT NULL)")
    return kit_schema


@pytest.fixture
async def consumers(
    pool: AsyncConnectionPool, schema: str, bus: EventBus
) -> AsyncIterator[Callable[..., Awaitable[Consumer]]]:
    """Start a consumer of `<schema>.>` (options override); stopped and deleted afterwards."""
    started: list[tuple[Consumer, EventBus]] = []

    async def start(handler: Callable[..., Awaitable[None]], **options: Any) -> Consumer:
        on = options.pop("bus", bus)
        options.setdefault("durable", schema)
        options.setdefault("subjects", [f"{schema}.>"])
        options.setdefault("backoff", 0.05)
        options.setdefault("fetch_timeout", 0.3)
        consumer = Consumer(pool, schema, on, handler=handler, **options)
        await consumer.start()
        started.append((consumer, on))
        return consumer

    yield start
    for consumer, on in started:
        await consumer.stop()
        if not on.connected:  # a test's own server, already gone with its consumers
            continue
        for name in consumer.names.values():
            with contextlib.suppress(NotFoundError):
                await on.js.delete_consumer(on.config.stream, name)


def event(schema: str, text: str = "hello", kind: str = "thing.done") -> Event:
    return new_event(f"{schema}.{kind}", StringValue(value=text), source="test")


def recorder(schema: str) -> Callable[[AsyncConnection[Any], Event], Awaitable[None]]:
    async def record(conn: AsyncConnection[Any], event: Event) -> None:
        await conn.execute(f"INSERT INTO {schema}.effects (event_id) VALUES (%s)", (event.id,))

    return record


async def effects(pool: AsyncConnectionPool, schema: str) -> Counter[str]:
    async with pool.connection() as conn:
        cur = await conn.execute(f"SELECT event_id FROM {schema}.effects")
        return Counter(row[0] for row in await cur.fetchall())


async def dead_letters(pool: AsyncConnectionPool, schema: str) -> list[tuple[Any, ...]]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            f"SELECT consumer, subject, event_id, data, error, deliveries"
            f" FROM {schema}.dead_letters ORDER BY id"
        )
        return list(await cur.fetchall())


async def eventually(check: Callable[[], Awaitable[bool] | bool], seconds: float = 5.0) -> None:
    """Wait until `check()` (a predicate, sync or async) holds; fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        result = check()
        if await result if inspect.isawaitable(result) else result:
            return
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def has_effects(pool: AsyncConnectionPool, schema: str, expected: Counter[str]) -> bool:
    return await effects(pool, schema) == expected


def handled(consumer: str, outcome: str) -> float:
    """The EVENTS_HANDLED counter of `consumer` for `outcome`."""
    labels = {"consumer": consumer, "outcome": outcome}
    return REGISTRY.get_sample_value("gpudeck_events_handled_total", labels) or 0.0


async def pending_acks(bus: EventBus, consumer: Consumer) -> int:
    """Messages the consumer has not acked yet (-1 while its durable is not there yet: a busy
    machine may ask before the server has it)."""
    [name] = consumer.names.values()
    try:
        info = await bus.js.consumer_info(bus.config.stream, name)
    except NotFoundError:
        return -1
    return int(info.num_ack_pending) + int(info.num_pending)


async def test_event_is_handled_and_acked(
    pool: AsyncConnectionPool, schema: str, bus: EventBus, consumers: Start
) -> None:
    seen: list[Event] = []
    record = recorder(schema)

    async def handler(conn: AsyncConnection[Any], event: Event) -> None:
        seen.append(event)
        await record(conn, event)

    consumer = await consumers(handler)
    sent = event(schema)
    await bus.publish(sent)

    await eventually(lambda: has_effects(pool, schema, Counter([sent.id])))
    await eventually(lambda: _zero(pending_acks(bus, consumer)))
    assert seen == [sent]


async def test_event_published_twice_is_handled_once(
    pool: AsyncConnectionPool, schema: str, bus: EventBus, consumers: Start
) -> None:
    sent, after = event(schema, "twice"), event(schema, "after")
    data = sent.SerializeToString()
    # Two copies in the stream (distinct Nats-Msg-Ids defeat JetStream's de-duplication).
    await bus.publish_raw(bus.subject_for(sent.type), data, "copy-1-" + sent.id)
    await bus.publish_raw(bus.subject_for(sent.type), data, "copy-2-" + sent.id)
    consumer = await consumers(recorder(schema), batch=1)  # the copies in separate batches
    await bus.publish(after)

    await eventually(lambda: has_effects(pool, schema, Counter([sent.id, after.id])))
    await eventually(lambda: _zero(pending_acks(bus, consumer)))
    assert await effects(pool, schema) == Counter([sent.id, after.id])
    assert handled(schema, "handled") == 2
    assert handled(schema, "duplicate") == 1


async def test_redelivered_event_already_handled_is_acked_without_handling(
    pool: AsyncConnectionPool, schema: str, bus: EventBus, consumers: Start
) -> None:
    sent = event(schema)
    async with pool.connection() as conn:  # as if handled, then the process died before the ack
        await conn.execute(
            f"INSERT INTO {schema}.inbox (event_id, consumer) VALUES (%s, %s)", (sent.id, schema)
        )
    calls: list[Event] = []

    async def handler(conn: AsyncConnection[Any], event: Event) -> None:
        calls.append(event)

    consumer = await consumers(handler)
    await bus.publish(sent)

    await eventually(lambda: _zero(pending_acks(bus, consumer)))
    assert calls == []


async def test_handler_failing_twice_then_succeeding_is_handled_once(
    pool: AsyncConnectionPool, schema: str, bus: EventBus, consumers: Start
) -> None:
    calls = 0
    record = recorder(schema)

    async def flaky(conn: AsyncConnection[Any], event: Event) -> None:
        nonlocal calls
        calls += 1
        await record(conn, event)  # rolled back when it then fails
        if calls <= 2:
            raise RuntimeError(f"failure {calls}")

    consumer = await consumers(flaky, max_deliver=5)
    sent = event(schema)
    await bus.publish(sent)

    await eventually(lambda: has_effects(pool, schema, Counter([sent.id])))
    await eventually(lambda: _zero(pending_acks(bus, consumer)))
    assert calls == 3
    assert await dead_letters(pool, schema) == []
    assert (handled(schema, "retried"), handled(schema, "handled")) == (2, 1)


async def test_always_failing_handler_is_dead_lettered_after_max_deliver(
    pool: AsyncConnectionPool, schema: str, bus: EventBus, consumers: Start
) -> None:
    calls = 0

    async def broken(conn: AsyncConnection[Any], event: Event) -> None:
        nonlocal calls
        calls += 1
        raise ValueError("cannot apply this")

    consumer = await consumers(broken, max_deliver=3)
    sent = event(schema)
    await bus.publish(sent)

    await eventually(lambda: _any(dead_letters(pool, schema)))
    [(name, subject, event_id, data, error, deliveries)] = await dead_letters(pool, schema)
    assert (name, subject, event_id, bytes(data)) == (
        schema,
        bus.subject_for(sent.type),
        sent.id,
        sent.SerializeToString(),
    )
    assert error == "ValueError: cannot apply this"
    assert deliveries == 3
    await eventually(lambda: _zero(pending_acks(bus, consumer)))  # termed: no redelivery
    await asyncio.sleep(0.3)
    assert calls == 3
    assert handled(schema, "dead") == 1


async def test_garbage_message_is_dead_lettered(
    pool: AsyncConnectionPool, schema: str, bus: EventBus, consumers: Start
) -> None:
    calls: list[Event] = []

    async def handler(conn: AsyncConnection[Any], event: Event) -> None:
        calls.append(event)

    consumer = await consumers(handler)
    subject = bus.subject_for(f"{schema}.thing.done")
    await bus.publish_raw(subject, b"\xff\xfe not a protobuf message")

    await eventually(lambda: _any(dead_letters(pool, schema)))
    [(_, got_subject, event_id, data, error, deliveries)] = await dead_letters(pool, schema)
    assert (got_subject, event_id, bytes(data)) == (
        subject,
        None,
        b"\xff\xfe not a protobuf message",
    )
    assert "not a gpudeck.events.v1.Event" in error
    assert deliveries == 1
    await eventually(lambda: _zero(pending_acks(bus, consumer)))
    assert calls == []


async def test_one_failing_event_does_not_hold_back_the_rest_of_its_batch(
    pool: AsyncConnectionPool, schema: str, bus: EventBus, consumers: Start
) -> None:
    first, bad, last = event(schema, "a"), event(schema, "bad"), event(schema, "c")
    record = recorder(schema)

    async def handler(conn: AsyncConnection[Any], event: Event) -> None:
        await record(conn, event)
        if event.id == bad.id:
            raise RuntimeError("bad event")

    for e in (first, bad, last):
        await bus.publish(e)
    await consumers(handler, max_deliver=1)  # all three come in one fetch

    await eventually(lambda: has_effects(pool, schema, Counter([first.id, last.id])))
    await eventually(lambda: _any(dead_letters(pool, schema)))
    assert [row[2] for row in await dead_letters(pool, schema)] == [bad.id]


async def test_an_event_matching_two_patterns_is_handled_once(
    pool: AsyncConnectionPool, schema: str, bus: EventBus, consumers: Start
) -> None:
    consumer = await consumers(
        recorder(schema), subjects=[f"{schema}.wallet.*", f"{schema}.>"], durable=f"{schema}-two"
    )
    assert sorted(consumer.names.values()) == [
        f"{schema}-two-{schema}_all",
        f"{schema}-two-{schema}_wallet_any",
    ]
    both, one = event(schema, kind="wallet.topped"), event(schema, kind="pod.started")
    await bus.publish(both)
    await bus.publish(one)

    await eventually(lambda: has_effects(pool, schema, Counter([both.id, one.id])))
    await asyncio.sleep(0.3)  # the second copy of `both` has had time to be seen
    assert await effects(pool, schema) == Counter([both.id, one.id])


async def test_concurrent_workers_handle_each_event_once(
    pool: AsyncConnectionPool, schema: str, bus: EventBus, consumers: Start
) -> None:
    sent = [event(schema, str(i)) for i in range(60)]
    for e in sent[:30]:
        await bus.publish(e)
    await consumers(recorder(schema), batch=7, concurrency=3)
    for e in sent[30:]:
        await bus.publish(e)

    await eventually(lambda: has_effects(pool, schema, Counter(e.id for e in sent)))


async def test_consumer_recreates_its_jetstream_consumer_if_deleted(
    pool: AsyncConnectionPool, schema: str, bus: EventBus, consumers: Start
) -> None:
    consumer = await consumers(recorder(schema))
    first, second = event(schema, "first"), event(schema, "second")
    await bus.publish(first)
    await eventually(lambda: has_effects(pool, schema, Counter([first.id])))

    await bus.js.delete_consumer(bus.config.stream, consumer.durable)
    await bus.publish(second)  # a new consumer starts from the stream's beginning: first again
    await eventually(lambda: has_effects(pool, schema, Counter([first.id, second.id])))
    assert handled(schema, "duplicate") == 1


async def test_a_consumer_made_again_does_not_redo_what_its_inbox_forgot(
    pool: AsyncConnectionPool, schema: str, bus: EventBus, consumers: Start
) -> None:
    """Made again (its durable lost), a consumer started from the stream's beginning: an event
    handled longer ago than the inbox keeps (its row pruned) took effect a second time. It now
    starts from the oldest event the inbox still remembers."""
    consumer = await consumers(recorder(schema), inbox_retention=1.0)
    first, second = event(schema, "first"), event(schema, "second")
    await bus.publish(first)
    await eventually(lambda: has_effects(pool, schema, Counter([first.id])))
    await asyncio.sleep(1.5)  # past the inbox's retention: its row goes
    async with pool.connection() as conn:
        await conn.execute(f"DELETE FROM {schema}.inbox WHERE consumer = %s", (consumer.durable,))

    await bus.js.delete_consumer(bus.config.stream, consumer.durable)
    await bus.publish(second)
    await eventually(lambda: has_effects(pool, schema, Counter([first.id, second.id])))
    await asyncio.sleep(0.5)  # room for a replay of the first to show
    assert await effects(pool, schema) == Counter([first.id, second.id])


async def test_stop_finishes_the_event_in_hand_and_leaves_the_rest(
    pool: AsyncConnectionPool, schema: str, bus: EventBus, consumers: Start
) -> None:
    record = recorder(schema)
    in_hand = asyncio.Event()

    async def slow(conn: AsyncConnection[Any], event: Event) -> None:
        await record(conn, event)
        if not in_hand.is_set():
            in_hand.set()
            await asyncio.sleep(0.3)

    sent = [event(schema, str(i)) for i in range(5)]
    for e in sent:
        await bus.publish(e)
    consumer = await consumers(slow)
    await asyncio.wait_for(in_hand.wait(), 5)

    started = time.monotonic()
    await consumer.stop()
    assert time.monotonic() - started >= 0.2  # it waited for the handler
    assert await effects(pool, schema) == Counter([sent[0].id])  # committed; the rest untouched

    await consumers(recorder(schema))  # the next one gets the rest at once (they were nak'ed)
    await eventually(lambda: has_effects(pool, schema, Counter(e.id for e in sent)), seconds=3)


async def test_consumer_resumes_after_nats_restarts(
    pool: AsyncConnectionPool, schema: str, consumers: Start, tmp_path: Path
) -> None:
    server = EmbeddedNats(tmp_path / "nats", port=free_port())
    await asyncio.to_thread(server.start)
    config = EventsConfig(nats_url=server.url, stream=f"S{schema}", subject_prefix="restart")
    bus = EventBus(config, client_name="test-restart", reconnect_wait=0.1)
    try:
        await bus.start()
        consumer = await consumers(recorder(schema), bus=bus)
        before, after = event(schema, "before"), event(schema, "after")
        await bus.publish(before)
        await eventually(lambda: has_effects(pool, schema, Counter([before.id])))

        await asyncio.to_thread(server.stop)
        await asyncio.to_thread(server.start)
        assert await bus.wait_connected(5)
        await bus.publish(after)
        await eventually(lambda: has_effects(pool, schema, Counter([before.id, after.id])))
        await consumer.stop()
    finally:
        await bus.close()
        await asyncio.to_thread(server.stop)


async def _zero(value: Awaitable[int]) -> bool:
    return await value == 0


async def _any(value: Awaitable[list[Any]]) -> bool:
    return bool(await value)
