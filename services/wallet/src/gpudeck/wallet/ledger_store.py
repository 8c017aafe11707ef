"""All SQL of the ledger: lock a batch's wallets, plan it with `ledger.Book`, write it at once.

One call of `post_transfers` is one database transaction (the caller's): wallets are locked in
organization order, then platform accounts in id order, so concurrent batches never deadlock.
Rows are written with COPY and balances with one set-based UPDATE per table, which is what
makes a batch of a thousand transfers cost little more than one.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import psycopg
from google.protobuf.timestamp_pb2 import Timestamp
from psycopg import AsyncConnection

from gpudeck.kit.errors import Conflict, DomainError, InvalidArgument, NotFound
from gpudeck.kit.events import Outbox
from gpudeck.kit.events.outbox import channel as outbox_channel
from gpudeck.proto.events.v1.envelope_pb2 import Event
from gpudeck.wallet import events
from gpudeck.wallet.alerts import Thresholds, edge_event, level_for
from gpudeck.wallet.idempotency import key_reused
from gpudeck.wallet.ids import uuid7
from gpudeck.wallet.ledger import (
    PLATFORM_ACCOUNT,
    Account,
    Book,
    InsufficientFunds,
    Kind,
    PlannedTransaction,
    PostingView,
    Transaction,
    TransferRequest,
    Wallet,
    kyc_required,
    platform_pool,
    validate,
)

Conn = AsyncConnection[Any]


@dataclass
class Outcome:
    """One transfer's result: its transaction, or why it was refused."""

    transaction: Transaction | None = None
    error: DomainError | None = None


@dataclass
class LockedWallet:
    wallet: Wallet
    thresholds: Thresholds
    auto_topup_below: int = 0
    auto_topup_amount: int = 0


@dataclass
class Policy:
    """Settings of the rules the store applies."""

    depletion_seconds: float = 10.0
    kyc_topup_limit: int = 0  # top-ups above it need a KYC-verified organization; 0: no limit


@dataclass
class Batch:
    """What one transaction of the store collects before it writes."""

    now: datetime
    planned: list[PlannedTransaction] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


# One statement locks the wallets and their spendable accounts (FOR UPDATE OF both), so a
# row that changed while we waited for its lock is re-read at its newest version. Accounts made
# after the statement began (a concurrent credit grant) are not seen: they are not spent by this
# batch, and the wallet totals stay right because they move by deltas from the locked row.
LOCK_WALLETS = """
SELECT w.organization_id, w.currency, w.balance, w.credits, w.held_balance, w.run_rate, w.level,
       o.kyc_status = 'verified', coalesce(t.warning_amount, 0), coalesce(t.critical_amount, 0),
       coalesce(t.warning_hours, 0), coalesce(t.critical_hours, 0),
       CASE WHEN u.enabled THEN u.below ELSE 0 END, coalesce(u.amount, 0),
       a.id, a.kind, a.balance, a.expires_at, a.code
FROM wallets w
JOIN organizations o ON o.id = w.organization_id
JOIN ledger_accounts a
  ON a.organization_id = w.organization_id
 AND (a.kind = 'cash' OR (a.kind = 'credit' AND a.balance > 0))
LEFT JOIN thresholds t ON t.organization_id = w.organization_id
LEFT JOIN auto_topups u ON u.organization_id = w.organization_id
WHERE w.organization_id = ANY(%s)
ORDER BY w.organization_id, a.id
FOR UPDATE OF w, a
"""
# One shard of a platform pool that no other transaction holds; when all are held, any one.
TAKE_PLATFORM = """
SELECT id, code, balance FROM ledger_accounts WHERE kind = 'platform' AND platform_pool = %s
ORDER BY random() LIMIT 1 FOR UPDATE SKIP LOCKED
"""
WAIT_PLATFORM = """
SELECT id, code, balance FROM ledger_accounts WHERE kind = 'platform' AND platform_pool = %s
ORDER BY random() LIMIT 1 FOR UPDATE
"""
FIND_KEYS = """
SELECT organization_id, idempotency_key, fingerprint, id FROM transactions
WHERE (organization_id, idempotency_key) IN (SELECT * FROM unnest(%s::uuid[], %s::text[]))
"""
LATEST_RATE = """
SELECT rate FROM exchange_rates WHERE base = %s AND quote = %s ORDER BY as_of DESC, id DESC LIMIT 1
"""
TRANSACTION_COLUMNS = (
    "id, organization_id, kind, amount, currency, payment_amount, payment_currency,"
    " exchange_rate, description, project_id, resource_type, resource_id, reference,"
    " idempotency_key, fingerprint, actor, balance_after, created_at"
)
INSERT_TRANSACTIONS = f"""
INSERT INTO transactions ({TRANSACTION_COLUMNS})
SELECT * FROM unnest(%s::uuid[], %s::uuid[], %s::text[], %s::bigint[], %s::text[], %s::bigint[],
    %s::text[], %s::text[], %s::text[], %s::uuid[], %s::text[], %s::text[], %s::text[], %s::text[],
    %s::bytea[], %s::text[], %s::bigint[], %s::timestamptz[])
"""
INSERT_POSTINGS = """
INSERT INTO postings (transaction_id, account_id, amount, balance_before, balance_after)
SELECT * FROM unnest(%s::uuid[], %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[])
"""
POST_TRANSFER = "SELECT * FROM post_transfer(" + ", ".join(["%s"] * 20) + ")"
FAST_KINDS = (Kind.TOPUP, Kind.CHARGE, Kind.USAGE, Kind.REFUND, Kind.ADJUSTMENT)
# Above this many transactions a batch is written with COPY instead of pipelined INSERTs.
COPY_THRESHOLD = 64
NEW_CREDIT_ACCOUNTS = """
INSERT INTO ledger_accounts (code, organization_id, kind, currency, expires_at, credit_source)
SELECT 'org:' || o || ':credit:' || k, o, 'credit', c, e, s
FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::timestamptz[], %s::text[]) AS x(o, k, c, e, s)
RETURNING id, code
"""


