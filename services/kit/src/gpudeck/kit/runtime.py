"""How every service starts and stops: config → logs → metrics → pool → migrations → events →
gRPC server → wait for SIGTERM/SIGINT → graceful shutdown.

A service describes itself with a `ServiceSpec`; its `__main__` calls `run(spec)`. Start-up
failures a person can fix (bad setting, unreachable database, port in use) print one line naming
the setting and exit with code 2, without a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool

from gpudeck.kit import logs, metrics
from gpudeck.kit.config import ConfigError, ServiceConfig, env_key, parse_address
from gpudeck.kit.db import DatabaseUnavailable, migrate, open_pool
from gpudeck.kit.events import EventBus, Relay
from gpudeck.kit.grpcserver import KitServer, Registration
from gpudeck.kit.startup import StartupError, check_free, fail
from gpudeck.kit.workers import Periodic

log = logging.getLogger(__name__)
HEALTH_INTERVAL = 2.0  # seconds between checks of the database for gRPC health
HEALTH_TIMEOUT = 1.0  # seconds the database has to answer one
PROBE_CONNECT_TIMEOUT = 5.0  # seconds to open the health check's connection (a refusal is quick)
T = TypeVar("T")
CANCEL_WAIT = 2.0  # seconds shutdown waits for a cancelled task (one stuck on a silent database)
KIT_MIGRATIONS = Path(__file__).parent / "migrations"


class Worker(Protocol):
    """A background part of a service (an event consumer, a billing loop)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass
class ServiceContext:
    """What a service's `build` gets: its settings, its pool and the event bus."""

    config: ServiceConfig
    pool: AsyncConnectionPool
    bus: EventBus
    env: Mapping[str, str]


@dataclass
class ServiceParts:
    """What a service's `build` returns: servicers to serve and workers to run beside them."""

    registrations: Sequence[Registration] = ()
    workers: Sequence[Worker] = ()


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    migrations: Path | None
    build: Callable[[ServiceContext], Awaitable[ServiceParts]] = field(
        default=lambda ctx: _no_parts()
    )
    # Reads the service's own settings from the environment, raising ConfigError for a bad one:
    # run() calls it before anything starts, so a bad setting is one line and exit code 2.
    check_settings: Callable[[Mapping[str, str]], object] = lambda env: None


async def _no_parts() -> ServiceParts:
    return ServiceParts()


class RunningService:
    """A started service: call `stop()` to shut it down gracefully."""

    def __init__(self, spec: ServiceSpec, config: ServiceConfig, env: Mapping[str, str]) -> None:
        self.spec = spec
        self.config = config
        self.env = env
        self.pool: AsyncConnectionPool | None = None
        self.bus: EventBus | None = None
        self.relay: Relay | None = None
        self.server: KitServer | None = None
        self.workers: list[Worker] = []
        self.port = 0
        self.healthy = True
        self.probe: psycopg.AsyncConnection[Any] | None = None  # the health check's own

    async def start(self) -> None:
        cfg = self.config
        key = env_key(cfg.service)
        check_free(
            f"GPUDECK_{key}_LISTEN", *parse_address(f"GPUDECK_{key}_LISTEN", cfg.grpc_listen)
        )
        try:
            self.pool = await open_pool(
                cfg.database_url, name=cfg.service, max_size=cfg.db_pool_size, schema=cfg.schema
            )
        except DatabaseUnavailable as exc:
            raise StartupError(f"GPUDECK_DATABASE_URL: cannot connect: {exc}") from None
        try:
            await migrate(self.pool, cfg.schema, KIT_MIGRATIONS, table="kit_migrations")
            if self.spec.migrations is not None:
                await migrate(self.pool, cfg.schema, self.spec.migrations)
        except psycopg.Error as exc:  # a read-only database, a role that may not create
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StartupError(f"GPUDECK_DATABASE_URL: migrations failed: {reason}") from None
        self.bus = EventBus(cfg.events, client_name=cfg.service)
        await self.bus.start()
        self.relay = Relay(self.pool, cfg.schema, self.bus)
        await self.relay.start()
        parts = await self.spec.build(ServiceContext(cfg, self.pool, self.bus, self.env))
        self.server = KitServer(
            cfg.service, cfg.grpc_listen, token=cfg.service_token, registrations=parts.registrations
        )
        try:
            self.port = await self.server.start()
        except OSError as exc:
            raise StartupError(f"GPUDECK_{key}_LISTEN: {exc}") from None
        for worker in [*parts.workers, Periodic("health", HEALTH_INTERVAL, self._check_health)]:
            await worker.start()
            self.workers.append(worker)
        log.info("serving", extra={"listen": cfg.grpc_listen, "port": self.port})

    async def _check_health(self) -> None:
        """gRPC health follows the database: NOT_SERVING while it does not answer (a probe
        or load balancer then sends the calls elsewhere), SERVING again once it does."""
        assert self.server is not None
        # On a connection of its own: one borrowed from the pool was none to be had while slow
        # calls held them all, and a replica with a healthy database left the load balancer.
        try:
            probe = self.probe
            if probe is None or probe.closed:
                probe = await asyncio.wait_for(
                    psycopg.AsyncConnection.connect(
                        self.config.database_url, autocommit=True, application_name="health"
                    ),
                    PROBE_CONNECT_TIMEOUT,
                )
                self.probe = probe
            assert probe is not None
            await answered_within(probe.execute("SELECT 1"), HEALTH_TIMEOUT)
            healthy = True
        except Exception as exc:
            healthy = False
            self._close_probe()
            if self.healthy:
                log.warning("database unreachable: NOT_SERVING", extra={"error": repr(exc)})
        if healthy and not self.healthy:
            log.info("database reachable again: SERVING")
        self.healthy = healthy
        await self.server.set_serving(healthy)

    def _close_probe(self) -> None:
        """Closed in the background: a connection to a database that does not answer may take
        seconds to give up, and neither NOT_SERVING nor a shutdown waits for it."""
        probe, self.probe = self.probe, None
        if probe is not None:
            in_background(probe.close())

    async def stop(self) -> None:
        """Health NOT_SERVING, stop taking calls and drain them, stop workers, close pools."""
        grace = self.config.shutdown_grace
        if self.server is not None:
            await self.server.stop(grace)
        await stop_workers(self.workers, grace)
        if self.relay is not None:
            await self.relay.stop()
        if self.bus is not None:
            await self.bus.close()
        self._close_probe()
        if self.pool is not None:
            await self.pool.close(timeout=CANCEL_WAIT)
        log.info("stopped")


