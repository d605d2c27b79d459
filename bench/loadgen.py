"""The load generator of the fan-out benchmarks: several `node loadgen.mjs` processes that share
the clients, driven step by step, their reports merged. Not part of the test suite.

One process on a 2-core machine that also runs the server was the limit before the server was
(it parsed every delivery as JSON at up to 93 % of a core). So the clients are split over
several processes, a delivery is recognised by slicing a fixed-layout string out of the raw
frame, and every process reports its CPU and event-loop delay for every step. A step in which
any load-generator process used more than ``CPU_LIMIT_PERCENT`` of a core, or whose event loop
was late by more than ``LAG_P99_LIMIT_MS`` at the 99th percentile, is refused as "load generator
saturated": its latencies say more about the load generator than about the server, so it is
reported as such and never counted as the server's failure.

Publish-to-receive latency is measured across processes on CLOCK_MONOTONIC, which every process
on one machine shares.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

HERE = Path(__file__).resolve().parent

# A load-generator process busier than this share of one core is close to being the limit: its
# receive loop falls behind and its latencies grow by themselves.
CPU_LIMIT_PERCENT = 85.0
# Event-loop delay (beyond the monitor's own timer interval) at the 99th percentile above which a
# process's receive times are not to be trusted to the precision of a 100 ms p99 criterion.
LAG_P99_LIMIT_MS = 25.0
DEFAULT_PROCESSES = 2
# Clients per source address: one loopback address gives ~28,000 ephemeral ports towards one
# server port (net.ipv4.ip_local_port_range), and the kernel finds a free one the more slowly
# the fewer are left: 6,000 clients took 8.4 s to connect from an address whose last 6,000
# connections were in TIME_WAIT, 3.4 s from a fresh one. So each group of clients gets
# addresses of its own, and no address more than this many clients.
CLIENTS_PER_SOURCE_ADDRESS = 4000
# The source addresses handed out so far (see source_addresses): 127.0.1.1 onwards.
_addresses_given = 0
# Clients per load-generator process: a process may open 20,000 descriptors (ulimit -n), one
# per client; this leaves a margin for the rest.
CLIENTS_PER_PROCESS = 10_000
# Publishers a rate session may have in all: a datum carries its publisher's number in 3 digits
# (loadgen.mjs's PUBLISHER_DIGITS).
MAX_PUBLISHERS = 1000

CpuReader = Callable[[], tuple[float, float]]


class LoadGeneratorError(RuntimeError):
    """A load-generator process failed or said something unexpected."""


class LoadGenerator:
    """``processes`` Node processes holding ``clients`` clients of one session between them.

    ``session`` is ``rate`` (members in ``rooms`` rooms, ``publishers_per_room`` publishers in
    each, which share the room's message rate), ``broadcast`` (every member in one room, one
    publisher) or ``idle`` (connections that join nothing). Several publishers per room let a
    room's rate exceed what one connection can publish: trio-fanout handles a connection's
    publishes one at a time, each waiting for the backplane's answer.
    ``system`` is ``trio-fanout`` or ``socket.io`` (the protocol the clients speak).
    ``ca_file``: a PEM CA certificate against which a wss:// ``url`` is verified.
    """

    def __init__(
        self,
        system: str,
        url: str,
        session: str,
        clients: int,
        rooms: int = 1,
        publishers_per_room: int = 1,
        processes: int = DEFAULT_PROCESSES,
        ca_file: str | None = None,
        source_addresses: list[str] | None = None,
    ) -> None:
        if not 1 <= rooms * publishers_per_room <= MAX_PUBLISHERS:
            raise ValueError(
                f"1 to {MAX_PUBLISHERS} publishers in all, not {rooms} rooms x "
                f"{publishers_per_room} publishers"
            )
        self.clients = clients
        self.processes: list[subprocess.Popen[str]] = []
        try:
            for shard in range(processes):
                config: dict[str, Any] = {
                    "system": system,
                    "url": url,
                    "session": session,
                    "clients": clients,
                    "rooms": rooms,
                    "publishers_per_room": publishers_per_room,
                    "shard": shard,
                    "shards": processes,
                }
                if ca_file is not None:
                    config["ca_file"] = ca_file
                if source_addresses:
                    config["source_addresses"] = source_addresses
                self.processes.append(
                    subprocess.Popen(
                        ["node", str(HERE / "loadgen.mjs"), json.dumps(config)],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                )
            self.ready = self._read_all("ready")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def _send_all(self, command: dict[str, Any]) -> None:
        line = json.dumps(command) + "\n"
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.write(line)
            process.stdin.flush()

    def _read_all(self, event: str) -> list[dict[str, Any]]:
        answers = []
        for process in self.processes:
            assert process.stdout is not None
            line = process.stdout.readline()
            if not line:
                raise LoadGeneratorError(f"a load-generator process exited (waiting for {event})")
            answer = json.loads(line)
            if answer.get("event") != event:
                raise LoadGeneratorError(f"expected {event!r}, got {answer}")
            answers.append(answer)
        return answers

    def rate_step(self, deliveries: int, duration: float, server_cpu: CpuReader) -> dict[str, Any]:
        """Publish for ``duration`` s at ``deliveries`` deliveries a second in all; return the
        merged figures, the server's CPU over the step (from ``server_cpu``) included."""
        cpu_before = server_cpu()
        machine_before = _machine_cpu()
        self._send_all({"cmd": "rate", "deliveries": deliveries, "duration": duration})
        published = self._read_all("published")
        sent = [
            sum(column) for column in zip(*(answer["sent"] for answer in published), strict=True)
        ]
        self._send_all({"cmd": "expect", "sent": sent})
        steps = self._read_all("step")
        cpu_after = server_cpu()
        machine = _machine_cpu_percent(machine_before)
        histogram: dict[int, int] = {}
        for step in steps:
            for bucket, count in step["latency_buckets"]:
                histogram[bucket] = histogram.get(bucket, 0) + count
        bucket_ms = steps[0]["bucket_us"] / 1000
        received = sum(step["received"] for step in steps)
        publish_seconds = max(step["publish_seconds"] for step in steps)
        result: dict[str, Any] = {
            "target_deliveries_per_second": deliveries,
            "publishes": sum(sent),
            "expected": sum(step["expected"] for step in steps),
            "received": received,
            "lost": sum(step["lost"] for step in steps),
            "duplicated": sum(step["duplicated"] for step in steps),
            "reordered": sum(step["reordered"] for step in steps),
            "achieved_deliveries_per_second": received / publish_seconds,
            "p50_ms": _percentile(histogram, 50, bucket_ms),
            "p99_ms": _percentile(histogram, 99, bucket_ms),
            "max_ms": _percentile(histogram, 100, bucket_ms),
        }
        result.update(_server_cpu(cpu_before, cpu_after, received))
        result.update(_loadgen_usage(steps))
        result["machine_cpu_percent"] = machine
        return result

    def broadcast(self, messages: int, interval_ms: float, server_cpu: CpuReader) -> dict[str, Any]:
        """Publish ``messages`` messages to the room of every member, ``interval_ms`` apart; for
        each, the time from its publish to its arrival at the last member."""
        cpu_before = server_cpu()
        self._send_all({"cmd": "broadcast", "messages": messages, "interval_ms": interval_ms})
        steps = self._read_all("step")
        cpu_after = server_cpu()
        sent_at = dict(steps[0]["sent_at_ms"])
        count: dict[int, int] = {}
        last: dict[int, float] = {}
        for step in steps:
            for seq, (received, arrival) in step["arrivals"]:
                count[seq] = count.get(seq, 0) + received
                last[seq] = max(last.get(seq, 0.0), arrival)
        to_last = [
            last[seq] - at if count.get(seq, 0) >= self.clients else None
            for seq, at in sent_at.items()
        ]
        complete = sorted(value for value in to_last if value is not None)
        received = sum(count.values())
        result: dict[str, Any] = {
            "clients": self.clients,
            "messages": messages,
            "incomplete": len(to_last) - len(complete),
            "received": received,
            "to_last_ms": to_last,
            "median_to_last_ms": complete[len(complete) // 2] if complete else None,
        }
        result.update(_server_cpu(cpu_before, cpu_after, received))
        # The heartbeats that reached the members meanwhile cost the server CPU too: per frame
        # delivered, they count like the messages (each is one frame to every member).
        other = sum(step["other_frames"] for step in steps)
        result["other_frames"] = other
        result["server_cpu_us_per_frame"] = (
            result["server_cpu_seconds"] * 1e6 / max(received + other, 1)
        )
        result.update(_loadgen_usage(steps))
        return result

    def connect_rate(self) -> dict[str, Any]:
        """How fast the members connected (through their welcome and join): from the first
        process's start to the last one's end, with each process's CPU meanwhile."""
        connects = [answer["connect"] for answer in self.ready]
        seconds = (
            max(c["ended_ms"] for c in connects) - min(c["started_ms"] for c in connects)
        ) / 1000
        cpu = [
            100 * c["cpu_seconds"] / max((c["ended_ms"] - c["started_ms"]) / 1000, 1e-3)
            for c in connects
        ]
        connected = sum(c["connected"] for c in connects)
        return {
            "connected": connected,
            "connect_seconds": seconds,
            "connections_per_second": connected / max(seconds, 1e-3),
            "loadgen_cpu_percent_max": max(cpu),
            # All processes together over the whole connect, in % of one core.
            "loadgen_cpu_percent_total": 100
            * sum(c["cpu_seconds"] for c in connects)
            / max(seconds, 1e-3),
        }

    def heartbeats(self, seconds: float) -> dict[str, Any]:
        """The heartbeats that reach the members over the next ``seconds`` s (session
        ``broadcast``): for each, the spread from its first arrival at a member to its last, and
        the time from its send (the Unix time it carries, to the millisecond) to its last
        arrival. A heartbeat not received by every member is counted as incomplete."""
        now_ms = time.monotonic() * 1000
        wall_minus_monotonic_ms = time.time() * 1000 - now_ms
        self._send_all(
            {"cmd": "heartbeats", "from_ms": now_ms, "until_ms": now_ms + seconds * 1000}
        )
        answers = self._read_all("heartbeats")
        beats: dict[int, list[float]] = {}  # seq -> [received, first, last, sent at]
        for answer in answers:
            for seq, received, first, last, sent_at in answer["beats"]:
                beat = beats.setdefault(seq, [0, first, last, sent_at])
                beat[0] += received
                beat[1] = min(beat[1], first)
                beat[2] = max(beat[2], last)
        in_window = {
            seq: beat for seq, beat in beats.items() if now_ms <= beat[1] <= now_ms + seconds * 1000
        }
        complete = [beat for beat in in_window.values() if beat[0] >= self.clients]
        spreads = sorted(beat[2] - beat[1] for beat in complete)
        to_last = sorted(beat[2] + wall_minus_monotonic_ms - beat[3] * 1000 for beat in complete)
        result: dict[str, Any] = {
            "heartbeats": len(in_window),
            "heartbeats_incomplete": len(in_window) - len(complete),
            "spread_ms": spreads,
            "median_spread_ms": statistics.median(spreads) if spreads else None,
            "max_spread_ms": spreads[-1] if spreads else None,
            "median_sent_to_last_ms": statistics.median(to_last) if to_last else None,
        }
        result.update(_loadgen_usage(answers))
        return result

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None and process.stdin is not None:
                try:
                    process.stdin.write('{"cmd": "quit"}\n')
                    process.stdin.close()
                except BrokenPipeError:
                    pass
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()


def processes_for(clients: int, processes: int = DEFAULT_PROCESSES) -> int:
    """At least ``processes``, and enough that none holds more than CLIENTS_PER_PROCESS."""
    return max(processes, -(-clients // CLIENTS_PER_PROCESS))


def source_addresses(clients: int) -> list[str]:
    """Loopback source addresses for ``clients`` clients, none carrying more than
    CLIENTS_PER_SOURCE_ADDRESS, and none given out before in this run (127.0.1.1, 127.0.1.2,
    ...: the host part never 0 or 255)."""
    global _addresses_given
    addresses = []
    for _ in range(-(-clients // CLIENTS_PER_SOURCE_ADDRESS)):
        number = 256 * (1 + _addresses_given // 254) + 1 + _addresses_given % 254
        _addresses_given += 1
        addresses.append(f"127.{number >> 16 & 255}.{number >> 8 & 255}.{number & 255}")
    return addresses


def _machine_cpu() -> tuple[float, float]:
    """Busy and total CPU time of the whole machine so far, in clock ticks (/proc/stat)."""
    ticks = [int(field) for field in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle and iowait
    return sum(ticks) - idle, sum(ticks)


def wait_for_quiet(own_pids: list[int], limit_percent: float, timeout: float) -> float:
    """Wait, at most ``timeout`` s, until the programs other than ``own_pids`` use less than
    ``limit_percent`` of the machine (all cores) over one second; return the last figure.

    On a machine shared with other work, starting a step while something else is busy only buys
    a refused step; this wait is bounded, so a machine that never quietens down still gets its
    steps (and their refusals) rather than none.
    """
    deadline = time.monotonic() + timeout
    while True:
        machine_before = _machine_cpu()
        own_before = _process_ticks(own_pids)
        time.sleep(1)
        busy, total = _machine_cpu()
        own = _process_ticks(own_pids) - own_before
        others = 100 * (busy - machine_before[0] - own) / max(total - machine_before[1], 1)
        if others < limit_percent or time.monotonic() > deadline:
            return max(others, 0.0)


def measure_when_quiet(
    measure: Callable[[], dict[str, Any]],
    own_pids: list[int],
    *,
    retries: int,
    quiet_limit: float,
    quiet_wait: float,
    label: str,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run ``measure`` (one step) once the machine is quiet (:func:`wait_for_quiet`), and again,
    at most ``retries`` more times, while the step is refused as load generator saturated.

    Returns the last step, with the share of the machine other programs used before it, and
    the refused steps before it; each refusal is logged after ``label``.
    """
    refused: list[dict[str, Any]] = []
    for attempt in range(retries + 1):
        quiet = wait_for_quiet(own_pids, quiet_limit, quiet_wait)
        step = measure()
        step["others_cpu_percent_before"] = quiet
        if not step["loadgen_saturated"] or attempt == retries:
            return step, refused
        refused.append(step)
        log(f"{label}: refused, load generator saturated: {step['loadgen_saturated']}")
    raise AssertionError("unreachable: the last attempt returns")


def _process_ticks(pids: list[int]) -> int:
    """User + system clock ticks of ``pids`` (0 for one that is gone)."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks


def _machine_cpu_percent(before: tuple[float, float]) -> float:
    """How busy the machine was since ``before``, in % of all its cores: with the server's and
    the load generator's CPU, it tells how much else (other programs) ran during a step."""
    busy, total = _machine_cpu()
    return 100 * (busy - before[0]) / max(total - before[1], 1)


def _percentile(histogram: dict[int, int], p: float, bucket_ms: float) -> float | None:
    """The upper edge of the bucket holding the p-th percentile (p = 100: the maximum)."""
    total = sum(histogram.values())
    if not total:
        return None
    rank = max(1, -(-total * p // 100))
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= rank:
            return float((bucket + 1) * bucket_ms)
    raise AssertionError("unreachable: rank <= total")


def _server_cpu(
    before: tuple[float, float], after: tuple[float, float], deliveries: int
) -> dict[str, float]:
    user = after[0] - before[0]
    system = after[1] - before[1]
    per = 1e6 / max(deliveries, 1)
    return {
        "server_cpu_seconds": user + system,
        "server_cpu_us_per_delivery": (user + system) * per,
        "server_user_us_per_delivery": user * per,
        "server_system_us_per_delivery": system * per,
    }


def _loadgen_usage(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Each process's CPU and lag, the worst of them, and whether the step is refused."""
    usage = [
        {key: step[key] for key in ("cpu_percent", "lag_p50_ms", "lag_p99_ms", "lag_max_ms")}
        for step in steps
    ]
    cpu = max(item["cpu_percent"] for item in usage)
    lag = max(item["lag_p99_ms"] for item in usage)
    reasons = []
    if cpu > CPU_LIMIT_PERCENT:
        reasons.append(f"a process at {cpu:.0f} % of a core (limit {CPU_LIMIT_PERCENT:.0f} %)")
    if lag > LAG_P99_LIMIT_MS:
        reasons.append(f"event-loop delay p99 {lag:.0f} ms (limit {LAG_P99_LIMIT_MS:.0f} ms)")
    return {
        "loadgen_processes": usage,
        "loadgen_cpu_percent_max": cpu,
        "loadgen_cpu_percent_total": sum(item["cpu_percent"] for item in usage),
        "loadgen_lag_p99_ms_max": lag,
        "loadgen_saturated": "; ".join(reasons) or None,
    }


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
