"""End to end: `trio-fanout run --workers 2`, real worker processes, the embedded ZeroMQ proxy,
and real WebSocket clients (trio-websocket, through trio_fanout.client)."""

from __future__ import annotations

import functools
import itertools
import json
import os
import signal
import socket
from contextlib import AsyncExitStack

import pytest
import trio
import trio_websocket

from tests.helpers import (
    RECEIVE_TIMEOUT,
    ClusterProcess,
    RedisServer,
    connect_on_each_worker,
    exited_within,
    receive_data,
    receive_message,
)
from trio_fanout.client import Client, ServerError, open_client

_rooms = itertools.count()


def fresh_room(prefix: str = "room") -> str:
    return f"{prefix}-{os.getpid()}-{next(_rooms)}"


async def test_clients_land_on_both_workers_and_messages_cross_them(cluster: ClusterProcess):
    async with AsyncExitStack() as stack:
        by_worker = await connect_on_each_worker(stack, cluster.url)
        one, two = by_worker[1][0], by_worker[2][0]
        assert (one.worker, two.worker) == (1, 2)
        assert one.pid != two.pid
        room = fresh_room()
        await one.join(room)
        await two.join(room)
        await one.publish(room, "from worker 1")
        await two.publish(room, "from worker 2")
        for client in (one, two):
            assert sorted(await receive_data(client, 2)) == ["from worker 1", "from worker 2"]
        # Exactly once: the next message is a new one, not a duplicate.
        await two.publish(room, "sentinel")
        for client in (one, two):
            assert await receive_data(client, 1) == ["sentinel"]


async def test_a_burst_of_1000_arrives_once_and_in_order_on_both_workers(cluster: ClusterProcess):
    async with AsyncExitStack() as stack:
        by_worker = await connect_on_each_worker(stack, cluster.url, per_worker=2)
        members = by_worker[1] + by_worker[2]
        publisher = by_worker[1][0]
        room = fresh_room()
        for member in members:
            await member.join(room)
        for number in range(1000):
            await publisher.publish(room, number)
        await publisher.publish(room, "end")
        for member in members:
            assert await receive_data(member, 1001) == [*range(1000), "end"]


async def test_many_publishers_at_once_lose_nothing(cluster: ClusterProcess):
    publishers_per_worker, messages_each = 3, 1000
    async with AsyncExitStack() as stack:
        by_worker = await connect_on_each_worker(
            stack, cluster.url, per_worker=publishers_per_worker
        )
        clients = by_worker[1] + by_worker[2]
        room = fresh_room()
        for client in clients:
            await client.join(room)

        async def publish_all(client: Client, name: str) -> None:
            for number in range(messages_each):
                await client.publish(room, [name, number])

        received: dict[int, list] = {}

        async def receive_all(index: int, client: Client) -> None:
            received[index] = await receive_data(client, len(clients) * messages_each)

        async with trio.open_nursery() as nursery:
            for index, client in enumerate(clients):
                nursery.start_soon(receive_all, index, client)
            for index, client in enumerate(clients):
                nursery.start_soon(publish_all, client, f"p{index}")

    expected = {f"p{index}": list(range(messages_each)) for index in range(len(clients))}
    for messages in received.values():
        per_publisher: dict[str, list[int]] = {}
        for name, number in messages:
            per_publisher.setdefault(name, []).append(number)
        assert per_publisher == expected  # all of them, once each, each publisher in order


async def test_joined_means_live_across_workers(cluster: ClusterProcess):
    async with AsyncExitStack() as stack:
        by_worker = await connect_on_each_worker(stack, cluster.url)
        joiner, publisher = by_worker[1][0], by_worker[2][0]
        for round_number in range(200):
            room = fresh_room("live")
            await joiner.join(room)
            await publisher.publish(room, round_number)
            assert (await receive_message(joiner))["data"] == round_number
            await joiner.leave(room)


async def test_rooms_never_leak_into_each_other(cluster: ClusterProcess):
    async with AsyncExitStack() as stack:
        by_worker = await connect_on_each_worker(stack, cluster.url)
        member, publisher = by_worker[1][0], by_worker[2][0]
        room = fresh_room()
        await member.join(room)
        for other in (room + "b", room + ":b", room[:-1], room.upper()):
            await publisher.publish(other, f"to {other}")
        await publisher.publish(room, "to the room")
        assert await receive_message(member) == {
            "type": "message",
            "room": room,
            "data": "to the room",
            "offset": 1,  # the room's first message: the others went to other rooms
        }


async def test_echo_false_leaves_the_sender_out(cluster: ClusterProcess):
    async with AsyncExitStack() as stack:
        by_worker = await connect_on_each_worker(stack, cluster.url, per_worker=2)
        sender, same_worker, other_worker = by_worker[1][0], by_worker[1][1], by_worker[2][0]
        room = fresh_room()
        for client in (sender, same_worker, other_worker):
            await client.join(room)
        await sender.publish(room, "not to me", echo=False)
        await sender.publish(room, "to everybody")
        assert await receive_data(sender, 1) == ["to everybody"]
        for client in (same_worker, other_worker):
            assert await receive_data(client, 2) == ["not to me", "to everybody"]


