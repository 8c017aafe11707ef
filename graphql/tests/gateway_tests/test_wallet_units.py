"""The gateway's own rules, without servers: amounts, conversions, bearer tokens, settings."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gpudeck.gateway.auth import Authenticator, Identity, _Entry, bearer, token_from
from gpudeck.gateway.config import Settings
from gpudeck.gateway.errors import GatewayError, camel
from gpudeck.gateway.money import MAX_AMOUNT, convert, format_micro, parse_amount
from gpudeck.gateway.types.common import parse_long
from gpudeck.proto.common.v1 import money_pb2


@pytest.mark.parametrize(
    ("text", "micro"),
    [
        ("12.5", 12_500_000),
        ("12.500000", 12_500_000),
        (" 7 ", 7_000_000),
        ("0.000001", 1),
        (".5", 500_000),
        ("3.", 3_000_000),
        ("1000000000", MAX_AMOUNT),
        ("0" * 16 + "1", 1_000_000),  # leading zeros are no size ("too large" before)
        ("00000000000000000.000001", 1),
    ],
)
def test_amounts_parse_to_micro_units(text: str, micro: int) -> None:
    assert parse_amount(text) == micro


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("-1", "must be positive"),
        ("0", "must be positive"),
        ("0.0000001", "more than 6 decimal places"),
        ("1e3", "decimal number"),
        ("1000000000.000001", "too large"),
        ("9" * 40, "too large"),
        ("0" * 40 + "1" * 11, "too large"),
        ("", "decimal number"),
        ("\u0661\u0662", "decimal number"),  # Arabic-Indic digits
        ("\uff15", "decimal number"),  # fullwidth 5
        ("\u0967.5", "decimal number"),  # Devanagari 1
    ],
)
def test_bad_amounts_name_the_field(text: str, says: str) -> None:
    with pytest.raises(GatewayError) as raised:
        parse_amount(text, field="warningAmount")
    assert raised.value.code == "BAD_USER_INPUT"
    assert raised.value.field == "warningAmount"
    assert raised.value.message.startswith("warningAmount ")
    assert says in raised.value.message


def test_zero_is_allowed_where_it_clears_a_setting() -> None:
    assert parse_amount("0", allow_zero=True) == 0


def test_micro_units_format_with_six_decimals() -> None:
    assert format_micro(12_500_000) == "12.500000"
    assert format_micro(0) == "0.000000"
    assert format_micro(-1) == "-0.000001"


def test_conversion_multiplies_from_the_base_and_divides_from_the_quote() -> None:
    rate = money_pb2.Conversion(base="USD", quote="INR", rate="83.25")
    usd = money_pb2.Money(amount=10_500_000, currency="USD")
    assert convert(usd, rate) == money_pb2.Money(amount=874_125_000, currency="INR")
    inr = money_pb2.Money(amount=1_000_000, currency="INR")
    # 1 / 83.25 = 0.0120120120… → 12012 micro-units, rounded half away from zero.
    assert convert(inr, rate) == money_pb2.Money(amount=12_012, currency="USD")
    assert convert(usd, None) is usd


def test_a_conversion_a_money_cannot_hold_is_refused_naming_the_display_currency() -> None:
    """As the wallet refuses it (FAILED_PRECONDITION, AMOUNT_TOO_LARGE), not an INTERNAL error
    from protobuf's int64 range check."""
    far_off = money_pb2.Conversion(base="USD", quote="INR", rate="900000000000")
    fee = money_pb2.Money(amount=99_000_000, currency="USD")
    with pytest.raises(GatewayError) as refused:
        convert(fee, far_off)
    assert (refused.value.code, refused.value.reason) == ("FAILED_PRECONDITION", "AMOUNT_TOO_LARGE")
    assert refused.value.field == "displayCurrency"
    assert "displayCurrency" in refused.value.message
    inr = money_pb2.Money(amount=99_000_000, currency="INR")
    tiny = money_pb2.Conversion(base="USD", quote="INR", rate="0.000000000001")
    with pytest.raises(GatewayError):
        convert(inr, tiny)  # divided: as large
    fits = money_pb2.Money(amount=9_000_000, currency="USD")  # 9e6 × 9e11 < 2^63
    assert convert(fits, far_off).amount == 9_000_000 * 900_000_000_000


def test_bearer_tokens() -> None:
    assert bearer("Bearer abc") == "abc"
    assert bearer("bearer   abc ") == "abc"
    assert bearer(None) is None
    assert bearer("") is None
    with pytest.raises(GatewayError):
        bearer("Basic abc")
    with pytest.raises(GatewayError):
        bearer("Bearer")


