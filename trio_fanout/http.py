"""Plain HTTP on the WebSocket port: the health check, the demo page, and the refusals.

A request that is not a WebSocket upgrade to ``/ws`` gets one complete answer here, after which
the connection closes (no keep-alive: these requests are rare, and a closed connection frees its
slot at once). Pure: a parsed request in, response bytes out; the connection does the I/O.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable

from trio_fanout import websocket

# The demo chat page every worker serves at "/", read once.
CHAT_PAGE = importlib.resources.files("trio_fanout").joinpath("static/chat.html").read_bytes()

# What a worker at max_connections tells the client (and a load balancer) in Retry-After: a slot
# frees only when a client leaves, which takes a while at full load; a few seconds lets a
# balancer try another worker first without making a retrying client wait long.
RETRY_AFTER_SECONDS = 5


def plain_response(
    request: websocket.Request, health: Callable[[], tuple[int, bytes]]
) -> bytes | None:
    """The answer to ``request`` if it is plain HTTP, or None if it is for the WebSocket at
    ``/ws`` (whose handshake may still be refused, see :func:`refusal_response`). ``health``
    gives the status and body of ``/healthz``."""
    if request.path == "/healthz" and request.method == "GET":
        status, body = health()
        return websocket.http_response(status, body, "application/json")
    if request.path == "/" and request.method == "GET":
        return websocket.http_response(200, CHAT_PAGE, "text/html; charset=utf-8")
    if request.path != "/ws":
        return refusal_response(websocket.HandshakeError(404, "not found: the WebSocket is at /ws"))
    return None


def refusal_response(refusal: websocket.HandshakeError) -> bytes:
    """The answer to a request refused with ``refusal``: its status, its message as the body,
    and for 503 (this worker is full) a ``Retry-After``."""
    headers = [("Retry-After", str(RETRY_AFTER_SECONDS))] if refusal.status == 503 else []
    return websocket.http_response(refusal.status, f"{refusal}\n".encode(), headers=headers)
