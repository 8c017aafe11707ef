"""All SQL of the ledger: lock a batch's wallets, plan it with `ledger.Book`, write it at once.

One call of `post_transfers` is one database transaction (the caller's): wallets are locked in
organization order, then platform accounts in id order, so concurrent batches never deadlock.
Rows are written with COPY and balances with one set-based UPDATE per table, which is what
makes a batch of a thousand transfers cost little more than one.
"""

from __future__ import annotations

import functools
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection

from gpudeck.kit.errors import DomainError, NotFound
from gpudeck.kit.events import Outbox
from gpudeck.kit.events.outbox import channel as outbox_channel
from gpudeck.wallet import events, fast_batch, fast_transfer
from gpudeck.wallet.alerts import Thresholds, crossed_by, edge_event, level_for
from gpudeck.wallet.idempotency import key_reused
from gpudeck.wallet.ids import uuid7
from gpudeck.wallet.ledger import (
    Account,
    Book,
    Kind,
    KycLimits,
    Outcome,
    PlannedTransaction,
    PostingView,
    Transaction,
    TransferRequest,
    Wallet,
    platform_pool,
    validate,
)
from gpudeck.wallet.ledger_rows import (
    FIND_KEYS,
    Batch,
    copy_rows,
    insert_rows,
    roll_up,
    transaction_from_row,
    update_balances,
    view,
)
from gpudeck.wallet.project_owners import ProjectOwners
from gpudeck.wallet.project_owners import not_found as project_not_found
from gpudeck.wallet.rates import conversion
from gpudeck.wallet.readmodels_store import LATEST_RATES, rate_row
from gpudeck.wallet.refunds_store import load_spending, refund_shares

Conn = AsyncConnection[Any]


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
    kyc_limits: KycLimits = field(default_factory=KycLimits)


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
# Above this many transactions a batch is written with COPY instead of pipelined INSERTs.
COPY_THRESHOLD = 64
NEW_CREDIT_ACCOUNTS = """
INSERT INTO ledger_accounts (code, organization_id, kind, currency, expires_at, credit_source)
SELECT 'org:' || o || ':credit:' || k, o, 'credit', c, e, s
FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::timestamptz[], %s::text[]) AS x(o, k, c, e, s)
ON CONFLICT (code) DO UPDATE SET expires_at = EXCLUDED.expires_at,
    credit_source = EXCLUDED.credit_source
    WHERE ledger_accounts.balance = 0
RETURNING id, code
"""
# (A grant's account is opened before the grant is decided: one refused (KYC, currency) leaves
# its empty account, which a corrected retry with the key takes over.)


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
    # Binary: a tick locks thousands at once, and their ids and rows cost a fraction in it.
    cur = await conn.cursor(binary=True).execute(LOCK_WALLETS, (ids,))
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
    unverified = [org for org, lw in locked.items() if not lw.wallet.kyc_verified]
    if unverified:
        # What they added, read now the wallets are locked (a statement of its own: the locking
        # one read before its wait, and missed what committed meanwhile).
        cur = await conn.execute(
            "SELECT o, money_added(o) FROM unnest(%s::uuid[]) AS o", (unverified,)
        )
        for org, added in await cur.fetchall():
            locked[org].wallet.added = added
    return locked


# (conn, organizations whose wallets the caller holds, now) → (organization, amount) expired
ExpireHolds = Callable[[Conn, list[uuid.UUID], datetime], Awaitable[list[tuple[uuid.UUID, int]]]]


