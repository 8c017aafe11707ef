"""Ledger throughput against pgbench's TPC-B-like script on the same database, in one run.

1. pgbench (built-in tpcb-like, scale 10, 8 clients) → baseline tps.
2. Single transfers through the wallet's gRPC API, 8 concurrent clients → goal ≥ 0.5 × baseline.
3. Batches of 1,000 transfers per call, 4 callers → transfers/s, goal ≥ 15 × baseline.
4. One billing tick over 10,000 open meters → goal < 1 s (baseline: one plain UPDATE of them),
   spread 10 per organization over 1,000, and 1 per organization over 10,000 (the harder case:
   a charge per meter).

Reference points put 2 and 3 in context (see ledger_ceilings.py): the SQL a lone transfer runs,
driven by pgbench's own client; gRPC alone (the kit's server answering Transfer from memory, the
same client); and the batch's rows written by plain COPY with no checks.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import grpc

from bench import pgbench
from bench.grpc_server import server_process
from bench.ledger_ceilings import plain_copy_rate, post_transfer_tps
from bench.pgbench import CLIENTS
from bench.wallet_setup import TOKEN, make_orgs, scratch_database, wallet_pool, wallet_process
from gpudeck.kit.grpcclient import channel
from gpudeck.proto.common.v1.money_pb2 import Money
from gpudeck.proto.wallet.v1 import wallet_pb2 as pb
from gpudeck.proto.wallet.v1.wallet_pb2_grpc import WalletServiceStub
from gpudeck.wallet.deps import Wallet
from gpudeck.wallet.ledger import Kind, TransferRequest
from gpudeck.wallet.metering_store import bill_open_meters

SECONDS = float(os.environ.get("GPUDECK_BENCH_SECONDS", "10"))
ORGS = 1000
BATCH = 1000
BATCH_CALLERS = 4
METERS = 10_000


def transfer(org: uuid.UUID, kind: int, amount: int) -> pb.TransferRequest:
    return pb.TransferRequest(
        idempotency_key=uuid.uuid4().hex, organization_id=str(org), kind=kind,  # type: ignore[arg-type]
        amount=Money(amount=amount), resource_type="pod",
    )  # fmt: skip


async def single_tps(address: str, orgs: list[uuid.UUID]) -> float:
    """Single transfers per second, CLIENTS calls in flight. Like pgbench's client (C, a few
    microseconds per statement) the load generator is kept lean: requests are built before the
    clock starts and sent on a bare channel (the token as call metadata), so the client's own
    Python eats as little as it can of the CPU the server and PostgreSQL share with it."""
    auth = (("authorization", f"Bearer {TOKEN}"),)
    per_client = int(SECONDS * 1500) + 100  # more than can be sent in SECONDS at the rates seen
    prepared = [
        [
            transfer(orgs[(i * 7919 + n) % len(orgs)], pb.CHARGE if n % 2 else pb.TOPUP, 1_000)
            for n in range(per_client)
        ]
        for i in range(CLIENTS)
    ]
    done = 0
    deadline = time.perf_counter() + SECONDS
    async with grpc.aio.insecure_channel(address) as ch:
        call = ch.unary_unary(
            "/gpudeck.wallet.v1.WalletService/Transfer",
            request_serializer=pb.TransferRequest.SerializeToString,
            response_deserializer=pb.Transaction.FromString,
        )
        await call(prepared[0][-1], metadata=auth, timeout=10)  # connect before the clock

        async def client(mine: list[pb.TransferRequest]) -> None:
            nonlocal done
            for request in mine:
                if time.perf_counter() >= deadline:
                    return
                await call(request, metadata=auth, timeout=10)
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(client(mine) for mine in prepared))
        return done / (time.perf_counter() - started)


async def batch_rate(stub: WalletServiceStub, orgs: list[uuid.UUID]) -> float:
    """Transfers per second in batches. The batches are built before the clock starts, so the
    bench client's own Python (which pgbench, in C, hardly has) does not eat the server's CPU."""
    share = len(orgs) // BATCH_CALLERS
    rounds = int(SECONDS * 4) + 2  # more than can be sent in SECONDS at the rates seen here
    prepared = [
        [
            pb.TransferBatchRequest(
                transfers=[
                    transfer(orgs[i * share + j % share], pb.CHARGE if j % 2 else pb.TOPUP, 1_000)
                    for j in range(BATCH)
                ]
            )
            for _ in range(rounds)
        ]
        for i in range(BATCH_CALLERS)
    ]
    done = 0
    deadline = time.perf_counter() + SECONDS

    async def caller(mine: list[pb.TransferBatchRequest]) -> None:
        nonlocal done
        for request in mine:
            if time.perf_counter() >= deadline:
                return
            reply = await stub.TransferBatch(request, timeout=60)
            assert not any(r.error_code for r in reply.results)
            done += BATCH

    started = time.perf_counter()
    await asyncio.gather(*(caller(mine) for mine in prepared))
    return done / (time.perf_counter() - started)


async def tick_seconds(wallet: Wallet, orgs: list[uuid.UUID]) -> tuple[float, float]:
    """(one billing tick over METERS open meters spread evenly over `orgs`, one plain UPDATE of
    the same rows). The tick posts one charge per organization: the fewer meters each has,
    the more charges."""
    async with wallet.pool.connection() as conn, conn.transaction():
        await conn.execute("DELETE FROM meters")
        await conn.execute("UPDATE wallets SET run_rate = 0 WHERE run_rate <> 0")
        await conn.execute(
            "INSERT INTO meters (id, organization_id, resource_id, resource_type, hourly_rate,"
            " opened_at, segment_started_at, billed_until)"
            " SELECT 'bench:' || i, o, 'r' || i, 'pod', 3600000,"
            "  now() - interval '10 seconds', now() - interval '10 seconds', now() - interval '10 seconds'"
            " FROM generate_series(1, %s) AS i, LATERAL (SELECT (%s::uuid[])[1 + i %% %s] AS o) x",
            (METERS, orgs, len(orgs)),
        )
        await conn.execute(
            "UPDATE wallets w SET run_rate = m.r FROM (SELECT organization_id, sum(hourly_rate) r"
            " FROM meters WHERE closed_at IS NULL GROUP BY 1) m WHERE m.organization_id = w.organization_id"
        )
    started = time.perf_counter()
    charged = await bill_open_meters(wallet.pool, wallet.meters)
    tick = time.perf_counter() - started
    assert charged > 0
    async with wallet.pool.connection() as conn, conn.transaction():
        started = time.perf_counter()
        await conn.execute("UPDATE meters SET billed_until = now() WHERE closed_at IS NULL")
        plain = time.perf_counter() - started
    return tick, plain


async def run() -> None:
    async with scratch_database("gpudeck_bench_ledger") as url:
        pgbench.initialize(url, scale=10)
        baseline = pgbench.tps(url, SECONDS)
        print(f"pgbench tpcb-like (scale 10, {CLIENTS} clients): {baseline:8.0f} tps  (baseline)")
        pool = await wallet_pool(url)
        wallet = Wallet(pool)
        orgs = await make_orgs(pool, ORGS)
        async with pool.connection() as conn, conn.transaction():
            await wallet.ledger.post_transfers(
                conn, [TransferRequest(f"seed-{o}", o, Kind.TOPUP, 10**12) for o in orgs]
            )
        sql_only = await post_transfer_tps(pool, url, orgs, seconds=SECONDS)
        with server_process("transfer") as echo:
            grpc_only = await single_tps(echo, orgs)
        async with wallet_process(url, GPUDECK_BILLING_INTERVAL="3600") as address:
            async with channel(address, TOKEN, timeout=60) as ch:
                stub = WalletServiceStub(ch)
                single = await single_tps(address, orgs)
                print(f"single transfers via gRPC ({CLIENTS} clients): {single:8.0f} tps"
                      f"  ratio {single / baseline:.2f} × pgbench (goal ≥ 0.5:"
                      f" {verdict(single / baseline >= 0.5)})")  # fmt: skip
                print(f"  reference: post_transfer, the SQL of one transfer, via pgbench's client:"
                      f" {sql_only:6.0f} tps = {sql_only / baseline:.2f} × pgbench;"
                      f" gRPC single = {single / sql_only:.2f} × it")  # fmt: skip
                print(
                    f"  reference: gRPC alone, the kit's server answering Transfer from memory"
                    f" (same client): {grpc_only:6.0f} tps = {grpc_only / baseline:.2f} × pgbench"
                )
                both = 1 / (1 / grpc_only + 1 / sql_only)  # each run keeps both cores busy
                print(
                    f"  the two together, if their CPU adds up on these cores: {both:6.0f} tps ="
                    f" {both / baseline:.2f} × pgbench, an estimate (a model, not a bound) of a"
                    f" single transfer with no Python of the wallet's own; gRPC single ="
                    f" {single / both:.2f} × it"
                )
                batched = await batch_rate(stub, orgs)
                print(f"batches of {BATCH} via gRPC ({BATCH_CALLERS} callers): {batched:8.0f} transfers/s"
                      f"  ratio {batched / baseline:.1f} × pgbench (goal ≥ 15:"
                      f" {verdict(batched / baseline >= 15)})")  # fmt: skip
        plain = await plain_copy_rate(
            pool, orgs, seconds=SECONDS, batch=BATCH, callers=BATCH_CALLERS
        )
        print(f"  reference: the same rows by plain COPY + one balance update (no checks, keys,"
              f" rollups or events): {plain:6.0f} transfers/s = {plain / baseline:.1f} × pgbench;"
              f" gRPC batches = {batched / plain:.2f} × it")  # fmt: skip
        more = await make_orgs(pool, METERS - len(orgs))
        async with pool.connection() as conn, conn.transaction():
            await wallet.ledger.post_transfers(
                conn, [TransferRequest(f"seed-{o}", o, Kind.TOPUP, 10**12) for o in more]
            )
        for spread in (orgs, [*orgs, *more]):  # 10 meters each; 1 each (a charge per meter)
            tick, plain = await tick_seconds(wallet, spread)
            print(f"billing tick over {METERS} open meters of {len(spread)} organizations"
                  f" ({METERS // len(spread)} each): {tick * 1000:6.0f} ms"
                  f"  ({tick:.2f} of the 1 s goal: {verdict(tick < 1)};"
                  f" {tick / plain:.1f} × a plain UPDATE of them, {plain * 1000:.0f} ms)")  # fmt: skip
        await pool.close()


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def main() -> None:
    asyncio.run(run())


if __name__ == "__main__":
    main()
