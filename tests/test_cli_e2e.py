"""`gpudeck up` end to end: the whole stack starts, answers through the gateway, and stops
leaving no process behind — on the test servers and on embedded ones."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

import psutil
import pytest

from gpudeck.cli.embedded import free_port
from gpudeck.kit.config import EventsConfig

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "gpudeck.cli.main"]
SERVICES = ("wallet", "compute", "storage", "activity", "node-agent")
READY_LINE = "Press Ctrl-C to stop."


def clean_env(**settings: str) -> dict[str, str]:
    """This process's environment without any GPUDECK_ setting, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUDECK_")}
    env.update(settings)
    return env


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(processes: list[psutil.Process], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while left := [p for p in processes if alive(p)]:
        if time.monotonic() > deadline:
            pytest.fail(f"still running: {[(p.pid, p.cmdline()) for p in left]}")
        time.sleep(0.1)


class Launcher:
    """`gpudeck up` in a subprocess on free ports; stdout read by a thread, stderr in a file."""

    def __init__(self, folder: Path, env: dict[str, str], *args: str) -> None:
        self.gateway = f"127.0.0.1:{free_port()}"
        flags = ["--data-dir", str(folder / "data"), "--gateway-listen", self.gateway]
        for name in SERVICES:
            flags += [f"--{name}-listen", f"127.0.0.1:{free_port()}"]
            flags += [f"--{name}-metrics-listen", f"127.0.0.1:{free_port()}"]
        self.log_path = folder / "up.log"
        self._log: IO[str] = self.log_path.open("w")
        self.process = subprocess.Popen(
            [*CLI, "up", *flags, *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self.output: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)

    def log_tail(self) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-30:])

    def wait_up(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not any(READY_LINE in line for line in self.output):
            if self.process.poll() is not None:
                pytest.fail(f"gpudeck up exited {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"gpudeck up not ready in {timeout}s:\n{self.log_tail()}")
            time.sleep(0.1)

    def tree(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)

    def child(self, module: str) -> psutil.Process:
        return next(p for p in self.tree() if module in p.cmdline())

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float = 60) -> int:
        code = self.process.wait(timeout)
        self._reader.join(5)
        assert self.process.stdout is not None
        self.process.stdout.close()
        self._log.close()
        return code

    def graphql(self, query: str, token: str = "") -> Any:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(
            f"http://{self.gateway}/graphql",
            data=json.dumps({"query": query}).encode(),
            headers=headers,
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def http_status(self, path: str) -> int:
        return self.http_get(path)[0]

    def http_get(self, path: str) -> tuple[int, str]:
        with urllib.request.urlopen(f"http://{self.gateway}{path}", timeout=10) as response:
            return int(response.status), response.read().decode()


@pytest.fixture
def external_env(database_url: str, events_config: EventsConfig) -> dict[str, str]:
    return clean_env(
        GPUDECK_DATABASE_URL=database_url,
        GPUDECK_NATS_URL=events_config.nats_url,
        GPUDECK_EVENTS_STREAM=events_config.stream,
        GPUDECK_EVENTS_PREFIX=events_config.subject_prefix,
    )


def assert_all_serving(launcher: Launcher) -> None:
    assert launcher.http_status("/healthz") == 200
    reply = launcher.graphql("{ health { service status } }")
    assert "errors" not in reply, reply
    statuses = {h["service"]: h["status"] for h in reply["data"]["health"]}
    assert statuses == dict.fromkeys(SERVICES, "SERVING")


def test_up_serves_every_service_and_stops_without_leftovers(
    tmp_path: Path, external_env: dict[str, str]
) -> None:
    launcher = Launcher(tmp_path, external_env)
    try:
        launcher.wait_up()
        assert_all_serving(launcher)
        status, metrics = launcher.http_get("/metrics")
        assert status == 200
        assert "gpudeck_graphql_websockets" in metrics
        # The gateway has no outbox and consumes no stream: none of their series show there.
        assert "gpudeck_outbox" not in metrics
        assert "gpudeck_events_handled_total" not in metrics
        children = launcher.tree()
        assert len(children) == 6  # five services and the gateway, nothing embedded
    finally:
        code = launcher.stop()
    assert code == 0, launcher.log_tail()
    wait_gone(children, timeout=5)
    banner = "".join(launcher.output)
    assert f"http://{launcher.gateway}/graphql" in banner


def test_up_with_embedded_servers_keeps_data_and_stops_them(tmp_path: Path) -> None:
    env = clean_env(GPUDECK_NATS_PORT=str(free_port()))
    launcher = Launcher(tmp_path, env, "--demo")
    try:
        launcher.wait_up()
        assert_all_serving(launcher)
        children = launcher.tree()
        assert any("nats-server" in " ".join(p.cmdline()) for p in children)
        postmaster_pid = (tmp_path / "data" / "postgres" / "postmaster.pid").read_text().split()[0]
        postmaster = psutil.Process(int(postmaster_pid))
        assert alive(postmaster)
    finally:
        code = launcher.stop()
    assert code == 0, launcher.log_tail()
    wait_gone([*children, postmaster], timeout=5)
    data = tmp_path / "data"
    assert (data / "postgres" / "PG_VERSION").exists()
    assert (data / "nats" / "jetstream").is_dir()
    assert (data / "service-token").stat().st_mode & 0o077 == 0
    assert (data / "bootstrap-token").read_text().strip() in "".join(launcher.output)


def test_a_dying_service_stops_the_whole_stack(
    tmp_path: Path, external_env: dict[str, str]
) -> None:
    launcher = Launcher(tmp_path, external_env)
    try:
        launcher.wait_up()
        children = launcher.tree()
        launcher.child("gpudeck.storage").kill()
        code = launcher.wait(timeout=60)
    finally:
        launcher.stop()
    assert code == 1
    assert "storage was killed by SIGKILL" in launcher.log_path.read_text()
    wait_gone(children, timeout=5)


def test_a_killed_launcher_leaves_no_children(tmp_path: Path, external_env: dict[str, str]) -> None:
    launcher = Launcher(tmp_path, external_env)
    try:
        launcher.wait_up()
        children = launcher.tree()
    finally:
        launcher.stop(signal.SIGKILL)
    wait_gone(children, timeout=30)


def test_serve_runs_one_service_in_the_foreground(
    tmp_path: Path, external_env: dict[str, str]
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    env = {
        **external_env,
        "GPUDECK_SERVICE_TOKEN": "serve-test",
        "GPUDECK_COMPUTE_LISTEN": listen,
        "GPUDECK_COMPUTE_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
    }
    with (tmp_path / "serve.log").open("w") as log:
        process = subprocess.Popen([*CLI, "serve", "compute"], env=env, stderr=log)
        try:
            assert psutil.Process(process.pid).children() == []  # in-process, no child
            wait_serving(listen, process)
        finally:
            process.send_signal(signal.SIGTERM)
            code = process.wait(30)
    assert code == 0, (tmp_path / "serve.log").read_text()


def wait_serving(address: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            assert process.poll() is None, "gpudeck serve exited"
            assert time.monotonic() < deadline, f"{address} not SERVING in {timeout}s"
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                time.sleep(0.2)


README = Path(__file__).resolve().parent.parent / "README.md"


def readme_examples() -> list[str]:
    """The shell commands of README's "Try it" (its indented blocks up to the next paragraph
    about the bootstrap token), as a newcomer would paste them."""
    text = README.read_text().split("Try it:", 1)[1].split("`GPUDECK_BOOTSTRAP_TOKEN=<value>`")[0]
    blocks, current = [], []
    for line in text.splitlines():
        if line.startswith("    "):
            current.append(line[4:])
        elif current and line.strip():
            blocks.append("\n".join(current))
            current = []
    if current:
        blocks.append("\n".join(current))
    # From each block its curl command (the first one also starts the stack, done here).
    return [b[b.index("curl") :] for b in blocks if "curl" in b]


def test_the_readme_examples_work_as_written(
    tmp_path: Path, pg_server_url: str, run_id: str, events_config: EventsConfig
) -> None:
    """README's "Try it" top-up was sent with raw newlines inside its JSON: the gateway
    answered "Unable to parse request body as JSON" to a newcomer's first mutation."""
    import psycopg

    name = f"gpudeck_readme_{run_id}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    database = pg_server_url.rsplit("/", 1)[0] + f"/{name}"
    env = clean_env(
        GPUDECK_DATABASE_URL=database,
        GPUDECK_NATS_URL=events_config.nats_url,
        GPUDECK_EVENTS_STREAM=f"README_{run_id}",
        GPUDECK_EVENTS_PREFIX=f"readme{run_id}",
        GPUDECK_BOOTSTRAP_TOKEN="demo-secret",
    )
    launcher = Launcher(tmp_path, env, "--demo")
    try:
        launcher.wait_up()
        viewer_example, top_up_example = readme_examples()

        def run(example: str) -> Any:
            command = example.replace("localhost:8080", launcher.gateway)
            done = subprocess.run(
                ["bash", "-c", command], capture_output=True, text=True, timeout=30
            )
            assert done.returncode == 0, done.stderr
            return json.loads(done.stdout)

        viewer = run(viewer_example)
        assert "errors" not in viewer, viewer
        [org] = viewer["data"]["viewer"]["organizations"]
        assert org["role"] == "owner"
        first = run(top_up_example.replace("<id from viewer>", org["id"]))
        assert "errors" not in first, first
        wallet = first["data"]["topUpWallet"]["wallet"]
        assert wallet["balance"]["currency"] == "USD"
        again = run(top_up_example.replace("<id from viewer>", org["id"]))
        assert again == first  # a retry with the same key: the first answer
        assert any("Bearer demo-secret" in line for line in launcher.output)
        # Revoked, as the README says to when done: the next start says it does not work (its
        # banner printed it as the owner's working token).
        me = launcher.graphql("{ viewer { tokenId } }", "demo-secret")["data"]["viewer"]
        revoked = launcher.graphql(
            f'mutation {{ revokeApiToken(id: "{me["tokenId"]}") {{ id }} }}', "demo-secret"
        )
        assert "errors" not in revoked, revoked
        assert launcher.stop() == 0, launcher.log_tail()
        (tmp_path / "again").mkdir()
        launcher = Launcher(tmp_path / "again", env, "--demo")
        launcher.wait_up()
        banner = "".join(launcher.output)
        assert "GPUDECK_BOOTSTRAP_TOKEN does not work" in banner
        assert "Bearer demo-secret" not in banner
    finally:
        code = launcher.stop()
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        asyncio.run(delete_stream(events_config.nats_url, env["GPUDECK_EVENTS_STREAM"]))
    assert code == 0, launcher.log_tail()


async def delete_stream(nats_url: str, stream: str) -> None:
    import nats

    nc = await nats.connect(nats_url, connect_timeout=2, max_reconnect_attempts=0)
    try:
        await nc.jetstream().delete_stream(stream)
    finally:
        await nc.close()
