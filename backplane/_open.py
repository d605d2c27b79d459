"""Pick and open a backend from a URL."""

from __future__ import annotations

import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs

from trio_fanout.backplane._credentials import BadCredentials, Credentials, load_client_keys
from trio_fanout.backplane._interface import Backplane, BadBackplaneURL, HistoryPolicy

SCHEMES = ("memory", "zmq", "redis", "rediss")
DEFAULT_ZMQ_PORT = 5559
DEFAULT_REDIS_PORT = 6379
# Query parameters a redis:// or rediss:// URL may carry.
REDIS_OPTIONS = ("ssl_ca_certs",)


@attrs.frozen
class BackplaneAddress:
    """A parsed backplane URL."""

    scheme: str
    host: str = ""
    port: int = 0
    name: str = ""
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)  # never in a log
    db: int = 0
    ssl_ca_certs: str | None = None
    """A CA bundle to check the server's certificate with (rediss://); default: the system's."""
    password_file: str | None = None
    """Where the password is (read at each connection), instead of ``password``."""

    @property
    def tls(self) -> bool:
        return self.scheme == "rediss"


def redact_url(url: str) -> str:
    """``url`` with the password in it, if any, replaced by ``***``: what logs, error messages
    and ``trio-fanout config`` show. Everything between the scheme and the last ``@`` before
    the query is user information, so a password with an unescaped ``/`` or ``@`` in it is
    hidden too."""
    scheme, separator, rest = url.partition("://")
    before_query, question, query = rest.partition("?")
    user_info, at, host = before_query.rpartition("@")
    if not separator or not at or ":" not in user_info:
        return url
    user = user_info.partition(":")[0]
    return f"{scheme}://{user}:***@{host}{question}{query}"


def parse_backplane_url(url: str) -> BackplaneAddress:
    """Check ``url`` and split it; raises :class:`BadBackplaneURL` with the reason (which
    shows the URL with its password redacted)."""
    try:
        return _parse_backplane_url(url)
    except BadBackplaneURL as error:
        if isinstance(url, str) and url != _redact_refused_url(url):
            shown = repr(_redact_refused_url(url))
            raise BadBackplaneURL(str(error).replace(repr(url), shown)) from None
        raise


