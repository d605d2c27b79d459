"""The browser client (/client.js) in a real headless Chromium, against a real cluster: it joins,
receives, publishes with a promise, and reconnects and rejoins by itself when its worker dies or
stops answering."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket

from tests import browser
from tests.helpers import ClusterProcess, connect_on_each_worker, receive_data
from trio_fanout.client import Client

pytestmark = pytest.mark.skipif(
    browser.CHROMIUM is None, reason="Chromium is not installed (.ci/run installs it)"
)

STATIC = Path(__file__).parent.parent / "trio_fanout" / "static"

# The heartbeat of the test cluster, in seconds: short, so that a dead connection shows soon.
HEARTBEAT_INTERVAL = 0.2

# Options of the client under test, in ms: a stopped worker is judged dead after the floor of
# one second without any frame (five missed heartbeats), a connection that lands on it again
# is given up after one second, and retries start within a tenth of a second. The defaults
# (docs/browser-client.md) are slower on purpose; the logic is the same.
CLIENT_OPTIONS = {
    "heartbeatFloorMs": 1000,
    "connectTimeoutMs": 1000,
    "backoffBaseMs": 100,
    "backoffCapMs": 1000,
}

# Bound on anything the page waits for, in ms: each takes well under a few seconds when healthy.
PAGE_TIMEOUT_MS = 15_000

# Installed in the page: the client under test, a record of everything it reports, and
# `until(condition)`, a bounded wait for a condition on that record (checked whenever something
# is recorded), which answers true, or a description of the record if the time ran out.
PAGE_SETUP = (
    """
(async () => {"""
    + browser.IMPORT_CLIENT
    + """
  window.events = [];
  window.received = {};
  let wake = () => {};
  const record = (item) => { events.push(item); wake(); };
  // For tests that open more clients in the page, recorded the same way.
  window.FanoutClient = FanoutClient;
  window.record = record;
  window.client = new FanoutClient(WS_URL, OPTIONS);
  for (const name of ["connected", "disconnected", "reconnecting", "joined", "recovered",
                      "unrecovered", "error"]) {
    client.on(name, (detail) => record([name, detail]));
  }
  window.joinRoom = (room) => client.join(room, (data, meta) => {
    (received[room] ??= []).push(data);
    record(["message", { room, offset: meta.offset }]);
  });
  window.until = (condition, timeoutMs) => new Promise((resolve) => {
    const timer = setTimeout(() => {
      wake = () => {};
      resolve(JSON.stringify({ state: client.state, received, events }));
    }, timeoutMs);
    wake = () => {
      if (condition()) { clearTimeout(timer); wake = () => {}; resolve(true); }
    };
    wake();
  });
  await new Promise((resolve) => client.on("connected", resolve));
  return client.welcome;
})().catch((error) => `the page could not set up the client: ${error.stack}`)
"""
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterProcess]:
    """`trio-fanout run --workers 2` on the embedded ZeroMQ proxy: the client sees only the
    WebSocket, so the backplane makes no difference to it (test_cluster runs both).

    The liveness timeout is long: tests here stop a worker for a few seconds to make its
    clients' connections go silent, and a master that killed it meanwhile could do so while
    the next test's page is fetching /client.js from it (the master's own check of hung
    workers is tested in test_faults)."""
    process = ClusterProcess(
        "--workers", "2", "--heartbeat-interval", str(HEARTBEAT_INTERVAL),
        "--liveness-timeout", "60",
    )  # fmt: skip
    try:
        process.wait_for_workers(2)
        yield process
    finally:
        process.stop()


class ClientPage:
    """A blank page that imports the client from the cluster, across origins as another site's
    page would, set up by ``PAGE_SETUP``."""

    def __init__(self, page: browser.Page, welcome: dict[str, Any]) -> None:
        self.page = page
        self.welcome = welcome

    async def evaluate(self, expression: str) -> Any:
        return await self.page.evaluate(expression)

    async def until(self, condition: str) -> None:
        """Wait until the JavaScript ``condition`` holds in the page."""
        outcome = await self.page.evaluate(f"until(() => {condition}, {PAGE_TIMEOUT_MS})")
        assert outcome is True, f"not {condition} in {PAGE_TIMEOUT_MS} ms: {outcome}"

    async def received(self, room: str) -> list[Any]:
        return await self.page.evaluate(f"received[{json.dumps(room)}] ?? []")  # type: ignore[no-any-return]


@asynccontextmanager
async def open_client_page(
    cluster: ClusterProcess, ws_url: str | None = None
) -> AsyncIterator[ClientPage]:
    """A page whose client comes from ``cluster`` and connects to ``ws_url`` (the cluster's by
    default)."""
    setup = (
        PAGE_SETUP.replace("OPTIONS", json.dumps(CLIENT_OPTIONS))
        .replace("ORIGIN", json.dumps(f"http://127.0.0.1:{cluster.port}"))
        .replace("WS_URL", json.dumps(ws_url or cluster.url))
    )
    # The page is one of the cluster's own (its /healthz), so the module comes from the page's
    # origin: imported from about:blank (an opaque origin, across origins) it sometimes failed
    # to load in a fresh headless Chromium. The chat page tests cover the cross-origin case.
    async with browser.open_page(f"http://127.0.0.1:{cluster.port}/healthz") as page:
        with trio.fail_after(PAGE_TIMEOUT_MS / 1000):
            welcome = await page.evaluate(setup)
        assert isinstance(welcome, dict), welcome
        yield ClientPage(page, welcome)


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """The process ``pid`` stopped (SIGSTOP) for the block, as a hung worker would be; continued
    afterwards, unless the master killed it as hung meanwhile."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


