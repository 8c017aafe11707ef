"""Arguments that are text must be text the services can take: UTF-8.

JSON may carry a lone UTF-16 surrogate (`"\\ud800"`: what `JSON.stringify` sends for a string
cut in the middle of an emoji). Python keeps it in a `str`, but protobuf cannot encode it, so a
resolver failed with INTERNAL before calling anything. `WellFormedText` refuses such an
argument first, as BAD_USER_INPUT naming it, for every field of queries and mutations (lists
too). graphql-core runs no extension on a subscription's root field: its arguments are IDs and
currency codes, which their own checks refuse.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from strawberry.extensions import SchemaExtension

from gpudeck.gateway.errors import BAD_USER_INPUT, GatewayError


def _malformed(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, list):
        return any(_malformed(item) for item in value)
    if isinstance(value, dict):
        return any(_malformed(item) for item in value.values())
    return False


def check_arguments(arguments: dict[str, Any]) -> None:
    """GatewayError(BAD_USER_INPUT) naming the first argument that holds malformed text."""
    for name, value in arguments.items():
        if _malformed(value):
            raise GatewayError(
                f"{name} is not valid text: it holds a lone UTF-16 surrogate (half of a character)",
                code=BAD_USER_INPUT,
                field=name,
            )


class WellFormedText(SchemaExtension):
    """Refuses malformed text in any field's arguments (see the module)."""

    def resolve(
        self, _next: Callable[..., Any], root: Any, info: Any, *args: Any, **kwargs: Any
    ) -> Any:
        if kwargs:
            check_arguments(kwargs)
        return _next(root, info, *args, **kwargs)
