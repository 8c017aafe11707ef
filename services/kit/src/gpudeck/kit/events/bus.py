"""The NATS connection of a service and the JetStream stream all events go through.

NATS being down is a normal state: `EventBus.start()` returns even when no server answers and
keeps connecting in the background; once connected, the client reconnects forever. After each
(re)connection the stream is ensured again (a new server may have lost it) and `generation`
increases, which tells pull consumers to recreate their subscriptions (nats.py issue 504).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import PubAck, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from gpudeck.kit.config import EventsConfig, nats_servers, redact_url
from gpudeck.kit.events.acks import Acks
from gpudeck.kit.events.envelope import check_type
from gpudeck.proto.events.v1.envelope_pb2 import Event

log = logging.getLogger(__name__)

# Long enough to cover a relay retrying a batch after a lost acknowledgement.
DUPLICATE_WINDOW = 120.0
CLOSE_TIMEOUT = 2.0  # seconds to flush and close at shutdown
MSG_ID = "Nats-Msg-Id"  # JetStream drops a message whose id it saw within the duplicate window


class BusNotConnected(Exception):
    """NATS is not reachable right now; what needed it can be retried later."""


class Outgoing(NamedTuple):
    """One message to publish: its subject, its bytes and its de-duplication id."""

    subject: str
    data: bytes
    msg_id: str


class EventBus:
    """A service's NATS client and the JetStream stream `config.stream` (`<prefix>.>` subjects).

    Use `await start()` then `await close()`; `connected` says whether publishing can work now.
    """

    def __init__(
        self,
        config: EventsConfig,
        *,
        client_name: str,
        connect_timeout: float = 2.0,
        reconnect_wait: float = 1.0,
        duplicate_window: float = DUPLICATE_WINDOW,
        max_age: float | None = None,
    ) -> None:
        self.config = config
        self.client_name = client_name
        self.connect_timeout = connect_timeout
        self.reconnect_wait = reconnect_wait
        self.duplicate_window = duplicate_window
        self.max_age = max_age
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._ready = asyncio.Event()
        self._generation = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._failures = 0
        self._acks: Acks | None = None

    @property
    def connected(self) -> bool:
        """Whether NATS is connected and the stream is known to exist."""
        return self._ready.is_set() and self._nc is not None and self._nc.is_connected

    @property
    def generation(self) -> int:
        """How many times the bus became ready; a change means subscriptions must be recreated."""
        return self._generation

    @property
    def nc(self) -> NATS:
        """The NATS client; `BusNotConnected` before the first connection."""
        if self._nc is None:
            raise BusNotConnected(f"NATS at {redact_url(self.config.nats_url)} was never reached")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        """The JetStream context; `BusNotConnected` before the first connection."""
        if self._js is None:
            raise BusNotConnected(f"NATS at {redact_url(self.config.nats_url)} was never reached")
        return self._js

    def subject_for(self, event_type: str) -> str:
        """The subject events of `event_type` are published on: `<prefix>.<event_type>`."""
        return f"{self.config.subject_prefix}.{event_type}"

    async def start(self, *, wait: float | None = None) -> None:
        """Connect and ensure the stream, waiting up to `wait` seconds (default: connect_timeout).

        Never fails because NATS is unreachable: connecting goes on in the background.
        """
        if self._tasks or self._nc is not None:
            raise RuntimeError("EventBus.start() was already called")
        self._spawn(self._connect())
        seconds = self.connect_timeout if wait is None else wait
        if seconds > 0 and not await self.wait_connected(seconds):
            log.warning(
                "NATS not reachable yet; connecting in the background",
                extra={"nats_url": redact_url(self.config.nats_url)},
            )

    async def wait_connected(self, seconds: float | None = None) -> bool:
        """Wait until the bus is connected (at most `seconds`); return whether it is."""
        if self.connected:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), seconds)
        return self.connected

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Stop connecting, flush what was published and close the connection, giving up after
        `timeout` seconds (a server that is connected but does not answer held a shutdown for
        20 s, past the grace it has: what was not acknowledged is still in the outbox)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._ready.clear()
        nc, self._nc, self._js, self._acks = self._nc, None, None, None
        if nc is None or nc.is_closed:
            return
        # Not wait_for: it waits for the cancelled call to end, and nats-py's drain, cancelled,
        # goes on closing (with a flush of its own that waits 10 s for an answer).
        closing = asyncio.ensure_future(nc.drain() if nc.is_connected else nc.close())
        done, _ = await asyncio.wait({closing}, timeout=timeout)
        if not done:
            # Cancelled, drain goes on to flush (a PING that waits 10 s for its PONG): cancel
            # that too. The socket goes with the process, which is on its way out.
            for _ in range(3):
                closing.cancel()
                done, _ = await asyncio.wait({closing}, timeout=0.2)
                if done:
                    break
            log.warning("NATS did not answer in time: closed without flushing")
        elif closing.exception() is not None:  # closing must not fail a shutdown
            log.warning("closing NATS failed", extra={"error": repr(closing.exception())})

    async def ensure_stream(self) -> None:
        """Create the stream, or widen an existing one to our subjects and duplicate window."""
        js = self.js
        subjects = [f"{self.config.subject_prefix}.>"]
        try:
            info = await js.stream_info(self.config.stream)
        except NotFoundError:
            await js.add_stream(
                StreamConfig(
                    name=self.config.stream,
                    subjects=subjects,
                    storage=StorageType.FILE,
                    duplicate_window=self.duplicate_window,
                    max_age=self.max_age,
                )
            )
            log.info("stream created", extra={"stream": self.config.stream})
            return
        current = info.config
        missing = [s for s in subjects if s not in (current.subjects or [])]
        if missing or (current.duplicate_window or 0) < self.duplicate_window:
            await js.update_stream(
                current.evolve(
                    subjects=[*(current.subjects or []), *missing],
                    duplicate_window=max(current.duplicate_window or 0, self.duplicate_window),
                )
            )
            log.info("stream updated", extra={"stream": self.config.stream})

    async def publish(self, event: Event, *, ack_timeout: float = 5.0) -> PubAck:
        """Publish `event` directly (no outbox), with its id as `Nats-Msg-Id`."""
        subject = self.subject_for(check_type(event.type))
        data = event.SerializeToString()
        return await self.publish_raw(subject, data, event.id, ack_timeout=ack_timeout)

    async def publish_raw(
        self, subject: str, data: bytes, msg_id: str | None = None, *, ack_timeout: float = 5.0
    ) -> PubAck:
        """Publish bytes to JetStream and wait for its acknowledgement."""
        headers = {MSG_ID: msg_id} if msg_id else None
        return await self.js.publish(subject, data, timeout=ack_timeout, headers=headers)

    async def publish_many(
        self, messages: Sequence[Outgoing], *, ack_timeout: float = 5.0
    ) -> list[PubAck | BaseException]:
        """Publish `messages` in order without waiting between them, then wait for all the acks.

        Returns, for each message, its acknowledgement or the error that stopped it (a
        `TimeoutError` when no ack came within `ack_timeout` seconds).
        """
        if self._acks is None:
            self._acks = Acks(self.nc)
        acks = self._acks
        futures: list[asyncio.Future[PubAck]] = []
        failure: BaseException | None = None
        try:
            for message in messages:
                headers = {MSG_ID: message.msg_id}
                futures.append(await acks.publish(message.subject, message.data, headers))
        except Exception as exc:  # disconnected mid-batch: the rest fails the same way
            failure = exc
        results: list[PubAck | BaseException] = []
        try:
            if futures:
                await asyncio.wait(futures, timeout=ack_timeout)
        finally:
            acks.forget(f for f in futures if not f.done())
            for future in futures:
                if future.cancelled():
                    results.append(TimeoutError(f"no JetStream ack within {ack_timeout}s"))
                elif (error := future.exception()) is not None:
                    results.append(error)
                else:
                    results.append(future.result())
        if failure is not None:
            results.extend([failure] * (len(messages) - len(futures)))
        return results

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self) -> None:
        # nats-py either raises on a first connect with no server or retries it itself,
        # depending on its version: loop around it for the first case.
        while self._nc is None:
            try:
                self._nc = await nats.connect(
                    nats_servers(self.config.nats_url),
                    name=self.client_name,
                    connect_timeout=self.connect_timeout,
                    reconnect_time_wait=self.reconnect_wait,
                    max_reconnect_attempts=-1,
                    allow_reconnect=True,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    closed_cb=self._on_disconnected,
                )
            except Exception as exc:
                await self._on_error(exc)
                await asyncio.sleep(self.reconnect_wait)
        self._js = self._nc.jetstream()
        await self._become_ready()

    async def _become_ready(self) -> None:
        """Ensure the stream (retrying while connected), then announce a new generation."""
        while self._nc is not None and self._nc.is_connected:
            try:
                await self.ensure_stream()
            except Exception as exc:
                # Say why (a BadRequestError() alone did not: e.g. "subjects overlap with an
                # existing stream") and which: events wait in the outbox until it is fixed.
                log.error(
                    "cannot ensure the stream",
                    extra={
                        "error": repr(exc),
                        "reason": getattr(exc, "description", None) or str(exc),
                        "stream": self.config.stream,
                        "subjects": f"{self.config.subject_prefix}.>",
                    },
                )
                await asyncio.sleep(self.reconnect_wait)
                continue
            self._failures = 0
            self._generation += 1
            self._ready.set()
            log.info("NATS connected", extra={"nats_url": redact_url(self.config.nats_url)})
            return

    async def _on_error(self, exc: Exception) -> None:
        # While NATS is down every attempt fails the same way: say so once, then quietly.
        self._failures += 1
        level = logging.WARNING if self._failures == 1 else logging.DEBUG
        log.log(
            level,
            "NATS error",
            extra={"error": repr(exc), "nats_url": redact_url(self.config.nats_url)},
        )

    async def _on_disconnected(self) -> None:
        if self._ready.is_set():
            log.warning("NATS disconnected", extra={"nats_url": redact_url(self.config.nats_url)})
        self._ready.clear()

    async def _on_reconnected(self) -> None:
        # Called from inside the client's reconnect loop: do the JetStream calls elsewhere.
        self._spawn(self._become_ready())
