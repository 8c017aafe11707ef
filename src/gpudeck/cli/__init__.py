"""The `gpudeck` command: start the whole stack (`up`) or one service (`serve`)."""
