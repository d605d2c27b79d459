"""Every example does what its documentation says, started the way it says."""

from __future__ import annotations

import os
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio

from tests import browser
from tests.helpers import (
    RECEIVE_TIMEOUT,
    ClusterProcess,
    LoggedProcess,
    RedisServer,
    connect_on_each_worker,
    free_port,
    receive_data,
    receive_message,
    trio_fanout_command,
)
from tests.test_cluster import http_get
from trio_fanout import envelope
from trio_fanout.client import open_client

EXAMPLES = Path(__file__).parent.parent / "examples"
CHAT_PAGE_SOURCE = (Path(__file__).parent.parent / "trio_fanout" / "static" / "chat.html").resolve()

# A command of the examples runs for a second at most when things are well.
PROCESS_TIMEOUT = 30


async def test_the_emitter_script_publishes_to_every_worker(cluster: ClusterProcess):
    async with AsyncExitStack() as stack:
        by_worker = await connect_on_each_worker(stack, cluster.url)
        members = [by_worker[1][0], by_worker[2][0]]
        for member in members:
            await member.join("lobby")
        with trio.fail_after(PROCESS_TIMEOUT):
            result = await trio.run_process(
                [sys.executable, str(EXAMPLES / "emitter.py"), "--backplane",
                 cluster.backplane_url, "lobby", "hello from a script"],
                capture_stdout=True, capture_stderr=True,
            )  # fmt: skip
        assert result.stdout == b"published to lobby\n"
        for member in members:
            assert await receive_data(member, 1) == [
                {"text": "hello from a script", "from": "emitter.py"}
            ]


def two_hosts_configs(directory: Path) -> tuple[Path, Path, Path]:
    """The example's TOML files, with free ports in place of the documented ones."""
    proxy_port, port_a, port_b = free_port(), free_port(), free_port()
    replacements = {"5601": str(proxy_port), "8801": str(port_a), "8802": str(port_b)}
    paths = []
    for name in ("proxy.toml", "worker-a.toml", "worker-b.toml"):
        text = (EXAMPLES / "two_hosts" / name).read_text()
        for documented, free in replacements.items():
            text = text.replace(documented, free)
        (directory / name).write_text(text)
        paths.append(directory / name)
    return paths[0], paths[1], paths[2]


async def test_two_hosts_proxy_two_workers_and_a_shell_publish(tmp_path: Path):
    proxy_toml, worker_a_toml, worker_b_toml = two_hosts_configs(tmp_path)
    processes = [LoggedProcess(trio_fanout_command("proxy", "--config", str(proxy_toml)))]
    try:
        processes[0].wait_for_log("ZeroMQ proxy: clients connect")
        urls = []
        for toml in (worker_a_toml, worker_b_toml):
            worker = LoggedProcess(trio_fanout_command("worker", "--config", str(toml)))
            processes.append(worker)
            match = worker.wait_for_log(r"serving ws://127\.0\.0\.1:(\d+)/ws")
            urls.append(f"ws://127.0.0.1:{match.group(1)}/ws")
        async with open_client(urls[0]) as on_a, open_client(urls[1]) as on_b:
            await on_a.join("lobby")
            await on_b.join("lobby")
            with trio.fail_after(PROCESS_TIMEOUT):
                result = await trio.run_process(
                    [sys.executable, "-m", "trio_fanout", "publish", "--config",
                     str(worker_a_toml), "lobby", '{"name": "shell", "text": "hi"}'],
                    capture_stderr=True,
                )  # fmt: skip
            assert result.returncode == 0
            for client in (on_a, on_b):
                assert await receive_data(client, 1) == [{"name": "shell", "text": "hi"}]
            await on_a.publish("lobby", "from a to b")
            assert await receive_data(on_b, 1) == ["from a to b"]
            # The proxy publishes the heartbeat (every second by default).
            with trio.fail_after(RECEIVE_TIMEOUT):
                assert (await on_b.receive(heartbeats=True))["type"] == "heartbeat"
    finally:
        for process in reversed(processes):
            process.stop()


