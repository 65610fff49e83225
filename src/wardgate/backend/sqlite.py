"""The default backend: one SQLite file in WAL mode, shareable by several processes on one host.

Every write runs in one `BEGIN IMMEDIATE` transaction that bumps a counter in `meta`, writes
`items` and appends to `events`, so revisions only grow and the events log is gap-free. Watchers
in any process tail that log by revision: writes made through this instance wake them at once,
other processes' writes are seen by polling. All sqlite calls run on one worker thread with its
own connection, so the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal, TypeVar

from wardgate.backend.base import Backend, Event, EventType, Item, Watcher
from wardgate.backend.memory import QueueWatcher, WatcherClosedError
from wardgate.errors import AlreadyExistsError, CompareFailedError, NotFoundError, WardgateError

__all__ = ["SQLiteBackend"]

log = logging.getLogger(__name__)

T = TypeVar("T")

EVENTS_KEEP_SECONDS = 600.0
"""Events older than this (wall clock) may be pruned; a watcher lagging longer is closed."""
EVENTS_KEEP_ROWS = 100_000
"""At most this many events are kept, whatever their age, so the file stays bounded."""
TAIL_BATCH = 1_000
BUSY_TIMEOUT_MS = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0), ('pruned', 0);
CREATE TABLE IF NOT EXISTS items (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    revision INTEGER NOT NULL,
    expires REAL
);
CREATE INDEX IF NOT EXISTS items_expires ON items (expires) WHERE expires IS NOT NULL;
CREATE TABLE IF NOT EXISTS events (
    revision INTEGER PRIMARY KEY,
    type TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    expires REAL,
    time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_time ON events (time);
"""

_Row = tuple[int, str, str, bytes, float | None]
_WriteMode = Literal["put", "create", "cas"]


def _prefix_end(prefix: str) -> str | None:
    """Smallest string greater than every string starting with prefix (None: unbounded).

    Python's str order and SQLite's BINARY collation over UTF-8 agree (both are code point
    order), so `prefix <= key < end` selects exactly the keys under prefix, using the index.
    """
    while prefix:
        last = ord(prefix[-1])
        if last < 0x10FFFF:
            return prefix[:-1] + chr(0xE000 if 0xD7FF <= last < 0xE000 else last + 1)  # skip surrogates
        prefix = prefix[:-1]
    return None


class _SQLiteWatcher(QueueWatcher):
    """Fixes its start revision behind the writes this process queued before watch()."""

    def __init__(self, backend: SQLiteBackend, prefixes: Sequence[str], start: Future[int]) -> None:
        super().__init__(prefixes, on_close=backend._unregister)
        self._backend = backend
        self._start_future = start
        self.cursor = 0
        """Highest revision this watcher has been offered; the tailer advances it."""

    async def _start(self) -> None:
        self.cursor = await asyncio.wrap_future(self._start_future)
        if not self.closed:
            self._backend._register(self)


