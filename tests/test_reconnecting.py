"""The reconnecting client: backoff, positions and deduplication (pure), then real servers that
go away: a worker embedded here and stopped, and `trio-fanout run` workers killed with SIGKILL
or frozen with SIGSTOP."""

from __future__ import annotations

import functools
import itertools
import os
import random
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio

from tests.helpers import (
    PLACING_PAUSE,
    RECEIVE_TIMEOUT,
    START_TIMEOUT,
    ClusterProcess,
    free_port,
)
from trio_fanout import Config, Emitter, Hooks, serve
from trio_fanout.backplane import HistoryPolicy, open_backplane
from trio_fanout.reconnecting import (
    Connected,
    Disconnected,
    Item,
    NotConnected,
    Reconnecting,
    ReconnectingClient,
    Recovered,
    ServerError,
    Unrecovered,
    open_reconnecting_client,
)
from trio_fanout.resume import Backoff, Rejoin, RoomPositions, backoff_delay

_names = itertools.count()


def fresh_room() -> str:
    return f"reconnecting-{os.getpid()}-{next(_names)}"


# ---- backoff, pure --------------------------------------------------------------------------


def test_backoff_grows_exponentially_up_to_the_cap_with_full_jitter():
    rng = random.Random(1234)
    for attempt in range(12):
        ceiling = min(20.0, 0.5 * 2**attempt)
        draws = [backoff_delay(attempt, base=0.5, cap=20.0, rng=rng) for _ in range(200)]
        assert all(0.0 <= delay <= ceiling for delay in draws)
        # Full jitter: spread over the whole range, not clustered at its top.
        assert min(draws) < 0.1 * ceiling and max(draws) > 0.9 * ceiling
    assert backoff_delay(5000, base=0.5, cap=20.0, rng=rng) <= 20.0


def test_backoff_is_repeatable_with_a_seeded_rng_and_different_between_clients():
    def delays(seed: int) -> list[float]:
        rng = random.Random(seed)
        return [backoff_delay(attempt, base=0.5, cap=20.0, rng=rng) for attempt in range(8)]

    assert delays(7) == delays(7)
    assert delays(7) != delays(8)
    with pytest.raises(ValueError, match="attempt"):
        backoff_delay(-1, base=0.5, cap=20.0, rng=random.Random(0))


def test_backoff_starts_again_only_after_a_connection_that_stayed_up():
    backoff = Backoff(base=0.5, cap=20.0, stable_after=10.0, rng=random.Random(3))
    ceilings = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 20.0, 20.0]
    assert all(backoff.next_delay() <= ceiling for ceiling in ceilings)
    # Short-lived connections (accepted, then closed at once) keep the waits at the cap...
    backoff.connection_ended(lasted=9.9)
    draws = [backoff.next_delay() for _ in range(50)]
    assert max(draws) > 0.5 and max(draws) <= 20.0
    # ...and one that stayed up starts them again from the first step.
    backoff.connection_ended(lasted=10.0)
    assert backoff.next_delay() <= 0.5


# ---- positions, pure ------------------------------------------------------------------------


def message(room: str, offset: int | None, data: object = None) -> dict:
    frame: dict = {"type": "message", "room": room, "data": data}
    if offset is not None:
        frame["offset"] = offset
    return frame


def test_positions_give_since_and_let_no_offset_through_twice():
    positions = RoomPositions()
    positions.joined({"type": "joined", "room": "r", "epoch": "e1", "offset": 4})
    assert positions.since("r") == {"epoch": "e1", "offset": 4}
    assert [positions.deliver(message("r", n)) for n in (4, 5, 6, 5, 7)] == [
        False,
        True,
        True,
        False,
        True,
    ]
    assert positions.since("r") == {"epoch": "e1", "offset": 7}


def test_a_recovered_rejoin_keeps_the_position_so_the_missed_messages_pass_once():
    positions = RoomPositions()
    positions.joined({"type": "joined", "room": "r", "epoch": "e1", "offset": 0})
    assert positions.deliver(message("r", 1))
    rejoined = {"type": "joined", "room": "r", "epoch": "e1", "offset": 3, "recovered": True}
    assert positions.rejoined(rejoined) is Rejoin.RECOVERED
    assert [positions.deliver(message("r", n)) for n in (1, 2, 3, 4)] == [False, True, True, True]


