"""Low-balance thresholds and auto top-up over gRPC: exactly one event per edge, read back from
JetStream (the relay empties the outbox quickly), including crossings the settings themselves
cause; auto top-ups fire once while pending and complete exactly once, and three failures in a
row turn the rule off."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from psycopg_pool import AsyncConnectionPool
from test_edges_grpc import usage_request, wallet_events

from gpudeck.kit.config import EventsConfig
from gpudeck.kit.events import parse_event
from gpudeck.proto.common.v1.money_pb2 import Money
from gpudeck.proto.wallet.v1 import events_pb2
from gpudeck.proto.wallet.v1 import wallet_pb2 as pb
from gpudeck.proto.wallet.v1.wallet_pb2_grpc import WalletServiceStub
from gpudeck.wallet.alerts import Thresholds
from gpudeck.wallet.deps import Wallet
from gpudeck.wallet.ledger import Kind, TransferRequest
from gpudeck.wallet.ledger_store import LedgerStore
from gpudeck.wallet.thresholds_store import ThresholdStore
from gpudeck.wallet.workers import announce_balances

NewOrg = Callable[..., Awaitable[uuid.UUID]]
USD = 1_000_000
EDGES = ("warning", "critical", "depleted", "recovered")
Events = Callable[[uuid.UUID, int], Awaitable[list[str]]]


@pytest.fixture
async def edge_events(events_config: EventsConfig) -> AsyncIterator[Events]:
    """`await edge_events(org, n)`: the balance edge events of `org`, once `n` are there (10 s at
    most) and no more arrived for half a second."""
    nc = await nats.connect(events_config.nats_url, connect_timeout=2)
    js = nc.jetstream()

    async def read(org: uuid.UUID, expected: int) -> list[str]:
        name = f"edges-{uuid.uuid4().hex[:8]}"
        sub = await js.pull_subscribe(
            f"{events_config.subject_prefix}.wallet.balance.>",
            durable=name,
            stream=events_config.stream,
            config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL),
        )
        found: list[str] = []
        try:
            deadline = time.monotonic() + 10
            quiet_until = 0.0
            while time.monotonic() < deadline:
                try:
                    msgs = await sub.fetch(200, timeout=0.25)
                except (TimeoutError, nats.errors.TimeoutError):
                    msgs = []
                before = len(found)
                for msg in msgs:
                    event = parse_event(msg.data)
                    kind = event.type.removeprefix("wallet.balance.")
                    if event.organization_id == str(org) and kind in EDGES:
                        found.append(kind)
                if len(found) >= expected:
                    if len(found) > before or not quiet_until:  # quiet since the last one
                        quiet_until = time.monotonic() + 0.5
                    if time.monotonic() >= quiet_until:
                        break
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
                await js.delete_consumer(events_config.stream, name)
        return found

    yield read
    await nc.close()


async def transfer(
    stub: WalletServiceStub, org: uuid.UUID, kind: int, amount: int, key: str = ""
) -> None:
    await stub.Transfer(
        pb.TransferRequest(
            idempotency_key=key or uuid.uuid4().hex,
            organization_id=str(org),
            kind=kind,  # type: ignore[arg-type]
            amount=Money(amount=amount),
            resource_type="pod",
        ),
        timeout=5,
    )


async def set_thresholds(
    stub: WalletServiceStub, org: uuid.UUID, warning: int, critical: int = 0, **hours: float
) -> pb.Thresholds:
    return await stub.SetThresholds(
        pb.SetThresholdsRequest(
            organization_id=str(org), warning_amount=warning, critical_amount=critical, **hours
        ),
        timeout=5,
    )


async def test_each_crossing_emits_one_event_per_edge(
    wallet_stub: WalletServiceStub, new_org: NewOrg, edge_events: Events
) -> None:
    org = await new_org("USD")
    await transfer(wallet_stub, org, pb.TOPUP, 100 * USD)
    saved = await set_thresholds(wallet_stub, org, 50 * USD, 20 * USD)
    assert (saved.warning_amount, saved.critical_amount, saved.level) == (50 * USD, 20 * USD, "ok")
    await transfer(wallet_stub, org, pb.CHARGE, 60 * USD, key="cross")  # 40: warning
    await transfer(wallet_stub, org, pb.CHARGE, 60 * USD, key="cross")  # a retry: no event
    await transfer(wallet_stub, org, pb.CHARGE, 5 * USD)  # 35: still warning, no event
    await transfer(wallet_stub, org, pb.CHARGE, 1 * USD)  # 34: still warning
    # New thresholds move the level themselves: 34 ≥ 30 recovers, 34 < 40 is critical.
    assert (await set_thresholds(wallet_stub, org, 30 * USD)).level == "ok"
    assert (await set_thresholds(wallet_stub, org, 30 * USD)).level == "ok"  # no edge, no event
    assert (await set_thresholds(wallet_stub, org, 50 * USD, 40 * USD)).level == "critical"
    got = await wallet_stub.GetThresholds(pb.GetThresholdsRequest(organization_id=str(org)))
    assert (got.warning_amount, got.critical_amount, got.level) == (50 * USD, 40 * USD, "critical")
    summary = await wallet_stub.GetWalletSummary(
        pb.GetWalletSummaryRequest(organization_id=str(org)), timeout=5
    )
    assert summary.service_status == "critical"
    await transfer(wallet_stub, org, pb.TOPUP, 100 * USD)  # 134: recovered
    assert await edge_events(org, 4) == ["warning", "recovered", "critical", "recovered"]


async def test_hours_remaining_thresholds_follow_the_run_rate(
    wallet_stub: WalletServiceStub, new_org: NewOrg, edge_events: Events
) -> None:
    org = await new_org("USD")
    await transfer(wallet_stub, org, pb.TOPUP, 100 * USD)
    await wallet_stub.OpenMeter(
        pb.OpenMeterRequest(
            meter_id=f"pod:{org}",
            organization_id=str(org),
            resource_id=str(org),
            resource_type="pod",
            hourly_rate=10 * USD,
        ),
        timeout=5,
    )  # about 10 hours left
    saved = await set_thresholds(wallet_stub, org, 0, 0, warning_hours=24.0, critical_hours=2.0)
    assert saved.level == "warning" and saved.warning_hours == 24.0
    await wallet_stub.CloseMeter(pb.CloseMeterRequest(meter_id=f"pod:{org}"), timeout=5)
    assert await edge_events(org, 2) == ["warning", "recovered"]


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.SetThresholdsRequest(warning_amount=-1), "warning_amount"),
        (pb.SetThresholdsRequest(warning_amount=10, critical_amount=20), "critical_amount"),
        (pb.SetThresholdsRequest(warning_hours=float("nan")), "warning_hours"),
        (pb.SetThresholdsRequest(warning_hours=1.0, critical_hours=2.0), "critical_hours"),
    ],
)
async def test_bad_thresholds_name_the_field(
    wallet_stub: WalletServiceStub, new_org: NewOrg, request_: pb.SetThresholdsRequest, field: str
) -> None:
    request_.organization_id = str(await new_org("USD"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet_stub.SetThresholds(request_, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("x-error-field", field) in list(err.value.trailing_metadata() or ())


async def pending_ids(pool: AsyncConnectionPool, org: uuid.UUID) -> list[tuple[uuid.UUID, str]]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT id, status FROM pending_topups WHERE organization_id = %s ORDER BY created_at",
            (org,),
        )
        return [(row[0], row[1]) for row in await cur.fetchall()]


async def balance(stub: WalletServiceStub, org: uuid.UUID) -> int:
    s = await stub.GetWalletSummary(pb.GetWalletSummaryRequest(organization_id=str(org)), timeout=5)
    return s.balance.amount


async def test_auto_top_up_fires_once_while_pending_and_completes_once(
    wallet_stub: WalletServiceStub, wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    org = await new_org("USD")
    await transfer(wallet_stub, org, pb.TOPUP, 10 * USD)
    rule = await wallet_stub.SetAutoTopUp(
        pb.SetAutoTopUpRequest(
            organization_id=str(org), enabled=True, below=5 * USD, amount=20 * USD
        ),
        timeout=5,
    )
    assert rule.enabled and not rule.HasField("pending")
    await transfer(wallet_stub, org, pb.CHARGE, 6 * USD)  # 4 < 5: fires
    await transfer(wallet_stub, org, pb.CHARGE, 1 * USD)  # 3: one is pending already
    [(pending_id, status)] = await pending_ids(wallet_pool, org)
    assert status == "pending"
    seen = await wallet_stub.GetAutoTopUp(pb.GetAutoTopUpRequest(organization_id=str(org)))
    assert (seen.enabled, seen.below, seen.pending.id) == (True, 5 * USD, str(pending_id))
    done = await wallet_stub.CompleteTopUp(
        pb.CompleteTopUpRequest(
            pending_top_up_id=str(pending_id), succeeded=True, reference="pay-1"
        ),
        timeout=5,
    )
    assert (done.status, done.amount.amount) == ("completed", 20 * USD) and done.transaction_id
    assert await balance(wallet_stub, org) == 23 * USD
    [tx] = (
        await wallet_stub.ListTransactions(
            pb.ListTransactionsRequest(organization_id=str(org), kinds=[pb.TOPUP], limit=1),
            timeout=5,
        )
    ).transactions
    assert (tx.id, tx.idempotency_key) == (done.transaction_id, f"auto-topup:{pending_id}")
    # The payment's webhook again: the same answer, nothing posted twice.
    again = await wallet_stub.CompleteTopUp(
        pb.CompleteTopUpRequest(pending_top_up_id=str(pending_id), succeeded=True), timeout=5
    )
    assert (again.status, again.transaction_id) == ("completed", done.transaction_id)
    # The other outcome is refused: the money is in.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet_stub.CompleteTopUp(
            pb.CompleteTopUpRequest(pending_top_up_id=str(pending_id), succeeded=False),
            timeout=5,
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert ("x-error-reason", "ALREADY_RESOLVED") in list(err.value.trailing_metadata() or ())
    assert await balance(wallet_stub, org) == 23 * USD


async def test_a_failed_top_up_adds_nothing_and_the_rule_may_fire_again(
    wallet_stub: WalletServiceStub, wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    org = await new_org("USD")
    await transfer(wallet_stub, org, pb.TOPUP, 3 * USD)
    rule = await wallet_stub.SetAutoTopUp(
        pb.SetAutoTopUpRequest(
            organization_id=str(org), enabled=True, below=5 * USD, amount=20 * USD
        ),
        timeout=5,
    )
    assert rule.pending.status == "pending"  # already below: fires at once
    failed = await wallet_stub.CompleteTopUp(
        pb.CompleteTopUpRequest(pending_top_up_id=rule.pending.id, succeeded=False), timeout=5
    )
    assert failed.status == "failed" and failed.transaction_id == ""
    assert await balance(wallet_stub, org) == 3 * USD
    await transfer(wallet_stub, org, pb.CHARGE, 1 * USD)
    assert [s for _, s in await pending_ids(wallet_pool, org)] == ["failed", "pending"]


async def test_an_expired_top_up_paid_late_cancels_the_one_requested_in_its_place(
    wallet_stub: WalletServiceStub, wallet_pool: AsyncConnectionPool, new_org: NewOrg,
    events_config: EventsConfig,
) -> None:  # fmt: skip
    """A payment slower than the timeout: the rule fired again, and both payments were credited
    ($3 + $20 + $20 for one crossing of "below $5 add $20")."""
    org = await new_org("USD")
    await transfer(wallet_stub, org, pb.TOPUP, 3 * USD)
    await wallet_stub.SetAutoTopUp(
        pb.SetAutoTopUpRequest(organization_id=str(org), enabled=True, below=5 * USD,
                               amount=20 * USD), timeout=5,
    )  # fmt: skip
    [(first, _)] = await pending_ids(wallet_pool, org)
    async with wallet_pool.connection() as conn:  # no answer in time
        await conn.execute(
            "UPDATE pending_topups SET created_at = created_at - interval '2 hours'"
            " WHERE organization_id = %s",
            (org,),
        )
    deadline = time.monotonic() + 10  # the housekeeping loop expires it and asks again
    while [s for _, s in await pending_ids(wallet_pool, org)] != ["expired", "pending"]:
        assert time.monotonic() < deadline, await pending_ids(wallet_pool, org)
        await asyncio.sleep(0.1)
    second = (await pending_ids(wallet_pool, org))[1][0]
    paid = await wallet_stub.CompleteTopUp(
        pb.CompleteTopUpRequest(pending_top_up_id=str(first), succeeded=True), timeout=5
    )
    assert paid.status == "completed"
    assert [s for _, s in await pending_ids(wallet_pool, org)] == ["completed", "cancelled"]
    assert await balance(wallet_stub, org) == 23 * USD
    cancelled = await wallet_events(
        events_config, org, lambda found: any(e.type.endswith("cancelled") for e in found)
    )
    [called_off] = [e for e in cancelled if e.type == "wallet.autotopup.cancelled"]
    payload = events_pb2.AutoTopUpRequested()
    assert called_off.payload.Unpack(payload) and payload.pending_top_up_id == str(second)
    # Its payment taken all the same: credited (the customer paid), once.
    for _ in range(2):
        done = await wallet_stub.CompleteTopUp(
            pb.CompleteTopUpRequest(pending_top_up_id=str(second), succeeded=True), timeout=5
        )
        assert done.status == "completed"
    assert await balance(wallet_stub, org) == 43 * USD


def below_5_add_20(org: uuid.UUID) -> pb.SetAutoTopUpRequest:
    return pb.SetAutoTopUpRequest(
        organization_id=str(org), enabled=True, below=5 * USD, amount=20 * USD
    )


async def rule_of(stub: WalletServiceStub, org: uuid.UUID) -> pb.AutoTopUp:
    return await stub.GetAutoTopUp(pb.GetAutoTopUpRequest(organization_id=str(org)))


async def decline_pending(stub: WalletServiceStub, org: uuid.UUID) -> None:
    """The payment side declines the rule's pending top-up."""
    pending = (await rule_of(stub, org)).pending
    assert pending.status == "pending"
    await stub.CompleteTopUp(
        pb.CompleteTopUpRequest(pending_top_up_id=pending.id, succeeded=False), timeout=5
    )


