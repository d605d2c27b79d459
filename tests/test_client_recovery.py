"""Recovery across a worker's death, seen by reconnecting clients (protocol version 2): what was
published while a client was away comes back to it, once and in order, on ZeroMQ and on Redis.

Real processes throughout: `trio-fanout run --workers 2`, killed with SIGKILL.
"""

from __future__ import annotations

import functools
import os
import signal
from contextlib import AsyncExitStack

import trio

from tests.helpers import RECEIVE_TIMEOUT, ClusterProcess, free_port
from tests.test_reconnecting import fresh_room, reconnecting_on_workers, until
from trio_fanout.reconnecting import (
    Connected,
    Disconnected,
    Item,
    NotConnected,
    ReconnectingClient,
    Recovered,
    Unrecovered,
    open_reconnecting_client,
)

# Short backoff, so that the clients of the killed worker come back within a second.
FAST_BACKOFF = {"backoff_base": 0.1, "backoff_cap": 0.5}
# The whole of a scenario: kill, reconnections, recovery, on a loaded machine.
SCENARIO_TIMEOUT = 60.0


async def wait_for_restart(cluster: ClusterProcess, victim: int) -> None:
    """The master restarts a killed worker; later tests of the module expect both workers."""
    await trio.to_thread.run_sync(
        functools.partial(cluster.wait_for_log, rf"worker 1 \(pid (?!{victim}\))\d+\) serving")
    )


def messages_of(items: list[Item]) -> list[dict]:
    return [item for item in items if isinstance(item, dict)]


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


async def test_headline_a_killed_worker_costs_its_clients_nothing(cluster: ClusterProcess):
    """Publishers on both workers send steadily; the worker holding half the clients is
    killed; each of its clients reconnects to a live worker and ends with the room's complete
    sequence: nothing missing, nothing twice, nothing out of order."""
    room = fresh_room()
    per_worker = 5
    async with AsyncExitStack() as stack:
        placed = await reconnecting_on_workers(
            stack, cluster.url, {1: per_worker + 1, 2: per_worker + 1}, **FAST_BACKOFF
        )
        publishers = [placed[1].pop(), placed[2].pop()]
        members = {worker: placed[worker] for worker in (1, 2)}
        everyone = members[1] + members[2]
        for member in everyone:
            await next_connected(member)
            await member.join(room)
        assert members[1][0].welcome is not None
        victim = members[1][0].welcome["pid"]

        acked: list[object] = []
        stop_publishing = trio.Event()

        async def publish_steadily(publisher: ReconnectingClient, name: str) -> None:
            number = 0
            while not stop_publishing.is_set():
                try:
                    await publisher.publish(room, f"{name}-{number}", ack=True)
                    acked.append(f"{name}-{number}")
                except NotConnected:
                    pass  # its worker was killed: the outcome is unknown, and it goes on
                number += 1
                await trio.sleep(0.005)  # steady, not flat out: the point is the kill

        received: dict[int, list[Item]] = {id(member): [] for member in everyone}
        recovered = {id(member): trio.Event() for member in members[1]}

        async def collect(member: ReconnectingClient) -> None:
            async for item in member:
                received[id(member)].append(item)
                if isinstance(item, Recovered):
                    recovered[id(member)].set()
                if isinstance(item, dict) and item["data"] == "end":
                    return

        with trio.fail_after(SCENARIO_TIMEOUT):
            async with trio.open_nursery() as collectors:
                for member in everyone:
                    collectors.start_soon(collect, member)
                async with trio.open_nursery() as publishing:
                    publishing.start_soon(publish_steadily, publishers[0], "on-1")
                    publishing.start_soon(publish_steadily, publishers[1], "on-2")
                    await trio.sleep(0.5)  # messages flow before the kill
                    os.kill(victim, signal.SIGKILL)
                    for event in recovered.values():
                        await event.wait()
                    await trio.sleep(0.5)  # and after the recovery
                    stop_publishing.set()
                # Every publish has had its answer: "end" comes after all of them.
                await publishers[1].publish(room, "end", ack=True)

        by_offset: dict[int, object] = {}
        for member in everyone:
            items = received[id(member)]
            messages = messages_of(items)
            offsets = [message["offset"] for message in messages]
            first = offsets[0]
            # Nothing missing, nothing twice, nothing out of order.
            assert offsets == list(range(first, first + len(offsets))), offsets
            for message in messages:
                # The same message at the same offset for everyone.
                assert by_offset.setdefault(message["offset"], message["data"]) == message["data"]
            assert set(acked) <= {message["data"] for message in messages}
        for member in members[1]:
            kinds = [
                type(item).__name__ for item in received[id(member)] if not isinstance(item, dict)
            ]
            assert kinds == ["Disconnected", "Connected", "Recovered"], kinds
        for member in members[2]:
            assert all(isinstance(item, dict) for item in received[id(member)])
        assert len(acked) > 50  # the publishers did publish steadily throughout
    await wait_for_restart(cluster, victim)


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
