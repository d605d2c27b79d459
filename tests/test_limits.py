"""What one client can cost a worker, with real sockets: bytes queued for a client that stops
reading, handshakes that never end, connections past the worker's limits, and requests that are
not HTTP at all. Most tests run a worker in this process (``running_worker``); the burst test runs
a real worker process, whose memory is what the bound protects."""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import struct
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from tests.helpers import RECEIVE_TIMEOUT, ClusterProcess, LoggedProcess, receive_data
from tests.test_worker import publish_from_outside, running_worker
from trio_fanout import connection
from trio_fanout.client import open_client
from trio_fanout.emitter import open_emitter
from trio_fanout.worker import ACCEPT_CAPACITY_PAUSE

UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)

# A receive buffer far smaller than what is sent: with it, a client that stops reading fills
# its socket after a few KiB (the kernel doubles the value and keeps a minimum of its own).
SMALL_RECEIVE_BUFFER = 4096

OP_TEXT, OP_CLOSE = 0x1, 0x8


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


class RawClient:
    """A WebSocket client on a bare TCP socket, so that a test decides when (and whether) it
    reads, and how large its receive buffer is."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buffer = bytearray()
        self._position = 0  # frames before it have been taken from _buffer

    @classmethod
    async def connect(
        cls,
        port: int,
        *,
        receive_buffer: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> RawClient:
        sock = trio.socket.socket()
        if receive_buffer is not None:
            # Before connecting, so that the window the client announces is small from the start.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        await sock.connect(("127.0.0.1", port))
        stream: trio.abc.Stream = trio.SocketStream(sock)
        if ssl_context is not None:  # wss://
            stream = trio.SSLStream(stream, ssl_context, server_hostname="127.0.0.1")
        client = cls(stream)
        await client.stream.send_all(UPGRADE)
        with trio.fail_after(RECEIVE_TIMEOUT):
            while b"\r\n\r\n" not in client._buffer:
                client._buffer += await client._receive_some()
        head, _, rest = bytes(client._buffer).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        client._buffer = bytearray(rest)
        assert (await client.receive_json())["type"] == "welcome"
        return client

    async def _receive_some(self) -> bytes:
        chunk = await self.stream.receive_some(1 << 20)
        assert chunk, "the server closed the connection"
        return chunk

    async def send_json(self, obj: object) -> None:
        payload = json.dumps(obj).encode()
        mask = os.urandom(4)
        assert len(payload) < 126
        masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
        await self.stream.send_all(bytes((0x80 | OP_TEXT, 0x80 | len(payload))) + mask + masked)

    async def join(self, room: str) -> None:
        await self.send_json({"type": "join", "room": room})
        joined = await self.receive_json()
        assert (joined["type"], joined["room"]) == ("joined", room), joined

    def _take_frame(self) -> tuple[int, bytes] | None:
        buffer, start = self._buffer, self._position
        if len(buffer) - start < 2:
            return None
        length, header = buffer[start + 1] & 0x7F, 2
        if length == 126:
            if len(buffer) - start < 4:
                return None
            (length,) = struct.unpack_from("!H", buffer, start + 2)
            header = 4
        elif length == 127:
            if len(buffer) - start < 10:
                return None
            (length,) = struct.unpack_from("!Q", buffer, start + 2)
            header = 10
        end = start + header + length
        if len(buffer) < end:
            return None
        frame = (buffer[start] & 0x0F, bytes(buffer[start + header : end]))
        self._position = end
        if end > len(buffer) // 2:
            del buffer[:end]
            self._position = 0
        return frame

    async def receive_frame(self) -> tuple[int, bytes]:
        with trio.fail_after(RECEIVE_TIMEOUT):
            while (frame := self._take_frame()) is None:
                self._buffer += await self._receive_some()
        return frame

    async def receive_json(self) -> dict:
        opcode, payload = await self.receive_frame()
        assert opcode == OP_TEXT, (opcode, payload[:100])
        return json.loads(payload)

    async def frames_until_closed(self) -> list[tuple[int, bytes]]:
        """Every frame still to come, until the server ends the TCP connection."""
        frames = []
        with trio.fail_after(RECEIVE_TIMEOUT):
            while True:
                while (frame := self._take_frame()) is not None:
                    frames.append(frame)
                try:
                    chunk = await self.stream.receive_some(1 << 20)
                except trio.BrokenResourceError:  # reset: the server gave up on us
                    return frames
                if not chunk:
                    return frames
                self._buffer += chunk


def close_code(frame: tuple[int, bytes]) -> int | None:
    opcode, payload = frame
    return struct.unpack("!H", payload[:2])[0] if opcode == OP_CLOSE else None


async def http_get(port: int, head: bytes) -> bytes:
    """Send ``head`` on a new connection; everything the server answers before it closes."""
    with trio.fail_after(RECEIVE_TIMEOUT):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(head)
            answer = b""
            while chunk := await stream.receive_some():
                answer += chunk
            return answer


async def receive_until_closed(stream: trio.SocketStream) -> bytes:
    """What the server sends before it closes the connection; a reset counts as a close (the
    server closed with bytes of ours unread)."""
    received = b""
    with trio.fail_after(RECEIVE_TIMEOUT):
        try:
            while chunk := await stream.receive_some():
                received += chunk
        except trio.BrokenResourceError:
            pass
    return received


HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n"


async def healthz(port: int) -> dict:
    answer = await http_get(port, HEALTHZ)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    return json.loads(answer.partition(b"\r\n\r\n")[2])


# ---- bytes queued for clients that do not read ----------------------------------------------

BURST = 1000
BURST_PAYLOAD = "x" * 65_000
QUEUE_BOUND = 4 * 1024 * 1024  # the default of max_queued_bytes


@asynccontextmanager
async def worker_process(tmp_path: Path, **settings: object) -> AsyncIterator[ClusterProcess]:
    """`trio-fanout run --workers 1`: one real worker process, with ``settings`` in a file."""
    config = tmp_path / "trio-fanout.toml"
    config.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in settings.items()))
    cluster = await trio.to_thread.run_sync(
        lambda: ClusterProcess(
            "--workers", "1", "--heartbeat-interval", "0", "--config", str(config)
        )
    )
    try:
        await trio.to_thread.run_sync(cluster.wait_for_workers, 1)
        yield cluster
    finally:
        await trio.to_thread.run_sync(cluster.stop)


async def test_a_burst_cuts_clients_that_do_not_read_and_reaches_the_one_that_does(tmp_path):
    # max_queued_frames out of the way: only the bound in bytes can cut anyone here, however the
    # burst is split into batches (a batch is joined into one buffer, whatever its frame count).
    # At debug, each cut client has a line of its own.
    async with worker_process(tmp_path, max_queued_frames=10**6, log_level="debug") as cluster:
        stalled = []
        for _ in range(10):
            client = await RawClient.connect(cluster.port, receive_buffer=SMALL_RECEIVE_BUFFER)
            await client.join("burst")
            stalled.append(client)  # from now on, never read
        reader = await RawClient.connect(cluster.port)
        await reader.join("burst")

        # The burst comes in chunks that the reader takes as they come: a client that reads is
        # never cut, since it is never more than a chunk behind (2.6 MB, under the bound). An
        # unpaced burst larger than the bound plus the kernel's buffers can cut a reader that
        # falls behind the worker for a moment: that is the bound doing its job, and a
        # scheduler's whim on a busy machine, so it is left to bench/slow_clients.py.
        chunk = 40
        received: list[int] = []
        peak = 0
        async with open_emitter(cluster.backplane_url) as emitter:
            for first in range(0, BURST, chunk):
                for number in range(first, first + chunk):
                    await emitter.publish("burst", [number, BURST_PAYLOAD])
                for _ in range(chunk):
                    number, payload = (await reader.receive_json())["data"]
                    assert payload == BURST_PAYLOAD
                    received.append(number)
                peak = max(peak, (await healthz(cluster.port))["queued_bytes"])

        assert received == list(range(BURST))  # every message, in order, to the reader
        # Every stalled client was cut: the worker holds the reader alone, and nothing for it
        # once the cut clients' sockets are closed (their close waits CLOSE_TIMEOUT at most).
        with trio.fail_after(RECEIVE_TIMEOUT):
            # Another process: polling its /healthz is the only way to see it.
            while (health := await healthz(cluster.port))["connections"] != 1 or health[  # noqa: ASYNC110
                "queued_bytes"
            ]:
                await trio.sleep(0.05)
        assert cluster.process.poll() is None
        # What the worker held for its clients stayed under 10 bounds; unbounded, the 10
        # stalled clients would each hold the whole burst (650 MB).
        assert peak <= 10 * (QUEUE_BOUND + len(BURST_PAYLOAD) + 100), peak
        # Its log says so, once per stalled client (its stderr is read by a thread: poll it).
        too_slow = re.compile(r"is too slow: \d+ frames, \d+ bytes wait .* closing it 1013")
        with trio.fail_after(RECEIVE_TIMEOUT):
            while len(too_slow.findall(cluster.log())) < 10:  # noqa: ASYNC110
                await trio.sleep(0.05)
        assert len(too_slow.findall(cluster.log())) == 10
        # At info and above, one warning counts them (at most one such line per 10 s).
        assert "WARNING worker 1 (pid" in cluster.log()
        assert "worker 1 closed connections too slow (1013): 1 since the last" in cluster.log()
        # A stalled client, reading at last, finds a prefix of the burst in order, then the end.
        for client in stalled:
            frames = await client.frames_until_closed()
            numbers = [json.loads(p)["data"][0] for op, p in frames if op == OP_TEXT]
            assert numbers == list(range(len(numbers)))
            assert len(numbers) < BURST
            await client.stream.aclose()
        await reader.stream.aclose()


async def test_a_client_that_stops_reading_is_cut_by_the_bytes_bound_alone(monkeypatch):
    # Keep the cut connection around long enough for this test to read up to its close frame.
    monkeypatch.setattr(connection, "CLOSE_TIMEOUT", 60.0)
    bound = 256 * 1024
    async with (
        running_worker(max_queued_bytes=bound, max_queued_frames=10**6) as (worker, url),
        open_client(url) as fast,
    ):
        slow = await RawClient.connect(port_of(url), receive_buffer=SMALL_RECEIVE_BUFFER)
        await slow.join("news")
        await fast.join("news")
        slow_conn = list(worker.connections.values())[-1]  # the last to connect
        payload = "y" * 16_000
        # The slow client reads the first 10 messages, then stops reading for good.
        for number in range(10):
            await publish_from_outside(worker, "news", [number, payload])
        assert await receive_data(fast, 10) == [[number, payload] for number in range(10)]
        for number in range(10):
            assert (await slow.receive_json())["data"] == [number, payload]
        # Then 2,000 more (32 MB), 20 at a time, which the fast client takes as they come.
        for first in range(10, 2010, 20):
            for number in range(first, first + 20):
                await publish_from_outside(worker, "news", [number, payload])
            received = await receive_data(fast, 20)
            assert [number for number, _ in received] == list(range(first, first + 20))
            # Never more than the bound (and the one frame that found the queue over it).
            assert slow_conn.queued_bytes <= bound + 16_100
        frames = await slow.frames_until_closed()
        assert close_code(frames[-1]) == 1013
        numbers = [json.loads(payload)["data"][0] for opcode, payload in frames[:-1]]
        assert numbers == list(range(10, 10 + len(numbers)))
        assert slow_conn.id not in worker.connections
        await slow.stream.aclose()


async def test_healthz_queued_bytes_is_the_total_queued_for_slow_clients():
    # No write delay: a deferred write between the /healthz answer and the sum taken here
    # would change the total in between.
    async with running_worker(max_queued_bytes=1 << 20, max_queued_frames=10**6, write_delay=0) as (
        worker,
        url,
    ):
        port = port_of(url)
        slow = [
            await RawClient.connect(port, receive_buffer=SMALL_RECEIVE_BUFFER) for _ in range(3)
        ]
        for client in slow:
            await client.join("news")
        # Until the slow clients are cut (1013), each time the count moved: it is the sum.
        totals = []
        for number in range(300):
            await publish_from_outside(worker, "news", [number, "z" * 16_000])
            if number % 20 == 19:
                health = await healthz(port)
                in_queues = sum(conn.queued_bytes for conn in worker._accepted)
                assert health["queued_bytes"] == in_queues
                totals.append(in_queues)
        assert max(totals) > 1 << 20  # more than one client's bound: they were all queued
        for client in slow:
            await client.stream.aclose()
        with trio.fail_after(RECEIVE_TIMEOUT):
            while worker._accepted:  # noqa: ASYNC110 - no event for "socket closed"
                await trio.sleep(0.01)
        assert worker.queued_bytes == 0
        assert (await healthz(port))["queued_bytes"] == 0


# ---- handshakes ---------------------------------------------------------------------------


async def test_a_handshake_sent_byte_by_byte_is_cut_by_handshake_timeout_as_a_whole():
    timeout = 1.0
    async with running_worker(handshake_timeout=timeout) as (_, url):
        port = port_of(url)
        trickle = await trio.open_tcp_stream("127.0.0.1", port)
        cut = trio.Event()
        started = trio.current_time()

        async def send_a_byte_at_a_time() -> None:
            # A header that never ends, a byte every 50 ms: each read comes well within any
            # timeout, so only a bound on the whole handshake cuts it. Bounded: 10 s of bytes.
            try:
                await trickle.send_all(b"GET /ws HTTP/1.1\r\nX-Slow: ")
                for _ in range(200):
                    await trickle.send_all(b"a")
                    await trio.sleep(0.05)
            except trio.BrokenResourceError:
                pass  # the server closed it: what this test waits for
            finally:
                cut.set()

        async def wait_for_the_cut() -> None:
            assert await receive_until_closed(trickle) == b""  # no answer, just the close
            cut.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_a_byte_at_a_time)
            nursery.start_soon(wait_for_the_cut)
            # Meanwhile the worker serves others.
            async with open_client(url) as other:
                await other.join("r")
                await other.ping()
            with trio.fail_after(RECEIVE_TIMEOUT):
                await cut.wait()
            elapsed = trio.current_time() - started
            nursery.cancel_scope.cancel()
        assert timeout - 0.1 <= elapsed < 5 * timeout, elapsed  # not 10 s of trickling
        await trickle.aclose()


async def test_a_tls_client_hello_on_the_plain_port_is_closed_at_once():
    # The start of a real ClientHello (a record header, then the handshake header).
    client_hello = bytes.fromhex("16030100f4010000f00303") + os.urandom(32)
    async with running_worker(handshake_timeout=60) as (worker, url):
        async with await trio.open_tcp_stream("127.0.0.1", port_of(url)) as stream:
            await stream.send_all(client_hello)
            # Nothing a TLS client would misread, just the close; within RECEIVE_TIMEOUT, far
            # less than the handshake timeout.
            assert await receive_until_closed(stream) == b""
        await _handshakes_below(worker, 1)


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /healthz HTTP/1.1\nHost: x\n\n", b"200"),  # bare LF: accepted (RFC 9112 2.2)
        (b"GET /nowhere HTTP/1.1\nHost: x\n\n", b"404"),
        (b'{"type": "join", "room": "r"}', b"400"),  # JSON before any handshake
        (b"GET /ws HTTP/1.1 \r\n", b"400"),  # a request line that cannot be valid
        (b"GET /ws HTTP/1.1\r\nHost: \x00\r\n", b"400"),  # a NUL: the head is not done yet
        (b"GET /ws HTTP/1.1\r\nno colon\r\n", b"400"),  # a header line, and more to come
    ],
)
async def test_a_head_is_answered_as_soon_as_its_fate_is_known(head: bytes, status: bytes):
    async with running_worker(handshake_timeout=60) as (_, url):
        answer = await http_get(port_of(url), head)  # bounded far below the handshake timeout
        assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer[:200]


# ---- connection limits --------------------------------------------------------------------


async def test_past_max_connections_an_upgrade_gets_503_and_healthz_still_answers():
    async with (
        running_worker(max_connections=3) as (worker, url),
        open_client(url) as first,
        open_client(url) as second,
    ):
        port = port_of(url)
        third_leaves = trio.Event()
        third_left = trio.Event()

        async def third_client() -> None:
            async with open_client(url) as third:
                await third.join("room")
                await third_leaves.wait()
            third_left.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(third_client)
            for client in (first, second):
                await client.join("room")
            with trio.fail_after(RECEIVE_TIMEOUT):
                while len(worker.connections) < 3 or len(worker.rooms) < 1:  # noqa: ASYNC110
                    await trio.sleep(0.01)

            refused = await http_get(port, UPGRADE)
            head, _, body = refused.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), head
            assert b"\r\nRetry-After: 5" in head
            assert b"limit of 3 connections" in body
            health = await healthz(port)
            assert (health["connections"], health["handshakes"]) == (3, 1)  # this request
            # The three keep being served.
            await publish_from_outside(worker, "room", "still here")
            assert await receive_data(first, 1) == ["still here"]
            assert await receive_data(second, 1) == ["still here"]

            third_leaves.set()
            await third_left.wait()
            with trio.fail_after(RECEIVE_TIMEOUT):
                while len(worker.connections) > 2:  # noqa: ASYNC110 - no event for it
                    await trio.sleep(0.01)
        async with open_client(url) as newcomer:
            await newcomer.join("room")
            await publish_from_outside(worker, "room", "welcome")
            for client in (first, second, newcomer):
                assert await receive_data(client, 1) == ["welcome"]


async def test_past_max_handshakes_new_connections_are_closed_at_once():
    async with running_worker(max_handshakes=2, handshake_timeout=60) as (worker, url):
        port = port_of(url)
        # Two connections that never send a byte hold the two handshake slots.
        idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
        with trio.fail_after(RECEIVE_TIMEOUT):
            while worker.handshakes < 2:  # noqa: ASYNC110 - no event for "accepted"
                await trio.sleep(0.01)
        # A third is closed at once (not after the 60 s handshake timeout), unanswered.
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(HEALTHZ)
            assert await receive_until_closed(stream) == b""
        assert worker.handshakes == 2
        # One slot frees: /healthz answers again, and a WebSocket opens.
        await idle.pop().aclose()
        await _handshakes_below(worker, 2)
        assert (await healthz(port))["handshakes"] == 2  # the idle one and this request
        async with open_client(url) as client:
            await client.ping()
        await idle.pop().aclose()


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc")
async def test_answered_http_requests_whose_clients_never_close_hold_at_most_max_handshakes():
    """Plain HTTP answers whose clients neither read nor close: each answered connection keeps
    its slot among max_handshakes until its socket is closed, after a short linger, so that
    such a flood cannot take the worker's descriptors (and /healthz) with it."""
    requests, limit = 300, 20
    async with running_worker(max_handshakes=limit) as (worker, url):
        port = port_of(url)
        before = open_descriptors()
        clients: list[trio.SocketStream] = []
        most_held = 0
        try:
            with trio.fail_after(RECEIVE_TIMEOUT):
                for _ in range(requests):
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                    clients.append(stream)
                    await stream.send_all(b"GET /nope HTTP/1.1\r\nHost: test\r\n\r\n")
                    # The worker accepts and answers as they come.
                    await trio.lowlevel.checkpoint()
                    # The worker's sockets: every descriptor but ours.
                    most_held = max(most_held, open_descriptors() - before - len(clients))
            # The first client never read: its answer was written before the close.
            assert (await receive_until_closed(clients[0])).startswith(b"HTTP/1.1 404 ")
            await _handshakes_below(worker, 1)
            assert (await healthz(port))["handshakes"] == 1  # this request alone
        finally:
            for stream in clients:
                await stream.aclose()
    assert most_held <= limit + 2  # the slots, and the socket refused in between


