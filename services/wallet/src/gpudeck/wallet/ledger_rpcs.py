"""gRPC ⇄ domain for the ledger, holds and meters: decode, call the store, encode."""

from __future__ import annotations

from typing import Any

import grpc

from gpudeck.kit.errors import DomainError, InvalidArgument, NotFound
from gpudeck.kit.logs import actor
from gpudeck.proto.wallet.v1 import wallet_pb2 as pb
from gpudeck.wallet import convert
from gpudeck.wallet.deps import Wallet
from gpudeck.wallet.fast_transfer import currency_of
from gpudeck.wallet.holds import HoldRequest
from gpudeck.wallet.ledger import Outcome, TransferRequest, check_client_key
from gpudeck.wallet.live_actor import require_live_actor, require_live_caller
from gpudeck.wallet.metering import MeterRequest
from gpudeck.wallet.readmodels import check_limit

Ctx = grpc.aio.ServicerContext[Any, Any]
MAX_BATCH = 10_000
MAX_ANSWER_BYTES = 4 * 1024 * 1024  # gRPC's default grpc.max_receive_message_length


def transfer_request(m: pb.TransferRequest, ids: convert.IdCache | None = None) -> TransferRequest:
    kind = convert.KIND_FROM_PROTO.get(m.kind)
    if kind is None:
        raise InvalidArgument(
            "kind must be TOPUP, CHARGE, REFUND, ADJUSTMENT, CREDIT_GRANT or USAGE", field="kind"
        )
    if not m.HasField("amount"):
        raise InvalidArgument("amount is required", field="amount")
    ids = ids or convert.IdCache()
    amount = m.amount
    return TransferRequest(
        key=check_client_key(m.idempotency_key),
        organization_id=ids.parse(m.organization_id, "organization_id"),
        kind=kind,
        amount=amount.amount,
        # as every currency input is read (blanks alone stay, to be refused as no currency)
        currency=amount.currency.strip().upper() or amount.currency,
        description=m.description,
        project_id=ids.optional(m.project_id, "project_id"),
        resource_type=m.resource_type,
        resource_id=m.resource_id,
        credit_expires_at=convert.optional_time(m, "credit_expires_at"),
        credit_source=m.credit_source,
        reference=m.reference,
        actor=actor.get(),
    )


