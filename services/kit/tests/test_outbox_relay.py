"""The outbox and its relay against the real PostgreSQL and NATS: what commits is published once,
in order, with its id as Nats-Msg-Id; what rolls back never is; NATS being down only delays."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from google.protobuf.wrappers_pb2 import StringValue
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig
from prometheus_client import REGISTRY
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from gpudeck.cli.embedded import EmbeddedNats, free_port
from gpudeck.kit.config import EventsConfig
from gpudeck.kit.events import Event, EventBus, Outbox, Relay, new_event, parse_event
from gpudeck.kit.events.outbox import MAX_EVENT_BYTES, channel


@pytest.fixture
def schema(kit_schema: str) -> str:
    return kit_schema


@pytest.fixture
async def relays(
    pool: AsyncConnectionPool, schema: str
) -> AsyncIterator[Callable[..., Awaitable[Relay]]]:
    started: list[Relay] = []

    async def start(bus: EventBus, **options: float) -> Relay:
        relay = Relay(pool, schema, bus, **options)  # type: ignore[arg-type]
        await relay.start()
        started.append(relay)
        return relay

    yield start
    for relay in started:
        await relay.stop()


def event(schema: str, text: str = "hello", kind: str = "thing.done") -> Event:
    return new_event(f"{schema}.{kind}", StringValue(value=text), source="test")


async def commit(pool: AsyncConnectionPool, schema: str, *events: Event) -> None:
    async with pool.connection() as conn, conn.transaction():
        await Outbox(schema).add_many(conn, events)


async def stored(bus: EventBus, schema: str, count: int, *, settle: float = 0.3) -> list[Msg]:
    """The stream's messages on `<prefix>.<schema>.>`, once `count` are there (5 s at most),
    after checking for `settle` seconds that no more arrive."""
    name = f"{schema}-check"
    sub = await bus.js.pull_subscribe(
        bus.subject_for(f"{schema}.>"),
        durable=name,
        stream=bus.config.stream,
        config=ConsumerConfig(ack_policy=AckPolicy.NONE),
    )
    msgs: list[Msg] = []
    try:
        deadline = time.monotonic() + 5
        while len(msgs) < count and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                msgs += await sub.fetch(count - len(msgs), timeout=0.5)
        with contextlib.suppress(TimeoutError):
            msgs += await sub.fetch(10, timeout=settle)
    finally:
        await sub.unsubscribe()
        await bus.js.delete_consumer(bus.config.stream, name)
    return msgs


async def outbox_rows(pool: AsyncConnectionPool, schema: str) -> int:
    async with pool.connection() as conn:
        cur = await conn.execute(f"SELECT count(*) FROM {schema}.outbox")
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def eventually(check: Callable[[], Awaitable[bool] | bool], seconds: float = 5.0) -> None:
    """Wait until `check()` (a predicate, sync or async) holds; fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        result = check()
        if await result if inspect.isawaitable(result) else result:
            return
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def outbox_is_empty(pool: AsyncConnectionPool, schema: str) -> bool:
    return await outbox_rows(pool, schema) == 0


async def test_committed_event_reaches_jetstream_with_its_id_as_msg_id(
    pool: AsyncConnectionPool, schema: str, bus: EventBus, relays: Callable[..., Awaitable[Relay]]
) -> None:
    await relays(bus)
    sent = event(schema)
    await commit(pool, schema, sent)

    [msg] = await stored(bus, schema, 1)
    assert msg.subject == bus.subject_for(sent.type)
    assert msg.headers is not None and msg.headers["Nats-Msg-Id"] == sent.id
    assert parse_event(msg.data) == sent
    await eventually(lambda: outbox_is_empty(pool, schema))


async def test_rolled_back_event_is_never_published(
    pool: AsyncConnectionPool, schema: str, bus: EventBus, relays: Callable[..., Awaitable[Relay]]
) -> None:
    await relays(bus)
    lost, kept = event(schema, "lost"), event(schema, "kept")
    with pytest.raises(RuntimeError):
        async with pool.connection() as conn, conn.transaction():
            await Outbox(schema).add(conn, lost)
            raise RuntimeError("the business change failed")
    await commit(pool, schema, kept)

    assert [parse_event(m.data).id for m in await stored(bus, schema, 1)] == [kept.id]


