"""Start the gateway: settings → logs → app → serve until SIGTERM/SIGINT → graceful shutdown.

A setting a person must fix (malformed, missing, or a listen port in use) prints one line on
stderr and exits with code 2, without a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Mapping

from aiohttp import web

from gpudeck.gateway.app import make_app
from gpudeck.gateway.config import Settings
from gpudeck.kit import logs
from gpudeck.kit.config import ConfigError, parse_address
from gpudeck.kit.startup import StartupError, check_free, fail

log = logging.getLogger("gpudeck.gateway")


async def serve(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, then stop taking connections, close websockets and
    channels, and give requests in flight up to `shutdown_grace` seconds."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host, port = parse_address("GPUDECK_GATEWAY_LISTEN", settings.listen)
    check_free("GPUDECK_GATEWAY_LISTEN", host, port)  # before the app's start-up connects
    runner = web.AppRunner(
        make_app(settings), shutdown_timeout=settings.shutdown_grace, access_log=None
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        # A bind error carries a long message around its errno; a lookup error a negative one.
        errno = exc.errno or 0
        reason = os.strerror(errno).lower() if errno > 0 else exc.strerror or str(exc)
        raise StartupError(f"GPUDECK_GATEWAY_LISTEN={settings.listen}: {reason}") from None
    try:
        log.info("serving", extra={"listen": settings.listen, "port": runner.addresses[0][1]})
        await stop.wait()
        log.info("shutting down")
    finally:
        await runner.cleanup()
        log.info("stopped")


def main(env: Mapping[str, str] | None = None) -> None:
    env = os.environ if env is None else env
    try:
        settings = Settings.from_env(env)
    except ConfigError as exc:
        fail(str(exc))
    logs.setup("gateway", settings.log_level)
    try:
        asyncio.run(serve(settings))
    except StartupError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
