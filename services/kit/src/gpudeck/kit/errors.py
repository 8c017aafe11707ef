"""Domain errors: what a service's domain code raises, free of any transport.

    DomainError
    ├── InvalidArgument      bad input; names the field
    ├── NotFound             the thing does not exist (or is not visible to the caller)
    ├── AlreadyExists
    ├── FailedPrecondition   the thing is in the wrong state for this call
    ├── Conflict             e.g. an idempotency key reused with a different payload
    ├── PermissionDenied
    ├── Unauthenticated
    └── Unavailable          a dependency is down; retrying may help

The gRPC layer maps each to a status code (gpudeck.kit.grpcserver); the gateway maps the status
codes to GraphQL `extensions.code`.
"""

from __future__ import annotations


class DomainError(Exception):
    """Base of every error a caller should see with its message."""

    code = "INTERNAL"

    def __init__(
        self, message: str, *, field: str | None = None, reason: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        # A machine-readable cause finer than the code (e.g. INSUFFICIENT_FUNDS); sent to gRPC
        # callers as the trailing metadata `x-error-reason`, with `x-error-field` for the field.
        self.reason = reason


class InvalidArgument(DomainError):
    code = "INVALID_ARGUMENT"


class NotFound(DomainError):
    code = "NOT_FOUND"


class AlreadyExists(DomainError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(DomainError):
    code = "FAILED_PRECONDITION"


class Conflict(DomainError):
    code = "ABORTED"


class PermissionDenied(DomainError):
    code = "PERMISSION_DENIED"


class Unauthenticated(DomainError):
    code = "UNAUTHENTICATED"


class Unavailable(DomainError):
    code = "UNAVAILABLE"


def echo(value: str, limit: int = 64) -> str:
    """`value` quoted for an error message, cut short past `limit` characters: a message names
    what was wrong without sending back all of a huge input."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}… ({len(value)} characters)"
