"""Fixtures every test folder shares: a real PostgreSQL and a real NATS with JetStream.

GPUDECK_TEST_DATABASE_URL / GPUDECK_TEST_NATS_URL point at running servers (CI uses the
machine's); when unset, embedded ones are started once for the session. Each run gets its own
database and its own stream and subject prefix, so runs never collide.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from gpudeck.cli.embedded import EmbeddedNats, EmbeddedPostgres
from gpudeck.kit.config import EventsConfig


def with_database(url: str, dbname: str) -> str:
    """The same server URL pointing at another database."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{dbname}"))


@pytest.fixture(scope="session")
def run_id() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def pg_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A URL of a running PostgreSQL server with rights to create databases."""
    url = os.environ.get("GPUDECK_TEST_DATABASE_URL")
    if url:
        yield url
        return
    server = EmbeddedPostgres(Path(tmp_path_factory.mktemp("pg")) / "data")
    yield server.start()
    server.stop()


@pytest.fixture(scope="session")
def database_url(pg_server_url: str, run_id: str) -> Iterator[str]:
    """A fresh database for this test run, dropped at the end."""
    name = f"gpudeck_test_{run_id}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield with_database(pg_server_url, name)
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("GPUDECK_TEST_NATS_URL")
    if url:
        yield url
        return
    server = EmbeddedNats(Path(tmp_path_factory.mktemp("nats")))
    yield server.start()
    server.stop()


@pytest.fixture(scope="session")
def events_config(nats_url: str, run_id: str) -> Iterator[EventsConfig]:
    """This run's own stream and subject prefix; the stream is deleted at the end."""
    config = EventsConfig(nats_url=nats_url, stream=f"T_{run_id}", subject_prefix=f"t{run_id}")
    yield config

    async def delete() -> None:
        import nats

        nc = await nats.connect(nats_url, connect_timeout=2, max_reconnect_attempts=0)
        try:
            await nc.jetstream().delete_stream(config.stream)
        except Exception:
            pass
        await nc.close()

    asyncio.run(delete())


@pytest.fixture
def unique() -> str:
    """A short unique name for one test's own schema, consumer or stream."""
    return "u" + uuid.uuid4().hex[:10]


class FreezingProxy:
    """A TCP proxy (to NATS, to PostgreSQL) that can stop passing bytes while keeping its
    connections open: a frozen node, a half-open network path."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.frozen = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                if self.frozen.is_set():
                    await asyncio.Event().wait()  # swallow it, answer nothing, never close
                dst.write(data)
                await dst.drain()

        await asyncio.gather(
            pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True
        )

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()


@pytest.fixture
def freezing_proxy() -> type[FreezingProxy]:
    return FreezingProxy