def test_a_websocket_payload_wins_over_the_handshake_header() -> None:
    headers = {"Authorization": "Bearer from-header"}
    assert token_from(headers, {"Authorization": "Bearer from-init"}) == "from-init"
    assert token_from(headers, {"authorization": "Bearer lower"}) == "lower"
    assert token_from(headers, {}) == "from-header"
    assert token_from({}, None) is None


def test_grpc_field_names_become_graphql_names() -> None:
    assert camel("organization_id") == "organizationId"
    assert camel("amount") == "amount"
    assert camel("display_currency") == "displayCurrency"


def test_settings_read_nats_and_the_subject_prefix() -> None:
    base = {"GPUDECK_SERVICE_TOKEN": "t"}
    default = Settings.from_env(base)
    assert default.events is not None
    assert default.events.nats_url == "nats://127.0.0.1:4222"
    assert default.events.subject_prefix == "gpudeck"
    custom = Settings.from_env(
        {**base, "GPUDECK_NATS_URL": "nats://nats:4222", "GPUDECK_EVENTS_PREFIX": "staging"}
    )
    assert custom.events is not None
    assert (custom.events.nats_url, custom.events.subject_prefix) == ("nats://nats:4222", "staging")


def test_roles_are_accepted_in_any_case_as_strings_or_bare_words() -> None:
    from graphql import EnumValueNode, IntValueNode, StringValueNode

    from gpudeck.gateway.errors import GatewayError
    from gpudeck.gateway.types.common import ROLE_SCALAR

    assert ROLE_SCALAR.parse_value("Viewer") == "viewer"
    assert ROLE_SCALAR.parse_literal(StringValueNode(value="admin")) == "admin"
    assert ROLE_SCALAR.parse_literal(EnumValueNode(value="BILLING")) == "billing"
    assert ROLE_SCALAR.serialize("OWNER") == "owner"
    for bad in ("root", ""):
        with pytest.raises(GatewayError, match="role must be one of"):
            ROLE_SCALAR.parse_value(bad)
    with pytest.raises(GatewayError):
        ROLE_SCALAR.parse_literal(IntValueNode(value="3"))


def test_the_gateway_knows_the_wallet_s_currencies() -> None:
    from gpudeck.gateway import money
    from gpudeck.wallet import money as wallet_money

    assert money.CURRENCIES == wallet_money.CURRENCIES


def test_a_change_is_measured_against_the_size_of_the_period_before() -> None:
    from gpudeck.gateway.types.billing import percent_change

    assert percent_change(150, 100) == 50.0
    assert percent_change(50, 100) == -50.0
    assert percent_change(72_468_705, -699_565) == 10459.11  # from a refunded month: still up
    assert percent_change(1, 3) == -66.67
    assert percent_change(5, 0) is None


def test_a_long_takes_whole_numbers_of_64_bits_only() -> None:
    assert parse_long(2**63 - 1) == 2**63 - 1
    assert parse_long(-(2**63)) == -(2**63)
    for bad in (2**63, "5", 5.0, True):
        with pytest.raises(GatewayError):
            parse_long(bad)


class SlowWallet(Authenticator):
    """An Authenticator whose wallet answers when told to (the wallet is not what is tested)."""

    def __init__(self) -> None:
        super().__init__(backends=None)  # type: ignore[arg-type]
        self.asked = 0
        self.answer = asyncio.Event()

    async def _ask(self, token: str) -> Any:
        self.asked += 1
        await self.answer.wait()
        identity = Identity("tok-1", "org-1", "owner", "user-1", "a@b.c", ())
        return _Entry(self.clock() + 60, identity=identity)


async def test_a_lookup_under_way_when_its_token_is_forgotten_is_not_kept() -> None:
    """A revocation here ends the token's use at once: a lookup begun before it read the token
    still valid, and its answer was cached for the next seconds."""
    auth = SlowWallet()
    before = asyncio.create_task(auth.authenticate("secret"))
    await asyncio.sleep(0.01)
    assert auth.asked == 1
    auth.forget("tok-1")  # revoked while the lookup is under way
    after = asyncio.create_task(auth.authenticate("secret"))
    await asyncio.sleep(0.01)
    assert auth.asked == 2  # the call after it asked again, not joined the stale lookup
    auth.answer.set()
    await before
    await after
    await auth.authenticate("secret")
    assert auth.asked == 2  # the second lookup's answer (begun after) is kept
    auth.forget("tok-1")
    await auth.authenticate("secret")
    assert auth.asked == 3
