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
import math
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

    __slots__ = ("epoch", "epoch_bytes", "kept_bytes", "last_append", "offset", "payloads")

    def __init__(self, now: float) -> None:
        self.epoch = new_epoch()
        self.epoch_bytes = self.epoch.encode()  # what the ZeroMQ proxy sends, encoded once
        self.offset = 0
        self.payloads: deque[bytes] = deque()
        self.kept_bytes = 0
        self.last_append = now

    @property
    def first_kept(self) -> int:
        """The offset of the oldest kept payload (latest + 1 when none is kept)."""
        return self.offset - len(self.payloads) + 1


class Sequencer:
    """The series of every topic one sequencer numbers, within ``policy``'s bounds.

    :meth:`append` is on the path of every numbered message (in the ZeroMQ proxy, of the whole
    cluster's), so it does as little as it can: expiry is looked at only once the oldest series
    may be due.
    """

    def __init__(self, policy: HistoryPolicy) -> None:
        self.policy = policy
        self.series: dict[bytes, Series] = {}
        self.bytes = 0
        """What the kept series cost, as counted against ``policy.max_bytes``."""
        self._size = policy.size
        self._max_bytes = policy.max_bytes
        self._expiry_due = math.inf  # no series can have expired before this time

    def append(self, topic: bytes, payload: bytes, now: float) -> Series:
        """Number ``payload``, keep it, and return its topic's series (its ``epoch`` and
        ``offset`` are the message's position)."""
        if now >= self._expiry_due:
            self.expire(now)
        series = self.series.pop(topic, None)
        if series is None:
            series = self._start(topic, now)
        self.series[topic] = series  # now the most recently appended
        series.last_append = now
        series.offset += 1
        if self._size:
            payloads = series.payloads
            payloads.append(payload)
            cost = len(payload) + MESSAGE_OVERHEAD_BYTES
            series.kept_bytes += cost
            self.bytes += cost
            if len(payloads) > self._size:
                self._drop_oldest(series)
        if self.bytes > self._max_bytes:
            self._evict(topic, series)
        return series

    def _start(self, topic: bytes, now: float) -> Series:
        """A new series for ``topic`` (the caller puts it in ``self.series``)."""
        self.bytes += len(topic) + SERIES_OVERHEAD_BYTES
        self._expiry_due = min(self._expiry_due, now + self.policy.ttl)
        return Series(now)

    def history(
        self, topic: bytes, since: Position | None, limit: int | None, now: float
    ) -> History:
        """Answer ``Backplane.history`` (whose docstring says what each argument does)."""
        self.expire(now)
        series = self.series.get(topic)
        if series is None:  # start the numbering, so that offset 0 of this epoch means something
            series = self.series[topic] = self._start(topic, now)
            if self.bytes > self._max_bytes:
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
        ttl = self.policy.ttl
        expired = 0
        self._expiry_due = math.inf
        for series in self.series.values():
            if series.last_append + ttl > now:
                self._expiry_due = series.last_append + ttl
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
        while self.bytes > self._max_bytes and len(self.series) > 1:
            oldest = next(iter(self.series))
            if oldest == topic:
                break
            self._forget(oldest)
        while self.bytes > self._max_bytes and series.payloads:
            self._drop_oldest(series)

    def _forget(self, topic: bytes) -> None:
        series = self.series.pop(topic)
        self.bytes -= len(topic) + SERIES_OVERHEAD_BYTES + series.kept_bytes
