"""The ZeroMQ backend (``zmq://HOST:PORT``): one DEALER socket to the proxy's ROUTER, driven by
Trio's event loop.

pyzmq has no Trio integration, so this module owns the one delicate part: ZeroMQ signals
readiness through ``zmq.FD``, which is edge-triggered and also consumed by any other operation on
the socket (a send included). The reader therefore drains until ``zmq.Again``, re-checks
``zmq.EVENTS`` before it sleeps, and is woken by hand after every send.

Every request to the proxy (subscribe, publish, ping) is answered, and the answers are matched to
their requests by id, so many may be outstanding at once (``backplane._zmq_wire`` has the
commands). ``subscribe`` returns once the proxy has registered the topic, which makes it exact;
``publish`` returns once the proxy has routed the message, or raises
:class:`BackplaneUnavailable`: a message is never dropped without its publisher being told.
``append`` is the same with the proxy as the topics' sequencer: its answer is the message's
position, and ``history`` is answered from the proxy's memory. The ``history`` policy given to
``open_backplane`` does not apply here: the proxy's own does.

The socket only queues to a completed connection (``ZMQ_IMMEDIATE``) and has no high-water mark,
so a send that ZeroMQ refuses means one thing: there is no connection to the proxy. A monitor of
the socket reports the connection's end as it happens: requests already sent lose their answers
with it, and fail at once, and publish refuses until the proxy answers again.

The backplane pings the proxy every ``PING_INTERVAL``, and at once whenever ZeroMQ (re)connects.
The answer names the proxy's instance and how many of our topics it holds; when that is not what
we hold (the proxy restarted, or forgot us while we were silent) we send it our whole set again,
so subscriptions come back by themselves.

With CURVE keys the connection is encrypted and the proxy checks our public key. A refused
handshake is not a silence: the monitor reports it, opening fails at once with the reason
(our key is not allowed, the proxy's key is not the one we were given, one side has no CURVE),
and a refusal after opening is logged once until a handshake succeeds again. ZeroMQ itself
does not try again after the proxy refused a key: the backplane connects anew every
``REFUSED_RETRY_INTERVAL``, so that a key allowed later gets back in without a restart.
"""

from __future__ import annotations

import itertools
import logging
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import trio
import zmq
from zmq.utils.monitor import parse_monitor_message

from trio_fanout.backplane._credentials import CurveClientKeys
from trio_fanout.backplane._interface import (
    QUERY_NUMBER_CAP,
    Backplane,
    BackplaneUnavailable,
    History,
    MessageQueue,
    Position,
    Received,
    check_history_query,
    check_topic,
    unwrap_single_errors,
)
from trio_fanout.backplane._shrink import ShrinkWatch, give_back_freed_memory, rebuild_dict
from trio_fanout.backplane._zmq_wire import (
    APPEND,
    BYE,
    CREDIT,
    EPOCH_SIZE,
    FOREIGN_EPOCH,
    HISTORY,
    HISTORY_HEAD,
    ID_END,
    MAX_TOPICS_PER_MESSAGE,
    MESSAGE,
    NUMBER,
    NUMBERED,
    PING,
    POSITION_END,
    PUBLISH,
    REPLY,
    SUBSCRIBE,
    SYNC,
    SYNC_FIRST,
    SYNC_LAST,
    UNSUBSCRIBE,
    events,
    file_descriptor,
    message_cost,
    pack_position,
    receive_frames,
    send_frames,
    unpack_position,
    zmq_endpoint,
)

logger = logging.getLogger(__name__)

# How long opening may wait for the proxy's first answer, and each subscription for its answer.
CONNECT_TIMEOUT = 5.0
SUBSCRIBE_TIMEOUT = 5.0

# How long a publish waits for the proxy's answer before it is refused. The proxy answers in
# well under a millisecond when it is there; this bounds how long a message lost with a proxy
# that stopped answering (without closing its connection) goes unnoticed.
PUBLISH_TIMEOUT = 2.0

# How often the backplane pings the proxy, and how long an answer may take. While a ping goes
# unanswered, publish refuses at once instead of waiting PUBLISH_TIMEOUT for each message.
PING_INTERVAL = 1.0
PING_TIMEOUT = 1.0

# Requests waiting for their answers before further ones are refused: a proxy that does not
# keep up must not make us queue without end.
MAX_OUTSTANDING_REQUESTS = 100_000

