"""trio-fanout against Socket.IO 4.8 (node:cluster, Redis adapter), the same scenarios in the same
run: the systems take turns, round after round, and the summary is the median of the rounds.
Not part of the test suite; run it by hand:

    pip install -e '.[bench]' && (cd bench && npm ci)
    python bench/compare.py                         # 3 rounds, 15-30 minutes
    python bench/compare.py --rounds 1 --quick      # a smoke run, a few minutes
    python bench/compare.py --rounds 1 --quick --scenarios connections --max-connections 36000
    python bench/compare.py --report bench/results/compare-….json   # table and pictures again
    python bench/compare.py --rounds 1 --scenarios firehose        # one scenario only

Each round runs, for each system (the order alternates from one round to the next):
- connections: 1,000, 4,000 and 10,000 (--quick: 1,000 and 4,000) clients in one room, then
  --max-connections (default 36,000; --quick: none) on the system started anew with more
  workers. Each step connects its clients as fast as the load generator can (connections/s,
  with the load generator's CPU), reads the system's RSS once they are connected, times the
  heartbeats from their first arrival at a client to their last (HEARTBEAT_WINDOW_S), sends
  one message at a time to all of them (20 messages, 200 ms apart, 25 us per member apart past
  8,000 members: the time from the publish to its arrival at the last member), and reads
  trio-fanout's GC pauses from each worker's /healthz;
- rates: 1,000 and 4,000 clients in 10 rooms, one publisher per room, stepping the delivery rate
  up (RATE_STEPS, --duration s each) on the same connections. A step passes when p99 latency is
  under P99_LIMIT_MS and nothing is lost, duplicated or reordered; the maximum sustainable rate is
  the highest step reached with every step below it passing. 20,000/s and 40,000/s are always
  run (for their latency and CPU per delivery); after that the search stops at the first step
  that does not pass. A step in which the load generator was saturated (loadgen.py says when) is
  refused: it counts neither for nor against the server, and ends the search.
- firehose: 100 clients in one room, fed by 10 publishers (FIREHOSE_PUBLISHERS) at 500, 1,000
  and 2,000 messages/s in all (FIREHOSE_MESSAGE_RATES; every client receives them all: 50,000 to
  200,000 deliveries/s), each step run whatever the one before gave. Each publisher's messages
  must arrive in order, without loss or duplicates; different publishers' may interleave. Where
  a system counts its socket sends (trio-fanout's workers do), the frames written per send over
  the step; FIREHOSE_TARGETS says what is aimed at.

`--scenarios` picks some of them (default: all three).

Server CPU is read from /proc for every process of the system (trio-fanout: master and workers;
Socket.IO: primary, workers and its redis-server) over each step. Results go to
bench/results/compare-*.json, pictures to docs/images/, and a table of medians and ratios to
stdout.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import time
from pathlib import Path
from typing import Any

from loadgen import (
    CPU_LIMIT_PERCENT,
    DEFAULT_PROCESSES,
    LAG_P99_LIMIT_MS,
    LoadGenerator,
    LoadGeneratorError,
    log,
    measure_when_quiet,
    processes_for,
    source_addresses,
    wait_for_quiet,
)
from systems import SYSTEMS

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
IMAGES = HERE.parent / "docs" / "images"

P99_LIMIT_MS = 100.0
RATE_STEPS = [
    20_000,
    40_000,
    60_000,
    80_000,
    100_000,
    120_000,
    140_000,
    160_000,
    200_000,
    240_000,
    280_000,
]
ALWAYS_RUN = {20_000, 40_000}
RATE_CLIENTS = (1000, 4000)
ROOMS = 10
FIREHOSE_CLIENTS = 100
FIREHOSE_MESSAGE_RATES = (500, 1000, 2000)
# The firehose room's publishers, which share its message rate (200/s each at 2,000/s): what is
# measured is clients receiving thousands of messages a second, not how fast one connection can
# publish. trio-fanout handles one connection's publishes one at a time, each waiting for the
# backplane sequencer's answer (~0.5 ms), which caps one publisher near 2,000/s on this machine.
FIREHOSE_PUBLISHERS = 10
# What the firehose is checked against: many frames a second to one client should leave in a
# few sends (trio-fanout's write_delay lets them gather), and that gathering should not cost
# more than this much p99 latency.
FIREHOSE_TARGETS = {"frames_per_send_min": 3.0, "p99_ms_max": 50.0}
BROADCAST_MESSAGES = 20
BROADCAST_INTERVAL_MS = 200
# ... or longer with more members: each message must have reached every member before the next
# is sent, or the step measures a delivery rate (36,000 members, 5 messages a second, is a
# load that saturated the load generator), not one message's way to the last member.
BROADCAST_INTERVAL_MS_PER_MEMBER = 0.025
# Between the systems' turns, so that one's exit (sockets in TIME_WAIT, memory handed back)
# settles before the other starts.
PAUSE_BETWEEN_SYSTEMS_S = 10
SCENARIOS = ("connections", "rates", "firehose")
CONNECTION_COUNTS = (1000, 4000, 10_000)
QUICK_CONNECTION_COUNTS = (1000, 4000)
# The connections scenario's last step, on a system started for it alone (--max-connections).
DEFAULT_MAX_CONNECTIONS = 36_000
# Connections per worker process at that step: a process may open 20,000 descriptors here
# (ulimit -n), and the kernel spreads connections over the workers only roughly evenly.
CONNECTIONS_PER_WORKER = 10_000
# Seconds of heartbeats timed at every step of the connections scenario (about one a second).
HEARTBEAT_WINDOW_S = 5.0
QUICK_HEARTBEAT_WINDOW_S = 3.0


def verdict(step: dict[str, Any]) -> str:
    if step["loadgen_saturated"]:
        return "saturated"
    ok = (
        step["lost"] == 0
        and step["duplicated"] == 0
        and step["reordered"] == 0
        and step["p99_ms"] is not None
        and step["p99_ms"] < P99_LIMIT_MS
    )
    return "pass" if ok else "fail"


def run_system(name: str, args: argparse.Namespace) -> dict[str, Any]:
    server = SYSTEMS[name]()
    figures: dict[str, Any] = {"system": name, "started": time.time()}
    try:
        time.sleep(1)
        base_rss = server.rss_bytes()
        figures["rss_before_bytes"] = base_rss
        if "connections" in args.scenarios:
            figures["connections"] = {}
            for count in QUICK_CONNECTION_COUNTS if args.quick else CONNECTION_COUNTS:
                figures["connections"][str(count)] = connections_step(server, count, base_rss, args)
        if "rates" in args.scenarios:
            for clients in RATE_CLIENTS:
                figures[f"rate_{clients}"] = rate_search(server, clients, args)
        if "firehose" in args.scenarios:
            figures["firehose"] = firehose(server, args)
    finally:
        server.stop()
    if "connections" in args.scenarios and args.max_connections:
        time.sleep(PAUSE_BETWEEN_SYSTEMS_S)
        figures["connections"][str(args.max_connections)] = max_connections_step(name, args)
    return figures


def max_connections_step(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The connections scenario's last step, --max-connections clients, on the system started
    anew with --max-workers workers; where it cannot be reached, why."""
    log(f"  {name}: {args.max_connections:,} connections, {args.max_workers} workers")
    server = SYSTEMS[name](workers=args.max_workers)
    try:
        time.sleep(1)
        step = connections_step(server, args.max_connections, server.rss_bytes(), args)
    except LoadGeneratorError as error:
        log(f"  {name}: {args.max_connections:,} connections not reached: {error}")
        step = {"clients": args.max_connections, "failed": str(error)}
    finally:
        server.stop()
    step.update(maximum=True, workers=args.max_workers)
    return step


