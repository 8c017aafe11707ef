"""Start the activity service: config → pool → migrations → server (see gpudeck.kit.runtime)."""

from gpudeck.activity.service import SPEC
from gpudeck.kit.runtime import run

if __name__ == "__main__":
    run(SPEC)
