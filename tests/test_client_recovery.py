"""Recovery seen by reconnecting clients, Python and browser (protocol version 2): what was
published while a client was away, or while the backplane was, comes to it once and in order.

Real processes throughout: `trio-fanout run --workers 2` on ZeroMQ and on Redis, a worker killed
with SIGKILL; a redis-server of the test's own, killed and started again; client.js in headless
Chromium.
"""

from __future__ import annotations

import functools
import json
import os
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio

from tests import browser
from tests.helpers import RECEIVE_TIMEOUT, START_TIMEOUT, ClusterProcess, RedisServer, free_port
from tests.test_browser_client import ClientPage, open_client_page
from tests.test_reconnecting import fresh_room, reconnecting_on_workers, until
from trio_fanout.reconnecting import (
    Connected,
    Disconnected,
    NotConnected,
    Reconnecting,
    ReconnectingClient,
    Recovered,
    ServerError,
    Unrecovered,
    open_reconnecting_client,
)

needs_chromium = pytest.mark.skipif(
    browser.CHROMIUM is None, reason="Chromium is not installed (.ci/run installs it)"
)

# Short backoff, so that the clients of the killed worker come back within a second.
FAST_BACKOFF = {"backoff_base": 0.1, "backoff_cap": 0.5}
# The whole of a scenario: kill, reconnections, recovery, on a loaded machine.
SCENARIO_TIMEOUT = 60.0


# The clusters of this module keep more than the default 100 messages a room. A client whose
# reconnection lands in the killed worker's listening socket waits there for its replacement
# (half a second, more on a loaded machine), while the publishers send as fast as their
# acknowledgements come (hundreds a second): with 100 kept, such a client would rightly be told
# that it cannot recover.
CLUSTER_OPTIONS = ("--history-size", "10000")


async def wait_for_restart(cluster: ClusterProcess, victim: int) -> None:
    """The master restarts a killed worker; later tests of the module expect both workers."""
    await trio.to_thread.run_sync(
        functools.partial(cluster.wait_for_log, rf"worker 1 \(pid (?!{victim}\))\d+\) serving")
    )


async def test_messages_published_while_a_client_is_away_come_back_once_in_order(
    cluster: ClusterProcess,
):
    room = fresh_room()
    count = 20
    async with AsyncExitStack() as stack:
        placed = await reconnecting_on_workers(stack, cluster.url, {1: 1, 2: 1}, **FAST_BACKOFF)
        (client,), (publisher,) = placed[1], placed[2]
        await next_connected(client)
        await client.join(room)
        before = await publisher.publish(room, "before", ack=True)
        item, _ = await until(client, dict)
        assert item == {"type": "message", "room": room, "data": "before", "offset": before}

        assert client.welcome is not None
        victim = client.welcome["pid"]
        os.kill(victim, signal.SIGKILL)
        offsets = [await publisher.publish(room, n, ack=True) for n in range(count)]
        assert offsets == [before + 1 + n for n in range(count)]  # type: ignore[operator]

        await until(client, Disconnected)
        connected, _ = await until(client, Connected)
        assert connected.pid != victim  # type: ignore[union-attr]
        recovered, early = await until(client, Recovered)
        assert recovered.room == room and early == []  # type: ignore[union-attr]
        later = await publisher.publish(room, "later", ack=True)
        with trio.fail_after(RECEIVE_TIMEOUT):
            received = [await client.receive() for _ in range(count + 1)]
        assert received == [
            {"type": "message", "room": room, "data": n, "offset": offset}
            for n, offset in [*zip(range(count), offsets, strict=True), ("later", later)]
        ]
    await wait_for_restart(cluster, victim)


async def next_connected(client: ReconnectingClient) -> None:
    """Take the first connection's `Connected`, so that what follows is the test's."""
    _, skipped = await until(client, Connected)
    assert skipped == [], skipped


# Options of the browser clients, in ms: quick retries, like FAST_BACKOFF; and a connection is
# given up after 5 s without a frame, longer than a Redis restart takes (the heartbeats cross
# the backplane, so none arrive while it is down), so that only a real loss makes them leave.
BROWSER_OPTIONS = {"backoffBaseMs": 100, "backoffCapMs": 500, "heartbeatFloorMs": 5000}

