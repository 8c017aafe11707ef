"""The `gpudeck` command without servers: how `up` lays out the stack, and bad input failing
fast with one line naming the setting and exit code 2."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from gpudeck.cli.embedded import free_port
from gpudeck.cli.procs import as_json_line
from gpudeck.cli.stack import (
    DEFAULT_NATS_PORT,
    UsageError,
    embedded_nats_port,
    kept_secret,
    resolve,
)
from gpudeck.kit.config import EventsConfig

CLI = [sys.executable, "-m", "gpudeck.cli.main"]


def clean_env(**settings: str) -> dict[str, str]:
    """This process's environment without any GPUDECK_ setting, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUDECK_")}
    env.update(settings)
    return env


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0]


def free_listen_flags() -> list[str]:
    flags = []
    for name in ("wallet", "compute", "storage", "activity", "node-agent"):
        flags += [f"--{name}-listen", f"127.0.0.1:{free_port()}"]
        flags += [f"--{name}-metrics-listen", f"127.0.0.1:{free_port()}"]
    return flags


# --- the layout ----------------------------------------------------------------------------


def test_flag_beats_environment_beats_default() -> None:
    stack = resolve(
        {"GPUDECK_WALLET_LISTEN": "127.0.0.1:6001"},
        {"GPUDECK_WALLET_LISTEN": "127.0.0.1:7001", "GPUDECK_COMPUTE_LISTEN": "127.0.0.1:7002"},
    )
    settings = stack.child_settings()
    assert settings["GPUDECK_WALLET_LISTEN"] == "127.0.0.1:6001"
    assert settings["GPUDECK_WALLET_ADDR"] == "127.0.0.1:6001"
    assert settings["GPUDECK_COMPUTE_LISTEN"] == "127.0.0.1:7002"
    assert settings["GPUDECK_STORAGE_LISTEN"] == "127.0.0.1:50053"
    assert settings["GPUDECK_NODE_AGENT_METRICS_LISTEN"] == "127.0.0.1:9105"
    assert settings["GPUDECK_GATEWAY_LISTEN"] == "127.0.0.1:8080"


def test_a_child_gets_both_of_its_shutdown_phases_before_it_is_killed() -> None:
    """A service drains its calls for up to the grace, then stops its workers, pool and NATS
    for up to the grace again: the launcher killed it after grace + 5 s, mid-shutdown. With a
    silent database it also waits, bounded, for a cancelled worker, the relay and the pool
    (killed at 2 × grace + 5 s)."""
    from gpudeck.kit.events.relay import STOP_WAIT
    from gpudeck.kit.runtime import CANCEL_WAIT

    for grace in (10, 4):
        stack = resolve({}, {"GPUDECK_SHUTDOWN_GRACE": str(grace)})
        assert stack.grace > 2 * grace + 2 * CANCEL_WAIT + STOP_WAIT


def test_any_free_port_is_chosen_before_start() -> None:
    stack = resolve({"GPUDECK_GATEWAY_LISTEN": "127.0.0.1:0"}, {})
    host, port = stack.child_settings()["GPUDECK_GATEWAY_LISTEN"].split(":")
    assert host == "127.0.0.1" and int(port) > 0


def test_wildcard_host_is_called_on_loopback() -> None:
    stack = resolve({}, {}, host="0.0.0.0")
    settings = stack.child_settings()
    assert settings["GPUDECK_STORAGE_LISTEN"] == "0.0.0.0:50053"
    assert settings["GPUDECK_STORAGE_ADDR"] == "127.0.0.1:50053"


def test_two_parts_on_one_port_are_refused() -> None:
    with pytest.raises(UsageError, match=re.escape("--compute-listen=127.0.0.1:50051")):
        resolve({"GPUDECK_COMPUTE_LISTEN": "127.0.0.1:50051"}, {})


def test_the_embedded_nats_keeps_off_the_stacks_own_ports() -> None:
    """Free when looked at, its default port went to NATS before the gateway bound it: the
    gateway's start failed, blamed on the gateway's setting."""
    on_default = {"GPUDECK_GATEWAY_LISTEN": f"127.0.0.1:{DEFAULT_NATS_PORT}"}
    stack = resolve(on_default, {})
    assert embedded_nats_port(stack) not in {listen.port for listen in stack.listens()}
    asked = {"GPUDECK_NATS_PORT": str(DEFAULT_NATS_PORT)}
    with pytest.raises(UsageError, match="GPUDECK_NATS_PORT=4250 is the same address as --gat"):
        resolve(on_default, asked)
    with pytest.raises(UsageError, match="is the same address as --gateway-listen=localhost"):
        resolve({"GPUDECK_GATEWAY_LISTEN": f"localhost:{DEFAULT_NATS_PORT}"}, asked)
    assert embedded_nats_port(resolve({}, asked)) == DEFAULT_NATS_PORT  # asked for: kept


