"""One contract for every backplane backend, run unchanged against memory://, zmq:// and redis://.

The zmq runs start a real proxy on loopback (port 0) in the test's nursery. Absence of delivery
is never checked by waiting: the same publisher sends a later sentinel, and the sentinel must be
the first thing that arrives (one publisher's messages keep their order).

The numbered messages' tests (``append``, ``history``) run on a :class:`Sequenced` backend,
which starts the topics' sequencer with the test's policy and can restart it.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager

import pytest
import trio
import trio.testing

from tests.helpers import redis_call
from trio_fanout import backplane
from trio_fanout.backplane import (
    Backplane,
    BadBackplaneURL,
    History,
    HistoryPolicy,
    Position,
    Received,
    open_backplane,
    parse_backplane_url,
)
from trio_fanout.backplane import memory as memory_backend
from trio_fanout.backplane._sequencer import Sequencer
from trio_fanout.backplane.proxy import ZmqProxy

# Generous for loopback; only a hang or a lost message ever gets near it.
TIMEOUT = 10

_memory_names = itertools.count()


@pytest.fixture(params=["memory", "zmq", "redis"])
async def url(request: pytest.FixtureRequest, nursery: trio.Nursery) -> AsyncIterator[str]:
    if request.param == "memory":
        yield f"memory://contract-{os.getpid()}-{next(_memory_names)}"
    elif request.param == "redis":
        yield request.getfixturevalue("redis_server").url
    else:
        port = await nursery.start(backplane.serve_proxy, "127.0.0.1", 0)
        yield f"zmq://127.0.0.1:{port}"


class Inbox:
    """Takes one message at a time from a backplane's batches; every wait is bounded.

    :meth:`next` gives ``(topic, payload)`` of an unnumbered message (it checks that it carries
    no position); :meth:`received` gives the whole :class:`Received`.
    """

    def __init__(self, backplane: Backplane) -> None:
        self.backplane = backplane
        self._pending: deque[Received] = deque()

    async def received(self) -> Received:
        with trio.fail_after(TIMEOUT):
            while not self._pending:
                batch = await self.backplane.receive_batch()
                assert batch, "receive_batch returned an empty batch"
                self._pending.extend(batch)
        return self._pending.popleft()

    async def next(self) -> tuple[bytes, bytes]:
        topic, payload, position = await self.received()
        assert position is None, "a published message came with a position"
        return topic, payload

    async def take(self, count: int) -> list[tuple[bytes, bytes]]:
        return [await self.next() for _ in range(count)]

    async def until(self, sentinel: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
        """Every message before ``sentinel`` (which is consumed)."""
        before = []
        while (message := await self.next()) != sentinel:
            before.append(message)
        return before


# --- delivery --------------------------------------------------------------------------------


async def test_publish_reaches_a_subscriber_on_another_instance(url: str) -> None:
    async with open_backplane(url) as publisher, open_backplane(url) as subscriber:
        await subscriber.subscribe(b"room")
        await publisher.publish(b"room", b"hello")
        assert await Inbox(subscriber).next() == (b"room", b"hello")


async def test_publisher_that_is_not_subscribed_receives_nothing(url: str) -> None:
    async with open_backplane(url) as publisher, open_backplane(url) as subscriber:
        await subscriber.subscribe(b"room")
        await publisher.subscribe(b"sentinel")
        await publisher.publish(b"room", b"hello")
        await publisher.publish(b"sentinel", b"end")
        assert await Inbox(publisher).next() == (b"sentinel", b"end")
        assert await Inbox(subscriber).next() == (b"room", b"hello")


async def test_an_instance_receives_what_it_publishes_itself(url: str) -> None:
    async with open_backplane(url) as only:
        await only.subscribe(b"room")
        await only.publish(b"room", b"to myself")
        assert await Inbox(only).next() == (b"room", b"to myself")


async def test_every_subscriber_receives_each_message_once(url: str) -> None:
    async with (
        open_backplane(url) as publisher,
        open_backplane(url) as first,
        open_backplane(url) as second,
    ):
        inboxes = [Inbox(first), Inbox(second)]
        for subscriber in (first, second):
            await subscriber.subscribe(b"room")
            await subscriber.subscribe(b"sentinel")
        await publisher.publish(b"room", b"1")
        await publisher.publish(b"room", b"2")
        await publisher.publish(b"sentinel", b"end")
        for inbox in inboxes:
            assert await inbox.until((b"sentinel", b"end")) == [(b"room", b"1"), (b"room", b"2")]


async def test_unsubscribe_stops_delivery(url: str) -> None:
    async with open_backplane(url) as publisher, open_backplane(url) as subscriber:
        inbox = Inbox(subscriber)
        await subscriber.subscribe(b"room")
        await subscriber.subscribe(b"sentinel")
        await publisher.publish(b"room", b"before")
        assert await inbox.next() == (b"room", b"before")
        subscriber.unsubscribe(b"room")
        await publisher.publish(b"room", b"after")
        await publisher.publish(b"sentinel", b"end")
        assert await inbox.next() == (b"sentinel", b"end")


async def test_subscriptions_are_counted(url: str) -> None:
    async with open_backplane(url) as publisher, open_backplane(url) as subscriber:
        inbox = Inbox(subscriber)
        await subscriber.subscribe(b"sentinel")
        await subscriber.subscribe(b"room")
        await subscriber.subscribe(b"room")
        subscriber.unsubscribe(b"room")
        await publisher.publish(b"room", b"still subscribed once")
        assert await inbox.next() == (b"room", b"still subscribed once")  # exactly once:
        await publisher.publish(b"sentinel", b"1")
        assert await inbox.next() == (b"sentinel", b"1")
        subscriber.unsubscribe(b"room")
        await publisher.publish(b"room", b"not subscribed any more")
        await publisher.publish(b"sentinel", b"2")
        assert await inbox.next() == (b"sentinel", b"2")


async def test_resubscribing_after_unsubscribe_works(url: str) -> None:
    async with open_backplane(url) as publisher, open_backplane(url) as subscriber:
        await subscriber.subscribe(b"room")
        subscriber.unsubscribe(b"room")
        await subscriber.subscribe(b"room")
        await publisher.publish(b"room", b"back")
        assert await Inbox(subscriber).next() == (b"room", b"back")


async def test_many_topics_each_reach_only_their_subscriber(url: str) -> None:
    topics = [f"room-{i}".encode() for i in range(200)]
    async with (
        open_backplane(url) as publisher,
        open_backplane(url) as even,
        open_backplane(url) as odd,
    ):
        subscribers = (even, odd)
        for i, topic in enumerate(topics):
            await subscribers[i % 2].subscribe(topic)
        for subscriber, end in ((even, b"end-even"), (odd, b"end-odd")):
            await subscriber.subscribe(end)
        for topic in topics:
            await publisher.publish(topic, b"payload of " + topic)
        await publisher.publish(b"end-even", b"end")
        await publisher.publish(b"end-odd", b"end")
        for parity, (subscriber, end) in enumerate(((even, b"end-even"), (odd, b"end-odd"))):
            received = await Inbox(subscriber).until((end, b"end"))
            expected = [(topic, b"payload of " + topic) for topic in topics[parity::2]]
            assert sorted(received) == sorted(expected)


@pytest.mark.parametrize(
    "other_topic",
    [b"ab", b"a:b", b"a\x00", b"aa", b"\x00\x00\x00\x01a", b"A", b"\x00a"],
)
async def test_topics_are_matched_exactly_not_by_prefix(url: str, other_topic: bytes) -> None:
    async with open_backplane(url) as publisher, open_backplane(url) as subscriber:
        await subscriber.subscribe(b"a")
        await publisher.publish(other_topic, b"not for a")
        await publisher.publish(b"a", b"sentinel")
        assert await Inbox(subscriber).next() == (b"a", b"sentinel")


async def test_a_longer_topic_does_not_receive_its_prefix(url: str) -> None:
    async with open_backplane(url) as publisher, open_backplane(url) as subscriber:
        await subscriber.subscribe(b"ab")
        await publisher.publish(b"a", b"not for ab")
        await publisher.publish(b"ab", b"sentinel")
        assert await Inbox(subscriber).next() == (b"ab", b"sentinel")


async def test_one_publishers_messages_arrive_in_order(url: str) -> None:
    count = 5_000
    async with open_backplane(url) as publisher, open_backplane(url) as subscriber:
        await subscriber.subscribe(b"room")
        for i in range(count):
            await publisher.publish(b"room", str(i).encode())
        received = await Inbox(subscriber).take(count)
        assert received == [(b"room", str(i).encode()) for i in range(count)]


async def test_publish_right_after_subscribe_is_never_lost(url: str) -> None:
    """``subscribe`` returns only when the subscription is live end to end: a publish by another
    instance immediately afterwards must arrive, for every one of many fresh topics."""
    topics = [f"fresh-{i}".encode() for i in range(200)]
    async with open_backplane(url) as publisher, open_backplane(url) as subscriber:
        for topic in topics:
            await subscriber.subscribe(topic)
            await publisher.publish(topic, topic)
        received = await Inbox(subscriber).take(len(topics))
        assert sorted(received) == sorted((topic, topic) for topic in topics)


async def test_a_one_mib_payload_arrives_intact(url: str) -> None:
    payload = os.urandom(1 << 20)
    async with open_backplane(url) as publisher, open_backplane(url) as subscriber:
        await subscriber.subscribe(b"big")
        await publisher.publish(b"big", payload)
        topic, received = await Inbox(subscriber).next()
        assert topic == b"big"
        assert received == payload


async def test_empty_payload_and_binary_topic(url: str) -> None:
    topic = bytes(range(256))
    async with open_backplane(url) as publisher, open_backplane(url) as subscriber:
        await subscriber.subscribe(topic)
        await publisher.publish(topic, b"")
        assert await Inbox(subscriber).next() == (topic, b"")


async def test_async_for_yields_topic_payload_position(url: str) -> None:
    # The plain form a user writes, break included: with filterwarnings=error this also checks
    # that leaving the loop early leaves nothing behind to be garbage collected with a warning.
    async with open_backplane(url) as publisher, open_backplane(url) as subscriber:
        await subscriber.subscribe(b"room")
        for i in range(3):
            await publisher.publish(b"room", str(i).encode())
        received = []
        with trio.fail_after(TIMEOUT):
            async for topic, payload, position in subscriber:
                assert position is None
                received.append((topic, payload))
                if len(received) == 3:
                    break
        assert received == [(b"room", b"0"), (b"room", b"1"), (b"room", b"2")]


# Found in backplane/_interface.py at 10ba3f2 (Backplane.__aiter__ was an async generator over
# receive_batch()): breaking out of ``async for`` discarded the rest of the current batch, and
# the suspended generator was left to the garbage collector (a ResourceWarning from Trio, an
# error here). Each loop below takes one message and breaks, so any batch of two or more would
# lose messages: with memory:// the twenty are always one batch.
async def test_breaking_out_of_async_for_loses_no_messages(url: str) -> None:
    count = 20
    async with open_backplane(url) as publisher, open_backplane(url) as subscriber:
        await subscriber.subscribe(b"room")
        for i in range(count):
            await publisher.publish(b"room", str(i).encode())
        received = []
        # Loopback delivers these in milliseconds; a short bound keeps a failure (a wait for
        # messages that were thrown away) quick, and the assertion below shows what arrived.
        with trio.move_on_after(2):
            for _ in range(count):
                async for message in subscriber:
                    received.append(message)
                    break
        assert received == [Received(b"room", str(i).encode(), None) for i in range(count)]


@pytest.mark.parametrize("topic", [b"", "room"])
async def test_bad_topics_are_refused(url: str, topic: object) -> None:
    async with open_backplane(url) as instance:
        with pytest.raises(ValueError):
            await instance.subscribe(topic)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            await instance.publish(topic, b"x")  # type: ignore[arg-type]


# --- numbered messages and history -----------------------------------------------------------

# The backends whose sequencer keeps numbering and history; SEQUENCED_BOUNDED_BACKENDS also
# enforce max_bytes themselves (on Redis, Redis's maxmemory does).
SEQUENCED_BACKENDS = ["memory", "zmq", "redis"]
SEQUENCED_BOUNDED_BACKENDS = ["memory", "zmq"]

_topic_numbers = itertools.count()


class Sequenced:
    """A backend whose topics' sequencer a test starts with its own policy, can restart, and
    (memory, zmq) can look into."""

    def __init__(self, kind: str, nursery: trio.Nursery, request: pytest.FixtureRequest) -> None:
        self.kind = kind
        self.nursery = nursery
        self.request = request
        self.policy = HistoryPolicy()
        self.url = ""
        self.proxy: ZmqProxy | None = None
        self._proxy_scope = trio.CancelScope()
        self._proxy_stopped = trio.Event()

    async def start(self, policy: HistoryPolicy | None = None) -> None:
        self.policy = policy or HistoryPolicy()
        if self.kind == "memory":
            self.url = f"memory://sequenced-{os.getpid()}-{next(_memory_names)}"
        elif self.kind == "zmq":
            port = await self._start_proxy(0)
            self.url = f"zmq://127.0.0.1:{port}"
        else:
            self.url = self.request.getfixturevalue("redis_server").url

    async def _start_proxy(self, port: int) -> int:
        proxy = self.proxy = ZmqProxy("127.0.0.1", port, history=self.policy)
        scope = self._proxy_scope = trio.CancelScope()
        stopped = self._proxy_stopped = trio.Event()

        async def serve(*, task_status: trio.TaskStatus[int]) -> None:
            try:
                with scope:
                    await proxy.serve(task_status=task_status)
            finally:
                stopped.set()

        bound: int = await self.nursery.start(serve)
        return bound

    def open(self) -> AbstractAsyncContextManager[Backplane]:
        return open_backplane(self.url, history=self.policy)

    def topic(self, name: str) -> bytes:
        """A topic no other test uses (the Redis server lives for the whole session)."""
        return f"{name}-{os.getpid()}-{next(_topic_numbers)}-{os.urandom(4).hex()}".encode()

    async def restart(self) -> None:
        """Start the sequencer again; every backplane of the test must be closed."""
        if self.kind == "memory":
            assert self.url.removeprefix("memory://") not in memory_backend._hubs
        elif self.kind == "zmq":
            self._proxy_scope.cancel()
            with trio.fail_after(TIMEOUT):
                await self._proxy_stopped.wait()
            # ZeroMQ releases a closed socket's port in its own thread, a moment later.
            with trio.fail_after(TIMEOUT):
                while True:
                    try:
                        await self._start_proxy(parse_backplane_url(self.url).port)
                        break
                    except OSError:
                        await trio.sleep(0.01)
        else:  # Redis forgets every topic's numbering as a restarted one would
            assert await redis_call(parse_backplane_url(self.url).port, b"FLUSHALL") == b"OK"

    def sequencer(self, backplane: Backplane) -> Sequencer:
        """The sequencer's own state (memory and zmq)."""
        if self.proxy is not None:
            return self.proxy.sequencer
        assert isinstance(backplane, memory_backend.MemoryBackplane)
        return backplane.sequencer


