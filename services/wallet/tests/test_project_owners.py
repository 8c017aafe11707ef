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
