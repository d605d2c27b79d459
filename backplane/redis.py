"""The Redis backend (``redis://`` and ``rediss://``): one Redis channel per topic.

redis-py has no Trio support, so this module speaks RESP itself over Trio streams, with the
``hiredis`` package's sans-IO reply parser (docs/architecture.md says why). Two connections:
one publishes (PUBLISH), one is in subscriber mode (SUBSCRIBE), because Redis allows nothing
but subscription commands on a subscribed connection.

Each connection is a :class:`_Link` that keeps itself connected: when Redis goes away it
reconnects with backoff, and the subscriber link subscribes again to every topic it held, so
consumers keep receiving without doing anything. While the publisher link is down, ``publish``
raises :class:`BackplaneUnavailable` at once instead of queueing: a publish is never dropped
silently. Commands are queued without waiting and written by one writer task per link, so
concurrent publishes go out pipelined, many to a write.

Redis is also the topics' sequencer: ``append`` and ``history`` each run one Lua script
(``backplane._redis_scripts``) by its SHA1 with EVALSHA; the publisher link loads both scripts
whenever it connects, and a NOSCRIPT (a Redis that restarted or flushed its scripts since)
loads them again and retries once. Every message on a topic's channel starts with a kind byte,
so that a subscriber can tell a numbered message (with its position) from a plain one.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import ssl
import struct
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import hiredis
import trio

from trio_fanout.backplane._credentials import read_password
from trio_fanout.backplane._interface import (
    QUERY_NUMBER_CAP,
    Backplane,
    BackplaneError,
    BackplaneUnavailable,
    History,
    HistoryPolicy,
    MessageQueue,
    Position,
    Received,
    check_history_query,
    check_topic,
    unwrap_single_errors,
)
from trio_fanout.backplane._open import BackplaneAddress
from trio_fanout.backplane._redis_scripts import (
    APPEND,
    APPEND_SHA,
    CLUSTER_RETENTION_KEY,
    HISTORY,
    HISTORY_SHA,
    NUMBERED,
    PLAIN,
    topic_keys,
)
from trio_fanout.backplane._sequencer import new_epoch
from trio_fanout.backplane._shrink import ShrinkWatch, rebuild_dict

logger = logging.getLogger(__name__)

# How long opening, each subscription and each publish may wait for Redis before giving up.
CONNECT_TIMEOUT = 5.0
SUBSCRIBE_TIMEOUT = 5.0
PUBLISH_TIMEOUT = 5.0

# Reconnection: the first retry comes quickly (a restart takes a moment), then less often.
FIRST_RECONNECT_PAUSE = 0.05
LONGEST_RECONNECT_PAUSE = 1.0

# Received messages waiting for the consumer before the reader stops reading; past that Redis
# holds them (and disconnects us if its client-output-buffer limit is reached).
RECEIVE_QUEUE_HIGH_WATER = 50_000

# Commands queued for a link that Redis is not reading before further ones are refused.
MAX_QUEUED_COMMANDS = 100_000

# TCP keepalive on the links, in seconds and probes (see _keep_alive).
KEEPALIVE_IDLE = 10
KEEPALIVE_INTERVAL = 5
KEEPALIVE_PROBES = 3

RECEIVE_BYTES = 65536


def _milliseconds(seconds: float) -> bytes:
    return b"%d" % max(1, round(seconds * 1000))


def encode_command(*args: bytes) -> bytes:
    """A command in RESP, the way every Redis client sends it (an array of bulk strings)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n" % len(arg))
        parts.append(arg)
        parts.append(b"\r\n")
    return b"".join(parts)


class _Reply:
    """The reply to one command of the publisher link, or the news that it will never come."""

    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: BackplaneError | None = None
        self.value: Any = None


class _Subscribe:
    """One SUBSCRIBE command sent: answered (confirmed, or refused with ``error``) or not yet."""

    __slots__ = ("done", "error", "topic")

    def __init__(self, topic: bytes) -> None:
        self.topic = topic
        self.done = trio.Event()
        self.error: BaseException | None = None


# The error of a SUBSCRIBE whose connection was lost before Redis answered.
_LOST = BackplaneUnavailable("the connection to Redis was lost")


