"""Shutdown stops a service's workers together, within one grace period."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gpudeck.kit.runtime import stop_workers


class Worker:
    def __init__(self, name: str, stopping: asyncio.Barrier | None = None) -> None:
        self.name = name
        self.stopping = stopping
        self.stopped = False

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        if self.stopping is None:
            await asyncio.Event().wait()  # never stops by itself
        else:
            await self.stopping.wait()
        self.stopped = True


async def test_workers_stop_together() -> None:
    """Each stop waits for the others to be stopping too: one after another, the first would
    wait out the grace period (and each next one its own)."""
    barrier = asyncio.Barrier(3)
    workers = [Worker(f"w{i}", barrier) for i in range(3)]
    await stop_workers(workers, grace=30)
    assert all(w.stopped for w in workers)


async def test_a_worker_still_running_after_the_grace_period_is_cancelled_and_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    barrier = asyncio.Barrier(2)
    stuck, quick = Worker("stuck"), [Worker("a", barrier), Worker("b", barrier)]
    with caplog.at_level(logging.WARNING, logger="gpudeck.kit.runtime"):
        await stop_workers([stuck, *quick], grace=0.2)
    assert all(w.stopped for w in quick) and not stuck.stopped
    late = [r for r in caplog.records if "grace period" in r.getMessage()]
    assert [getattr(r, "worker", None) for r in late] == ["stuck"]
