"""A randomized money workload for the invariant tests: many clients, every kind of call, retries.

Besides plain calls it sends what clients get wrong or do twice:
- retries of an acknowledged call (must answer the first result again);
- the same idempotency key with a different payload (must be refused, writing nothing);
- several concurrent copies of one call (exactly one write; every caller gets the same answer).

What the clients were told is kept in a `Record`, for the tests to compare with the database.
Given a pool, a sampler reads every wallet of the run many times while it goes and notes any
moment where spendable (balance − held) was negative or held ≠ the sum of open holds.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc
from psycopg_pool import AsyncConnectionPool

from gpudeck.proto.common.v1.money_pb2 import Money
from gpudeck.proto.wallet.v1 import wallet_pb2 as pb
from gpudeck.proto.wallet.v1.wallet_pb2_grpc import WalletServiceStub

USD = 1_000_000
TRANSPORT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
COPIES = 4  # concurrent copies of one call


@dataclass
class Record:
    """What the clients were told, and what must never have happened."""

    transactions: dict[tuple[str, str], str] = field(default_factory=dict)  # (org, key) → tx id
    # (org, key) → (kind, amount) of the request that key was first acknowledged for.
    payloads: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    holds: dict[str, str] = field(default_factory=dict)  # hold id → org
    hold_amounts: dict[str, int] = field(default_factory=dict)  # hold id → amount acknowledged
    captures: dict[str, tuple[int, str]] = field(default_factory=dict)  # hold → (amount, tx id)
    voids: set[str] = field(default_factory=set)  # holds whose void was acknowledged
    reused_keys_refused: int = 0  # different payloads under a used key, refused as they must be
    concurrent_keys: set[tuple[str, str]] = field(default_factory=set)  # acknowledged (org, key)
    concurrent_holds: int = 0  # keys of holds sent as concurrent copies and acknowledged
    samples: int = 0  # reads of the wallets by the sampler
    violations: list[str] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    calls: int = 0
    # Transfers whose answer the transport lost (the wallet killed mid-call): each must be in
    # the ledger whole or not at all, and its retry must answer as the ledger says.
    lost: list[pb.TransferRequest] = field(default_factory=list)

    def error(self, exc: grpc.aio.AioRpcError) -> None:
        name = exc.code().name
        self.errors[name] = self.errors.get(name, 0) + 1

    def transfer_acknowledged(self, req: pb.TransferRequest, tx_id: str) -> None:
        scoped = (req.organization_id, req.idempotency_key)
        first = self.transactions.get(scoped)
        if first is not None and first != tx_id:
            self.violations.append(f"key {req.idempotency_key} answered {first}, then {tx_id}")
        self.transactions.setdefault(scoped, tx_id)
        self.payloads.setdefault(scoped, (req.kind, req.amount.amount))

    def hold_acknowledged(self, org: str, hold: pb.Hold) -> None:
        self.holds[hold.id] = org
        self.hold_amounts[hold.id] = hold.amount.amount

    def captured(self, hold_id: str, reply: pb.CaptureHoldResponse) -> None:
        amount = reply.hold.captured.amount
        tx_id = reply.transaction.id if reply.HasField("transaction") else ""
        if reply.hold.status != "captured":
            self.violations.append(f"capture of {hold_id} answered status {reply.hold.status}")
        if (amount > 0) != bool(tx_id):
            self.violations.append(f"capture of {hold_id} for {amount} answered tx {tx_id!r}")
        first = self.captures.setdefault(hold_id, (amount, tx_id))
        if first != (amount, tx_id):
            self.violations.append(f"hold {hold_id} acknowledged captured {first}, then {amount}")
        if hold_id in self.voids:
            self.violations.append(f"hold {hold_id} acknowledged both voided and captured")

    def voided(self, hold_id: str, hold: pb.Hold) -> None:
        if hold.status != "voided":
            self.violations.append(f"void of {hold_id} answered status {hold.status}")
        self.voids.add(hold_id)
        if hold_id in self.captures:
            self.violations.append(f"hold {hold_id} acknowledged both captured and voided")


def reason(exc: grpc.aio.AioRpcError) -> str:
    for key, value in exc.trailing_metadata() or ():
        if key == "x-error-reason":
            return str(value)
    return ""


def with_other_payload(req: pb.TransferRequest, rng: random.Random) -> pb.TransferRequest:
    """The same key and organization, a payload that differs (and could not fail for funds)."""
    other = pb.TransferRequest()
    other.CopyFrom(req)
    change = rng.randrange(3)
    if change == 0 and req.kind == pb.TOPUP:
        other.amount.amount = req.amount.amount + 1
    elif change == 0:
        other.kind = pb.TOPUP  # a charge's key reused for a top-up
        other.resource_type = ""
    elif change == 1:
        other.description = "another payload"
    else:
        other.reference = "another-reference"
    return other


async def copies(call: Any, request: Any, n: int = COPIES) -> list[Any]:
    """Send `n` copies of one request at once; each result or its exception."""
    return list(
        await asyncio.gather(*(call(request, timeout=10) for _ in range(n)), return_exceptions=True)
    )


def answers(record: Record, key: str, replies: list[Any], agree: bool = True) -> list[Any]:
    """The acknowledged replies among copies of one call; errors are counted. With `agree`,
    copies of one key must not be acknowledged and refused both (transport errors aside)."""
    acknowledged, refused = [], []
    for reply in replies:
        if isinstance(reply, grpc.aio.AioRpcError):
            record.error(reply)
            if reply.code() not in TRANSPORT:
                refused.append(f"{reply.code().name} {reason(reply)}")
        elif isinstance(reply, BaseException):
            raise reply
        else:
            acknowledged.append(reply)
    if agree and acknowledged and refused:
        record.violations.append(f"copies of {key}: {len(acknowledged)} acknowledged, {refused}")
    return acknowledged


async def client(
    stub: WalletServiceStub, orgs: list[uuid.UUID], record: Record, seed: int, ops: int
) -> None:
    rng = random.Random(seed)
    sent: list[pb.TransferRequest] = []
    sent_holds: list[pb.CreateHoldRequest] = []
    my_holds: list[str] = []
    answered = attempts = 0
    # A call the transport lost (the wallet down) does not count: each client makes `ops` calls
    # that got an answer, so a restart does not use up the workload.
    while answered < ops and attempts < ops * 50:
        attempts += 1
        answered += 1
        org = str(rng.choice(orgs))
        choice = rng.random()
        try:
            record.calls += 1
            if choice < 0.22 or not sent:
                req = pb.TransferRequest(
                    idempotency_key=uuid.uuid4().hex, organization_id=org, kind=pb.TOPUP,
                    amount=Money(amount=rng.randint(1, 20) * USD),
                )  # fmt: skip
                tx = await transfer(stub, record, req)
                sent.append(req)
                record.transfer_acknowledged(req, tx.id)
            elif choice < 0.44:
                req = pb.TransferRequest(
                    idempotency_key=uuid.uuid4().hex, organization_id=org, kind=pb.CHARGE,
                    amount=Money(amount=rng.randint(1, 15) * USD), resource_type="pod",
                )  # fmt: skip
                tx = await transfer(stub, record, req)
                sent.append(req)
                record.transfer_acknowledged(req, tx.id)
            elif choice < 0.50:
                req = rng.choice(sent)  # a retry: must answer the first transaction again
                tx = await stub.Transfer(req, timeout=10)
                record.transfer_acknowledged(req, tx.id)
            elif choice < 0.56:
                await reuse_key(stub, record, with_other_payload(rng.choice(sent), rng))
            elif choice < 0.61:
                await concurrent_transfer(stub, record, org, rng)
            elif choice < 0.74:
                hreq = pb.CreateHoldRequest(
                    idempotency_key=uuid.uuid4().hex, organization_id=org,
                    amount=rng.randint(1, 10) * USD, timeout_seconds=rng.choice([1, 60]),
                )  # fmt: skip
                if rng.random() < 0.3:
                    if await concurrent_hold(stub, record, hreq, my_holds):
                        sent_holds.append(hreq)
                else:
                    hold = await stub.CreateHold(hreq, timeout=10)
                    my_holds.append(hold.id)
                    record.hold_acknowledged(org, hold)
                    sent_holds.append(hreq)
            elif choice < 0.77 and sent_holds:
                await reuse_hold_key(stub, record, rng.choice(sent_holds))
            elif choice < 0.90 and my_holds:
                hold_id = rng.choice(my_holds)
                amount = rng.randint(0, 12) * USD
                creq = pb.CaptureHoldRequest(
                    idempotency_key=f"cap-{hold_id}-{amount}", hold_id=hold_id, amount=amount
                )
                replies = await copies(stub.CaptureHold, creq, rng.choice([1, 1, COPIES]))
                for reply in answers(record, creq.idempotency_key, replies):
                    record.captured(hold_id, reply)
            elif my_holds:
                hold_id = rng.choice(my_holds)
                vreq = pb.VoidHoldRequest(idempotency_key=f"void-{hold_id}", hold_id=hold_id)
                replies = await copies(stub.VoidHold, vreq, rng.choice([1, 1, COPIES]))
                for reply in answers(record, vreq.idempotency_key, replies):
                    record.voided(hold_id, reply)
        except grpc.aio.AioRpcError as exc:
            record.error(exc)
            if exc.code() in TRANSPORT:
                answered -= 1
                await asyncio.sleep(0.05)


async def transfer(stub: WalletServiceStub, record: Record, req: pb.TransferRequest) -> Any:
    """`req` sent; one whose answer the transport lost is noted in `record.lost`."""
    try:
        return await stub.Transfer(req, timeout=10)
    except grpc.aio.AioRpcError as exc:
        if exc.code() in TRANSPORT:
            record.lost.append(req)
        raise


async def reuse_key(stub: WalletServiceStub, record: Record, req: pb.TransferRequest) -> None:
    """A used key with another payload: refused as IDEMPOTENCY_KEY_REUSED, never written."""
    try:
        tx = await stub.Transfer(req, timeout=10)
    except grpc.aio.AioRpcError as exc:
        if exc.code() in TRANSPORT:
            raise
        if exc.code() != grpc.StatusCode.ABORTED or reason(exc) != "IDEMPOTENCY_KEY_REUSED":
            record.violations.append(
                f"reused key {req.idempotency_key} refused as {exc.code().name}"
                f" {reason(exc)}: {exc.details()}"
            )
        record.reused_keys_refused += 1
        return
    record.violations.append(
        f"reused key {req.idempotency_key} with another payload was accepted: tx {tx.id}"
    )


async def reuse_hold_key(
    stub: WalletServiceStub, record: Record, req: pb.CreateHoldRequest
) -> None:
    """An acknowledged hold's key with another amount: refused, no second hold."""
    other = pb.CreateHoldRequest()
    other.CopyFrom(req)
    other.amount = req.amount + 1
    try:
        hold = await stub.CreateHold(other, timeout=10)
    except grpc.aio.AioRpcError as exc:
        if exc.code() in TRANSPORT:
            raise
        if exc.code() != grpc.StatusCode.ABORTED or reason(exc) != "IDEMPOTENCY_KEY_REUSED":
            record.violations.append(
                f"reused hold key {req.idempotency_key} refused as {exc.code().name}"
                f" {reason(exc)}: {exc.details()}"
            )
        record.reused_keys_refused += 1
        return
    record.violations.append(
        f"reused hold key {req.idempotency_key} with another amount was accepted: {hold.id}"
    )


