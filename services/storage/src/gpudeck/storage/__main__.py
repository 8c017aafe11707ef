"""Start the storage service: config → pool → migrations → server (see gpudeck.kit.runtime)."""

from gpudeck.storage.service import SPEC
from gpudeck.kit.runtime import run

if __name__ == "__main__":
    run(SPEC)
