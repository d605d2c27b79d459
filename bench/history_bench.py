"""What room history costs and what recovery takes, on `trio-fanout run --workers 2` driven by
Node.js clients: the load generator of loadgen.py for the rate, recover.mjs for the kill. Not part
of the test suite; run it by hand:

    cd bench && npm ci
    python history_bench.py rate          # delivery rate, history_size 100 against 0
    python history_bench.py kill          # kill -9 a worker of 2,000 clients' cluster
    python history_bench.py kill --all-on-killed   # 2,000 clients, all on the killed worker
    python history_bench.py rate --backplane redis --runs 1 --steps 40000

``rate``: two clusters at once, one keeping 100 messages per room and one keeping none
(``--history-size 0``); 1,000 clients in 10 rooms, one publisher per room, the same rate steps
on both, one after the other in alternating order, so that a busy moment of the shared machine
hits both alike. Each step reports the delivered rate, p99 latency, server CPU per delivery (the
master with its proxy, both workers, and redis-server on Redis), and the load generator's CPU
and event-loop lag (its busiest process; a step in which it was saturated does not pass, see
loadgen.py); the ratio of CPU per delivery (on / off) is taken within each run.

``kill``: 2,000 clients in 20 rooms, half on each worker, a publisher on one worker publishing
steadily; the other worker is killed with SIGKILL, and its clients reconnect and rejoin with
``since``. With ``--all-on-killed`` all 2,000 clients are on the worker killed (the publisher
alone on the other), so that all of them recover while the load generator, one Node.js process,
holds no more connections and receives no more deliveries a second than with the even split (4,000
clients in it, half of them to recover, measured its own event loop more than the server).

Reported: per client, the time from the kill to its ``joined`` with recovered true and the first
message it had missed; how many recovered; where the time went (the close seen, the connection
attempt, the handshake, the join answered, the missed messages), the server's CPU over the window
(master, surviving worker, redis-server), and the load generator's CPU and lag.
``--backoff-ms`` is the clients' first reconnect delay (uniform random up to it; 0 reconnects at
once, the hardest case for the server; 500 is the project's clients' default).

Every run's figures go to bench/results/history-*.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from fanout_bench import HERE, RESULTS, passes
from loadgen import DEFAULT_PROCESSES, LoadGenerator
from systems import TrioFanout

RATE_STEPS = [40_000, 80_000, 120_000, 160_000]
KILL_TIMEOUT_SECONDS = 30
PROFILE_SECONDS = 3


def start_profiler(pid: int, name: str) -> subprocess.Popen[bytes]:
    """py-spy on ``pid`` for PROFILE_SECONDS, as collapsed stacks (one line per stack)."""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"profile-{name}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
    profiler = subprocess.Popen(
        ["py-spy", "record", "--pid", str(pid), "--duration", str(PROFILE_SECONDS),
         "--rate", "200", "--format", "raw", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(0.3)  # py-spy attaches before the kill
    return profiler


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[str, int]]:
    """A throwaway redis-server on a free loopback port; yields its URL and pid."""
    with socket.socket() as probe:  # redis-server cannot take port 0
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as directory:
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", directory],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}", server.pid
        finally:
            server.terminate()
            server.wait(10)


@contextlib.contextmanager
def cluster(history_size: int, backplane: str) -> Iterator[TrioFanout]:
    with contextlib.ExitStack() as stack:
        options = ["--history-size", str(history_size)]
        redis_pids = []
        if backplane == "redis":
            url, pid = stack.enter_context(redis_server())
            options += ["--backplane", url]
            redis_pids.append(pid)
        running = TrioFanout(heartbeat_interval=0, options=tuple(options))
        stack.callback(running.stop)
        running.pids += redis_pids  # the server's CPU: Redis, the sequencer, is part of it
        yield running


def step_figures(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("achieved_deliveries_per_second", "p50_ms", "p99_ms", "lost", "duplicated",
            "reordered", "server_cpu_us_per_delivery", "loadgen_cpu_percent_max",
            "loadgen_lag_p99_ms_max", "loadgen_saturated")  # fmt: skip
    return {key: result[key] for key in keys} | {"passes": passes(result)}


def rate_run(
    backplane: str, steps: list[int], duration: float, flip: bool, processes: int
) -> dict[str, Any]:
    """One run: every step on both clusters, in alternating order; each cluster's clients stay
    connected for the whole run."""
    figures: dict[str, Any] = {"on": {}, "off": {}}
    with contextlib.ExitStack() as stack:
        order = []
        for name, history_size in (("on", 100), ("off", 0)):
            running = stack.enter_context(cluster(history_size, backplane))
            generator = LoadGenerator(
                running.protocol, running.url, "rate", 1000, rooms=10, processes=processes
            )
            stack.enter_context(generator)
            order.append((name, running, generator))
        for number, rate in enumerate(steps):
            for name, running, generator in order[::-1] if (number % 2) ^ flip else order:
                result = generator.rate_step(rate, duration, running.cpu_seconds)
                figures[name][rate] = result = step_figures(result)
                print(f"  history {name:3} {rate:>7}/s: got "
                      f"{result['achieved_deliveries_per_second']:,.0f}/s, "
                      f"p99 {result['p99_ms'] or float('nan'):.1f} ms, lost {result['lost']}, "
                      f"server {result['server_cpu_us_per_delivery']:.2f} us/delivery, loadgen "
                      f"CPU max {result['loadgen_cpu_percent_max']:.0f}% lag p99 "
                      f"{result['loadgen_lag_p99_ms_max']:.1f} ms"
                      + (f" [refused: {result['loadgen_saturated']}]"
                         if result["loadgen_saturated"] else ""), file=sys.stderr)  # fmt: skip
    return figures


def rate_summary(runs: list[dict[str, Any]], steps: list[int]) -> dict[int, Any]:
    summary: dict[int, Any] = {}
    for rate in steps:
        row: dict[str, Any] = {}
        for name in ("on", "off"):
            results = [run[name][rate] for run in runs]
            for key in ("achieved_deliveries_per_second", "p99_ms", "server_cpu_us_per_delivery",
                        "loadgen_cpu_percent_max", "loadgen_lag_p99_ms_max"):  # fmt: skip
                row[f"{name} {key}"] = statistics.median(result[key] for result in results)
            row[f"{name} passed"] = sum(result["passes"] for result in results)
        row["cpu per delivery on/off, median of the runs' ratios"] = statistics.median(
            run["on"][rate]["server_cpu_us_per_delivery"]
            / run["off"][rate]["server_cpu_us_per_delivery"]
            for run in runs
        )
        summary[rate] = row
    return summary


def read_cpu(running: TrioFanout, pids: list[int]) -> float:
    with contextlib.suppress(FileNotFoundError):
        return sum(running.cpu_seconds(pids))
    return float("nan")


def kill_run(
    backplane: str,
    clients: int,
    rooms: int,
    rate: int,
    backoff_ms: int,
    profile: bool,
    all_on_killed: bool = False,
) -> dict[str, Any]:
    """One run: start a cluster, let the load generator place its clients (half on each worker,
    or with ``all_on_killed`` all on the worker without the publisher), kill one worker.
    With ``profile``, py-spy samples the surviving worker and the master (with the embedded
    proxy) for PROFILE_SECONDS from just before the kill, into bench/results/."""
    with cluster(100, backplane) as running:
        config = {"url": running.url, "clients": clients, "rooms": rooms,
                  "publishes_per_second": rate, "timeout": KILL_TIMEOUT_SECONDS,
                  "backoff_base_ms": backoff_ms, "backoff_cap_ms": 2000,
                  "split": "killed" if all_on_killed else "even"}  # fmt: skip
        process = subprocess.Popen(
            ["node", str(HERE / "recover.mjs"), json.dumps(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert process.stdout is not None and process.stdin is not None
        result: dict[str, Any] = {}
        for line in process.stdout:
            message = json.loads(line)
            if message.get("event") == "ready":
                victim = message["victim_pid"]
                if victim not in running.worker_pids:
                    raise RuntimeError(f"pid {victim} is not one of {running.worker_pids}")
                survivor = next(pid for pid in running.worker_pids if pid != victim)
                # The master (with the proxy), the surviving worker, and redis-server if any.
                server_pids = [pid for pid in running.pids if pid != victim]
                if profile:
                    profilers = [
                        start_profiler(survivor, "survivor"),
                        start_profiler(running.process.pid, "master"),
                    ]
                cpu_before = read_cpu(running, server_pids)
                killed_at = time.time() * 1000
                os.kill(victim, signal.SIGKILL)
                process.stdin.write(json.dumps({"killed_at_ms": killed_at}) + "\n")
                process.stdin.flush()
            elif message.get("event") == "recovered":
                cpu_after = read_cpu(running, server_pids)
                restarted_cpu = read_cpu(running, running.started_pids)
            elif "event" not in message:
                result = message
        if process.wait(KILL_TIMEOUT_SECONDS + 60) != 0:
            raise RuntimeError("the load generator failed")
        if profile:
            for profiler in profilers:
                profiler.wait(PROFILE_SECONDS + 30)
        # Their CPU from the kill to the last recovery.
        cpu = cpu_after - cpu_before
        result["server_cpu_seconds"] = cpu
        result["server_cpu_percent"] = cpu / result["window_ms"] * 1e5
        # Roughly what one reconnection costs the server (handshake, join, history read,
        # missed messages), with the survivor's usual fan-out and the master's history reads
        # for the restarted worker's clients counted in.
        landed = max(result["landed_on"]["survivor"]["clients"], 1)
        result["survivor_cpu_ms_per_client"] = cpu * 1000 / landed
        # The restarted worker's, from its start (its imports included) to the last recovery.
        result["restarted_worker_cpu_seconds"] = restarted_cpu
        result["restarted_pids"] = list(running.started_pids)
    return result


def kill_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def median(*path: str) -> float:
        values = []
        for run in runs:
            value: Any = run
            for key in path:
                value = value[key]
            values.append(value)
        return float(statistics.median(values))

    return {
        "clients / victims (medians)": [median("clients"), median("victims")],
        "recovered true / false / not rejoined (sums)": [
            sum(run["recovered_true"] for run in runs),
            sum(run["recovered_false"] for run in runs),
            sum(run["not_rejoined"] for run in runs),
        ],
        "gaps / duplicates (sums)": [sum(run["gaps"] for run in runs),
                                     sum(run["duplicates"] for run in runs)],
        "recovery ms p50 / p99 / max": [median("recovery_ms", "p50"),
                                         median("recovery_ms", "p99"),
                                         median("recovery_ms", "max")],
        "recovery ms p50 / p99 / max, per run": [
            [run["recovery_ms"][key] for key in ("p50", "p99", "max")] for run in runs
        ],
        "landed on the survivor / the restarted worker, per run": [
            [run["landed_on"][where]["clients"] for where in ("survivor", "restarted")]
            for run in runs
        ],
        "recovery ms p50 on the survivor / the restarted worker, per run": [
            [run["landed_on"][where]["recovery_ms"]["p50"] for where in ("survivor", "restarted")]
            for run in runs
        ],
        "close seen ms p50 / p99": [median("close_seen_ms", "p50"),
                                    median("close_seen_ms", "p99")],
        "closed to new attempt ms p50 / p99": [median("closed_to_attempt_ms", "p50"),
                                               median("closed_to_attempt_ms", "p99")],
        "attempt to open (handshake) ms p50 / p99": [median("attempt_to_open_ms", "p50"),
                                                     median("attempt_to_open_ms", "p99")],
        "open to welcome ms p50 / p99": [median("open_to_welcome_ms", "p50"),
                                         median("open_to_welcome_ms", "p99")],
        "welcome to joined ms p50 / p99": [median("welcome_to_joined_ms", "p50"),
                                           median("welcome_to_joined_ms", "p99")],
        "joined to first missed ms p50 / p99": [median("joined_to_first_missed_ms", "p50"),
                                                median("joined_to_first_missed_ms", "p99")],
        "missed messages per client p50": median("missed_per_client", "p50"),
        "connection attempts per victim": median("connection_attempts") / median("victims"),
        "server CPU % of a core (master, survivor, Redis)": median("server_cpu_percent"),
        "server CPU ms per client that landed on the survivor": median(
            "survivor_cpu_ms_per_client"
        ),
        "loadgen CPU % / lag p99 ms / lag max ms": [median("loadgen_cpu_percent"),
                                                    median("loadgen_lag_p99_ms"),
                                                    median("loadgen_lag_max_ms")],
        "loadgen CPU % / lag p99 ms / lag max ms, per run": [
            [run[key] for key in ("loadgen_cpu_percent", "loadgen_lag_p99_ms",
                                  "loadgen_lag_max_ms")]
            for run in runs
        ],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["rate", "kill"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backplane", choices=["zmq", "redis"], default="zmq")
    parser.add_argument("--steps", default=",".join(map(str, RATE_STEPS)),
                        help="rate: deliveries/s to try, comma-separated")  # fmt: skip
    parser.add_argument("--duration", type=float, default=5.0, help="rate: seconds per step")
    parser.add_argument(
        "--loadgen-processes",
        dest="processes",
        type=int,
        default=DEFAULT_PROCESSES,
        help=f"rate: Node processes sharing the clients (default {DEFAULT_PROCESSES})",
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=2000,
        help="kill: members (half on each worker, or all on the killed one: --all-on-killed)",
    )
    parser.add_argument(
        "--all-on-killed",
        action="store_true",
        help="kill: every member on the worker killed, the publisher alone on the other, so "
        "that all --clients recover",
    )
    parser.add_argument("--rooms", type=int, default=20, help="kill: rooms")
    parser.add_argument("--publishes", type=int, default=200,
                        help="kill: publishes a second, over all rooms")  # fmt: skip
    parser.add_argument(
        "--backoff-ms",
        default="0,500",
        help="kill: the clients' first reconnect delays to try, comma-separated",
    )
    parser.add_argument(
        "--profile", action="store_true", help="kill: py-spy the survivor and the master"
    )
    args = parser.parse_args()
    runs: list[dict[str, Any]] = []
    summary: dict[int, Any]
    if args.what == "rate":
        steps = [int(step) for step in args.steps.split(",")]
        for number in range(args.runs):
            print(f"run {number + 1} of {args.runs}", file=sys.stderr)
            runs.append(
                rate_run(args.backplane, steps, args.duration, number % 2 == 1, args.processes)
            )
        summary = rate_summary(runs, steps)
    else:
        backoffs = [int(value) for value in args.backoff_ms.split(",")]
        by_backoff: dict[int, list[dict[str, Any]]] = {backoff: [] for backoff in backoffs}
        for number in range(args.runs):
            for backoff in backoffs:  # interleaved
                print(f"run {number + 1} of {args.runs}, backoff {backoff} ms", file=sys.stderr)
                result = kill_run(
                    args.backplane,
                    args.clients,
                    args.rooms,
                    args.publishes,
                    backoff,
                    args.profile,
                    args.all_on_killed,
                )
                print("  " + json.dumps({key: result[key] for key in (
                    "victims", "recovered_true", "recovered_false", "not_rejoined", "gaps",
                    "duplicates", "recovery_ms", "loadgen_cpu_percent", "loadgen_lag_p99_ms",
                    "loadgen_lag_max_ms")}), file=sys.stderr)  # fmt: skip
                by_backoff[backoff].append(result)
                runs.append(result)
        summary = {backoff: kill_summary(results) for backoff, results in by_backoff.items()}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"history-{args.what}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"args": vars(args), "summary": summary, "runs": runs}, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"every run's figures: {path}")


if __name__ == "__main__":
    main()
