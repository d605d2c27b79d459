"""One sequencer's numbering and bounded history of its topics, without I/O: the memory backend
and the ZeroMQ proxy each hold one and give it the time.

Each topic has a series: an epoch (random, new whenever the numbering starts again), its latest
offset, and its newest ``policy.size`` payloads. The offsets of the kept payloads are contiguous
and end at the latest, so only payloads are stored.

Series are kept in a dict ordered by last append (an append moves its series to the end), which
makes both bounds cheap: series idle for longer than ``policy.ttl`` are at the front, and so
are the least recently appended ones that ``policy.max_bytes`` evicts first. An expired or
evicted series is forgotten whole, so the topic's next append starts a new epoch: a reader who
knew the old one finds out that it cannot recover.
"""

from __future__ import annotations

import itertools
import os
from collections import deque

from trio_fanout.backplane._interface import History, HistoryPolicy, Position

# What one kept message and one series cost beyond their payloads and topic, roughly (the bytes
# object's header, the deque's slot; the series object, its epoch, its dict entry). Counting
# them keeps many empty payloads or many topics bounded by max_bytes too.
MESSAGE_OVERHEAD_BYTES = 48
SERIES_OVERHEAD_BYTES = 400


def new_epoch() -> str:
    """16 hex characters of randomness: a fresh epoch never matches an earlier one."""
    return os.urandom(8).hex()


class Series:
    """One topic's numbering and kept payloads."""

    __slots__ = ("epoch", "kept_bytes", "last_append", "offset", "payloads")

    def __init__(self, now: float) -> None:
        self.epoch = new_epoch()
        self.offset = 0
        self.payloads: deque[bytes] = deque()
        self.kept_bytes = 0
        self.last_append = now

    @property
    def first_kept(self) -> int:
        """The offset of the oldest kept payload (latest + 1 when none is kept)."""
        return self.offset - len(self.payloads) + 1


class Sequencer:
    """The series of every topic one sequencer numbers, within ``policy``'s bounds."""

    def __init__(self, policy: HistoryPolicy) -> None:
        self.policy = policy
        self.series: dict[bytes, Series] = {}
        self.bytes = 0
        """What the kept series cost, as counted against ``policy.max_bytes``."""

    def append(self, topic: bytes, payload: bytes, now: float) -> Series:
        """Number ``payload``, keep it, and return its topic's series (its ``epoch`` and
        ``offset`` are the message's position)."""
        self.expire(now)
        series = self.series.pop(topic, None)
        if series is None:
            series = Series(now)
            self.bytes += len(topic) + SERIES_OVERHEAD_BYTES
        self.series[topic] = series  # now the most recently appended
        series.last_append = now
        series.offset += 1
        policy = self.policy
        if policy.size:
            cost = len(payload) + MESSAGE_OVERHEAD_BYTES
            series.payloads.append(payload)
            series.kept_bytes += cost
            self.bytes += cost
            if len(series.payloads) > policy.size:
                self._drop_oldest(series)
        if self.bytes > policy.max_bytes:
            self._evict(topic, series)
        return series

    def history(
        self, topic: bytes, since: Position | None, limit: int | None, now: float
    ) -> History:
        """Answer ``Backplane.history`` (whose docstring says what each argument does)."""
        self.expire(now)
        series = self.series.get(topic)
        if series is None:  # start the numbering, so that offset 0 of this epoch means something
            series = self.series[topic] = Series(now)
            self.bytes += len(topic) + SERIES_OVERHEAD_BYTES
            if self.bytes > self.policy.max_bytes:
                self._evict(topic, series)
        payloads, first = series.payloads, series.first_kept
        if since is None:
            count = len(payloads) if limit is None else min(limit, len(payloads))
            start, complete = len(payloads) - count, True
        elif since.epoch != series.epoch or not first - 1 <= since.offset <= series.offset:
            return History(series.epoch, series.offset, [], False)
        else:
            start = since.offset - first + 1
            remaining = len(payloads) - start
            count = remaining if limit is None else min(limit, remaining)
            complete = count == remaining
        messages = list(
            zip(
                itertools.count(first + start),
                itertools.islice(payloads, start, start + count),
                strict=False,
            )
        )
        return History(series.epoch, series.offset, messages, complete)

    def expire(self, now: float) -> int:
        """Forget the series not appended to for ``policy.ttl``; return how many."""
        deadline = now - self.policy.ttl
        expired = 0
        for series in self.series.values():
            if series.last_append > deadline:
                break  # ordered by last append: the rest are younger
            expired += 1
        if expired:
            for topic in list(itertools.islice(self.series, expired)):
                self._forget(topic)
        return expired

    def _drop_oldest(self, series: Series) -> None:
        cost = len(series.payloads.popleft()) + MESSAGE_OVERHEAD_BYTES
        series.kept_bytes -= cost
        self.bytes -= cost

    def _evict(self, topic: bytes, series: Series) -> None:
        """Back under max_bytes: forget the least recently appended other series first, then
        drop this one's oldest payloads (its numbering goes on)."""
        while self.bytes > self.policy.max_bytes and len(self.series) > 1:
            oldest = next(iter(self.series))
            if oldest == topic:
                break
            self._forget(oldest)
        while self.bytes > self.policy.max_bytes and series.payloads:
            self._drop_oldest(series)

    def _forget(self, topic: bytes) -> None:
        series = self.series.pop(topic)
        self.bytes -= len(topic) + SERIES_OVERHEAD_BYTES + series.kept_bytes
