"""The interface every backplane backend implements, and the errors it raises."""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator

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
    async def receive_batch(self, max_messages: int | None = None) -> list[tuple[bytes, bytes]]:
        """Wait for at least one message and return those that are ready (up to
        ``max_messages``), oldest first.

        Batches let a consumer do per-wake-up work (flushing sockets) once per batch instead of
        once per message.
        """

    @property
    @abc.abstractmethod
    def unavailable_reason(self) -> str | None:
        """Why this backplane cannot carry messages right now, or None while it can.

        It reports what the backend already knows (a connection down, a proxy that stopped
        answering its probes) and sends nothing, so it is cheap to ask. A worker's ``/healthz``
        shows it, so that a load balancer stops sending clients to a worker whose joins and
        publishes would fail. None is no promise: the next publish can still be refused.
        """

    @property
    def available(self) -> bool:
        """Whether the backplane can carry messages right now (see :attr:`unavailable_reason`)."""
        return self.unavailable_reason is None

    def __aiter__(self) -> Backplane:
        """Iterate ``(topic, payload)`` pairs one at a time while the backplane is open.

        Each step takes one message, so leaving the loop early leaves the rest for later; and
        the backplane is its own iterator (not an async generator), so it needs no closing.
        """
        return self

    async def __anext__(self) -> tuple[bytes, bytes]:
        (message,) = await self.receive_batch(1)
        return message


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

    async def take(self, max_messages: int | None = None) -> list[tuple[bytes, bytes]]:
        """Wait for a message; return all that are ready, or the oldest ``max_messages``."""
        while not self._messages:
            self._not_empty = trio.Event()
            await self._not_empty.wait()
        await trio.lowlevel.checkpoint()
        if max_messages is None or max_messages >= len(self._messages):
            batch, self._messages = self._messages, []
        else:
            batch = self._messages[:max_messages]
            del self._messages[:max_messages]
        if len(self._messages) < self.high_water:
            self._not_full.set()
        return batch


@contextlib.contextmanager
def unwrap_single_errors() -> Iterator[None]:
    """Let an exception raised inside a backend's nursery reach the caller as itself.

    A backend runs its reader in a nursery around the caller's ``async with`` block, and Trio
    wraps whatever leaves a nursery in an ExceptionGroup. The caller of ``open_backplane``
    should be able to write ``except BackplaneUnavailable`` (or see its own error unchanged),
    whichever backend the URL picked.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        if error is group:
            raise
        raise error from None
