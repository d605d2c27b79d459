"""What rooms cost in memory: `trio-fanout run --workers 2` on ZeroMQ (the embedded proxy) or on
Redis, N connections on worker 1 that each join R rooms of their own (names of L characters),
RSS of the master and of both workers (and of redis-server) at the start, after the joins and
after everyone has left. Not part of the test suite; run it by hand:

    python bench/rooms_memory.py                          # ZeroMQ, 1,000 x 100 rooms
    python bench/rooms_memory.py --backplane redis        # the same on a redis-server of its own
    python bench/rooms_memory.py --connections 100 --name-length 800

This process is the load (its clients' memory is not counted); clients that land on worker 2
are closed at once, so that worker 2 holds no member and shows what a room costs a worker
without members. With --publish, one message is published to each room and received, so that
per-room state kept for messages (sequence tracking) is counted too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import trio

from trio_fanout.client import Client, open_client

START_TIMEOUT = 30.0
SETTLE_SECONDS = 2.0  # after each phase, before reading RSS: queues drained, GC done
# After everyone has left, the proxy may still be working through the unsubscriptions when the
# workers already report no rooms (on a busy machine, for seconds): the reading waits until no
# process's RSS has changed by more than SETTLED_KIB in SETTLE_SECONDS, for at most this long.
SETTLED_TIMEOUT = 60.0
SETTLED_KIB = 256


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


class Processes:
    """The cluster (and redis-server) as subprocesses whose logs are drained by threads."""

    def __init__(self, backplane: str, directory: str) -> None:
        self.children: list[subprocess.Popen[str]] = []
        self.logs: list[str] = []
        self.redis_pid: int | None = None
        self.redis_port = 0
        extra: list[str] = []
        if backplane == "redis":
            self.redis_port = free_port()
            redis = self._start(
                ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", directory,
                 "--logfile", "/dev/stderr"],
                r"Ready to accept connections",
            )  # fmt: skip
            self.redis_pid = redis.pid
            extra = ["--backplane", f"redis://127.0.0.1:{self.redis_port}"]
        env = dict(os.environ, TRIO_FANOUT_MAX_ROOMS_PER_CONNECTION="1000",
                   TRIO_FANOUT_RATE_LIMIT_BURST="100000")  # fmt: skip
        self.master = self._start(
            [sys.executable, "-m", "trio_fanout", "run", "--workers", "2", "--port", "0",
             "--proxy-port", "0", "--heartbeat-interval", "0", *extra],
            r"worker \d \(pid \d+\) serving",
            env=env,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while len(re.findall(r"worker \d \(pid \d+\) serving", text := "\n".join(self.logs))) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError("the workers did not start:\n" + text)
            time.sleep(0.05)
        self.port = int(re.findall(r"listening on ws://[\d.]+:(\d+)/ws", text)[0])
        self.worker_pids = {
            int(index): int(pid)
            for index, pid in re.findall(r"worker (\d) \(pid (\d+)\) serving", text)
        }

    def _start(
        self, command: list[str], ready: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
        )  # fmt: skip
        self.children.append(process)
        seen = threading.Event()

        def drain() -> None:
            assert process.stderr is not None
            for line in process.stderr:
                self.logs.append(line.rstrip())
                if re.search(ready, line):
                    seen.set()

        threading.Thread(target=drain, daemon=True).start()
        if not seen.wait(START_TIMEOUT):
            raise RuntimeError(f"{command[0]} did not start:\n" + "\n".join(self.logs))
        return process

    def rss(self) -> dict[str, int]:
        """RSS in KiB of each process; an error if one of them has gone (a worker that was
        restarted would make every later figure meaningless)."""
        try:
            return self._rss()
        except FileNotFoundError:
            raise RuntimeError("a process is gone; the log:\n" + "\n".join(self.logs)) from None

    def _rss(self) -> dict[str, int]:
        figures = {
            "master": rss_kib(self.master.pid),
            "worker 1 (members)": rss_kib(self.worker_pids[1]),
            "worker 2 (none)": rss_kib(self.worker_pids[2]),
        }
        if self.redis_pid is not None:
            figures["redis-server"] = rss_kib(self.redis_pid)
        return figures

    def redis_used_memory(self) -> int | None:
        if not self.redis_port:
            return None
        info = subprocess.run(
            ["redis-cli", "-p", str(self.redis_port), "info", "memory"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        return int(re.search(r"used_memory:(\d+)", info).group(1))  # type: ignore[union-attr]

    def stop(self) -> None:
        for process in reversed(self.children):
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


def healthz(port: int) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def room_name(connection: int, room: int, length: int) -> str:
    return f"{connection:06d}-{room:04d}-".ljust(length, "x")


async def load(port: int, args: argparse.Namespace, connected: trio.Event, join: trio.Event,
               joined: trio.Event, leave: trio.Event) -> None:  # fmt: skip
    """Open connections on worker 1 (then set ``connected``), join their rooms once told to
    (then set ``joined``), and close them all once told to ``leave``."""
    url = f"ws://127.0.0.1:{port}/ws"
    kept: list[Client] = []
    rooms_joined = 0

    async with trio.open_nursery() as nursery:

        async def hold(task_status: trio.TaskStatus[Client | None]) -> None:
            async with open_client(url, connect_timeout=START_TIMEOUT) as client:
                if client.worker != 1:
                    task_status.started(None)
                    return
                task_status.started(client)
                await leave.wait()

        while len(kept) < args.connections:
            client = await nursery.start(hold)
            if client is not None:
                kept.append(client)
        print(f"{len(kept)} connections open on worker 1", flush=True)
        connected.set()
        await join.wait()

        async def join_all(number: int, client: Client) -> None:
            nonlocal rooms_joined
            for room in range(args.rooms_per_connection):
                await client.join(room_name(number, room, args.name_length))
                rooms_joined += 1
            if args.publish:
                for room in range(args.rooms_per_connection):
                    await client.publish(room_name(number, room, args.name_length), 1)
                for _ in range(args.rooms_per_connection):
                    frame = await client.receive()
                    assert frame["type"] == "message", frame

        started = time.monotonic()
        async with trio.open_nursery() as joining:
            for number, client in enumerate(kept):
                joining.start_soon(join_all, number, client)
        print(f"{rooms_joined} rooms joined in {time.monotonic() - started:.1f} s", flush=True)
        joined.set()


async def settled_rss(processes: Processes) -> dict[str, int]:
    """The processes' RSS once it has stopped changing (see ``SETTLED_TIMEOUT``)."""
    previous = processes.rss()
    with trio.move_on_after(SETTLED_TIMEOUT):
        while True:
            await trio.sleep(SETTLE_SECONDS)
            current = processes.rss()
            if all(abs(current[name] - previous[name]) <= SETTLED_KIB for name in current):
                break
            previous = current
    return previous