class SQLiteBackend(Backend):
    """Revisioned key-value store in one SQLite file; see the module docstring for the model."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        poll_interval: float = 0.1,
        reap_interval: float = 1.0,
    ) -> None:
        self.path = os.fspath(path)
        self._clock = clock
        self._poll_interval = poll_interval
        self._reap_interval = reap_interval
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wardgate-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._watchers: set[_SQLiteWatcher] = set()
        self._changed: asyncio.Event | None = None
        self._tailer: asyncio.Task[None] | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._closed = False
        try:
            self._executor.submit(self._open).result()
        except (sqlite3.Error, OSError) as exc:
            self._executor.shutdown(wait=False)
            raise WardgateError(f"cannot open the sqlite backend at {self.path}: {exc}") from exc
        except BaseException:
            self._executor.shutdown(wait=False)
            raise

    # ---- worker thread side: everything below touching self._conn runs on the worker only

    def _open(self) -> None:
        if str(self.path) != ":memory:":
            # The backend holds CA private keys and password hashes: private to the service's
            # account (SQLite gives the -wal/-shm files the same mode).
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    @property
    def _db(self) -> sqlite3.Connection:
        assert self._conn is not None
        return self._conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One immediate transaction: takes the file's write lock up front, so no upgrade deadlocks."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _append(
        self, db: sqlite3.Connection, type_: EventType, key: str, value: bytes, expires: float | None
    ) -> int:
        (rev,) = db.execute(
            "UPDATE meta SET value = value + 1 WHERE name = 'revision' RETURNING value"
        ).fetchone()
        db.execute(
            "INSERT INTO events (revision, type, key, value, expires, time) VALUES (?, ?, ?, ?, ?, ?)",
            (rev, type_.value, key, value, expires, time.time()),
        )
        return int(rev)

    def _delete_rows(self, db: sqlite3.Connection, keys: list[str]) -> None:
        for key in keys:
            db.execute("DELETE FROM items WHERE key = ?", (key,))
            self._append(db, EventType.DELETE, key, b"", None)

    @staticmethod
    def _live_revision(db: sqlite3.Connection, key: str, now: float) -> int | None:
        row = db.execute(
            "SELECT revision FROM items WHERE key = ? AND (expires IS NULL OR expires > ?)", (key, now)
        ).fetchone()
        return None if row is None else int(row[0])

    def _do_write(
        self, mode: _WriteMode, key: str, value: bytes, expires: float | None, now: float, expected: int
    ) -> Item:
        with self._write() as db:
            if mode != "put":
                current = self._live_revision(db, key, now)
                if mode == "create" and current is not None:
                    raise AlreadyExistsError(f"key {key!r} already exists")
                if mode == "cas":
                    if current is None:
                        raise NotFoundError(f"key {key!r} not found")
                    if current != expected:
                        raise CompareFailedError(
                            f"key {key!r} changed (revision {current}, expected {expected})"
                        )
            rev = self._append(db, EventType.PUT, key, value, expires)
            db.execute(
                "INSERT INTO items (key, value, revision, expires) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET "
                "value = excluded.value, revision = excluded.revision, expires = excluded.expires",
                (key, value, rev, expires),
            )
        return Item(key, value, rev, expires)

    def _do_get(self, key: str, now: float) -> Item:
        row = self._db.execute(
            "SELECT value, revision, expires FROM items WHERE key = ? AND (expires IS NULL OR expires > ?)",
            (key, now),
        ).fetchone()
        if row is None:
            raise NotFoundError(f"key {key!r} not found")
        return Item(key, bytes(row[0]), int(row[1]), row[2])

    def _do_delete(self, key: str, now: float) -> None:
        with self._write() as db:
            if self._live_revision(db, key, now) is None:
                raise NotFoundError(f"key {key!r} not found")
            self._delete_rows(db, [key])

    @staticmethod
    def _prefix_clause(prefix: str) -> tuple[str, tuple[str, ...]]:
        end = _prefix_end(prefix)
        if end is None:
            return "1", ()
        return "key >= ? AND key < ?", (prefix, end)

    def _do_delete_range(self, prefix: str, now: float) -> int:
        where, args = self._prefix_clause(prefix)
        with self._write() as db:
            rows = db.execute(f"SELECT key, expires FROM items WHERE {where} ORDER BY key", args).fetchall()  # noqa: S608 - fixed clause
            self._delete_rows(db, [r[0] for r in rows])
        return sum(1 for _, exp in rows if exp is None or exp > now)

    def _do_range(self, prefix: str, limit: int | None, now: float) -> list[Item]:
        where, args = self._prefix_clause(prefix)
        rows = self._db.execute(
            f"SELECT key, value, revision, expires FROM items WHERE {where} "  # noqa: S608 - fixed clause
            "AND (expires IS NULL OR expires > ?) ORDER BY key LIMIT ?",
            (*args, now, -1 if limit is None else limit),
        ).fetchall()
        return [Item(k, bytes(v), int(r), e) for k, v, r, e in rows]

    def _do_current_revision(self) -> int:
        (rev,) = self._db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
        return int(rev)

    def _do_expire(self, now: float) -> int:
        """Reap expired items and prune old events; read first so idle files take no write lock."""
        db = self._db
        reaped = 0
        if db.execute("SELECT 1 FROM items WHERE expires <= ? LIMIT 1", (now,)).fetchone():
            with self._write():
                rows = db.execute("SELECT key FROM items WHERE expires <= ? ORDER BY key", (now,))
                keys = [r[0] for r in rows]
                self._delete_rows(db, keys)
                reaped = len(keys)
        by_age = db.execute(
            "SELECT max(revision) FROM events WHERE time < ?", (time.time() - EVENTS_KEEP_SECONDS,)
        ).fetchone()[0]
        cutoff = max(by_age or 0, self._do_current_revision() - EVENTS_KEEP_ROWS)
        (pruned,) = db.execute("SELECT value FROM meta WHERE name = 'pruned'").fetchone()
        if cutoff > pruned:
            with self._write():
                db.execute("DELETE FROM events WHERE revision <= ?", (cutoff,))
                db.execute("UPDATE meta SET value = max(value, ?) WHERE name = 'pruned'", (cutoff,))
        return reaped

    def _do_tail(self, after: int) -> tuple[int, list[_Row]]:
        db = self._db
        db.execute("BEGIN")  # one snapshot for both reads
        try:
            (pruned,) = db.execute("SELECT value FROM meta WHERE name = 'pruned'").fetchone()
            rows = db.execute(
                "SELECT revision, type, key, value, expires FROM events WHERE revision > ? "
                "ORDER BY revision LIMIT ?",
                (after, TAIL_BATCH),
            ).fetchall()
        finally:
            db.execute("COMMIT")
        return int(pruned), rows

    def _do_close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # ---- event loop side

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise WardgateError("backend is closed")
        loop = asyncio.get_running_loop()
        if self._reaper is None:
            self._reaper = loop.create_task(self._reap_forever())
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def get(self, key: str) -> Item:
        return await self._run(self._do_get, key, self._clock())

    async def _write_item(
        self, mode: _WriteMode, key: str, value: bytes, expires: float | None, expected: int = 0
    ) -> Item:
        item = await self._run(self._do_write, mode, key, bytes(value), expires, self._clock(), expected)
        self._notify()
        return item

    async def put(self, key: str, value: bytes, *, expires: float | None = None) -> Item:
        return await self._write_item("put", key, value, expires)

    async def create(self, key: str, value: bytes, *, expires: float | None = None) -> Item:
        return await self._write_item("create", key, value, expires)

    async def compare_and_swap(
        self, key: str, expected_revision: int, value: bytes, *, expires: float | None = None
    ) -> Item:
        return await self._write_item("cas", key, value, expires, expected_revision)

    async def delete(self, key: str) -> None:
        await self._run(self._do_delete, key, self._clock())
        self._notify()

    async def delete_range(self, prefix: str) -> int:
        n = await self._run(self._do_delete_range, prefix, self._clock())
        self._notify()
        return n

    async def range(self, prefix: str, *, limit: int | None = None) -> list[Item]:
        if limit is not None and limit < 0:
            raise ValueError("limit must be >= 0")
        return await self._run(self._do_range, prefix, limit, self._clock())

    async def current_revision(self) -> int:
        """The newest revision written by any process; 0 for a fresh file."""
        return await self._run(self._do_current_revision)

    async def expire_now(self) -> int:
        """Reap expired items (delete events go to watchers) and prune old events; returns count."""
        n = await self._run(self._do_expire, self._clock())
        if n:
            self._notify()
        return n

    def watch(self, prefixes: Sequence[str]) -> Watcher:
        """The start revision is read behind every write this instance already queued, so such
        writes are never replayed and later ones are never missed."""
        if self._closed:
            raise WardgateError("backend is closed")
        start = self._executor.submit(self._do_current_revision)
        return _SQLiteWatcher(self, prefixes, start)

    def _register(self, w: _SQLiteWatcher) -> None:
        if self._closed:
            w.fail(WatcherClosedError("backend is closed"))
            return
        self._watchers.add(w)
        loop = asyncio.get_running_loop()
        if self._changed is None:
            self._changed = asyncio.Event()
        if self._tailer is None or self._tailer.done():
            self._tailer = loop.create_task(self._tail_forever())
        if self._reaper is None:
            self._reaper = loop.create_task(self._reap_forever())
        self._changed.set()

    def _unregister(self, w: QueueWatcher) -> None:
        if isinstance(w, _SQLiteWatcher):
            self._watchers.discard(w)

    async def _tail_forever(self) -> None:
        """Feed every registered watcher from the events log, until none is left."""
        assert self._changed is not None
        while self._watchers and not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self._poll_interval)
            self._changed.clear()
            try:
                while await self._tail_once():
                    pass
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closed:
                    return
                log.exception("sqlite backend: reading the events log failed")
                for w in list(self._watchers):
                    w.fail(WatcherClosedError(f"reading the events log failed: {exc}"))

    async def _tail_once(self) -> bool:
        """One batch; True when there may be more right away."""
        # Only watchers registered before the read may advance past it; later ones catch up next time.
        batch = list(self._watchers)
        if not batch:
            return False
        after = min(w.cursor for w in batch)
        pruned, rows = await self._run(self._do_tail, after)
        for w in batch:
            if w.cursor < pruned:
                w.fail(WatcherClosedError("watcher fell behind the pruned events log"))
        for rev, type_, key, value, expires in rows:
            event: Event | None = None
            for w in batch:
                if rev > w.cursor and not w.closed and w.matches(key):
                    if event is None:
                        kind = EventType(type_)
                        item = Item(key, bytes(value), rev, expires if kind is EventType.PUT else None)
                        event = Event(kind, item)
                    w.push(event)
        if rows:
            last = rows[-1][0]
            for w in batch:
                w.cursor = max(w.cursor, last)
        return len(rows) == TAIL_BATCH

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self._reap_interval)
            try:
                await self.expire_now()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sqlite backend: reaping expired items failed")

    async def close(self) -> None:
        """Stop background tasks, end every watcher, then close the connection."""
        if self._closed:
            return
        self._closed = True
        for w in list(self._watchers):
            await w.close()
        for task in (self._reaper, self._tailer):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._do_close)
        self._executor.shutdown(wait=False)