# Installed in a client page (see test_browser_client.PAGE_SETUP, which provides FanoutClient
# and record): a pool of clients, each with its own log of events and messages.
POOL_SETUP = """
window.pool = [];
window.openPooled = (url, options) => new Promise((resolve) => {
  const client = new FanoutClient(url, options);
  const index = pool.push({ client, log: [] }) - 1;
  for (const name of ["connected", "disconnected", "recovered", "unrecovered"]) {
    client.on(name, (detail) => { pool[index].log.push([name, detail]); record(["pool", index]); });
  }
  const stop = client.on("connected", () => { stop(); resolve([index, client.welcome]); });
});
window.joinPooled = (index, room) => pool[index].client.join(room, (data, meta) => {
  pool[index].log.push(["message", { offset: meta.offset, data }]);
  record(["pool", index]);
});
"""

# A message as every client reports it, whatever its kind: ("message", offset, data), or an
# event: ("connected",), ("disconnected",), ("recovered",), ("unrecovered", epoch, offset).
Seen = tuple[object, ...]


class Audience:
    """The members of one room: reconnecting Python clients and browser clients (client.js,
    several in one headless Chromium page: one browser is enough, and a browser each would be
    heavy), by worker, each with the record of what it saw since it joined."""

    def __init__(
        self,
        python: dict[int, list[ReconnectingClient]],
        page: ClientPage,
        browser: dict[int, list[int]],
    ) -> None:
        self.python = python
        self.page = page
        self.browser = browser
        self._seen: dict[int, list[Seen]] = {id(client): [] for client in self.all_python}
        # Set when a Python client has seen an event (by kind: "recovered", ...), for the test
        # to wait on.
        self._happened: dict[tuple[int, str], trio.Event] = {}

    def _event(self, client: ReconnectingClient, kind: str) -> trio.Event:
        return self._happened.setdefault((id(client), kind), trio.Event())

    async def python_until(self, workers: tuple[int, ...], kind: str) -> None:
        """Wait until each Python client on ``workers`` has seen an event of ``kind``."""
        for worker in workers:
            for client in self.python[worker]:
                with trio.fail_after(RECEIVE_TIMEOUT):
                    await self._event(client, kind).wait()

    @property
    def all_python(self) -> list[ReconnectingClient]:
        return [client for clients in self.python.values() for client in clients]

    async def join(self, room: str) -> None:
        for client in self.all_python:
            await next_connected(client)
            await client.join(room)
        for indexes in self.browser.values():
            for index in indexes:
                with trio.fail_after(RECEIVE_TIMEOUT):
                    await self.page.evaluate(f"joinPooled({index}, {json.dumps(room)})")

    async def collect(self, client: ReconnectingClient) -> None:
        """Record what ``client`` sees, until the message "end"."""
        seen = self._seen[id(client)]
        async for item in client:
            if isinstance(item, dict):
                seen.append(("message", item["offset"], item["data"]))
                if item["data"] == "end":
                    return
            elif isinstance(item, Unrecovered):
                seen.append(("unrecovered", item.joined["epoch"], item.joined["offset"]))
            elif isinstance(item, Reconnecting):
                continue  # as the pages, which do not listen to "reconnecting"
            else:
                seen.append((type(item).__name__.lower(),))
            self._event(client, seen[-1][0]).set()  # type: ignore[arg-type]

    async def until_all_in_page(self, workers: tuple[int, ...], condition: str) -> None:
        """Wait until ``condition`` (JavaScript, of ``log``) holds for each browser client on
        ``workers``."""
        for worker in workers:
            for index in self.browser[worker]:
                await self.page.until(f"(({{ log }}) => {condition})(pool[{index}])")

    async def seen(self) -> dict[str, tuple[int, list[Seen]]]:
        """What each client saw, by a name that says which client it is, with its worker."""
        found: dict[str, tuple[int, list[Seen]]] = {}
        for worker, clients in self.python.items():
            for number, client in enumerate(clients):
                found[f"python-{worker}-{number}"] = (worker, self._seen[id(client)])
        for worker, indexes in self.browser.items():
            for index in indexes:
                log = await self.page.evaluate(f"pool[{index}].log")
                items: list[Seen] = []
                for name, detail in log[1:]:  # after the first connection's "connected"
                    if name == "message":
                        items.append(("message", detail["offset"], detail["data"]))
                    elif name == "unrecovered":
                        items.append(("unrecovered", detail["epoch"], detail["offset"]))
                    else:
                        items.append((name,))
                found[f"browser-{worker}-{index}"] = (worker, items)
        return found