async def the_other_worker(stack: AsyncExitStack, cluster: ClusterProcess, worker: int) -> Client:
    """A Python client on the worker other than ``worker`` (to publish while that one is down)."""
    by_worker = await connect_on_each_worker(stack, cluster.url)
    return by_worker[2 if worker == 1 else 1][0]


async def test_the_client_joins_receives_and_publishes_with_promises(cluster: ClusterProcess):
    async with AsyncExitStack() as stack:
        by_worker = await connect_on_each_worker(stack, cluster.url)
        python_client = by_worker[1][0]
        await python_client.join("lobby")
        async with open_client_page(cluster) as page:
            assert page.welcome.get("heartbeatInterval") == HEARTBEAT_INTERVAL, page.welcome
            joined = await page.evaluate('joinRoom("lobby")')
            assert joined["room"] == "lobby"
            for text in ("one", "two", "three"):
                await by_worker[2][0].publish("lobby", text)
            await page.until("received.lobby?.length === 3")
            assert await page.received("lobby") == ["one", "two", "three"]

            # A publish resolves on its ack; the Python client receives it.
            ack = await page.evaluate('client.publish("lobby", {text: "from the page"})')
            assert set(ack) == {"offset"}
            assert await receive_data(python_client, 4) == [
                "one", "two", "three", {"text": "from the page"}
            ]  # fmt: skip

            # Refusals reject with the server's code; nothing reaches the room.
            refused = await page.evaluate(
                'client.publish("", "x").then(() => "resolved", (e) => [e.name, e.code])'
            )
            assert refused == ["FanoutError", "bad_room"]
            refused_join = await page.evaluate(
                'joinRoom("bad\\u0001room").then(() => "resolved", (e) => e.code)'
            )
            assert refused_join == "bad_room"

            # After leave, the room's callback gets nothing more: a later message of the same
            # publisher to another room arrives, the one to the room left does not.
            await page.evaluate('joinRoom("other")')
            await page.evaluate('client.leave("lobby")')
            await by_worker[2][0].publish("lobby", "after leave")
            await by_worker[2][0].publish("other", "marker")
            await page.until("received.other?.length === 1")
            assert await page.received("lobby") == [
                "one",
                "two",
                "three",
                {"text": "from the page"},
            ]

            # Closed, the client refuses everything and never reconnects.
            closed = await page.evaluate(
                'client.close(), client.publish("lobby", "x").then(() => "resolved", (e) => e.code)'
            )
            assert closed == "closed"
            assert await page.evaluate("client.state") == "closed"


