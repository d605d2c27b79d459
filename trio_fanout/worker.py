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
import math
import os
import socket
import struct
import time
from collections.abc import Callable, Collection, Hashable, Iterator

import attrs
import trio

from trio_fanout import envelope, http, protocol, tokens, websocket
from trio_fanout.backplane import Backplane, BackplaneUnavailable, History, Position, Received
from trio_fanout.backplane._shrink import ShrinkWatch, give_back_freed_memory, rebuild_dict
from trio_fanout.config import Config
from trio_fanout.connection import Connection
from trio_fanout.gcstats import GcPauses
from trio_fanout.hooks import Hooks
from trio_fanout.metrics import WorkerStats, heartbeat_sent_at
from trio_fanout.parking import ParkingLot
from trio_fanout.tls import ServerCertificate

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

# A closing connection leaves its rooms this many at a time, with a checkpoint between: a leave
# costs up to ~50 µs (the backplane's unsubscribe), so a turn stays under a millisecond and the
# loop keeps answering (the master's liveness ping, other clients) when thousands close at once.
ROOMS_LEFT_PER_TURN = 10

# How long shutdown waits for clients to answer their 1001 close before dropping them.
DRAIN_TIMEOUT = 3.0

# A worker refusing clients at a limit (max_connections, max_handshakes) says so in its log at
# most this often, with the count since: under a flood, one line per refusal would be a flood too.
REFUSAL_LOG_INTERVAL = 10.0

# A refused handshake's Origin header is shown in the log up to this length: enough for any real
# origin, and a client cannot fill the log with a header of many kilobytes.
ORIGIN_SHOWN_CHARACTERS = 200

# The bytes of message data a ``history`` answer holds at most (one message always, however
# large): the answer is one WebSocket message, and common clients refuse larger ones by default
# (trio-websocket, for one, at 1 MiB). A client pages through more with ``since``.
HISTORY_ANSWER_MAX_BYTES = 512 * 1024

# Invalid backplane messages, and gaps in a publisher's numbering, are counted one by one but
# logged at most once in this many seconds: whoever floods the backplane with them (forged
# messages, numbers that skip) must not flood the log too.
INVALID_WARNING_INTERVAL = 10.0

# A room whose live messages skip offsets (its subscription was down for a moment: a Redis
# restart, a link to the proxy re-established) has the missing ones read from the history. A
# backplane that cannot answer yet (the link that reads is still reconnecting) is asked again
# after this pause, for at most this long; then the room's members are told they missed some.
REPAIR_RETRY_PAUSE = 0.1
REPAIR_TIMEOUT = 5.0


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


def _report_accept_failures(count: int, error: OSError) -> None:
    logger.error(
        "accept failed %d times since the last such line (%s); pausing %.1f s "
        "each time; at most one such line per %.0f s",
        count, error, ACCEPT_CAPACITY_PAUSE, REFUSAL_LOG_INTERVAL,
    )  # fmt: skip


def _lost_notice(room_name: str, up_to: Position) -> bytes:
    """The ``joined`` without id that tells a member that what it missed up to ``up_to`` will
    not come (``recovered: false``), encoded."""
    return websocket.encode_text_frame(
        protocol.joined_frame(room_name, None, up_to.epoch, up_to.offset, False)
    )


def _log_delivery(
    room: Room, position: Position | None, skipped: Collection[Connection | None]
) -> None:
    """The debug line for a room message queued for this worker's members: which room and
    offset, and for how many of them (those held back or excluded left out)."""
    delivered = sum(conn not in skipped for conn in room.members)
    fields: dict[str, object] = {"room": room.name, "delivered": delivered}
    where = f"room={room.name!r}"
    if position is not None:
        fields["epoch"], fields["offset"] = position.epoch, position.offset
        where += f" epoch={position.epoch} offset={position.offset}"
    logger.debug("delivered %s to %d connections", where, delivered, extra=fields)


class LogThrottle:
    """Counts events of one kind and says when to log them: at most once per ``interval``
    seconds (Trio's clock), with the count since the last line. Whoever causes the events (a
    flood of connections, forged backplane messages) must not flood the log too."""

    __slots__ = ("_count", "_interval", "_logged")

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._count = 0
        self._logged = -math.inf

    def note(self) -> int:
        """Count one event; return how many to report in a line now (this one included), or 0
        while the last line is too recent."""
        self._count += 1
        now = trio.current_time()
        if now - self._logged < self._interval:
            return 0
        self._logged = now
        count, self._count = self._count, 0
        return count


class CountedLines:
    """Warnings about events that may come in floods (refusals at a limit, clients closed for
    their conduct): the first of each kind is logged at once, the next ones are counted and
    logged together at most once per ``interval`` seconds (Trio's clock), with the count and
    the details of the last one. Every event is counted in some line: what is still counted
    when the interval ends is logged then by :meth:`flush_forever`, and at the end by
    :meth:`flush_all`, not only when (if ever) one more event comes."""

    __slots__ = ("_interval", "_kinds", "_waiting")

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._kinds: dict[Hashable, _Counted] = {}
        self._waiting = trio.Event()  # set while some count is waiting for its line

    def note(self, kind: Hashable, report: Callable[..., None], *details: object) -> None:
        """Count one event of ``kind``; ``report(count, *details)`` logs the line, now if the
        last line of this kind is ``interval`` old, else when it is."""
        counted = self._kinds.get(kind)
        if counted is None:
            counted = self._kinds[kind] = _Counted(report)
        counted.count += 1
        counted.report, counted.details = report, details
        if trio.current_time() - counted.logged >= self._interval:
            counted.write(trio.current_time())
        else:
            self._waiting.set()

    async def flush_forever(self) -> None:
        """Write each waiting count as soon as its interval has passed."""
        while True:
            await self._waiting.wait()
            waiting = [counted for counted in self._kinds.values() if counted.count]
            if not waiting:
                self._waiting = trio.Event()
                continue
            await trio.sleep_until(min(counted.logged for counted in waiting) + self._interval)
            now = trio.current_time()
            for counted in waiting:
                if counted.count and now - counted.logged >= self._interval:
                    counted.write(now)

    def flush_all(self) -> None:
        """Write every waiting count now (the worker stops)."""
        for counted in self._kinds.values():
            if counted.count:
                counted.write(trio.current_time())


