"""Idle connections held without a task (trio_fanout/parking.py): one worker in this process on
a memory backplane, real sockets, real clients. The idle time before a connection is parked is
shortened here so that the tests do not wait for it; everything a client can do must work the
same whether its connection is parked or not."""

from __future__ import annotations

import gc
import socket
import struct

import pytest
import trio

from tests.helpers import RECEIVE_TIMEOUT, receive_data
from tests.test_tls import ServerFiles, tls_worker
from tests.test_worker import (
    RawClient,
    close_code,
    outrun_a_stopped_reader,
    publish_from_outside,
    running_worker,
)
from trio_fanout import Config, Worker, connection, parking
from trio_fanout.backplane import open_backplane
from trio_fanout.client import open_client
from trio_fanout.runner import open_listener


@pytest.fixture(autouse=True)
def park_soon(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parking, "PARK_AFTER", 0.05)


async def all_parked(worker: Worker, count: int) -> None:
    """Wait until ``count`` connections are parked."""
    with trio.fail_after(RECEIVE_TIMEOUT):
        while len(worker.parked) < count:  # noqa: ASYNC110 - parking sets no event
            await trio.sleep(0.01)


async def test_a_parked_connection_receives_publishes_and_parks_again():
    async with (
        running_worker() as (worker, url),
        open_client(url) as member,
        open_client(url) as other,
    ):
        await member.join("news")
        await other.join("news")
        await all_parked(worker, 2)
        await publish_from_outside(worker, "news", "to the parked")
        assert await receive_data(member, 1) == ["to the parked"]
        assert await receive_data(other, 1) == ["to the parked"]
        # Its frames wake it: a publish is acknowledged, a join answered.
        await member.publish("news", "from the parked", echo=False, ack=True)
        assert await receive_data(other, 1) == ["from the parked"]
        await member.join("sport")
        await all_parked(worker, 2)
        await publish_from_outside(worker, "sport", "again")
        assert await receive_data(member, 1) == ["again"]


async def test_a_frame_split_across_a_park_is_read_whole(monkeypatch):
    # Long enough an idle time for this test to see the connection woken between two parks.
    monkeypatch.setattr(parking, "PARK_AFTER", 0.3)
    async with running_worker() as (worker, url):
        raw = await RawClient.connect(url)
        await all_parked(worker, 1)
        frame = RawClient.masked_frame(0x1, b'{"type":"join","room":"split","id":7}')
        await raw.stream.send_all(frame[:9])
        with trio.fail_after(RECEIVE_TIMEOUT):
            while len(worker.parked):  # noqa: ASYNC110 - woken by those bytes
                await trio.sleep(0.01)
        await all_parked(worker, 1)  # and parked again, half a frame read
        await raw.stream.send_all(frame[9:])
        joined = await raw.receive_json()
        assert (joined["type"], joined["room"], joined["id"]) == ("joined", "split", 7)
        await raw.stream.aclose()


@pytest.mark.parametrize("how", ["close frame", "end of stream", "reset"])
async def test_a_parked_client_that_goes_away_leaves_its_rooms(how: str):
    async with running_worker() as (worker, url):
        raw = await RawClient.connect(url)
        await raw.send_frame(0x1, b'{"type":"join","room":"brief"}')
        assert (await raw.receive_json())["type"] == "joined"
        await all_parked(worker, 1)
        if how == "close frame":
            await raw.send_frame(0x8, struct.pack("!H", 1000))
        elif how == "reset":
            raw.stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await raw.stream.aclose()
        with trio.fail_after(RECEIVE_TIMEOUT):
            while worker.rooms or worker.connections:  # noqa: ASYNC110 - no event for this
                await trio.sleep(0.01)
        assert len(worker.parked) == 0


async def test_stopping_the_worker_closes_parked_clients_with_1001():
    async with running_worker() as (worker, url), open_client(url) as member:
        await member.join("lobby")
        await all_parked(worker, 1)
        worker.stop()
        assert await close_code(member) == 1001


async def test_cancelling_the_worker_hangs_up_on_parked_clients():
    listener = open_listener("127.0.0.1", 0)
    port = listener.getsockname()[1]
    async with (
        open_backplane("memory://parking-cancel") as backplane,
        trio.open_nursery() as nursery,
    ):
        worker = Worker(Config(heartbeat_interval=0), backplane)
        await nursery.start(worker.serve, listener)
        raw = await RawClient.connect(f"ws://127.0.0.1:{port}/ws")
        await raw.send_frame(0x1, b'{"type":"join","room":"kept"}')
        assert (await raw.receive_json())["type"] == "joined"
        await all_parked(worker, 1)
        assert list(worker.rooms) != []
        nursery.cancel_scope.cancel()  # no graceful stop: the worker's task just ends
    listener.close()
    with trio.fail_after(RECEIVE_TIMEOUT):
        assert await raw.stream.receive_some() == b""
    await raw.stream.aclose()
    assert worker.connections == {}
    assert worker.rooms == {}
    assert worker.handshakes == 0  # every socket released
    assert worker.queued_bytes == 0


