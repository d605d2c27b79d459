"""Protocol version 2 end to end: offsets, recovery on join, history (docs/protocol.md,
"Offsets, history and recovery"), on real worker processes over each backplane."""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from tests.helpers import (
    RECEIVE_TIMEOUT,
    START_TIMEOUT,
    ClusterProcess,
    LoggedProcess,
    RedisServer,
    Relay,
    free_port,
    redis_call,
    trio_fanout_command,
)
from tests.test_proxy_restart import start_proxy
from trio_fanout import Config, Emitter, Hooks, SyncEmitter, Worker, envelope, serve
from trio_fanout.backplane import (
    Backplane,
    BackplaneUnavailable,
    History,
    HistoryPolicy,
    Position,
    Received,
    open_backplane,
)
from trio_fanout.client import Client, Frame, open_client
from trio_fanout.emitter import open_emitter
from trio_fanout.runner import open_listener
from trio_fanout.worker import HISTORY_ANSWER_MAX_BYTES

_rooms = itertools.count()

# Messages a room keeps by default (docs/configuration.md, history_size).
HISTORY_SIZE = 100


def fresh_room(prefix: str = "recovery") -> str:
    return f"{prefix}-{os.getpid()}-{next(_rooms)}"


@attrs.frozen
class Server:
    url: str
    backplane_url: str | None  # None: the memory backplane, inside the worker process


@pytest.fixture(scope="module", params=["memory", "zmq", "redis"])
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    """One worker on the memory backplane; or `trio-fanout run --workers 2` on the embedded
    ZeroMQ proxy or on Redis, so that recoveries cross workers."""
    process: LoggedProcess
    if request.param == "memory":
        process = LoggedProcess(
            trio_fanout_command(
                "worker", "--port", "0", "--backplane", f"memory://recovery-{os.getpid()}"
            )
        )
        match = process.wait_for_log(r"serving ws://127\.0\.0\.1:(\d+)/ws")
        found = Server(f"ws://127.0.0.1:{match.group(1)}/ws", None)
    else:
        backplane = []
        if request.param == "redis":
            backplane = ["--backplane", request.getfixturevalue("redis_server").url]
        cluster = process = ClusterProcess("--workers", "2", *backplane)
        cluster.wait_for_workers(2)
        found = Server(cluster.url, cluster.backplane_url)
    try:
        yield found
    finally:
        process.stop()


