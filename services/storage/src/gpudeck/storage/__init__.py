"""gpudeck storage service."""
