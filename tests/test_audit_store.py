"""The SQLite audit log: storing, searching, paging, and sharing one file between processes."""

from __future__ import annotations

import asyncio
import base64
import os
import stat
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from wardgate.audit.events import make_event
from wardgate.audit.store import MAX_LIMIT, SQLiteAuditLog
from wardgate.errors import BadParameterError

BASE = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def at(minutes: float) -> datetime:
    return BASE + timedelta(minutes=minutes)


def ev(name: str, minutes: float, *, user: str = "", sid: str = "", **fields) -> dict:
    """An event as another service would send it, with an explicit time."""
    e = make_event(name, user=user, sid=sid, **fields)
    e["time"] = at(minutes).isoformat().replace("+00:00", "Z")
    return e


@pytest.fixture
async def log(tmp_path: Path):
    store = SQLiteAuditLog(tmp_path / "audit" / "events.db")
    yield store
    await store.close()


# name, minute, user, sid
EVENTS = [
    ("user.login", 0, "alice", ""),
    ("user.login", 1, "bob", ""),
    ("session.start", 2, "alice", "s1"),
    ("exec", 3, "alice", "s1"),
    ("session.start", 4, "bob", "s2"),
    ("session.join", 5, "carol", "s1"),
    ("session.end", 6, "alice", "s1"),
    ("user.password_change", 7, "bob", ""),
    ("session.end", 8, "bob", "s2"),
    ("user.login", 9, "carol", ""),
]


@pytest.fixture
async def filled(log: SQLiteAuditLog) -> list[dict]:
    events = [ev(n, m, user=u, sid=s) for n, m, u, s in EVENTS]
    # written out of order: the log orders by the events' own times, not by arrival
    for e in reversed(events):
        await log.write(e)
    return events


def names(events: list[dict]) -> list[str]:
    return [e["event"] for e in events]


async def test_emit_is_searchable_as_soon_as_it_returns(log: SQLiteAuditLog):
    e = await log.emit("user.login", user="alice", method="password")
    got, cursor = await log.search()
    assert got == [e]
    assert cursor is None
    assert e["code"] == "W1000I"
    assert e["method"] == "password"
    failed = await log.emit("user.login", user="alice", success=False, error="bad password")
    assert failed["code"] == "W1000W"
    got, _ = await log.search(limit=1)
    assert got[0]["uid"] == failed["uid"]
    assert got[0]["success"] is False


async def test_concurrent_emits_are_all_stored(log: SQLiteAuditLog):
    emitted = await asyncio.gather(*(log.emit("exec", user="alice", sid="s9", n=i) for i in range(300)))
    stored = await log.session_events("s9")
    assert sorted(e["n"] for e in stored) == list(range(300))
    assert {e["uid"] for e in stored} == {e["uid"] for e in emitted}


async def test_clock_sets_the_event_time(tmp_path: Path):
    store = SQLiteAuditLog(tmp_path / "a.db", clock=lambda: at(30).timestamp())
    try:
        e = await store.emit("user.create", user="admin", name="dave")
        assert e["time"] == "2026-03-01T12:30:00.000000Z"
        got, _ = await store.search(since=at(29), until=at(31))
        assert [g["uid"] for g in got] == [e["uid"]]
    finally:
        await store.close()


async def test_newest_first_by_default_and_oldest_first_on_request(log, filled):
    got, _ = await log.search()
    assert [e["uid"] for e in got] == [e["uid"] for e in reversed(filled)]
    got, _ = await log.search(order="asc")
    assert [e["uid"] for e in got] == [e["uid"] for e in filled]


async def test_time_range_includes_since_and_excludes_until(log, filled):
    got, _ = await log.search(since=at(2), until=at(5))
    assert names(got) == ["session.start", "exec", "session.start"]
    got, _ = await log.search(since=at(8))
    assert names(got) == ["user.login", "session.end"]
    got, _ = await log.search(until=at(1))
    assert names(got) == ["user.login"]
    # a naive datetime means UTC
    got, _ = await log.search(since=at(9).replace(tzinfo=None))
    assert len(got) == 1
    # the same instant in another time zone
    got, _ = await log.search(since=at(9).astimezone(timezone(timedelta(hours=5))))
    assert len(got) == 1


