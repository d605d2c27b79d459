"""What the worker's check of each backplane message (``worker.relay_problem``) costs, per
message, for frames of 64 KiB and of a typical chat size. It is paid once per message, before
the fan-out, whatever the number of recipients.

    python bench/relay_check.py

Prints one line per frame shape: its size, and the microseconds per check (the best of 5 runs,
so that the figure is the machine's, not the neighbours').
"""

from __future__ import annotations

import functools
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from trio_fanout import protocol
from trio_fanout.worker import relay_problem

KIB = 1024


def largest_under_64_kib(make: Callable[[int], bytes]) -> bytes:
    """The largest frame ``make(count)`` that fits in 64 KiB."""
    count = 1
    while len(make(count * 2)) <= 64 * KIB:
        count *= 2
    while len(make(count + 1)) <= 64 * KIB:
        count += 1
    return make(count)


def frames() -> dict[str, bytes]:
    def objects(count: int) -> bytes:
        users = [{"id": i, "name": f"user{i}", "score": i / 3} for i in range(count)]
        return protocol.message_frame("room", users)

    return {
        "64 KiB, one ASCII string": largest_under_64_kib(
            lambda count: protocol.message_frame("room", "x" * count)
        ),
        "64 KiB, one non-ASCII string": largest_under_64_kib(
            lambda count: protocol.message_frame("room", "é" * count)
        ),
        "64 KiB, objects of numbers and strings": largest_under_64_kib(objects),
        "chat message": protocol.message_frame("lobby", {"user": "ann", "text": "hello there"}),
    }


def main() -> None:
    for name, frame in frames().items():
        assert relay_problem(frame) is None
        number = 200 if len(frame) > KIB else 100_000
        check = functools.partial(relay_problem, frame)
        best = min(timeit.repeat(check, number=number, repeat=5))
        print(f"{name:40} {len(frame):>7} bytes  {best / number * 1e6:8.1f} µs a message")


if __name__ == "__main__":
    main()
