"""What `trio-fanout` writes to standard error: the path of a message at debug, one JSON object a
line with --log-format json, nothing per message or connection at info, and no secrets."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.helpers import (
    RECEIVE_TIMEOUT,
    ClusterProcess,
    LoggedProcess,
    RedisServer,
    connect_on_each_worker,
    receive_message,
    trio_fanout_command,
)
from trio_fanout import tokens
from trio_fanout.client import open_client
from trio_fanout.config import Config
from trio_fanout.emitter import open_emitter
from trio_fanout.logs import JsonFormatter, TextFormatter
from trio_fanout.master import describe_access
from trio_fanout.worker import CountedLines

JSON_KEYS = {"time", "level", "logger", "role", "pid", "message"}


def run_cli(
    *args: str, cwd: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        trio_fanout_command(*args),
        capture_output=True, text=True, timeout=30, cwd=cwd,
        env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
    )  # fmt: skip


@asynccontextmanager
async def running_cluster(*args: str) -> AsyncIterator[ClusterProcess]:
    """`trio-fanout run --workers 2 ARGS`, stopped (and its log complete) at the end."""
    cluster = await trio.to_thread.run_sync(
        lambda: ClusterProcess("--workers", "2", "--heartbeat-interval", "0", *args)
    )
    try:
        await trio.to_thread.run_sync(cluster.wait_for_workers, 2)
        yield cluster
    finally:
        await trio.to_thread.run_sync(cluster.stop)


async def send_one_message_across(cluster: ClusterProcess, room: str) -> int:
    """A client on worker 1 publishes to ``room``, whose one member is on worker 2; the offset
    the member received."""
    async with AsyncExitStack() as stack:
        clients = await connect_on_each_worker(stack, cluster.url)
        sender, member = clients[1][0], clients[2][0]
        await member.join(room)
        await sender.publish(room, {"text": "hello"}, ack=True)
        message = await receive_message(member)
        assert message["data"] == {"text": "hello"}
        offset: int = message["offset"]
        return offset


@pytest.fixture(params=["zmq", "redis"])
def backplane_args(request: pytest.FixtureRequest) -> list[str]:
    if request.param == "redis":
        return ["--backplane", request.getfixturevalue("redis_server").url]
    return []


async def test_debug_shows_the_path_of_one_message_through_the_cluster(backplane_args):
    room = "path of one message"
    async with running_cluster("--log-level", "debug", *backplane_args) as cluster:
        offset = await send_one_message_across(cluster, room)
    log = cluster.log()
    # Greppable by room and offset: each step names the process, the room and the offset.
    received = re.search(
        rf"DEBUG worker 1 \(pid \d+\) trio_fanout.connection: connection (\d+) received "
        rf"Publish\(room='{room}', data={{'text': 'hello'}}",
        log,
    )
    assert received, log
    connection = received.group(1)
    published = re.search(
        rf"DEBUG worker 1 .*: connection {connection} published room='{room}' "
        rf"epoch=(\S+) offset={offset} ",
        log,
    )
    assert published, log
    epoch = published.group(1)
    delivered = rf"DEBUG worker 2 .*: delivered room='{room}' epoch={epoch} offset={offset} "
    assert re.search(delivered + r"to 1 connections", log), log
    assert re.search(rf"DEBUG worker 2 .*: subscribed room='{room}'", log), log
    # Worker 1's two lines in order; worker 2 may write its line first: it receives the
    # message from the sequencer as worker 1 receives its offset.
    assert log.index(received.group(0)) < log.index(published.group(0))


async def test_json_logs_are_one_object_a_line_with_the_fields_of_the_path():
    room = "json path"
    async with running_cluster("--log-level", "debug", "--log-format", "json") as cluster:
        offset = await send_one_message_across(cluster, room)
    lines = [line for line in cluster.log().splitlines() if line != "<end of log>"]
    entries = [json.loads(line) for line in lines]  # every line parses
    for entry in entries:
        assert entry.keys() >= JSON_KEYS, entry
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"]), entry
        assert entry["level"] in {"debug", "info", "warning", "error"}, entry
    assert {entry["role"] for entry in entries} >= {"master", "worker 1", "worker 2"}
    assert len({entry["pid"] for entry in entries}) == 3  # the master and two workers
    path = [entry for entry in entries if entry.get("room") == room and "offset" in entry]
    published = [e for e in path if e["role"] == "worker 1" and "published" in e["message"]]
    assert [(e["offset"], e["logger"]) for e in published] == [(offset, "trio_fanout.worker")]
    assert isinstance(published[0]["connection"], int)
    deliveries = [e for e in path if e["role"] == "worker 2" and e.get("delivered") == 1]
    assert [e["offset"] for e in deliveries] == [offset]
    assert deliveries[0]["epoch"] == published[0]["epoch"]


def test_each_process_names_itself_in_the_json_log():
    commands = {
        "worker 3": ["worker", "--index", "3", "--port", "0", "--backplane", "memory://alone"],
        "proxy": ["proxy", "--port", "0", "--heartbeat-interval", "0"],
    }
    for role, command in commands.items():
        process = LoggedProcess(trio_fanout_command(*command, "--log-format", "json"))
        try:
            process.wait_for_log("serving ws://|clients connect to")
        finally:
            process.stop()
        lines = process.lines[:-1]  # without "<end of log>"
        assert lines, role
        assert {json.loads(line)["role"] for line in lines} == {role}


async def test_at_info_a_burst_of_traffic_adds_no_line(backplane_args):
    async with running_cluster(*backplane_args) as cluster:
        started = len(cluster.lines)
        async with AsyncExitStack() as stack:
            clients = await connect_on_each_worker(stack, cluster.url, per_worker=5)
            members = [client for placed in clients.values() for client in placed]
            for number, client in enumerate(members):
                await client.join(f"room {number % 3}")
            for round_ in range(20):
                for number, client in enumerate(members):
                    await client.publish(f"room {number % 3}", round_)
            async with open_emitter(cluster.backplane_url) as emitter:
                for round_ in range(20):
                    await emitter.publish("room 0", round_)
            for number, client in enumerate(members):
                # 20 from each member of its room, and 20 from the emitter in room 0.
                expected = 20 * len(members[number % 3 :: 3]) + (20 if number % 3 == 0 else 0)
                with trio.fail_after(RECEIVE_TIMEOUT):
                    for _ in range(expected):
                        assert (await client.receive())["type"] == "message"
            # Short-lived connections too: opened, used and closed.
            for _ in range(10):
                async with open_client(cluster.url) as client:
                    await client.join("room 1")
                    await client.publish("room 1", "hi", ack=True)
        during = cluster.lines[started:]
    assert during == [], during
    # Only the start and the stop were logged.
    lifecycle = re.compile(
        r"ZeroMQ proxy|listening on|access: |serving ws://|SIGTERM|closing \d+ clients|stopped"
    )
    assert [line for line in cluster.lines[:-1] if not lifecycle.search(line)] == []


async def test_no_secret_reaches_the_log():
    with tempfile.TemporaryDirectory() as directory:
        server = await trio.to_thread.run_sync(
            lambda: RedisServer(directory, "--requirepass", "the-redis-password")
        )
        try:
            url = f"redis://:the-redis-password@127.0.0.1:{server.port}"
            args = ("--backplane", url, "--log-level", "debug")
            async with running_cluster(*args) as cluster:
                await send_one_message_across(cluster, "secrets")
        finally:
            await trio.to_thread.run_sync(server.stop)
    log = cluster.log()
    assert "listening on" in log
    assert "the-redis-password" not in log
    assert f"redis://:[redacted]@127.0.0.1:{server.port}" in log


def test_the_formatters_redact_url_passwords_and_tokens():
    token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
    for formatter in (TextFormatter("worker 1"), JsonFormatter("worker 1")):
        output = io.StringIO()
        handler = logging.StreamHandler(output)
        handler.setFormatter(formatter)
        log = logging.getLogger("tests.redaction")
        log.addHandler(handler)
        try:
            log.warning("backplane %s, token %s", "rediss://user:pass@host:6380/0", token)
        finally:
            log.removeHandler(handler)
        written = output.getvalue()
        assert "pass@" not in written and token not in written, written
        assert "rediss://user:[redacted]@host:6380/0" in written
        assert "token [redacted]" in written


def test_log_format_is_a_setting_like_the_others(tmp_path):
    settings = tmp_path / "settings.toml"
    settings.write_text('log_format = "json"\n')
    shown = run_cli("config", "--config", str(settings), cwd=tmp_path)
    assert 'log_format = "json"  # file ' in shown.stdout
    shown = run_cli("config", "--log-format", "TEXT", cwd=tmp_path)
    assert 'log_format = "text"  # flag --log-format' in shown.stdout
    refused = run_cli("config", cwd=tmp_path, env={"TRIO_FANOUT_LOG_FORMAT": "xml"})
    assert refused.returncode == 2
    assert refused.stderr == (
        "trio-fanout: error: log_format: must be one of text, json, not 'xml' "
        "(from environment TRIO_FANOUT_LOG_FORMAT)\n"
    )


UPGRADE_HEADERS = (
    "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
)


async def refused_status(port: int, target: str, headers: str = "") -> int:
    """The HTTP status of a WebSocket upgrade of ``target`` that the worker refuses."""
    with trio.fail_after(RECEIVE_TIMEOUT):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            request = f"GET {target} HTTP/1.1\r\nHost: test\r\n{UPGRADE_HEADERS}{headers}\r\n"
            await stream.send_all(request.encode())
            answer = b""
            while chunk := await stream.receive_some():
                answer += chunk
    return int(answer.split()[1])


def warnings_matching(lines: list[str], pattern: str) -> list[dict]:
    """The JSON log lines at warning whose message matches ``pattern``."""
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    return [e for e in entries if e["level"] == "warning" and re.search(pattern, e["message"])]


async def test_refused_handshakes_are_warnings_that_count_every_refusal_and_never_a_token(
    tmp_path,
):
    """A handshake refused for its page's origin, for its token or at max_connections is a
    warning of the worker, at most one a kind per 10 s: the first at once, the rest counted
    and written when the interval ends or, here, when the worker stops, so that the counts add
    up to every refusal."""
    secret = tmp_path / "secret"
    secret.write_text("0123456789abcdef0123456789abcdef\n")
    settings = tmp_path / "trio-fanout.toml"
    settings.write_text(
        f'token_secret_file = "{secret}"\nallowed_origins = ["https://app.example"]\n'
        "max_connections = 1\n"
    )
    forged = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbm4iLCJleHAiOjk5OTk5OTk5OTl9.Zm9yZ2Vk"
    cluster = await trio.to_thread.run_sync(
        lambda: ClusterProcess(
            "--workers", "1", "--heartbeat-interval", "0", "--log-format", "json",
            "--config", str(settings),
        )
    )  # fmt: skip
    try:
        await trio.to_thread.run_sync(cluster.wait_for_workers, 1)
        evil = "Origin: https://evil.example\r\n"
        assert [await refused_status(cluster.port, "/ws", evil) for _ in range(2)] == [403, 403]
        assert await refused_status(cluster.port, f"/ws?token={forged}") == 401
        # The first of each kind is written at once.
        await trio.to_thread.run_sync(
            cluster.wait_for_log, r"refused 1 WebSocket handshakes for their \?token="
        )
        valid = tokens.mint(tokens.read_secret(str(secret)), "holder", ttl=600)
        async with open_client(cluster.url, token=valid) as holder:  # the one connection allowed
            await holder.ping()
            assert [await refused_status(cluster.port, "/ws") for _ in range(3)] == [503] * 3
    finally:
        await trio.to_thread.run_sync(cluster.stop)
    lines = cluster.lines[:-1]

    (access,) = (json.loads(line) for line in lines if '"message": "access: ' in line)
    assert access["role"] == "master"
    assert access["message"] == (
        f"access: tokens required (HS256, token_secret_file {secret}); allowed_origins "
        "https://app.example; no TLS; max_connections 1 per worker; no CURVE on the ZeroMQ "
        "backplane"
    )
    origins = warnings_matching(lines, r"from origins not in allowed_origins")
    assert sum(entry["refused"] for entry in origins) == 2, origins
    assert origins[0]["message"] == (
        "worker 1 refused 1 WebSocket handshakes (HTTP 403) from origins not in allowed_origins "
        "since the last such line, the last from origin 'https://evil.example'"
    )
    assert {(entry["status"], entry["origin"]) for entry in origins} == {
        (403, "https://evil.example")
    }
    (refused_token,) = warnings_matching(lines, r"for their \?token=")
    assert refused_token["status"] == 401
    assert refused_token["reason"] == "the token's signature does not verify"
    assert refused_token["message"].endswith("the last with HTTP 401: " + refused_token["reason"])
    full = warnings_matching(lines, r"is at its max_connections \(1\)")
    assert sum(entry["refused"] for entry in full) == 3, full
    assert full[0]["message"].endswith(
        ": 1 WebSocket upgrades answered 503 since the last such line"
    )
    log = "\n".join(lines)
    assert forged not in log and forged.rsplit(".", 1)[1] not in log


async def test_counted_lines_write_what_they_held_back_when_the_interval_ends(autojump_clock):
    """Without more events to come, the count held back after the first line is still written,
    one interval after that line; a worker's stop writes what is still held."""
    written: list[tuple[float, int, str]] = []

    def report(count: int, last: str) -> None:
        written.append((trio.current_time(), count, last))

    lines = CountedLines(10.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lines.flush_forever)
        start = trio.current_time()
        for n in range(3):
            lines.note("refusal", report, f"number {n}")
        assert written == [(start, 1, "number 0")]
        await trio.sleep(30)
        assert written[1:] == [(start + 10, 2, "number 2")]
        lines.note("refusal", report, "number 3")  # the last line is old: written at once
        lines.note("refusal", report, "number 4")
        assert written[2:] == [(start + 30, 1, "number 3")]
        nursery.cancel_scope.cancel()
    lines.flush_all()
    assert [count for _, count, _ in written] == [1, 2, 1, 1]


