"""What numbering costs the ZeroMQ proxy per message: the proxy's own CPU time to handle a
PUBLISH and an APPEND, each routed to two subscribers. Not part of the test suite; run it by
hand:

    python bench/sequencer_cost.py

It drives the proxy's command handler (``ZmqProxy._handle``) directly, on a real ROUTER socket
with two DEALER subscribers and a DEALER publisher connected over inproc, and measures the
handler's thread CPU time (``time.thread_time``), which other processes on a busy machine do
not inflate as they do a wall-clock rate. The subscribers' and the publisher's sockets are
drained between batches, outside the measured time. 100-byte payloads on one topic. Three
cases: PUBLISH (not numbered), APPEND with the default history policy (100 messages kept, so
after the first 100 every append also drops the oldest), and APPEND with history off
(``history_size`` 0: numbered, nothing kept), alternated within each round.
"""

from __future__ import annotations

import argparse
import statistics
import time

import trio
import zmq

from trio_fanout.backplane._interface import HistoryPolicy
from trio_fanout.backplane._zmq_wire import APPEND, NUMBER, PUBLISH, SUBSCRIBE, receive_frames
from trio_fanout.backplane.proxy import ZmqProxy

TOPIC = b"room"
PAYLOAD = b"x" * 100
BATCH = 1000


def drain(sock: zmq.Socket[bytes]) -> None:
    while True:
        try:
            receive_frames(sock)
        except zmq.Again:
            return


async def measure(command: bytes, history_size: int, batches: int) -> list[float]:
    """Microseconds of handler CPU per message, one figure per batch. Run by ``trio.run``
    only because the handler reads Trio's clock; it awaits nothing."""
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.SNDHWM, 0)
    router.bind("inproc://proxy")
    clients = []
    for _ in range(3):
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.RCVHWM, 0)
        dealer.connect("inproc://proxy")
        clients.append(dealer)
    proxy = ZmqProxy(history=HistoryPolicy(size=history_size))
    subscribers = clients[:2]  # the third, subscribed elsewhere, publishes
    for dealer in clients:
        dealer.send(SUBSCRIBE + NUMBER.pack(0) + (TOPIC if dealer in subscribers else b"other"))
        proxy._handle(router, router.recv_multipart())
    identity = next(peer.identity for peer in proxy.peers.values() if b"other" in peer.topics)
    for dealer in clients:
        drain(dealer)
    results = []
    request = 0
    for _ in range(batches):
        messages = []
        for _ in range(BATCH):
            request += 1
            messages.append([identity, command + NUMBER.pack(request) + TOPIC, PAYLOAD])
        start = time.thread_time()
        for frames in messages:
            proxy._handle(router, frames)
        results.append((time.thread_time() - start) / BATCH * 1e6)
        for dealer in clients:
            drain(dealer)
        for peer in proxy.peers.values():
            peer.unacknowledged = 0  # as the subscribers' credit would
    for sock in (*clients, router):
        sock.close(0)
    context.term()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cases = {
        "publish": (PUBLISH, 100),
        "append, history_size 100": (APPEND, 100),
        "append, history_size 0": (APPEND, 0),
    }
    medians: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):  # alternated, so that a busy moment hits all alike
        for name, (command, history_size) in cases.items():
            medians[name].append(
                statistics.median(trio.run(measure, command, history_size, args.batches))
            )
    for name, figures in medians.items():
        shown = ", ".join(f"{figure:.2f}" for figure in figures)
        median = statistics.median(figures)
        print(f"{name:>24}: {median:.2f} µs of proxy CPU per message, median (rounds: {shown})")
    ratios = [
        kept / none
        for kept, none in zip(
            medians["append, history_size 100"], medians["append, history_size 0"], strict=True
        )
    ]
    shown = ", ".join(f"{ratio:.3f}" for ratio in ratios)
    print(f"append, history_size 100 / 0, round by round: {shown}")


if __name__ == "__main__":
    main()