async def test_a_commit_wakes_the_relay_without_waiting_for_the_poll(
    pool: AsyncConnectionPool, schema: str, bus: EventBus, relays: Callable[..., Awaitable[Relay]]
) -> None:
    relay = await relays(bus, poll_interval=30.0)
    await eventually(lambda: relay.leading)
    await asyncio.sleep(0.1)  # the relay is now waiting on LISTEN, 30 s before its next poll
    started = time.monotonic()
    await commit(pool, schema, event(schema))

    await eventually(lambda: relay.published == 1, seconds=2)
    assert time.monotonic() - started < 1.0


async def test_only_a_write_to_an_empty_outbox_notifies(
    pool: AsyncConnectionPool, schema: str
) -> None:
    async with await AsyncConnection.connect(pool.conninfo, autocommit=True) as listener:
        await listener.execute(f'LISTEN "{channel(schema)}"')
        await commit(pool, schema, event(schema, "first"))
        await commit(pool, schema, event(schema, "second"))  # the relay is busy: no need
        await commit(pool, schema, *(event(schema, str(i)) for i in range(100)))  # COPY path
        got = [n async for n in listener.notifies(timeout=0.3)]
    assert [n.channel for n in got] == [channel(schema)]


async def test_events_flowing_without_notifications_are_published_promptly(
    pool: AsyncConnectionPool, schema: str, bus: EventBus, relays: Callable[..., Awaitable[Relay]]
) -> None:
    relay = await relays(bus, poll_interval=30.0)
    await eventually(lambda: relay.leading)
    for i in range(20):  # one every 20 ms: many find the previous row still there
        started = time.monotonic()
        await commit(pool, schema, event(schema, str(i)))
        await eventually(lambda i=i: relay.published == i + 1, seconds=1)  # type: ignore[misc]
        assert time.monotonic() - started < 0.5
        await asyncio.sleep(0.02)


async def test_the_relay_vacuums_the_outbox_it_empties(
    pool: AsyncConnectionPool, schema: str, bus: EventBus, relays: Callable[..., Awaitable[Relay]]
) -> None:
    """Deleted rows are dead index entries every pass walks past until a VACUUM; autovacuum may
    be late or off (it is off on some machines), so the relay vacuums after enough deletes."""
    relay = await relays(bus, vacuum_every=50)
    await eventually(lambda: relay.leading)
    for i in range(6):
        await commit(pool, schema, *(event(schema, f"{i}-{j}") for j in range(20)))
    await eventually(lambda: relay.published == 120)
    assert relay.vacuums >= 1

    async def vacuumed() -> bool:
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT vacuum_count + autovacuum_count FROM pg_stat_user_tables"
                " WHERE schemaname = %s AND relname = 'outbox'",
                (schema,),
            )
            row = await cur.fetchone()
        return row is not None and row[0] >= 1

    await eventually(vacuumed)


async def test_events_are_published_in_commit_order(
    pool: AsyncConnectionPool, schema: str, bus: EventBus, relays: Callable[..., Awaitable[Relay]]
) -> None:
    sent = [event(schema, str(i)) for i in range(100)]
    # committed before the relay starts: 20 (one INSERT), 70 (COPY), 10 in a pipeline
    await commit(pool, schema, *sent[:20])
    await commit(pool, schema, *sent[20:90])
    async with pool.connection() as conn, conn.transaction(), conn.pipeline():
        await Outbox(schema).add_many(conn, sent[90:])
    await relays(bus, batch=25)  # batches that straddle the transactions

    msgs = await stored(bus, schema, 100)
    assert [parse_event(m.data).id for m in msgs] == [e.id for e in sent]


async def test_many_events_added_in_a_pipeline_are_published(
    pool: AsyncConnectionPool, schema: str, bus: EventBus, relays: Callable[..., Awaitable[Relay]]
) -> None:
    await relays(bus)
    sent = [event(schema, str(i)) for i in range(100)]  # COPY cannot be pipelined: one INSERT
    async with pool.connection() as conn, conn.transaction(), conn.pipeline():
        await Outbox(schema).add_many(conn, sent)

    assert [parse_event(m.data).id for m in await stored(bus, schema, 100)] == [e.id for e in sent]


async def test_adding_outside_a_transaction_is_refused(
    pool: AsyncConnectionPool, schema: str
) -> None:
    async with pool.connection() as conn:
        with pytest.raises(RuntimeError, match="transaction"):
            await Outbox(schema).add(conn, event(schema))
    assert await outbox_rows(pool, schema) == 0


