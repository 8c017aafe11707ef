"""Free text and labels callers send: bounded, and free of what PostgreSQL or a reader chokes on.

    check_text    descriptions, references, ids chosen by callers: at most `max_length`
                  characters, no NUL or other control characters (tabs and newlines are fine)
    check_label   resource types and dimension names: a lower-case identifier ("pod",
                  "nfs_volume", "api"), at most 40 characters

Each refusal is InvalidArgument naming the field.
"""

from __future__ import annotations

import re

from gpudeck.kit.errors import InvalidArgument, echo

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_LABEL = re.compile(r"[a-z][a-z0-9_]{0,39}")


def check_text(value: str, field: str, *, max_length: int = 200) -> str:
    if len(value) > max_length:
        raise InvalidArgument(
            f"{field} is longer than {max_length} characters ({len(value)})", field=field
        )
    if _CONTROL.search(value):
        raise InvalidArgument(f"{field} contains control characters", field=field)
    return value


def check_label(value: str, field: str) -> str:
    if not _LABEL.fullmatch(value):
        raise InvalidArgument(
            f"{field} must be a lower-case name like pod or nfs_volume"
            f" (letters, digits, _; at most 40), got {value[:50]!r}",
            field=field,
        )
    return value


def chosen_fields(fields: list[str], known: tuple[str, ...], what: str) -> tuple[str, ...]:
    """The names an update changes: `fields` (all `known` when empty); InvalidArgument naming
    "fields" for a name not known (`what`: what the names are of, e.g. "preference")."""
    for name in fields:
        if name not in known:
            raise InvalidArgument(
                f"fields: unknown {what} {echo(name)}; known: {', '.join(known)}", field="fields"
            )
    return tuple(fields) or known