class LedgerStore:
    """Posts transfers and reads transactions back; the one writer of balances."""

    def __init__(self, schema: str = "wallet", *, policy: Policy | None = None) -> None:
        self.outbox = Outbox(schema)
        self.outbox_channel = outbox_channel(schema)
        self.policy = policy or Policy()
        self.currencies: dict[uuid.UUID, str] = {}  # wallet currencies (they never change)
        self.projects = ProjectOwners()
        # Wallets this process changed and has not announced yet (see workers.announce_balances).
        self.changed: set[uuid.UUID] = set()
        # Expires holds past their time under the wallets' locks: set by the HoldStore over
        # this ledger (the ledger knows no holds' rows or events). See `post_transfers`.
        self.expire_holds: ExpireHolds | None = None

    async def wallet_currencies(
        self, conn: Conn, organization_ids: set[uuid.UUID]
    ) -> dict[uuid.UUID, str]:
        """The wallet currency of each of these organizations that has a wallet (cached: a
        wallet's currency never changes)."""
        cache = self.currencies
        missing = [o for o in organization_ids if o not in cache]
        if missing:
            cur = await conn.execute(
                "SELECT organization_id, currency FROM wallets WHERE organization_id = ANY(%s)",
                (missing,),
            )
            if len(cache) > 100_000:
                cache.clear()
            for org, currency in await cur.fetchall():
                cache[org] = currency
        return {o: cache[o] for o in organization_ids if o in cache}

    async def _in_wallet_terms(
        self, conn: Conn, requests: Sequence[TransferRequest]
    ) -> Sequence[TransferRequest]:
        """`requests`, each naming its wallet's own currency left to name none (one fingerprint
        for both: see `TransferRequest.in_wallet_terms`)."""
        named = {r.organization_id for r in requests if r.currency}
        if not named:
            return requests
        currencies = await self.wallet_currencies(conn, named)
        return [r.in_wallet_terms(currencies.get(r.organization_id)) for r in requests]

    def mark_changed(self, organization_ids: Iterable[uuid.UUID]) -> None:
        """Note wallets whose balance, held balance or run rate this process moved."""
        self.changed.update(organization_ids)

    def take_changed(self) -> list[uuid.UUID]:
        """The wallets noted since the last call, in id order; the note starts over."""
        taken, self.changed = sorted(self.changed), set()
        return taken

    async def post_transfers(
        self,
        conn: Conn,
        requests: Sequence[TransferRequest],
        *,
        now: datetime | None = None,
        fast_path: bool = True,
        now_is_transaction_time: bool = False,
        wallets_locked: bool = False,
    ) -> list[Outcome]:
        """Post `requests` in order within the caller's transaction; a result per request.

        The common transfers go first through the set-based fast path (`fast_batch`: one
        statement for all of them) unless `fast_path` is off or `now` is given (internal callers
        that post at their own time), but for a `now` that is the transaction's own `now()`
        (`now_is_transaction_time`: the billing tick, which has its wallets locked already:
        `wallets_locked`). The rest are planned with `ledger.Book`
        and written here.
        Round trips: one to lock and load the wallets, one (pipelined) for earlier keys and the
        platform accounts, one (pipelined, or COPY for large batches) to write everything.
        """
        requests = await self._in_wallet_terms(conn, requests)
        # Callers' transfers need live projects; the wallet's own (which pass `now`) settle what
        # was started before a project was deleted.
        outcomes, valid = await _validated(conn, self.projects, requests, live=now is None)
        if fast_path and (now is None or now_is_transaction_time) and valid:
            valid = await fast_batch.post_fast(
                self, conn, requests, valid, outcomes, now, wallets_locked=wallets_locked
            )
            if not valid:
                return _answered(outcomes)
        batch = Batch(now or await db_now(conn))
        locked = await lock_wallets(conn, (requests[i].organization_id for i in valid), batch.now)
        for i in valid:
            org = requests[i].organization_id
            if org not in locked:
                outcomes[i] = Outcome(
                    error=NotFound(f"organization {org} not found", field="organization_id")
                )
        valid = [i for i in valid if outcomes[i] is None]
        await self.expire_due_holds(conn, locked)
        book = Book(
            wallets={org: lw.wallet for org, lw in locked.items()},
            platform={},
            now=batch.now,
            kyc_limits=self.policy.kyc_limits,
        )
        to_plan, replays, same_as = await self._read_around(conn, requests, valid, outcomes, book)
        # Under the wallets' locks (two refunds at once each gave back all of a charge), taken
        # only by what is posted (a replay, a repeat or a refusal took a share of it).
        shares = await refund_shares(conn, requests, to_plan)
        await load_spending(conn, book, [requests[i] for i in to_plan])
        planned_at: dict[int, PlannedTransaction] = {}
        for i in to_plan:
            request = shares.attributed(i, requests[i])
            try:
                planned_at[i] = book.apply(request, uuid7())
            except DomainError as exc:
                outcomes[i] = Outcome(error=exc)
            else:
                shares.taken(i, request)
        batch.planned = list(planned_at.values())
        await self.write(conn, batch, book, locked)
        stored = await self.load_transactions(conn, list(replays.values()))
        for i, tx_id in replays.items():
            outcomes[i] = Outcome(transaction=stored[tx_id])
        for i, planned in planned_at.items():
            outcomes[i] = Outcome(transaction=view(planned, batch.now))
        for i, first in same_as.items():
            outcomes[i] = outcomes[first]
        return _answered(outcomes)

    async def expire_due_holds(self, conn: Conn, locked: Mapping[uuid.UUID, LockedWallet]) -> None:
        """Expire the locked wallets' holds past their time, the sweep's work done now, and take
        them off the wallets' held balance as loaded (what every path that meets them under the
        wallets' locks does: transfers, new holds, deletions). Until
        it came by (a second or so), they held money nothing could capture any more, and a
        charge of it was refused. Expired here, in this transaction, not just left out: a
        capture waiting for the lock with an older clock finds it expired, not still open
        with its money spent."""
        holding = [org for org, lw in locked.items() if lw.wallet.held_balance > 0]
        if holding and self.expire_holds is not None:
            # By the transaction's clock, not the batch's (an internal post may be dated
            # otherwise: a hold is not due before its time).
            now = await db_now(conn)
            for org, amount in await self.expire_holds(conn, holding, now):
                locked[org].wallet.held_balance -= amount

    async def post_independent(
        self, conn: Conn, requests: Sequence[TransferRequest]
    ) -> list[Outcome]:
        """Post transfers that need not commit together (concurrent calls grouped): what the
        fast path takes commits with its one statement, the rest together after it. Run it
        outside a transaction. A result per request, as `post_transfers`."""
        requests = await self._in_wallet_terms(conn, requests)
        outcomes, valid = await _validated(conn, self.projects, requests, live=True)
        if valid:
            valid = await fast_batch.post_fast(self, conn, requests, valid, outcomes)
        if valid:
            async with conn.transaction():
                rest = await self.post_transfers(
                    conn, [requests[i] for i in valid], fast_path=False
                )
            for i, outcome in zip(valid, rest, strict=True):
                outcomes[i] = outcome
        return _answered(outcomes)

    async def post_one(self, conn: Conn, request: TransferRequest) -> Transaction:
        """Post one transfer in one statement; see gpudeck.wallet.fast_transfer."""
        if await _not_in_project(conn, self.projects, [request], live=True):
            raise project_not_found(request.project_id)
        return await fast_transfer.post_one(self, conn, request)

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
        found: dict[tuple[uuid.UUID, str], tuple[bytes | None, uuid.UUID | None]] = {}
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
            rate_curs = [
                (pair, await conn.execute(LATEST_RATES, {"a": pair[0], "b": pair[1]}))
                for pair in pairs
            ]
            if keys_cur is not None:
                for org, key, fingerprint, tx_id in await keys_cur.fetchall():
                    found[(org, key)] = (bytes(fingerprint) if fingerprint else None, tx_id)
            for pool, cur in platform_curs:
                row = await cur.fetchone()
                if row is not None:
                    book.platform[pool] = Account(row[0], row[2], "platform", None, row[1])
            for pair, cur in rate_curs:
                latest = {(r.base, r.quote): r for r in map(rate_row, await cur.fetchall())}
                if latest:  # as displays convert: the newest rate of either direction
                    book.rates[pair] = conversion(*pair, latest)
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
            earlier, tx_id = found.get(scoped, (fingerprint, None))
            if earlier != fingerprint:  # a transfer, hold, plan change … with another payload
                outcomes[i] = Outcome(error=key_reused(request.key))
            elif tx_id is not None:
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
            book.new_credit_accounts[g.organization_id, g.key] = Account(
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
        self.mark_changed(touched)
        await self.settle_levels(
            conn, [locked[o] for o in touched], batch, self._crossers(planned, locked)
        )
        if not planned:
            await self.outbox.add_many(conn, batch.events)
            return
        if len(planned) > COPY_THRESHOLD:
            await copy_rows(conn, batch)
            await self.outbox.add_many(conn, batch.events)
            async with conn.pipeline():
                await update_balances(conn, planned, book, batch.now)
                await roll_up(conn, planned, batch.now)
            return
        async with conn.pipeline():
            await insert_rows(conn, batch)
            await update_balances(conn, planned, book, batch.now)
            await roll_up(conn, planned, batch.now)
            await self.outbox.add_many(conn, batch.events)

    def _crossers(
        self, planned: Sequence[PlannedTransaction], locked: Mapping[uuid.UUID, LockedWallet]
    ) -> dict[uuid.UUID, str]:
        """Who moved each wallet (`settle_levels`' actors): of a wallet whose level changes, the
        transfer that crossed into its new level; of the others, the last one."""
        moves: dict[uuid.UUID, list[tuple[int, str]]] = {}
        for p in planned:
            moves.setdefault(p.request.organization_id, []).append(
                (p.balance_after, p.request.actor)
            )
        actors = {org: mine[-1][1] for org, mine in moves.items()}
        for org, mine in moves.items():
            lw = locked[org]
            w = lw.wallet
            level_of = functools.partial(
                level_for,
                run_rate=w.run_rate,
                thresholds=lw.thresholds,
                depletion_seconds=self.policy.depletion_seconds,
            )
            if level_of(w.balance) != w.level:
                actors[org] = crossed_by(mine, level_of)
        return actors

    async def settle_levels(
        self,
        conn: Conn,
        locked: Sequence[LockedWallet],
        batch: Batch,
        actors: Mapping[uuid.UUID, str] | None = None,
    ) -> None:
        """Recompute the level of each wallet; emit one event per edge, naming who crossed it
        (`actors`: who moved each wallet; else the caller); fire auto top-ups."""
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
                        actor=(actors or {}).get(w.organization_id, ""),
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
            self.mark_changed(changed_orgs)  # live views show the level (a settings change)

    async def refresh_levels(
        self,
        conn: Conn,
        organization_ids: Sequence[uuid.UUID],
        now: datetime | None = None,
        *,
        actors: Mapping[uuid.UUID, str] | None = None,
    ) -> None:
        """Re-settle the levels of these wallets after a change other than a transfer (or
        one whose check may have been lost); `now` by default the transaction's; `actors`
        as `settle_levels`."""
        now = now or await db_now(conn)
        locked = await lock_wallets(conn, organization_ids, now)
        batch = Batch(now)
        await self.settle_levels(conn, list(locked.values()), batch, actors)
        await self.outbox.add_many(conn, batch.events)

    async def _request_auto_topup(self, conn: Conn, lw: LockedWallet, batch: Batch) -> None:
        """Ask for the rule's top-up, unless the KYC limit leaves no room for it: a payment
        once taken is credited whatever the limit (`kyc_checked`), so it is checked here."""
        w = lw.wallet
        limit = self.policy.kyc_limits.of(w.currency)
        if limit and not w.kyc_verified and w.added + lw.auto_topup_amount > limit:
            return
        pending_id = uuid7()
        cur = await conn.execute(
            "INSERT INTO pending_topups (id, organization_id, amount, currency)"
            " VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING id",
            (pending_id, lw.wallet.organization_id, lw.auto_topup_amount, lw.wallet.currency),
        )
        if await cur.fetchone() is not None:
            batch.events.append(
                events.auto_topup(
                    "wallet.autotopup.requested",
                    lw.wallet.organization_id,
                    pending_id,
                    lw.auto_topup_amount,
                    lw.wallet.currency,
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
        return {row[0]: transaction_from_row(row, postings[row[0]]) for row in rows}


async def _validated(
    conn: Conn, projects: ProjectOwners, requests: Sequence[TransferRequest], *, live: bool
) -> tuple[list[Outcome | None], list[int]]:
    """An outcome slot per request, refusals filled in for the invalid (a bad field, a project
    of another organization, or with `live` a deleted one); the valid indexes."""
    outcomes: list[Outcome | None] = [None] * len(requests)
    valid: list[int] = []
    for i, request in enumerate(requests):
        try:
            validate(request)
            valid.append(i)
        except DomainError as exc:
            outcomes[i] = Outcome(error=exc)
    refused = await _not_in_project(conn, projects, [requests[i] for i in valid], live=live)
    for i in [valid[n] for n in sorted(refused)]:
        outcomes[i] = Outcome(error=project_not_found(requests[i].project_id))
        valid.remove(i)
    return outcomes, valid


async def _not_in_project(
    conn: Conn, projects: ProjectOwners, requests: Sequence[TransferRequest], *, live: bool
) -> set[int]:
    """The indexes of `requests` naming a project that is not one of their organization's
    (with `live`, not a live one), but for callers' retries (`_retries`)."""
    named = [(r.organization_id, r.project_id) for r in requests if r.project_id is not None]
    if not named:
        return set()
    unknown = await projects.unknown(conn, named, live=live)
    refused = [n for n, r in enumerate(requests) if (r.organization_id, r.project_id) in unknown]
    retried = await _retries(conn, projects, [requests[n] for n in refused]) if live else set()
    return {n for k, n in enumerate(refused) if k not in retried}


async def _retries(
    conn: Conn, projects: ProjectOwners, requests: Sequence[TransferRequest]
) -> set[int]:
    """Of callers' transfers naming a project that is not live, the indexes of those whose key
    their organization used already, in a project of its own since deleted: a retry answers as
    its first call did (a replay, or a refusal of the key's reuse), however late. It was told
    NOT_FOUND, as if nothing had been posted."""
    own = [
        n
        for n, r in enumerate(requests)
        if r.record_key and r.project_id and projects.owner(r.project_id) == r.organization_id
    ]
    if not own:
        return set()
    cur = await conn.execute(
        FIND_KEYS,
        ([requests[n].organization_id for n in own], [requests[n].key for n in own]),
    )
    used = {(org, key) for org, key, *_ in await cur.fetchall()}
    return {n for n in own if (requests[n].organization_id, requests[n].key) in used}


def _answered(outcomes: list[Outcome | None]) -> list[Outcome]:
    return [o if o is not None else Outcome(error=DomainError("not processed")) for o in outcomes]


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
    await conn.execute(
        "INSERT INTO wallet_announcements (organization_id) VALUES (%s)"
        " ON CONFLICT (organization_id) DO NOTHING",
        (organization_id,),
    )