def connections_step(
    server: Any, count: int, base_rss: int, args: argparse.Namespace
) -> dict[str, Any]:
    """``count`` clients in one room, connected as fast as the load generator can: the rate of
    new connections, RSS over ``base_rss``, the heartbeat's spread over the clients, one
    message at a time to all of them, and the workers' GC pauses (where the system tells)."""
    name = server.name
    processes = processes_for(count, args.processes)
    wait_for_quiet(server.pids, args.quiet_limit, args.quiet_wait)
    log(f"  {name}: connecting {count:,} clients ({processes} load-generator processes)")
    with LoadGenerator(
        server.protocol,
        server.url,
        "broadcast",
        count,
        processes=processes,
        source_addresses=source_addresses(count),
    ) as generator:
        connect = generator.connect_rate()
        log(
            f"  {name}: {count:,} connected in {connect['connect_seconds']:.1f} s, "
            f"{connect['connections_per_second']:,.0f}/s (load generator CPU "
            f"{connect['loadgen_cpu_percent_total']:.0f} % of a core in all)"
        )
        time.sleep(2)  # let the handshakes' garbage go before reading RSS
        rss = server.rss_bytes()
        heartbeat = generator.heartbeats(args.heartbeat_window)
        log(
            f"  {name}: {count:,} connections: {heartbeat['heartbeats']} heartbeats, spread "
            f"first to last {_ms(heartbeat['median_spread_ms'])} (max "
            f"{_ms(heartbeat['max_spread_ms'])}), incomplete "
            f"{heartbeat['heartbeats_incomplete']}{_saturation(heartbeat)}"
        )
        result, _ = measure_when_quiet(
            lambda: generator.broadcast(
                BROADCAST_MESSAGES, broadcast_interval_ms(count), server.cpu_seconds
            ),
            server.pids + generator.pids,
            retries=args.retries,
            quiet_limit=args.quiet_limit,
            quiet_wait=args.quiet_wait,
            label=f"  {name}: {count} connections, broadcast",
        )
    result["interval_ms"] = broadcast_interval_ms(count)
    result["rss_bytes"] = rss
    result["rss_over_idle_bytes"] = rss - base_rss
    result["rss_per_connection_kib"] = (rss - base_rss) / count / 1024
    result["verdict"] = "saturated" if result["loadgen_saturated"] else "pass"
    result["connect"] = connect
    result["heartbeat"] = heartbeat
    result["gc"] = gc_step(server.gc_pauses())
    result["loadgen_processes_count"] = processes
    log(
        f"  {name}: {count:,} connections: {result['rss_per_connection_kib']:.1f} KiB each,"
        f" to the last {_ms(result['median_to_last_ms'])} (incomplete "
        f"{result['incomplete']}){_gc_line(result['gc'])}{_saturation(result)}"
    )
    return result