@pytest.fixture(params=SEQUENCED_BACKENDS)
def sequenced(request: pytest.FixtureRequest, nursery: trio.Nursery) -> Sequenced:
    return Sequenced(request.param, nursery, request)


@pytest.fixture(params=SEQUENCED_BOUNDED_BACKENDS)
def bounded(request: pytest.FixtureRequest, nursery: trio.Nursery) -> Sequenced:
    return Sequenced(request.param, nursery, request)


async def append_all(backplane: Backplane, topic: bytes, payloads: list[bytes]) -> list[Position]:
    return [await backplane.append(topic, payload) for payload in payloads]


async def test_appends_are_numbered_the_same_at_every_subscriber(sequenced: Sequenced) -> None:
    await sequenced.start()
    topic = sequenced.topic("room")
    count = 100
    async with (
        sequenced.open() as first_appender,
        sequenced.open() as second_appender,
        sequenced.open() as first,
        sequenced.open() as second,
    ):
        await first.subscribe(topic)
        await second.subscribe(topic)
        returned: dict[bytes, Position] = {}

        async def append_from(appender: Backplane, name: bytes) -> None:
            for i in range(count):
                payload = b"%s-%d" % (name, i)
                returned[payload] = await appender.append(topic, payload)

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as appenders:
                appenders.start_soon(append_from, first_appender, b"a")
                appenders.start_soon(append_from, second_appender, b"b")
        (epoch,) = {position.epoch for position in returned.values()}
        assert sorted(position.offset for position in returned.values()) == list(
            range(1, 2 * count + 1)
        )
        seen = []
        for subscriber in (first, second):
            inbox = Inbox(subscriber)
            received = [await inbox.received() for _ in range(2 * count)]
            assert [message.position for message in received] == [
                Position(epoch, offset) for offset in range(1, 2 * count + 1)
            ]
            # The position delivered with each message is the one its appender was given.
            assert all(returned[payload] == position for _, payload, position in received)
            seen.append(received)
        assert seen[0] == seen[1]


