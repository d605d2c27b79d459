"""Every example does what its documentation says, started the way it says."""

from __future__ import annotations

import itertools
import os
import re
import signal
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
        for index, toml in enumerate((worker_a_toml, worker_b_toml), start=1):
            worker = LoggedProcess(
                trio_fanout_command("worker", "--config", str(toml), "--index", str(index))
            )
            processes.append(worker)
            match = worker.wait_for_log(
                rf"worker {index} \(pid \d+\) serving ws://127\.0\.0\.1:(\d+)/ws"
            )
            urls.append(f"ws://127.0.0.1:{match.group(1)}/ws")
        async with open_client(urls[0]) as on_a, open_client(urls[1]) as on_b:
            # Each standalone worker goes by the number it was given.
            assert (on_a.welcome["worker"], on_b.welcome["worker"]) == (1, 2)
            await on_a.join("lobby")
            await on_b.join("lobby")
            with trio.fail_after(PROCESS_TIMEOUT):
                result = await trio.run_process(
                    [sys.executable, "-m", "trio_fanout", "publish", "--config",
                     str(worker_a_toml), "lobby", '{"name": "shell", "text": "hi"}'],
                    capture_stdout=True, capture_stderr=True,
                )  # fmt: skip
            assert result.returncode == 0
            assert result.stdout == b"published to room 'lobby' at offset 1\n"
            for client in (on_a, on_b):
                assert await receive_data(client, 1) == [{"name": "shell", "text": "hi"}]
            with trio.fail_after(PROCESS_TIMEOUT):
                result = await trio.run_process(
                    [sys.executable, "-m", "trio_fanout", "publish", "--config",
                     str(worker_a_toml), "--broadcast", '"maintenance at noon"'],
                    capture_stdout=True, capture_stderr=True,
                )  # fmt: skip
            assert result.stdout == b"sent to every connection\n"
            for client in (on_a, on_b):
                with trio.fail_after(RECEIVE_TIMEOUT):
                    frame = await client.receive()
                assert frame == {"type": "message", "data": "maintenance at noon"}
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
            # A room whose channel (a binary digest) holds no NUL byte: it goes to redis-cli's
            # argv below, which cannot carry one.
            room = next(
                name
                for number in itertools.count()
                if b"\0" not in envelope.room_topic(name := f"redis-lobby-{os.getpid()}-{number}")
            )
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


async def test_every_worker_serves_the_browser_client_to_any_origin(cluster: ClusterProcess):
    for path, content_type in [
        ("/client.js", "text/javascript; charset=utf-8"),
        ("/client.d.ts", "application/typescript; charset=utf-8"),
    ]:
        stream = await trio.open_tcp_stream("127.0.0.1", cluster.port)
        async with stream:
            request = f"GET {path} HTTP/1.1\r\nHost: test\r\nOrigin: null\r\n\r\n"
            await stream.send_all(request.encode())
            response = b""
            with trio.fail_after(RECEIVE_TIMEOUT):
                while chunk := await stream.receive_some():
                    response += chunk
        head, _, body = response.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        assert lines[0] == "HTTP/1.1 200 OK"
        assert f"Content-Type: {content_type}" in lines
        assert "Access-Control-Allow-Origin: *" in lines
        assert body == (CHAT_PAGE_SOURCE.parent / path.lstrip("/")).read_bytes()


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


@pytest.mark.skipif(
    browser.CHROMIUM is None, reason="Chromium is not installed (.ci/run installs it)"
)
async def test_the_chat_page_opened_from_disk_loads_the_client_from_the_server(
    cluster: ClusterProcess,
):
    # From disk, the page imports /client.js from the chat server's origin (the module is
    # served to any origin); ?server= stands in for the default port here.
    page_url = f"{CHAT_PAGE_SOURCE.as_uri()}?server={cluster.url}&room=disk&name=dee&say=hi"
    async with open_client(cluster.url) as python_client:
        await python_client.join("disk")
        async with browser.open_page(page_url) as page:
            message = await receive_message(python_client)
            assert (message["room"], message["data"]) == ("disk", {"name": "dee", "text": "hi"})
            with trio.fail_after(RECEIVE_TIMEOUT):
                status = await page.wait_for_text("status", "connected to worker")
            assert status.startswith("connected to worker")


@pytest.mark.skipif(
    browser.CHROMIUM is None, reason="Chromium is not installed (.ci/run installs it)"
)
async def test_the_chat_page_shows_a_reconnect_and_keeps_chatting(cluster: ClusterProcess):
    page_url = f"http://127.0.0.1:{cluster.port}/?room=phoenix&name=ann"
    async with browser.open_page(page_url) as page, AsyncExitStack() as stack:
        with trio.fail_after(RECEIVE_TIMEOUT):
            await page.wait_for_text("log", "joined phoenix")
        status = await page.evaluate('document.getElementById("status").innerText')
        match = re.fullmatch(r"connected to worker (\d) \(pid (\d+)\)", status)
        assert match, status
        # A member on the other worker, which stays up.
        by_worker = await connect_on_each_worker(stack, cluster.url)
        python_client = by_worker[2 if match.group(1) == "1" else 1][0]
        await python_client.join("phoenix")
        # The page's worker dies; the client reconnects and rejoins, and the page says so.
        os.kill(int(match.group(2)), signal.SIGKILL)
        with trio.fail_after(RECEIVE_TIMEOUT):
            await page.wait_for_text("log", "disconnected (1006)")
            # The cluster keeps the room's messages: the client recovered (nothing was missed).
            await page.wait_for_text("status", "nothing missed")
            await page.wait_for_text("log", "rejoined phoenix")
        await python_client.publish("phoenix", {"name": "bob", "text": "still here?"})
        with trio.fail_after(RECEIVE_TIMEOUT):
            await page.wait_for_text("log", "bob: still here?")
        await page.evaluate(
            'document.getElementById("text").value = "yes";'
            'document.getElementById("say").requestSubmit()'
        )
        assert await receive_data(python_client, 2) == [
            {"name": "bob", "text": "still here?"},
            {"name": "ann", "text": "yes"},
        ]


def test_the_chat_page_opened_from_disk_points_at_the_default_port():
    page = (EXAMPLES / "chat.html").read_text()
    assert '"ws://127.0.0.1:8765/ws"' in page
    # One page, two places: examples/chat.html is the page the workers serve, not a copy.
    assert (EXAMPLES / "chat.html").resolve() == CHAT_PAGE_SOURCE


async def test_the_reconnecting_client_example_lives_through_a_server_restart():
    with trio.fail_after(PROCESS_TIMEOUT):
        result = await trio.run_process(
            [sys.executable, str(EXAMPLES / "reconnecting_client.py")],
            capture_stdout=True, capture_stderr=True,
        )  # fmt: skip
    assert result.stdout.decode().splitlines() == [
        "connected to worker 1",
        "disconnected; reconnecting",
        "connected to worker 1",
        "rejoined lobby and recovered what was missed",
        "message 1 sent while the client was away",
    ]