class Member:
    """A client speaking version 2 by hand: requests with ids, frames read one at a time."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._ids = itertools.count(1)
        self._unread: deque[Frame] = deque()

    async def request(self, frame: Frame) -> Frame:
        """Send ``frame`` with a fresh id; its reply. Frames without an id that arrive first
        are kept, in order, for :meth:`next_frame`."""
        frame["id"] = request_id = next(self._ids)
        await self.client.send(frame)
        while True:
            with trio.fail_after(RECEIVE_TIMEOUT):
                reply = await self.client.receive()
            if "id" in reply:
                assert reply["id"] == request_id, reply
                return reply
            self._unread.append(reply)

    async def join(self, room: str, since: Frame | None = None) -> Frame:
        frame: Frame = {"type": "join", "room": room}
        if since is not None:
            frame["since"] = since
        joined = await self.request(frame)
        assert joined["type"] == "joined", joined
        return joined

    async def publish(self, room: str, data: object) -> int:
        ack = await self.request({"type": "publish", "room": room, "data": data})
        assert ack["type"] == "ack", ack
        offset: int = ack["offset"]
        return offset

    @property
    def unread(self) -> int:
        """How many frames without id came before the last reply and are still to be read."""
        return len(self._unread)

    async def next_frame(self) -> Frame:
        if self._unread:
            return self._unread.popleft()
        with trio.fail_after(RECEIVE_TIMEOUT):
            return await self.client.receive()

    async def messages(self, count: int) -> list[tuple[int, object]]:
        """The ``(offset, data)`` of the next ``count`` frames, which must be messages."""
        found = []
        for _ in range(count):
            frame = await self.next_frame()
            assert frame["type"] == "message", frame
            found.append((frame["offset"], frame["data"]))
        return found


async def publish_steadily(publisher: Member, room: str, latest: list[int]) -> None:
    """Publish to ``room`` every millisecond until cancelled, each message's data its own
    offset (the next one, as nobody else publishes); ``latest[0]`` is the last offset given."""
    for _ in range(1_000_000):
        offset = await publisher.publish(room, latest[0] + 1)
        assert offset == latest[0] + 1
        latest[0] = offset
        await trio.sleep(0.001)


@asynccontextmanager
async def member(url: str) -> AsyncIterator[Member]:
    async with open_client(url, connect_timeout=START_TIMEOUT) as client:
        yield Member(client)


async def test_messages_carry_the_offsets_their_acks_gave(server: Server) -> None:
    room = fresh_room()
    async with member(server.url) as alice, member(server.url) as bob:
        joined = await alice.join(room)
        assert joined["offset"] == 0
        assert isinstance(joined["epoch"], str) and joined["epoch"]
        assert "recovered" not in joined  # no since, no recovery: a version 1 join
        acks = [await bob.publish(room, number) for number in range(5)]
        assert acks == [1, 2, 3, 4, 5]
        assert await alice.messages(5) == [(offset, n) for n, offset in enumerate(acks)]
        # A later join answers where the room stands, and gets what follows.
        later = await bob.join(room)
        assert (later["epoch"], later["offset"]) == (joined["epoch"], 5)
        assert await alice.publish(room, "next") == 6
        assert await bob.messages(1) == [(6, "next")]


async def test_a_rejoin_with_since_gets_exactly_what_it_missed_in_order(server: Server) -> None:
    room, missed = fresh_room(), 20
    async with member(server.url) as publisher:
        async with member(server.url) as alice:
            joined = await alice.join(room)
            for number in range(3):
                await publisher.publish(room, ["before", number])
            seen = await alice.messages(3)
        # Alice is gone; the room goes on without her.
        for number in range(missed):
            await publisher.publish(room, ["missed", number])
        async with member(server.url) as alice:
            since = {"epoch": joined["epoch"], "offset": seen[-1][0]}
            rejoined = await alice.join(room, since)
            assert rejoined["recovered"] is True
            assert rejoined["epoch"] == joined["epoch"]
            await publisher.publish(room, "live")
            got = await alice.messages(missed + 1)
            assert got == [(4 + n, ["missed", n]) for n in range(missed)] + [(24, "live")]


async def seam_round(server: Server, room: str, latest: list[int], epoch: str) -> int:
    """Join ``room`` with a since a few messages back while a publisher is busy; check that
    every message from there arrives once and in order. Returns how many were checked."""
    async with member(server.url) as joiner:
        since = max(0, latest[0] - 5)
        joined = await joiner.join(room, {"epoch": epoch, "offset": since})
        assert joined["recovered"] is True, joined
        target = latest[0] + 20
        expected = since + 1
        while expected <= target:
            ((offset, data),) = await joiner.messages(1)
            assert offset == expected, f"after {expected - 1} came {offset}: since {since}"
            assert data == offset  # the publisher publishes each message's own offset
            expected += 1
        return target - since


async def test_the_seam_between_history_and_live_loses_and_repeats_nothing(
    server: Server,
) -> None:
    room, rounds = fresh_room("seam"), 50
    latest = [0]
    watched: list[int] = []
    async with member(server.url) as publisher, member(server.url) as watcher:
        joined = await watcher.join(room)
        epoch = joined["epoch"]

        watched_all = trio.Event()
        published: list[int] = []  # set once the publisher has stopped

        async def watch() -> None:
            while True:
                frame = await watcher.client.receive()
                watched.append(frame["offset"])
                if published and len(watched) >= published[0]:
                    watched_all.set()

        checked = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            async with trio.open_nursery() as publishing:
                publishing.start_soon(publish_steadily, publisher, room, latest)
                for _ in range(rounds):
                    checked += await seam_round(server, room, latest, epoch)
                # And plain joins on a busy room: the first message follows the joined offset.
                for _ in range(rounds // 5):
                    async with member(server.url) as plain:
                        start = (await plain.join(room))["offset"]
                        assert [offset for offset, _ in await plain.messages(3)] == [
                            start + 1, start + 2, start + 3
                        ]  # fmt: skip
                publishing.cancel_scope.cancel()
            # The watcher, a member throughout, saw every message once and in order.
            published.append(latest[0])
            if len(watched) >= latest[0]:
                watched_all.set()
            with trio.fail_after(RECEIVE_TIMEOUT):
                await watched_all.wait()
            nursery.cancel_scope.cancel()
        assert checked >= rounds * 20
        assert watched[: latest[0]] == list(range(1, latest[0] + 1))


async def test_a_member_that_rejoins_with_since_gets_it_again_and_its_live_stream_goes_on(
    server: Server,
) -> None:
    """A member's join with ``since`` on a busy room: what came after ``since`` is sent again,
    in order, right after ``joined`` (recovered), and the live messages follow it with no gap
    and no repeat; a ``since`` that cannot be recovered sends nothing old, and the member's
    live stream goes on where it stood, losing nothing."""
    room, rounds = fresh_room("rejoin"), 20
    latest = [0]
    async with member(server.url) as publisher, member(server.url) as alice:
        epoch = (await alice.join(room))["epoch"]

        expected = 1  # the offset alice's stream must deliver next

        async def read(count: int) -> None:
            nonlocal expected
            for offset, data in await alice.messages(count):
                assert (offset, data) == (expected, expected), f"expected {expected}"
                expected += 1

        repeated = 0
        async with trio.open_nursery() as publishing:
            publishing.start_soon(publish_steadily, publisher, room, latest)
            for round_number in range(rounds):
                await read(10)
                since = max(0, expected - 1 - round_number % 7)
                joined = await alice.join(room, {"epoch": epoch, "offset": since})
                await read(alice.unread)  # live ones that came before the answer
                assert joined["recovered"] is True, joined
                assert (joined["epoch"], joined["offset"] >= expected - 1) == (epoch, True)
                repeated += expected - 1 - since
                expected = since + 1  # sent again from there, then live with no gap
            await read(10)
            # Unrecoverable (an epoch the room never had): nothing old, and nothing lost.
            joined = await alice.join(room, {"epoch": "0123456789abcdef", "offset": 3})
            await read(alice.unread)
            assert joined["recovered"] is False, joined
            assert (joined["epoch"], joined["offset"]) == (epoch, expected - 1)
            await read(20)
            publishing.cancel_scope.cancel()
        assert repeated > rounds


async def test_a_since_beyond_the_history_or_of_another_epoch_is_not_recovered(
    server: Server,
) -> None:
    room = fresh_room()
    async with member(server.url) as publisher, member(server.url) as alice:
        epoch = (await publisher.request({"type": "history", "room": room, "limit": 0}))["epoch"]
        for number in range(HISTORY_SIZE + 10):
            latest = await publisher.publish(room, number)
        for since in (
            {"epoch": epoch, "offset": 1},  # messages 2 to 10 are no longer kept
            {"epoch": "0123456789abcdef", "offset": 5},  # an epoch the room never had
            {"epoch": epoch, "offset": HISTORY_SIZE + 50},  # ahead of the room
        ):
            async with member(server.url) as late:
                joined = await late.join(room, since)
                assert joined["recovered"] is False
                assert (joined["epoch"], joined["offset"]) == (epoch, latest)
                # Nothing old follows: the next message is the next one published.
                latest = await alice.publish(room, "new")
                assert await late.messages(1) == [(latest, "new")]
        # The oldest kept message can still be recovered from.
        async with member(server.url) as late:
            oldest_kept = latest - HISTORY_SIZE + 1
            joined = await late.join(room, {"epoch": epoch, "offset": oldest_kept - 1})
            assert joined["recovered"] is True
            got = await late.messages(HISTORY_SIZE)
            assert [offset for offset, _ in got] == list(range(oldest_kept, latest + 1))


async def test_history_with_and_without_since_and_limit(server: Server) -> None:
    room = fresh_room()
    async with member(server.url) as alice:
        empty = await alice.request({"type": "history", "room": room})
        assert empty["type"] == "history" and empty["messages"] == []
        assert empty["offset"] == 0
        data = [{"n": 1}, "two", [3, 3.5], None, True, "h\u00e9llo \U0001f600"]
        for value in data:
            await alice.publish(room, value)
        everything = await alice.request({"type": "history", "room": room})
        assert everything["epoch"] == empty["epoch"] and everything["offset"] == len(data)
        assert everything["messages"] == [
            {"offset": n, "data": value} for n, value in enumerate(data, 1)
        ]
        newest = await alice.request({"type": "history", "room": room, "limit": 2})
        assert [m["offset"] for m in newest["messages"]] == [5, 6]
        since = {"epoch": everything["epoch"], "offset": 2}
        page = await alice.request({"type": "history", "room": room, "since": since, "limit": 3})
        assert [m["data"] for m in page["messages"]] == data[2:5]
        rest = await alice.request({"type": "history", "room": room, "since": since})
        assert [m["offset"] for m in rest["messages"]] == [3, 4, 5, 6]
        where = await alice.request({"type": "history", "room": room, "limit": 0})
        assert (where["messages"], where["offset"]) == ([], 6)
        # null is the same as absent, for limit as for since and id.
        nulls = {"since": None, "limit": None}
        unlimited = await alice.request({"type": "history", "room": room, **nulls})
        assert unlimited["messages"] == everything["messages"]
        # Reading the history is not joining: nothing arrives for this room.
        await alice.request({"type": "ping"})
        for bad in ({"limit": -1}, {"limit": 1001}, {"limit": "3"}, {"since": {"epoch": "x"}}):
            error = await alice.request({"type": "history", "room": room, **bad})
            assert (error["type"], error["code"]) == ("error", "bad_frame"), error


async def test_emitter_publishes_get_offsets(server: Server) -> None:
    if server.backplane_url is None:
        pytest.skip("the memory backplane lives inside the worker process: tested below")
    room = fresh_room()
    async with member(server.url) as alice, open_emitter(server.backplane_url) as emitter:
        await alice.join(room)
        assert await emitter.publish(room, "one") == 1
        assert await alice.publish(room, "two") == 2
        assert await emitter.publish(room, "three") == 3
        assert await alice.messages(3) == [(1, "one"), (2, "two"), (3, "three")]
        await emitter.broadcast("to all")
        frame = await alice.next_frame()
        assert frame == {"type": "message", "data": "to all"}  # no room, no offset


# A cluster's retention larger than the defaults (100 messages, 300 s) that emitters have.
CLUSTER_HISTORY_SIZE, CLUSTER_HISTORY_TTL = 300, 1000


@pytest.mark.parametrize("backplane", ["zmq", "redis"])
async def test_an_emitter_left_at_the_defaults_keeps_the_clusters_retention(
    backplane: str, request: pytest.FixtureRequest
) -> None:
    """An emitter, ``trio-fanout publish`` and a ``SyncEmitter`` given no history settings
    publish to a room of a cluster that keeps 300 messages for 1000 s: the room still keeps 300
    (a client recovers 150 missed messages) and, on Redis, its keys still live 1000 s."""
    redis: RedisServer | None = None
    options = ["--history-size", str(CLUSTER_HISTORY_SIZE)]
    options += ["--history-ttl", str(CLUSTER_HISTORY_TTL)]
    if backplane == "redis":
        redis = request.getfixturevalue("redis_server")
        options += ["--backplane", redis.url]
    cluster = ClusterProcess("--workers", "2", *options)
    try:
        cluster.wait_for_workers(2)
        room = fresh_room("retention")
        async with member(cluster.url) as alice:
            epoch = (await alice.join(room))["epoch"]
            for number in range(150):
                await alice.publish(room, number)
            async with open_emitter(cluster.backplane_url) as emitter:
                assert await emitter.publish(room, "emitter") == 151
            command = trio_fanout_command("publish", "--backplane", cluster.backplane_url)
            with trio.fail_after(START_TIMEOUT):
                done = await trio.run_process([*command, room, '"cli"'], capture_stdout=True)
            assert b"at offset 152" in done.stdout

            def publish_in_a_thread() -> int:
                with SyncEmitter(cluster.backplane_url) as sync_emitter:
                    return sync_emitter.publish(room, "sync")

            with trio.fail_after(START_TIMEOUT):
                assert await trio.to_thread.run_sync(publish_in_a_thread) == 153
            kept = await alice.request({"type": "history", "room": room, "limit": 1000})
            assert [m["offset"] for m in kept["messages"]] == list(range(1, 154))
        async with member(cluster.url) as bob:
            rejoined = await bob.join(room, {"epoch": epoch, "offset": 2})
            assert rejoined["recovered"] is True, rejoined
            expected = [(n + 1, n) for n in range(2, 150)]
            expected += [(151, "emitter"), (152, "cli"), (153, "sync")]
            assert await bob.messages(151) == expected
        if redis is not None:
            hex_topic = envelope.room_topic(room).hex().encode()
            for kind in (b"meta", b"stream"):
                key = b"trio-fanout:{%s}:%s" % (hex_topic, kind)
                ttl_ms = await redis_call(redis.port, b"PTTL", key)
                assert 900_000 < ttl_ms <= CLUSTER_HISTORY_TTL * 1000, (key, ttl_ms)
    finally:
        cluster.stop()


@asynccontextmanager
async def worker_in_process(history: HistoryPolicy) -> AsyncIterator[tuple[str, Backplane]]:
    """A worker in this process on a memory backplane of its own, keeping ``history``; its
    URL and the backplane."""
    listener = open_listener("127.0.0.1", 0)
    url = f"memory://recovery-in-process-{os.getpid()}-{next(_rooms)}"
    async with open_backplane(url, history=history) as backplane, trio.open_nursery() as nursery:
        worker = Worker(Config(heartbeat_interval=0), backplane)
        await nursery.start(worker.serve, listener)
        yield f"ws://127.0.0.1:{listener.getsockname()[1]}/ws", backplane
        worker.stop()
    listener.close()


async def test_members_are_told_when_the_room_starts_a_new_epoch() -> None:
    # The room's history expires after 0.2 s without a message; its numbering starts again.
    ttl = 0.2
    room = fresh_room()
    async with (
        worker_in_process(HistoryPolicy(ttl=ttl)) as (url, _),
        member(url) as alice,
        member(url) as bob,
    ):
        first = await alice.join(room)
        await bob.publish(room, "old")
        assert await alice.messages(1) == [(1, "old")]
        await trio.sleep(ttl * 2)  # idle past the ttl: the sequencer forgets the room
        assert await bob.publish(room, "new") == 1
        notice = await alice.next_frame()
        assert notice["type"] == "joined" and "id" not in notice
        assert notice["epoch"] != first["epoch"]
        assert (notice["offset"], notice["recovered"]) == (0, False)
        assert await alice.messages(1) == [(1, "new")]
        # A since of the old epoch recovers nothing, and says where the room is now.
        async with member(url) as late:
            old = {"epoch": first["epoch"], "offset": 1}
            joined = await late.join(room, old)
            assert (joined["epoch"], joined["offset"]) == (notice["epoch"], 1)
            assert joined["recovered"] is False
            history = await late.request({"type": "history", "room": room, "since": old})
            assert (history["epoch"], history["messages"]) == (notice["epoch"], [])


async def test_emitter_publishes_on_the_memory_backplane_get_offsets() -> None:
    room = fresh_room()
    async with worker_in_process(HistoryPolicy()) as (url, backplane), member(url) as alice:
        await alice.join(room)
        emitter = Emitter(backplane)
        assert await emitter.publish(room, "one") == 1
        assert await alice.publish(room, "two") == 2
        assert await emitter.publish(room, "three") == 3
        assert await alice.messages(3) == [(1, "one"), (2, "two"), (3, "three")]


class HeldHistory(Backplane):
    """A memory backplane whose ``history`` reads wait, once ``gate`` is set, until the test
    opens it.

    The memory backend answers a history read at once, so the real one cannot show what
    happens to live messages that arrive during a slow read (a busy Redis, a distant proxy);
    this wrapper holds the read, and everything else is the real backend.
    """

    def __init__(self, inner: Backplane) -> None:
        self.inner = inner
        self.gate: trio.Event | None = None
        self.reading = trio.Event()

    async def history(
        self, topic: bytes, since: Position | None = None, limit: int | None = None
    ) -> History:
        if self.gate is not None:
            self.reading.set()
            await self.gate.wait()
        return await self.inner.history(topic, since, limit)

    async def publish(self, topic: bytes, payload: bytes) -> None:
        await self.inner.publish(topic, payload)

    async def append(self, topic: bytes, payload: bytes) -> Position:
        return await self.inner.append(topic, payload)

    async def subscribe(self, topic: bytes) -> None:
        await self.inner.subscribe(topic)

    def unsubscribe(self, topic: bytes) -> None:
        self.inner.unsubscribe(topic)

    async def receive_batch(self, max_messages: int | None = None) -> list[Received]:
        return await self.inner.receive_batch(max_messages)

    @property
    def unavailable_reason(self) -> str | None:
        return self.inner.unavailable_reason


@pytest.mark.parametrize(("published_during_read", "recovered"), [(20, True), (50, False)])
async def test_live_messages_during_a_slow_history_read_follow_it_up_to_a_bound(
    published_during_read: int, recovered: bool
) -> None:
    room, bound = fresh_room(), 30  # max_queued_frames: what the joiner may have held back
    listener = open_listener("127.0.0.1", 0)
    async with (
        open_backplane(f"memory://held-{os.getpid()}-{next(_rooms)}") as memory,
        trio.open_nursery() as nursery,
    ):
        backplane = HeldHistory(memory)
        worker = Worker(Config(heartbeat_interval=0, max_queued_frames=bound), backplane)
        await nursery.start(worker.serve, listener)
        url = f"ws://127.0.0.1:{listener.getsockname()[1]}/ws"
        emitter = Emitter(memory)
        async with member(url) as watcher, member(url) as joiner:
            epoch = (await watcher.join(room))["epoch"]
            for number in range(1, 6):
                await emitter.publish(room, number)
            assert len(await watcher.messages(5)) == 5
            backplane.gate = gate = trio.Event()
            since = {"epoch": epoch, "offset": 2}
            await joiner.client.send({"type": "join", "room": room, "id": 1, "since": since})
            with trio.fail_after(RECEIVE_TIMEOUT):
                await backplane.reading.wait()
            latest = 5 + published_during_read
            for number in range(6, latest + 1):
                await emitter.publish(room, number)
            # Through the worker's fan-out: held back for the joiner by now.
            assert len(await watcher.messages(published_during_read)) == published_during_read
            gate.set()
            joined = await joiner.next_frame()
            assert (joined["type"], joined["recovered"]) == ("joined", recovered), joined
            if recovered:
                # Everything after offset 2, once, in order: from the history, then held back.
                assert await joiner.messages(latest - 2) == [(n, n) for n in range(3, latest + 1)]
            else:
                # Past the bound: nothing old, and the live messages after the last held one.
                assert joined["offset"] == latest
            assert await emitter.publish(room, "next") == latest + 1
            assert await joiner.messages(1) == [(latest + 1, "next")]
        worker.stop()
    listener.close()


class RefusableHistory(HeldHistory):
    """:class:`HeldHistory` whose held read can be refused, as by a backplane gone meanwhile."""

    def __init__(self, inner: Backplane) -> None:
        super().__init__(inner)
        self.refuse = False

    async def history(
        self, topic: bytes, since: Position | None = None, limit: int | None = None
    ) -> History:
        answer = await super().history(topic, since, limit)
        if self.refuse:
            raise BackplaneUnavailable("refused for the test")
        return answer


@attrs.define
class RefusableSetup:
    """A worker on a :class:`RefusableHistory`, an emitter, and two members of ``room``:
    ``alice``, whose rejoin the tests hold or refuse, and ``watcher``, a plain member."""

    room: str
    backplane: RefusableHistory
    emitter: Emitter
    alice: Member
    watcher: Member
    epoch: str


@asynccontextmanager
async def refusable_setup(name: str, **backplane_options: Any) -> AsyncIterator[RefusableSetup]:
    room = fresh_room()
    listener = open_listener("127.0.0.1", 0)
    async with (
        open_backplane(
            f"memory://{name}-{os.getpid()}-{next(_rooms)}", **backplane_options
        ) as memory,
        trio.open_nursery() as nursery,
    ):
        backplane = RefusableHistory(memory)
        worker = Worker(Config(heartbeat_interval=0), backplane)
        await nursery.start(worker.serve, listener)
        url = f"ws://127.0.0.1:{listener.getsockname()[1]}/ws"
        async with member(url) as alice, member(url) as watcher:
            epoch = (await alice.join(room))["epoch"]
            await watcher.join(room)
            yield RefusableSetup(room, backplane, Emitter(memory), alice, watcher, epoch)
        worker.stop()
    listener.close()


@pytest.mark.parametrize("outcome", ["unrecoverable", "refused"])
async def test_a_member_whose_rejoin_recovers_nothing_loses_nothing_of_its_live_stream(
    outcome: str,
) -> None:
    """A member rejoins with a ``since`` of another epoch, or its rejoin's history read is
    refused, while messages arrive: they were held back during the read, and follow in order
    (after ``joined`` with ``recovered: false`` where its stream stood; before the error)."""
    async with refusable_setup("refusable") as setup:
        room, backplane, emitter, epoch = setup.room, setup.backplane, setup.emitter, setup.epoch
        alice, watcher = setup.alice, setup.watcher
        for number in range(1, 6):
            await emitter.publish(room, number)
        assert await alice.messages(5) == [(n, n) for n in range(1, 6)]
        assert len(await watcher.messages(5)) == 5
        backplane.gate = gate = trio.Event()
        backplane.refuse = outcome == "refused"
        since = {"epoch": "0123456789abcdef", "offset": 3}
        await alice.client.send({"type": "join", "room": room, "id": 1, "since": since})
        with trio.fail_after(RECEIVE_TIMEOUT):
            await backplane.reading.wait()
        for number in range(6, 16):
            await emitter.publish(room, number)
        # Through the worker's fan-out: held back for alice by now.
        assert len(await watcher.messages(10)) == 10
        gate.set()
        if outcome == "refused":
            # Still a member, as if it had not asked: the live messages, then the refusal.
            assert await alice.messages(10) == [(n, n) for n in range(6, 16)]
            error = await alice.next_frame()
            assert (error["type"], error["code"]) == ("error", "backplane_unavailable")
        else:
            joined = await alice.next_frame()
            assert (joined["type"], joined["recovered"]) == ("joined", False), joined
            assert (joined["epoch"], joined["offset"]) == (epoch, 5)  # where it stood
            assert await alice.messages(10) == [(n, n) for n in range(6, 16)]
        backplane.gate = None
        assert await emitter.publish(room, "next") == 16
        assert await alice.messages(1) == [(16, "next")]
        # Still a member, once: a plain join answers where it stands.
        assert (await alice.join(room))["offset"] == 16


async def test_a_member_whose_rejoin_is_refused_is_told_of_a_new_epoch_among_the_held_messages():
    """While a member's rejoin reads the history, the room gets a message, then starts a new
    epoch (its history expired); the read is refused. The held messages follow, and between
    them the member is told, as the other members are, that the numbering started again: a
    ``joined`` without id, ``recovered: false``, before the new epoch's offset 1. Without it, a
    client that drops offsets it has had would take offset 1 for a repeat of the old one."""
    ttl = 0.3
    async with refusable_setup("new-epoch", history=HistoryPolicy(ttl=ttl)) as setup:
        room, backplane, emitter, epoch = setup.room, setup.backplane, setup.emitter, setup.epoch
        alice, watcher = setup.alice, setup.watcher
        for number in range(1, 4):
            await emitter.publish(room, number)
        assert await alice.messages(3) == [(1, 1), (2, 2), (3, 3)]
        assert len(await watcher.messages(3)) == 3
        backplane.gate = gate = trio.Event()
        backplane.refuse = True
        since = {"epoch": epoch, "offset": 1}
        await alice.client.send({"type": "join", "room": room, "id": 1, "since": since})
        with trio.fail_after(RECEIVE_TIMEOUT):
            await backplane.reading.wait()
        assert await emitter.publish(room, 4) == 4
        await trio.sleep(ttl * 2)  # the room's history expires: its numbering starts again
        assert await emitter.publish(room, "new") == 1
        assert await watcher.messages(1) == [(4, 4)]
        told = await watcher.next_frame()
        new_epoch = told["epoch"]
        assert (told["type"], new_epoch != epoch, told["offset"]) == ("joined", True, 0)
        assert await watcher.messages(1) == [(1, "new")]
        gate.set()
        assert await alice.messages(1) == [(4, 4)]
        told = await alice.next_frame()
        told_as_members_are = (told["type"], told.get("id"), told.get("recovered"))
        assert told_as_members_are == ("joined", None, False), told
        assert (told["epoch"], told["offset"]) == (new_epoch, 0)
        assert await alice.messages(1) == [(1, "new")]
        error = await alice.next_frame()
        assert (error["type"], error["code"]) == ("error", "backplane_unavailable")
        backplane.gate = None
        # Its stream goes on in the new epoch, once.
        assert await emitter.publish(room, "next") == 2
        assert await alice.messages(1) == [(2, "next")]
        assert (await alice.join(room))["offset"] == 2


class LossySubscription(HeldHistory):
    """A memory backplane (with the history reads of :class:`HeldHistory`) whose subscriber
    loses the next ``lose(count)`` room messages, as a worker does while its link to Redis or
    to the proxy is being re-established.

    The memory backend never loses a message, and a real link's outage loses whatever happens
    to be published during it; this wrapper loses exactly the messages a test names, so that
    the worker's repair of the gap is tested deterministically (the Redis restart in
    test_client_recovery tests a real one).
    """

    def __init__(self, inner: Backplane) -> None:
        super().__init__(inner)
        self.to_lose = 0

    def lose(self, count: int) -> None:
        self.to_lose = count

    async def receive_batch(self, max_messages: int | None = None) -> list[Received]:
        while True:
            kept = []
            for received in await self.inner.receive_batch(max_messages):
                if self.to_lose and received.position is not None:
                    self.to_lose -= 1
                else:
                    kept.append(received)
            if kept:
                return kept


@asynccontextmanager
async def lossy_worker(
    history: HistoryPolicy, **config: object
) -> AsyncIterator[tuple[str, LossySubscription, Emitter]]:
    """A worker in this process on a :class:`LossySubscription`; its URL, the backplane, and
    an emitter that publishes on the backplane underneath (never lost on the way out)."""
    listener = open_listener("127.0.0.1", 0)
    url = f"memory://lossy-{os.getpid()}-{next(_rooms)}"
    async with open_backplane(url, history=history) as memory, trio.open_nursery() as nursery:
        backplane = LossySubscription(memory)
        worker = Worker(Config(heartbeat_interval=0, **config), backplane)  # type: ignore[arg-type]
        await nursery.start(worker.serve, listener)
        yield f"ws://127.0.0.1:{listener.getsockname()[1]}/ws", backplane, Emitter(memory)
        worker.stop()
    listener.close()


@pytest.mark.parametrize("joiner", ["member", "newcomer"])
async def test_a_join_whose_history_read_is_under_way_when_missed_offsets_are_lost_is_told(
    joiner: str,
) -> None:
    """While a join's history read is on its way (its answer already made), the worker's
    subscription misses two messages that the history no longer keeps (it keeps one): the
    room's members are told that they are lost. So is the joiner, in its turn: a member that
    rejoins with a ``since`` that cannot be recovered gets the lost offsets in its answer; a
    newcomer whose ``since`` was recovered (up to 3) gets a ``joined`` without id and with
    ``recovered: false`` before the next message, where it would have had a silent gap."""
    room = fresh_room()
    async with lossy_worker(HistoryPolicy(size=1)) as (url, backplane, emitter):
        read_then_wait = backplane.inner.history
        answered, gate = trio.Event(), trio.Event()

        async def history(
            topic: bytes, since: Position | None = None, limit: int | None = None
        ) -> History:
            answer = await read_then_wait(topic, since, limit)
            if since is not None and since.offset == 3:  # the join's read, not the repair's
                answered.set()
                await gate.wait()
            return answer

        backplane.history = history  # type: ignore[method-assign]
        async with member(url) as alice, member(url) as watcher, member(url) as bob:
            epoch = (await alice.join(room))["epoch"]
            await watcher.join(room)
            for number in range(1, 4):
                await emitter.publish(room, number)
            assert await alice.messages(3) == [(1, 1), (2, 2), (3, 3)]
            assert len(await watcher.messages(3)) == 3
            joining = alice if joiner == "member" else bob
            since_epoch = "0123456789abcdef" if joiner == "member" else epoch
            since = {"epoch": since_epoch, "offset": 3}
            await joining.client.send({"type": "join", "room": room, "id": 1, "since": since})
            with trio.fail_after(RECEIVE_TIMEOUT):
                await answered.wait()
            backplane.lose(2)  # 4 and 5 never reach the worker, and the history keeps only 6
            for number in range(4, 7):
                await emitter.publish(room, number)
            told = await watcher.next_frame()
            assert (told["type"], told["offset"], told["recovered"]) == ("joined", 5, False)
            assert await watcher.messages(1) == [(6, 6)]
            gate.set()
            joined = await joining.next_frame()
            assert (joined["type"], joined["id"]) == ("joined", 1), joined
            if joiner == "member":
                # Its stream goes on after the lost offsets, and its answer says so.
                assert (joined["offset"], joined["recovered"]) == (5, False), joined
            else:
                assert (joined["offset"], joined["recovered"]) == (3, True), joined
                told = await joining.next_frame()
                told_as_members_are = (told["type"], told.get("id"), told.get("recovered"))
                assert told_as_members_are == ("joined", None, False), told
                assert (told["epoch"], told["offset"]) == (epoch, 5)
            assert await joining.messages(1) == [(6, 6)]


async def test_offsets_a_worker_missed_are_read_from_the_history_and_delivered_in_order() -> None:
    room = fresh_room()
    async with (
        lossy_worker(HistoryPolicy()) as (url, backplane, emitter),
        member(url) as alice,
        member(url) as bob,
    ):
        await alice.join(room)
        await bob.join(room)
        await bob.publish(room, 1)
        assert await alice.messages(1) == await bob.messages(1) == [(1, 1)]
        backplane.lose(4)  # 2 to 5 never reach the worker
        backplane.gate = gate = trio.Event()  # and the read of them waits for the test
        for number in range(2, 8):
            await emitter.publish(room, number)
        with trio.fail_after(RECEIVE_TIMEOUT):
            await backplane.reading.wait()
        # While the worker reads, 6 and 7 are held back; a newcomer is told the room stands
        # at 1, and everything after it follows for it too.
        async with member(url) as carol:
            joined = await carol.join(room)
            assert joined["offset"] == 1
            gate.set()
            assert await emitter.publish(room, 8) == 8
            expected = [(n, n) for n in range(2, 9)]
            assert await alice.messages(7) == expected
            assert await bob.messages(7) == expected
            assert await carol.messages(7) == expected
            # Nothing more: the next frame is the answer to a ping.
            assert (await alice.request({"type": "ping"}))["type"] == "pong"


async def test_offsets_missed_beyond_the_history_are_reported_unrecovered() -> None:
    room = fresh_room()
    async with (
        lossy_worker(HistoryPolicy(size=2)) as (url, backplane, emitter),
        member(url) as alice,
    ):
        epoch = (await alice.join(room))["epoch"]
        assert await emitter.publish(room, 1) == 1
        assert await alice.messages(1) == [(1, 1)]
        backplane.lose(5)  # 2 to 6, and the history keeps only the last two messages
        for number in range(2, 8):
            await emitter.publish(room, number)
        notice = await alice.next_frame()
        assert notice == {
            "type": "joined", "room": room, "epoch": epoch, "offset": 6, "recovered": False
        }  # fmt: skip
        assert await alice.messages(1) == [(7, 7)]


async def test_a_repair_that_holds_back_too_much_reports_unrecovered() -> None:
    room, bound = fresh_room(), 10
    async with (
        lossy_worker(HistoryPolicy(), max_queued_frames=bound) as (url, backplane, emitter),
        member(url) as alice,
    ):
        epoch = (await alice.join(room))["epoch"]
        assert await emitter.publish(room, 1) == 1
        assert await alice.messages(1) == [(1, 1)]
        backplane.lose(1)
        backplane.gate = gate = trio.Event()
        latest = 2 + 2 * bound
        for number in range(2, latest + 1):
            await emitter.publish(room, number)
        with trio.fail_after(RECEIVE_TIMEOUT):
            await backplane.reading.wait()
        # The worker has taken them all from the backplane once a ping travels through it.
        await emitter.publish(room, "marker")
        gate.set()
        notice = await alice.next_frame()
        assert (notice["type"], notice["epoch"], notice["recovered"]) == ("joined", epoch, False)
        assert notice["offset"] in (latest, latest + 1)
        if notice["offset"] == latest:
            assert await alice.messages(1) == [(latest + 1, "marker")]
        assert await emitter.publish(room, "next") == latest + 2
        assert await alice.messages(1) == [(latest + 2, "next")]


async def test_the_missed_start_of_a_new_epoch_is_recovered_after_the_notice() -> None:
    ttl = 0.2
    room = fresh_room()
    async with (
        lossy_worker(HistoryPolicy(ttl=ttl)) as (url, backplane, emitter),
        member(url) as alice,
    ):
        old = await alice.join(room)
        assert await emitter.publish(room, "old") == 1
        assert await alice.messages(1) == [(1, "old")]
        await trio.sleep(ttl * 2)  # idle past the ttl: the sequencer forgets the room
        backplane.lose(2)
        for number in range(1, 4):
            await emitter.publish(room, number)
        notice = await alice.next_frame()
        assert notice["type"] == "joined" and notice["epoch"] != old["epoch"]
        assert (notice["offset"], notice["recovered"]) == (0, False)
        assert await alice.messages(3) == [(1, 1), (2, 2), (3, 3)]


async def test_a_worker_whose_link_to_the_proxy_was_cut_reads_back_what_it_missed() -> None:
    # The worker reaches the proxy through a relay that the test cuts; the proxy, the rooms'
    # sequencer, lives on and keeps numbering and keeping what the emitter publishes.
    proxy_port = free_port()
    proxy = start_proxy(proxy_port)
    relay = Relay(proxy_port)
    worker: LoggedProcess | None = None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(relay.serve)
            worker = LoggedProcess(
                trio_fanout_command(
                    "worker", "--port", "0", "--backplane", f"zmq://127.0.0.1:{relay.port}"
                )
            )
            match = await trio.to_thread.run_sync(
                worker.wait_for_log, r"serving ws://127\.0\.0\.1:(\d+)/ws"
            )
            room = fresh_room()
            async with (
                member(f"ws://127.0.0.1:{match.group(1)}/ws") as alice,
                open_emitter(f"zmq://127.0.0.1:{proxy_port}") as emitter,
            ):
                await alice.join(room)
                for number in range(1, 4):
                    assert await emitter.publish(room, number) == number
                assert await alice.messages(3) == [(n, n) for n in range(1, 4)]
                relay.reset_all(hold=True)
                for number in range(4, 9):  # published while the worker cannot hear them
                    assert await emitter.publish(room, number) == number
                relay.let_through()

                # The worker is back once it hears the room again: publish until it does.
                async def publish_until_heard(heard: trio.Event) -> None:
                    for attempt in range(200):
                        if heard.is_set():
                            return
                        await emitter.publish(room, ["after", attempt])
                        await trio.sleep(0.05)

                heard = trio.Event()
                async with trio.open_nursery() as publishing:
                    publishing.start_soon(publish_until_heard, heard)
                    received = await alice.messages(6)
                    heard.set()
                # What it missed came first, then the next one: every offset, once, in order.
                assert received[:5] == [(n, n) for n in range(4, 9)]
                assert received[5] == (9, ["after", 0])
            await trio.to_thread.run_sync(worker.wait_for_log, r"missed offsets 4 to \d+")
            nursery.cancel_scope.cancel()
    finally:
        if worker is not None:
            worker.stop()
        proxy.stop()


class Sequencer:
    """A backplane server this test may restart: a `trio-fanout proxy`, or a redis-server that
    keeps nothing on disk; either way its rooms' numbering and history die with it."""

    def __init__(self, kind: str, directory: str) -> None:
        self.kind, self.directory, self.port = kind, directory, free_port()
        self.process = self._start()
        self.url = f"{kind}://127.0.0.1:{self.port}"

    def _start(self) -> LoggedProcess:
        if self.kind == "zmq":
            return start_proxy(self.port)
        return RedisServer(self.directory, port=self.port)

    def restart(self) -> None:
        self.process.stop()
        self.process = self._start()