def broadcast_interval_ms(members: int) -> float:
    """Milliseconds between two messages to ``members`` members (see BROADCAST_INTERVAL_MS)."""
    return max(BROADCAST_INTERVAL_MS, members * BROADCAST_INTERVAL_MS_PER_MEMBER)


def gc_step(workers: dict[int, dict[str, Any]] | None) -> dict[str, Any] | None:
    """The workers' GC figures after a step: the longest pause since each started (the
    connections scenario's steps share a server, so a longer one than the last step's is this
    step's) and the p99 of each one's last 1,000 pauses; the worst worker's of each."""
    if not workers:
        return None
    return {
        "workers": {str(index): figures for index, figures in sorted(workers.items())},
        "longest_pause_ms": max(w["longest_pause_ms"] for w in workers.values()),
        "longest_pause_cpu_ms": max(w["longest_pause_cpu_ms"] for w in workers.values()),
        "p99_pause_ms": max(w["p99_pause_ms"] for w in workers.values()),
    }


def _gc_line(gc: dict[str, Any] | None) -> str:
    if gc is None:
        return ""
    return (
        f", GC pauses longest {gc['longest_pause_ms']:.1f} ms (CPU "
        f"{gc['longest_pause_cpu_ms']:.1f} ms) p99 {gc['p99_pause_ms']:.1f} ms"
    )


def rate_search(server: Any, clients: int, args: argparse.Namespace) -> dict[str, Any]:
    steps: list[dict[str, Any]] = []
    best = None
    stopped_by = "end of steps"
    all_passed = True
    with LoadGenerator(
        server.protocol, server.url, "rate", clients, rooms=ROOMS, processes=args.processes
    ) as generator:
        for rate in RATE_STEPS:
            if not all_passed and rate not in ALWAYS_RUN:
                break
            step, refused = measure_when_quiet(
                lambda rate=rate: generator.rate_step(rate, args.duration, server.cpu_seconds),
                server.pids + generator.pids,
                retries=args.retries,
                quiet_limit=args.quiet_limit,
                quiet_wait=args.quiet_wait,
                label=f"  {server.name}: {clients} clients, {rate:,}/s",
            )
            step["verdict"] = verdict(step)
            step["refused_attempts"] = _summaries(refused)
            steps.append(step)
            log(
                f"  {server.name}: {clients} clients, {rate:,}/s: {step['verdict']}, p50 "
                f"{_ms(step['p50_ms'])} p99 {_ms(step['p99_ms'])}, lost {step['lost']}, server "
                f"{step['server_cpu_us_per_delivery']:.1f} us/delivery, loadgen CPU max "
                f"{step['loadgen_cpu_percent_max']:.0f} % lag p99 "
                f"{step['loadgen_lag_p99_ms_max']:.0f} ms, machine "
                f"{step['machine_cpu_percent']:.0f} % busy{_saturation(step)}"
            )
            if step["verdict"] == "pass" and all_passed:
                best = step["achieved_deliveries_per_second"]
            elif all_passed:
                all_passed = False
                stopped_by = step["verdict"]
            time.sleep(1)
    return {"steps": steps, "max_sustainable": best, "stopped_by": stopped_by}