async def test_published_messages_are_not_numbered(sequenced: Sequenced) -> None:
    await sequenced.start()
    topic = sequenced.topic("room")
    async with sequenced.open() as publisher, sequenced.open() as subscriber:
        await subscriber.subscribe(topic)
        await publisher.publish(topic, b"plain")
        position = await publisher.append(topic, b"numbered")
        inbox = Inbox(subscriber)
        assert await inbox.received() == Received(topic, b"plain", None)
        assert await inbox.received() == Received(topic, b"numbered", position)
        assert position.offset == 1
        history = await publisher.history(topic)
        assert history.messages == [(1, b"numbered")]


async def test_history_keeps_the_newest_size_messages(sequenced: Sequenced) -> None:
    await sequenced.start(HistoryPolicy(size=5))
    topic = sequenced.topic("room")
    async with sequenced.open() as backplane:
        positions = await append_all(backplane, topic, [b"%d" % i for i in range(1, 9)])
        epoch = positions[-1].epoch
        assert positions[-1] == Position(epoch, 8)
        kept = [(offset, b"%d" % offset) for offset in range(4, 9)]
        assert await backplane.history(topic) == History(epoch, 8, kept, True)
        assert await backplane.history(topic, limit=2) == History(epoch, 8, kept[-2:], True)
        assert await backplane.history(topic, limit=0) == History(epoch, 8, [], True)
        assert await backplane.history(topic, limit=50) == History(epoch, 8, kept, True)


