"""An in-process backend for unit tests of the layers above; same contract as SQLite, no disk.

Also home of the queue-based Watcher both backends hand out, and of WatcherClosedError, which
ends a watcher's iteration when it fell too far behind (a plain close() just ends it).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence

from wardgate.backend.base import Backend, Event, EventType, Item, Watcher
from wardgate.errors import AlreadyExistsError, CompareFailedError, NotFoundError, WardgateError

__all__ = ["MAX_PENDING_EVENTS", "MemoryBackend", "QueueWatcher", "WatcherClosedError"]

log = logging.getLogger(__name__)

MAX_PENDING_EVENTS = 10_000
"""A watcher holding more undelivered events than this is closed rather than growing forever."""


class WatcherClosedError(WardgateError):
    """The watcher was dropped because it fell behind; re-watch, then re-read what you cache."""

    status = 503
    code = "watcher_closed"


class QueueWatcher(Watcher):
    """A watcher fed by its backend through push(); INIT is queued first.

    Subclasses may override _start() to do async set-up (e.g. fixing the start revision)
    before INIT is handed out.
    """

    def __init__(
        self,
        prefixes: Sequence[str],
        *,
        on_close: Callable[[QueueWatcher], None] | None = None,
        max_pending: int | None = None,
    ) -> None:
        if isinstance(prefixes, str):
            raise TypeError("watch() takes a list of prefixes, not a single string")
        self.prefixes: tuple[str, ...] = tuple(prefixes) or ("",)
        self._match_all = "" in self.prefixes
        self._queue: deque[Event] = deque([Event(EventType.INIT)])
        self._wakeup = asyncio.Event()
        self._on_close = on_close
        self._max_pending = MAX_PENDING_EVENTS if max_pending is None else max_pending
        self._started = False
        self._closed = False
        self._error: WatcherClosedError | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    def matches(self, key: str) -> bool:
        return self._match_all or key.startswith(self.prefixes)

    def push(self, event: Event) -> None:
        """Queue an event already known to be in range; overflows close the watcher."""
        if self._closed:
            return
        if len(self._queue) >= self._max_pending:
            self.fail(WatcherClosedError(f"watcher fell more than {self._max_pending} events behind"))
            return
        self._queue.append(event)
        self._wakeup.set()

    def fail(self, error: WatcherClosedError) -> None:
        """Drop what is queued and end iteration with error; the consumer must resync anyway."""
        if self._closed:
            return
        self._error = error
        self._queue.clear()
        self._shut()

    async def _start(self) -> None:
        """Hook run once before INIT is delivered."""

    def __aiter__(self) -> QueueWatcher:
        return self

    async def __anext__(self) -> Event:
        if not self._started:
            self._started = True
            if not self._closed:
                await self._start()
        while True:
            if self._queue:
                return self._queue.popleft()
            if self._error is not None:
                raise self._error
            if self._closed:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()

    async def close(self) -> None:
        self._queue.clear()
        self._shut()

    def _shut(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wakeup.set()
        if self._on_close is not None:
            self._on_close(self)


class MemoryBackend(Backend):
    """Dict-backed store; all work happens on the event loop thread, so no locks are needed."""

    def __init__(self, *, clock: Callable[[], float] = time.time, reap_interval: float = 1.0) -> None:
        self._clock = clock
        self._reap_interval = reap_interval
        self._items: dict[str, Item] = {}
        self._keys: list[str] = []  # sorted, for prefix ranges
        self._revision = 0
        self._watchers: set[QueueWatcher] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._closed = False

    # ---- helpers

    def _check_open(self) -> None:
        if self._closed:
            raise WardgateError("backend is closed")
        if self._reaper is None:
            with contextlib.suppress(RuntimeError):  # no running loop: start on a later call
                self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())

    def _live(self, key: str) -> Item | None:
        item = self._items.get(key)
        if item is None or (item.expires is not None and item.expires <= self._clock()):
            return None
        return item

    def _emit(self, event: Event) -> None:
        assert event.item is not None
        for w in list(self._watchers):
            if w.matches(event.item.key):
                w.push(event)

    def _store(self, key: str, value: bytes, expires: float | None) -> Item:
        self._revision += 1
        item = Item(key, bytes(value), self._revision, expires)
        if key not in self._items:
            bisect.insort(self._keys, key)
        self._items[key] = item
        self._emit(Event(EventType.PUT, item))
        return item

    def _remove(self, key: str) -> None:
        del self._items[key]
        del self._keys[bisect.bisect_left(self._keys, key)]
        self._revision += 1
        self._emit(Event(EventType.DELETE, Item(key, b"", self._revision)))

    def _keys_under(self, prefix: str) -> list[str]:
        start = bisect.bisect_left(self._keys, prefix)
        end = start
        while end < len(self._keys) and self._keys[end].startswith(prefix):
            end += 1
        return self._keys[start:end]

    # ---- Backend

    async def get(self, key: str) -> Item:
        self._check_open()
        item = self._live(key)
        if item is None:
            raise NotFoundError(f"key {key!r} not found")
        return item

    async def put(self, key: str, value: bytes, *, expires: float | None = None) -> Item:
        self._check_open()
        return self._store(key, value, expires)

    async def create(self, key: str, value: bytes, *, expires: float | None = None) -> Item:
        self._check_open()
        if self._live(key) is not None:
            raise AlreadyExistsError(f"key {key!r} already exists")
        return self._store(key, value, expires)

    async def compare_and_swap(
        self, key: str, expected_revision: int, value: bytes, *, expires: float | None = None
    ) -> Item:
        self._check_open()
        current = self._live(key)
        if current is None:
            raise NotFoundError(f"key {key!r} not found")
        if current.revision != expected_revision:
            raise CompareFailedError(
                f"key {key!r} changed (revision {current.revision}, expected {expected_revision})"
            )
        return self._store(key, value, expires)

    async def delete(self, key: str) -> None:
        self._check_open()
        if self._live(key) is None:
            raise NotFoundError(f"key {key!r} not found")
        self._remove(key)

    async def delete_range(self, prefix: str) -> int:
        self._check_open()
        live = 0
        for key in self._keys_under(prefix):
            live += self._live(key) is not None
            self._remove(key)
        return live

    async def range(self, prefix: str, *, limit: int | None = None) -> list[Item]:
        if limit is not None and limit < 0:
            raise ValueError("limit must be >= 0")
        self._check_open()
        out: list[Item] = []
        for key in self._keys_under(prefix):
            if limit is not None and len(out) >= limit:
                break
            item = self._live(key)
            if item is not None:
                out.append(item)
        return out

    def watch(self, prefixes: Sequence[str]) -> Watcher:
        self._check_open()
        w = QueueWatcher(prefixes, on_close=self._watchers.discard)
        self._watchers.add(w)
        return w

    async def expire_now(self) -> int:
        """Reap expired items now (the background reaper does this every reap_interval)."""
        self._check_open()
        now = self._clock()
        expired = [k for k, it in self._items.items() if it.expires is not None and it.expires <= now]
        for key in sorted(expired):
            self._remove(key)
        return len(expired)

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self._reap_interval)
            try:
                await self.expire_now()
            except Exception:
                log.exception("memory backend: reaping expired items failed")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for w in list(self._watchers):
            await w.close()