def test_service_token_is_made_once_private_and_reused(tmp_path: Path) -> None:
    first = kept_secret({}, "GPUDECK_SERVICE_TOKEN", tmp_path, "service-token")
    assert len(first) >= 32
    assert stat.S_IMODE((tmp_path / "service-token").stat().st_mode) == 0o600
    assert kept_secret({}, "GPUDECK_SERVICE_TOKEN", tmp_path, "service-token") == first


def test_service_token_from_environment_wins(tmp_path: Path) -> None:
    env = {"GPUDECK_SERVICE_TOKEN": "given"}
    assert kept_secret(env, "GPUDECK_SERVICE_TOKEN", tmp_path, "service-token") == "given"
    assert not (tmp_path / "service-token").exists()


def test_child_dies_when_its_starter_is_killed() -> None:
    starter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            "from gpudeck.cli.procs import die_with_parent\n"
            "child = subprocess.Popen(['sleep', '300'], preexec_fn=die_with_parent())\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(300)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert starter.stdout is not None
    child = psutil.Process(int(starter.stdout.readline()))
    starter.send_signal(signal.SIGKILL)
    starter.wait()
    starter.stdout.close()
    deadline = time.monotonic() + 10
    while alive(child):
        assert time.monotonic() < deadline, "the child outlived its starter"
        time.sleep(0.05)


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_child_output_is_forwarded_as_json_lines() -> None:
    own = b'{"level": "info", "service": "wallet", "message": "serving"}\n'
    assert as_json_line("wallet", "stderr", own) == own
    wrapped = json.loads(as_json_line("wallet", "stderr", b'  File "x.py", line 1\n'))
    assert wrapped["service"] == "wallet"
    assert wrapped["message"] == '  File "x.py", line 1'
    assert wrapped["level"] == "error"


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "mysql://nowhere",
        "postgresql://[::1/db",  # an unclosed bracket
        "postgresql://%zz@127.0.0.1/db",  # libpq refuses the encoding (it used to retry for 10 s)
        "postgresql://127.0.0.1/db?nope=1",
        "postgresql://",  # names no database: libpq would pick one by the user's name
    ],
)
def test_malformed_database_url_is_named(tmp_path: Path, url: str) -> None:
    env = clean_env(GPUDECK_DATABASE_URL=url, GPUDECK_NATS_URL="nats://x:4222")
    result = run_cli("up", "--data-dir", str(tmp_path), env=env)
    assert_one_line_error(result, "GPUDECK_DATABASE_URL")
    # The books' check reads the same setting the same way.
    audit = subprocess.run(
        [sys.executable, "-m", "gpudeck.wallet.audit"], env=env, capture_output=True, text=True
    )
    assert audit.returncode == 2 and len(audit.stderr.splitlines()) == 1, audit.stderr
    assert "GPUDECK_DATABASE_URL" in audit.stderr


def test_malformed_nats_url_is_named(tmp_path: Path) -> None:
    env = clean_env(GPUDECK_DATABASE_URL="postgresql:///db", GPUDECK_NATS_URL="nats://[::1:4222")
    result = run_cli("up", "--data-dir", str(tmp_path), env=env)
    assert_one_line_error(result, "GPUDECK_NATS_URL")


def test_unreachable_database_is_named(tmp_path: Path, nats_url: str) -> None:
    env = clean_env(
        GPUDECK_DATABASE_URL="postgresql://postgres@127.0.0.1:1/gpudeck", GPUDECK_NATS_URL=nats_url
    )
    gateway = f"127.0.0.1:{free_port()}"
    result = run_cli(
        "up",
        "--data-dir",
        str(tmp_path),
        "--gateway-listen",
        gateway,
        *free_listen_flags(),
        env=env,
    )
    assert_one_line_error(result, "GPUDECK_DATABASE_URL", "cannot connect")


def test_unreachable_nats_is_named(tmp_path: Path, database_url: str) -> None:
    env = clean_env(GPUDECK_DATABASE_URL=database_url, GPUDECK_NATS_URL="nats://127.0.0.1:1")
    gateway = f"127.0.0.1:{free_port()}"
    result = run_cli(
        "up",
        "--data-dir",
        str(tmp_path),
        "--gateway-listen",
        gateway,
        *free_listen_flags(),
        env=env,
    )
    assert_one_line_error(result, "GPUDECK_NATS_URL", "cannot connect")


