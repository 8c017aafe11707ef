"""All SQL of meters and the billing tick. Lock order: wallet row, then meter rows."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from gpudeck.kit.errors import Conflict, FailedPrecondition, InvalidArgument, NotFound, echo
from gpudeck.kit.logs import actor
from gpudeck.wallet import events, idempotency
from gpudeck.wallet.ledger import Kind, SpendLine, TransferRequest
from gpudeck.wallet.ledger_store import LedgerStore, db_now, lock_wallets
from gpudeck.wallet.metering import (
    MAX_BACKDATE,
    Meter,
    MeterRequest,
    check_rate,
    in_transfers,
    owed,
    rate_change_fingerprint,
)
from gpudeck.wallet.money import MAX_AMOUNT, format_micro
from gpudeck.wallet.organizations_store import lock_wallet_rows

Conn = AsyncConnection[Any]
COLUMNS = (
    "m.id, m.organization_id, m.project_id, m.resource_id, m.resource_type, m.hourly_rate,"
    " m.opened_at, m.closed_at, m.segment_started_at, m.segment_charged, m.billed_until,"
    " m.total_charged, w.currency, m.opening_rate"
)
# What each open meter of these organizations owes since its last bill, charged up to %(now)s:
# `metering.owed` in SQL, in whole numbers (`div`), so no rounding of a quotient comes first.
TICK = """
WITH due AS (
    SELECT id,
           div(hourly_rate::numeric
                 * (extract(epoch FROM (%(now)s::timestamptz - segment_started_at)) * 1000000),
               3600000000)::bigint - segment_charged AS delta
    FROM meters
    WHERE organization_id = ANY(%(orgs)s) AND closed_at IS NULL AND billed_until < %(now)s
)
UPDATE meters m
SET segment_charged = m.segment_charged + due.delta,
    total_charged = m.total_charged + due.delta,
    billed_until = %(now)s
