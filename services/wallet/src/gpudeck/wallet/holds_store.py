"""All SQL of holds. Lock order as everywhere: the wallet row first, then the hold."""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

from psycopg import AsyncConnection

from gpudeck.kit.errors import NotFound
from gpudeck.wallet import events, idempotency
from gpudeck.wallet.holds import (
    Hold,
    HoldRequest,
    capture_amount,
    capture_fingerprint,
    check_open,
    room_for_hold,
    void_fingerprint,
)
from gpudeck.wallet.ids import uuid7
from gpudeck.wallet.ledger import Kind, Transaction, TransferRequest, short_of_funds
from gpudeck.wallet.ledger_store import LedgerStore, db_now, lock_wallets

Conn = AsyncConnection[Any]
COLUMNS = (
    "h.id, h.organization_id, h.amount, w.currency, h.status, h.captured, h.description,"
    " h.project_id, h.resource_type, h.resource_id, h.created_at, h.expires_at, h.resolved_at,"
    " h.transaction_id"
)


def _hold(row: Any) -> Hold:
    return Hold(*row)


class HoldStore:
    def __init__(self, ledger: LedgerStore) -> None:
        self.ledger = ledger
        self.outbox = ledger.outbox
        ledger.expire_holds = self._expire_amounts  # its transfers expire holds past their time

    async def get(self, conn: Conn, hold_id: uuid.UUID, *, lock: bool = False) -> Hold:
        cur = await conn.execute(
            f"SELECT {COLUMNS} FROM holds h JOIN wallets w USING (organization_id)"
            f" WHERE h.id = %s{' FOR UPDATE OF h' if lock else ''}",
            (hold_id,),
        )
        row = await cur.fetchone()
        if row is None:
            raise NotFound(f"hold {hold_id} not found", field="hold_id")
        return _hold(row)

    async def list_open(self, conn: Conn, organization_id: uuid.UUID, limit: int) -> list[Hold]:
        """The organization's open holds, newest first, without those past their expiry that
        the sweep has not reached yet (NotFound for no such organization)."""
        cur = await conn.execute(
            "SELECT 1 FROM wallets WHERE organization_id = %s", (organization_id,)
        )
        if await cur.fetchone() is None:
            raise NotFound(f"organization {organization_id} not found", field="organization_id")
        cur = await conn.execute(
            f"SELECT {COLUMNS} FROM holds h JOIN wallets w USING (organization_id)"
            " WHERE h.organization_id = %s AND h.status = 'open' AND h.expires_at > now()"
            " ORDER BY h.created_at DESC, h.id DESC LIMIT %s",
            (organization_id, limit),
        )
        return [_hold(row) for row in await cur.fetchall()]

    async def create(self, conn: Conn, request: HoldRequest, *, actor: str = "") -> Hold:
        request.validate()
        now = await db_now(conn)
        locked = await lock_wallets(conn, [request.organization_id], now)
        if request.organization_id not in locked:
            raise NotFound(
                f"organization {request.organization_id} not found", field="organization_id"
            )
        scope, fingerprint = str(request.organization_id), request.fingerprint()
        earlier = await idempotency.recall_in_wallet(
            conn, request.organization_id, request.key, fingerprint
        )
        if earlier is not None:
            return Hold.from_json(earlier)
        await self.ledger.projects.use(conn, request.organization_id, request.project_id)
        await self.ledger.expire_due_holds(conn, locked)  # the sweep may not have come by yet
        wallet = locked[request.organization_id].wallet
        expires_at = now + timedelta(seconds=request.timeout_seconds)
        # Only credits that outlive a hold back it: the sweep takes the others away while it
        # is still open, and spendable would go below zero (room_for_hold).
        others: list[tuple[int, datetime]] = []
        if wallet.held_balance:
            cur = await conn.execute(
                "SELECT amount, expires_at FROM holds"
                " WHERE organization_id = %s AND status = 'open' AND expires_at > %s",
                (wallet.organization_id, now),
            )
            others = [(amount, ends) for amount, ends in await cur.fetchall()]
        room, short_at = room_for_hold(wallet, others, expires_at, now)
        if room < request.amount:
            raise short_of_funds(room, request.amount, wallet.currency, until=short_at)
        hold = Hold(
            id=uuid7(),
            organization_id=request.organization_id,
            amount=request.amount,
            currency=wallet.currency,
            status="open",
            captured=0,
            description=request.description,
            project_id=request.project_id,
            resource_type=request.resource_type,
            resource_id=request.resource_id,
            created_at=now,
            expires_at=expires_at,
            resolved_at=None,
        )
        await conn.execute(
            "INSERT INTO holds (id, organization_id, amount, description, project_id,"
            " resource_type, resource_id, created_at, expires_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (hold.id, hold.organization_id, hold.amount, hold.description, hold.project_id,
             hold.resource_type, hold.resource_id, hold.created_at, hold.expires_at),
        )  # fmt: skip
        await self._move_held(conn, {hold.organization_id: hold.amount}, now)
        await idempotency.remember(conn, scope, request.key, fingerprint, hold.to_json())
        await self.outbox.add(conn, self._event("wallet.hold.created", hold))
        return hold

    async def capture(
        self, conn: Conn, hold_id: uuid.UUID, amount: int | None, key: str, *, actor: str = ""
    ) -> tuple[Hold, Transaction | None]:
        hold = await self._lock(conn, hold_id)
        scope, fingerprint = str(hold.organization_id), capture_fingerprint(hold_id, amount)
        earlier = await idempotency.recall_in_wallet(conn, hold.organization_id, key, fingerprint)
        if earlier is not None:
            first = Hold.from_json(earlier)
            txs = await self.ledger.load_transactions(
                conn, [first.transaction_id] if first.transaction_id else []
            )
            return first, txs.get(first.transaction_id) if first.transaction_id else None
        now = await db_now(conn)
        take = capture_amount(hold, amount, now)
        await self._move_held(conn, {hold.organization_id: -hold.amount}, now)
        transaction = None
        if take > 0:
            [outcome] = await self.ledger.post_transfers(
                conn,
                [
                    TransferRequest(
                        key=f"hold:{hold.id}:capture",
                        organization_id=hold.organization_id,
                        kind=Kind.CHARGE,
                        amount=take,
                        description=hold.description or f"Captured hold {hold.id}",
                        project_id=hold.project_id,
                        resource_type=hold.resource_type,
                        resource_id=hold.resource_id,
                        reference=str(hold.id),
                        actor=actor,
                        allow_overdraft=True,
                    )
                ],
                now=now,
            )
            if outcome.error is not None:
                raise outcome.error
            transaction = outcome.transaction
        resolved = await self._resolve(conn, hold, "captured", take, now, transaction)
        await idempotency.remember(conn, scope, key, fingerprint, resolved.to_json())
        return resolved, transaction

    async def void(self, conn: Conn, hold_id: uuid.UUID, key: str) -> Hold:
        hold = await self._lock(conn, hold_id)
        scope, fingerprint = str(hold.organization_id), void_fingerprint(hold_id)
        earlier = await idempotency.recall_in_wallet(conn, hold.organization_id, key, fingerprint)
        if earlier is not None:
            return Hold.from_json(earlier)
        now = await db_now(conn)
        check_open(hold, now)
        await self._move_held(conn, {hold.organization_id: -hold.amount}, now)
        resolved = await self._resolve(conn, hold, "voided", 0, now, None)
        await idempotency.remember(conn, scope, key, fingerprint, resolved.to_json())
        return resolved

    async def expire_due(self, conn: Conn, *, limit: int = 1000) -> int:
        """Expire open holds past their time; return how many."""
        cur = await conn.execute(
            "SELECT DISTINCT organization_id FROM holds"
            " WHERE status = 'open' AND expires_at <= now() LIMIT %s",
            (limit,),
        )
        orgs = [row[0] for row in await cur.fetchall()]
        if not orgs:
            return 0
        now = await db_now(conn)
        await lock_wallets(conn, orgs, now)
        return len(await self._expire(conn, orgs, now))

    async def _expire(self, conn: Conn, orgs: list[uuid.UUID], now: datetime) -> list[Hold]:
        """Expire these organizations' open holds past their time (the caller holds their
        wallets); the holds expired."""
        cur = await conn.execute(
            "UPDATE holds h SET status = 'expired', resolved_at = %s"
            " FROM wallets w WHERE w.organization_id = h.organization_id"
            " AND h.organization_id = ANY(%s) AND h.status = 'open' AND h.expires_at <= %s"
            f" RETURNING {COLUMNS}",
            (now, orgs, now),
        )
        expired = [_hold(row) for row in await cur.fetchall()]
        released: dict[uuid.UUID, int] = defaultdict(int)
        for hold in expired:
            released[hold.organization_id] -= hold.amount
        await self._move_held(conn, released, now)
        # The wallet's own act, whoever's call met the hold past its time.
        await self.outbox.add_many(
            conn, [self._event("wallet.hold.expired", h, actor="system") for h in expired]
        )
        return expired

    async def _expire_amounts(
        self, conn: Conn, orgs: list[uuid.UUID], now: datetime
    ) -> list[tuple[uuid.UUID, int]]:
        return [(h.organization_id, h.amount) for h in await self._expire(conn, orgs, now)]

    async def _lock(self, conn: Conn, hold_id: uuid.UUID) -> Hold:
        """Lock the hold's wallet, then the hold; return it as it stands."""
        hold = await self.get(conn, hold_id)
        await lock_wallets(conn, [hold.organization_id], await db_now(conn))
        return await self.get(conn, hold_id, lock=True)

    async def _move_held(self, conn: Conn, deltas: dict[uuid.UUID, int], now: datetime) -> None:
        if not deltas:
            return
        orgs = sorted(deltas)
        self.ledger.mark_changed(orgs)
        await conn.execute(
            "UPDATE wallets w SET held_balance = w.held_balance + v.d, changed_at = %s,"
            " updated_at = %s FROM unnest(%s::uuid[], %s::bigint[]) AS v(o, d)"
            " WHERE w.organization_id = v.o",
            (now, now, orgs, [deltas[o] for o in orgs]),
        )

    async def _resolve(
        self,
        conn: Conn,
        hold: Hold,
        status: str,
        captured: int,
        now: datetime,
        transaction: Transaction | None,
    ) -> Hold:
        cur = await conn.execute(
            "UPDATE holds h SET status = %s, captured = %s, resolved_at = %s, transaction_id = %s"
            " FROM wallets w WHERE w.organization_id = h.organization_id"
            " AND h.id = %s AND h.status = 'open'"
            f" RETURNING {COLUMNS}",
            (status, captured, now, transaction.id if transaction else None, hold.id),
        )
        row = await cur.fetchone()
        assert row is not None, "hold was resolved under our lock"
        resolved = _hold(row)
        await self.outbox.add(conn, self._event(f"wallet.hold.{status}", resolved))
        return resolved

    @staticmethod
    def _event(event_type: str, hold: Hold, *, actor: str = "") -> Any:
        return events.hold_changed(
            event_type,
            hold.organization_id,
            hold.id,
            hold.status,
            hold.amount,
            hold.captured,
            hold.currency,
            hold.project_id,
            actor=actor,
        )
