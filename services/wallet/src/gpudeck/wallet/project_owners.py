"""Which organization a project belongs to, for the money calls that name one.

A transfer, hold, meter or usage event may name a project; it must be a live project of the
same organization (NOT_FOUND otherwise, as for a project that does not exist), so spend is never
booked to a project the caller cannot see. The wallet's own postings (a hold's capture, billing
ticks) only need the organization's project, deleted or not: what was started before a project
was deleted is still settled. A project never moves between organizations and a deletion is
final, so those answers are cached; that a project is live is trusted for LIVE_SECONDS (a
deletion through this process is seen at once, even by a call that waited for it: `deleting`;
one through another replica within that time).

Using a project for a resource (a meter opened, usage recorded, a hold taken) also makes it
"recently used": its `last_used_at` moves at once when that changes its organization's order,
else at most every TOUCH_EVERY seconds per project and process.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from psycopg import AsyncConnection

from gpudeck.kit.errors import NotFound

Conn = AsyncConnection[Any]
TOUCH_EVERY = 5.0  # seconds between two writes of one project's last_used_at (the recent order)
LIVE_SECONDS = 5.0  # how long a project seen live is taken to be live without asking again
CACHE_LIMIT = 100_000


class ProjectOwners:
    def __init__(self) -> None:
        self._owner: dict[uuid.UUID, uuid.UUID] = {}
        self._live_until: dict[uuid.UUID, float] = {}
        self._deleted: set[uuid.UUID] = set()
        self._deleting: dict[uuid.UUID, int] = {}  # deletions under way in this process
        self._touched: dict[uuid.UUID, float] = {}
        self._latest: dict[uuid.UUID, uuid.UUID] = {}  # organization → its project used last here

    async def unknown(
        self,
        conn: Conn,
        pairs: Iterable[tuple[uuid.UUID, uuid.UUID | None]],
        *,
        live: bool = True,
    ) -> set[tuple[uuid.UUID, uuid.UUID]]:
        """The (organization, project) pairs whose project is not one of that organization's
        (with `live`, not a live one)."""
        named = {(org, project) for org, project in pairs if project is not None}
        now = time.monotonic()
        missing = {
            project
            for _, project in named
            if project not in self._owner
            or (
                live
                and project not in self._deleted
                and (self._live_until.get(project, 0) < now or project in self._deleting)
            )
        }
        if missing:
            cur = await conn.execute(
                "SELECT id, organization_id, deleted_at IS NOT NULL FROM projects"
                " WHERE id = ANY(%s)",
                (list(missing),),
            )
            if len(self._owner) > CACHE_LIMIT:
                self._owner.clear()
                self._live_until.clear()
                self._deleted.clear()
            for project, org, deleted in await cur.fetchall():
                self._owner[project] = org
                if deleted:
                    self._deleted.add(project)
                else:
                    self._live_until[project] = now + LIVE_SECONDS
        return {
            (org, project)
            for org, project in named
            if self._owner.get(project) != org or (live and project in self._deleted)
        }

    def owner(self, project_id: uuid.UUID) -> uuid.UUID | None:
        """The organization of a project `unknown` has seen (None: not seen, or no such one)."""
        return self._owner.get(project_id)

    @contextlib.contextmanager
    def deleting(self, project_id: uuid.UUID) -> Iterator[None]:
        """Around a deletion's transaction: while it runs, that the project is live is asked of
        the database, not the cache (a meter opened in it once the deletion let the wallet go
        was let through on a cached answer, in this very process); once it is done, `deleted`."""
        self._deleting[project_id] = self._deleting.get(project_id, 0) + 1
        try:
            yield
            self.deleted(project_id)
        finally:
            left = self._deleting.pop(project_id) - 1
            if left:
                self._deleting[project_id] = left

    def deleted(self, project_id: uuid.UUID) -> None:
        """A project was just deleted: money calls naming it are refused from now on."""
        self._deleted.add(project_id)
        self._live_until.pop(project_id, None)

    async def check(
        self, conn: Conn, organization_id: uuid.UUID, project_id: uuid.UUID | None
    ) -> None:
        """Raise NotFound unless `project_id` is unset or a live project of `organization_id`."""
        if await self.unknown(conn, [(organization_id, project_id)]):
            raise not_found(project_id)

    async def use(
        self, conn: Conn, organization_id: uuid.UUID, project_id: uuid.UUID | None
    ) -> None:
        """`check`, then note the project as used now (throttled)."""
        await self.check(conn, organization_id, project_id)
        if project_id is None:
            return
        now = time.monotonic()
        # Throttled only while it stays its organization's latest use here: a use that changes
        # the order is written at once (A, B, A again within seconds left B first for good).
        latest = self._latest.get(organization_id) == project_id
        if latest and now - self._touched.get(project_id, -TOUCH_EVERY) < TOUCH_EVERY:
            return
        if len(self._touched) > CACHE_LIMIT:
            self._touched.clear()
            self._latest.clear()
        self._touched[project_id] = now
        self._latest[organization_id] = project_id
        await conn.execute(
            "UPDATE projects SET last_used_at = now() WHERE id = %s AND last_used_at < now()",
            (project_id,),
        )


def not_found(project_id: uuid.UUID | None) -> NotFound:
    return NotFound(f"project {project_id} not found", field="project_id")
