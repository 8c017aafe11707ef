"""Benchmark: `gpudeck up` to all-healthy on an existing data folder, embedded PostgreSQL and NATS.

Goal: under 15 s. The folder is made by a first, untimed start; then each run times a restart
(from spawning the command to its "Press Ctrl-C to stop." line, printed once every service's gRPC
health is SERVING and the gateway's /healthz answers) and, as a baseline measured in the same run,
starting only the embedded PostgreSQL and NATS on the same folder. up / baseline shows what the
services themselves cost.

    .venv/bin/python bench/bench_up.py [--runs 3] [--data-dir DIR]    (or: python -m bench up)
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from gpudeck.cli.embedded import EmbeddedNats, EmbeddedPostgres, free_port

GOAL_SECONDS = 15.0
READY_LINE = "Press Ctrl-C to stop."
SERVICES = ("wallet", "compute", "storage", "activity", "node-agent")


def launcher_env(nats_port: int) -> dict[str, str]:
    """No GPUDECK_DATABASE_URL / GPUDECK_NATS_URL: the embedded servers are used."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUDECK_")}
    env["GPUDECK_NATS_PORT"] = str(nats_port)
    return env


def listen_flags() -> list[str]:
    flags = ["--gateway-listen", f"127.0.0.1:{free_port()}"]
    for name in SERVICES:
        flags += [f"--{name}-listen", f"127.0.0.1:{free_port()}"]
        flags += [f"--{name}-metrics-listen", f"127.0.0.1:{free_port()}"]
    return flags


def time_up(data_dir: Path, log: Path, timeout: float = 120.0) -> float:
    """Seconds from spawning `gpudeck up` until it reports all healthy; then stop it."""
    cmd = [sys.executable, "-m", "gpudeck.cli.main", "up", "--data-dir", str(data_dir)]
    with log.open("a") as err:
        started = time.perf_counter()
        process = subprocess.Popen(
            [*cmd, *listen_flags()],
            env=launcher_env(free_port()),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        ready = threading.Event()
        elapsed: list[float] = []

        def read() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                if READY_LINE in line and not ready.is_set():
                    elapsed.append(time.perf_counter() - started)
                    ready.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            deadline = time.monotonic() + timeout
            while not ready.wait(0.05):
                if process.poll() is not None or time.monotonic() > deadline:
                    err.flush()
                    tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
                    raise RuntimeError(
                        f"gpudeck up did not get healthy; the end of its log:\n{tail}"
                    )
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            reader.join(5)
            if process.stdout is not None:
                process.stdout.close()
    return elapsed[0]


def time_backing(data_dir: Path, timeout: float = 60.0) -> float:
    """Seconds from spawning a process that starts only the embedded PostgreSQL and NATS on
    `data_dir` until both answer (a fresh process each time, as `gpudeck up` is); then stop it."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, __file__, "--backing-only", str(data_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        line = process.stdout.readline()
        elapsed = time.perf_counter() - started
        if line.strip() != "ready":
            raise RuntimeError("the embedded servers did not start")
    finally:
        process.stdin.close()  # the signal to stop them
        process.wait(timeout)
        process.stdout.close()
    return elapsed


def backing_only(data_dir: Path) -> None:
    """Start the embedded PostgreSQL and NATS, say "ready", stop them when stdin closes."""
    postgres = EmbeddedPostgres(data_dir / "postgres")
    nats = EmbeddedNats(data_dir / "nats", port=free_port())
    try:
        postgres.start()
        nats.start(supervised=True)
        print("ready", flush=True)
        sys.stdin.read()
    finally:
        nats.stop()
        postgres.stop()


def main(argv: Sequence[str] = ()) -> int:
    """Run the benchmark; `argv` are its options (none when run by `python -m bench`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3, help="timed restarts (default 3)")
    parser.add_argument(
        "--data-dir", type=Path, help="data folder (default: a fresh temporary one)"
    )
    parser.add_argument("--backing-only", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(list(argv))
    if args.backing_only:
        backing_only(args.backing_only)
        return 0

    with tempfile.TemporaryDirectory(prefix="gpudeck-bench-") as tmp:
        data_dir = (args.data_dir or Path(tmp) / "data").resolve()
        log = Path(tmp) / "up.log"
        first = time_up(data_dir, log)  # makes the folder: initdb, migrations, JetStream store
        print(f"first start, fresh data folder (not the goal): {first:.2f} s", flush=True)
        ups, bases = [], []
        for run in range(1, args.runs + 1):
            ups.append(time_up(data_dir, log))
            bases.append(time_backing(data_dir))
            print(f"  run {run}: up {ups[-1]:.2f} s   baseline {bases[-1]:.2f} s", flush=True)

    up, base = statistics.median(ups), statistics.median(bases)
    verdict = "within" if up < GOAL_SECONDS else "OVER"
    print(f"gpudeck up, existing data folder, median of {args.runs}: {up:.2f} s")
    print(f"  ratio to the {GOAL_SECONDS:g} s goal: {up / GOAL_SECONDS:.2f} ({verdict} the goal)")
    print(f"  baseline, embedded PostgreSQL + NATS only: {base:.2f} s")
    print(f"  up / baseline: {up / base:.1f}x; the services and launcher add {up - base:.2f} s")
    return 0 if up < GOAL_SECONDS else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
