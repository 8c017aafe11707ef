"""What the storage service serves; its domain APIs arrive with their own issues."""

from gpudeck.kit.runtime import ServiceSpec

SPEC = ServiceSpec(name="storage", migrations=None)