async def concurrent_transfer(
    stub: WalletServiceStub, record: Record, org: str, rng: random.Random
) -> None:
    """COPIES identical transfers at once: one transaction, every answer its id."""
    req = pb.TransferRequest(
        idempotency_key=f"many-{uuid.uuid4().hex}", organization_id=org,
        kind=rng.choice([pb.TOPUP, pb.TOPUP, pb.CHARGE]),
        amount=Money(amount=rng.randint(1, 5) * USD), resource_type="pod",
    )  # fmt: skip
    replies = await copies(stub.Transfer, req)
    # A refused charge writes nothing, so a copy after it may pass once funds arrive; a
    # top-up cannot be refused, so its copies must agree.
    ids = set()
    for reply in answers(record, req.idempotency_key, replies, agree=req.kind == pb.TOPUP):
        ids.add(reply.id)
        record.transfer_acknowledged(req, reply.id)
    if len(ids) > 1:
        record.violations.append(f"concurrent copies of {req.idempotency_key} answered {ids}")
    if ids:
        record.concurrent_keys.add((org, req.idempotency_key))


async def concurrent_hold(
    stub: WalletServiceStub, record: Record, req: pb.CreateHoldRequest, my_holds: list[str]
) -> bool:
    """COPIES identical hold requests at once: one hold, every answer it; True if acknowledged."""
    ids = set()
    for reply in answers(record, req.idempotency_key, await copies(stub.CreateHold, req), False):
        ids.add(reply.id)
        record.hold_acknowledged(req.organization_id, reply)
    if len(ids) > 1:
        record.violations.append(f"concurrent copies of hold {req.idempotency_key} gave {ids}")
    if ids:
        record.concurrent_holds += 1
        my_holds.extend(ids)
    return bool(ids)


