"""The schema's domains, one module each; gpudeck.gateway.schema merges their root types."""
