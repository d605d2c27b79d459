"""The ``trio-fanout`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
from typing import Any

import trio

from backplane import BadBackplaneURL
from trio_fanout.config import Config

logger = logging.getLogger(__name__)

EXIT_USAGE = 2


def _add_logging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        help="how much to log (default: info; debug shows the path of every message)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-fanout",
        description="A multi-process WebSocket fan-out server built on Trio.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run the whole cluster: master, workers and the embedded ZeroMQ proxy",
        description=(
            "Run a master process with N worker processes that share one port. Clients connect "
            "to ws://HOST:PORT/ws; a message published in a room reaches its members on every "
            "worker through the embedded ZeroMQ proxy. Stop it with Ctrl-C or SIGTERM."
        ),
    )
    run.add_argument("--host", help="address to listen on (default: 127.0.0.1)")
    run.add_argument(
        "--port", type=int, help="port to listen on; 0 picks a free one (default: 8765)"
    )
    run.add_argument("--workers", type=int, help="worker processes (default: one per CPU)")
    run.add_argument(
        "--heartbeat-interval",
        type=float,
        metavar="SECONDS",
        help="seconds between heartbeats to every client; 0 turns them off (default: 1.0)",
    )
    run.add_argument(
        "--proxy-port",
        type=int,
        help="port of the embedded ZeroMQ proxy's publisher side; the subscriber side uses the "
        "next one; 0 picks two free ones (default: 5559)",
    )
    _add_logging(run)

    worker = commands.add_parser(
        "worker",
        help="run one worker process (the master starts these itself)",
        description="Run one worker against a backplane. `trio-fanout run` starts these itself.",
    )
    worker.add_argument(
        "--backplane", required=True, help="backplane URL, e.g. zmq://127.0.0.1:5559"
    )
    worker.add_argument("--host", help="address to listen on (default: 127.0.0.1)")
    worker.add_argument("--port", type=int, help="port to listen on (default: 8765)")
    _add_logging(worker)
    # Set by the master when it starts a worker on its own listening socket.
    for hidden in ("--index", "--listen-fd", "--parent-fd"):
        worker.add_argument(hidden, type=int, help=argparse.SUPPRESS)
    worker.add_argument("--config-json", help=argparse.SUPPRESS)
    return parser


def _config_from(args: argparse.Namespace) -> Config:
    values: dict[str, Any] = {}
    if getattr(args, "config_json", None):
        values.update(json.loads(args.config_json))
    for key in ("host", "port", "workers", "heartbeat_interval", "proxy_port", "log_level"):
        value = getattr(args, key, None)
        if value is not None:
            values[key] = value
    return Config.from_dict(values)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = _config_from(args)
    except (ValueError, TypeError, BadBackplaneURL) as error:
        parser.exit(EXIT_USAGE, f"trio-fanout: error: {error}\n")
    _setup_logging(config.log_level)
    exit_code = 0
    try:
        _run_command(args, config)
    except* OSError as failures:
        # Startup failures (a port in use, a bad address): one line each, no traceback.
        for failure in failures.exceptions:
            print(f"trio-fanout: error: {failure}", file=sys.stderr)
        exit_code = EXIT_USAGE
    return exit_code


def _run_command(args: argparse.Namespace, config: Config) -> None:
    if args.command == "run":
        from trio_fanout.master import run_master

        trio.run(run_master, config)
        return
    from trio_fanout.runner import run_worker

    if args.listen_fd is not None:
        listener = socket.socket(fileno=args.listen_fd)
    else:
        from trio_fanout.master import open_listener

        listener = open_listener(config.host, config.port)
    trio.run(
        lambda: run_worker(
            config, args.backplane, listener, index=args.index or 1, parent_fd=args.parent_fd
        )
    )
