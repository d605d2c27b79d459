"""The ZeroMQ proxy that every client of a ``zmq://`` backplane meets at: a router on Trio.

One ROUTER socket on one port; each client connects one DEALER socket to it and speaks the
commands of ``backplane._zmq_wire``. The proxy keeps, per topic, the set of peers subscribed to
it, and routes each published message to those peers only: a process without members in a room
pays nothing for it, and a topic costs the proxy the same whatever the room's name.

Being one loop is what makes the clients' guarantees exact. The proxy answers a SUBSCRIBE after
it has registered it, so everything it routes afterwards reaches the subscriber; it answers each
PUBLISH after routing it, so a publish is acknowledged or refused, never dropped in silence.

A subscriber that stops reading is bounded in bytes, not in messages: the proxy counts, per
peer, the bytes it has sent and the peer's consumer has not yet taken (each message's topic and
payload plus ``MESSAGE_OVERHEAD_BYTES``); the client returns credit as its consumer takes
messages. Past ``SUBSCRIBER_BACKLOG_LIMIT_BYTES`` the proxy drops that peer's messages (counted,
logged once per stall) until credit comes back; the subscriber sees the gap in the publishers'
sequence numbers. ZeroMQ's own high-water marks are off on the proxy's side so that this bound,
not a silent ZeroMQ drop, is what limits.

The proxy is also the topics' one sequencer: it sees every message, so an APPEND is numbered
where it is routed, kept in the topic's history (``backplane._sequencer``, bounded by the
``HistoryPolicy`` the proxy was started with), and sent to each subscriber with its position. A
HISTORY is answered from that memory. A restarted proxy has forgotten it all: every topic's
next numbering is a new epoch. The per-message work is a dict move and a deque append; the position
shares the message's first frame with the topic, so subscribers cost what they cost for a
plain message (docs/performance.md has the figures).

It runs in Trio with the same FD integration as the client (``backplane.zmq``): drain in
batches until ``zmq.Again``, re-check ``zmq.EVENTS`` before sleeping.

Given CURVE keys, the proxy encrypts every connection and lets in only clients whose public key
it lists. The check is pyzmq's own ZAP handler (``zmq.auth.thread.ThreadAuthenticator``) on a
thread of its own: ZeroMQ asks it during each handshake, before a client's first command
reaches the loop above, so a refused client costs the loop nothing. The proxy then has a
``zmq.Context`` of its own, because a context holds one ZAP handler at most.
"""

from __future__ import annotations

import errno
import logging
import os
import time

import attrs
import trio
import zmq
from zmq.auth.thread import ThreadAuthenticator

from trio_fanout.backplane._credentials import CurveProxyKeys
from trio_fanout.backplane._interface import HistoryPolicy, Position
from trio_fanout.backplane._sequencer import Sequencer
from trio_fanout.backplane._shrink import (
    ShrinkWatch,
    give_back_freed_memory,
    rebuild_dict,
    rebuild_set,
)
from trio_fanout.backplane._zmq_wire import (
    APPEND,
    BYE,
    CREDIT,
    HISTORY,
    HISTORY_HEAD,
    ID_END,
    MAX_TOPICS_PER_MESSAGE,
    MESSAGE,
    MESSAGE_OVERHEAD_BYTES,
    NUMBER,
    NUMBERED,
    PING,
    PUBLISH,
    REPLY,
    SUBSCRIBE,
    SYNC,
    SYNC_FIRST,
    SYNC_LAST,
    UNSUBSCRIBE,
    drop_frames,
    events,
    file_descriptor,
    message_cost,
    pack_position,
    receive_bounded_frames,
    send_frames,
    unpack_position,
    zmq_endpoint,
)

logger = logging.getLogger(__name__)

# What a subscriber that does not take its messages may cost the proxy (and itself): a few
# seconds of a busy worker's traffic, so that a garbage collection or a burst never drops,
# while a hung worker holds at most this much of the proxy's memory.
SUBSCRIBER_BACKLOG_LIMIT_BYTES = 64 * 1024 * 1024

# A peer not heard from for this long is forgotten with its subscriptions (clients ping every
# second; a client that comes back finds out from its next ping and subscribes again).
PEER_TIMEOUT = 10.0

