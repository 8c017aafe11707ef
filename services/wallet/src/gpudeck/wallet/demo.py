"""The demo organization `gpudeck up --demo` seeds, and the bootstrap owner token.

Seeding is idempotent: fixed ids and ON CONFLICT DO NOTHING, so every start may run it.
"""

from __future__ import annotations

import hashlib
import uuid

from psycopg_pool import AsyncConnectionPool

from gpudeck.wallet.ledger import Kind, TransferRequest
from gpudeck.wallet.ledger_store import LedgerStore, open_wallet

DEMO_USER_ID = uuid.UUID("00000000-0000-4000-8000-000000000001")
DEMO_ORGANIZATION_ID = uuid.UUID("00000000-0000-4000-8000-0000000000a1")
DEMO_PROJECT_ID = uuid.UUID("00000000-0000-4000-8000-0000000000b1")
DEMO_EMAIL = "demo@gpudeck.local"
# What the demo wallet starts with: a 100 USD top-up and 25 USD of promotional credits.
DEMO_TOPUP = 100_000_000
DEMO_CREDITS = 25_000_000


def token_digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


async def seed(pool: AsyncConnectionPool, *, bootstrap_token: str | None) -> None:
    """Create the demo user, organization (KYC-verified) and project; add the bootstrap token."""
    async with pool.connection() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO users (id, email, name) VALUES (%s, %s, 'Demo User')"
            " ON CONFLICT DO NOTHING",
            (DEMO_USER_ID, DEMO_EMAIL),
        )
        await conn.execute(
            "INSERT INTO organizations (id, slug, name, owner_user_id, currency, kyc_status)"
            " VALUES (%s, 'demo', 'Demo Organization', %s, 'USD', 'verified')"
            " ON CONFLICT DO NOTHING",
            (DEMO_ORGANIZATION_ID, DEMO_USER_ID),
        )
        await conn.execute(
            "INSERT INTO memberships (organization_id, user_id, role)"
            " VALUES (%s, %s, 'owner') ON CONFLICT DO NOTHING",
            (DEMO_ORGANIZATION_ID, DEMO_USER_ID),
        )
        await conn.execute(
            "INSERT INTO projects (id, organization_id, name) VALUES (%s, %s, 'default')"
            " ON CONFLICT DO NOTHING",
            (DEMO_PROJECT_ID, DEMO_ORGANIZATION_ID),
        )
        await open_wallet(conn, DEMO_ORGANIZATION_ID, "USD")
        funding = [
            TransferRequest("demo-topup", DEMO_ORGANIZATION_ID, Kind.TOPUP, DEMO_TOPUP,
                            description="Demo top-up", actor="system"),
            TransferRequest("demo-credits", DEMO_ORGANIZATION_ID, Kind.CREDIT_GRANT, DEMO_CREDITS,
                            description="Demo credits", credit_source="promotion", actor="system"),
        ]  # fmt: skip
        for outcome in await LedgerStore().post_transfers(conn, funding):
            if outcome.error is not None:
                raise outcome.error
        if bootstrap_token:
            await conn.execute(
                "INSERT INTO api_tokens"
                " (id, organization_id, created_by, name, role, secret_sha256)"
                " VALUES (%s, %s, %s, 'bootstrap', 'owner', %s) ON CONFLICT DO NOTHING",
                (uuid.uuid4(), DEMO_ORGANIZATION_ID, DEMO_USER_ID, token_digest(bootstrap_token)),
            )
