"""Pick and open a backend from a URL."""

from __future__ import annotations

import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs

from backplane._interface import Backplane, BadBackplaneURL

SCHEMES = ("memory", "zmq")
DEFAULT_ZMQ_PORT = 5559


@attrs.frozen
class BackplaneAddress:
    """A parsed backplane URL."""

    scheme: str
    host: str = ""
    port: int = 0
    name: str = ""


def parse_backplane_url(url: str) -> BackplaneAddress:
    """Check ``url`` and split it; raises :class:`BadBackplaneURL` with the reason."""
    if not isinstance(url, str) or "://" not in url:
        raise BadBackplaneURL(f"{url!r} is not a URL like zmq://127.0.0.1:5559 or memory://name")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "memory":
        return BackplaneAddress("memory", name=parts.netloc + parts.path)
    if parts.scheme == "zmq":
        try:
            port = DEFAULT_ZMQ_PORT if parts.port is None else parts.port
        except ValueError:
            raise BadBackplaneURL(
                f"{url!r} has a port that is not a number from 1 to 65534"
            ) from None
        if not parts.hostname:
            raise BadBackplaneURL(f"{url!r} names no host (zmq://HOST:PORT)")
        if not 1 <= port <= 65534:
            raise BadBackplaneURL(f"{url!r}: the proxy needs PORT and PORT+1, from 1 to 65534")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            raise BadBackplaneURL(f"{url!r}: a zmq URL is only zmq://HOST:PORT")
        return BackplaneAddress("zmq", host=parts.hostname, port=port)
    raise BadBackplaneURL(
        f"{url!r} has an unknown scheme {parts.scheme!r}; known: {', '.join(SCHEMES)}"
    )


@asynccontextmanager
async def open_backplane(url: str) -> AsyncIterator[Backplane]:
    """Open the backend that ``url`` names; it is closed when the ``async with`` block ends."""
    address = parse_backplane_url(url)
    if address.scheme == "memory":
        from backplane.memory import open_memory_backplane

        async with open_memory_backplane(address.name) as memory_backplane:
            yield memory_backplane
    else:
        from backplane.zmq import open_zmq_backplane

        async with open_zmq_backplane(address.host, address.port) as zmq_backplane:
            yield zmq_backplane