async def browser_clients_on_workers(
    page: ClientPage, url: str, wanted: dict[int, int], attempts: int = 100
) -> dict[int, list[int]]:
    """Open clients in ``page`` until worker ``w`` holds ``wanted[w]`` of them; extra ones are
    closed. A few at a time, like reconnecting_on_workers (the workers share one socket)."""
    await page.evaluate(POOL_SETUP)
    by_worker: dict[int, list[int]] = {worker: [] for worker in wanted}
    opening = f"openPooled({json.dumps(url)}, {json.dumps(BROWSER_OPTIONS)})"
    for _ in range(0, attempts, 4):
        with trio.fail_after(START_TIMEOUT):
            opened = await page.evaluate(f"Promise.all([{', '.join([opening] * 4)}])")
        for index, welcome in opened:
            worker = welcome["worker"]
            if worker in by_worker and len(by_worker[worker]) < wanted[worker]:
                by_worker[worker].append(index)
            else:
                await page.evaluate(f"pool[{index}].client.close()")
        if all(len(by_worker[worker]) == count for worker, count in wanted.items()):
            return by_worker
    raise AssertionError(f"could not place browser clients as {wanted}")


@asynccontextmanager
async def audience_on_workers(
    stack: AsyncExitStack, cluster: ClusterProcess, per_worker: int
) -> AsyncIterator[tuple[Audience, list[ReconnectingClient]]]:
    """``per_worker`` Python and ``per_worker`` browser clients on each of two workers, and a
    Python publisher on each worker."""
    python = await reconnecting_on_workers(
        stack, cluster.url, {1: per_worker + 1, 2: per_worker + 1}, **FAST_BACKOFF
    )
    publishers = [python[1].pop(), python[2].pop()]
    for publisher in publishers:
        await next_connected(publisher)
    async with open_client_page(cluster) as page:
        wanted = {1: per_worker, 2: per_worker}
        browser_placed = await browser_clients_on_workers(page, cluster.url, wanted)
        yield Audience(python, page, browser_placed), publishers


class Acked:
    """The publishes acknowledged so far, ``(data, offset)`` in order; a test can wait for more."""

    def __init__(self) -> None:
        self.items: list[tuple[str, int]] = []
        self._grew = trio.Event()

    def add(self, data: str, offset: int) -> None:
        self.items.append((data, offset))
        self._grew.set()
        self._grew = trio.Event()

    async def at_least(self, count: int) -> None:
        with trio.fail_after(RECEIVE_TIMEOUT):
            while len(self.items) < count:
                await self._grew.wait()


async def publish_steadily(
    publisher: ReconnectingClient,
    room: str,
    name: str,
    acked: Acked,
    stop: trio.Event,
) -> None:
    """Publish "NAME-0", "NAME-1", … until ``stop``, recording each acknowledged one with its
    offset in ``acked``. A publish refused with ``backplane_unavailable`` is sent again; one
    whose connection was lost has an unknown outcome and is not."""
    number = 0
    while not stop.is_set():
        data = f"{name}-{number}"
        try:
            offset = await publisher.publish(room, data, ack=True)
        except NotConnected:
            number += 1
        except ServerError as error:
            if error.code != "backplane_unavailable":
                raise
        else:
            assert isinstance(offset, int)
            acked.add(data, offset)
            number += 1
        await trio.sleep(0.005)  # steady, not flat out: the point is the fault


async def publish_end(publisher: ReconnectingClient, room: str) -> None:
    """The last message: "end", sent again until acknowledged."""
    with trio.fail_after(RECEIVE_TIMEOUT):
        while True:
            try:
                await publisher.publish(room, "end", ack=True)
                return
            except (NotConnected, ServerError):
                await trio.sleep(0.05)


def runs_of(items: list[Seen]) -> list[list[tuple[int, object]]]:
    """The ``(offset, data)`` of the messages a client saw, split at each unrecovered notice
    (after which the room's numbering goes on from the notice, or starts again)."""
    runs: list[list[tuple[int, object]]] = [[]]
    for item in items:
        if item[0] == "unrecovered":
            runs.append([])
        elif item[0] == "message":
            runs[-1].append((item[1], item[2]))  # type: ignore[arg-type]
    return runs


