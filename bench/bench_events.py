"""Events end to end: outbox row → relay → JetStream → consumer handler, on the real servers.

The producing service (writers and the relay) runs in this process, the consuming service in a
child process, as they would in production. Measured in one run:
- baseline: raw JetStream publish → pull → ack of the same number of messages, no PostgreSQL;
- plumbing: writers commit 100 events per transaction (a batch API), the handler does nothing
  (the consumer still writes its inbox row per event), goal ≥ 5,000 events/s;
- batched: the same with a handler that inserts one row in the consumer's transaction;
- single: one event per transaction, 8 writers as fast as they go;
- latency: commit → handler at a paced 1,000 events/s, one event per transaction, goal p99 < 50 ms.
Throughput runs from the first write to the last event handled.

Env: GPUDECK_BENCH_DATABASE_URL (a database is created and dropped), GPUDECK_BENCH_NATS_URL (a
stream of its own, deleted at the end). `python -m bench events` or `python bench/bench_events.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import nats
import psycopg
from google.protobuf.wrappers_pb2 import Int64Value
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from gpudeck import kit
from gpudeck.kit.config import EventsConfig
from gpudeck.kit.db import migrate, open_pool
from gpudeck.kit.events import Consumer, Event, EventBus, Outbox, Relay, new_event

KIT_MIGRATIONS = Path(kit.__file__).parent / "migrations"  # what gpudeck.kit.runtime applies
DATABASE_URL = os.environ.get(
    "GPUDECK_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
NATS_URL = os.environ.get("GPUDECK_BENCH_NATS_URL", "nats://127.0.0.1:4222")
SCHEMA = "bench"
BATCHED_EVENTS = 20_000
EVENTS_PER_TX = 100
SINGLE_EVENTS = 5_000
WRITERS = 8
PACED_RATE = 1_000
PACED_SECONDS = 5.0
GOAL_RATE = 5_000
GOAL_P99_MS = 50.0
APPLY = "bench.thing.happened"  # the handler inserts a row into bench.applied
SKIP = "bench.thing.noticed"  # the handler does nothing


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def event(i: int, event_type: str = APPLY) -> Event:
    return new_event(event_type, Int64Value(value=i), source="bench")


# --- the consuming service, in a process of its own ------------------------------------------


async def handle(conn: AsyncConnection[Any], event: Event) -> None:
    """One row per event, in the consumer's transaction; nothing for the plumbing phase."""
    if event.type == APPLY:
        await conn.execute("INSERT INTO bench.applied (event_id) VALUES (%s)", (event.id,))


async def consume(database_url: str, nats_url: str, stream: str, prefix: str) -> None:
    """Run the consumer until SIGTERM; print "ready" once it is fetching."""
    pool = await open_pool(database_url, min_size=2, max_size=4, name="bench-consumer")
    bus = EventBus(EventsConfig(nats_url, stream, prefix), client_name="bench-consumer")
    await bus.start()
    consumer = Consumer(pool, SCHEMA, bus, durable="bench", subjects=["bench.>"], handler=handle)
    await consumer.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await consumer.stop()
    await bus.close()
    await pool.close()


# --- the producing service: writers and the relay --------------------------------------------

Committed = dict[str, float]  # event id → wall-clock time its transaction committed
Writer = Callable[[AsyncConnectionPool, Committed, int, str], Awaitable[None]]


