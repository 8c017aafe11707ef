"""The `gpudeck` command line: `gpudeck up` runs the whole stack, `gpudeck serve` one part.

Bad input prints one line naming the flag or environment variable and exits with code 2.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import NoReturn

from gpudeck.cli.embedded import EmbeddedError
from gpudeck.cli.stack import (
    COMPONENTS,
    DEFAULT_DATA_DIR,
    StopRequested,
    UsageError,
    listen_settings,
)
from gpudeck.kit.config import ConfigError

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block), exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _seconds(text: str) -> float:
    """A positive, finite number of seconds (argparse names the flag when this refuses)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def build_parser() -> Parser:
    parser = Parser(prog="gpudeck", description=__doc__.splitlines()[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    up = commands.add_parser(
        "up",
        help="run every service and the gateway on this machine",
        description="Run PostgreSQL and NATS (embedded unless GPUDECK_DATABASE_URL and "
        "GPUDECK_NATS_URL are set), the five services and the GraphQL gateway, in the "
        "foreground. Flags override the environment variables named in their help.",
    )
    up.add_argument("--demo", action="store_true", help="seed the demo organization")
    up.add_argument(
        "--data-dir",
        metavar="DIR",
        help="where embedded data and tokens live "
        f"(GPUDECK_DATA_DIR, default ./{DEFAULT_DATA_DIR})",
    )
    up.add_argument(
        "--host",
        nargs="?",
        const="0.0.0.0",
        default="127.0.0.1",
        help="interface the default addresses bind (default 127.0.0.1; --host alone: 0.0.0.0)",
    )
    for setting in listen_settings():
        up.add_argument(
            setting.flag,
            dest=setting.variable,
            metavar="HOST:PORT",
            help=f"{setting.variable} (default port {setting.default_port}; 0: any free port)",
        )
    up.add_argument(
        "--startup-timeout",
        type=_seconds,
        default=120.0,
        metavar="SECONDS",
        help="give up if not all healthy by then (default 120)",
    )

    serve = commands.add_parser(
        "serve",
        help="run one service or the gateway in the foreground (what a container runs)",
        description="Run one part in this process; settings come from the environment.",
    )
    serve.add_argument("service", choices=COMPONENTS)
    return parser


def run(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    if args.command == "serve":
        from gpudeck.cli.serve import serve

        serve(args.service, env)
        return 0
    from gpudeck.cli.up import UpOptions, up

    listen = {s.variable: getattr(args, s.variable) for s in listen_settings()}
    options = UpOptions(
        demo=args.demo,
        data_dir=args.data_dir,
        host=args.host,
        listen=listen,
        startup_timeout=args.startup_timeout,
    )
    return up(options, env)


def _stopped(_sig: int, _frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    # A stop asked for before `up` or a service sets its own handling is a stop, not a failure
    # (it exited 143, or 130 while checking the servers).
    signal.signal(signal.SIGTERM, _stopped)
    args = build_parser().parse_args(argv)
    try:
        code = run(args)
    except (UsageError, ConfigError) as exc:
        print(f"gpudeck: {exc}", file=sys.stderr, flush=True)
        code = EXIT_USAGE
    except EmbeddedError as exc:
        print(f"gpudeck: {exc}", file=sys.stderr, flush=True)
        code = EXIT_FAILED
    except StopRequested:  # SIGTERM or SIGHUP while `up` starts its servers
        code = 0
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    raise SystemExit(code)


if __name__ == "__main__":
    main()