async def test_a_parked_client_that_stops_reading_is_closed_1013(monkeypatch):
    monkeypatch.setattr(connection, "CLOSE_TIMEOUT", 60.0)
    async with (
        running_worker(max_queued_frames=50) as (worker, url),
        open_client(url) as slow,
        open_client(url) as fast,
    ):
        await slow.join("news")
        await fast.join("news")
        await all_parked(worker, 2)
        await outrun_a_stopped_reader(worker, "news", fast)
        assert await close_code(slow) == 1013


async def test_a_close_frame_to_a_parked_connection_is_answered():
    async with running_worker() as (worker, url):
        raw = await RawClient.connect(url)
        await all_parked(worker, 1)
        await raw.send_frame(0x8, struct.pack("!H", 1000))
        opcode, payload = await raw.receive_frame()
        assert (opcode, struct.unpack("!H", payload[:2])[0]) == (0x8, 1000)
        await raw.stream.aclose()


async def test_parking_and_waking_leave_no_cycles_behind():
    # Workers freeze what survives the young collections (trio_fanout/gcstats.py), so a task
    # that ends by parking must leave nothing for the cycle collector, as a closing one does.
    async with running_worker() as (worker, url), open_client(url) as member:
        await member.join("cycle")
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for number in range(20):
                await all_parked(worker, 1)
                await member.publish("cycle", number, ack=True)
                assert await receive_data(member, 1) == [number]
            await all_parked(worker, 1)
            gc.collect()
            assert [o for o in gc.garbage if isinstance(o, trio.CancelScope | trio.Nursery)] == []
        finally:
            gc.set_debug(0)
            gc.garbage.clear()


async def test_a_parked_client_whose_socket_filled_gets_everything_once_it_reads():
    # Frames for a parked client whose socket is full wait in its queue: the connection gets a
    # task back to write them as the socket drains, with nothing more published meanwhile.
    async with running_worker() as (worker, url):
        raw = await RawClient.connect(url)
        await raw.send_frame(0x1, b'{"type":"join","room":"burst"}')
        assert (await raw.receive_json())["type"] == "joined"
        await all_parked(worker, 1)
        (conn,) = worker.connections.values()
        payload = "x" * 65536
        count = 0
        with trio.fail_after(RECEIVE_TIMEOUT):
            while not conn.queued_bytes:  # the client reads nothing: its socket fills
                await publish_from_outside(worker, "burst", [count, payload])
                count += 1
        for expected in range(count):
            message = await raw.receive_json()
            assert message["data"] == [expected, payload]
        await raw.stream.aclose()


async def test_a_handshake_slower_than_the_idle_time_is_not_cut_short():
    async with running_worker() as (worker, url):
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /ws HTTP/1.1\r\nHost: test\r\n")
        await trio.sleep(parking.PARK_AFTER * 4)  # longer than the idle time, on purpose
        assert len(worker.parked) == 0
        await stream.send_all(
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        raw = RawClient(stream)
        assert (await raw._read_until(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
        assert (await raw.receive_json())["type"] == "welcome"
        await stream.aclose()


async def test_waking_a_parked_connection_twice_starts_one_task():
    async with running_worker() as (worker, url), open_client(url) as member:
        await member.join("twice")
        await all_parked(worker, 1)
        (conn,) = worker.connections.values()
        worker.wake(conn)
        worker.wake(conn)  # nothing more: it is no longer parked
        # One task reads: two would fail with Trio's BusyResourceError on the socket.
        await member.publish("twice", "one", ack=True)
        assert await receive_data(member, 1) == ["one"]
        await all_parked(worker, 1)


async def test_a_parked_connection_without_a_token_is_closed_4001(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s" * 32)
    async with running_worker(token_secret_file=str(secret), handshake_timeout=0.5) as (
        worker,
        url,
    ):
        raw = await RawClient.connect(url)
        await all_parked(worker, 1)
        opcode, payload = await raw.receive_frame()
        assert (opcode, struct.unpack("!H", payload[:2])[0]) == (0x8, 4001)
        await raw.stream.aclose()


async def test_a_parked_connection_over_tls_is_served(tmp_path):
    files = ServerFiles.issue(tmp_path)
    async with (
        tls_worker(files) as (worker, url),
        open_client(url, ssl_context=files.client_context()) as member,
    ):
        await member.join("secure")
        await all_parked(worker, 1)
        await publish_from_outside(worker, "secure", "sealed")
        assert await receive_data(member, 1) == ["sealed"]
        await member.publish("secure", "back", ack=True)
        assert await receive_data(member, 1) == ["back"]
