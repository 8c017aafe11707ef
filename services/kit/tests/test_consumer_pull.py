"""The consumer's pull requests against the real NATS: they answer with the first messages to
come, not once a full batch is there, and report a consumer that is gone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from gpudeck.kit.config import EventsConfig
from gpudeck.kit.events import EventBus
from gpudeck.kit.events.pull import Puller, PullError


@pytest.fixture
async def bus(events_config: EventsConfig) -> AsyncIterator[EventBus]:
    bus = EventBus(events_config, client_name="test-pull")
    await bus.start()
    assert bus.connected
    yield bus
    await bus.close()


@pytest.fixture
async def puller(bus: EventBus, unique: str) -> AsyncIterator[Puller]:
    """A puller on a fresh durable consumer of `<prefix>.<unique>.>`, deleted afterwards."""
    config = ConsumerConfig(
        durable_name=unique,
        filter_subject=bus.subject_for(f"{unique}.>"),
        ack_policy=AckPolicy.EXPLICIT,
    )
    await bus.js.add_consumer(bus.config.stream, config)
    puller = Puller(bus.nc, bus.config.stream, unique)
    await puller.open()
    yield puller
    await puller.close()
    await bus.js.delete_consumer(bus.config.stream, unique)


async def test_fetch_returns_the_first_message_without_waiting_for_a_full_batch(
    bus: EventBus, puller: Puller, unique: str
) -> None:
    async def publish_later() -> None:
        await asyncio.sleep(0.1)
        await bus.publish_raw(bus.subject_for(f"{unique}.a"), b"one")

    started = time.monotonic()
    later = asyncio.create_task(publish_later())
    msgs = await puller.fetch(100, 5.0)
    await later
    assert [m.data for m in msgs] == [b"one"]
    assert time.monotonic() - started < 1.0
    await msgs[0].ack()


async def test_fetch_returns_what_is_there_at_once(
    bus: EventBus, puller: Puller, unique: str
) -> None:
    for i in range(3):
        await bus.publish_raw(bus.subject_for(f"{unique}.a"), str(i).encode())
    started = time.monotonic()
    msgs = await puller.fetch(2, 5.0)
    msgs += await puller.fetch(100, 5.0)
    assert [m.data for m in msgs] == [b"0", b"1", b"2"]
    assert time.monotonic() - started < 1.0
    for m in msgs:
        await m.ack()


async def test_fetch_returns_nothing_when_nothing_comes_in_time(puller: Puller) -> None:
    started = time.monotonic()
    assert await puller.fetch(10, 0.2) == []
    assert time.monotonic() - started < 1.0


async def test_fetch_from_a_deleted_consumer_fails(bus: EventBus, unique: str) -> None:
    puller = Puller(bus.nc, bus.config.stream, f"{unique}-gone")
    await puller.open()
    try:
        with pytest.raises(PullError):
            await puller.fetch(10, 0.2)
    finally:
        await puller.close()
