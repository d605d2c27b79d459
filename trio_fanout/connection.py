"""One client connection: its handshake, its reader, and its buffer of pending outgoing bytes.

The send path (docs/architecture.md): the fan-out loop calls :meth:`Connection.enqueue` with a
frame already encoded for everybody, which appends to this connection's list of pending frames and
never awaits. The worker then calls :meth:`Connection.flush` once per batch, which writes every
pending frame with one non-blocking ``send``. Only a connection whose socket is full gets a task
that waits for it to drain; when a frame would take what waits behind a full socket past
``max_queued_frames`` frames or ``max_queued_bytes`` bytes, the connection is closed with 1013,
and nobody else waits for it.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import math
import os
import socket
import ssl
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import trio

from trio_fanout import http, parking, protocol, tls, tokens, websocket
from trio_fanout.backplane import BackplaneUnavailable
from trio_fanout.hooks import Forbidden
from trio_fanout.protocol import RequestError

if TYPE_CHECKING:
    from trio_fanout.worker import Worker

logger = logging.getLogger(__name__)

# One recv takes up to this much; a 64 KiB frame arrives in one or two reads.
RECEIVE_BYTES = 65536

# After we send a close frame, how long the client has to answer it (and take what we had
# queued for it) before the TCP connection is simply closed.
CLOSE_TIMEOUT = 2.0

# After a plain HTTP answer (404, /healthz, a refused upgrade), how long the connection waits
# for the client to close its side before closing ours. Enough for a client on the same
# network to read the answer and hang up; short, because until the socket is closed the
# connection holds a descriptor and a slot among max_handshakes, and a client that never
# reads or closes must not make those pile up.
HTTP_ANSWER_LINGER = 0.2

# A client refused for its budget this many times, without a pause of ABUSE_QUIET_SECONDS
# between refusals, ignores its rate_limited errors (or floods frames that earn no reply): it is
# closed with 1008. A client that backs off when told gets a clean slate after the pause. At full
# speed on loopback a flood passes 200 refusals within one read of the socket, so it is cut in
# milliseconds; a client that exceeds its rate by a little is cut within seconds.
ABUSE_REFUSALS = 200
ABUSE_QUIET_SECONDS = 1.0

_ids = itertools.count(1)

# Errors from send/recv that mean the peer is gone, not that we have a bug.
_PEER_GONE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, TimeoutError)


class RateLimiter:
    """A client's budget: two token buckets, one of frames and one of payload bytes.

    Every frame a client sends is charged against both, whether it carries a message, a ping,
    a pong or a fragment. A charge is granted while the frame bucket holds a token per frame and
    the byte bucket is not empty; the bytes are then taken even when that drives the byte bucket
    below zero, so a frame larger than what is left passes once and the next frames wait until
    the debt is refilled: no frame, however large, is refused for ever.

    It also tells persistent abuse from a burst: ``abusive`` becomes true once ``ABUSE_REFUSALS``
    frames have been refused with no pause of ``ABUSE_QUIET_SECONDS`` between two refusals,
    i.e. the client keeps sending although it is over its budget.
    """

    __slots__ = (
        "_byte_burst",
        "_byte_rate",
        "_bytes",
        "_frame_burst",
        "_frame_rate",
        "_frames",
        "_last",
        "_last_refusal",
        "_refusals",
    )

    def __init__(
        self, frames_per_second: float, frame_burst: int, bytes_per_second: float, byte_burst: int
    ) -> None:
        self._frame_rate = frames_per_second
        self._frame_burst = float(frame_burst)
        self._frames = float(frame_burst)
        self._byte_rate = bytes_per_second
        self._byte_burst = float(byte_burst)
        self._bytes = float(byte_burst)
        self._last = trio.current_time()
        self._refusals = 0
        self._last_refusal = -math.inf

    def allow(self, payload_bytes: int) -> bool:
        """Charge one frame that asks for an answer; whether it is within the budget."""
        return self.charge(1, payload_bytes) == 0

    def charge(self, frames: int, payload_bytes: int) -> int:
        """Charge ``frames`` frames carrying ``payload_bytes`` together; return how many of them
        were refused (counted towards :attr:`abusive`)."""
        now = trio.current_time()
        elapsed = now - self._last
        self._last = now
        self._frames = min(self._frame_burst, self._frames + elapsed * self._frame_rate)
        self._bytes = min(self._byte_burst, self._bytes + elapsed * self._byte_rate)
        granted = min(frames, int(self._frames)) if self._bytes > 0 else 0
        if granted:
            self._frames -= granted
            self._bytes -= payload_bytes
        refused = frames - granted
        if refused:
            if now - self._last_refusal > ABUSE_QUIET_SECONDS:
                self._refusals = 0
            self._refusals += refused
            self._last_refusal = now
        return refused

    @property
    def abusive(self) -> bool:
        return self._refusals > ABUSE_REFUSALS


class Connection:
    """A client's TCP connection, from HTTP request to close."""

    __slots__ = (
        "_cancel_scope",
        "_close_timeout",
        "_closing",
        "_dirty",
        "_dirty_list",
        "_limiter",
        "_max_queued_bytes",
        "_max_queued_frames",
        "_nursery",
        "_parser",
        "_pending",
        "_queued_bytes",
        "_sock",
        "_tls",
        "_token_end",
        "_token_warned",
        "_unsent",
        "_writer_running",
        "grant",
        "id",
        "identity",
        "last_flush",
        "peer",
        "rooms",
        "token_version",
        "worker",
    )

    def __init__(self, worker: Worker, sock: socket.socket, dirty_list: list[Connection]) -> None:
        self.id = next(_ids)
        self.worker = worker
        self.peer = _describe_peer(sock)
        self.rooms: set[str] = set()
        # What the authenticate hook returned (else the token's sub); the authorisation hooks
        # receive it.
        self.identity: Any = None
        # What the client's token allows, where the worker requires tokens; None until then.
        self.grant: tokens.Grant | None = None
        # The token's timer (see _watch_token): which token it was set for, whether the
        # expiry was announced, and when the token ends (this loop's clock).
        self.token_version = 0
        self._token_warned = False
        self._token_end = math.inf
        self._sock = sock
        # With TLS, what is pending is plaintext, and what is unsent is already encrypted.
        self._tls: tls.Session | None = worker.tls.session() if worker.tls is not None else None
        self._pending: list[bytes] = []
        # Bytes of a frame that a send wrote only partly: they must go out before anything else.
        self._unsent: bytes | memoryview = b""
        # The bytes pending and unsent: what max_queued_bytes bounds, kept up to date at each
        # append and send (never summed), and added to the worker's total at each change
        # (_count_queued). The memory held can be up to twice as much, since the unsent view
        # keeps its whole joined buffer alive until the view is sent.
        self._queued_bytes = 0
        self._dirty = False
        self._dirty_list = dirty_list
        # When the fan-out last wrote to this client (trio's clock): within write_delay of it,
        # the fan-out lets frames gather instead of writing at once (Worker.fan_out).
        self.last_flush = -math.inf
        self._writer_running = False
        self._closing = False
        self._close_timeout = CLOSE_TIMEOUT
        self._max_queued_frames = worker.config.max_queued_frames
        self._max_queued_bytes = worker.config.max_queued_bytes
        config = worker.config
        self._limiter = RateLimiter(
            config.rate_limit_per_second,
            config.rate_limit_burst,
            config.rate_limit_bytes_per_second,
            config.rate_limit_bytes_burst,
        )
        # The scope and nursery of the connection's task, None while it has none: before it
        # starts, and while the connection is parked (see trio_fanout/parking.py).
        self._cancel_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        # The client's frames, parsed across reads and across the tasks of a parked connection.
        self._parser: websocket.FrameParser | None = None

    def fileno(self) -> int:
        """The client socket's file descriptor (-1 once closed)."""
        return self._sock.fileno()

    # ---- the send path --------------------------------------------------------------------

    @property
    def queued_bytes(self) -> int:
        """The bytes waiting to be written to this client's socket: what ``max_queued_bytes``
        bounds."""
        return self._queued_bytes

    def enqueue(self, frame: bytes) -> None:
        """Queue one encoded frame; the next :meth:`flush` writes it. Never blocks."""
        size = len(frame)
        if (
            self._closing
            or len(self._pending) >= self._max_queued_frames
            or self._queued_bytes + size > self._max_queued_bytes
        ) and not self._room(size):
            self.worker.stats.frames_dropped += 1
            return
        self._pending.append(frame)
        self._queued_bytes += size
        self.worker.queued_bytes += size  # _count_queued, inline on the fan-out's path
        if not self._dirty:
            self._dirty = True
            self._dirty_list.append(self)

    def flush(self) -> None:
        """Write what is pending with one non-blocking send; never blocks, never raises."""
        self._dirty = False
        if self._writer_running or not (self._pending or self._unsent):
            return
        self._send_now()
        self._write_later()

    def _write_later(self) -> None:
        """Start the task that waits for a full socket to drain, if something waits for it (a
        parked connection gets its task back first)."""
        if not (self._pending or self._unsent) or self._writer_running:
            return
        if self._nursery is not None:
            self._writer_running = True
            try:
                self._nursery.start_soon(self._write_when_writable)
            except RuntimeError:
                # The nursery closed when its last task ended, and _run() has not yet resumed
                # to forget it: _run() sees what is left, and writes it before parking or in
                # the close.
                self._writer_running = False
        else:
            self.worker.wake(self)  # if parked: its new task starts the writer

    def _send_now(self) -> None:
        """Write the unsent rest of a frame, then every pending frame, as far as the socket
        takes them; what it does not take stays as a view, never copied again."""
        try:
            if self._unsent:
                self.worker.sends += 1
                sent = self._sock.send(self._unsent)
                self._count_queued(-sent)
                if sent < len(self._unsent):
                    self._unsent = self._unsent[sent:]
                    return
                self._unsent = b""  # an empty view would still hold the whole buffer
            pending = self._pending
            session = self._tls
            if not pending and (session is None or not session.wants_write):
                return
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            self.worker.sends += 1
            self.worker.frames_sent += len(pending)
            pending.clear()  # their bytes, now in data, stay counted until sent
            if session is not None:
                # The batch is encrypted as a whole: a few records, not one per frame.
                wire = session.seal(data)
                self._count_queued(len(wire) - len(data))
                data = wire
            try:
                sent = self._sock.send(data)
            except BlockingIOError:
                sent = 0
            self._count_queued(-sent)
            if sent < len(data):
                self._unsent = memoryview(data)[sent:]
        except BlockingIOError:
            return  # the unsent rest is kept as it was
        except OSError as error:  # ssl.SSLError included
            self._lost(error)

    async def _write_when_writable(self) -> None:
        """Runs only while the socket is full: waits for room, then writes what is pending."""
        try:
            while self._pending or self._unsent:
                await trio.lowlevel.wait_writable(self._sock)
                self._send_now()
        finally:
            self._writer_running = False

    def _lost(self, error: OSError) -> None:
        if not isinstance(error, _PEER_GONE) and error.errno not in (errno.EPIPE, errno.ECONNRESET):
            logger.warning("connection %d: send failed: %s", self.id, error)
        self._closing = True
        self._drop_queued()
        self._stop_task()

    def close(self, code: int, reason: str = "", *, drop_pending: bool = False) -> None:
        """Start closing with ``code``: stop reading and queue the close frame after what is
        pending (or instead of it, with ``drop_pending``).

        Safe to call from any task and more than once; the connection's own task finishes the
        close handshake (bounded by ``CLOSE_TIMEOUT``).
        """
        if self._closing:
            return
        self._closing = True
        if drop_pending or self.id not in self.worker.connections:
            # Not the unsent rest of a frame, though: the close frame must not land inside it.
            self.worker.stats.frames_dropped += len(self._pending)
            self._pending.clear()
            self._count_queued(len(self._unsent) - self._queued_bytes)
        if self.id in self.worker.connections:
            self._append(websocket.encode_close_frame(code, reason))
            self.flush()
        # else: no WebSocket yet, nothing to say: just hang up
        self._stop_task()

    def _stop_task(self) -> None:
        """Make the connection's task go on to the close: interrupt it, or start one for a
        parked connection."""
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()
        else:
            self.worker.wake(self)  # if parked

    def reply(self, frame: bytes) -> None:
        """Answer this client now with a JSON frame."""
        self.send_encoded(websocket.encode_text_frame(frame))

    def send_encoded(self, frame: bytes) -> None:
        """Queue an encoded frame and write it now (not via the worker's list of connections
        to flush, which is the fan-out's)."""
        self.send_encoded_many([frame])

    def send_encoded_many(self, frames: list[bytes]) -> None:
        """Queue encoded frames, under the same limits as one, and write them together."""
        for position, frame in enumerate(frames):
            size = len(frame)
            if (
                self._closing
                or len(self._pending) >= self._max_queued_frames
                or self._queued_bytes + size > self._max_queued_bytes
            ) and not self._room(size):
                self.worker.stats.frames_dropped += len(frames) - position
                return
            self._append(frame)
        self.flush()

    def _append(self, frame: bytes) -> None:
        self._pending.append(frame)
        self._count_queued(len(frame))

    def _count_queued(self, change: int) -> None:
        """Change the bytes queued here, and the worker's total (``/healthz``) with them."""
        self._queued_bytes += change
        self.worker.queued_bytes += change

    def _drop_queued(self) -> None:
        """Forget whatever is still queued: the client is gone, or its socket is closed."""
        self.worker.stats.frames_dropped += len(self._pending) + bool(self._unsent)
        self._pending.clear()
        self._unsent = b""
        self._count_queued(-self._queued_bytes)

    def _room(self, size: int) -> bool:
        """Whether a frame of ``size`` bytes may be queued: not when closing, nor when the queue
        would pass a limit and a write does not make room (the socket is full: the client is too
        slow and is closed with 1013). A large batch can fill the queue of a healthy client
        too, hence the write first, tried even while the writer task waits: a client that reads
        may have made room since. A frame that finds nothing queued is taken, whatever its
        size."""
        if self._closing:
            return False
        self._send_now()
        if self._closing:  # the write found the client gone
            return False
        queued = self._queued_bytes
        if queued and (
            len(self._pending) >= self._max_queued_frames or queued + size > self._max_queued_bytes
        ):
            logger.debug(
                "connection %d (%s) is too slow: %d frames, %d bytes wait behind a full socket;"
                " closing it 1013",
                self.id, self.peer, len(self._pending), queued,
            )  # fmt: skip
            self.worker.stats.slow_closes += 1
            self.worker.note_close("too slow (1013)")
            self.close(
                websocket.CLOSE_TRY_AGAIN_LATER, "too slow: queue over the limit", drop_pending=True
            )
            return False
        self._write_later()
        return True

    # ---- the connection's task ----------------------------------------------------------------

    async def serve(self) -> None:
        """Run the connection from its HTTP request until it closes or is parked; bad input
        never escapes as an exception."""
        await self._run(handshake=True)

    async def resume(self) -> None:
        """Run a parked connection again, from where its last task stopped."""
        await self._run(handshake=False)

    async def _run(self, *, handshake: bool) -> None:
        parked = False
        try:
            while not self._closing:
                with trio.CancelScope() as self._cancel_scope:
                    try:
                        async with trio.open_nursery() as self._nursery:
                            self._write_later()  # what came for it while it was parked
                            data: bytes | None = b""
                            if handshake:
                                data = await self._handshake()
                            if data is not None:
                                await self._read_frames(data)
                    finally:
                        self._nursery = None  # closed: flush() must not start a writer in it
                if not self._cancel_scope.cancelled_caught or self._closing:
                    break  # the client went away, or the connection closes
                # Cancelled by the idle deadline of _receive: park, unless something is still
                # to be written or the kernel will not watch the socket (then go round again:
                # wait for the socket to drain, or try again after the next idle second).
                self._cancel_scope = None
                handshake = False
                if not (self._pending or self._unsent) and self.worker.park(self, self.fileno()):
                    parked = True
                    return
        except Exception:
            logger.exception("connection %d (%s): internal error", self.id, self.peer)
            self.close(websocket.CLOSE_INTERNAL_ERROR, "internal error")
        finally:
            self._cancel_scope = None
            if not parked:
                await self._close_out()

    async def _close_out(self) -> None:
        """Leave every room, finish the close (or just hang up), and free the slot."""
        try:
            # Shielded, and bounded: by max_rooms_per_connection and by the close timeout.
            with trio.CancelScope(shield=True):
                await self.worker.forget(self)
                if self._closing:
                    await self._finish_close()
                else:
                    # The peer went away, or we are cancelled from outside: nothing to say.
                    trio.lowlevel.notify_closing(self._sock)
                    self._sock.close()
        finally:
            self._drop_queued()  # what the close could not send is dropped with the socket
            self.worker.release(self)

    def abandon(self) -> None:
        """Close a parked connection's socket at once, without a word: its worker stops without
        a graceful stop (cancelled), so no task can do more."""
        self.worker.forget_now(self)
        self._sock.close()
        self._drop_queued()
        self.worker.release(self)

    async def _handshake(self) -> bytes | None:
        """Answer the HTTP request; return bytes already read past a WebSocket handshake, or
        None when the request was plain HTTP (answered) or never completed.

        ``handshake_timeout`` bounds all of it, however the bytes trickle in: a client that
        sends its head a byte at a time holds its slot no longer than one that sends nothing.
        """
        head = websocket.RequestHeadReader()
        with trio.move_on_after(self.worker.config.handshake_timeout):
            try:
                while True:
                    data = await self._receive()
                    if not data:
                        return None
                    if (complete := head.feed(data)) is not None:
                        break
                request, leftover = complete
                response = http.plain_response(request, self.worker.health)
                if response is not None:
                    self._respond(response)
                    return None
                accept = websocket.websocket_accept_response(request)
                self._check_capacity()
                http.check_origin(request, self.worker.config.allowed_origins)
                self._check_query_token(request)
                await self._authenticate(request)
                self._check_capacity()  # others may have come in while the hook ran
            except websocket.NotHTTP as refusal:
                logger.debug("connection %d (%s): %s: closed", self.id, self.peer, refusal)
                return None
            except websocket.HandshakeError as refusal:
                logger.debug("connection %d: HTTP %d: %s", self.id, refusal.status, refusal)
                self.worker.stats.count_refusal(refusal.status)
                self.worker.note_refused_handshake(refusal)
                self._respond(http.refusal_response(refusal))
                return None
            self._append(accept)
            self.reply(
                protocol.welcome_frame(
                    self.worker.index, os.getpid(), self.worker.config.heartbeat_interval
                )
            )
            self.worker.register(self)
            if self.worker.tokens is not None:
                if self.grant is None:
                    self.worker.unauthenticated.add(self)
                self._watch_token()
            logger.debug("connection %d (%s): WebSocket open", self.id, self.peer)
            return leftover
        logger.debug("connection %d (%s): handshake timed out", self.id, self.peer)
        return None

    def _check_capacity(self) -> None:
        """Refuse the upgrade with 503 while this worker holds ``max_connections`` WebSockets."""
        if self.worker.at_connection_limit():
            raise websocket.HandshakeError(
                503,
                f"this worker is at its limit of {self.worker.config.max_connections} "
                "connections; try again later",
            )

    def _check_query_token(self, request: websocket.Request) -> None:
        """Take a ``?token=`` where the worker requires tokens; refuse a bad one with 401, and
        two with 400: which one the client meant is not for the server to guess."""
        verifier = self.worker.tokens
        given = request.param_values("token")
        if verifier is None or not given:
            return
        if len(given) > 1:
            raise http.TokenRefused(400, "the query string gives more than one token")
        (token,) = given
        try:
            self.grant = verifier.verify(token)
        except tokens.InvalidToken as invalid:
            raise http.TokenRefused(401, str(invalid)) from None
        self.identity = self.grant.sub

    async def _authenticate(self, request: websocket.Request) -> None:
        authenticate = self.worker.hooks.authenticate
        if authenticate is None:
            return
        try:
            self.identity = await authenticate(request)
        except Forbidden as refusal:
            raise http.HookRefused(403, str(refusal) or "forbidden") from None
        except Exception:
            logger.exception("connection %d: the authenticate hook failed", self.id)
            raise websocket.HandshakeError(500, "authentication failed") from None

    async def _authorize(self, hook: Any, request_id: int | None, action: str, *args: Any) -> None:
        """Run an authorisation hook; refuse with ``forbidden`` unless it allows ``action``."""
        if hook is None:
            return
        try:
            allowed = await hook(self.identity, *args)
        except Forbidden as refusal:
            raise RequestError(protocol.FORBIDDEN, str(refusal) or action, request_id) from None
        except Exception:
            logger.exception("connection %d: an authorisation hook failed", self.id)
            allowed = False  # fail closed
        if not allowed:
            raise RequestError(protocol.FORBIDDEN, f"not allowed to {action}", request_id)

    def _respond(self, response: bytes) -> None:
        """Send a complete HTTP response; the connection closes after it."""
        self._append(response)
        self.flush()
        self._closing = True
        self._close_timeout = HTTP_ANSWER_LINGER

    async def _receive(self, *, may_park: bool = False) -> bytes:
        """The next bytes from the client (decrypted, with TLS); b"" at end of stream, when it
        reset, or when its TLS failed.

        With ``may_park``, a wait longer than ``PARK_AFTER`` cancels the connection's task scope
        (see :meth:`_run`): the connection is parked, and nothing it sent is lost, since the
        deadline holds only while no byte has been read.
        """
        while True:
            try:
                data = self._sock.recv(RECEIVE_BYTES)
            except BlockingIOError:
                data = None  # waited for below: awaiting in the except block would keep the
                # exception and its traceback alive, one per idle connection
            except _PEER_GONE:
                return b""
            if data is None:
                if not may_park:
                    await trio.lowlevel.wait_readable(self._sock)
                    continue
                scope = self._cancel_scope
                assert scope is not None  # set by _run, around everything that reads
                scope.deadline = trio.current_time() + parking.PARK_AFTER
                await trio.lowlevel.wait_readable(self._sock)
                scope.deadline = math.inf
                if scope.cancel_called:
                    # The deadline passed after the socket became readable, before this task
                    # ran: park all the same, and leave the bytes to the next task.
                    await trio.lowlevel.checkpoint()  # raises Cancelled
                continue
            await trio.lowlevel.checkpoint()
            session = self._tls
            if session is None or not data:
                return data
            try:
                data = session.receive(data)
            except ssl.SSLError as error:
                self._tls_failed(error)
                return b""
            if session.wants_write:  # the handshake's answers, a key update
                self._send_now()
                self._write_later()
            if data or session.peer_closed:
                return data

    def _tls_failed(self, error: ssl.SSLError) -> None:
        """The client's TLS failed (a plain HTTP client, a handshake we refuse, a corrupt
        record): send the alert that says why, if any, and close. A plain HTTP request gets a
        plain HTTP answer that says this port speaks TLS."""
        logger.debug("connection %d (%s): TLS failed: %s", self.id, self.peer, error.reason)
        if error.reason == "HTTP_REQUEST" and self.id not in self.worker.connections:
            self._tls = None
            self._respond(http.plain_http_to_tls_port_response())
            return
        self._send_now()  # the alert, best effort: the connection closes without waiting

    async def _read_frames(self, data: bytes) -> None:
        """Parse the client's frames and act on each, charging every frame to its budget."""
        if self._parser is None:
            self._parser = websocket.FrameParser(self.worker.config.max_frame_bytes)
        parser = self._parser
        limiter = self._limiter
        while True:
            try:
                events = parser.feed(data)
            except websocket.MessageTooBig as too_big:
                self.worker.stats.count_error(protocol.TOO_LARGE)
                self.reply(protocol.error_frame(protocol.TOO_LARGE, str(too_big)))
                self.close(too_big.close_code, "frame too large")
                return
            except websocket.ProtocolViolation as violation:
                logger.debug("connection %d: %s", self.id, violation)
                self.worker.note_close(f"for breaking the protocol ({violation.close_code})")
                self.close(violation.close_code, str(violation))
                return
            for event in events:
                if isinstance(event, websocket.Message):
                    if limiter.allow(len(event.payload)):
                        await self._handle_message(event)
                    else:
                        self._refuse(event)
                elif isinstance(event, websocket.Unanswered):
                    # Pongs and fragments earn no reply, but cost work all the same.
                    if limiter.charge(event.frames, event.payload_bytes) and limiter.abusive:
                        self._close_abusive()
                elif isinstance(event, websocket.Ping):
                    if limiter.allow(len(event.payload)):
                        self.send_encoded(websocket.encode_frame(websocket.OP_PONG, event.payload))
                    elif limiter.abusive:
                        self._close_abusive()
                else:
                    self.close(event.code or websocket.CLOSE_NORMAL)
                    return
                if self._closing:
                    return
            if parser.failed:
                data = b""  # the next feed raises what went wrong after these events
                continue
            data = await self._receive(may_park=True)
            if not data:
                return

    def _refuse(self, message: websocket.Message) -> None:
        """Answer a message over the budget with ``rate_limited``; close a client that ignores
        those answers."""
        if self._limiter.abusive:
            self._close_abusive()
            return
        self.worker.stats.count_error(protocol.RATE_LIMITED)
        self.reply(
            protocol.error_frame(
                protocol.RATE_LIMITED,
                "too many frames; slow down",
                protocol.readable_id(message.payload) if message.is_text else None,
            )
        )

    def _close_abusive(self) -> None:
        logger.debug(
            "connection %d (%s) keeps sending past its budget: closing it 1008", self.id, self.peer
        )
        self.worker.note_close("over the rate limit (1008)")
        self.close(websocket.CLOSE_POLICY_VIOLATION, "rate limit exceeded")

    async def _handle_message(self, message: websocket.Message) -> None:
        """Act on a message within the budget: parse it as a request and answer it. Where a
        token is required and none was given yet, anything but a valid ``auth`` closes 4001."""
        awaiting_auth = self in self.worker.unauthenticated
        try:
            request = protocol.parse_request(message.payload, is_text=message.is_text)
            if awaiting_auth and not (isinstance(request, protocol.Auth) and not request.refresh):
                self._close_unauthenticated("the first frame must be auth")
                return
            await self._handle_request(request)
        except RequestError as refusal:
            if awaiting_auth:
                self._close_unauthenticated(f"the first frame must be auth: {refusal.message}")
                return
            self.worker.stats.count_error(refusal.code)
            self.reply(protocol.error_frame(refusal.code, refusal.message, refusal.request_id))

    async def _handle_request(self, request: protocol.Request) -> None:
        logger.debug(
            "connection %d received %r",
            self.id, request,
            extra={"connection": self.id, "room": getattr(request, "room", None)},
        )  # fmt: skip
        if isinstance(request, protocol.Publish):
            if self.grant is not None and not self.grant.may_publish(request.room):
                raise RequestError(
                    protocol.FORBIDDEN,
                    f"the token does not allow publishing to room {request.room!r}",
                    request.id,
                )
            await self._authorize(
                self.worker.hooks.authorize_publish,
                request.id,
                f"publish to room {request.room!r}",
                request.room,
                request.data,
            )
            with _unavailable_as_refusal(request.id):
                position = await self.worker.publish(self, request)
            if request.id is not None:
                self.reply(protocol.ack_frame(request.id, position.offset))
        elif isinstance(request, protocol.Join):
            if request.room not in self.rooms:
                if len(self.rooms) >= self.worker.config.max_rooms_per_connection:
                    raise RequestError(
                        protocol.TOO_MANY_ROOMS,
                        f"a connection may be in at most "
                        f"{self.worker.config.max_rooms_per_connection} rooms",
                        request.id,
                    )
                await self._authorize_join(request.room, request.id)
                # Checked after the hook, with no await before the join creates the room: the
                # limit is exact however many joins run at once.
                if self.worker.at_room_limit(request.room):
                    raise RequestError(
                        protocol.TOO_MANY_ROOMS,
                        f"this worker is at its limit of {self.worker.config.max_rooms_per_worker}"
                        " rooms (max_rooms_per_worker); try a room that already has members here,"
                        " or again later",
                        request.id,
                    )
            with _unavailable_as_refusal(request.id):
                await self.worker.join(self, request.room, request.id, request.since)
        elif isinstance(request, protocol.HistoryRequest):
            await self._authorize_join(request.room, request.id)
            with _unavailable_as_refusal(request.id):
                self.reply(await self.worker.read_history(request))
        elif isinstance(request, protocol.Auth):
            self._take_token(request)
        elif isinstance(request, protocol.Leave):
            if request.room not in self.rooms:
                raise RequestError(
                    protocol.NOT_MEMBER, f"not a member of room {request.room!r}", request.id
                )
            self.worker.leave(self, request.room)
            self.reply(protocol.left_frame(request.room, request.id))
        else:
            self.reply(protocol.pong_frame(request.id))

    async def _authorize_join(self, room: str, request_id: int | None) -> None:
        """The token's ``join`` claim, then the ``authorize_join`` hook; both also decide who
        may read a room's history."""
        if self.grant is not None and not self.grant.may_join(room):
            raise RequestError(
                protocol.FORBIDDEN, f"the token does not allow joining room {room!r}", request_id
            )
        await self._authorize(
            self.worker.hooks.authorize_join, request_id, f"join room {room!r}", room
        )

    # ---- tokens ------------------------------------------------------------------------------

    def _take_token(self, request: protocol.Auth) -> None:
        """Verify the token of an ``auth`` or ``refresh`` and answer ``authed``. A bad first
        token closes 4001; a bad refresh is refused and the current token stays."""
        verifier = self.worker.tokens
        if verifier is None:
            raise RequestError(protocol.UNKNOWN_TYPE, "this server does not use tokens", request.id)
        current = self.grant
        try:
            grant = verifier.verify(request.token)
        except tokens.InvalidToken as invalid:
            if current is None:
                self._close_unauthenticated(str(invalid))
                return
            raise RequestError(protocol.FORBIDDEN, str(invalid), request.id) from None
        if current is not None and grant.sub != current.sub:
            raise RequestError(
                protocol.FORBIDDEN, "a new token must have the same sub as the current one",
                request.id,
            )  # fmt: skip
        self.grant = grant
        if current is None:
            self.worker.unauthenticated.discard(self)
            if self.worker.hooks.authenticate is None:
                self.identity = grant.sub
        self._watch_token()
        self.reply(protocol.authed_frame(request.id, grant.sub, grant.exp))

    def _watch_token(self) -> None:
        """Set the worker's timer for this connection's next token deadline: the ``auth``
        frame's while it has no token, else the ``token_expiring`` warning. A timer set for an
        earlier token (another ``token_version``) is ignored when it comes due."""
        self.token_version += 1
        self._token_warned = False
        config = self.worker.config
        now = trio.current_time()
        if self.grant is None:
            self.worker.set_token_timer(self, now + config.handshake_timeout)
            return
        # Unix time to this loop's clock, once: a token's life is minutes, not months.
        until_exp = self.grant.exp - time.time()
        # Closed at exp. A token taken within the leeway after its exp (the minter's clock behind
        # ours) would be closed at once; it gets until exp + leeway to be refreshed instead.
        grace = 0.0 if until_exp > 0 else config.token_leeway
        self._token_end = now + until_exp + grace
        # Warned token_expiry_warning before exp, or halfway through a shorter life, so that a
        # client whose tokens live less than that does not refresh in a loop.
        warning = min(config.token_expiry_warning, max(until_exp, 0) / 2)
        self.worker.set_token_timer(self, now + max(until_exp - warning, 0))

    def token_timer_fired(self) -> None:
        """The worker's timer for the current token came due: close a connection that gave no
        token in time, warn of the token's expiry (and set the timer for it), or close at it."""
        if self.grant is None:
            timeout = self.worker.config.handshake_timeout
            self._close_unauthenticated(f"no auth frame within {timeout:g} s")
        elif not self._token_warned:
            self._token_warned = True
            self.reply(protocol.token_expiring_frame(self.grant.exp))
            self.worker.set_token_timer(self, self._token_end)
        else:
            self._close_unauthenticated("the token has expired")

    def _close_unauthenticated(self, reason: str) -> None:
        """Close 4001: no valid token (the reason says why, and never holds a token)."""
        logger.debug("connection %d (%s): closing 4001: %s", self.id, self.peer, reason)
        self.close(protocol.CLOSE_UNAUTHENTICATED, reason)  # cut to 123 bytes by the codec

    async def _finish_close(self) -> None:
        """Write what is still pending (the close frame or the HTTP answer), then wait for the
        client to close: all within ``CLOSE_TIMEOUT``, and the wait for the client's close
        within ``HTTP_ANSWER_LINGER`` after an HTTP answer (whose writing is not cut short by
        it: a browser that reads a script slowly on a busy machine still gets all of it)."""
        sock = self._sock
        with trio.move_on_after(CLOSE_TIMEOUT):
            try:
                await self._write_all()
                if self._tls is not None:
                    self._tls.close_notify()
                    self._send_now()
                    await self._write_all()
                sock.shutdown(socket.SHUT_WR)
                # Read until the client closes too: closing with unread input would reset the
                # connection and could destroy our close frame before the client reads it.
                with trio.move_on_after(self._close_timeout):
                    while await self._receive():
                        pass
            except OSError:
                pass
        trio.lowlevel.notify_closing(sock)
        sock.close()

    async def _write_all(self) -> None:
        """Wait until everything pending and unsent is written."""
        while self._pending or self._unsent:
            await trio.lowlevel.wait_writable(self._sock)
            self._send_now()


@contextlib.contextmanager
def _unavailable_as_refusal(request_id: int | None) -> Iterator[None]:
    """Answer a request that the backplane cannot serve now with ``backplane_unavailable``."""
    try:
        yield
    except BackplaneUnavailable as error:
        raise RequestError(protocol.BACKPLANE_UNAVAILABLE, str(error), request_id) from None


def _describe_peer(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"
