"""The master of ``trio-fanout run``: the listening socket, the workers, the proxy, the heartbeat.

The master owns one listening socket per worker, all on one port (``SO_REUSEPORT``: the kernel
spreads connections evenly over them), and starts each worker as a fresh Python process that
inherits its own (never a fork of a running Trio loop, never after a ``zmq.Context`` exists).
The master keeps every socket open, so that the connections waiting in a dead worker's socket are
not reset: its replacement, given the same socket, accepts them. It
restarts a worker that dies, with a growing pause when one keeps dying, and on SIGINT or SIGTERM
it asks every worker to close its clients with 1001, then stops the proxy and returns. On
SIGHUP it checks the TLS certificate and key files and, if they load, asks every worker to
reload them on its control channel (a signal sent to a worker still starting would kill it).

A worker gets its configuration as JSON on its standard input, never in its argv or
environment, where ``ps`` and ``/proc`` would show a password in the backplane URL to anyone on
the host; the master's own ``TRIO_FANOUT_*`` variables are left out of its environment too.
Secrets kept in files (``*_file`` settings) are read by each worker itself.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import attrs
import trio

from trio_fanout import control, envelope, protocol, steering, tokens
from trio_fanout.admin import AdminServer
from trio_fanout.backplane import (
    BackplaneError,
    Credentials,
    CurveProxyKeys,
    open_backplane,
    redact_url,
)
from trio_fanout.backplane.proxy import ZmqProxy
from trio_fanout.config import ENV_PREFIX, Config
from trio_fanout.metrics import NodeStats
from trio_fanout.runner import CONTROL_RECEIVE_BYTES, give_back_memory_forever, open_listeners
from trio_fanout.tls import ServerCertificate

logger = logging.getLogger(__name__)

# A worker that dies sooner than this after its start counts as failing again; each failure in a
# row doubles the pause before the next start, from the first to the longest.
STABLE_RUN_SECONDS = 10.0
FIRST_RESTART_PAUSE = 0.1
LONGEST_RESTART_PAUSE = 10.0

# How long workers get to close their clients after SIGTERM before they are killed.
WORKER_STOP_TIMEOUT = 4.0

# A new worker must answer its first liveness ping within this, and liveness_timeout applies
# only after that: starting Python and importing take a second or two, far more on a loaded
# machine, and a worker killed for a slow start would only start slowly again.
FIRST_ANSWER_TIMEOUT = 30.0

# How long a scrape or /api/info waits for a worker's answer; one that takes longer (stopped,
# or busy past this) is left out of that answer and shown as not up.
REQUEST_TIMEOUT = 2.0


def describe_exit(returncode: int) -> str:
    """How a worker ended, for the log: its exit code, or the signal that killed it."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:  # a real-time signal has no name
        name = f"signal {-returncode}"
    return f"was killed by {name}"


class WorkerLink:
    """The master's end of one worker's control channel (``trio_fanout.control``): it takes
    the worker's answers, notes when the last one came, and asks for reports."""

    def __init__(self, sock: trio.socket.SocketType, stdlib_sock: socket.socket) -> None:
        self.sock = sock
        self._stdlib_sock = stdlib_sock  # the same socket, read without waiting
        self._reader = control.AnswerReader()
        self.last_answer: float | None = None
        self.first_answer = trio.Event()  # the worker has answered once: it is starting up
        # Set while new connections go to other workers because this one is silent.
        self.steered_away = False
        self._asking = trio.Lock()  # one request at a time: one place for its answer
        self._asked: tuple[bytes, int] | None = None  # the kind and id of the question open
        self._request_ids = itertools.count(1)
        self._answer: bytes | None = None
        self._answered = trio.Event()
        self._broken = False

    def _take(self, data: bytes) -> None:
        if self._broken:
            return  # no answer counts any more: the liveness check replaces the worker
        try:
            answers = self._reader.feed(data)
        except control.ChannelBroken as error:
            logger.error("control channel: %s; the worker will be replaced", error)
            self._broken = True
            return
        for kind, request_id, body in answers:
            self.last_answer = trio.current_time()
            self.first_answer.set()
            # A late answer to a question given up on has another id: a sign of life only.
            if (kind, request_id) == self._asked:
                self._answer = body
                self._answered.set()

    def take_waiting_answers(self) -> None:
        """Take every answer already in the socket, without waiting for more."""
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while data := self._stdlib_sock.recv(CONTROL_RECEIVE_BYTES):
                self._take(data)

    async def take_answers(self) -> None:
        with contextlib.suppress(OSError):
            while data := await self.sock.recv(CONTROL_RECEIVE_BYTES):
                self._take(data)

    async def ask(self, kind: bytes) -> dict[str, Any] | None:
        """The worker's answer to request ``kind``, or None if it gave none in time (or is
        still starting)."""
        async with self._asking:
            request_id = next(self._request_ids) % control.REQUEST_ID_LIMIT
            self._asked, self._answer, self._answered = (kind, request_id), None, trio.Event()
            try:
                await self.sock.send(control.encode_request(kind, request_id))
                with trio.move_on_after(REQUEST_TIMEOUT):
                    await self._answered.wait()
            except OSError:
                return None
            finally:
                self._asked = None
        if not self._answer:
            return None
        try:
            answer: dict[str, Any] = json.loads(self._answer)
        except ValueError:
            logger.error("control channel: an answer that is not JSON")
            return None
        return answer


