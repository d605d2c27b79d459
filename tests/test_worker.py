"""One worker in this process on a memory backplane, with real sockets and real clients: the
per-connection limits and the edges of the WebSocket protocol that need a raw socket to reach."""

from __future__ import annotations

import gc
import itertools
import json
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio_websocket

from tests.helpers import RECEIVE_TIMEOUT, receive_data
from trio_fanout import Config, Worker, connection, envelope, protocol
from trio_fanout.backplane import open_backplane
from trio_fanout.client import Client, ServerError, open_client
from trio_fanout.runner import open_listener
from trio_fanout.worker import ROOMS_LEFT_PER_TURN

_names = itertools.count()


@asynccontextmanager
async def running_worker(**settings: object) -> AsyncIterator[tuple[Worker, str]]:
    """A worker on a fresh memory backplane; yields it and its WebSocket URL."""
    config = Config(heartbeat_interval=0, **settings)
    listener = open_listener("127.0.0.1", 0)
    url = f"memory://worker-test-{os.getpid()}-{next(_names)}"
    async with open_backplane(url) as backplane, trio.open_nursery() as nursery:
        worker = Worker(config, backplane)
        await nursery.start(worker.serve, listener)
        yield worker, f"ws://127.0.0.1:{listener.getsockname()[1]}/ws"
        worker.stop()
    listener.close()


class RawClient:
    """A WebSocket client written by hand, to send what well-behaved libraries refuse to."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    @classmethod
    async def connect(cls, url: str) -> RawClient:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        client = cls(await trio.open_tcp_stream("127.0.0.1", port))
        await client.stream.send_all(
            b"GET /ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        head = await client._read_until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        assert (await client.receive_json())["type"] == "welcome"
        return client

    async def _read_until(self, marker: bytes) -> bytes:
        with trio.fail_after(RECEIVE_TIMEOUT):
            while marker not in self.buffer:
                chunk = await self.stream.receive_some()
                assert chunk, "the server closed the connection"
                self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    async def _read_exactly(self, count: int) -> bytes:
        with trio.fail_after(RECEIVE_TIMEOUT):
            while len(self.buffer) < count:
                chunk = await self.stream.receive_some()
                assert chunk, "the server closed the connection"
                self.buffer += chunk
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    async def send_frame(self, opcode: int, payload: bytes, *, fin: bool = True) -> None:
        await self.stream.send_all(self.masked_frame(opcode, payload, fin=fin))

    @staticmethod
    def masked_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
        mask = os.urandom(4)
        length = len(payload)
        first = (0x80 if fin else 0) | opcode
        if length < 126:
            header = struct.pack("!BB", first, 0x80 | length)
        elif length < 65536:
            header = struct.pack("!BBH", first, 0x80 | 126, length)
        else:
            header = struct.pack("!BBQ", first, 0x80 | 127, length)
        masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
        return header + mask + masked

    async def receive_frame(self) -> tuple[int, bytes]:
        first, second = await self._read_exactly(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self._read_exactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await self._read_exactly(8))
        return first & 0x0F, await self._read_exactly(length)

    async def receive_json(self) -> dict:
        opcode, payload = await self.receive_frame()
        assert opcode == 0x1, (opcode, payload)
        return json.loads(payload)


async def publish_from_outside(worker: Worker, room: str, data: object) -> None:
    """Publish as an emitter would: straight onto the worker's backplane."""
    topic = envelope.room_topic(room)
    frame = protocol.message_frame(room, data)
    await worker.backplane.publish(topic, envelope.Numberer().wrap(topic, frame))


async def outrun_a_stopped_reader(worker: Worker, room: str, reader: Client) -> None:
    """Publish 1,500 frames of 16 KiB to ``room``, 50 at a time, which ``reader`` takes as they
    come: far more than the kernel buffers of a member that stopped reading can absorb, so its
    queue passes 50 frames behind a full socket."""
    payload = "x" * 16384
    numberer = envelope.Numberer()
    topic = envelope.room_topic(room)
    for first in range(0, 1500, 50):
        for number in range(first, first + 50):
            frame = protocol.message_frame(room, [number, payload])
            await worker.backplane.publish(topic, numberer.wrap(topic, frame))
        received = await receive_data(reader, 50)
        assert [number for number, _ in received] == list(range(first, first + 50))


async def close_code(client: Client) -> int:
    """Read what ``client`` still receives until the server closes it; the close code."""
    with (
        trio.fail_after(RECEIVE_TIMEOUT),
        pytest.raises(trio_websocket.ConnectionClosed) as closed,
    ):
        while True:
            await client.receive()
    code: int = closed.value.reason.code
    return code


