"""The ``trio-fanout`` command line: run, worker, proxy, publish, config, keygen."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from typing import Any

import trio

from trio_fanout import __version__, protocol, tokens
from trio_fanout.backplane import BackplaneError, parse_backplane_url, redact_url
from trio_fanout.config import KEYS, Config, ConfigError, InvalidSetting, load_config
from trio_fanout.logs import setup_logging
from trio_fanout.tls import TLSFileError

logger = logging.getLogger(__name__)

EXIT_USAGE = 2

# `trio-fanout token` mints tokens for testing: a year is already far longer than one should live.
MAX_TOKEN_TTL = 365 * 86400

_CONFIG_HELP = (
    "settings file (TOML); by default trio-fanout.toml in the working directory, if present. "
    "TRIO_FANOUT_* environment variables override it, and flags override both"
)
# No password in the URL shown (a command line is visible to every user through ps) and no
# memory://, which reaches no other process.
_BACKPLANE_HELP = (
    "backplane URL: zmq://HOST:PORT (a ZeroMQ proxy), redis://[USER@]HOST[:PORT][/DB] "
    "or rediss://… (Redis, its password in backplane_password_file); "
    "default: the ZeroMQ proxy at proxy_host:proxy_port (127.0.0.1:5559)"
)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help=_CONFIG_HELP)
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=("debug", "info", "warning", "error"),
        help="how much to log (default: info; debug shows the path of every message)",
    )
    parser.add_argument(
        "--log-format",
        type=str.lower,
        choices=("text", "json"),
        help="text, or json: one JSON object a line, for log shippers (default: text)",
    )


def _listening(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--host", help=f"address {what} listens on (default: 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, help=f"port {what} listens on; 0 picks a free one (default: 8765)"
    )


def _history(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--history-size",
        type=int,
        metavar="MESSAGES",
        help="messages kept per room for clients that reconnect; 0: none (default: 100)",
    )
    parser.add_argument(
        "--history-ttl",
        type=float,
        metavar="SECONDS",
        help="seconds a room's history lives after its last message (default: 300)",
    )
    parser.add_argument(
        "--history-max-bytes",
        type=int,
        metavar="BYTES",
        help="bound on all rooms' kept messages together in the ZeroMQ proxy "
        "(default: 67108864, 64 MiB)",
    )


def _admin(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin-port",
        type=int,
        help="serve /metrics, /status and /api on this HTTP port; 0 picks a free one "
        "(default: none)",
    )
    parser.add_argument("--admin-host", help="address of the admin port (default: 127.0.0.1)")
    parser.add_argument(
        "--api-key-file",
        metavar="FILE",
        help="file holding the key of the admin port's /api (default: none, the API is off)",
    )


def _tls(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tls-cert-file",
        metavar="FILE",
        help="PEM certificate chain: serve wss:// and https:// (with --tls-key-file; "
        "SIGHUP reloads both)",
    )
    parser.add_argument("--tls-key-file", metavar="FILE", help="PEM private key of the certificate")


def _tokens(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--token-secret-file",
        metavar="FILE",
        help="require clients' tokens (JWT), signed HS256 with the secret in FILE",
    )
    parser.add_argument(
        "--token-public-key-file",
        metavar="FILE",
        help="require clients' tokens (JWT), signed RS256 or ES256, checked with this PEM key",
    )


def _access(parser: argparse.ArgumentParser) -> None:
    _tokens(parser)
    parser.add_argument(
        "--token-leeway",
        type=float,
        metavar="SECONDS",
        help="tolerance on a token's exp and nbf, for clocks that differ (default: 5.0)",
    )
    parser.add_argument(
        "--token-expiry-warning",
        type=float,
        metavar="SECONDS",
        help="how long before a token's exp the client is sent token_expiring (default: 30.0)",
    )
    parser.add_argument(
        "--allowed-origins",
        metavar="ORIGINS",
        help="comma-separated origins (https://example.com) whose pages may connect; default: any",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help="WebSockets per worker; past it, an upgrade is answered 503 (default: 10000)",
    )
    parser.add_argument(
        "--max-handshakes",
        type=int,
        metavar="N",
        help="connections per worker not yet WebSockets; past it, a new one is closed at once "
        "(default: 1000)",
    )


def _backplane_secrets(
    parser: argparse.ArgumentParser, *, client: bool = True, server: bool = False
) -> None:
    """The files of the backplane's secrets: a client's (a worker, an emitter) and, for a
    process that runs the ZeroMQ proxy, the directory of the keys it lets in."""
    if client:
        parser.add_argument(
            "--backplane-password-file",
            metavar="FILE",
            help="file whose first line is the Redis password (never put it in a flag)",
        )
    parser.add_argument(
        "--curve-secret-key-file",
        metavar="FILE",
        help="this process's CURVE key pair (NAME.key_secret from trio-fanout keygen)",
    )
    if client:
        parser.add_argument(
            "--curve-server-key-file",
            metavar="FILE",
            help="the ZeroMQ proxy's public key (its NAME.key)",
        )
    if server:
        parser.add_argument(
            "--curve-allowed-keys-dir",
            metavar="DIR",
            help="directory of the public keys (*.key) the proxy lets in",
        )


def _run_settings(parser: argparse.ArgumentParser) -> None:
    """The setting flags of ``run``, which ``config`` takes too, to show what they make."""
    _listening(parser, "the WebSocket server")
    parser.add_argument("--workers", type=int, help="worker processes (default: one per CPU)")
    parser.add_argument(
        "--heartbeat-interval",
        type=float,
        metavar="SECONDS",
        help="seconds between heartbeats to every client; 0 turns them off (default: 1.0)",
    )
    parser.add_argument(
        "--proxy-port",
        type=int,
        help="port of the embedded ZeroMQ proxy; 0 picks a free one (default: 5559)",
    )
    parser.add_argument(
        "--backplane",
        help="use this backplane instead of the embedded proxy, e.g. zmq://10.0.0.5:5559 or "
        "redis://10.0.0.6:6379",
    )
    parser.add_argument(
        "--liveness-interval",
        type=float,
        metavar="SECONDS",
        help="seconds between the master's pings to each worker (default: 1.0)",
    )
    parser.add_argument(
        "--liveness-timeout",
        type=float,
        metavar="SECONDS",
        help="a worker that answers no ping for this long is killed and restarted (default: 5.0)",
    )
    _history(parser)
    _access(parser)
    _backplane_secrets(parser, server=True)
    _admin(parser)
    _tls(parser)
    _common(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-fanout",
        description="A multi-process WebSocket fan-out server built on Trio. "
        "Clients connect to ws://HOST:PORT/ws, join rooms and publish to them.",
    )
    parser.add_argument("--version", action="version", version=f"trio-fanout {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run the whole cluster: master, workers and the embedded ZeroMQ proxy",
        description=(
            "Run a master process with N worker processes that share one port. Clients connect "
            "to ws://HOST:PORT/ws (wss:// with --tls-cert-file and --tls-key-file; SIGHUP "
            "reloads them); a message published in a room reaches its members on every "
            "worker through the embedded ZeroMQ proxy, or through --backplane if given. "
            "Stop it with Ctrl-C or SIGTERM: clients are closed with 1001."
        ),
    )
    _run_settings(run)

    worker = commands.add_parser(
        "worker",
        help="run one worker on its own port, against a backplane",
        description=(
            "Run one worker process on its own port. Workers on several hosts that share a "
            "backplane (e.g. one `trio-fanout proxy`) deliver each other's messages."
        ),
    )
    worker.add_argument("--backplane", help=_BACKPLANE_HELP)
    _listening(worker, "the worker")
    worker.add_argument(
        "--index",
        type=int,
        metavar="N",
        help="this worker's number, in its clients' welcome frames and in its logs: give each "
        "worker on one backplane its own (default: 1)",
    )
    _history(worker)
    _access(worker)
    _backplane_secrets(worker)
    _admin(worker)
    _tls(worker)
    _common(worker)
    # Set by the master when it starts a worker on its own listening socket.
    for hidden in ("--listen-fd", "--control-fd"):
        worker.add_argument(hidden, type=int, help=argparse.SUPPRESS)
    worker.add_argument("--config-from-stdin", action="store_true", help=argparse.SUPPRESS)

    proxy = commands.add_parser(
        "proxy",
        help="run the ZeroMQ proxy alone, for workers on several hosts",
        description=(
            "Run the ZeroMQ proxy that workers and emitters meet at, and publish the heartbeat "
            "through it. Workers and emitters connect to PORT: point them at zmq://HOST:PORT."
        ),
    )
    proxy.add_argument("--host", help="address to listen on (default: 127.0.0.1)")
    proxy.add_argument(
        "--port", type=int, help="port to listen on; 0 picks a free one (default: 5559)"
    )
    proxy.add_argument(
        "--heartbeat-interval",
        type=float,
        metavar="SECONDS",
        help="seconds between the heartbeats it publishes to every client; 0: none (default: 1.0)",
    )
    _history(proxy)
    _backplane_secrets(proxy, client=False, server=True)
    _admin(proxy)
    _common(proxy)

    publish = commands.add_parser(
        "publish",
        help="publish one message to a room, or to every connection, from the shell",
        description="Publish one JSON value to a room, e.g.: trio-fanout publish lobby "
        '\'{"text": "hello"}\'. Every member of the room, on every worker, receives it; the '
        "command prints the offset the room gave it. With --broadcast and no ROOM, every "
        "connection on every worker receives it.",
    )
    publish.add_argument("--backplane", help=_BACKPLANE_HELP)
    publish.add_argument(
        "--broadcast", action="store_true", help="send to every connection instead of a room"
    )
    publish.add_argument("room", metavar="ROOM", nargs="?", help="the room to publish to")
    publish.add_argument("data", metavar="DATA", help="a JSON value, e.g. '\"hi\"' or '{\"n\": 1}'")
    _backplane_secrets(publish)
    _common(publish)

    token = commands.add_parser(
        "token",
        help="print a signed token (JWT) for a client, for testing",
        description="Print a token for SUB, for testing: signed HS256 with token_secret_file, "
        "or, for a server with token_public_key_file, RS256 or ES256 with --private-key-file. "
        "Your application mints the real ones (docs/security.md). No key is ever printed.",
    )
    token.add_argument("sub", metavar="SUB", help="the identity the token is for (not empty)")
    token.add_argument(
        "--join", action="append", metavar="ROOM", help="a room it may join (trailing * for a "
        "prefix); repeat for more; without any, every room"
    )  # fmt: skip
    token.add_argument(
        "--publish", action="append", metavar="ROOM", help="a room it may publish to (trailing "
        "* for a prefix); repeat for more; without any, every room"
    )  # fmt: skip
    token.add_argument(
        "--ttl", type=float, default=3600.0, metavar="SECONDS", help="lifetime (default: 3600)"
    )
    token.add_argument(
        "--token-secret-file", metavar="FILE", help="sign HS256 with the secret in FILE"
    )
    token.add_argument(
        "--private-key-file",
        metavar="FILE",
        help="sign with this PEM private key: RS256 for an RSA key, ES256 for a P-256 key, "
        "for a server with token_public_key_file",
    )
    token.add_argument(
        "--token-public-key-file",
        metavar="FILE",
        help="the server's public key: --private-key-file must be its pair (a public key "
        "cannot sign)",
    )
    _common(token)

    show = commands.add_parser(
        "config",
        help="print the effective configuration and where each value came from",
        description="Print every setting, its value, and its source: default, file, "
        "environment or flag. It takes the setting flags of `run`, to show what they make; "
        "files that hold secrets are shown by their path, never their content.",
    )
    _run_settings(show)

    keygen = commands.add_parser(
        "keygen",
        help="write a CURVE key pair for the ZeroMQ backplane",
        description="Write NAME.key (the public key, to give to the proxy's "
        "curve_allowed_keys_dir or to clients' curve_server_key_file) and NAME.key_secret "
        "(the key pair, readable by its owner only, for curve_secret_key_file), in pyzmq's "
        "key file format. Existing files are never overwritten.",
    )
    keygen.add_argument("name", metavar="NAME", help="the files' name, e.g. proxy or worker-1")
    keygen.add_argument(
        "--directory", metavar="DIR", default=".", help="where to write them (default: .)"
    )
    return parser


def _flags(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """The configuration keys the command line set, and the flags that set them where a flag
    is not named after its key (``proxy --port`` sets proxy_port)."""
    renamed = {"host": "proxy_host", "port": "proxy_port"} if args.command == "proxy" else {}
    flags, flag_names = {}, {}
    for attribute, value in vars(args).items():
        key = renamed.get(attribute, attribute)
        if key in KEYS and value is not None:
            flags[key] = value
            if key != attribute:
                flag_names[key] = "--" + attribute.replace("_", "-")
    return flags, flag_names


def _role(args: argparse.Namespace) -> str:
    """Which process a log line comes from: ``master``, ``worker N``, ``proxy``, ``publish``."""
    if args.command == "run":
        return "master"
    if args.command == "worker":
        return f"worker {args.index or 1}"
    return str(args.command)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "keygen":
        return _keygen(parser, args)
    try:
        if args.command == "worker" and args.config_from_stdin:
            # From the master: on a pipe, so that no secret shows in our argv or environment.
            config = Config.from_dict(json.load(sys.stdin))
            sources: dict[str, str] = {}
        else:
            flags, flag_names = _flags(args)
            config, sources = load_config(flags, flag_names=flag_names, config_file=args.config)
    except (ConfigError, InvalidSetting) as error:
        parser.exit(EXIT_USAGE, f"trio-fanout: error: {error}\n")
    if args.command == "config":
        for key in KEYS:
            value = getattr(config, key)
            if key == "backplane" and value is not None:
                value = redact_url(value)
            shown = "(unset)" if value is None else json.dumps(value)
            print(f"{key} = {shown}  # {sources[key]}")
        return 0
    if problem := _unreachable_backplane(args.command, config):
        parser.exit(EXIT_USAGE, f"trio-fanout: error: {problem}\n")
    setup_logging(config.log_level, config.log_format, _role(args))
    exit_code = 0
    try:
        exit_code = _run_command(parser, args, config)
    except* OSError as failures:
        # Startup failures (a port in use, a bad address): one line each, no traceback.
        for failure in failures.exceptions:
            _report_startup_failure(args, config, failure)
        exit_code = EXIT_USAGE
    except* BackplaneError as failures:
        # The backplane is unreachable or refuses us: one line each, no traceback.
        for backplane_failure in failures.exceptions:
            _report_startup_failure(args, config, backplane_failure)
        exit_code = 1
    except* TLSFileError as failures:
        # A certificate or key that cannot be used, at startup: the files and the problem.
        for tls_failure in failures.exceptions:
            _report_startup_failure(args, config, tls_failure)
        exit_code = EXIT_USAGE
    return exit_code


def _report_startup_failure(args: argparse.Namespace, config: Config, failure: Exception) -> None:
    """Say why the command stopped. On a terminal, as a command's error; as a log line where
    the line lands among log lines: from a worker its master started (whose output is the
    node's log, where the line must say which worker), or with ``log_format = "json"``, whose
    readers expect nothing but JSON lines."""
    why = _startup_problem(args, failure)
    if config.log_format == "json" or (args.command == "worker" and args.config_from_stdin):
        logger.error("cannot start: %s", why)
    else:
        print(f"trio-fanout: error: {why}", file=sys.stderr)


def _startup_problem(args: argparse.Namespace, failure: Exception) -> str:
    """What stopped the command, with the flag that changes it where there is one."""
    from trio_fanout.backplane.proxy import ProxyPortInUse

    if isinstance(failure, ProxyPortInUse):
        flag = "--port" if args.command == "proxy" else "--proxy-port"
        return (
            f"{failure.strerror}: stop what listens there, or give the proxy another port with "
            f"{flag} (the setting proxy_port; 0 picks a free one)"
        )
    return str(failure)


def _unreachable_backplane(command: str, config: Config) -> str | None:
    """Why ``command`` would reach nobody on ``config``'s backplane: a memory:// backplane
    lives inside one process, so another process cannot meet anyone on it."""
    if config.backplane is None or parse_backplane_url(config.backplane).scheme != "memory":
        return None
    if command == "publish":
        return (
            f"{config.backplane} exists only inside one process: publish on the cluster's "
            "backplane instead (zmq://HOST:PORT or redis://HOST:PORT)"
        )
    if command == "run" and config.workers > 1:
        return (
            f"{config.backplane} exists only inside one process: {config.workers} workers "
            "on it would not receive each other's messages; leave --backplane unset for the "
            "embedded ZeroMQ proxy, or give zmq:// or redis://"
        )
    return None


def _run_command(parser: argparse.ArgumentParser, args: argparse.Namespace, config: Config) -> int:
    if args.command == "run":
        from trio_fanout.master import run_master

        trio.run(run_master, config)
    elif args.command == "worker":
        from trio_fanout.runner import open_listener, run_worker_process

        if args.listen_fd is not None:
            listener = socket.socket(fileno=args.listen_fd)
        else:
            listener = open_listener(config.host, config.port)
        trio.run(
            lambda: run_worker_process(
                config,
                listener,
                index=args.index or 1,
                control_fd=args.control_fd,
                admin=args.listen_fd is None,  # a master's worker: the master has the port
            )
        )
    elif args.command == "proxy":
        from trio_fanout.master import run_proxy

        trio.run(run_proxy, config)
    elif args.command == "token":
        return _token(parser, args, config)
    else:
        return _publish(parser, args, config)
    return 0


def _token(parser: argparse.ArgumentParser, args: argparse.Namespace, config: Config) -> int:
    if not args.sub:
        parser.exit(
            EXIT_USAGE,
            "trio-fanout: error: SUB: the identity must not be empty (the server refuses a "
            "token without one)\n",
        )
    if not 1 <= args.ttl <= MAX_TOKEN_TTL:
        parser.exit(
            EXIT_USAGE,
            f"trio-fanout: error: --ttl: must be 1 to {MAX_TOKEN_TTL} seconds, not {args.ttl:g}\n",
        )
    for room in (args.join or []) + (args.publish or []):
        try:
            protocol.check_room(room.removesuffix("*") or "*")
        except protocol.RequestError as refusal:
            parser.exit(EXIT_USAGE, f"trio-fanout: error: {room!r}: {refusal.message}\n")
    try:
        key = _signing_key(args.private_key_file, config)
    except tokens.KeyFileError as problem:
        parser.exit(EXIT_USAGE, f"trio-fanout: error: {problem}\n")
    print(tokens.mint(key, args.sub, ttl=args.ttl, join=args.join, publish=args.publish))
    return 0


def _signing_key(private_key_file: str | None, config: Config) -> tokens.TokenKey:
    """What `trio-fanout token` signs with: ``--private-key-file``, checked against the
    server's public key where one is configured, or ``token_secret_file``. ``KeyFileError``
    says why neither can sign a token the server would take."""
    if private_key_file is not None:
        if config.token_secret_file is not None:
            raise tokens.KeyFileError(
                "--private-key-file signs RS256 or ES256, but token_secret_file is set: a "
                "server with it takes HS256 only (sign with the secret: leave out "
                "--private-key-file)"
            )
        key = tokens.read_private_key(private_key_file)
        public_file = config.token_public_key_file
        if public_file is not None and not tokens.signs_for(
            key, tokens.read_public_key(public_file)
        ):
            raise tokens.KeyFileError(
                f"{private_key_file} is not the private key of token_public_key_file "
                f"{public_file}: the server would refuse its tokens"
            )
        return key
    if config.token_secret_file is not None:
        return tokens.read_secret(config.token_secret_file)
    if config.token_public_key_file is not None:
        raise tokens.KeyFileError(
            f"a public key cannot sign: give the private key of {config.token_public_key_file} "
            "with --private-key-file FILE"
        )
    raise tokens.KeyFileError(
        "token needs a key: --token-secret-file FILE (HS256) or --private-key-file FILE "
        "(RS256, ES256)"
    )


def _publish(parser: argparse.ArgumentParser, args: argparse.Namespace, config: Config) -> int:
    from trio_fanout.emitter import open_emitter

    if args.broadcast and args.room is not None:
        parser.exit(EXIT_USAGE, "trio-fanout: error: give a ROOM or --broadcast, not both\n")
    if not args.broadcast and args.room is None:
        parser.exit(EXIT_USAGE, "trio-fanout: error: give ROOM and DATA, or --broadcast DATA\n")
    try:
        data = json.loads(args.data)
    except (ValueError, RecursionError):
        parser.exit(EXIT_USAGE, f"trio-fanout: error: DATA is not JSON: {args.data!r}\n")
    try:
        if args.room is not None:
            protocol.check_room(args.room)
    except protocol.RequestError as refusal:
        parser.exit(EXIT_USAGE, f"trio-fanout: error: ROOM: {refusal.message}\n")
    try:
        # What clients could not receive: NaN, …
        if args.room is None:
            protocol.broadcast_frame(data)
        else:
            protocol.message_frame(args.room, data)
    except protocol.RequestError as refusal:
        parser.exit(EXIT_USAGE, f"trio-fanout: error: DATA: {refusal.message}\n")

    async def publish() -> None:
        async with open_emitter(
            config.backplane_url, credentials=config.backplane_credentials
        ) as emitter:
            if args.room is None:
                await emitter.broadcast(data)
                print("sent to every connection")
            else:
                offset = await emitter.publish(args.room, data)
                print(f"published to room {args.room!r} at offset {offset}")

    trio.run(publish)
    return 0


def _keygen(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from trio_fanout.backplane._credentials import write_key_pair

    if not args.name or os.sep in args.name or args.name.startswith("."):
        parser.exit(EXIT_USAGE, f"trio-fanout: error: NAME: not a file name: {args.name!r}\n")
    try:
        public_path, secret_path = write_key_pair(args.directory, args.name)
    except OSError as error:
        parser.exit(EXIT_USAGE, f"trio-fanout: error: {error}\n")
    print(f"public key: {public_path}\nkey pair (secret): {secret_path}")
    return 0
