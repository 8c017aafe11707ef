"""The wallet service: what it serves (AccountService, WalletService) and runs beside them."""

from __future__ import annotations

from pathlib import Path

from gpudeck.kit.grpcserver import Registration
from gpudeck.kit.runtime import ServiceContext, ServiceParts, ServiceSpec
from gpudeck.proto.wallet.v1 import account_pb2, account_pb2_grpc, wallet_pb2, wallet_pb2_grpc
from gpudeck.wallet import demo, workers
from gpudeck.wallet.account_rpcs import AccountServicer
from gpudeck.wallet.deps import Wallet
from gpudeck.wallet.servicer import WalletServicer
from gpudeck.wallet.settings import WalletSettings


async def build(ctx: ServiceContext) -> ServiceParts:
    settings = WalletSettings.from_env(ctx.env)
    wallet = Wallet(ctx.pool, settings)
    if settings.demo:
        await demo.seed(ctx.pool, bootstrap_token=settings.bootstrap_token or None)
    registrations = [
        Registration(
            account_pb2_grpc.add_AccountServiceServicer_to_server,
            AccountServicer(wallet),
            account_pb2.DESCRIPTOR.services_by_name["AccountService"].full_name,
        ),
        Registration(
            wallet_pb2_grpc.add_WalletServiceServicer_to_server,
            WalletServicer(wallet),
            wallet_pb2.DESCRIPTOR.services_by_name["WalletService"].full_name,
        ),
    ]
    return ServiceParts(registrations=registrations, workers=workers.loops(wallet))


SPEC = ServiceSpec(
    name="wallet",
    migrations=Path(__file__).parent / "migrations",
    build=build,
    check_settings=WalletSettings.from_env,
)
