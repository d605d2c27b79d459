"""The ZeroMQ backend (``zmq://HOST:PORT``): a PUB socket to the proxy's XSUB side (PORT) and a
SUB socket to its XPUB side (PORT+1), driven by Trio's event loop.

pyzmq has no Trio integration, so this module owns the one delicate part: ZeroMQ signals
readiness through ``zmq.FD``, which is edge-triggered and also consumed by any other operation on
the socket (a ``setsockopt`` included). The reader therefore drains until ``zmq.Again``, re-checks
``zmq.EVENTS`` before it sleeps, and is woken by hand after every subscription change.

Two facts shape ``subscribe``: ZeroMQ subscriptions are prefix matches, and they travel to the
proxy asynchronously. Topics go on the wire behind their length, so one topic is never a prefix of
another's wire form; and ``subscribe`` returns only after a probe message it published on the
topic has come back through the proxy, which proves the proxy forwards that topic to us.
"""

from __future__ import annotations

import itertools
import logging
import os
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

import trio
import zmq

from trio_fanout.backplane._interface import (
    Backplane,
    BackplaneUnavailable,
    MessageQueue,
    check_topic,
    unwrap_single_errors,
)

logger = logging.getLogger(__name__)

# ZeroMQ's default high-water mark (1,000 messages a pipe) drops messages in ordinary bursts of a
# fan-out server; memory is the cheaper resource here.
HIGH_WATER_MARK = 200_000

# How many received messages wait for the consumer before the reader stops reading; past that
# ZeroMQ's own queues (and then the proxy) hold them.
RECEIVE_QUEUE_HIGH_WATER = 50_000

# How long a subscription (or the connection at open) may take to be proven live before the
# backplane is reported unavailable.
SUBSCRIBE_TIMEOUT = 5.0

# How often a backplane checks that the proxy still answers, and how long an answer may take.
PROXY_CHECK_INTERVAL = 1.0
PROXY_CHECK_TIMEOUT = 1.0

# Probes are repeated until one comes back: the first is usually sent before the proxy has
# learnt of the subscription and is dropped there.
FIRST_PROBE_DELAY = 0.001
MAX_PROBE_DELAY = 0.1

# Published messages still queued when a backplane closes get this long to reach the proxy, so
# that a short-lived publisher (a script, the emitter) does not lose its last messages; closing
# waits at most CLOSE_FLUSH_TIMEOUT for the proof that they have.
CLOSE_LINGER_MS = 2_000
CLOSE_FLUSH_TIMEOUT = 1.0

_LENGTH = struct.Struct(">I")


def wire_topic(topic: bytes) -> bytes:
    """The topic as sent over ZeroMQ: its length first, so prefix matching becomes exact."""
    return _LENGTH.pack(len(topic)) + topic


def _events(sock: zmq.Socket[bytes]) -> int:
    """The socket's ``zmq.EVENTS`` bits (pyzmq types every option's value as int, bytes or str)."""
    return cast(int, sock.getsockopt(zmq.EVENTS))


