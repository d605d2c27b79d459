"""trio-fanout: a WebSocket fan-out server for Trio, on a ZeroMQ or in-memory backplane.

The library API: :func:`serve` runs a worker inside your Trio program (with :class:`Hooks` to
authenticate and authorise), :class:`Emitter` and :class:`SyncEmitter` publish from any
program, and :mod:`trio_fanout.client` is a Trio client.
"""

from trio_fanout._version import __version__
from trio_fanout.config import Config, ConfigError, load_config
from trio_fanout.emitter import Emitter, SyncEmitter, open_emitter
from trio_fanout.hooks import Forbidden, Hooks
from trio_fanout.runner import serve
from trio_fanout.tls import TLSFileError
from trio_fanout.websocket import Request
from trio_fanout.worker import Worker

__all__ = [
    "Config",
    "ConfigError",
    "Emitter",
    "Forbidden",
    "Hooks",
    "Request",
    "SyncEmitter",
    "TLSFileError",
    "Worker",
    "__version__",
    "load_config",
    "open_emitter",
    "serve",
]
