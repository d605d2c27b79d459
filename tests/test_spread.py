"""Connections spread evenly over the workers of `trio-fanout run`, and none is lost when the
worker it waits for dies: each worker has a listening socket of its own on the shared port
(SO_REUSEPORT), which the master keeps open across the worker's restarts."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
from collections import Counter

import trio

from tests.helpers import ClusterProcess

TIMEOUT = 30


def upgrade_request() -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def welcome_of(stream: trio.SocketStream) -> dict:
    """The ``welcome`` frame that follows the 101 answer (a small unmasked text frame)."""
    received = b""
    while True:
        head_end = received.find(b"\r\n\r\n")
        if head_end >= 0 and len(received) >= head_end + 6:
            frame = received[head_end + 4 :]
            assert frame[0] == 0x81, frame  # a final text frame
            length = frame[1]
            if len(frame) >= 2 + length:
                return json.loads(frame[2 : 2 + length])
        chunk = await stream.receive_some(4096)
        assert chunk, f"closed before the welcome: {received!r}"
        received += chunk


async def open_many(port: int, count: int) -> list[trio.SocketStream]:
    """``count`` TCP connections, each with its upgrade request sent; nothing read yet."""
    streams = []
    for _ in range(count):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(upgrade_request())
        streams.append(stream)
    return streams


async def welcomes(streams: list[trio.SocketStream]) -> list[dict]:
    found: list[dict] = [{}] * len(streams)

    async def read(position: int, stream: trio.SocketStream) -> None:
        found[position] = await welcome_of(stream)

    async with trio.open_nursery() as nursery:
        for position, stream in enumerate(streams):
            nursery.start_soon(read, position, stream)
    return found


async def test_two_thousand_connections_land_evenly_on_two_workers():
    cluster = ClusterProcess("--workers", "2", "--heartbeat-interval", "0")
    streams: list[trio.SocketStream] = []
    try:
        cluster.wait_for_workers(2)
        with trio.fail_after(TIMEOUT):
            streams = await open_many(cluster.port, 2000)
            by_worker = Counter(welcome["worker"] for welcome in await welcomes(streams))
        assert set(by_worker) == {1, 2}
        for count in by_worker.values():
            assert 900 <= count <= 1100, by_worker  # 45 % to 55 %
    finally:
        for stream in streams:
            await stream.aclose()
        cluster.stop()


async def test_connections_waiting_for_a_dead_worker_are_served_by_its_replacement():
    cluster = ClusterProcess("--workers", "2", "--heartbeat-interval", "0")
    streams: list[trio.SocketStream] = []
    try:
        cluster.wait_for_workers(2)
        victim = int(cluster.wait_for_log(r"worker 1 \(pid (\d+)\) serving").group(1))
        # Stopped, worker 1 accepts nothing: the connections the kernel gives its socket wait
        # there, their TCP handshake done and their upgrade request sent, when it is killed.
        os.kill(victim, signal.SIGSTOP)
        with trio.fail_after(TIMEOUT):
            streams = await open_many(cluster.port, 200)
        os.kill(victim, signal.SIGKILL)
        with trio.fail_after(TIMEOUT):
            answered = await welcomes(streams)
        replacement = int(
            cluster.wait_for_log(rf"worker 1 \(pid (?!{victim}\))(\d+)\) serving").group(1)
        )
        by_pid = Counter(welcome["pid"] for welcome in answered)
        assert victim not in by_pid
        # About half were waiting for worker 1: every one of them was served by its replacement.
        assert by_pid[replacement] >= 50, by_pid
        assert sum(by_pid.values()) == 200
        assert re.search(rf"worker 1 \(pid {victim}\) was killed by SIGKILL", cluster.log())
    finally:
        for stream in streams:
            await stream.aclose()
        cluster.stop()
