"""A Trio client that reconnects by itself, rejoins its rooms and recovers what it missed.

    async with open_reconnecting_client("ws://127.0.0.1:8765/ws") as client:
        await client.join("lobby")
        async for item in client:
            match item:
                case {"type": "message"}:
                    print(item["room"], item["data"])
                case Unrecovered(room=room):
                    ...  # messages of `room` were missed: reload its state
                case _:
                    print(item)  # Connected, Disconnected, Recovered, RejoinFailed

A separate function from :func:`trio_fanout.client.open_client`, not an option of it, because
the two promise different things: ``open_client`` is one connection, whose end the caller sees
as ``ConnectionClosed``; this client outlives its connections, and says so in the items it
yields. Code written for one connection keeps its meaning.

One background task owns the connection: it reads every frame, hands replies to the requests
waiting for them, and puts messages and events, in arrival order, into a bounded buffer that
iteration reads. While the application does not read, the buffer fills, the task stops
reading, and the server eventually closes the slow connection (1013); the client then
reconnects and, on a version 2 server, recovers. Time spent waiting for the application does
not count as silence from the server.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
import random
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio
import trio_websocket

from trio_fanout.backplane._interface import unwrap_single_errors
from trio_fanout.client import Client, ServerError, open_client
from trio_fanout.protocol import CLOSE_UNAUTHENTICATED
from trio_fanout.resume import Backoff, Rejoin, RoomPositions

__all__ = [
    "Connected",
    "Disconnected",
    "Event",
    "Item",
    "NotConnected",
    "Reconnecting",
    "ReconnectingClient",
    "Recovered",
    "RejoinFailed",
    "ServerError",
    "TokenRequired",
    "TokenSource",
    "TokenUnavailable",
    "Unrecovered",
    "open_reconnecting_client",
]

logger = logging.getLogger(__name__)

Frame = dict[str, Any]

# Defaults of the backoff between connection attempts: the first retry comes within half a
# second (a worker restarted by its master is back in about that), and a long outage is probed
# every 20 s at most, so that thousands of clients do not hammer a server that is coming back.
BACKOFF_BASE = 0.5
BACKOFF_CAP = 20.0
# A connection that stayed up this long was a real one: the next loss starts the backoff again
# from its first step. A shorter one (a server that accepts and then closes at once) keeps
# the backoff growing.
STABLE_CONNECTION = 10.0
# The connection is believed dead after this many heartbeat intervals without any frame, and
# never sooner than the floor, so that a very short interval or a garbage-collection pause on
# either side is not mistaken for a dead server.
MISSED_HEARTBEATS = 3
SILENCE_FLOOR = 2.0
# A close handshake is one round trip; a peer that has not answered in this time is gone (a
# stopped worker never answers), and waiting longer only delays the reconnection.
CLOSE_TIMEOUT = 2.0
# Messages and events read but not yet taken by the application; as large as the server's
# queue for one client, so that the client is no slower to drain than the server to fill.
BUFFER_SIZE = 1000

# A token, or a function that returns a fresh one (plain or async): called before every
# connection attempt and on every ``token_expiring``.
TokenSource = str | Callable[[], str] | Callable[[], Awaitable[str]]


class TokenUnavailable(Exception):
    """The token function raised (its exception is the cause); a connection attempt that needs
    it fails, and is retried after a backoff like any other."""


class TokenRequired(Exception):
    """The server requires a token and the client has none: it closed the connection with 4001.

    Final: the client does not reconnect, since every attempt would be refused the same way.
    Raised by ``open_reconnecting_client`` when the first connection is refused so, and
    otherwise by iteration (``receive``) once the items before it have been taken, and by every
    request from then on.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"the server requires a token (it closed the connection with 4001: {reason}); "
            "give open_reconnecting_client a token"
        )
        self.reason = reason
        """The server's close reason, e.g. ``the first frame must be auth``."""


# How a connection attempt, or a connection, fails without being the application's fault.
_CONNECTION_ERRORS = (
    TokenUnavailable,
    OSError,
    trio.TooSlowError,
    trio.BrokenResourceError,
    trio_websocket.HandshakeError,
    trio_websocket.ConnectionClosed,
    ServerError,
    ValueError,  # a first frame that is not JSON
)


