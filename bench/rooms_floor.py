"""What any CPython process gets back after 100,000 rooms have come and gone: the floor under
bench/rooms_memory.py, without Trio, sockets or the backplane.

Each "room" is what a worker keeps for one: a name of 200 characters (a new string, as a
parsed frame gives), a small slotted object holding it and a set of its one member, an entry in
a dict by an 18-byte topic, an entry in a counter of subscriptions and one in the member's set
of room names. Then every room is removed, in the order a leave removes it, and the process's
RSS is read before, with the rooms, and after (and after ``malloc_trim`` where it asks for it).

``--survivors N ...`` makes N small long-lived objects in between the rooms, evenly spread, as a
server makes while rooms are being joined (a log record, a resized table, a task's state); they
are still alive when the rooms are gone. Each configuration runs in a process of its own (the
allocator is chosen with ``PYTHONMALLOC`` at start-up). Not part of the test suite:

    python bench/rooms_floor.py                     # the table of every configuration
    python bench/rooms_floor.py --survivors 0 1000  # with these numbers of survivors
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import subprocess
import sys
from collections import Counter

ROOMS = 100_000
NAME_LENGTH = 200
TOPIC_LENGTH = 18  # "r:" and a 16-byte digest, as envelope.room_topic makes


class Room:
    __slots__ = ("members", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.members: set[Member] = set()


class Member:
    __slots__ = ("rooms",)

    def __init__(self) -> None:
        self.rooms: set[str] = set()


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    if name is not None:
        ctypes.CDLL(name).malloc_trim(0)


def one_run(rooms: int, survivors: int, trim: bool) -> dict[str, int]:
    """Make ``rooms`` rooms with ``survivors`` long-lived objects among them, remove the rooms;
    RSS in KiB at each step."""
    gc.disable()  # as in a worker: no full collection runs during a burst
    members = [Member() for _ in range(1000)]  # like the connections: made before the rooms
    table: dict[bytes, Room] = {}
    subscriptions: Counter[bytes] = Counter()
    kept: list[object] = []
    every = rooms // survivors if survivors else 0
    figures = {"before": rss_kib()}
    for number in range(rooms):
        name = f"{number:010d}-".ljust(NAME_LENGTH, "x")
        topic = number.to_bytes(8, "big").ljust(TOPIC_LENGTH, b"r")
        room = table[topic] = Room(name)
        member = members[number % len(members)]
        room.members.add(member)
        member.rooms.add(name)
        subscriptions[topic] += 1
        if every and number % every == every - 1:
            kept.append({"room": number, "at": float(number)})  # a small dict, a float: 2 blocks
    figures["rooms"] = rss_kib()
    for topic in list(table):
        room = table.pop(topic)
        for member in room.members:
            member.rooms.discard(room.name)
        del subscriptions[topic]
    del room, member, name, topic
    table = dict(table)  # what a table rebuilt once empty costs: nothing
    subscriptions = Counter(subscriptions)
    for member in members:
        member.rooms = set()
    figures["left"] = rss_kib()
    if trim:
        malloc_trim()
        figures["left, trimmed"] = rss_kib()
    assert len(kept) == survivors
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rooms", type=int, default=ROOMS)
    parser.add_argument(
        "--survivors", type=int, nargs="+", default=[0, 30, 300],
        help="long-lived objects made among the rooms: one run for each number given",
    )  # fmt: skip
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: one configuration
    args = parser.parse_args()
    if args.one is not None:
        survivors, trim = json.loads(args.one)
        print(json.dumps(one_run(args.rooms, survivors, trim)))
        return
    print(f"{args.rooms:,} rooms (names of {NAME_LENGTH} characters); RSS in MiB")
    print(f"{'allocator':<10}{'survivors':>10}{'before':>9}{'rooms':>9}{'left':>9}"
          f"{'trimmed':>9}{'kept':>9}{'kept, trimmed':>15}")  # fmt: skip
    for allocator in ("pymalloc", "malloc"):
        for survivors in args.survivors:
            env = dict(os.environ, PYTHONMALLOC=allocator)
            output = subprocess.run(
                [sys.executable, __file__, "--rooms", str(args.rooms),
                 "--one", json.dumps([survivors, True])],
                env=env, capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            figures = json.loads(output)
            kept = figures["left"] - figures["before"]
            kept_trimmed = figures["left, trimmed"] - figures["before"]
            print(
                f"{allocator:<10}{survivors:>10}"
                + "".join(f"{figures[key] / 1024:>9.1f}" for key in figures)
                + f"{kept / 1024:>9.1f}{kept_trimmed / 1024:>15.1f}"
            )


if __name__ == "__main__":
    main()