async def test_the_client_reconnects_by_itself_after_its_worker_is_killed(
    cluster: ClusterProcess,
):
    async with open_client_page(cluster) as page, AsyncExitStack() as stack:
        await page.evaluate('joinRoom("survivors")')
        publisher = await the_other_worker(stack, cluster, page.welcome["worker"])
        await publisher.publish("survivors", "before")
        await page.until("received.survivors?.length === 1")

        os.kill(page.welcome["pid"], signal.SIGKILL)
        # The client notices the close, reconnects (to the other worker, or to the restarted
        # one) and rejoins the room, with no code of the page's.
        await page.until(
            'events.some(([name, d]) => name === "joined" && d.room === "survivors" && d.rejoin)'
        )
        assert await page.evaluate("client.welcome.pid") != page.welcome["pid"]
        disconnected = await page.evaluate(
            'events.filter(([name]) => name === "disconnected").map(([, d]) => d.code)'
        )
        assert disconnected == [1006]  # closed without a closing handshake
        await publisher.publish("survivors", "after")
        await page.until("received.survivors?.length === 2")
        assert await page.received("survivors") == ["before", "after"]
        # It rejoined from where it was (the room's sequencer, in the master, lived on).
        joined = await page.evaluate('events.filter(([name]) => name === "joined")')
        first, again = joined[0][1], joined[1][1]
        assert again == {**first, "offset": first["offset"] + 1, "rejoin": True, "recovered": True}


async def test_the_client_gives_up_a_silent_connection_and_reconnects(cluster: ClusterProcess):
    async with open_client_page(cluster) as page, AsyncExitStack() as stack:
        await page.evaluate('joinRoom("patient")')
        publisher = await the_other_worker(stack, cluster, page.welcome["worker"])
        with stopped(page.welcome["pid"]):
            # A stopped worker neither closes nor answers: only the missing heartbeats tell.
            started = trio.current_time()
            await page.until('events.some(([name]) => name === "disconnected")')
            waited = trio.current_time() - started
            await page.until(
                'events.some(([name, d]) => name === "joined" && d.room === "patient" && d.rejoin)'
            )
            assert await page.evaluate("client.welcome.worker") != page.welcome["worker"]
            await publisher.publish("patient", "to the survivor")
            await page.until("received.patient?.length === 1")
        disconnected = await page.evaluate('events.find(([name]) => name === "disconnected")[1]')
        assert disconnected["code"] is None
        assert disconnected["reason"] == "missed heartbeats"
        # Judged dead after the floor of one second without a frame (the last one came up to a
        # heartbeat interval before the stop), not much later.
        assert 1.0 - HEARTBEAT_INTERVAL - 0.05 < waited < 5
        assert await page.received("patient") == ["to the survivor"]


