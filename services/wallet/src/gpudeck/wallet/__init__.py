"""gpudeck wallet service."""