async def test_history_since_a_position(sequenced: Sequenced) -> None:
    await sequenced.start(HistoryPolicy(size=5))
    topic = sequenced.topic("room")
    async with sequenced.open() as backplane:
        positions = await append_all(backplane, topic, [b"%d" % i for i in range(1, 9)])
        epoch = positions[0].epoch

        async def since(offset: int, limit: int | None = None) -> tuple[list[int], bool]:
            history = await backplane.history(topic, Position(epoch, offset), limit)
            assert (history.epoch, history.offset) == (epoch, 8)
            assert all(payload == b"%d" % offset for offset, payload in history.messages)
            return [offset for offset, _ in history.messages], history.complete

        assert await since(5) == ([6, 7, 8], True)
        assert await since(3) == ([4, 5, 6, 7, 8], True)  # just inside the kept history
        assert await since(8) == ([], True)  # up to date
        assert await since(5, limit=2) == ([6, 7], False)  # more remain
        assert await since(5, limit=3) == ([6, 7, 8], True)
        assert await since(5, limit=0) == ([], False)
        assert await since(2) == ([], False)  # offset 3 is no longer kept
        assert await since(0) == ([], False)
        assert await since(9) == ([], False)  # ahead of the sequencer: not this numbering
        for other_epoch in ("0123456789abcdef", "", "not one of ours ✓", "x" * 100):
            other = await backplane.history(topic, Position(other_epoch, 5))
            assert other == History(epoch, 8, [], False)
        huge = await backplane.history(topic, Position(epoch, 2**70), limit=2**70)
        assert huge == History(epoch, 8, [], False)
        assert await since(7, limit=2**70) == ([8], True)


