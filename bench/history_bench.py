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
alone on the other), so that all of them recover. The clients are shared by
``--loadgen-processes`` Node.js processes (recover.mjs; the first also holds the publisher):
2,000 clients recovering at once in one process lagged its event loop by most of a second, and
then the time a client took to see its connection close and to open a new one was the load
generator's. Every process is ready before the kill; their clients' timings (wall-clock ms, the
clock of the kill time too) are merged.

Reported: per client, the time from the kill to its ``joined`` with recovered true and the first
message it had missed; how many recovered; where the time went (the close seen, the connection
attempt, the handshake, the join answered, the missed messages), the server's CPU over the window
(master, surviving worker, redis-server), and the load generator's CPU and lag: its busiest
process's, and each process's.
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
from loadgen import (
    DEFAULT_PROCESSES,
    LoadGenerator,
    _machine_cpu,
    _process_ticks,
    wait_for_quiet,
)
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


# Handshakes in flight at once over all recover.mjs processes: enough to connect thousands of
# clients in seconds without a burst that overflows the server's accept backlog.
CONNECT_CONCURRENCY = 200
# The steps of a victim's recovery, in the order they happen (recover.mjs's names): each phase
# reported is the time from one to the next.
PHASES = [
    ("closed_to_attempt_ms", "closed", "attempted"),
    ("attempt_to_open_ms", "attempted", "opened"),
    ("open_to_welcome_ms", "opened", "welcomed"),
    ("welcome_to_joined_ms", "welcomed", "joined"),
    ("joined_to_first_missed_ms", "joined", "firstMissed"),
]


def spread(values: list[float | None]) -> dict[str, Any]:
    """n, p50, p90, p99 and max of the values present (the nearest-rank percentiles)."""
    present = sorted(value for value in values if value is not None)

    def percentile(p: float) -> float | None:
        return present[min(len(present) - 1, int(p / 100 * len(present)))] if present else None

    return {"n": len(present), "p50": percentile(50), "p90": percentile(90),
            "p99": percentile(99), "max": present[-1] if present else None}  # fmt: skip


