"""The in-process backend (``memory://NAME``): every backplane opened with the same NAME in one
process shares one hub. It is the one named fake of the project, for tests and for embedding a
single worker; it crosses no process boundary.

The hub is also the topics' one sequencer: it numbers what is appended and keeps the history, by
the policy of the first backplane that opened the hub, measured with Trio's clock (so that tests
can run a topic's ttl out with an autojump clock). The history lives as long as the hub: when
the last backplane of that name closes, it is gone, and the next one starts new epochs."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from trio_fanout.backplane._interface import (
    Backplane,
    BackplaneUnavailable,
    History,
    HistoryPolicy,
    MessageQueue,
    Position,
    Received,
    check_history_query,
    check_topic,
)
from trio_fanout.backplane._sequencer import Sequencer

# How many undelivered messages one subscriber may hold before publishers to it are refused.
# The memory backend has no transport to push back on, so the bound is enforced here.
SUBSCRIBER_HIGH_WATER = 100_000


class _Hub:
    """The subscriptions of every memory backplane that shares one name."""

    def __init__(self, policy: HistoryPolicy) -> None:
        self.subscribers: dict[bytes, set[MemoryBackplane]] = {}
        self.members = 0
        self.sequencer = Sequencer(policy)


_hubs: dict[str, _Hub] = {}


class MemoryBackplane(Backplane):
    def __init__(self, hub: _Hub) -> None:
        self._hub = hub
        self._queue = MessageQueue(SUBSCRIBER_HIGH_WATER)
        self._subscriptions: Counter[bytes] = Counter()

    @property
    def unavailable_reason(self) -> str | None:
        return None  # no transport that could be down

    @property
    def sequencer(self) -> Sequencer:
        """The numbering and history this backplane shares with the others of its name."""
        return self._hub.sequencer

    async def publish(self, topic: bytes, payload: bytes) -> None:
        check_topic(topic)
        await trio.lowlevel.checkpoint()
        subscribers = self._deliverable(topic)
        for subscriber in subscribers:
            subscriber._queue.put(topic, payload)

    async def append(self, topic: bytes, payload: bytes) -> Position:
        check_topic(topic)
        await trio.lowlevel.checkpoint()
        subscribers = self._deliverable(topic)
        series = self._hub.sequencer.append(topic, payload, trio.current_time())
        position = Position(series.epoch, series.offset)
        for subscriber in subscribers:
            subscriber._queue.put(topic, payload, position)
        return position

    async def history(
        self, topic: bytes, since: Position | None = None, limit: int | None = None
    ) -> History:
        check_topic(topic)
        check_history_query(since, limit)
        await trio.lowlevel.checkpoint()
        return self._hub.sequencer.history(topic, since, limit, trio.current_time())

    def _deliverable(self, topic: bytes) -> set[MemoryBackplane] | tuple[()]:
        """The topic's subscribers, or raise if one of them could not take another message
        (checked before anything is numbered or delivered: refused means not sent)."""
        subscribers = self._hub.subscribers.get(topic, ())
        if any(len(subscriber._queue) >= SUBSCRIBER_HIGH_WATER for subscriber in subscribers):
            raise BackplaneUnavailable(f"a subscriber of {topic!r} is not keeping up")
        return subscribers

    async def subscribe(self, topic: bytes) -> None:
        check_topic(topic)
        await trio.lowlevel.checkpoint()
        self._subscriptions[topic] += 1
        self._hub.subscribers.setdefault(topic, set()).add(self)

    def unsubscribe(self, topic: bytes) -> None:
        if self._subscriptions[topic] <= 0:
            del self._subscriptions[topic]
            return  # like ZeroMQ: unsubscribing what was never subscribed does nothing
        self._subscriptions[topic] -= 1
        if self._subscriptions[topic] == 0:
            del self._subscriptions[topic]
            subscribers = self._hub.subscribers[topic]
            subscribers.discard(self)
            if not subscribers:
                del self._hub.subscribers[topic]

    async def receive_batch(self, max_messages: int | None = None) -> list[Received]:
        return await self._queue.take(max_messages)

    def _close(self) -> None:
        for topic in list(self._subscriptions):
            self._subscriptions[topic] = 1
            self.unsubscribe(topic)


@asynccontextmanager
async def open_memory_backplane(
    name: str, history: HistoryPolicy | None = None
) -> AsyncIterator[MemoryBackplane]:
    """Join the hub called ``name``; the first backplane to open it sets its history policy
    (the default policy if None), later ones share it."""
    hub = _hubs.get(name)
    if hub is None:
        hub = _hubs[name] = _Hub(history or HistoryPolicy())
    hub.members += 1
    backplane = MemoryBackplane(hub)
    try:
        yield backplane
    finally:
        backplane._close()
        hub.members -= 1
        if hub.members == 0:
            del _hubs[name]
