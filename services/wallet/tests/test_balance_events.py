"""Depletion and live-balance events, read back from JetStream."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Awaitable, Callable

import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from gpudeck.kit.config import EventsConfig
from gpudeck.kit.events import parse_event, unpack
from gpudeck.proto.common.v1.money_pb2 import Money
from gpudeck.proto.events.v1.envelope_pb2 import Event
from gpudeck.proto.wallet.v1 import events_pb2
from gpudeck.proto.wallet.v1 import wallet_pb2 as pb
from gpudeck.proto.wallet.v1.wallet_pb2_grpc import WalletServiceStub

NewOrg = Callable[..., Awaitable[uuid.UUID]]
USD = 1_000_000


async def events_of(
    config: EventsConfig, org: uuid.UUID, subject: str, settle: float
) -> list[Event]:
    """Every event of `org` on `subject` in the stream, read after `settle` seconds of quiet."""
    await asyncio.sleep(settle)
    nc = await nats.connect(config.nats_url, connect_timeout=2)
    js = nc.jetstream()
    name = f"t-{uuid.uuid4().hex[:8]}"
    sub = await js.pull_subscribe(
        f"{config.subject_prefix}.{subject}",
        durable=name,
        stream=config.stream,
        config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL),
    )
    found: list[Event] = []
    try:
        while True:
            try:
                msgs = await sub.fetch(500, timeout=0.5)
            except (TimeoutError, nats.errors.TimeoutError):
                break
            found += [
                e for e in map(lambda m: parse_event(m.data), msgs) if e.organization_id == str(org)
            ]
    finally:
        await js.delete_consumer(config.stream, name)
        await nc.close()
    return found


async def test_depletion_is_announced_once_and_recovery_once(
    wallet_stub: WalletServiceStub, new_org: NewOrg, events_config: EventsConfig
) -> None:
    org = await new_org()
    await wallet_stub.Transfer(
        pb.TransferRequest(
            idempotency_key="t", organization_id=str(org), kind=pb.TOPUP, amount=Money(amount=USD)
        )
    )
    # 3600 USD/h = 1 USD/s: one dollar covers 1 s < the 10 s depletion window.
    await wallet_stub.OpenMeter(
        pb.OpenMeterRequest(
            meter_id=f"pod:{org}", organization_id=str(org), resource_id="p", resource_type="pod",
            hourly_rate=3600 * USD,
        )
    )  # fmt: skip
    await asyncio.sleep(1.0)  # billing ticks (every 0.2 s) keep charging while depleted
    summary = await wallet_stub.GetWalletSummary(
        pb.GetWalletSummaryRequest(organization_id=str(org))
    )
    assert summary.service_status == "paused"
    await wallet_stub.CloseMeter(pb.CloseMeterRequest(meter_id=f"pod:{org}"))
    await wallet_stub.Transfer(
        pb.TransferRequest(
            idempotency_key="t2",
            organization_id=str(org),
            kind=pb.TOPUP,
            amount=Money(amount=50 * USD),
        )
    )
    edges = await events_of(events_config, org, "wallet.balance.*", settle=0.5)
    kinds = [e.type for e in edges if e.type != "wallet.balance.changed"]
    assert kinds == ["wallet.balance.depleted", "wallet.balance.recovered"]


async def test_balance_changes_are_announced_at_most_once_a_second(
    wallet_stub: WalletServiceStub, new_org: NewOrg, events_config: EventsConfig
) -> None:
    org = await new_org()
    started = time.monotonic()
    for i in range(30):
        await wallet_stub.Transfer(
            pb.TransferRequest(
                idempotency_key=f"k{i}",
                organization_id=str(org),
                kind=pb.TOPUP,
                amount=Money(amount=USD),
            )
        )
        await asyncio.sleep(0.05)
    elapsed = time.monotonic() - started
    changed = await events_of(events_config, org, "wallet.balance.changed", settle=1.5)
    assert 1 <= len(changed) <= int(elapsed) + 2
    times = [e.time.ToDatetime() for e in changed]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    assert all(gap >= 0.95 for gap in gaps), gaps
    final = unpack(changed[-1], events_pb2.BalanceChanged)
    assert final.balance.amount == 30 * USD  # the last announcement carries the final balance