async def test_history_of_a_new_topic_starts_its_numbering(sequenced: Sequenced) -> None:
    """A reader who saw offset 0 recovers what is appended later: the epoch it was told holds."""
    await sequenced.start()
    topic = sequenced.topic("room")
    async with sequenced.open() as backplane:
        empty = await backplane.history(topic)
        assert (empty.offset, empty.messages, empty.complete) == (0, [], True)
        assert await backplane.append(topic, b"first") == Position(empty.epoch, 1)
        recovered = await backplane.history(topic, Position(empty.epoch, 0))
        assert recovered == History(empty.epoch, 1, [(1, b"first")], True)


async def test_size_0_numbers_without_keeping(sequenced: Sequenced) -> None:
    await sequenced.start(HistoryPolicy(size=0))
    topic = sequenced.topic("room")
    async with sequenced.open() as backplane:
        positions = await append_all(backplane, topic, [b"1", b"2", b"3"])
        assert [position.offset for position in positions] == [1, 2, 3]
        epoch = positions[0].epoch
        assert await backplane.history(topic) == History(epoch, 3, [], True)
        assert await backplane.history(topic, Position(epoch, 3)) == History(epoch, 3, [], True)
        assert await backplane.history(topic, Position(epoch, 2)) == History(epoch, 3, [], False)


