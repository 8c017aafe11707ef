"""Invariants after a randomized concurrent workload, and after kill -9 in the middle of one."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable

import grpc
import pytest
import workload
from processes import TOKEN, start_wallet, wait_serving, wallet_env
from psycopg_pool import AsyncConnectionPool

from gpudeck.kit.config import EventsConfig
from gpudeck.kit.grpcclient import channel
from gpudeck.proto.wallet.v1 import wallet_pb2 as pb
from gpudeck.proto.wallet.v1.wallet_pb2_grpc import WalletServiceStub
from gpudeck.wallet import audit

NewOrg = Callable[..., Awaitable[uuid.UUID]]


async def assert_books_sound(pool: AsyncConnectionPool, orgs: list[uuid.UUID]) -> None:
    async with pool.connection() as conn:
        assert await audit.check(conn) == []
        cur = await conn.execute(
            "SELECT organization_id FROM wallets WHERE organization_id = ANY(%s)"
            " AND balance - held_balance < 0",
            (orgs,),
        )
        assert await cur.fetchall() == [], "holds and charges made spendable negative"


KINDS = {pb.TOPUP: "topup", pb.CHARGE: "charge"}


async def assert_acknowledged_are_recorded(
    pool: AsyncConnectionPool, record: workload.Record
) -> None:
    """Every acknowledged call is in the books as it was answered: transfers under their key with
    their first payload, holds with their amount, captures and voids as the hold's outcome."""
    keys = sorted(record.transactions)
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT k.org::text, k.key, t.id::text, t.kind, t.amount"
            " FROM unnest(%s::uuid[], %s::text[]) AS k(org, key)"
            " LEFT JOIN transactions t ON t.organization_id = k.org AND t.idempotency_key = k.key",
            ([uuid.UUID(o) for o, _ in keys], [k for _, k in keys]),
        )
        rows = {
            (org, key): (tx, kind, amount) for org, key, tx, kind, amount in await cur.fetchall()
        }
        wrong = []
        for scoped in keys:
            kind, amount = record.payloads[scoped]
            want = (record.transactions[scoped], KINDS[kind], amount)
            if rows.get(scoped) != want:
                wrong.append(f"{scoped}: acknowledged {want}, stored {rows.get(scoped)}")
        assert wrong == [], f"{len(wrong)} acknowledged transfers differ: {wrong[:5]}"

        cur = await conn.execute(
            "SELECT id::text, organization_id::text, amount, status, captured,"
            " transaction_id::text FROM holds WHERE id = ANY(%s)",
            ([uuid.UUID(h) for h in record.holds],),
        )
        holds = {row[0]: row[1:] for row in await cur.fetchall()}
        missing = [h for h in record.holds if h not in holds]
        assert missing == [], f"{len(missing)} acknowledged holds are missing: {missing[:5]}"
        wrong = [
            f"{h}: acknowledged {org} {record.hold_amounts[h]}, stored {holds[h][:2]}"
            for h, org in record.holds.items()
            if holds[h][:2] != (org, record.hold_amounts[h])
        ]
        assert wrong == [], f"{len(wrong)} holds differ from their acknowledgement: {wrong[:5]}"

        capture_txs = [uuid.UUID(tx) for _, tx in record.captures.values() if tx]
        cur = await conn.execute(
            "SELECT id::text, organization_id::text, kind, amount, reference FROM transactions"
            " WHERE id = ANY(%s)",
            (capture_txs,),
        )
        charges = {row[0]: row[1:] for row in await cur.fetchall()}
        wrong = []
        for hold_id, (amount, tx) in record.captures.items():
            _, _, status, captured, tx_id = holds[hold_id]
            if (status, captured, tx_id) != ("captured", amount, tx or None):
                wrong.append(f"hold {hold_id} captured {amount} in {tx!r}: stored {holds[hold_id]}")
            if tx and charges.get(tx) != (record.holds[hold_id], "charge", amount, hold_id):
                wrong.append(f"capture {tx} of {hold_id} for {amount}: stored {charges.get(tx)}")
        assert wrong == [], f"{len(wrong)} acknowledged captures are not so: {wrong[:5]}"
        wrong = [
            f"hold {h}: stored {holds[h]}"
            for h in record.voids
            if holds[h][2:] != ("voided", 0, None)
        ]
        assert wrong == [], f"{len(wrong)} acknowledged voids are not so: {wrong[:5]}"


async def assert_nothing_else_written(
    pool: AsyncConnectionPool, orgs: list[uuid.UUID], record: workload.Record
) -> None:
    """When every call got an answer: the transactions are the acknowledged transfers (one per
    key, however often or concurrently sent) and captures, the holds the acknowledged holds;
    refused calls (a key reused for another payload among them) wrote none."""
    captures = sum(1 for _, tx in record.captures.values() if tx)
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM transactions WHERE organization_id = ANY(%s)", (orgs,)
        )
        assert (await cur.fetchone()) == (len(record.transactions) + captures,)
        cur = await conn.execute(
            "SELECT count(*) FROM holds WHERE organization_id = ANY(%s)", (orgs,)
        )
        assert (await cur.fetchone()) == (len(record.holds),)