@attrs.define(eq=False)
class _Counted:
    report: Callable[..., None]
    count: int = 0
    details: tuple[object, ...] = ()
    logged: float = -math.inf

    def write(self, now: float) -> None:
        count, self.count = self.count, 0
        self.logged = now
        self.report(count, *self.details)


@attrs.define(eq=False)
class CatchUp:
    """The live messages of a room held back for one joining connection while the room's
    history is read, so that they follow the history instead of overtaking it.

    Bounded by the connection's own queue limits (``max_queued_frames``, ``max_queued_bytes``):
    more could not be queued for it anyway. Past them the frames are dropped and only the
    position of the last one is kept; the join then answers ``recovered: false`` from there.

    ``losses`` are the room's offsets told lost to its members meanwhile (see
    :meth:`Worker._repair`), each with where it came among the held frames: the joiner is told
    too, in its turn, unless it has had them.
    """

    max_frames: int
    max_bytes: int
    frames: list[tuple[Position | None, bytes]] = attrs.field(factory=list)
    held_bytes: int = 0
    overflowed: bool = False
    last: Position | None = None  # the last numbered message held back, kept past overflow
    losses: list[tuple[int, Position]] = attrs.field(factory=list)  # (index in frames, up to)

    def hold(self, position: Position | None, frame: bytes) -> None:
        if position is not None:
            self.last = position
        if self.overflowed:
            return
        if len(self.frames) >= self.max_frames or self.held_bytes + len(frame) > self.max_bytes:
            self.overflowed = True
            self.frames = []
            self.losses = []  # the join answers from the last one, with recovered false
            return
        self.frames.append((position, frame))
        self.held_bytes += len(frame)

    def note_loss(self, up_to: Position) -> None:
        if not self.overflowed:
            self.losses.append((len(self.frames), up_to))

    def in_order(self) -> Iterator[tuple[Position | None, bytes | None]]:
        """The held frames, with each loss where it came: ``(up_to, None)``."""
        losses = iter(self.losses)
        loss = next(losses, None)
        for index, held in enumerate(self.frames):
            while loss is not None and loss[0] == index:
                yield loss[1], None
                loss = next(losses, None)
            yield held
        while loss is not None:
            yield loss[1], None
            loss = next(losses, None)


@attrs.define(eq=False)
class Repair:
    """The live messages of a room held back while the messages that its subscription missed
    (a jump in the offsets) are read from the history, so that they are delivered in order.

    ``since`` is the last message the room delivered before the jump, ``first`` the first
    numbered message after it. Bounded like :class:`CatchUp`, by the queue limits of one
    connection: past them the frames are dropped, only the last position is kept, and the
    room's members are told that they missed messages (an unasked ``joined`` with
    ``recovered: false``) instead of getting them.
    """

    since: Position
    first: Position
    max_frames: int
    max_bytes: int
    # (position, frame, the connection it must not reach): one per live message held back;
    # a None frame is a numbered message that was not relayable (only its offset counts).
    held: list[tuple[Position | None, bytes | None, Connection | None]] = attrs.field(factory=list)
    held_bytes: int = 0
    overflowed: bool = False
    last: Position | None = None  # the last numbered message held back, kept past overflow

    def hold(
        self, position: Position | None, frame: bytes | None, excluded: Connection | None
    ) -> None:
        if position is not None:
            self.last = position
        if self.overflowed:
            return
        size = 0 if frame is None else len(frame)
        if len(self.held) >= self.max_frames or self.held_bytes + size > self.max_bytes:
            self.overflowed = True
            self.held = []
            return
        self.held.append((position, frame, excluded))
        self.held_bytes += size


@attrs.define(eq=False)
class Room:
    """A room with members on this worker.

    Its backplane topic is a digest of ``name``; the name is kept for the log and the frames.
    ``position`` is the last numbered message delivered here (or, until one is, what a history
    read said), which answers a plain join without asking the backplane. A connection whose
    join read the history is in ``catching_up`` during the read, then has a ``floor`` until a
    message past it arrives: messages at or below its floor, still on their way when it
    joined, were already sent to it (or were before its join) and are not sent again.
    ``subscribing`` is the event that joiners wait on while the first member's subscription is
    being made, and None once it is live: an event (and its set of waiters) kept for the room's
    whole life was a quarter of what the room cost. ``repair`` holds the room's live messages
    while offsets that its subscription missed are read from the history (None otherwise).
    """

    name: str
    members: set[Connection] = attrs.field(factory=set)
    subscribing: trio.Event | None = None
    position: Position | None = None
    catching_up: dict[Connection, CatchUp] = attrs.field(factory=dict)
    floors: dict[Connection, Position] = attrs.field(factory=dict)
    repair: Repair | None = None

    @property
    def empty(self) -> bool:
        return not self.members and not self.catching_up

    def below_floor(self, position: Position) -> set[Connection]:
        """The members that must not get the message at ``position``; forgets the floors that
        it passes (messages arrive in offset order, so those floors have done their work)."""
        held_back = set()
        for conn, floor in list(self.floors.items()):
            if floor.epoch == position.epoch and position.offset <= floor.offset:
                held_back.add(conn)
            else:
                del self.floors[conn]
        return held_back


