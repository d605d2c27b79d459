"""Configuration: one frozen attrs class, and the loader that layers its sources.

Sources, weakest first: defaults, a TOML file (``--config FILE``, else ``trio-fanout.toml`` in
the working directory if there is one), ``TRIO_FANOUT_*`` environment variables, command-line
flags. Unknown keys are refused (a typo must not silently fall back to a default), and every
error names the key and the source it came from. docs/configuration.md documents each key; keep
the two in step.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from trio_fanout import tokens
from trio_fanout.backplane import (
    BadBackplaneURL,
    BadCredentials,
    Credentials,
    HistoryPolicy,
    parse_backplane_url,
    redact_url,
)
from trio_fanout.backplane._credentials import (
    load_allowed_keys,
    load_key_pair,
    load_public_key,
    read_password,
)

ENV_PREFIX = "TRIO_FANOUT_"
DEFAULT_FILE = "trio-fanout.toml"
_LOG_LEVELS = ("debug", "info", "warning", "error")
_LOG_FORMATS = ("text", "json")

MAX_WRITE_DELAY = 0.1
"""A write delay is there to gather frames that arrive within milliseconds of each other;
a tenth of a second is already a delay people see in a chat or a game."""

MIN_HEARTBEAT_INTERVAL = 0.1
"""Ten heartbeats a second to every client is already more than any dead-peer detection needs;
a shorter interval would only turn the heartbeat into a flood of the workers' own making."""


class InvalidSetting(ValueError):
    """A value that the key does not accept; raised by the validators below."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and its source."""


def _finite(attribute: attrs.Attribute[Any], value: float) -> None:
    if not math.isfinite(value):
        raise InvalidSetting(attribute.name, f"must be a finite number, not {value!r}")


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    _finite(attribute, value)
    if value <= 0:
        raise InvalidSetting(attribute.name, f"must be greater than 0, not {value!r}")


