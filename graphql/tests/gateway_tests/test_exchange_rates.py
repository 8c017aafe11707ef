"""Exchange rates in GraphQL: the platform admin (GPUDECK_ADMIN_TOKEN) sets them, everyone reads
them, organizations' tokens may not set them, and the admin sees no organization."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest

from gpudeck.gateway.config import Settings
from gpudeck.kit.config import ConfigError

from .conftest import ADMIN_TOKEN

SET = """mutation($rate: String!, $source: String!) {
  setExchangeRate(base: "usd", quote: "INR", rate: $rate, asOf: "2001-02-03T04:05:06Z",
                  source: $source) { id base quote rate asOf source } }"""
LIST = """query { exchangeRates(base: "USD", quote: "INR", first: 500) { id rate source asOf } }"""


@pytest.fixture
async def source(database_url: str) -> AsyncIterator[str]:
    """A source name of this test's own; its rates are removed after (the table is shared, and
    these are dated long ago so no other test converts with them meanwhile)."""
    name = f"test-{uuid.uuid4().hex[:8]}"
    yield name
    with psycopg.connect(database_url) as conn:
        conn.execute("DELETE FROM wallet.exchange_rates WHERE source = %s", (name,))


async def test_the_admin_sets_a_rate_and_everyone_reads_it(gql, new_org, source: str) -> None:
    stored = (await gql.data(SET, {"rate": "82.5", "source": source}, token=ADMIN_TOKEN))[
        "setExchangeRate"
    ]
    assert (stored["base"], stored["quote"], stored["rate"], stored["source"]) == (
        "USD",
        "INR",
        "82.5",
        source,
    )
    assert stored["asOf"].startswith("2001-02-03T04:05:06")
    org = await new_org()
    listed = (await gql.data(LIST, token=org.token))["exchangeRates"]
    assert {"id": stored["id"], "rate": "82.5", "source": source, "asOf": stored["asOf"]} in listed


async def test_an_organization_token_may_not_set_a_rate(gql, new_org, source: str) -> None:
    org = await new_org()
    error = await gql.error(SET, {"rate": "82.5", "source": source}, token=org.token)
    assert error["extensions"]["code"] == "FORBIDDEN"
    listed = (await gql.data(LIST, token=org.token))["exchangeRates"]
    assert all(r["source"] != source for r in listed)


async def test_a_bad_rate_is_bad_user_input_naming_it(gql, source: str) -> None:
    error = await gql.error(SET, {"rate": "-3", "source": source}, token=ADMIN_TOKEN)
    assert error["extensions"]["code"] == "BAD_USER_INPUT"
    assert "rate" in error["message"]


async def test_the_admin_sees_no_organization(gql, new_org) -> None:
    org = await new_org()
    error = await gql.error(
        "query($id: ID!) { organization(id: $id) { name } }", {"id": org.id}, token=ADMIN_TOKEN
    )
    assert error["extensions"]["code"] == "NOT_FOUND"
    viewer = (await gql.data("{ viewer { organizations { id } } }", token=ADMIN_TOKEN))["viewer"]
    assert viewer["organizations"] == []


def test_a_short_admin_token_is_a_config_error() -> None:
    env = {"GPUDECK_SERVICE_TOKEN": "x", "GPUDECK_ADMIN_TOKEN": "short"}
    with pytest.raises(ConfigError, match="GPUDECK_ADMIN_TOKEN"):
        Settings.from_env(env)
    assert Settings.from_env({**env, "GPUDECK_ADMIN_TOKEN": "a" * 24}).admin_token == "a" * 24