async def test_the_client_recovers_what_it_missed_exactly_once_in_order(cluster: ClusterProcess):
    async with open_client_page(cluster) as page, AsyncExitStack() as stack:
        joined = await page.evaluate('joinRoom("ledger")')
        publisher = await the_other_worker(stack, cluster, page.welcome["worker"])
        await publisher.publish("ledger", "before")
        await page.until("received.ledger?.length === 1")
        with stopped(page.welcome["pid"]):
            # Published while the page's worker is stopped: the page cannot get them live.
            for number in range(20):
                await publisher.publish("ledger", number)
            assert not await page.evaluate('events.some(([name]) => name === "disconnected")')
            # The client gives the silent connection up, rejoins on the other worker with
            # `since`, and gets the 20 before anything newer.
            await page.until('events.some(([name]) => name === "recovered")')
            await publisher.publish("ledger", "after")
            await page.until('received.ledger?.includes("after")')
        assert await page.received("ledger") == ["before", *range(20), "after"]
        reported = await page.evaluate(
            'events.filter(([name]) => name === "recovered" || name === "unrecovered")'
        )
        assert reported == [
            [
                "recovered",
                {"room": "ledger", "epoch": joined["epoch"], "offset": joined["offset"] + 21},
            ]
        ]
        offsets = await page.evaluate(
            'events.filter(([name]) => name === "message").map(([, d]) => d.offset)'
        )
        assert offsets == list(range(joined["offset"] + 1, joined["offset"] + 23))


# A server of protocol version 2, scripted, for what a real one cannot be made to do on demand:
# send the duplicates it promises never to send, and change a room's epoch at a chosen moment
# (once before a rejoin, once while connected). Otherwise it does what docs/protocol.md
# ("Offsets, history and recovery") says a server does. It tests the client's side: the `since`
# it sends, what it delivers and what it reports.
Step = Callable[[trio_websocket.WebSocketConnection], Awaitable[None]]


@asynccontextmanager
async def scripted_server(steps: list[Step]) -> AsyncIterator[str]:
    """A WebSocket server on loopback whose n-th connection is welcomed (no heartbeats), has its
    first ping answered, and is then played by ``steps[n]``; its URL."""
    remaining = list(steps)

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        await send(ws, type="welcome", worker=1, pid=os.getpid(), heartbeat_interval=0)
        # A client without a token pings before it counts itself connected.
        ping = json.loads(await ws.get_message())
        assert ping["type"] == "ping", ping
        await send(ws, type="pong", id=ping["id"])
        if remaining:
            await remaining.pop(0)(ws)
        else:
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None)
        yield f"ws://127.0.0.1:{server.port}/ws"
        nursery.cancel_scope.cancel()


async def send(ws: trio_websocket.WebSocketConnection, **frame: Any) -> None:
    await ws.send_message(json.dumps(frame))


def message(epoch: str, offset: int) -> dict[str, Any]:
    return {"type": "message", "room": "r", "data": f"{epoch}:{offset}", "offset": offset}


async def test_the_client_rejoins_with_since_and_delivers_each_message_once_in_order(
    cluster: ClusterProcess,
):
    sinces: list[Any] = []

    async def receive_join(ws: trio_websocket.WebSocketConnection) -> int:
        frame = json.loads(await ws.get_message())
        assert frame["type"] == "join" and frame["room"] == "r", frame
        sinces.append(frame.get("since"))
        return int(frame["id"])

    async def first(ws: trio_websocket.WebSocketConnection) -> None:
        request_id = await receive_join(ws)
        await send(ws, type="joined", room="r", id=request_id, epoch="e1", offset=5)
        for offset in (6, 7):
            await send(ws, **message("e1", offset))
        # The connection ends here: the client rejoins from offset 7.

    async def second(ws: trio_websocket.WebSocketConnection) -> None:
        request_id = await receive_join(ws)
        await send(ws, type="joined", room="r", id=request_id, epoch="e1", offset=9, recovered=True)
        for offset in (8, 9, 9, 7, 10):  # 9 and 7 again: the client must drop them
            await send(ws, **message("e1", offset))

    async def third(ws: trio_websocket.WebSocketConnection) -> None:
        request_id = await receive_join(ws)
        # The room's numbering started again: nothing old comes.
        await send(
            ws, type="joined", room="r", id=request_id, epoch="e2", offset=3, recovered=False
        )
        await send(ws, **message("e2", 4))
        # And again while connected: the server says so unasked, before the first new message.
        await send(ws, type="joined", room="r", epoch="e3", offset=0, recovered=False)
        await send(ws, **message("e3", 1))
        await trio.sleep_forever()

    async with (
        scripted_server([first, second, third]) as url,
        open_client_page(cluster, url) as page,
    ):
        assert await page.evaluate('joinRoom("r")') == {"room": "r", "epoch": "e1", "offset": 5}
        await page.until('received.r?.includes("e3:1")')
        assert await page.received("r") == [
            "e1:6", "e1:7", "e1:8", "e1:9", "e1:10", "e2:4", "e3:1"
        ]  # fmt: skip
        assert sinces == [None, {"epoch": "e1", "offset": 7}, {"epoch": "e1", "offset": 10}]
        reported = await page.evaluate(
            'events.filter(([name]) => name === "recovered" || name === "unrecovered")'
        )
        assert reported == [
            ["recovered", {"room": "r", "epoch": "e1", "offset": 9}],
            ["unrecovered", {"room": "r", "epoch": "e2", "offset": 3}],
            ["unrecovered", {"room": "r", "epoch": "e3", "offset": 0}],
        ]


