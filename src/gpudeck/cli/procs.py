"""Child processes of the launcher: tied to its life, output forwarded as JSON lines.

Each child runs in its own process group (Ctrl-C reaches only the launcher, which then stops the
children in order) and asks Linux to SIGTERM it when the launcher dies, even by SIGKILL
(`PR_SET_PDEATHSIG`). The death signal follows the *thread* that started the child, so children
must be started from the main thread, never from a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import BinaryIO

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
LINE_LIMIT = 1 << 20
_libc: ctypes.CDLL | None = None


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that SIGTERMs the child when this thread exits; None off Linux."""
    global _libc
    if not sys.platform.startswith("linux"):
        return None
    if _libc is None:  # loaded here, in the parent: dlopen after fork is not safe
        _libc = ctypes.CDLL(None, use_errno=True)
    prctl = _libc.prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the death signal was armed
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def json_line(service: str, stream: str, text: str) -> bytes:
    """A line a child wrote that is not JSON, as a JSON log line like the services' own."""
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "level": "error" if stream == "stderr" else "info",
        "service": service,
        "logger": stream,
        "message": text,
    }
    return json.dumps(entry).encode() + b"\n"


def as_json_line(service: str, stream: str, line: bytes) -> bytes:
    """`line` itself when it is a JSON object, else `line` wrapped in one."""
    stripped = line.strip()
    if stripped.startswith(b"{"):
        with contextlib.suppress(ValueError):
            if isinstance(json.loads(stripped), dict):
                return stripped + b"\n"
    return json_line(service, stream, line.rstrip(b"\r\n").decode(errors="replace"))


def describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


class Child:
    """One supervised process; `start()`, then `exited` completes with its return code."""

    def __init__(
        self, name: str, argv: Sequence[str], env: Mapping[str, str], out: BinaryIO
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.out = out
        self.process: asyncio.subprocess.Process | None = None
        self.exited: asyncio.Task[int] | None = None
        self._forwarders: list[asyncio.Task[None]] = []

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            *self.argv,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=die_with_parent(),
            process_group=0,
            limit=LINE_LIMIT,
        )
        assert self.process.stdout is not None and self.process.stderr is not None
        self._forwarders = [
            asyncio.create_task(self._forward(self.process.stdout, "stdout")),
            asyncio.create_task(self._forward(self.process.stderr, "stderr")),
        ]
        self.exited = asyncio.create_task(self._wait(), name=f"{self.name} exited")

    async def _wait(self) -> int:
        assert self.process is not None
        code = await self.process.wait()
        await asyncio.gather(*self._forwarders)  # its last lines, often the reason it stopped
        return code

    async def _forward(self, stream: asyncio.StreamReader, kind: str) -> None:
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # longer than LINE_LIMIT: dropped by the reader
                line = f"(a line longer than {LINE_LIMIT} bytes was dropped)".encode()
            if not line:
                return
            self.out.write(as_json_line(self.name, kind, line))
            self.out.flush()

    def signal(self, sig: signal.Signals) -> None:
        """Send `sig` to the child's process group (it and anything it started)."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)


async def stop_all(children: Sequence[Child], grace: float) -> None:
    """SIGTERM every child, wait up to `grace` seconds, then SIGKILL the ones still running."""
    for child in children:
        child.signal(signal.SIGTERM)
    waits = [child.exited for child in children if child.exited is not None]
    if not waits:
        return
    _, pending = await asyncio.wait(waits, timeout=grace)
    if pending:
        for child in children:
            if child.running:
                log.warning(
                    "did not stop in time; killing it", extra={"child": child.name, "grace": grace}
                )
                child.signal(signal.SIGKILL)
        await asyncio.wait(pending)