async def test_leave_stops_delivery(cluster: ClusterProcess):
    async with AsyncExitStack() as stack:
        by_worker = await connect_on_each_worker(stack, cluster.url)
        member, publisher = by_worker[1][0], by_worker[2][0]
        left_room, kept_room = fresh_room(), fresh_room()
        await member.join(left_room)
        await member.join(kept_room)
        await member.leave(left_room)
        await publisher.publish(left_room, "after leave")
        await publisher.publish(kept_room, "still here")
        assert await receive_data(member, 1) == ["still here"]
        with pytest.raises(ServerError) as refused:
            await member.leave(left_room)
        assert refused.value.code == "not_member"


async def test_heartbeat_reaches_every_client_counting_up(cluster: ClusterProcess):
    async with AsyncExitStack() as stack:
        by_worker = await connect_on_each_worker(stack, cluster.url)
        for client in (by_worker[1][0], by_worker[2][0]):
            with trio.fail_after(RECEIVE_TIMEOUT):
                beats = [await client.receive(heartbeats=True) for _ in range(3)]
            assert [beat["type"] for beat in beats] == ["heartbeat"] * 3
            first = beats[0]["seq"]
            assert [beat["seq"] for beat in beats] == [first, first + 1, first + 2]
            assert all(isinstance(beat["ts"], float) for beat in beats)


BAD_INPUTS = [
    (b"\x00binary", "bad_frame"),
    ("not json", "bad_json"),
    ("[1, 2]", "bad_frame"),
    ('{"type": "dance"}', "unknown_type"),
    ('{"room": "a"}', "unknown_type"),
    ('{"type": "join"}', "bad_room"),
    ('{"type": "join", "room": 5}', "bad_room"),
    ('{"type": "join", "room": ""}', "bad_room"),
    (json.dumps({"type": "join", "room": "x" * 201}), "bad_room"),
    ('{"type": "join", "room": "a\\u0000b"}', "bad_room"),
    ('{"type": "publish", "room": "a"}', "bad_frame"),
    ('{"type": "leave", "room": "never-joined"}', "not_member"),
]


async def test_every_bad_input_gets_its_error_and_the_connection_keeps_serving(
    cluster: ClusterProcess,
):
    async with AsyncExitStack() as stack:
        by_worker = await connect_on_each_worker(stack, cluster.url)
        client, bystander = by_worker[1][0], by_worker[2][0]
        for raw, code in BAD_INPUTS:
            await client.ws.send_message(raw)
            with trio.fail_after(RECEIVE_TIMEOUT):
                reply = await client.receive()
            assert (reply["type"], reply["code"]) == ("error", code), raw
            assert reply["message"]
            await client.ping()  # still open and answering
        room = fresh_room()
        await bystander.join(room)
        await client.publish(room, "still works")
        assert await receive_data(bystander, 1) == ["still works"]


async def test_an_oversized_frame_is_refused_and_closed_1009_and_others_carry_on(
    cluster: ClusterProcess,
):
    async with AsyncExitStack() as stack:
        by_worker = await connect_on_each_worker(stack, cluster.url)
        room = fresh_room()
        for client in (by_worker[1][0], by_worker[2][0]):
            await client.join(room)
        abuser = await stack.enter_async_context(open_client(cluster.url))
        await abuser.ws.send_message("x" * (64 * 1024 + 1))
        with trio.fail_after(RECEIVE_TIMEOUT):
            reply = await abuser.receive()
            assert (reply["type"], reply["code"]) == ("error", "too_large")
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await abuser.receive()
        assert closed.value.reason.code == 1009
        await by_worker[1][0].publish(room, "after the abuse")
        for client in (by_worker[1][0], by_worker[2][0]):
            assert await receive_data(client, 1) == ["after the abuse"]


async def http_get(port: int, path: str, headers: str = "") -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        request = f"GET {path} HTTP/1.1\r\nHost: test\r\n{headers}\r\n"
        await stream.send_all(request.encode())
        response = b""
        with trio.fail_after(RECEIVE_TIMEOUT):
            while chunk := await stream.receive_some():
                response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_healthz_404_and_plain_http_to_the_websocket(cluster: ClusterProcess):
    status, body = await http_get(cluster.port, "/healthz")
    health = json.loads(body)
    assert status == 200
    assert health["status"] == "ready"
    assert "reason" not in health
    assert health["dropped_invalid"] == 0
    assert health["worker"] in (1, 2)
    assert (await http_get(cluster.port, "/elsewhere"))[0] == 404
    assert (await http_get(cluster.port, "/ws"))[0] == 426