class LedgerRpcs:
    wallet: Wallet

    async def Transfer(self, request: pb.TransferRequest, context: Ctx) -> pb.Transaction:
        transfer = transfer_request(request)
        await require_live_caller(self.wallet.pool)
        return convert.transaction(await self.wallet.transfers.post(transfer))

    async def TransferBatch(
        self, request: pb.TransferBatchRequest, context: Ctx
    ) -> pb.TransferBatchResponse:
        if len(request.transfers) > MAX_BATCH:
            raise InvalidArgument(f"at most {MAX_BATCH} transfers per batch", field="transfers")
        errors: dict[int, DomainError] = {}
        parsed: list[tuple[int, TransferRequest]] = []
        ids = convert.IdCache()
        for i, item in enumerate(request.transfers):
            try:
                parsed.append((i, transfer_request(item, ids)))
            except InvalidArgument as exc:
                errors[i] = exc
        async with self.wallet.pool.connection() as conn, conn.transaction():
            await require_live_actor(conn)
            outcomes = await self.wallet.ledger.post_transfers(conn, [t for _, t in parsed])
            done = {i: outcome for (i, _), outcome in zip(parsed, outcomes, strict=True)}
            response = _batch_answer(request, errors, done)
            # Checked before the commit: a caller that cannot take the answer would never learn
            # what was posted (its retry replays the same answer), so nothing is.
            size = response.ByteSize()
            if size > MAX_ANSWER_BYTES:
                raise InvalidArgument(
                    f"the answer to these {len(request.transfers)} transfers would be {size:,}"
                    f" bytes, more than the {MAX_ANSWER_BYTES:,} a gRPC client takes by default:"
                    " send fewer per batch (this call posted nothing)",
                    field="transfers",
                )
        return response

    async def ListTransactions(
        self, request: pb.ListTransactionsRequest, context: Ctx
    ) -> pb.ListTransactionsResponse:
        org = convert.parse_id(request.organization_id, "organization_id")
        if not 0 <= request.limit <= 500:
            raise InvalidArgument(
                f"limit must be between 1 and 500 (0: 50), got {request.limit}", field="limit"
            )
        limit = request.limit or 50
        listable = {proto: kind.value for kind, proto in convert.KIND_TO_PROTO.items()}
        unknown = [k for k in request.kinds if k not in listable]
        if unknown:
            raise InvalidArgument(f"kinds: {unknown[0]} is no transaction kind", field="kinds")
        kinds = [listable[k] for k in request.kinds]
        before = convert.optional_id(request.before_id, "before_id")
        async with self.wallet.pool.connection() as conn:
            await currency_of(self.wallet.ledger, conn, org)  # NotFound for an unknown one
            if before is not None:  # a cursor is one of the organization's transactions
                cur = await conn.execute(
                    "SELECT 1 FROM transactions WHERE id = %s AND organization_id = %s",
                    (before, org),
                )
                if await cur.fetchone() is None:  # a cursor this listing never gave
                    raise InvalidArgument(
                        f"before_id {before} is no transaction of this organization",
                        field="before_id",
                    )
            cur = await conn.execute(
                "SELECT id FROM transactions WHERE organization_id = %s"
                " AND (%s::uuid IS NULL OR id < %s) AND (cardinality(%s::text[]) = 0 OR kind = ANY(%s))"
                " ORDER BY id DESC LIMIT %s",
                (org, before, before, kinds, kinds, limit),
            )
            ids = [row[0] for row in await cur.fetchall()]
            found = await self.wallet.ledger.load_transactions(conn, ids)
        return pb.ListTransactionsResponse(
            transactions=[convert.transaction(found[i]) for i in ids]
        )

    async def GetTransaction(
        self, request: pb.GetTransactionRequest, context: Ctx
    ) -> pb.Transaction:
        org = convert.parse_id(request.organization_id, "organization_id")
        tx_id = convert.parse_id(request.transaction_id, "transaction_id")
        async with self.wallet.pool.connection() as conn:
            found = (await self.wallet.ledger.load_transactions(conn, [tx_id])).get(tx_id)
        if found is None or found.organization_id != org:
            raise NotFound(f"transaction {tx_id} not found", field="transaction_id")
        return convert.transaction(found)

    # ------------------------------------------------------------------ holds

    async def CreateHold(self, request: pb.CreateHoldRequest, context: Ctx) -> pb.Hold:
        hold_request = HoldRequest(
            key=_require_key(request.idempotency_key),
            organization_id=convert.parse_id(request.organization_id, "organization_id"),
            amount=request.amount,
            timeout_seconds=request.timeout_seconds or HoldRequest.timeout_seconds,
            description=request.description,
            project_id=convert.optional_id(request.project_id, "project_id"),
            resource_type=request.resource_type,
            resource_id=request.resource_id,
        )
        async with self.wallet.pool.connection() as conn, conn.transaction():
            await require_live_actor(conn)
            hold = await self.wallet.holds.create(conn, hold_request)
        return convert.hold(hold)

    async def CaptureHold(
        self, request: pb.CaptureHoldRequest, context: Ctx
    ) -> pb.CaptureHoldResponse:
        hold_id = convert.parse_id(request.hold_id, "hold_id")
        _require_key(request.idempotency_key)
        amount = request.amount if request.HasField("amount") else None
        async with self.wallet.pool.connection() as conn, conn.transaction():
            await require_live_actor(conn)
            hold, tx = await self.wallet.holds.capture(
                conn, hold_id, amount, request.idempotency_key, actor=actor.get()
            )
        response = pb.CaptureHoldResponse(hold=convert.hold(hold))
        if tx is not None:
            response.transaction.CopyFrom(convert.transaction(tx))
        return response

    async def VoidHold(self, request: pb.VoidHoldRequest, context: Ctx) -> pb.Hold:
        hold_id = convert.parse_id(request.hold_id, "hold_id")
        _require_key(request.idempotency_key)
        async with self.wallet.pool.connection() as conn, conn.transaction():
            await require_live_actor(conn)
            hold = await self.wallet.holds.void(conn, hold_id, request.idempotency_key)
        return convert.hold(hold)

    async def GetHold(self, request: pb.GetHoldRequest, context: Ctx) -> pb.Hold:
        hold_id = convert.parse_id(request.hold_id, "hold_id")
        async with self.wallet.pool.connection() as conn:
            return convert.hold(await self.wallet.holds.get(conn, hold_id))

    async def ListHolds(self, request: pb.ListHoldsRequest, context: Ctx) -> pb.ListHoldsResponse:
        org = convert.parse_id(request.organization_id, "organization_id")
        limit = check_limit(request.limit, default=50, maximum=500)
        async with self.wallet.pool.connection() as conn:
            holds = await self.wallet.holds.list_open(conn, org, limit)
        return pb.ListHoldsResponse(holds=[convert.hold(h) for h in holds])

    # ------------------------------------------------------------------ meters

    async def OpenMeter(self, request: pb.OpenMeterRequest, context: Ctx) -> pb.Meter:
        meter_request = MeterRequest(
            meter_id=request.meter_id,
            organization_id=convert.parse_id(request.organization_id, "organization_id"),
            resource_id=request.resource_id,
            resource_type=request.resource_type,
            hourly_rate=request.hourly_rate,
            project_id=convert.optional_id(request.project_id, "project_id"),
            at=convert.optional_time(request, "at"),
        )
        async with self.wallet.pool.connection() as conn, conn.transaction():
            return convert.meter(await self.wallet.meters.open(conn, meter_request))

    async def UpdateMeterRate(self, request: pb.UpdateMeterRateRequest, context: Ctx) -> pb.Meter:
        at = convert.optional_time(request, "at")
        key = _require_key(request.idempotency_key)
        async with self.wallet.pool.connection() as conn, conn.transaction():
            meter = await self.wallet.meters.update_rate(
                conn, _meter_id(request.meter_id), request.hourly_rate, at, key
            )
        return convert.meter(meter)

    async def CloseMeter(self, request: pb.CloseMeterRequest, context: Ctx) -> pb.Meter:
        at = convert.optional_time(request, "at")
        async with self.wallet.pool.connection() as conn, conn.transaction():
            meter = await self.wallet.meters.close(conn, _meter_id(request.meter_id), at)
        return convert.meter(meter)

    async def ListMeters(
        self, request: pb.ListMetersRequest, context: Ctx
    ) -> pb.ListMetersResponse:
        org = convert.parse_id(request.organization_id, "organization_id")
        if not 0 <= request.limit <= MAX_METERS:
            raise InvalidArgument(
                f"limit must be between 1 and {MAX_METERS} (0: all), got {request.limit}",
                field="limit",
            )
        async with self.wallet.pool.connection() as conn:
            meters = await self.wallet.meters.list(
                conn, org, open_only=request.open_only, limit=request.limit or None
            )
        return pb.ListMetersResponse(meters=[convert.meter(m) for m in meters])


MAX_METERS = 1000  # per ListMeters page


def _require_key(key: str) -> str:
    """A caller's idempotency key: given, short, plain, and none of the wallet's own."""
    if not key.strip():
        raise InvalidArgument("idempotency_key is required", field="idempotency_key")
    return check_client_key(key)


def _meter_id(value: str) -> str:
    if not value.strip():
        raise InvalidArgument("meter_id is required", field="meter_id")
    return value


__all__: list[Any] = ["LedgerRpcs"]


def _batch_answer(
    request: pb.TransferBatchRequest, errors: dict[int, DomainError], done: dict[int, Outcome]
) -> pb.TransferBatchResponse:
    """A result per item of `request`, in order: its refusal, or its transaction."""
    response = pb.TransferBatchResponse()
    add = response.results.add
    for i in range(len(request.transfers)):
        error = errors.get(i)
        outcome = done.get(i)
        if outcome is not None:
            error = outcome.error
        if error is not None:
            add(error_code=error.code, error_message=error.message)
        else:
            assert outcome is not None and outcome.transaction is not None
            convert.fill_transaction(
                add().transaction, outcome.transaction, postings=request.include_postings
            )
    return response