class Worker:
    def __init__(
        self, config: Config, backplane: Backplane, index: int = 1, hooks: Hooks | None = None
    ) -> None:
        self.config = config
        self.backplane = backplane
        self.index = index
        self.hooks = hooks or Hooks()
        # With TLS configured, the context new connections get; SIGHUP reloads it.
        self.tls: ServerCertificate | None = None
        if config.tls_cert_file is not None and config.tls_key_file is not None:
            self.tls = ServerCertificate(config.tls_cert_file, config.tls_key_file)
        # Set where the worker owns its process (run_worker_process): GC pauses are per process.
        self.gc_pauses: GcPauses | None = None
        self.port: int | None = None  # known once serve() has started
        self.connections: dict[int, Connection] = {}
        # Set where tokens are required (token_secret_file or token_public_key_file).
        self.tokens = tokens.verifier(
            config.token_secret_file, config.token_public_key_file, config.token_leeway
        )
        # Open WebSockets still waiting for their auth frame: no broadcast reaches them yet.
        self.unauthenticated: set[Connection] = set()
        # When each connection's token needs attention next (auth frame, token_expiring,
        # expiry): one timer task for the worker, not a task per connection, which would cost
        # each idle connection a few KiB and a dozen objects for the garbage collector.
        self._token_timers = tokens.Deadlines()
        self._token_timers_changed = trio.Event()
        self.rooms: dict[bytes, Room] = {}
        self._rooms_shrink = ShrinkWatch()
        self.gaps = envelope.GapCounter()
        self.stats = WorkerStats()  # the counters of /metrics (trio_fanout.metrics)
        # Backplane messages not relayed because they were invalid (see relay_problem).
        self.dropped_invalid = 0
        self._invalid_warnings = LogThrottle(INVALID_WARNING_INTERVAL)
        self._gap_warnings = LogThrottle(INVALID_WARNING_INTERVAL)
        self._numberer = envelope.Numberer()
        self._dirty: list[Connection] = []
        # Where the reads that repair a room's missed offsets run (see _start_repair): opened
        # by fan_out_forever, so that a repair never outlives the fan-out.
        self._repairs: trio.Nursery | None = None
        # Connections that were written to less than write_delay ago and have frames waiting:
        # _flush_deferred_forever writes them all at once, write_delay after the first came.
        self._deferred: list[Connection] = []
        self._deferred_waiting = trio.Event()
        # send calls on clients' sockets, and the frames they carried: how well the send path
        # coalesces (frames per send), in /healthz.
        self.sends = 0
        self.frames_sent = 0
        # The bytes queued for all this worker's clients, kept up to date by each connection
        # at every change (Connection._count_queued): /healthz reads it in O(1).
        self.queued_bytes = 0
        # Every connection accepted and not yet closed, WebSocket or not yet, parked or not:
        # shutdown closes them all.
        self._accepted: set[Connection] = set()
        # Idle connections without a task (trio_fanout/parking.py), and the nursery in which a
        # connection's task runs, for the task that a parked one gets back.
        self.parked = ParkingLot()
        self._connections: trio.Nursery | None = None
        self._stop_requested = trio.Event()
        # Refusals at a limit, by limit, for the log.
        # Refusals at a limit or at the handshake, failed accepts and parks, and clients closed
        # for their own conduct (too slow, over the rate limit): counted for the log, by kind.
        self.counted_lines = CountedLines(REFUSAL_LOG_INTERVAL)

    # ---- rooms ---------------------------------------------------------------------------

    async def join(
        self,
        conn: Connection,
        room_name: str,
        request_id: int | None = None,
        since: protocol.Since | None = None,
    ) -> None:
        """Make ``conn`` a member of ``room_name`` and answer ``joined``; with ``since``, the
        messages after it follow at once, before any later one (docs/protocol.md, "Offsets,
        history and recovery").

        The seam between history and live traffic: once the room's subscription is live, the
        live messages for ``conn`` are held back (a :class:`CatchUp`) while the history is
        read; then ``joined``, the history after ``since``, and the held messages that the
        history did not hold go out together, without a checkpoint in between, and ``conn`` is
        an ordinary member from the next message on.
        """
        if room_name in conn.rooms:
            if since is None:
                self._joined_again(conn, room_name, request_id)
            else:
                await self._rejoin(conn, room_name, request_id, since)
            return
        topic = envelope.room_topic(room_name)
        room = await self._live_room(topic, room_name)
        conn.rooms.add(room_name)
        if since is None and room.position is not None:
            room.members.add(conn)
            # The position may come from a history read, with older messages still on their
            # way here: they are not this connection's.
            room.floors[conn] = room.position
            self.stats.joins += 1
            conn.reply(
                protocol.joined_frame(
                    room_name, request_id, room.position.epoch, room.position.offset
                )
            )
            return
        config = self.config
        catch_up = room.catching_up[conn] = CatchUp(
            config.max_queued_frames, config.max_queued_bytes
        )
        try:
            if since is None:
                history = await self.backplane.history(topic, limit=0)
            else:
                history = await self.backplane.history(topic, Position(since.epoch, since.offset))
        except BaseException:
            self.leave(conn, room_name)
            raise
        del room.catching_up[conn]
        self._catch_up(conn, room, request_id, since, history, catch_up)

    async def _rejoin(
        self, conn: Connection, room_name: str, request_id: int | None, since: protocol.Since
    ) -> None:
        """A join with ``since`` of a room ``conn`` is already in: the seam of a new join (see
        :meth:`join`), with the member's live messages held back from now on, so that what
        ``since`` asks for is sent again, in order, and its live stream goes on after it with
        nothing lost. When the history cannot give what ``since`` asks for, nothing old is sent
        and the stream goes on from where it stood (see :meth:`_catch_up`)."""
        topic = envelope.room_topic(room_name)
        room = self.rooms[topic]
        # Where its live stream stands: at its floor while it has one (its join sent it that
        # far), else at the room's last message delivered here (set for any room with members).
        stood = room.floors.pop(conn, None) or room.position
        room.members.discard(conn)
        config = self.config
        catch_up = room.catching_up[conn] = CatchUp(
            config.max_queued_frames, config.max_queued_bytes
        )
        try:
            history = await self.backplane.history(topic, Position(since.epoch, since.offset))
        except BaseException:
            # Still a member, as if it had not asked: what was held back follows.
            del room.catching_up[conn]
            self._go_on(conn, room, stood, catch_up)
            raise
        del room.catching_up[conn]
        self._catch_up(conn, room, request_id, since, history, catch_up, stood=stood, member=True)

    @staticmethod
    def _held_after(
        room_name: str, stood: Position | None, catch_up: CatchUp
    ) -> tuple[Position | None, list[bytes], Position | None]:
        """For a member whose live stream stood at ``stood`` when its messages began to be held
        back in ``catch_up`` (not overflowed): where its stream stands just before the first
        held frame it has not had (its epoch may be new, or past offsets told lost), those
        frames, and where its stream stands after them. Where the room's numbering starts again,
        or offsets are told lost, after the first of them, a ``joined`` without id
        (``recovered: false``) comes in its turn, as the room's members were told (this one was
        not a member meanwhile)."""
        start = end = stood
        numbered = False  # whether a numbered frame or a notice is among those to send
        frames: list[bytes] = []
        for position, frame in catch_up.in_order():
            if position is None:
                if frame is not None:
                    frames.append(frame)
                continue
            if end is not None and position.epoch == end.epoch:
                if position.offset <= end.offset:
                    continue  # at or below its floor: it was sent already (or told lost)
                if frame is None and not numbered:
                    start = position  # offsets lost: where its stream goes on
                elif frame is None:
                    frames.append(_lost_notice(room_name, position))
            elif not numbered:  # the stream starts again, or goes on past a loss
                start = position if frame is None else Position(position.epoch, position.offset - 1)
            else:
                up_to = position if frame is None else Position(position.epoch, position.offset - 1)
                frames.append(_lost_notice(room_name, up_to))
            end = position
            if frame is not None:
                numbered = True
                frames.append(frame)
        return start, frames, end if numbered else start

    def _go_on(
        self, conn: Connection, room: Room, stood: Position | None, catch_up: CatchUp
    ) -> None:
        """Make ``conn`` a member again after a rejoin that failed, with what was held back for
        it; where that was more than could be held, or starts a new epoch, it is told so with a
        ``joined`` without id (``recovered: false``), as members are."""
        room.members.add(conn)
        if catch_up.overflowed:
            if catch_up.last is not None:
                room.floors[conn] = catch_up.last
                conn.reply(
                    protocol.joined_frame(
                        room.name, None, catch_up.last.epoch, catch_up.last.offset, False
                    )
                )
            return
        start, frames, end = self._held_after(room.name, stood, catch_up)
        if start is not None and stood is not None and start != stood:
            conn.reply(protocol.joined_frame(room.name, None, start.epoch, start.offset, False))
        if end is not None:
            room.floors[conn] = end
        conn.send_encoded_many(frames)

    def _catch_up(
        self,
        conn: Connection,
        room: Room,
        request_id: int | None,
        since: protocol.Since | None,
        history: History,
        catch_up: CatchUp,
        *,
        stood: Position | None = None,
        member: bool = False,
    ) -> None:
        """Send ``joined``, what ``since`` asks for, and what was held back; make ``conn`` a
        member. Awaits nothing, so no live message can come in between.

        With ``member``, ``conn`` was a member already (:meth:`_rejoin`), whose live stream
        stood at ``stood``: the same, except that where ``since`` cannot be recovered, the
        answer is where its stream stood and every message held back follows, so that its live
        stream loses nothing."""
        frames: list[bytes] = []
        last = 0
        foreign_epoch = any(
            position is not None and position.epoch != history.epoch
            for position, _ in catch_up.frames
        )
        if catch_up.overflowed or foreign_epoch:
            # Too much came in during the read, or the room's numbering started again during
            # it: which held messages the history holds is unknown. Start after the last one.
            start = catch_up.last or Position(history.epoch, history.offset)
            last = start.offset
            recovered = False
            logger.debug(
                "connection %d joins room %r without recovery: %s during the history read",
                conn.id, room.name,
                "too many messages" if catch_up.overflowed else "a new epoch",
            )  # fmt: skip
        elif member and not (since is not None and history.complete):
            # Nothing old, and its live stream goes on from where it stood.
            recovered = False
            held_start, frames, held_end = self._held_after(room.name, stood, catch_up)
            start = held_start or Position(history.epoch, history.offset)
            last = (held_end or start).offset  # one epoch: a foreign one is handled above
        else:
            start = Position(history.epoch, history.offset)
            recovered = since is not None and history.complete
            last = history.offset
            if recovered:
                for offset, payload in history.messages:
                    frame = self._recorded_frame(room, offset, payload)
                    if frame is not None:
                        frames.append(frame)
                    last = max(last, offset)
            for position, frame in catch_up.in_order():
                if position is None:
                    if frame is not None:  # not numbered (published, not appended): not in history
                        frames.append(frame)
                elif position.epoch == start.epoch and position.offset > last:
                    # A None frame: offsets told lost to the members, past what this one had.
                    frames.append(frame if frame is not None else _lost_notice(room.name, position))
                    last = position.offset
        if room.position is None:
            room.position = start
        room.members.add(conn)
        # What was sent or came before: copies of it still on their way are not sent again.
        room.floors[conn] = Position(start.epoch, last)
        if not member:
            self.stats.joins += 1  # a member's rejoin is not a join (docs/operations.md)
        conn.reply(
            protocol.joined_frame(
                room.name, request_id, start.epoch, start.offset,
                recovered if since is not None else None,
            )
        )  # fmt: skip
        conn.send_encoded_many(frames)
        logger.debug(
            "connection %d joined room=%r epoch=%s offset=%d, with %d earlier messages",
            conn.id, room.name, start.epoch, start.offset, len(frames),
            extra={"connection": conn.id, "room": room.name, "epoch": start.epoch,
                   "offset": start.offset},
        )  # fmt: skip

    async def _live_room(self, topic: bytes, room_name: str) -> Room:
        """The room of ``topic``, subscribed and live; the first joiner subscribes."""
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
                logger.debug("subscribed room=%r: its first member here", room_name)
                return room
            if room.subscribing is None:
                return room
            await room.subscribing.wait()

    def _joined_again(self, conn: Connection, room_name: str, request_id: int | None) -> None:
        """Answer a join without ``since`` of a room ``conn`` is already in: it gets the room's
        messages already, so nothing changes and nothing old is sent."""
        room = self.rooms[envelope.room_topic(room_name)]
        position = room.position or Position("", 0)  # set for every room with a member
        conn.reply(protocol.joined_frame(room_name, request_id, position.epoch, position.offset))

    def at_room_limit(self, room_name: str) -> bool:
        """Whether joining ``room_name`` would take this worker past ``max_rooms_per_worker``
        rooms (a room it already has costs nothing more). If so, the caller refuses the join,
        and the refusal is counted for the log."""
        if len(self.rooms) < self.config.max_rooms_per_worker:
            return False
        if envelope.room_topic(room_name) in self.rooms:
            return False
        self._note_refusal("max_rooms_per_worker", "joins refused with too_many_rooms")
        return True

    def leave(self, conn: Connection, room_name: str) -> None:
        topic = envelope.room_topic(room_name)
        conn.rooms.discard(room_name)
        self.stats.leaves += 1
        room = self.rooms[topic]
        room.members.discard(conn)
        room.catching_up.pop(conn, None)
        room.floors.pop(conn, None)
        if room.empty:
            del self.rooms[topic]
            self.backplane.unsubscribe(topic)
            logger.debug("unsubscribed room=%r: its last member here left", room_name)
            self.gaps.forget(topic)
            if self._rooms_shrink.should_rebuild(len(self.rooms)):
                rebuild_dict(self.rooms)
                give_back_freed_memory()

    async def publish(self, conn: Connection, request: protocol.Publish) -> Position:
        """Hand ``request`` to the room's sequencer; the position it was given."""
        topic = envelope.room_topic(request.room)
        frame = protocol.message_frame(request.room, request.data, request.id)
        exclude = 0 if request.echo else conn.id
        position = await self.backplane.append(topic, self._numberer.wrap(topic, frame, exclude))
        self.stats.published += 1
        logger.debug(
            "connection %d published room=%r epoch=%s offset=%d (%d bytes)",
            conn.id, request.room, position.epoch, position.offset, len(frame),
            extra={"connection": conn.id, "room": request.room, "epoch": position.epoch,
                   "offset": position.offset},
        )  # fmt: skip
        return position

    async def read_history(self, request: protocol.HistoryRequest) -> bytes:
        """The ``history`` answer for ``request``: at most ``request.limit`` messages and
        ``HISTORY_ANSWER_MAX_BYTES`` of their data, the oldest of them with ``since`` (so that
        the next page starts after the last), the newest without."""
        topic = envelope.room_topic(request.room)
        since = None
        if request.since is not None:
            since = Position(request.since.epoch, request.since.offset)
        history = await self.backplane.history(topic, since, request.limit)
        prefix = protocol.message_prefix(request.room)
        messages = [
            (offset, data)
            for offset, payload in history.messages
            if (data := self._recorded_data(topic, prefix, payload)) is not None
        ]
        if since is None:
            messages.reverse()  # the newest first while filling the answer
        kept: list[tuple[int, bytes]] = []
        size = 0
        for offset, data in messages:
            size += len(data)
            if kept and size > HISTORY_ANSWER_MAX_BYTES:
                break
            kept.append((offset, data))
        if since is None:
            kept.reverse()
        return protocol.history_frame(request.room, request.id, history.epoch, history.offset, kept)

    def _recorded_data(self, topic: bytes, prefix: bytes, payload: bytes) -> bytes | None:
        """The JSON text of the ``data`` of a kept message, sliced out of the frame that a
        publisher of ours built; None (and counted as invalid) for anything else."""
        body = payload[envelope.HEADER_SIZE :]
        if len(payload) < envelope.HEADER_SIZE or not (
            body.startswith(prefix) and body.endswith(b"}")
        ):
            self._drop_invalid(topic, "not a message frame of this room")
            return None
        data = body[len(prefix) : -1]
        try:
            _STRICT_JSON.decode(data.decode("utf-8"))  # exactly one JSON value, nothing more
        except (ValueError, RecursionError):
            self._drop_invalid(topic, "data that is not one JSON value")
            return None
        return data

    def _recorded_frame(self, room: Room, offset: int, payload: bytes) -> bytes | None:
        """The encoded ``message`` frame of a kept message, as live members got it; None (and
        counted as invalid) for a payload that live delivery would have dropped too."""
        body = payload[envelope.HEADER_SIZE :]
        problem = "no envelope" if len(payload) < envelope.HEADER_SIZE else relay_problem(body)
        if problem is not None:
            self._drop_invalid(envelope.room_topic(room.name), problem)
            return None
        return websocket.encode_text_frame(protocol.with_offset(body, offset))

    # ---- connections ---------------------------------------------------------------------

    @property
    def handshakes(self) -> int:
        """Connections accepted that are not open WebSockets: in their handshake (plain HTTP
        ones included) or closing. Every accepted connection is in ``_accepted`` until its
        socket is closed, and in ``connections`` only while its WebSocket is open; so this
        counts every descriptor that ``max_connections`` does not, and ``max_handshakes``
        bounds them all."""
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

        def report(count: int) -> None:
            logger.warning(
                "worker %d is at its %s (%d): %d %s since the last such line",
                self.index, limit, getattr(self.config, limit), count, what,
                extra={"limit": limit, "refused": count},
            )  # fmt: skip

        self.counted_lines.note(limit, report)

    def note_refused_handshake(self, refusal: websocket.HandshakeError) -> None:
        """Count a handshake refused for who or where the client is (its page's origin, its
        token, the authenticate hook) and log the count now and then, with the last one's
        reason: the client only sees an HTTP status, and a browser's retries say nothing."""
        if isinstance(refusal, http.OriginRefused):
            # Sent by the client: shown escaped (%r) and cut short, whatever it holds.
            origin = refusal.origin[:ORIGIN_SHOWN_CHARACTERS]
            self.counted_lines.note("origin", self._report_refused_origins, origin)
        elif isinstance(refusal, http.TokenRefused):
            self.counted_lines.note("token", self._report_refused_tokens, refusal)
        elif isinstance(refusal, http.HookRefused):
            self.counted_lines.note("hook", self._report_refused_by_hook, refusal)

    def _report_refused_origins(self, count: int, origin: str) -> None:
        logger.warning(
            "worker %d refused %d WebSocket handshakes (HTTP 403) from origins not in "
            "allowed_origins since the last such line, the last from origin %r",
            self.index, count, origin,
            extra={"refused": count, "status": 403, "origin": origin},
        )  # fmt: skip

    def _report_refused_tokens(self, count: int, refusal: http.TokenRefused) -> None:
        logger.warning(
            "worker %d refused %d WebSocket handshakes for their ?token= since the last such "
            "line, the last with HTTP %d: %s",
            self.index, count, refusal.status, refusal,
            extra={"refused": count, "status": refusal.status, "reason": str(refusal)},
        )  # fmt: skip

    def _report_refused_by_hook(self, count: int, refusal: http.HookRefused) -> None:
        logger.warning(
            "worker %d refused %d WebSocket handshakes (HTTP 403) by its authenticate hook "
            "since the last such line, the last: %s",
            self.index, count, refusal,
            extra={"refused": count, "status": 403, "reason": str(refusal)},
        )  # fmt: skip

    def set_token_timer(self, conn: Connection, when: float) -> None:
        """Call ``conn.token_timer_fired()`` at ``when`` (Trio's clock), unless ``conn`` is
        gone or has had a new token by then."""
        if self._token_timers.add(when, conn.id, conn.token_version):
            self._token_timers_changed.set()  # sooner than what the timer task sleeps until

    async def _token_timers_forever(self) -> None:
        while True:
            for conn_id, version in self._token_timers.pop_due(trio.current_time()):
                conn = self.connections.get(conn_id)
                if conn is not None and conn.token_version == version:
                    conn.token_timer_fired()
            self._token_timers_changed = trio.Event()
            with trio.move_on_at(self._token_timers.next_deadline):
                await self._token_timers_changed.wait()

    def note_close(self, reason: str) -> None:
        """Count a client closed for ``reason`` and log the count now and then: a crowd of slow
        or flooding clients must not write a line each (each is logged at debug)."""

        def report(count: int) -> None:
            logger.warning(
                "worker %d closed connections %s: %d since the last such line",
                self.index, reason, count,
            )  # fmt: skip

        self.counted_lines.note(("close", reason), report)

    def register(self, conn: Connection) -> None:
        """Called once the WebSocket is open: from now on broadcasts reach ``conn``."""
        self.connections[conn.id] = conn

    async def forget(self, conn: Connection) -> None:
        """Called when ``conn``'s task ends: no more broadcasts reach it, and it leaves every
        room, ``ROOMS_LEFT_PER_TURN`` at a time with a checkpoint between, so that thousands of
        connections closing at once never hold the loop for long. It still counts among the
        handshakes until :meth:`release`."""
        self.connections.pop(conn.id, None)
        self.unauthenticated.discard(conn)
        for count, room_name in enumerate(list(conn.rooms), 1):
            self.leave(conn, room_name)
            if count % ROOMS_LEFT_PER_TURN == 0:
                await trio.lowlevel.checkpoint()

    def forget_now(self, conn: Connection) -> None:
        """:meth:`forget`, all at once: for the connections still parked when the worker is
        cancelled, where nothing can wait."""
        self.connections.pop(conn.id, None)
        self.unauthenticated.discard(conn)
        for room_name in list(conn.rooms):
            self.leave(conn, room_name)

    def park(self, conn: Connection, fd: int) -> bool:
        """Hold idle ``conn`` without a task until its socket ``fd`` is readable; False if the
        kernel would not watch one more socket (the connection then keeps its task)."""
        try:
            self.parked.park(conn, fd)
        except OSError as error:
            self.counted_lines.note("park", self._report_park_failures, error)
            return False
        return True

    def _report_park_failures(self, count: int, error: OSError) -> None:
        logger.warning(
            "worker %d could not park %d idle connections since the last such line "
            "(%s): they keep their tasks, and their memory; at most one such line "
            "per %.0f s",
            self.index, count, error, REFUSAL_LOG_INTERVAL,
        )  # fmt: skip

    def wake(self, conn: Connection) -> None:
        """Give ``conn`` a task again if it is parked (it must close, or wait for its socket
        to drain)."""
        if self._connections is not None and self.parked.unpark(conn.fileno()) is not None:
            self._connections.start_soon(conn.resume)

    def _resume(self, conn: Connection) -> None:
        """Give ``conn``, just unparked as its socket became readable, a task again."""
        if self._connections is not None:
            self._connections.start_soon(conn.resume)

    def release(self, conn: Connection) -> None:
        """Called once ``conn``'s socket is closed: its slot among the handshakes is free."""
        self._accepted.discard(conn)
        self._token_timers.forget(conn.id)

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
            parked=len(self.parked),
            handshakes=self.handshakes,
            queued_bytes=self.queued_bytes,
            rooms=len(self.rooms),
            sends=self.sends,
            frames_sent=self.frames_sent,
            backplane_gaps=self.gaps.missed,
            dropped_invalid=self.dropped_invalid,
            gc=self.gc_pauses.summary() if self.gc_pauses else None,
        )
        return (200 if reason is None else 503), json.dumps(figures).encode()

    # ---- fan-out -------------------------------------------------------------------------

    async def fan_out_forever(self) -> None:
        """Deliver every backplane message to the local members of its topic; batch by batch."""
        async with trio.open_nursery() as repairs:
            self._repairs = repairs
            try:
                while True:
                    self.fan_out(await self.backplane.receive_batch())
            finally:
                self._repairs = None

    def fan_out(self, batch: list[Received]) -> None:
        """Queue each message's frame, encoded once, for each recipient; then flush each
        recipient once. Awaits nothing: no client can slow this loop down.

        A room message's offset is spliced into its frame here, once for all recipients."""
        own_origin = self._numberer.origin
        debug = logger.isEnabledFor(logging.DEBUG)
        stats = self.stats
        stats.received += len(batch)
        for topic, payload, position in batch:
            try:
                origin, seq, exclude_id = envelope.unpack_header(payload)
            except struct.error:
                self._drop_invalid(topic, "no envelope", position)
                continue
            body = payload[envelope.HEADER_SIZE :]
            problem = relay_problem(body)  # once per message, whatever the number of recipients
            if problem is not None:
                self._drop_invalid(topic, problem, position)
                continue
            room: Room | None = None  # None: the broadcast topic
            if topic == envelope.BROADCAST_TOPIC:
                if (sent_at := heartbeat_sent_at(body)) is not None:
                    stats.latency.observe(max(0.0, time.time() - sent_at))
            else:
                room = self.rooms.get(topic)
                if room is None:
                    continue  # we left the room while this message was on its way
            if room is not None and position is not None:
                body = protocol.with_offset(body, position.offset)
            room_name = room.name if room is not None else None
            if self.gaps.observe(topic, origin, seq) and (count := self._gap_warnings.note()):
                logger.warning(
                    "backplane gap in room %r: publisher %s skipped to seq %d; %d gaps since "
                    "the last such line, %d messages missed since the start (in /healthz), "
                    "and at most one such line per %.0f s",
                    room_name, origin.hex(), seq, count, self.gaps.missed,
                    INVALID_WARNING_INTERVAL,
                )  # fmt: skip
            frame = websocket.encode_text_frame(body)
            excluded = self.connections.get(exclude_id) if origin == own_origin else None
            if room is None:
                recipients: Collection[Connection] = self.connections.values()
                if self.unauthenticated:  # rare, and brief: handshake_timeout at most
                    recipients = [c for c in recipients if c not in self.unauthenticated]
                for conn in recipients:
                    if conn is not excluded:
                        conn.enqueue(frame)
                # Counted once per message, not per recipient (excluded is a connection).
                stats.delivered += len(self.connections) - (excluded is not None)
                if debug:
                    delivered = len(recipients) - (excluded is not None)
                    logger.debug(
                        "delivered broadcast (publisher %s seq %d) to %d connections",
                        origin.hex(), seq, delivered,
                        extra={"origin": origin.hex(), "seq": seq, "delivered": delivered},
                    )  # fmt: skip
            else:
                self._room_message(topic, room, position, frame, excluded)
        self._flush_dirty()

    def _flush_dirty(self) -> None:
        """Write to each connection the fan-out queued frames for, except to those written to
        less than ``write_delay`` ago: their frames wait (at most ``write_delay``) and go out
        together, in one send, with whatever else arrives for them meanwhile.

        A client that receives a message now and then gets it at once; one that receives
        thousands a second gets them a few at a time instead of one send each, which costs the
        worker far less (a send's cost hardly depends on its size) and the client nothing it
        would notice. Centrifugo's ``write_delay`` is the same lever, applied to every client.
        """
        delay = self.config.write_delay
        now = trio.current_time()
        deferred = self._deferred
        for conn in self._dirty:
            if now - conn.last_flush >= delay:
                conn.last_flush = now
                conn.flush()
            else:
                deferred.append(conn)  # still dirty: the fan-out does not list it again
        self._dirty.clear()  # cleared in place: every connection holds this very list
        if deferred:
            self._deferred_waiting.set()

    async def _flush_deferred_forever(self) -> None:
        """Write the deferred connections' frames, ``write_delay`` after the first of them was
        deferred."""
        while True:
            await self._deferred_waiting.wait()
            await trio.sleep(self.config.write_delay)
            self._deferred_waiting = trio.Event()
            deferred, self._deferred = self._deferred, []
            now = trio.current_time()
            for conn in deferred:
                if conn in self._accepted:  # not if its socket was closed meanwhile
                    conn.last_flush = now
                    conn.flush()

    def _room_message(
        self,
        topic: bytes,
        room: Room,
        position: Position | None,
        frame: bytes | None,
        excluded: Connection | None,
    ) -> None:
        """Deliver a live message of ``room`` (a None ``frame``: only its offset counts), or
        hold it back while the room's missed offsets are read (see :meth:`_start_repair`)."""
        if room.repair is not None:
            room.repair.hold(position, frame, excluded)
        elif position is not None and (since := self._missed_since(room, position)) is not None:
            self._start_repair(topic, room, since, position).hold(position, frame, excluded)
        else:
            self._deliver(room, position, frame, excluded)

    def _deliver(
        self,
        room: Room,
        position: Position | None,
        frame: bytes | None,
        excluded: Connection | None,
    ) -> None:
        """Queue ``frame`` for the members of ``room`` (and for those catching up) in its turn."""
        held_back: set[Connection] | None = None
        if position is not None:
            self._advance(room, position)
            if room.floors:
                held_back = room.below_floor(position)
        if frame is None:
            return
        if held_back:  # rare: right after a join that read the history
            if excluded is not None:
                held_back.add(excluded)
            for conn in room.members:
                if conn not in held_back:
                    conn.enqueue(frame)
                    self.stats.delivered += 1
        else:
            for conn in room.members:
                if conn is not excluded:
                    conn.enqueue(frame)
            # Counted once per message, not per recipient.
            self.stats.delivered += len(room.members) - (excluded in room.members)
        if room.catching_up:
            for conn, catch_up in room.catching_up.items():
                if conn is not excluded:
                    catch_up.hold(position, frame)
        if logger.isEnabledFor(logging.DEBUG):
            _log_delivery(room, position, held_back or {excluded})

    def _advance(self, room: Room, position: Position) -> None:
        """Record ``position`` as the room's latest here. When its epoch is not the one the
        members know, their numbering started again (the sequencer restarted, or the room's
        history expired): each is told so with a ``joined`` without id, before the message."""
        known = room.position
        room.position = position
        if known is None or known.epoch == position.epoch:
            return
        logger.debug(
            "room %r starts epoch %s at offset %d (was %s at %d)",
            room.name, position.epoch, position.offset, known.epoch, known.offset,
        )  # fmt: skip
        self._tell_unrecovered(room, Position(position.epoch, position.offset - 1))

    def _tell_unrecovered(self, room: Room, position: Position) -> None:
        """Tell every member of ``room`` that what it missed up to ``position`` will not come:
        a ``joined`` without id, with ``recovered: false``."""
        notice = websocket.encode_text_frame(
            protocol.joined_frame(room.name, None, position.epoch, position.offset, False)
        )
        for conn in room.members:
            floor = room.floors.get(conn)
            if (
                floor is not None
                and floor.epoch == position.epoch
                and floor.offset >= position.offset
            ):
                continue  # it joined since, and its join sent it everything up to its floor
            conn.enqueue(notice)

    # ---- repairing a room's missed offsets ------------------------------------------------

    @staticmethod
    def _missed_since(room: Room, position: Position) -> Position | None:
        """Where the offsets this worker missed start, if ``position`` skips some; else None.

        Every message appended to a room while this worker is subscribed to it arrives here,
        in offset order; a jump means the subscription was down for a while (the backplane's
        link was re-established, by us or by a restarted Redis) and the messages published
        meanwhile never came. The first message of a new epoch is offset 1, so a new epoch
        that starts later missed its beginning.
        """
        known = room.position
        if known is None:
            return None
        if known.epoch == position.epoch:
            return known if position.offset > known.offset + 1 else None
        return Position(position.epoch, 0) if position.offset > 1 else None

    def _start_repair(self, topic: bytes, room: Room, since: Position, first: Position) -> Repair:
        """Hold ``room``'s live messages from ``first`` on (in the :class:`Repair` returned),
        and read the offsets between ``since`` and ``first`` from the history, in a task of its
        own."""
        assert self._repairs is not None, "live messages arrive only within fan_out_forever"
        logger.warning(
            "room %r missed offsets %d to %d of epoch %s on the backplane; reading them from "
            "the history", room.name, since.offset + 1, first.offset - 1, first.epoch,
        )  # fmt: skip
        config = self.config
        repair = room.repair = Repair(
            since, first, config.max_queued_frames, config.max_queued_bytes
        )
        self._repairs.start_soon(self._repair, topic, room, repair)
        return repair

    async def _repair(self, topic: bytes, room: Room, repair: Repair) -> None:
        """Read what ``repair`` misses, then deliver it and the held messages in order."""
        missing = repair.first.offset - repair.since.offset - 1
        history: History | None = None
        with trio.move_on_after(REPAIR_TIMEOUT):
            while not repair.overflowed:
                try:
                    history = await self.backplane.history(topic, repair.since, missing)
                    break
                except BackplaneUnavailable as error:
                    logger.info("room %r: history not readable yet (%s)", room.name, error)
                await trio.sleep(REPAIR_RETRY_PAUSE)
        if self.rooms.get(topic) is not room:
            return  # its last member left meanwhile
        room.repair = None
        expected = list(range(repair.since.offset + 1, repair.first.offset))
        if (
            history is not None
            and not repair.overflowed
            and history.epoch == repair.first.epoch
            and [offset for offset, _ in history.messages] == expected
        ):
            for offset, payload in history.messages:
                frame, excluded = self._recorded_frame(room, offset, payload), None
                if frame is not None:
                    origin, _, exclude_id = envelope.unpack_header(payload)
                    if origin == self._numberer.origin:
                        excluded = self.connections.get(exclude_id)
                self._deliver(room, Position(history.epoch, offset), frame, excluded)
            logger.info("room %r: offsets %d to %d recovered", room.name, expected[0], expected[-1])
        else:
            resume = repair.last if repair.overflowed else None
            resume = resume or Position(repair.first.epoch, repair.first.offset - 1)
            logger.warning(
                "room %r: offsets up to %d of epoch %s are lost to its %d members here (%s); "
                "they are told so", room.name, resume.offset, resume.epoch, len(room.members),
                "too many messages held back" if repair.overflowed
                else "history not readable" if history is None
                else "not in the history",
            )  # fmt: skip
            self._tell_unrecovered(room, resume)
            for catch_up in room.catching_up.values():
                catch_up.note_loss(resume)  # told in their turn (see _catch_up)
            room.position = resume
        for position, frame, excluded in repair.held:
            self._room_message(topic, room, position, frame, excluded)
        self._flush_dirty()

    def _drop_invalid(self, topic: bytes, problem: str, position: Position | None = None) -> None:
        """Count (and now and then log) a backplane message not relayed; a numbered one of a
        room here still takes its offset, so that the next one is no jump."""
        room = self.rooms.get(topic)
        if room is not None and position is not None:
            self._room_message(topic, room, position, None, None)
        self.dropped_invalid += 1
        if self._invalid_warnings.note():
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
        self.parked.open()
        try:
            await self._serve(listener, task_status)
        finally:
            self._connections = None
            for conn in self.parked.close():
                conn.abandon()
            self.counted_lines.flush_all()  # what the last interval counted
        self.backplane.unsubscribe(envelope.BROADCAST_TOPIC)

    async def _serve(self, listener: socket.socket, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as connections:
            self._connections = connections
            async with trio.open_nursery() as serving:
                serving.start_soon(self.parked.wake_readable_forever, self._resume)
                serving.start_soon(self.fan_out_forever)
                serving.start_soon(self._flush_deferred_forever)
                serving.start_soon(self.counted_lines.flush_forever)
                if self.tokens is not None:
                    serving.start_soon(self._token_timers_forever)
                serving.start_soon(self._accept_forever, listener, connections)
                host, port = listener.getsockname()[:2]
                self.port = port
                task_status.started()
                logger.info(
                    "worker %d (pid %d) serving %s://%s:%d/ws",
                    self.index, os.getpid(), "ws" if self.tls is None else "wss", host, port,
                )  # fmt: skip
                await self._stop_requested.wait()
                serving.cancel_scope.cancel()
            # Accepting is over: our copy of the listening socket goes now, not after the drain,
            # so that once every holder has let go, a new server can bind the port at once.
            listener.close()
            logger.info("worker %d: closing %d clients", self.index, len(self._accepted))
            for conn in list(self._accepted):
                conn.close(websocket.CLOSE_GOING_AWAY, "server shutting down")
            connections.cancel_scope.deadline = trio.current_time() + DRAIN_TIMEOUT

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
                self.counted_lines.note("accept", _report_accept_failures, error)
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