async def assert_lost_calls_are_whole_or_absent(
    pool: AsyncConnectionPool, stub: WalletServiceStub, record: workload.Record
) -> None:
    """A transfer whose answer the kill lost is in the ledger whole (its kind and amount, its
    postings: the audit checks they balance) or not at all; its retry answers with the
    transaction the ledger has, or posts it now, once."""
    assert record.lost, "the kill cut no transfer mid-call"
    kinds = {pb.TOPUP: "topup", pb.CHARGE: "charge"}
    for req in record.lost:
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT t.id::text, t.kind, t.amount, count(p.id) FROM transactions t"
                " LEFT JOIN postings p ON p.transaction_id = t.id"
                " WHERE t.organization_id = %s AND t.idempotency_key = %s GROUP BY t.id",
                (uuid.UUID(req.organization_id), req.idempotency_key),
            )
            rows = await cur.fetchall()
        assert len(rows) <= 1, rows
        try:
            retried = await stub.Transfer(req, timeout=10)
        except grpc.aio.AioRpcError as exc:  # refused now (funds): then it was never written
            assert not rows and exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc
            continue
        if rows:
            [(tx_id, kind, amount, postings)] = rows
            assert (kind, amount) == (kinds[req.kind], req.amount.amount) and postings >= 2
            assert retried.id == tx_id  # the first write, answered again
    async with pool.connection() as conn:
        assert await audit.check(conn) == []


def assert_workload_was_clean(record: workload.Record) -> None:
    assert record.violations == [], "\n".join(record.violations[:20])
    assert record.reused_keys_refused > 0, "no key was reused with another payload"
    assert record.concurrent_keys, "no concurrent copies of a transfer were acknowledged"
    assert record.concurrent_holds > 0, "no concurrent copies of a hold were acknowledged"
    assert record.captures and record.voids, "no capture or no void was acknowledged"
    assert any(tx for _, tx in record.captures.values()), "no capture charged anything"
    charges = sum(1 for kind, _ in record.payloads.values() if kind == pb.CHARGE)
    assert charges >= 20, f"only {charges} charges were acknowledged"
    assert record.samples >= 20, f"the wallets were sampled only {record.samples} times"


async def test_invariants_hold_after_a_concurrent_workload(
    wallet_stub: WalletServiceStub,
    wallet_pool: AsyncConnectionPool,
    new_org: NewOrg,
    database_url: str,
) -> None:
    orgs = [await new_org() for _ in range(4)]
    record = await workload.run(wallet_stub, orgs, clients=24, ops=40, pool=wallet_pool)
    assert record.calls == 24 * 40
    assert len(record.transactions) > 100
    assert "INTERNAL" not in record.errors and "UNKNOWN" not in record.errors
    # Every call got an answer, so what was written can be counted exactly.
    assert "UNAVAILABLE" not in record.errors and "DEADLINE_EXCEEDED" not in record.errors
    assert_workload_was_clean(record)
    await asyncio.sleep(1.5)  # let one-second holds expire through the housekeeping loop
    await assert_books_sound(wallet_pool, orgs)
    await assert_acknowledged_are_recorded(wallet_pool, record)
    await assert_nothing_else_written(wallet_pool, orgs, record)
    # What an operator runs says the same.
    checked = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gpudeck.wallet.audit",
        env={**os.environ, "GPUDECK_DATABASE_URL": database_url},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await checked.communicate()
    assert checked.returncode == 0, (out, err)
    assert b"the books are sound" in out


@pytest.mark.slow
async def test_kill_9_mid_workload_loses_no_acknowledged_call(
    database_url: str,
    events_config: EventsConfig,
    wallet_pool: AsyncConnectionPool,
    new_org: NewOrg,
) -> None:
    env = wallet_env(database_url, events_config)
    address = env["GPUDECK_WALLET_LISTEN"]
    orgs = [await new_org() for _ in range(4)]
    proc = start_wallet(env)
    try:
        await wait_serving(address)
        async with channel(address, TOKEN) as ch:
            stub = WalletServiceStub(ch)
            record = workload.Record()
            load = asyncio.ensure_future(
                workload.run(stub, orgs, clients=20, ops=60, pool=wallet_pool, record=record)
            )
            for _ in range(200):  # kill it once every kind of call has been acknowledged
                if record.captures and record.voids and len(record.transactions) >= 50:
                    break
                await asyncio.sleep(0.05)
            assert record.captures and record.voids and len(record.transactions) >= 50
            assert not load.done(), "the workload ended before the kill"
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            await asyncio.sleep(0.5)
            proc = start_wallet(env)
            await wait_serving(address)
            assert await load is record
            assert record.errors.get("UNAVAILABLE", 0) > 0, "the kill happened after the load"
            assert "INTERNAL" not in record.errors and "UNKNOWN" not in record.errors
            assert_workload_was_clean(record)
            await asyncio.sleep(1.5)
            await assert_books_sound(wallet_pool, orgs)
            await assert_acknowledged_are_recorded(wallet_pool, record)
            await assert_lost_calls_are_whole_or_absent(wallet_pool, stub, record)
    finally:
        proc.terminate()
        proc.wait(10)