# Commands handled per wake-up before other tasks get a turn, and frames (most of them topics
# of UNSUBSCRIBE and SYNC messages, each a table update) per wake-up: a command is a frame or
# two, a SYNC part up to MAX_TOPICS_PER_MESSAGE, so either bound keeps a wake-up to
# milliseconds and pings and publishes from other peers wait no longer than that.
BATCH = 500
FRAMES_PER_WAKEUP = 5_000

# The largest frame a peer may send; ZeroMQ disconnects a peer that sends a larger one
# (ZMQ_MAXMSGSIZE, checked per frame as it arrives, before the proxy holds it). The largest
# legitimate frame is a publish's payload: a client frame of at most ``max_frame_bytes``
# (64 KiB by default) in its envelope. 16 MiB is 256 times that default, so a deployment that
# raises max_frame_bytes is not refused, while one peer's frame can no longer be gigabytes.
MAX_FRAME_BYTES = 16 * 1024 * 1024

# Topics one peer may hold. A topic costs the proxy about 300 bytes (its entry in the peer's set,
# in the routing table and the table's set of subscribers), so this caps one peer at ~150 MB; a
# worker holds one topic per room with members there, and 500,000 rooms cost the worker itself
# ~800 MB. Past it a SUBSCRIBE (or a SYNC's topic) is refused: the client's subscribe raises
# BackplaneUnavailable and the join fails, instead of the proxy growing without end.
MAX_TOPICS_PER_PEER = 500_000

# Frames of one message, at most: a SYNC or UNSUBSCRIBE part (ROUTER's identity, the head and
# its topics). A message with more is counted as malformed, and the rest of its frames are
# read and dropped, at most FRAMES_PER_WAKEUP per wake-up like any other frames.
MAX_FRAMES = 2 + MAX_TOPICS_PER_MESSAGE

# Malformed commands of one peer are counted and logged at most once per this many seconds:
# a peer that sends nothing else must not be able to fill the proxy's log.
MALFORMED_LOG_INTERVAL = 10.0

# How much later than asked the check for silent peers may wake before it skips its round: a
# late wake-up means the proxy's own loop was held, and the commands that peers sent meanwhile
# are still waiting in the socket, unread, so their silence is the proxy's doing.
OVERSLEPT_MARGIN = 1.0

# Messages and replies queued in ZeroMQ for one peer (ZMQ_SNDHWM): past it a send to that peer
# fails with EAGAIN (ROUTER_MANDATORY) and the proxy drops it and counts it, so a peer that
# sends requests and never reads the replies holds a bounded amount of the proxy's memory.
# Messages are bounded first by SUBSCRIBER_BACKLOG_LIMIT_BYTES at MESSAGE_OVERHEAD_BYTES or more
# each (262,144 at most), and an honest client has at most 100,000 requests outstanding
# (the client's MAX_OUTSTANDING_REQUESTS): this is above their sum, so it never drops what
# the credit bound allows.
SEND_HIGH_WATER_MARK = SUBSCRIBER_BACKLOG_LIMIT_BYTES // MESSAGE_OVERHEAD_BYTES + 150_000

# How often topics idle for longer than the history's ttl are forgotten when no append comes
# to do it (each append forgets the expired ones first): cheap, as only expired ones are looked
# at, and often enough that their memory is back within a second of their expiry.
EXPIRY_SWEEP_INTERVAL = 1.0

# Messages from one peer queued in the proxy before ZeroMQ stops reading from that peer: a
# client's publishes wait for their answers, so this only bounds an unusually eager peer.
RECEIVE_HIGH_WATER_MARK = 10_000

# Refused CURVE handshakes are logged at most once per this many seconds, with their count: a
# refused client's ZeroMQ tries again every few hundred milliseconds, for as long as it runs.
REFUSED_LOG_INTERVAL = 10.0


class _Peer:
    """One connected client: its topics and its flow-control account."""

    __slots__ = (
        "dropped",
        "identity",
        "last_heard",
        "malformed",
        "malformed_logged",
        "syncing",
        "topics",
        "topics_shrink",
        "unacknowledged",
    )

    def __init__(self, identity: bytes, now: float) -> None:
        self.identity = identity
        self.topics: set[bytes] = set()
        self.topics_shrink = ShrinkWatch()
        # While a SYNC is in progress, the topics it has named so far (and those subscribed
        # meanwhile): at its last part, the peer's topics not among them are dropped.
        self.syncing: set[bytes] | None = None
        self.unacknowledged = 0  # bytes sent that its consumer has not yet taken
        self.dropped = 0  # messages dropped in the current stall; 0 while not stalled
        self.last_heard = now
        self.malformed = 0  # malformed commands not yet logged
        self.malformed_logged = -MALFORMED_LOG_INTERVAL


