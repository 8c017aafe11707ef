"""The live wallet view's own logic, with the wallet's answers and the socket faked (the real
ones are in test_wallet_live.py): a read that failed is tried again at the next check, the
subscribers one event wakes share one read, and shutdown cuts a websocket that does not close."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from types import SimpleNamespace
from typing import Any

import grpc
import nats
import pytest

from gpudeck.gateway import view
from gpudeck.gateway.live import LiveEvents
from gpudeck.gateway.types import wallet as wallet_types
from gpudeck.kit.config import EventsConfig
from gpudeck.proto.common.v1.money_pb2 import Money
from gpudeck.proto.wallet.v1 import wallet_pb2

ORG = "0193a4c2-0000-7000-8000-000000000001"


class ConnectedLive(LiveEvents):
    """Live events as when NATS is up (wakes come from `_wake`, as a message would)."""

    @property
    def connected(self) -> bool:
        return True


def unavailable() -> grpc.aio.AioRpcError:
    metadata = grpc.aio.Metadata()
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, metadata, metadata, "down")


class Wallet:
    """The wallet's summaries as a subscription reads them: `balance`, or a failure queued."""

    def __init__(self, shown_in: str = "USD") -> None:
        self.balance = 0
        self.reads = 0
        self.failures = 0
        self.shown_in = shown_in  # the display currency (the wallet's is USD)

    async def load(self, key: Any) -> wallet_pb2.WalletSummary:
        self.reads += 1
        await asyncio.sleep(0.01)  # reads overlap, as real ones do
        if self.failures:
            self.failures -= 1
            raise unavailable()
        return wallet_pb2.WalletSummary(
            organization_id=ORG, currency=self.shown_in, wallet_currency="USD",
            balance=Money(amount=self.balance, currency=self.shown_in),
        )  # fmt: skip


def subscription(live: LiveEvents, wallet: Wallet) -> AsyncGenerator[Any, None]:
    async def identity() -> object:
        return object()

    context = SimpleNamespace(
        live=live,
        fresh_loaders=lambda: SimpleNamespace(summary=wallet),
        reauthenticate=identity,
    )
    return wallet_types.wallet_updates(SimpleNamespace(context=context), ORG, "")  # type: ignore[arg-type]


@pytest.fixture
def live() -> LiveEvents:
    return ConnectedLive(EventsConfig("nats://127.0.0.1:1"))


async def test_a_read_that_failed_after_a_change_is_tried_again_at_the_next_check(
    live: LiveEvents, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wallet_types, "RECHECK_SECONDS", 0.05)
    wallet = Wallet()
    updates = subscription(live, wallet)
    assert (await anext(updates)).balance.amount == "0.000000"
    wallet.balance, wallet.failures = 7_000_000, 1
    live._wake(ORG)  # the change is announced; its read fails; no other event comes
    pushed = await asyncio.wait_for(anext(updates), timeout=5)
    assert pushed.balance.amount == "7.000000"
    await updates.aclose()


async def test_a_converted_summary_follows_the_rate_with_no_event(
    live: LiveEvents, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new exchange rate changes what an INR card of a USD wallet shows, and no event says so:
    such a subscription reads again at each check."""
    monkeypatch.setattr(wallet_types, "RECHECK_SECONDS", 0.05)
    wallet = Wallet(shown_in="INR")
    updates = subscription(live, wallet)
    assert (await anext(updates)).balance.amount == "0.000000"
    wallet.balance = 90_000_000  # the same dollars at a new rate; nothing announced
    pushed = await asyncio.wait_for(anext(updates), timeout=5)
    assert pushed.balance == wallet_types.Money(amount="90.000000", currency="INR")
    await updates.aclose()


async def test_the_subscribers_one_event_wakes_share_one_read(live: LiveEvents) -> None:
    wallet = Wallet()
    subscribers = [subscription(live, wallet) for _ in range(50)]
    await asyncio.gather(*(anext(s) for s in subscribers))
    assert wallet.reads == 50  # each one's first read is its own
    wallet.balance = 5_000_000
    live._wake(ORG)
    pushed = await asyncio.wait_for(asyncio.gather(*(anext(s) for s in subscribers)), 5)
    assert {p.balance.amount for p in pushed} == {"5.000000"}
    assert wallet.reads == 51, "one read for all fifty"
    wallet.balance = 6_000_000
    live._wake(ORG)  # a later event: a new read, not the one before it
    pushed = await asyncio.wait_for(asyncio.gather(*(anext(s) for s in subscribers)), 5)
    assert {p.balance.amount for p in pushed} == {"6.000000"}
    assert wallet.reads == 52
    for s in subscribers:
        await s.aclose()


class StuckSocket:
    """A websocket whose client never answers the close."""

    async def close(self, **kwargs: Any) -> bool:
        await asyncio.Event().wait()
        return True


class Transport:
    aborted = False

    def abort(self) -> None:
        self.aborted = True


async def test_shutdown_cuts_a_websocket_that_does_not_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(view, "CLOSE_TIMEOUT", 0.1)
    gateway = object.__new__(view.GatewayView)  # only its websocket bookkeeping is used
    sockets = [StuckSocket() for _ in range(3)]
    requests = [SimpleNamespace(transport=Transport()) for _ in sockets]
    gateway.websockets = dict(zip(sockets, requests, strict=True))  # type: ignore[assignment]
    await asyncio.wait_for(gateway.close_websockets(), timeout=5)  # all at once, not one by one
    assert all(r.transport.aborted for r in requests)


def test_an_organization_no_longer_watched_leaves_nothing_behind(live: LiveEvents) -> None:
    """Its wake count was kept for good (one entry per organization ever watched); watched
    again, its generation is a new one, so no read begun before is shared with it."""
    seen = set()
    for n in range(3):
        org = f"org-{n}"
        with live.watching(org):
            seen.add(live.generation(org))
            live._wake(org)
            seen.add(live.generation(org))
    with live.watching("org-0"):
        seen.add(live.generation("org-0"))
    assert len(seen) == 7
    assert live._wakes == {} and live.watchers == 0


async def test_a_subscription_to_live_events_that_fails_is_tried_again(
    events_config: EventsConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NATS refusing the subscription once (say, a permission not yet granted) ended the listener
    silently, and every live view polled every 5 s for good."""
    failures = [RuntimeError("no permission yet")]
    subscribe = nats.aio.client.Client.subscribe

    async def flaky(self: nats.aio.client.Client, subject: str, **kwargs: Any) -> Any:
        if subject == live.subject and failures:
            raise failures.pop()
        return await subscribe(self, subject, **kwargs)

    monkeypatch.setattr(nats.aio.client.Client, "subscribe", flaky)
    live = LiveEvents(events_config, reconnect_wait=0.1)
    await live.start()
    try:
        assert await live.wait_connected(5)
        assert failures == []
    finally:
        await live.close()