# Bytes of messages our consumer takes before we return them to the proxy as credit: small
# against the proxy's backlog limit (64 MiB), large enough that credit costs little.
CREDIT_STEP_BYTES = 256 * 1024

# The reader never pauses (answers arrive behind messages): the proxy's credit bound is what
# bounds our queue of messages, so the queue's own high-water mark is one it never reaches.
QUEUE_NEVER_FULL = sys.maxsize

# Messages received per wake-up before other tasks get a turn.
RECEIVE_BATCH = 500

# Opening retries its first ping from this delay up to the longest, while ZeroMQ connects.
FIRST_CONNECT_RETRY = 0.001
LONGEST_CONNECT_RETRY = 0.1

# Commands still queued when a backplane closes (its BYE, unsubscriptions, credit) get this
# long to reach the proxy. Publishes are not among them: each was answered before it returned.
CLOSE_LINGER_MS = 1_000

# How often a backplane whose handshake was refused connects anew (ZeroMQ gives up on a refused
# key for good): often enough that a key allowed again is back within seconds, rarely enough
# that a refused client costs the proxy one handshake every few seconds.
REFUSED_RETRY_INTERVAL = 5.0

# What the monitor reports about the connection's handshake.
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


class _Request:
    """One request sent: its answer's frames, or the error that ended the wait."""

    __slots__ = ("answer", "done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.answer: list[bytes] = []
        self.error: BackplaneUnavailable | None = None


class ZmqBackplane(Backplane):
    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        host: str,
        port: int,
        curve: CurveClientKeys | None = None,
    ) -> None:
        self.endpoint = f"zmq://{host}:{port}"
        self._curve = curve
        self._socket = context.socket(zmq.DEALER)
        if curve is not None:
            self._socket.setsockopt(zmq.CURVE_SERVERKEY, curve.server_key)
            self._socket.setsockopt(zmq.CURVE_PUBLICKEY, curve.public_key)
            self._socket.setsockopt(zmq.CURVE_SECRETKEY, curve.secret_key)
        self._socket.setsockopt(zmq.IMMEDIATE, 1)  # no connection: sends fail instead of queue
        # No high-water marks: outgoing requests are bounded by MAX_OUTSTANDING_REQUESTS, and
        # incoming messages by the proxy's credit limit, in bytes.
        self._socket.setsockopt(zmq.SNDHWM, 0)
        self._socket.setsockopt(zmq.RCVHWM, 0)
        self._socket.setsockopt(zmq.LINGER, CLOSE_LINGER_MS)
        self._zmq_endpoint = zmq_endpoint(host, port)
        self._socket.connect(self._zmq_endpoint)
        self._fd = file_descriptor(self._socket)
        self._monitor = self._socket.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | _HANDSHAKE_FAILED
        )
        # Why the last handshake failed, and when we last connected anew after it; None since
        # one succeeded (or before the first).
        self._handshake_refusal: str | None = None
        self._refused_since: float | None = None
        # Until connect() returns, a refusal is raised to whoever opens the backplane, who
        # reports it (the command line prints it): logged as well, it would be said twice.
        self._connecting = True
        self._monitor_fd = file_descriptor(self._monitor)
        self._ping_now = trio.Event()
        self._queue = MessageQueue(high_water=QUEUE_NEVER_FULL)
        self._subscriptions: Counter[bytes] = Counter()
        self._subscriptions_shrink = ShrinkWatch()
        # Topics left but not yet unsubscribed at the proxy: sent by _send_unsubscriptions,
        # woken by _unsubscriptions_queued, and before any other send (so that a SUBSCRIBE
        # that follows an UNSUBSCRIBE of its topic reaches the proxy after it).
        self._unsubscriptions: list[bytes] = []
        self._unsubscriptions_queued = trio.Event()
        self._requests: dict[bytes, _Request] = {}
        self._request_ids = itertools.count(1)
        self._taken_bytes = 0  # taken by our consumer, not yet returned to the proxy as credit
        self._wait_scope: trio.CancelScope | None = None
        self._proxy_answers = False
        self._proxy_instance: bytes | None = None
        self._last_epoch_bytes = b""
        self._last_epoch = ""
        self._syncing = False

    # ---- the Backplane interface ---------------------------------------------------------

    @property
    def unavailable_reason(self) -> str | None:
        """Down while the last probe of :meth:`watch_proxy` went unanswered."""
        if self._proxy_answers:
            return None
        return self._handshake_refusal or f"the ZeroMQ proxy at {self.endpoint} does not answer"

    async def publish(self, topic: bytes, payload: bytes) -> None:
        check_topic(topic)
        # No schedule point before the send (the wait for the answer is one): publishers
        # number a payload just before they hand it here, and a task switch would let a later
        # number reach the proxy first, which receivers would count as a gap.
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._proxy_answers:
            raise BackplaneUnavailable(f"the ZeroMQ proxy at {self.endpoint} does not answer")
        await self._request(PUBLISH, topic, [payload], PUBLISH_TIMEOUT)

    async def subscribe(self, topic: bytes) -> None:
        check_topic(topic)
        self._subscriptions[topic] += 1
        try:
            refused = await self._request(SUBSCRIBE, topic, [], SUBSCRIBE_TIMEOUT)
            if refused:
                raise BackplaneUnavailable(self._refusal(refused))
        except BaseException:
            self.unsubscribe(topic)
            raise

    def _refusal(self, answer: list[bytes]) -> str:
        reason = answer[0].decode("utf-8", "replace")
        return f"the ZeroMQ proxy at {self.endpoint} refused: {reason}"

    def unsubscribe(self, topic: bytes) -> None:
        count = self._subscriptions[topic] - 1
        if count > 0:
            self._subscriptions[topic] = count
            return
        del self._subscriptions[topic]
        if self._subscriptions_shrink.should_rebuild(len(self._subscriptions)):
            rebuild_dict(self._subscriptions)
            give_back_freed_memory()
        # Messages that still come for the topic are dropped on arrival (see _drain).
        self._unsubscriptions.append(topic)
        self._unsubscriptions_queued.set()

    async def append(self, topic: bytes, payload: bytes) -> Position:
        check_topic(topic)
        await trio.lowlevel.checkpoint_if_cancelled()  # and no schedule point: see publish
        if not self._proxy_answers:
            raise BackplaneUnavailable(f"the ZeroMQ proxy at {self.endpoint} does not answer")
        answer = await self._request(APPEND, topic, [payload], PUBLISH_TIMEOUT)
        try:
            (frame,) = answer
            return Position(*unpack_position(frame))
        except ValueError:
            raise BackplaneUnavailable(
                f"{self.endpoint} answered an append with {answer!r}"
            ) from None

    async def history(
        self, topic: bytes, since: Position | None = None, limit: int | None = None
    ) -> History:
        check_topic(topic)
        check_history_query(since, limit)
        await trio.lowlevel.checkpoint()
        if not self._proxy_answers:
            raise BackplaneUnavailable(f"the ZeroMQ proxy at {self.endpoint} does not answer")
        query = [
            b"" if since is None else self._since(since),
            b"" if limit is None else NUMBER.pack(min(limit, QUERY_NUMBER_CAP)),
        ]
        answer = await self._request(HISTORY, topic, query, PUBLISH_TIMEOUT)
        if not answer or len(answer[0]) <= HISTORY_HEAD.size:
            raise BackplaneUnavailable(f"{self.endpoint} answered a history with {answer!r}")
        latest, first, complete = HISTORY_HEAD.unpack_from(answer[0])
        epoch = answer[0][HISTORY_HEAD.size :].decode("ascii")
        messages = list(zip(itertools.count(first), answer[1:], strict=False))
        return History(epoch, latest, messages, complete)

    async def receive_batch(self, max_messages: int | None = None) -> list[Received]:
        batch = await self._queue.take(max_messages)
        self._taken_bytes += sum(message_cost(topic, payload) for topic, payload, _ in batch)
        if self._taken_bytes >= CREDIT_STEP_BYTES:
            with suppress(BackplaneUnavailable):  # a new proxy starts our account at zero
                self._send([CREDIT + NUMBER.pack(self._taken_bytes)])
            self._taken_bytes = 0
        return batch

    # ---- requests and their answers -----------------------------------------------------

    async def _request(
        self, command: bytes, fields: bytes, frames: list[bytes], give_up_after: float
    ) -> list[bytes]:
        """Send a request (its head: ``command``, a request id and ``fields``; then ``frames``)
        and return its answer's frames after the head, or raise
        :class:`BackplaneUnavailable`."""
        if len(self._requests) >= MAX_OUTSTANDING_REQUESTS:
            raise BackplaneUnavailable(f"the ZeroMQ proxy at {self.endpoint} is not keeping up")
        request_id = NUMBER.pack(next(self._request_ids))
        request = self._requests[request_id] = _Request()
        try:
            self._send([command + request_id + fields, *frames])
            with trio.move_on_after(give_up_after):
                await request.done.wait()
        finally:
            del self._requests[request_id]
        if request.error is not None:
            raise request.error
        if not request.done.is_set():
            raise BackplaneUnavailable(
                f"no answer from the ZeroMQ proxy at {self.endpoint} within {give_up_after} s"
            )
        return request.answer

    def _send(self, frames: list[bytes] | None) -> None:
        """Send the queued unsubscriptions, then one message (none if ``frames`` is None), or
        raise :class:`BackplaneUnavailable`."""
        try:
            if self._unsubscriptions:
                self._send_unsubscriptions()
            if frames is not None:
                send_frames(self._socket, frames)
        except zmq.Again:
            self._connection_lost()
            raise BackplaneUnavailable(
                f"no connection to the ZeroMQ proxy at {self.endpoint}"
            ) from None
        # The send may have consumed the edge that was to wake the reader.
        if self._wait_scope is not None and events(self._socket) & zmq.POLLIN:
            self._wait_scope.cancel()

    def _send_unsubscriptions(self) -> None:
        """Send the queued unsubscriptions, MAX_TOPICS_PER_MESSAGE to a message (a mass
        disconnect leaves thousands of rooms in one turn of the loop, and one send per topic
        cost ~50 µs, which held the loop for seconds). Raises
        ``zmq.Again`` when there is no connection: they are dropped then, and our next ping
        finds the proxy's count wrong and sends it our whole set."""
        topics, self._unsubscriptions = self._unsubscriptions, []
        for start in range(0, len(topics), MAX_TOPICS_PER_MESSAGE):
            part = topics[start : start + MAX_TOPICS_PER_MESSAGE]
            send_frames(self._socket, [UNSUBSCRIBE, *part])

    async def send_unsubscriptions(self) -> None:
        """Send queued unsubscriptions once per wake-up of their queue: however many rooms a
        batch of closing connections leaves, the cost is a few sends, not one per topic."""
        while True:
            await self._unsubscriptions_queued.wait()
            self._unsubscriptions_queued = trio.Event()
            if self._unsubscriptions:
                with suppress(BackplaneUnavailable):
                    self._send(None)

    def _connection_lost(self) -> None:
        """The connection that carried our outstanding requests is gone, and their answers
        with it: fail them all now rather than at their timeouts."""
        if self._proxy_answers:
            logger.warning("lost the connection to the ZeroMQ proxy at %s", self.endpoint)
        self._proxy_answers = False
        error = BackplaneUnavailable(
            f"the connection to the ZeroMQ proxy at {self.endpoint} was lost"
        )
        for request in self._requests.values():
            if not request.done.is_set():
                request.error = error
                request.done.set()

    async def run_reader(self) -> None:
        """Move messages and answers off the socket; the one task that reads it."""
        sock = self._socket
        while True:
            self._drain()
            if events(sock) & zmq.POLLIN:
                await trio.lowlevel.checkpoint()
                continue
            with trio.CancelScope() as self._wait_scope:
                await trio.lowlevel.wait_readable(self._fd)
            self._wait_scope = None

    def _drain(self) -> None:
        sock, queue, requests = self._socket, self._queue, self._requests
        subscriptions = self._subscriptions
        for _ in range(RECEIVE_BATCH):
            try:
                frames = receive_frames(sock)
            except zmq.Again:
                return
            head = frames[0]
            kind = head[:1]
            if kind == MESSAGE and len(frames) == 2:
                topic = head[1:]
                if topic in subscriptions:
                    queue.put(topic, frames[1])
                else:  # unsubscribed, its UNSUBSCRIBE queued or on its way: taken, as credit
                    self._taken_bytes += message_cost(topic, frames[1])
            elif kind == NUMBERED and len(frames) == 2 and len(head) > POSITION_END:
                topic = head[POSITION_END:]
                if topic in subscriptions:
                    queue.put(topic, frames[1], self._position(head))
                else:  # as above
                    self._taken_bytes += message_cost(topic, frames[1])
            elif kind == REPLY:
                request = requests.get(head[1:ID_END])
                if request is not None:  # else it timed out: nobody waits for it any more
                    # A field in the head after the request id is the answer's first.
                    request.answer = frames[1:]
                    if len(head) > ID_END:
                        request.answer.insert(0, head[ID_END:])
                    request.done.set()
            else:
                logger.warning("ignored a message of %d frames from the proxy", len(frames))

    @staticmethod
    def _since(since: Position) -> bytes:
        """``since`` as the proxy takes it. An epoch that is not 16 ASCII characters is no
        epoch of the proxy's (a client may send anything): it is sent as one that never
        matches, which gets the same answer."""
        epoch = since.epoch
        if len(epoch) == EPOCH_SIZE and epoch.isascii():
            epoch_bytes = epoch.encode()
        else:
            epoch_bytes = FOREIGN_EPOCH
        return pack_position(min(since.offset, QUERY_NUMBER_CAP), epoch_bytes)

    def _position(self, head: bytes) -> Position:
        """The position in a numbered message's head; the epoch is decoded once per epoch."""
        epoch_bytes = head[1 + NUMBER.size : POSITION_END]
        if epoch_bytes != self._last_epoch_bytes:
            self._last_epoch_bytes = epoch_bytes
            self._last_epoch = epoch_bytes.decode("ascii", "replace")
        return Position(self._last_epoch, NUMBER.unpack_from(head, 1)[0])

    # ---- keeping in touch with the proxy --------------------------------------------------

    async def ping(self, give_up_after: float) -> None:
        """Ask the proxy whether it is there and holds our topics; send it our whole set when
        it does not (it restarted, or forgot us). Raises :class:`BackplaneUnavailable`."""
        held = len(self._subscriptions)
        answer = await self._request(PING, NUMBER.pack(held), [], give_up_after)
        if len(answer) != 2 or len(answer[1]) != NUMBER.size:
            raise BackplaneUnavailable(f"{self.endpoint} answered a ping with {answer!r}")
        instance, count = answer
        if not self._proxy_answers:
            logger.log(
                logging.WARNING if self._proxy_instance else logging.DEBUG,
                "the ZeroMQ proxy at %s answers", self.endpoint,
            )  # fmt: skip
        if self._proxy_instance not in (None, instance):
            logger.warning("the ZeroMQ proxy at %s restarted", self.endpoint)
        self._proxy_instance = instance
        self._proxy_answers = True
        # While a SYNC is under way the counts differ by design: one at a time.
        if NUMBER.unpack(count)[0] != held and not self._syncing:
            self._syncing = True
            try:
                await self._sync()
            finally:
                self._syncing = False

    async def _sync(self) -> None:
        """Send our whole set of topics, MAX_TOPICS_PER_MESSAGE to a part and one part at a
        time, so that neither message nor the proxy's work on it grows with the set. Topics
        subscribed or unsubscribed meanwhile reach the proxy in order with the parts; one
        unsubscribed before its part is sent is left out of it."""
        topics = list(self._subscriptions)
        starts = range(0, max(len(topics), 1), MAX_TOPICS_PER_MESSAGE)  # one part at least
        for start in starts:
            stage = (SYNC_FIRST if start == 0 else 0) | (SYNC_LAST if start == starts[-1] else 0)
            part = topics[start : start + MAX_TOPICS_PER_MESSAGE]
            held = [topic for topic in part if topic in self._subscriptions]
            refused = await self._request(SYNC, bytes([stage]), held, SUBSCRIBE_TIMEOUT)
            if refused:
                logger.warning("%s", self._refusal(refused))
        logger.info("sent our %d subscriptions to %s again", len(topics), self.endpoint)

    async def keep_in_touch(self) -> None:
        """Ping every PING_INTERVAL, and as soon as ZeroMQ has connected again; while the proxy
        does not answer, publish refuses at once."""
        while True:
            with trio.move_on_after(PING_INTERVAL):
                await self._ping_now.wait()
            self._ping_now = trio.Event()
            try:
                await self.ping(PING_TIMEOUT)
            except BackplaneUnavailable as error:
                if self._proxy_answers:
                    logger.warning("%s", error)
                self._proxy_answers = False
                self._connect_again_if_refused()

    def _connect_again_if_refused(self) -> None:
        """Connect anew, at most every REFUSED_RETRY_INTERVAL, while the last handshake was
        refused (ZeroMQ does not retry a key the proxy refused)."""
        now = trio.current_time()
        if self._refused_since is None or now - self._refused_since < REFUSED_RETRY_INTERVAL:
            return
        self._refused_since = now
        with suppress(zmq.ZMQError):  # not connected at the moment: nothing to undo
            self._socket.disconnect(self._zmq_endpoint)
        self._socket.connect(self._zmq_endpoint)

    async def watch_connection(self) -> None:
        """Follow the socket's monitor: a lost connection fails what waits for an answer, a new
        one is pinged at once (to find out whether the proxy still holds our topics)."""
        while True:
            while True:
                try:
                    frames = self._monitor.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                message = parse_monitor_message(frames)
                event = message["event"]
                if event == zmq.EVENT_DISCONNECTED:
                    self._connection_lost()
                elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self._handshake_refusal = self._refused_since = None
                    self._ping_now.set()
                elif event & _HANDSHAKE_FAILED:
                    refusal = self._describe_refusal(event, message["value"])
                    if refusal != self._handshake_refusal and not self._connecting:
                        logger.error("%s", refusal)
                    self._handshake_refusal = refusal
                    if self._refused_since is None:
                        self._refused_since = trio.current_time()
            if not events(self._monitor) & zmq.POLLIN:
                await trio.lowlevel.wait_readable(self._monitor_fd)

    def _describe_refusal(self, event: int, value: int) -> str:
        """What a failed handshake means, in the words of the settings that fix it."""
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return (
                f"the ZeroMQ proxy at {self.endpoint} refused our CURVE key: it is not among "
                "the keys the proxy allows (curve_allowed_keys_dir)"
            )
        if self._curve is None:
            # A proxy with CURVE drops a plain client's handshake, with or without saying why
            # (a mechanism mismatch, or no detail): nothing else fails a plain handshake.
            return (
                f"the ZeroMQ proxy at {self.endpoint} refused our handshake: it requires CURVE "
                "(give this process curve_secret_key_file, and curve_server_key_file unless "
                "it shares the proxy's key pair)"
            )
        if (
            event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
        ):
            return (
                f"the ZeroMQ proxy at {self.endpoint} does not use CURVE, and this process was "
                "given curve_secret_key_file"
            )
        return (
            f"the CURVE handshake with the ZeroMQ proxy at {self.endpoint} failed: is "
            "curve_server_key_file the proxy's public key?"
        )

    async def connect(self) -> None:
        """Wait until the proxy answers, for at most CONNECT_TIMEOUT; fail at once when it
        refuses our handshake."""
        delay = FIRST_CONNECT_RETRY
        with trio.move_on_after(CONNECT_TIMEOUT):
            while True:
                try:
                    await self.ping(CONNECT_TIMEOUT)
                    self._connecting = False
                    return
                except BackplaneUnavailable:  # not connected yet: ZeroMQ keeps trying
                    if self._handshake_refusal is not None:
                        raise BackplaneUnavailable(self._handshake_refusal) from None
                    await trio.sleep(delay)
                    delay = min(delay * 2, LONGEST_CONNECT_RETRY)
        raise BackplaneUnavailable(
            f"no answer from the ZeroMQ proxy at {self.endpoint} within {CONNECT_TIMEOUT} s"
        )

    def close(self) -> None:
        with suppress(BackplaneUnavailable):
            self._send([BYE])
        trio.lowlevel.notify_closing(self._monitor_fd)
        self._socket.disable_monitor()
        self._monitor.close()
        trio.lowlevel.notify_closing(self._fd)
        self._socket.close()


@asynccontextmanager
async def open_zmq_backplane(
    host: str, port: int, curve: CurveClientKeys | None = None
) -> AsyncIterator[ZmqBackplane]:
    """Connect to the proxy at ``host:port`` (with CURVE if given keys) and return once it
    answers."""
    backplane = ZmqBackplane(zmq.Context.instance(), host, port, curve)
    try:
        with unwrap_single_errors():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(backplane.run_reader)
                nursery.start_soon(backplane.watch_connection)
                nursery.start_soon(backplane.send_unsubscriptions)
                await backplane.connect()
                nursery.start_soon(backplane.keep_in_touch)
                logger.debug("connected to the ZeroMQ proxy at %s", backplane.endpoint)
                yield backplane
                nursery.cancel_scope.cancel()
    finally:
        backplane.close()