def _redact_refused_url(url: str) -> str:
    """``url``, which did not parse, as an error message may show it. Where it went wrong is
    not known, so more is hidden than :func:`redact_url` hides: user information up to the
    last ``@`` even past a ``?`` (a password with a ``?`` in it), and the value of every query
    parameter but the known options (``?password=...`` is no option, but it is a secret)."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        return url
    user_info, at, rest = rest.rpartition("@")
    if at and ":" in user_info:
        rest = f"{user_info.partition(':')[0]}:***@{rest}"
    elif at:
        rest = f"{user_info}@{rest}"
    before_query, question, query = rest.partition("?")
    if question:
        shown = []
        for parameter in query.split("&"):
            name, equals, _ = parameter.partition("=")
            hidden = equals and name not in REDIS_OPTIONS
            shown.append(f"{name}=***" if hidden else parameter)
        query = "&".join(shown)
    return f"{scheme}://{before_query}{question}{query}"


def _parse_backplane_url(url: str) -> BackplaneAddress:
    if not isinstance(url, str) or "://" not in url:
        raise BadBackplaneURL(f"{url!r} is not a URL like zmq://127.0.0.1:5559 or memory://name")
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as error:  # e.g. an unclosed [ around an IPv6 address
        raise BadBackplaneURL(f"{url!r} is not a valid URL: {error}") from None
    if parts.scheme == "memory":
        return BackplaneAddress("memory", name=parts.netloc + parts.path)
    if parts.scheme == "zmq":
        try:
            port = DEFAULT_ZMQ_PORT if parts.port is None else parts.port
        except ValueError:
            raise BadBackplaneURL(
                f"{url!r} has a port that is not a number from 1 to 65535"
            ) from None
        if not parts.hostname:
            raise BadBackplaneURL(f"{url!r} names no host (zmq://HOST:PORT)")
        if not 1 <= port <= 65535:
            raise BadBackplaneURL(f"{url!r}: the port must be from 1 to 65535")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            raise BadBackplaneURL(f"{url!r}: a zmq URL is only zmq://HOST:PORT")
        return BackplaneAddress("zmq", host=parts.hostname, port=port)
    if parts.scheme in ("redis", "rediss"):
        return _parse_redis_url(url, parts)
    raise BadBackplaneURL(
        f"{url!r} has an unknown scheme {parts.scheme!r}; known: {', '.join(SCHEMES)}"
    )


def _parse_redis_url(url: str, parts: urllib.parse.SplitResult) -> BackplaneAddress:
    """``redis[s]://[[user]:password@]HOST[:PORT][/DB][?ssl_ca_certs=PATH]``"""
    try:
        port = DEFAULT_REDIS_PORT if parts.port is None else parts.port
    except ValueError:
        raise BadBackplaneURL(f"{url!r} has a port that is not a number from 1 to 65535") from None
    if not parts.hostname:
        raise BadBackplaneURL(f"{url!r} names no host (redis://HOST:PORT)")
    if not 1 <= port <= 65535:
        raise BadBackplaneURL(f"{url!r}: the port must be from 1 to 65535")
    db_text = parts.path.lstrip("/")
    if db_text and not db_text.isdigit():
        raise BadBackplaneURL(f"{url!r}: the database after the host must be a number")
    if parts.fragment:
        # Not shown: an unescaped # in a password starts the fragment, which then holds the
        # rest of the password.
        raise BadBackplaneURL(
            f"{url!r}: a URL fragment (#...) is no option; a # in a password is written %23"
        )
    options = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(options) - set(REDIS_OPTIONS))
    if unknown:
        raise BadBackplaneURL(
            f"{url!r}: unknown option {', '.join(unknown)}; known: {', '.join(REDIS_OPTIONS)}"
        )
    ca_certs = options.get("ssl_ca_certs", [None])[-1]
    if ca_certs is not None and parts.scheme != "rediss":
        raise BadBackplaneURL(f"{url!r}: ssl_ca_certs needs rediss://")
    unquote = urllib.parse.unquote
    return BackplaneAddress(
        parts.scheme,
        host=parts.hostname,
        port=port,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        db=int(db_text or 0),
        ssl_ca_certs=ca_certs,
    )


@asynccontextmanager
async def open_backplane(
    url: str, *, history: HistoryPolicy | None = None, credentials: Credentials | None = None
) -> AsyncIterator[Backplane]:
    """Open the backend that ``url`` names; it is closed when the ``async with`` block ends.

    ``history`` (default: ``HistoryPolicy()``) is what the topics' sequencer keeps for memory://
    (the first backplane to open a name sets it) and redis:// (applied at each append, and
    recorded with the topic; without it, a redis:// backplane applies the policy recorded for
    the topic, so that an emitter never changes what the workers keep). A zmq:// backplane
    ignores it: its sequencer is the proxy, which applies the policy it was started with.
    ``credentials`` names the files of the secrets: the Redis password (which the URL must not
    carry then), or CURVE keys for zmq://. Raises :class:`BadCredentials` when a file
    cannot be read or does not hold what it should.
    """
    address = parse_backplane_url(url)
    credentials = credentials or Credentials()
    if credentials.password_file is not None:
        if address.scheme not in ("redis", "rediss"):
            raise BadCredentials("a password file is for redis:// and rediss:// backplanes")
        if address.password is not None:
            raise BadCredentials("the backplane URL has a password, and a password file is given")
        address = attrs.evolve(address, password_file=credentials.password_file)
    if address.scheme == "memory":
        from trio_fanout.backplane.memory import open_memory_backplane

        async with open_memory_backplane(address.name, history) as memory_backplane:
            yield memory_backplane
    elif address.scheme == "zmq":
        from trio_fanout.backplane.zmq import open_zmq_backplane

        curve = load_client_keys(credentials)
        async with open_zmq_backplane(address.host, address.port, curve) as zmq_backplane:
            yield zmq_backplane
    else:
        from trio_fanout.backplane.redis import open_redis_backplane

        async with open_redis_backplane(address, history) as redis_backplane:
            yield redis_backplane
