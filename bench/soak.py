"""Soak: churn on `trio-fanout run --workers 2` for minutes, with a worker killed every minute.

Not part of the test suite; run it by hand (it prints its report and writes it as JSON):

    python bench/soak.py                      # 10 minutes, worker 2 killed every 60 s
    python bench/soak.py --minutes 1 --kill-every 20     # a smoke run

What runs meanwhile, all on loopback and bounded in time:
- STAYERS clients per worker join the room "soak-stay" once and read until the end;
- an emitter publishes a numbered message to "soak-stay" every 1/PUBLISH_RATE s;
- CHURNERS tasks loop: connect, join a few of ROOM_POOL rooms, publish, leave, disconnect;
- every --kill-every seconds worker 2 gets SIGKILL (the master restarts it).

The report: each process's RSS and open descriptors at the start (after a warm-up) and at the
end, and, for the stayers that were never disconnected, how many of the emitter's acknowledged
messages they missed, received twice, or received out of order (all three must be 0). Stayers
on worker 2 lose their connection at each kill; they reconnect and rejoin, and are reported
apart: what a client misses while it reconnects is not recovered by the server.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

from trio_fanout import open_emitter
from trio_fanout.backplane import BackplaneUnavailable
from trio_fanout.client import ServerError, open_client

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

STAY_ROOM = "soak-stay"
STAYERS = 20  # per worker
CHURNERS = 8
ROOM_POOL = 500
PUBLISH_RATE = 100.0  # emitter messages per second to the stayers' room
# Churn before the start figures, so that they are taken with the allocators warm.
WARM_UP_SECONDS = 60.0
SAMPLE_SECONDS = 60.0
# Bounds on every wait: a soak must end by itself, whatever the server does.
CONNECT_TIMEOUT = 10.0
STARTUP_TIMEOUT = 30.0
DRAIN_SECONDS = 3.0


class Cluster:
    """`trio-fanout run --workers 2` on free ports; it reads the log for ports and pids."""

    def __init__(self) -> None:
        env = dict(os.environ, TRIO_FANOUT_RATE_LIMIT_PER_SECOND="100000",
                   TRIO_FANOUT_RATE_LIMIT_BURST="100000")  # fmt: skip
        self.process = subprocess.Popen(
            [sys.executable, "-m", "trio_fanout", "run", "--workers", "2", "--port", "0",
             "--proxy-port", "0", "--heartbeat-interval", "1"],
            env=env, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        self.worker_pids: dict[int, int] = {}
        self.port = 0
        self.backplane_url = ""
        self.log_lines: list[str] = []

    def read_log_line(self) -> bool:
        assert self.process.stderr is not None
        line = self.process.stderr.readline()
        if not line:
            return False
        self.log_lines.append(line)
        if match := re.search(r"listening on ws://[\d.]+:(\d+)/ws .* backplane (\S+)", line):
            self.port = int(match.group(1))
            self.backplane_url = match.group(2)
        if match := re.search(r"worker (\d+) \(pid (\d+)\) serving", line):
            self.worker_pids[int(match.group(1))] = int(match.group(2))
        return True

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def pids(self) -> dict[str, int]:
        return {"master": self.process.pid} | {
            f"worker {index}": pid for index, pid in sorted(self.worker_pids.items())
        }

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def process_figures(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kib = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]
    return {"rss_kib": rss_kib, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


class Stayer:
    """A client that joins STAY_ROOM and records the sequence numbers it receives."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.worker = 0
        self.connections = 0
        self.received: list[int] = []

    @property
    def stayed(self) -> bool:
        return self.connections == 1

    async def run(self, url: str, placed: trio.Event, wanted_worker: int) -> None:
        while True:
            try:
                async with open_client(url, connect_timeout=CONNECT_TIMEOUT) as client:
                    if client.worker != wanted_worker:
                        # Placed on the other worker: try again, so that each worker holds the
                        # same clients at the start and at the end of the soak.
                        continue
                    self.worker = client.worker
                    self.connections += 1
                    await client.join(STAY_ROOM)
                    placed.set()
                    async for message in client:
                        self.received.append(message["data"]["n"])
            except (OSError, ServerError, trio.TooSlowError) as error:
                del error  # the worker was killed under us, or is restarting: reconnect
            except Exception as error:  # trio_websocket's closed/rejected errors
                if type(error).__module__.split(".")[0] != "trio_websocket":
                    raise
            await trio.sleep(0.1)


async def publish_numbered(backplane_url: str, acknowledged: list[int], stop: trio.Event) -> None:
    """Publish {"n": 1, 2, …} to STAY_ROOM; ``acknowledged`` gets each n the backplane took."""
    number = 0
    async with open_emitter(backplane_url) as emitter:
        next_at = trio.current_time()
        while not stop.is_set():
            number += 1
            try:
                await emitter.publish(STAY_ROOM, {"n": number})
                acknowledged.append(number)
            except BackplaneUnavailable:
                pass
            next_at += 1 / PUBLISH_RATE
            await trio.sleep_until(max(next_at, trio.current_time()))