async def test_types_exact_and_prefix(log, filled):
    got, _ = await log.search(types=["user.login"])
    assert [e["user"] for e in got] == ["carol", "bob", "alice"]
    got, _ = await log.search(types=["session.*"])
    assert names(got) == ["session.end", "session.end", "session.join", "session.start", "session.start"]
    got2, _ = await log.search(types=["session."])
    assert got2 == got
    got, _ = await log.search(types=["session.end", "exec"])
    assert names(got) == ["session.end", "session.end", "exec"]
    got, _ = await log.search(types=["user.*", "exec"])
    assert set(names(got)) == {"user.login", "user.password_change", "exec"}
    assert len(got) == 5
    # "session" alone is an exact name: it matches nothing, not every session.* event
    got, _ = await log.search(types=["session"])
    assert got == []
    # a prefix must not treat "_" or "%" as wildcards
    got, _ = await log.search(types=["user.password_*"])
    assert names(got) == ["user.password_change"]
    got, _ = await log.search(types=["user.p%"])
    assert got == []
    got, _ = await log.search(types=["*"])
    assert len(got) == len(EVENTS)


async def test_filter_by_user_and_session(log, filled):
    got, _ = await log.search(user="bob")
    assert names(got) == ["session.end", "user.password_change", "session.start", "user.login"]
    got, _ = await log.search(sid="s1")
    assert names(got) == ["session.end", "session.join", "exec", "session.start"]
    got, _ = await log.search(sid="s1", user="alice", types=["session.*"])
    assert names(got) == ["session.end", "session.start"]
    got, _ = await log.search(user="nobody")
    assert got == []


async def test_session_events_oldest_first(log, filled):
    got = await log.session_events("s2")
    assert names(got) == ["session.start", "session.end"]
    assert all(e["sid"] == "s2" for e in got)
    assert await log.session_events("nope") == []
    with pytest.raises(BadParameterError):
        await log.session_events("")


@pytest.mark.parametrize("order", ["desc", "asc"])
async def test_cursor_pages_through_every_event_exactly_once(log: SQLiteAuditLog, order):
    # 23 events, several sharing one timestamp, so paging must break ties by row
    events = [ev("exec", i // 4, user="alice", n=i) for i in range(23)]
    events += [ev("user.login", 1, user="bob")]
    await asyncio.gather(*(log.write(e) for e in events))
    everything, _ = await log.search(limit=1000, order=order)
    seen: list[dict] = []
    cursor = None
    pages = 0
    while True:
        page, cursor = await log.search(limit=5, cursor=cursor, order=order)
        pages += 1
        assert len(page) <= 5
        seen += page
        if cursor is None:
            break
        assert set(cursor) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert pages == 5
    assert [e["uid"] for e in seen] == [e["uid"] for e in everything]
    assert len({e["uid"] for e in seen}) == 24
    times = [e["time"] for e in seen]
    assert times == sorted(times, reverse=order == "desc")

    # paging with a filter
    seen = []
    cursor = None
    while True:
        page, cursor = await log.search(types=["exec"], limit=4, cursor=cursor, order=order)
        seen += page
        if cursor is None:
            break
    assert sorted(e["n"] for e in seen) == list(range(23))


async def test_last_full_page_has_no_cursor(log, filled):
    page, cursor = await log.search(limit=len(EVENTS))
    assert len(page) == len(EVENTS)
    assert cursor is None
    page, cursor = await log.search(limit=len(EVENTS) - 1)
    assert cursor is not None
    page, cursor = await log.search(limit=len(EVENTS) - 1, cursor=cursor)
    assert len(page) == 1
    assert cursor is None


async def test_limit_is_capped(log: SQLiteAuditLog):
    await asyncio.gather(*(log.write(ev("exec", i / 1000)) for i in range(MAX_LIMIT + 5)))
    page, cursor = await log.search(limit=50_000)
    assert len(page) == MAX_LIMIT
    assert cursor is not None
    rest, cursor = await log.search(limit=50_000, cursor=cursor)
    assert len(rest) == 5
    assert cursor is None


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "not a cursor!",
        "%%%%",
        base64.urlsafe_b64encode(b"hello").decode(),
        base64.urlsafe_b64encode(b"d.12.x").decode(),
        base64.urlsafe_b64encode(b"\xff\xfe\x00").decode(),
        "A" * 500,
    ],
)
async def test_malformed_cursor_is_refused(log, filled, cursor):
    with pytest.raises(BadParameterError, match="invalid cursor"):
        await log.search(cursor=cursor)


async def test_cursor_from_the_other_order_is_refused(log, filled):
    _, cursor = await log.search(limit=2)
    assert cursor is not None
    with pytest.raises(BadParameterError, match="invalid cursor"):
        await log.search(limit=2, cursor=cursor, order="asc")