async def test_an_idle_topic_expires_and_starts_a_new_epoch(sequenced: Sequenced) -> None:
    ttl = 0.5
    await sequenced.start(HistoryPolicy(ttl=ttl))
    topic, busy = sequenced.topic("idle"), sequenced.topic("busy")
    async with sequenced.open() as backplane:
        old = await backplane.append(topic, b"old")
        await trio.sleep(ttl / 2)
        await backplane.append(topic, b"keeps it alive")  # the ttl counts from the last append
        await trio.sleep(ttl / 2)
        assert (await backplane.history(topic)).epoch == old.epoch
        await backplane.append(busy, b"x")
        await trio.sleep(ttl * 1.5)  # past the ttl: expiry is due, not a race
        new = await backplane.append(topic, b"new")
        assert new.epoch != old.epoch
        assert new.offset == 1
        lost = await backplane.history(topic, Position(old.epoch, 2))
        assert lost == History(new.epoch, 1, [], False)


async def test_a_restarted_sequencer_starts_new_epochs(sequenced: Sequenced) -> None:
    await sequenced.start()
    topic = sequenced.topic("room")
    async with sequenced.open() as backplane:
        before = await backplane.append(topic, b"before")
    await sequenced.restart()
    async with sequenced.open() as backplane:
        after = await backplane.append(topic, b"after")
        assert after.epoch != before.epoch
        assert after.offset == 1
        history = await backplane.history(topic, before)
        assert history == History(after.epoch, 1, [], False)


@pytest.mark.parametrize(
    ("since", "limit"),
    [(None, -1), (None, 1.5), (Position("e", -1), None), ((b"e", 1), None)],
)
async def test_bad_history_queries_are_refused(
    sequenced: Sequenced, since: object, limit: object
) -> None:
    await sequenced.start()
    async with sequenced.open() as backplane:
        with pytest.raises(ValueError):
            await backplane.history(b"room", since, limit)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            await backplane.append(b"", b"x")