@attrs.frozen
class ProxyStats:
    """A snapshot of :meth:`ZmqProxy.stats` (docs/operations.md names each as a metric)."""

    peers: int  # clients connected: workers, masters, emitters
    topics: int  # topics with at least one subscriber
    publishes: int
    appends: int
    routed: int
    dropped: int  # messages not sent to subscribers that had not taken the earlier ones
    replies_dropped: int
    history_topics: int  # topics whose numbering (and history) the proxy holds
    history_bytes: int  # what that history costs, as the history_max_bytes setting counts it


class ProxyPortInUse(OSError):
    """Something else listens on the address the proxy is to bind (``strerror`` says which);
    the command line names the setting that picks another."""


class ZmqProxy:
    """The routing table and the loop; :func:`serve_proxy` runs one."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 5559,
        *,
        history: HistoryPolicy | None = None,
        curve: CurveProxyKeys | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.curve = curve
        self.sequencer = Sequencer(history or HistoryPolicy())
        self.instance = os.urandom(8)  # changes with every start: clients notice a restart
        self.subscribers: dict[bytes, set[_Peer]] = {}
        self._subscribers_shrink = ShrinkWatch()
        self.peers: dict[bytes, _Peer] = {}
        self.dropped_total = 0
        self.replies_dropped = 0  # replies to peers that do not read them (SEND_HIGH_WATER_MARK)
        self.publishes = 0  # PUBLISH commands: plain messages (heartbeats, broadcasts)
        self.appends = 0  # APPEND commands: messages numbered into a topic's history
        self.routed = 0  # messages sent to subscribers (one per subscriber)

    def stats(self) -> ProxyStats:
        """What the proxy counts and holds now, for the admin port of its process."""
        return ProxyStats(
            peers=len(self.peers),
            topics=len(self.subscribers),
            publishes=self.publishes,
            appends=self.appends,
            routed=self.routed,
            dropped=self.dropped_total,
            replies_dropped=self.replies_dropped,
            history_topics=len(self.sequencer.series),
            history_bytes=self.sequencer.bytes,
        )

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Route until cancelled; ``started`` reports the bound port.

        Raises ``OSError`` (e.g. address in use) before ``started`` if it cannot bind.
        """
        if self.curve is None:
            await self._serve(zmq.Context.instance(), task_status)
            return
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        authenticator = ThreadAuthenticator(context, log=logger)
        try:
            authenticator.start()
            authenticator.configure_curve_callback("*", _AllowedKeys(self.curve.allowed))
            await self._serve(context, task_status)
        finally:
            authenticator.stop()
            context.term()

    async def _serve(
        self, context: zmq.Context[zmq.Socket[bytes]], task_status: trio.TaskStatus[int]
    ) -> None:
        sock: zmq.Socket[bytes] = context.socket(zmq.ROUTER)
        serving = False  # a proxy that never bound says why in its error, not "stopped"
        try:
            sock.setsockopt(zmq.LINGER, 0)
            if self.curve is not None:
                sock.setsockopt(zmq.CURVE_SERVER, 1)
                sock.setsockopt(zmq.CURVE_PUBLICKEY, self.curve.public_key)
                sock.setsockopt(zmq.CURVE_SECRETKEY, self.curve.secret_key)
            sock.setsockopt(zmq.SNDHWM, SEND_HIGH_WATER_MARK)
            sock.setsockopt(zmq.RCVHWM, RECEIVE_HIGH_WATER_MARK)
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
            # Refuse (EHOSTUNREACH) instead of dropping in silence a message for a peer that
            # is gone: that is how the proxy learns of it.
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            try:
                if self.port:
                    sock.bind(zmq_endpoint(self.host, self.port))
                    bound = self.port
                else:
                    bound = sock.bind_to_random_port(zmq_endpoint(self.host, 0).rsplit(":", 1)[0])
            except zmq.ZMQError as error:
                if error.errno == errno.EADDRINUSE:
                    raise ProxyPortInUse(
                        errno.EADDRINUSE,
                        f"the ZeroMQ proxy's port {self.host}:{self.port} is in use",
                    ) from None
                raise OSError(
                    f"cannot bind the ZeroMQ proxy to {self.host} port {self.port}: {error}"
                ) from None
            serving = True
            logger.info(
                "ZeroMQ proxy: clients connect to %s%s",
                zmq_endpoint(self.host, bound),
                f" with CURVE, {len(self.curve.allowed)} keys allowed" if self.curve else "",
            )
            task_status.started(bound)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._forget_silent_peers)
                nursery.start_soon(self._expire_idle_topics)
                await self._route_forever(sock)
        finally:
            fd = file_descriptor(sock)
            trio.lowlevel.notify_closing(fd)
            sock.close()
            if serving:
                logger.info("ZeroMQ proxy stopped")

    async def _route_forever(self, sock: zmq.Socket[bytes]) -> None:
        fd = file_descriptor(sock)
        dropping = False  # in the middle of a message of too many frames
        while True:
            frames_left = FRAMES_PER_WAKEUP
            for _ in range(BATCH):
                if dropping:
                    dropped, ended = drop_frames(sock, frames_left)
                    frames_left -= dropped
                    dropping = not ended
                    if dropping:
                        break
                try:
                    frames, whole = receive_bounded_frames(sock, MAX_FRAMES)
                except zmq.Again:
                    break
                if whole:
                    self._handle(sock, frames)
                else:
                    self._malformed(self._heard_from(frames[0]), frames, "too many frames")
                    dropping = True
                frames_left -= len(frames)
                if frames_left <= 0:
                    break
            # Our own sends consume the FD's edge too: look before sleeping.
            if events(sock) & zmq.POLLIN:
                await trio.lowlevel.checkpoint()
                continue
            await trio.lowlevel.wait_readable(fd)

    def _heard_from(self, identity: bytes) -> _Peer:
        """The peer with this identity (a new one if unknown), stamped as heard from now: not at
        the start of a long batch, which would blame the peer for the proxy's own delay."""
        now = trio.current_time()
        peer = self.peers.get(identity)
        if peer is None:
            peer = self.peers[identity] = _Peer(identity, now)
        else:
            peer.last_heard = now
        return peer

    def _handle(self, sock: zmq.Socket[bytes], frames: list[bytes]) -> None:
        peer = self._heard_from(frames[0])
        head = frames[1] if len(frames) > 1 else b""
        command, request_id = head[:1], head[1:ID_END]
        if command == PUBLISH and len(frames) == 3 and len(head) > ID_END:
            self.publishes += 1
            self._route(sock, head[ID_END:], frames[2], None)
            self._reply(sock, peer, [REPLY + request_id])
        elif command == APPEND and len(frames) == 3 and len(head) > ID_END:
            topic, payload = head[ID_END:], frames[2]
            self.appends += 1
            series = self.sequencer.append(topic, payload, trio.current_time())
            position = pack_position(series.offset, series.epoch_bytes)
            self._route(sock, topic, payload, NUMBERED + position + topic)
            self._reply(sock, peer, [REPLY + request_id + position])
        elif command == HISTORY and len(frames) == 4 and len(head) > ID_END:
            self._answer_history(sock, peer, head, frames[2], frames[3])
        elif command == CREDIT and len(frames) == 2 and len(head) == ID_END:
            self._credit(peer, NUMBER.unpack_from(head, 1)[0])
        elif command == SUBSCRIBE and len(frames) == 2 and len(head) > ID_END:
            refused = self._subscribe(peer, head[ID_END:])
            self._reply(sock, peer, [REPLY + request_id, *refused])
        elif command == UNSUBSCRIBE and len(frames) > 2 and len(head) == 1:
            for topic in frames[2:]:
                self._unsubscribe(peer, topic)
        elif command == PING and len(frames) == 2 and len(head) == ID_END + NUMBER.size:
            count = NUMBER.pack(len(peer.topics))
            self._reply(sock, peer, [REPLY + request_id, self.instance, count])
        elif command == SYNC and len(head) == ID_END + 1:
            refused = self._sync(peer, head[ID_END], frames[2:])
            self._reply(sock, peer, [REPLY + request_id, *refused])
        elif command == BYE and len(frames) == 2 and len(head) == 1:
            self._forget(peer)
        else:
            self._malformed(peer, frames, "malformed")

    def _malformed(self, peer: _Peer, frames: list[bytes], what: str) -> None:
        """Count a command that is not one; log the count at most every MALFORMED_LOG_INTERVAL."""
        peer.malformed += 1
        now = trio.current_time()
        if now - peer.malformed_logged >= MALFORMED_LOG_INTERVAL:
            head = frames[1][:16] if len(frames) > 1 else b""
            logger.warning(
                "peer %s: ignored %d malformed commands in %.0f s, the last %r of %d frames (%s)",
                peer.identity.hex(), peer.malformed, MALFORMED_LOG_INTERVAL, head,
                len(frames), what,
            )  # fmt: skip
            peer.malformed_logged = now
            peer.malformed = 0

    def _sync(self, peer: _Peer, stage: int, topics: list[bytes]) -> list[bytes]:
        """One part of a SYNC (see ``backplane._zmq_wire``); returns the refusal, if any."""
        if stage & SYNC_FIRST or peer.syncing is None:
            peer.syncing = set()
        syncing = peer.syncing
        refused: list[bytes] = []
        for topic in topics:
            syncing.add(topic)
            if topic not in peer.topics:
                refused = self._subscribe(peer, topic) or refused
        if stage & SYNC_LAST:
            peer.syncing = None
            for topic in peer.topics - syncing:
                self._unsubscribe(peer, topic)
            logger.info("peer %s: %d subscriptions restored", peer.identity.hex(), len(peer.topics))
        return refused

    def _route(
        self, sock: zmq.Socket[bytes], topic: bytes, payload: bytes, head: bytes | None
    ) -> None:
        """Send the message to the topic's subscribers with ``head`` (a plain message's if
        None)."""
        subscribers = self.subscribers.get(topic)
        if not subscribers:
            return
        cost = message_cost(topic, payload)
        if head is None:
            head = MESSAGE + topic
        gone: list[_Peer] = []
        routed = 0
        for peer in subscribers:
            if peer.unacknowledged >= SUBSCRIBER_BACKLOG_LIMIT_BYTES:
                self._drop(peer)
                continue
            try:
                send_frames(sock, [peer.identity, head, payload])
            except zmq.Again:  # its SEND_HIGH_WATER_MARK: only a peer that does not read
                self._drop(peer)
                continue
            except zmq.ZMQError as error:
                if error.errno != errno.EHOSTUNREACH:
                    raise
                gone.append(peer)
                continue
            peer.unacknowledged += cost
            routed += 1
        self.routed += routed
        for peer in gone:
            logger.info("peer %s disconnected", peer.identity.hex())
            self._forget(peer)

    def _answer_history(
        self,
        sock: zmq.Socket[bytes],
        peer: _Peer,
        head: bytes,
        since_frame: bytes,
        limit_frame: bytes,
    ) -> None:
        try:
            since = Position(*unpack_position(since_frame)) if since_frame else None
            if limit_frame and len(limit_frame) != NUMBER.size:
                raise ValueError(f"not a limit: {limit_frame!r}")
        except ValueError as error:
            self._malformed(
                peer, [peer.identity, head, since_frame, limit_frame], f"HISTORY: {error}"
            )
            return
        limit = NUMBER.unpack(limit_frame)[0] if limit_frame else None
        history = self.sequencer.history(head[ID_END:], since, limit, trio.current_time())
        first = history.messages[0][0] if history.messages else history.offset + 1
        summary = HISTORY_HEAD.pack(history.offset, first, history.complete)
        summary += history.epoch.encode()
        payloads = [payload for _, payload in history.messages]
        self._reply(sock, peer, [REPLY + head[1:ID_END], summary, *payloads])

    def _reply(self, sock: zmq.Socket[bytes], peer: _Peer, frames: list[bytes]) -> None:
        try:
            send_frames(sock, [peer.identity, *frames])
        except zmq.Again:  # its SEND_HIGH_WATER_MARK: it sends requests and reads no answer
            if not self.replies_dropped:
                logger.warning("peer %s reads no replies: dropping them", peer.identity.hex())
            self.replies_dropped += 1
        except zmq.ZMQError as error:
            if error.errno != errno.EHOSTUNREACH:
                raise
            self._forget(peer)

    def _drop(self, peer: _Peer) -> None:
        if not peer.dropped:
            logger.warning(
                "peer %s has %d bytes it has not taken: dropping its messages until it does",
                peer.identity.hex(), peer.unacknowledged,
            )  # fmt: skip
        peer.dropped += 1
        self.dropped_total += 1

    def _credit(self, peer: _Peer, taken: int) -> None:
        # Credit for messages sent by an earlier instance of the proxy may arrive: never below 0.
        peer.unacknowledged = max(0, peer.unacknowledged - taken)
        if peer.dropped and peer.unacknowledged < SUBSCRIBER_BACKLOG_LIMIT_BYTES:
            logger.warning(
                "peer %s takes its messages again; %d were dropped for it",
                peer.identity.hex(), peer.dropped,
            )  # fmt: skip
            peer.dropped = 0

    def _subscribe(self, peer: _Peer, topic: bytes) -> list[bytes]:
        """Route ``topic`` to ``peer``; returns the refusal (a reply's field), if any."""
        if peer.syncing is not None:
            peer.syncing.add(topic)
        if topic not in peer.topics and len(peer.topics) >= MAX_TOPICS_PER_PEER:
            return [b"the proxy holds %d topics for this peer, its limit" % MAX_TOPICS_PER_PEER]
        peer.topics.add(topic)
        subscribers = self.subscribers.get(topic)
        if subscribers is None:
            self.subscribers[topic] = {peer}
        else:
            subscribers.add(peer)
        return []

    def _unsubscribe(self, peer: _Peer, topic: bytes) -> None:
        if peer.syncing is not None:
            peer.syncing.discard(topic)
        if topic not in peer.topics:
            return
        peer.topics.remove(topic)
        if peer.topics_shrink.should_rebuild(len(peer.topics)):
            rebuild_set(peer.topics)
            give_back_freed_memory()
        subscribers = self.subscribers.get(topic)
        if subscribers is not None:
            subscribers.discard(peer)
            if not subscribers:
                del self.subscribers[topic]
                if self._subscribers_shrink.should_rebuild(len(self.subscribers)):
                    rebuild_dict(self.subscribers)
                    give_back_freed_memory()

    def _forget(self, peer: _Peer) -> None:
        for topic in list(peer.topics):
            self._unsubscribe(peer, topic)
        self.peers.pop(peer.identity, None)

    async def _expire_idle_topics(self) -> None:
        while True:
            await trio.sleep(EXPIRY_SWEEP_INTERVAL)
            expired = self.sequencer.expire(trio.current_time())
            if expired:
                logger.debug("forgot the history of %d idle topics", expired)

    async def _forget_silent_peers(self) -> None:
        interval = PEER_TIMEOUT / 2
        while True:
            asleep_since = trio.current_time()
            await trio.sleep(interval)
            now = trio.current_time()
            if now - asleep_since > interval + OVERSLEPT_MARGIN:
                logger.warning(
                    "the proxy's loop was held for %.1f s: not judging silent peers this time",
                    now - asleep_since - interval,
                )  # fmt: skip
                continue
            deadline = now - PEER_TIMEOUT
            for peer in [peer for peer in self.peers.values() if peer.last_heard < deadline]:
                logger.warning(
                    "peer %s silent for %.0f s: forgetting its %d subscriptions",
                    peer.identity.hex(), PEER_TIMEOUT, len(peer.topics),
                )  # fmt: skip
                self._forget(peer)


