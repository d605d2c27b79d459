"""Publish to rooms from any Python program, through the backplane, like Socket.IO's emitter.

:class:`Emitter` is for Trio programs; :class:`SyncEmitter` is for blocking code (Flask, Django,
scripts): it runs an :class:`Emitter` in a Trio loop on a thread of its own, because the
backplane clients are Trio code and a blocking caller has no loop to lend them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from trio_fanout import envelope, protocol
from trio_fanout.backplane import Backplane, Credentials, Position, open_backplane, redact_url

logger = logging.getLogger(__name__)


class Emitter:
    """Publishes to the rooms of every worker on one backplane."""

    def __init__(self, backplane: Backplane) -> None:
        self._backplane = backplane
        self._numberer = envelope.Numberer()

    async def publish(self, room: str, data: Any) -> int:
        """Send ``data`` (any JSON value) to every member of ``room``; return the offset the
        room's sequencer gave it (the ``offset`` of the ``message`` frame members receive).

        Raises ``ValueError`` for a room name clients could not use or data JSON cannot carry,
        and ``backplane.BackplaneUnavailable`` when the backplane refuses the message.
        """
        return (await self.append(room, data)).offset

    async def append(self, room: str, data: Any) -> Position:
        """:meth:`publish`, answering with the whole position (the room's epoch and offset)."""
        try:
            protocol.check_room(room)
            frame = protocol.message_frame(room, data)
        except protocol.RequestError as refusal:
            raise ValueError(refusal.message) from None
        topic = envelope.room_topic(room)
        position = await self._backplane.append(topic, self._numberer.wrap(topic, frame))
        logger.debug(
            "emitter published room=%r epoch=%s offset=%d (%d bytes)",
            room, position.epoch, position.offset, len(frame),
            extra={"room": room, "epoch": position.epoch, "offset": position.offset},
        )  # fmt: skip
        return position

    async def broadcast(self, data: Any) -> None:
        """Send ``data`` to every connection on every worker, as a ``message`` with no room."""
        try:
            frame = protocol.broadcast_frame(data)
        except protocol.RequestError as refusal:
            raise ValueError(refusal.message) from None
        topic = envelope.BROADCAST_TOPIC
        await self._backplane.publish(topic, self._numberer.wrap(topic, frame))


@asynccontextmanager
async def open_emitter(
    backplane_url: str, *, credentials: Credentials | None = None
) -> AsyncIterator[Emitter]:
    """An :class:`Emitter` on the backplane at ``backplane_url``, closed with the block;
    ``credentials`` name the files of its secrets (a Redis password, CURVE keys)."""
    async with open_backplane(backplane_url, credentials=credentials) as backplane:
        yield Emitter(backplane)


class SyncEmitter:
    """A blocking emitter, safe to share between threads::

        with SyncEmitter("zmq://127.0.0.1:5559") as emitter:
            emitter.publish("lobby", {"text": "hello"})

    The constructor returns once the backplane is connected (or raises its error).
    """

    def __init__(
        self, backplane_url: str, *, timeout: float = 10.0, credentials: Credentials | None = None
    ) -> None:
        self._timeout = timeout
        self._credentials = credentials
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._emitter: Emitter | None = None
        self._stop: trio.Event | None = None
        self._abandoned = False
        # A daemon thread: an emitter nobody closes (one for the process, as in a web app) must
        # not keep the process alive at exit.
        self._thread = threading.Thread(
            target=trio.run,
            args=(self._serve, backplane_url),
            name="trio-fanout-emitter",
            daemon=True,
        )
        self._thread.start()
        if not self._ready.wait(timeout):
            self._abandoned = True  # the thread ends as soon as it is connected, if ever
            raise TimeoutError(
                f"the emitter did not connect to {redact_url(backplane_url)} in {timeout} s"
            )
        if self._startup_error is not None:
            self._thread.join()
            raise self._startup_error

    async def _serve(self, backplane_url: str) -> None:
        try:
            async with open_emitter(backplane_url, credentials=self._credentials) as emitter:
                if self._abandoned:
                    return
                self._emitter = emitter
                self._stop = trio.Event()
                self._token = trio.lowlevel.current_trio_token()
                self._ready.set()
                await self._stop.wait()
        except BaseException as error:
            if self._ready.is_set():
                raise
            self._startup_error = error
            self._ready.set()

    def _open_emitter(self) -> tuple[Emitter, trio.lowlevel.TrioToken]:
        if self._emitter is None or self._token is None:
            raise RuntimeError("the emitter is closed")
        return self._emitter, self._token

    def publish(self, room: str, data: Any) -> int:
        """Send ``data`` to every member of ``room``; its offset. See :meth:`Emitter.publish`."""
        emitter, token = self._open_emitter()
        return trio.from_thread.run(emitter.publish, room, data, trio_token=token)

    def broadcast(self, data: Any) -> None:
        """Send ``data`` to every connection; see :meth:`Emitter.broadcast`."""
        emitter, token = self._open_emitter()
        trio.from_thread.run(emitter.broadcast, data, trio_token=token)

    def close(self) -> None:
        """Deliver what was published to the backplane and stop the emitter's thread."""
        if self._token is not None and self._stop is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            self._token = None
        self._thread.join(self._timeout)

    def __enter__(self) -> SyncEmitter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
