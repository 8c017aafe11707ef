"""SQL of an organization's own row: reading, locking, renaming, KYC, and a member's role.

OrganizationStore is the base the project, token and account stores build on. Mutations inside
one organization first lock its row (FOR NO KEY UPDATE, which leaves foreign-key inserts
elsewhere free), so checks such as "the last owner stays" cannot race.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from psycopg import AsyncConnection

from gpudeck.kit.errors import NotFound
from gpudeck.kit.events import Outbox
from gpudeck.proto.events.v1.envelope_pb2 import Event
from gpudeck.wallet import events
from gpudeck.wallet.accounts import Organization, User, check_kyc_status, check_name

Conn = AsyncConnection[Any]
# A role's rank in SQL, weakest first: array_position(RANKED, role).
RANKED = "ARRAY['viewer', 'member', 'billing', 'admin', 'owner']"

ORGANIZATION = """
SELECT o.id, o.name, o.currency, o.plan_code, o.kyc_status, o.created_at, u.id, u.email, u.name,
       (SELECT count(*) FROM memberships m WHERE m.organization_id = o.id)
FROM organizations o JOIN users u ON u.id = o.owner_user_id
WHERE o.id = %s AND o.deleted_at IS NULL
"""


async def lock_wallet_rows(conn: Conn, organization_ids: Sequence[uuid.UUID]) -> None:
    """Lock these organizations' wallet rows, in id order, reading nothing: what serializes an
    organization's money and account changes (lock order: the wallet, then the organization)."""
    await conn.cursor(binary=True).execute(  # binary: a billing tick locks thousands
        "SELECT 1 FROM wallets WHERE organization_id = ANY(%s) ORDER BY organization_id FOR UPDATE",
        (sorted(organization_ids),),
    )


def _organization(row: Sequence[Any]) -> Organization:
    owner = User(row[6], row[7], row[8])
    return Organization(row[0], row[1], owner, row[2], row[3], row[4], row[5], row[9])


def _org_not_found(org: uuid.UUID) -> NotFound:
    return NotFound(f"organization {org} not found", field="organization_id")


class OrganizationStore:
    """Organizations in the wallet's schema; events go to `outbox` in the caller's transaction."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox

    async def get_organization(self, conn: Conn, org: uuid.UUID) -> Organization:
        cur = await conn.execute(ORGANIZATION, (org,))
        row = await cur.fetchone()
        if row is None:
            raise _org_not_found(org)
        return _organization(row)

    async def find_organization(self, conn: Conn, org: uuid.UUID) -> Organization | None:
        cur = await conn.execute(ORGANIZATION, (org,))
        row = await cur.fetchone()
        return _organization(row) if row else None

    async def lock_organization(self, conn: Conn, org: uuid.UUID) -> tuple[str, uuid.UUID]:
        """Serialize this organization's account changes; its (currency, owner_user_id)."""
        cur = await conn.execute(
            "SELECT currency, owner_user_id FROM organizations"
            " WHERE id = %s AND deleted_at IS NULL FOR NO KEY UPDATE",
            (org,),
        )
        row = await cur.fetchone()
        if row is None:
            raise _org_not_found(org)
        return row[0], row[1]

    async def update_organization(self, conn: Conn, org: uuid.UUID, *, name: str) -> Organization:
        name = check_name(name)
        await self.lock_organization(conn, org)
        cur = await conn.execute(
            "UPDATE organizations SET name = %s WHERE id = %s AND name <> %s RETURNING id",
            (name, org, name),
        )
        if await cur.fetchone() is not None:  # a name unchanged changes nothing: no event
            await self.outbox.add(
                conn, self._organization_event("account.organization.updated", org, name)
            )
        return await self.get_organization(conn, org)

    async def set_kyc_status(self, conn: Conn, org: uuid.UUID, status: str) -> Organization:
        status = check_kyc_status(status)
        await self.lock_organization(conn, org)
        cur = await conn.execute(
            "UPDATE organizations SET kyc_status = %s WHERE id = %s AND kyc_status <> %s"
            " RETURNING name",
            (status, org, status),
        )
        changed = await cur.fetchone()
        if changed is not None:
            event = self._organization_event("account.organization.updated", org, changed[0])
            await self.outbox.add(conn, event)
        return await self.get_organization(conn, org)

    @staticmethod
    def _organization_event(event_type: str, org: uuid.UUID, name: str) -> Event:
        return events.account_changed(event_type, org, kind="organization", id=org, name=name)

    async def member_role(self, conn: Conn, org: uuid.UUID, user: uuid.UUID) -> str | None:
        cur = await conn.execute(
            "SELECT role FROM memberships WHERE organization_id = %s AND user_id = %s", (org, user)
        )
        row = await cur.fetchone()
        return row[0] if row else None
