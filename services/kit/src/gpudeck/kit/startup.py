"""Start-up failures a person can fix: one line on stderr naming the setting, exit code 2.

Light on purpose (no database or events imports), so every entry point can use it.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import NoReturn

EXIT_CONFIG = 2


class StartupError(Exception):
    """A start-up failure a person can fix; the message is one line naming the setting."""


def fail(message: str) -> NoReturn:
    print(f"gpudeck: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_CONFIG)


def check_free(name: str, host: str, port: int) -> None:
    """StartupError (`name=host:port: reason`) now if the address cannot be listened on: before
    anything connects anywhere, and before gRPC's C core prints its own raw line about it."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(infos[0][4])
    except OSError as exc:
        errno = exc.errno or 0  # a bind error's errno; a lookup error's is negative
        reason = os.strerror(errno).lower() if errno > 0 else exc.strerror or str(exc)
        shown = f"[{host}]" if ":" in host else host  # as it was written: [::1]:50051
        raise StartupError(f"{name}={shown}:{port}: {reason}") from None