FROM due
WHERE m.id = due.id
RETURNING m.organization_id, m.project_id, m.resource_type, m.resource_id, due.delta
"""
TICK_WRITERS = 2  # chunks of a tick billed at once, by a pool of at least
MIN_POOL_FOR_WRITERS = 6
log = logging.getLogger(__name__)
BILLING_LOCK = int.from_bytes(
    hashlib.sha256(b"gpudeck.wallet.billing").digest()[:8], "big", signed=True
)


class MeterStore:
    def __init__(self, ledger: LedgerStore) -> None:
        self.ledger = ledger
        self.outbox = ledger.outbox

    async def get(self, conn: Conn, meter_id: str, *, lock: bool = False) -> Meter:
        cur = await conn.execute(
            f"SELECT {COLUMNS} FROM meters m JOIN wallets w USING (organization_id)"
            f" WHERE m.id = %s{' FOR UPDATE OF m' if lock else ''}",
            (meter_id,),
        )
        row = await cur.fetchone()
        if row is None:
            raise NotFound(f"meter {echo(meter_id)} not found", field="meter_id")
        return Meter(*row)

    async def _find(self, conn: Conn, meter_id: str) -> Meter | None:
        try:
            return await self.get(conn, meter_id)
        except NotFound:
            return None

    async def list(
        self, conn: Conn, organization_id: uuid.UUID, *, open_only: bool, limit: int | None = None
    ) -> list[Meter]:
        """The organization's meters (only the open ones), newest first; `limit`: that many."""
        cur = await conn.execute(
            f"SELECT {COLUMNS} FROM meters m JOIN wallets w USING (organization_id)"
            " WHERE m.organization_id = %s AND (NOT %s OR m.closed_at IS NULL)"
            " ORDER BY m.opened_at DESC, m.id LIMIT %s",
            (organization_id, open_only, limit),
        )
        return [Meter(*row) for row in await cur.fetchall()]

    async def open(self, conn: Conn, request: MeterRequest) -> Meter:
        """Start billing a resource; opening an open (or closed) meter again returns it."""
        request.validate()
        now = await db_now(conn)
        at = _not_after(request.at, now)
        locked = await lock_wallets(conn, [request.organization_id], now)
        if request.organization_id not in locked:
            raise NotFound(
                f"organization {request.organization_id} not found", field="organization_id"
            )
        # A retry: the same request answers as the first time, even once its time is long
        # past or its project deleted (the meter was opened when both were fine).
        opened = await self._find(conn, request.meter_id)
        if opened is not None:
            return _replayed(opened, request)
        if at < now - MAX_BACKDATE:  # an unset time (1970) would bill decades at once
            raise InvalidArgument(
                f"at {at.isoformat()} is more than {MAX_BACKDATE.days * 24} h ago: a meter opens"
                " when its resource starts costing, at most that long before now",
                field="at",
            )
        await self.ledger.projects.use(conn, request.organization_id, request.project_id)
        cur = await conn.execute(
            "INSERT INTO meters (id, organization_id, project_id, resource_id, resource_type,"
            " hourly_rate, opening_rate, opened_at, segment_started_at, billed_until)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (id) DO NOTHING RETURNING id",
            (request.meter_id, request.organization_id, request.project_id, request.resource_id,
             request.resource_type, request.hourly_rate, request.hourly_rate, at, at, at),
        )  # fmt: skip
        created = await cur.fetchone() is not None
        meter = await self.get(conn, request.meter_id)
        if not created:
            return _replayed(meter, request)
        await self._add_run_rate(conn, meter.organization_id, meter.hourly_rate, now)
        await self.outbox.add(conn, self._event("wallet.meter.opened", meter))
        await self.ledger.refresh_levels(conn, [meter.organization_id], now)
        return meter

    async def update_rate(
        self, conn: Conn, meter_id: str, hourly_rate: int, at: datetime | None, key: str
    ) -> Meter:
        """Bill the meter at `hourly_rate` from `at` (default now). A retry with `key` answers
        as the first call did and changes nothing: a late retry never undoes a newer change."""
        check_rate(hourly_rate)
        meter, now = await self._lock(conn, meter_id)
        org, fingerprint = meter.organization_id, rate_change_fingerprint(meter_id, hourly_rate, at)
        earlier = await idempotency.recall_in_wallet(conn, org, key, fingerprint)
        if earlier is not None:
            return Meter.from_json(earlier)
        updated = await self._change_rate(conn, meter, hourly_rate, at, now)
        await idempotency.remember(conn, str(org), key, fingerprint, updated.to_json())
        return updated

    async def _change_rate(
        self, conn: Conn, meter: Meter, hourly_rate: int, at: datetime | None, now: datetime
    ) -> Meter:
        meter_id = meter.id
        if meter.closed_at is not None:
            raise FailedPrecondition(f"meter {echo(meter_id)} is closed", field="meter_id")
        if meter.hourly_rate == hourly_rate:
            return meter
        at = _in_segment(at, now, meter.segment_started_at)
        # The run rate first: the settling charge's level check is of the wallet as it is after
        # the change (at the old rate, a cut could announce a depletion that never was).
        await self._add_run_rate(conn, meter.organization_id, hourly_rate - meter.hourly_rate, now)
        await self._settle(conn, meter, at, now)
        await conn.execute(
            "UPDATE meters SET hourly_rate = %s, segment_started_at = %s, segment_charged = 0,"
            " billed_until = %s WHERE id = %s",
            (hourly_rate, at, at, meter_id),
        )
        updated = await self.get(conn, meter_id)
        await self.outbox.add(conn, self._event("wallet.meter.updated", updated))
        await self.ledger.refresh_levels(conn, [meter.organization_id], now)
        return updated

    async def close(self, conn: Conn, meter_id: str, at: datetime | None = None) -> Meter:
        """Stop billing: charge up to `at` (refunding what ticks billed past it); idempotent: a
        retry gets the closed meter, unless it names an earlier time than it closed at, which
        is refused, not ignored (a later one may be the first call's own: a time ahead of the
        clock was taken as the clock's)."""
        meter, now = await self._lock(conn, meter_id)
        if meter.closed_at is not None:
            if at is not None and at < meter.closed_at:
                raise Conflict(
                    f"meter {echo(meter_id)} was closed at {meter.closed_at.isoformat()}, not"
                    f" {at.isoformat()}: a retry must send the same request",
                    field="at",
                    reason="IDEMPOTENCY_KEY_REUSED",
                )
            return meter
        at = _in_segment(at, now, meter.segment_started_at)
        await self._add_run_rate(conn, meter.organization_id, -meter.hourly_rate, now)  # first:
        await self._settle(conn, meter, at, now)  # see _change_rate
        await conn.execute(
            "UPDATE meters SET closed_at = %s, billed_until = %s WHERE id = %s", (at, at, meter_id)
        )
        closed = await self.get(conn, meter_id)
        await self.outbox.add(conn, self._event("wallet.meter.closed", closed))
        await self.ledger.refresh_levels(conn, [meter.organization_id], now)
        return closed

    async def bill(self, conn: Conn, organization_ids: Sequence[uuid.UUID]) -> int:
        """Charge these organizations' open meters up to now; return the amount charged."""
        now = await db_now(conn)
        # Their wallets locked first (the lock order: wallet, then meters); what the ledger
        # needs of them it reads itself.
        await lock_wallet_rows(conn, organization_ids)
        cur = await conn.cursor(binary=True).execute(
            TICK, {"now": now, "orgs": list(organization_ids)}
        )
        # One charge per organization and project (its event names the project, for the
        # audit log), its lines per meter (for the rollups).
        lines: dict[tuple[uuid.UUID, uuid.UUID | None], list[SpendLine]] = defaultdict(list)
        for org, project, rtype, rid, delta in await cur.fetchall():
            if delta > 0:
                lines[(org, project)].append(SpendLine(rtype, delta, rid, project))
        stamp = now.isoformat()
        requests = [
            request
            for (org, project), org_lines in sorted(lines.items(), key=_by_org_and_project)
            for request in _metered(
                f"usage:{stamp}:{org}" + (f":{project}" if project else ""),
                org,
                org_lines,
                project_id=project,
            )
        ]
        # `now` is this transaction's own: the set-based fast path may post them (one
        # statement for the organizations without credits whose charge is one resource's).
        outcomes = await self.ledger.post_transfers(
            conn, requests, now=now, now_is_transaction_time=True, wallets_locked=True
        )
        for request, outcome in zip(requests, outcomes, strict=True):
            if outcome.error is not None:
                raise BillingRefused(request.organization_id, outcome.error)
        return sum(r.amount for r in requests)

    async def _lock(self, conn: Conn, meter_id: str) -> tuple[Meter, datetime]:
        meter = await self.get(conn, meter_id)
        now = await db_now(conn)
        await lock_wallets(conn, [meter.organization_id], now)
        return await self.get(conn, meter_id, lock=True), now

    async def _settle(self, conn: Conn, meter: Meter, at: datetime, now: datetime) -> None:
        """Charge (or refund) the meter's current segment so that it has paid exactly up to `at`."""
        delta = owed(meter.hourly_rate, meter.segment_started_at, at) - meter.segment_charged
        if delta == 0:
            return
        await conn.execute(
            "UPDATE meters SET segment_charged = segment_charged + %s,"
            " total_charged = total_charged + %s WHERE id = %s",
            (delta, delta, meter.id),
        )
        line = SpendLine(meter.resource_type, abs(delta), meter.resource_id, meter.project_id)
        # Settled to `at` when (`now`): a segment that starts at T may be settled to T more than
        # once (rate changes dated T with ticks between them); the calls' own keys make them
        # idempotent. At most 6 + 200 + 1 + 32 + 1 + 32 characters, within a key's 300.
        key = f"meter:{meter.id}:{at.isoformat()}@{now.isoformat()}"
        requests = _metered(
            key,
            meter.organization_id,
            [line],
            kind=Kind.USAGE if delta > 0 else Kind.REFUND,
            description="Metered usage" if delta > 0 else "Metered usage correction",
            actor=actor.get() or "system",  # who closed it or changed its rate
            project_id=meter.project_id,
            resource_type=meter.resource_type,
            resource_id=meter.resource_id,
        )
        for outcome in await self.ledger.post_transfers(conn, requests, now=now):
            if outcome.error is not None:
                raise outcome.error

    async def _add_run_rate(
        self, conn: Conn, organization_id: uuid.UUID, delta: int, now: datetime
    ) -> None:
        self.ledger.mark_changed([organization_id])
        cur = await conn.execute(
            "UPDATE wallets SET run_rate = run_rate + %s, changed_at = %s, updated_at = %s"
            " WHERE organization_id = %s RETURNING run_rate",
            (delta, now, now, organization_id),
        )
        row = await cur.fetchone()
        # The sum of its meters may not pass what one meter may: its projections (× 720 h for
        # a month) must stay amounts, or the wallet card could no longer be shown.
        if delta > 0 and row is not None and row[0] > MAX_AMOUNT:
            raise FailedPrecondition(
                f"organization {organization_id} would run at {format_micro(row[0])} per hour,"
                f" more than the {format_micro(MAX_AMOUNT)} its meters may add up to",
                field="hourly_rate",
                reason="RUN_RATE_LIMIT",
            )

    @staticmethod
    def _event(event_type: str, meter: Meter) -> Any:
        return events.meter_changed(
            event_type,
            meter.organization_id,
            meter_id=meter.id,
            resource_type=meter.resource_type,
            resource_id=meter.resource_id,
            hourly_rate=meter.hourly_rate,
            total_charged=meter.total_charged,
            project_id=meter.project_id,
        )


