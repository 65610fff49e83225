"""The audit log on SQLite: append events, search them newest first with a cursor.

One table holds every event as its JSON body plus the columns searches filter on (time as integer
microseconds since the epoch, event, user, sid), each with a (column, time) index so a filtered
page reads only the rows it returns. All SQLite work runs on one worker thread so the event loop
never waits on the disk; concurrent emits are written together in one transaction, and `emit`
returns only after that transaction committed, so a search that starts afterwards sees the event.

WAL with synchronous=NORMAL: a committed event survives a crash of the process (not necessarily a
power cut), and other processes on the same host read and write the same file safely.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import re
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from wardgate.audit.events import make_event
from wardgate.errors import BadParameterError

MAX_LIMIT = 1000
REQUIRED_FIELDS = ("event", "code", "time", "uid")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_events (
    id INTEGER PRIMARY KEY,
    uid TEXT NOT NULL UNIQUE,
    time_us INTEGER NOT NULL,
    event TEXT NOT NULL,
    user TEXT NOT NULL DEFAULT '',
    sid TEXT NOT NULL DEFAULT '',
    code TEXT NOT NULL,
    success INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_events_time ON audit_events (time_us);
CREATE INDEX IF NOT EXISTS audit_events_event_time ON audit_events (event, time_us);
CREATE INDEX IF NOT EXISTS audit_events_user_time ON audit_events (user, time_us);
CREATE INDEX IF NOT EXISTS audit_events_sid_time ON audit_events (sid, time_us);
"""
_INSERT = (
    "INSERT INTO audit_events (uid, time_us, event, user, sid, code, success, body)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (uid) DO NOTHING"
)
_CURSOR_B64 = re.compile(r"[A-Za-z0-9_-]{1,80}")
_CURSOR_TEXT = re.compile(r"([ad])\.(-?\d{1,19})\.(\d{1,19})")

Row = tuple[str, int, str, str, str, str, int, str]


