"""Group commit of single transfers: concurrent Transfer calls share one database transaction.

A lone call takes the one-statement fast path (`post_one`), so an idle wallet answers as fast as
before. When calls arrive while earlier ones are being written, they queue; the next writer takes
every queued call (up to `max_group`) and posts them together (`post_independent`): the common
ones in one statement that is its own transaction (one round trip, one commit for all of them,
which is where a single transfer's cost was), the others in one transaction after it.
Each call still gets its own answer or its own refusal; a retry with the same key is still a
replay, in the same group or another. At most `writers` groups are written at once.

If writing a group fails as a whole (not a refusal of one transfer: say a unique key that a
concurrent group took first), each of its transfers is posted alone, so one cannot sink the rest.
Writers run as their own tasks: a caller giving up (deadline) never cancels a group half-way.
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import TYPE_CHECKING, Any

from prometheus_client import Histogram
from psycopg_pool import AsyncConnectionPool

from gpudeck.wallet.ledger import Transaction, TransferRequest

if TYPE_CHECKING:
    from gpudeck.wallet.ledger_store import LedgerStore

Waiter = tuple[TransferRequest, "asyncio.Future[Transaction]"]
GROUP_SIZE = Histogram(
    "gpudeck_wallet_transfer_group_size",
    "Single transfers posted together in one transaction (group commit).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)


class GroupCommit:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        ledger: LedgerStore,
        *,
        max_group: int = 500,
        writers: int = 2,
    ) -> None:
        self.pool = pool
        self.ledger = ledger
        self.max_group = max_group
        self.writers = writers
        self._queue: list[Waiter] = []
        self._running: set[asyncio.Task[None]] = set()  # strong references to the writers
        self._writing = 0  # writers whose loop has not ended (a task lingers a bit after that)
        self.largest_group = 0  # the most transfers one transaction took so far

    async def post(self, request: TransferRequest) -> Transaction:
        """Post one transfer; its transaction, or the refusal raised."""
        future: asyncio.Future[Transaction] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)  # a caller that gave up leaves no warning behind
        self._queue.append((request, future))
        if self._writing < self.writers:
            self._writing += 1
            # In a context of its own: the writer posts every caller's transfers, so it must
            # not carry the first caller's (its actor, for one, would name the others' facts).
            task = asyncio.create_task(self._write(), context=contextvars.Context())
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        return await asyncio.shield(future)

    async def _write(self) -> None:
        try:
            await self._write_queued()
        finally:
            # Counted off in the same step as the last look at the queue: a call queued after
            # it starts a writer of its own.
            self._writing -= 1

    async def _write_queued(self) -> None:
        while self._queue:
            group, self._queue = self._queue[: self.max_group], self._queue[self.max_group :]
            try:
                if len(group) == 1:
                    GROUP_SIZE.observe(1)
                    await self._post_alone(*group[0])
                else:
                    await self._post_group(group)
            except BaseException as exc:  # pragma: no cover - a bug; answer, don't hang
                for _, future in group:
                    if not future.done():
                        future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise

    async def _post_alone(self, request: TransferRequest, future: asyncio.Future[Any]) -> None:
        try:
            async with self.pool.connection() as conn:
                result = await self.ledger.post_one(conn, request)
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
        else:
            if not future.done():
                future.set_result(result)

    async def _post_group(self, group: list[Waiter]) -> None:
        try:
            async with self.pool.connection() as conn:
                outcomes = await self.ledger.post_independent(conn, [r for r, _ in group])
        except Exception:
            for request, future in group:
                await self._post_alone(request, future)
            return
        GROUP_SIZE.observe(len(group))
        self.largest_group = max(self.largest_group, len(group))
        for (_, future), outcome in zip(group, outcomes, strict=True):
            if future.done():
                continue
            if outcome.error is not None:
                future.set_exception(outcome.error)
            else:
                assert outcome.transaction is not None
                future.set_result(outcome.transaction)


def _retrieve(future: asyncio.Future[Transaction]) -> None:
    if not future.cancelled():
        future.exception()