# One statement, so one snapshot: each wallet's balance, held balance and its open holds.
SAMPLE = """
SELECT w.organization_id, w.balance, w.held_balance, coalesce(h.held, 0)
FROM wallets w
LEFT JOIN (SELECT organization_id, sum(amount) AS held FROM holds
           WHERE status = 'open' AND organization_id = ANY(%(orgs)s) GROUP BY organization_id) h
       ON h.organization_id = w.organization_id
WHERE w.organization_id = ANY(%(orgs)s)
"""


async def sample(
    pool: AsyncConnectionPool, orgs: list[uuid.UUID], record: Record, stop: asyncio.Event
) -> None:
    """Until `stop`: read the wallets every few milliseconds; note spendable < 0 and held
    balances that are not their open holds."""
    async with pool.connection() as conn:
        while not stop.is_set():
            cur = await conn.execute(SAMPLE, {"orgs": orgs})
            for org, balance, held, open_holds in await cur.fetchall():
                if balance - held < 0:
                    record.violations.append(
                        f"wallet {org}: spendable {balance - held} < 0 (balance {balance},"
                        f" held {held}) during the run"
                    )
                if held != open_holds:
                    record.violations.append(
                        f"wallet {org}: held {held} but open holds {open_holds} during the run"
                    )
            record.samples += 1
            await asyncio.sleep(0.01)


async def run(
    stub: WalletServiceStub,
    orgs: list[uuid.UUID],
    *,
    clients: int,
    ops: int,
    pool: AsyncConnectionPool | None = None,
    record: Record | None = None,
) -> Record:
    """Run `clients` clients of `ops` answered calls each; with `pool`, sample the wallets
    meanwhile. Pass a `record` to watch it fill while the workload runs."""
    record = record if record is not None else Record()
    stop = asyncio.Event()
    sampler = asyncio.ensure_future(sample(pool, orgs, record, stop)) if pool else None
    try:
        await asyncio.gather(*(client(stub, orgs, record, seed, ops) for seed in range(clients)))
    finally:
        stop.set()
        if sampler is not None:
            await sampler
    return record