def firehose(server: Any, args: argparse.Namespace) -> dict[str, Any]:
    """FIREHOSE_CLIENTS clients in one room, its FIREHOSE_PUBLISHERS publishers stepping through
    FIREHOSE_MESSAGE_RATES together: every step is run (a saturated one still says how far the
    load generator got), each tried again while it is refused."""
    steps: list[dict[str, Any]] = []
    with LoadGenerator(
        server.protocol,
        server.url,
        "rate",
        FIREHOSE_CLIENTS,
        rooms=1,
        publishers_per_room=FIREHOSE_PUBLISHERS,
        processes=args.processes,
    ) as generator:
        for messages in FIREHOSE_MESSAGE_RATES:
            step, refused = measure_when_quiet(
                lambda messages=messages: _firehose_step(server, generator, messages, args),
                server.pids + generator.pids,
                retries=args.retries,
                quiet_limit=args.quiet_limit,
                quiet_wait=args.quiet_wait,
                label=f"  {server.name}: firehose {messages:,} msg/s",
            )
            step["messages_per_second"] = messages
            step["verdict"] = verdict(step)
            step["targets_met"] = _firehose_targets_met(step)
            step["refused_attempts"] = _summaries(refused)
            steps.append(step)
            per_send = step["frames_per_send"]
            log(
                f"  {server.name}: firehose {messages:,} msg/s from {FIREHOSE_PUBLISHERS} "
                f"publishers to {FIREHOSE_CLIENTS} clients: "
                f"{step['verdict']}, {step['achieved_deliveries_per_second']:,.0f} deliveries/s, "
                f"p50 {_ms(step['p50_ms'])} p99 {_ms(step['p99_ms'])}, lost {step['lost']} dup "
                f"{step['duplicated']} reordered {step['reordered']}, server "
                f"{step['server_cpu_us_per_delivery']:.2f} us/delivery, frames/send "
                f"{'-' if per_send is None else f'{per_send:.1f}'}, loadgen CPU max "
                f"{step['loadgen_cpu_percent_max']:.0f} %, machine "
                f"{step['machine_cpu_percent']:.0f} % busy{_saturation(step)}"
            )
            time.sleep(1)
    return {
        "clients": FIREHOSE_CLIENTS,
        "publishers": FIREHOSE_PUBLISHERS,
        "targets": FIREHOSE_TARGETS,
        "steps": steps,
    }


