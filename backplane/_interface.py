"""The interface every backplane backend implements, and the errors it raises."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator

import trio


class BackplaneError(Exception):
    """Base class of the errors this package raises on purpose."""


class BadBackplaneURL(BackplaneError, ValueError):
    """A backplane URL that no backend accepts; the message says what is wrong with it."""


class BackplaneUnavailable(BackplaneError):
    """The backplane cannot take this publish or subscription right now; nothing was sent."""


class Backplane(abc.ABC):
    """Topic-based publish/subscribe between processes.

    Topics and payloads are bytes; the backplane never looks inside a payload. A topic is matched
    exactly: callers that need prefix safety on a prefix-matching transport (ZeroMQ) get it from
    the backend, not by convention.

    Messages from one publisher on one topic arrive in the order they were published.
    """

    @abc.abstractmethod
    async def publish(self, topic: bytes, payload: bytes) -> None:
        """Hand one message to the backplane, or raise :class:`BackplaneUnavailable`."""

    @abc.abstractmethod
    async def subscribe(self, topic: bytes) -> None:
        """Start receiving ``topic``; on return the subscription is live end to end.

        Anything published on ``topic`` by anyone after this returns is received. Raises
        :class:`BackplaneUnavailable` when that cannot be established in time.
        Subscriptions are counted: each call needs its own :meth:`unsubscribe`.
        """

    @abc.abstractmethod
    def unsubscribe(self, topic: bytes) -> None:
        """Undo one :meth:`subscribe`; never blocks (the backend sends it when it can)."""

    @abc.abstractmethod
    async def receive_batch(self) -> list[tuple[bytes, bytes]]:
        """Wait for at least one message and return every one that is ready, oldest first.

        Batches let a consumer do per-wake-up work (flushing sockets) once per batch instead of
        once per message.
        """

    async def __aiter__(self) -> AsyncIterator[tuple[bytes, bytes]]:
        """Iterate ``(topic, payload)`` pairs one at a time while the backplane is open."""
        while True:
            for message in await self.receive_batch():
                yield message


def check_topic(topic: bytes) -> None:
    """Refuse topics that no backend can carry faithfully, the same way for every backend."""
    if not isinstance(topic, bytes) or not topic:
        raise ValueError(f"a topic is non-empty bytes, not {topic!r}")


class MessageQueue:
    """The messages a backend has received and its consumer has not yet taken.

    One producer (the backend's reader) and one consumer (:meth:`Backplane.receive_batch`).
    The producer stops producing when the queue holds ``high_water`` messages, which hands
    backpressure to the transport instead of growing memory without bound.
    """

    def __init__(self, high_water: int) -> None:
        self.high_water = high_water
        self._messages: list[tuple[bytes, bytes]] = []
        self._not_empty = trio.Event()
        self._not_full = trio.Event()
        self._not_full.set()

    def __len__(self) -> int:
        return len(self._messages)

    def put(self, topic: bytes, payload: bytes) -> None:
        self._messages.append((topic, payload))
        self._not_empty.set()
        if len(self._messages) >= self.high_water:
            self._not_full = trio.Event()

    async def wait_not_full(self) -> None:
        await self._not_full.wait()

    async def take_all(self) -> list[tuple[bytes, bytes]]:
        while not self._messages:
            self._not_empty = trio.Event()
            await self._not_empty.wait()
        await trio.lowlevel.checkpoint()
        batch, self._messages = self._messages, []
        self._not_full.set()
        return batch