def test_an_unrecovered_rejoin_starts_again_from_the_servers_position():
    positions = RoomPositions()
    positions.joined({"type": "joined", "room": "r", "epoch": "e1", "offset": 9})
    rejoined = {"type": "joined", "room": "r", "epoch": "e2", "offset": 2, "recovered": False}
    assert positions.rejoined(rejoined) is Rejoin.UNRECOVERED
    assert positions.since("r") == {"epoch": "e2", "offset": 2}
    assert [positions.deliver(message("r", n)) for n in (2, 3)] == [False, True]


def test_a_new_epoch_announced_mid_connection_lets_its_offsets_through():
    positions = RoomPositions()
    positions.joined({"type": "joined", "room": "r", "epoch": "e1", "offset": 0})
    assert all(positions.deliver(message("r", n)) for n in (1, 2, 3))
    positions.renumbered(
        {"type": "joined", "room": "r", "epoch": "e2", "offset": 0, "recovered": False}
    )
    assert positions.since("r") == {"epoch": "e2", "offset": 0}
    assert [positions.deliver(message("r", n)) for n in (1, 2)] == [True, True]


def test_against_a_version_1_server_nothing_is_filtered_and_nothing_recovered():
    positions = RoomPositions()
    positions.joined({"type": "joined", "room": "r", "id": 1})
    assert positions.since("r") is None
    assert all(positions.deliver(message("r", None, n)) for n in range(3))
    assert positions.rejoined({"type": "joined", "room": "r", "id": 2}) is Rejoin.UNRECOVERED
    positions.left("r")
    assert positions.rooms == []


# ---- a worker embedded here, stopped and started again ---------------------------------------


