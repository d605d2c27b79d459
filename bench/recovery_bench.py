"""What recovery on join costs: the time from a `join` with `since` to the last missed message,
against the time of a plain `join`, on each backplane. Not part of the test suite; run it by hand:

    python bench/recovery_bench.py                 # memory, zmq and redis (needs redis-server)
    python bench/recovery_bench.py --missed 100 --rounds 50 --backplanes zmq

Each round: a client rejoins a room with `since` set `--missed` messages back and reads them
all; then a plain join of another connection. It prints the medians and 90th percentiles, and
the cost of splicing an offset into a frame (once per message in the fan-out).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from typing import Any

import trio

from trio_fanout import protocol
from trio_fanout.client import Client, open_client

START_TIMEOUT = 30.0
ROUND_TIMEOUT = 10.0


def start(command: list[str], pattern: str) -> tuple[subprocess.Popen[str], re.Match[str]]:
    """Start ``command`` and wait for a log line matching ``pattern`` on its stderr."""
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert process.stderr is not None
    deadline = time.monotonic() + START_TIMEOUT
    for line in process.stderr:
        if match := re.search(pattern, line):
            return process, match
        if time.monotonic() > deadline:
            break
    process.kill()
    raise SystemExit(f"{command[0]} did not start: no {pattern!r}")


def start_worker(backplane: str, redis_dir: str) -> tuple[list[subprocess.Popen[str]], str]:
    python = [sys.executable, "-m", "trio_fanout"]
    processes = []
    if backplane == "memory":
        url = f"memory://bench-{os.getpid()}"
    elif backplane == "zmq":
        proxy, match = start(
            [*python, "proxy", "--port", "0", "--heartbeat-interval", "0"],
            r"clients connect to \S+:(\d+)",
        )
        processes.append(proxy)
        url = f"zmq://127.0.0.1:{match.group(1)}"
    else:
        with socket.socket() as probe:  # a free port for redis-server, which cannot take 0
            probe.bind(("127.0.0.1", 0))
            port = str(probe.getsockname()[1])
        redis, _ = start(
            ["redis-server", "--port", port, "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", redis_dir, "--logfile", "/dev/stderr"],
            "Ready to accept connections",
        )  # fmt: skip
        processes.append(redis)
        url = f"redis://127.0.0.1:{port}"
    worker, match = start(
        [*python, "worker", "--port", "0", "--backplane", url],
        r"serving ws://127\.0\.0\.1:(\d+)/ws",
    )
    processes.append(worker)
    return processes, f"ws://127.0.0.1:{match.group(1)}/ws"


_ids = itertools.count(1)


async def request(client: Client, frame: dict[str, Any]) -> dict[str, Any]:
    frame["id"] = request_id = next(_ids)
    await client.send(frame)
    while True:
        reply = await client.receive()
        if reply.get("id") == request_id:
            return reply


async def measure(url: str, missed: int, rounds: int) -> dict[str, list[float]]:
    room = f"bench-{os.getpid()}-{time.monotonic_ns()}"
    times: dict[str, list[float]] = {"recover": [], "plain": []}
    async with open_client(url) as publisher:
        for number in range(missed):
            await request(publisher, {"type": "publish", "room": room, "data": number})
        where = await request(publisher, {"type": "history", "room": room, "limit": 0})
        since = {"epoch": where["epoch"], "offset": where["offset"] - missed}
        for _ in range(rounds):
            async with open_client(url) as joiner, open_client(url) as plain:
                with trio.fail_after(ROUND_TIMEOUT):
                    began = time.perf_counter()
                    joined = await request(joiner, {"type": "join", "room": room, "since": since})
                    assert joined["recovered"], joined
                    for _ in range(missed):
                        assert (await joiner.receive())["type"] == "message"
                    times["recover"].append(time.perf_counter() - began)
                    began = time.perf_counter()
                    await request(plain, {"type": "join", "room": room})
                    times["plain"].append(time.perf_counter() - began)
    return times


def splice_cost_ns() -> float:
    frame = protocol.message_frame("lobby", {"name": "ann", "text": "hello " * 10})
    number = 200_000
    seconds = min(timeit.repeat(lambda: protocol.with_offset(frame, 123456), number=number))
    return seconds / number * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--missed", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--backplanes", default="memory,zmq,redis")
    args = parser.parse_args()
    results = {}
    for backplane in args.backplanes.split(","):
        with tempfile.TemporaryDirectory() as redis_dir:
            processes, url = start_worker(backplane, redis_dir)
            try:
                times = trio.run(measure, url, args.missed, args.rounds)
            finally:
                for process in reversed(processes):
                    process.terminate()
                    process.wait(10)
        for kind, values in times.items():
            deciles = statistics.quantiles(values, n=10)
            results[f"{backplane} {kind}"] = (statistics.median(values) * 1e3, deciles[-1] * 1e3)
    print(f"join with since, {args.missed} missed messages, {args.rounds} rounds (ms):")
    for name, (median, p90) in results.items():
        print(f"  {name:16} median {median:7.2f}   p90 {p90:7.2f}")
    print(f"splicing the offset into a frame: {splice_cost_ns():.0f} ns a message")
    print(json.dumps({name: list(values) for name, values in results.items()}))


if __name__ == "__main__":
    main()
