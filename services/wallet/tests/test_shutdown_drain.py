"""SIGTERM while calls are arriving: every call either completes or is refused as UNAVAILABLE
(which clients retry); none is CANCELLED, and every acknowledged one is in the ledger."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable

import grpc
from processes import TOKEN, start_wallet, wait_serving, wallet_env
from psycopg_pool import AsyncConnectionPool

from gpudeck.kit.config import EventsConfig
from gpudeck.kit.grpcclient import channel
from gpudeck.proto.common.v1.money_pb2 import Money
from gpudeck.proto.wallet.v1 import wallet_pb2 as pb
from gpudeck.proto.wallet.v1.wallet_pb2_grpc import WalletServiceStub

NewOrg = Callable[..., Awaitable[uuid.UUID]]


async def test_calls_arriving_during_shutdown_are_finished_or_unavailable(
    database_url: str,
    events_config: EventsConfig,
    wallet_pool: AsyncConnectionPool,
    new_org: NewOrg,
) -> None:
    org = await new_org()
    env = wallet_env(database_url, events_config, GPUDECK_SHUTDOWN_GRACE="5")
    address = env["GPUDECK_WALLET_LISTEN"]
    process = start_wallet(env)
    codes: Counter[str] = Counter()
    acknowledged: list[str] = []
    try:
        await wait_serving(address)
        async with channel(address, TOKEN) as ch:
            stub = WalletServiceStub(ch)
            stopping = asyncio.Event()

            async def client() -> None:
                while True:
                    key = uuid.uuid4().hex
                    request = pb.TransferRequest(
                        idempotency_key=key, organization_id=str(org), kind=pb.TOPUP,
                        amount=Money(amount=1_000),
                    )  # fmt: skip
                    try:
                        await stub.Transfer(request, timeout=10)
                        codes["OK"] += 1
                        acknowledged.append(key)
                    except grpc.aio.AioRpcError as exc:
                        codes[exc.code().name] += 1
                        if stopping.is_set():
                            return

            clients = [asyncio.create_task(client()) for _ in range(32)]
            await asyncio.sleep(1.0)
            stopping.set()
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(asyncio.gather(*clients), 30)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert codes["OK"] > 0
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
    async with wallet_pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM transactions WHERE organization_id = %s"
            " AND idempotency_key = ANY(%s)",
            (org, acknowledged),
        )
        assert (await cur.fetchone()) == (len(acknowledged),)
