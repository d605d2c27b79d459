"""trio-fanout: a WebSocket fan-out server for Trio, on a ZeroMQ or in-memory backplane."""

from trio_fanout.config import Config
from trio_fanout.worker import Worker

__all__ = ["Config", "Worker"]