async def _serve(spec: ServiceSpec, config: ServiceConfig, env: Mapping[str, str]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = RunningService(spec, config, env)
    try:
        # A stop while starting (a database slow to answer, another replica's migrations) is
        # heeded at once: it waited for the start to end, or forever.
        starting = asyncio.ensure_future(running.start())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            log.info("stopped while starting")
            starting.cancel()
            await asyncio.wait({starting}, timeout=CANCEL_WAIT)
            return
        starting.result()
        await stopping
        log.info("shutting down")
    finally:
        await running.stop()


def run(spec: ServiceSpec, env: Mapping[str, str] | None = None) -> None:
    """Run `spec` until SIGTERM or SIGINT; the entry point of every service's `__main__`."""
    env = os.environ if env is None else env
    try:
        config = ServiceConfig.from_env(spec.name, env)
        spec.check_settings(env)
    except ConfigError as exc:
        fail(str(exc))
    logs.setup(spec.name, config.log_level)
    try:
        metrics.serve(config.metrics_listen)
    except OSError as exc:
        fail(
            f"GPUDECK_{env_key(spec.name)}_METRICS_LISTEN={config.metrics_listen}: {exc.strerror or exc}"
        )
    try:
        asyncio.run(_serve(spec, config, env))
    except StartupError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        pass
    except Exception:  # a bug: said in the JSON log, not as a bare traceback
        log.exception("the service stopped on an unexpected error")
        sys.exit(1)


_background: set[asyncio.Future[Any]] = set()  # strong references to what runs on its own


def in_background(awaitable: Awaitable[Any]) -> None:
    """Let `awaitable` run to its end on its own, its outcome ignored."""
    task = asyncio.ensure_future(awaitable)
    _background.add(task)
    task.add_done_callback(_background.discard)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())


async def answered_within(awaitable: Awaitable[T], seconds: float) -> T:
    """`awaitable`'s result, or TimeoutError after `seconds`, without waiting for it to give up:
    psycopg's cancellation of a query to a database that does not answer blocks for seconds
    more (asyncio.wait_for waits for it). It is cancelled, and left to end, in the
    background."""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()
        in_background(task)
        raise TimeoutError(f"no answer within {seconds:g} s")
    return task.result()


async def stop_workers(workers: Sequence[Worker], grace: float) -> None:
    """Stop `workers` together, each letting its running step finish, all within `grace`
    seconds (one after another, shutdown could take grace × their number); those still
    running then are cancelled and named."""
    stopping = {asyncio.ensure_future(w.stop()): w for w in workers}
    if not stopping:
        return
    _, late = await asyncio.wait(stopping, timeout=grace)
    for task in late:
        task.cancel()
    if late:  # a step stuck on a database that does not answer may not end even so
        await asyncio.wait(late, timeout=CANCEL_WAIT)
    for task, worker in stopping.items():
        if task in late:
            log.warning(
                "worker did not stop within the grace period",
                extra={"worker": getattr(worker, "name", repr(worker)), "grace": grace},
            )
        elif not task.cancelled() and task.exception() is not None:
            log.error(
                "worker did not stop cleanly",
                exc_info=task.exception(),
                extra={"worker": getattr(worker, "name", repr(worker))},
            )