async def db_now(conn: Conn) -> datetime:
    cur = await conn.execute("SELECT now()")
    row = await cur.fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


async def lock_wallets(
    conn: Conn, organization_ids: Iterable[uuid.UUID], now: datetime
) -> dict[uuid.UUID, LockedWallet]:
    """Lock the wallets of `organization_ids` (in id order) and load their cash and credits."""
    ids = sorted(set(organization_ids))
    if not ids:
        return {}
    cur = await conn.execute(LOCK_WALLETS, (ids,))
    locked: dict[uuid.UUID, LockedWallet] = {}
    for row in await cur.fetchall():
        org = row[0]
        lw = locked.get(org)
        if lw is None:
            (_, currency, balance, credits, held, rate, level, verified) = row[:8]
            (wa, ca, wh, ch, below, amount) = row[8:14]
            wallet = Wallet(
                org, currency, Account(0, 0), [], balance, credits, held, rate, level, verified
            )
            lw = locked[org] = LockedWallet(wallet, Thresholds(wa, ca, wh, ch), below, amount)
        acct_id, kind, acct_balance, expires_at, code = row[14:]
        account = Account(acct_id, acct_balance, kind, expires_at, code)
        if kind == "cash":
            lw.wallet.cash = account
        else:
            lw.wallet.credits.append(account)
    for lw in locked.values():
        lw.wallet.credits.sort(key=lambda a: (a.expires_at is None, a.expires_at or now, a.id))
    return locked


