"""`gpudeck up`: the whole stack on one machine, in the foreground.

PostgreSQL and NATS come from GPUDECK_DATABASE_URL / GPUDECK_NATS_URL, else embedded ones keep
their data in the data folder. Then every service and the gateway start as child processes; once
all are healthy the launcher prints where they are and waits. Ctrl-C, SIGTERM or a child's death
stops the children (SIGTERM, a grace period, SIGKILL) and then the embedded servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from gpudeck.cli.embedded import EmbeddedNats, EmbeddedPostgres
from gpudeck.cli.health import token_works, wait_ready
from gpudeck.cli.procs import Child, describe_exit, stop_all
from gpudeck.cli.stack import (
    BOOTSTRAP_TOKEN_FILE,
    GATEWAY,
    SERVICE_TOKEN_FILE,
    Stack,
    StopRequested,
    UsageError,
    bind_problem,
    check_ports,
    embedded_nats_port,
    kept_secret,
    resolve,
)
from gpudeck.kit import logs
from gpudeck.kit.config import ConfigError, nats_servers, redact_url

log = logging.getLogger("gpudeck.cli")

DATABASE = "gpudeck"
LOCK_FILE = "gpudeck.lock"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
EXIT_FAILED = 1
EXIT_CONFIG = 2
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class UpOptions:
    demo: bool = False
    data_dir: str | None = None
    host: str = "127.0.0.1"
    listen: Mapping[str, str | None] = field(default_factory=dict)  # variable → flag value
    startup_timeout: float = 120.0


def check_settings(env: Mapping[str, str], *, demo: bool = False) -> None:
    """Each part's own settings, checked before anything starts: a bad one is one line naming
    it (UsageError), not a child's log line after the others started. What `up` provides
    itself (the URLs, the service token) stands in for what is not set yet."""
    from gpudeck.gateway.config import Settings as GatewaySettings
    from gpudeck.kit.config import ServiceConfig
    from gpudeck.wallet.settings import WalletSettings

    filled = {
        "GPUDECK_DATABASE_URL": "postgresql://localhost/gpudeck",
        "GPUDECK_NATS_URL": "nats://127.0.0.1:4222",
        "GPUDECK_SERVICE_TOKEN": "set-by-up",
    }
    given = {**filled, **{k: v for k, v in env.items() if v.strip() or k not in filled}}
    if demo:
        given["GPUDECK_DEMO"] = "1"
    try:
        ServiceConfig.from_env("wallet", given)
        WalletSettings.from_env(given)
        GatewaySettings.from_env(given)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def up(options: UpOptions, env: Mapping[str, str]) -> int:
    """Run the stack until stopped; return the exit code."""
    started = time.monotonic()
    stack = resolve(options.listen, env, host=options.host, data_dir=options.data_dir)
    level = env.get("GPUDECK_LOG_LEVEL", "").strip().upper() or "INFO"
    if level not in LOG_LEVELS:
        raise UsageError(f"GPUDECK_LOG_LEVEL={level!r} is not DEBUG, INFO, WARNING or ERROR")
    check_settings(env, demo=options.demo)
    check_ports(stack)
    secrets = {"GPUDECK_SERVICE_TOKEN": SERVICE_TOKEN_FILE}
    if options.demo:  # the demo organization's owner token, so the API is usable at once
        secrets["GPUDECK_BOOTSTRAP_TOKEN"] = BOOTSTRAP_TOKEN_FILE
    with lock_data_dir(stack.data_dir):
        try:
            kept = {var: kept_secret(env, var, stack.data_dir, f) for var, f in secrets.items()}
        except OSError as exc:
            raise UsageError(f"data folder {stack.data_dir}: {exc.strerror or exc}") from None
        logs.setup("launcher", level)
        child_env = {**env, **stack.child_settings(), **kept, "PYTHONUNBUFFERED": "1"}
        if options.demo:
            child_env["GPUDECK_DEMO"] = "1"
        backing = Backing(stack)
        with _signals_interrupt():
            try:
                child_env["GPUDECK_DATABASE_URL"], child_env["GPUDECK_NATS_URL"] = backing.start()
                return asyncio.run(supervise(stack, child_env, options.startup_timeout, started))
            finally:
                with _signals_ignored():
                    backing.stop()


def lock_data_dir(data_dir: Path) -> IO[str]:
    """Hold the data folder for this launcher's life: two stacks must not share one PostgreSQL."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        lock = (data_dir / LOCK_FILE).open("a+")
    except OSError as exc:
        raise UsageError(f"data folder {data_dir}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        raise UsageError(
            f"data folder {data_dir} is in use by another `gpudeck up` (pid {holder}); stop it, "
            "or choose another folder with --data-dir or GPUDECK_DATA_DIR"
        ) from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


