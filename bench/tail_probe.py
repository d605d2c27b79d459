"""Where a delivery's latency tail comes from: one system under the rate session of the fan-out
benchmarks, with what each step cost in CPU and in waiting for a CPU. Not part of the test suite;
run it by hand:

    python bench/tail_probe.py                            # 20,000/s to 1,000 clients, 10 rooms
    python bench/tail_probe.py --write-delay 0 --workers 1
    python bench/tail_probe.py --system socket.io
    python bench/tail_probe.py --tap                      # publish-to-backplane latency too
    python bench/tail_probe.py --hops                     # each publish followed in the log
    python bench/tail_probe.py --clients 100 --rooms 1 --publishers-per-room 10 --deliveries 100000

The last is compare.py's firehose at 1,000 messages/s: 100 clients in one room, whose 10
publishers share its rate. Each step prints one JSON line: the load generator's p50/p99 and
counts (bench/loadgen.py), and, from /proc/PID/task/*/schedstat, the CPU time and the run-queue
wait (time runnable but not running) of the server's and the load generator's threads, by thread
name, in ms per second. On a machine shared with other work, the run-queue wait is what a latency
tail is made of when the CPU is scarce; the CPU time says who made it scarce.

Options that change the server: ``--workers``, ``--write-delay`` (trio-fanout's ``write_delay``),
``--redis`` (trio-fanout on a Redis backplane, a redis-server started here, instead of the
embedded ZeroMQ proxy), ``--pin`` (the server on CPU 0, the load generator on CPU 1).
``--tap`` subscribes a backplane client in this process to every room and reports the time from
each publish to its arrival there (the worker's parsing and the proxy's hop; this process's own
scheduling included), beside the clients' end-to-end figures. ``--hops`` runs trio-fanout with
its debug log in JSON and follows each publish through it: from the client's send (the datum's
time) to the publishing worker's reading it (``received``), to the sequencer's answer
(``published``), to each worker's fan-out (``delivered``, matched by room and offset). The log
has millisecond timestamps and costs the workers some work and wake-ups of its own: read its
figures for where the time goes, not as the latency without it. For trio-fanout, also the
frames per socket send over the step, and the workers' GC pauses at the end.
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import subprocess
import threading
import time
from typing import Any

from loadgen import DEFAULT_PROCESSES, MAX_PUBLISHERS, LoadGenerator
from systems import SocketIO, TrioFanout, free_port

# (CPU ms, run-queue wait ms, timeslices) so far, by "role:thread name".
ThreadTimes = dict[str, list[float]]


def thread_times(pids: list[int], first_role: str, other_role: str) -> ThreadTimes:
    """Every thread of ``pids`` from schedstat, the first pid's threads named ``first_role``
    (trio-fanout's master, Socket.IO's primary), the others' ``other_role``."""
    times: ThreadTimes = {}
    for pid in pids:
        role = first_role if pid == pids[0] else other_role
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/comm") as comm_file:
                    name = comm_file.read().strip()
                with open(f"/proc/{pid}/task/{task}/schedstat") as stat_file:
                    run_ns, wait_ns, slices = (int(x) for x in stat_file.read().split())
            except FileNotFoundError:
                continue  # a thread that ended meanwhile
            entry = times.setdefault(f"{role}:{name}", [0.0, 0.0, 0.0])
            entry[0] += run_ns / 1e6
            entry[1] += wait_ns / 1e6
            entry[2] += slices
    return times


def per_second(before: ThreadTimes, after: ThreadTimes, seconds: float) -> dict[str, Any]:
    """Threads' CPU ms, wait ms and timeslices per second, by name, and the totals."""
    rates = {
        name: [round((value - before.get(name, [0.0] * 3)[i]) / seconds, 1) for i, value in
               enumerate(values)]
        for name, values in after.items()
    }  # fmt: skip
    busy = {name: rate for name, rate in rates.items() if rate[0] or rate[1]}
    return {
        "cpu_ms_per_s": round(sum(rate[0] for rate in busy.values()), 1),
        "run_queue_wait_ms_per_s": round(sum(rate[1] for rate in busy.values()), 1),
        "threads": busy,
    }