class LedgerStore:
    """Posts transfers and reads transactions back; the one writer of balances."""

    def __init__(self, schema: str = "wallet", *, policy: Policy | None = None) -> None:
        self.outbox = Outbox(schema)
        self.outbox_channel = outbox_channel(schema)
        self.policy = policy or Policy()
        self._currencies: dict[uuid.UUID, str] = {}

    async def post_transfers(
        self, conn: Conn, requests: Sequence[TransferRequest], *, now: datetime | None = None
    ) -> list[Outcome]:
        """Post `requests` in order within the caller's transaction; a result per request.

        Round trips: one to lock and load the wallets, one (pipelined) for earlier keys and the
        platform accounts, one (pipelined, or COPY for large batches) to write everything.
        """
        outcomes: list[Outcome | None] = [None] * len(requests)
        valid: list[int] = []
        for i, request in enumerate(requests):
            try:
                validate(request)
                valid.append(i)
            except DomainError as exc:
                outcomes[i] = Outcome(error=exc)
        batch = Batch(now or await db_now(conn))
        locked = await lock_wallets(conn, (requests[i].organization_id for i in valid), batch.now)
        for i in valid:
            org = requests[i].organization_id
            if org not in locked:
                outcomes[i] = Outcome(
                    error=NotFound(f"organization {org} not found", field="organization_id")
                )
        valid = [i for i in valid if outcomes[i] is None]
        book = Book(
            wallets={org: lw.wallet for org, lw in locked.items()},
            platform={},
            now=batch.now,
            kyc_topup_limit=self.policy.kyc_topup_limit,
        )
        to_plan, replays, same_as = await self._read_around(conn, requests, valid, outcomes, book)
        planned_at: dict[int, PlannedTransaction] = {}
        for i in to_plan:
            try:
                planned_at[i] = book.apply(requests[i], uuid7())
            except DomainError as exc:
                outcomes[i] = Outcome(error=exc)
        batch.planned = list(planned_at.values())
        await self.write(conn, batch, book, locked)
        stored = await self.load_transactions(conn, list(replays.values()))
        for i, tx_id in replays.items():
            outcomes[i] = Outcome(transaction=stored[tx_id])
        for i, planned in planned_at.items():
            outcomes[i] = Outcome(transaction=_view(planned, batch.now))
        for i, first in same_as.items():
            outcomes[i] = outcomes[first]
        return [
            o if o is not None else Outcome(error=DomainError("not processed")) for o in outcomes
        ]

    async def post_one(self, conn: Conn, request: TransferRequest) -> Transaction:
        """Post one transfer in one statement (the `post_transfer` SQL function), the fast path
        of the Transfer RPC; kinds it does not handle go through `post_transfers`.

        Run it outside a transaction: the statement is its own. Raises the refusal."""
        validate(request)
        currency = await self._currency_of(conn, request.organization_id)
        if (
            request.kind not in FAST_KINDS
            or request.lines
            or (request.currency and request.currency != currency and request.kind is Kind.TOPUP)
        ):
            async with conn.transaction():
                [outcome] = await self.post_transfers(conn, [request])
            if outcome.error is not None:
                raise outcome.error
            assert outcome.transaction is not None
            return outcome.transaction
        tx_id = uuid7()
        stamp = Timestamp()
        stamp.GetCurrentTime()
        event = events.transaction_posted(request, tx_id, request.amount, currency, stamp)
        platform = PLATFORM_ACCOUNT[request.kind]
        try:
            cur = await conn.execute(
                POST_TRANSFER,
                (
                    tx_id, request.organization_id, request.kind.value, request.amount,
                    request.currency, request.description, request.project_id,
                    request.resource_type, request.resource_id, request.reference, request.key,
                    request.fingerprint if request.record_key else None, request.actor, platform,
                    request.allow_overdraft, event.id, event.type, event.SerializeToString(),
                    self.outbox_channel, self.policy.kyc_topup_limit,
                ),
            )  # fmt: skip
        except psycopg.errors.RaiseException as exc:
            raise refusal(exc) from None
        row = await cur.fetchone()
        assert row is not None
        (tx_id, replayed, created_at, currency, balance, _credits, _held, rate, level,
         wa, ca, wh, ch, below, codes, amounts, befores, afters) = row  # fmt: skip
        if replayed:
            return (await self.load_transactions(conn, [tx_id]))[tx_id]
        thresholds = Thresholds(wa, ca, wh, ch)
        new_level = level_for(balance, rate, thresholds, self.policy.depletion_seconds)
        if new_level != level or (below and balance < below):
            async with conn.transaction():
                await self.refresh_levels(conn, [request.organization_id], created_at)
        return Transaction(
            id=tx_id,
            organization_id=request.organization_id,
            kind=request.kind,
            amount=request.amount,
            currency=currency,
            payment_amount=request.amount if request.kind is Kind.TOPUP else None,
            payment_currency=currency if request.kind is Kind.TOPUP else None,
            exchange_rate=None,
            description=request.description,
            project_id=request.project_id,
            resource_type=request.resource_type,
            resource_id=request.resource_id,
            reference=request.reference,
            idempotency_key=request.key,
            actor=request.actor,
            balance_after=balance,
            created_at=created_at,
            postings=tuple(
                PostingView(c, a, b, f)
                for c, a, b, f in zip(codes, amounts, befores, afters, strict=True)
            ),
        )

    async def _currency_of(self, conn: Conn, organization_id: uuid.UUID) -> str:
        """The wallet currency of an organization (it never changes, so it is cached)."""
        currency = self._currencies.get(organization_id)
        if currency is None:
            cur = await conn.execute(
                "SELECT currency FROM wallets WHERE organization_id = %s", (organization_id,)
            )
            row = await cur.fetchone()
            if row is None:
                raise NotFound(f"organization {organization_id} not found", field="organization_id")
            currency = row[0]
            if len(self._currencies) > 100_000:
                self._currencies.clear()
            self._currencies[organization_id] = currency
        return currency

    async def _read_around(
        self,
        conn: Conn,
        requests: Sequence[TransferRequest],
        valid: list[int],
        outcomes: list[Outcome | None],
        book: Book,
    ) -> tuple[list[int], dict[int, uuid.UUID], dict[int, int]]:
        """Find retries by key, lock the platform accounts, read exchange rates, make credit
        accounts; return (new requests, retries of earlier calls, repeats within this batch)."""
        wallets = book.wallets
        keyed = [i for i in valid if requests[i].record_key]
        pools = sorted(
            {
                platform_pool(requests[i].kind, wallets[requests[i].organization_id].currency)
                for i in valid
            }
        )
        pairs = sorted(
            {
                (requests[i].currency, wallets[requests[i].organization_id].currency)
                for i in valid
                if requests[i].kind is Kind.TOPUP
                and requests[i].currency
                and requests[i].currency != wallets[requests[i].organization_id].currency
            }
        )
        found: dict[tuple[uuid.UUID, str], tuple[bytes | None, uuid.UUID]] = {}
        async with conn.pipeline():
            keys_cur = None
            if keyed:
                keys_cur = await conn.execute(
                    FIND_KEYS,
                    (
                        [requests[i].organization_id for i in keyed],
                        [requests[i].key for i in keyed],
                    ),
                )
            platform_curs = [(pool, await conn.execute(TAKE_PLATFORM, (pool,))) for pool in pools]
            rate_curs = [(pair, await conn.execute(LATEST_RATE, pair)) for pair in pairs]
            if keys_cur is not None:
                for org, key, fingerprint, tx_id in await keys_cur.fetchall():
                    found[(org, key)] = (bytes(fingerprint) if fingerprint else None, tx_id)
            for pool, cur in platform_curs:
                row = await cur.fetchone()
                if row is not None:
                    book.platform[pool] = Account(row[0], row[2], "platform", None, row[1])
            for pair, cur in rate_curs:
                row = await cur.fetchone()
                if row is not None:
                    book.rates[pair] = Decimal(row[0])
        for pool in pools:
            if pool not in book.platform:  # every shard was held: wait for one
                cur = await conn.execute(WAIT_PLATFORM, (pool,))
                row = await cur.fetchone()
                assert row is not None, f"platform pool {pool} has no accounts"
                book.platform[pool] = Account(row[0], row[2], "platform", None, row[1])
        to_plan: list[int] = []
        replays: dict[int, uuid.UUID] = {}
        same_as: dict[int, int] = {}
        first_of: dict[tuple[uuid.UUID, str], tuple[bytes, int]] = {}
        for i in valid:
            request = requests[i]
            if not request.record_key:
                to_plan.append(i)
                continue
            scoped = (request.organization_id, request.key)
            fingerprint = request.fingerprint
            if scoped in found:
                earlier, tx_id = found[scoped]
                if earlier != fingerprint:
                    outcomes[i] = Outcome(error=key_reused(request.key))
                else:
                    replays[i] = tx_id
            elif scoped in first_of:
                earlier_fp, j = first_of[scoped]
                if earlier_fp != fingerprint:
                    outcomes[i] = Outcome(error=key_reused(request.key))
                else:
                    same_as[i] = j
            else:
                first_of[scoped] = (fingerprint, i)
                to_plan.append(i)
        grants = [requests[i] for i in to_plan if requests[i].kind is Kind.CREDIT_GRANT]
        if grants:
            await self._open_credit_accounts(conn, grants, book)
        return to_plan, replays, same_as

    async def _open_credit_accounts(
        self, conn: Conn, grants: Sequence[TransferRequest], book: Book
    ) -> None:
        wallets = book.wallets
        cur = await conn.execute(
            NEW_CREDIT_ACCOUNTS,
            (
                [g.organization_id for g in grants],
                [g.key for g in grants],
                [wallets[g.organization_id].currency for g in grants],
                [g.credit_expires_at for g in grants],
                [g.credit_source or "promotion" for g in grants],
            ),
        )
        by_code = {code: acct_id for acct_id, code in await cur.fetchall()}
        for g in grants:
            code = f"org:{g.organization_id}:credit:{g.key}"
            book.new_credit_accounts[g.key] = Account(
                by_code[code], 0, "credit", g.credit_expires_at, code
            )

    async def write(
        self, conn: Conn, batch: Batch, book: Book, locked: dict[uuid.UUID, LockedWallet]
    ) -> None:
        """Write the batch's transactions, postings, balances, rollups and events."""
        planned = batch.planned
        if planned:
            batch.events.extend(events.transactions_posted(planned, batch.now))
        touched = sorted({p.request.organization_id for p in planned})
        await self.settle_levels(conn, [locked[o] for o in touched], batch)
        if not planned:
            await self.outbox.add_many(conn, batch.events)
            return
        if len(planned) > COPY_THRESHOLD:
            await self._copy_rows(conn, batch)
            await self.outbox.add_many(conn, batch.events)
            async with conn.pipeline():
                await self._update_balances(conn, planned, book, batch.now)
                await self._roll_up(conn, planned, batch.now)
            return
        async with conn.pipeline():
            await self._insert_rows(conn, batch)
            await self._update_balances(conn, planned, book, batch.now)
            await self._roll_up(conn, planned, batch.now)
            await self.outbox.add_many(conn, batch.events)

    @staticmethod
    def _transaction_rows(batch: Batch) -> list[tuple[Any, ...]]:
        rows = []
        for p in batch.planned:
            r = p.request
            rows.append(
                (
                    p.id, r.organization_id, r.kind.value, p.amount, p.currency,
                    p.payment_amount, p.payment_currency, p.exchange_rate, r.description,
                    r.project_id, r.resource_type, r.resource_id, r.reference, r.key,
                    r.fingerprint if r.record_key else None, r.actor, p.balance_after, batch.now,
                )
            )  # fmt: skip
        return rows

    @staticmethod
    def _posting_rows(batch: Batch) -> list[tuple[Any, ...]]:
        return [
            (p.id, x.account_id, x.amount, x.balance_before, x.balance_after)
            for p in batch.planned
            for x in p.postings
        ]

    async def _insert_rows(self, conn: Conn, batch: Batch) -> None:
        """Small batches: INSERTs from arrays (they pipeline; COPY does not)."""
        tx_rows = self._transaction_rows(batch)
        await conn.execute(INSERT_TRANSACTIONS, [list(col) for col in zip(*tx_rows, strict=True)])
        post_rows = self._posting_rows(batch)
        await conn.execute(INSERT_POSTINGS, [list(col) for col in zip(*post_rows, strict=True)])

    async def _copy_rows(self, conn: Conn, batch: Batch) -> None:
        """Large batches: COPY, the fastest way in."""
        cursor = conn.cursor()
        async with cursor.copy(f"COPY transactions ({TRANSACTION_COLUMNS}) FROM STDIN") as copy:
            for row in self._transaction_rows(batch):
                await copy.write_row(row)
        async with cursor.copy(
            "COPY postings (transaction_id, account_id, amount, balance_before, balance_after)"
            " FROM STDIN"
        ) as copy:
            for row in self._posting_rows(batch):
                await copy.write_row(row)

    async def _update_balances(
        self, conn: Conn, planned: Sequence[PlannedTransaction], book: Book, now: datetime
    ) -> None:
        final: dict[int, int] = {}
        for p in planned:
            for post in p.postings:
                final[post.account_id] = post.balance_after
        ids = sorted(final)
        await conn.execute(
            "UPDATE ledger_accounts a SET balance = v.b"
            " FROM unnest(%s::bigint[], %s::bigint[]) AS v(id, b) WHERE a.id = v.id",
            (ids, [final[i] for i in ids]),
        )
        orgs = sorted({p.request.organization_id for p in planned})
        wallets = [book.wallets[o] for o in orgs]
        await conn.execute(
            "UPDATE wallets w SET balance = v.b, credits = v.c, changed_at = %s, updated_at = %s"
            " FROM unnest(%s::uuid[], %s::bigint[], %s::bigint[]) AS v(o, b, c)"
            " WHERE w.organization_id = v.o",
            (now, now, orgs, [w.balance for w in wallets], [w.credit_total for w in wallets]),
        )

    async def _roll_up(
        self, conn: Conn, planned: Sequence[PlannedTransaction], now: datetime
    ) -> None:
        day = now.astimezone(UTC).date()
        daily: dict[tuple[uuid.UUID, str], int] = defaultdict(int)
        costs: dict[tuple[uuid.UUID, str], tuple[str, uuid.UUID | None, int]] = {}
        for p in planned:
            org = p.request.organization_id
            for line in p.spend:
                daily[(org, line.resource_type)] += line.amount
                if line.resource_id:
                    _, _, total = costs.get((org, line.resource_id), ("", None, 0))
                    costs[(org, line.resource_id)] = (
                        line.resource_type,
                        line.project_id,
                        total + line.amount,
                    )
        if daily:
            keys = sorted(daily)
            await conn.execute(
                "INSERT INTO daily_spend (organization_id, day, resource_type, amount)"
                " SELECT o, %s, t, a"
                " FROM unnest(%s::uuid[], %s::text[], %s::bigint[]) AS v(o, t, a)"
                " ON CONFLICT (organization_id, day, resource_type)"
                " DO UPDATE SET amount = daily_spend.amount + excluded.amount",
                (day, [k[0] for k in keys], [k[1] for k in keys], [daily[k] for k in keys]),
            )
        if costs:
            keys2 = sorted(costs)
            await conn.execute(
                "INSERT INTO resource_costs (organization_id, resource_id, resource_type,"
                " project_id, total, first_charged_at, last_charged_at)"
                " SELECT o, r, t, p, a, %s, %s"
                " FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::uuid[], %s::bigint[])"
                " AS v(o, r, t, p, a)"
                " ON CONFLICT (organization_id, resource_id) DO UPDATE"
                " SET total = resource_costs.total + excluded.total,"
                " last_charged_at = excluded.last_charged_at",
                (
                    now,
                    now,
                    [k[0] for k in keys2],
                    [k[1] for k in keys2],
                    [costs[k][0] for k in keys2],
                    [costs[k][1] for k in keys2],
                    [costs[k][2] for k in keys2],
                ),
            )

    async def settle_levels(self, conn: Conn, locked: Sequence[LockedWallet], batch: Batch) -> None:
        """Recompute the level of each wallet; emit one event per edge; fire auto top-ups."""
        changed_orgs: list[uuid.UUID] = []
        changed_levels: list[str] = []
        for lw in locked:
            w = lw.wallet
            level = level_for(w.balance, w.run_rate, lw.thresholds, self.policy.depletion_seconds)
            event_type = edge_event(w.level, level)
            if event_type is not None:
                batch.events.append(
                    events.balance_event(
                        event_type,
                        w.organization_id,
                        currency=w.currency,
                        balance=w.balance,
                        held_balance=w.held_balance,
                        run_rate=w.run_rate,
                        level=level,
                        previous_level=w.level,
                    )
                )
                w.level = level
                changed_orgs.append(w.organization_id)
                changed_levels.append(level)
            if lw.auto_topup_below and w.balance < lw.auto_topup_below:
                await self._request_auto_topup(conn, lw, batch)
        if changed_orgs:
            await conn.execute(
                "UPDATE wallets w SET level = v.l FROM unnest(%s::uuid[], %s::text[]) AS v(o, l)"
                " WHERE w.organization_id = v.o",
                (changed_orgs, changed_levels),
            )

    async def refresh_levels(
        self, conn: Conn, organization_ids: Sequence[uuid.UUID], now: datetime
    ) -> None:
        """Re-settle the levels of these wallets after a change other than a transfer."""
        locked = await lock_wallets(conn, organization_ids, now)
        batch = Batch(now)
        await self.settle_levels(conn, list(locked.values()), batch)
        await self.outbox.add_many(conn, batch.events)

    async def _request_auto_topup(self, conn: Conn, lw: LockedWallet, batch: Batch) -> None:
        pending_id = uuid7()
        cur = await conn.execute(
            "INSERT INTO pending_topups (id, organization_id, amount, currency)"
            " VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING id",
            (pending_id, lw.wallet.organization_id, lw.auto_topup_amount, lw.wallet.currency),
        )
        if await cur.fetchone() is not None:
            batch.events.append(
                events.auto_topup_requested(
                    lw.wallet.organization_id, pending_id, lw.auto_topup_amount, lw.wallet.currency
                )
            )

    async def load_transactions(
        self, conn: Conn, ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, Transaction]:
        if not ids:
            return {}
        cur = await conn.execute(
            "SELECT id, organization_id, kind, amount, currency, payment_amount, payment_currency,"
            " exchange_rate, description, project_id, resource_type, resource_id, reference,"
            " idempotency_key, actor, balance_after, created_at"
            " FROM transactions WHERE id = ANY(%s)",
            (list(ids),),
        )
        rows = await cur.fetchall()
        cur = await conn.execute(
            "SELECT p.transaction_id, a.code, p.amount, p.balance_before, p.balance_after"
            " FROM postings p JOIN ledger_accounts a ON a.id = p.account_id"
            " WHERE p.transaction_id = ANY(%s) ORDER BY p.id",
            (list(ids),),
        )
        postings: dict[uuid.UUID, list[PostingView]] = defaultdict(list)
        for tx_id, code, amount, before, after in await cur.fetchall():
            postings[tx_id].append(PostingView(code, amount, before, after))
        return {row[0]: _transaction(row, postings[row[0]]) for row in rows}


