"""How long a mass disconnect holds a worker's loop: a real ZeroMQ proxy and backplane in this
process, one Worker, C connections that each are the only member of R rooms; then every
connection's ``Worker.forget`` runs in one turn of the loop, as when they all close at once.
Prints how long that turn took, and how long until the proxy held none of the topics. Not part
of the test suite; run it by hand:

    python bench/mass_leave.py                    # 1,000 connections x 100 rooms
    python bench/mass_leave.py --connections 100 --rooms 1000

``forget`` uses a connection's ``id`` and ``rooms`` only, so the connections here are stand-ins
with those two attributes: no socket is needed to measure the leaving.
"""

from __future__ import annotations

import argparse
import time
from typing import cast

import trio

from trio_fanout.backplane.proxy import ZmqProxy
from trio_fanout.backplane.zmq import open_zmq_backplane
from trio_fanout.config import Config
from trio_fanout.connection import Connection
from trio_fanout.worker import Worker

SETTLE_TIMEOUT = 60.0


class StandIn:
    """What ``Worker.join`` and ``Worker.forget`` touch of a connection."""

    def __init__(self, number: int) -> None:
        self.id = number
        self.rooms: set[str] = set()


async def measure(connections: int, rooms: int) -> None:
    proxy = ZmqProxy("127.0.0.1", 0)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.serve)
        async with open_zmq_backplane("127.0.0.1", port) as backplane:
            worker = Worker(Config(), backplane)
            members = [cast(Connection, StandIn(number)) for number in range(connections)]
            began = time.perf_counter()
            for member in members:
                async with trio.open_nursery() as joining:
                    for room in range(rooms):
                        joining.start_soon(worker.join, member, f"c{member.id}-room-{room}")
            print(
                f"{connections} connections x {rooms} rooms joined in "
                f"{time.perf_counter() - began:.1f} s; the proxy holds {len(proxy.subscribers)}"
            )
            began = time.perf_counter()
            for member in members:
                worker.forget(member)
            turn = time.perf_counter() - began
            with trio.fail_after(SETTLE_TIMEOUT):
                while proxy.subscribers:  # noqa: ASYNC110 - the proxy's table has no event
                    await trio.sleep(0.001)
            settled = time.perf_counter() - began
            print(f"every forget() in one turn: {turn * 1000:.0f} ms of loop held")
            print(f"the proxy held none of the topics {settled * 1000:.0f} ms after the first")
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--rooms", type=int, default=100)
    arguments = parser.parse_args()
    trio.run(measure, arguments.connections, arguments.rooms)


if __name__ == "__main__":
    main()
