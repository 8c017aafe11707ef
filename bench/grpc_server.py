"""A server process for the gRPC benches: `python -m bench.grpc_server bare|kit|transfer PORT`.

- bare: a plain grpc.aio server with the Diagnostics service (bench_grpc's baseline);
- kit: the kit's server, all interceptors on (bench_grpc);
- transfer: the kit's server answering WalletService.Transfer with a fixed transaction and no
  database: what gRPC alone costs a single transfer (bench_ledger's reference).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from gpudeck.cli.embedded import free_port
from gpudeck.kit.grpcserver import DiagnosticsServicer, KitServer, Registration
from gpudeck.proto.common.v1.money_pb2 import Money
from gpudeck.proto.kit.v1 import diagnostics_pb2_grpc
from gpudeck.proto.wallet.v1 import wallet_pb2 as pb
from gpudeck.proto.wallet.v1 import wallet_pb2_grpc

TOKEN = "bench-token"


class TransferEcho(wallet_pb2_grpc.WalletServiceServicer):
    """Transfer answers a transaction shaped like the wallet's (two postings), touching nothing."""

    def __init__(self) -> None:
        tx = pb.Transaction(
            id=str(uuid.uuid4()), organization_id=str(uuid.uuid4()), kind=pb.TOPUP,
            amount=Money(amount=1_000, currency="USD"), resource_type="pod",
            balance_after=Money(amount=10**12, currency="USD"), actor="bench",
        )  # fmt: skip
        tx.created_at.GetCurrentTime()
        for account, amount in (
            (f"org:{tx.organization_id}:cash", 1_000),
            ("platform:funding:USD", -1_000),
        ):
            tx.postings.add(account=account, amount=amount, balance_after=amount, currency="USD")
        self.template = tx

    async def Transfer(self, request: pb.TransferRequest, context: Any) -> pb.Transaction:
        answer = pb.Transaction()
        answer.CopyFrom(self.template)
        answer.idempotency_key = request.idempotency_key
        return answer


async def serve(kind: str, port: int) -> None:
    if kind in ("kit", "transfer"):
        registrations = []
        if kind == "transfer":
            registrations.append(
                Registration(
                    wallet_pb2_grpc.add_WalletServiceServicer_to_server,
                    TransferEcho(),
                    pb.DESCRIPTOR.services_by_name["WalletService"].full_name,
                )
            )
        kit = KitServer("wallet", f"127.0.0.1:{port}", token=TOKEN, registrations=registrations)
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


@contextmanager
def server_process(kind: str) -> Iterator[str]:
    """`python -m bench.grpc_server KIND` on a free port; yields its address."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.grpc_server", kind, str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], int(sys.argv[2])))
