"""What a client sees when something fails: every GraphQL error carries `extensions.code`.

    gRPC status / kit DomainError code       extensions.code
    INVALID_ARGUMENT, OUT_OF_RANGE        →  BAD_USER_INPUT
    NOT_FOUND                             →  NOT_FOUND
    ALREADY_EXISTS, ABORTED               →  CONFLICT
    FAILED_PRECONDITION                   →  FAILED_PRECONDITION
    PERMISSION_DENIED                     →  FORBIDDEN
    UNAUTHENTICATED                       →  UNAUTHENTICATED
    RESOURCE_EXHAUSTED                    →  RATE_LIMITED
    RESOURCE_EXHAUSTED, an answer larger
      than the gateway receives           →  RESPONSE_TOO_LARGE, "the answer is too large: ..."
    UNAVAILABLE, DEADLINE_EXCEEDED        →  UNAVAILABLE
    anything else (INTERNAL, a bug)       →  INTERNAL, message replaced by "internal error"

A service's finer cause travels in the trailing metadata `x-error-reason` (and the field in
`x-error-field`): they become `extensions.reason` and `extensions.field` (in camelCase), and a
few reasons pick a code of their own:

    FAILED_PRECONDITION + INSUFFICIENT_FUNDS  →  INSUFFICIENT_FUNDS

A service names its fields as the proto does (`display_currency`); the client sees them as the
GraphQL argument (`displayCurrency`), in `extensions.field` and in the message. Where the
argument has another name (`organization(id)` for the service's `organization_id`), the field
says so with `extensions=[Arguments(organization_id="id")]`.

A resolver raises `GatewayError(message, code=...)` for its own refusals; a gRPC error from a
service passes through with its details as the message. Syntax and validation errors get
GRAPHQL_PARSE_FAILED and GRAPHQL_VALIDATION_FAILED; a literal of the wrong type or an unknown enum
value names its argument in `extensions.field` and the message. Only INTERNAL errors are logged with their
traceback; their text never reaches the client.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from graphql import DocumentNode, GraphQLError, GraphQLSyntaxError
from graphql.language import (
    ArgumentNode,
    ListValueNode,
    Node,
    ObjectValueNode,
    ValueNode,
    VariableDefinitionNode,
    VariableNode,
    Visitor,
)
from graphql.language.visitor import BREAK, visit
from strawberry.extensions.field_extension import FieldExtension
from strawberry.schema.exceptions import InvalidOperationTypeError

from gpudeck.kit.errors import DomainError

log = logging.getLogger(__name__)

BAD_USER_INPUT = "BAD_USER_INPUT"
NOT_FOUND = "NOT_FOUND"
CONFLICT = "CONFLICT"
FAILED_PRECONDITION = "FAILED_PRECONDITION"
FORBIDDEN = "FORBIDDEN"
UNAUTHENTICATED = "UNAUTHENTICATED"
RATE_LIMITED = "RATE_LIMITED"
RESPONSE_TOO_LARGE = "RESPONSE_TOO_LARGE"
UNAVAILABLE = "UNAVAILABLE"
INSUFFICIENT_FUNDS = "INSUFFICIENT_FUNDS"
INTERNAL = "INTERNAL"
PARSE_FAILED = "GRAPHQL_PARSE_FAILED"
VALIDATION_FAILED = "GRAPHQL_VALIDATION_FAILED"
BAD_REQUEST = "BAD_REQUEST"  # no GraphQL request at all: no query, bad JSON, a subscription by POST
INTERNAL_MESSAGE = "internal error"
TOO_LARGE_MESSAGE = "the answer is too large: ask for fewer items"
# gRPC's own words when an answer exceeds the channel's grpc.max_receive_message_length: the
# same status as a service's rate limit, but asking again can never succeed.
_TOO_LARGE = "Received message larger than max"

# By status name, so gRPC status codes and kit DomainError codes share one table.
CODES = {
    "INVALID_ARGUMENT": BAD_USER_INPUT,
    "OUT_OF_RANGE": BAD_USER_INPUT,
    "NOT_FOUND": NOT_FOUND,
    "ALREADY_EXISTS": CONFLICT,
    "ABORTED": CONFLICT,
    "FAILED_PRECONDITION": FAILED_PRECONDITION,
    "PERMISSION_DENIED": FORBIDDEN,
    "UNAUTHENTICATED": UNAUTHENTICATED,
    "RESOURCE_EXHAUSTED": RATE_LIMITED,
    "UNAVAILABLE": UNAVAILABLE,
    "DEADLINE_EXCEEDED": UNAVAILABLE,
}
# x-error-reason values that are a code of their own.
REASON_CODES = {"INSUFFICIENT_FUNDS": INSUFFICIENT_FUNDS}


class GatewayError(Exception):
    """A refusal a resolver raises on purpose; `code` becomes `extensions.code`."""

    def __init__(
        self, message: str, *, code: str = BAD_USER_INPUT, field: str = "", reason: str = ""
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.field = field  # the GraphQL argument at fault, if any
        self.reason = reason  # a service's finer cause (x-error-reason), if any


def camel(name: str) -> str:
    """`organization_id` → `organizationId`: a proto field name as GraphQL spells it."""
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def rpc_details(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """`reason` and `field` (as the service names it) from the trailing metadata of a failed
    call (those present)."""
    out: dict[str, str] = {}
    for key, value in error.trailing_metadata() or ():
        text = value.decode() if isinstance(value, bytes) else str(value)
        if key == "x-error-reason" and text:
            out["reason"] = text
        elif key == "x-error-field" and text:
            out["field"] = text
    return out


def too_large(error: grpc.aio.AioRpcError) -> bool:
    """Whether `error` is gRPC refusing an answer above the channel's receive limit."""
    return error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and _TOO_LARGE in (
        error.details() or ""
    )