class Supervisor:
    """Keeps one live process running per worker index until told to stop.

    Each worker gets a control channel, a Unix socket pair of which the master keeps one end
    and the worker inherits the other. The master pings every ``liveness_interval`` seconds and
    the worker's Trio loop answers (``runner.answer_master``); a worker that answers nothing for
    ``liveness_timeout`` seconds is hung (stopped, or a task that never yields) and is killed,
    and restarted like any worker that dies. When the master dies, however it dies, its ends
    close and every worker reads end of file: no worker outlives its master.
    """

    def __init__(self, config: Config, listeners: list[socket.socket]) -> None:
        self._config = config
        self._listeners = listeners
        self.processes: dict[int, trio.Process] = {}
        self.links: dict[int, WorkerLink] = {}
        self.node = NodeStats()
        self._stopping = False
        # Positions (index - 1) of the workers that answer their pings: new connections go only
        # to their sockets while another is dead, starting or silent (steering.py).
        self._ready: set[int] = set()
        self._steering = True

    def _listener(self, index: int) -> socket.socket:
        return self._listeners[index - 1]

    def _set_ready(self, index: int, ready: bool) -> None:
        """Note whether worker ``index`` takes new connections, and steer them accordingly."""
        position = index - 1
        if (position in self._ready) == ready or not self._steering:
            return
        if ready:
            self._ready.add(position)
        else:
            self._ready.discard(position)
        try:
            steering.steer(self._listeners, self._ready)
        except OSError as error:
            self._steering = False
            logger.warning(
                "cannot steer new connections away from workers that are down (%s): the "
                "kernel spreads them over every worker's socket",
                error,
            )

    def _command(self, index: int, control_fd: int) -> list[str]:
        # -P: the current directory does not lead sys.path, so a token.py or a logging.py
        # beside the user's config cannot replace a standard module in the workers.
        return [
            sys.executable, "-P", "-m", "trio_fanout", "worker",
            "--index", str(index),
            "--listen-fd", str(self._listener(index).fileno()),
            "--control-fd", str(control_fd),
            "--config-from-stdin",
        ]  # fmt: skip

    async def _hand_config(self, process: trio.Process) -> None:
        """Write the configuration to the worker's standard input and close it."""
        assert process.stdin is not None
        with contextlib.suppress(trio.BrokenResourceError):  # it died: wait() tells how
            async with process.stdin:
                await process.stdin.send_all(json.dumps(self._config.to_dict()).encode())

    async def keep_running(self, index: int) -> None:
        failures = 0
        # At 0 from the first start, so that the first restart shows as an increase.
        self.node.restarts.setdefault(index, 0)
        while not self._stopping:
            # Both ends are non-inheritable: only this worker gets its end, through pass_fds.
            master_end, worker_end = socket.socketpair()
            with trio.socket.from_stdlib_socket(master_end) as control:
                with worker_end:
                    process = await trio.lowlevel.open_process(
                        self._command(index, worker_end.fileno()),
                        pass_fds=(self._listener(index).fileno(), worker_end.fileno()),
                        stdin=subprocess.PIPE,
                        env={
                            name: value
                            for name, value in os.environ.items()
                            if not name.startswith(ENV_PREFIX)
                        },
                    )
                self.processes[index] = process
                link = self.links[index] = WorkerLink(control, master_end)
                started = trio.current_time()
                async with trio.open_nursery() as watching:
                    watching.start_soon(self._hand_config, process)
                    watching.start_soon(self._kill_when_silent, index, process, link)
                    returncode = await process.wait()
                    watching.cancel_scope.cancel()
            self._set_ready(index, False)
            del self.processes[index]
            del self.links[index]
            if self._stopping:
                return
            self.node.restarts[index] += 1
            how = describe_exit(returncode)
            failures = failures + 1 if trio.current_time() - started < STABLE_RUN_SECONDS else 0
            pause = 0.0
            if failures:
                pause = min(FIRST_RESTART_PAUSE * 2 ** (failures - 1), LONGEST_RESTART_PAUSE)
            logger.warning(
                "worker %d (pid %d) %s; restarting it in %.1f s", index, process.pid, how, pause
            )
            await trio.sleep(pause)

    async def _kill_when_silent(
        self,
        index: int,
        process: trio.Process,
        link: WorkerLink,
    ) -> None:
        """Ping the worker on its control channel; SIGKILL it once it has answered nothing for
        ``liveness_timeout`` seconds (``FIRST_ANSWER_TIMEOUT`` until its first answer).

        Silence is judged only against the master's own clock running: answers already waiting
        in the socket are read before judging, and when the master's own sleep overshot by more
        than the interval (its loop was stalled, not the worker's), the silence clock starts
        again instead of blaming the worker for time the master did not see pass."""
        started = trio.current_time()
        interval, timeout = self._config.liveness_interval, self._config.liveness_timeout
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.take_answers)
            nursery.start_soon(self._ready_at_first_answer, index, link)
            try:
                while True:
                    await link.sock.send(control.PING)
                    asleep = trio.current_time()
                    await trio.sleep(interval)
                    now = trio.current_time()
                    if now - asleep > 2 * interval:
                        # This loop was stalled: the worker's silence was not observed.
                        started = now
                        if link.last_answer is not None:
                            link.last_answer = now
                        continue
                    link.take_waiting_answers()
                    if link.last_answer is None:
                        silent, limit = now - started, FIRST_ANSWER_TIMEOUT
                    else:
                        silent, limit = now - link.last_answer, timeout
                    self._note_silence(index, process, link, silent)
                    if silent >= limit:
                        logger.error(
                            "worker %d (pid %d) has answered no ping for %.1f s: killing it",
                            index, process.pid, silent,
                        )  # fmt: skip
                        process.kill()
                        return
            except OSError:
                return  # its end is closed: the worker is exiting, and wait() tells how
            finally:
                nursery.cancel_scope.cancel()

    async def _ready_at_first_answer(self, index: int, link: WorkerLink) -> None:
        """A new worker gets new connections as soon as it answers its first ping (it answers
        while it opens its backplane, just before it accepts), not at the next liveness check
        up to ``liveness_interval`` later."""
        await link.first_answer.wait()
        self._set_ready(index, True)

    def _note_silence(
        self, index: int, process: trio.Process, link: WorkerLink, silent: float
    ) -> None:
        """A worker that has answered is ready for new connections; one silent for half of
        ``liveness_timeout`` is not, until it answers again or is replaced: the connections the
        kernel would give it would wait in its socket."""
        if link.last_answer is None:
            return  # still starting: not ready yet
        was_ready = index - 1 in self._ready
        ready = silent < self._config.liveness_timeout / 2
        if was_ready and not ready:
            link.steered_away = True
            logger.warning(
                "worker %d (pid %d) has answered no ping for %.1f s: new connections go to the "
                "other workers",
                index, process.pid, silent,
            )  # fmt: skip
        elif ready and link.steered_away:
            link.steered_away = False
            logger.info("worker %d (pid %d) answers again: it gets new connections again",
                        index, process.pid)  # fmt: skip
        self._set_ready(index, ready)

    async def ask_workers(self, kind: bytes) -> list[dict[str, Any]]:
        """Every live worker's answer to request ``kind``, asked all at once; those that
        give none in time are left out."""
        answers: list[dict[str, Any]] = []

        async def ask_one(link: WorkerLink) -> None:
            if (answer := await link.ask(kind)) is not None:
                answers.append(answer)

        async with trio.open_nursery() as asking:
            for link in list(self.links.values()):
                asking.start_soon(ask_one, link)
        return sorted(answers, key=lambda answer: int(answer.get("worker", 0)))

    async def reload_all(self) -> None:
        """Ask every running worker to reload its TLS certificate (``control.RELOAD``) and log
        how many did. A worker still starting is not asked: it loads the files itself."""
        answers = await self.ask_workers(control.RELOAD)
        reloaded = [answer["worker"] for answer in answers if answer.get("reloaded")]
        logger.info(
            "TLS certificate reloaded by workers %s of %d",
            ", ".join(map(str, reloaded)) or "none", len(self.links),
        )  # fmt: skip

    async def stop_all(self) -> None:
        """SIGTERM every worker, wait for them, and kill those still running after the timeout."""
        self._stopping = True
        for process in self.processes.values():
            process.send_signal(signal.SIGTERM)
        with trio.move_on_after(WORKER_STOP_TIMEOUT):
            for process in list(self.processes.values()):
                await process.wait()
        for index, process in list(self.processes.items()):
            if process.returncode is not None:
                continue  # it exited in time; its keep_running task has not yet noted it
            logger.warning(
                "worker %d (pid %d) did not stop in time: killing it", index, process.pid
            )
            process.kill()
            await process.wait()


