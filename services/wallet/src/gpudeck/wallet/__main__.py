"""Start the wallet service: config → pool → migrations → server (see gpudeck.kit.runtime)."""

from gpudeck.wallet.service import SPEC
from gpudeck.kit.runtime import run

if __name__ == "__main__":
    run(SPEC)
