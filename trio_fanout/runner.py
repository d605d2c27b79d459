"""Run a worker: embedded in an application's Trio program (:func:`serve`), or as a process of
its own with signals and a tie to its master (:func:`run_worker_process`)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
from collections.abc import Callable
from typing import Any

import trio

from trio_fanout import control, metrics
from trio_fanout.admin import AdminServer
from trio_fanout.backplane import open_backplane
from trio_fanout.backplane._shrink import give_back_freed_memory
from trio_fanout.config import Config
from trio_fanout.gcstats import GcPauses, freeze_survivors_forever, keep_pauses_short
from trio_fanout.hooks import Hooks
from trio_fanout.metrics import NodeStats
from trio_fanout.worker import Worker

logger = logging.getLogger(__name__)

# How often a process hands back to the system what glibc's heap keeps after frees. Under churn
# and steady traffic a worker's RSS grew about 1 MB a minute with a constant number of live
# Python objects and no cyclic garbage; malloc_trim(0) returned all of it: it was freed memory
# that the heap kept (fragmented), not a leak. A trim takes about 2 ms on a 150 MB heap, up to
# tens of ms when it has much to return, so once a minute, like a garbage collection.
GIVE_BACK_INTERVAL = 60.0

# The listen backlog: connections wait here while workers start or are busy; a fan-out server
# is opened by thousands of clients at once after a deploy. The kernel caps it at somaxconn.
LISTEN_BACKLOG = 4096

# Pings on the control channel are single bytes; a worker that was stopped for a while finds
# several waiting and answers them with one send.
CONTROL_RECEIVE_BYTES = 4096


def open_listener(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A non-blocking listening socket (``OSError`` if it cannot be bound). With
    ``reuse_port``, other sockets of this user may listen on the same port (``SO_REUSEPORT``)
    and the kernel spreads new connections over all of them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server(
        (host, port), family=family, backlog=LISTEN_BACKLOG, reuse_port=reuse_port
    )
    listener.setblocking(False)
    return listener


def open_listeners(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` listening sockets on one port, one per worker, among which the kernel spreads
    new connections evenly by a hash of their addresses (``SO_REUSEPORT``).

    One shared socket would let whichever worker wakes first take each connection: an idle one
    takes most of them, and a busy one almost none, so load follows readiness instead of being
    spread. Port 0 picks a free port.

    The port is first bound once without ``SO_REUSEPORT``, which fails if anything listens
    there, another ``trio-fanout run`` included: its sockets would otherwise share the port
    with ours and silently take half of the connections.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:  # say which port: the proxy's and the admin's fail alike
            raise OSError(error.errno, f"port {host}:{port}: {error.strerror}") from None
        free_port = probe.getsockname()[1]
    listeners: list[socket.socket] = []
    try:
        for _ in range(count):
            listeners.append(open_listener(host, free_port, reuse_port=True))
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    return listeners


async def serve(
    config: Config,
    *,
    hooks: Hooks | None = None,
    task_status: trio.TaskStatus[Worker] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve WebSocket clients on ``config.host:config.port`` inside your own Trio program.

    Use it with ``worker = await nursery.start(serve, config)``: ``started`` hands back the
    :class:`Worker` (``worker.port`` is the bound port). It runs until ``worker.stop()``, which
    closes every client with 1001 first, or until cancelled. The backplane is
    ``config.backplane_url``; ``hooks`` decide who may connect, join and publish.
    """
    listener = open_listener(config.host, config.port)
    try:
        async with open_backplane(
            config.backplane_url,
            history=config.history_policy,
            credentials=config.backplane_credentials,
        ) as backplane:
            worker = Worker(config, backplane, hooks=hooks)
            async with trio.open_nursery() as nursery:
                await nursery.start(worker.serve, listener)
                task_status.started(worker)
    finally:
        listener.close()


