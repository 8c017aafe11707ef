"""Closing the bus is bounded: a NATS server that is connected but does not answer (a frozen
node, a half-open network path) held a service's shutdown for 20 s, past its grace period, so
the launcher or Kubernetes killed it mid-shutdown."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

from gpudeck.kit.config import EventsConfig
from gpudeck.kit.events import EventBus


class FreezingProxy:
    """A TCP proxy to NATS that can stop passing bytes while keeping its connections open."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.frozen = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                if self.frozen.is_set():
                    await asyncio.Event().wait()  # swallow it, answer nothing, never close
                dst.write(data)
                await dst.drain()

        await asyncio.gather(
            pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True
        )

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()


async def test_closing_a_bus_whose_server_went_silent_is_bounded(
    events_config: EventsConfig,
) -> None:
    target = urlsplit(events_config.nats_url)
    proxy = FreezingProxy(target.hostname or "127.0.0.1", target.port or 4222)
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
