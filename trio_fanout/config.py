"""Configuration: one frozen attrs class, every key with its unit in its name or docstring.

docs/configuration.md documents each key; keep the two in step.
"""

from __future__ import annotations

import os
from typing import Any

import attrs

from backplane import parse_backplane_url


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be greater than 0, not {value!r}")


def _not_negative(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be 0 or more, not {value!r}")


def _port(instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if not 0 <= value <= 65535:
        raise ValueError(f"{attribute.name} must be a port number from 0 to 65535, not {value!r}")


def _backplane_url(instance: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None:
        parse_backplane_url(value)


_LOG_LEVELS = ("debug", "info", "warning", "error")


@attrs.frozen(kw_only=True)
class Config:
    host: str = "127.0.0.1"
    port: int = attrs.field(default=8765, validator=_port)
    workers: int = attrs.field(factory=lambda: os.cpu_count() or 1, validator=_positive)
    heartbeat_interval: float = attrs.field(default=1.0, validator=_not_negative)
    """Seconds between heartbeats; 0 turns the heartbeat off."""
    proxy_port: int = attrs.field(default=5559, validator=_port)
    """Publisher-side port of the embedded ZeroMQ proxy (subscribers use the next one)."""
    backplane: str | None = attrs.field(default=None, validator=_backplane_url)
    """Backplane URL; None means the master's embedded ZeroMQ proxy."""
    log_level: str = attrs.field(default="info", validator=attrs.validators.in_(_LOG_LEVELS))
    max_frame_bytes: int = attrs.field(default=64 * 1024, validator=_positive)
    max_rooms_per_connection: int = attrs.field(default=100, validator=_positive)
    rate_limit_per_second: float = attrs.field(default=200.0, validator=_positive)
    rate_limit_burst: int = attrs.field(default=1000, validator=_positive)
    max_queued_frames: int = attrs.field(default=1000, validator=_positive)
    handshake_timeout: float = attrs.field(default=10.0, validator=_positive)
    """Seconds a client has to complete the HTTP and WebSocket handshake."""

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        return cls(**values)