REFUSALS: dict[str, type[DomainError]] = {
    "NOT_FOUND": NotFound,
    "INVALID_ARGUMENT": InvalidArgument,
}


def refusal(exc: psycopg.errors.RaiseException) -> DomainError:
    """The domain error a `post_transfer` refusal stands for (its HINT is '<CODE>:<field>')."""
    code, _, field = (exc.diag.message_hint or "").partition(":")
    message = exc.diag.message_primary or str(exc)
    if code == "INSUFFICIENT_FUNDS":
        return InsufficientFunds(message)
    if code == "KYC_REQUIRED":
        return kyc_required(message)
    if code == "ABORTED":
        return Conflict(message, field=field or None, reason="IDEMPOTENCY_KEY_REUSED")
    return REFUSALS.get(code, DomainError)(message, field=field or None)


def _transaction(row: Sequence[Any], postings: list[PostingView]) -> Transaction:
    (tx_id, org, kind, amount, currency, pay_amount, pay_currency, rate, description, project,
     rtype, rid, reference, key, actor, balance_after, created_at) = row  # fmt: skip
    return Transaction(
        id=tx_id,
        organization_id=org,
        kind=Kind(kind),
        amount=amount,
        currency=currency,
        payment_amount=pay_amount,
        payment_currency=pay_currency,
        exchange_rate=rate,
        description=description,
        project_id=project,
        resource_type=rtype,
        resource_id=rid,
        reference=reference,
        idempotency_key=key,
        actor=actor,
        balance_after=balance_after,
        created_at=created_at,
        postings=tuple(postings),
    )