def test_the_access_line_names_each_control_and_no_secret(tmp_path):
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = tmp_path / "public.pem"
    public.write_bytes(
        rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    config = Config(
        token_public_key_file=str(public),
        tls_cert_file="/etc/fanout/fullchain.pem",
        tls_key_file="/etc/fanout/privkey.pem",
        backplane="redis://:the-password@10.0.0.6:6379",
        max_connections=500,
    )
    assert describe_access(config) == (
        f"tokens required (RS256, token_public_key_file {public}); any origin; TLS "
        "(tls_cert_file /etc/fanout/fullchain.pem); max_connections 500 per worker"
    )
    assert describe_access(Config(curve_secret_key_file=None)).startswith("no tokens; any origin")


def test_a_message_holding_line_breaks_stays_one_line_in_the_text_format():
    """Text from outside the server (an embedding application's hook reason, say) cannot pass
    for a log line of its own; a traceback keeps its lines. A formatter alone: no process of
    the server lets a line break into a message, which is why this guard is the last one."""
    formatter = TextFormatter("worker 1")
    reason = "no\n2026-11-30 00:00:00,000 ERROR master (pid 1) trio_fanout: forged\r\x1b[2K"
    record = logging.LogRecord(
        "trio_fanout.worker", logging.WARNING, "", 0, "refused: %s", (reason,), None
    )
    line = formatter.format(record)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert line.endswith(
        r"refused: no\n2026-11-30 00:00:00,000 ERROR master (pid 1) trio_fanout: forged\r\x1b[2K"
    )
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("x", logging.ERROR, "", 0, "failed", (), sys.exc_info())
    assert formatter.format(failed).splitlines()[1] == "Traceback (most recent call last):"
