"""Start the node-agent service: config → pool → migrations → server (see gpudeck.kit.runtime)."""

from gpudeck.kit.runtime import run
from gpudeck.node_agent.service import SPEC

if __name__ == "__main__":
    run(SPEC)