class _Link:
    """One Redis connection that keeps itself connected, with a writer and a reader task."""

    def __init__(
        self,
        address: BackplaneAddress,
        role: str,
        on_reply: Callable[[Any], None],
        on_connected: Callable[[], None],
        on_lost: Callable[[], None],
        wait_before_read: Callable[[], Awaitable[None]] = trio.lowlevel.checkpoint,
    ) -> None:
        self._address = address
        # Awaited before each read: the subscriber waits there while its consumer is behind.
        self._wait_before_read = wait_before_read
        self._role = role
        self._on_reply = on_reply
        self._on_connected = on_connected
        self._on_lost = on_lost
        self._outgoing: list[bytes] = []
        self._wake_writer = trio.Event()
        self._stream: trio.abc.Stream | None = None
        self._connection_scope: trio.CancelScope | None = None
        self.connected = False
        # Why the last connection attempt failed, for the message when opening gives up.
        self.last_error: BaseException | None = None
        self.endpoint = f"{address.scheme}://{address.host}:{address.port}"

    def send_nowait(self, command: bytes, *, bounded: bool = True) -> None:
        """Queue a command for the writer; raises :class:`BackplaneUnavailable` while down, or
        (if ``bounded``) while Redis is not reading what we send."""
        if not self.connected:
            raise BackplaneUnavailable(f"Redis at {self.endpoint} is unreachable")
        if bounded and len(self._outgoing) >= MAX_QUEUED_COMMANDS:
            raise BackplaneUnavailable(f"Redis at {self.endpoint} is not keeping up")
        self._outgoing.append(command)
        self._wake_writer.set()

    def abort(self) -> None:
        """Drop the current connection with a reset (what is still in our send buffer is
        discarded) and reconnect."""
        if self._connection_scope is None or self._stream is None:
            return
        raw = self._stream
        if isinstance(raw, trio.SSLStream):
            raw = raw.transport_stream
        if isinstance(raw, trio.SocketStream):
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._connection_scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Stay connected until cancelled; ``started`` once the first connection is ready."""
        pause = FIRST_RECONNECT_PAUSE
        started = False
        # One failed attempt per outage is logged at warning, the others at debug: an outage
        # of a minute is otherwise ~60 lines per link and process; "connected again" ends it.
        outage_told = False
        while True:
            failure_level = logging.WARNING if started and not outage_told else logging.DEBUG
            try:
                with trio.fail_after(CONNECT_TIMEOUT):
                    stream = await self._connect()
            except trio.TooSlowError:
                self.last_error = TimeoutError(f"no answer within {CONNECT_TIMEOUT} s")
                logger.log(
                    failure_level if started else logging.WARNING,
                    "Redis %s link: %s from %s", self._role, self.last_error, self.endpoint,
                )  # fmt: skip
                outage_told = outage_told or started
                stream = None
            except BackplaneError as error:
                if not started:
                    raise  # refused credentials or database: a configuration error
                logger.error("Redis %s link: %s", self._role, error)
                stream = None
            except (OSError, trio.BrokenResourceError) as error:
                self.last_error = error
                logger.log(
                    failure_level,
                    "Redis %s link: cannot connect to %s (%s); retrying in %.2f s",
                    self._role, self.endpoint, _describe(error), pause,
                )  # fmt: skip
                outage_told = outage_told or started
                stream = None
            if stream is None:
                await trio.sleep(pause)
                pause = min(pause * 2, LONGEST_RECONNECT_PAUSE)
                continue
            pause = FIRST_RECONNECT_PAUSE
            outage_told = False
            # Closed forcefully: the connection is lost, aborted or shut down, and a TLS
            # close_notify to a Redis that is not reading could block the reconnection.
            async with _closed_forcefully(stream):
                self.connected = True
                self._outgoing.clear()
                self._on_connected()
                if not started:
                    task_status.started()
                    started = True
                else:
                    logger.warning(
                        "Redis %s link: connected again to %s", self._role, self.endpoint
                    )
                try:
                    async with trio.open_nursery() as nursery:
                        self._stream, self._connection_scope = stream, nursery.cancel_scope
                        nursery.start_soon(self._write_forever, stream)
                        await self._read_until_closed(stream)
                        nursery.cancel_scope.cancel()
                except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    # The connection failed (a reset when Redis was killed with our commands
                    # unread, a broken pipe): from the reader or the writer, or both at once,
                    # which is why the nursery's group is matched with except*.
                    pass
                finally:
                    self.connected = False
                    self._stream = self._connection_scope = None
                    self._on_lost()
            logger.warning("Redis %s link: lost %s; reconnecting", self._role, self.endpoint)

    async def _connect(self) -> trio.abc.Stream:
        address = self._address
        stream: trio.abc.Stream
        if address.tls:
            context = ssl.create_default_context(cafile=address.ssl_ca_certs)
            stream = await trio.open_ssl_over_tcp_stream(
                address.host, address.port, ssl_context=context
            )
        else:
            stream = await trio.open_tcp_stream(address.host, address.port)
        _keep_alive(stream)
        try:
            await self._handshake(stream)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream

    async def _handshake(self, stream: trio.abc.Stream) -> None:
        """AUTH and SELECT if asked for, then PING: each answered before anything else is sent,
        so that refused credentials are reported here, not as a mystery later."""
        address = self._address
        commands = []
        password = address.password
        if address.password_file is not None:
            password = read_password(address.password_file)  # again: it may have changed
        if password is not None:
            credentials = [password.encode()]
            if address.username:
                credentials.insert(0, address.username.encode())
            commands.append((b"AUTH", encode_command(b"AUTH", *credentials)))
        if address.db:
            commands.append((b"SELECT", encode_command(b"SELECT", str(address.db).encode())))
        commands.append((b"PING", encode_command(b"PING")))
        await stream.send_all(b"".join(command for _, command in commands))
        reader = hiredis.Reader()
        for name, _ in commands:
            reply = await _next_reply(stream, reader)
            if isinstance(reply, hiredis.ReplyError):
                raise BackplaneError(f"Redis at {self.endpoint} refused {name.decode()}: {reply}")

    async def _write_forever(self, stream: trio.abc.Stream) -> None:
        while True:
            await self._wake_writer.wait()
            self._wake_writer = trio.Event()
            data = b"".join(self._outgoing)
            self._outgoing.clear()
            await stream.send_all(data)

    async def _read_until_closed(self, stream: trio.abc.Stream) -> None:
        reader = hiredis.Reader()
        on_reply = self._on_reply
        while True:
            await self._wait_before_read()
            data = await stream.receive_some(RECEIVE_BYTES)
            if not data:
                return
            # hiredis reads any buffer; its stub names only str and bytes.
            reader.feed(data)  # type: ignore[arg-type]
            while (reply := reader.gets()) is not False:
                try:
                    on_reply(reply)
                except Exception:  # a bug in handling one reply must not take the link down
                    logger.exception("Redis %s link: cannot handle %r", self._role, reply)


@asynccontextmanager
async def _closed_forcefully(stream: trio.abc.Stream) -> AsyncIterator[None]:
    try:
        yield
    finally:
        await trio.aclose_forcefully(stream)


def _keep_alive(stream: trio.abc.Stream) -> None:
    """TCP keepalive on a Redis connection: a peer gone without a word (a host down, a network
    cut) is noticed within about KEEPALIVE_IDLE + KEEPALIVE_PROBES * KEEPALIVE_INTERVAL
    seconds, and the link reconnects, instead of a subscriber waiting forever."""
    raw = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    if not isinstance(raw, trio.SocketStream):
        return
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)


async def _next_reply(stream: trio.abc.Stream, reader: hiredis.Reader) -> Any:
    while (reply := reader.gets()) is False:
        data = await stream.receive_some(RECEIVE_BYTES)
        if not data:
            raise OSError("Redis closed the connection")
        reader.feed(data)  # type: ignore[arg-type]  # any buffer, as above
    return reply


class RedisBackplane(Backplane):
    def __init__(self, address: BackplaneAddress, history: HistoryPolicy | None = None) -> None:
        self._history = history or HistoryPolicy()
        # Given a policy (a worker's), this backplane sets and records the topics' retention;
        # without (an emitter's), it follows the one recorded (backplane._redis_scripts).
        self._retention_mode = b"follow" if history is None else b"set"
        # Where no retention is recorded for a topic: a worker's own; an emitter's, the one the
        # workers recorded for the cluster, read once per connection (None: not read yet).
        own = (b"%d" % self._history.size, _milliseconds(self._history.ttl))
        self._fallback: tuple[bytes, bytes] | None = own if history is not None else None
        self._queue = MessageQueue(RECEIVE_QUEUE_HIGH_WATER)
        self._unknown_messages = 0
        self._replies: deque[_Reply] = deque()
        # How many times each topic is subscribed (the interface counts; Redis does not).
        self._counts: Counter[bytes] = Counter()
        # SUBSCRIBE commands sent on this connection and not yet answered, oldest first (Redis
        # answers in order), and the latest one sent for each topic.
        self._in_flight: deque[_Subscribe] = deque()
        self._latest: dict[bytes, _Subscribe] = {}
        self._topics_shrink = ShrinkWatch()  # both tables above hold one entry per topic
        # Set while the subscriber link is up; a new, unset one after each loss.
        self._link_up = trio.Event()
        self._publisher = _Link(
            address,
            "publisher",
            self._on_publish_reply,
            self._publisher_connected,
            self._fail_replies,
        )
        self._subscriber = _Link(
            address,
            "subscriber",
            self._on_subscriber_reply,
            self._subscribe_all,
            self._subscriber_lost,
            wait_before_read=self._queue.wait_not_full,
        )
        self.endpoint = self._publisher.endpoint

    @property
    def unavailable_reason(self) -> str | None:
        """Down while either connection is: without one, every publish or every new
        subscription fails (both reconnect by themselves)."""
        down = [link._role for link in (self._publisher, self._subscriber) if not link.connected]
        if not down:
            return None
        return f"no connection to Redis at {self.endpoint} ({' and '.join(down)} link down)"

    # ---- publishing ----------------------------------------------------------------------

    async def publish(self, topic: bytes, payload: bytes) -> None:
        check_topic(topic)
        reply = await self._call(encode_command(b"PUBLISH", topic, PLAIN + payload))
        if isinstance(reply, hiredis.ReplyError):
            raise BackplaneUnavailable(f"Redis refused PUBLISH: {reply}")

    async def append(self, topic: bytes, payload: bytes) -> Position:
        check_topic(topic)
        size, ttl = await self._retention()
        meta, stream = topic_keys(topic)
        arguments = (
            meta, stream, payload, size, ttl, topic, new_epoch().encode(), self._retention_mode,
        )  # fmt: skip
        reply = await self._run_script(APPEND_SHA, APPEND, arguments)
        try:
            epoch, offset = reply
            return Position(epoch.decode("ascii"), int(offset))
        except (TypeError, ValueError):
            raise BackplaneUnavailable(f"Redis answered an append with {reply!r}") from None

    async def history(
        self, topic: bytes, since: Position | None = None, limit: int | None = None
    ) -> History:
        check_topic(topic)
        check_history_query(since, limit)
        meta, stream = topic_keys(topic)
        count = b"-1" if limit is None else b"%d" % min(limit, QUERY_NUMBER_CAP)
        mode = b"newest" if since is None else b"after"
        since_offset = b"0" if since is None else b"%d" % min(since.offset, QUERY_NUMBER_CAP)
        since_epoch = b"" if since is None else since.epoch.encode()
        size, ttl = await self._retention()
        arguments = (
            meta, stream, new_epoch().encode(), ttl, mode, count, since_offset, since_epoch,
            size, self._retention_mode,
        )  # fmt: skip
        reply = await self._run_script(HISTORY_SHA, HISTORY, arguments)
        try:
            epoch_bytes, latest, first_kept, first, *payloads = reply
            epoch = epoch_bytes.decode("ascii")
        except (TypeError, ValueError):
            raise BackplaneUnavailable(f"Redis answered a history with {reply!r}") from None
        messages = list(zip(itertools.count(first), payloads, strict=False))
        if since is None:
            return History(epoch, latest, messages, True)
        if since.epoch != epoch or not first_kept - 1 <= since.offset <= latest:
            return History(epoch, latest, [], False)
        return History(epoch, latest, messages, len(messages) == latest - since.offset)

    async def _run_script(self, sha: bytes, script: bytes, arguments: tuple[bytes, ...]) -> Any:
        """EVALSHA the script with its two keys and its arguments; load it again and retry
        once if Redis no longer has it. Raises :class:`BackplaneUnavailable` on any error."""
        command = encode_command(b"EVALSHA", sha, b"2", *arguments)
        reply = await self._call(command)
        if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
            logger.warning("Redis at %s had lost our scripts: loading them again", self.endpoint)
            self._load_scripts()
            reply = await self._call(command)
        if isinstance(reply, hiredis.ReplyError):
            raise BackplaneUnavailable(f"Redis refused a script: {reply}")
        return reply

    def _load_scripts(self) -> None:
        """Queue SCRIPT LOAD of both scripts; their answers are only logged if refused (the
        EVALSHA that needs them reports a refusal itself)."""
        for script in (APPEND, HISTORY):
            self._publisher.send_nowait(encode_command(b"SCRIPT", b"LOAD", script), bounded=False)
            self._replies.append(_Reply())

    async def _call(self, command: bytes) -> Any:
        """Send a command on the publisher link and return Redis's reply (an error reply
        included), or raise :class:`BackplaneUnavailable` if none comes."""
        reply = _Reply()
        self._publisher.send_nowait(command)
        self._replies.append(reply)
        # A reply that never comes (a connection gone silent) must not hold the caller forever.
        with trio.move_on_after(PUBLISH_TIMEOUT):
            await reply.done.wait()
        if not reply.done.is_set():
            # Redis is not answering: drop the connection with a reset, which discards what our
            # kernel has not sent yet. What Redis's kernel already received may still be
            # delivered when Redis resumes: a refusal after a timeout means "not confirmed".
            self._publisher.abort()
            raise BackplaneUnavailable(f"Redis at {self.endpoint} did not answer a publish")
        if reply.error is not None:
            raise reply.error
        return reply.value

    def _on_publish_reply(self, reply: Any) -> None:
        waiter = self._replies.popleft()
        waiter.value = reply
        waiter.done.set()

    def _publisher_connected(self) -> None:
        self._load_scripts()
        if self._retention_mode == b"set":
            # Recorded for the cluster, for emitters to apply where a topic has none recorded.
            size, ttl = (b"%d" % self._history.size, _milliseconds(self._history.ttl))
            command = encode_command(b"HSET", CLUSTER_RETENTION_KEY, b"s", size, b"t", ttl)
            self._publisher.send_nowait(command, bounded=False)
            self._replies.append(_Reply())
        else:
            self._fallback = None  # read again on this connection: the workers may have changed

    async def _retention(self) -> tuple[bytes, bytes]:
        """The size and ttl (ms) this backplane's scripts apply where a topic has none recorded
        (see backplane._redis_scripts)."""
        if self._fallback is not None:
            return self._fallback
        reply = await self._call(encode_command(b"HMGET", CLUSTER_RETENTION_KEY, b"s", b"t"))
        if isinstance(reply, list) and all(
            isinstance(value, bytes) and value.isdigit() for value in reply
        ):
            size, ttl = reply
            self._fallback = (size, ttl)
            return size, ttl
        # None recorded (no worker has used this Redis yet): the defaults, and asked again next
        # time.
        return b"%d" % self._history.size, _milliseconds(self._history.ttl)

    def _fail_replies(self) -> None:
        """The publisher link is lost: publishes still waiting for their reply are refused."""
        while self._replies:
            waiter = self._replies.popleft()
            waiter.error = BackplaneUnavailable(
                f"lost Redis at {self.endpoint} before it confirmed the publish"
            )
            waiter.done.set()

    # ---- subscribing ----------------------------------------------------------------------

    async def subscribe(self, topic: bytes) -> None:
        check_topic(topic)
        self._counts[topic] += 1
        try:
            if self._counts[topic] == 1 and self._subscriber.connected:
                self._send_subscribe(topic)
            # else: the link is down and subscribes to every counted topic when it is back,
            # or another caller's SUBSCRIBE for this topic is already on its way
            with trio.move_on_after(SUBSCRIBE_TIMEOUT):
                await self._confirmed(topic)
                return
            raise BackplaneUnavailable(
                f"Redis at {self.endpoint} did not confirm a subscription within "
                f"{SUBSCRIBE_TIMEOUT} s"
            )
        except BaseException:
            self.unsubscribe(topic)
            raise

    async def _confirmed(self, topic: bytes) -> None:
        """Wait until Redis has confirmed the latest SUBSCRIBE of ``topic``, across
        reconnections; raise its refusal if it refused."""
        while True:
            command = self._latest.get(topic)
            if command is None:  # not sent yet: the link is down
                await self._link_up.wait()
                continue
            await command.done.wait()
            if command.error is None:
                return
            if command.error is not _LOST:
                raise command.error
            # the connection was lost first: the next connection subscribes again

    def unsubscribe(self, topic: bytes) -> None:
        if self._counts[topic] > 1:
            self._counts[topic] -= 1
            return
        self._counts.pop(topic, None)
        self._latest.pop(topic, None)
        if self._topics_shrink.should_rebuild(len(self._counts)):
            rebuild_dict(self._counts)
            rebuild_dict(self._latest)
        if self._subscriber.connected:
            # If it cannot be sent, messages that still come for the topic are dropped on arrival.
            with contextlib.suppress(BackplaneUnavailable):
                self._subscriber.send_nowait(encode_command(b"UNSUBSCRIBE", topic))

    def _send_subscribe(self, topic: bytes, *, bounded: bool = True) -> None:
        """One SUBSCRIBE per topic: a refusal (an ACL forbidding the channel) is then one
        topic's, and confirmations pair with their command in order."""
        command = _Subscribe(topic)
        self._subscriber.send_nowait(encode_command(b"SUBSCRIBE", topic), bounded=bounded)
        self._in_flight.append(command)
        self._latest[topic] = command

    def _subscribe_all(self) -> None:
        """The subscriber link is (again) connected: subscribe to every topic we hold."""
        for topic in self._counts:
            # Not bounded: every topic we hold must be subscribed again, however many.
            self._send_subscribe(topic, bounded=False)
        if self._counts:
            logger.info("subscribing again to %d topics on %s", len(self._counts), self.endpoint)
        self._link_up.set()

    def _subscriber_lost(self) -> None:
        """Commands in flight will never be answered; their waiters wait for the next link."""
        while self._in_flight:
            command = self._in_flight.popleft()
            command.error = _LOST
            command.done.set()
        self._latest.clear()
        self._link_up = trio.Event()

    def _on_subscriber_reply(self, reply: Any) -> None:
        if isinstance(reply, hiredis.ReplyError):
            # Redis answers a refused SUBSCRIBE (e.g. NOPERM) with an error, in command order.
            command = self._in_flight.popleft()
            command.error = BackplaneUnavailable(f"Redis refused SUBSCRIBE: {reply}")
            command.done.set()
            logger.error("Redis refused to subscribe to %r: %s", command.topic, reply)
            return
        kind = reply[0]
        if kind == b"message":
            # Redis may still send a few messages on a topic after we asked to unsubscribe;
            # like ZeroMQ's subscriber, drop them here, so that unsubscribe takes effect at once.
            if reply[1] in self._counts:
                self._deliver(reply[1], reply[2])
        elif kind == b"subscribe":
            command = self._in_flight.popleft()
            command.done.set()

    def _deliver(self, topic: bytes, data: bytes) -> None:
        kind = data[:1]
        if kind == PLAIN:
            self._queue.put(topic, data[1:])
            return
        if kind == NUMBERED:
            try:
                offset_end = data.index(b":", 1)
                epoch_end = data.index(b":", offset_end + 1)
                position = Position(
                    data[offset_end + 1 : epoch_end].decode("ascii"), int(data[1:offset_end])
                )
            except ValueError:
                pass
            else:
                self._queue.put(topic, data[epoch_end + 1 :], position)
                return
        self._unknown_messages += 1
        if self._unknown_messages == 1:
            logger.warning(
                "dropped a message on channel %r that no trio-fanout backplane sent (more are "
                "dropped without a word): %r", topic, data[:32],
            )  # fmt: skip

    async def receive_batch(self, max_messages: int | None = None) -> list[Received]:
        return await self._queue.take(max_messages)

    def last_connect_error(self) -> str:
        error = self._publisher.last_error or self._subscriber.last_error
        if error is None:
            return "no answer"
        if isinstance(error.__cause__, BaseExceptionGroup):
            return _describe(error)
        return f"{type(error).__name__}: {error.__cause__ or error}"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self._publisher.run)
            await nursery.start(self._subscriber.run)
            task_status.started()


