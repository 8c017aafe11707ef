"""Accounts: organizations, members and their roles, projects, API tokens and preferences.

What each role may do, how names, emails and settings are checked, and how a token's secret is
made and kept (only its SHA-256). Plain values and rules; the SQL lives in accounts_store and the stores it is built from (organizations_store, projects_store, tokens_store).

Roles, from most to least powerful: owner > admin > billing > member > viewer.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import unicodedata
import uuid
from dataclasses import dataclass
from datetime import datetime

from gpudeck.kit.errors import InvalidArgument, PermissionDenied, echo
from gpudeck.wallet.money import check_currency
from gpudeck.wallet.text import chosen_fields

ROLES = ("owner", "admin", "billing", "member", "viewer")
RANK = {role: len(ROLES) - i for i, role in enumerate(ROLES)}  # owner 5 … viewer 1
KYC_STATUSES = ("unverified", "pending", "verified")
THEMES = ("light", "dark", "system")
MAX_NAME = 100
MAX_EMAIL = 254
TOKEN_PREFIX = "gpd_"
DEFAULT_PROJECT = "default"
_EMAIL = re.compile(r"^[^@\s]+@[^@\s.]+(\.[^@\s.]+)+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# ---------------------------------------------------------------------------------- roles


def check_role(role: str, *, field: str = "role") -> str:
    value = role.strip().lower()
    if value not in RANK:
        raise InvalidArgument(
            f"{field} must be one of {', '.join(ROLES)}, got {echo(role)}", field=field
        )
    return value


def outranks(role: str, other: str) -> bool:
    """Whether `role` is strictly more powerful than `other`."""
    return RANK[role] > RANK[other]


def can_see_billing(role: str) -> bool:
    """Balances, invoices, spend: owner, admin and billing only."""
    return RANK.get(role, 0) >= RANK["billing"]


def can_manage_billing(role: str) -> bool:
    """Top-ups, plan changes, credits and thresholds: the roles that see billing."""
    return can_see_billing(role)


def can_mutate(role: str) -> bool:
    """Anything but reading: every role but viewer."""
    return RANK.get(role, 0) >= RANK["member"]


def can_manage_members(role: str) -> bool:
    """Inviting, removing and changing the roles of members: owner and admin."""
    return RANK.get(role, 0) >= RANK["admin"]


def can_grant(granter: str, role: str) -> bool:
    """Whether someone with `granter` may hand out `role` (to a member or a token): never above
    their own."""
    return can_mutate(granter) and RANK[role] <= RANK.get(granter, 0)


def check_grant(granter: str, role: str, *, field: str = "role") -> None:
    """PermissionDenied unless `granter` may hand out `role`."""
    if not can_mutate(granter):
        raise PermissionDenied(f"a {granter} may not grant any role", field=field)
    if not can_grant(granter, role):
        raise PermissionDenied(
            f"{field} {echo(role)} exceeds the granting user's own role {echo(granter)}",
            field=field,
        )


def check_manage_member(manager: str, current: str, new: str | None = None) -> None:
    """PermissionDenied unless someone with role `manager` may change (to `new`) or, with `new`
    None, remove a member whose role is `current`: an owner or admin, never above their own
    role, and never handing out one above it."""
    who = f"{'an' if manager[0] in 'aeiou' else 'a'} {manager}"
    if not can_manage_members(manager):
        raise PermissionDenied(f"{who} may not manage members", field="user_id")
    if outranks(current, manager):
        raise PermissionDenied(
            f"{who} may not change a member whose role is {current}", field="user_id"
        )
    if new is not None:
        check_grant(manager, new)


# ---------------------------------------------------------------------------------- inputs


def check_name(name: str, *, field: str = "name") -> str:
    """A display name: trimmed, in NFC (a "café" typed two ways is one name), 1 to 100
    characters, no control characters, no text-direction controls or zero-width spaces
    (_HIDDEN), and something to see (a zero-width space alone was a name)."""
    value = unicodedata.normalize("NFC", name.strip())
    if not value:
        raise InvalidArgument(f"{field} must not be empty", field=field)
    if len(value) > MAX_NAME:
        raise InvalidArgument(f"{field} is longer than {MAX_NAME} characters", field=field)
    if _CONTROL.search(value):
        raise InvalidArgument(f"{field} contains control characters", field=field)
    if any(c in _HIDDEN for c in value):
        raise InvalidArgument(
            f"{field} contains invisible or text-direction characters", field=field
        )
    if not any(_visible(c) for c in value):
        raise InvalidArgument(f"{field} must have a visible character", field=field)
    return value


def name_key(name: str) -> str:
    """What two names are the same by, to a reader: case and width aside ("Prod", "PROD" and
    "Ｐｒｏｄ" are one; "x²" and "x2" are not)."""
    folded = unicodedata.normalize("NFC", name).casefold()
    return "".join(_NARROW.get(c, c) for c in folded)


# Text-direction controls (a "\u202egnp.exe" reads "exe.png") and characters of no width that
# no script needs (joiners, tag sequences of flags and Arabic number signs are kept).
_HIDDEN = frozenset(
    "\u061c\u200b\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2060\u2066\u2067\u2068\u2069\ufeff"
)
_BLANKS = "\u115f\u1160\u2800\u3164\uffa0"  # letters and symbols that show nothing
_NARROW = {chr(0xFF01 + i): chr(0x21 + i) for i in range(94)} | {"\u3000": " "}  # full width


def _visible(c: str) -> bool:
    return unicodedata.category(c)[0] in "LNPS" and c not in _BLANKS


def check_user_name(name: str, *, field: str = "name") -> str:
    """A person's name, which may be left out (""); else as `check_name`."""
    return check_name(name, field=field) if name.strip() else ""


