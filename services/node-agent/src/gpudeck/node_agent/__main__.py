"""Start the node-agent service: config → pool → migrations → server (see gpudeck.kit.runtime)."""

from gpudeck.node_agent.service import SPEC
from gpudeck.kit.runtime import run

if __name__ == "__main__":
    run(SPEC)
