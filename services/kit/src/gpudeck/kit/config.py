"""Configuration from the environment, read and validated once at start.

Every setting has one environment variable. `ConfigError` carries a single line that names the
variable; `gpudeck.kit.runtime` prints it and exits with code 2.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

SERVICES = ("wallet", "compute", "storage", "activity", "node-agent")
DEFAULT_GRPC_PORTS = {
    "wallet": 50051,
    "compute": 50052,
    "storage": 50053,
    "activity": 50054,
    "node-agent": 50055,
}
DEFAULT_METRICS_PORTS = {
    "wallet": 9101,
    "compute": 9102,
    "storage": 9103,
    "activity": 9104,
    "node-agent": 9105,
}
GATEWAY_PORT = 8080
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class ConfigError(Exception):
    """A setting is missing or malformed; the message is one line naming the variable."""


def env_key(service: str) -> str:
    """`node-agent` → `NODE_AGENT`: the service's part of its environment variable names."""
    return service.upper().replace("-", "_")


def require(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise ConfigError(f"{name} is not set")
    return value


MAX_TOKEN_LENGTH = 512  # what the gateway takes in `Authorization: Bearer …`


def printable_ascii(value: str, *, spaces: bool = True) -> bool:
    """Whether `value` is all a request header carries: printable ASCII (spaces if `spaces`)."""
    return value.isascii() and value.isprintable() and (spaces or " " not in value)


def check_token(
    name: str, value: str, *, spaces: bool = True, max_length: int = MAX_TOKEN_LENGTH
) -> str:
    """A token sent in gRPC metadata or an `Authorization` header: printable ASCII, which is all
    they carry (a "tök" was accepted, and every call then failed), spaces inside only if
    `spaces`, and at most `max_length` characters."""
    if not printable_ascii(value, spaces=spaces):
        kind = "printable ASCII" if spaces else "printable ASCII without spaces"
        raise ConfigError(f"{name} must be {kind} (it is sent in a request header)")
    if len(value) > max_length:
        raise ConfigError(f"{name} must be at most {max_length} characters")
    return value


# gRPC refuses some calls whose metadata passes 8 KiB in all (its soft limit), every call past
# 16 KiB: a token of 4,096 leaves the other headers room.
MAX_SERVICE_TOKEN_LENGTH = 4096


def required_token(
    env: Mapping[str, str], name: str, *, max_length: int = MAX_SERVICE_TOKEN_LENGTH
) -> str:
    return check_token(name, require(env, name), max_length=max_length)


def parse_address(name: str, value: str) -> tuple[str, int]:
    """`host:port` (port 0 means any free port) → (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not ascii_digits(port) or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{name}={value!r} is not a host:port address")
    return host.strip("[]"), int(port)


def ascii_digits(text: str) -> bool:
    """0-9 only: str.isdigit alone takes "²" or "٣", which int() refuses."""
    return text.isascii() and text.isdigit()


def address(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, "").strip() or default
    parse_address(name, value)
    return value


_PASSWORD_PARAM = re.compile(r"(?i)(\bpassword=)[^&]*")


def redact_url(url: str) -> str:
    """`url` fit for logs and messages: a password (in the user part or a `password=`
    parameter) and a NATS token (nats://TOKEN@host) shown as ***; each of comma-separated
    servers alike."""
    shown = []
    for server in url.split(","):
        try:
            parts = urlsplit(server.strip())
            host = parts.netloc.rsplit("@", 1)[-1]
            if parts.password is not None:
                parts = parts._replace(netloc=f"{parts.username}:***@{host}")
            elif parts.username and parts.scheme in ("nats", "tls"):
                parts = parts._replace(netloc=f"***@{host}")
            server = urlunsplit(parts._replace(query=_PASSWORD_PARAM.sub(r"\1***", parts.query)))
        except ValueError:  # malformed: show none of what could be in it
            server = "<malformed URL>"
        shown.append(server)
    return ",".join(shown)


def database_url(env: Mapping[str, str], name: str = "GPUDECK_DATABASE_URL") -> str:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    value = require(env, name)
    if not value.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"{name} must be a postgresql:// URL, got {redact_url(value)!r}")
    try:
        urlsplit(value).port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise ConfigError(f"{name} has a malformed host or port") from None
    try:  # what libpq itself would refuse (percent-encoding, brackets, unknown parameters)
        params = conninfo_to_dict(value)
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0]
        raise ConfigError(f"{name} is not a valid PostgreSQL URL: {reason}") from None
    if not params.get("dbname"):
        raise ConfigError(
            f"{name} names no database (postgresql://user@host:port/dbname): {redact_url(value)!r}"
        )
    return value


def nats_url(env: Mapping[str, str], name: str = "GPUDECK_NATS_URL") -> str:
    value = require(env, name)
    for server in value.split(","):
        try:
            parts = urlsplit(server.strip())
            port = parts.port
        except ValueError:
            raise ConfigError(f"{name} has a malformed host or port") from None
        if (
            parts.scheme not in ("nats", "tls")
            or not parts.hostname
            or (port is None and ":" in (parts.netloc.rsplit("@", 1)[-1]))
        ):
            raise ConfigError(f"{name} must be nats://host:port, got {redact_url(value)!r}")
    return value


def nats_servers(url: str) -> list[str]:
    """The servers of a GPUDECK_NATS_URL ("nats://a:4222,nats://b:4222"), as nats.connect
    takes them."""
    return [server.strip() for server in url.split(",") if server.strip()]


def name_setting(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, "").strip() or default
    if not _NAME.match(value):
        raise ConfigError(f"{name}={value!r} may hold only letters, digits, '_' and '-'")
    return value


def number(
    env: Mapping[str, str],
    name: str,
    default: float,
    *,
    minimum: float = 0,
    maximum: float = 1e12,
) -> float:
    """A finite number from `minimum` to `maximum` ("nan", "inf" and "1e400" are not)."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name}={raw!r} is not a finite number")
    if value < minimum:
        raise ConfigError(f"{name}={raw!r} must be at least {minimum:g}")
    if value > maximum:
        raise ConfigError(f"{name}={raw!r} must be at most {maximum:g}")
    return value


def log_level(env: Mapping[str, str], name: str = "GPUDECK_LOG_LEVEL") -> str:
    level = env.get(name, "").strip().upper() or "INFO"
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"{name}={level!r} is not DEBUG, INFO, WARNING or ERROR")
    return level