async def test_a_publish_rejects_on_timeout_and_when_the_connection_ends(cluster: ClusterProcess):
    published: list[Any] = []

    async def unanswering(ws: trio_websocket.WebSocketConnection) -> None:
        # The first publish is never answered; the second is answered by the end of the
        # connection.
        for _ in range(2):
            published.append(json.loads(await ws.get_message()))
        await ws.aclose()

    async def answering(ws: trio_websocket.WebSocketConnection) -> None:
        frame = json.loads(await ws.get_message())
        published.append(frame)
        await send(ws, type="ack", id=frame["id"], offset=7)
        await trio.sleep_forever()

    async with (
        scripted_server([unanswering, answering]) as url,
        open_client_page(cluster, url) as page,
    ):
        timed_out = await page.evaluate(
            """(async () => {
              const started = performance.now();
              try { await client.publish("r", "first", { timeoutMs: 300 }); return "resolved"; }
              catch (error) { return [error.name, error.code, performance.now() - started]; }
            })()"""
        )
        assert timed_out[:2] == ["FanoutError", "timeout"], timed_out
        assert 300 <= timed_out[2] < 5_000, timed_out
        # The default timeout (10 s) is far off: the connection's end rejects it first.
        ended = await page.evaluate(
            'client.publish("r", "second").then(() => "resolved", (e) => e.code)'
        )
        assert ended == "disconnected"
        await page.until('events.filter(([name]) => name === "connected").length === 2')
        # On the next connection an acknowledged publish resolves with its offset.
        assert await page.evaluate('client.publish("r", "third")') == {"offset": 7}
        assert [(frame["type"], frame["data"]) for frame in published] == [
            ("publish", "first"), ("publish", "second"), ("publish", "third")
        ]  # fmt: skip
        assert len({frame["id"] for frame in published}) == 3


# Clients of the backoff test, and their options, in ms: the bound doubles from 100 to the
# cap of 800 in four attempts, and stays there. Four clients in one page: more at once made some
# of Chromium's handshakes to the test's server wait for seconds.
BACKOFF_CLIENTS = 4
BACKOFF_OPTIONS = {"backoffBaseMs": 100, "backoffCapMs": 800}
BACKOFF_ATTEMPTS = 8


def backoff_bound(attempt: int) -> int:
    return min(
        BACKOFF_OPTIONS["backoffCapMs"], BACKOFF_OPTIONS["backoffBaseMs"] * 2 ** (attempt - 1)
    )