# Refusals of a rejoin that say "not now" rather than "no": the client drops the connection and
# tries again after a backoff, keeping the room and its position.
_PASSING_REFUSALS = frozenset({"backplane_unavailable", "rate_limited"})


class _RejoinLater(Exception):
    """A rejoin was refused for a passing reason: end this connection and try another."""


class NotConnected(Exception):
    """The request could not be made, or its reply will not come: the client is not connected.

    Raised at once by a request made while disconnected, and by a request waiting for its reply
    when the connection is lost. In the second case the server may or may not have acted on it.
    """


def _without_token(url: str) -> str:
    """``url`` as the client's log lines show it: a ``?token=`` in it (which a server takes
    too, though ``token=`` is the way meant for this client) is never written to a log."""
    parts = urllib.parse.urlsplit(url)
    if not parts.query:
        return url
    fields = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    query = "&".join(
        f"{name}=[redacted]" if name == "token" else urllib.parse.urlencode({name: value})
        for name, value in fields
    )
    return parts._replace(query=query).geturl()


@dataclass(frozen=True)
class Connected:
    """A connection is up (the first one, or a new one after a loss); rejoins follow."""

    worker: int
    pid: int
    welcome: Frame


@dataclass(frozen=True)
class Disconnected:
    """The connection was lost, or an attempt to connect was refused for the server's TLS
    certificate; the client is reconnecting. Requests raise NotConnected."""

    reason: str
    """Why, as a sentence for people, e.g. ``the server closed the connection with code 1001
    (going away): server shutting down``."""
    code: int | None = None
    """The close code (a plain ``int``), where the connection ended with one."""


@dataclass(frozen=True)
class Reconnecting:
    """The client waits ``delay`` seconds, then makes connection attempt ``attempt``: 1 for the
    first after a loss, counted on while attempts fail or connections end soon after they open
    (see "Reconnecting" in docs/library.md). Like the browser client's ``reconnecting``, so that
    an application can say "reconnecting in 3 s"."""

    attempt: int
    delay: float


@dataclass(frozen=True)
class Recovered:
    """A room was rejoined and every message missed follows, in order, before any later one."""

    room: str
    joined: Frame


@dataclass(frozen=True)
class Unrecovered:
    """A room was rejoined, but the messages missed meanwhile will not follow: reload its state.

    Always the case with a version 1 server, which keeps no history.
    """

    room: str
    joined: Frame


@dataclass(frozen=True)
class RejoinFailed:
    """The server refused to rejoin a room (e.g. ``forbidden``); the client is no longer in it."""

    room: str
    error: ServerError


Event = Connected | Disconnected | Reconnecting | Recovered | Unrecovered | RejoinFailed
# What iteration yields: a ``message`` frame (a dict, as the server sent it) or an event.
Item = Frame | Event


@dataclass
class _Pending:
    """A request waiting for its reply, which the background task fills in."""

    request: Frame
    reply_type: str
    done: trio.Event = field(default_factory=trio.Event)
    reply: Frame | None = None
    error: Exception | None = None
    rejoin: bool = False
    """A rejoin after a reconnection: nobody waits for it; its outcome is an event."""
    background: bool = False
    """A refresh the client makes by itself: nobody waits for it."""


