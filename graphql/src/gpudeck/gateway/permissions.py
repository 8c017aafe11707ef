"""Who may read and change what, as Strawberry permissions on the fields.

    permission       roles                           otherwise
    Member           every role (an identity)        UNAUTHENTICATED
    Writer           owner, admin, billing, member   FORBIDDEN (viewers change nothing)
    BillingReader    owner, admin, billing           FORBIDDEN
    BillingWriter    owner, admin, billing           FORBIDDEN
    Admin            owner, admin                    FORBIDDEN
    Owner            owner                           FORBIDDEN
    MayGrant         the `role` given is not above the caller's own
    PlatformAdmin    the gateway's GPUDECK_ADMIN_TOKEN only          FORBIDDEN

Each first needs an identity (UNAUTHENTICATED without one) and the organization the field is
about to be the token's own: another organization's id is NOT_FOUND, exactly as one that does
not exist. The organization is the argument named `argument` (e.g. `id`, `organization_id`) or,
on an Organization's own fields, the organization itself.
"""

from __future__ import annotations

import enum
import uuid
from typing import Any

from strawberry.extensions.field_extension import FieldExtension
from strawberry.permission import BasePermission, PermissionExtension

from gpudeck.gateway.auth import Identity, rank
from gpudeck.gateway.context import Info
from gpudeck.gateway.errors import BAD_USER_INPUT, FORBIDDEN, NOT_FOUND, GatewayError, camel
from gpudeck.gateway.ids import canonical_id
from gpudeck.kit.errors import echo


def malformed_id(value: str, field: str) -> GatewayError | None:
    """BAD_USER_INPUT for a value that is no id at all (not a UUID), as the services say of
    every malformed id; None for a well-formed one."""
    try:
        uuid.UUID(value)
    except ValueError:
        return GatewayError(
            f"{field} is not a valid id: {echo(value)}", code=BAD_USER_INPUT, field=field
        )
    return None


def organization_not_found(organization_id: str, field: str) -> GatewayError:
    """Another organization's id, or one that does not exist: NOT_FOUND alike."""
    return malformed_id(organization_id, field) or GatewayError(
        f"organization {organization_id} not found", code=NOT_FOUND, field=field
    )


class Member(BasePermission):
    """Any member of the organization: every role."""

    minimum = "viewer"
    refusal = "not allowed"

    def __init__(self, argument: str | None = None) -> None:
        self.argument = argument

    async def has_permission(self, source: Any, info: Info, **kwargs: Any) -> bool:
        """True, or GatewayError with the code and message of the refusal."""
        organization = self.organization(source, kwargs)
        identity = await info.context.identity_in(organization, info)
        if organization is not None and organization != identity.organization_id:
            raise organization_not_found(organization, camel(self.argument or "organization_id"))
        refusal = self.refuse(identity, kwargs)
        if refusal:  # "{field}": what was asked, as the query spells it
            raise GatewayError(refusal.replace("{field}", info.field_name), code=FORBIDDEN)
        return True

    def organization(self, source: Any, kwargs: dict[str, Any]) -> str | None:
        if self.argument is not None:
            value = kwargs.get(self.argument)  # canonical already, but on a subscription's root
            return None if value is None else canonical_id(str(value))
        return getattr(source, "organization_id", None)

    def refuse(self, identity: Identity, kwargs: dict[str, Any]) -> str:
        """Why `identity` may not, or "" when it may."""
        return "" if rank(identity.role) >= rank(self.minimum) else self.refusal


class Writer(Member):
    minimum = "member"
    refusal = "viewers may not change anything"


class BillingReader(Member):
    minimum = "billing"
    refusal = "billing data is for the owner, admin and billing roles only"


class BillingWriter(Member):
    minimum = "billing"
    refusal = "money operations are for the owner, admin and billing roles only"


class Admin(Member):
    minimum = "admin"
    refusal = "only an owner or admin may {field}"


