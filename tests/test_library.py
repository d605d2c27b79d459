"""The library: emitters publishing into a running cluster, and a worker embedded in a Trio
program with hooks that authenticate and authorise."""

from __future__ import annotations

import itertools
import os
import threading
from contextlib import AsyncExitStack

import pytest
import trio

from tests.helpers import (
    RECEIVE_TIMEOUT,
    ClusterProcess,
    connect_on_each_worker,
    receive_data,
    receive_message,
)
from trio_fanout import Config, Forbidden, Hooks, Request, SyncEmitter, open_emitter, serve
from trio_fanout.client import ServerError, open_client

_names = itertools.count()


async def test_an_async_emitter_reaches_rooms_and_everyone_on_every_worker(
    cluster: ClusterProcess,
):
    async with AsyncExitStack() as stack:
        by_worker = await connect_on_each_worker(stack, cluster.url)
        clients = [by_worker[1][0], by_worker[2][0]]
        await clients[0].join("emitted")
        async with open_emitter(cluster.backplane_url) as emitter:
            await emitter.publish("emitted", {"n": 1})
            await emitter.broadcast("to everyone")
        emitted = await receive_message(clients[0])
        assert isinstance(emitted.pop("offset"), int)
        assert emitted == {"type": "message", "room": "emitted", "data": {"n": 1}}
        for client in clients:
            assert await receive_message(client) == {"type": "message", "data": "to everyone"}


async def test_a_sync_emitter_in_a_plain_thread_reaches_both_workers(cluster: ClusterProcess):
    async with AsyncExitStack() as stack:
        by_worker = await connect_on_each_worker(stack, cluster.url)
        members = [by_worker[1][0], by_worker[2][0]]
        for member in members:
            await member.join("from-a-thread")
        failures: list[BaseException] = []

        def blocking_code() -> None:
            try:
                with SyncEmitter(cluster.backplane_url) as emitter:
                    for number in range(100):
                        emitter.publish("from-a-thread", number)
            except BaseException as error:
                failures.append(error)

        thread = threading.Thread(target=blocking_code)
        thread.start()
        for member in members:
            assert await receive_data(member, 100) == list(range(100))
        await trio.to_thread.run_sync(thread.join, RECEIVE_TIMEOUT)
        assert not thread.is_alive()
        assert failures == []


def test_emitters_refuse_what_clients_could_not_receive():
    async def scenario() -> None:
        async with open_emitter(f"memory://emitter-{next(_names)}") as emitter:
            for room in ("", "x" * 201, "a\nb"):
                with pytest.raises(ValueError, match="room"):
                    await emitter.publish(room, 1)
            with pytest.raises(ValueError, match="surrogate"):
                await emitter.publish("room", "\ud800")
            for not_json in (float("nan"), [float("inf")]):
                with pytest.raises(ValueError, match="cannot be sent as JSON: Out of range float"):
                    await emitter.publish("room", not_json)
                with pytest.raises(ValueError, match="cannot be sent as JSON: Out of range float"):
                    await emitter.broadcast(not_json)
            with pytest.raises(TypeError):
                await emitter.publish("room", object())

    trio.run(scenario)


def test_a_sync_emitter_with_no_backplane_says_so():
    with pytest.raises(ValueError, match="unknown scheme"):
        SyncEmitter("nats://127.0.0.1:4222")


async def authenticate(request: Request) -> str:
    token = request.params.get("token")
    if token is None:
        raise Forbidden("a token is required")
    return token


async def authorize_join(user: str, room: str) -> bool:
    return not room.startswith("staff-") or user == "staff"


async def authorize_publish(user: str, room: str, data: object) -> bool:
    if data == "spam":
        raise Forbidden("no spam")
    return user != "readonly"


async def test_an_embedded_worker_calls_its_hooks():
    config = Config(port=0, heartbeat_interval=0, backplane=f"memory://embedded-{os.getpid()}")
    hooks = Hooks(
        authenticate=authenticate,
        authorize_join=authorize_join,
        authorize_publish=authorize_publish,
    )
    async with trio.open_nursery() as nursery:
        worker = await nursery.start(
            lambda task_status: serve(config, hooks=hooks, task_status=task_status)
        )
        url = f"ws://127.0.0.1:{worker.port}/ws"

        with pytest.raises(Exception) as refused:
            async with open_client(url):
                pass
        assert "403" in repr(refused.value)

        async with (
            open_client(url + "?token=staff") as staff,
            open_client(url + "?token=guest") as guest,
            open_client(url + "?token=readonly") as reader,
        ):
            await staff.join("staff-room")
            with pytest.raises(ServerError) as refused_join:
                await guest.join("staff-room")
            assert refused_join.value.code == "forbidden"
            assert refused_join.value.frame["id"] == 1

            await reader.join("lobby")
            await guest.join("lobby")
            with pytest.raises(ServerError) as refused_publish:
                await reader.publish("lobby", "hello", ack=True)
            assert refused_publish.value.code == "forbidden"
            with pytest.raises(ServerError) as spam:
                await guest.publish("lobby", "spam", ack=True)
            assert (spam.value.code, spam.value.frame["message"]) == ("forbidden", "no spam")
            await guest.publish("lobby", "allowed", ack=True)
            assert await receive_data(reader, 1) == ["allowed"]
        worker.stop()