async def test_a_slow_client_is_closed_1013_and_nobody_else_waits(monkeypatch):
    # Keep the cut connection around long enough for this test to read up to its close frame.
    monkeypatch.setattr(connection, "CLOSE_TIMEOUT", 60.0)
    async with (
        running_worker(max_queued_frames=50) as (worker, url),
        open_client(url) as slow,
        open_client(url) as fast,
    ):
        await slow.join("news")
        await fast.join("news")
        await outrun_a_stopped_reader(worker, "news", fast)
        assert await close_code(slow) == 1013


async def test_a_client_receiving_a_stream_gets_it_complete_in_few_writes():
    # 300 messages in a burst to one member, with a write delay of 50 ms: it receives all of
    # them in order, and the worker wrote them in far fewer sends than frames (each write
    # after the first waits up to 50 ms for more).
    async with (
        running_worker(write_delay=0.05) as (worker, url),
        open_client(url) as member,
        open_client(url) as publisher,
    ):
        await member.join("stream")
        sends_before, frames_before = worker.sends, worker.frames_sent
        for number in range(300):
            await publisher.publish("stream", number)
        assert await receive_data(member, 300) == list(range(300))
        sends = worker.sends - sends_before
        frames = worker.frames_sent - frames_before
        assert frames >= 300
        assert sends * 3 <= frames, (sends, frames)


async def test_frames_past_the_rate_get_rate_limited_and_abuse_is_closed_1008():
    async with (
        running_worker(rate_limit_per_second=1, rate_limit_burst=20) as (_, url),
        open_client(url) as client,
    ):
        for _ in range(25):
            await client.send({"type": "ping"})
        with trio.fail_after(RECEIVE_TIMEOUT):
            replies = [await client.receive() for _ in range(25)]
        assert [reply["type"] for reply in replies] == ["pong"] * 20 + ["error"] * 5
        assert {reply.get("code") for reply in replies[20:]} == {"rate_limited"}
        for _ in range(connection.ABUSE_REFUSALS):
            await client.send({"type": "ping"})
        with (
            trio.fail_after(RECEIVE_TIMEOUT),
            pytest.raises(trio_websocket.ConnectionClosed) as closed,
        ):
            while True:
                await client.receive()
        assert closed.value.reason.code == 1008


async def test_a_join_past_the_room_limit_is_refused():
    async with running_worker(max_rooms_per_connection=3) as (_, url), open_client(url) as client:
        for room in ("a", "b", "c"):
            await client.join(room)
        with pytest.raises(ServerError) as refused:
            await client.join("d")
        assert refused.value.code == "too_many_rooms"
        await client.join("a")  # joining a room one is in is not a new room
        await client.leave("c")
        await client.join("d")


async def test_a_join_past_the_worker_room_limit_is_refused_unless_the_room_exists(caplog):
    async with (
        running_worker(max_rooms_per_worker=3) as (worker, url),
        open_client(url) as first,
        open_client(url) as second,
    ):
        for room in ("a", "b"):
            await first.join(room)
        await second.join("c")
        with pytest.raises(ServerError) as refused:
            await second.join("d")
        assert refused.value.code == "too_many_rooms"
        assert "this worker is at its limit of 3 rooms" in str(refused.value)
        await second.join("a")  # a room the worker has costs nothing more
        assert len(worker.rooms) == 3
        await first.leave("b")
        await second.join("d")
    assert any(
        "max_rooms_per_worker (3): 1 joins refused" in r.getMessage() for r in caplog.records
    )


async def test_a_closing_connection_leaves_its_rooms_a_few_at_a_time():
    """A connection in many rooms that closes lets the loop's other tasks run while it leaves
    them: thousands closing at once must not keep the loop (and its answers to the master's
    liveness pings) for the sum of all their leaves."""
    rooms = [f"room-{number}" for number in range(100)]
    async with running_worker() as (worker, url), trio.open_nursery() as nursery:
        turns = 0

        async def another_task() -> None:
            nonlocal turns
            while True:
                await trio.lowlevel.checkpoint()
                turns += 1

        turns_at_leaves: list[int] = []
        leave = worker.leave

        def leave_and_note(conn, room_name: str) -> None:
            leave(conn, room_name)
            turns_at_leaves.append(turns)

        worker.leave = leave_and_note  # type: ignore[method-assign]
        async with open_client(url) as client:
            for room in rooms:
                await client.join(room)
            nursery.start_soon(another_task)
        with trio.fail_after(RECEIVE_TIMEOUT):
            while worker.rooms:  # noqa: ASYNC110 - no event for "left"
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert len(turns_at_leaves) == len(rooms)
    # The other task ran within every two turns of ROOMS_LEFT_PER_TURN leaves (within one, it
    # may have run just before the first and just after the second: Trio orders a batch freely).
    span = 2 * ROOMS_LEFT_PER_TURN
    assert all(
        turns_at_leaves[index + span] > turns_at_leaves[index] for index in range(len(rooms) - span)
    )


