"""The standalone ZeroMQ proxy killed (kill -9) and restarted on its port under two running
workers, their clients and an emitter: real processes, as on several hosts."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest
import trio

from tests.helpers import (
    LoggedProcess,
    free_port,
    receive_message,
    trio_fanout_command,
)
from trio_fanout.backplane import BackplaneUnavailable, open_backplane
from trio_fanout.client import ServerError, open_client
from trio_fanout.emitter import open_emitter

# Bounds on what takes well under a second when healthy (see docs/architecture.md for the
# measured times); generous for a shared machine.
NOTICE_TIMEOUT = 5.0
RESUME_TIMEOUT = 10.0


def start_proxy(port: int) -> LoggedProcess:
    proxy = LoggedProcess(
        trio_fanout_command("proxy", "--port", str(port), "--heartbeat-interval", "0")
    )
    proxy.wait_for_log("ZeroMQ proxy: clients connect")
    return proxy


@pytest.fixture
def proxy_port() -> int:
    return free_port()


@pytest.fixture
def worker_urls(proxy_port: int) -> Iterator[tuple[list[str], list[LoggedProcess]]]:
    proxy = start_proxy(proxy_port)
    processes = [proxy]
    try:
        urls = []
        for _ in range(2):
            worker = LoggedProcess(
                trio_fanout_command(
                    "worker", "--port", "0", "--backplane", f"zmq://127.0.0.1:{proxy_port}"
                )
            )
            processes.append(worker)
            match = worker.wait_for_log(r"serving ws://127\.0\.0\.1:(\d+)/ws")
            urls.append(f"ws://127.0.0.1:{match.group(1)}/ws")
        yield urls, processes
    finally:
        for process in processes:
            process.stop()


async def test_workers_resume_by_themselves_after_the_proxy_is_killed_and_restarted(
    proxy_port: int, worker_urls: tuple[list[str], list[LoggedProcess]]
) -> None:
    urls, processes = worker_urls
    room = f"restart-{os.getpid()}"
    async with (
        open_client(urls[0]) as on_a,
        open_client(urls[1]) as on_b,
        open_emitter(f"zmq://127.0.0.1:{proxy_port}") as emitter,
    ):
        await on_a.join(room)
        await on_b.join(room)
        await emitter.publish(room, "before")
        for client in (on_a, on_b):
            assert (await receive_message(client))["data"] == "before"

        proxy = processes[0]
        os.killpg(proxy.process.pid, signal.SIGKILL)
        killed_at = trio.current_time()
        proxy.stop()

        # The emitter is told: its publish is refused, not silently dropped.
        with trio.fail_after(NOTICE_TIMEOUT), pytest.raises(BackplaneUnavailable):
            await emitter.publish(room, "while down")
        emitter_noticed = trio.current_time() - killed_at
        # So are the workers' clients: an error frame, not a silent loss.
        with trio.fail_after(NOTICE_TIMEOUT), pytest.raises(ServerError) as refused:
            await on_a.publish(room, "from a client while down", ack=True)
        assert refused.value.frame["code"] == "backplane_unavailable"

        processes[0] = start_proxy(proxy_port)
        restarted_at = trio.current_time()
        refusals = 0
        async with trio.open_nursery() as nursery:

            async def keep_publishing() -> None:
                nonlocal refusals
                for number in range(10_000):
                    try:
                        await emitter.publish(room, ["after", number])
                    except BackplaneUnavailable:
                        refusals += 1
                    await trio.sleep(0.02)

            nursery.start_soon(keep_publishing)
            # No join again: the workers' subscriptions come back by themselves. The restarted
            # proxy numbers the room afresh: members are told of the new epoch first.
            for client in (on_a, on_b):
                with trio.fail_after(RESUME_TIMEOUT):
                    notice = await client.receive()
                assert (notice["type"], notice["recovered"]) == ("joined", False), notice
                with trio.fail_after(RESUME_TIMEOUT):
                    assert (await receive_message(client))["data"][0] == "after"
            resumed_after = trio.current_time() - restarted_at
            nursery.cancel_scope.cancel()
        print(
            f"the emitter was refused {emitter_noticed:.3f} s after the kill; both workers "
            f"delivered again {resumed_after:.3f} s after the restart ({refusals} refused)"
        )


async def test_trio_fanout_proxy_keeps_the_history_it_is_told_to(proxy_port: int) -> None:
    proxy = LoggedProcess(
        trio_fanout_command(
            "proxy", "--port", str(proxy_port), "--heartbeat-interval", "0", "--history-size", "2"
        )
    )
    try:
        proxy.wait_for_log("ZeroMQ proxy: clients connect")
        async with open_backplane(f"zmq://127.0.0.1:{proxy_port}") as backplane:
            for number in range(1, 6):
                await backplane.append(b"room", b"%d" % number)
            history = await backplane.history(b"room")
            assert (history.offset, history.messages) == (5, [(4, b"4"), (5, b"5")])
    finally:
        proxy.stop()