async def run_worker_process(
    config: Config,
    listener: socket.socket,
    *,
    index: int = 1,
    control_fd: int | None = None,
    hooks: Hooks | None = None,
    admin: bool = False,
) -> None:
    """Serve on ``listener`` until SIGINT/SIGTERM (graceful) or until the master is gone;
    reload the TLS certificate on SIGHUP, or when the master asks on the control channel
    (``control.RELOAD``).

    ``control_fd`` is this worker's end of its control channel to the master (see
    ``master.Supervisor``): :func:`answer_master` answers the master's liveness pings on it
    from this Trio loop, from before the backplane is opened until the process ends, and end of
    file on it means that the master is gone, however it died. With ``admin`` (a worker
    that runs alone, not one of a master's), it serves the admin port of ``config``.
    """
    master_gone = trio.Event()
    worker: Worker | None = None

    def report(kind: bytes) -> bytes:
        if worker is None:
            return b""  # still starting: it loads the TLS files itself
        if kind == control.RELOAD:
            reloaded = reload_tls(worker, "asked by the master")
            return json.dumps({"worker": worker.index, "reloaded": reloaded}).encode()
        if kind == control.INFO:
            return json.dumps(metrics.worker_info(worker)).encode()
        return json.dumps(metrics.worker_report(worker)).encode()

    async with trio.open_nursery() as controlling:
        if control_fd is not None:
            controlling.start_soon(
                answer_master, socket.socket(fileno=control_fd), master_gone, report
            )
        async with open_backplane(
            config.backplane_url,
            history=config.history_policy,
            credentials=config.backplane_credentials,
        ) as backplane:
            worker = Worker(config, backplane, index, hooks)
            worker.gc_pauses = GcPauses()
            worker.gc_pauses.install()
            keep_pauses_short()
            async with trio.open_nursery() as nursery:
                if admin and config.admin_port is not None:

                    async def ask_self(kind: bytes) -> list[dict[str, Any]]:
                        return [json.loads(report(kind))]

                    server = AdminServer(config, NodeStats(), ask_self, [index])
                    await nursery.start(server.serve)
                nursery.start_soon(freeze_survivors_forever)
                nursery.start_soon(give_back_memory_forever)
                nursery.start_soon(_stop_on_signal, worker)
                # Started (its handler installed) before the worker says it serves: a SIGHUP
                # sent after that line must reload, not kill the process.
                await nursery.start(_reload_on_signal, worker)
                nursery.start_soon(_stop_when_master_is_gone, master_gone, worker)
                await worker.serve(listener)
                nursery.cancel_scope.cancel()
        controlling.cancel_scope.cancel()
    logger.info("worker %d (pid %d) stopped", index, os.getpid())


async def give_back_memory_forever() -> None:
    """Every GIVE_BACK_INTERVAL, hand the memory that the C heap keeps after frees back to the
    system (see GIVE_BACK_INTERVAL)."""
    while True:
        await trio.sleep(GIVE_BACK_INTERVAL)
        give_back_freed_memory()


async def answer_master(
    channel: socket.socket, master_gone: trio.Event, report: Callable[[bytes], bytes]
) -> None:
    """Answer what the master sends on the control channel (``trio_fanout.control``): a
    ping with itself, a request with ``report(kind)``; set ``master_gone`` at end of file. It
    runs as a task of the worker's Trio loop, not on a thread, on purpose: a loop that is
    stuck (a task that never yields, a stopped process) answers nothing, and the master
    replaces the worker."""
    requests = control.RequestReader()
    with trio.socket.from_stdlib_socket(channel) as sock:
        try:
            while received := await sock.recv(CONTROL_RECEIVE_BYTES):
                answer = bytearray()
                for kind, request_id in requests.feed(received):
                    if kind == control.PING:
                        answer += kind
                    else:
                        answer += control.encode_answer(kind, request_id, report(kind))
                view = memoryview(answer)
                while view:
                    view = view[await sock.send(view) :]
        except OSError:
            pass  # the master's end is gone: the same news as end of file
        except control.ChannelBroken as error:
            # Silent from now on: the master finds the worker hung and replaces it.
            logger.error("control channel: %s; no more answers to the master", error)
            return
    master_gone.set()


# The signals that stop a worker gracefully.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


async def _stop_on_signal(worker: Worker) -> None:
    """Stop ``worker`` gracefully at the first SIGINT or SIGTERM, and ignore both from then on.

    Ctrl-C sends SIGINT to the whole process group, master and workers alike, and the master
    then sends each worker SIGTERM as well: that second signal must neither start a second
    stop nor, arriving once this task's receiver has put the default handlers back, kill the
    worker before it has closed its clients and said it stopped. A worker that hangs in its
    stop is still killed by its master (``WORKER_STOP_TIMEOUT``), and the drain is bounded.
    """
    stopping = False
    try:
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            async for signum in signals:
                if stopping:
                    continue  # one that came before the others were ignored
                stopping = True
                _ignore_stop_signals()
                logger.info(
                    "worker %d: %s, closing clients", worker.index, signal.Signals(signum).name
                )
                worker.stop()
    finally:
        if stopping:
            _ignore_stop_signals()  # leaving the receiver put the default handlers back


def _ignore_stop_signals() -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


async def _reload_on_signal(
    worker: Worker, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        task_status.started()
        async for _ in signals:
            reload_tls(worker, "SIGHUP")


def reload_tls(worker: Worker, why: str) -> bool:
    """Load the worker's TLS certificate and key again for the connections to come; keep the
    current ones if that fails (and log why). Whether it loaded them."""
    if worker.tls is None:
        logger.info("worker %d: asked to reload (%s), but TLS is not configured", worker.index, why)
        return False
    logger.info("worker %d: reloading the TLS certificate (%s)", worker.index, why)
    return worker.tls.reload()


async def _stop_when_master_is_gone(master_gone: trio.Event, worker: Worker) -> None:
    await master_gone.wait()
    logger.warning("worker %d: the master is gone; stopping", worker.index)
    worker.stop()
