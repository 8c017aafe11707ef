"""Live events for subscriptions: the gateway's one NATS connection, fanned out in memory.

The wallet announces `wallet.balance.changed` (at most once a second per organization) on the
subject `<prefix>.wallet.balance.changed`. A core NATS subscription receives it (live views need
no JetStream); each subscription of the organization is woken (`Watch.wait`), and re-reads
what it shows. Wakes coalesce: a subscriber that is busy when two events come wakes once.

NATS being down is a normal state: `start()` returns at once and connects in the background,
reconnecting forever; after a reconnection every watcher is woken (events may have been missed),
and `connected` tells watchers to fall back to polling meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from gpudeck.kit.config import EventsConfig
from gpudeck.kit.events import InvalidEvent, parse_event

log = logging.getLogger(__name__)

BALANCE_CHANGED = "wallet.balance.changed"


class Watch:
    """One subscriber's wake-up flag for one organization."""

    def __init__(self, organization_id: str) -> None:
        self.organization_id = organization_id
        self._woken = asyncio.Event()

    def wake(self) -> None:
        self._woken.set()

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait for a wake (at most `timeout` seconds); True if woken. Clears the flag."""
        try:
            await asyncio.wait_for(self._woken.wait(), timeout)
        except TimeoutError:
            return False
        self._woken.clear()
        return True


class LiveEvents:
    """The NATS connection and the watchers of each organization.

    `await start()`, `watching(org)` per subscription, `await close()` at shutdown.
    """

    def __init__(
        self,
        config: EventsConfig,
        *,
        client_name: str = "gateway",
        connect_timeout: float = 2.0,
        reconnect_wait: float = 1.0,
    ) -> None:
        self.config = config
        self.client_name = client_name
        self.connect_timeout = connect_timeout
        self.reconnect_wait = reconnect_wait
        self._nc: NATS | None = None
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._watchers: dict[str, set[Watch]] = {}
        self._closing = False

    @property
    def subject(self) -> str:
        return f"{self.config.subject_prefix}.{BALANCE_CHANGED}"

    @property
    def connected(self) -> bool:
        return self._subscribed.is_set() and self._nc is not None and self._nc.is_connected

    async def start(self, *, wait: float = 0.0) -> None:
        """Start connecting in the background; wait up to `wait` seconds for the subscription."""
        if self._task is not None:
            raise RuntimeError("LiveEvents.start() was already called")
        self._task = asyncio.create_task(self._connect())
        if wait > 0:
            await self.wait_connected(wait)

    async def wait_connected(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), seconds)
        return self.connected

    async def close(self) -> None:
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._subscribed.clear()
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            try:
                await nc.close()
            except Exception as exc:  # closing must not fail a shutdown
                log.debug("closing NATS failed", extra={"error": repr(exc)})
        for watches in self._watchers.values():
            for watch in watches:
                watch.wake()

    @contextlib.contextmanager
    def watching(self, organization_id: str) -> Iterator[Watch]:
        """A Watch woken on every change of `organization_id`'s wallet, while in the block."""
        watch = Watch(organization_id)
        self._watchers.setdefault(organization_id, set()).add(watch)
        try:
            yield watch
        finally:
            watches = self._watchers.get(organization_id)
            if watches is not None:
                watches.discard(watch)
                if not watches:
                    del self._watchers[organization_id]

    @property
    def watchers(self) -> int:
        return sum(len(w) for w in self._watchers.values())

    def _wake(self, organization_id: str | None = None) -> None:
        groups = (
            self._watchers.values()
            if organization_id is None
            else [self._watchers.get(organization_id, set())]
        )
        for watches in groups:
            for watch in watches:
                watch.wake()

    async def _on_message(self, msg: Msg) -> None:
        try:
            event = parse_event(msg.data)
        except InvalidEvent as exc:
            log.warning("ignoring a message that is not an event", extra={"error": str(exc)})
            return
        if event.type == BALANCE_CHANGED and event.organization_id:
            self._wake(event.organization_id)

    async def _connect(self) -> None:
        # nats-py either raises on a first connect with no server or retries it itself,
        # depending on its version: loop around it for the first case.
        while self._nc is None:
            try:
                self._nc = await nats.connect(
                    self.config.nats_url.split(","),
                    name=self.client_name,
                    connect_timeout=self.connect_timeout,
                    reconnect_time_wait=self.reconnect_wait,
                    max_reconnect_attempts=-1,
                    allow_reconnect=True,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                )
            except Exception as exc:
                await self._on_error(exc)
                await asyncio.sleep(self.reconnect_wait)
        await self._nc.subscribe(self.subject, cb=self._on_message)
        self._subscribed.set()
        log.info("listening for live events", extra={"subject": self.subject})
        self._wake()

    async def _on_error(self, exc: Exception) -> None:
        log.debug("NATS error", extra={"error": repr(exc)})

    async def _on_disconnected(self) -> None:
        if self._closing:
            return
        log.warning("NATS disconnected; live views poll until it is back")

    async def _on_reconnected(self) -> None:
        log.info("NATS reconnected")
        self._wake()  # events may have been missed meanwhile
