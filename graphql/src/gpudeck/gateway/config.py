"""The gateway's settings: environment → a frozen dataclass, validated once at start.

GPUDECK_GATEWAY_LISTEN          host:port to serve HTTP and websockets on (127.0.0.1:8080)
GPUDECK_<SERVICE>_ADDR          where each service's gRPC server is (gpudeck.kit.config)
GPUDECK_SERVICE_TOKEN           the internal token sent on every gRPC call (required)
GPUDECK_GATEWAY_HEALTH_TIMEOUT  deadline of one gRPC health check, in seconds (1)
GPUDECK_SHUTDOWN_GRACE          seconds to finish requests in flight on SIGTERM (10)
GPUDECK_LOG_LEVEL               DEBUG, INFO, WARNING or ERROR (INFO)
GPUDECK_NATS_URL                NATS, for live subscriptions (nats://127.0.0.1:4222); the gateway
                                starts without it and connects when it can
GPUDECK_EVENTS_PREFIX           the events' subject prefix (gpudeck)
GPUDECK_ADMIN_TOKEN             optional: a bearer token for the platform's operators (at least
                                24 characters): it may set exchange rates, and sees no organization
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from gpudeck.kit.config import (
    GATEWAY_PORT,
    ConfigError,
    EventsConfig,
    address,
    check_token,
    log_level,
    number,
    required_token,
    service_addresses,
)

DEFAULT_LISTEN = f"127.0.0.1:{GATEWAY_PORT}"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


@dataclass(frozen=True)
class Settings:
    """What the gateway needs to start; `from_env` raises `ConfigError` naming the variable."""

    service_token: str
    listen: str = DEFAULT_LISTEN
    service_addresses: Mapping[str, str] = field(default_factory=service_addresses)
    health_timeout: float = 1.0
    shutdown_grace: float = 10.0
    log_level: str = "INFO"
    events: EventsConfig | None = None  # None: no live updates (subscriptions poll)
    admin_token: str = ""  # the platform admin's bearer token; "" for none

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        return cls(
            listen=address(env, "GPUDECK_GATEWAY_LISTEN", DEFAULT_LISTEN),
            service_addresses=service_addresses(env),
            service_token=required_token(env, "GPUDECK_SERVICE_TOKEN"),
            health_timeout=number(  # a gRPC deadline: past ~9e9 s it overflows
                env, "GPUDECK_GATEWAY_HEALTH_TIMEOUT", 1.0, minimum=0.05, maximum=3600
            ),
            shutdown_grace=number(env, "GPUDECK_SHUTDOWN_GRACE", 10.0),
            log_level=log_level(env),
            admin_token=_admin_token(env),
            events=EventsConfig.from_env(
                {**env, "GPUDECK_NATS_URL": env.get("GPUDECK_NATS_URL", "") or DEFAULT_NATS_URL}
            ),
        )


MIN_ADMIN_TOKEN = 24


def _admin_token(env: Mapping[str, str]) -> str:
    token = env.get("GPUDECK_ADMIN_TOKEN", "").strip()
    if token and len(token) < MIN_ADMIN_TOKEN:
        raise ConfigError(f"GPUDECK_ADMIN_TOKEN must be at least {MIN_ADMIN_TOKEN} characters")
    return check_token("GPUDECK_ADMIN_TOKEN", token)
