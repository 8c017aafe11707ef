"""Start-up failures a person can fix: one line on stderr naming the setting, exit code 2.

Light on purpose (no database or events imports), so every entry point can use it.
"""

from __future__ import annotations

import sys
from typing import NoReturn

EXIT_CONFIG = 2


class StartupError(Exception):
    """A start-up failure a person can fix; the message is one line naming the setting."""


def fail(message: str) -> NoReturn:
    print(f"gpudeck: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_CONFIG)
