"""gpudeck node-agent service."""