def test_sigterm_closes_clients_1001_and_leaves_no_process():
    cluster = ClusterProcess("--workers", "2", "--heartbeat-interval", "0.2")
    try:
        cluster.wait_for_workers(2)
        closes: list[int] = []
        pids: list[int] = []

        async def clients_see_1001() -> None:
            async with AsyncExitStack() as stack:
                by_worker = await connect_on_each_worker(stack, cluster.url)
                clients = [by_worker[1][0], by_worker[2][0]]
                pids.extend(client.pid for client in clients)
                started = trio.current_time()
                cluster.process.send_signal(signal.SIGTERM)
                for client in clients:
                    with (
                        trio.fail_after(5),
                        pytest.raises(trio_websocket.ConnectionClosed) as closed,
                    ):
                        while True:
                            await client.receive()
                    closes.append(closed.value.reason.code)
                assert trio.current_time() - started < 5

        trio.run(clients_see_1001)
        assert cluster.process.wait(5) == 0
        assert closes == [1001, 1001]
        cluster.wait_for_log(r"master \(pid \d+\) trio_fanout\.master: stopped$")
        assert "did not stop in time" not in cluster.log()  # both stopped by themselves
        assert all(exited_within(pid, 1) for pid in pids)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", cluster.port), timeout=1).close()
    finally:
        cluster.stop()


@pytest.mark.parametrize("backplane", ["zmq", "redis"])
def test_a_killed_worker_comes_back_and_the_other_sees_no_gap(backplane: str, tmp_path):
    # A Redis of its own: on a shared one, another cluster's heartbeats would reach this one's
    # clients (Redis channels are global) and break the count.
    redis = RedisServer(str(tmp_path)) if backplane == "redis" else None
    extra = ["--backplane", redis.url] if redis else []
    cluster = ClusterProcess("--workers", "2", "--heartbeat-interval", "0.1", *extra)
    try:
        cluster.wait_for_workers(2)

        async def scenario() -> None:
            async with AsyncExitStack() as stack:
                by_worker = await connect_on_each_worker(stack, cluster.url, per_worker=2)
                victim, survivor, publisher = by_worker[1][0], by_worker[2][0], by_worker[2][1]
                room = fresh_room()
                await survivor.join(room)
                log_mark = len(cluster.lines)
                os.kill(victim.pid, signal.SIGKILL)
                for number in range(100):
                    await publisher.publish(room, number)
                assert await receive_data(survivor, 100) == list(range(100))
                # The master's log, read from a thread: it blocks while it waits.
                await trio.to_thread.run_sync(
                    functools.partial(
                        cluster.wait_for_log,
                        rf"worker 1 \(pid {victim.pid}\) was killed by SIGKILL",
                        start=log_mark,
                    )
                )
                await trio.to_thread.run_sync(
                    functools.partial(
                        cluster.wait_for_log, r"worker 1 \(pid \d+\) serving", start=log_mark
                    )
                )
                # Heartbeats on the survivor kept counting up by one through all of it.
                seqs = []
                with trio.fail_after(RECEIVE_TIMEOUT):
                    while len(seqs) < 60:
                        frame = await survivor.receive(heartbeats=True)
                        if frame["type"] == "heartbeat":
                            seqs.append(frame["seq"])
                assert seqs == list(range(seqs[0], seqs[0] + 60))
                # New clients reach both workers again; worker 1 is a new process.
                again = await connect_on_each_worker(stack, cluster.url)
                assert again[1][0].pid != victim.pid
                await again[1][0].join(room)
                await publisher.publish(room, "welcome back")
                assert await receive_data(again[1][0], 1) == ["welcome back"]

        trio.run(scenario)
    finally:
        cluster.stop()
        if redis:
            redis.stop()


def test_a_worker_that_keeps_dying_is_restarted_with_a_growing_pause():
    cluster = ClusterProcess("--workers", "1", "--heartbeat-interval", "0")
    try:
        pid = int(cluster.wait_for_log(r"worker 1 \(pid (\d+)\) serving").group(1))
        pauses = []
        # SIGRTMIN+1 has no name in Python's signal module: the master must cope with it.
        for signum in (signal.SIGRTMIN + 1, signal.SIGKILL, signal.SIGKILL):
            mark = len(cluster.lines)
            os.kill(pid, signum)
            died = cluster.wait_for_log(
                rf"worker 1 \(pid {pid}\) was killed by (\S+ ?\d*); restarting it in ([\d.]+) s",
                start=mark,
            )
            pauses.append(float(died.group(2)))
            pid = int(cluster.wait_for_log(r"worker 1 \(pid (\d+)\) serving", start=mark).group(1))
        assert pauses == [0.1, 0.2, 0.4]
        assert cluster.process.poll() is None  # the master is still running
    finally:
        cluster.stop()


def test_workers_stop_by_themselves_when_the_master_is_killed():
    cluster = ClusterProcess("--workers", "2", "--heartbeat-interval", "0")
    try:
        pids = [
            int(cluster.wait_for_log(rf"worker {index} \(pid (\d+)\) serving").group(1))
            for index in (1, 2)
        ]
        os.kill(cluster.process.pid, signal.SIGKILL)
        cluster.process.wait(5)
        assert all(exited_within(pid, 10) for pid in pids)
        for pid in pids:
            cluster.wait_for_log(rf"worker \d \(pid {pid}\) stopped")
    finally:
        cluster.stop()
