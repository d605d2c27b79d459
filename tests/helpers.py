"""Shared test helpers: a real `trio-fanout run` cluster in a subprocess, and client utilities."""

from __future__ import annotations

import contextlib
import math
import os
import random
import re
import select
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from contextlib import AsyncExitStack
from typing import Any

import hiredis
import trio

from trio_fanout.backplane.redis import encode_command
from trio_fanout.client import Client, open_client

# Generous bounds for things that take milliseconds when healthy: CI machines are shared.
START_TIMEOUT = 30.0
RECEIVE_TIMEOUT = 10.0


def trio_fanout_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "trio_fanout", *args]


class LoggedProcess:
    """A command in its own process group, its log (stderr) collected line by line."""

    def __init__(self, command: list[str], cwd: str | None = None) -> None:
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            cwd=cwd,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()

    def _collect(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.lines.append("<end of log>")
            self._changed.notify_all()

    def wait_for_log(
        self, pattern: str, timeout: float = START_TIMEOUT, start: int = 0
    ) -> re.Match[str]:
        """The first log line from index ``start`` on that matches ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = start
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if match := regex.search(line):
                        return match
                seen = len(self.lines)
                if "<end of log>" in self.lines[-1:]:
                    raise AssertionError(f"process exited before {pattern!r}:\n" + self.log())
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no log line {pattern!r} in {timeout} s:\n" + self.log())
                self._changed.wait(remaining)

    def log(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the process and wait; kill its whole group if it does not end in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            kill_group(self.process.pid)
            self._reader.join(timeout)
            assert self.process.stderr is not None
            self.process.stderr.close()


class ClusterProcess(LoggedProcess):
    """`trio-fanout run` on free ports."""

    def __init__(self, *args: str) -> None:
        super().__init__(trio_fanout_command("run", "--port", "0", "--proxy-port", "0", *args))
        # The URL ends at a space or, with --log-format json, at the message's closing quote.
        match = self.wait_for_log(
            r"listening on (wss?)://([\d.]+):(\d+)/ws .* backplane ([^\s\"]+)"
        )
        self.port = int(match.group(3))
        self.url = f"{match.group(1)}://127.0.0.1:{self.port}/ws"
        self.backplane_url = match.group(4)

    def wait_for_workers(self, count: int) -> None:
        for index in range(1, count + 1):
            self.wait_for_log(rf"worker {index} \(pid \d+\) serving")


class RedisServer(LoggedProcess):
    """A redis-server of our own on a free loopback port, keeping nothing on disk."""

    def __init__(self, directory: str, *extra: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.directory = directory
        self.extra = extra
        super().__init__(self._command())
        self.wait_for_log("Ready to accept connections")
        self.url = f"redis://127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        return [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", self.directory,
            "--logfile", "/dev/stderr", *self.extra,
        ]  # fmt: skip


class Relay:
    """A TCP relay on loopback to a server on ``target_port``, which a test can cut: reset every
    connection through it, and hold new ones until it lets them through.

    A server killed with our bytes unread resets its connections (RST) instead of closing them,
    and a link can be down while its server lives on; real servers cannot be made to do either
    on demand, so this relay does it (SO_LINGER 0 for the reset) between a client and a real
    server.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._connections: list[trio.CancelScope] = []
        self._open = trio.Event()
        self._open.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listener.socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._relay, [listener])

    def reset_all(self, *, hold: bool = False) -> None:
        """Reset every connection; with ``hold``, new ones wait for :meth:`let_through`."""
        if hold:
            self._open = trio.Event()
        for scope in self._connections:
            scope.cancel()
        self._connections.clear()

    def let_through(self) -> None:
        self._open.set()

    async def _relay(self, client: trio.SocketStream) -> None:
        await self._open.wait()
        async with await trio.open_tcp_stream("127.0.0.1", self.target_port) as server:
            with trio.CancelScope() as scope:
                self._connections.append(scope)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pipe, client, server)
                    nursery.start_soon(self._pipe, server, client)
            if scope.cancelled_caught:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await client.aclose()

    @staticmethod
    async def _pipe(source: trio.SocketStream, sink: trio.SocketStream) -> None:
        while data := await source.receive_some():
            await sink.send_all(data)


