"""What `gpudeck up` starts and where each part listens: flags, then environment, then defaults.

Everything here is decided before a process starts, so bad input fails fast with a `UsageError`:
one line naming the flag or environment variable to fix (exit code 2).
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gpudeck.cli.embedded import free_port
from gpudeck.kit.config import (
    DEFAULT_GRPC_PORTS,
    DEFAULT_METRICS_PORTS,
    GATEWAY_PORT,
    SERVICES,
    ConfigError,
    ascii_digits,
    database_url,
    env_key,
    nats_url,
    number,
    parse_address,
)

GATEWAY = "gateway"
COMPONENTS = (*SERVICES, GATEWAY)
DEFAULT_DATA_DIR = ".gpudeck"
DEFAULT_NATS_PORT = 4250
SERVICE_TOKEN_FILE = "service-token"
BOOTSTRAP_TOKEN_FILE = "bootstrap-token"
_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


class UsageError(Exception):
    """Bad input a person can fix; the message is one line naming the flag or variable."""


def module_of(component: str) -> str:
    """`node-agent` → `gpudeck.node_agent`: the module `python -m` runs for a component."""
    return "gpudeck." + component.replace("-", "_")


@dataclass(frozen=True)
class ListenSetting:
    """One listen address of one component: its flag, its variable and its default port."""

    component: str
    kind: str  # "listen" (gRPC, or HTTP for the gateway) or "metrics"
    variable: str
    default_port: int

    @property
    def flag(self) -> str:
        return f"--{self.component}-{'metrics-listen' if self.kind == 'metrics' else 'listen'}"


def listen_settings() -> list[ListenSetting]:
    """Every address the stack binds, in start order; the gateway last."""
    found = []
    for service in SERVICES:
        key = env_key(service)
        found.append(
            ListenSetting(service, "listen", f"GPUDECK_{key}_LISTEN", DEFAULT_GRPC_PORTS[service])
        )
        found.append(
            ListenSetting(
                service, "metrics", f"GPUDECK_{key}_METRICS_LISTEN", DEFAULT_METRICS_PORTS[service]
            )
        )
    found.append(ListenSetting(GATEWAY, "listen", "GPUDECK_GATEWAY_LISTEN", GATEWAY_PORT))
    return found


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class Listen:
    """An address a process binds, and the setting that chose it (for error messages)."""

    setting: ListenSetting
    source: str  # the flag or variable the value came from, or the variable when defaulted
    host: str
    port: int

    @property
    def value(self) -> str:
        return join_address(self.host, self.port)

    @property
    def local(self) -> str:
        """Where a process on this machine reaches it (a wildcard host becomes loopback)."""
        return join_address(_LOOPBACK.get(self.host, self.host), self.port)


@dataclass(frozen=True)
class Part:
    """One child process of the stack."""

    name: str
    listen: Listen
    metrics: Listen | None  # the gateway serves /metrics on its own HTTP port
    address: str  # where callers reach it (GPUDECK_<SERVICE>_ADDR)

    @property
    def module(self) -> str:
        return module_of(self.name)


@dataclass(frozen=True)
class Stack:
    """The decided layout: every part's addresses, the data folder and the backing servers."""

    parts: tuple[Part, ...]
    data_dir: Path
    database_url: str | None  # None: start the embedded PostgreSQL
    nats_url: str | None  # None: start the embedded NATS
    nats_port: int  # the embedded NATS's port when nats_url is None
    nats_port_fixed: bool  # the port was asked for (GPUDECK_NATS_PORT), so no fallback
    grace: float

    def listens(self) -> list[Listen]:
        found = []
        for part in self.parts:
            found.append(part.listen)
            if part.metrics is not None:
                found.append(part.metrics)
        return found

    def child_settings(self) -> dict[str, str]:
        """The environment every child gets: where each part listens and how to reach it."""
        env = {listen.setting.variable: listen.value for listen in self.listens()}
        for part in self.parts:
            if part.name != GATEWAY:
                env[f"GPUDECK_{env_key(part.name)}_ADDR"] = part.address
        return env


class StopRequested(KeyboardInterrupt):
    """SIGTERM or SIGHUP while `up` starts its servers: a stop asked for (exit 0), not a
    Ctrl-C (130)."""


