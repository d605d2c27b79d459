"""Run a worker: embedded in an application's Trio program (:func:`serve`), or as a process of
its own with signals and a tie to its master (:func:`run_worker_process`)."""

from __future__ import annotations

import logging
import os
import signal
import socket

import trio

from trio_fanout.backplane import open_backplane
from trio_fanout.config import Config
from trio_fanout.gcstats import GcPauses, freeze_survivors_forever, keep_pauses_short
from trio_fanout.hooks import Hooks
from trio_fanout.worker import Worker

logger = logging.getLogger(__name__)

# The environment variable through which the master hands a worker its configuration (JSON).
WORKER_CONFIG_VARIABLE = "_TRIO_FANOUT_WORKER_CONFIG"

# The listen backlog: connections wait here while workers start or are busy; a fan-out server
# is opened by thousands of clients at once after a deploy. The kernel caps it at somaxconn.
LISTEN_BACKLOG = 4096


def open_listener(host: str, port: int) -> socket.socket:
    """A non-blocking listening socket (``OSError`` if it cannot be bound)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, port), family=family, backlog=LISTEN_BACKLOG)
    listener.setblocking(False)
    return listener


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
        async with open_backplane(config.backplane_url) as backplane:
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
    parent_fd: int | None = None,
) -> None:
    """Serve on ``listener`` until SIGINT/SIGTERM (graceful) or until the master is gone.

    ``parent_fd`` is the read end of a pipe whose write end only the master holds: it becomes
    readable (end of file) when the master dies, however it dies, so no worker outlives it.
    """
    async with open_backplane(config.backplane_url) as backplane:
        worker = Worker(config, backplane, index)
        worker.gc_pauses = GcPauses()
        worker.gc_pauses.install()
        keep_pauses_short()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(freeze_survivors_forever)
            nursery.start_soon(_stop_on_signal, worker)
            if parent_fd is not None:
                nursery.start_soon(_stop_when_master_exits, parent_fd, worker)
            await worker.serve(listener)
            nursery.cancel_scope.cancel()
    logger.info("worker %d (pid %d) stopped", index, os.getpid())


async def _stop_on_signal(worker: Worker) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            logger.info("worker %d: %s, closing clients", worker.index, signal.Signals(signum).name)
            worker.stop()


async def _stop_when_master_exits(parent_fd: int, worker: Worker) -> None:
    await trio.lowlevel.wait_readable(parent_fd)
    logger.warning("worker %d: the master is gone; stopping", worker.index)
    worker.stop()