async def test_two_hosts_on_redis_differ_in_one_line_and_use_redis(
    tmp_path: Path, redis_server: RedisServer
):
    for name in ("worker-a.toml", "worker-b.toml"):
        zmq_lines = (EXAMPLES / "two_hosts" / name).read_text().splitlines()
        redis_lines = (EXAMPLES / "two_hosts_redis" / name).read_text().splitlines()
        assert len(zmq_lines) == len(redis_lines)
        changed = [
            (old, new) for old, new in zip(zmq_lines, redis_lines, strict=True) if old != new
        ]
        assert changed == [
            ('backplane = "zmq://127.0.0.1:5601"', 'backplane = "redis://127.0.0.1:6379"')
        ]
    replacements = {
        "6379": str(redis_server.port),
        "8801": str(free_port()),
        "8802": str(free_port()),
    }
    workers, urls = [], []
    try:
        for name in ("worker-a.toml", "worker-b.toml"):
            text = (EXAMPLES / "two_hosts_redis" / name).read_text()
            for documented, free in replacements.items():
                text = text.replace(documented, free)
            (tmp_path / name).write_text(text)
            worker = LoggedProcess(trio_fanout_command("worker", "--config", str(tmp_path / name)))
            workers.append(worker)
            match = worker.wait_for_log(r"serving ws://127\.0\.0\.1:(\d+)/ws")
            urls.append(f"ws://127.0.0.1:{match.group(1)}/ws")
        async with open_client(urls[0]) as on_a, open_client(urls[1]) as on_b:
            room = f"redis-lobby-{os.getpid()}"
            await on_a.join(room)
            await on_b.join(room)
            with trio.fail_after(PROCESS_TIMEOUT):
                result = await trio.run_process(
                    [sys.executable, "-m", "trio_fanout", "publish", "--config",
                     str(tmp_path / "worker-a.toml"), room, '"over redis"'],
                    capture_stderr=True,
                )  # fmt: skip
            assert result.returncode == 0, result.stderr
            for client in (on_a, on_b):
                assert await receive_data(client, 1) == ["over redis"]
            channel = envelope.room_topic(room)  # a digest: binary, printed raw
            with trio.fail_after(PROCESS_TIMEOUT):
                numsub = await trio.run_process(
                    [b"redis-cli", b"-p", b"%d" % redis_server.port, b"pubsub", b"numsub", channel],
                    capture_stdout=True,
                )
            assert numsub.stdout == channel + b"\n2\n"
    finally:
        for worker in workers:
            worker.stop()


async def test_every_worker_serves_the_chat_page(cluster: ClusterProcess):
    status, body = await http_get(cluster.port, "/")
    assert status == 200
    assert body == (EXAMPLES / "chat.html").read_bytes()


@pytest.mark.skipif(
    browser.CHROMIUM is None, reason="Chromium is not installed (.ci/run installs it)"
)
async def test_the_chat_page_chats_in_a_real_browser(cluster: ClusterProcess):
    page_url = f"http://127.0.0.1:{cluster.port}/?room=lobby&name=ann&say=hello%20from%20ann"
    async with open_client(cluster.url) as python_client:
        await python_client.join("lobby")
        async with browser.open_page(page_url) as page:
            # The page joined by itself and said hello: the Python client hears it.
            heard = await receive_message(python_client)
            assert isinstance(heard.pop("offset"), int)
            assert heard == {
                "type": "message",
                "room": "lobby",
                "data": {"name": "ann", "text": "hello from ann"},
            }
            await python_client.publish("lobby", {"name": "bob", "text": "hi ann"})
            with trio.fail_after(RECEIVE_TIMEOUT):
                log = await page.wait_for_text("log", "bob: hi ann")
            assert "joined lobby" in log
            assert "ann: hello from ann" in log


def test_the_chat_page_opened_from_disk_points_at_the_default_port():
    page = (EXAMPLES / "chat.html").read_text()
    assert '"ws://127.0.0.1:8765/ws"' in page
    # One page, two places: examples/chat.html is the page the workers serve, not a copy.
    assert (EXAMPLES / "chat.html").resolve() == CHAT_PAGE_SOURCE
