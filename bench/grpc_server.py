"""A server process for bench_grpc: `python -m bench.grpc_server bare|kit PORT`."""

from __future__ import annotations

import asyncio
import sys

import grpc

from gpudeck.kit.grpcserver import DiagnosticsServicer, KitServer
from gpudeck.proto.kit.v1 import diagnostics_pb2_grpc

TOKEN = "bench-token"


async def serve(kind: str, port: int) -> None:
    if kind == "kit":
        kit = KitServer("wallet", f"127.0.0.1:{port}", token=TOKEN)
        await kit.start()
    else:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        diagnostics_pb2_grpc.add_DiagnosticsServicer_to_server(
            DiagnosticsServicer("wallet"), server
        )
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], int(sys.argv[2])))