def _firehose_step(
    server: Any, generator: LoadGenerator, messages: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One firehose step at ``messages`` a second, with the frames the workers wrote per send."""
    sends_before = server.send_counters()
    step = generator.rate_step(messages * FIREHOSE_CLIENTS, args.duration, server.cpu_seconds)
    step.update(_frames_per_send(sends_before, server.send_counters()))
    return step


def _summaries(refused: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What is kept of the refused attempts before a step: SUMMARY_OF_REFUSED."""
    return [{key: step[key] for key in SUMMARY_OF_REFUSED if key in step} for step in refused]


def _frames_per_send(
    before: tuple[int, int] | None, after: tuple[int, int] | None
) -> dict[str, Any]:
    """The server's socket sends over a step and the frames they carried (heartbeats
    included), or None each where the system does not count them."""
    if before is None or after is None:
        return {"sends": None, "frames_sent": None, "frames_per_send": None}
    sends = after[0] - before[0]
    frames = after[1] - before[1]
    return {
        "sends": sends,
        "frames_sent": frames,
        "frames_per_send": frames / sends if sends else None,
    }


def _firehose_targets_met(step: dict[str, Any]) -> bool | None:
    """Whether a firehose step met FIREHOSE_TARGETS (None: refused, or no send counters)."""
    if step["loadgen_saturated"] or step["frames_per_send"] is None or step["p99_ms"] is None:
        return None
    return bool(
        step["frames_per_send"] >= FIREHOSE_TARGETS["frames_per_send_min"]
        and step["p99_ms"] < FIREHOSE_TARGETS["p99_ms_max"]
    )


def firehose_step(figures: dict[str, Any], messages: int) -> dict[str, Any] | None:
    for step in figures.get("firehose", {}).get("steps", []):
        if step["messages_per_second"] == messages:
            return step  # type: ignore[no-any-return]
    return None


def firehose_metrics() -> list[tuple[str, Any, bool]]:
    """The firehose rows of the table: per message rate, what each system achieved."""
    table: list[tuple[str, Any, bool]] = []
    for messages in FIREHOSE_MESSAGE_RATES:
        where = f"firehose {messages:,} msg/s to {FIREHOSE_CLIENTS}"
        for label, key, higher_is_better in (
            ("deliveries/s", "achieved_deliveries_per_second", True),
            ("p50 ms", "p50_ms", False),
            ("p99 ms", "p99_ms", False),
            ("server CPU us/delivery", "server_cpu_us_per_delivery", False),
            ("frames per send", "frames_per_send", True),
        ):
            table.append(
                (
                    f"{where}: {label}",
                    lambda f, m=messages, k=key: _figure(firehose_step(f, m), k),
                    higher_is_better,
                )
            )
    return table


# What is kept of a refused attempt that was retried.
SUMMARY_OF_REFUSED = ("p50_ms", "p99_ms", "lost", "loadgen_saturated", "machine_cpu_percent")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _saturation(result: dict[str, Any]) -> str:
    reason = result.get("loadgen_saturated")
    return f" [REFUSED: load generator saturated: {reason}]" if reason else ""


def step_at(figures: dict[str, Any], clients: int, rate: int) -> dict[str, Any] | None:
    for step in figures.get(f"rate_{clients}", {"steps": []})["steps"]:
        if step["target_deliveries_per_second"] == rate:
            return step  # type: ignore[no-any-return]
    return None


# (label, how to read it from one system's figures of one round, True if higher is better)
def metrics() -> list[tuple[str, Any, bool]]:
    table: list[tuple[str, Any, bool]] = []
    for clients in RATE_CLIENTS:
        table.append(
            (
                f"max sustainable deliveries/s, {clients:,} clients",
                lambda f, c=clients: (_max_sustainable(f.get(f"rate_{c}")), False),
                True,
            )
        )
    for clients in RATE_CLIENTS:
        table.append(
            (
                f"server CPU us/delivery at 40,000/s, {clients:,} clients",
                lambda f, c=clients: _figure(step_at(f, c, 40_000), "server_cpu_us_per_delivery"),
                False,
            )
        )
    for rate in (20_000, 40_000):
        for clients in RATE_CLIENTS:
            for p in ("p50", "p99"):
                table.append(
                    (
                        f"{p} ms at {rate:,}/s, {clients:,} clients",
                        lambda f, c=clients, r=rate, k=f"{p}_ms": _figure(step_at(f, c, r), k),
                        False,
                    )
                )
    table.extend(connections_metrics())
    return table


# The connections scenario's steps in the table: a count, or "max" for --max-connections.
CONNECTION_STEPS = ("1000", "4000", "10000", "max")


def connection_step(figures: dict[str, Any], step: str) -> dict[str, Any] | None:
    """One step of the connections scenario (``step`` as in CONNECTION_STEPS), if it ran."""
    steps = figures.get("connections", {})
    if step != "max":
        found: dict[str, Any] | None = steps.get(step)
        return found if found is not None and not found.get("maximum") else None
    return next((x for x in steps.values() if x.get("maximum") and "failed" not in x), None)


def _step_label(step: str) -> str:
    return "the maximum" if step == "max" else f"{int(step):,}"


def connections_metrics() -> list[tuple[str, Any, bool]]:
    """The connections scenario's rows of the table."""
    table: list[tuple[str, Any, bool]] = [
        (
            "connections at the maximum step",
            lambda f: _figure(connection_step(f, "max"), "clients", False),
            True,
        )
    ]
    for step in CONNECTION_STEPS:
        table.append(
            (
                f"RSS KiB per connection, {_step_label(step)} connections",
                lambda f, n=step: _figure(connection_step(f, n), "rss_per_connection_kib", False),
                False,
            )
        )
    for step in CONNECTION_STEPS:
        table.append(
            (
                f"heartbeat first to last client, ms, {_step_label(step)} connections",
                lambda f, n=step: _nested(connection_step(f, n), "heartbeat", "median_spread_ms"),
                False,
            )
        )
    for step in CONNECTION_STEPS:
        table.append(
            (
                f"one message to {_step_label(step)} members: ms to the last",
                lambda f, n=step: _figure(connection_step(f, n), "median_to_last_ms"),
                False,
            )
        )
    for step in CONNECTION_STEPS:
        table.append(
            (
                f"server CPU us per frame delivered, {_step_label(step)} members, heartbeats"
                " included",
                lambda f, n=step: _figure(connection_step(f, n), "server_cpu_us_per_frame"),
                False,
            )
        )
    for step in CONNECTION_STEPS:
        table.append(
            (
                f"new connections/s, {_step_label(step)} connections",
                lambda f, n=step: _nested(
                    connection_step(f, n), "connect", "connections_per_second"
                ),
                True,
            )
        )
        table.append(
            (
                "  load generator CPU %, all processes, meanwhile",
                lambda f, n=step: _nested(
                    connection_step(f, n), "connect", "loadgen_cpu_percent_total"
                ),
                False,
            )
        )
    for step in CONNECTION_STEPS:
        for key, what in (
            ("longest_pause_ms", "longest"),
            ("longest_pause_cpu_ms", "longest (CPU)"),
            ("p99_pause_ms", "p99"),
        ):
            table.append(
                (
                    f"GC pause {what}, ms, after {_step_label(step)} connections",
                    lambda f, n=step, k=key: _nested(connection_step(f, n), "gc", k),
                    False,
                )
            )
    return table


def _nested(step: dict[str, Any] | None, part: str, key: str) -> tuple[float | None, bool]:
    """A figure of one part of a step (its heartbeat, connect or GC figures), refused when
    that part was (the heartbeats' load generator saturated)."""
    return _figure(None if step is None else step.get(part), key)


def _max_sustainable(search: dict[str, Any] | None) -> float | None:
    """The search's result; 0 when the lowest step failed (nothing is sustainable), None when it
    was refused (nothing is known). A search ended by a refusal gives only a lower bound."""
    if search is None:
        return None
    if search["max_sustainable"] is not None:
        return float(search["max_sustainable"])
    return 0.0 if search["stopped_by"] == "fail" else None


def _figure(
    step: dict[str, Any] | None, key: str, refusable: bool = True
) -> tuple[float | None, bool]:
    """A figure of a step, and whether the step was refused (load generator saturated).

    Memory does not depend on the load generator's pace, so its figures are never refused.
    """
    if step is None or step.get(key) is None:
        return None, False
    return float(step[key]), refusable and bool(step.get("loadgen_saturated"))


def summarize(rounds: list[dict[str, dict[str, Any]]], names: list[str]) -> list[dict[str, Any]]:
    """Medians over the rounds of the steps that were not refused; where every round's step was
    refused, the median of those, marked provisional (it says more about the machine than
    about the server)."""
    rows = []
    for label, read, higher_is_better in metrics() + firehose_metrics():
        row: dict[str, Any] = {"metric": label, "higher_is_better": higher_is_better}
        for name in names:
            figures = [read(r[name]) for r in rounds if name in r]
            kept = [value for value, refused in figures if value is not None and not refused]
            refused = [value for value, was_refused in figures if value is not None and was_refused]
            row[f"{name} runs"] = kept
            row[f"{name} refused runs"] = refused
            row[f"{name} provisional"] = not kept and bool(refused)
            values = kept or refused
            row[name] = statistics.median(values) if values else None
        first, second = (row[name] for name in names)
        row["ratio"] = first / second if first and second else None
        if first is not None or second is not None:  # a scenario not run has no row
            rows.append(row)
    for clients in RATE_CLIENTS:
        row = {"metric": f"searches at {clients:,} clients ended by", "higher_is_better": None}
        for name in names:
            row[name] = ", ".join(
                r[name][f"rate_{clients}"]["stopped_by"]
                for r in rounds
                if f"rate_{clients}" in r[name]
            )
            row[f"{name} provisional"] = False
        row["ratio"] = None
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]], names: list[str]) -> None:
    width = max(len(row["metric"]) for row in rows)
    print(f"\n{'':<{width}}  {names[0]:>14}  {names[1]:>14}  {'ratio':>7}")
    for row in rows:
        cells = []
        for name in names:
            value = row[name]
            mark = "*" if row[f"{name} provisional"] else ""
            cells.append(
                value if isinstance(value, str) else "-" if value is None else f"{value:,.1f}{mark}"
            )
        provisional = any(row[f"{name} provisional"] for name in names)
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}{'*' if provisional else ''}"
        print(f"{row['metric']:<{width}}  {cells[0]:>14}  {cells[1]:>14}  {ratio:>7}")
    print(
        f"(ratio = {names[0]} / {names[1]}; higher is better only for the deliveries/s, "
        "connections/s and connections rows;"
    )
    print(" * only from steps refused as load generator saturated: provisional)")