async def bill_open_meters(
    pool: AsyncConnectionPool, store: MeterStore, *, chunk: int = 2000
) -> int:
    """One billing tick: every organization with open meters, `chunk` organizations per commit.

    Only the replica holding the billing lock bills; the others skip the tick. A crash loses
    nothing: an uncommitted chunk is billed by the next tick from its meters' `billed_until`.
    """
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (BILLING_LOCK,))
        row = await cur.fetchone()
        if not row or not row[0]:
            return 0
        try:
            cur = await conn.execute(
                "SELECT DISTINCT organization_id FROM meters WHERE closed_at IS NULL ORDER BY 1"
            )
            orgs = [r[0] for r in await cur.fetchall()]
            parts = [orgs[start : start + chunk] for start in range(0, len(orgs), chunk)]
            if len(parts) == 1 or pool.max_size < MIN_POOL_FOR_WRITERS:
                return sum([await bill_chunk(conn, store, part) for part in parts])
            # Chunks hold disjoint organizations: two at a time, so one is prepared (Python)
            # while the other is written (PostgreSQL), each on its own connection (a pool this
            # large keeps others for the calls meanwhile).
            writers = asyncio.Semaphore(TICK_WRITERS)

            async def bill_part(part: list[uuid.UUID]) -> int:
                async with writers, pool.connection() as writer:
                    return await bill_chunk(writer, store, part)

            # Every chunk ends before the billing lock is let go (one that failed does not
            # leave the others billing after it, unlocked); then the first failure is raised.
            results = await asyncio.gather(*(bill_part(p) for p in parts), return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            return sum(r for r in results if isinstance(r, int))
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (BILLING_LOCK,))


