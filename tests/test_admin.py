"""The admin port against real processes: /metrics scraped during real traffic on
`trio-fanout run --workers 2`, the HTTP API publishing to real clients, the status page in a
headless Chromium, the examples that publish through the API, and bad requests that must not
hurt the master."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from tests import browser
from tests.helpers import (
    RECEIVE_TIMEOUT,
    START_TIMEOUT,
    ClusterProcess,
    LoggedProcess,
    connect_on_each_worker,
    receive_data,
    receive_message,
    trio_fanout_command,
)
from tests.test_limits import SMALL_RECEIVE_BUFFER, RawClient
from trio_fanout import admin, protocol
from trio_fanout.client import open_client
from trio_fanout.emitter import open_emitter

EXAMPLES = Path(__file__).parent.parent / "examples"
API_KEY = "test-key-3f9a1c"

# The queue bound of the test cluster: small, so that a client that stops reading is cut after
# a few of the test's messages of PAYLOAD_BYTES.
QUEUE_BOUND = 65536
PAYLOAD_BYTES = 16384


class AdminCluster(ClusterProcess):
    """`trio-fanout run` with its admin port on a free port (read from its log)."""

    def __init__(self, *args: str) -> None:
        super().__init__("--admin-port", "0", *args)
        match = self.wait_for_log(r"admin port on http://[\d.]+:(\d+)/")
        self.admin_port = int(match.group(1))
        self.admin = f"http://127.0.0.1:{self.admin_port}"


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("admin") / "api.key"
    path.write_text(API_KEY + "\n")
    return path


@pytest.fixture(scope="module")
def node(key_file: Path) -> Iterator[AdminCluster]:
    """Two workers, no heartbeat (so that every delivery counted is the test's own), a small
    queue bound, and the API on."""
    settings = key_file.parent / "node.toml"
    settings.write_text(f"max_queued_bytes = {QUEUE_BOUND}\n")
    cluster = AdminCluster(
        "--workers", "2", "--heartbeat-interval", "0", "--api-key-file", str(key_file),
        "--config", str(settings),
    )  # fmt: skip
    try:
        cluster.wait_for_workers(2)
        yield cluster
    finally:
        cluster.stop()


def _request(
    url: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, str, bytes]:
    """One HTTP request, as curl would make it: status, content type, body."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=RECEIVE_TIMEOUT) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers["Content-Type"], error.read()


async def http(
    url: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, str, bytes]:
    with trio.fail_after(RECEIVE_TIMEOUT + 1):
        return await trio.to_thread.run_sync(_request, url, method, body, headers)


async def api(
    node: AdminCluster, method: str, path: str, value: object = None, key: str | None = API_KEY
) -> tuple[int, dict]:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    body = None if value is None else json.dumps(value).encode()
    status, content_type, answer = await http(node.admin + path, method, body, headers)
    assert content_type == "application/json", content_type
    return status, json.loads(answer)


class Scrape:
    """One /metrics answer, parsed with prometheus-client's own parser."""

    def __init__(self, text: str) -> None:
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[sample.name, frozenset(sample.labels.items())] = sample.value

    def __call__(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def exposed(self, name: str, **labels: str) -> bool:
        """Whether the sample is in the scrape at all (``__call__`` reads a missing one as 0)."""
        return (name, frozenset(labels.items())) in self.samples

    def total(self, name: str, **labels: str) -> float:
        """The sum over every sample of ``name`` whose labels include ``labels``."""
        wanted = set(labels.items())
        return sum(
            value
            for (sample_name, sample_labels), value in self.samples.items()
            if sample_name == name and wanted <= sample_labels
        )


async def scrape(node: AdminCluster) -> Scrape:
    status, content_type, body = await http(node.admin + "/metrics")
    assert status == 200
    assert content_type == CONTENT_TYPE_LATEST
    return Scrape(body.decode())


async def test_metrics_count_joins_publishes_and_deliveries_per_worker(node: AdminCluster):
    before = await scrape(node)
    async with AsyncExitStack() as stack:
        by_worker = await connect_on_each_worker(stack, node.url)
        one, two = by_worker[1][0], by_worker[2][0]
        for client in (one, two):
            await client.join("counted")
        for number in range(5):
            await one.publish("counted", number)
        for client in (one, two):
            for number in range(5):
                assert (await receive_message(client))["data"] == number
        during = await scrape(node)
        for worker in ("1", "2"):
            assert during("trio_fanout_connections", worker=worker) >= 1
            assert during("trio_fanout_rooms", worker=worker) >= 1
            assert during("trio_fanout_worker_up", worker=worker) == 1
        await one.leave("counted")

    after = await scrape(node)

    def moved(name: str, worker: str) -> float:
        return after(name, worker=worker) - before(name, worker=worker)

    assert moved("trio_fanout_joins_total", "1") == 1
    assert moved("trio_fanout_joins_total", "2") == 1
    assert moved("trio_fanout_leaves_total", "1") == 1
    assert moved("trio_fanout_messages_published_total", "1") == 5
    assert moved("trio_fanout_messages_published_total", "2") == 0
    for worker in ("1", "2"):
        assert moved("trio_fanout_backplane_received_total", worker) == 5
        assert moved("trio_fanout_messages_delivered_total", worker) == 5
        # Every frame went out in some send: the welcome, joined, left and the 5 messages.
        assert moved("trio_fanout_frames_sent_total", worker) >= 7
        assert moved("trio_fanout_socket_sends_total", worker) >= 1
        assert moved("trio_fanout_socket_sends_total", worker) <= moved(
            "trio_fanout_frames_sent_total", worker
        )


async def test_metrics_count_errors_and_refused_handshakes(node: AdminCluster):
    before = await scrape(node)
    async with AsyncExitStack() as stack:
        client = (await connect_on_each_worker(stack, node.url))[1][0]
        await client.send({"type": "leave", "room": "never-joined", "id": 1})
        with trio.fail_after(RECEIVE_TIMEOUT):
            assert (await client.receive())["code"] == "not_member"
    ws_port_root = f"http://127.0.0.1:{node.port}"
    assert (await http(ws_port_root + "/no-such-page"))[0] == 404
    after = await scrape(node)
    assert (
        after("trio_fanout_errors_total", worker="1", code="not_member")
        == before("trio_fanout_errors_total", worker="1", code="not_member") + 1
    )
    assert (
        after.total("trio_fanout_handshakes_refused_total", status="404")
        == before.total("trio_fanout_handshakes_refused_total", status="404") + 1
    )


async def test_a_client_that_stops_reading_is_counted_as_a_slow_close(node: AdminCluster):
    before = await scrape(node)
    slow = await RawClient.connect(node.port, receive_buffer=SMALL_RECEIVE_BUFFER)
    try:
        await slow.join("firehose")
        payload = "x" * PAYLOAD_BYTES
        async with open_emitter(node.backplane_url) as emitter:
            # 4,000 messages of 16 KiB would be 64 MiB: far past what the queue bound, the
            # kernel's buffers and the client's window hold together.
            for number in range(4000):
                await emitter.publish("firehose", [number, payload])
                if number % 100 == 99:
                    now = await scrape(node)
                    if now.total("trio_fanout_slow_client_closes_total") > before.total(
                        "trio_fanout_slow_client_closes_total"
                    ):
                        break
            else:
                raise AssertionError("the client that stopped reading was never cut")
        assert now.total("trio_fanout_frames_dropped_total") > before.total(
            "trio_fanout_frames_dropped_total"
        )
    finally:
        await slow.stream.aclose()


async def test_the_api_publishes_to_clients_and_answers_the_offset(node: AdminCluster):
    async with AsyncExitStack() as stack:
        by_worker = await connect_on_each_worker(stack, node.url)
        members = [by_worker[1][0], by_worker[2][0]]
        for member in members:
            await member.join("api-room")
        status, answer = await api(node, "POST", "/api/publish", {"room": "api-room", "data": 1})
        assert status == 200, answer
        assert answer["room"] == "api-room"
        for member in members:
            message = await receive_message(member)
            assert message["data"] == 1
            assert message["offset"] == answer["offset"]
        status, second = await api(node, "POST", "/api/publish", {"room": "api-room", "data": 2})
        assert (status, second["offset"], second["epoch"]) == (
            200, answer["offset"] + 1, answer["epoch"],
        )  # fmt: skip
        for member in members:
            assert (await receive_message(member))["data"] == 2
        # Without room: a broadcast, to every connection.
        status, answer = await api(node, "POST", "/api/publish", {"data": "to all"})
        assert (status, answer) == (200, {"broadcast": True})
        for member in members:
            assert (await receive_message(member))["data"] == "to all"

        status, info = await api(node, "GET", "/api/info")
        assert status == 200
        workers = {entry["worker"]: entry for entry in info["workers"]}
        assert set(workers) == {1, 2}
        for index, member in zip((1, 2), members, strict=True):
            assert workers[index]["pid"] == member.pid
            assert workers[index]["rooms"]["api-room"] == 1
            assert workers[index]["connections"] >= 1


async def test_the_api_needs_the_key(node: AdminCluster):
    async with AsyncExitStack() as stack:
        member = (await connect_on_each_worker(stack, node.url))[1][0]
        await member.join("guarded")
        for key in (None, "wrong-key", API_KEY + "x", ""):
            status, answer = await api(
                node, "POST", "/api/publish", {"room": "guarded", "data": "no"}, key=key
            )
            assert (status, answer["error"]) == (401, "unauthorized")
        status, answer = await api(node, "GET", "/api/info", key="wrong-key")
        assert status == 401
        # Nothing went through: the next message the member gets is the one with the key.
        status, _ = await api(node, "POST", "/api/publish", {"room": "guarded", "data": "yes"})
        assert status == 200
        assert (await receive_message(member))["data"] == "yes"
    # The key is in no log line.
    assert API_KEY not in node.log()


@pytest.mark.parametrize(
    ("body", "error", "mentions"),
    [
        (b"{not json", "invalid_json", "not JSON"),
        (b"[1, 2]", "invalid_json", "object"),
        (b'{"room": "r"}', "invalid_data", "data"),
        (b'{"room": 5, "data": 1}', "invalid_room", "string"),
        (b'{"room": "", "data": 1}', "invalid_room", "room"),
        (b'{"room": "' + b"r" * 201 + b'", "data": 1}', "invalid_room", "room"),
        (b'{"room": "r", "data": NaN}', "invalid_data", ""),
        # Neither a misspelt room nor a null one may become a broadcast to every connection.
        (b'{"rooms": "r", "data": 1}', "unknown_field", "'rooms'"),
        (b'{"room": null, "data": 1}', "invalid_room", "leave it out to broadcast"),
    ],
)
async def test_bad_publishes_get_a_400_naming_the_problem(
    node: AdminCluster, body: bytes, error: str, mentions: str
):
    status, content_type, answer = await http(
        node.admin + "/api/publish", "POST", body, {"Authorization": f"Bearer {API_KEY}"}
    )
    problem = json.loads(answer)
    assert (status, content_type, problem["error"]) == (400, "application/json", error)
    assert mentions in problem["message"]


async def test_the_admin_port_refuses_what_it_does_not_serve(node: AdminCluster):
    key = {"Authorization": f"Bearer {API_KEY}"}
    too_large = json.dumps({"room": "r", "data": "x" * (1024 * 1024)}).encode()
    assert (await http(node.admin + "/api/publish", "POST", too_large, key))[0] == 413
    assert (await http(node.admin + "/api/publish", "GET", None, key))[0] == 405
    assert (await http(node.admin + "/api/nothing", "GET", None, key))[0] == 404
    assert (await http(node.admin + "/nothing"))[0] == 404
    assert (await http(node.admin + "/metrics", "POST", b""))[0] == 405


async def test_bad_requests_do_not_hurt_the_admin_port(node: AdminCluster):
    """Junk, a TLS handshake, a head that never ends and a body shorter than announced each
    get an answer or a close; the master still serves, and still has its workers."""
    junk = [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"GARBAGE\x00\x01\r\n\r\n",
        b"GET /metrics HTTP/9.9\r\n\r\n",
        b"POST /api/publish HTTP/1.1\r\nContent-Length: 100\r\n\r\n{}",
        b"POST /api/publish HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"POST /api/publish HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n",  # a digit, not ASCII
        b"POST /api/publish HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 5000,
    ]
    for data in junk:
        stream = await trio.open_tcp_stream("127.0.0.1", node.admin_port)
        async with stream:
            with trio.fail_after(RECEIVE_TIMEOUT):
                try:
                    await stream.send_all(data)
                    await stream.send_eof()
                    while await stream.receive_some(65536):
                        pass
                except trio.BrokenResourceError:
                    pass  # reset by the server after its answer: also a way to refuse
    assert node.process.poll() is None
    assert "Traceback" not in node.log()
    metrics = await scrape(node)
    assert metrics("trio_fanout_worker_up", worker="1") == 1
    assert metrics("trio_fanout_worker_up", worker="2") == 1


async def test_idle_connections_cannot_lock_the_scraper_out(node: AdminCluster):
    """As many connections as the admin port serves at once, each saying nothing: a scrape
    still gets its answer, taking the place of the one that waited longest."""
    idle = [
        await trio.open_tcp_stream("127.0.0.1", node.admin_port)
        for _ in range(admin.MAX_CONNECTIONS)
    ]
    try:
        # Within half the admin port's request timeout, so that no idle connection is closed
        # for its silence: only to make room.
        with trio.fail_after(admin.REQUEST_TIMEOUT / 2):
            for worker in ("1", "2", "1"):
                assert (await scrape(node))("trio_fanout_worker_up", worker=worker) == 1
            assert await idle[0].receive_some(1) == b""  # the oldest made room
    finally:
        for stream in idle:
            await stream.aclose()


async def test_the_python_example_publishes_through_the_api(node: AdminCluster, key_file: Path):
    async with AsyncExitStack() as stack:
        member = (await connect_on_each_worker(stack, node.url))[2][0]
        await member.join("from-python")
        with trio.fail_after(START_TIMEOUT):
            result = await trio.run_process(
                [sys.executable, str(EXAMPLES / "publish_api.py"), "--admin", node.admin,
                 "--key-file", str(key_file), "from-python", '{"text": "hi"}'],
                capture_stdout=True, capture_stderr=True,
            )  # fmt: skip
        message = await receive_message(member)
        assert message["data"] == {"text": "hi"}
        assert result.stdout.decode() == f"published to from-python at offset {message['offset']}\n"


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
async def test_the_node_example_publishes_through_the_api(node: AdminCluster, key_file: Path):
    async with AsyncExitStack() as stack:
        member = (await connect_on_each_worker(stack, node.url))[1][0]
        await member.join("from-node")
        with trio.fail_after(START_TIMEOUT):
            result = await trio.run_process(
                ["node", str(EXAMPLES / "publish_api.mjs"), node.admin, str(key_file),
                 "from-node", '{"text": "hi"}'],
                capture_stdout=True, capture_stderr=True,
            )  # fmt: skip
        message = await receive_message(member)
        assert message["data"] == {"text": "hi"}
        assert result.stdout.decode() == f"published to from-node at offset {message['offset']}\n"
        with trio.fail_after(START_TIMEOUT):
            refused = await trio.run_process(
                ["node", str(EXAMPLES / "publish_api.mjs"), node.admin, os.devnull,
                 "from-node", "1"],
                capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
        assert refused.returncode == 1
        assert b"publish refused (401)" in refused.stderr
        # Without ROOM, a broadcast: every connection gets it, the member included.
        with trio.fail_after(START_TIMEOUT):
            broadcast = await trio.run_process(
                ["node", str(EXAMPLES / "publish_api.mjs"), node.admin, str(key_file), '"all"'],
                capture_stdout=True, capture_stderr=True,
            )  # fmt: skip
        assert broadcast.stdout == b"sent to every connection\n"
        frame = await receive_message(member)
        assert frame["data"] == "all"
        assert "room" not in frame  # a broadcast: a message with no room


@pytest.mark.parametrize(
    ("admin_url", "data", "exit_code", "complaint"),
    [
        ("{admin}", "hi", 2, "DATA is not JSON: 'hi'"),
        ("http://127.0.0.1:1", '"hi"', 1, "cannot reach http://127.0.0.1:1"),
    ],
)
async def test_the_python_example_says_what_went_wrong_in_one_line(
    node: AdminCluster, key_file: Path, admin_url: str, data: str, exit_code: int, complaint: str
):
    with trio.fail_after(START_TIMEOUT):
        result = await trio.run_process(
            [sys.executable, str(EXAMPLES / "publish_api.py"),
             "--admin", admin_url.format(admin=node.admin), "--key-file", str(key_file),
             "lobby", data],
            capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
    assert result.returncode == exit_code
    assert complaint in result.stderr.decode()
    assert b"Traceback" not in result.stderr


@pytest.mark.skipif(browser.CHROMIUM is None, reason="Chromium is not installed")
async def test_the_status_page_shows_the_workers_and_a_rising_delivery_rate(node: AdminCluster):
    async with AsyncExitStack() as stack:
        by_worker = await connect_on_each_worker(stack, node.url)
        for clients in by_worker.values():
            await clients[0].join("watched")
        page = await stack.enter_async_context(browser.open_page(node.admin + "/status"))
        with trio.fail_after(START_TIMEOUT):
            rows = await page.evaluate(
                """new Promise((resolve) => {
                    const check = () => {
                        const rows = [...document.querySelectorAll("#workers tr")];
                        if (rows.length === 2 && rows.every((row) => row.cells[1].textContent)) {
                            resolve(rows.map((row) => [...row.cells].map((c) => c.textContent)));
                        } else { setTimeout(check, 50); }
                    };
                    check();
                })"""
            )
        pids = {by_worker[index][0].worker: by_worker[index][0].pid for index in (1, 2)}
        assert [(row[0], row[1]) for row in rows] == [(str(i), str(pids[i])) for i in (1, 2)]
        # Idle (no heartbeat on this node): no deliveries; the first poll has no rate yet.
        assert await page.evaluate("document.getElementById('delivery-rate').textContent") in (
            "0.0", "\u2013",
        )  # fmt: skip

        async def publish_until_cancelled() -> None:
            async with open_emitter(node.backplane_url) as emitter:
                for number in range(1_000_000):
                    await emitter.publish("watched", number)
                    await trio.sleep(0.005)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish_until_cancelled)
            with trio.fail_after(START_TIMEOUT):
                rate = await page.evaluate(
                    """new Promise((resolve) => {
                        const check = () => {
                            const rate = parseFloat(
                                document.getElementById("delivery-rate").textContent);
                            if (rate > 0) resolve(rate); else setTimeout(check, 50);
                        };
                        check();
                    })"""
                )
            nursery.cancel_scope.cancel()
        assert rate > 0


# ---- a node with a heartbeat: latency, and a worker restart --------------------------------


async def test_backplane_latency_and_worker_restarts():
    node = AdminCluster("--workers", "2", "--heartbeat-interval", "0.2")
    try:
        node.wait_for_workers(2)
        first = await scrape(node)
        old_pid = int(first("trio_fanout_worker_pid", worker="1"))
        # Counters are exposed at 0 before their first event, so that Prometheus's increase()
        # sees that event: a series that first appears at 1 increases by nothing.
        for worker in ("1", "2"):
            assert first.exposed("trio_fanout_worker_restarts_total", worker=worker)
            for code in protocol.ERROR_CODES:
                assert first.exposed("trio_fanout_errors_total", worker=worker, code=code)
        for result in ("published", "refused", "unavailable"):
            assert first.exposed("trio_fanout_api_publishes_total", result=result)
        assert first("trio_fanout_worker_restarts_total", worker="1") == 0
        log_lines = len(node.lines)
        os.kill(old_pid, signal.SIGKILL)
        node.wait_for_log(r"worker 1 \(pid \d+\) serving", start=log_lines)
        after = await scrape(node)
        assert after("trio_fanout_worker_restarts_total", worker="1") == 1
        assert after("trio_fanout_worker_restarts_total", worker="2") == 0
        assert after("trio_fanout_worker_up", worker="1") == 1
        assert after("trio_fanout_worker_pid", worker="1") not in (0, old_pid)
        # The heartbeat went through the backplane to each worker, its time measured there.
        worker_two = after("trio_fanout_backplane_latency_seconds_count", worker="2")
        assert worker_two >= 1
        assert after("trio_fanout_backplane_latency_seconds_sum", worker="2") > 0
        assert after("trio_fanout_heartbeats_total", result="sent") >= worker_two
        # The master runs the proxy too: the heartbeats went through it.
        assert after("trio_fanout_proxy_publishes_total", kind="plain") >= worker_two
        # A worker that cannot answer (stopped) is shown as not up, and the scrape still comes.
        stopped_pid = int(after("trio_fanout_worker_pid", worker="2"))
        os.kill(stopped_pid, signal.SIGSTOP)
        try:
            while_stopped = await scrape(node)
        finally:
            os.kill(stopped_pid, signal.SIGCONT)
        assert while_stopped("trio_fanout_worker_up", worker="2") == 0
        assert while_stopped("trio_fanout_worker_up", worker="1") == 1
        assert while_stopped("trio_fanout_worker_restarts_total", worker="1") == 1
        # The API is off without api_key_file: 404, saying how to turn it on.
        status, _, body = await http(node.admin + "/api/info")
        assert (status, json.loads(body)["error"]) == (404, "api_off")
    finally:
        node.stop()


# ---- a worker and a proxy alone --------------------------------------------------------------


async def test_a_worker_alone_serves_its_own_admin_port(tmp_path: Path):
    key = tmp_path / "key"
    key.write_text("k")
    worker = LoggedProcess(
        trio_fanout_command(
            "worker", "--backplane", "memory://alone", "--port", "0", "--index", "3",
            "--admin-port", "0", "--api-key-file", str(key),
        )
    )  # fmt: skip
    try:
        port = int(worker.wait_for_log(r"admin port on http://[\d.]+:(\d+)/").group(1))
        ws_port = int(worker.wait_for_log(r"serving ws://[\d.]+:(\d+)/ws").group(1))
        _, _, body = await http(f"http://127.0.0.1:{port}/metrics")
        metrics = Scrape(body.decode())
        assert metrics("trio_fanout_worker_up", worker="3") == 1
        assert metrics("trio_fanout_worker_pid", worker="3") == worker.process.pid
        async with open_client(f"ws://127.0.0.1:{ws_port}/ws") as client:
            assert client.worker == 3
            await client.join("solo")
            status, _, answer = await http(
                f"http://127.0.0.1:{port}/api/publish",
                "POST",
                b'{"room": "solo", "data": 7}',
                {"Authorization": "Bearer k"},
            )
            assert status == 200
            message = await receive_message(client)
            assert (message["data"], message["offset"]) == (7, json.loads(answer)["offset"])
    finally:
        worker.stop()


async def test_a_proxy_alone_reports_its_heartbeats():
    proxy = LoggedProcess(
        trio_fanout_command(
            "proxy", "--port", "0", "--heartbeat-interval", "0.1", "--admin-port", "0"
        )
    )
    try:
        port = int(proxy.wait_for_log(r"admin port on http://[\d.]+:(\d+)/").group(1))
        with trio.fail_after(START_TIMEOUT):
            while True:
                _, _, body = await http(f"http://127.0.0.1:{port}/metrics")
                if Scrape(body.decode())("trio_fanout_heartbeats_total", result="sent") >= 2:
                    break
                await trio.sleep(0.1)
    finally:
        proxy.stop()


async def test_a_proxy_alone_reports_what_it_routes_and_holds():
    proxy = LoggedProcess(
        trio_fanout_command(
            "proxy", "--port", "0", "--heartbeat-interval", "0", "--admin-port", "0"
        )
    )
    worker: LoggedProcess | None = None
    try:
        admin_port = int(proxy.wait_for_log(r"admin port on http://[\d.]+:(\d+)/").group(1))
        proxy_port = int(proxy.wait_for_log(r"clients connect to tcp://[\d.]+:(\d+)").group(1))
        backplane = f"zmq://127.0.0.1:{proxy_port}"
        worker = LoggedProcess(
            trio_fanout_command("worker", "--backplane", backplane, "--port", "0")
        )
        ws_port = int(worker.wait_for_log(r"serving ws://[\d.]+:(\d+)/ws").group(1))
        async with (
            open_client(f"ws://127.0.0.1:{ws_port}/ws", connect_timeout=START_TIMEOUT) as client,
            open_emitter(backplane) as emitter,
        ):
            await client.join("lobby")
            for number in range(3):
                await emitter.publish("lobby", number)
            await emitter.broadcast("to all")
            assert await receive_data(client, 4) == [0, 1, 2, "to all"]
            _, _, body = await http(f"http://127.0.0.1:{admin_port}/metrics")
        metrics = Scrape(body.decode())
        assert metrics("trio_fanout_proxy_publishes_total", kind="numbered") == 3
        assert metrics("trio_fanout_proxy_publishes_total", kind="plain") == 1
        # Each went to the one worker whose client is in the room (or, broadcast, anywhere).
        assert metrics("trio_fanout_proxy_messages_routed_total") == 4
        assert metrics("trio_fanout_proxy_messages_dropped_total") == 0
        assert metrics("trio_fanout_proxy_peers") == 2  # the worker and the emitter
        assert metrics("trio_fanout_proxy_topics") == 2  # the room's, and the broadcasts'
        assert metrics("trio_fanout_proxy_history_topics") == 1
        assert metrics("trio_fanout_proxy_history_bytes") > 0
    finally:
        if worker is not None:
            worker.stop()
        proxy.stop()


# ---- settings --------------------------------------------------------------------------------


def run_command(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        trio_fanout_command(*args), capture_output=True, text=True, timeout=START_TIMEOUT,
        env={**os.environ, **(env or {})}, check=False,
    )  # fmt: skip


def test_config_shows_the_key_file_never_the_key(key_file: Path):
    result = run_command(
        "config", env={"TRIO_FANOUT_API_KEY_FILE": str(key_file), "TRIO_FANOUT_ADMIN_PORT": "9100"}
    )
    assert result.returncode == 0, result.stderr
    assert f'api_key_file = "{key_file}"  # environment TRIO_FANOUT_API_KEY_FILE' in result.stdout
    assert "admin_port = 9100  # environment TRIO_FANOUT_ADMIN_PORT" in result.stdout
    assert 'admin_host = "127.0.0.1"  # default' in result.stdout
    assert API_KEY not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--api-key-file", "/nonexistent/key"], "api_key_file: cannot read /nonexistent/key"),
        (["--api-key-file", os.devnull], f"api_key_file: {os.devnull} is empty"),
        (["--admin-port", "70000"], "admin_port: must be a port number from 0 to 65535"),
    ],
)
def test_bad_admin_settings_stop_the_command_with_exit_2(args: list[str], message: str):
    result = run_command("run", "--port", "0", "--proxy-port", "0", *args)
    assert result.returncode == 2
    assert f"trio-fanout: error: {message}" in result.stderr
    assert "Traceback" not in result.stderr
