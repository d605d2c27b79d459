"""Run one worker in this process: its backplane, its signals, and its tie to the master."""

from __future__ import annotations

import logging
import os
import signal
import socket

import trio

from backplane import open_backplane
from trio_fanout.config import Config
from trio_fanout.worker import Worker

logger = logging.getLogger(__name__)


async def run_worker(
    config: Config,
    backplane_url: str,
    listener: socket.socket,
    *,
    index: int = 1,
    parent_fd: int | None = None,
) -> None:
    """Serve on ``listener`` until SIGINT/SIGTERM (graceful) or until the master is gone.

    ``parent_fd`` is the read end of a pipe whose write end only the master holds: it becomes
    readable (end of file) when the master dies, however it dies, so no worker outlives it.
    """
    async with open_backplane(backplane_url) as backplane:
        worker = Worker(config, backplane, index)
        async with trio.open_nursery() as nursery:
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