async def test_reconnects_back_off_exponentially_up_to_the_cap_with_full_jitter(
    cluster: ClusterProcess,
):
    async def hold(ws: trio_websocket.WebSocketConnection) -> None:
        await trio.sleep_forever()

    async def close(ws: trio_websocket.WebSocketConnection) -> None:
        await ws.aclose()

    # The page's own client stays connected; every later connection is closed right after its
    # welcome, so that the clients under test keep failing and backing off. The clients share
    # the closes, and one that drew short waits takes more of them: enough for the unluckiest
    # to make its attempts too.
    steps: list[Step] = [hold] + [close] * (BACKOFF_CLIENTS * BACKOFF_ATTEMPTS * 4)
    async with scripted_server(steps) as url, open_client_page(cluster, url) as page:
        await page.evaluate(
            f"""(() => {{
              window.backoff = {{ clients: [], log: [] }};
              for (let index = 0; index < {BACKOFF_CLIENTS}; index++) {{
                const client = new FanoutClient({json.dumps(url)}, {json.dumps(BACKOFF_OPTIONS)});
                let waiting = null;
                client.on("reconnecting", ({{ attempt, delayMs }}) => {{
                  waiting = {{ attempt, delayMs, at: performance.now() }};
                }});
                // The next connection's welcome: how long the client did wait.
                client.on("connected", () => {{
                  if (waiting === null) return;
                  const {{ attempt, delayMs, at }} = waiting;
                  backoff.log.push([index, attempt, delayMs, performance.now() - at]);
                  record(["backoff", index]);
                }});
                backoff.clients.push(client);
              }}
            }})()"""
        )
        await page.until(
            "backoff.clients.every((_, index) => backoff.log.filter(([i]) => i === index)"
            f".length >= {BACKOFF_ATTEMPTS})"
        )
        log = await page.evaluate("backoff.clients.forEach((c) => c.close()), backoff.log")
    by_attempt: dict[int, list[float]] = {}
    for index in range(BACKOFF_CLIENTS):
        attempts = [entry for entry in log if entry[0] == index][:BACKOFF_ATTEMPTS]
        # Each failed connection is one more attempt: nothing resets it before stableAfterMs.
        assert [attempt for _, attempt, _, _ in attempts] == list(range(1, BACKOFF_ATTEMPTS + 1))
        for _, attempt, delay, waited in attempts:
            assert 0 <= delay <= backoff_bound(attempt), (index, attempt, delay)
            assert waited >= delay - 2, (index, attempt, delay, waited)  # timer granularity
            by_attempt.setdefault(attempt, []).append(delay)
    for attempt in range(1, BACKOFF_ATTEMPTS + 1):
        # Each attempt's delay is drawn afresh: the clients did not wait alike.
        assert len(set(by_attempt[attempt])) > 1, (attempt, by_attempt[attempt])
    # Full jitter: at the cap, the delays spread over the whole range, not bunched at its top
    # (all 20 of these uniform draws in one half of it has a chance of two in a million).
    capped = [delay for attempt in range(4, 9) for delay in by_attempt[attempt]]
    assert min(capped) < backoff_bound(4) / 2 < max(capped), capped


async def test_a_token_for_a_server_without_tokens_is_said_once_and_the_client_serves_without(
    cluster: ClusterProcess,
):
    async with open_client_page(cluster) as page:
        script = f"""(async () => {{
          const events = [];
          const other = new FanoutClient({json.dumps(cluster.url)}, {{
            token: "a-token-this-server-does-not-take",
            backoffBaseMs: 50,
          }});
          for (const name of ["connected", "disconnected", "reconnecting", "error"]) {{
            other.on(name, (detail) => events.push([name, detail.code ?? null]));
          }}
          await new Promise((resolve) => other.on("connected", resolve));
          const joined = await other.join("tokenless", () => {{}});
          const state = other.state;
          other.close();
          return {{ events, auth: other.auth, room: joined.room, state }};
        }})()"""
        with trio.fail_after(PAGE_TIMEOUT_MS / 1000):
            result = await page.evaluate(script)
    assert result == {
        "events": [["error", "unknown_type"], ["connected", None]],
        "auth": None,
        "room": "tokenless",
        "state": "connected",
    }, result
