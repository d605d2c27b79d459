"""A publish/subscribe backplane that trio-fanout workers, emitters and the master meet on.

Open one by URL with :func:`open_backplane`; the scheme picks the backend, so switching transport
is a configuration change, not a code change:

- ``memory://NAME``: in one process (tests, embedding);
- ``zmq://HOST:PORT``: the ZeroMQ proxy (see :func:`serve_proxy`) listening on PORT;
- ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`` and ``rediss://…`` (TLS, with an optional
  ``?ssl_ca_certs=PATH``): Redis pub/sub, one channel per topic.

Secrets (a Redis password, CURVE keys) come from files named by :class:`Credentials`.
"""

from trio_fanout.backplane._credentials import BadCredentials, Credentials, CurveProxyKeys
from trio_fanout.backplane._interface import (
    Backplane,
    BackplaneError,
    BackplaneUnavailable,
    BadBackplaneURL,
    History,
    HistoryPolicy,
    Position,
    Received,
)
from trio_fanout.backplane._open import open_backplane, parse_backplane_url, redact_url
from trio_fanout.backplane.proxy import serve_proxy

__all__ = [
    "Backplane",
    "BackplaneError",
    "BackplaneUnavailable",
    "BadBackplaneURL",
    "BadCredentials",
    "Credentials",
    "CurveProxyKeys",
    "History",
    "HistoryPolicy",
    "Position",
    "Received",
    "open_backplane",
    "parse_backplane_url",
    "redact_url",
    "serve_proxy",
]