def check_complete(
    seen: dict[str, tuple[int, list[Seen]]],
    acked: list[tuple[str, int]],
    *,
    retried: bool = False,
) -> None:
    """Each client saw the room's messages since its join, in each run (see runs_of): nothing
    missing, nothing twice, nothing out of order, by offset and by each publisher's numbering;
    the same message at the same offset for everyone; each of ``acked`` (data, offset) in its
    last run; "end" last. ``retried``: a publish refused while the backplane was down may have
    gone through all the same, so a publisher's number may come twice (at two offsets)."""
    by_offset: dict[tuple[int, int], object] = {}
    for name, (_, items) in seen.items():
        runs = runs_of(items)
        numbers: dict[str, int] = {}
        for index, run in enumerate(runs):
            offsets = [offset for offset, _ in run]
            assert offsets == list(range(offsets[0], offsets[0] + len(offsets))), (name, offsets)
            for offset, data in run:
                assert by_offset.setdefault((index, offset), data) == data, (name, offset, data)
                publisher, _, number = str(data).rpartition("-")
                if publisher:
                    last = numbers.get(publisher, -1)
                    assert int(number) > last or (retried and int(number) == last), (name, data)
                    numbers[publisher] = int(number)
        last_run = dict(runs[-1])
        missing = [(data, offset) for data, offset in acked if last_run.get(offset) != data]
        assert not missing, (name, missing, [item for item in items if item[0] != "message"])
        assert runs[-1][-1][1] == "end", (name, runs[-1][-1])


def events_of(items: list[Seen]) -> list[object]:
    return [item[0] for item in items if item[0] != "message"]


@needs_chromium
async def test_headline_a_killed_worker_costs_its_clients_nothing(cluster: ClusterProcess):
    """Publishers on both workers send steadily; the worker holding half the clients is
    killed; each of its clients, browser (client.js) or Python, reconnects to a live worker
    and ends with the room's complete sequence: nothing missing, nothing twice, nothing out of
    order."""
    room = fresh_room()
    async with AsyncExitStack() as stack:
        audience, publishers = await stack.enter_async_context(
            audience_on_workers(stack, cluster, per_worker=3)
        )
        await audience.join(room)
        victim = audience.python[1][0].welcome["pid"]  # type: ignore[index]
        acked = Acked()
        stop_publishing = trio.Event()
        with trio.fail_after(SCENARIO_TIMEOUT):
            async with trio.open_nursery() as collectors:
                for client in audience.all_python:
                    collectors.start_soon(audience.collect, client)
                async with trio.open_nursery() as publishing:
                    publishing.start_soon(
                        publish_steadily, publishers[0], room, "on-1", acked, stop_publishing
                    )
                    publishing.start_soon(
                        publish_steadily, publishers[1], room, "on-2", acked, stop_publishing
                    )
                    await trio.sleep(0.5)  # messages flow before the kill
                    os.kill(victim, signal.SIGKILL)
                    await audience.python_until((1,), "recovered")
                    await audience.until_all_in_page(
                        (1,), 'log.some(([name]) => name === "recovered")'
                    )
                    await trio.sleep(0.5)  # and after the recovery
                    stop_publishing.set()
                # Every publish has had its answer: "end" comes after all of them.
                await publish_end(publishers[1], room)
            await audience.until_all_in_page(
                (1, 2), 'log.some(([name, d]) => name === "message" && d.data === "end")'
            )
        seen = await audience.seen()
        check_complete(seen, acked.items)
        for name, (worker, items) in seen.items():
            if worker == 1:
                assert events_of(items) == ["disconnected", "connected", "recovered"], name
            else:
                assert events_of(items) == [], name
        assert len(seen) == 12
        assert len(acked.items) > 50  # the publishers did publish steadily throughout
    await wait_for_restart(cluster, victim)


# A redis-server that keeps what it acknowledged: every write in its append-only file, synced
# before it answers, which is how Redis is run where the rooms' history must survive a restart
# (docs/reliability.md).
PERSISTENT = ("--appendonly", "yes", "--appendfsync", "always")


