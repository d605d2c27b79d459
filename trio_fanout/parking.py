"""Idle connections, held without a task.

Most connections of a fan-out server are idle: they receive now and then and send nothing for
minutes. A Trio task waiting to read costs memory whatever it waits for: its coroutine frames,
its cancel scope and nursery, Trio's record of its socket: about 4 KiB of RSS, more than
everything else a connection holds. So a connection that has had nothing to read for
``PARK_AFTER`` seconds ends its task and is *parked* here: its socket goes into an epoll set of
the worker's own, watched by one task for all of them, and the connection keeps only its state
(rooms, frame parser, queue). Sending to a parked connection needs no task: the fan-out writes to
its socket as to any other. When its socket becomes readable (a frame, or the client going away),
or when the worker needs its task back (to close it, or to wait for its full socket to drain),
the worker starts a new task for it, which carries on where the last one stopped.
"""

from __future__ import annotations

import select
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from trio_fanout.connection import Connection

# Seconds without input after which a connection's task ends and the connection is parked.
# Short, so that memory follows the number of connections that are active, not the number
# connected; a client that sends less often than this pays a task start per frame (tens of µs).
PARK_AFTER = 1.0


class ParkingLot:
    """The parked connections of one worker, by socket, and their epoll set (open while the
    worker serves)."""

    def __init__(self) -> None:
        self._epoll: select.epoll | None = None
        self._parked: dict[int, Connection] = {}

    def __len__(self) -> int:
        return len(self._parked)

    def open(self) -> None:
        self._epoll = select.epoll()

    def park(self, conn: Connection, fd: int) -> None:
        """Hold ``conn`` until its socket ``fd`` is readable (level-triggered: input that came
        before this call wakes it at once). Raises ``OSError`` if the kernel refuses to watch
        one more socket (``fs.epoll.max_user_watches``); ``conn`` is then not parked."""
        if self._epoll is None:
            raise OSError("the worker is not serving")
        self._epoll.register(fd, select.EPOLLIN)
        self._parked[fd] = conn

    def unpark(self, fd: int) -> Connection | None:
        """Take back the connection parked on ``fd``, if one is."""
        conn = self._parked.pop(fd, None)
        if conn is not None and self._epoll is not None:
            self._epoll.unregister(fd)
        return conn

    async def wake_readable_forever(self, wake: Callable[[Connection], None]) -> None:
        """Take back each parked connection whose socket becomes readable, and hand it to
        ``wake``."""
        assert self._epoll is not None, "open() first"
        epoll = self._epoll
        while True:
            await trio.lowlevel.wait_readable(epoll.fileno())
            for fd, _events in epoll.poll(0):
                conn = self.unpark(fd)
                if conn is not None:
                    wake(conn)

    def close(self) -> list[Connection]:
        """Stop watching; return the connections still parked, for their sockets to be closed."""
        parked = list(self._parked.values())
        self._parked.clear()
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        return parked
