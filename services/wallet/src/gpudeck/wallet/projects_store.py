"""SQL of projects: creating, reading, listing by recent use, touching and soft-deleting them.

Every mutation runs in the caller's transaction and writes its account.project.* event to the
outbox there.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import psycopg

from gpudeck.kit.errors import AlreadyExists, FailedPrecondition, NotFound, echo
from gpudeck.proto.events.v1.envelope_pb2 import Event
from gpudeck.wallet import events
from gpudeck.wallet.accounts import Project, check_name, name_key
from gpudeck.wallet.ids import uuid7
from gpudeck.wallet.organizations_store import Conn, OrganizationStore, lock_wallet_rows

PROJECT_COLUMNS = "id, organization_id, name, created_at, last_used_at, deleted_at"
PROJECT = f"SELECT {PROJECT_COLUMNS} FROM projects"


def _project(row: Sequence[Any]) -> Project:
    return Project(*row)


class ProjectStore(OrganizationStore):
    """An organization's projects."""

    async def create_project(self, conn: Conn, org: uuid.UUID, name: str) -> Project:
        name = check_name(name)
        await self.lock_organization(conn, org)
        project = await self._insert_project(conn, org, name, None)
        await self.outbox.add(conn, self._project_event("account.project.created", project))
        return project

    async def _check_name_free(
        self, conn: Conn, org: uuid.UUID, name: str, renamed: uuid.UUID | None = None
    ) -> None:
        """AlreadyExists if another live project of the (locked) organization has this name to
        a reader (`name_key`: "prod" and "Prod" were two projects)."""
        cur = await conn.execute(
            "SELECT id, name FROM projects WHERE organization_id = %s AND deleted_at IS NULL",
            (org,),
        )
        key = name_key(name)
        for project_id, taken in await cur.fetchall():
            if project_id != renamed and name_key(taken) == key:
                raise AlreadyExists(
                    f"organization {org} already has a project named {echo(taken)}",
                    field="name",
                    reason="NAME_TAKEN",
                )

    async def _insert_project(
        self, conn: Conn, org: uuid.UUID, name: str, project_id: uuid.UUID | None
    ) -> Project:
        await self._check_name_free(conn, org, name)
        cur = await conn.execute(
            "INSERT INTO projects (id, organization_id, name) VALUES (%s, %s, %s)"
            " ON CONFLICT (organization_id, name) WHERE deleted_at IS NULL DO NOTHING"
            f" RETURNING {PROJECT_COLUMNS}",
            (project_id or uuid7(), org, name),
        )
        row = await cur.fetchone()
        if row is None:
            raise AlreadyExists(
                f"organization {org} already has a project named {echo(name)}",
                field="name",
                reason="NAME_TAKEN",
            )
        return _project(row)

    async def _find_project(
        self, conn: Conn, project_id: uuid.UUID, *, deleted: bool = False
    ) -> Project | None:
        live = "" if deleted else " AND deleted_at IS NULL"
        cur = await conn.execute(f"{PROJECT} WHERE id = %s{live}", (project_id,))
        row = await cur.fetchone()
        return _project(row) if row else None

    async def get_project(
        self, conn: Conn, project_id: uuid.UUID, *, deleted: bool = False
    ) -> Project:
        project = await self._find_project(conn, project_id, deleted=deleted)
        if project is None:
            raise NotFound(f"project {project_id} not found", field="project_id")
        return project

    async def list_projects(self, conn: Conn, org: uuid.UUID, *, limit: int = 50) -> list[Project]:
        """The organization's projects, most recently used first."""
        await self.get_organization(conn, org)
        cur = await conn.execute(
            f"{PROJECT} WHERE organization_id = %s AND deleted_at IS NULL"
            " ORDER BY last_used_at DESC, id DESC LIMIT %s",
            (org, limit),
        )
        return [_project(row) for row in await cur.fetchall()]

    async def touch_project(self, conn: Conn, project_id: uuid.UUID) -> Project:
        """Mark a project as just used (it moves to the front of the recent list); no event."""
        cur = await conn.execute(
            "UPDATE projects SET last_used_at = greatest(last_used_at, clock_timestamp())"
            " WHERE id = %s AND deleted_at IS NULL"
            f" RETURNING {PROJECT_COLUMNS}",
            (project_id,),
        )
        row = await cur.fetchone()
        if row is None:
            raise NotFound(f"project {project_id} not found", field="project_id")
        return _project(row)

    async def rename_project(self, conn: Conn, project_id: uuid.UUID, name: str) -> Project:
        """Give a live project a new name, unique among the organization's live projects."""
        name = check_name(name)
        project = await self.get_project(conn, project_id)
        await self.lock_organization(conn, project.organization_id)
        if name == project.name:
            return project
        await self._check_name_free(conn, project.organization_id, name, renamed=project_id)
        try:
            async with conn.transaction():
                cur = await conn.execute(
                    "UPDATE projects SET name = %s WHERE id = %s AND deleted_at IS NULL"
                    f" RETURNING {PROJECT_COLUMNS}",
                    (name, project_id),
                )
        except psycopg.errors.UniqueViolation:
            raise AlreadyExists(
                f"organization {project.organization_id} already has a project named {echo(name)}",
                field="name",
                reason="NAME_TAKEN",
            ) from None
        row = await cur.fetchone()
        if row is None:  # deleted while we waited for the lock
            raise NotFound(f"project {project_id} not found", field="project_id")
        renamed = _project(row)
        await self.outbox.add(conn, self._project_event("account.project.updated", renamed))
        return renamed

    async def delete_project(self, conn: Conn, project_id: uuid.UUID) -> Project:
        """Soft-delete a project that is not its organization's last and meters nothing."""
        project = await self.get_project(conn, project_id)
        # The wallet row first (lock order: the wallet, then the organization): a meter being
        # opened in the project holds it, and the check below must see that meter.
        await lock_wallet_rows(conn, [project.organization_id])
        await self.lock_organization(conn, project.organization_id)
        cur = await conn.execute(
            "SELECT (SELECT count(*) FROM projects WHERE organization_id = %s"
            "        AND deleted_at IS NULL),"
            "       EXISTS (SELECT 1 FROM meters WHERE organization_id = %s AND project_id = %s"
            "        AND closed_at IS NULL)",
            (project.organization_id, project.organization_id, project_id),
        )
        row = await cur.fetchone()
        assert row is not None
        if row[0] <= 1:
            raise FailedPrecondition(
                f"project {project_id} is the organization's last project",
                field="project_id",
                reason="LAST_PROJECT",
            )
        if row[1]:
            raise FailedPrecondition(
                f"project {project_id} still has running resources",
                field="project_id",
                reason="PROJECT_IN_USE",
            )
        cur = await conn.execute(
            "UPDATE projects SET deleted_at = now() WHERE id = %s AND deleted_at IS NULL"
            f" RETURNING {PROJECT_COLUMNS}",
            (project_id,),
        )
        row = await cur.fetchone()
        if row is None:  # deleted while we waited for the lock
            raise NotFound(f"project {project_id} not found", field="project_id")
        deleted = _project(row)
        await self.outbox.add(conn, self._project_event("account.project.deleted", deleted))
        return deleted

    async def _delete_all_projects(self, conn: Conn, org: uuid.UUID) -> list[Event]:
        """Soft-delete every live project of the organization; their events."""
        cur = await conn.execute(
            "UPDATE projects SET deleted_at = now() WHERE organization_id = %s"
            f" AND deleted_at IS NULL RETURNING {PROJECT_COLUMNS}",
            (org,),
        )
        rows = await cur.fetchall()
        return [self._project_event("account.project.deleted", _project(row)) for row in rows]

    @staticmethod
    def _project_event(event_type: str, project: Project) -> Event:
        return events.account_changed(
            event_type,
            project.organization_id,
            kind="project",
            id=project.id,
            name=project.name,
            project_id=project.id,
        )
