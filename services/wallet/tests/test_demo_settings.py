"""GPUDECK_DEMO and GPUDECK_BOOTSTRAP_TOKEN: the demo organization is seeded only when asked for,
and its owner token is never registered without it."""

from __future__ import annotations

import pytest

from gpudeck.kit.config import ConfigError
from gpudeck.wallet.settings import WalletSettings


def test_the_demo_is_seeded_only_when_asked_for() -> None:
    assert not WalletSettings.from_env({}).demo
    for on in ("1", "true", "YES"):
        assert WalletSettings.from_env({"GPUDECK_DEMO": on}).demo
    for off in ("0", "false", "no", ""):
        assert not WalletSettings.from_env({"GPUDECK_DEMO": off}).demo
    demo = WalletSettings.from_env({"GPUDECK_DEMO": "1", "GPUDECK_BOOTSTRAP_TOKEN": " tok "})
    assert (demo.demo, demo.bootstrap_token) == (True, "tok")


def test_a_bootstrap_token_without_the_demo_is_a_configuration_error() -> None:
    """It seeded the KYC-verified demo organization with that owner token on its own: a token
    left in a production Secret made an organization anyone knowing it could run."""
    with pytest.raises(ConfigError, match=r"GPUDECK_BOOTSTRAP_TOKEN .* GPUDECK_DEMO=1"):
        WalletSettings.from_env({"GPUDECK_BOOTSTRAP_TOKEN": "secret"})


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"GPUDECK_DEMO": "maybe"}, "GPUDECK_DEMO='maybe' is not 1, true, yes"),
        ({"GPUDECK_DEMO": "1", "GPUDECK_BOOTSTRAP_TOKEN": "x\x01y"}, "printable ASCII"),
        ({"GPUDECK_DEMO": "1", "GPUDECK_BOOTSTRAP_TOKEN": "a b"}, "without spaces"),
        # no header carries it: every call with it failed
        ({"GPUDECK_DEMO": "1", "GPUDECK_BOOTSTRAP_TOKEN": "tök"}, "printable ASCII"),
        ({"GPUDECK_DEMO": "1", "GPUDECK_BOOTSTRAP_TOKEN": "x" * 513}, "at most 512"),
    ],
)
def test_bad_demo_settings_name_the_variable(env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError) as err:
        WalletSettings.from_env(env)
    assert says in str(err.value)
