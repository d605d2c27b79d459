"""Server CPU per delivery at one fixed rate, split into user and kernel time, for trio-fanout,
Socket.IO 4.8 and send_floor.py in the same run. Not part of the test suite; run it by hand:

    python bench/cpu_floor.py                  # 3 rounds at 40,000 deliveries/s, ~10 minutes
    python bench/cpu_floor.py --rounds 1 --duration 3

send_floor.py is no system a user would pick: one Python process that does nothing but one
``send`` per recipient. Beside the two servers it shows how much of a delivery's cost is the
``send`` itself (mostly kernel time: on loopback, the sender's system call also does the
receiving side's TCP work), which no server that writes each delivery on its own can avoid.

Each round runs, for each system (the order rotating from one round to the next), 1,000 and
4,000 clients in 10 rooms, one publisher per room (the rate scenario of compare.py): a warm-up
step at half the rate, then the measured step. A step in which the load generator was saturated
is tried again (--retries) and otherwise left out. Results go to bench/results/cpu-floor-*.json,
a table of medians to stdout.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import time
from pathlib import Path
from typing import Any

from loadgen import DEFAULT_PROCESSES, LoadGenerator, log, wait_for_quiet
from systems import SYSTEMS, SendFloor, Server

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROOMS = 10
PAUSE_BETWEEN_SYSTEMS_S = 10
ALL_SYSTEMS: dict[str, type[Server]] = {**SYSTEMS, SendFloor.name: SendFloor}


def measure(name: str, clients: int, args: argparse.Namespace) -> dict[str, Any]:
    """One system, one number of clients: the warm-up step, then the measured one."""
    server = ALL_SYSTEMS[name]()
    try:
        with LoadGenerator(
            server.protocol, server.url, "rate", clients, rooms=ROOMS, processes=args.processes
        ) as generator:
            generator.rate_step(args.rate // 2, args.duration, server.cpu_seconds)
            for _attempt in range(args.retries + 1):
                quiet = wait_for_quiet(
                    server.pids + generator.pids, args.quiet_limit, args.quiet_wait
                )
                step = generator.rate_step(args.rate, args.duration, server.cpu_seconds)
                step["others_cpu_percent_before"] = quiet
                if not step["loadgen_saturated"]:
                    break
                log(f"  {name}, {clients} clients: refused, {step['loadgen_saturated']}")
    finally:
        server.stop()
    if step["loadgen_saturated"]:
        return step
    log(
        f"  {name}, {clients} clients: {step['server_cpu_us_per_delivery']:.2f} µs per delivery"
        f" (user {step['server_user_us_per_delivery']:.2f}, kernel"
        f" {step['server_system_us_per_delivery']:.2f}), p99 {step['p99_ms']:.1f} ms,"
        f" load generator at {step['loadgen_cpu_percent_max']:.0f} % of a core,"
        f" lost {step['lost']}"
    )
    return step


def summarize(rounds: list[dict[str, Any]], names: list[str], counts: list[int]) -> list[str]:
    """The median of the rounds for every system and number of clients, and the ratios to
    Socket.IO's total."""
    lines = [
        "clients  system        µs/delivery   user  kernel   / socket.io total   load generator"
    ]
    for clients in counts:
        medians: dict[str, dict[str, float]] = {}
        for name in names:
            steps = [
                run[name][str(clients)]
                for run in rounds
                if not run[name][str(clients)]["loadgen_saturated"]
            ]
            if not steps:
                continue
            medians[name] = {
                key: statistics.median(step[key] for step in steps)
                for key in (
                    "server_cpu_us_per_delivery",
                    "server_user_us_per_delivery",
                    "server_system_us_per_delivery",
                    "loadgen_cpu_percent_max",
                )
            }
            medians[name]["rounds"] = len(steps)
        reference = medians.get("socket.io", {}).get("server_cpu_us_per_delivery")
        for name, figures in medians.items():
            total = figures["server_cpu_us_per_delivery"]
            user = figures["server_user_us_per_delivery"]
            kernel = figures["server_system_us_per_delivery"]
            ratio = "-"
            if reference:
                ratio = f"{total / reference:.2f} (kernel {kernel / reference:.2f})"
            lines.append(
                f"{clients:>7}  {name:<12} {total:>8.2f}  {user:>6.2f}  {kernel:>6.2f}"
                f"   {ratio:<20}"
                f"  {figures['loadgen_cpu_percent_max']:.0f} % of a core,"
                f" {figures['rounds']:.0f} rounds"
            )
    return lines


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=int, default=40_000, help="deliveries/s (default 40,000)")
    parser.add_argument("--clients", default="1000,4000", help="comma-separated")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per step")
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
    path = RESULTS / time.strftime("cpu-floor-%Y%m%d-%H%M%S.json")
    rounds: list[dict[str, Any]] = []
    for number in range(args.rounds):
        order = names[number % len(names) :] + names[: number % len(names)]
        log(f"round {number + 1}/{args.rounds}: {', '.join(order)}")
        run: dict[str, Any] = {}
        for name in order:
            run[name] = {str(clients): measure(name, clients, args) for clients in counts}
            time.sleep(PAUSE_BETWEEN_SYSTEMS_S)
        rounds.append(run)
        path.write_text(json.dumps({"args": vars(args), "rounds": rounds}, indent=1))
    print("\n".join(summarize(rounds, names, counts)))
    log(f"results: {path}")


if __name__ == "__main__":
    main()