@pytest.mark.parametrize("kind", ["zmq", "redis"])
async def test_a_restarted_sequencer_starts_new_epochs_that_members_and_rejoins_are_told_of(
    kind: str, tmp_path: Path
) -> None:
    sequencer = Sequencer(kind, str(tmp_path))
    worker = LoggedProcess(
        trio_fanout_command("worker", "--port", "0", "--backplane", sequencer.url)
    )
    try:
        match = worker.wait_for_log(r"serving ws://127\.0\.0\.1:(\d+)/ws")
        url = f"ws://127.0.0.1:{match.group(1)}/ws"
        room = fresh_room()
        async with member(url) as alice, open_emitter(sequencer.url) as emitter:
            old = await alice.join(room)
            for number in range(3):
                await emitter.publish(room, number)
            assert [offset for offset, _ in await alice.messages(3)] == [1, 2, 3]

            sequencer.restart()

            async def keep_publishing() -> None:
                for number in range(10_000):
                    with contextlib.suppress(BackplaneUnavailable):
                        await emitter.publish(room, ["after", number])
                    await trio.sleep(0.02)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_publishing)
                notice = await alice.next_frame()  # within RECEIVE_TIMEOUT of the restart
                assert notice["type"] == "joined" and "id" not in notice, notice
                assert notice["epoch"] != old["epoch"] and notice["recovered"] is False
                ((offset, data),) = await alice.messages(1)
                assert offset == notice["offset"] + 1 and data[0] == "after"
                async with member(url) as bob:
                    since = {"epoch": old["epoch"], "offset": 3}
                    joined = await bob.join(room, since)
                    assert joined["recovered"] is False
                    assert joined["epoch"] == notice["epoch"]
                nursery.cancel_scope.cancel()
    finally:
        worker.stop()
        sequencer.process.stop()