class Loadgen:
    """``processes`` recover.mjs processes sharing the members, the first one also holding the
    publisher, held at the same step: each command goes to all of them, and each step's answer
    is read from all before the next."""

    def __init__(self, config: dict[str, Any], processes: int) -> None:
        # In pairs with the even split, so that each process's members halve exactly.
        unit = 2 if config["split"] == "even" else 1
        units, odd = divmod(config["clients"], unit)
        shares = [unit * (units // processes + (i < units % processes)) for i in range(processes)]
        shares[0] += odd
        concurrency = max(1, CONNECT_CONCURRENCY // processes)
        self.processes: list[subprocess.Popen[str]] = []
        for number, share in enumerate(shares):
            own = config | {"clients": share, "publisher": number == 0,
                            "connect_concurrency": concurrency}  # fmt: skip
            self.processes.append(subprocess.Popen(
                ["node", str(HERE / "recover.mjs"), json.dumps(own)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            ))  # fmt: skip

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait(10)

    def send(self, command: dict[str, Any]) -> None:
        line = json.dumps(command) + "\n"
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.write(line)
            process.stdin.flush()

    def read(self, process: subprocess.Popen[str], event: str | None) -> dict[str, Any]:
        """The next line of ``process``: the ``event`` named, or (None) its result."""
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"a load generator process ended (waiting for {event or 'result'})")
        message: dict[str, Any] = json.loads(line)
        if message.get("event") != event:
            raise RuntimeError(f"expected {event or 'a result'}, got {line[:200]}")
        return message

    def read_all(self, event: str | None) -> list[dict[str, Any]]:
        return [self.read(process, event) for process in self.processes]


def merge_kill_results(
    parts: list[dict[str, Any]], killed_at: float, publisher_pid: int, config: dict[str, Any]
) -> dict[str, Any]:
    """The figures of one kill from every process's victims, their timings taken together."""
    victims = [victim for part in parts for victim in part["victims"]]

    def since_kill(step: str) -> dict[str, Any]:
        return spread([v[step] - killed_at if step in v else None for v in victims])

    def between(start: str, end: str) -> dict[str, Any]:
        return spread([v[end] - v[start] if start in v and end in v else None for v in victims])

    # Where the victims landed: on the surviving worker, or on the one started in the dead one's
    # place (which first has to start, subscribe and read each room's history).
    landed_on = {}
    for where in ("survivor", "restarted"):
        here = [v for v in victims if (v["pid"] == publisher_pid) == (where == "survivor")]
        recovery = [v["firstMissed"] - killed_at if "firstMissed" in v else None for v in here]
        landed_on[where] = {"clients": len(here), "recovery_ms": spread(recovery)}
    recovered_at = max(part["recovered_at_ms"] for part in parts)
    per_process = [
        {"clients": part["clients"], "victims": len(part["victims"])}
        | {key: part[key] for key in ("loadgen_cpu_percent", "loadgen_lag_p99_ms",
                                      "loadgen_lag_max_ms")}
        for part in parts
    ]  # fmt: skip
    result: dict[str, Any] = {
        "mode": "recover",
        "split": config["split"],
        "clients": sum(part["clients"] for part in parts),
        "setup_connections": sum(part["setup_connections"] for part in parts),
        "rooms": config["rooms"],
        "publishes_per_second": config["publishes_per_second"],
        "backoff_base_ms": config["backoff_base_ms"],
        "victim_pid": parts[0]["victim_pid"],
        "victims": len(victims),
        "recovered_true": sum(v.get("recovered") is True for v in victims),
        "recovered_false": sum(v.get("recovered") is False for v in victims),
        "not_rejoined": sum("joined" not in v for v in victims),
        "others_disconnected": sum(part["others_disconnected"] for part in parts),
        "landed_on": landed_on,
        "connection_attempts": sum(v["attempts"] for v in victims),
        "missed_per_client": spread([v.get("missed") for v in victims]),
        "recovery_ms": since_kill("firstMissed"),
        "close_seen_ms": since_kill("closed"),
        **{name: between(start, end) for name, start, end in PHASES},
        "gaps": sum(part["gaps"] for part in parts),
        "duplicates": sum(part["duplicates"] for part in parts),
        "publishes": sum(part["publishes"] for part in parts),
        "window_ms": recovered_at - killed_at,
        # The busiest process's: one saturated process delays its own clients.
        "loadgen_processes": len(parts),
        "loadgen_cpu_percent": max(p["loadgen_cpu_percent"] for p in per_process),
        "loadgen_lag_p99_ms": max(p["loadgen_lag_p99_ms"] for p in per_process),
        "loadgen_lag_max_ms": max(p["loadgen_lag_max_ms"] for p in per_process),
        "loadgen_per_process": per_process,
    }
    return result


def kill_run(
    backplane: str,
    clients: int,
    rooms: int,
    rate: int,
    backoff_ms: int,
    profile: bool,
    all_on_killed: bool = False,
    processes: int = DEFAULT_PROCESSES,
    quiet_limit: float = 100.0,
    quiet_wait: float = 0.0,
) -> dict[str, Any]:
    """One run: start a cluster, let ``processes`` recover.mjs processes place their shares of
    the clients (half on each worker, or with ``all_on_killed`` all on the worker without the
    publisher), wait until all of them are ready and (at most ``quiet_wait`` s) until other
    programs use less than ``quiet_limit`` % of the machine, kill one worker.
    With ``profile``, py-spy samples the surviving worker and the master (with the embedded
    proxy) for PROFILE_SECONDS from just before the kill, into bench/results/."""
    with cluster(100, backplane) as running, contextlib.ExitStack() as stack:
        config = {"url": running.url, "clients": clients, "rooms": rooms,
                  "publishes_per_second": rate, "timeout": KILL_TIMEOUT_SECONDS,
                  "backoff_base_ms": backoff_ms, "backoff_cap_ms": 2000,
                  "split": "killed" if all_on_killed else "even"}  # fmt: skip
        loadgen = Loadgen(config, processes)
        stack.callback(loadgen.close)
        publisher_pid = loadgen.read(loadgen.processes[0], "publisher")["pid"]
        loadgen.send({"publisher_pid": publisher_pid})
        victims = {answer["victim_pid"] for answer in loadgen.read_all("members")}
        if len(victims) != 1 or not victims <= set(running.worker_pids):
            raise RuntimeError(f"victims {victims}, not one of {running.worker_pids}")
        (victim,) = victims
        survivor = next(pid for pid in running.worker_pids if pid != victim)
        # The master (with the proxy), the surviving worker, and redis-server if any.
        server_pids = [pid for pid in running.pids if pid != victim]
        # Ours: the server's, the load generator's, this process's (the restarted worker is
        # added once it exists).
        own_pids = [*running.pids, *(process.pid for process in loadgen.processes), os.getpid()]
        others_before_kill = wait_for_quiet(own_pids, quiet_limit, quiet_wait)
        loadgen.send({"publish": True})
        loadgen.read_all("ready")
        if profile:
            profilers = [
                start_profiler(survivor, "survivor"),
                start_profiler(running.process.pid, "master"),
            ]
        cpu_before = read_cpu(running, server_pids)
        survivor_before = read_cpu(running, [survivor])
        own_pids.remove(victim)  # from here on: gone, its CPU counted before
        machine_before = _machine_cpu()
        own_before = _process_ticks(own_pids)
        killed_at = time.time() * 1000
        os.kill(victim, signal.SIGKILL)
        loadgen.send({"killed_at_ms": killed_at})
        loadgen.read_all("recovered")
        cpu_after = read_cpu(running, server_pids)
        survivor_cpu = read_cpu(running, [survivor]) - survivor_before
        machine_after = _machine_cpu()
        own = _process_ticks(own_pids + list(running.started_pids)) - own_before
        busy = machine_after[0] - machine_before[0]
        total = machine_after[1] - machine_before[1]
        machine_percent = 100 * busy / max(total, 1)
        others_percent = 100 * (busy - own) / max(total, 1)
        restarted_cpu = read_cpu(running, running.started_pids)
        loadgen.send({"finish": True})
        parts = loadgen.read_all(None)
        for process in loadgen.processes:
            if process.wait(60) != 0:
                raise RuntimeError("a load generator process failed")
        if profile:
            for profiler in profilers:
                profiler.wait(PROFILE_SECONDS + 30)
        result = merge_kill_results(parts, killed_at, publisher_pid, config)
        # Their CPU from the kill to the last recovery.
        cpu = cpu_after - cpu_before
        result["server_cpu_seconds"] = cpu
        result["server_cpu_percent"] = cpu / result["window_ms"] * 1e5
        # The survivor alone: one thread, so near 100 % it is the limit.
        result["survivor_cpu_percent"] = survivor_cpu / result["window_ms"] * 1e5
        # The whole machine, in % of all its cores: near 100 %, every process waited for a core
        # (the load generator's lag then is the machine's), and what the server and the load
        # generator do not account for ran for other programs.
        result["machine_cpu_percent"] = machine_percent
        result["others_cpu_percent"] = max(others_percent, 0.0)
        result["others_cpu_percent_before_kill"] = others_before_kill
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
        "survivor CPU % of a core": median("survivor_cpu_percent"),
        "machine CPU % of all cores": median("machine_cpu_percent"),
        "other programs' CPU % of all cores, before the kill / over the window, per run": [
            [run["others_cpu_percent_before_kill"], run["others_cpu_percent"]] for run in runs
        ],
        "server CPU ms per client that landed on the survivor": median(
            "survivor_cpu_ms_per_client"
        ),
        "loadgen processes": median("loadgen_processes"),
        "loadgen CPU % / lag p99 ms / lag max ms, the busiest process": [
            median("loadgen_cpu_percent"), median("loadgen_lag_p99_ms"),
            median("loadgen_lag_max_ms")],
        "loadgen CPU % / lag p99 ms / lag max ms, per run, the busiest process": [
            [run[key] for key in ("loadgen_cpu_percent", "loadgen_lag_p99_ms",
                                  "loadgen_lag_max_ms")]
            for run in runs
        ],
        "loadgen CPU % / lag p99 ms / lag max ms, per run, per process": [
            [[process[key] for key in ("loadgen_cpu_percent", "loadgen_lag_p99_ms",
                                       "loadgen_lag_max_ms")]
             for process in run["loadgen_per_process"]]
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
        help=f"Node processes sharing the clients (default {DEFAULT_PROCESSES}); kill: the "
        "first of them also holds the publisher",
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
    parser.add_argument(
        "--quiet-limit",
        type=float,
        default=25.0,
        help="kill: before each kill, wait until other programs use less than this %% of the "
        "machine (default 25)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        help="kill: ... but at most this many seconds (default 20; 0: do not wait)",
    )
    args = parser.parse_args()
    # Each process needs members: with the even split, one on each worker.
    most = args.clients if args.all_on_killed or args.what == "rate" else args.clients // 2
    if not 1 <= args.processes <= most:
        parser.error(f"--loadgen-processes must be 1 to {most} with --clients {args.clients}")
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
                    args.processes,
                    args.quiet_limit,
                    args.quiet_wait,
                )
                print("  " + json.dumps({key: result[key] for key in (
                    "victims", "recovered_true", "recovered_false", "not_rejoined", "gaps",
                    "duplicates", "recovery_ms", "loadgen_per_process")}),
                      file=sys.stderr)  # fmt: skip
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