def rpc_code(error: grpc.aio.AioRpcError) -> str:
    """The `extensions.code` of a failed gRPC call."""
    if too_large(error):
        return RESPONSE_TOO_LARGE
    code = CODES.get(error.code().name, INTERNAL)
    reason = rpc_details(error).get("reason", "")
    return REASON_CODES.get(reason, code) if code != INTERNAL else INTERNAL


def from_rpc(error: grpc.aio.AioRpcError, names: dict[str, str] | None = None) -> GatewayError:
    """A service's refusal as the client sees it: its code, its field named as the GraphQL
    argument (`names` maps the service's field names to the arguments; camelCase otherwise),
    in `field` and in the message. INTERNAL: the message is hidden."""
    code = rpc_code(error)
    if code == INTERNAL:
        return GatewayError(INTERNAL_MESSAGE, code=INTERNAL)
    if code == RESPONSE_TOO_LARGE:  # gRPC's own words ("Stream removed (CLIENT: ...)") stay here
        return GatewayError(TOO_LARGE_MESSAGE, code=RESPONSE_TOO_LARGE)
    details = rpc_details(error)
    message, field = error.details() or code, details.get("field", "")
    argument = (names or {}).get(field, camel(field))
    for snake, name in {**(names or {}), field: argument}.items():
        if snake and name:
            message = re.sub(rf"\b{re.escape(snake)}\b", name, message)
    return GatewayError(message, code=code, field=argument, reason=details.get("reason", ""))


class Arguments(FieldExtension):
    """Names the service's fields as this GraphQL field's arguments, for its errors: each
    argument under its own name (a message naming `warning_amount` besides the field at fault
    says `warningAmount`), and `Arguments(project_id="id")` makes a service's `project_id`
    refusal one about `id`; `Arguments(amount="")`: the service's `amount` is no argument here
    (no `field`)."""

    def __init__(self, **names: str) -> None:
        self.names = names

    def apply(self, field: Any) -> None:
        own = {a.python_name: camel(a.python_name) for a in field.arguments if "_" in a.python_name}
        self.names = {**own, **self.names}

    async def resolve_async(
        self, next_: Callable[..., Awaitable[Any]], source: Any, info: Any, **kwargs: Any
    ) -> Any:
        try:
            return await next_(source, info, **kwargs)
        except grpc.aio.AioRpcError as error:
            raise from_rpc(error, self.names) from error