def _not_negative(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    _finite(attribute, value)
    if value < 0:
        raise InvalidSetting(attribute.name, f"must be 0 or more, not {value!r}")


def _port(instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if not 0 <= value <= 65535:
        raise InvalidSetting(
            attribute.name, f"must be a port number from 0 to 65535, not {value!r}"
        )


def _optional_port(instance: object, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None:
        _port(instance, attribute, value)


def _readable_file(instance: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    """A file that can be read and is not empty (what it holds is a secret: never shown)."""
    if value is None:
        return
    try:
        with open(value, "rb") as file:
            empty = not file.read().strip()
    except OSError as error:
        raise InvalidSetting(attribute.name, f"cannot read {value}: {error.strerror}") from None
    if empty:
        raise InvalidSetting(attribute.name, f"{value} is empty")


def _backplane_url(instance: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None:
        try:
            parse_backplane_url(value)
        except BadBackplaneURL as error:
            raise InvalidSetting(attribute.name, str(error)) from None


def _readable_with(
    load: Callable[[str], object],
) -> Callable[[object, attrs.Attribute[Any], str | None], None]:
    """A validator that a ``*_file``/``*_dir`` setting names something ``load`` can read; the
    error names the file, never its content."""

    def check(instance: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
        if value is not None:
            try:
                load(value)
            except BadCredentials as error:
                raise InvalidSetting(attribute.name, str(error)) from None

    return check


def _heartbeat(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    _not_negative(instance, attribute, value)
    if 0 < value < MIN_HEARTBEAT_INTERVAL:
        raise InvalidSetting(
            attribute.name,
            f"must be 0 (off) or at least {MIN_HEARTBEAT_INTERVAL} seconds, not {value!r}",
        )


def _write_delay(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    _not_negative(instance, attribute, value)
    if value > MAX_WRITE_DELAY:
        raise InvalidSetting(
            attribute.name, f"must be at most {MAX_WRITE_DELAY} seconds, not {value!r}"
        )


def _lower(value: str) -> str:
    return value.lower()


def _one_of(choices: tuple[str, ...]) -> Any:
    def check(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
        if value not in choices:
            raise InvalidSetting(
                attribute.name, f"must be one of {', '.join(choices)}, not {value!r}"
            )

    return check


def _key_file(instance: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    """Read the key now, so that a missing or unusable key stops the command before it starts
    (the workers read it again; only the path travels to them)."""
    if value is not None:
        read = (
            tokens.read_secret if attribute.name == "token_secret_file" else tokens.read_public_key
        )
        try:
            read(value)
        except tokens.KeyFileError as error:
            raise InvalidSetting(attribute.name, str(error)) from None


def _origins(instance: object, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    for origin in value:
        scheme, _, rest = origin.partition("://")
        if origin != "null" and (scheme not in ("http", "https") or not rest or "/" in rest):
            raise InvalidSetting(
                attribute.name,
                f"an origin is scheme://host[:port] (e.g. https://example.com), not {origin!r}",
            )


def _origin_list(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Origins from a list, or from text separated by commas (the environment, the flag);
    compared in lower case, as browsers send the scheme and host."""
    items = value.split(",") if isinstance(value, str) else value
    return tuple(item.strip().lower().rstrip("/") for item in items if item.strip())


@attrs.frozen(kw_only=True)
class Config:
    host: str = "127.0.0.1"
    """Address the WebSocket server listens on."""
    port: int = attrs.field(default=8765, validator=_port)
    """Port the WebSocket server listens on; 0 picks a free one."""
    workers: int = attrs.field(factory=lambda: os.cpu_count() or 1, validator=_positive)
    """Worker processes `trio-fanout run` starts; by default one per CPU."""
    heartbeat_interval: float = attrs.field(default=1.0, validator=_heartbeat)
    """Seconds between heartbeats; 0 turns the heartbeat off."""
    proxy_host: str = "127.0.0.1"
    """Address the ZeroMQ proxy (embedded, or `trio-fanout proxy`) listens on."""
    proxy_port: int = attrs.field(default=5559, validator=_port)
    """Port of the ZeroMQ proxy, the one port every client connects to; 0 picks a free one."""
    backplane: str | None = attrs.field(
        default=None,
        validator=_backplane_url,
        repr=lambda url: repr(url if url is None else redact_url(url)),
    )
    """Backplane URL; unset means the embedded proxy (run) or the proxy at proxy_host:proxy_port."""
    backplane_password_file: str | None = attrs.field(
        default=None, validator=_readable_with(read_password)
    )
    """File whose first line is the Redis password, so that it is in no URL, argv or env."""
    curve_secret_key_file: str | None = attrs.field(
        default=None, validator=_readable_with(load_key_pair)
    )
    """This process's CURVE key pair (a ``.key_secret`` file): turns CURVE on for the proxy,
    a worker or an emitter of a zmq:// backplane."""
    curve_server_key_file: str | None = attrs.field(
        default=None, validator=_readable_with(load_public_key)
    )
    """The proxy's public key (its ``.key`` file), where it is not curve_secret_key_file's."""
    curve_allowed_keys_dir: str | None = attrs.field(
        default=None, validator=_readable_with(load_allowed_keys)
    )
    """The proxy's directory of the ``.key`` files of the clients it lets in."""
    log_level: str = attrs.field(default="info", converter=_lower, validator=_one_of(_LOG_LEVELS))
    """How much to log, in any case (``DEBUG`` and ``debug`` are the same, as Python's
    logging spells its levels in capitals)."""
    log_format: str = attrs.field(default="text", converter=_lower, validator=_one_of(_LOG_FORMATS))
    """``text`` for people, ``json`` (one object a line) for log shippers."""
    max_frame_bytes: int = attrs.field(default=64 * 1024, validator=_positive)
    max_rooms_per_connection: int = attrs.field(default=100, validator=_positive)
    max_rooms_per_worker: int = attrs.field(default=100_000, validator=_positive)
    """Rooms with a member on one worker; a join that would open one more is refused.

    100,000: about 110 to 160 MiB at the 1.1 to 1.6 KiB a room measured (docs/reliability.md),
    so that clients cannot grow a worker without bound (10,000 connections in 100 rooms of their
    own each would be a million rooms); far more rooms than one worker's clients use in practice.
    """
    rate_limit_per_second: float = attrs.field(default=200.0, validator=_positive)
    rate_limit_burst: int = attrs.field(default=1000, validator=_positive)
    rate_limit_bytes_per_second: float = attrs.field(default=1024.0 * 1024, validator=_positive)
    """Payload bytes a second a client may send on average (every frame's payload counts)."""
    rate_limit_bytes_burst: int = attrs.field(default=4 * 1024 * 1024, validator=_positive)
    """Payload bytes a client may send at once before its byte rate applies."""
    max_queued_frames: int = attrs.field(default=1000, validator=_positive)
    max_queued_bytes: int = attrs.field(default=4 * 1024 * 1024, validator=_positive)
    """Bytes a worker may hold for one client whose socket is full; past it the client is cut.

    4 MiB: 64 of the largest messages clients may send, or 1,000 (max_queued_frames) of 4 KiB,
    so that for common sizes the frame bound and this one cut at about the same point; and
    about what Linux's own send buffer holds for a connection at most (tcp_wmem), so a client
    is given as much again as the kernel already buffers for it.
    """
    write_delay: float = attrs.field(default=0.005, validator=_write_delay)
    """Seconds a client that was written to less than this ago waits before the next write,
    so that frames arriving for it meanwhile go out together in one send; 0: every fan-out
    batch is written at once. A client that receives now and then never waits."""
    handshake_timeout: float = attrs.field(default=10.0, validator=_positive)
    """Seconds a client has to complete the HTTP and WebSocket handshake."""
    max_connections: int = attrs.field(default=10_000, validator=_positive)
    """Open WebSockets per worker; past it an upgrade is answered 503 with Retry-After."""
    max_handshakes: int = attrs.field(default=1000, validator=_positive)
    """Connections per worker that are not open WebSockets: in their handshake (plain HTTP
    requests included) or closing, until their socket is closed; past it a new TCP connection
    is closed at once, before a byte of it is read."""
    liveness_interval: float = attrs.field(default=1.0, validator=_positive)
    """Seconds between the master's pings to each worker of `trio-fanout run`."""
    liveness_timeout: float = attrs.field(default=5.0, validator=_positive)
    """Seconds without an answer after which the master kills a worker as hung."""
    history_size: int = attrs.field(default=100, validator=_not_negative)
    """Messages kept per room for clients that reconnect (0: none kept, still numbered)."""
    history_ttl: float = attrs.field(default=300.0, validator=_positive)
    """Seconds a room's history and numbering live after its last message: long enough that a
    client reconnecting after a few minutes recovers what it missed."""
    history_max_bytes: int = attrs.field(default=64 * 1024 * 1024, validator=_not_negative)
    """Bound on all rooms' kept messages together in the ZeroMQ proxy (on Redis, Redis's
    ``maxmemory`` is the bound)."""
    token_secret_file: str | None = attrs.field(default=None, validator=_key_file)
    """File holding the HS256 secret that clients' tokens are signed with; set, tokens are
    required (docs/protocol.md, "Tokens")."""
    token_public_key_file: str | None = attrs.field(default=None, validator=_key_file)
    """PEM file holding the RS256 (RSA) or ES256 (P-256) public key that verifies tokens."""
    token_leeway: float = attrs.field(default=5.0, validator=_not_negative)
    """Seconds of tolerance on a token's exp and nbf, for clocks that differ a little."""
    token_expiry_warning: float = attrs.field(default=30.0, validator=_positive)
    """Seconds before a token's exp that the server sends token_expiring."""
    allowed_origins: tuple[str, ...] = attrs.field(
        default=(), converter=_origin_list, validator=_origins
    )
    """Origins whose pages may open a WebSocket here; empty: any. Not for non-browser clients."""
    admin_port: int | None = attrs.field(default=None, validator=_optional_port)
    """Port of the admin HTTP server (/metrics, /status, /api); unset: none."""
    admin_host: str = "127.0.0.1"
    """Address of the admin port: loopback by default, as it shows the node's figures."""
    api_key_file: str | None = attrs.field(default=None, validator=_readable_file)
    """File holding the admin API's key; unset: the API is off."""
    tls_cert_file: str | None = None
    """PEM certificate chain; with tls_key_file, workers serve wss:// and https:// only."""
    tls_key_file: str | None = None
    """PEM private key of tls_cert_file (unencrypted); reloaded with it on SIGHUP."""

    def __attrs_post_init__(self) -> None:
        if self.token_secret_file is not None and self.token_public_key_file is not None:
            raise InvalidSetting(
                "token_public_key_file", "set token_secret_file or token_public_key_file, not both"
            )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            given, missing = ("tls_cert_file", "tls_key_file")[:: 1 if self.tls_cert_file else -1]
            raise InvalidSetting(given, f"needs {missing} too: set both, or neither")
        if self.liveness_timeout <= self.liveness_interval:
            raise InvalidSetting(
                "liveness_timeout",
                f"must be greater than liveness_interval ({self.liveness_interval!r}), "
                f"not {self.liveness_timeout!r}",
            )
        for key in ("curve_server_key_file", "curve_allowed_keys_dir"):
            if getattr(self, key) is not None and self.curve_secret_key_file is None:
                raise InvalidSetting(key, "needs curve_secret_key_file, this process's key pair")
        if self.backplane_password_file is not None:
            address = parse_backplane_url(self.backplane_url)
            if address.scheme not in ("redis", "rediss"):
                raise InvalidSetting(
                    "backplane_password_file", "is for a redis:// or rediss:// backplane"
                )
            if address.password is not None:
                raise InvalidSetting(
                    "backplane_password_file", "given, and the backplane URL has a password too"
                )

    @property
    def backplane_url(self) -> str:
        """The backplane to use: ``backplane``, or else the ZeroMQ proxy this config names."""
        if self.backplane is not None:
            return self.backplane
        host = f"[{self.proxy_host}]" if ":" in self.proxy_host else self.proxy_host
        return f"zmq://{host}:{self.proxy_port}"

    @property
    def backplane_credentials(self) -> Credentials:
        """The files of the backplane's secrets, as the backplane takes them."""
        return Credentials(
            password_file=self.backplane_password_file,
            curve_secret_key_file=self.curve_secret_key_file,
            curve_server_key_file=self.curve_server_key_file,
        )

    @property
    def history_policy(self) -> HistoryPolicy:
        """What the rooms' sequencer keeps, as the backplane takes it."""
        return HistoryPolicy(
            size=self.history_size, ttl=self.history_ttl, max_bytes=self.history_max_bytes
        )

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        return cls(**values)


KEYS: tuple[str, ...] = tuple(field.name for field in attrs.fields(Config))
_KINDS: dict[str, type] = {
    field.name: {"int": int, "int | None": int, "float": float, "tuple[str, ...]": tuple}.get(
        str(field.type), str
    )
    for field in attrs.fields(Config)
}


def _from_toml(key: str, value: object, source: str) -> object:
    kind = _KINDS[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is tuple and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    if type(value) is not kind:
        expected = {int: "an integer", float: "a number", str: "a string"}.get(
            kind, "a list of strings"
        )
        raise ConfigError(f"{key}: expected {expected}, got {value!r} (from {source})")
    return value


def _from_text(key: str, text: str, source: str) -> object:
    kind = _KINDS[key]
    if kind is tuple:
        return text  # comma-separated; the field's converter splits it
    try:
        return kind(text)
    except ValueError:
        expected = {int: "an integer", float: "a number"}[kind]
        raise ConfigError(f"{key}: expected {expected}, got {text!r} (from {source})") from None


def load_config(
    flags: Mapping[str, Any],
    *,
    flag_names: Mapping[str, str] | None = None,
    config_file: str | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> tuple[Config, dict[str, str]]:
    """Layer the sources into a :class:`Config`; also return where each key's value came from.

    ``flags`` holds the values given on the command line (keys of :class:`Config`; None means
    not given), ``flag_names`` the flag that set a key where it is not ``--KEY``. Raises
    :class:`ConfigError` naming the key and its source.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources = dict.fromkeys(KEYS, "default")

    path = Path(config_file) if config_file else (cwd or Path.cwd()) / DEFAULT_FILE
    if config_file or path.exists():
        for key, value in _read_toml(path).items():
            source = f"file {path}"
            if key not in KEYS:
                raise ConfigError(f"{key}: unknown setting (from {source})")
            values[key] = _from_toml(key, value, source)
            sources[key] = source

    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :].lower()
        source = f"environment {name}"
        if key not in KEYS:
            raise ConfigError(f"{name}: unknown setting (from the environment)")
        values[key] = _from_text(key, text, source)
        sources[key] = source

    for key, value in flags.items():
        if value is not None:
            values[key] = value
            sources[key] = f"flag {(flag_names or {}).get(key, '--' + key.replace('_', '-'))}"

    try:
        return Config(**values), sources
    except InvalidSetting as invalid:
        raise ConfigError(
            f"{invalid.key}: {invalid.problem} (from {sources[invalid.key]})"
        ) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except OSError as error:
        raise ConfigError(f"cannot read the configuration file {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from None
