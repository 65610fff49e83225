"""The PostgreSQL engine (`wardgate.agent.db.postgres.serve_postgres`) against a real PostgreSQL.

A real cluster issues the certificates: a user certificate routed to the database (what
`ward db login` gets), and the database service's own identity (joined with a `db` token) with
which the service fetches db-CA client certificates to log in upstream. The database service
runs in this process on a background loop behind a plain TCP listener, the way the proxy hands it
connections (TLS already terminated), and real clients connect to it: `psql`, asyncpg (extended
protocol, prepared statements, COPY, cancel on timeout), and a raw socket for what no polite
client sends.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import pytest

from tests.dbengine import EngineEnv
from tests.dbservers import DB_PASSWORD, PG_BIN, Postgres, have_postgres
from wardgate.agent.db import postgres as engine_mod
from wardgate.agent.db.postgres import ServerFramer, serve_postgres
from wardgate.protocols import postgres as pg

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not have_postgres(), reason="PostgreSQL is not installed")]

DB = "pg"
DOOMED = "pg-doomed"
PASSWORD_ENV = "WARDGATE_TEST_PG_PASSWORD"
ROLE = """kind: role
version: v1
metadata: {name: dbaccess}
spec:
  allow:
    db_labels: {'*': '*'}
    db_users: [reader, pwuser, md5user, ptuser, nopw]
    db_names: [app]
"""
# Extra logins: MD5 and cleartext passwords, and a password user whose password is not configured.
HBA_EXTRA = (
    "host all md5user 127.0.0.1/32 md5\n"
    "host all ptuser 127.0.0.1/32 password\n"
    "host all nopw 127.0.0.1/32 scram-sha-256\n"
)


def _db_yaml(name: str, port: int) -> str:
    return f"""kind: db
version: v1
metadata: {{name: {name}, labels: {{env: test}}}}
spec:
  protocol: postgres
  uri: 127.0.0.1:{port}
  tls: {{mode: verify-full, server_name: localhost}}
  auth:
    passwords:
      pwuser: {{env: {PASSWORD_ENV}}}
      md5user: {{env: {PASSWORD_ENV}}}
      ptuser: {{env: {PASSWORD_ENV}}}
"""


def add_password_users(server: Postgres) -> None:
    hba = server.data / "pg_hba.conf"
    hba.write_text(HBA_EXTRA + hba.read_text())
    server.sql(
        f"SET password_encryption = 'md5'; CREATE ROLE md5user LOGIN PASSWORD '{DB_PASSWORD}';"
        f"RESET password_encryption; CREATE ROLE ptuser LOGIN PASSWORD '{DB_PASSWORD}';"
        "CREATE ROLE nopw LOGIN PASSWORD 'unknown-to-wardgate'; SELECT pg_reload_conf()"
    )
    server.sql("GRANT ALL ON items TO md5user, ptuser, nopw", db="app")


class Env(EngineEnv):
    """Cluster + PostgreSQL + a DatabaseService on a background loop."""

    DB = DB
    ROLE = ROLE
    PASSWORD_ENV = PASSWORD_ENV
    HOST_ID = "pg-test-host"
    ENGINES = {"postgres": serve_postgres}

    def start_database(self) -> Postgres:
        self.doomed: Postgres | None = None
        self.stack.callback(lambda: self.doomed.stop() if self.doomed is not None else None)
        self.pg = Postgres(self.tls)
        try:
            add_password_users(self.pg)
        except BaseException:
            self.pg.stop()
            raise
        return self.pg

    def db_yaml(self, name: str, port: int) -> str:
        return _db_yaml(name, port)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("pg-engine"))
    try:
        yield e
    finally:
        e.stop()


@pytest.fixture(params=["transports", "streams"])
def relay(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The relay on transports (asyncio streams handed to the engine) or on streams (what an SSH
    channel of a reverse tunnel gets)."""
    if request.param == "streams":
        monkeypatch.setattr(engine_mod._Engine, "relay", engine_mod._Engine.relay_streams)
    return str(request.param)