async def _serve_in(
    scope: trio.CancelScope,
    config: Config,
    hooks: Hooks | None = None,
    *,
    task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``scope`` is cancelled: the sockets then close at once, like a crash.

    A scope of the server's own: cancelling the nursery around a ``yield`` would cancel the
    body of the caller's ``async with`` too, which would then end there, silently.
    """
    with scope:
        await serve(config, hooks=hooks, task_status=task_status)


@asynccontextmanager
async def embedded_worker(
    port: int, hooks: Hooks | None = None, **settings: object
) -> AsyncIterator[trio.CancelScope]:
    """A worker on ``port`` (no heartbeat) until the block ends or the scope it yields is
    cancelled."""
    config = Config(
        port=port,
        heartbeat_interval=0,
        backplane=f"memory://reconnecting-{next(_names)}",
        **settings,  # type: ignore[arg-type]
    )
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()
        await nursery.start(_serve_in, scope, config, hooks)
        yield scope
        scope.cancel()


async def next_item(client: ReconnectingClient) -> Item:
    """The next item but a ``Reconnecting`` (which says when the next attempt comes: the tests
    of what comes through skip them, and one test checks them)."""
    with trio.fail_after(RECEIVE_TIMEOUT):
        while isinstance(item := await client.receive(), Reconnecting):
            pass
        return item


async def test_each_attempt_after_a_loss_is_announced_with_its_number_and_wait():
    port = free_port()
    base, cap = 0.05, 0.2
    async with (
        embedded_worker(port) as first_server,
        open_reconnecting_client(
            f"ws://127.0.0.1:{port}/ws", backoff_base=base, backoff_cap=cap
        ) as client,
    ):
        assert isinstance(await next_item(client), Connected)
        first_server.cancel()
        with trio.fail_after(RECEIVE_TIMEOUT):
            assert isinstance(await client.receive(), Disconnected)
            # Nobody listens on the port: every attempt fails, and each is announced.
            waits = [await client.receive() for _ in range(4)]
        assert [item.attempt for item in waits] == [1, 2, 3, 4]  # type: ignore[union-attr]
        for number, item in enumerate(waits):
            assert isinstance(item, Reconnecting)
            assert 0 <= item.delay <= min(cap, base * 2**number)
        async with embedded_worker(port):
            _, before = await until(client, Connected)
            assert all(isinstance(item, Reconnecting) for item in before), before


async def test_the_client_reconnects_to_a_restarted_server_and_rejoins_its_rooms():
    port = free_port()
    room = fresh_room()
    # Short backoff: the server is down for one attempt or two at most.
    async with (
        embedded_worker(port) as first_server,
        open_reconnecting_client(
            f"ws://127.0.0.1:{port}/ws", backoff_base=0.05, backoff_cap=0.2
        ) as client,
    ):
        assert isinstance(await next_item(client), Connected)
        await client.join(room)
        first_server.cancel()  # sockets closed at once, no close frame
        disconnected = await next_item(client)
        assert isinstance(disconnected, Disconnected), disconnected
        assert not client.connected
        # While disconnected, requests fail at once rather than wait.
        with trio.fail_after(0.5):
            with pytest.raises(NotConnected):
                await client.publish(room, "too early", ack=True)
            with pytest.raises(NotConnected):
                await client.publish(room, "too early")
            with pytest.raises(NotConnected):
                await client.join("another")
        async with embedded_worker(port):
            assert isinstance(await next_item(client), Connected)
            # A new worker on a new memory backplane: a new sequencer, so the rejoin's
            # epoch is unknown to it and nothing can be recovered.
            unrecovered = await next_item(client)
            assert isinstance(unrecovered, Unrecovered) and unrecovered.room == room
            assert client.rooms == [room]
            await client.publish(room, "after", ack=True)
            item = await next_item(client)
            assert isinstance(item, dict) and item["data"] == "after", item


async def test_a_token_in_the_url_never_reaches_the_clients_log(caplog: pytest.LogCaptureFixture):
    caplog.set_level("DEBUG", logger="trio_fanout.reconnecting")
    port = free_port()
    url = f"ws://127.0.0.1:{port}/ws?room=a&token=eyJ.secret.sig"
    async with (
        embedded_worker(port) as server,
        open_reconnecting_client(url, backoff_base=0.05, backoff_cap=0.2) as client,
    ):
        assert isinstance(await next_item(client), Connected)
        server.cancel()
        assert isinstance(await next_item(client), Disconnected)
        async with embedded_worker(port):
            assert isinstance(await next_item(client), Connected)
    lines = [record.getMessage() for record in caplog.records]
    assert any("?room=a&token=[redacted]" in line for line in lines), lines
    assert not any("secret" in line for line in lines), lines


async def test_disconnected_says_why_in_a_sentence_and_its_code_is_a_plain_int():
    port = free_port()
    url = f"ws://127.0.0.1:{port}/ws"
    config = Config(
        port=port, heartbeat_interval=0, backplane=f"memory://reconnecting-{next(_names)}"
    )
    async with trio.open_nursery() as nursery:
        worker = await nursery.start(serve, config)
        async with open_reconnecting_client(url, backoff_base=0.05, backoff_cap=0.2) as client:
            assert isinstance(await next_item(client), Connected)
            worker.stop()  # a close frame: 1001 and "server shutting down"
            stopped = await next_item(client)
            assert stopped == Disconnected(
                "the server closed the connection with code 1001 (going away): "
                "server shutting down",
                1001,
            )
            async with embedded_worker(port) as second:
                assert isinstance(await next_item(client), Connected)
                second.cancel()  # no close frame at all
                lost = await next_item(client)
            assert lost == Disconnected(
                "the connection was lost without a close handshake (code 1006)", 1006
            )
            # Plain ints, which print as numbers, not members of trio-websocket's enum.
            assert [type(stopped.code), type(lost.code)] == [int, int]  # type: ignore[union-attr]
            assert repr(lost.code) == "1006"  # type: ignore[union-attr]


async def test_a_rejoin_refused_for_now_is_retried_on_a_new_connection_keeping_the_room():
    port = free_port()
    # Three frames at once, then two a second: the client's first ping (it has no token) and
    # two joins pass, and three rejoins in a row are one too many.
    limits = {"rate_limit_per_second": 2.0, "rate_limit_burst": 3}
    async with (
        embedded_worker(port, **limits) as first_server,
        open_reconnecting_client(
            f"ws://127.0.0.1:{port}/ws", backoff_base=0.05, backoff_cap=0.2
        ) as client,
    ):
        assert isinstance(await next_item(client), Connected)
        await client.join("a")
        await client.join("b")
        with pytest.raises(ServerError) as refused:
            await client.join("c")  # the application's own join: refused to its face
        assert refused.value.code == "rate_limited"
        await trio.sleep(0.6)  # one frame's worth of rate comes back after 0.5 s
        await client.join("c")
        first_server.cancel()
        assert isinstance(await next_item(client), Disconnected)
        async with embedded_worker(port, **limits):
            assert isinstance(await next_item(client), Connected)
            rejoined = [await next_item(client), await next_item(client)]
            assert [type(item) for item in rejoined] == [Unrecovered, Unrecovered]
            again = await next_item(client)
            assert isinstance(again, Disconnected), again
            assert again.reason == "rejoin of 'c' refused for now: rate_limited"
            assert client.rooms == ["a", "b", "c"]


async def test_publish_with_ack_raises_server_error_and_times_out():
    never = trio.Event()

    async def stall_publish(user: object, room: str, data: object) -> bool:
        if data == "stall":
            await never.wait()  # the worker never hands this one on: no ack ever comes
        return True

    port = free_port()
    async with (
        embedded_worker(port, Hooks(authorize_publish=stall_publish)),
        open_reconnecting_client(f"ws://127.0.0.1:{port}/ws", request_timeout=0.5) as client,
    ):
        assert isinstance(await next_item(client), Connected)
        epoch = (await client.join("acked"))["epoch"]
        assert await client.publish("acked", "fine", ack=True) == 1  # the room's first offset
        # Requests from several tasks at once each get their own reply.
        acked: dict[int, int | None] = {}

        async def publish_one(number: int) -> None:
            acked[number] = await client.publish("acked", number, ack=True)

        with trio.fail_after(RECEIVE_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for number in range(5):
                    nursery.start_soon(publish_one, number)
        assert sorted(acked.values()) == [2, 3, 4, 5, 6]  # type: ignore[type-var]
        received = [await next_item(client) for _ in range(6)]
        assert received[0] == {"type": "message", "room": "acked", "data": "fine", "offset": 1}
        # Each ack's offset is the one its message arrived with, and they arrive in that order.
        assert [item["offset"] for item in received] == [1, 2, 3, 4, 5, 6]  # type: ignore[index]
        assert all(acked[item["data"]] == item["offset"] for item in received[1:])  # type: ignore[index]
        with pytest.raises(ServerError) as refused:
            await client.publish("", "no room", ack=True)
        assert refused.value.code == "bad_room"
        history = await client.history("acked", since={"epoch": epoch, "offset": 1}, limit=2)
        assert (history["epoch"], history["offset"]) == (epoch, 6)
        assert [kept["offset"] for kept in history["messages"]] == [2, 3]
        with pytest.raises(ServerError) as refused:
            await client.history("acked", limit=-1)
        assert refused.value.code == "bad_frame"
        # Last: the stalled hook holds up this connection's later frames too.
        with trio.fail_after(RECEIVE_TIMEOUT), pytest.raises(trio.TooSlowError):
            await client.publish("acked", "stall", ack=True)
        never.set()


async def test_the_first_connection_failing_raises_as_from_open_client():
    with trio.fail_after(RECEIVE_TIMEOUT), pytest.raises(OSError):
        async with open_reconnecting_client(f"ws://127.0.0.1:{free_port()}/ws"):
            pass  # pragma: no cover
    with pytest.raises(ValueError, match="ws://"):
        async with open_reconnecting_client("http://127.0.0.1:1/ws"):
            pass  # pragma: no cover


# ---- real workers killed and frozen ----------------------------------------------------------


async def reconnecting_on_workers(
    stack: AsyncExitStack, url: str, wanted: dict[int, int], attempts: int = 400, **options: object
) -> dict[int, list[ReconnectingClient]]:
    """Reconnecting clients, ``wanted[w]`` of them on worker ``w``; extra ones are closed.

    The kernel gives each connection to a worker by a hash of its addresses, so which one
    accepts is not ours to choose: open clients a few at a time until each worker holds its
    share. Each lives in a task of its own, which holds its
    nursery, until ``stack`` closes.
    """
    by_worker: dict[int, list[ReconnectingClient]] = {worker: [] for worker in wanted}
    nursery = await stack.enter_async_context(trio.open_nursery())
    release = trio.Event()
    stack.callback(release.set)  # runs before the nursery's exit: the kept clients then close
    opened_in, opened_out = trio.open_memory_channel[tuple[ReconnectingClient, trio.Event, list]](
        attempts
    )

    async def hold_one() -> None:
        async with open_reconnecting_client(url, **options) as client:  # type: ignore[arg-type]
            decided: trio.Event = trio.Event()
            keep: list[bool] = []
            await opened_in.send((client, decided, keep))
            await decided.wait()
            if keep:
                await release.wait()

    batch = 4
    for _ in range(0, attempts, batch):
        for _ in range(batch):
            nursery.start_soon(hold_one)
        for _ in range(batch):
            with trio.fail_after(START_TIMEOUT):
                client, decided, keep = await opened_out.receive()
            welcome = client.welcome
            worker = None if welcome is None else welcome["worker"]
            if worker in by_worker and len(by_worker[worker]) < wanted[worker]:
                by_worker[worker].append(client)
                keep.append(True)
            decided.set()
        if all(len(by_worker[worker]) == count for worker, count in wanted.items()):
            return by_worker
        # A worker that is still starting gets no new connection (the master steers them to
        # the others until it answers): give it a moment before the next round.
        await trio.sleep(PLACING_PAUSE)
    raise AssertionError(f"could not place clients on the workers as wanted: {wanted}")


async def reconnecting_on_worker(
    stack: AsyncExitStack, url: str, worker: int, **options: object
) -> ReconnectingClient:
    """One reconnecting client that landed on worker ``worker``."""
    return (await reconnecting_on_workers(stack, url, {worker: 1}, **options))[worker][0]


async def until(
    client: ReconnectingClient, kind: type, within: float = RECEIVE_TIMEOUT
) -> tuple[Item, list[Item]]:
    """The next item of type ``kind``, and those received before it."""
    before: list[Item] = []
    with trio.fail_after(within):
        while True:
            item = await client.receive()
            if isinstance(item, kind):
                return item, before
            before.append(item)


async def test_a_client_of_a_killed_worker_reconnects_to_the_other_and_keeps_receiving(
    cluster: ClusterProcess,
):
    room = fresh_room()
    async with AsyncExitStack() as stack:
        client = await reconnecting_on_worker(stack, cluster.url, 1, backoff_cap=1.0)
        witness = await reconnecting_on_worker(stack, cluster.url, 2)
        await client.join(room)
        await witness.join(room)
        assert client.welcome is not None
        victim = client.welcome["pid"]
        os.kill(victim, signal.SIGKILL)
        await until(client, Disconnected)
        connected, _ = await until(client, Connected)
        assert isinstance(connected, Connected) and connected.pid != victim
        rejoin, _ = await until(client, (Recovered, Unrecovered))  # type: ignore[arg-type]
        assert rejoin.room == room  # type: ignore[union-attr]
        await witness.publish(room, "after the kill", ack=True)
        received, skipped = await until(client, dict)
        assert received["data"] == "after the kill", (received, skipped)  # type: ignore[index]
        # The master restarts the killed worker; later tests of this module use both.
        await trio.to_thread.run_sync(
            functools.partial(cluster.wait_for_log, rf"worker 1 \(pid (?!{victim}\))\d+\) serving")
        )


def test_a_frozen_worker_is_noticed_by_missing_heartbeats_and_left_for_the_other():
    # Heartbeats every 0.2 s, so silence is noticed after the 2 s floor; the master's own
    # liveness check is set far longer, so that it is the client, not the master, that acts.
    cluster = ClusterProcess(
        "--workers", "2", "--heartbeat-interval", "0.2",
        "--liveness-interval", "5", "--liveness-timeout", "60",
    )  # fmt: skip
    frozen: list[int] = []
    try:
        cluster.wait_for_workers(2)

        async def scenario() -> None:
            room = fresh_room()
            async with AsyncExitStack() as stack:
                # Each worker has a listening socket of its own, and the kernel picks one by a
                # hash of the client's address: an attempt may land in the frozen worker's,
                # where nobody answers it. A short connect timeout gives it up, and the next
                # attempt (a new source port) lands on either worker again.
                client = await reconnecting_on_worker(
                    stack, cluster.url, 1, backoff_cap=0.5, connect_timeout=1.0
                )
                witness = await reconnecting_on_worker(stack, cluster.url, 2)
                await client.join(room)
                await witness.join(room)
                assert client.welcome is not None
                frozen.append(client.welcome["pid"])
                os.kill(frozen[0], signal.SIGSTOP)
                started = trio.current_time()
                # The frozen worker cannot pass this on; the recovery after the move must.
                await witness.publish(room, "while frozen", ack=True)
                disconnected, _ = await until(client, Disconnected)
                assert "no frame from the server" in disconnected.reason  # type: ignore[union-attr]
                # Noticed after the floor of 2 s, well before the master would have acted.
                assert 1.9 <= trio.current_time() - started < 6.0
                # Each attempt lands on the frozen worker with a chance of one in two: 30 s
                # leave room for 20 of them.
                connected, _ = await until(client, Connected, within=30)
                assert connected.worker == 2  # type: ignore[union-attr]
                await until(client, Recovered)
                await witness.publish(room, "after", ack=True)
                with trio.fail_after(RECEIVE_TIMEOUT):
                    received = [await client.receive(), await client.receive()]
                assert [item["data"] for item in received] == ["while frozen", "after"]  # type: ignore[index]

        trio.run(scenario)
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        cluster.stop()


# ---- version 2 on a worker embedded here, its sequencer in this process ----------------------
#
# The memory backplane's sequencer lives as long as one backplane of its name is open: a
# backplane the test holds keeps it (and the room's numbering) alive while the worker is away,
# and closing every one of them restarts the numbering in a new epoch.


@asynccontextmanager
async def worker_on(port: int, backplane_url: str) -> AsyncIterator[trio.CancelScope]:
    """A worker on ``port`` and ``backplane_url`` until the block ends or the scope is cancelled."""
    config = Config(port=port, heartbeat_interval=0, backplane=backplane_url)
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()
        await nursery.start(_serve_in, scope, config)
        yield scope
        scope.cancel()


async def test_version_2_messages_published_while_away_are_recovered_once_in_order():
    port, room, count = free_port(), fresh_room(), 5
    backplane_url = f"memory://reconnecting-{next(_names)}"
    async with (
        open_backplane(backplane_url) as keeps_the_sequencer,
        worker_on(port, backplane_url) as first_run,
        open_reconnecting_client(
            f"ws://127.0.0.1:{port}/ws", backoff_base=0.05, backoff_cap=0.2
        ) as client,
    ):
        emitter = Emitter(keeps_the_sequencer)
        assert isinstance(await next_item(client), Connected)
        joined = await client.join(room)
        assert joined["offset"] == 0
        assert await client.publish(room, "before", ack=True) == 1
        assert await next_item(client) == {
            "type": "message", "room": room, "data": "before", "offset": 1
        }  # fmt: skip
        first_run.cancel()
        assert isinstance(await next_item(client), Disconnected)
        for number in range(count):
            await emitter.publish(room, number)  # numbered 2, 3, … with no worker up
        async with worker_on(port, backplane_url):
            assert isinstance(await next_item(client), Connected)
            recovered = await next_item(client)
            assert isinstance(recovered, Recovered) and recovered.room == room, recovered
            assert await client.publish(room, "later", ack=True) == count + 2
            received = [await next_item(client) for _ in range(count + 1)]
            assert received == [
                {"type": "message", "room": room, "data": data, "offset": offset}
                for data, offset in [
                    *zip(range(count), range(2, count + 2), strict=True),
                    ("later", count + 2),
                ]
            ]


async def test_version_2_an_unknown_epoch_is_unrecovered_and_the_new_numbering_gets_through():
    port, room = free_port(), fresh_room()
    backplane_url = f"memory://reconnecting-{next(_names)}"
    async with (
        worker_on(port, backplane_url) as first_run,
        open_reconnecting_client(
            f"ws://127.0.0.1:{port}/ws", backoff_base=0.05, backoff_cap=0.2
        ) as client,
    ):
        assert isinstance(await next_item(client), Connected)
        old_epoch = (await client.join(room))["epoch"]
        assert await client.publish(room, "old epoch", ack=True) == 1
        assert (await next_item(client))["offset"] == 1  # type: ignore[index]
        first_run.cancel()  # its backplane was the last of its name: the sequencer ends
        assert isinstance(await next_item(client), Disconnected)
        async with worker_on(port, backplane_url):
            assert isinstance(await next_item(client), Connected)
            unrecovered = await next_item(client)
            assert isinstance(unrecovered, Unrecovered) and unrecovered.room == room
            assert unrecovered.joined["recovered"] is False
            assert unrecovered.joined["epoch"] != old_epoch
            # Offset 1 again, in the new epoch: not taken for a repeat.
            assert await client.publish(room, "new epoch", ack=True) == 1
            assert await next_item(client) == {
                "type": "message", "room": room, "data": "new epoch", "offset": 1
            }  # fmt: skip


async def test_version_2_a_new_epoch_while_connected_is_reported_and_its_messages_get_through():
    port, room = free_port(), fresh_room()
    backplane_url = f"memory://reconnecting-{next(_names)}"
    # The first backplane of a name sets its sequencer's policy: numbering forgotten after
    # 0.2 s without a message in the room.
    async with (
        open_backplane(backplane_url, history=HistoryPolicy(ttl=0.2)),
        worker_on(port, backplane_url),
        open_reconnecting_client(f"ws://127.0.0.1:{port}/ws") as client,
    ):
        assert isinstance(await next_item(client), Connected)
        await client.join(room)
        for number in (1, 2):
            assert await client.publish(room, number, ack=True) == number
            assert (await next_item(client))["offset"] == number  # type: ignore[index]
        await trio.sleep(0.5)  # past the room's ttl: its next message starts a new epoch
        assert await client.publish(room, "again", ack=True) == 1
        notice = await next_item(client)
        assert isinstance(notice, Unrecovered) and notice.room == room, notice
        assert await next_item(client) == {
            "type": "message", "room": room, "data": "again", "offset": 1
        }  # fmt: skip


async def test_version_2_an_application_too_slow_to_read_is_closed_and_recovers_everything():
    port, room, count = free_port(), fresh_room(), 3000
    backplane_url = f"memory://reconnecting-{next(_names)}"
    config = Config(
        port=port,
        heartbeat_interval=0,
        backplane=backplane_url,
        max_queued_frames=50,
        max_queued_bytes=256 * 1024,
    )
    # More than the client's buffer (1,000 messages), the loopback socket's buffers (a few MB)
    # and the worker's queue for the client (256 KiB) hold: the worker closes the connection
    # 1013. The room keeps them all, so that the rejoin can recover what had not reached the
    # client.
    padding = "x" * 8000
    async with (
        open_backplane(backplane_url, history=HistoryPolicy(size=count)) as backplane,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(serve, config)
        async with open_reconnecting_client(
            f"ws://127.0.0.1:{port}/ws", backoff_base=0.05, backoff_cap=0.2
        ) as client:
            assert isinstance(await next_item(client), Connected)
            await client.join(room)
            emitter = Emitter(backplane)
            for number in range(count):
                await emitter.publish(room, {"n": number, "padding": padding})
            items = []
            with trio.fail_after(RECEIVE_TIMEOUT):
                while len(messages := [i for i in items if isinstance(i, dict)]) < count:
                    items.append(await client.receive())
            events = [i for i in items if not isinstance(i, dict | Reconnecting)]
            # Each rejoin recovers what the worker's small queue lets through before it is
            # full again; whatever the number of rounds, each ends recovered.
            kinds = [type(event) for event in events]
            assert kinds and kinds == [Disconnected, Connected, Recovered] * (len(kinds) // 3)
            assert all(event.code == 1013 for event in events[::3])  # type: ignore[union-attr]
            assert [message["offset"] for message in messages] == list(range(1, count + 1))
        nursery.cancel_scope.cancel()
