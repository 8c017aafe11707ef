"""JetStream publishes with many acknowledgements in flight: one reply inbox, a future per message.

Like nats-py's `publish_async`, without its flaw: when the publish itself fails (connection
closed, reconnect buffer full) nats-py keeps the message's future and its slot among the 4,000
pending publishes forever, so that repeated NATS outages would end up blocking publishing. Here
every future is forgotten when its publish fails or its caller stops waiting.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import PubAck
from nats.js.errors import APIError, NoStreamResponseError

_NO_RESPONDERS = "503"


class Acks:
    """Publishes to JetStream on `nc` and hands back a future for each acknowledgement."""

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox()
        self._sub: Subscription | None = None
        self._next = 0
        self._waiting: dict[str, asyncio.Future[PubAck]] = {}

    async def publish(
        self, subject: str, data: bytes, headers: dict[str, Any]
    ) -> asyncio.Future[PubAck]:
        """Publish; the future holds the PubAck, or the error JetStream answered with."""
        if self._sub is None:
            self._sub = await self._nc.subscribe(f"{self._prefix}.*", cb=self._reply)
        self._next += 1
        token = str(self._next)
        future: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        self._waiting[token] = future
        try:
            await self._nc.publish(subject, data, f"{self._prefix}.{token}", headers)
        except BaseException:
            del self._waiting[token]
            raise
        return future

    def forget(self, futures: Iterable[asyncio.Future[PubAck]]) -> None:
        """Stop waiting for these acknowledgements (cancelling those not yet in)."""
        gone = {id(f) for f in futures}
        for token, future in list(self._waiting.items()):
            if id(future) in gone:
                del self._waiting[token]
                future.cancel()

    async def _reply(self, msg: Msg) -> None:
        future = self._waiting.pop(msg.subject.rpartition(".")[2], None)
        if future is None or future.done():
            return
        if msg.headers and msg.headers.get("Status") == _NO_RESPONDERS:
            future.set_exception(NoStreamResponseError())
            return
        try:
            response = json.loads(msg.data)
            if "error" in response:
                future.set_exception(APIError.from_error(response["error"]))
            else:
                future.set_result(PubAck.from_response(response))
        except Exception as exc:
            future.set_exception(exc)