class Backing:
    """PostgreSQL and NATS for the stack: the servers the environment names, else embedded ones."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.postgres: EmbeddedPostgres | None = None
        self.nats: EmbeddedNats | None = None

    def start(self) -> tuple[str, str]:
        """Start what is embedded, check what is not; return (database URL, NATS URL)."""
        stack = self.stack
        if stack.database_url is None:
            self.postgres = EmbeddedPostgres(stack.data_dir / "postgres")
            log.info("starting embedded PostgreSQL", extra={"data": str(self.postgres.data_dir)})
            database_url = create_database(self.postgres.start(), DATABASE)
        else:
            database_url = stack.database_url
            check_database(database_url)
        if stack.nats_url is None:
            port = embedded_nats_port(stack)
            if stack.nats_port_fixed and bind_problem("127.0.0.1", port):
                raise UsageError(f"GPUDECK_NATS_PORT={port}: {bind_problem('127.0.0.1', port)}")
            self.nats = EmbeddedNats(stack.data_dir / "nats", port=port)
            log.info(
                "starting embedded NATS", extra={"data": str(self.nats.data_dir), "port": port}
            )
            nats_url = self.nats.start(supervised=True)
        else:
            nats_url = stack.nats_url
            asyncio.run(check_nats(nats_url))
        return database_url, nats_url

    def stop(self) -> None:
        if self.nats is not None:
            self.nats.stop()
        if self.postgres is not None:
            self.postgres.stop()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def check_database(url: str, name: str = "GPUDECK_DATABASE_URL") -> None:
    try:
        with psycopg.connect(url, connect_timeout=5):
            pass
    except psycopg.Error as exc:
        raise UsageError(f"{name}: cannot connect: {_one_line(exc)}") from None


def create_database(server_url: str, dbname: str) -> str:
    """Create `dbname` on the server if missing; return the URL of that database."""
    try:
        with psycopg.connect(server_url, autocommit=True, connect_timeout=5) as conn:
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,))
            if found.fetchone() is None:
                with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    except psycopg.Error as exc:
        raise UsageError(f"embedded PostgreSQL: cannot create database: {_one_line(exc)}") from None
    return urlunsplit(urlsplit(server_url)._replace(path=f"/{dbname}"))


async def check_nats(url: str, name: str = "GPUDECK_NATS_URL") -> None:
    """Connect once and ask for the JetStream account, so a wrong server is named now."""
    import nats

    errors: list[Exception] = []

    async def remember(exc: Exception) -> None:
        errors.append(exc)

    try:
        async with asyncio.timeout(15):
            # nats-py retries forever with allow_reconnect=False; one quick retry ends it
            nc = await nats.connect(
                nats_servers(url),
                connect_timeout=3,
                max_reconnect_attempts=1,
                reconnect_time_wait=0.1,
                error_cb=remember,
            )
    except Exception as exc:
        reason = errors[0] if errors else exc
        raise UsageError(f"{name}: cannot connect: {_one_line(reason)}") from None
    try:
        async with asyncio.timeout(5):
            await nc.jetstream().account_info()
    except Exception as exc:
        raise UsageError(f"{name}: JetStream is not available there ({_one_line(exc)})") from None
    finally:
        await nc.close()


async def supervise(
    stack: Stack, env: Mapping[str, str], startup_timeout: float, started: float
) -> int:
    """Start every part, then watch them; whatever happens, stop them all before returning."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    children = [
        Child(part.name, [sys.executable, "-m", part.module], env, sys.stderr.buffer)
        for part in stack.parts
    ]
    try:
        for child in children:
            await child.start()
        return await _watch(stack, env, children, stop, startup_timeout, started)
    finally:
        await stop_all([c for c in children if c.exited is not None], stack.grace)
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