class BackplaneTap:
    """A backplane client, in a thread of this process, subscribed to every room: the time from
    each publish (its datum's send time) to its arrival here."""

    def __init__(self, proxy_port: int, rooms: int) -> None:
        self.latencies_ms: list[float] = []
        thread = threading.Thread(target=self._run, args=(proxy_port, rooms), daemon=True)
        thread.start()

    def _run(self, proxy_port: int, rooms: int) -> None:
        import trio

        from trio_fanout import envelope
        from trio_fanout.backplane import open_backplane

        async def listen() -> None:
            async with open_backplane(f"zmq://127.0.0.1:{proxy_port}") as backplane:
                for room in range(rooms):
                    await backplane.subscribe(envelope.room_topic(f"room-{room}"))
                while True:
                    batch = await backplane.receive_batch()
                    now_us = time.monotonic_ns() // 1000
                    for _topic, payload, _position in batch:
                        # The datum's layout is loadgen.mjs's: "~", 3 + 9 digits, 15 of time.
                        at = payload.find(b"~")
                        if at >= 0:
                            sent_us = int(payload[at + 13 : at + 28])
                            self.latencies_ms.append((now_us - sent_us) / 1000)

        trio.run(listen)

    def take(self) -> dict[str, Any]:
        taken, self.latencies_ms = sorted(self.latencies_ms), []
        if not taken:
            return {"tap_count": 0}
        return {
            "tap_count": len(taken),
            "tap_p50_ms": round(taken[len(taken) // 2], 2),
            "tap_p99_ms": round(taken[min(len(taken) - 1, len(taken) * 99 // 100)], 2),
        }


class LoggedTrioFanout(TrioFanout):
    """trio-fanout with its log kept (``log_lines``), for :func:`hops`."""

    def __init__(self, workers: int, options: tuple[str, ...]) -> None:
        self.log_lines: list[str] = []
        super().__init__(workers=workers, options=options)

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log_lines.append(line)


def _log_time(entry: dict[str, Any], wall_minus_monotonic: float) -> float:
    """A JSON log line's time (UTC, milliseconds) on CLOCK_MONOTONIC, in seconds."""
    stamp = entry["time"]  # 2026-11-30T05:55:16.123Z
    seconds = calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S"))
    return seconds + int(stamp[20:23]) / 1000 - wall_minus_monotonic


def hops(lines: list[str], wall_minus_monotonic: float) -> dict[str, Any]:
    """p50/p99 in ms of each part of the publishes' paths in ``lines`` (the log of a step)."""
    waiting: dict[tuple[int, int], list[tuple[float, float]]] = {}  # (pid, connection)
    published: dict[tuple[str, int], tuple[float, float, float]] = {}  # (room, offset)
    delivered: list[tuple[str, int, float]] = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # not a log line of ours
        message = entry.get("message", "")
        if " received Publish(" in message and (mark := message.find("~")) >= 0:
            sent = int(message[mark + 13 : mark + 28]) / 1e6  # the datum's send time
            key = (entry["pid"], entry["connection"])
            waiting.setdefault(key, []).append((sent, _log_time(entry, wall_minus_monotonic)))
        elif " published room=" in message:
            queue = waiting.get((entry["pid"], entry["connection"]))
            if queue:  # a connection's requests are handled one at a time, in order
                sent, read = queue.pop(0)
                answered = _log_time(entry, wall_minus_monotonic)
                published[(entry["room"], entry["offset"])] = (sent, read, answered)
        elif message.startswith("delivered room=") and "offset" in entry:
            delivered.append(
                (entry["room"], entry["offset"], _log_time(entry, wall_minus_monotonic))
            )
    parts: dict[str, list[float]] = {
        "send_to_worker_read": [],
        "worker_read_to_append_answered": [],
        "worker_read_to_fan_out": [],
        "send_to_fan_out": [],
    }
    for sent, read, answered in published.values():
        parts["send_to_worker_read"].append(read - sent)
        parts["worker_read_to_append_answered"].append(answered - read)
    for room, offset, fanned_out in delivered:
        if (path := published.get((room, offset))) is not None:
            parts["worker_read_to_fan_out"].append(fanned_out - path[1])
            parts["send_to_fan_out"].append(fanned_out - path[0])
    figures: dict[str, Any] = {"hops_publishes": len(published)}
    for name, values in parts.items():
        values.sort()
        if values:
            figures[f"{name}_p50_ms"] = round(values[len(values) // 2] * 1000, 1)
            figures[f"{name}_p99_ms"] = round(values[len(values) * 99 // 100] * 1000, 1)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--system", choices=("trio-fanout", "socket.io"), default="trio-fanout")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--write-delay", type=float, help="trio-fanout's write_delay, seconds")
    parser.add_argument("--redis", action="store_true", help="trio-fanout on a Redis backplane")
    parser.add_argument("--pin", action="store_true", help="server on CPU 0, load on CPU 1")
    parser.add_argument("--tap", action="store_true", help="publish-to-backplane latency too")
    parser.add_argument("--hops", action="store_true", help="follow publishes in the debug log")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rooms", type=int, default=10)
    parser.add_argument("--publishers-per-room", type=int, default=1)
    parser.add_argument("--deliveries", type=int, default=20_000, help="per second, in all")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per step")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--loadgen-processes", type=int, default=DEFAULT_PROCESSES)
    args = parser.parse_args()
    if not 1 <= args.rooms * args.publishers_per_room <= MAX_PUBLISHERS:
        parser.error(f"--rooms x --publishers-per-room takes 1 to {MAX_PUBLISHERS}")
    if args.system == "socket.io" and (
        args.redis or args.tap or args.hops or args.write_delay is not None
    ):
        parser.error("--redis, --tap, --hops and --write-delay are trio-fanout's")
    if args.pin:
        os.sched_setaffinity(0, {0})  # the server's processes inherit it
    redis: subprocess.Popen[bytes] | None = None
    server: TrioFanout | SocketIO | None = None
    tap = None
    try:
        if args.system == "socket.io":
            server = SocketIO(workers=args.workers)
        else:
            options: list[str] = []
            if args.write_delay is not None:
                os.environ["TRIO_FANOUT_WRITE_DELAY"] = str(args.write_delay)
            if args.redis:
                redis_port = free_port()
                redis = subprocess.Popen(
                    ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                     "--save", "", "--appendonly", "no", "--loglevel", "warning"],
                    stdout=subprocess.DEVNULL,
                )  # fmt: skip
                time.sleep(0.5)
                options += ["--backplane", f"redis://127.0.0.1:{redis_port}"]
            if args.tap:
                proxy_port = free_port()
                options += ["--proxy-port", str(proxy_port)]  # the last --proxy-port counts
            if args.hops:
                options += ["--log-level", "debug", "--log-format", "json"]
                server = LoggedTrioFanout(args.workers, tuple(options))
            else:
                server = TrioFanout(workers=args.workers, options=tuple(options))
            if redis is not None:
                server.pids.append(redis.pid)
            if args.tap:
                tap = BackplaneTap(proxy_port, args.rooms)
        run(server, tap, args)
    finally:
        if server is not None:
            server.stop()
        if redis is not None:
            redis.terminate()
            redis.wait(15)


# What each step prints of the load generator's figures.
KEPT = (
    "achieved_deliveries_per_second",
    "p50_ms",
    "p99_ms",
    "max_ms",
    "lost",
    "duplicated",
    "reordered",
    "server_cpu_us_per_delivery",
    "loadgen_cpu_percent_max",
    "loadgen_lag_p99_ms_max",
    "machine_cpu_percent",
)


def run(server: TrioFanout | SocketIO, tap: BackplaneTap | None, args: argparse.Namespace) -> None:
    roles = ("master", "worker") if isinstance(server, TrioFanout) else ("primary", "worker")
    with LoadGenerator(
        server.protocol,
        server.url,
        "rate",
        args.clients,
        rooms=args.rooms,
        publishers_per_room=args.publishers_per_room,
        processes=args.loadgen_processes,
    ) as generator:
        if args.pin:
            for pid in generator.pids:
                os.sched_setaffinity(pid, {1})
        for _step in range(args.steps):
            with open("/proc/loadavg") as loadavg:
                load = float(loadavg.read().split()[0])
            if tap is not None:
                tap.take()
            if isinstance(server, LoggedTrioFanout):
                server.log_lines.clear()
                wall_minus_monotonic = time.time() - time.monotonic()
            sends_before = server.send_counters()
            server_before = thread_times(server.pids, *roles)
            loadgen_before = thread_times(generator.pids, "loadgen", "loadgen")
            started = time.monotonic()
            step = generator.rate_step(args.deliveries, args.duration, server.cpu_seconds)
            seconds = time.monotonic() - started
            result: dict[str, Any] = {key: step[key] for key in KEPT}
            result["loadavg_1min_before"] = load
            sends_after = server.send_counters()
            if sends_before is not None and sends_after is not None:
                sends = sends_after[0] - sends_before[0]
                result["frames_per_send"] = (sends_after[1] - sends_before[1]) / max(sends, 1)
            result["server"] = per_second(server_before, thread_times(server.pids, *roles), seconds)
            result["loadgen"] = per_second(
                loadgen_before, thread_times(generator.pids, "loadgen", "loadgen"), seconds
            )
            if tap is not None:
                result.update(tap.take())
            if isinstance(server, LoggedTrioFanout):
                result.update(hops(list(server.log_lines), wall_minus_monotonic))
            print(json.dumps(result), flush=True)
        if isinstance(server, TrioFanout):
            print(json.dumps({"gc": server.gc_pauses()}), flush=True)


if __name__ == "__main__":
    main()
