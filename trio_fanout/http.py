"""Plain HTTP on the WebSocket port: the health check, the demo page, the browser client, and
the refusals.

A request that is not a WebSocket upgrade to ``/ws`` gets one complete answer here, after which
the connection closes (no keep-alive: these requests are rare, and a closed connection frees its
slot at once). Pure: a parsed request in, response bytes out; the connection does the I/O.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable

from trio_fanout import websocket

_STATIC = importlib.resources.files("trio_fanout").joinpath("static")

# The demo chat page every worker serves at "/", read once.
CHAT_PAGE = _STATIC.joinpath("chat.html").read_bytes()

# The browser client (an ES module) and its TypeScript declarations, read once. Any origin may
# load them: a page opened from disk, or served by another site, imports the module across
# origins, and module scripts are always fetched with CORS. They hold nothing secret.
STATIC_FILES = {
    "/client.js": (_STATIC.joinpath("client.js").read_bytes(), "text/javascript; charset=utf-8"),
    "/client.d.ts": (
        _STATIC.joinpath("client.d.ts").read_bytes(),
        "application/typescript; charset=utf-8",
    ),
}
_ANY_ORIGIN = [("Access-Control-Allow-Origin", "*")]

# What a worker at max_connections tells the client (and a load balancer) in Retry-After: a slot
# frees only when a client leaves, which takes a while at full load; a few seconds lets a
# balancer try another worker first without making a retrying client wait long.
RETRY_AFTER_SECONDS = 5


def plain_response(
    request: websocket.Request, health: Callable[[], tuple[int, bytes]]
) -> bytes | None:
    """The answer to ``request`` if it is plain HTTP, or None if it is for the WebSocket at
    ``/ws`` (whose handshake may still be refused, see :func:`refusal_response`);
    ``HandshakeError`` 404 for any other path. ``health`` gives the status and body of
    ``/healthz``."""
    if request.path == "/healthz" and request.method == "GET":
        status, body = health()
        return websocket.http_response(status, body, "application/json")
    if request.path == "/" and request.method == "GET":
        return websocket.http_response(200, CHAT_PAGE, "text/html; charset=utf-8")
    if request.path in STATIC_FILES and request.method == "GET":
        body, content_type = STATIC_FILES[request.path]
        return websocket.http_response(200, body, content_type, headers=_ANY_ORIGIN)
    if request.path != "/ws":
        # Raised, not answered here: the connection answers and counts refusals in one place.
        raise websocket.HandshakeError(404, "not found: the WebSocket is at /ws")
    return None


class OriginRefused(websocket.HandshakeError):
    """403: the page's ``Origin`` is not in ``allowed_origins``."""

    def __init__(self, origin: str) -> None:
        super().__init__(403, "this origin may not connect")
        self.origin = origin


class TokenRefused(websocket.HandshakeError):
    """401 (or 400 for two): the ``?token=`` of the handshake is refused; the message says
    why, never the token."""


class HookRefused(websocket.HandshakeError):
    """403: an embedded worker's ``authenticate`` hook refused the handshake."""


def check_origin(request: websocket.Request, allowed_origins: tuple[str, ...]) -> None:
    """Refuse with 403 an upgrade from a page whose ``Origin`` is not in ``allowed_origins``
    (when that is set). A request without ``Origin`` comes from a program, not a browser page,
    and passes: the setting protects users' browsers from other sites' pages, nothing more."""
    origin = request.headers.get("origin")
    if allowed_origins and origin is not None and origin.lower() not in allowed_origins:
        raise OriginRefused(origin)


def plain_http_to_tls_port_response() -> bytes:
    """The answer to a plain HTTP request (``ws://``, ``http://``) on a port that speaks TLS,
    sent in plain HTTP so that the client can show why."""
    return websocket.http_response(400, b"this port speaks TLS: use wss:// or https://\n")


def refusal_response(refusal: websocket.HandshakeError) -> bytes:
    """The answer to a request refused with ``refusal``: its status, its message as the body,
    for 503 (this worker is full) a ``Retry-After``, and for 401 (a bad token) the
    ``WWW-Authenticate`` that RFC 9110 requires with it."""
    headers = []
    if refusal.status == 503:
        headers.append(("Retry-After", str(RETRY_AFTER_SECONDS)))
    elif refusal.status == 401:
        headers.append(("WWW-Authenticate", 'Bearer error="invalid_token"'))
    return websocket.http_response(refusal.status, f"{refusal}\n".encode(), headers=headers)
