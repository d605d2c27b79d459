"""What trio-fanout puts on the backplane: topics for rooms, and the envelope around a frame.

The payload of a backplane message is a fixed 24-byte header followed by the client frame, ready
to send. Receivers read the header with one ``unpack_from`` and never parse the frame's JSON.

header: origin (8 random bytes naming the publisher), seq (per publisher and topic, from 1),
exclude (the origin's connection id to leave out, for ``echo: false``; 0 for nobody).
"""

from __future__ import annotations

import hashlib
import os
import struct

import attrs

from trio_fanout.backplane._shrink import ShrinkWatch, rebuild_dict

_HEADER = struct.Struct(">8sQQ")
HEADER_SIZE = _HEADER.size

# Every worker subscribes to this topic; what is published there reaches every connection (the
# heartbeat, an emitter's broadcast). No room topic can equal it: room topics start with "r:".
BROADCAST_TOPIC = b"*"

# A publisher that has numbered this many topics starts numbering afresh, so that its counters
# stay bounded; receivers accept seq 1 as a restart, not as a gap.
MAX_NUMBERED_TOPICS = 100_000


# Bytes of the digest that names a room on the backplane: 128 bits make a collision between two
# room names as unlikely as a random UUID's.
ROOM_DIGEST_SIZE = 16


def room_topic(room: str) -> bytes:
    """The backplane topic of ``room``: ``r:`` and a fixed-size digest of its name.

    A fixed size keeps what a room costs on any backplane (the proxy's routing table, Redis's
    channel dictionary, each worker's subscriptions) independent of the length of its name. The
    name itself travels in the message frame, and each worker keeps it in its rooms.
    """
    digest = hashlib.blake2b(room.encode("utf-8"), digest_size=ROOM_DIGEST_SIZE).digest()
    return b"r:" + digest


def new_origin() -> bytes:
    return os.urandom(8)


class Numberer:
    """Numbers one publisher's messages per topic, so that receivers can count gaps."""

    def __init__(self, origin: bytes | None = None) -> None:
        self.origin = origin or new_origin()
        self._next_seq: dict[bytes, int] = {}

    def wrap(self, topic: bytes, frame: bytes, exclude: int = 0) -> bytes:
        """The backplane payload for ``frame`` published on ``topic``."""
        if len(self._next_seq) >= MAX_NUMBERED_TOPICS and topic not in self._next_seq:
            self._next_seq.clear()
        seq = self._next_seq.get(topic, 1)
        self._next_seq[topic] = seq + 1
        return _HEADER.pack(self.origin, seq, exclude) + frame


def unpack_header(payload: bytes) -> tuple[bytes, int, int]:
    """``(origin, seq, exclude)``; raises ``struct.error`` for a payload too short to hold one."""
    return _HEADER.unpack_from(payload)


# Publishers remembered per topic, the most recently heard kept. Honest publishers of a topic
# are few: one origin per worker process that publishes to it (a new one at each restart), one
# per emitter, the heartbeat's. 256 covers any real cluster several times over, while anyone
# who forges a new origin per message on the backplane grows a topic's record to this and no
# further (about 25 KiB: an 8-byte origin and its seq take about 100 bytes in the dict).
MAX_ORIGINS_PER_TOPIC = 256


@attrs.define
class GapCounter:
    """Per topic and publisher, the last seq seen; counts messages that never arrived.

    Each topic remembers its ``MAX_ORIGINS_PER_TOPIC`` most recently heard publishers; one
    forgotten and heard again starts afresh, as a new publisher does (no gap counted)."""

    missed: int = 0
    _last_seq: dict[bytes, dict[bytes, int]] = attrs.field(factory=dict)
    _shrink: ShrinkWatch = attrs.field(factory=ShrinkWatch)

    def observe(self, topic: bytes, origin: bytes, seq: int) -> int:
        """Record a message; return how many of this publisher's messages were skipped."""
        seen = self._last_seq.setdefault(topic, {})
        last = seen.pop(origin, None)  # re-inserted last: the dict's order is recency
        seen[origin] = seq
        if len(seen) > MAX_ORIGINS_PER_TOPIC:
            del seen[next(iter(seen))]  # the publisher heard least recently
        if last is None or seq == 1 or seq <= last + 1:
            return 0
        gap = seq - last - 1
        self.missed += gap
        return gap

    def forget(self, topic: bytes) -> None:
        """Stop tracking ``topic`` (we unsubscribed: later gaps would be our own doing)."""
        self._last_seq.pop(topic, None)
        if self._shrink.should_rebuild(len(self._last_seq)):
            rebuild_dict(self._last_seq)
