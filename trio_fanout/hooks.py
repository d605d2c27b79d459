"""Hooks an application gives an embedded worker to decide who may connect, join and publish.

Each hook is an async function. ``authenticate`` sees the handshake request and returns an
identity (any object, None included) that the other hooks receive; ``authorize_join`` and
``authorize_publish`` return True to allow. Refuse by returning False, or by raising
:class:`Forbidden` with a message for the client: a refused handshake is answered HTTP 403, a
refused join or publish with an ``error`` frame of code ``forbidden``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from trio_fanout.websocket import Request


class Forbidden(Exception):
    """Raised by a hook to refuse; the message reaches the client."""


Authenticate = Callable[[Request], Awaitable[Any]]
AuthorizeJoin = Callable[[Any, str], Awaitable[bool]]
AuthorizePublish = Callable[[Any, str, Any], Awaitable[bool]]


@attrs.frozen(kw_only=True)
class Hooks:
    authenticate: Authenticate | None = None
    """Called with the handshake :class:`Request` (path, headers, query); returns an identity."""
    authorize_join: AuthorizeJoin | None = None
    """Called with (identity, room) before a join."""
    authorize_publish: AuthorizePublish | None = None
    """Called with (identity, room, data) before a publish."""
