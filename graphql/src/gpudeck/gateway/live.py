"""Live events for subscriptions: the gateway's one NATS connection, fanned out in memory.

The wallet announces `wallet.balance.changed` (at most once a second per organization) on the
subject `<prefix>.wallet.balance.changed`. A core NATS subscription receives it (live views need
no JetStream); each subscription of the organization is woken (`Watch.wait`), and re-reads
what it shows. Wakes coalesce: a subscriber that is busy when two events come wakes once. The
subscribers woken by one event share one read of what they show (`shared_read`): a thousand of
them cost the wallet one call, not a thousand.

NATS being down is a normal state: `start()` returns at once and connects in the background,
reconnecting forever; after a reconnection every watcher is woken (events may have been missed),
and `connected` tells watchers to fall back to polling meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable, Hashable, Iterator
from typing import Any, TypeVar

from nats.aio.msg import Msg

from gpudeck.kit.config import EventsConfig
from gpudeck.kit.events import EventBus, InvalidEvent, parse_event

log = logging.getLogger(__name__)

BALANCE_CHANGED = "wallet.balance.changed"
T = TypeVar("T")


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
    """The gateway's NATS connection (the kit's EventBus) and the watchers of each organization.

    `await start()`, `watching(org)` per subscription, `await close()` at shutdown. Live views
    need no JetStream consumer: a plain subscription on the subject receives what the stream
    stores.
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
        self.reconnect_wait = reconnect_wait
        self.bus = EventBus(
            config,
            client_name=client_name,
            connect_timeout=connect_timeout,
            reconnect_wait=reconnect_wait,
        )
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._watchers: dict[str, set[Watch]] = {}
        # Wakes so far, of all organizations; and of each watched one, the number of its last
        # wake (or of its first watcher), drawn from one sequence so it never repeats, even for
        # an organization watched again: a read keyed by them began after them.
        self._wakes_of_all = 0
        self._wakes: dict[str, int] = {}  # only of organizations watched now
        self._sequence = itertools.count(1)
        self._reads: dict[Hashable, asyncio.Future[Any]] = {}

    @property
    def subject(self) -> str:
        return self.bus.subject_for(BALANCE_CHANGED)

    @property
    def connected(self) -> bool:
        return self._subscribed.is_set() and self.bus.connected

    async def start(self, *, wait: float = 0.0) -> None:
        """Start connecting in the background; wait up to `wait` seconds for the subscription."""
        if self._task is not None:
            raise RuntimeError("LiveEvents.start() was already called")
        await self.bus.start(wait=0)
        self._task = asyncio.create_task(self._listen())
        if wait > 0:
            await self.wait_connected(wait)

    async def wait_connected(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), seconds)
        return self.connected

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._subscribed.clear()
        try:
            await self.bus.close()
        except Exception as exc:  # closing must not fail a shutdown
            log.debug("closing NATS failed", extra={"error": repr(exc)})
        self._wake()

    @contextlib.contextmanager
    def watching(self, organization_id: str) -> Iterator[Watch]:
        """A Watch woken on every change of `organization_id`'s wallet, while in the block."""
        watch = Watch(organization_id)
        if organization_id not in self._watchers:
            self._wakes[organization_id] = next(self._sequence)
        self._watchers.setdefault(organization_id, set()).add(watch)
        try:
            yield watch
        finally:
            watches = self._watchers.get(organization_id)
            if watches is not None:
                watches.discard(watch)
                if not watches:
                    del self._watchers[organization_id]
                    self._wakes.pop(organization_id, None)

    @property
    def watchers(self) -> int:
        return sum(len(w) for w in self._watchers.values())

    def wake(self, organization_id: str) -> None:
        """Wake `organization_id`'s watchers now, as an event would (e.g. one of its tokens was
        just revoked here: their subscriptions check their tokens again at once)."""
        self._wake(organization_id)

    def generation(self, organization_id: str) -> tuple[int, int]:
        """How many wakes `organization_id`'s watchers have had: a key for reads begun since."""
        return self._wakes_of_all, self._wakes.get(organization_id, 0)

    async def shared_read(self, key: Hashable, read: Callable[[], Awaitable[T]]) -> T:
        """`read()`'s result, shared by every caller with `key` while it runs (its error too).
        Key it with `generation(org)` taken after the wake: a read begun before it is not
        shared with whoever it woke. A caller cancelled does not cancel it for the others."""
        running = self._reads.get(key)
        if running is None:
            running = asyncio.ensure_future(read())
            self._reads[key] = running
            running.add_done_callback(lambda done: self._read_done(key, done))
        return await asyncio.shield(running)  # type: ignore[no-any-return]

    def _read_done(self, key: Hashable, done: asyncio.Future[Any]) -> None:
        if self._reads.get(key) is done:
            del self._reads[key]
        if not done.cancelled():
            done.exception()  # retrieved here too: every caller may have gone

    def _wake(self, organization_id: str | None = None) -> None:
        if organization_id is None:
            self._wakes_of_all += 1
        elif organization_id in self._watchers:  # counted for those watched only
            self._wakes[organization_id] = next(self._sequence)
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

    async def _listen(self) -> None:
        """Subscribe once connected; after every reconnection wake the watchers, since events
        may have been missed meanwhile (they re-read, then wait again)."""
        while True:
            await self.bus.wait_connected(None)
            try:
                await self.bus.nc.subscribe(self.subject, cb=self._on_message)
                break
            except Exception as exc:  # say so, and try again: else views poll for good
                log.warning(
                    "cannot subscribe to live events; trying again", extra={"error": repr(exc)}
                )
                await asyncio.sleep(self.reconnect_wait)
        self._subscribed.set()
        log.info("listening for live events", extra={"subject": self.subject})
        self._wake()
        generation = self.bus.generation
        while True:
            await asyncio.sleep(self.reconnect_wait)
            if self.bus.generation != generation:
                generation = self.bus.generation
                self._wake()