async def churn_for(url: str, seconds: float, counts: dict[str, int]) -> None:
    """CHURNERS clients connecting, joining, publishing and leaving for ``seconds``; then the
    churn stops and its connections are closed (waited for, DRAIN_SECONDS at most)."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        for seed in range(CHURNERS):
            nursery.start_soon(churn, url, stop, counts, seed)
        await trio.sleep(seconds)
        stop.set()
        nursery.cancel_scope.deadline = trio.current_time() + CONNECT_TIMEOUT
    await trio.sleep(DRAIN_SECONDS)  # the workers see the last churn connections close


async def sample_every(cluster: Cluster, seconds: float, samples: list[dict[str, Any]]) -> None:
    """RSS and descriptors of the master and worker 1 (never killed) every ``seconds``: a leak
    climbs steadily, where an allocator's warm-up levels off."""
    started = trio.current_time()
    while True:
        await trio.sleep(seconds)
        sample: dict[str, Any] = {"seconds": round(trio.current_time() - started)}
        for name in ("master", "worker 1"):
            sample[name] = process_figures(cluster.pids()[name])
        samples.append(sample)
        print(f"{time.strftime('%H:%M:%S')} {sample}", flush=True)


async def kill_worker_2_every(cluster: Cluster, seconds: float, counts: dict[str, int]) -> None:
    while True:
        await trio.sleep(seconds)
        os.kill(cluster.worker_pids[2], signal.SIGKILL)
        counts["kills"] += 1
        print(f"{time.strftime('%H:%M:%S')} killed worker 2; {counts}", flush=True)


async def churn(url: str, stop: trio.Event, counts: dict[str, int], seed: int) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        try:
            async with open_client(url, connect_timeout=CONNECT_TIMEOUT) as client:
                rooms = [f"soak-room-{rng.randrange(ROOM_POOL)}" for _ in range(rng.randint(1, 5))]
                for room in set(rooms):
                    await client.join(room)
                for room in rooms:
                    await client.publish(room, {"churn": seed, "pad": "x" * rng.randrange(500)})
                for room in set(rooms):
                    await client.leave(room)
            counts["sessions"] += 1
        except (OSError, ServerError, trio.TooSlowError):
            counts["failed"] += 1
        except Exception as error:
            if type(error).__module__.split(".")[0] != "trio_websocket":
                raise
            counts["failed"] += 1


def loss_report(stayers: list[Stayer], acknowledged: list[int]) -> dict[str, Any]:
    """Missed, duplicated and out-of-order messages, for the stayers that never reconnected and
    for those that did (what they missed while reconnecting is expected)."""
    sent = set(acknowledged)
    report: dict[str, Any] = {"acknowledged": len(acknowledged)}
    for label, group in (
        ("stayed", [s for s in stayers if s.stayed]),
        ("reconnected", [s for s in stayers if not s.stayed]),
    ):
        missing = duplicates = reordered = 0
        for stayer in group:
            # Every stayer had joined before the emitter's first message.
            got = stayer.received
            missing += len(sent - set(got))
            duplicates += len(got) - len(set(got))
            reordered += sum(1 for a, b in itertools.pairwise(got) if b < a)
        report[label] = {
            "clients": len(group),
            "missing": missing,
            "duplicates": duplicates,
            "out_of_order": reordered,
        }
    return report


async def soak(minutes: float, kill_every: float) -> dict[str, Any]:
    cluster = Cluster()
    try:
        with trio.fail_after(STARTUP_TIMEOUT):
            while len(cluster.worker_pids) < 2 or not cluster.port:
                if not await trio.to_thread.run_sync(cluster.read_log_line):
                    raise RuntimeError("the cluster exited:\n" + "".join(cluster.log_lines))
        stop = trio.Event()
        acknowledged: list[int] = []
        counts = {"sessions": 0, "failed": 0, "kills": 0}
        stayers = [Stayer(n) for n in range(2 * STAYERS)]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_log_forever, cluster)
            with trio.fail_after(STARTUP_TIMEOUT):
                for stayer in stayers:
                    placed = trio.Event()
                    nursery.start_soon(stayer.run, cluster.url, placed, 1 + stayer.number % 2)
                    await placed.wait()
            nursery.start_soon(publish_numbered, cluster.backplane_url, acknowledged, stop)
            # Descriptors and memory are compared with the churn paused, after it has warmed up
            # the allocator, so that connections in flight do not count at one end only.
            await churn_for(cluster.url, WARM_UP_SECONDS, counts)
            start = {name: process_figures(pid) for name, pid in cluster.pids().items()}
            print(f"start: {start}", flush=True)
            samples: list[dict[str, Any]] = []
            async with trio.open_nursery() as killing:
                killing.start_soon(kill_worker_2_every, cluster, kill_every, counts)
                killing.start_soon(sample_every, cluster, SAMPLE_SECONDS, samples)
                await churn_for(cluster.url, minutes * 60, counts)
                killing.cancel_scope.cancel()
            await trio.sleep(DRAIN_SECONDS)  # the restarted worker is up, its clients back
            stop.set()
            await trio.sleep(DRAIN_SECONDS)  # the last messages reach the stayers
            end = {name: process_figures(pid) for name, pid in cluster.pids().items()}
            nursery.cancel_scope.cancel()
        return {
            "minutes": minutes,
            "kill_every_seconds": kill_every,
            "start": start,
            "end": end,
            "samples_during_churn": samples,
            "churn": counts,
            "messages": loss_report(stayers, acknowledged),
        }
    finally:
        cluster.stop()


async def _read_log_forever(cluster: Cluster) -> None:
    while await trio.to_thread.run_sync(cluster.read_log_line, abandon_on_cancel=True):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--kill-every", type=float, default=60.0, metavar="SECONDS")
    args = parser.parse_args()
    report = trio.run(soak, args.minutes, args.kill_every)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"written to {path}")
    for name in ("master", "worker 1"):
        rss = report["end"][name]["rss_kib"] / report["start"][name]["rss_kib"]
        fds = report["end"][name]["fds"] / report["start"][name]["fds"]
        print(f"{name}: RSS end/start {rss:.2f}, descriptors end/start {fds:.2f}")


if __name__ == "__main__":
    main()