@dataclass(frozen=True)
class EventsConfig:
    """Where events go: one JetStream stream holding the subjects `<subject_prefix>.>`."""

    nats_url: str
    stream: str = "GPUDECK_EVENTS"
    subject_prefix: str = "gpudeck"

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> EventsConfig:
        return cls(
            nats_url=nats_url(env),
            stream=name_setting(env, "GPUDECK_EVENTS_STREAM", cls.stream),
            subject_prefix=name_setting(env, "GPUDECK_EVENTS_PREFIX", cls.subject_prefix),
        )


@dataclass(frozen=True)
class ServiceConfig:
    """What every gRPC service needs to start."""

    service: str
    database_url: str
    events: EventsConfig
    grpc_listen: str
    metrics_listen: str
    service_token: str
    log_level: str = "INFO"
    shutdown_grace: float = 10.0
    db_pool_size: int = 8

    @property
    def schema(self) -> str:
        """The PostgreSQL schema this service owns."""
        return self.service.replace("-", "_")

    @classmethod
    def from_env(cls, service: str, env: Mapping[str, str] = os.environ) -> ServiceConfig:
        if service not in SERVICES:
            raise ConfigError(f"unknown service {service!r}; one of {', '.join(SERVICES)}")
        key = env_key(service)
        return cls(
            service=service,
            database_url=database_url(env),
            events=EventsConfig.from_env(env),
            grpc_listen=address(
                env, f"GPUDECK_{key}_LISTEN", f"127.0.0.1:{DEFAULT_GRPC_PORTS[service]}"
            ),
            metrics_listen=address(
                env, f"GPUDECK_{key}_METRICS_LISTEN", f"127.0.0.1:{DEFAULT_METRICS_PORTS[service]}"
            ),
            service_token=required_token(env, "GPUDECK_SERVICE_TOKEN"),
            log_level=log_level(env),
            shutdown_grace=number(env, "GPUDECK_SHUTDOWN_GRACE", 10.0),
            db_pool_size=int(number(env, "GPUDECK_DB_POOL_SIZE", 8, minimum=2, maximum=1000)),
        )


def service_addresses(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Where each service's gRPC server is, for its callers (GPUDECK_<SERVICE>_ADDR)."""
    return {
        s: address(env, f"GPUDECK_{env_key(s)}_ADDR", f"127.0.0.1:{DEFAULT_GRPC_PORTS[s]}")
        for s in SERVICES
    }