# Runs `python -m trio_fanout ARGS` with at most 64 descriptors (as `ulimit -n 64` would).
FEW_DESCRIPTORS = (
    "import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)); "
    "sys.argv[0] = 'trio-fanout'; runpy.run_module('trio_fanout', run_name='__main__')"
)


def test_a_worker_out_of_descriptors_logs_it_once_not_at_every_pause():
    worker = LoggedProcess(
        [sys.executable, "-c", FEW_DESCRIPTORS, "worker", "--port", "0",
         "--backplane", f"memory://few-descriptors-{os.getpid()}"]
    )  # fmt: skip
    clients: list[socket.socket] = []
    try:
        port = int(worker.wait_for_log(r"serving ws://127\.0\.0\.1:(\d+)/ws").group(1))
        # Connections that never send a byte: each accepted one holds a descriptor for the
        # handshake timeout (10 s), and the worker runs out of them well before 100.
        for _ in range(100):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=RECEIVE_TIMEOUT))
        worker.wait_for_log(r"accept failed 1 times since the last such line \(\[Errno 24\]")
        # Fifteen pauses of ACCEPT_CAPACITY_PAUSE: without the rate limit, as many lines.
        time.sleep(15 * ACCEPT_CAPACITY_PAUSE)
        assert worker.process.poll() is None  # still serving what it has
        assert worker.log().count("accept failed") == 1
    finally:
        for client in clients:
            client.close()
        worker.stop()
    # At its stop, the worker writes the failures counted since that line: at most one more.
    assert worker.log().count("accept failed") <= 2


async def _handshakes_below(worker, count: int) -> None:
    with trio.fail_after(RECEIVE_TIMEOUT):
        while worker.handshakes >= count:  # noqa: ASYNC110 - no event for "task ended"
            await trio.sleep(0.01)
