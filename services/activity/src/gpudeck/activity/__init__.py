"""gpudeck activity service."""