async def _watch(
    stack: Stack,
    env: Mapping[str, str],
    children: list[Child],
    stop: asyncio.Event,
    startup_timeout: float,
    started: float,
) -> int:
    """Wait until all are healthy (then print the banner), and then for a stop or a death."""
    ready: set[str] = set()
    death = asyncio.create_task(_first_exit(children))
    stopping = asyncio.create_task(stop.wait())
    healthy = asyncio.create_task(wait_ready(stack.parts, ready))
    waiters: list[asyncio.Task[Any]] = [death, stopping, healthy]
    try:
        await asyncio.wait(waiters, timeout=startup_timeout, return_when=asyncio.FIRST_COMPLETED)
        if healthy.done() and not death.done() and not stopping.done():
            healthy.result()
            seconds = time.monotonic() - started
            print_banner(stack, env, seconds, sys.stdout, bootstrap=await _bootstrap(stack, env))
            await asyncio.wait([death, stopping], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
    if stopping.done() and not stopping.cancelled():
        log.info("stopping")
        return 0
    if death.done() and not death.cancelled():
        child = death.result()
        code = child.exited.result() if child.exited else None
        print(f"gpudeck: {child.name} {describe_exit(code)}; stopping the others", file=sys.stderr)
        return EXIT_CONFIG if code == EXIT_CONFIG else EXIT_FAILED
    waiting = ", ".join(sorted({part.name for part in stack.parts} - ready))
    print(f"gpudeck: not healthy after {startup_timeout:g}s: {waiting}", file=sys.stderr)
    return EXIT_FAILED


async def _first_exit(children: list[Child]) -> Child:
    by_task = {child.exited: child for child in children if child.exited is not None}
    done, _ = await asyncio.wait(by_task, return_when=asyncio.FIRST_COMPLETED)
    return by_task[done.pop()]


async def _bootstrap(stack: Stack, env: Mapping[str, str]) -> bool | None:
    """Whether the demo's GPUDECK_BOOTSTRAP_TOKEN works (None: not set, or not known)."""
    token = env.get("GPUDECK_BOOTSTRAP_TOKEN", "")
    if env.get("GPUDECK_DEMO") != "1" or not token:
        return None
    gateway = next(p for p in stack.parts if p.name == GATEWAY)
    return await token_works(gateway.listen.local, token)


def print_banner(
    stack: Stack,
    env: Mapping[str, str],
    seconds: float,
    out: TextIO,
    *,
    bootstrap: bool | None = None,
) -> None:
    """Where everything is, on stdout once all parts are healthy; the demo's bootstrap token
    unless it is known not to work (`bootstrap` False: revoked, say)."""
    gateway = next(p for p in stack.parts if p.name == GATEWAY)
    http = f"http://{gateway.listen.local}"
    lines = [
        f"gpudeck is up ({seconds:.1f} s); data in {stack.data_dir}",
        "",
        f"  API and GraphiQL   {http}/graphql",
        f"  health, metrics    {http}/healthz  {http}/metrics",
    ]
    for part in stack.parts:
        if part.name != GATEWAY:
            metrics = f"  metrics http://{part.metrics.local}/metrics" if part.metrics else ""
            lines.append(f"  {part.name:<18} gRPC {part.listen.local}{metrics}")
    database = env["GPUDECK_DATABASE_URL"]
    nats = env["GPUDECK_NATS_URL"]
    if stack.database_url is None:
        lines.append(f"  PostgreSQL         embedded, {database}")
    else:
        lines.append(f"  PostgreSQL         {redact_url(database)}")
    embedded = "embedded, " if stack.nats_url is None else ""
    lines.append(f"  NATS JetStream     {embedded}{redact_url(nats)}")
    if stack.database_url is None or stack.nats_url is None:
        lines += [
            "",
            "To use your own servers, set GPUDECK_DATABASE_URL=postgresql://user:password@host"
            ":5432/gpudeck and GPUDECK_NATS_URL=nats://host:4222 (JetStream enabled), then "
            "`gpudeck up` again.",
        ]
    token = env.get("GPUDECK_BOOTSTRAP_TOKEN", "")
    if env.get("GPUDECK_DEMO") == "1" and token and bootstrap is False:
        lines += [
            "",
            "GPUDECK_BOOTSTRAP_TOKEN does not work (revoked, its organization deleted, or the"
            " demo user no longer an owner there): use a token of one of the organization's"
            " owners.",
        ]
    elif env.get("GPUDECK_DEMO") == "1" and token:
        lines += [
            "",
            "Demo organization seeded; its owner's API token (GPUDECK_BOOTSTRAP_TOKEN):",
            f"  Authorization: Bearer {token}",
        ]
    lines += ["", "Press Ctrl-C to stop."]
    print("\n".join(lines), file=out, flush=True)


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """While embedded servers start, SIGTERM and SIGHUP interrupt like Ctrl-C, so they stop."""

    def interrupt(sig: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt if sig == signal.SIGINT else StopRequested

    previous = {sig: signal.signal(sig, interrupt) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """While stopping the embedded servers, a second Ctrl-C must not leave them half-stopped."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