def plot(results: dict[str, Any], images: Path) -> list[Path]:
    """The pictures of the scenarios that ran in every round."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    names: list[str] = results["systems"]
    rounds: list[dict[str, Any]] = results["rounds"]
    colours = dict(zip(names, ("tab:blue", "tab:orange"), strict=True))
    images.mkdir(parents=True, exist_ok=True)
    written = []

    if all(f"rate_{c}" in r[name] for r in rounds for name in names for c in RATE_CLIENTS):
        written.append(plot_rates(results, images, colours))
    if all("connections" in r[name] for r in rounds for name in names):
        written.append(plot_connections(results, images, colours))
    return written


def plot_rates(results: dict[str, Any], images: Path, colours: dict[str, str]) -> Path:
    """Delivery rate against p99 latency, for each number of clients."""
    import matplotlib
    import matplotlib.pyplot as plt

    names: list[str] = results["systems"]
    rounds: list[dict[str, Any]] = results["rounds"]
    figure, axes = plt.subplots(1, len(RATE_CLIENTS), figsize=(11, 4.2), sharey=True)
    for axis, clients in zip(axes, RATE_CLIENTS, strict=True):
        for name in names:
            by_rate: dict[int, list[tuple[float, float]]] = {}
            every_rate: dict[int, list[tuple[float, float]]] = {}
            for r in rounds:
                for step in r[name][f"rate_{clients}"]["steps"]:
                    if step["p99_ms"] is None:
                        continue
                    point = (step["achieved_deliveries_per_second"], step["p99_ms"])
                    refused = bool(step["loadgen_saturated"])
                    axis.scatter(
                        *point,
                        s=14,
                        alpha=0.35,
                        color=colours[name],
                        marker="x" if refused else "o",
                    )
                    target = step["target_deliveries_per_second"]
                    every_rate.setdefault(target, []).append(point)
                    if not refused:
                        by_rate.setdefault(target, []).append(point)
            # Solid: medians of the steps kept. Dashed, where no step of a rate was kept: the
            # medians of the refused ones, as a provisional view.
            for points, style, label in (
                (by_rate, "-", name),
                ({k: v for k, v in every_rate.items() if k not in by_rate}, "--", None),
            ):
                line = sorted(
                    (statistics.median(x for x, _ in pts), statistics.median(y for _, y in pts))
                    for pts in points.values()
                )
                if line:
                    axis.plot(
                        *zip(*line, strict=True),
                        color=colours[name],
                        linestyle=style,
                        label=label or f"{name} (refused steps only)",
                    )
        axis.axhline(P99_LIMIT_MS, color="grey", linestyle="--", linewidth=0.8)
        axis.set_yscale("log")
        axis.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_title(f"{clients:,} clients in {ROOMS} rooms")
        axis.set_xlabel("deliveries per second (achieved)")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("p99 publish-to-receive latency, ms (log)")
    axes[0].legend()
    figure.suptitle(
        "Delivery rate against p99 latency (median of rounds; x: step refused as load generator"
        " saturated)"
    )
    figure.tight_layout()
    path = images / "fanout-rate-p99.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_connections(results: dict[str, Any], images: Path, colours: dict[str, str]) -> Path:
    """Memory, broadcast and heartbeat latency, and the connect rate, against connections (the
    last point: the --max-connections step, on more workers)."""
    import matplotlib
    import matplotlib.pyplot as plt

    names: list[str] = results["systems"]
    rounds: list[dict[str, Any]] = results["rounds"]
    figure, axes = plt.subplots(2, 2, figsize=(11, 8.4))
    memory, latency, heartbeat, accepts = axes.flat
    for name in names:
        steps_by_count: dict[int, list[dict[str, Any]]] = {}
        for r in rounds:
            for count, step in r[name]["connections"].items():
                if "failed" not in step:
                    step = {**step, "rss_over_idle": _rss_over_idle(step, r[name])}
                    steps_by_count.setdefault(int(count), []).append(step)
        counts = sorted(steps_by_count)
        series: dict[str, list[float]] = {
            "rss": [],
            "last": [],
            "refused": [],
            "hb": [],
            "hb refused": [],
            "cps": [],
        }
        for count in counts:
            steps = steps_by_count[count]
            kept = [x for x in steps if not x["loadgen_saturated"]]
            lasts = [x["median_to_last_ms"] for x in kept if x["median_to_last_ms"] is not None]
            refused = [
                x["median_to_last_ms"]
                for x in steps
                if x["loadgen_saturated"] and x["median_to_last_ms"] is not None
            ]
            beats = [
                x["heartbeat"]
                for x in steps
                if x.get("heartbeat") and x["heartbeat"]["median_spread_ms"] is not None
            ]
            spreads = [b["median_spread_ms"] for b in beats if not b["loadgen_saturated"]]
            refused_spreads = [b["median_spread_ms"] for b in beats if b["loadgen_saturated"]]
            rates = [x["connect"]["connections_per_second"] for x in steps if x.get("connect")]
            series["rss"].append(statistics.median(x["rss_over_idle"] for x in steps) / 2**20)
            series["last"].append(_median_or_nan(lasts))
            series["refused"].append(_median_or_nan(refused) if not lasts else float("nan"))
            series["hb"].append(_median_or_nan(spreads))
            series["hb refused"].append(
                _median_or_nan(refused_spreads) if not spreads else float("nan")
            )
            series["cps"].append(_median_or_nan(rates))
        colour = colours[name]
        memory.plot(counts, series["rss"], marker="o", color=colour, label=name)
        latency.plot(counts, series["last"], marker="o", color=colour, label=name)
        heartbeat.plot(counts, series["hb"], marker="o", color=colour, label=name)
        accepts.plot(counts, series["cps"], marker="o", color=colour, label=name)
        for axis, key in ((latency, "refused"), (heartbeat, "hb refused")):
            if any(value == value for value in series[key]):  # not all NaN
                axis.plot(
                    counts,
                    series[key],
                    marker="x",
                    linestyle="none",
                    color=colour,
                    label=f"{name} (refused: provisional)",
                )
    memory.set_title("Server memory (RSS of all its processes) over idle")
    memory.set_ylabel("MiB")
    latency.set_title("One message to every connection: time to the last")
    latency.set_ylabel("ms, median of 20 messages (log)")
    heartbeat.set_title("Heartbeat: first client to last")
    heartbeat.set_ylabel("ms, median of the heartbeats (log)")
    accepts.set_title("New connections per second (connect, welcome, join)")
    accepts.set_ylabel("connections/s")
    for axis in (latency, heartbeat):
        axis.set_yscale("log")
        axis.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    workers = [
        step["workers"]
        for r in rounds
        for name in names
        for step in r[name]["connections"].values()
        if step.get("maximum")
    ]
    xlabel = "connections" + (f" (the last point: {max(workers)} workers)" if workers else "")
    for axis in axes.flat:
        axis.set_xscale("log")
        axis.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.set_xlabel(xlabel)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    path = images / "fanout-connections.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _rss_over_idle(step: dict[str, Any], figures: dict[str, Any]) -> float:
    """A step's RSS over the idle RSS of the system it ran on (older results have only the
    round's idle RSS, ``rss_before_bytes``)."""
    if "rss_over_idle_bytes" in step:
        return float(step["rss_over_idle_bytes"])
    return float(step["rss_bytes"] - figures["rss_before_bytes"])


