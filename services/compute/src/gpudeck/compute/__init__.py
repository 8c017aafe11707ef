"""gpudeck compute service."""