def test_gateway_port_in_use_is_named(tmp_path: Path, database_url: str, nats_url: str) -> None:
    env = clean_env(GPUDECK_DATABASE_URL=database_url, GPUDECK_NATS_URL=nats_url)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            "up",
            "--data-dir",
            str(tmp_path),
            "--gateway-listen",
            f"127.0.0.1:{port}",
            *free_listen_flags(),
            env=env,
        )
    assert_one_line_error(result, "--gateway-listen", str(port), "in use")


def test_malformed_listen_address_is_named(tmp_path: Path) -> None:
    result = run_cli(
        "up", "--data-dir", str(tmp_path), "--wallet-listen", "wallet", env=clean_env()
    )
    assert_one_line_error(result, "--wallet-listen")


def test_serve_without_service_token_is_refused() -> None:
    result = run_cli("serve", "compute", env=clean_env())
    assert_one_line_error(result, "GPUDECK_SERVICE_TOKEN")


def test_serve_unknown_service_lists_the_choices() -> None:
    result = run_cli("serve", "billing", env=clean_env(GPUDECK_SERVICE_TOKEN="t"))
    assert_one_line_error(result, "billing", "wallet", "node-agent", "gateway")


def test_data_folder_in_use_is_refused(tmp_path: Path) -> None:
    (tmp_path / "gpudeck.lock").write_text("4242\n")
    with (tmp_path / "gpudeck.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        result = run_cli(
            "up", "--data-dir", str(tmp_path), "--gateway-listen", "127.0.0.1:0",
            *free_listen_flags(), env=clean_env(),
        )  # fmt: skip
    assert_one_line_error(result, str(tmp_path), "in use", "4242")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GPUDECK_BILLING_INTERVAL", "nan"),
        ("GPUDECK_KYC_TOPUP_LIMIT", "inf"),
        ("GPUDECK_KYC_TOPUP_LIMIT", "USD:500,EUR:400"),
        ("GPUDECK_DB_POOL_SIZE", "nan"),
        ("GPUDECK_DB_POOL_SIZE", "1e9"),
        ("GPUDECK_AUTO_TOPUP_TIMEOUT", "nan"),
        ("GPUDECK_SHUTDOWN_GRACE", "-inf"),
        ("GPUDECK_DEPLETION_SECONDS", "1e400"),
        ("GPUDECK_KYC_TOPUP_LIMIT", "1e999999"),  # was a traceback: the decimal context overflowed
        ("GPUDECK_AUTO_TOPUP_TIMEOUT", "1e12"),  # past what a database interval holds
        ("GPUDECK_WALLET_LISTEN", "127.0.0.1:²"),  # a digit to str.isdigit, not to int()
        ("GPUDECK_WALLET_METRICS_LISTEN", "127.0.0.1:٣"),
    ],
)
def test_numbers_that_are_not_finite_or_sane_are_named(name: str, value: str) -> None:
    env = clean_env(GPUDECK_SERVICE_TOKEN="t" * 24, **{name: value})
    env["GPUDECK_DATABASE_URL"] = "postgresql://postgres@127.0.0.1:5432/postgres"
    env["GPUDECK_NATS_URL"] = "nats://127.0.0.1:4222"
    result = run_cli("serve", "wallet", env=env)
    assert_one_line_error(result, name)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GPUDECK_BILLING_INTERVAL", "abc"),
        ("GPUDECK_INVOICE_FONT", "/nonexistent/font.ttf"),
        ("GPUDECK_ADMIN_TOKEN", "short"),
        ("GPUDECK_DB_POOL_SIZE", "nan"),
        ("GPUDECK_DEMO", "maybe"),
        ("GPUDECK_BOOTSTRAP_TOKEN", "secret"),  # without --demo: no demo organization to own
        ("GPUDECK_KYC_TOPUP_LIMIT", "USD:0.0000001"),
        ("GPUDECK_GATEWAY_HEALTH_TIMEOUT", "1e12"),  # a gRPC deadline that overflows
        ("GPUDECK_SERVICE_TOKEN", "a\tb"),  # the stack came up, and every call failed
        ("GPUDECK_SERVICE_TOKEN", "tök"),  # no gRPC metadata carries it
        ("GPUDECK_ADMIN_TOKEN", "ö" * 24),
    ],
)
def test_up_names_a_bad_service_setting_before_starting_anything(
    tmp_path: Path, name: str, value: str
) -> None:
    result = run_cli("up", "--data-dir", str(tmp_path), env=clean_env(**{name: value}))
    assert_one_line_error(result, name)
    assert not any(tmp_path.iterdir())  # no database, no NATS: nothing was started