async def publish_heartbeats(
    backplane_url: str,
    interval: float,
    credentials: Credentials | None = None,
    node: NodeStats | None = None,
) -> None:
    """Publish ``{"type":"heartbeat"}`` to every connection every ``interval`` seconds.

    Through an outage of the backplane it keeps counting (clients see the gap in ``seq``) and
    keeps trying, so that a backplane that is down never takes the master down with it.
    """
    numberer = envelope.Numberer()
    seq = 0
    next_beat = trio.current_time()
    while True:
        try:
            async with open_backplane(backplane_url, credentials=credentials) as backplane:
                while True:
                    seq += 1
                    frame = protocol.heartbeat_frame(seq, round(time.time(), 3))
                    payload = numberer.wrap(envelope.BROADCAST_TOPIC, frame)
                    await backplane.publish(envelope.BROADCAST_TOPIC, payload)
                    if node is not None:
                        node.heartbeats_sent += 1
                    # Beats missed while the process was busy are skipped, not sent in a burst.
                    next_beat = max(next_beat + interval, trio.current_time())
                    await trio.sleep_until(next_beat)
        except BackplaneError as error:
            seq += 1  # this beat is lost: the count goes on, so that clients see the gap
            if node is not None:
                node.heartbeats_failed += 1
            logger.warning("heartbeat %d not sent: %s; trying again", seq, error)
            next_beat = max(next_beat + interval, trio.current_time())
            await trio.sleep_until(next_beat)


