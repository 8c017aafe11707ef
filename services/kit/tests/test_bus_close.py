"""Closing the bus is bounded: a NATS server that is connected but does not answer (a frozen
node, a half-open network path) held a service's shutdown for 20 s, past its grace period, so
the launcher or Kubernetes killed it mid-shutdown."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from gpudeck.kit.config import EventsConfig
from gpudeck.kit.events import EventBus

if TYPE_CHECKING:
    from conftest import FreezingProxy


async def test_closing_a_bus_whose_server_went_silent_is_bounded(
    events_config: EventsConfig, freezing_proxy: type[FreezingProxy]
) -> None:
    target = urlsplit(events_config.nats_url)
    proxy = freezing_proxy(target.hostname or "127.0.0.1", target.port or 4222)
    port = await proxy.start()
    config = EventsConfig(
        nats_url=f"nats://127.0.0.1:{port}",
        stream=events_config.stream,
        subject_prefix=events_config.subject_prefix,
    )
    bus = EventBus(config, client_name="kit-tests-frozen")
    await bus.start()
    assert bus.connected
    proxy.frozen.set()
    started = time.monotonic()
    await bus.close(timeout=1.0)
    took = time.monotonic() - started
    assert took < 5, f"close took {took:.1f} s"  # it took 20 s: nats-py's drain timeout, twice
    await proxy.stop()