def check_email(email: str, *, field: str = "email") -> str:
    """An address shaped like local@domain.tld, lower-cased."""
    value = email.strip().lower()
    if not value:
        raise InvalidArgument(f"{field} is required", field=field)
    if len(value) > MAX_EMAIL or not _EMAIL.match(value) or _CONTROL.search(value):
        raise InvalidArgument(f"{field} is not an email address: {echo(email)}", field=field)
    return value


def check_kyc_status(status: str, *, field: str = "kyc_status") -> str:
    value = status.strip().lower()
    if value not in KYC_STATUSES:
        raise InvalidArgument(
            f"{field} must be one of {', '.join(KYC_STATUSES)}, got {echo(status)}", field=field
        )
    return value


def check_theme(theme: str, *, field: str = "theme") -> str:
    value = theme.strip().lower()
    if value not in THEMES:
        raise InvalidArgument(
            f"{field} must be one of {', '.join(THEMES)}, got {echo(theme)}", field=field
        )
    return value


def fingerprint(op: str, **fields: object) -> bytes:
    """What identifies a request's payload for idempotency: equal payloads, equal digests."""
    payload = {"op": op, **{k: str(v) for k, v in fields.items()}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).digest()


# ---------------------------------------------------------------------------------- tokens


def new_secret() -> str:
    """A fresh token secret: "gpd_" and 40 URL-safe random characters (240 bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(30)


def token_digest(secret: str) -> bytes:
    """How a secret is kept and looked up: its SHA-256. The secret itself is never stored."""
    return hashlib.sha256(secret.encode()).digest()


def check_expiry(
    expires_at: datetime | None, now: datetime, *, field: str = "expires_at"
) -> datetime | None:
    if expires_at is not None and expires_at <= now:
        raise InvalidArgument(f"{field} must be in the future", field=field)
    return expires_at


# ---------------------------------------------------------------------------------- values


@dataclass(frozen=True)
class User:
    id: uuid.UUID
    email: str
    name: str = ""


@dataclass(frozen=True)
class Organization:
    id: uuid.UUID
    name: str
    owner: User
    currency: str
    plan_code: str
    kyc_status: str
    created_at: datetime
    team_size: int


@dataclass(frozen=True)
class Member:
    organization_id: uuid.UUID
    user: User
    role: str
    joined_at: datetime


@dataclass(frozen=True)
class Project:
    id: uuid.UUID
    organization_id: uuid.UUID
    name: str
    created_at: datetime
    last_used_at: datetime
    deleted_at: datetime | None = None


@dataclass(frozen=True)
class ApiToken:
    id: uuid.UUID
    organization_id: uuid.UUID
    name: str
    role: str
    created_by: uuid.UUID | None
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None


@dataclass(frozen=True)
class OrganizationRole:
    organization_id: uuid.UUID
    name: str
    role: str


@dataclass(frozen=True)
class Identity:
    """Who a token is: it acts in its one organization, with its own role, and nowhere else."""

    token_id: uuid.UUID
    organization_id: uuid.UUID
    organization_name: str
    role: str
    user_id: uuid.UUID | None  # the user who created the token
    email: str
    expires_at: datetime | None = None

    @property
    def organizations(self) -> list[OrganizationRole]:
        return [OrganizationRole(self.organization_id, self.organization_name, self.role)]


PREFERENCE_FIELDS = (
    "display_currency",
    "theme",
    "compact_mode",
    "email_notifications",
    "low_balance_notifications",
)


@dataclass(frozen=True)
class Preferences:
    organization_id: uuid.UUID
    user_id: uuid.UUID
    display_currency: str
    theme: str = "system"
    compact_mode: bool = False
    email_notifications: bool = True
    low_balance_notifications: bool = True


def check_preference_update(values: dict[str, object], fields: list[str]) -> dict[str, object]:
    """The preferences an update changes, checked: those `fields` names (all when empty)."""
    chosen = {name: values[name] for name in chosen_fields(fields, PREFERENCE_FIELDS, "preference")}
    if "display_currency" in chosen:
        chosen["display_currency"] = check_currency(
            str(chosen["display_currency"]), field="display_currency"
        )
    if "theme" in chosen:
        chosen["theme"] = check_theme(str(chosen["theme"]))
    return chosen
