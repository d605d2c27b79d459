"""Connections spread evenly over the workers of `trio-fanout run`, and none is lost when the
worker it waits for dies: each worker has a listening socket of its own on the shared port
(SO_REUSEPORT), which the master keeps open across the worker's restarts."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import socket
from collections import Counter

import trio

from tests.helpers import ClusterProcess
from trio_fanout.runner import open_listeners
from trio_fanout.steering import steer

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
    # A long liveness timeout: the master must not steer connections away from the stopped
    # worker (it does after half of it), since this test needs some to wait in its socket.
    cluster = ClusterProcess(
        "--workers", "2", "--heartbeat-interval", "0", "--liveness-timeout", "60"
    )  # fmt: skip
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


def accepted_by(listeners: list[socket.socket], count: int) -> Counter[int]:
    """Open ``count`` connections to the listeners' port: how many each listener got."""
    port = listeners[0].getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) for _ in range(count)]
    got: Counter[int] = Counter()
    for position, listener in enumerate(listeners):
        while True:
            try:
                accepted, _ = listener.accept()
            except BlockingIOError:
                break
            accepted.close()
            got[position] += 1
    for client in clients:
        client.close()
    return got


def test_steering_gives_new_connections_only_to_the_ready_sockets():
    listeners = open_listeners("127.0.0.1", 0, 3)
    try:
        assert set(accepted_by(listeners, 60)) == {0, 1, 2}  # the kernel's own spread
        steer(listeners, {0, 2})
        assert set(accepted_by(listeners, 60)) == {0, 2}
        steer(listeners, {1})
        assert accepted_by(listeners, 60) == {1: 60}
        steer(listeners, {0, 1, 2})  # all ready: the kernel's own spread again
        assert set(accepted_by(listeners, 60)) == {0, 1, 2}
    finally:
        for listener in listeners:
            listener.close()


async def test_new_connections_go_around_a_silent_worker():
    # Pinged every 0.2 s and killed after 4 s of silence: steered around after 2 s.
    cluster = ClusterProcess(
        "--workers", "2", "--heartbeat-interval", "0",
        "--liveness-interval", "0.2", "--liveness-timeout", "4",
    )  # fmt: skip
    streams: list[trio.SocketStream] = []
    stopped: list[int] = []
    try:
        cluster.wait_for_workers(2)
        silent = int(cluster.wait_for_log(r"worker 1 \(pid (\d+)\) serving").group(1))
        other = int(cluster.wait_for_log(r"worker 2 \(pid (\d+)\) serving").group(1))
        os.kill(silent, signal.SIGSTOP)
        stopped.append(silent)
        await trio.to_thread.run_sync(
            cluster.wait_for_log, rf"worker 1 \(pid {silent}\) has answered no ping .* other"
        )
        # Every new connection is answered, none waits in the stopped worker's socket: worker 2
        # takes them (or, on a slow machine, the worker started in place of the stopped one,
        # once it is killed).
        with trio.fail_after(TIMEOUT):
            streams = await open_many(cluster.port, 100)
            answered = await welcomes(streams)
        by_worker = Counter(welcome["pid"] for welcome in answered)
        assert silent not in by_worker
        assert by_worker[other] > 0
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):  # the master may have killed it
                os.kill(pid, signal.SIGCONT)
        for stream in streams:
            await stream.aclose()
        cluster.stop()
