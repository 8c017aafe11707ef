"""A background loop that runs a coroutine every few seconds until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class Periodic:
    """Runs `step()` every `interval` seconds (measured from the end of the last run).

    A failing step is logged and retried at the next interval; `stop()` lets a running step
    finish, then returns.
    """

    def __init__(self, name: str, interval: float, step: Callable[[], Awaitable[object]]) -> None:
        self.name = name
        self.interval = interval
        self.step = step
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.step()
            except Exception:
                log.exception("%s failed; retrying in %.1f s", self.name, self.interval)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval)
