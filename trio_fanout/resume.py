"""What a reconnecting client must remember between connections, without any I/O.

Two small pieces the reconnecting client (:mod:`trio_fanout.reconnecting`) drives, kept pure so
that tests can drive them without sockets or clocks:

- :func:`backoff_delay` and :class:`Backoff`, the waits before the next connection attempts;
- :class:`RoomPositions`, each joined room's epoch and last delivered offset (protocol version
  2): the ``since`` of a rejoin, and the filter that never lets a message through twice.
"""

from __future__ import annotations

import enum
import random
from typing import Any

Frame = dict[str, Any]


def backoff_delay(attempt: int, *, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait before connection attempt ``attempt`` (0 for the first retry).

    Exponential backoff with full jitter: a uniform draw from ``[0, min(cap, base * 2**attempt)]``.
    The jitter matters more than the exponent: when a worker dies, all of its clients lose their
    connection at the same instant, and without it they would all come back at the same instants
    too, in waves that hit the surviving worker together.
    """
    if attempt < 0:
        raise ValueError(f"attempt must be 0 or more, not {attempt}")
    # 2**attempt overflows a float past about attempt 1023; the cap is reached long before.
    ceiling = cap if attempt >= 64 else min(cap, base * 2**attempt)
    return rng.uniform(0.0, ceiling)


class Backoff:
    """The waits between connection attempts, one after another, with :func:`backoff_delay`.

    A connection that lasted ``stable_after`` seconds or more was a real one: the next wait
    starts again from the first step. A shorter one (a server that accepts and then closes at
    once) keeps the waits growing, so that it is not hammered.
    """

    def __init__(self, *, base: float, cap: float, stable_after: float, rng: random.Random) -> None:
        self.base = base
        self.cap = cap
        self.stable_after = stable_after
        self._rng = rng
        self._attempt = 0

    def next_delay(self) -> float:
        delay = backoff_delay(self._attempt, base=self.base, cap=self.cap, rng=self._rng)
        self._attempt += 1
        return delay

    @property
    def attempt(self) -> int:
        """The attempt the last :meth:`next_delay` waits for: 1 for the first since the last
        stable connection."""
        return self._attempt

    def connection_ended(self, lasted: float) -> None:
        if lasted >= self.stable_after:
            self._attempt = 0


class Rejoin(enum.Enum):
    """How a rejoin after a reconnection turned out for one room."""

    RECOVERED = "recovered"
    """Every message missed follows, in order, before any later one."""
    UNRECOVERED = "unrecovered"
    """Messages may have been missed, and none of them will follow: reload the room's state."""


class RoomPositions:
    """Each joined room's epoch and the offset of the last message delivered from it.

    A position is known only when the server speaks version 2 (``joined`` carries ``epoch`` and
    ``offset``); against a version 1 server every room's position is unknown, rejoins carry no
    ``since``, and every message is let through.
    """

    def __init__(self) -> None:
        # room -> (epoch, offset); a room joined without a known position maps to None.
        self._positions: dict[str, tuple[str, int] | None] = {}

    @property
    def rooms(self) -> list[str]:
        """The rooms joined, in the order they were joined."""
        return list(self._positions)

    def since(self, room: str) -> Frame | None:
        """The ``since`` of a rejoin of ``room``, or None where the position is unknown."""
        position = self._positions.get(room)
        if position is None:
            return None
        epoch, offset = position
        return {"epoch": epoch, "offset": offset}

    def joined(self, frame: Frame) -> None:
        """A first join of a room is done: nothing before its ``offset`` is ours."""
        self._positions[frame["room"]] = _position_of(frame)

    def rejoined(self, frame: Frame) -> Rejoin:
        """A rejoin (after a reconnection) is done: did it recover what was missed?

        With ``recovered: true`` the missed messages follow, so the last delivered position is
        kept: they pass the filter and nothing else does. Otherwise nothing old follows, and
        the room starts again from the position the server gave. A version 1 server gives none
        and never recovers.
        """
        room = frame["room"]
        if frame.get("recovered") is True and self._positions.get(room) is not None:
            return Rejoin.RECOVERED
        self._positions[room] = _position_of(frame)
        return Rejoin.UNRECOVERED

    def renumbered(self, frame: Frame) -> None:
        """The server says a room's numbering started again, or that messages up to its
        offset will not come (a ``joined`` without ``id``): the position becomes the one it
        gives, so that a new epoch's offsets, which start again from 1, are not mistaken for
        repeats."""
        self._positions[frame["room"]] = _position_of(frame)

    def left(self, room: str) -> None:
        self._positions.pop(room, None)

    def deliver(self, frame: Frame) -> bool:
        """Whether a ``message`` frame is new; if so, it becomes the room's last delivered.

        A message without an offset (a version 1 server, an emitter's room-less broadcast) is
        always new. One with an offset not greater than the last delivered one of its room is a
        repeat, as a recovery after a reconnection can overlap what arrived before it.
        """
        room, offset = frame.get("room"), frame.get("offset")
        if not isinstance(room, str) or not isinstance(offset, int):
            return True
        position = self._positions.get(room)
        if position is None:
            return True
        epoch, last = position
        if offset <= last:
            return False
        self._positions[room] = (epoch, offset)
        return True


def _position_of(frame: Frame) -> tuple[str, int] | None:
    epoch, offset = frame.get("epoch"), frame.get("offset")
    if isinstance(epoch, str) and isinstance(offset, int):
        return (epoch, offset)
    return None