async def test_three_failed_top_ups_in_a_row_turn_the_rule_off_until_it_is_saved_again(
    wallet_stub: WalletServiceStub, wallet_pool: AsyncConnectionPool, new_org: NewOrg,
    events_config: EventsConfig,
) -> None:  # fmt: skip
    org = await new_org("USD")
    await transfer(wallet_stub, org, pb.TOPUP, 3 * USD)
    save = below_5_add_20(org)

    async def rule() -> pb.AutoTopUp:
        return await rule_of(wallet_stub, org)

    async def decline() -> None:
        await decline_pending(wallet_stub, org)

    await wallet_stub.SetAutoTopUp(save, timeout=5)  # below already: the first request
    await decline()
    await transfer(wallet_stub, org, pb.CHARGE, USD // 10)  # still below: the second one
    await decline()
    await transfer(wallet_stub, org, pb.CHARGE, USD // 10)  # the third one never comes back
    assert (await rule()).enabled and (await rule()).disabled_reason == ""
    async with wallet_pool.connection() as conn:
        await conn.execute(
            "UPDATE pending_topups SET created_at = created_at - interval '2 hours'"
            " WHERE organization_id = %s AND status = 'pending'",
            (org,),
        )
    deadline = time.monotonic() + 10  # the housekeeping loop fails it within a second or so
    while (await rule()).enabled:
        assert time.monotonic() < deadline, "the rule was not turned off"
        await asyncio.sleep(0.1)

    stopped = await rule()
    assert not stopped.HasField("pending") or not stopped.pending.id  # no fourth request
    assert "3 automatic top-ups in a row failed" in stopped.disabled_reason
    await transfer(wallet_stub, org, pb.CHARGE, USD // 10)
    assert [s for _, s in await pending_ids(wallet_pool, org)] == ["expired", "failed", "failed"]
    disabled = await wallet_events(
        events_config, org, lambda found: any(e.type.endswith("disabled") for e in found)
    )
    [event] = [e for e in disabled if e.type == "wallet.autotopup.disabled"]
    assert event.actor == "system"

    again = await wallet_stub.SetAutoTopUp(save, timeout=5)  # saved again: a fresh count
    assert again.enabled and again.disabled_reason == "" and again.pending.status == "pending"
    await decline()  # one failure since saving is not three in a row
    assert (await rule()).enabled


async def test_a_rule_turned_off_by_an_expiry_is_on_again_when_that_top_up_is_paid_late(
    wallet_stub: WalletServiceStub, wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    """Two declined and one timed out turn the rule off; the late one paid after all leaves two
    failures, not three in a row. The rule stayed off (saying three had failed) and never fired
    again."""
    org = await new_org("USD")
    await transfer(wallet_stub, org, pb.TOPUP, 3 * USD)

    async def rule() -> pb.AutoTopUp:
        return await rule_of(wallet_stub, org)

    await wallet_stub.SetAutoTopUp(below_5_add_20(org), timeout=5)
    for _ in range(2):
        await decline_pending(wallet_stub, org)
        await transfer(wallet_stub, org, pb.CHARGE, USD // 10)  # still below: asks again
    third = (await rule()).pending.id
    async with wallet_pool.connection() as conn:
        await conn.execute(
            "UPDATE pending_topups SET created_at = now() - interval '2 hours' WHERE id = %s",
            (uuid.UUID(third),),
        )
    deadline = time.monotonic() + 10
    while (await rule()).enabled:
        assert time.monotonic() < deadline, "the rule was not turned off"
        await asyncio.sleep(0.1)
    paid = await wallet_stub.CompleteTopUp(
        pb.CompleteTopUpRequest(pending_top_up_id=third, succeeded=True), timeout=5
    )
    assert paid.status == "completed"
    back = await rule()
    assert back.enabled and back.disabled_reason == ""
    await transfer(wallet_stub, org, pb.CHARGE, 20 * USD)  # 22.8 − 20 = 2.8 < 5: it fires
    assert (await rule()).pending.status == "pending"
    # A rule its owner turned off stays off, whatever is paid late.
    off = await wallet_stub.SetAutoTopUp(
        pb.SetAutoTopUpRequest(organization_id=str(org), enabled=False), timeout=5
    )
    assert not off.enabled


async def test_an_unknown_pending_top_up_is_not_found(wallet_stub: WalletServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet_stub.CompleteTopUp(
            pb.CompleteTopUpRequest(pending_top_up_id=str(uuid.uuid4()), succeeded=True),
            timeout=5,
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_an_enabled_rule_needs_amounts(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org("USD")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet_stub.SetAutoTopUp(
            pb.SetAutoTopUpRequest(organization_id=str(org), enabled=True, below=5 * USD),
            timeout=5,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "amount" in (err.value.details() or "")


def test_an_overdrawn_wallet_is_depleted_even_with_nothing_running() -> None:
    from gpudeck.wallet.alerts import SERVICE_STATUS, Thresholds, level_for

    none = Thresholds()
    assert level_for(0, 0, none, 10) == "ok"  # a new, empty wallet: nothing to pause
    assert level_for(-1, 0, none, 10) == "depleted"
    assert SERVICE_STATUS[level_for(-346_338_829, 0, none, 10)] == "paused"
    assert level_for(5 * USD, 0, Thresholds(critical_amount=10 * USD), 10) == "critical"


async def test_usage_that_overdraws_pauses_the_wallet_until_topped_up(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org("USD")
    await wallet_stub.RecordUsage(
        usage_request(org, quantity=1_000_000.0, unit_price=3 * USD), timeout=5
    )
    s = await wallet_stub.GetWalletSummary(pb.GetWalletSummaryRequest(organization_id=str(org)))
    assert (s.balance.amount, s.service_status) == (-3 * USD, "paused")
    await transfer(wallet_stub, org, pb.TOPUP, 5 * USD)
    s = await wallet_stub.GetWalletSummary(pb.GetWalletSummaryRequest(organization_id=str(org)))
    assert (s.balance.amount, s.service_status) == (2 * USD, "available")


class LosingStore(LedgerStore):
    """The ledger, except that its first level check after a transfer is lost, as when the
    process dies (or the connection drops) right after a fast-path commit."""

    armed = False

    async def refresh_levels(self, conn, organization_ids, now=None, **kw):  # type: ignore[no-untyped-def]
        if self.armed:
            self.armed = False
            raise ConnectionError("lost after the commit")
        await super().refresh_levels(conn, organization_ids, now, **kw)


@pytest.mark.parametrize(
    "found_by", ["the retry", "a grouped retry", "the sweep", "the sweep, after a round"]
)
async def test_a_level_check_lost_after_the_commit_is_made_good(
    wallet_pool: AsyncConnectionPool, new_org: Callable[..., Awaitable[uuid.UUID]], found_by: str
) -> None:
    """The fast path commits a transfer, then checks the wallet's level (edge events, auto
    top-up) in a second step. Lost, that step used to be lost for good: a retry was a replay,
    and nothing else looked again. Now the retry does, and so does the announcer's sweep, even
    after the announcer's rounds went on meanwhile (they announced the wallet unchecked, and
    the sweep passed it by)."""
    ledger = LosingStore()
    thresholds = ThresholdStore(ledger)
    org = await new_org()
    async with wallet_pool.connection() as conn:
        await ledger.post_one(conn, TransferRequest("t", org, Kind.TOPUP, 100 * USD))
    async with wallet_pool.connection() as conn, conn.transaction():
        await thresholds.set_thresholds(conn, org, Thresholds(warning_amount=50 * USD))
        await thresholds.set_auto_topup(conn, org, enabled=True, below=50 * USD, amount=10 * USD)
    ledger.take_changed()  # the set-up's changes announced, as the announcer's rounds do
    ledger.armed = True
    charge = TransferRequest("c1", org, Kind.CHARGE, 60 * USD, resource_type="pod")

    async def post() -> None:
        async with wallet_pool.connection() as conn:
            if found_by == "a grouped retry":  # concurrent calls, posted together
                [outcome] = await ledger.post_independent(conn, [charge])
                assert outcome.error is None
            else:
                await ledger.post_one(conn, charge)

    with pytest.raises(ConnectionError):
        await post()

    async def state() -> tuple[str, int]:
        async with wallet_pool.connection() as conn:
            cur = await conn.execute(
                "SELECT w.level, (SELECT count(*) FROM pending_topups p"
                "  WHERE p.organization_id = w.organization_id)"
                " FROM wallets w WHERE w.organization_id = %s",
                (org,),
            )
            row = await cur.fetchone()
        assert row is not None
        return row[0], row[1]

    assert await state() == ("ok", 0)  # committed, but its edge not seen
    if not found_by.startswith("the sweep"):
        await post()
    else:

        async def due_now() -> None:
            async with wallet_pool.connection() as conn:
                await conn.execute(
                    "UPDATE wallet_announcements SET announced_at = now() - interval '2 seconds'"
                    " WHERE organization_id = %s",
                    (org,),
                )

        wallet = Wallet(wallet_pool)
        wallet.ledger = ledger
        if found_by == "the sweep, after a round":  # the process lives on: rounds go on
            await due_now()
            await announce_balances(wallet)
        await due_now()
        await announce_balances(wallet, sweep=True)
    assert await state() == ("warning", 1)


async def test_concurrent_charges_crossing_at_once_emit_one_event(
    wallet_stub: WalletServiceStub, new_org: NewOrg, edge_events: Events
) -> None:
    """Eight charges at once take the wallet from 100 to 20 through the warning line (50) and
    the critical one (30): one event per edge crossed, never a repeat. Charges posted together
    (group commit) move the level once, ok → critical, which is one edge."""
    org = await new_org("USD")
    await transfer(wallet_stub, org, pb.TOPUP, 100 * USD)
    await set_thresholds(wallet_stub, org, 50 * USD, 30 * USD)
    await asyncio.gather(*(transfer(wallet_stub, org, pb.CHARGE, 10 * USD) for _ in range(8)))
    assert await edge_events(org, 1) in (["warning", "critical"], ["critical"])


@pytest.mark.parametrize("fast_path", [True, False])
async def test_a_crossing_in_a_group_names_the_caller_that_crossed(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg, fast_path: bool
) -> None:
    """Twenty callers' charges to one wallet posted together (group commit): the warning edge
    named the group's last caller for that wallet, not the one whose charge crossed the line."""
    ledger = LedgerStore()
    org = await new_org()
    async with wallet_pool.connection() as conn, conn.transaction():
        await ledger.post_transfers(conn, [TransferRequest("t", org, Kind.TOPUP, 60 * USD)])
        await ThresholdStore(ledger).set_thresholds(conn, org, Thresholds(warning_amount=50 * USD))
    charges = [
        TransferRequest(f"c{n}", org, Kind.CHARGE, USD, actor=f"user:caller{n}") for n in range(20)
    ]  # the eleventh (caller10) leaves 49, under the line
    async with wallet_pool.connection() as conn, conn.transaction(force_rollback=True):
        outcomes = await ledger.post_transfers(conn, charges, fast_path=fast_path)
        assert all(o.error is None for o in outcomes)
        cur = await conn.execute("SELECT data FROM outbox WHERE type = 'wallet.balance.warning'")
        edges = [parse_event(bytes(data)) for (data,) in await cur.fetchall()]
    assert [e.actor for e in edges if e.organization_id == str(org)] == ["user:caller10"]


def test_the_crosser_is_the_one_from_whom_the_level_stays() -> None:
    from gpudeck.wallet.alerts import crossed_by

    def level(balance: int) -> str:
        return "ok" if balance >= 50 else "warning"

    # Down through the line, back over it, and down again: the last crossing counts.
    moves = [(60, "a"), (49, "b"), (55, "c"), (48, "d"), (40, "e")]
    assert crossed_by(moves, level) == "d"
    assert crossed_by([(49, "only")], level) == "only"
    assert crossed_by([], level) == ""
