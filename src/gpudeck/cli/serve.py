"""`gpudeck serve <service>`: one service (or the gateway) alone in the foreground, in this
process — what a container runs. Its settings come from the environment, as under `gpudeck up`.
"""

from __future__ import annotations

import runpy
import sys
from collections.abc import Mapping

from gpudeck.cli.stack import UsageError, module_of


def serve(component: str, env: Mapping[str, str]) -> None:
    """Run `gpudeck.<component>` as `__main__`; it returns (or raises SystemExit) when stopped."""
    if not env.get("GPUDECK_SERVICE_TOKEN", "").strip():
        raise UsageError(
            "GPUDECK_SERVICE_TOKEN is not set: give every service and the gateway the same "
            "internal token"
        )
    module = module_of(component)
    sys.argv = [f"gpudeck serve {component}"]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
