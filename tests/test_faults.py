"""Faults a load balancer or an operator would notice: a hung worker, a killed master, a
backplane that goes away, and messages on the backplane that no publisher of ours sent.

Real processes throughout (`trio-fanout run`, redis-server, `trio-fanout proxy`), except the
relay tests, which run one worker in this process on a real backplane of each kind.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio

from tests.helpers import (
    RECEIVE_TIMEOUT,
    START_TIMEOUT,
    ClusterProcess,
    LoggedProcess,
    RedisServer,
    connect_on_each_worker,
    exited_within,
    free_port,
    receive_data,
    trio_fanout_command,
)
from trio_fanout import Config, Worker, envelope, protocol, serve
from trio_fanout.backplane import open_backplane, serve_proxy
from trio_fanout.client import open_client
from trio_fanout.master import Supervisor
from trio_fanout.runner import open_listeners
from trio_fanout.worker import relay_problem

_rooms = itertools.count()

# The liveness settings of these tests: short, so that a hang is noticed in about a second.
LIVENESS = ["--liveness-interval", "0.2", "--liveness-timeout", "1"]
# A hung worker is killed within liveness_timeout + liveness_interval of its last answer; the
# rest is for a loaded machine (the master's log line is read by another thread, and so on).
KILL_BOUND = 1.0 + 0.2 + 3.0

UPGRADE = (
    "GET /ws{query} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def fresh_room() -> str:
    return f"faults-{os.getpid()}-{next(_rooms)}"


async def in_thread(function: Callable[..., object], *args: object, **kwargs: object) -> object:
    """Run a blocking helper (a wait on a process's log) without blocking the Trio loop."""
    return await trio.to_thread.run_sync(functools.partial(function, *args, **kwargs))


# ---- a hung worker ------------------------------------------------------------------------


def test_a_stopped_worker_is_killed_and_replaced_while_the_other_keeps_serving():
    cluster = ClusterProcess("--workers", "2", "--heartbeat-interval", "0", *LIVENESS)
    try:
        cluster.wait_for_workers(2)

        async def scenario() -> None:
            async with AsyncExitStack() as stack:
                by_worker = await connect_on_each_worker(stack, cluster.url, per_worker=2)
                victim = by_worker[1][0]
                survivor, publisher = by_worker[2]
                room = fresh_room()
                await survivor.join(room)
                delivered: list[int] = []

                async def keep_publishing() -> None:
                    for number in itertools.count():
                        await publisher.publish(room, number)
                        assert await receive_data(survivor, 1) == [number]
                        delivered.append(number)
                        await trio.sleep(0.05)

                mark = len(cluster.lines)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(keep_publishing)
                    stopped_at = trio.current_time()
                    os.kill(victim.pid, signal.SIGSTOP)
                    killed = await in_thread(
                        cluster.wait_for_log,
                        rf"worker 1 \(pid {victim.pid}\) has answered no ping for ([\d.]+) s: "
                        "killing it",
                        start=mark,
                    )
                    noticed_after = trio.current_time() - stopped_at
                    await in_thread(
                        cluster.wait_for_log,
                        rf"worker 1 \(pid {victim.pid}\) was killed by SIGKILL; restarting",
                        start=mark,
                    )
                    await in_thread(
                        cluster.wait_for_log, r"worker 1 \(pid \d+\) serving", start=mark
                    )
                    nursery.cancel_scope.cancel()
                # Silent for liveness_timeout since its last answer, which came before the stop.
                assert float(killed.group(1)) >= 1.0  # type: ignore[union-attr]
                assert noticed_after < KILL_BOUND
                # The survivor's clients were served all along (one message every ~50 ms).
                assert len(delivered) >= noticed_after / 0.5
                # A new client reaches the new worker 1, which serves the room like any other.
                again = await connect_on_each_worker(stack, cluster.url)
                newcomer = again[1][0]
                assert newcomer.pid != victim.pid
                await newcomer.join(room)
                await publisher.publish(room, "after the hang")
                assert await receive_data(newcomer, 1) == ["after the hang"]

        trio.run(scenario)
    finally:
        cluster.stop()


class SpinningSupervisor(Supervisor):
    """The master's own supervisor, starting tests/spinning_worker.py instead of the stock
    worker: there is no other way to give a worker of `trio-fanout run` a hook."""

    def _command(self, index: int, control_fd: int) -> list[str]:
        script = Path(__file__).with_name("spinning_worker.py")
        return [
            sys.executable, str(script),
            "--index", str(index),
            "--listen-fd", str(self._listener(index).fileno()),
            "--control-fd", str(control_fd),
            "--config-from-stdin",
        ]  # fmt: skip


async def test_a_worker_stuck_in_a_busy_hook_is_killed_and_replaced(
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.INFO, logger="trio_fanout.master")
    config = Config(
        workers=1,
        heartbeat_interval=0,
        backplane=f"memory://spin-{os.getpid()}",
        liveness_interval=0.2,
        liveness_timeout=1.0,
    )
    (listener,) = open_listeners("127.0.0.1", 0, 1)  # as the master opens them
    port = listener.getsockname()[1]
    url = f"ws://127.0.0.1:{port}/ws"
    supervisor = SpinningSupervisor(config, [listener])
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(supervisor.keep_running, 1)
            async with open_client(url, connect_timeout=START_TIMEOUT) as client:
                first_pid = client.pid
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(UPGRADE.format(query="?spin").encode())
                spinning_since = trio.current_time()
                # No answer ever comes: the hook spins until the worker is killed, and then
                # the kernel closes its connections.
                with trio.fail_after(START_TIMEOUT):
                    with contextlib.suppress(trio.BrokenResourceError):  # a reset will do
                        assert await stream.receive_some() == b""
                killed_after = trio.current_time() - spinning_since
            async with open_client(url, connect_timeout=START_TIMEOUT) as client:
                assert client.pid != first_pid
                await client.ping()
            await supervisor.stop_all()
            nursery.cancel_scope.cancel()
    finally:
        listener.close()
    assert killed_after < KILL_BOUND
    kills = [r.getMessage() for r in caplog.records if r.getMessage().endswith("killing it")]
    assert len(kills) == 1
    assert kills[0].startswith(f"worker 1 (pid {first_pid}) has answered no ping for ")
    assert any(
        f"worker 1 (pid {first_pid}) was killed by SIGKILL" in r.getMessage()
        for r in caplog.records
    )


async def test_a_master_whose_own_loop_stalls_kills_no_worker(caplog: pytest.LogCaptureFixture):
    """The master's loop blocked for 2.5 liveness timeouts (a long batch in the embedded
    proxy, a swapped-out process): the worker answered all along, so it is not blamed."""
    caplog.set_level(logging.INFO, logger="trio_fanout.master")
    config = Config(
        workers=1,
        heartbeat_interval=0,
        backplane=f"memory://stall-{os.getpid()}",
        liveness_interval=0.2,
        liveness_timeout=1.0,
    )
    (listener,) = open_listeners("127.0.0.1", 0, 1)  # as the master opens them
    url = f"ws://127.0.0.1:{listener.getsockname()[1]}/ws"
    supervisor = Supervisor(config, [listener])
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(supervisor.keep_running, 1)
            async with open_client(url, connect_timeout=START_TIMEOUT) as client:
                first_pid = client.pid
            # Several stalls: which of the master's tasks runs first after one is up to Trio.
            for _ in range(3):
                # The master's loop stalls, on purpose: the very fault under test.
                time.sleep(2.5 * config.liveness_timeout)  # noqa: ASYNC251
                # Long enough for the check to run several times after each stall.
                await trio.sleep(1.5 * config.liveness_timeout)
            async with open_client(url, connect_timeout=START_TIMEOUT) as client:
                assert client.pid == first_pid
                await client.ping()
            await supervisor.stop_all()
            nursery.cancel_scope.cancel()
    finally:
        listener.close()
    assert not [r for r in caplog.records if "answered no ping" in r.getMessage()]


# ---- a killed master ----------------------------------------------------------------------


def hold_websocket(port: int) -> tuple[socket.socket, int]:
    """Open a WebSocket that will never answer a close frame; return it and its worker's index."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=RECEIVE_TIMEOUT)
    sock.sendall(UPGRADE.format(query="").encode())
    received = b""
    while b"\r\n\r\n" not in received or not received.endswith(b"}"):
        chunk = sock.recv(4096)
        assert chunk, "the server closed the connection"
        received += chunk
    welcome = received.partition(b"\r\n\r\n")[2]
    frame = json.loads(welcome[2:])  # a text frame of under 126 bytes: a 2-byte header
    assert frame["type"] == "welcome"
    return sock, frame["worker"]


def test_a_new_cluster_starts_at_once_on_the_port_of_a_killed_master():
    port, proxy_port = free_port(), free_port()
    ports = ["--port", str(port), "--proxy-port", str(proxy_port)]
    old = ClusterProcess("--workers", "2", "--heartbeat-interval", "0", *ports)
    new: ClusterProcess | None = None
    held: list[socket.socket] = []
    try:
        old.wait_for_workers(2)
        old_pids = [
            int(old.wait_for_log(rf"worker {index} \(pid (\d+)\) serving").group(1))
            for index in (1, 2)
        ]
        # A client on each old worker that never answers its close: the workers take their
        # full drain time to stop, and must not hold the port meanwhile.
        workers_held: set[int] = set()
        for _ in range(100):
            sock, index = hold_websocket(port)
            held.append(sock)
            workers_held.add(index)
            if workers_held == {1, 2}:
                break
        assert workers_held == {1, 2}

        os.kill(old.process.pid, signal.SIGKILL)
        assert old.process.wait(5) == -signal.SIGKILL
        new = ClusterProcess("--workers", "2", "--heartbeat-interval", "0", *ports)
        new.wait_for_workers(2)
        assert new.port == port

        async def served_by_the_new_workers() -> None:
            async with AsyncExitStack() as stack:
                by_worker = await connect_on_each_worker(stack, new.url)
                one, two = by_worker[1][0], by_worker[2][0]
                assert {one.pid, two.pid}.isdisjoint(old_pids)
                room = fresh_room()
                await one.join(room)
                await two.publish(room, "new cluster")
                assert await receive_data(one, 1) == ["new cluster"]

        trio.run(served_by_the_new_workers)
        # And the old workers are gone, not orphaned.
        assert all(exited_within(pid, 10) for pid in old_pids)
        for pid in old_pids:
            old.wait_for_log(rf"worker \d \(pid {pid}\) stopped")
    finally:
        for sock in held:
            sock.close()
        old.stop()
        if new is not None:
            new.stop()


# ---- /healthz tells the truth ---------------------------------------------------------------


async def healthz(port: int) -> tuple[int, dict]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        response = b""
        with trio.fail_after(RECEIVE_TIMEOUT):
            while chunk := await stream.receive_some():
                response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def until_every_worker_says(port: int, status: int, within: float, workers: int = 2) -> dict:
    """Ask /healthz (each request lands on either worker) until every worker has answered
    ``status`` in a row; fail after ``within`` seconds. Returns the last answer of each."""
    latest: dict[int, dict] = {}
    with trio.fail_after(within):
        while True:
            code, health = await healthz(port)
            if code == status:
                latest[health["worker"]] = health
                if len(latest) == workers:
                    return latest
            else:
                latest.pop(health["worker"], None)
            await trio.sleep(0.05)


@pytest.mark.parametrize("backplane", ["redis", "zmq"])
def test_healthz_is_503_while_the_backplane_is_down_and_200_again_after(
    backplane: str, tmp_path: Path
):
    def start_backplane(port: int | None = None) -> LoggedProcess:
        if backplane == "redis":
            return RedisServer(str(tmp_path), port=port)
        server = LoggedProcess(
            trio_fanout_command(
                "proxy", "--port", str(port), "--heartbeat-interval", "0", "--log-level", "info"
            )
        )
        server.wait_for_log("ZeroMQ proxy: clients connect")
        return server

    port = free_port()
    server = start_backplane(port)
    url = f"{backplane}://127.0.0.1:{port}"
    cluster = ClusterProcess("--workers", "2", "--heartbeat-interval", "0", "--backplane", url)
    try:
        cluster.wait_for_workers(2)

        async def scenario() -> None:
            nonlocal server
            ready = await until_every_worker_says(cluster.port, 200, RECEIVE_TIMEOUT)
            assert all(health["status"] == "ready" for health in ready.values())
            assert all("reason" not in health for health in ready.values())
            server.stop()
            # Redis: the connections close at once. ZeroMQ: one unanswered probe, about 2 s.
            down = await until_every_worker_says(cluster.port, 503, 10)
            for health in down.values():
                assert health["status"] == "not_ready"
                assert f"127.0.0.1:{port}" in health["reason"]
                assert "connections" in health and "backplane_gaps" in health
            server = await in_thread(start_backplane, port)  # type: ignore[assignment]
            await until_every_worker_says(cluster.port, 200, 15)
            # Ready means it: a join and a publish across the workers work again.
            async with AsyncExitStack() as stack:
                by_worker = await connect_on_each_worker(stack, cluster.url)
                room = fresh_room()
                await by_worker[1][0].join(room)
                await by_worker[2][0].publish(room, "back")
                assert await receive_data(by_worker[1][0], 1) == ["back"]

        trio.run(scenario)
    finally:
        cluster.stop()
        server.stop()


async def test_a_worker_that_is_stopping_says_not_ready():
    config = Config(port=0, heartbeat_interval=0, backplane=f"memory://stopping-{os.getpid()}")
    with trio.fail_after(3 * RECEIVE_TIMEOUT):
        async with trio.open_nursery() as nursery:
            worker: Worker = await nursery.start(serve, config)
            assert worker.health()[0] == 200
            async with open_client(f"ws://127.0.0.1:{worker.port}/ws"):
                worker.stop()  # the client is closed with 1001 meanwhile: the drain is on
                status, body = worker.health()
            assert status == 503
            assert json.loads(body)["status"] == "not_ready"
            assert json.loads(body)["reason"] == "shutting down"


# ---- relay only what a publisher of ours would send ---------------------------------------


def message_payload(numberer: envelope.Numberer, topic: bytes, room: str, data: object) -> bytes:
    return numberer.wrap(topic, protocol.message_frame(room, data))


INVALID_FRAMES = [
    b"\xff\xfe not UTF-8",
    b'{"type": "message", "data": "\xed\xa0\x80"}',  # a UTF-8-encoded surrogate
    '{"type": "message"}'.encode("utf-16"),
    b"not JSON",
    b'{"type": "message", "data": NaN}',
    b'{"type": "message", "data": Infinity}',
    b"[1, 2, 3]",
    b'"a string"',
    b'{"data": "no type"}',
    b'{"type": 5}',
    b'{"type": "message", "data": ',
    b"[" * 100_000,
    b"",
]


@asynccontextmanager
async def worker_on(backplane_kind: str, redis_url: str | None) -> AsyncIterator[tuple[str, str]]:
    """One worker in this process; yields its WebSocket URL and its backplane's URL."""
    async with trio.open_nursery() as proxy_nursery:
        if backplane_kind == "memory":
            url = f"memory://relay-{os.getpid()}-{next(_rooms)}"
        elif backplane_kind == "zmq":
            proxy_port = await proxy_nursery.start(serve_proxy, "127.0.0.1", 0)
            url = f"zmq://127.0.0.1:{proxy_port}"
        else:
            assert redis_url is not None
            url = redis_url
        config = Config(port=0, heartbeat_interval=0, backplane=url)
        async with trio.open_nursery() as nursery:
            worker: Worker = await nursery.start(serve, config)
            yield f"ws://127.0.0.1:{worker.port}/ws", url
            worker.stop()
        proxy_nursery.cancel_scope.cancel()


@pytest.mark.parametrize("backplane_kind", ["memory", "zmq", "redis"])
async def test_invalid_backplane_messages_never_reach_clients_and_valid_ones_around_them_do(
    backplane_kind: str, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
):
    redis_url = request.getfixturevalue("redis_server").url if backplane_kind == "redis" else None
    with trio.fail_after(3 * RECEIVE_TIMEOUT):  # a hang fails, never blocks the suite
        async with (
            worker_on(backplane_kind, redis_url) as (ws_url, backplane_url),
            open_client(ws_url) as member,
            open_backplane(backplane_url) as raw,
        ):
            room = fresh_room()
            topic = envelope.room_topic(room)
            await member.join(room)
            numberer = envelope.Numberer()
            expected = []
            for number, invalid in enumerate(INVALID_FRAMES):
                await raw.publish(topic, message_payload(numberer, topic, room, number))
                expected.append(number)
                await raw.publish(topic, numberer.wrap(topic, invalid))
            await raw.publish(topic, b"short")  # not even an envelope
            await raw.publish(topic, message_payload(numberer, topic, room, "last"))
            expected.append("last")
            assert await receive_data(member, len(expected)) == expected
            port = int(ws_url.rsplit(":", 1)[1].split("/")[0])
            code, health = await healthz(port)
            assert (code, health["dropped_invalid"]) == (200, len(INVALID_FRAMES) + 1)
    # Counted one by one, logged once: a flood of them cannot flood the log.
    warnings = [r for r in caplog.records if "dropped an invalid backplane" in r.getMessage()]
    assert len(warnings) == 1
    assert "not UTF-8" in warnings[0].getMessage()


async def test_a_flood_of_invalid_messages_is_one_log_line_and_the_count(
    caplog: pytest.LogCaptureFixture,
):
    with trio.fail_after(3 * RECEIVE_TIMEOUT):  # a hang fails, never blocks the suite
        async with (
            worker_on("memory", None) as (ws_url, backplane_url),
            open_client(ws_url) as member,
            open_backplane(backplane_url) as raw,
        ):
            room = fresh_room()
            topic = envelope.room_topic(room)
            await member.join(room)
            numberer = envelope.Numberer()
            for _ in range(10_000):
                await raw.publish(topic, numberer.wrap(topic, b"\x80"))
            await raw.publish(topic, message_payload(numberer, topic, room, "after the flood"))
            assert await receive_data(member, 1) == ["after the flood"]
            port = int(ws_url.rsplit(":", 1)[1].split("/")[0])
            assert (await healthz(port))[1]["dropped_invalid"] == 10_000
    warnings = [r for r in caplog.records if "dropped an invalid backplane" in r.getMessage()]
    assert len(warnings) == 1


async def test_a_flood_of_gaps_is_one_log_line_and_the_count(caplog: pytest.LogCaptureFixture):
    """A publisher on the backplane whose numbers always skip (or who forges a new origin per
    message): every gap is counted, and the log gets a line now and then, not one per gap."""
    with trio.fail_after(3 * RECEIVE_TIMEOUT):
        async with (
            worker_on("memory", None) as (ws_url, backplane_url),
            open_client(ws_url) as member,
            open_backplane(backplane_url) as raw,
        ):
            room = fresh_room()
            topic = envelope.room_topic(room)
            await member.join(room)
            numberer = envelope.Numberer()
            for _ in range(2_000):
                # Every other number is never published: each message after the first skips one.
                numberer.wrap(topic, b"")
                await raw.publish(topic, message_payload(numberer, topic, room, "skipping"))
            assert len(await receive_data(member, 2_000)) == 2_000
            port = int(ws_url.rsplit(":", 1)[1].split("/")[0])
            assert (await healthz(port))[1]["backplane_gaps"] == 1_999
    warnings = [r for r in caplog.records if "backplane gap" in r.getMessage()]
    assert len(warnings) == 1


def test_the_relay_check_is_strict_json_objects_in_utf8():
    assert relay_problem(protocol.message_frame("room", {"a": [1, "é", None]})) is None
    assert relay_problem(protocol.heartbeat_frame(1, 2.5)) is None
    assert relay_problem(b'{"type": "x", "s": "\\ud800"}') is None  # escaped: still UTF-8
    problems = [relay_problem(frame) for frame in INVALID_FRAMES]
    assert all(problems), dict(zip(INVALID_FRAMES, problems, strict=True))
