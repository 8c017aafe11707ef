"""Starting the wallet on a database it cannot use is a configuration error: one line naming
the setting, exit code 2 (it was a bare traceback and exit code 1)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from urllib.parse import urlsplit, urlunsplit

import psycopg
from processes import wallet_env

from gpudeck.kit.config import EventsConfig


def test_a_read_only_database_is_a_one_line_config_error(
    pg_server_url: str, events_config: EventsConfig
) -> None:
    name = f"gpudeck_readonly_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        conn.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    try:
        url = urlunsplit(urlsplit(pg_server_url)._replace(path=f"/{name}"))
        result = subprocess.run(
            [sys.executable, "-m", "gpudeck.wallet"],
            env=wallet_env(url, events_config),
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    assert result.returncode == 2, result.stderr
    # One plain line (the service's JSON log lines aside, e.g. its "stopped").
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("{")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "GPUDECK_DATABASE_URL" in lines[0] and "read-only" in lines[0], lines[0]