class ReconnectingClient:
    """A client that outlives its connections; see :func:`open_reconnecting_client`."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float,
        request_timeout: float,
        backoff_base: float,
        backoff_cap: float,
        rng: random.Random,
        token: TokenSource | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.url = url
        self._url_in_logs = _without_token(url)
        self._token = token
        self._ssl_context = ssl_context
        self._connect_timeout = connect_timeout
        self._request_timeout = request_timeout
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._rng = rng
        self._connection: Client | None = None
        self._positions = RoomPositions()
        self._pending: dict[int, _Pending] = {}
        # One sequence for the client's whole life, so that a late reply on an old connection
        # can never match a request made on a new one.
        self._ids = itertools.count(1)
        self._items_in, self._items_out = trio.open_memory_channel[Item](BUFFER_SIZE)
        # Set when the client has stopped for good: the close reason of the 4001 that stopped it.
        self._refused_for_token: str | None = None

    # ---- what the application sees -------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connection is not None

    @property
    def welcome(self) -> Frame | None:
        """The current connection's ``welcome`` frame; None while disconnected."""
        return None if self._connection is None else self._connection.welcome

    @property
    def rooms(self) -> list[str]:
        """The rooms this client is in, and rejoins after each reconnection."""
        return self._positions.rooms

    async def receive(self) -> Item:
        """The next ``message`` frame or event, in arrival order.

        Raises TokenRequired, after the items before it, once the client has stopped for good.
        """
        try:
            return await self._items_out.receive()
        except trio.EndOfChannel:
            assert self._refused_for_token is not None
            raise TokenRequired(self._refused_for_token) from None

    # An iterator rather than an async generator: leaving an ``async for`` early then leaves
    # nothing to finalise (Trio warns about async generators left unfinished).
    def __aiter__(self) -> ReconnectingClient:
        return self

    async def __anext__(self) -> Item:
        return await self.receive()

    async def join(self, room: str) -> Frame:
        """Join ``room``, now and after every reconnection; returns the ``joined`` frame."""
        return await self._request({"type": "join", "room": room}, "joined")

    async def leave(self, room: str) -> None:
        await self._request({"type": "leave", "room": room}, "left")

    async def publish(
        self, room: str, data: Any, *, echo: bool = True, ack: bool = False
    ) -> int | None:
        """Publish ``data`` to ``room``; with ``ack``, wait for the server and return the offset.

        The offset is the one the room gave the message (version 2); None from a version 1
        server, or without ``ack``. Raises NotConnected at once while disconnected: a publish is
        never kept for later, since the application is the one to know whether it still makes
        sense after an outage.
        """
        frame: Frame = {"type": "publish", "room": room, "data": data}
        if not echo:
            frame["echo"] = False
        if not ack:
            await self._send(self._current_connection(), frame)
            return None
        reply = await self._request(frame, "ack")
        offset = reply.get("offset")
        return offset if isinstance(offset, int) else None

    async def history(
        self, room: str, since: Frame | None = None, limit: int | None = None
    ) -> Frame:
        """The messages ``room`` keeps (version 2), as the server's ``history`` reply.

        ``since`` is ``{"epoch": E, "offset": O}``; the reply's ``messages`` are oldest first.
        A version 1 server refuses with ServerError ``unknown_type``.
        """
        frame: Frame = {"type": "history", "room": room}
        if since is not None:
            frame["since"] = since
        if limit is not None:
            frame["limit"] = limit
        return await self._request(frame, "history")

    async def ping(self) -> None:
        await self._request({"type": "ping"}, "pong")

    # ---- requests ------------------------------------------------------------------------

    def _current_connection(self) -> Client:
        if self._refused_for_token is not None:
            raise TokenRequired(self._refused_for_token)
        if self._connection is None:
            raise NotConnected("not connected; the client is reconnecting")
        return self._connection

    async def _send(self, connection: Client, frame: Frame) -> None:
        try:
            await connection.send(frame)
        except trio_websocket.ConnectionClosed as closed:
            raise NotConnected("the connection was lost") from closed

    async def _request(self, frame: Frame, reply_type: str) -> Frame:
        """Send a request and wait, at most ``request_timeout``, for the reply with its id."""
        connection = self._current_connection()
        request_id = frame["id"] = next(self._ids)
        pending = self._pending[request_id] = _Pending(frame, reply_type)
        try:
            await self._send(connection, frame)
            with trio.fail_after(self._request_timeout):
                await pending.done.wait()
        finally:
            self._pending.pop(request_id, None)
        if pending.error is not None:
            raise pending.error
        assert pending.reply is not None
        return pending.reply

    # ---- the background task -------------------------------------------------------------

    async def _maintain(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep a connection up until cancelled: connect, serve, and after a loss, back off.

        The first connection's failure is the caller's, as with ``open_client``: a wrong URL or
        a refused handshake raises from ``open_reconnecting_client``. Later failures are retried,
        except a refusal for want of a token, which stops the client (TokenRequired).
        """
        started = False
        backoff = Backoff(
            base=self._backoff_base,
            cap=self._backoff_cap,
            stable_after=STABLE_CONNECTION,
            rng=self._rng,
        )
        while True:
            up_since: float | None = None
            failure: Exception | None = None
            code: int | None = None
            try:
                token = await self._fresh_token()
                async with open_client(
                    self.url,
                    connect_timeout=self._connect_timeout,
                    close_timeout=CLOSE_TIMEOUT,
                    token=token,
                    ssl_context=self._ssl_context,
                ) as connection:
                    try:
                        if token is None:
                            # A server that requires tokens answers nothing before the token,
                            # not even heartbeats, and closes 4001 at the first other frame: a
                            # ping tells at once, where silence would look like a dead server.
                            with trio.fail_after(self._connect_timeout):
                                await connection.ping()
                        if not started:
                            task_status.started()
                            started = True
                        up_since = trio.current_time()
                        reason = await self._serve(connection)
                    except trio_websocket.ConnectionClosed as closed:
                        # Caught in here: leaving open_client's nursery while this task is
                        # cancelled, it would come out grouped with the Cancelled.
                        failure = closed
                        reason, code = _describe_failure(closed, self._connect_timeout)
            except _CONNECTION_ERRORS as error:
                failure = error
                reason, code = _describe_failure(error, self._connect_timeout)
            if code == CLOSE_UNAUTHENTICATED and self._token is None:
                # Every attempt would be refused the same way: stop for good, and say why.
                assert isinstance(failure, trio_websocket.ConnectionClosed)
                refused = TokenRequired((failure.reason and failure.reason.reason) or reason)
                if not started:
                    raise refused from failure
                logger.warning("stopped reconnecting to %s: %s", self._url_in_logs, refused)
                if up_since is not None:
                    await self._items_in.send(Disconnected(reason, code))
                self._refused_for_token = refused.reason
                self._items_in.close()
                return
            if failure is not None and not started:
                raise failure
            if up_since is not None:
                backoff.connection_ended(trio.current_time() - up_since)
                logger.info("disconnected from %s: %s", self._url_in_logs, reason)
                await self._items_in.send(Disconnected(reason, code))
            elif isinstance(failure, ssl.SSLError):
                # Not a server that is away but one the client will not talk to: the
                # application hears of it on every attempt, and the client keeps trying (the
                # certificate, or the context that checks it, may yet be replaced).
                logger.warning("could not connect to %s: %s", self._url_in_logs, reason)
                await self._items_in.send(Disconnected(reason, None))
            else:
                logger.info("could not connect to %s: %s", self._url_in_logs, reason)
            delay = backoff.next_delay()
            logger.debug("reconnecting to %s in %.3f s", self._url_in_logs, delay)
            await self._items_in.send(Reconnecting(backoff.attempt, delay))
            await trio.sleep(delay)

    async def _serve(self, connection: Client) -> str:
        """Announce the connection, rejoin every room, and read until the connection ends.

        Returns why it ended where the client gave it up; a close raises ``ConnectionClosed``.
        """
        self._connection = connection
        try:
            await self._items_in.send(
                Connected(connection.worker, connection.pid, connection.welcome)
            )
            for room in self._positions.rooms:
                await self._rejoin(connection, room)
            silence_limit = _silence_limit(connection.welcome)
            while True:
                with trio.move_on_after(silence_limit) as silence:
                    frame = await connection.receive(heartbeats=True)
                if silence.cancelled_caught:
                    return f"no frame from the server for {silence_limit:g} s"
                await self._dispatch(frame)
        except _RejoinLater as later:
            return str(later)
        finally:
            self._connection = None
            for pending in self._pending.values():
                pending.error = NotConnected("the connection was lost before the reply")
                pending.done.set()
            self._pending.clear()

    async def _fresh_token(self) -> str | None:
        """The token for the next connection or refresh, from the application; at most
        ``request_timeout`` for a token function (it runs in the task that reads frames)."""
        if self._token is None or isinstance(self._token, str):
            return self._token
        try:
            with trio.fail_after(self._request_timeout):
                token = self._token()
                if inspect.isawaitable(token):
                    token = await token
        except Exception as error:
            raise TokenUnavailable(f"the token function failed: {error!r}") from error
        if not isinstance(token, str) or not token:
            raise TokenUnavailable("the token function returned no token (a non-empty str)")
        return token

    async def _refresh(self, connection: Client) -> None:
        """Answer ``token_expiring`` with a fresh token. Nobody waits for the answer: a refused
        refresh is logged, and the server closes the connection at the old token's ``exp``
        (4001); the client then reconnects with a fresh token."""
        try:
            token = await self._fresh_token()
        except TokenUnavailable as unavailable:
            logger.warning("cannot refresh the token: %s", unavailable)
            return
        if token is None:
            return  # no token was configured: a server that asks has nothing to get
        frame: Frame = {"type": "refresh", "token": token, "id": next(self._ids)}
        self._pending[frame["id"]] = _Pending(frame, "authed", background=True)
        await connection.send(frame)

    async def _rejoin(self, connection: Client, room: str) -> None:
        frame: Frame = {"type": "join", "room": room, "id": next(self._ids)}
        since = self._positions.since(room)
        if since is not None:
            frame["since"] = since
        self._pending[frame["id"]] = _Pending(frame, "joined", rejoin=True)
        await connection.send(frame)

    async def _dispatch(self, frame: Frame) -> None:
        """Route one frame: a reply to its request, a message or event to the application."""
        kind = frame.get("type")
        request_id = frame.get("id")
        pending = self._pending.get(request_id) if isinstance(request_id, int) else None
        if pending is not None and kind in (pending.reply_type, "error"):
            del self._pending[frame["id"]]
            await self._settle(pending, frame)
        elif kind == "message":
            if self._positions.deliver(frame):
                await self._items_in.send(frame)
        elif kind == "token_expiring" and self._connection is not None:
            await self._refresh(self._connection)
        elif kind == "joined" and "id" not in frame and frame.get("room") in self._positions.rooms:
            # Version 2: the room's numbering started again (its sequencer restarted, or its
            # history expired), or the server missed messages it could not read back; those
            # may be lost, the ones after the joined's offset follow.
            self._positions.renumbered(frame)
            await self._items_in.send(Unrecovered(frame["room"], frame))
        elif kind == "error":
            # The error of a publish without ack, which nobody waits for.
            logger.warning("the server refused a request: %s", frame)

    async def _settle(self, pending: _Pending, reply: Frame) -> None:
        request = pending.request
        if pending.rejoin:
            await self._settle_rejoin(request["room"], reply)
            return
        if pending.background:
            if reply["type"] == "error":
                logger.warning("the server refused the refreshed token: %s", reply.get("message"))
            return
        if reply["type"] == "error":
            pending.error = ServerError(reply)
        else:
            pending.reply = reply
            # Here, in the reading task, and not in the requester's: the messages that follow
            # a `joined` must meet the room's new position.
            if request["type"] == "join":
                self._positions.joined(reply)
            elif request["type"] == "leave":
                self._positions.left(request["room"])
        pending.done.set()

    async def _settle_rejoin(self, room: str, reply: Frame) -> None:
        if reply["type"] == "error" and reply.get("code") in _PASSING_REFUSALS:
            raise _RejoinLater(f"rejoin of {room!r} refused for now: {reply.get('code')}")
        if reply["type"] == "error":
            self._positions.left(room)
            logger.warning("could not rejoin room %r: %s", room, reply)
            await self._items_in.send(RejoinFailed(room, ServerError(reply)))
        elif self._positions.rejoined(reply) is Rejoin.RECOVERED:
            await self._items_in.send(Recovered(room, reply))
        else:
            await self._items_in.send(Unrecovered(room, reply))


def _describe_close(close: trio_websocket.CloseReason | None) -> tuple[str, int | None]:
    """A close as a sentence for people, and its code as a plain ``int`` (trio-websocket gives
    an enum member for the codes RFC 6455 names, an ``int`` for the others)."""
    if close is None:
        return "the connection ended without a close code", None
    code = int(close.code)
    if code == 1006:
        return "the connection was lost without a close handshake (code 1006)", code
    # The names RFC 6455 gives its codes; a private code (4000-4999) has none, its reason says.
    known = not close.name.endswith("_RESERVED") and close.name != "INVALID_CODE"
    name = f" ({close.name.lower().replace('_', ' ')})" if known else ""
    sentence = f"the server closed the connection with code {code}{name}"
    return (f"{sentence}: {close.reason}" if close.reason else sentence), code


def _describe_failure(error: Exception, connect_timeout: float) -> tuple[str, int | None]:
    """Why a connection attempt or a connection failed, as a sentence, and the close code where
    there was one."""
    if isinstance(error, trio_websocket.ConnectionClosed):
        return _describe_close(error.reason)
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"the server's TLS certificate was refused: {error.verify_message}", None
    if isinstance(error, ssl.SSLError):
        return f"the TLS handshake failed: {error.reason or error}", None
    if isinstance(error, trio_websocket.ConnectionRejected):
        body = error.body.decode(errors="replace").strip() if error.body else ""
        refused = f"the server refused the handshake with HTTP {error.status_code}"
        return (f"{refused}: {body}" if body else refused), None
    if isinstance(error, trio.TooSlowError):
        return f"no answer from the server within {connect_timeout:g} s", None
    if isinstance(error, TokenUnavailable | ServerError):
        return str(error), None
    if isinstance(error, OSError):
        return f"could not connect: {error.strerror or error}", None
    return f"{type(error).__name__}: {error}", None


def _silence_limit(welcome: Frame) -> float:
    """How long without any frame means the connection is dead; forever without heartbeats."""
    interval = welcome.get("heartbeat_interval")
    if not isinstance(interval, int | float) or interval <= 0:
        return math.inf
    return max(MISSED_HEARTBEATS * interval, SILENCE_FLOOR)


@asynccontextmanager
async def open_reconnecting_client(
    url: str,
    *,
    connect_timeout: float = 10.0,
    request_timeout: float = 10.0,
    backoff_base: float = BACKOFF_BASE,
    backoff_cap: float = BACKOFF_CAP,
    rng: random.Random | None = None,
    token: TokenSource | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[ReconnectingClient]:
    """Connect to ``url`` and keep connected until the block ends; see the module docstring.

    Returns once the first connection is up (its failure raises, as from ``open_client``).
    ``connect_timeout`` bounds each connection attempt; ``request_timeout`` each request's wait
    for its reply (``trio.TooSlowError``). ``backoff_base`` and ``backoff_cap`` (seconds) shape
    the waits between attempts; ``rng`` draws their jitter (seed one to make it repeatable).

    ``token``, for a server that requires tokens: a token, or a function (plain or async) that
    returns a fresh one, called before every connection attempt and whenever the server sends
    ``token_expiring``. It is sent as the first frame (``auth``) and as ``refresh``, never in
    the URL, where proxies and servers would log it. Without ``token``, the client pings on
    every connection before it counts as up, so that a server that requires a token says so at
    once (a close with 4001): that raises, or stops the client, with TokenRequired.

    ``ssl_context`` checks a ``wss://`` server's certificate on every connection (by default,
    against the system's CAs); a certificate it refuses raises ``ssl.SSLCertVerificationError``
    at the first connection, and is reported as ``Disconnected`` at later ones.
    """
    for name, value in (
        ("connect_timeout", connect_timeout),
        ("request_timeout", request_timeout),
        ("backoff_base", backoff_base),
    ):
        if not value > 0:
            raise ValueError(f"{name} must be greater than 0, not {value!r}")
    if not backoff_cap >= backoff_base:
        raise ValueError(f"backoff_cap must be at least backoff_base, not {backoff_cap!r}")
    client = ReconnectingClient(
        url,
        connect_timeout=connect_timeout,
        request_timeout=request_timeout,
        backoff_base=backoff_base,
        backoff_cap=backoff_cap,
        rng=rng or random.Random(),
        token=token,
        ssl_context=ssl_context,
    )
    with unwrap_single_errors():
        async with trio.open_nursery() as nursery:
            await nursery.start(client._maintain)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