def _median_or_nan(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--quick", action="store_true", help="3 s steps, no 10,000-connection scenario"
    )
    parser.add_argument("--duration", type=float, help="seconds per rate step (default 5, quick 3)")
    parser.add_argument(
        "--loadgen-processes",
        dest="processes",
        type=int,
        default=DEFAULT_PROCESSES,
        help=f"Node processes sharing the clients (default {DEFAULT_PROCESSES})",
    )
    parser.add_argument(
        "--systems",
        default="trio-fanout,socket.io",
        help="comma-separated, two of: " + ", ".join(SYSTEMS),
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="times a step refused as load generator saturated is tried again (default 2)",
    )
    parser.add_argument(
        "--quiet-limit",
        type=float,
        default=50.0,
        help="before a step, wait until other programs use less than this %% of the machine",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        help="... but at most this many seconds (default 20; 0: do not wait)",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help="comma-separated, some of: " + ", ".join(SCENARIOS) + " (default: all)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        help="clients of the connections scenario's last step, on a system started anew with "
        f"--max-workers workers; 0: no such step (default {DEFAULT_MAX_CONNECTIONS:,}, quick 0)",
    )
    parser.add_argument(
        "--max-workers",
        type=int,
        help="workers of each system at that step (default: one per "
        f"{CONNECTIONS_PER_WORKER:,} connections, at least 2)",
    )
    parser.add_argument(
        "--report", type=Path, help="print the table and draw the pictures of a results file"
    )
    parser.add_argument("--images", type=Path, default=IMAGES)
    args = parser.parse_args()
    if args.report:
        report(json.loads(args.report.read_text()), args.report, args.images)
        return
    if args.duration is None:
        args.duration = 3.0 if args.quick else 5.0
    args.heartbeat_window = QUICK_HEARTBEAT_WINDOW_S if args.quick else HEARTBEAT_WINDOW_S
    args.scenarios = args.scenarios.split(",")
    if not args.scenarios or any(name not in SCENARIOS for name in args.scenarios):
        parser.error(f"--scenarios takes some of {', '.join(SCENARIOS)}")
    if args.max_connections is None:
        args.max_connections = 0 if args.quick else DEFAULT_MAX_CONNECTIONS
    largest = max(QUICK_CONNECTION_COUNTS if args.quick else CONNECTION_COUNTS)
    if args.max_connections and args.max_connections <= largest:
        parser.error(f"--max-connections takes 0 or more than {largest:,}")
    if args.max_workers is None:
        args.max_workers = max(2, -(-args.max_connections // CONNECTIONS_PER_WORKER))
    if args.max_workers < 1:
        parser.error("--max-workers takes 1 or more")
    names = args.systems.split(",")
    if len(names) != 2 or any(name not in SYSTEMS for name in names):
        parser.error(f"--systems takes two of {', '.join(SYSTEMS)}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"compare-{time.strftime('%Y%m%d-%H%M%S')}.json"
    results: dict[str, Any] = {
        "systems": names,
        "config": {
            "rounds": args.rounds,
            "quick": args.quick,
            "duration_s": args.duration,
            "loadgen_processes": args.processes,
            "rate_steps": RATE_STEPS,
            "firehose_message_rates": FIREHOSE_MESSAGE_RATES,
            "firehose_clients": FIREHOSE_CLIENTS,
            "firehose_publishers": FIREHOSE_PUBLISHERS,
            "p99_limit_ms": P99_LIMIT_MS,
            "loadgen_cpu_limit_percent": CPU_LIMIT_PERCENT,
            "loadgen_lag_p99_limit_ms": LAG_P99_LIMIT_MS,
            "retries": args.retries,
            "quiet_limit_percent": args.quiet_limit,
            "quiet_wait_s": args.quiet_wait,
            "scenarios": args.scenarios,
            "max_connections": args.max_connections,
            "max_workers": args.max_workers,
            "heartbeat_window_s": args.heartbeat_window,
        },
        "rounds": [],
    }
    # A SIGTERM stops the run like Ctrl-C does: the servers it started are stopped too.
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    for number in range(args.rounds):
        order = names if number % 2 == 0 else names[::-1]
        this_round: dict[str, Any] = {}
        results["rounds"].append(this_round)
        for name in order:
            log(
                f"round {number + 1} of {args.rounds}: {name} "
                f"({(time.monotonic() - started) / 60:.1f} min so far)"
            )
            this_round[name] = run_system(name, args)
            path.write_text(json.dumps(results, indent=1))  # what is done so far survives a stop
            time.sleep(PAUSE_BETWEEN_SYSTEMS_S)
    results["summary"] = summarize(results["rounds"], names)
    path.write_text(json.dumps(results, indent=1))
    report(results, path, args.images)


def report(results: dict[str, Any], path: Path, images: Path) -> None:
    rows = summarize(results["rounds"], results["systems"])
    print_table(rows, results["systems"])
    print(f"\nmedians of {len(results['rounds'])} round(s); every figure in {path}")
    for image in plot(results, images):
        print(f"picture: {image}")


if __name__ == "__main__":
    main()
