"""Ids as the services write them: lower-case, hyphenated UUIDs.

The services accept any spelling of a UUID (`A1B2…`, no hyphens, braces, `urn:uuid:`); the
gateway compares ids itself (is this the caller's organization, which member is that), so every
`ID` argument is made canonical before permissions and resolvers see it. A value that is no UUID
is left as sent: the field refuses it as malformed.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from functools import cache
from typing import Any

from graphql import GraphQLID, GraphQLObjectType, get_named_type
from strawberry.extensions import SchemaExtension


def canonical_id(value: str) -> str:
    """`value` as the services write it when it is a UUID, else unchanged."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return value


@cache
def _id_arguments(parent: GraphQLObjectType, field: str) -> tuple[str, ...]:
    found = parent.fields.get(field)  # none for introspection's own: __type(name:), …
    if found is None:
        return ()
    return tuple(name for name, arg in found.args.items() if get_named_type(arg.type) is GraphQLID)


def _canonical(value: Any) -> Any:
    if isinstance(value, str):
        return canonical_id(value)
    if isinstance(value, list):
        return [_canonical(item) for item in value]
    return value


class CanonicalIds(SchemaExtension):
    """Makes every `ID` argument canonical (see the module)."""

    def resolve(
        self, _next: Callable[..., Any], root: Any, info: Any, *args: Any, **kwargs: Any
    ) -> Any:
        if kwargs:
            for name in _id_arguments(info.parent_type, info.field_name):
                if name in kwargs:
                    kwargs[name] = _canonical(kwargs[name])
        return _next(root, info, *args, **kwargs)
