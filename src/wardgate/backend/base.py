"""The key-value backend contract every store implements (SQLite, memory, later Postgres).

Keys are "/"-separated strings ("/users/alice"); values are opaque bytes. Every write gets a
revision from one counter that only grows, so watchers can resume and CAS can compare. Items
may carry an expiry (unix seconds); an expired item is invisible to reads and its removal is
delivered to watchers as a delete event.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from wardgate.errors import AlreadyExistsError, CompareFailedError, NotFoundError

__all__ = [
    "AlreadyExistsError",
    "Backend",
    "CompareFailedError",
    "Event",
    "EventType",
    "Item",
    "NotFoundError",
    "Watcher",
]


@dataclass(frozen=True, slots=True)
class Item:
    key: str
    value: bytes
    revision: int = 0
    expires: float | None = None


class EventType(enum.StrEnum):
    INIT = "init"
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class Event:
    type: EventType
    item: Item | None = None
    """None for INIT; for DELETE an Item with the key, empty value and the deleting revision."""


class Watcher(abc.ABC):
    """An async iterator of events for some key prefixes; the first event is always INIT.

    Use as `async with backend.watch(["/roles/"]) as w: async for ev in w: ...`. Events after
    INIT are every change with a revision newer than the moment the watch began, in revision
    order. A watcher that falls too far behind is closed; the consumer re-watches and re-reads.
    """

    @abc.abstractmethod
    def __aiter__(self) -> AsyncIterator[Event]: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> Watcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Backend(abc.ABC):
    """Async key-value store with revisions, TTLs and watches."""

    @abc.abstractmethod
    async def get(self, key: str) -> Item:
        """Raise NotFoundError when missing or expired."""

    @abc.abstractmethod
    async def put(self, key: str, value: bytes, *, expires: float | None = None) -> Item:
        """Create or overwrite; returns the stored item with its new revision."""

    @abc.abstractmethod
    async def create(self, key: str, value: bytes, *, expires: float | None = None) -> Item:
        """Write only if absent (an expired item counts as absent); else AlreadyExistsError."""

    @abc.abstractmethod
    async def compare_and_swap(
        self, key: str, expected_revision: int, value: bytes, *, expires: float | None = None
    ) -> Item:
        """Overwrite only if the current revision matches; CompareFailedError if not,
        NotFoundError if the key is gone."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Remove a key; NotFoundError when missing."""

    @abc.abstractmethod
    async def delete_range(self, prefix: str) -> int:
        """Remove every key under prefix; returns how many."""

    @abc.abstractmethod
    async def range(self, prefix: str, *, limit: int | None = None) -> list[Item]:
        """Live items whose key starts with prefix, ordered by key."""

    @abc.abstractmethod
    def watch(self, prefixes: Sequence[str]) -> Watcher:
        """Start watching; see Watcher."""

    @abc.abstractmethod
    async def close(self) -> None: ...