async def run_master(
    config: Config,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the whole cluster until SIGINT or SIGTERM; ``started`` reports the bound port.

    SIGHUP reloads the TLS certificate: the master loads the files first, and asks the workers
    to reload them only if they load, so that a bad file is reported once, here."""
    certificate = None
    if config.tls_cert_file is not None and config.tls_key_file is not None:
        certificate = ServerCertificate(config.tls_cert_file, config.tls_key_file)
    listeners = open_listeners(config.host, config.port, config.workers)
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                proxy: ZmqProxy | None = None
                if config.backplane is None:
                    proxy = ZmqProxy(
                        config.proxy_host,
                        config.proxy_port,
                        history=config.history_policy,
                        curve=proxy_keys(config),
                    )
                    proxy_port = await nursery.start(proxy.serve)
                    # Workers and the heartbeat meet at the port the proxy really bound, and
                    # with CURVE they are clients of the proxy's own key pair.
                    config = attrs.evolve(config, proxy_port=proxy_port, curve_server_key_file=None)
                # What uses the proxy (the workers, the heartbeat, the admin API) stops before
                # it, so that none of them sees the proxy go and says so.
                async with trio.open_nursery() as cluster:
                    supervisor = Supervisor(config, listeners)
                    if proxy is not None:
                        supervisor.node.proxy_stats = proxy.stats
                    if config.admin_port is not None:
                        admin = AdminServer(
                            config,
                            supervisor.node,
                            supervisor.ask_workers,
                            range(1, config.workers + 1),
                        )
                        await cluster.start(admin.serve)
                    # One heartbeat per backplane: an external ZeroMQ proxy (`trio-fanout proxy`)
                    # publishes its own, so a master on it does not.
                    external_proxy = (
                        config.backplane is not None and config.backplane.lower().startswith("zmq:")
                    )
                    if config.heartbeat_interval > 0 and not external_proxy:
                        cluster.start_soon(
                            publish_heartbeats,
                            config.backplane_url,
                            config.heartbeat_interval,
                            config.backplane_credentials,
                            supervisor.node,
                        )
                    for index in range(1, config.workers + 1):
                        cluster.start_soon(supervisor.keep_running, index)
                    cluster.start_soon(give_back_memory_forever)
                    host, port = listeners[0].getsockname()[:2]
                    logger.info(
                        "listening on %s://%s:%d/ws with %d workers, backplane %s",
                        "ws" if certificate is None else "wss",
                        host,
                        port,
                        config.workers,
                        redact_url(config.backplane_url),
                    )
                    logger.info("access: %s", describe_access(config))
                    task_status.started(port)
                    async for signum in signals:
                        if signum != signal.SIGHUP:
                            logger.info("%s: stopping", signal.Signals(signum).name)
                            break
                        if certificate is None:
                            logger.info("SIGHUP: TLS is not configured; nothing to reload")
                        elif certificate.reload():
                            await supervisor.reload_all()
                    await supervisor.stop_all()
                    cluster.cancel_scope.cancel()
                nursery.cancel_scope.cancel()
    finally:
        for listener in listeners:
            listener.close()
    logger.info("stopped")


def describe_access(config: Config) -> str:
    """Which access controls ``config`` puts in force, for the start of the log: tokens and
    their algorithm, origins, TLS, the connection limit, CURVE on a ZeroMQ backplane. Files
    are named by their path; no secret, no key is read into the text."""
    if config.token_secret_file is not None:
        access = [f"tokens required (HS256, token_secret_file {config.token_secret_file})"]
    elif config.token_public_key_file is not None:
        algorithm = tokens.read_public_key(config.token_public_key_file).algorithm
        access = [
            f"tokens required ({algorithm}, token_public_key_file {config.token_public_key_file})"
        ]
    else:
        access = ["no tokens"]
    if config.allowed_origins:
        access.append("allowed_origins " + ", ".join(config.allowed_origins))
    else:
        access.append("any origin")
    if config.tls_cert_file is not None:
        access.append(f"TLS (tls_cert_file {config.tls_cert_file})")
    else:
        access.append("no TLS")
    access.append(f"max_connections {config.max_connections} per worker")
    if config.backplane_url.lower().startswith("zmq:"):
        curve = "CURVE" if config.curve_secret_key_file is not None else "no CURVE"
        access.append(f"{curve} on the ZeroMQ backplane")
    return "; ".join(access)


async def _no_workers(kind: bytes) -> list[dict[str, Any]]:
    """What a proxy alone asks of its workers: it has none."""
    return []


def proxy_keys(config: Config) -> CurveProxyKeys | None:
    """The proxy's CURVE keys, if ``curve_secret_key_file`` turns CURVE on."""
    if config.curve_secret_key_file is None:
        return None
    return CurveProxyKeys.load(config.curve_secret_key_file, config.curve_allowed_keys_dir)


async def run_proxy(config: Config) -> None:
    """`trio-fanout proxy`: the ZeroMQ proxy and the heartbeat, until SIGINT or SIGTERM.

    Where workers run on several hosts, the proxy is the one process they all share, so the
    heartbeat (one publisher, one sequence) is published here.
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            proxy = ZmqProxy(
                config.proxy_host,
                config.proxy_port,
                history=config.history_policy,
                curve=proxy_keys(config),
            )
            port = await nursery.start(proxy.serve)
            nursery.start_soon(give_back_memory_forever)
            # The heartbeat and the API are clients of the proxy's own key pair (with CURVE).
            config = attrs.evolve(
                config, proxy_port=port, backplane=None, curve_server_key_file=None
            )
            node = NodeStats(proxy_stats=proxy.stats)
            if config.admin_port is not None:
                await nursery.start(AdminServer(config, node, _no_workers, ()).serve)
            if config.heartbeat_interval > 0:
                nursery.start_soon(
                    publish_heartbeats,
                    config.backplane_url,
                    config.heartbeat_interval,
                    config.backplane_credentials,
                    node,
                )
            async for signum in signals:
                logger.info("%s: stopping", signal.Signals(signum).name)
                break
            nursery.cancel_scope.cancel()