def classify(error: GraphQLError) -> tuple[str, str]:
    """The `extensions.code` of `error` and the message a client may see."""
    existing = (error.extensions or {}).get("code")
    original = error.original_error
    if isinstance(original, GatewayError):
        return original.code, original.message
    if isinstance(original, grpc.aio.AioRpcError):
        refusal = from_rpc(original)
        return refusal.code, refusal.message
    if isinstance(original, DomainError):
        domain_code = CODES.get(original.code)
        return (domain_code, original.message) if domain_code else (INTERNAL, INTERNAL_MESSAGE)
    if isinstance(original, InvalidOperationTypeError):  # a query over legacy graphql-ws: the
        # client's request, not a bug (it was INTERNAL, logged with a traceback)
        return BAD_REQUEST, f"{error.message} here: send it over HTTP or graphql-transport-ws"
    if original is None or isinstance(original, GraphQLError):
        if isinstance(existing, str):
            return existing, error.message
        if isinstance(error, GraphQLSyntaxError) or isinstance(original, GraphQLSyntaxError):
            return PARSE_FAILED, error.message
        if error.path is None:
            return VALIDATION_FAILED, error.message
    return INTERNAL, INTERNAL_MESSAGE  # a bug, e.g. null for a non-null field


def process(errors: list[GraphQLError], document: DocumentNode | None = None) -> None:
    """Give each error its `extensions.code` (in place) and log the ones a person must look at.

    Called by the schema for every error of every result, subscription events included. An
    INTERNAL error is logged with its traceback, then its message is replaced; the rest are
    logged at DEBUG. Idempotent: the same error object (e.g. from the validation cache) may
    pass more than once.
    """
    for error in errors:
        code, message = classify(error)
        if code == INTERNAL and error.message != INTERNAL_MESSAGE:
            original = error.original_error
            exc_info = (type(original), original, original.__traceback__) if original else None
            log.error("internal error at %s: %s", _path(error), error.message, exc_info=exc_info)
        elif code != INTERNAL:
            log.debug("graphql error", extra={"code": code, "error": error.message})
        error.extensions = {**(error.extensions or {}), **_details(error), "code": code}
        error.message = message
        if code == VALIDATION_FAILED and document is not None:
            _name_argument(error, document)


def _details(error: GraphQLError) -> dict[str, str]:
    original = error.original_error
    if isinstance(original, grpc.aio.AioRpcError):
        original = from_rpc(original)
    if isinstance(original, GatewayError):
        details = {"field": original.field, "reason": original.reason}
        return {key: value for key, value in details.items() if value}
    return {}


def _name_argument(error: GraphQLError, document: DocumentNode) -> None:
    """A validation error about a value (`days: "x"`, `kinds: [NOPE]`, or a variable `$k` given
    a bad value) names the argument it was given for; once, as the same error may come from the
    validation cache."""
    extensions = error.extensions or {}
    name = extensions.get("field")
    if name is None:
        node = error.nodes[0] if error.nodes else None
        if isinstance(node, VariableDefinitionNode):
            node = node.variable
        name = argument_of(document, node) if isinstance(node, ValueNode) else None
        if not name:
            return
        error.extensions = {**extensions, "field": name}
    # (A refusal of ours, a DateTime literal's, has its message set again on each pass.)
    if not error.message.startswith(f"{name}: "):
        error.message = f"{name}: {error.message}"


def argument_of(document: DocumentNode, value: Node) -> str | None:
    """The argument of `document` whose value is or contains `value`, as `arg` or
    `arg.inputField`; None when `value` is not in an argument."""
    found: list[str] = []

    class Finder(Visitor):
        def enter_argument(self, node: ArgumentNode, *_: Any) -> Any:
            path = _within(node.value, value)
            if path is not None:
                found.append(".".join([node.name.value, *path]))
                return BREAK
            return self.SKIP

    visit(document, Finder())
    return found[0] if found else None


def _within(node: ValueNode, value: Node) -> list[str] | None:
    if node is value:
        return []
    if isinstance(node, VariableNode) and isinstance(value, VariableNode):
        return [] if node.name.value == value.name.value else None
    if isinstance(node, ListValueNode):
        for item in node.values:
            path = _within(item, value)
            if path is not None:
                return path
    if isinstance(node, ObjectValueNode):
        for field in node.fields:
            path = _within(field.value, value)
            if path is not None:
                return [field.name.value, *path]
    return None


def _path(error: GraphQLError) -> str:
    return ".".join(str(p) for p in error.path) if error.path else "operation"