def zmq_endpoint(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"tcp://{host}:{port}"


class ZmqBackplane(Backplane):
    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], host: str, port: int) -> None:
        self._pub = context.socket(zmq.PUB)
        self._sub = context.socket(zmq.SUB)
        for sock in (self._pub, self._sub):
            sock.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
            sock.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
            sock.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.LINGER, CLOSE_LINGER_MS)
        self._pub.connect(zmq_endpoint(host, port))
        self._sub.connect(zmq_endpoint(host, port + 1))
        self._sub_fd = cast(int, self._sub.getsockopt(zmq.FD))
        self._queue = MessageQueue(RECEIVE_QUEUE_HIGH_WATER)
        self._probes: dict[bytes, trio.Event] = {}
        self._probe_ids = itertools.count()
        self._probe_prefix = os.urandom(8)
        self._wait_scope: trio.CancelScope | None = None
        self._proxy_answers = True
        self._received = 0  # messages read from the proxy so far (the liveness check uses it)
        self.endpoint = f"zmq://{host}:{port}"

    @property
    def unavailable_reason(self) -> str | None:
        """Down while the last probe of :meth:`watch_proxy` went unanswered."""
        if self._proxy_answers:
            return None
        return f"the ZeroMQ proxy at {self.endpoint} does not answer"

    async def publish(self, topic: bytes, payload: bytes) -> None:
        check_topic(topic)
        await trio.lowlevel.checkpoint()
        if not self._proxy_answers:
            raise BackplaneUnavailable(f"the ZeroMQ proxy at {self.endpoint} does not answer")
        self._send([wire_topic(topic), payload])

    async def watch_proxy(self, own_topic: bytes) -> None:
        """Probe the proxy every PROXY_CHECK_INTERVAL. A PUB socket never refuses a message:
        it drops what it cannot deliver, silently. So while the proxy does not answer, publish
        refuses instead (messages sent before the probe notices are still lost)."""
        wire = wire_topic(own_topic)
        while True:
            await trio.sleep(PROXY_CHECK_INTERVAL)
            received_before = self._received
            try:
                await self._prove_live(wire, PROXY_CHECK_TIMEOUT)
            except BackplaneUnavailable:
                # The probe comes back behind the messages already queued for us: while our
                # consumer is behind, it is late, not lost. Messages still arriving, or a
                # reader paused for its consumer, mean the proxy is there.
                if self._received != received_before or len(self._queue) >= self._queue.high_water:
                    continue
                if self._proxy_answers:
                    logger.warning("the ZeroMQ proxy at %s does not answer", self.endpoint)
                self._proxy_answers = False
            else:
                if not self._proxy_answers:
                    logger.warning("the ZeroMQ proxy at %s answers again", self.endpoint)
                self._proxy_answers = True

    async def subscribe(self, topic: bytes) -> None:
        check_topic(topic)
        wire = wire_topic(topic)
        self._sub.setsockopt(zmq.SUBSCRIBE, wire)
        self._wake_reader()
        try:
            await self._prove_live(wire)
        except BaseException:
            self._sub.setsockopt(zmq.UNSUBSCRIBE, wire)
            self._wake_reader()
            raise

    def unsubscribe(self, topic: bytes) -> None:
        self._sub.setsockopt(zmq.UNSUBSCRIBE, wire_topic(topic))
        self._wake_reader()

    async def receive_batch(self, max_messages: int | None = None) -> list[tuple[bytes, bytes]]:
        return await self._queue.take(max_messages)

    def _send(self, frames: list[bytes]) -> None:
        # A PUB socket never blocks and never refuses: past its high-water mark it drops.
        self._pub.send_multipart(frames, zmq.NOBLOCK)

    async def _prove_live(self, wire: bytes, give_up_after: float | None = None) -> None:
        """Publish a probe on ``wire`` until our own subscriber receives one; raise
        :class:`BackplaneUnavailable` after ``give_up_after`` seconds (``SUBSCRIBE_TIMEOUT``
        by default)."""
        timeout = SUBSCRIBE_TIMEOUT if give_up_after is None else give_up_after
        probe_id = self._probe_prefix + str(next(self._probe_ids)).encode()
        arrived = self._probes[probe_id] = trio.Event()
        delay = FIRST_PROBE_DELAY
        try:
            with trio.move_on_after(timeout):
                while not arrived.is_set():
                    self._send([wire, b"", probe_id])
                    with trio.move_on_after(delay):
                        await arrived.wait()
                    delay = min(delay * 2, MAX_PROBE_DELAY)
        finally:
            del self._probes[probe_id]
        if not arrived.is_set():
            raise BackplaneUnavailable(
                f"no answer from the ZeroMQ proxy at {self.endpoint} within {timeout} s"
            )

    def _wake_reader(self) -> None:
        """Wake the reader if an operation on the SUB socket consumed the FD's edge."""
        if self._wait_scope is not None and _events(self._sub) & zmq.POLLIN:
            self._wait_scope.cancel()

    async def run_reader(self) -> None:
        """Move messages from the SUB socket into the queue; the one task that reads the socket."""
        while True:
            await self._queue.wait_not_full()
            self._drain()
            if _events(self._sub) & zmq.POLLIN:
                await trio.lowlevel.checkpoint()
                continue
            with trio.CancelScope() as self._wait_scope:
                await trio.lowlevel.wait_readable(self._sub_fd)
            self._wait_scope = None

    def _drain(self) -> None:
        queue = self._queue
        while len(queue) < queue.high_water:
            try:
                frames = self._sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._received += 1
            if len(frames) == 2:
                wire, payload = frames
                queue.put(wire[_LENGTH.size :], payload)
            elif len(frames) == 3:
                arrived = self._probes.get(frames[2])
                if arrived is not None:
                    arrived.set()
            else:
                logger.warning("dropped a message of %d frames from the proxy", len(frames))

    def close(self) -> None:
        trio.lowlevel.notify_closing(self._sub_fd)
        self._sub.close()
        self._pub.close()


@asynccontextmanager
async def open_zmq_backplane(host: str, port: int) -> AsyncIterator[ZmqBackplane]:
    """Connect to the proxy at ``host:port`` and return once messages flow both ways."""
    backplane = ZmqBackplane(zmq.Context.instance(), host, port)
    try:
        with unwrap_single_errors():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(backplane.run_reader)
                # Round-trip a probe on a topic of our own: proves that our publisher reaches the
                # proxy, so that a publish right after open is not dropped by ZeroMQ.
                own_topic = b"\x00trio-fanout-own:" + os.urandom(8)
                await backplane.subscribe(own_topic)
                nursery.start_soon(backplane.watch_proxy, own_topic)
                logger.debug("connected to the ZeroMQ proxy at %s", backplane.endpoint)
                yield backplane
                # One more round trip before closing: ZeroMQ keeps order on our one connection to
                # the proxy, so when the probe is back, everything we published has passed it.
                try:
                    await backplane._prove_live(wire_topic(own_topic), CLOSE_FLUSH_TIMEOUT)
                except BackplaneUnavailable:
                    logger.warning(
                        "closing without proof that the last messages reached %s",
                        backplane.endpoint,
                    )
                nursery.cancel_scope.cancel()
    finally:
        backplane.close()