async def test_a_fragmented_message_with_a_ping_inside_over_a_raw_socket():
    async with running_worker() as (_, url):
        raw = await RawClient.connect(url)
        await raw.send_frame(0x1, b'{"type":', fin=False)
        await raw.send_frame(0x9, b"are you there")
        await raw.send_frame(0x0, b'"ping",', fin=False)
        await raw.send_frame(0x0, b'"id":2}')
        assert await raw.receive_frame() == (0xA, b"are you there")
        assert await raw.receive_json() == {"type": "pong", "id": 2}
        await raw.stream.aclose()


async def test_invalid_utf8_closes_1007_before_the_rest_of_the_frame_arrives():
    async with running_worker() as (_, url):
        # One text frame of 100 bytes whose first 9 arrive: a code point, then a byte that no
        # valid UTF-8 can continue (F4 90 would be past U+10FFFF). RFC 6455 section 8.1: fail.
        raw = await RawClient.connect(url)
        frame = raw.masked_frame(0x1, "\u03ba\u1f79".encode() + b"\xf4\x90" + b"x" * 93)
        await raw.stream.send_all(frame[: 6 + 9])
        opcode, payload = await raw.receive_frame()
        assert (opcode, struct.unpack("!H", payload[:2])[0]) == (0x8, 1007)
        await raw.stream.aclose()

        # A message whose last fragment ends inside a code point is invalid too.
        raw = await RawClient.connect(url)
        await raw.send_frame(0x1, b'{"type":"ping","x":"', fin=False)
        await raw.send_frame(0x0, b'\xc3\xa9"}\xe2\x82')
        opcode, payload = await raw.receive_frame()
        assert (opcode, struct.unpack("!H", payload[:2])[0]) == (0x8, 1007)
        await raw.stream.aclose()

        async with open_client(url) as client:  # the worker is fine
            await client.ping()


async def test_pings_during_the_close_handshake_do_not_hurt_the_worker():
    # trio-websocket's server crashes when a ping arrives while it closes (its issue #184).
    async with running_worker() as (_, url):
        raw = await RawClient.connect(url)
        await raw.send_frame(0x8, struct.pack("!H", 1000))
        await raw.send_frame(0x9, b"late ping")
        opcode, payload = await raw.receive_frame()
        assert (opcode, struct.unpack("!H", payload[:2])[0]) == (0x8, 1000)
        await raw.stream.aclose()

        raw = await RawClient.connect(url)
        await raw.send_frame(0x1, b"x" * (64 * 1024 + 1))
        assert (await raw.receive_json())["code"] == "too_large"
        await raw.send_frame(0x9, b"ping while closing")
        opcode, payload = await raw.receive_frame()
        assert (opcode, struct.unpack("!H", payload[:2])[0]) == (0x8, 1009)
        await raw.stream.aclose()

        async with open_client(url) as client:
            await client.ping()


async def test_a_client_that_never_finishes_the_handshake_is_dropped():
    async with running_worker(handshake_timeout=0.5) as (_, url):
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        for opening in (b"", b"GET /ws HTTP/1.1\r\nHost: x\r\n"):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(opening)
                with trio.fail_after(RECEIVE_TIMEOUT):
                    assert await stream.receive_some() == b""


async def test_a_room_is_dropped_when_its_last_member_leaves_or_disconnects():
    async with running_worker() as (worker, url):
        async with open_client(url) as stays, open_client(url) as goes:
            await stays.join("room")
            await goes.join("room")
            await stays.leave("room")
            assert json.loads(worker.health()[1])["rooms"] == 1
        # The server finishes its side of the close after the client's close returns, and
        # offers no event for it: poll, bounded.
        with trio.fail_after(RECEIVE_TIMEOUT):
            while worker.connections:  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert json.loads(worker.health()[1])["rooms"] == 0
        async with open_client(url) as newcomer:
            await newcomer.join("room")
            await publish_from_outside(worker, "room", "fresh subscription works")
            assert await receive_data(newcomer, 1) == ["fresh subscription works"]


