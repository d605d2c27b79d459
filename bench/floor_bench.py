"""The floor under a fan-out server's costs, measured beside trio-fanout and Socket.IO 4.8 in the
same run: server CPU per delivery at one fixed rate (user and kernel time apart), and the time
from one publish to the last of a room's members. Not part of the test suite; run it by hand:

    python bench/floor_bench.py                # 3 rounds, about 10 minutes
    python bench/floor_bench.py --rounds 1 --duration 3

The floor is send_floor.py, no system a user would pick: one Python process that does nothing
but one ``send`` per recipient. It shows how much of a delivery's cost is the ``send`` itself
(mostly kernel time: on loopback the sender's system call also does the receiving side's TCP
work), which no server that writes each delivery on its own can go below.

Each round runs, for each system (the order rotating from one round to the next):
- 1,000 and 4,000 clients in 10 rooms, one publisher per room (compare.py's rate scenario): a
  warm-up step at half the rate, then the measured step at --rate;
- --broadcast-members clients in one room: 20 messages, 200 ms apart, each timed from its
  publish to its arrival at the last member (compare.py's connections scenario).
A step in which the load generator was saturated is tried again (--retries) and otherwise left
out. Results go to bench/results/floor-*.json, a table of medians to stdout.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import time
from pathlib import Path
from typing import Any

from loadgen import DEFAULT_PROCESSES, LoadGenerator, log, measure_when_quiet
from systems import SYSTEMS, SendFloor, Server

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROOMS = 10
BROADCAST_MESSAGES = 20
BROADCAST_INTERVAL_MS = 200
PAUSE_BETWEEN_SYSTEMS_S = 10
ALL_SYSTEMS: dict[str, type[Server]] = {**SYSTEMS, SendFloor.name: SendFloor}


def measure(name: str, counts: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """One system: the rate steps for each number of clients, then the broadcasts."""
    server = ALL_SYSTEMS[name]()
    figures: dict[str, Any] = {}
    try:
        for clients in counts:
            figures[str(clients)] = rate_step(server, clients, args)
        figures["broadcast"] = broadcast(server, args)
    finally:
        server.stop()
    return figures


def rate_step(server: Server, clients: int, args: argparse.Namespace) -> dict[str, Any]:
    """The warm-up step at half the rate, then the measured one (tried again if refused)."""
    with LoadGenerator(
        server.protocol, server.url, "rate", clients, rooms=ROOMS, processes=args.processes
    ) as generator:
        generator.rate_step(args.rate // 2, args.duration, server.cpu_seconds)
        step, _ = measure_when_quiet(
            lambda: generator.rate_step(args.rate, args.duration, server.cpu_seconds),
            server.pids + generator.pids,
            retries=args.retries,
            quiet_limit=args.quiet_limit,
            quiet_wait=args.quiet_wait,
            label=f"  {server.name}, {clients} clients",
        )
    if not step["loadgen_saturated"]:
        log(
            f"  {server.name}, {clients} clients: {step['server_cpu_us_per_delivery']:.2f} µs"
            f" per delivery (user {step['server_user_us_per_delivery']:.2f}, kernel"
            f" {step['server_system_us_per_delivery']:.2f}), p99 {step['p99_ms']:.1f} ms,"
            f" load generator at {step['loadgen_cpu_percent_max']:.0f} % of a core,"
            f" lost {step['lost']}"
        )
    return step


def broadcast(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    """BROADCAST_MESSAGES messages, one at a time, to a room of --broadcast-members."""
    with LoadGenerator(
        server.protocol, server.url, "broadcast", args.broadcast_members, processes=args.processes
    ) as generator:
        result, _ = measure_when_quiet(
            lambda: generator.broadcast(
                BROADCAST_MESSAGES, BROADCAST_INTERVAL_MS, server.cpu_seconds
            ),
            server.pids + generator.pids,
            retries=args.retries,
            quiet_limit=args.quiet_limit,
            quiet_wait=args.quiet_wait,
            label=f"  {server.name}, broadcast",
        )
    if not result["loadgen_saturated"]:
        log(
            f"  {server.name}, one message to {args.broadcast_members}: to the last in"
            f" {result['median_to_last_ms']:.1f} ms (median),"
            f" {result['server_cpu_us_per_delivery']:.2f} µs per delivery,"
            f" incomplete {result['incomplete']}"
        )
    return result


def summarize(rounds: list[dict[str, Any]], names: list[str], counts: list[int]) -> list[str]:
    """Medians of the rounds for every system, each beside Socket.IO's figure as a ratio."""
    lines = ["server CPU per delivery, µs: total (user + kernel), and total / Socket.IO's"]
    for clients in counts:
        medians = _medians(
            rounds,
            names,
            str(clients),
            (
                "server_cpu_us_per_delivery",
                "server_user_us_per_delivery",
                "server_system_us_per_delivery",
                "loadgen_cpu_percent_max",
            ),
        )
        reference = medians.get("socket.io", {}).get("server_cpu_us_per_delivery")
        for name, figures in medians.items():
            total = figures["server_cpu_us_per_delivery"]
            kernel = figures["server_system_us_per_delivery"]
            ratio = "" if not reference else f"  {total / reference:.2f} x"
            lines.append(
                f"  {clients:>6} clients  {name:<12} {total:6.2f} "
                f"({figures['server_user_us_per_delivery']:.2f} + {kernel:.2f}){ratio}"
                f"  [load generator {figures['loadgen_cpu_percent_max']:.0f} % of a core,"
                f" {figures['rounds']:.0f} rounds]"
            )
    lines.append("one message to a room of every client: ms to the last member, and / Socket.IO's")
    medians = _medians(
        rounds, names, "broadcast", ("median_to_last_ms", "server_cpu_us_per_delivery")
    )
    reference = medians.get("socket.io", {}).get("median_to_last_ms")
    for name, figures in medians.items():
        to_last = figures["median_to_last_ms"]
        ratio = "" if not reference else f"  {to_last / reference:.2f} x"
        lines.append(
            f"  {name:<12} {to_last:6.1f} ms{ratio}"
            f"  [{figures['server_cpu_us_per_delivery']:.2f} µs per delivery,"
            f" {figures['rounds']:.0f} rounds]"
        )
    return lines