# Ports the tests pick for servers that cannot take port 0 (redis-server, the examples' TOML
# files): below Linux's ephemeral range (32768-60999), so that no outgoing connection holds
# them, and above the well-known and registered ones most often in use.
TEST_PORTS = range(20_000, 32_000)


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    for _ in range(1000):
        port = random.choice(TEST_PORTS)
        if _bindable(port):
            return port
    raise AssertionError("no free port")


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def exited_within(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` (not necessarily our child) has ended, waiting up to ``timeout``.

    A pidfd becomes readable when its process terminates, which gives a precise wait.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(pidfd)


# Between two rounds of connections that did not yet reach every worker.
PLACING_PAUSE = 0.05


async def connect_on_each_worker(
    stack: AsyncExitStack,
    url: str,
    workers: int = 2,
    per_worker: int = 1,
    attempts: int = 200,
    ssl_context: ssl.SSLContext | None = None,
) -> dict[int, list[Client]]:
    """Open clients until each worker holds ``per_worker`` of them; extra ones are closed.

    The kernel gives each new connection to a worker by a hash of its addresses: clients are
    opened several at a time until each worker has its share. Each client lives in a task of
    its own (its context holds trio-websocket's nursery), kept open until ``stack`` closes.
    """
    by_worker: dict[int, list[Client]] = {index: [] for index in range(1, workers + 1)}
    nursery = await stack.enter_async_context(trio.open_nursery())
    release = trio.Event()
    stack.callback(release.set)  # runs before the nursery's exit: the clients then close
    opened_send, opened_receive = trio.open_memory_channel[tuple[Client, trio.Event, list]](
        math.inf
    )

    async def hold_one() -> None:
        async with open_client(
            url, connect_timeout=START_TIMEOUT, ssl_context=ssl_context
        ) as client:
            decided, keep = trio.Event(), []
            await opened_send.send((client, decided, keep))
            await decided.wait()
            if keep:
                await release.wait()

    batch = 2 * workers
    for _ in range(0, attempts, batch):
        for _ in range(batch):
            nursery.start_soon(hold_one)
        for _ in range(batch):
            with trio.fail_after(START_TIMEOUT):
                client, decided, keep = await opened_receive.receive()
            if len(by_worker[client.worker]) < per_worker:
                by_worker[client.worker].append(client)
                keep.append(True)
            decided.set()
        if all(len(clients) >= per_worker for clients in by_worker.values()):
            return by_worker
        # A worker that is still starting gets no new connection (the master steers them to
        # the others until it answers): give it a moment before the next round.
        await trio.sleep(PLACING_PAUSE)
    raise AssertionError(f"could not place {per_worker} client(s) on each of {workers} workers")


async def receive_message(client: Client) -> dict:
    """The next ``message`` frame (other frames are not expected here and fail the test)."""
    with trio.fail_after(RECEIVE_TIMEOUT):
        frame = await client.receive()
    assert frame["type"] == "message", frame
    return frame


async def receive_data(client: Client, count: int) -> list:
    """The ``data`` of the next ``count`` messages, each within ``RECEIVE_TIMEOUT``."""
    return [(await receive_message(client))["data"] for _ in range(count)]


async def redis_call(port: int, *args: bytes) -> Any:
    """One command to the test's own redis-server on ``port``, on a connection of its own (to
    look at or reset what a backplane left there), and its reply."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(encode_command(*args))
        reader = hiredis.Reader()
        while (reply := reader.gets()) is False:
            data = await stream.receive_some(65536)
            assert data, "redis-server closed the connection"
            reader.feed(data)
        return reply
