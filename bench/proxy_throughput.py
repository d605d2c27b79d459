"""Throughput of the ZeroMQ proxy: one publisher, two subscribers of one topic, 100-byte messages,
each in a process of its own. Not part of the test suite; run it by hand:

    python bench/proxy_throughput.py                  # the proxy (trio-fanout proxy), 3 runs
    python bench/proxy_throughput.py --proxy xpub     # zmq.proxy with XSUB/XPUB, for comparison
    python bench/proxy_throughput.py --command append # numbered messages, kept in the history
    python bench/proxy_throughput.py --command append --history-sizes 100,0  # kept or not

The clients speak the proxy's commands with plain blocking pyzmq (backplane/_zmq_wire.py), so
that the figure is the proxy's, not a client's: the publisher keeps WINDOW publishes waiting for
their answers, the subscribers return credit as the backplane does. For ``xpub``, a PUB socket
publishes as fast as it can to an XSUB/XPUB ``zmq.proxy`` (what backplane/proxy.py ran before
the router), and SUB sockets receive. Prints what each subscriber received per second, and the
median of the runs. ``--command append`` has the publisher send APPEND instead of PUBLISH: the
proxy numbers each message, keeps it in the topic's history (the default policy: 100 messages)
and sends it with its position, which measures what the sequencer adds to the path.
``--history-sizes 100,0`` runs the proxy with each history size in turn, alternating within
each run, and prints the ratio of their rates run by run.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time

import zmq

from trio_fanout.backplane._zmq_wire import (
    APPEND,
    CREDIT,
    MESSAGE,
    NUMBER,
    POSITION_END,
    PUBLISH,
    SUBSCRIBE,
    message_cost,
    receive_frames,
    send_frames,
)

TOPIC = b"t"
PAYLOAD = b"x" * 100
WINDOW = 1000  # publishes in flight: enough to keep the proxy busy without a client's limit
CREDIT_STEP_BYTES = 256 * 1024
# The publisher starts after the subscribers and must outlast their measurement.
PUBLISHER_EXTRA_SECONDS = 3.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_xpub_proxy(port: int) -> None:
    context = zmq.Context.instance()
    xsub, xpub = context.socket(zmq.XSUB), context.socket(zmq.XPUB)
    xsub.bind(f"tcp://127.0.0.1:{port}")
    xpub.bind(f"tcp://127.0.0.1:{port + 1}")
    zmq.proxy(xsub, xpub)


def subscribe(kind: str, port: int, seconds: float) -> None:
    """Receive for ``seconds`` after the first message; print the rate as JSON."""
    context = zmq.Context.instance()
    if kind == "router":
        sock = context.socket(zmq.DEALER)
        sock.connect(f"tcp://127.0.0.1:{port}")
        sock.send_multipart([SUBSCRIBE + NUMBER.pack(1) + TOPIC])
        sock.recv_multipart()  # the answer: subscribed
    else:
        sock = context.socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, TOPIC)
        sock.connect(f"tcp://127.0.0.1:{port + 1}")
        time.sleep(0.5)  # subscriptions travel asynchronously
    print("ready", flush=True)
    sock.recv_multipart()
    received, taken = 0, 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _ in range(1000):
            try:
                frames = receive_frames(sock)
            except zmq.Again:
                if sock.poll(2000):
                    continue
                break
            received += 1
            if kind == "router":
                head = frames[0]
                topic = head[1:] if head[:1] == MESSAGE else head[POSITION_END:]
                taken += message_cost(topic, frames[1])
                if taken >= CREDIT_STEP_BYTES:
                    sock.send_multipart([CREDIT + NUMBER.pack(taken)])
                    taken = 0
    print(json.dumps({"per_second": received / (time.perf_counter() - start)}), flush=True)


def publish(kind: str, port: int, seconds: float, command: bytes) -> None:
    context = zmq.Context.instance()
    deadline = time.perf_counter() + seconds
    if kind == "router":
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.SNDHWM, 0)  # the window bounds what is queued, as in the backplane
        sock.connect(f"tcp://127.0.0.1:{port}")
        outstanding, request = 0, 0
        while time.perf_counter() < deadline:
            while outstanding < WINDOW:
                request += 1
                send_frames(sock, [command + NUMBER.pack(request) + TOPIC, PAYLOAD])
                outstanding += 1
            sock.recv_multipart()  # blocks for the first answer; the others are taken below
            outstanding -= 1
            while True:
                try:
                    receive_frames(sock)
                except zmq.Again:
                    break
                outstanding -= 1
    else:
        sock = context.socket(zmq.PUB)
        sock.connect(f"tcp://127.0.0.1:{port}")
        time.sleep(0.5)
        while time.perf_counter() < deadline:
            for _ in range(1000):
                send_frames(sock, [TOPIC, PAYLOAD])


def one_run(kind: str, seconds: float, command: str, history_size: int) -> list[float]:
    port = free_port()
    me = [sys.executable, __file__, "--proxy", kind, "--command", command]
    if kind == "router":
        proxy = subprocess.Popen(
            [sys.executable, "-m", "trio_fanout", "proxy", "--port", str(port),
             "--heartbeat-interval", "0", "--log-level", "warning",
             "--history-size", str(history_size)],
        )  # fmt: skip
    else:
        proxy = subprocess.Popen([*me, "--role", "xpub-proxy", "--port", str(port)])
    time.sleep(1.0)
    subscribers = [
        subprocess.Popen(
            [*me, "--role", "subscriber", "--port", str(port), "--seconds", str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for subscriber in subscribers:
        assert subscriber.stdout is not None
        assert subscriber.stdout.readline().strip() == "ready"
    publisher = subprocess.Popen(
        [*me, "--role", "publisher", "--port", str(port),
         "--seconds", str(seconds + PUBLISHER_EXTRA_SECONDS)],
    )  # fmt: skip
    rates = []
    for subscriber in subscribers:
        out, _ = subscriber.communicate(timeout=seconds + 30)
        rates.append(json.loads(out.strip().splitlines()[-1])["per_second"])
    publisher.kill()
    proxy.terminate()
    proxy.wait(10)
    publisher.wait(10)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proxy", choices=["router", "xpub"], default="router")
    parser.add_argument("--command", choices=["publish", "append"], default="publish")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument(
        "--history-sizes",
        default="100",
        help="the proxy's history_size; several (comma-separated) alternate",
    )
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "xpub-proxy":
        run_xpub_proxy(args.port)
    elif args.role == "subscriber":
        subscribe(args.proxy, args.port, args.seconds)
    elif args.role == "publisher":
        publish(
            args.proxy,
            args.port,
            args.seconds,
            {"publish": PUBLISH, "append": APPEND}[args.command],
        )
    else:
        sizes = [int(size) for size in args.history_sizes.split(",")]
        per_run: dict[int, list[float]] = {size: [] for size in sizes}
        for run in range(1, args.runs + 1):
            for size in sizes if run % 2 else sizes[::-1]:  # alternated
                rates = one_run(args.proxy, args.seconds, args.command, size)
                per_run[size].append(statistics.mean(rates))
                shown = ", ".join(f"{rate:,.0f}" for rate in rates)
                print(f"run {run}, history_size {size}: {shown} messages/s per subscriber",
                      flush=True)  # fmt: skip
        for size, rates in per_run.items():
            print(f"{args.proxy} {args.command}, history_size {size}: median "
                  f"{statistics.median(rates):,.0f} messages/s per subscriber "
                  f"(2 subscribers, {len(PAYLOAD)}-byte payloads)")  # fmt: skip
        if len(sizes) == 2:
            ratios = [first / second for first, second in zip(*per_run.values(), strict=True)]
            print(f"history_size {sizes[0]} / {sizes[1]}, run by run: "
                  + ", ".join(f"{ratio:.2f}" for ratio in ratios)
                  + f"; median {statistics.median(ratios):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