def _medians(
    rounds: list[dict[str, Any]], names: list[str], key: str, fields: tuple[str, ...]
) -> dict[str, dict[str, float]]:
    """For each system, the median over the rounds whose step ``key`` was not refused."""
    medians: dict[str, dict[str, float]] = {}
    for name in names:
        steps = [
            run[name][key]
            for run in rounds
            if not run[name][key]["loadgen_saturated"]
            and all(run[name][key].get(field) is not None for field in fields)
        ]
        if steps:
            medians[name] = {
                field: statistics.median(step[field] for step in steps) for field in fields
            }
            medians[name]["rounds"] = len(steps)
    return medians


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=int, default=40_000, help="deliveries/s (default 40,000)")
    parser.add_argument("--clients", default="1000,4000", help="comma-separated")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per step")
    parser.add_argument("--broadcast-members", type=int, default=4000)
    parser.add_argument(
        "--systems", default="send-floor,trio-fanout,socket.io", help="comma-separated"
    )
    parser.add_argument(
        "--loadgen-processes", dest="processes", type=int, default=DEFAULT_PROCESSES
    )
    parser.add_argument("--retries", type=int, default=2)
    parser.add_argument("--quiet-limit", type=float, default=50.0)
    parser.add_argument("--quiet-wait", type=float, default=20.0)
    args = parser.parse_args()
    names = args.systems.split(",")
    unknown = [name for name in names if name not in ALL_SYSTEMS]
    if unknown:
        parser.error(f"unknown systems: {', '.join(unknown)} (known: {', '.join(ALL_SYSTEMS)})")
    counts = [int(count) for count in args.clients.split(",")]
    signal.signal(signal.SIGTERM, _interrupt)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / time.strftime("floor-%Y%m%d-%H%M%S.json")
    rounds: list[dict[str, Any]] = []
    for number in range(args.rounds):
        order = names[number % len(names) :] + names[: number % len(names)]
        log(f"round {number + 1}/{args.rounds}: {', '.join(order)}")
        run: dict[str, Any] = {}
        for name in order:
            run[name] = measure(name, counts, args)
            time.sleep(PAUSE_BETWEEN_SYSTEMS_S)
        rounds.append(run)
        path.write_text(json.dumps({"args": vars(args), "rounds": rounds}, indent=1))
    print("\n".join(summarize(rounds, names, counts)))
    log(f"results: {path}")


if __name__ == "__main__":
    main()
