"""A small Trio client for trio-fanout, built on trio-websocket.

    async with open_client("ws://127.0.0.1:8765/ws") as client:
        await client.join("lobby")
        await client.publish("lobby", {"text": "hi"})
        async for message in client:
            print(message["room"], message["data"])

Requests that expect a reply (``join``, ``leave``, ``publish`` with ``ack=True``, ``ping``) wait
for it and raise :class:`ServerError` if the server answers with an ``error`` frame instead.
Frames that arrive meanwhile are kept, in order, for :meth:`Client.receive` and iteration.
"""

from __future__ import annotations

import itertools
import json
import ssl
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio_websocket

# Shared with the backplane package, which needs the same for its own nurseries.
from trio_fanout.backplane._interface import unwrap_single_errors

Frame = dict[str, Any]

# What trio-websocket's client can run over: plain TCP, or TLS over TCP.
_ClientStream = trio.SocketStream | trio.SSLStream[trio.SocketStream]


class ServerError(Exception):
    """The server refused a request with an ``error`` frame."""

    def __init__(self, frame: Frame) -> None:
        super().__init__(f"{frame.get('code')}: {frame.get('message')}")
        self.code: str = frame.get("code", "")
        self.frame = frame


class Client:
    """One connection to a trio-fanout server; see :func:`open_client`."""

    def __init__(self, ws: trio_websocket.WebSocketConnection, welcome: Frame) -> None:
        self.ws = ws
        self.welcome = welcome
        # The server's answer to our token (``sub`` and ``exp``), where we gave one.
        self.authed: Frame | None = None
        self.worker: int = welcome["worker"]
        self.pid: int = welcome["pid"]
        self._unread: deque[Frame] = deque()
        self._ids = itertools.count(1)

    async def send(self, frame: Frame) -> None:
        """Send one frame as JSON, without waiting for any reply."""
        await self.ws.send_message(json.dumps(frame))

    async def _next_frame(self) -> Frame:
        frame: Frame = json.loads(await self.ws.get_message())
        return frame

    async def receive(self, *, heartbeats: bool = False) -> Frame:
        """The next frame from the server, heartbeats left out unless asked for."""
        while True:
            frame = self._unread.popleft() if self._unread else await self._next_frame()
            if heartbeats or frame.get("type") != "heartbeat":
                return frame

    async def _request(self, frame: Frame, is_reply: Callable[[Frame], bool]) -> Frame:
        request_id = frame["id"] = next(self._ids)
        await self.send(frame)
        while True:
            reply = await self._next_frame()
            if reply.get("id") == request_id and reply.get("type") == "error":
                raise ServerError(reply)
            if reply.get("id") == request_id and is_reply(reply):
                return reply
            self._unread.append(reply)

    async def join(self, room: str) -> None:
        """Join ``room``; on return, every message published to it from now on reaches us."""
        await self._request({"type": "join", "room": room}, lambda f: f["type"] == "joined")

    async def leave(self, room: str) -> None:
        await self._request({"type": "leave", "room": room}, lambda f: f["type"] == "left")

    async def publish(self, room: str, data: Any, *, echo: bool = True, ack: bool = False) -> None:
        """Publish ``data`` to ``room``; with ``ack``, wait until the server has handed it on."""
        frame: Frame = {"type": "publish", "room": room, "data": data}
        if not echo:
            frame["echo"] = False
        if ack:
            await self._request(frame, lambda f: f["type"] == "ack")
        else:
            await self.send(frame)

    async def ping(self) -> None:
        await self._request({"type": "ping"}, lambda f: f["type"] == "pong")

    async def refresh(self, token: str) -> Frame:
        """Replace this connection's token (on ``token_expiring``); returns ``authed``."""
        self.authed = await self._request(
            {"type": "refresh", "token": token}, lambda f: f["type"] == "authed"
        )
        return self.authed

    async def _authenticate(self, token: str) -> None:
        """Send ``auth`` as the first frame and wait for ``authed``; a refused token ends in
        ``ConnectionClosed`` (code 4001)."""
        self.authed = await self._request(
            {"type": "auth", "token": token}, lambda f: f["type"] == "authed"
        )

    async def __aiter__(self) -> AsyncIterator[Frame]:
        """The ``message`` frames, in arrival order (other frames are skipped)."""
        while True:
            frame = await self.receive()
            if frame.get("type") == "message":
                yield frame


async def _open_tls_stream(
    host: str, port: int, ssl_context: ssl.SSLContext | None
) -> trio.SSLStream[trio.SocketStream]:
    """A TLS stream whose handshake is done: a certificate the client refuses raises here, at
    once, as the ``ssl.SSLError`` that says why (``SSLCertVerificationError``, an ``OSError``).

    Left to trio-websocket, the handshake would happen in its own task, which loses the error:
    the caller would wait for the whole connect timeout and learn nothing.
    """
    stream = await trio.open_ssl_over_tcp_stream(
        host, port, https_compatible=True, ssl_context=ssl_context
    )
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as broken:
        await trio.aclose_forcefully(stream)
        cause = broken.__cause__
        if isinstance(cause, ssl.SSLError):
            cause.add_note(f"in the TLS handshake with {host}:{port}")
            raise cause from None
        raise OSError(f"the TLS handshake with {host}:{port} failed: {broken}") from broken
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


@asynccontextmanager
async def open_client(
    url: str,
    *,
    connect_timeout: float = 10.0,
    close_timeout: float | None = None,
    token: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[Client]:
    """Connect to ``url`` (``ws://HOST:PORT/ws`` or ``wss://…``) and wait for the welcome.

    ``connect_timeout`` bounds the connection, the handshake and the welcome (and the token's
    ``authed``), and the close unless ``close_timeout`` is given (a connection known to be dead
    needs no long close). ``token``, for a server that requires tokens, is sent as the first
    frame (``auth``), not in the URL, where proxies and servers would log it. ``ssl_context``
    verifies a ``wss://`` server (by default, against the system's CAs).
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"{url!r} is not a ws:// or wss:// URL")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    resource = parts.path or "/"
    if parts.query:
        resource += "?" + parts.query
    # trio-websocket's reader runs in this nursery; what leaves it comes out as itself, not in
    # an ExceptionGroup, so that callers can catch ConnectionRejected, or their own errors.
    with unwrap_single_errors():
        async with trio.open_nursery() as nursery:
            with trio.fail_after(connect_timeout):
                if secure:
                    stream: _ClientStream = await _open_tls_stream(
                        parts.hostname, port, ssl_context
                    )
                else:
                    stream = await trio.open_tcp_stream(parts.hostname, port)
            # We own the TCP stream and close it ourselves: trio-websocket 0.12 leaves it open
            # when the server goes away without a close handshake.
            async with stream:
                with trio.fail_after(connect_timeout):
                    ws = await trio_websocket.wrap_client_stream(
                        nursery, stream, parts.hostname, resource
                    )
                    welcome = json.loads(await ws.get_message())
                try:
                    if welcome.get("type") != "welcome":
                        raise ServerError(
                            {"code": "bad_frame", "message": f"expected welcome, got {welcome}"}
                        )
                    client = Client(ws, welcome)
                    if token is not None:
                        with trio.fail_after(connect_timeout):
                            await client._authenticate(token)
                    yield client
                finally:
                    close_bound = connect_timeout if close_timeout is None else close_timeout
                    with trio.move_on_after(close_bound) as cleanup:
                        cleanup.shield = True
                        await ws.aclose()