def test_a_font_file_that_is_not_a_font_is_named(tmp_path: Path) -> None:
    """Named at start (one line, exit 2): every invoice PDF would fail with it."""
    font = tmp_path / "bad.ttf"
    font.write_bytes(bytes(range(256)) * 8)
    env = clean_env(GPUDECK_SERVICE_TOKEN="t" * 24, GPUDECK_INVOICE_FONT=str(font))
    env["GPUDECK_DATABASE_URL"] = "postgresql://postgres@127.0.0.1:5432/postgres"
    env["GPUDECK_NATS_URL"] = "nats://127.0.0.1:4222"
    result = run_cli("serve", "wallet", env=env)
    assert_one_line_error(result, "GPUDECK_INVOICE_FONT", "bad.ttf")


def test_a_nats_port_in_other_digits_is_named(tmp_path: Path) -> None:
    result = run_cli("up", "--data-dir", str(tmp_path), env=clean_env(GPUDECK_NATS_PORT="²"))
    assert_one_line_error(result, "GPUDECK_NATS_PORT")


@pytest.mark.parametrize("value", ["nan", "-1", "0", "inf", "soon"])
def test_a_startup_timeout_that_is_no_time_is_named(tmp_path: Path, value: str) -> None:
    """It started the embedded servers, then gave up "after nans" with exit code 1."""
    result = run_cli("up", "--data-dir", str(tmp_path), "--startup-timeout", value, env=clean_env())
    assert_one_line_error(result, "--startup-timeout")
    assert not any(tmp_path.iterdir())


def test_a_nats_url_naming_several_servers_is_checked_as_the_services_use_it(
    nats_url: str,
) -> None:
    """deploy/README documents "nats://a:4222,nats://b:4222"; `up` passed it whole to
    nats.connect and refused it (exit 2) though every service connects with it."""
    import asyncio

    from gpudeck.cli.up import check_nats

    asyncio.run(check_nats(f"{nats_url}, {nats_url}"))
    with pytest.raises(UsageError, match="cannot connect"):
        asyncio.run(check_nats("nats://127.0.0.1:1,nats://127.0.0.1:2"))


def test_a_service_port_in_use_is_one_line_naming_it(
    database_url: str, events_config: EventsConfig
) -> None:
    """gRPC's C core printed its own raw line ("E1207 … add_port.cc … Failed to add port")
    before ours, after the service had connected to its database and NATS."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = clean_env(
            GPUDECK_SERVICE_TOKEN="t" * 24,
            GPUDECK_DATABASE_URL=database_url,
            GPUDECK_NATS_URL=events_config.nats_url,
            GPUDECK_EVENTS_STREAM=events_config.stream,
            GPUDECK_EVENTS_PREFIX=events_config.subject_prefix,
            GPUDECK_COMPUTE_LISTEN=f"127.0.0.1:{port}",
            GPUDECK_COMPUTE_METRICS_LISTEN=f"127.0.0.1:{free_port()}",
        )
        result = run_cli("serve", "compute", env=env)
    assert result.returncode == 2, result.stderr
    # One plain line (the service's own JSON log lines aside, e.g. its "stopped").
    lines = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"GPUDECK_COMPUTE_LISTEN=127.0.0.1:{port}" in lines[0] and "in use" in lines[0]
    assert "migrations applied" not in result.stderr  # refused before it connected anywhere


def test_a_stop_while_up_checks_its_servers_is_a_stop(tmp_path: Path, nats_url: str) -> None:
    """SIGTERM while `up` waited on a database that does not answer exited 130 (as a Ctrl-C),
    and earlier 143: a failure to whoever asked it to stop (systemd, say)."""
    with socket.socket() as silent:  # takes connections (the kernel does), answers nothing
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        env = clean_env(
            GPUDECK_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{silent.getsockname()[1]}/x",
            GPUDECK_NATS_URL=nats_url,
        )
        flags = ["--gateway-listen", f"127.0.0.1:{free_port()}", *free_listen_flags()]
        process = subprocess.Popen(
            [*CLI, "up", "--data-dir", str(tmp_path), *flags],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.5)  # in its check of the database (5 s to connect)
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