@pytest.mark.parametrize("count", [1, 3, 100])  # add, add_many by INSERT, by COPY
async def test_an_event_too_large_to_publish_is_refused_when_written(
    pool: AsyncConnectionPool, schema: str, count: int
) -> None:
    """NATS refuses a message over its max_payload: written, such an event would stop the
    relay at it for good (each pass starts at the oldest row), so the writer is refused."""
    big = event(schema, "x" * (MAX_EVENT_BYTES + 1))
    events = [event(schema) for _ in range(count - 1)] + [big]
    with pytest.raises(ValueError, match="bytes"):
        async with pool.connection() as conn, conn.transaction():
            if count == 1:
                await Outbox(schema).add(conn, big)
            else:
                await Outbox(schema).add_many(conn, events)
    assert await outbox_rows(pool, schema) == 0


async def test_two_relays_at_once_publish_each_event_once(
    pool: AsyncConnectionPool, schema: str, bus: EventBus, relays: Callable[..., Awaitable[Relay]]
) -> None:
    other_bus = EventBus(bus.config, client_name="test-relay-2")
    await other_bus.start()
    try:
        first = await relays(bus, poll_interval=0.05, batch=10)
        second = await relays(other_bus, poll_interval=0.05, batch=10)
        sent = [event(schema, str(i)) for i in range(100)]
        for start in range(0, 100, 5):
            await commit(pool, schema, *sent[start : start + 5])

        msgs = await stored(bus, schema, 100)
        assert sorted(parse_event(m.data).id for m in msgs) == sorted(e.id for e in sent)
        assert first.published + second.published == 100  # no event was published twice
        assert [first.leading, second.leading].count(True) == 1
    finally:
        await other_bus.close()


async def test_standby_relay_takes_over_when_the_leader_stops(
    pool: AsyncConnectionPool, schema: str, bus: EventBus, relays: Callable[..., Awaitable[Relay]]
) -> None:
    first = await relays(bus, poll_interval=0.05)
    await eventually(lambda: first.leading)
    second = await relays(bus, poll_interval=0.05)
    await commit(pool, schema, event(schema, "one"))
    await eventually(lambda: first.published == 1)
    assert not second.leading

    await first.stop()
    await commit(pool, schema, event(schema, "two"))
    await eventually(lambda: second.published == 1)
    assert len(await stored(bus, schema, 2)) == 2


async def test_relay_started_while_nats_is_down_publishes_once_nats_is_up(
    pool: AsyncConnectionPool,
    schema: str,
    relays: Callable[..., Awaitable[Relay]],
    tmp_path: Path,
) -> None:
    server = EmbeddedNats(tmp_path / "nats", port=free_port())
    config = EventsConfig(nats_url=server.url, stream=f"S{schema}", subject_prefix="down")
    bus = EventBus(config, client_name="test-down", reconnect_wait=0.1, connect_timeout=0.5)
    try:
        await bus.start(wait=0.2)  # does not fail: keeps connecting in the background
        assert not bus.connected
        await relays(bus, poll_interval=0.1)
        sent = [event(schema, str(i)) for i in range(5)]
        await commit(pool, schema, *sent)
        # The relay reports its backlog (within a second; polled: under load it takes longer,
        # and another relay of this test process may report its own in between).
        await eventually(
            lambda: REGISTRY.get_sample_value("gpudeck_outbox_pending_events") == 5, seconds=10
        )
        assert await outbox_rows(pool, schema) == 5

        await asyncio.to_thread(server.start)
        assert await bus.wait_connected(5)
        await eventually(lambda: outbox_is_empty(pool, schema))
        msgs = await stored(bus, schema, 5)
        assert [m.headers["Nats-Msg-Id"] for m in msgs if m.headers] == [e.id for e in sent]

        # and again across a restart: the client reconnects, the file-stored stream survives
        await asyncio.to_thread(server.stop)
        later = event(schema, "later")
        await commit(pool, schema, later)
        await asyncio.to_thread(server.start)
        await eventually(lambda: outbox_is_empty(pool, schema))
        assert [parse_event(m.data).id for m in await stored(bus, schema, 6)][-1] == later.id
    finally:
        await bus.close()
        await asyncio.to_thread(server.stop)