def format_time(dt: datetime) -> str:
    """The canonical event time: RFC 3339, UTC, microseconds, `Z` (as `make_event` writes it)."""
    return dt.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _micros(dt: datetime) -> int:
    """Integer microseconds since the epoch; exact (no float rounding), naive means UTC."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // _MICROSECOND


def _normalize(event: dict) -> tuple[dict, datetime]:
    if not isinstance(event, dict):
        raise BadParameterError("an audit event must be a JSON object")
    for name in REQUIRED_FIELDS:
        value = event.get(name)
        if value is None or value == "":
            raise BadParameterError(f"audit event is missing the field {name!r}")
        if not isinstance(value, str):
            raise BadParameterError(f"audit event field {name!r} must be a string")
    try:
        when = datetime.fromisoformat(event["time"])
    except ValueError:
        raise BadParameterError("audit event field 'time' is not an RFC 3339 timestamp") from None
    if when.tzinfo is None:
        raise BadParameterError("audit event field 'time' needs a UTC offset (e.g. a trailing Z)")
    for name in ("user", "sid"):
        if not isinstance(event.get(name, ""), str):
            raise BadParameterError(f"audit event field {name!r} must be a string")
    if not isinstance(event.get("success", True), bool):
        raise BadParameterError("audit event field 'success' must be true or false")
    out = dict(event)
    out["time"] = format_time(when)
    return out, when


def normalize_event(event: dict) -> dict:
    """Check an event built elsewhere and return a copy with its time in the canonical form.

    Refuses (BadParameterError naming the field) anything the log could not index or order.
    """
    return _normalize(event)[0]


def _row(event: dict) -> tuple[dict, Row]:
    ev, when = _normalize(event)
    try:
        # ASCII-only JSON: a lone surrogate in some field cannot then fail the UTF-8 encode of a
        # whole batch on the worker thread. `default=str` keeps odd field types instead of
        # losing the event.
        body = json.dumps(ev, separators=(",", ":"), default=str)
    except (TypeError, ValueError) as exc:
        raise BadParameterError(f"audit event cannot be stored as JSON: {exc}") from None
    row = (
        ev["uid"],
        _micros(when),
        ev["event"],
        ev.get("user", ""),
        ev.get("sid", ""),
        ev["code"],
        int(ev.get("success", True)),
        body,
    )
    return ev, row


def _encode_cursor(order: str, time_us: int, rowid: int) -> str:
    raw = f"{order[0]}.{time_us}.{rowid}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str, order: str) -> tuple[int, int]:
    """Back to (time, rowid); anything else, including a cursor of the other order, is refused."""
    if not isinstance(cursor, str) or not _CURSOR_B64.fullmatch(cursor):
        raise BadParameterError("invalid cursor")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        raise BadParameterError("invalid cursor") from None
    m = _CURSOR_TEXT.fullmatch(raw)
    if not m or m.group(1) != order[0]:
        raise BadParameterError("invalid cursor")
    return int(m.group(2)), int(m.group(3))


def _type_filter(types: Sequence[str]) -> tuple[str, list[Any]] | None:
    """SQL for "any of these names or prefixes" (`session.*`, `session.`); None means no filter."""
    exact: list[str] = []
    clauses: list[str] = []
    args: list[Any] = []
    for t in types:
        if not isinstance(t, str):
            raise BadParameterError("event types must be strings")
        if not t:
            continue
        if t.endswith("*") or t.endswith("."):
            prefix = t.rstrip("*")
            if not prefix:
                return None  # "*" matches every event
            last = ord(prefix[-1])
            if last >= 0x10FFFF:
                clauses.append("substr(event, 1, ?) = ?")
                args += [len(prefix), prefix]
            else:  # a range, so the (event, time) index serves it
                clauses.append("(event >= ? AND event < ?)")
                args += [prefix, prefix[:-1] + chr(last + 1)]
        else:
            exact.append(t)
    if exact:
        clauses.insert(0, f"event IN ({','.join('?' * len(exact))})")
        args[:0] = exact
    if not clauses:
        return None
    return "(" + " OR ".join(clauses) + ")", args


class SQLiteAuditLog:
    """An `Emitter` that stores events in SQLite and searches them."""

    def __init__(self, path: str | os.PathLike[str], *, clock: Callable[[], float] | None = None) -> None:
        self.path = str(path)
        self.clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wardgate-audit")
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self._pending: list[tuple[Row, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def __aenter__(self) -> SQLiteAuditLog:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- worker thread --------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        """The connection, opened on first use on the worker thread (so it is only used there)."""
        if self._closed:
            raise RuntimeError("the audit log is closed")
        if self._conn is None:
            if self.path != ":memory:" and not self.path.startswith("file:"):
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                # Events name users and hosts: keep the file (and its -wal/-shm, which SQLite
                # creates with the same mode) private to the service's account.
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.executescript(_SCHEMA)
                if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
                    conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _insert(self, rows: list[Row]) -> None:
        conn = self._db()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(_INSERT, rows)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _select(
        self, where: list[str], args: list[Any], order: str, limit: int
    ) -> tuple[list[dict], str | None]:
        direction = "DESC" if order == "desc" else "ASC"
        sql = "SELECT id, time_us, body FROM audit_events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        # Only fixed SQL fragments are formatted in; every value is a bound parameter.
        sql += f" ORDER BY time_us {direction}, id {direction} LIMIT ?"
        rows = self._db().execute(sql, [*args, limit + 1]).fetchall()
        cursor = None
        if len(rows) > limit:
            rows = rows[:limit]
            cursor = _encode_cursor(order, rows[-1][1], rows[-1][0])
        return [json.loads(r[2]) for r in rows], cursor

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._closed = True

    # --- event loop -----------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._closed:
            raise RuntimeError("the audit log is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _flush(self) -> None:
        """Write whatever emits queued up, one transaction per batch, until none are left."""
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await self._run(self._insert, [row for row, _ in batch])
            except asyncio.CancelledError:
                for _, fut in batch:
                    fut.cancel()
                raise
            except BaseException as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
            else:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)

    async def _store(self, row: Row) -> None:
        if self._closed:
            raise RuntimeError("the audit log is closed")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((row, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush())
        # shield: a caller that gives up waiting must not cancel the write of other callers' events
        await asyncio.shield(fut)

    async def emit(
        self, event: str, *, user: str = "", success: bool = True, sid: str = "", **fields: Any
    ) -> dict:
        """Build the event, store it, and return it once it is committed."""
        ev = make_event(event, user=user, success=success, sid=sid, **fields)
        if self.clock is not None and "time" not in fields:
            ev["time"] = format_time(datetime.fromtimestamp(self.clock(), UTC))
        ev, row = _row(ev)
        await self._store(row)
        return ev

    async def write(self, event: dict) -> None:
        """Store an event built elsewhere (e.g. sent by another service); a repeated uid is a no-op,
        so a sender may retry after a lost reply without duplicating the event."""
        await self._store(_row(event)[1])

    async def write_many(self, events: Sequence[dict]) -> None:
        """Store a batch in one transaction (a service ships its events in batches; one commit
        each would be the audit log's throughput limit)."""
        rows = [_row(ev)[1] for ev in events]
        if rows:
            await asyncio.gather(*(self._store(r) for r in rows))

    async def search(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        types: Sequence[str] = (),
        user: str = "",
        sid: str = "",
        limit: int = 100,
        cursor: str | None = None,
        order: Literal["desc", "asc"] = "desc",
    ) -> tuple[list[dict], str | None]:
        """One page of events in [since, until), newest first unless order="asc".

        `types` holds event names (`user.login`) or prefixes (`session.*`, `session.`); an event
        matching any is returned. Pass the returned cursor back (with the same order) for the next
        page; it is None after the last page.
        """
        if order not in ("desc", "asc"):
            raise BadParameterError("order must be 'desc' or 'asc'")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise BadParameterError("limit must be a positive integer")
        limit = min(limit, MAX_LIMIT)
        where: list[str] = []
        args: list[Any] = []
        for value, clause in ((since, "time_us >= ?"), (until, "time_us < ?")):
            if value is not None:
                if not isinstance(value, datetime):
                    raise BadParameterError("since and until must be datetimes")
                where.append(clause)
                args.append(_micros(value))
        if isinstance(types, str):
            types = (types,)
        type_filter = _type_filter(types)
        if type_filter is not None:
            where.append(type_filter[0])
            args += type_filter[1]
        if user:
            where.append("user = ?")
            args.append(user)
        if sid:
            where.append("sid = ?")
            args.append(sid)
        if cursor is not None:
            t, rowid = _decode_cursor(cursor, order)
            # Written as a range on time first so the time-ordered index can seek to the page.
            if order == "desc":
                where.append("time_us <= ? AND (time_us < ? OR id < ?)")
            else:
                where.append("time_us >= ? AND (time_us > ? OR id > ?)")
            args += [t, t, rowid]
        return await self._run(self._select, where, args, order, limit)

    async def session_events(self, sid: str) -> list[dict]:
        """Every event of one session, oldest first (what a session's timeline shows)."""
        if not sid:
            raise BadParameterError("a session id is required")
        events: list[dict] = []
        cursor: str | None = None
        while True:
            page, cursor = await self.search(sid=sid, order="asc", limit=MAX_LIMIT, cursor=cursor)
            events += page
            if cursor is None:
                return events

    async def close(self) -> None:
        """Finish queued writes, then close the database; later calls raise RuntimeError."""
        if self._closed:
            return
        if self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)
        try:
            await self._run(self._close_conn)
        finally:
            self._closed = True
            self._executor.shutdown(wait=False)
