"""The worker: accepts WebSocket clients, keeps the rooms, and fans backplane messages out.

One worker is one ``trio.run``. Its rooms are local: a room exists here while one of this
worker's connections is in it, and the worker holds exactly one backplane subscription per room
(the first member subscribes, the last one out unsubscribes). Client publishes go to the
backplane only; they come back through it like everybody else's, which is what makes delivery
exactly-once and ordered for every member on every worker.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Collection

import attrs
import trio

from trio_fanout import envelope, protocol, websocket
from trio_fanout.backplane import Backplane
from trio_fanout.backplane._shrink import ShrinkWatch, give_back_freed_memory, rebuild_dict
from trio_fanout.config import Config
from trio_fanout.connection import Connection
from trio_fanout.gcstats import GcPauses
from trio_fanout.hooks import Hooks

logger = logging.getLogger(__name__)

# accept() errors that mean "out of resources right now", not "the listener is broken": log,
# pause, and keep serving the connections we have (the list trio's serve_listeners uses).
ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
ACCEPT_CAPACITY_PAUSE = 0.1

# accept() errors that concern one connection that died in the backlog: skip it (Linux's
# accept(2) asks callers to treat these like EAGAIN).
ACCEPT_SKIP_ERRNOS = {
    errno.ECONNABORTED, errno.EPROTO, errno.ENETDOWN, errno.ENOPROTOOPT, errno.EHOSTDOWN,
    errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH,
}  # fmt: skip

# How long shutdown waits for clients to answer their 1001 close before dropping them.
DRAIN_TIMEOUT = 3.0

# A worker refusing clients at a limit (max_connections, max_handshakes) says so in its log at
# most this often, with the count since: under a flood, one line per refusal would be a flood too.
REFUSAL_LOG_INTERVAL = 10.0

# Invalid backplane messages are counted one by one but logged at most once in this many
# seconds: whoever floods the backplane with them must not flood the log too.
INVALID_WARNING_INTERVAL = 10.0


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


# Made once: json.loads with any option builds a new decoder at every call.
_STRICT_JSON = json.JSONDecoder(parse_constant=_refuse_constant)


def relay_problem(frame: bytes) -> str | None:
    """Why ``frame``, a backplane payload after its envelope, must not reach clients, or None.

    Anyone who reaches the backplane can publish on it, and the worker sends the frame to its
    clients as it is, as a text frame: a frame that is not UTF-8 makes browsers drop the
    connection, and one that is not JSON breaks every client. So the worker relays only what a
    publisher of ours would send: UTF-8 text holding strict JSON (``NaN`` and ``Infinity``
    refused, as ``JSON.parse`` refuses them), an object with a string ``type``.
    """
    try:
        text = frame.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8"
    try:
        value = _STRICT_JSON.decode(text)
    except (ValueError, RecursionError):
        return "not JSON"
    if not isinstance(value, dict):
        return "not a JSON object"
    if not isinstance(value.get("type"), str):
        return "no string type"
    return None


@attrs.define(eq=False)
class Room:
    """A room with members on this worker.

    Its backplane topic is a digest of ``name``; the name is kept for the log. ``subscribing``
    is the event that joiners wait on while the first member's subscription is being made, and
    None once it is live: an event (and its set of waiters) kept for the room's whole life was
    a quarter of what the room costs."""

    name: str
    members: set[Connection] = attrs.field(factory=set)
    subscribing: trio.Event | None = None


class Worker:
    def __init__(
        self, config: Config, backplane: Backplane, index: int = 1, hooks: Hooks | None = None
    ) -> None:
        self.config = config
        self.backplane = backplane
        self.index = index
        self.hooks = hooks or Hooks()
        # Set where the worker owns its process (run_worker_process): GC pauses are per process.
        self.gc_pauses: GcPauses | None = None
        self.port: int | None = None  # known once serve() has started
        self.connections: dict[int, Connection] = {}
        self.rooms: dict[bytes, Room] = {}
        self._rooms_shrink = ShrinkWatch()
        self.gaps = envelope.GapCounter()
        # Backplane messages not relayed because they were invalid (see relay_problem).
        self.dropped_invalid = 0
        self._next_invalid_warning = 0.0
        self._numberer = envelope.Numberer()
        self._dirty: list[Connection] = []
        # Every connection with a running task, WebSocket or not yet: shutdown closes them all.
        self._accepted: set[Connection] = set()
        self._stop_requested = trio.Event()
        # Refusals at a limit not yet logged, by limit, and when each was last logged.
        self._refusals: dict[str, int] = {}
        self._refusals_logged: dict[str, float] = {}

    # ---- rooms ---------------------------------------------------------------------------

    async def join(self, conn: Connection, room_name: str) -> None:
        """Make ``conn`` a member; returns once messages published from now on reach it."""
        topic = envelope.room_topic(room_name)
        while True:
            room = self.rooms.get(topic)
            if room is None:
                subscribing = trio.Event()
                room = self.rooms[topic] = Room(room_name, subscribing=subscribing)
                try:
                    await self.backplane.subscribe(topic)
                except BaseException:
                    del self.rooms[topic]
                    subscribing.set()  # waiters wake, find no room, and try for themselves
                    raise
                room.subscribing = None
                subscribing.set()
                break
            if room.subscribing is None:
                break
            await room.subscribing.wait()
        room.members.add(conn)
        conn.rooms.add(room_name)

    def leave(self, conn: Connection, room_name: str) -> None:
        topic = envelope.room_topic(room_name)
        conn.rooms.discard(room_name)
        room = self.rooms[topic]
        room.members.discard(conn)
        if not room.members:
            del self.rooms[topic]
            self.backplane.unsubscribe(topic)
            self.gaps.forget(topic)
            if self._rooms_shrink.should_rebuild(len(self.rooms)):
                rebuild_dict(self.rooms)
                give_back_freed_memory()

    async def publish(self, conn: Connection, request: protocol.Publish) -> None:
        topic = envelope.room_topic(request.room)
        frame = protocol.message_frame(request.room, request.data, request.id)
        exclude = 0 if request.echo else conn.id
        await self.backplane.publish(topic, self._numberer.wrap(topic, frame, exclude))
        logger.debug("published %d bytes to room %r", len(frame), request.room)

    # ---- connections ---------------------------------------------------------------------

    @property
    def handshakes(self) -> int:
        """Connections accepted whose handshake has not ended yet (plain HTTP ones included):
        every accepted connection is in ``_accepted`` until its task ends, and in
        ``connections`` too once its WebSocket is open."""
        return len(self._accepted) - len(self.connections)

    def at_connection_limit(self) -> bool:
        """Whether ``max_connections`` WebSockets are open here. If so, the caller refuses one
        more, and the refusal is counted for the log (see :meth:`_note_refusal`)."""
        if len(self.connections) < self.config.max_connections:
            return False
        self._note_refusal("max_connections", "WebSocket upgrades answered 503")
        return True

    def _note_refusal(self, limit: str, what: str) -> None:
        """Count a refusal at ``limit`` and log the count now and then (see
        ``REFUSAL_LOG_INTERVAL``)."""
        self._refusals[limit] = self._refusals.get(limit, 0) + 1
        now = trio.current_time()
        if now - self._refusals_logged.get(limit, -REFUSAL_LOG_INTERVAL) >= REFUSAL_LOG_INTERVAL:
            logger.warning(
                "worker %d is at its %s (%d): %d %s since the last such line",
                self.index, limit, getattr(self.config, limit), self._refusals[limit], what,
            )  # fmt: skip
            self._refusals_logged[limit] = now
            self._refusals[limit] = 0

    def register(self, conn: Connection) -> None:
        """Called once the WebSocket is open: from now on broadcasts reach ``conn``."""
        self.connections[conn.id] = conn

    def forget(self, conn: Connection) -> None:
        """Called when ``conn``'s task ends: it leaves every room."""
        self._accepted.discard(conn)
        self.connections.pop(conn.id, None)
        for room_name in list(conn.rooms):
            self.leave(conn, room_name)

    def health(self) -> tuple[int, bytes]:
        """The HTTP status and JSON body of ``/healthz``.

        200 and ``ready`` while this worker can serve; 503, ``not_ready`` and a ``reason``
        while it cannot (its backplane is down, or it is shutting down), so that a load
        balancer sends new clients elsewhere instead of to joins that would fail.
        """
        if self._stop_requested.is_set():
            reason: str | None = "shutting down"
        else:
            reason = self.backplane.unavailable_reason
        figures: dict[str, object] = {"status": "ready" if reason is None else "not_ready"}
        if reason is not None:
            figures["reason"] = reason
        figures.update(
            worker=self.index,
            pid=os.getpid(),
            connections=len(self.connections),
            handshakes=self.handshakes,
            queued_bytes=sum(conn.queued_bytes for conn in self.connections.values()),
            rooms=len(self.rooms),
            backplane_gaps=self.gaps.missed,
            dropped_invalid=self.dropped_invalid,
            gc=self.gc_pauses.summary() if self.gc_pauses else None,
        )
        return (200 if reason is None else 503), json.dumps(figures).encode()

    # ---- fan-out -------------------------------------------------------------------------

    async def fan_out_forever(self) -> None:
        """Deliver every backplane message to the local members of its topic; batch by batch."""
        while True:
            self.fan_out(await self.backplane.receive_batch())

    def fan_out(self, batch: list[tuple[bytes, bytes]]) -> None:
        """Queue each message's frame, encoded once, for each recipient; then flush each
        recipient once. Awaits nothing: no client can slow this loop down."""
        own_origin = self._numberer.origin
        debug = logger.isEnabledFor(logging.DEBUG)
        for topic, payload in batch:
            try:
                origin, seq, exclude_id = envelope.unpack_header(payload)
            except struct.error:
                self._drop_invalid(topic, "no envelope")
                continue
            body = payload[envelope.HEADER_SIZE :]
            problem = relay_problem(body)  # once per message, whatever the number of recipients
            if problem is not None:
                self._drop_invalid(topic, problem)
                continue
            recipients: Collection[Connection]
            room_name: str | None = None  # None: the broadcast topic
            if topic == envelope.BROADCAST_TOPIC:
                recipients = self.connections.values()
            else:
                room = self.rooms.get(topic)
                if room is None:
                    continue  # we left the room while this message was on its way
                recipients = room.members
                room_name = room.name
            if self.gaps.observe(topic, origin, seq):
                logger.warning(
                    "backplane gap in room %r: publisher %s skipped to seq %d",
                    room_name, origin.hex(), seq,
                )  # fmt: skip
            frame = websocket.encode_text_frame(body)
            excluded = self.connections.get(exclude_id) if origin == own_origin else None
            if debug:
                logger.debug(
                    "delivering seq %d of %s in room %r to %d connections",
                    seq, origin.hex(), room_name, len(recipients),
                )  # fmt: skip
            for conn in recipients:
                if conn is not excluded:
                    conn.enqueue(frame)
        for conn in self._dirty:
            conn.flush()
        self._dirty.clear()  # cleared in place: every connection holds this very list

    def _drop_invalid(self, topic: bytes, problem: str) -> None:
        self.dropped_invalid += 1
        now = time.monotonic()
        if now >= self._next_invalid_warning:
            self._next_invalid_warning = now + INVALID_WARNING_INTERVAL
            logger.warning(
                "dropped an invalid backplane message on %r (%s); %d dropped since the start, "
                "counted in /healthz, and no more of these lines for %.0f s",
                topic, problem, self.dropped_invalid, INVALID_WARNING_INTERVAL,
            )  # fmt: skip

    # ---- serving -------------------------------------------------------------------------

    def stop(self) -> None:
        """Start a graceful stop: no new clients, and every client is closed with 1001.

        :meth:`serve` returns once they have all closed or ``DRAIN_TIMEOUT`` has passed.
        Cancelling :meth:`serve` instead stops at once, closing sockets without a close frame.
        """
        self._stop_requested.set()

    async def serve(
        self,
        listener: socket.socket,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept and serve clients on ``listener`` until :meth:`stop` (or cancellation); a
        stop closes ``listener`` before it closes the clients."""
        listener.setblocking(False)
        await self.backplane.subscribe(envelope.BROADCAST_TOPIC)
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as serving:
                serving.start_soon(self.fan_out_forever)
                serving.start_soon(self._accept_forever, listener, connections)
                host, port = listener.getsockname()[:2]
                self.port = port
                task_status.started()
                logger.info(
                    "worker %d (pid %d) serving ws://%s:%d/ws", self.index, os.getpid(), host, port
                )
                await self._stop_requested.wait()
                serving.cancel_scope.cancel()
            # Accepting is over: our copy of the listening socket goes now, not after the drain,
            # so that once every holder has let go, a new server can bind the port at once.
            listener.close()
            logger.info("worker %d: closing %d clients", self.index, len(self._accepted))
            for conn in list(self._accepted):
                conn.close(websocket.CLOSE_GOING_AWAY, "server shutting down")
            connections.cancel_scope.deadline = trio.current_time() + DRAIN_TIMEOUT
        self.backplane.unsubscribe(envelope.BROADCAST_TOPIC)

    async def _accept_forever(self, listener: socket.socket, connections: trio.Nursery) -> None:
        while True:
            await trio.lowlevel.wait_readable(listener)
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                continue  # another worker took it
            except OSError as error:
                if error.errno in ACCEPT_SKIP_ERRNOS:
                    continue
                if error.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                logger.error("accept failed (%s); pausing %.1f s", error, ACCEPT_CAPACITY_PAUSE)
                await trio.sleep(ACCEPT_CAPACITY_PAUSE)
                continue
            if self.handshakes >= self.config.max_handshakes:
                # Closed before a byte is read or a Connection is made: the cheapest answer to
                # a flood of connections that never finish their handshake (slowloris).
                sock.close()
                self._note_refusal("max_handshakes", "new connections closed at once")
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(self, sock, self._dirty)
            self._accepted.add(conn)
            connections.start_soon(conn.serve)
