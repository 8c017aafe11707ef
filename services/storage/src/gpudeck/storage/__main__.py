"""Start the storage service: config → pool → migrations → server (see gpudeck.kit.runtime)."""

from gpudeck.kit.runtime import run
from gpudeck.storage.service import SPEC

if __name__ == "__main__":
    run(SPEC)
