"""Pull requests to a durable JetStream consumer that never linger once messages are there.

`Puller.fetch(batch, expires)` sends one pull request with `no_wait` and `expires` to the inbox
of its own subscription: the server answers with the messages there are, or, when there are
none, with the first ones to arrive, and closes the request with a 408 status (at the latest when
`expires` runs out). Both NATS 2.9 and 2.15 behave so.

Why not nats-py's `PullSubscription.fetch`: whenever the first reply to its `no_wait` request is
a status, for instance "408 Requests Pending", which the server sends when another pull request
of the consumer is still waiting, it asks again with a lingering request that only returns once
`batch` messages have arrived, or at its timeout: deliveries then stall for up to that timeout.
It also awaits one task per message; a subscription callback here costs far less.
"""

from __future__ import annotations

import asyncio
import json

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import DEFAULT_PREFIX

# How long to wait past `expires` for the server's closing status before calling it silent.
_GRACE = 1.0
# A pause after "408 Requests Pending", so that a retry does not spin while the server forgets
# a request of ours it has just closed.
_PENDING_PAUSE = 0.005


class PullError(Exception):
    """The server refused a pull request (consumer deleted, no JetStream…) or never answered."""


class Puller:
    """Fetches from the pull consumer `consumer` of `stream`; `await open()`, `await close()`."""

    def __init__(self, nc: NATS, stream: str, consumer: str, *, prefix: str = DEFAULT_PREFIX):
        self._nc = nc
        self._subject = f"{prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = nc.new_inbox()
        self._sub: Subscription | None = None
        self._want = 0
        self._got: list[Msg] = []
        self._done: asyncio.Future[tuple[str, str]] | None = None
        self._late: list[Msg] = []  # arrived when no fetch was waiting: the next one takes them

    async def open(self) -> None:
        self._sub = await self._nc.subscribe(self._inbox, cb=self._receive)

    async def close(self) -> list[Msg]:
        """Unsubscribe; return the messages received that no fetch returned (to `nak` them)."""
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await sub.unsubscribe()
        late, self._late = self._late, []
        return late

    async def fetch(self, batch: int, expires: float) -> list[Msg]:
        """Up to `batch` messages: those there now, else the first to come within `expires` s.

        [] when none came. `PullError` when the server refused or did not answer at all (a
        broken subscription or connection: recreate it).
        """
        if self._late:
            msgs, self._late = self._late[:batch], self._late[batch:]
            return msgs
        done: asyncio.Future[tuple[str, str]] = asyncio.get_running_loop().create_future()
        self._want, self._got, self._done = batch, [], done
        request = {"batch": batch, "expires": int(expires * 1e9), "no_wait": True}
        try:
            await self._nc.publish(self._subject, json.dumps(request).encode(), self._inbox)
            await asyncio.wait({done}, timeout=expires + _GRACE)
        finally:
            msgs, self._got, self._done = self._got, [], None
        if not done.done():
            done.cancel()
            if msgs:
                return msgs
            raise PullError(f"no answer to a pull request on {self._subject}")
        status, description = done.result()
        if status in ("", "404", "408"):
            if not msgs and description == "Requests Pending":
                await asyncio.sleep(_PENDING_PAUSE)
            return msgs
        if msgs:
            return msgs
        raise PullError(f"pull request on {self._subject}: {status} {description}".strip())

    async def _receive(self, msg: Msg) -> None:
        headers = msg.headers or {}
        status = headers.get("Status", "")
        if status == "100":  # idle heartbeat or flow control: not asked for, nothing to do
            return
        done = self._done
        if done is None or done.done():
            if not status:
                self._late.append(msg)
            return  # a status closing a request we no longer wait for
        if status:
            done.set_result((status, headers.get("Description", "")))
            return
        self._got.append(msg)
        if len(self._got) >= self._want:
            done.set_result(("", ""))
