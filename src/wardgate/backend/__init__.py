"""Key-value backends: pick one with open_backend(); everything above talks to `Backend` only."""

from __future__ import annotations

from wardgate.backend.base import Backend, Event, EventType, Item, Watcher
from wardgate.backend.memory import MemoryBackend, WatcherClosedError
from wardgate.backend.sqlite import SQLiteBackend
from wardgate.errors import BadParameterError

__all__ = [
    "Backend",
    "Event",
    "EventType",
    "Item",
    "MemoryBackend",
    "SQLiteBackend",
    "Watcher",
    "WatcherClosedError",
    "open_backend",
]

KINDS = ("sqlite", "memory")


def open_backend(kind: str, *, path: str | None = None) -> Backend:
    """Build the backend a config names; fails early with a message an operator can act on."""
    if kind == "sqlite":
        if not path:
            raise BadParameterError("the sqlite backend needs a path to its database file")
        return SQLiteBackend(path)
    if kind == "memory":
        return MemoryBackend()
    raise BadParameterError(
        f"unknown storage backend {kind!r}: choose one of {', '.join(KINDS)} "
        "(postgres arrives in a later release)"
    )