class Owner(Member):
    minimum = "owner"
    refusal = "only an owner may {field}"


class MayGrant(Writer):
    """A Writer, and the role in argument `role_argument` is not above the caller's own."""

    def __init__(self, argument: str | None = None, *, role_argument: str = "role") -> None:
        super().__init__(argument)
        self.role_argument = role_argument

    def refuse(self, identity: Identity, kwargs: dict[str, Any]) -> str:
        wanted = kwargs.get(self.role_argument)
        role = str(wanted.value if isinstance(wanted, enum.Enum) else wanted or "")
        if rank(role) > rank(identity.role):
            return f"role {role} is above your own role {identity.role}"
        return super().refuse(identity, kwargs)


class PlatformAdmin(BasePermission):
    """The platform's operators only (the gateway's GPUDECK_ADMIN_TOKEN)."""

    async def has_permission(self, source: Any, info: Info, **kwargs: Any) -> bool:
        identity = await info.context.identity()
        if not identity.platform_admin:
            raise GatewayError(
                "only the platform admin (GPUDECK_ADMIN_TOKEN) may do this", code=FORBIDDEN
            )
        return True


def article(role: str) -> str:
    """ "an admin", "a member": a role with its indefinite article."""
    return f"{'an' if role[:1] in 'aeiou' else 'a'} {role}"


def require(*permissions: BasePermission) -> list[FieldExtension]:
    """The field extension checking `permissions` in order (no schema directives)."""
    return [PermissionExtension(list(permissions), use_directives=False)]


class MayManageMember(Admin):
    """An Admin, and the member in argument `user_argument` is not above the caller's role
    (an admin may not change or remove an owner)."""

    def __init__(self, argument: str | None = None, *, user_argument: str = "user_id") -> None:
        super().__init__(argument)
        self.user_argument = user_argument

    async def has_permission(self, source: Any, info: Info, **kwargs: Any) -> bool:
        await super().has_permission(source, info, **kwargs)
        identity = await info.context.identity()
        user = str(kwargs.get(self.user_argument) or "")
        members = await info.context.loaders.members.load(identity.organization_id)
        target = next((m for m in members if m.user.id == user), None)  # canonical: CanonicalIds
        if target is None:
            # Not a member (now): the wallet's NOT_FOUND, or its first answer to a retried call.
            return True
        if rank(target.role) > rank(identity.role):
            raise GatewayError(
                f"{article(identity.role)} may not change a member whose role is {target.role}",
                code=FORBIDDEN,
            )
        return True


class MayManageToken(Writer):
    """A Writer revoking or renaming a token of its own organization: an owner or admin any
    token not above its role; anyone else the tokens its user created, and itself."""

    def __init__(self, token_argument: str = "id") -> None:
        super().__init__(None)
        self.token_argument = token_argument

    async def has_permission(self, source: Any, info: Info, **kwargs: Any) -> bool:
        await super().has_permission(source, info, **kwargs)
        identity = await info.context.identity()
        wanted = str(kwargs.get(self.token_argument) or "")
        tokens = await info.context.loaders.api_tokens.load(identity.organization_id)
        token = next((t for t in tokens if t.id == wanted), None)
        if token is None:
            raise malformed_id(wanted, self.token_argument) or GatewayError(
                f"API token {wanted} not found", code=NOT_FOUND, field=self.token_argument
            )
        verb = "rename" if info.field_name.startswith("rename") else "revoke"
        if rank(token.role) > rank(identity.role):
            raise GatewayError(
                f"{article(identity.role)} token may not {verb} {article(token.role)} token",
                code=FORBIDDEN,
            )
        own = token.id == identity.token_id or (
            bool(identity.user_id) and token.created_by == identity.user_id
        )
        if not own and rank(identity.role) < rank("admin"):
            raise GatewayError(
                f"only an owner or admin may {verb} tokens made by others", code=FORBIDDEN
            )
        return True
