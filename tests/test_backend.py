"""Conformance tests every backend must pass, plus what only the SQLite file can promise."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from wardgate.backend import (
    Backend,
    Event,
    EventType,
    Item,
    MemoryBackend,
    SQLiteBackend,
    Watcher,
    WatcherClosedError,
    open_backend,
)
from wardgate.backend import memory as memory_mod
from wardgate.backend import sqlite as sqlite_mod
from wardgate.errors import (
    AlreadyExistsError,
    BadParameterError,
    CompareFailedError,
    NotFoundError,
    WardgateError,
)

WAIT = 3.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _make(kind: str, tmp_path: Path, clock: FakeClock) -> Backend:
    if kind == "memory":
        return MemoryBackend(clock=clock)
    return SQLiteBackend(tmp_path / "wardgate.db", clock=clock, poll_interval=0.02)


@pytest.fixture(params=["memory", "sqlite"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> AsyncIterator[Backend]:
    b = _make(request.param, tmp_path, clock)
    yield b
    await b.close()


async def next_event(w: Watcher, timeout: float = WAIT) -> Event:
    return await asyncio.wait_for(anext(aiter(w)), timeout)


async def started(w: Watcher) -> Watcher:
    assert (await next_event(w)).type is EventType.INIT
    return w


async def collect(w: Watcher, n: int) -> list[tuple[EventType, str]]:
    out = []
    for _ in range(n):
        ev = await next_event(w)
        assert ev.item is not None
        out.append((ev.type, ev.item.key))
    return out


async def reap(b: Backend) -> int:
    assert isinstance(b, MemoryBackend | SQLiteBackend)
    return await b.expire_now()


async def assert_quiet(w: Watcher, seconds: float = 0.15) -> None:
    """No further event arrives (long enough for the SQLite tailer to have polled a few times)."""
    with pytest.raises(TimeoutError):
        await next_event(w, seconds)


# ---- conformance: both backends


async def test_put_get_overwrite(backend: Backend) -> None:
    first = await backend.put("/users/alice", b"v1")
    assert first == Item("/users/alice", b"v1", first.revision, None)
    assert first.revision > 0
    assert await backend.get("/users/alice") == first
    second = await backend.put("/users/alice", b"v2", expires=2e9)
    assert second.revision > first.revision
    assert await backend.get("/users/alice") == Item("/users/alice", b"v2", second.revision, 2e9)
    with pytest.raises(NotFoundError, match="/users/bob"):
        await backend.get("/users/bob")


async def test_create(backend: Backend) -> None:
    item = await backend.create("/tokens/t1", b"a")
    with pytest.raises(AlreadyExistsError):
        await backend.create("/tokens/t1", b"b")
    assert await backend.get("/tokens/t1") == item


async def test_compare_and_swap(backend: Backend) -> None:
    item = await backend.put("/roles/admin", b"v1")
    swapped = await backend.compare_and_swap("/roles/admin", item.revision, b"v2")
    assert swapped.value == b"v2"
    assert swapped.revision > item.revision
    with pytest.raises(CompareFailedError):
        await backend.compare_and_swap("/roles/admin", item.revision, b"stale")
    assert (await backend.get("/roles/admin")).value == b"v2"
    with pytest.raises(NotFoundError):
        await backend.compare_and_swap("/roles/missing", 1, b"x")


async def test_delete(backend: Backend) -> None:
    await backend.put("/nodes/n1", b"x")
    await backend.delete("/nodes/n1")
    with pytest.raises(NotFoundError):
        await backend.get("/nodes/n1")
    with pytest.raises(NotFoundError):
        await backend.delete("/nodes/n1")
    assert await backend.range("/nodes/") == []


async def test_range_by_prefix_ordered_limited(backend: Backend) -> None:
    names = ["carol", "alice", "dave", "bob", "erin"]
    for name in names:
        await backend.put(f"/users/{name}", name.encode())
    await backend.put("/users2/zed", b"sibling")
    await backend.put("/users", b"the prefix without slash")
    await backend.put("/usera", b"sorts between")

    got = await backend.range("/users/")
    assert [i.key for i in got] == [f"/users/{n}" for n in sorted(names)]
    assert [i.value for i in got] == [n.encode() for n in sorted(names)]
    assert [i.key for i in await backend.range("/users/", limit=2)] == ["/users/alice", "/users/bob"]
    assert await backend.range("/users/", limit=0) == []
    assert [i.key for i in await backend.range("/users2/")] == ["/users2/zed"]
    assert len(await backend.range("")) == len(names) + 3
    assert await backend.range("/nothing/") == []


async def test_delete_range_keeps_siblings(backend: Backend) -> None:
    for i in range(3):
        await backend.put(f"/users/u{i}", b"x")
    await backend.put("/users2/keep", b"y")
    await backend.put("/users", b"z")
    assert await backend.delete_range("/users/") == 3
    assert await backend.range("/users/") == []
    assert [i.key for i in await backend.range("/user")] == ["/users", "/users2/keep"]
    assert await backend.delete_range("/users/") == 0


async def test_revisions_strictly_increase(backend: Backend) -> None:
    revs = []
    for i in range(5):
        revs.append((await backend.put(f"/k/{i % 2}", b"x")).revision)
        revs.append((await backend.create(f"/c/{i}", b"x")).revision)
    cas = await backend.compare_and_swap("/k/0", revs[-2], b"y")  # i=4 wrote /k/0 last
    revs.append(cas.revision)
    await backend.delete("/k/0")
    revs.append((await backend.put("/k/0", b"again")).revision)
    assert revs == sorted(revs)
    assert len(set(revs)) == len(revs)
    # The delete consumed a revision of its own, between the CAS and the re-put.
    assert revs[-1] > revs[-2] + 1


async def test_expired_items_are_invisible(backend: Backend, clock: FakeClock) -> None:
    await backend.put("/sessions/s1", b"short", expires=clock.now + 10)
    await backend.put("/sessions/s2", b"long", expires=clock.now + 100)
    await backend.put("/sessions/s3", b"forever")
    assert len(await backend.range("/sessions/")) == 3

    clock.advance(10)  # expires <= now counts as expired
    with pytest.raises(NotFoundError):
        await backend.get("/sessions/s1")
    assert [i.key for i in await backend.range("/sessions/")] == ["/sessions/s2", "/sessions/s3"]
    with pytest.raises(NotFoundError):
        await backend.compare_and_swap("/sessions/s1", 1, b"x")
    with pytest.raises(NotFoundError):
        await backend.delete("/sessions/s1")

    recreated = await backend.create("/sessions/s1", b"fresh")
    assert await backend.get("/sessions/s1") == recreated
    assert recreated.expires is None


async def test_reaping_delivers_delete_events(backend: Backend, clock: FakeClock) -> None:
    async with backend.watch(["/locks/"]) as w:
        await started(w)
        put = await backend.put("/locks/l1", b"x", expires=clock.now + 5)
        await backend.put("/locks/l2", b"x")
        ev = await next_event(w)
        assert ev == Event(EventType.PUT, put)
        assert (await next_event(w)).type is EventType.PUT

        assert await reap(backend) == 0  # nothing expired yet
        clock.advance(6)
        assert await reap(backend) == 1
        ev = await next_event(w)
        assert ev.type is EventType.DELETE
        assert ev.item is not None
        assert ev.item.key == "/locks/l1"
        assert ev.item.value == b""
        assert ev.item.revision > put.revision
        assert await reap(backend) == 0
        await assert_quiet(w)
    assert [i.key for i in await backend.range("/locks/")] == ["/locks/l2"]


async def test_watch_init_first_then_matching_changes_in_order(backend: Backend) -> None:
    await backend.put("/roles/before", b"not replayed")
    w = backend.watch(["/roles/", "/users/"])
    first = await next_event(w)
    assert first == Event(EventType.INIT)

    await backend.put("/roles/a", b"1")
    await backend.put("/nodes/n", b"other prefix")
    await backend.put("/users2/x", b"sibling prefix")
    await backend.put("/users/bob", b"2")
    await backend.delete("/roles/a")
    await backend.put("/roles/a", b"3")
    assert await backend.delete_range("/users/") == 1

    events = [await next_event(w) for _ in range(5)]
    assert [(e.type, e.item.key if e.item else None) for e in events] == [
        (EventType.PUT, "/roles/a"),
        (EventType.PUT, "/users/bob"),
        (EventType.DELETE, "/roles/a"),
        (EventType.PUT, "/roles/a"),
        (EventType.DELETE, "/users/bob"),
    ]
    revs = [e.item.revision for e in events if e.item]
    assert revs == sorted(revs)
    assert events[3].item is not None
    assert events[3].item.value == b"3"
    await assert_quiet(w)
    await w.close()
    with pytest.raises(StopAsyncIteration):
        await next_event(w)


@pytest.mark.parametrize("prefixes", [[], [""]])
async def test_watch_everything(backend: Backend, prefixes: list[str]) -> None:
    async with backend.watch(prefixes) as w:
        await started(w)
        await backend.put("/a", b"1")
        await backend.put("/b/c", b"2")
        assert await collect(w, 2) == [(EventType.PUT, "/a"), (EventType.PUT, "/b/c")]


async def test_close_ends_a_waiting_iteration(backend: Backend) -> None:
    w = await started(backend.watch(["/x/"]))
    seen: list[Event] = []

    async def consume() -> None:
        async for ev in w:
            seen.append(ev)

    task = asyncio.create_task(consume())
    await backend.put("/x/1", b"1")
    for _ in range(100):
        if seen:
            break
        await asyncio.sleep(0.01)
    await w.close()
    await asyncio.wait_for(task, WAIT)
    assert [e.type for e in seen] == [EventType.PUT]


async def test_backend_close_ends_watchers(tmp_path: Path, clock: FakeClock) -> None:
    for kind in ("memory", "sqlite"):
        b = _make(kind, tmp_path, clock)
        w = await started(b.watch(["/"]))
        await b.close()
        with pytest.raises(StopAsyncIteration):
            await next_event(w)
        with pytest.raises(WardgateError, match="closed"):
            await b.get("/x")


async def test_lagging_watcher_is_closed(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory_mod, "MAX_PENDING_EVENTS", 5)
    slow = await started(backend.watch(["/"]))
    fast = await started(backend.watch(["/"]))
    for i in range(4):
        await backend.put(f"/k{i}", b"x")
    assert len(await collect(fast, 4)) == 4
    for i in range(4, 8):
        await backend.put(f"/k{i}", b"x")
    assert len(await collect(fast, 4)) == 4
    with pytest.raises(WatcherClosedError):
        await next_event(slow)
    with pytest.raises(WatcherClosedError):
        await next_event(slow)  # stays failed


async def test_random_operations_match_a_model(tmp_path: Path, clock: FakeClock) -> None:
    """Both backends, driven by the same random script, agree on every result and revision."""
    rng = random.Random(1234)
    mem = MemoryBackend(clock=clock)
    sql = SQLiteBackend(tmp_path / "model.db", clock=clock)
    keys = [f"/{a}/{b}" for a in ("p", "q", "pq") for b in range(4)]

    async def run(b: Backend, op: str, key: str, rev: int, exp: float | None, limit: int | None) -> object:
        try:
            if op == "put":
                return await b.put(key, b"v%d" % rev, expires=exp)
            if op == "create":
                return await b.create(key, b"c%d" % rev, expires=exp)
            if op == "cas":
                return await b.compare_and_swap(key, rev, b"s%d" % rev, expires=exp)
            if op == "delete":
                return await b.delete(key)
            if op == "delete_range":
                return await b.delete_range(key[:2])
            if op == "range":
                return await b.range(key[:2], limit=limit)
            if op == "expire":
                return await reap(b)
            return await b.get(key)
        except WardgateError as exc:
            return type(exc)

    try:
        ops = ["put", "create", "cas", "delete", "delete_range", "range", "get", "get", "expire"]
        for _ in range(300):
            op, key = rng.choice(ops), rng.choice(keys)
            rev = rng.randint(0, 40)
            exp = rng.choice([None, None, clock.now + rng.randint(1, 5)])
            limit = rng.choice([None, 1, 3])
            assert await run(mem, op, key, rev, exp, limit) == await run(sql, op, key, rev, exp, limit), op
            clock.advance(rng.random())
        assert await mem.range("") == await sql.range("")
    finally:
        await mem.close()
        await sql.close()


# ---- SQLite only


def _sqlite(path: Path, clock: Callable[[], float] | None = None) -> SQLiteBackend:
    if clock is None:
        return SQLiteBackend(path, poll_interval=0.02)
    return SQLiteBackend(path, clock=clock, poll_interval=0.02)


async def test_sqlite_file_is_wal(tmp_path: Path) -> None:
    b = _sqlite(tmp_path / "w.db")
    await b.put("/a", b"1")
    with sqlite3.connect(tmp_path / "w.db") as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    await b.close()


async def test_sqlite_two_instances_share_writes_and_events(tmp_path: Path) -> None:
    a, b = _sqlite(tmp_path / "shared.db"), _sqlite(tmp_path / "shared.db")
    try:
        await a.put("/before", b"not an event")
        wb = await started(b.watch(["/users/"]))
        wa = await started(a.watch(["/users/"]))

        item = await a.put("/users/alice", b"from a")
        assert await b.get("/users/alice") == item
        from_b = await b.create("/users/bob", b"from b")
        assert await a.get("/users/bob") == from_b
        with pytest.raises(AlreadyExistsError):
            await a.create("/users/bob", b"again")
        with pytest.raises(CompareFailedError):
            await a.compare_and_swap("/users/alice", item.revision - 1, b"stale")
        await b.delete("/users/alice")

        expected = [
            (EventType.PUT, "/users/alice"),
            (EventType.PUT, "/users/bob"),
            (EventType.DELETE, "/users/alice"),
        ]
        assert await collect(wb, 3) == expected
        assert await collect(wa, 3) == expected
        await assert_quiet(wa)
        assert await a.current_revision() == await b.current_revision()
    finally:
        await a.close()
        await b.close()


async def test_sqlite_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "persist.db"
    b = _sqlite(path)
    kept = await b.put("/ca/user", b"\x00\xffkey bytes", expires=4e9)
    await b.put("/gone", b"x")
    await b.delete("/gone")
    last = await b.current_revision()
    await b.close()

    b = _sqlite(path)
    try:
        assert await b.get("/ca/user") == kept
        with pytest.raises(NotFoundError):
            await b.get("/gone")
        assert (await b.put("/next", b"x")).revision == last + 1
    finally:
        await b.close()


async def test_sqlite_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    a, b = _sqlite(tmp_path / "busy.db"), _sqlite(tmp_path / "busy.db")
    try:
        w = await started(a.watch(["/w/"]))
        results = await asyncio.gather(
            *(a.put(f"/w/a{i:03}", b"a") for i in range(200)),
            *(b.put(f"/w/b{i:03}", b"b") for i in range(200)),
        )
        revs = sorted(r.revision for r in results)
        assert revs == list(range(revs[0], revs[0] + 400))
        items = await b.range("/w/")
        assert len(items) == 400
        assert {i.key: i.revision for i in items} == {r.key: r.revision for r in results}
        seen = [await next_event(w) for _ in range(400)]
        assert [e.item.revision for e in seen if e.item] == revs
    finally:
        await a.close()
        await b.close()


async def test_sqlite_prunes_old_events(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_mod, "EVENTS_KEEP_ROWS", 10)
    path = tmp_path / "prune.db"
    a = _sqlite(path)
    b = SQLiteBackend(path, poll_interval=60)  # only its own writes wake its watchers
    try:
        behind = await started(b.watch(["/"]))
        await asyncio.sleep(0.05)  # let b's first tail pass happen before a writes
        for i in range(30):
            await a.put(f"/e/{i}", b"x")
        await a.expire_now()
        with sqlite3.connect(path) as raw:
            (count,) = raw.execute("SELECT count(*) FROM events").fetchone()
            (oldest,) = raw.execute("SELECT min(revision) FROM events").fetchone()
        assert (count, oldest) == (10, 21)

        await b.put("/wake", b"x")  # b tails again and finds its watcher's events pruned
        with pytest.raises(WatcherClosedError, match="pruned"):
            await next_event(behind)
        fresh = await started(b.watch(["/"]))
        await b.put("/e/new", b"x")
        assert await collect(fresh, 1) == [(EventType.PUT, "/e/new")]
    finally:
        await a.close()
        await b.close()


def test_sqlite_bad_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(WardgateError, match="cannot open the sqlite backend"):
        SQLiteBackend(tmp_path / "missing-dir" / "x.db")


def test_open_backend(tmp_path: Path) -> None:
    assert isinstance(open_backend("memory"), MemoryBackend)
    with pytest.raises(BadParameterError, match="path"):
        open_backend("sqlite")
    with pytest.raises(BadParameterError, match="postgres"):
        open_backend("postgres")
    with pytest.raises(BadParameterError, match="etcd"):
        open_backend("etcd")


async def test_open_backend_sqlite(tmp_path: Path) -> None:
    b = open_backend("sqlite", path=str(tmp_path / "o.db"))
    assert isinstance(b, SQLiteBackend)
    await b.put("/x", b"1")
    await b.close()
    assert (tmp_path / "o.db").exists()


async def test_sqlite_file_is_private(tmp_path: Path) -> None:
    """It holds CA private keys and password hashes."""
    b = _sqlite(tmp_path / "private.db")
    try:
        await b.put("/k", b"v")
        assert (tmp_path / "private.db").stat().st_mode & 0o077 == 0
    finally:
        await b.close()