async def baseline(nats_url: str, stream: str, count: int) -> float:
    """Raw JetStream: publish `count` messages (async, acked) while a pull consumer takes them."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    subject = f"{stream.lower()}.raw"
    await js.add_stream(
        StreamConfig(
            name=stream, subjects=[subject], storage=StorageType.FILE, duplicate_window=120
        )
    )
    sub = await js.pull_subscribe(
        subject, durable="raw", stream=stream, config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT)
    )
    payload = event(0).SerializeToString()

    async def produce() -> None:
        for start in range(0, count, 500):
            futures = [
                await js.publish_async(subject, payload, headers={"Nats-Msg-Id": f"{start}.{i}"})
                for i in range(min(500, count - start))
            ]
            await asyncio.gather(*futures)

    async def consume() -> None:
        got = 0
        while got < count:
            with contextlib.suppress(TimeoutError):
                for msg in await sub.fetch(100, timeout=1):
                    await msg.ack()
                    got += 1

    started = time.perf_counter()
    await asyncio.gather(produce(), consume())
    elapsed = time.perf_counter() - started
    await js.delete_stream(stream)
    await nc.close()
    return count / elapsed


async def write_batched(
    pool: AsyncConnectionPool, committed: Committed, count: int, event_type: str
) -> None:
    """EVENTS_PER_TX events per transaction, WRITERS transactions at a time."""
    outbox = Outbox(SCHEMA)
    starts = iter(range(0, count, EVENTS_PER_TX))

    async def writer() -> None:
        for start in starts:
            events = [event(i, event_type) for i in range(start, min(start + EVENTS_PER_TX, count))]
            async with pool.connection() as conn, conn.transaction():
                await outbox.add_many(conn, events)
            now = time.time()
            committed.update((e.id, now) for e in events)

    await asyncio.gather(*(writer() for _ in range(WRITERS)))


async def write_single(
    pool: AsyncConnectionPool, committed: Committed, count: int, event_type: str
) -> None:
    """One event per transaction, WRITERS transactions at a time, as fast as they go."""
    outbox = Outbox(SCHEMA)
    numbers = iter(range(count))

    async def writer() -> None:
        for i in numbers:
            e = event(i, event_type)
            async with pool.connection() as conn, conn.transaction():
                await outbox.add(conn, e)
            committed[e.id] = time.time()

    await asyncio.gather(*(writer() for _ in range(WRITERS)))


async def write_paced(
    pool: AsyncConnectionPool, committed: Committed, count: int, event_type: str
) -> None:
    """One event per transaction, the i-th due at i / PACED_RATE s; writers share the schedule."""
    outbox = Outbox(SCHEMA)
    started = time.perf_counter()
    numbers = iter(range(count))

    async def writer() -> None:
        for i in numbers:
            delay = started + i / PACED_RATE - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            e = event(i, event_type)
            async with pool.connection() as conn, conn.transaction():
                await outbox.add(conn, e)
            committed[e.id] = time.time()

    await asyncio.gather(*(writer() for _ in range(WRITERS)))


async def handled_times(pool: AsyncConnectionPool, ids: list[str], event_type: str) -> list[float]:
    """When each of `ids` was handled (epoch seconds), for those handled so far.

    For APPLY events, the handler's row (its clock_timestamp()); for SKIP events, the inbox row
    (now(): the start of the consumer's batch transaction, a few ms early at most).
    """
    query = (
        "SELECT extract(epoch FROM handled_at)::float8 FROM bench.applied WHERE event_id = ANY(%s)"
        if event_type == APPLY
        else "SELECT extract(epoch FROM handled_at)::float8 FROM bench.inbox"
        " WHERE consumer = 'bench' AND event_id = ANY(%s)"
    )
    async with pool.connection() as conn:
        cur = await conn.execute(query, (ids,))
        return [row[0] for row in await cur.fetchall()]


async def phase(
    pool: AsyncConnectionPool, write: Writer, count: int, event_type: str = APPLY
) -> tuple[float, list[float]]:
    """Write `count` events; once all are handled return (events/s, latencies in ms)."""
    committed: Committed = {}
    started = time.time()
    await write(pool, committed, count, event_type)
    writing = time.time() - started
    deadline = time.monotonic() + 60
    while len(handled := await handled_times(pool, list(committed), event_type)) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"bench_events: only {len(handled)} of {count} events handled")
        await asyncio.sleep(0.05)
    rate = count / (max(handled) - started)
    print(f"  ({write.__name__}: committed at {count / writing:,.0f}/s, handled at {rate:,.0f}/s)")
    latencies: list[float] = []
    if event_type == APPLY:
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT event_id, extract(epoch FROM handled_at)::float8 FROM bench.applied"
                " WHERE event_id = ANY(%s)",
                (list(committed),),
            )
            at: dict[str, float] = dict(await cur.fetchall())
        latencies = sorted((at[i] - committed[i]) * 1000 for i in committed)
    return rate, latencies


async def bench() -> dict[str, float]:
    run = uuid.uuid4().hex[:8]
    dbname = f"gpudeck_bench_{run}"
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{dbname}"')
    database_url = with_database(DATABASE_URL, dbname)
    config = EventsConfig(nats_url=NATS_URL, stream=f"BENCH_{run}", subject_prefix=f"bench{run}")
    pool = await open_pool(database_url, min_size=4, max_size=WRITERS + 2, name="bench")
    bus = EventBus(config, client_name="bench-producer")
    relay = Relay(pool, SCHEMA, bus)
    consumer: asyncio.subprocess.Process | None = None
    try:
        await migrate(pool, SCHEMA, KIT_MIGRATIONS, table="kit_migrations")
        async with pool.connection() as conn:
            await conn.execute(
                "CREATE TABLE bench.applied (event_id text PRIMARY KEY,"
                " handled_at timestamptz NOT NULL DEFAULT clock_timestamp())"
            )
        raw = await baseline(NATS_URL, f"BENCH_RAW_{run}", BATCHED_EVENTS)
        await bus.start()
        if not bus.connected:
            raise SystemExit(f"bench_events: NATS at {NATS_URL} is not reachable")
        await relay.start()
        consumer = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "consume",
            database_url,
            NATS_URL,
            config.stream,
            config.subject_prefix,
            stdout=asyncio.subprocess.PIPE,
        )
        assert consumer.stdout is not None
        if await asyncio.wait_for(consumer.stdout.readline(), 30) != b"ready\n":
            raise SystemExit("bench_events: the consumer process did not start")

        plumbing, _ = await phase(pool, write_batched, BATCHED_EVENTS, SKIP)
        batched, _ = await phase(pool, write_batched, BATCHED_EVENTS)
        single, _ = await phase(pool, write_single, SINGLE_EVENTS)
        _, latencies = await phase(pool, write_paced, int(PACED_RATE * PACED_SECONDS))
    finally:
        if consumer is not None and consumer.returncode is None:
            consumer.send_signal(signal.SIGTERM)
            await consumer.wait()
        await relay.stop()
        with contextlib.suppress(Exception):
            await bus.js.delete_stream(config.stream)
        await bus.close()
        await pool.close()
        with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    return report(raw, plumbing, batched, single, latencies)


def report(
    raw: float, plumbing: float, batched: float, single: float, latencies: list[float]
) -> dict[str, float]:
    def line(name: str, what: str, rate: float, goal: bool) -> None:
        verdict = f"  [{'ok' if rate >= GOAL_RATE else 'BELOW GOAL'}]" if goal else ""
        print(
            f"{name:<9} {what:<52} {rate:7,.0f} events/s = {rate / raw:.2f} x baseline,"
            f" {rate / GOAL_RATE:.2f} x goal {GOAL_RATE:,}/s{verdict}"
        )

    p50 = statistics.median(latencies)
    p99 = latencies[max(0, int(len(latencies) * 0.99) - 1)]
    print(
        f"{'baseline':<9} {'raw JetStream publish → pull → ack, no PostgreSQL':<52} {raw:7,.0f} msg/s"
    )
    line("plumbing", f"{EVENTS_PER_TX} events/tx → relay → consumer, no-op handler", plumbing, True)
    line(
        "batched", f"{EVENTS_PER_TX} events/tx → relay → consumer, 1-INSERT handler", batched, True
    )
    line("single", "1 event/tx → relay → consumer, 1-INSERT handler", single, False)
    verdict = "ok" if p99 < GOAL_P99_MS else "ABOVE GOAL"
    print(
        f"{'latency':<9} commit → handled at a paced {PACED_RATE:,} events/s (1 event/tx):"
        f" p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {latencies[-1]:.1f} ms"
        f" (goal p99 < {GOAL_P99_MS:g} ms)  [{verdict}]"
    )
    return {
        "baseline": raw,
        "plumbing": plumbing,
        "batched": batched,
        "single": single,
        "p50_ms": p50,
        "p99_ms": p99,
    }


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(bench())


if __name__ == "__main__":
    if sys.argv[1:2] == ["consume"]:
        logging.basicConfig(level=logging.ERROR)
        asyncio.run(consume(*sys.argv[2:6]))
    else:
        main()
