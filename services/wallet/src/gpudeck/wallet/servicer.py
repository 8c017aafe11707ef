"""The wallet's gRPC services: WalletService composed of one part per concern, and
AccountService. Each part is thin: decode, call the domain or store, encode."""

from __future__ import annotations

from gpudeck.proto.wallet.v1 import wallet_pb2_grpc
from gpudeck.wallet.deps import Wallet
from gpudeck.wallet.ledger_rpcs import LedgerRpcs
from gpudeck.wallet.plan_rpcs import PlanRpcs
from gpudeck.wallet.read_rpcs import ReadRpcs


class WalletServicer(LedgerRpcs, ReadRpcs, PlanRpcs, wallet_pb2_grpc.WalletServiceServicer):
    def __init__(self, wallet: Wallet) -> None:
        self.wallet = wallet
