"""Channels to other gpudeck services: the service token on every call, a deadline always."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc

from gpudeck.kit.logs import actor, request_id

DEFAULT_TIMEOUT = 5.0


class _CallDefaults(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, token: str, timeout: float) -> None:
        self._auth = ("authorization", f"Bearer {token}")
        self._timeout = timeout

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = list(details.metadata or ())
        metadata.append(self._auth)
        rid = request_id.get()
        if rid and not any(k == "x-request-id" for k, _ in metadata):
            metadata.append(("x-request-id", rid))
        who = actor.get()
        if who and not any(k == "x-actor" for k, _ in metadata):
            metadata.append(("x-actor", who))
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout if details.timeout is not None else self._timeout,
            grpc.aio.Metadata(*metadata),
            details.credentials,
            details.wait_for_ready,
        )

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(details), request)


def channel(
    address: str,
    token: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """An insecure channel to `address` that sends `token` and a default deadline on each call.

    `options` are gRPC channel arguments, e.g. ("grpc.max_reconnect_backoff_ms", 2000).
    """
    return grpc.aio.insecure_channel(
        address, options=list(options), interceptors=[_CallDefaults(token, timeout)]
    )