async def test_bad_search_arguments(log):
    with pytest.raises(BadParameterError, match="limit"):
        await log.search(limit=0)
    with pytest.raises(BadParameterError, match="order"):
        await log.search(order="sideways")  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["event", "code", "time", "uid"])
async def test_write_refuses_events_missing_a_required_field(log, field):
    e = ev("user.login", 0, user="alice")
    del e[field]
    with pytest.raises(BadParameterError, match=f"'{field}'"):
        await log.write(e)
    e[field] = ""
    with pytest.raises(BadParameterError, match=f"'{field}'"):
        await log.write(e)
    assert (await log.search())[0] == []


async def test_write_refuses_bad_times_and_types(log):
    e = ev("user.login", 0)
    for bad, msg in [
        ({"time": "yesterday"}, "RFC 3339"),
        ({"time": "2026-03-01T12:00:00"}, "UTC offset"),
        ({"uid": 12}, "'uid' must be a string"),
        ({"user": ["alice"]}, "'user'"),
        ({"success": "yes"}, "'success'"),
    ]:
        with pytest.raises(BadParameterError, match=msg):
            await log.write({**e, **bad})
    with pytest.raises(BadParameterError):
        await log.write(["not", "a", "dict"])  # type: ignore[arg-type]
    assert (await log.search())[0] == []


async def test_write_normalises_time_to_utc(log):
    e = ev("user.login", 0)
    e["time"] = "2026-03-01T14:00:00+02:00"
    await log.write(e)
    got, _ = await log.search(since=at(0), until=at(0.01))
    assert got[0]["time"] == "2026-03-01T12:00:00.000000Z"


async def test_duplicate_uid_is_ignored(log):
    e = ev("user.login", 0, user="alice")
    await log.write(e)
    await log.write(e)
    await log.write({**e, "user": "mallory"})  # same uid, different content: first one wins
    await asyncio.gather(log.write(e), log.write(e))
    got, _ = await log.search()
    assert len(got) == 1
    assert got[0]["user"] == "alice"


async def test_survives_reopen(tmp_path: Path):
    path = tmp_path / "events.db"
    first = SQLiteAuditLog(path)
    e = await first.emit("role.create", user="admin", name="dev")
    await first.close()
    with pytest.raises(RuntimeError, match="closed"):
        await first.emit("role.create", user="admin")
    second = SQLiteAuditLog(path)
    try:
        got, _ = await second.search()
        assert got == [e]
    finally:
        await second.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


async def test_two_logs_on_one_file_see_each_other(tmp_path: Path):
    path = tmp_path / "shared.db"
    a, b = SQLiteAuditLog(path), SQLiteAuditLog(path)
    try:
        ea = await a.emit("session.start", user="alice", sid="s1")
        await b.search()  # b now holds an open connection and has read once
        eb = await b.emit("session.end", user="alice", sid="s1")
        assert [e["uid"] for e in await a.session_events("s1")] == [ea["uid"], eb["uid"]]
        assert [e["uid"] for e in await b.session_events("s1")] == [ea["uid"], eb["uid"]]

        # and a separate process writing to the same file
        script = textwrap.dedent(
            f"""
            import asyncio
            from wardgate.audit.store import SQLiteAuditLog

            async def main():
                log = SQLiteAuditLog({str(path)!r})
                await log.emit("exec", user="alice", sid="s1", command="uptime")
                await log.close()

            asyncio.run(main())
            """
        )
        subprocess.run([sys.executable, "-c", script], check=True, timeout=30)
        got, _ = await a.search(sid="s1", limit=1)
        assert got[0]["event"] == "exec"
        assert got[0]["command"] == "uptime"
    finally:
        await a.close()
        await b.close()


async def test_a_shipped_batch_is_stored_whole_and_retries_do_not_duplicate(log: SQLiteAuditLog):
    from wardgate.audit.events import make_event

    batch = [make_event("db.session.query", user="dana", sid="s1", query=f"select {i}") for i in range(1500)]
    await log.write_many(batch)
    await log.write_many(batch[:10])  # a sender retrying after a lost reply
    found, cursor = await log.search(types=["db.session.query"], limit=1000)
    more, _ = await log.search(types=["db.session.query"], limit=1000, cursor=cursor)
    found += more
    assert len(found) == 1500
    assert {e["query"] for e in found} == {f"select {i}" for i in range(1500)}