async def bill_chunk(conn: Conn, store: MeterStore, orgs: list[uuid.UUID]) -> int:
    """Bill `orgs` in one commit. An organization whose charge is refused (a bug, or data the
    ledger rejects) is left out and logged, and the others are billed without it: one cannot
    stop the billing of everyone. Its meters keep their `billed_until`; the next tick tries it
    again, so nothing it owes is lost."""
    while orgs:
        try:
            async with conn.transaction():
                return await store.bill(conn, orgs)
        except BillingRefused as refused:
            log.error(
                "billing refused",
                extra={"organization_id": str(refused.organization_id), "error": str(refused)},
            )
            orgs = [o for o in orgs if o != refused.organization_id]
    return 0


class BillingRefused(Exception):
    """The ledger refused one organization's metered usage in a tick."""

    def __init__(self, organization_id: uuid.UUID, error: Exception) -> None:
        super().__init__(f"organization {organization_id}: {error}")
        self.organization_id = organization_id


def _metered(
    key: str,
    organization_id: uuid.UUID,
    lines: list[SpendLine],
    *,
    kind: Kind = Kind.USAGE,
    description: str = "Metered usage",
    actor: str = "system",
    **fields: Any,
) -> list[TransferRequest]:
    """What meters owe (`lines`) as the wallet's own transfers, in parts no larger than one
    transfer moves (`in_transfers`), keyed `key`, `key:1`, …; metered usage may overdraw.
    A part for one resource names it as a transfer does rather than as a line (so the fast
    path, which takes no lines, may post it), unless `fields` name the resource already."""
    requests = []
    for part, group in enumerate(in_transfers(lines)):
        amount = sum(line.amount for line in group)
        named: dict[str, Any] = {}
        if len(group) == 1 and "resource_type" not in fields:
            named = {"resource_type": group[0].resource_type, "resource_id": group[0].resource_id}
            group = []
        requests.append(
            TransferRequest(
                key=key + (f":{part}" if part else ""),
                organization_id=organization_id,
                kind=kind,
                amount=amount,
                description=description,
                lines=tuple(group),
                allow_overdraft=True,
                record_key=False,
                actor=actor,
                **named,
                **fields,
            )
        )
    return requests


def _by_org_and_project(item: tuple[tuple[uuid.UUID, uuid.UUID | None], Any]) -> tuple[str, str]:
    (org, project), _ = item
    return str(org), str(project or "")


def _in_segment(at: datetime | None, now: datetime, start: datetime) -> datetime:
    """The time a rate change or close takes effect in a segment that began at `start`: `at`
    (never in the future), or, when none is given, now. A rate change may have committed
    after this transaction's now() (it began before the wallet's lock was free): then now is
    that change's start, and the segment has owed nothing yet."""
    if at is None:
        return max(now, start)
    return _not_before(_not_after(at, now), start)


def _replayed(meter: Meter, request: MeterRequest) -> Meter:
    """The meter an OpenMeter retry opened, or the refusal of a retry that changes it."""
    other = meter.differs_from(request)
    if other:
        raise Conflict(
            f"meter {echo(request.meter_id)} was opened with another {other}: a retry must"
            " send the same request (UpdateMeterRate changes a rate)",
            field="meter_id",
            reason="IDEMPOTENCY_KEY_REUSED",
        )
    return meter


def _not_after(at: datetime | None, now: datetime) -> datetime:
    if at is None:
        return now
    if at.tzinfo is None:
        raise InvalidArgument("at must carry a time zone", field="at")
    return min(at, now)


def _not_before(at: datetime, start: datetime) -> datetime:
    if at < start:
        raise InvalidArgument(
            f"at {at.isoformat()} is before the meter's current rate began", field="at"
        )
    return at
