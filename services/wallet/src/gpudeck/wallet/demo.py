"""The demo organization `gpudeck up --demo` seeds, and the bootstrap owner token.

Seeding is idempotent: fixed ids and ON CONFLICT DO NOTHING, so every start may run it.
"""

from __future__ import annotations

import hashlib
import uuid

from psycopg_pool import AsyncConnectionPool

DEMO_USER_ID = uuid.UUID("00000000-0000-4000-8000-000000000001")
DEMO_ORGANIZATION_ID = uuid.UUID("00000000-0000-4000-8000-0000000000a1")
DEMO_PROJECT_ID = uuid.UUID("00000000-0000-4000-8000-0000000000b1")
DEMO_EMAIL = "demo@gpudeck.local"


def token_digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


async def seed(pool: AsyncConnectionPool, *, bootstrap_token: str | None) -> None:
    """Create the demo user, organization (KYC-verified) and project; add the bootstrap token."""
    async with pool.connection() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO wallet.users (id, email, name) VALUES (%s, %s, 'Demo User')"
            " ON CONFLICT DO NOTHING",
            (DEMO_USER_ID, DEMO_EMAIL),
        )
        await conn.execute(
            "INSERT INTO wallet.organizations (id, slug, name, owner_user_id, currency, kyc_status)"
            " VALUES (%s, 'demo', 'Demo Organization', %s, 'USD', 'verified')"
            " ON CONFLICT DO NOTHING",
            (DEMO_ORGANIZATION_ID, DEMO_USER_ID),
        )
        await conn.execute(
            "INSERT INTO wallet.memberships (organization_id, user_id, role)"
            " VALUES (%s, %s, 'owner') ON CONFLICT DO NOTHING",
            (DEMO_ORGANIZATION_ID, DEMO_USER_ID),
        )
        await conn.execute(
            "INSERT INTO wallet.projects (id, organization_id, name) VALUES (%s, %s, 'default')"
            " ON CONFLICT DO NOTHING",
            (DEMO_PROJECT_ID, DEMO_ORGANIZATION_ID),
        )
        if bootstrap_token:
            await conn.execute(
                "INSERT INTO wallet.api_tokens"
                " (id, organization_id, created_by, name, role, secret_sha256)"
                " VALUES (%s, %s, %s, 'bootstrap', 'owner', %s) ON CONFLICT DO NOTHING",
                (uuid.uuid4(), DEMO_ORGANIZATION_ID, DEMO_USER_ID, token_digest(bootstrap_token)),
            )
