"""Unary call throughput through the kit's server (all interceptors on) vs a bare grpc.aio server.

Each server runs in its own process; one client process keeps CONCURRENCY calls in flight. Rounds
alternate bare/kit so machine noise hits both alike. Goal: kit ≥ 0.8 × bare.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import grpc

from bench.grpc_server import TOKEN, server_process
from gpudeck.kit.grpcclient import channel
from gpudeck.proto.kit.v1 import diagnostics_pb2, diagnostics_pb2_grpc

CONCURRENCY = 32
ROUND_SECONDS = 3.0
ROUNDS = 5
GOAL = 0.8


async def measure(ch: grpc.aio.Channel, seconds: float) -> float:
    stub = diagnostics_pb2_grpc.DiagnosticsStub(ch)
    request = diagnostics_pb2.InfoRequest(payload=b"x" * 64)
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await stub.Info(request, timeout=5)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return done / (time.perf_counter() - started)


async def run() -> None:
    with server_process("bare") as bare, server_process("kit") as kit:
        # Same client side for both: the kit's channel (token + deadline) to each server.
        bare_ch = channel(bare, TOKEN)
        kit_ch = channel(kit, TOKEN)
        await measure(bare_ch, 0.5)  # warm up both
        await measure(kit_ch, 0.5)
        ratios, bare_rates, kit_rates = [], [], []
        for _ in range(ROUNDS):
            b = await measure(bare_ch, ROUND_SECONDS)
            k = await measure(kit_ch, ROUND_SECONDS)
            bare_rates.append(b)
            kit_rates.append(k)
            ratios.append(k / b)
        await bare_ch.close()
        await kit_ch.close()
    ratio = statistics.median(ratios)
    print(f"bare grpc.aio server : {statistics.median(bare_rates):8.0f} calls/s")
    print(f"kit server           : {statistics.median(kit_rates):8.0f} calls/s")
    verdict = "meets" if ratio >= GOAL else "MISSES"
    print(f"ratio kit/bare       : {ratio:.2f}  (goal ≥ {GOAL}; {verdict} it)")


def main() -> None:
    asyncio.run(run())


if __name__ == "__main__":
    main()