async def test_history_stays_under_max_bytes_with_many_topics(bounded: Sequenced) -> None:
    max_bytes = 50_000
    await bounded.start(HistoryPolicy(size=10, max_bytes=max_bytes))
    topics = [bounded.topic(f"room-{i}") for i in range(100)]
    payload = b"x" * 200
    async with bounded.open() as backplane:
        first = await backplane.append(topics[0], payload)
        for topic in topics:
            for _ in range(10):
                await backplane.append(topic, payload)
            assert bounded.sequencer(backplane).bytes <= max_bytes
        # The newest topic keeps its whole history; the least recently appended were evicted
        # whole, so their numbering starts again.
        newest = await backplane.history(topics[-1])
        assert [offset for offset, _ in newest.messages] == list(range(1, 11))
        oldest = await backplane.history(topics[0], first)
        assert oldest.epoch != first.epoch
        assert oldest.complete is False
        assert bounded.sequencer(backplane).bytes <= max_bytes


async def test_idle_topics_are_forgotten(bounded: Sequenced) -> None:
    ttl = 0.3
    await bounded.start(HistoryPolicy(ttl=ttl))
    async with bounded.open() as backplane:
        for i in range(50):
            await backplane.append(bounded.topic(f"room-{i}"), b"x" * 100)
        sequencer = bounded.sequencer(backplane)
        assert len(sequencer.series) == 50
        await trio.sleep(ttl * 1.5)
        # Every append first forgets the expired topics.
        await backplane.append(bounded.topic("late"), b"x")
        assert len(sequencer.series) == 1


async def test_memory_history_expires_by_trios_clock(autojump_clock: trio.abc.Clock) -> None:
    """The memory backend's ttl runs on Trio's clock, so that tests can skip through it."""
    url = f"memory://clock-{os.getpid()}-{next(_memory_names)}"
    async with open_backplane(url, history=HistoryPolicy(ttl=300)) as backplane:
        old = await backplane.append(b"room", b"old")
        await trio.sleep(299)
        assert (await backplane.history(b"room")).epoch == old.epoch
        await trio.sleep(2)
        assert (await backplane.history(b"room")).epoch != old.epoch
        assert isinstance(backplane, memory_backend.MemoryBackplane)
        assert list(backplane.sequencer.series) == [b"room"]  # a history query starts one


def test_history_policy_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="size"):
        HistoryPolicy(size=-1)
    with pytest.raises(ValueError, match="ttl"):
        HistoryPolicy(ttl=0)
    with pytest.raises(ValueError, match="max_bytes"):
        HistoryPolicy(max_bytes=-5)


# --- closing ---------------------------------------------------------------------------------


async def test_closing_while_messages_flow_raises_nothing(url: str) -> None:
    async with open_backplane(url) as publisher, trio.open_nursery() as nursery:

        async def pump() -> None:
            for i in itertools.count():
                await publisher.publish(b"room", b"%d" % i)

        async with open_backplane(url) as leaving:
            await leaving.subscribe(b"room")
            nursery.start_soon(pump)
            await Inbox(leaving).take(10)
            # Leave with messages still arriving and unread ones queued.

        # The flow goes on for others, and the publisher still works.
        async with open_backplane(url) as staying:
            await staying.subscribe(b"room")
            topic, _ = await Inbox(staying).next()
            assert topic == b"room"
        nursery.cancel_scope.cancel()


async def test_closing_with_a_consumer_waiting_raises_nothing(url: str) -> None:
    async with open_backplane(url) as instance:
        await instance.subscribe(b"room")
        async with trio.open_nursery() as nursery:

            async def consume() -> None:
                async for _ in instance:
                    pass

            nursery.start_soon(consume)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()


# The zmq backend runs its reader in a nursery around the caller's block; an error from the
# block must still come out as itself, as with memory://.
async def test_an_error_in_the_block_propagates_unchanged(url: str) -> None:
    with pytest.raises(KeyError, match="from the user's block"):
        async with open_backplane(url):
            raise KeyError("from the user's block")