async def one_round(
    processes: Processes,
    args: argparse.Namespace,
    number: int,
    phases: dict[str, dict[str, int]],
    redis_memory: dict[str, int | None],
) -> None:
    """Connect, join, read RSS, leave (close every connection), read RSS."""
    connected, join, joined, leave = (trio.Event() for _ in range(4))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(load, processes.port, args, connected, join, joined, leave)
        await connected.wait()
        await trio.sleep(SETTLE_SECONDS)
        phases[f"connected {number}"] = processes.rss()
        join.set()
        await joined.wait()
        await trio.sleep(SETTLE_SECONDS)
        phases[f"joined {number}"] = processes.rss()
        redis_memory[f"joined {number}"] = processes.redis_used_memory()
        rooms_seen = {}
        for _ in range(50):
            health = await trio.to_thread.run_sync(healthz, processes.port)
            rooms_seen[health["worker"]] = health["rooms"]
            if len(rooms_seen) == 2:
                break
        print(f"rooms per worker (from /healthz): {rooms_seen}", flush=True)
        leave.set()
    # Every worker must report no rooms before the reading counts as "left".
    with trio.fail_after(60):
        emptied: set[object] = set()
        while len(emptied) < 2:
            health = await trio.to_thread.run_sync(healthz, processes.port)
            if health["rooms"] == 0 and health["connections"] == 0:
                emptied.add(health["worker"])
            else:
                emptied.discard(health["worker"])
                await trio.sleep(0.5)
    phases[f"left {number}"] = await settled_rss(processes)
    redis_memory[f"left {number}"] = processes.redis_used_memory()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backplane", choices=["zmq", "redis"], default="zmq")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--rooms-per-connection", type=int, default=100)
    parser.add_argument("--name-length", type=int, default=200)
    parser.add_argument("--publish", action="store_true")
    parser.add_argument(
        "--rounds", type=int, default=2,
        help="join and leave this many times (a second round shows whether memory is reused)",
    )  # fmt: skip
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the workers inherit it
    if args.backplane == "redis" and shutil.which("redis-server") is None:
        sys.exit("redis-server is not on PATH")
    rooms = args.connections * args.rooms_per_connection
    with tempfile.TemporaryDirectory() as directory:
        processes = Processes(args.backplane, directory)
        try:
            time.sleep(SETTLE_SECONDS)
            phases = {"start": processes.rss()}
            redis_memory = {"start": processes.redis_used_memory()}
            for round_number in range(1, args.rounds + 1):
                trio.run(one_round, processes, args, round_number, phases, redis_memory)
        finally:
            processes.stop()
    print(f"\n{args.backplane}: {rooms:,} rooms ({args.connections} connections x "
          f"{args.rooms_per_connection}), names of {args.name_length} characters"
          f"{', one message each' if args.publish else ''}; RSS in MiB")  # fmt: skip
    columns = list(phases)
    print(f"{'process':<20}" + "".join(f"{column:>13}" for column in columns)
          + f"{'KiB/room':>10}{'left/start':>11}")  # fmt: skip
    for name, start in phases["start"].items():
        per_room = (phases["joined 1"][name] - phases["connected 1"][name]) / rooms
        last_left = phases[f"left {args.rounds}"][name]
        print(f"{name:<20}" + "".join(f"{phases[column][name] / 1024:>13.1f}" for column in columns)
              + f"{per_room:>10.2f}{last_left / start:>11.2f}")  # fmt: skip
    if redis_memory["start"] is not None:
        used = {phase: value or 0 for phase, value in redis_memory.items()}
        print(f"redis used_memory: {(used['joined 1'] - used['start']) / rooms:.0f} bytes per "
              f"room; after leaving {used[f'left {args.rounds}']:,} bytes "
              f"(start {used['start']:,})")  # fmt: skip


if __name__ == "__main__":
    main()