def psql(
    port: int, user: str, *args: str, db: str | None = "app", stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    conninfo = f"host=127.0.0.1 port={port} user={user} sslmode=prefer connect_timeout=20"
    if db:
        conninfo += f" dbname={db}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return subprocess.run(
        ["psql", conninfo, "-X", "-v", "ON_ERROR_STOP=1", *args],
        capture_output=True,
        text=True,
        timeout=120,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        env=env,
    )


def sids(env: Env) -> set[str]:
    return {e.get("sid", "") for e in env.events()}


def new_sids(env: Env, before: set[str], event: str = "db.session.end") -> list[str]:
    return [e["sid"] for e in env.events(event) if e["sid"] not in before]


def one_session(env: Env, before: set[str]) -> list[dict[str, Any]]:
    """The events of the one session that ended since `before`."""
    [sid] = env.wait_for("the session's end", lambda: new_sids(env, before))
    return env.session_events(sid)


def queries(evs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in evs if e["event"] == "db.session.query"]


async def connect(port: int, user: str = "reader", **kw: Any) -> asyncpg.Connection:
    return await asyncpg.connect(host="127.0.0.1", port=port, user=user, database="app", ssl=False, **kw)


class Raw:
    """A client that speaks the protocol by hand, to send what real clients never do."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.reader = pg.BackendReader(max_message=64 << 20)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_until(self, want: Callable[[list[Any]], bool]) -> tuple[list[Any], bool]:
        """Server messages until `want(messages)` or EOF; (messages, eof)."""
        out: list[Any] = []
        while not want(out):
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                return out, True
            out.extend(self.reader.feed(data))
        return out, False

    def read_to_eof(self) -> list[Any]:
        return self.read_until(lambda _: False)[0]

    def login(self, user: str = "reader", db: str = "app") -> list[Any]:
        self.send(pg.startup_message({"user": user, "database": db}))
        msgs, eof = self.read_until(lambda m: bool(m) and isinstance(m[-1], pg.ReadyForQuery))
        assert not eof, msgs
        return msgs

    def close(self) -> None:
        self.sock.close()


def errors(msgs: list[Any]) -> list[pg.ErrorResponse]:
    return [m for m in msgs if isinstance(m, pg.ErrorResponse)]


def backend_running(env: Env, needle: str) -> bool:
    sql = f"select count(*) from pg_stat_activity where query like '%{needle}%' and pid <> pg_backend_pid()"
    return env.pg.sql(sql).strip() != "0"


# ---------------------------------------------------------------- the framer, alone


def test_server_framer_walks_any_split_and_assembles_only_what_the_tracker_needs() -> None:
    big_row = pg.encode_message(b"D", b"\x00\x01" + struct.pack("!i", 300_000) + b"x" * 300_000)
    stream = (
        pg.encode_message(b"1")
        + pg.encode_message(b"t", b"\x00\x01\x00\x00\x00\x17")
        + pg.encode_message(b"2")
        + big_row
        + pg.encode_message(b"C", b"SELECT 1\x00")
        + pg.ready_for_query(b"T")
        + pg.error_response("boom", code="57P01", severity="FATAL")
    )
    expected = [(ord("1"), b""), (ord("t"), b"\x00\x01\x00\x00\x00\x17"), (ord("2"), b""), (ord("Z"), b"T")]
    for step in (1, 2, 3, 4, 5, 7, 4096, 65536, len(stream)):
        seen: list[tuple[int, bytes]] = []
        framer = ServerFramer(lambda t, body, seen=seen: seen.append((t, bytes(body))))
        boundaries = []
        for i in range(0, len(stream), step):
            framer.feed(stream[i : i + step])
            boundaries.append(framer.at_boundary)
        assert seen[:4] == expected, step
        assert seen[4][0] == ord("E") and b"57P01" in seen[4][1]
        assert len(seen) == 5 and boundaries[-1] is True
        if step < len(big_row):
            assert False in boundaries  # in the middle of the big row at some point


def test_server_framer_refuses_nonsense_lengths() -> None:
    framer = ServerFramer(lambda t, b: None, max_message=1 << 20)
    with pytest.raises(pg.ProtocolError, match="minimum"):
        framer.feed(b"D\x00\x00\x00\x02")
    framer = ServerFramer(lambda t, b: None, max_message=1 << 20)
    with pytest.raises(pg.ProtocolError, match="limit") as info:
        framer.feed(b"D\x10\x00\x00\x00")
    assert info.value.kind == "oversized"


# ---------------------------------------------------------------- psql


def test_psql_query_and_audit(env: Env, relay: str) -> None:
    port = env.listen("reader")
    before = sids(env)
    out = psql(port, "reader", "-At", "-c", "select name from items order by id")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["apple", "pear"]
    evs = one_session(env, before)
    start = next(e for e in evs if e["event"] == "db.session.start")
    assert start["success"] is True
    assert (start["user"], start["db_user"], start["db_name"], start["db_service"]) == (
        "alice", "reader", "app", DB
    )  # fmt: skip
    assert start["application_name"] == "psql"
    assert [e["query"] for e in queries(evs)] == ["select name from items order by id"]
    ends = [e for e in evs if e["event"] == "db.session.end"]
    assert len(ends) == 1 and ends[0]["duration"] >= 0 and ends[0]["bytes_out"] > 0


def test_sql_prepare_and_execute_are_audited_as_their_text(env: Env) -> None:
    port = env.listen("reader")
    before = sids(env)
    script = "PREPARE byid(int) AS select name from items where id = $1;\nEXECUTE byid(2);\n"
    out = psql(port, "reader", "-At", stdin=script)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["PREPARE", "pear"] or out.stdout.split() == ["pear"]
    texts = [e["query"] for e in queries(one_session(env, before))]
    assert texts == ["PREPARE byid(int) AS select name from items where id = $1;", "EXECUTE byid(2);"]


def test_psql_refusals_say_why(env: Env) -> None:
    port = env.listen("reader")
    before = sids(env)
    out = psql(port, "writer", "-c", "select 1")
    assert out.returncode != 0
    assert 'FATAL:  your certificate is for db user "reader", not "writer"' in out.stderr
    out = psql(port, "reader", "-c", "select 1", db="secret")
    assert out.returncode != 0
    assert 'FATAL:  no role allows database "pg" as db user "reader", db name "secret"' in out.stderr
    # No database named: PostgreSQL's default is the user's name, and that is what is checked.
    out = psql(port, "reader", "-c", "select 1", db=None)
    assert 'db name "reader"' in out.stderr
    fails = env.wait_for(
        "three refusals",
        lambda: (
            [e for e in env.events("db.session.start") if e["sid"] not in before][2:]
            and [e for e in env.events("db.session.start") if e["sid"] not in before]
        ),
    )
    assert [(e["success"], e["db_user"], e["db_name"]) for e in fails] == [
        (False, "writer", "app"),
        (False, "reader", "secret"),
        (False, "reader", "reader"),
    ]
    assert not [e for e in env.events("db.session.end") if e["sid"] not in before]


@pytest.mark.parametrize("user", ["pwuser", "md5user", "ptuser"], ids=["scram", "md5", "cleartext"])
def test_password_logins(env: Env, user: str) -> None:
    port = env.listen(user)
    out = psql(port, user, "-At", "-c", "select current_user, count(*) from items")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{user}|2"


def test_a_password_nobody_configured_is_explained(env: Env) -> None:
    port = env.listen("nopw")
    before = sids(env)
    out = psql(port, "nopw", "-c", "select 1")
    assert out.returncode != 0
    assert 'FATAL:  database pg asks for a password for db user "nopw"' in out.stderr
    assert "auth.passwords" in out.stderr
    [fail] = env.wait_for(
        "the refusal", lambda: [e for e in env.events("db.session.start") if e["sid"] not in before]
    )
    assert fail["success"] is False and "asks for a password" in fail["error"]


def test_the_databases_own_login_error_is_relayed(env: Env) -> None:
    """A wrong configured password: the database refuses, in its own words."""
    port = env.listen("pwuser")
    before = sids(env)
    os.environ[PASSWORD_ENV] = "wrong-password"
    try:
        out = psql(port, "pwuser", "-c", "select 1")
    finally:
        os.environ[PASSWORD_ENV] = DB_PASSWORD
    assert out.returncode != 0
    assert 'FATAL:  password authentication failed for user "pwuser"' in out.stderr
    [fail] = env.wait_for(
        "the refusal", lambda: [e for e in env.events("db.session.start") if e["sid"] not in before]
    )
    assert fail["success"] is False and "password authentication failed" in fail["error"]


def test_copy_both_ways_with_psql(env: Env, relay: str) -> None:
    port = env.listen("reader")
    rows = "".join(f"{i}\tname-{i}\n" for i in range(1000, 6000))
    script = (
        "create temp table t (id int, name text);\n"
        "copy t from stdin;\n" + rows + "\\.\n"
        "select count(*), sum(id) from t;\n"
        "copy (select * from t order by id) to stdout;\n"
    )
    out = psql(port, "reader", "-At", stdin=script)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert f"5000|{sum(range(1000, 6000))}" in lines
    assert "".join(line + "\n" for line in lines if "\t" in line) == rows


def test_a_20mb_result_through_psql(env: Env, relay: str) -> None:
    port = env.listen("reader")
    before = sids(env)
    out = psql(port, "reader", "-At", "-c", "select i, repeat('x', 1000) from generate_series(1, 20000) i")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 20000 and lines[-1] == "20000|" + "x" * 1000
    [end] = [e for e in one_session(env, before) if e["event"] == "db.session.end"]
    assert end["bytes_out"] > 20_000_000


# ---------------------------------------------------------------- asyncpg (extended protocol)


def test_asyncpg_prepared_statements_are_audited_with_their_parameters(env: Env, relay: str) -> None:
    port = env.listen("reader")
    before = sids(env)

    async def go() -> None:
        conn = await connect(port)
        try:
            stmt = await conn.prepare("select name from items where id = $1")
            assert [await stmt.fetchval(1), await stmt.fetchval(2)] == ["apple", "pear"]
            row = await conn.fetchrow(
                "select $1::text, $2::int, $3::bytea, $4::text", "x" * 300, 7, b"\0\xff", None
            )
            assert tuple(row) == ("x" * 300, 7, b"\0\xff", None)
            await conn.execute("create temp table t (a int, b text)")
            await conn.executemany("insert into t values ($1, $2)", [(1, "one"), (2, "two")])
            assert await conn.fetchval("select string_agg(b, ',' order by a) from t") == "one,two"
            # A big single value (a DataRow far larger than one read).
            blob = await conn.fetchval("select decode(repeat('ab', 10000000), 'hex')")
            assert blob == b"\xab" * 10_000_000
            # Cursors fetch a portal in several Executes: still one audited statement.
            async with conn.transaction():
                cur = await conn.cursor("select i from generate_series(1, 10) i where i > $1", 0)
                assert [r[0] for r in await cur.fetch(4)] + [r[0] for r in await cur.fetch(10)] == list(
                    range(1, 11)
                )
        finally:
            await conn.close()

    asyncio.run(go())
    evs = queries(one_session(env, before))
    by_text: dict[str, list[Any]] = {}
    for e in evs:
        by_text.setdefault(e["query"], []).append(e.get("parameters"))
    assert by_text["select name from items where id = $1"] == [["1"], ["2"]]
    assert by_text["select $1::text, $2::int, $3::bytea, $4::text"] == [
        ["x" * 256 + "…[truncated 44 bytes]", "7", "\\x00ff", None]
    ]
    assert by_text["insert into t values ($1, $2)"] == [["1", "one"], ["2", "two"]]
    assert by_text["select i from generate_series(1, 10) i where i > $1"] == [["0"]]
    assert "" not in by_text  # every executed statement's text was known


def test_asyncpg_copy_to_and_from(env: Env, relay: str) -> None:
    port = env.listen("reader")

    async def go() -> tuple[str, int]:
        conn = await connect(port)
        try:
            await conn.execute("create temp table c (a int, b text)")
            await conn.copy_records_to_table("c", records=[(i, f"r{i}") for i in range(20000)])
            sink: list[bytes] = []

            async def collect(chunk: bytes) -> None:
                sink.append(chunk)

            await conn.copy_from_query("select * from c order by a", output=collect)
            return b"".join(sink).decode(), await conn.fetchval("select count(*) from c")
        finally:
            await conn.close()

    text, count = asyncio.run(go())
    assert count == 20000
    assert text.splitlines()[-1] == "19999\tr19999" and len(text.splitlines()) == 20000


def test_cancel_request_stops_the_query(env: Env, relay: str) -> None:
    port = env.listen("reader")
    before = sids(env)

    async def go() -> int:
        conn = await connect(port)
        try:
            with pytest.raises(TimeoutError):
                await conn.fetchval("select pg_sleep(30) /* cancel-me */", timeout=1)
            return await conn.fetchval("select 41 + 1")  # the session goes on
        finally:
            await conn.close()

    assert asyncio.run(go()) == 42
    cancels = env.wait_for(
        "the cancel", lambda: [e for e in env.events("db.session.cancel") if e["sid"] not in before]
    )
    assert cancels[0]["success"] is True
    started = {e["sid"] for e in env.events("db.session.start") if e["sid"] not in before and e["success"]}
    assert cancels[0]["target_sid"] in started
    assert not backend_running(env, "cancel-me")


def test_client_leaving_mid_query_stops_the_query(env: Env, relay: str) -> None:
    port = env.listen("reader")
    before = sids(env)
    raw = Raw(port)
    raw.login()
    raw.send(pg.query("select pg_sleep(60) /* abandoned */"))
    env.wait_for("the query to run", lambda: backend_running(env, "abandoned"))
    raw.close()
    env.wait_for("the query to stop", lambda: not backend_running(env, "abandoned"))
    evs = one_session(env, before)
    assert len([e for e in evs if e["event"] == "db.session.end"]) == 1
    assert psql(port, "reader", "-At", "-c", "select 1").stdout.strip() == "1"


# ---------------------------------------------------------------- what no polite client sends


@pytest.mark.parametrize(
    ("packet", "words"),
    [
        (struct.pack("!ii", 8, 0x00010000), "unsupported frontend protocol 1.0"),
        (struct.pack("!i", 1 << 20) + b"\0" * 8, "exceeds"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "plain HTTP"),
        (struct.pack("!ii", 8, 196608) + b"user\0", "startup"),  # length says 8, then junk follows
    ],
    ids=["old-protocol", "oversized", "http", "malformed"],
)
def test_malformed_startup_gets_a_clean_error(env: Env, packet: bytes, words: str) -> None:
    port = env.listen("reader")
    raw = Raw(port)
    raw.send(packet)
    msgs = raw.read_to_eof()
    raw.close()
    [err] = errors(msgs)
    assert err.code == "08P01" and words in err.message, err.message
    assert psql(port, "reader", "-At", "-c", "select 1").stdout.strip() == "1"


def test_encryption_requests_are_declined_then_startup_goes_on(env: Env) -> None:
    port = env.listen("reader")
    raw = Raw(port)
    raw.send(pg.gssenc_request())
    assert raw.sock.recv(1) == b"N"
    raw.send(pg.ssl_request())
    assert raw.sock.recv(1) == b"N"
    msgs = raw.login()
    assert isinstance(msgs[0], pg.Authentication) and msgs[0].code == pg.AUTH_OK
    assert any(isinstance(m, pg.BackendKeyData) for m in msgs)
    raw.send(pg.query("select 1") + pg.terminate())
    msgs = raw.read_to_eof()
    assert [m.type for m in msgs if isinstance(m, pg.BackendMessage)][-1] == b"C"
    raw.close()


def test_queries_sent_with_the_startup_are_relayed_and_audited(env: Env, relay: str) -> None:
    """A client that does not wait for the login (and splits a message across writes)."""
    port = env.listen("reader")
    before = sids(env)
    raw = Raw(port)
    second = pg.query("select 'second' /* piped-2 */")
    raw.send(
        pg.startup_message({"user": "reader", "database": "app"})
        + pg.query("select 1 /* piped-1 */")
        + second[:9]
    )
    time.sleep(0.2)
    raw.send(second[9:])
    msgs, eof = raw.read_until(lambda m: sum(isinstance(x, pg.ReadyForQuery) for x in m) == 3)
    assert not eof and not errors(msgs)
    raw.send(pg.terminate())
    raw.read_to_eof()
    raw.close()
    texts = [e["query"] for e in queries(one_session(env, before))]
    assert texts == ["select 1 /* piped-1 */", "select 'second' /* piped-2 */"]


def test_oversized_and_garbage_messages_end_the_session_cleanly(env: Env, relay: str) -> None:
    port = env.listen("reader")
    before = sids(env)
    raw = Raw(port)
    raw.login()
    raw.send(b"Q" + struct.pack("!i", 300 << 20) + b"select ")  # 300 MiB declared
    msgs = raw.read_to_eof()
    raw.close()
    [err] = errors(msgs)
    assert err.code == "54000" and "exceeds" in err.message
    raw = Raw(port)
    raw.login()
    raw.send(b"\x01\x02\x03\x04\x05\x06")
    [err] = errors(raw.read_to_eof())
    raw.close()
    assert err.code == "08P01" and "not a PostgreSQL frontend message" in err.message
    env.wait_for("two ends", lambda: len(new_sids(env, before)) == 2)
    assert len([e for e in env.events("db.session.error") if e["sid"] not in before]) == 2
    assert psql(port, "reader", "-At", "-c", "select 1").stdout.strip() == "1"


# ---------------------------------------------------------------- the database going away


def test_database_killed_mid_session(env: Env) -> None:
    env.doomed = Postgres(env.tls)
    env.add_database(DOOMED, env.doomed.port)
    port = env.listen("reader", db=DOOMED)
    before = sids(env)
    idle = Raw(port)
    idle.login()
    busy = Raw(port)
    busy.login()
    busy.send(pg.query("select pg_sleep(60) /* doomed */"))
    env.wait_for("the query to run", lambda: "1" in env.doomed.sql(  # type: ignore[union-attr]
        "select count(*) from pg_stat_activity where query like '%doomed */'"
    ))  # fmt: skip
    pg_ctl = [str(PG_BIN / "pg_ctl"), "-D", str(env.doomed.data), "-m", "immediate", "stop"]
    subprocess.run(["runuser", "-u", "postgres", "--", *pg_ctl], capture_output=True, timeout=60, check=True)
    for client in (busy, idle):
        msgs = client.read_to_eof()
        client.close()
        errs = errors(msgs)
        assert errs and errs[-1].severity == "FATAL", msgs
    ends = env.wait_for("two ends", lambda: len(new_sids(env, before)) == 2 and new_sids(env, before))
    for sid in ends:
        assert len([e for e in env.session_events(sid) if e["event"] == "db.session.end"]) == 1
    # Nothing listens there now: a clear error, and the service serves others meanwhile.
    out = psql(port, "reader", "-c", "select 1")
    assert (
        out.returncode != 0 and f"cannot reach database {DOOMED} at 127.0.0.1:{env.doomed.port}" in out.stderr
    )
    fail = [e for e in env.events("db.session.start") if e["sid"] not in before and not e["success"]]
    assert fail and "cannot reach database" in fail[-1]["error"]
    ok = psql(env.listen("reader"), "reader", "-At", "-c", "select 1")
    assert ok.stdout.strip() == "1"