def resolve(
    overrides: Mapping[str, str | None],
    env: Mapping[str, str],
    *,
    host: str = "127.0.0.1",
    data_dir: str | None = None,
) -> Stack:
    """Decide the layout. `overrides` maps a listen variable to its flag's value (or None)."""
    listens: dict[tuple[str, str], Listen] = {}
    for setting in listen_settings():
        listens[setting.component, setting.kind] = _listen(setting, overrides, env, host)
    _refuse_shared_ports(list(listens.values()))
    parts = []
    for component in COMPONENTS:
        listen = listens[component, "listen"]
        address = listen.local
        if component != GATEWAY:
            variable = f"GPUDECK_{env_key(component)}_ADDR"
            address = _checked(variable, env.get(variable, "").strip()) or address
        parts.append(Part(component, listen, listens.get((component, "metrics")), address))
    folder = data_dir or env.get("GPUDECK_DATA_DIR", "").strip() or DEFAULT_DATA_DIR
    try:
        db = database_url(env) if env.get("GPUDECK_DATABASE_URL", "").strip() else None
        nats = nats_url(env) if env.get("GPUDECK_NATS_URL", "").strip() else None
        grace = number(env, "GPUDECK_SHUTDOWN_GRACE", 10.0)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    port_raw = env.get("GPUDECK_NATS_PORT", "").strip()
    if port_raw and not (ascii_digits(port_raw) and 0 < int(port_raw) <= 65535):
        raise UsageError(f"GPUDECK_NATS_PORT={port_raw!r} is not a port number (1-65535)")
    if port_raw and nats is None:  # the embedded NATS listens on 127.0.0.1
        for listen in listens.values():
            if listen.port == int(port_raw) and listen.host in LOOPBACK_NAMES:
                raise UsageError(
                    f"GPUDECK_NATS_PORT={port_raw} is the same address as"
                    f" {listen.source}={listen.value}; give each its own port"
                )
    return Stack(
        parts=tuple(parts),
        data_dir=Path(folder).expanduser().resolve(),
        database_url=db,
        nats_url=nats,
        nats_port=int(port_raw) if port_raw else DEFAULT_NATS_PORT,
        nats_port_fixed=bool(port_raw),
        # A child drains its calls for up to `grace`, then stops its workers, pool and NATS for
        # up to `grace` again (deploy/README.md): allow it both, and a margin, before SIGKILL
        # (the bounded waits for what a silent database holds: a cancelled worker, the relay,
        # the pool; as deploy/README.md's 5 + 2 × grace + 10).
        grace=2 * grace + 10.0,
    )


def _checked(name: str, value: str) -> str:
    if value:
        try:
            parse_address(name, value)
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
    return value


def _listen(
    setting: ListenSetting, overrides: Mapping[str, str | None], env: Mapping[str, str], host: str
) -> Listen:
    flag_value = (overrides.get(setting.variable) or "").strip()
    env_value = env.get(setting.variable, "").strip()
    if flag_value:
        source, raw = setting.flag, flag_value
    elif env_value:
        source, raw = setting.variable, env_value
    else:
        source, raw = setting.variable, join_address(host, setting.default_port)
    try:
        bind_host, port = parse_address(source, raw)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if port == 0:  # any free port: pick it now, so callers can be told where it is
        port = free_port(_LOOPBACK.get(bind_host, bind_host))
    return Listen(setting, source, bind_host, port)


WILDCARD = ("", "0.0.0.0", "::")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", *WILDCARD)  # hosts that take 127.0.0.1's port


def _overlap(a: Listen, b: Listen) -> bool:
    return a.port == b.port and (a.host == b.host or a.host in WILDCARD or b.host in WILDCARD)


def embedded_nats_port(stack: Stack) -> int:
    """The port of the embedded NATS: GPUDECK_NATS_PORT, else its default unless that is in
    use or one of the stack's own (free when checked, NATS took it before the part bound it,
    which then failed, blamed), else any free one none of them has."""
    port = stack.nats_port
    own = {listen.port for listen in stack.listens()}
    if stack.nats_port_fixed or (port not in own and not bind_problem("127.0.0.1", port)):
        return port
    while port in own or bind_problem("127.0.0.1", port):
        port = free_port()
    return port


def _refuse_shared_ports(listens: list[Listen]) -> None:
    for i, a in enumerate(listens):
        for b in listens[:i]:
            if _overlap(a, b):
                raise UsageError(
                    f"{a.source}={a.value} is the same address as {b.source}={b.value}; "
                    "give each its own port"
                )


def check_ports(stack: Stack) -> None:
    """Bind every listen address once, so a port in use is named before anything starts."""
    for listen in stack.listens():
        problem = bind_problem(listen.host, listen.port)
        if problem:
            how = listen.setting.flag + " or " + listen.setting.variable
            raise UsageError(
                f"{listen.source}={listen.value}: {problem} (choose another with {how})"
            )


def bind_problem(host: str, port: int) -> str | None:
    """Why `host:port` cannot be bound now, or None when it can."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"unknown host {host!r} ({exc.strerror})"
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            return (exc.strerror or str(exc)).lower()
    return None


def kept_secret(env: Mapping[str, str], variable: str, data_dir: Path, filename: str) -> str:
    """`variable` from the environment, else a random one kept in `data_dir/filename` (0600).

    Made once, so a restart with the same data folder reuses it.
    """
    given = env.get(variable, "").strip()
    if given:
        return given
    path = data_dir / filename
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        secret = path.read_text().strip()
        if secret:
            if path.stat().st_mode & 0o077:
                path.chmod(0o600)
            return secret
        path.unlink()  # empty: left by an interrupted first start
        return kept_secret(env, variable, data_dir, filename)
    secret = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as file:
        file.write(secret + "\n")
    return secret
