"""The accounts domain without servers: roles, input rules, token secrets, identities."""

from __future__ import annotations

import hashlib
import itertools
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from gpudeck.kit.errors import InvalidArgument, PermissionDenied
from gpudeck.wallet import accounts
from gpudeck.wallet.accounts import (
    ROLES,
    Identity,
    OrganizationRole,
    can_grant,
    can_manage_members,
    can_mutate,
    can_see_billing,
    check_email,
    check_expiry,
    check_grant,
    check_kyc_status,
    check_name,
    check_preference_update,
    check_role,
    name_key,
    new_secret,
    outranks,
    token_digest,
)


def test_roles_are_ordered_from_owner_to_viewer() -> None:
    assert ROLES == ("owner", "admin", "billing", "member", "viewer")
    assert all(outranks(a, b) for a, b in itertools.pairwise(ROLES))
    assert not outranks("admin", "admin")


def test_billing_is_seen_by_owner_admin_and_billing_only() -> None:
    assert [r for r in ROLES if can_see_billing(r)] == ["owner", "admin", "billing"]


def test_viewers_cannot_mutate() -> None:
    assert [r for r in ROLES if can_mutate(r)] == ["owner", "admin", "billing", "member"]


def test_members_are_managed_by_owner_and_admin() -> None:
    assert [r for r in ROLES if can_manage_members(r)] == ["owner", "admin"]


def test_nobody_grants_a_role_above_their_own() -> None:
    assert can_grant("admin", "admin")
    assert can_grant("member", "viewer")
    assert not can_grant("admin", "owner")
    assert not can_grant("viewer", "viewer")
    with pytest.raises(PermissionDenied) as err:
        check_grant("billing", "admin")
    assert err.value.field == "role"


def test_unknown_role_names_the_field() -> None:
    assert check_role(" Admin ") == "admin"
    with pytest.raises(InvalidArgument) as err:
        check_role("superuser")
    assert err.value.field == "role"
    assert "superuser" in err.value.message


@pytest.mark.parametrize("name", ["", "   ", "x" * 101, "tab\there"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        check_name(name)
    assert err.value.field == "name"


def test_names_are_trimmed_and_may_be_100_characters() -> None:
    assert check_name("  Acme  ") == "Acme"
    assert check_name("x" * 100) == "x" * 100


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("\u200b", "invisible"),  # a zero-width space was a name
        ("\ufeff", "invisible"),
        ("\u202egnp.exe", "text-direction"),  # shown as "exe.png"
        ("a\u2066b", "text-direction"),
        ("\u2800", "visible"),  # a blank Braille pattern
        ("\u3164", "visible"),  # a Hangul filler
        ("\u0301", "visible"),  # a combining mark alone
    ],
)
def test_names_that_show_nothing_or_turn_text_around_are_refused(name: str, says: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        check_name(name)
    assert err.value.field == "name" and says in err.value.message


@pytest.mark.parametrize(
    "name",
    [
        "Team \U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f",  # a flag
        "\u0600١٩٨٠ مشروع",  # an Arabic number sign
        "\u070fܐܒ",  # a Syriac abbreviation mark
        "Donau\u00addampf",  # a soft hyphen
    ],
)
def test_names_scripts_and_flags_need_are_kept(name: str) -> None:
    assert check_name(name) == name


def test_a_name_typed_two_ways_is_one_name() -> None:
    assert check_name("cafe\u0301") == check_name("caf\u00e9") == "caf\u00e9"
    assert check_name("क्\u200dष") == "क्\u200dष"  # a joiner a script needs stays
    assert name_key("Prod") == name_key("PROD") == name_key("Ｐｒｏｄ")
    assert name_key("prod") != name_key("prod-2")
    assert name_key("GPU x²") != name_key("GPU x2")  # not the same to a reader
    assert name_key("Phase Ⅳ") != name_key("Phase IV")


@pytest.mark.parametrize("email", ["", "plain", "a@b", "a @b.com", "@b.com", "a@b.", "a@.com"])
def test_bad_emails_are_refused(email: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        check_email(email)
    assert err.value.field == "email"


def test_emails_are_lower_cased() -> None:
    assert check_email(" Ada@Example.COM ") == "ada@example.com"


def test_kyc_status_is_one_of_three() -> None:
    assert check_kyc_status("Verified") == "verified"
    with pytest.raises(InvalidArgument):
        check_kyc_status("approved")


def test_a_secret_is_gpd_and_40_url_safe_characters_kept_as_sha256() -> None:
    secret = new_secret()
    assert secret.startswith("gpd_") and len(secret) == 44
    assert set(secret[4:]) <= set(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    )
    assert token_digest(secret) == hashlib.sha256(secret.encode()).digest()
    assert new_secret() != secret


def test_there_is_one_token_digest() -> None:
    from gpudeck.wallet import demo, tokens_store

    assert not hasattr(demo, "token_digest")
    assert vars(tokens_store)["token_digest"] is accounts.token_digest


def test_an_expiry_must_be_in_the_future() -> None:
    now = datetime.now(UTC)
    assert check_expiry(None, now) is None
    assert check_expiry(now + timedelta(seconds=1), now) is not None
    with pytest.raises(InvalidArgument) as err:
        check_expiry(now, now)
    assert err.value.field == "expires_at"


def test_an_identity_sees_only_its_own_organization() -> None:
    org = uuid.uuid4()
    who = Identity(uuid.uuid4(), org, "Acme", "member", uuid.uuid4(), "a@example.com")
    assert who.organizations == [OrganizationRole(org, "Acme", "member")]


def test_a_preference_update_checks_only_the_named_fields() -> None:
    values: dict[str, object] = {
        "display_currency": "",
        "theme": "dark",
        "compact_mode": True,
        "email_notifications": False,
        "low_balance_notifications": True,
    }
    assert check_preference_update(values, ["theme"]) == {"theme": "dark"}
    with pytest.raises(InvalidArgument) as err:
        check_preference_update(values, [])
    assert err.value.field == "display_currency"
    with pytest.raises(InvalidArgument) as err:
        check_preference_update(values, ["colour"])
    assert err.value.field == "fields"
    with pytest.raises(InvalidArgument) as err:
        check_preference_update({**values, "theme": "neon"}, ["theme"])
    assert err.value.field == "theme"