# --- URLs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "scheme", "host", "port", "name"),
    [
        ("memory://", "memory", "", 0, ""),
        ("memory://tests", "memory", "", 0, "tests"),
        ("memory://a/b", "memory", "", 0, "a/b"),
        ("zmq://127.0.0.1:5559", "zmq", "127.0.0.1", 5559, ""),
        ("zmq://127.0.0.1:5559/", "zmq", "127.0.0.1", 5559, ""),
        ("zmq://localhost", "zmq", "localhost", 5559, ""),
        ("zmq://example.com:1", "zmq", "example.com", 1, ""),
        ("zmq://127.0.0.1:65535", "zmq", "127.0.0.1", 65535, ""),
        ("zmq://[::1]:6000", "zmq", "::1", 6000, ""),
        ("ZMQ://127.0.0.1:6000", "zmq", "127.0.0.1", 6000, ""),
    ],
)
def test_parse_backplane_url_accepts(
    url: str, scheme: str, host: str, port: int, name: str
) -> None:
    address = parse_backplane_url(url)
    assert (address.scheme, address.host, address.port, address.name) == (
        scheme,
        host,
        port,
        name,
    )


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("", id="empty"),
        pytest.param("127.0.0.1:5559", id="no-scheme"),
        pytest.param(None, id="not-a-string"),
        pytest.param(b"zmq://127.0.0.1:5559", id="bytes"),
        pytest.param("nats://127.0.0.1:4222", id="unknown-scheme-nats"),
        pytest.param("tcp://127.0.0.1:5559", id="unknown-scheme-tcp"),
        pytest.param("zmq://", id="missing-host"),
        pytest.param("zmq://:5559", id="missing-host-with-port"),
        pytest.param("zmq://127.0.0.1:abc", id="port-not-a-number"),
        pytest.param("zmq://127.0.0.1:-1", id="port-negative"),
        pytest.param("zmq://127.0.0.1:65536", id="port-over-65535"),
        pytest.param("zmq://127.0.0.1:99999", id="port-way-over"),
        pytest.param("zmq://127.0.0.1:5559/path", id="path"),
        pytest.param("zmq://127.0.0.1:5559?x=1", id="query"),
        pytest.param("zmq://user@127.0.0.1:5559", id="userinfo"),
    ],
)
def test_parse_backplane_url_rejects(url: object) -> None:
    with pytest.raises(BadBackplaneURL):
        parse_backplane_url(url)  # type: ignore[arg-type]


def test_bad_backplane_url_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown scheme"):
        parse_backplane_url("nats://127.0.0.1:4222")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1", {"host": "127.0.0.1", "port": 6379, "db": 0, "password": None}),
        ("redis://:s%40cret@h:7000/3", {"host": "h", "port": 7000, "db": 3, "password": "s@cret"}),
        ("redis://alice:pw@h", {"username": "alice", "password": "pw"}),
        ("rediss://h:6380?ssl_ca_certs=/ca.pem", {"tls": True, "ssl_ca_certs": "/ca.pem"}),
    ],
)
def test_parse_redis_urls(url: str, expected: dict[str, object]) -> None:
    address = parse_backplane_url(url)
    assert {key: getattr(address, key) for key in expected} == expected


@pytest.mark.parametrize(
    "url",
    [
        "redis://",
        "redis://h:0",
        "redis://h:99999",
        "redis://h/zero",
        "redis://h?timeout=3",
        "redis://h?ssl_ca_certs=/ca.pem",
        "redis://h#x",
    ],
)
def test_parse_redis_url_rejects(url: str) -> None:
    with pytest.raises(BadBackplaneURL):
        parse_backplane_url(url)


# Port 0 must not silently mean the default port, and a zmq URL has nothing after the port.
@pytest.mark.parametrize("url", ["zmq://127.0.0.1:0", "zmq://127.0.0.1:5559#x"])
def test_parse_backplane_url_rejects_port_0_and_fragment(url: str) -> None:
    with pytest.raises(BadBackplaneURL):
        parse_backplane_url(url)


async def test_open_backplane_refuses_a_bad_url_before_connecting() -> None:
    with pytest.raises(BadBackplaneURL):
        async with open_backplane("zmq://127.0.0.1:65536"):
            pytest.fail("opened a backplane from a bad URL")