async def test_a_join_of_a_room_already_joined_sends_what_since_asks_for_again() -> None:
    room = fresh_room()
    async with worker_in_process(HistoryPolicy(size=3)) as (url, _), member(url) as alice:
        first = await alice.join(room)
        epoch = first["epoch"]
        for data in ("one", "two", "three", "four"):
            await alice.publish(room, data)
        assert await alice.messages(4) == [(1, "one"), (2, "two"), (3, "three"), (4, "four")]
        # Without since: where the room stands, nothing else.
        plain = await alice.join(room)
        assert (plain["offset"], "recovered" in plain) == (4, False)
        # Where it stands: recovered, and nothing to send again.
        again = await alice.join(room, {"epoch": epoch, "offset": 4})
        assert (again["offset"], again["recovered"]) == (4, True)
        # Further back, within what is kept: sent again, in order.
        behind = await alice.join(room, {"epoch": epoch, "offset": 1})
        assert (behind["offset"], behind["recovered"]) == (4, True)
        assert await alice.messages(3) == [(2, "two"), (3, "three"), (4, "four")]
        # Older than what is kept, or of another epoch: nothing old, where it stands.
        for since in ({"epoch": epoch, "offset": 0}, {"epoch": "0123456789abcdef", "offset": 4}):
            lost = await alice.join(room, since)
            assert (lost["epoch"], lost["offset"], lost["recovered"]) == (epoch, 4, False)
        await alice.publish(room, "five")
        assert await alice.messages(1) == [(5, "five")]  # still a member, once
        assert alice.unread == 0


