"""ProjectOwners trusts a project seen live for a few seconds, except while this process is
deleting it: a meter that waited for the wallet lock the deletion held was checked against the
cached "live" after the deletion committed, and opened in a deleted project."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from gpudeck.wallet.project_owners import ProjectOwners

ORG, PROJECT = uuid.uuid4(), uuid.uuid4()


class Projects:
    """A stand-in for the projects table (the boundary this test does not test): one project,
    deleted or not, and how many times it was asked."""

    def __init__(self) -> None:
        self.deleted = False
        self.asked = 0

    async def execute(self, sql: str, params: Any) -> Projects:
        self.asked += 1
        return self

    async def fetchall(self) -> list[tuple[uuid.UUID, uuid.UUID, bool]]:
        return [(PROJECT, ORG, self.deleted)]


async def test_a_project_being_deleted_is_asked_about_not_taken_from_the_cache() -> None:
    owners, table = ProjectOwners(), Projects()
    conn: Any = table
    await owners.check(conn, ORG, PROJECT)  # seen live: cached
    await owners.check(conn, ORG, PROJECT)
    assert table.asked == 1
    with owners.deleting(PROJECT):
        table.deleted = True  # committed by the deletion; this call waited for it
        assert await owners.unknown(conn, [(ORG, PROJECT)]) == {(ORG, PROJECT)}
        assert table.asked == 2
    assert await owners.unknown(conn, [(ORG, PROJECT)]) == {(ORG, PROJECT)}
    assert table.asked == 2  # deleted: known for good, no need to ask


async def test_a_deletion_that_fails_leaves_the_project_live() -> None:
    owners, table = ProjectOwners(), Projects()
    conn: Any = table
    with pytest.raises(RuntimeError), owners.deleting(PROJECT):
        raise RuntimeError("PROJECT_IN_USE")
    assert await owners.unknown(conn, [(ORG, PROJECT)]) == set()


class Touches(Projects):
    """The projects table, counting the writes of last_used_at."""

    def __init__(self) -> None:
        super().__init__()
        self.touched: list[Any] = []

    async def execute(self, sql: str, params: Any) -> Touches:
        if sql.startswith("UPDATE projects SET last_used_at"):
            self.touched.append(params[0])
        return self

    async def fetchall(self) -> list[tuple[uuid.UUID, uuid.UUID, bool]]:
        return [(p, ORG, False) for p in (PROJECT, OTHER)]


OTHER = uuid.uuid4()


async def test_a_use_that_changes_the_recent_order_is_written_at_once() -> None:
    """Writes are throttled, but a use of A after B was dropped too: A, B, A within seconds
    left B the most recently used for good."""
    owners, table = ProjectOwners(), Touches()
    conn: Any = table
    for project in (PROJECT, PROJECT, OTHER, OTHER, PROJECT):
        await owners.use(conn, ORG, project)
    assert table.touched == [PROJECT, OTHER, PROJECT]  # the repeats throttled, the turns not
