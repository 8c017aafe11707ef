"""The demo organization `gpudeck up --demo` seeds, and the bootstrap owner token.

Seeding is idempotent: fixed ids, each step skipped when already done, under an advisory lock so
replicas starting together seed once; every start may run it.
"""

from __future__ import annotations

import hashlib
import logging
import uuid

from psycopg_pool import AsyncConnectionPool

from gpudeck.wallet.accounts_store import AccountStore, NewOrganization
from gpudeck.wallet.ledger import Kind, TransferRequest
from gpudeck.wallet.ledger_store import LedgerStore

DEMO_USER_ID = uuid.UUID("00000000-0000-4000-8000-000000000001")
DEMO_ORGANIZATION_ID = uuid.UUID("00000000-0000-4000-8000-0000000000a1")
DEMO_PROJECT_ID = uuid.UUID("00000000-0000-4000-8000-0000000000b1")
DEMO_EMAIL = "demo@gpudeck.local"
# What the demo wallet starts with: a 100 USD top-up and 25 USD of promotional credits.
DEMO_TOPUP = 100_000_000
DEMO_CREDITS = 25_000_000
DEMO_USD_INR = "84.0"
log = logging.getLogger(__name__)
SEED_LOCK = int.from_bytes(hashlib.sha256(b"gpudeck.wallet.demo").digest()[:8], "big", signed=True)


async def seed(pool: AsyncConnectionPool, *, bootstrap_token: str | None) -> None:
    """Create the demo user, organization (KYC-verified) and project; add the bootstrap token."""
    ledger = LedgerStore()
    accounts = AccountStore(ledger.outbox)
    async with pool.connection() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SEED_LOCK,))
        cur = await conn.execute(
            "SELECT 1 FROM organizations WHERE id = %s AND deleted_at IS NOT NULL",
            (DEMO_ORGANIZATION_ID,),
        )
        if await cur.fetchone() is not None:  # its id stays taken: start without it
            log.warning(
                "the demo organization was deleted: not seeded again, and the bootstrap token"
                " (which belonged to it) does not work; use another organization's token"
            )
            return
        if await accounts.find_organization(conn, DEMO_ORGANIZATION_ID) is None:
            demo = NewOrganization(
                name="Demo Organization",
                currency="USD",
                owner_user_id=DEMO_USER_ID,
                owner_email=DEMO_EMAIL,
                owner_name="Demo User",
            )
            await accounts.create_organization(
                conn,
                demo,
                organization_id=DEMO_ORGANIZATION_ID,
                project_id=DEMO_PROJECT_ID,
                owner_token=False,
            )
        await accounts.set_kyc_status(conn, DEMO_ORGANIZATION_ID, "verified")
        funding = [
            TransferRequest("demo-topup", DEMO_ORGANIZATION_ID, Kind.TOPUP, DEMO_TOPUP,
                            description="Demo top-up", actor="system"),
            TransferRequest("demo-credits", DEMO_ORGANIZATION_ID, Kind.CREDIT_GRANT, DEMO_CREDITS,
                            description="Demo credits", credit_source="promotion", actor="system"),
        ]  # fmt: skip
        for outcome in await ledger.post_transfers(conn, funding):
            if outcome.error is not None:
                raise outcome.error
        # So the INR/USD toggle works in the demo: a fixed rate, labelled as such (there is no
        # live feed without internet; operators set real rates with SetExchangeRate).
        await conn.execute(
            "INSERT INTO exchange_rates (base, quote, rate, as_of, source)"
            " SELECT 'USD', 'INR', %s, now(), 'demo seed (fixed, not a live rate)'"
            " WHERE NOT EXISTS (SELECT 1 FROM exchange_rates WHERE base IN ('USD', 'INR'))",
            (DEMO_USD_INR,),
        )
        if bootstrap_token and await accounts.find_token_by_secret(conn, bootstrap_token) is None:
            cur = await conn.execute(
                "SELECT role FROM memberships WHERE organization_id = %s AND user_id = %s",
                (DEMO_ORGANIZATION_ID, DEMO_USER_ID),
            )
            if await cur.fetchone() != ("owner",):  # removed or demoted since: a token of
                # theirs would act above them (refused: the wallet did not start at all)
                log.warning(
                    "the demo user is no longer an owner of the demo organization: the"
                    " bootstrap token is not added; use a token of one of its owners"
                )
                return
            await accounts.create_token(
                conn,
                DEMO_ORGANIZATION_ID,
                name="bootstrap",
                role="owner",
                created_by=DEMO_USER_ID,
                secret=bootstrap_token,
            )