async def test_history_is_subject_to_the_authorize_join_hook() -> None:
    async def authorize_join(identity: object, room: str) -> bool:
        return not room.startswith("secret")

    config = Config(
        host="127.0.0.1",
        port=0,
        heartbeat_interval=0,
        backplane=f"memory://hooks-{os.getpid()}",
    )
    async with trio.open_nursery() as nursery:
        worker = await nursery.start(
            functools.partial(serve, config, hooks=Hooks(authorize_join=authorize_join))
        )
        url = f"ws://127.0.0.1:{worker.port}/ws"
        async with member(url) as alice:
            refused = await alice.request({"type": "history", "room": "secret-1"})
            assert (refused["type"], refused["code"]) == ("error", "forbidden")
            allowed = await alice.request({"type": "history", "room": "open-1"})
            assert allowed["type"] == "history"
        worker.stop()


async def test_a_history_answer_is_bounded_in_bytes_and_pages_with_since() -> None:
    room, big = fresh_room(), "x" * 60_000  # 20 of these are 1.2 MB: more than one answer
    async with worker_in_process(HistoryPolicy()) as (url, _), member(url) as alice:
        for number in range(20):
            await alice.publish(room, [number, big])
        newest = await alice.request({"type": "history", "room": room})
        kept = [m["offset"] for m in newest["messages"]]
        assert len(kept) * 60_000 <= HISTORY_ANSWER_MAX_BYTES < (len(kept) + 1) * 60_000
        assert kept == list(range(21 - len(kept), 21))  # the newest, oldest first
        since = {"epoch": newest["epoch"], "offset": 0}
        pages: list[int] = []
        while len(pages) < 20:
            page = await alice.request({"type": "history", "room": room, "since": since})
            assert page["messages"], page["offset"]
            pages += [m["offset"] for m in page["messages"]]
            since = {"epoch": page["epoch"], "offset": pages[-1]}
        assert pages == list(range(1, 21))
