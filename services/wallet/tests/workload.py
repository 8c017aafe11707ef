"""A randomized money workload for the invariant tests: many clients, every kind of call, retries."""

from __future__ import annotations

import asyncio
import random
import uuid
from dataclasses import dataclass, field

import grpc

from gpudeck.proto.common.v1.money_pb2 import Money
from gpudeck.proto.wallet.v1 import wallet_pb2 as pb
from gpudeck.proto.wallet.v1.wallet_pb2_grpc import WalletServiceStub

USD = 1_000_000


@dataclass
class Record:
    """What the clients were told: acknowledged transaction ids and holds, by key."""

    transactions: dict[tuple[str, str], str] = field(default_factory=dict)  # (org, key) → tx id
    holds: dict[str, str] = field(default_factory=dict)  # hold id → org
    errors: dict[str, int] = field(default_factory=dict)
    calls: int = 0


async def client(
    stub: WalletServiceStub, orgs: list[uuid.UUID], record: Record, seed: int, ops: int
) -> None:
    rng = random.Random(seed)
    sent: list[pb.TransferRequest] = []
    my_holds: list[str] = []
    for _ in range(ops):
        org = str(rng.choice(orgs))
        choice = rng.random()
        try:
            record.calls += 1
            if choice < 0.25 or not sent:
                req = pb.TransferRequest(
                    idempotency_key=uuid.uuid4().hex, organization_id=org, kind=pb.TOPUP,
                    amount=Money(amount=rng.randint(1, 20) * USD),
                )  # fmt: skip
                tx = await stub.Transfer(req, timeout=10)
                sent.append(req)
                record.transactions[(org, req.idempotency_key)] = tx.id
            elif choice < 0.50:
                req = pb.TransferRequest(
                    idempotency_key=uuid.uuid4().hex, organization_id=org, kind=pb.CHARGE,
                    amount=Money(amount=rng.randint(1, 15) * USD), resource_type="pod",
                )  # fmt: skip
                tx = await stub.Transfer(req, timeout=10)
                sent.append(req)
                record.transactions[(org, req.idempotency_key)] = tx.id
            elif choice < 0.60:
                req = rng.choice(sent)  # a retry: must answer the first transaction again
                tx = await stub.Transfer(req, timeout=10)
                first = record.transactions.get((req.organization_id, req.idempotency_key))
                if first is not None and first != tx.id:
                    raise AssertionError(f"retry of {req.idempotency_key} gave another transaction")
                record.transactions[(req.organization_id, req.idempotency_key)] = tx.id
            elif choice < 0.78:
                hold = await stub.CreateHold(
                    pb.CreateHoldRequest(
                        idempotency_key=uuid.uuid4().hex, organization_id=org,
                        amount=rng.randint(1, 10) * USD, timeout_seconds=rng.choice([1, 60]),
                    ),
                    timeout=10,
                )  # fmt: skip
                my_holds.append(hold.id)
                record.holds[hold.id] = org
            elif choice < 0.92 and my_holds:
                hold_id = rng.choice(my_holds)
                amount = rng.randint(0, 12) * USD
                await stub.CaptureHold(
                    pb.CaptureHoldRequest(
                        idempotency_key=f"cap-{hold_id}-{amount}", hold_id=hold_id, amount=amount
                    ),
                    timeout=10,
                )
            elif my_holds:
                hold_id = rng.choice(my_holds)
                await stub.VoidHold(
                    pb.VoidHoldRequest(idempotency_key=f"void-{hold_id}", hold_id=hold_id),
                    timeout=10,
                )
        except grpc.aio.AioRpcError as exc:
            name = exc.code().name
            record.errors[name] = record.errors.get(name, 0) + 1
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                await asyncio.sleep(0.05)


async def run(stub: WalletServiceStub, orgs: list[uuid.UUID], *, clients: int, ops: int) -> Record:
    record = Record()
    await asyncio.gather(*(client(stub, orgs, record, seed, ops) for seed in range(clients)))
    return record