def _describe(error: BaseException) -> str:
    """Why a connection attempt failed: for trio's "all attempts to connect failed", the
    attempts' own errors (such as "Connection refused"), which say why."""
    if isinstance(error.__cause__, BaseExceptionGroup):
        return "; ".join(str(attempt) for attempt in error.__cause__.exceptions)
    return str(error)


@asynccontextmanager
async def open_redis_backplane(
    address: BackplaneAddress, history: HistoryPolicy | None = None
) -> AsyncIterator[RedisBackplane]:
    """Connect to Redis; return once both links are ready (or raise within CONNECT_TIMEOUT).
    ``history`` is the policy this backplane's appends apply and record for each topic and for
    the cluster; without it, they apply the policy recorded for the topic, or where none is, the
    one recorded for the cluster, or the default policy if none is either."""
    backplane = RedisBackplane(address, history)
    with unwrap_single_errors():
        async with trio.open_nursery() as nursery:
            with trio.move_on_after(CONNECT_TIMEOUT) as connecting:
                await nursery.start(backplane.run)
            if connecting.cancelled_caught:
                raise BackplaneUnavailable(
                    f"cannot connect to Redis at {backplane.endpoint} within {CONNECT_TIMEOUT} s"
                    f" ({backplane.last_connect_error()})"
                )
            yield backplane
            nursery.cancel_scope.cancel()