class _AllowedKeys:
    """The credentials provider the ZAP handler asks, on its own thread, about each client's
    key (Z85): allowed if listed. It only reads a frozenset, which needs no lock."""

    def __init__(self, allowed: frozenset[bytes]) -> None:
        self._allowed = allowed
        self._refused = 0  # refusals not yet logged
        self._logged = -REFUSED_LOG_INTERVAL

    def callback(self, domain: str, client_key: bytes) -> bool:
        if client_key in self._allowed:
            return True
        self._refused += 1
        now = time.monotonic()
        if now - self._logged >= REFUSED_LOG_INTERVAL:
            logger.warning(
                "refused %d CURVE handshakes from keys not allowed, the last from key %s",
                self._refused, client_key.decode("ascii", "replace"),
            )  # fmt: skip
            self._logged = now
            self._refused = 0
        return False


async def serve_proxy(
    host: str = "127.0.0.1",
    port: int = 5559,
    *,
    history: HistoryPolicy | None = None,
    curve: CurveProxyKeys | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the proxy on ``host:port`` until cancelled; ``task_status.started`` reports the port
    (port 0 picks a free one). ``history`` bounds what it keeps of appended messages (default:
    ``HistoryPolicy()``). With ``curve``, every connection is encrypted and only clients whose
    public key ``curve.allowed`` lists get in.

    Raises ``OSError`` (e.g. address in use) before ``started`` if it cannot bind.
    """
    await ZmqProxy(host, port, history=history, curve=curve).serve(task_status=task_status)
