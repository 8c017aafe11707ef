"""The gRPC server every service runs: health, reflection, diagnostics and one interceptor.

The interceptor, per call: takes or makes a request id (metadata `x-request-id`, echoed back and
put on every log line), refuses a call whose deadline has already passed, checks the internal
service token (metadata `authorization: Bearer <token>`; health and reflection stay open for
probes and grpcurl), maps `DomainError`s to status codes, and counts and times the call.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import psycopg
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gpudeck.kit import errors
from gpudeck.kit.logs import actor, request_id
from gpudeck.kit.metrics import GRPC_LATENCY, GRPC_REQUESTS
from gpudeck.proto.kit.v1 import diagnostics_pb2, diagnostics_pb2_grpc

log = logging.getLogger(__name__)

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
STATUS = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "ALREADY_EXISTS": grpc.StatusCode.ALREADY_EXISTS,
    "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION,
    "ABORTED": grpc.StatusCode.ABORTED,
    "PERMISSION_DENIED": grpc.StatusCode.PERMISSION_DENIED,
    "UNAUTHENTICATED": grpc.StatusCode.UNAUTHENTICATED,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
}
VERSION = "0.1.0"
QUIET = 0.2  # seconds without a new call before a draining server stops

UNAVAILABLE_MESSAGE = (
    "the database is unavailable or busy: retry the call with the same idempotency key (if"
    " it was applied after all, the retry gets its answer)"
)


@dataclass(frozen=True)
class Registration:
    """A servicer and the generated function that adds it, with its full service name."""

    add: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    name: str


def status_of(exc: errors.DomainError) -> grpc.StatusCode:
    return STATUS.get(exc.code, grpc.StatusCode.INTERNAL)


if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    Context = grpc.aio.ServicerContext[Any, Any]
else:
    Handler = Context = Any


class KitInterceptor(grpc.aio.ServerInterceptor):
    """Request id, deadline, internal token, error mapping and metrics in one wrapper per call.

    The wrapper of each method is built once and reused: it reads what it needs of a call from
    the call's context, so the per-call cost is one pass over the metadata.
    """

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}"
        self._wrapped: dict[str, Handler] = {}
        self.draining = False  # shutting down: new calls are refused as UNAVAILABLE
        self.in_flight = 0  # unary calls being handled now
        self.last_call = 0.0  # time.monotonic() of the latest call to arrive

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method
        if handler.unary_unary is None:  # streaming: checked here, served as is
            authorized = method.startswith(OPEN_SERVICES) or self._authorized(
                handler_call_details.invocation_metadata or ()
            )
            return handler if authorized else _denied(handler)
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            wrapped = self._wrapped[method] = self._wrap(method, handler)
        return wrapped

    def _wrap(self, method: str, handler: Handler) -> Handler:
        inner: Any = handler.unary_unary
        latency = GRPC_LATENCY.labels(method)
        counters: dict[str, Any] = {}
        is_open = method.startswith(OPEN_SERVICES)
        expected = self._expected

        async def wrapped(req: Any, ctx: Context) -> Any:
            if self.draining and not is_open:  # retryable, unlike the CANCELLED of a stop
                self.last_call = time.monotonic()
                await ctx.abort(grpc.StatusCode.UNAVAILABLE, "the service is shutting down")
            rid: Any = None
            auth: Any = None
            who: Any = None
            for key, value in ctx.invocation_metadata() or ():
                if key == "authorization":
                    auth = value
                elif key == "x-request-id":
                    rid = value
                elif key == "x-actor":
                    who = value
            rid = rid or os.urandom(16).hex()
            token = request_id.set(rid)
            actor_token = actor.set(who or "")
            started = time.perf_counter()
            code = "OK"
            self.in_flight += 1
            try:
                if not is_open and (auth is None or not hmac.compare_digest(auth, expected)):
                    code = "UNAUTHENTICATED"
                    await ctx.abort(
                        grpc.StatusCode.UNAUTHENTICATED, "missing or wrong service token"
                    )
                remaining = ctx.time_remaining()
                if remaining is not None and remaining <= 0:
                    code = "DEADLINE_EXCEEDED"
                    await ctx.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline already passed")
                ctx.set_trailing_metadata((("x-request-id", rid),))
                return await inner(req, ctx)
            except errors.DomainError as exc:
                status = status_of(exc)
                code = status.name
                trailers = [("x-request-id", rid)]
                if exc.reason:
                    trailers.append(("x-error-reason", exc.reason))
                if exc.field:
                    trailers.append(("x-error-field", exc.field))
                await ctx.abort(status, _fits(exc.message), tuple(trailers))
            except grpc.aio.AbortError:
                if code == "OK":
                    code = ctx.code().name if ctx.code() else "UNKNOWN"
                raise
            except psycopg.OperationalError as exc:
                # The database down, its pool exhausted, a deadlock or a statement timeout: a
                # retry may succeed (a bug it is not). A commit lost in flight may have landed:
                # mutating calls are keyed, so the retry finds it.
                code = "UNAVAILABLE"
                log.warning("database unavailable in %s: %r", method, exc)
                await ctx.abort(grpc.StatusCode.UNAVAILABLE, UNAVAILABLE_MESSAGE)
            except Exception:
                code = "INTERNAL"
                log.exception("unhandled error in %s", method)
                await ctx.abort(grpc.StatusCode.INTERNAL, "internal error")
            finally:
                latency.observe(time.perf_counter() - started)
                counter = counters.get(code)
                if counter is None:
                    counter = counters[code] = GRPC_REQUESTS.labels(method, code)
                counter.inc()
                request_id.reset(token)
                actor.reset(actor_token)
                self.in_flight -= 1

        wrapper: Handler = grpc.unary_unary_rpc_method_handler(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        return wrapper

    def _authorized(self, metadata: Sequence[tuple[str, Any]]) -> bool:
        value = _metadata_value(metadata, "authorization")
        return value is not None and hmac.compare_digest(value, self._expected)


def _denied(handler: Handler) -> Handler:
    """A handler of the same kind as `handler` that refuses the call as unauthenticated."""

    async def deny(_request: Any, ctx: Context) -> None:
        await ctx.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong service token")

    kind: Any = (
        grpc.unary_stream_rpc_method_handler
        if handler.unary_stream
        else grpc.stream_unary_rpc_method_handler
        if handler.stream_unary
        else grpc.stream_stream_rpc_method_handler
    )
    denied: Handler = kind(
        deny,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    return denied


def _metadata_value(metadata: Iterable[tuple[str, Any]], key: str) -> str | None:
    for k, v in metadata:
        if k == key:
            return v if isinstance(v, str) else v.decode()
    return None


class DiagnosticsServicer(diagnostics_pb2_grpc.DiagnosticsServicer):
    def __init__(self, service: str) -> None:
        self.service = service

    async def Info(
        self, request: diagnostics_pb2.InfoRequest, context: Context
    ) -> diagnostics_pb2.InfoResponse:
        return diagnostics_pb2.InfoResponse(
            service=self.service,
            version=VERSION,
            request_id=request_id.get(),
            payload=request.payload,
        )


class KitServer:
    """A grpc.aio server with the kit's interceptor, health, reflection and diagnostics.

    Create, `await start()`, and `await stop(grace)` on shutdown: health turns NOT_SERVING first,
    then the server stops taking calls and waits up to `grace` seconds for those in flight.
    """

    def __init__(
        self,
        service: str,
        listen: str,
        *,
        token: str,
        registrations: Sequence[Registration] = (),
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.service = service
        self.listen = listen
        self.token = token
        self.registrations = [
            Registration(
                diagnostics_pb2_grpc.add_DiagnosticsServicer_to_server,
                DiagnosticsServicer(service),
                diagnostics_pb2.DESCRIPTOR.services_by_name["Diagnostics"].full_name,
            ),
            *registrations,
        ]
        self.options = list(options)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.health_names: list[str] = []
        self.stopping = False

    async def start(self) -> int:
        """Bind and start; return the port (useful when listening on port 0)."""
        self.interceptor = KitInterceptor(self.token)
        server = grpc.aio.server(
            interceptors=[self.interceptor],
            options=[("grpc.so_reuseport", 0), *self.options],
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        for reg in self.registrations:
            reg.add(reg.servicer, server)
            names.append(reg.name)
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)
        try:
            self.port = server.add_insecure_port(self.listen)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {self.listen}: {exc}") from None
        if self.port == 0:
            raise OSError(f"cannot listen on {self.listen}: address in use or not available")
        await server.start()
        self.server = server
        self.health_names = ["", *names]
        await self.set_serving(True)
        return self.port

    async def set_serving(self, serving: bool) -> None:
        """Health of every service here SERVING or NOT_SERVING (say, its database is gone);
        once stopping, it stays NOT_SERVING."""
        if self.stopping:
            return
        status = health_pb2.HealthCheckResponse
        for name in self.health_names:
            await self.health.set(name, status.SERVING if serving else status.NOT_SERVING)

    async def stop(self, grace: float) -> None:
        """Health NOT_SERVING; refuse new calls as UNAVAILABLE (clients retry those, with the
        same idempotency keys) and let the calls in flight finish, up to `grace` seconds; then
        stop the server (what is still running after that is cancelled)."""
        self.stopping = True
        await self.health.enter_graceful_shutdown()
        if self.server is None:
            return
        started = time.monotonic()
        deadline = started + grace
        interceptor = self.interceptor
        interceptor.draining = True
        interceptor.last_call = started
        # Calls gRPC has taken in but not handed over yet would be CANCELLED by the stop: wait
        # until no handler runs and nothing has come in for QUIET seconds (or the grace ends).
        while time.monotonic() < deadline and (
            interceptor.in_flight or time.monotonic() - interceptor.last_call < QUIET
        ):
            await asyncio.sleep(0.02)
        await self.server.stop(max(deadline - time.monotonic(), 0.1))


# gRPC sends a status message as metadata, percent-encoded (a byte outside ASCII takes three):
# past 8 KiB a client may drop it (past 16 KiB it must), and the call then fails as
# RESOURCE_EXHAUSTED with no word of the real error. 2,000 UTF-8 bytes stay under 6 KiB.
MAX_MESSAGE_BYTES = 2000


def _fits(message: str) -> str:
    """`message`, cut short to MAX_MESSAGE_BYTES of UTF-8 (one echoing a huge input, say)."""
    data = message.encode()
    if len(data) <= MAX_MESSAGE_BYTES:
        return message
    kept = data[: MAX_MESSAGE_BYTES - 40].decode(errors="ignore")
    return f"{kept}… ({len(message)} characters)"
