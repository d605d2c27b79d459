"""The servers the fan-out benchmarks measure, each started on free loopback ports with two
workers, and what the benchmarks read of them from /proc. Not part of the test suite.

- ``TrioFanout``: `trio-fanout run --workers 2` (master with the embedded proxy and the
  heartbeat, two workers), rate limits lifted, an admin port (for the workers' send counters).
  Its processes: the master and the workers.
- ``SocketIO``: bench/socketio/server.mjs, a node:cluster primary with two Socket.IO 4.8 workers
  and the Redis adapter, on a redis-server started here. Its processes: the primary, the workers
  and that redis-server.

Both send a heartbeat to every client once a second, as each does by default.

Every process stays in the benchmark's own session (a process group of its own, so that it can
be stopped as one, but no new session): with the kernel's autogroup scheduling, each session
shares the CPU as one group, so a system in a session of its own would get a different share of
a busy machine from the load generator and from the other system than a system that is not.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
START_TIMEOUT = 30.0
SENDS_METRIC = "trio_fanout_socket_sends_total"
FRAMES_SENT_METRIC = "trio_fanout_frames_sent_total"
WORKER_SERVING = re.compile(r"worker \d+ \(pid (\d+)\) serving")
# /healthz requests, per worker, in which to find every worker's: the kernel gives each new
# connection to a worker by a hash of its addresses, so a few dozen reach them all.
HEALTHZ_TRIES_PER_WORKER = 25


class Server:
    """What the benchmarks need of a running system: where clients connect, and its processes."""

    name: str
    protocol: str  # what loadgen.mjs speaks to it: "trio-fanout" or "socket.io"
    url: str
    pids: list[int]

    def cpu_seconds(self, pids: list[int] | None = None) -> tuple[float, float]:
        """User and system CPU seconds so far of every process of the system, or of ``pids``."""
        user = system = 0
        for pid in self.pids if pids is None else pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            user += int(fields[11])
            system += int(fields[12])
        return user / CLOCK_TICKS, system / CLOCK_TICKS

    def rss_bytes(self) -> int:
        """Resident memory of every process of the system."""
        return sum(
            int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE for pid in self.pids
        )

    def gc_pauses(self) -> dict[int, dict[str, Any]] | None:
        """Each worker's garbage-collector pauses so far, by worker, where the system tells."""
        return None

    def send_counters(self) -> tuple[int, int] | None:
        """Socket sends and the frames they carried so far, all workers together; None for a
        system that does not count them."""
        return None

    def stop(self) -> None:
        raise NotImplementedError


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class TrioFanout(Server):
    """`trio-fanout run --workers 2` on free ports, with limits that do not get in the way;
    ``options`` are more command-line options (``--history-size 0``, ``--backplane URL``,
    ``--tls-cert-file``; with TLS, ``url`` is wss://).

    Workers the master starts later, in the place of one that died, are added to
    ``started_pids`` as its log announces them (history_bench.py kills one).
    """

    name = "trio-fanout"
    protocol = "trio-fanout"

    def __init__(
        self, workers: int = 2, heartbeat_interval: float = 1.0, options: tuple[str, ...] = ()
    ) -> None:
        env = dict(os.environ)
        env.update(
            TRIO_FANOUT_RATE_LIMIT_PER_SECOND="1000000",
            TRIO_FANOUT_RATE_LIMIT_BURST="1000000",
            TRIO_FANOUT_RATE_LIMIT_BYTES_PER_SECOND="1000000000",
            TRIO_FANOUT_RATE_LIMIT_BYTES_BURST="1000000000",
            TRIO_FANOUT_MAX_ROOMS_PER_CONNECTION="100",
            # A worker's own limit would refuse clients before the descriptors run out.
            TRIO_FANOUT_MAX_CONNECTIONS="100000",
        )
        self.admin_port = free_port()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trio_fanout",
                "run",
                "--workers",
                str(workers),
                "--port",
                "0",
                "--proxy-port",
                "0",
                "--heartbeat-interval",
                str(heartbeat_interval),
                "--admin-port",
                str(self.admin_port),
                *options,
            ],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
            process_group=0,
        )
        self.worker_pids: list[int] = []
        assert self.process.stderr is not None
        port = None
        scheme = "ws"
        for line in self.process.stderr:
            if match := re.search(r"listening on (wss?)://[\d.]+:(\d+)/ws", line):
                scheme, port = match.group(1), int(match.group(2))
            if match := WORKER_SERVING.search(line):
                self.worker_pids.append(int(match.group(1)))
            if len(self.worker_pids) == workers:
                break
        if port is None or len(self.worker_pids) < workers:
            self.stop()
            raise RuntimeError("trio-fanout run did not start")
        self.port = port
        self.url = f"{scheme}://127.0.0.1:{port}/ws"
        self.pids = [self.process.pid, *self.worker_pids]
        self.started_pids: list[int] = []
        # Keep reading its log so that a full pipe never stalls the master.
        threading.Thread(target=self._read_log, daemon=True).start()

    def gc_pauses(self) -> dict[int, dict[str, Any]] | None:
        """Each worker's `gc` figures from its /healthz (longest pause so far, p99 of its last
        1,000), asked on new connections until every worker has answered one."""
        figures: dict[int, dict[str, Any]] = {}
        workers = len(self.worker_pids)
        for _ in range(HEALTHZ_TRIES_PER_WORKER * workers):
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                connection.request("GET", "/healthz")
                health = json.load(connection.getresponse())
            finally:
                connection.close()
            figures[health["worker"]] = health["gc"]
            if len(figures) == workers:
                break
        return figures

    def send_counters(self) -> tuple[int, int]:
        """The workers' ``sends`` and ``frames_sent``, summed, from the admin port's /metrics."""
        url = f"http://127.0.0.1:{self.admin_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        totals = {SENDS_METRIC: 0.0, FRAMES_SENT_METRIC: 0.0}
        for line in text.splitlines():
            name = line.split("{", 1)[0]
            if name in totals:
                totals[name] += float(line.rsplit(" ", 1)[1])
        return int(totals[SENDS_METRIC]), int(totals[FRAMES_SENT_METRIC])

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            if match := WORKER_SERVING.search(line):
                self.started_pids.append(int(match.group(1)))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(15)