@needs_chromium
@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "not-persistent"])
async def test_a_redis_restart_costs_clients_nothing_if_redis_keeps_its_data(
    persistent: bool, tmp_path: Path
) -> None:
    """Publishers on both workers send steadily; the redis-server is killed and started again
    on its port. Kept on disk, every room's numbering and history survive: every client ends
    with the complete sequence of what was acknowledged (the workers repair what their
    subscriptions missed while they re-subscribed). Not kept, the rooms start new epochs, and
    every client is told so (unrecovered) before the new epoch's messages, which are complete."""
    extra = PERSISTENT if persistent else ()
    redis = RedisServer(str(tmp_path), *extra)
    command = ["--workers", "2", "--heartbeat-interval", "0.2", "--backplane", redis.url]
    cluster = await trio.to_thread.run_sync(ClusterProcess, *command)
    try:
        await trio.to_thread.run_sync(cluster.wait_for_workers, 2)
        room = fresh_room()
        async with AsyncExitStack() as stack:
            audience, publishers = await stack.enter_async_context(
                audience_on_workers(stack, cluster, per_worker=2)
            )
            await audience.join(room)
            acked = Acked()
            stop_publishing = trio.Event()
            with trio.fail_after(SCENARIO_TIMEOUT):
                async with trio.open_nursery() as collectors:
                    for client in audience.all_python:
                        collectors.start_soon(audience.collect, client)
                    async with trio.open_nursery() as publishing:
                        for publisher, name in zip(publishers, ("on-1", "on-2"), strict=True):
                            publishing.start_soon(
                                publish_steadily, publisher, room, name, acked, stop_publishing
                            )
                        await acked.at_least(40)  # messages flow before the restart
                        os.kill(redis.process.pid, signal.SIGKILL)
                        await trio.to_thread.run_sync(redis.stop)
                        redis = await trio.to_thread.run_sync(
                            functools.partial(RedisServer, str(tmp_path), *extra, port=redis.port)
                        )
                        # Acknowledged from now on: by the new redis-server (the old one's
                        # answers were on their way for no longer than its restart took).
                        since_restart = len(acked.items)
                        await acked.at_least(since_restart + 40)
                        stop_publishing.set()
                    await publish_end(publishers[1], room)
                await audience.until_all_in_page(
                    (1, 2), 'log.some(([name, d]) => name === "message" && d.data === "end")'
                )
            seen = await audience.seen()
        # The workers rode the restart out: no client lost its connection.
        if persistent:
            check_complete(seen, acked.items, retried=True)
            for name, (_, items) in seen.items():
                assert events_of(items) == [], (name, items)
        else:
            check_complete(seen, acked.items[since_restart:], retried=True)
            for name, (_, items) in seen.items():
                assert events_of(items) == ["unrecovered"], (name, items)
                notices = [item for item in items if item[0] == "unrecovered"]
                # The new epoch's messages follow the notice, from its offset on.
                assert runs_of(items)[-1][0][0] == notices[0][2] + 1, (name, items)
        assert len(seen) == 8
    finally:
        await trio.to_thread.run_sync(cluster.stop)
        await trio.to_thread.run_sync(redis.stop)


def test_a_whole_new_cluster_is_a_new_epoch_and_its_clients_are_told_unrecovered():
    # The same ports, so that the client finds the new cluster by itself; its ZeroMQ proxy,
    # the rooms' sequencer, knows nothing of the old epochs.
    ports = ["--port", str(free_port()), "--proxy-port", str(free_port())]
    command = ["--workers", "1", "--heartbeat-interval", "0.2", *ports]
    clusters = [ClusterProcess(*command)]
    try:
        clusters[0].wait_for_workers(1)

        async def scenario() -> None:
            room = fresh_room()
            async with open_reconnecting_client(clusters[0].url, **FAST_BACKOFF) as client:
                await next_connected(client)
                old_epoch = (await client.join(room))["epoch"]
                assert await client.publish(room, "old", ack=True) == 1
                item, _ = await until(client, dict)
                assert item["offset"] == 1  # type: ignore[index]
                await trio.to_thread.run_sync(clusters[0].stop)
                await until(client, Disconnected)
                clusters.append(await trio.to_thread.run_sync(ClusterProcess, *command))
                await trio.to_thread.run_sync(clusters[1].wait_for_workers, 1)
                await until(client, Connected)
                unrecovered, _ = await until(client, Unrecovered)
                joined = unrecovered.joined  # type: ignore[union-attr]
                assert joined["recovered"] is False and joined["epoch"] != old_epoch
                # The new epoch's offset 1 is a new message, not a repeat of the old one's.
                assert await client.publish(room, "new", ack=True) == 1
                item, _ = await until(client, dict)
                assert item == {"type": "message", "room": room, "data": "new", "offset": 1}

        trio.run(scenario)
    finally:
        for cluster in clusters:
            cluster.stop()