def _view(p: PlannedTransaction, now: datetime) -> Transaction:
    r = p.request
    return Transaction(
        id=p.id,
        organization_id=r.organization_id,
        kind=r.kind,
        amount=p.amount,
        currency=p.currency,
        payment_amount=p.payment_amount,
        payment_currency=p.payment_currency,
        exchange_rate=p.exchange_rate,
        description=r.description,
        project_id=r.project_id,
        resource_type=r.resource_type,
        resource_id=r.resource_id,
        reference=r.reference,
        idempotency_key=r.key,
        actor=r.actor,
        balance_after=p.balance_after,
        created_at=now,
        postings=tuple(
            PostingView(x.account_code, x.amount, x.balance_before, x.balance_after)
            for x in p.postings
        ),
    )


async def open_wallet(conn: Conn, organization_id: uuid.UUID, currency: str) -> None:
    """Give a new organization its cash account and wallet row (idempotent)."""
    await conn.execute(
        "WITH cash AS ("
        " INSERT INTO ledger_accounts (code, organization_id, kind, currency)"
        " VALUES (%s, %s, 'cash', %s) ON CONFLICT (code) DO UPDATE SET code = excluded.code"
        " RETURNING id)"
        " INSERT INTO wallets (organization_id, currency, cash_account_id)"
        " SELECT %s, %s, id FROM cash ON CONFLICT (organization_id) DO NOTHING",
        (f"org:{organization_id}:cash", organization_id, currency, organization_id, currency),
    )
