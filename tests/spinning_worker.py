"""A worker process like those of `trio-fanout run`, whose ``authenticate`` hook never yields
for a request to ``/ws?spin``: a stand-in for application code that blocks the worker's loop.

tests/test_faults.py starts it under a real ``Supervisor``, with the same arguments and
configuration (JSON on standard input) the master gives ``python -m trio_fanout worker``.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys

import trio

from trio_fanout.config import Config
from trio_fanout.hooks import Hooks
from trio_fanout.runner import run_worker_process
from trio_fanout.websocket import Request


async def spin_on_request(request: Request) -> None:
    if request.query == "spin":
        while True:  # a busy loop that never reaches a checkpoint: the whole loop stops
            pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--config-from-stdin", action="store_true", required=True)
    args = parser.parse_args()
    config = Config.from_dict(json.load(sys.stdin))
    logging.basicConfig(level="INFO", stream=sys.stderr)
    listener = socket.socket(fileno=args.listen_fd)
    trio.run(
        lambda: run_worker_process(
            config,
            listener,
            index=args.index,
            control_fd=args.control_fd,
            hooks=Hooks(authenticate=spin_on_request),
        )
    )


if __name__ == "__main__":
    main()
