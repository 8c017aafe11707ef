"""PostgreSQL: the async connection pool and each service's migrations.

A service owns one schema. Its migrations are ordered SQL files (`001_name.sql`, …) applied at
start in one transaction under an advisory lock, so two replicas starting at once apply them once;
applied versions are recorded in `<schema>.schema_migrations`.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

log = logging.getLogger(__name__)


class DatabaseUnavailable(Exception):
    """The database could not be reached at start."""


async def open_pool(
    url: str,
    *,
    min_size: int = 2,
    max_size: int = 10,
    timeout: float = 10.0,
    name: str = "gpudeck",
    schema: str | None = None,
) -> AsyncConnectionPool:
    """Open a pool and wait until it holds `min_size` connections; fail fast otherwise.

    With `schema`, every connection's search_path starts with it, so a service's SQL names its
    own tables unqualified.
    """
    # One connection first: a failure no retry mends is one line at once, not the pool's
    # retries (a warning each) for its whole timeout.
    why = await _why_unreachable(url, timeout)
    if why and refused_for_good(why):
        raise DatabaseUnavailable(why)
    kwargs: dict[str, object] = {"autocommit": True}
    if schema is not None:
        kwargs["options"] = f"-c search_path={schema},public"
    pool = AsyncConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        open=False,
        name=name,
        timeout=timeout,
        kwargs=kwargs,
        configure=_in_utc,
    )
    try:
        await pool.open(wait=True, timeout=timeout)
    except Exception as exc:  # PoolTimeout hides the cause: try once to name it
        await pool.close()
        reason = await _why_unreachable(url) or str(exc)
        raise DatabaseUnavailable(reason) from None
    return pool


async def _in_utc(conn: psycopg.AsyncConnection[Any]) -> None:
    """Times come back in UTC whatever the server's or the client's (PGTZ) time zone: the
    services read and print them as UTC (invoice dates, days of spend)."""
    await conn.execute("SET TIME ZONE 'UTC'")


# A server that refuses a connection for now may take it later: starting, stopping, in
# recovery or not accepting connections yet (a standby being promoted), full.
PASSING = (
    "starting up",
    "shutting down",
    "in recovery",
    "accepting connections",
    "too many",
    "connection slots",
)


def refused_for_good(reason: str) -> bool:
    """Whether a connection failure (its first line) is one no retry mends: the server refused
    it (a database or role that does not exist, a wrong password), not for now, or it never
    answered."""
    refused = "FATAL:" in reason and not any(p in reason for p in PASSING)
    return refused or "timeout expired" in reason


async def _why_unreachable(url: str, timeout: float = 5.0) -> str | None:
    """Why one connection to `url` failed, in one line; None if it connected."""
    try:
        conn = await psycopg.AsyncConnection.connect(url, connect_timeout=max(1, int(timeout)))
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    await conn.close()
    return None


def _lock_key(schema: str) -> int:
    digest = hashlib.sha256(f"gpudeck.migrate.{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def migration_files(folder: Path) -> list[tuple[int, str, Path]]:
    """The migrations in `folder`, ordered: (version, name, path)."""
    found = []
    for path in sorted(folder.glob("*.sql")):
        head, _, rest = path.stem.partition("_")
        if not head.isdigit():
            raise ValueError(f"migration {path.name} must start with a number, like 001_name.sql")
        found.append((int(head), rest, path))
    versions = [v for v, _, _ in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"two migrations share a number in {folder}")
    return found


async def migrate(
    pool: AsyncConnectionPool, schema: str, folder: Path, *, table: str = "schema_migrations"
) -> list[int]:
    """Apply the migrations of `folder` not yet applied to `schema`; return the versions applied.

    Each file runs with `search_path` set to the schema, so files name their tables unqualified.
    `table` records what was applied (the kit's own tables use `kit_migrations`).
    """
    files = migration_files(folder)
    ident = sql.Identifier(schema)
    record = sql.Identifier(schema, table)
    applied: list[int] = []
    async with pool.connection() as conn, conn.transaction():
        cur = await conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (_lock_key(schema),))
        if (await cur.fetchone()) != (True,):  # said, or a start waiting here looks hung
            log.info("waiting for another process's migrations", extra={"schema": schema})
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(schema),))
        await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
        await conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(record)
        )
        cur = await conn.execute(sql.SQL("SELECT version FROM {}").format(record))
        done = {row[0] for row in await cur.fetchall()}
        await conn.execute(sql.SQL("SET LOCAL search_path TO {}, public").format(ident))
        for version, name, path in files:
            if version in done:
                continue
            await conn.execute(path.read_text())  # type: ignore[arg-type]
            await conn.execute(
                sql.SQL("INSERT INTO {} (version, name) VALUES (%s, %s)").format(record),
                (version, name),
            )
            applied.append(version)
    if applied:
        log.info("migrations applied", extra={"schema": schema, "versions": applied})
    return applied