class SocketIO(Server):
    """bench/socketio/server.mjs (cluster of ``workers``) on a redis-server of its own."""

    name = "socket.io"
    protocol = "socket.io"

    def __init__(self, workers: int = 2) -> None:
        redis_port = free_port()
        self.redis = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            process_group=0,
        )
        self.cluster: subprocess.Popen[str] | None = None
        try:
            _wait_for_port(redis_port)
            port = free_port()
            env = dict(
                os.environ,
                PORT=str(port),
                WORKERS=str(workers),
                REDIS_URL=f"redis://127.0.0.1:{redis_port}",
            )
            self.cluster = subprocess.Popen(
                ["node", str(HERE / "socketio" / "server.mjs")],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
                process_group=0,
            )
            assert self.cluster.stdout is not None
            line = self.cluster.stdout.readline()
            if not line:
                raise RuntimeError(
                    "the Socket.IO cluster did not start (is `npm ci` done in bench/?)"
                )
            ready = json.loads(line)
            self.url = f"ws://127.0.0.1:{port}"
            # The official client must get what the load generator's raw frames expect.
            check = subprocess.run(["node", str(HERE / "socketio" / "check.mjs"), self.url])
            if check.returncode != 0:
                raise RuntimeError("the Socket.IO cluster failed its check with socket.io-client")
        except BaseException:
            self.stop()
            raise
        self.pids = [*ready["pids"], self.redis.pid]

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.terminate()
            try:
                self.cluster.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.cluster.pid, signal.SIGKILL)
                self.cluster.wait()
        self.redis.terminate()
        self.redis.wait(15)


class SendFloor(Server):
    """bench/send_floor.py: one Python process with no framework, one ``send`` per recipient.

    Not a system a user would pick: the least any server written in Python can spend per
    delivery when every delivery is its own ``send``, measured under the same load as the others.
    """

    name = "send-floor"
    protocol = "trio-fanout"

    def __init__(self) -> None:
        self._directory = tempfile.TemporaryDirectory()
        port_file = Path(self._directory.name) / "port"
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "send_floor.py"), str(port_file)],
            stdout=subprocess.DEVNULL,
            process_group=0,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not port_file.exists() or not port_file.read_text():
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise RuntimeError("send_floor.py did not start")
            time.sleep(0.05)
        self.url = f"ws://127.0.0.1:{port_file.read_text()}/ws"
        self.pids = [self.process.pid]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(15)
        self._directory.cleanup()


def _wait_for_port(port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


SYSTEMS: dict[str, type[Server]] = {"trio-fanout": TrioFanout, "socket.io": SocketIO}