async def test_joiners_of_a_room_being_subscribed_wait_for_its_subscription(monkeypatch):
    # The memory backplane answers a subscription before a second joiner can arrive: it is held
    # at a gate here to open that window, which a slow backplane opens on its own.
    async with running_worker() as (worker, url):
        gate = trio.Event()
        subscribe = worker.backplane.subscribe
        subscribed: list[bytes] = []

        async def subscribe_once_the_gate_opens(topic: bytes) -> None:
            await gate.wait()
            subscribed.append(topic)
            await subscribe(topic)

        monkeypatch.setattr(worker.backplane, "subscribe", subscribe_once_the_gate_opens)
        async with open_client(url) as first, open_client(url) as second:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(first.join, "room")
                nursery.start_soon(second.join, "room")
                with trio.fail_after(RECEIVE_TIMEOUT):
                    while True:
                        room = worker.rooms.get(envelope.room_topic("room"))
                        event = room.subscribing if room else None
                        if event is not None and event.statistics().tasks_waiting == 1:
                            break
                        await trio.sleep(0.01)
                assert not room.members  # nobody is in before the subscription is live
                gate.set()
            assert subscribed == [envelope.room_topic("room")]  # one subscription for both
            assert room.subscribing is None  # no event is kept for the room's life
            await publish_from_outside(worker, "room", "both")
            assert await receive_data(first, 1) == ["both"]
            assert await receive_data(second, 1) == ["both"]


async def test_debug_logging_shows_the_path_of_a_message(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG, logger="trio_fanout")
    async with running_worker() as (_, url), open_client(url) as client:
        await client.join("traced")
        await client.publish("traced", "hello", ack=True)
        assert await receive_data(client, 1) == ["hello"]
    path = [record.getMessage() for record in caplog.records]
    steps = [
        "received Publish(room='traced', data='hello'",
        "published room='traced' epoch=",
        "delivered room='traced' epoch=",
    ]
    positions = [next(i for i, line in enumerate(path) if step in line) for step in steps]
    assert positions == sorted(positions)
    assert path[positions[-1]].endswith(" to 1 connections")


async def test_a_closed_connection_leaves_no_cycles_behind():
    # Workers freeze long-lived objects out of the GC's sight (trio_fanout/gcstats.py); that is
    # safe because a connection's objects are freed by reference counting when it closes.
    async with running_worker() as (worker, url):
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for number in range(50):
                async with open_client(url) as client:
                    await client.join(f"room-{number % 3}")
                    await client.publish(f"room-{number % 3}", number, ack=True)
                    await client.receive()
            with trio.fail_after(RECEIVE_TIMEOUT):
                while worker.connections:  # noqa: ASYNC110 - no event for "connection gone"
                    await trio.sleep(0.01)
            gc.collect()
            ours = (connection.Connection, connection.RateLimiter, socket.socket)
            assert [o for o in gc.garbage if isinstance(o, ours)] == []
        finally:
            gc.set_debug(0)
            gc.garbage.clear()


async def test_a_flush_while_a_connection_is_ending_does_not_stop_the_worker():
    # A connection's nursery closes when its last task ends, and its serve() resumes a moment
    # later: a deferred flush that finds the socket full in between could not start a writer,
    # and its RuntimeError used to stop the whole worker. The scheduling race cannot be forced
    # from outside, so this test puts the connection in that moment by hand: its nursery closed,
    # frames pending, its socket full.
    async with running_worker() as (worker, url), open_client(url) as bystander:
        raw = await RawClient.connect(url)
        await raw.send_frame(0x1, b'{"type":"join","room":"full","id":1}')
        assert (await raw.receive_json())["type"] == "joined"
        (conn,) = (c for c in worker.connections.values() if "full" in c.rooms)
        payload = "x" * 65536
        with trio.fail_after(RECEIVE_TIMEOUT):
            while not conn.queued_bytes:  # the raw client reads nothing: its socket fills
                await publish_from_outside(worker, "full", payload)
                await trio.sleep(0.01)
        async with trio.open_nursery() as closed_nursery:
            pass
        # The writer that waits for the full socket is running: in that moment it has ended.
        assert conn._writer_running
        live_nursery, conn._nursery = conn._nursery, closed_nursery
        conn._writer_running = False
        try:
            conn.enqueue(protocol.message_frame("full", "one more"))
            conn.flush()  # must neither raise nor leave a writer marked as running
            assert not conn._writer_running
        finally:
            conn._nursery, conn._writer_running = live_nursery, True
        await bystander.join("elsewhere")
        await bystander.publish("elsewhere", "still served")
        assert await receive_data(bystander, 1) == ["still served"]
        await raw.stream.aclose()
