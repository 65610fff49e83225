"""The MySQL/MariaDB engine (`wardgate.agent.db.mysql.serve_mysql`) against a real MariaDB.

A real cluster issues the certificates: a user certificate routed to the database (what
`ward db login` gets), and the database service's own identity (joined with a `db` token) with
which the service fetches db-CA client certificates to log in upstream. The database service
runs in this process on a background loop behind a plain TCP listener, the way the proxy hands
it connections (TLS already terminated), and real clients connect to it: the `mariadb` CLI,
PyMySQL (text protocol) and mysql-connector-python (binary prepared statements).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import mysql.connector
import pymysql
import pytest

from tests.cluster import free_port, wardctl
from tests.dbengine import EngineEnv
from tests.dbservers import DB_PASSWORD, MariaDB, have_mariadb
from wardgate.agent.db import mysql as engine
from wardgate.agent.db.mysql import serve_mysql
from wardgate.protocols import mysql as my

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not have_mariadb() or not shutil.which("mariadb"), reason="MariaDB is not installed"),
]

DB = "maria"
PASSWORD_ENV = "WARDGATE_TEST_MARIA_PASSWORD"
ROLE = """kind: role
version: v1
metadata: {name: dbaccess}
spec:
  allow:
    db_labels: {'*': '*'}
    db_users: [reader, pwuser]
    db_names: [app]
"""


def _db_yaml(name: str, port: int) -> str:
    return f"""kind: db
version: v1
metadata: {{name: {name}, labels: {{env: test}}}}
spec:
  protocol: mysql
  uri: 127.0.0.1:{port}
  tls: {{mode: verify-full}}
  auth:
    passwords:
      pwuser: {{env: {PASSWORD_ENV}}}
"""


class Env(EngineEnv):
    """Cluster + MariaDB + a DatabaseService on a background loop."""

    DB = DB
    ROLE = ROLE
    PASSWORD_ENV = PASSWORD_ENV
    HOST_ID = "db-test-host"
    ENGINES = {"mysql": serve_mysql}

    def start_database(self) -> MariaDB:
        self.maria = MariaDB(self.tls)
        return self.maria

    def db_yaml(self, name: str, port: int) -> str:
        return _db_yaml(name, port)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("mysql-engine"))
    try:
        yield e
    finally:
        e.stop()


def mariadb(port: int, user: str, *args: str, db: str | None = "app") -> subprocess.CompletedProcess[str]:
    argv = [
        "mariadb",
        "--no-defaults",
        "-h",
        "127.0.0.1",
        "-P",
        str(port),
        "-u",
        user,
        "--skip-ssl",
        "-N",
        "-B",
    ]
    argv += list(args)
    if db:
        argv.append(db)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def new_sids(env: Env, before: set[str], event: str = "db.session.start") -> list[str]:
    return [e["sid"] for e in env.events(event) if e["sid"] not in before]


def sids(env: Env) -> set[str]:
    return {e.get("sid", "") for e in env.events()}


# ---------------------------------------------------------------- the mariadb CLI


def test_mariadb_cli_query_and_audit(env: Env) -> None:
    port = env.listen("reader")
    before = sids(env)
    out = mariadb(port, "reader", "-e", "select name from items order by id")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["apple", "pear"]
    [sid] = env.wait_for("a session", lambda: new_sids(env, before, "db.session.end"))
    evs = env.session_events(sid)
    start = next(e for e in evs if e["event"] == "db.session.start")
    assert start["success"] is True
    assert (start["user"], start["db_user"], start["db_name"], start["db_service"]) == (
        "alice", "reader", "app", DB
    )  # fmt: skip
    queries = [e["query"] for e in evs if e["event"] == "db.session.query"]
    assert "select name from items order by id" in queries
    ends = [e for e in evs if e["event"] == "db.session.end"]
    assert len(ends) == 1 and ends[0]["duration"] >= 0 and ends[0]["bytes_out"] > 0


def test_mariadb_cli_refusals_say_why(env: Env) -> None:
    port = env.listen("reader")
    before = sids(env)
    # A db user the certificate is not for.
    out = mariadb(port, "writer", "-e", "select 1")
    assert out.returncode != 0
    assert "ERROR 1045 (28000)" in out.stderr
    assert 'your certificate is for db user "reader", not "writer"' in out.stderr
    # A schema the roles do not allow.
    out = mariadb(port, "reader", "-e", "select 1", db="secret")
    assert "ERROR 1045 (28000)" in out.stderr
    assert 'no role allows database "maria" as db user "reader", db name "secret"' in out.stderr

    def refusals() -> list[dict[str, Any]]:
        return [e for e in env.events("db.session.start") if e["sid"] not in before]

    env.wait_for("two refusals", lambda: len(refusals()) == 2)
    fails = refusals()
    assert [(e["success"], e["db_user"], e["db_name"]) for e in fails] == [
        (False, "writer", "app"),
        (False, "reader", "secret"),
    ]
    assert not [e for e in env.events("db.session.end") if e["sid"] not in before]


def test_use_secret_mid_session_is_refused_and_the_session_goes_on(env: Env) -> None:
    port = env.listen("reader")
    # The CLI sends `use` as COM_INIT_DB (and stops after a failed `use`, as against MariaDB).
    out = mariadb(port, "reader", "-e", "use secret")
    assert "ERROR 1044 (42000)" in out.stderr
    assert 'no role allows database "maria" as db user "reader", db name "secret"' in out.stderr
    before = sids(env)
    conn = pymysql.connect(host="127.0.0.1", port=port, user="reader", database="app")
    try:
        with pytest.raises(pymysql.err.OperationalError) as info:
            conn.select_db("secret")  # COM_INIT_DB
        assert info.value.args[0] == 1044
        cur = conn.cursor()
        with pytest.raises(pymysql.err.OperationalError) as info:
            cur.execute("USE `secret`")  # COM_QUERY
        assert info.value.args[0] == 1044 and "no role allows" in info.value.args[1]
        cur.execute("select database(), count(*) from items")
        assert cur.fetchall() == (("app", 2),)
        conn.select_db("app")
        cur.execute("use app")
        cur.execute("select 1")
        assert cur.fetchall() == ((1,),)
    finally:
        conn.close()
    [sid] = env.wait_for("the session's end", lambda: new_sids(env, before, "db.session.end"))
    uses = [
        (e["command"], e["query"], e["success"])
        for e in env.session_events(sid)
        if e["event"] == "db.session.query" and "use" in e["query"].lower()
    ]
    assert uses == [
        ("COM_INIT_DB", "USE `secret`", False),
        ("COM_QUERY", "USE `secret`", False),
        ("COM_INIT_DB", "USE `app`", True),
        ("COM_QUERY", "use app", True),
    ]
    # A refused switch is also audited like a refused connection (by DBSession.authorize).
    refused = [e for e in env.session_events(sid) if e["event"] == "db.session.start" and not e["success"]]
    assert [e["db_name"] for e in refused] == ["secret", "secret"]


def test_password_user(env: Env) -> None:
    port = env.listen("pwuser")
    out = mariadb(port, "pwuser", "-e", "select current_user(), count(*) from items")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["pwuser@%", "2"]
    # The password is read for every login: a wrong one is the database's refusal, passed on.
    try:
        os.environ[PASSWORD_ENV] = "not-the-password"
        out = mariadb(port, "pwuser", "-e", "select 1")
        assert (
            "ERROR 1045 (28000): the database maria refused pwuser: Access denied for user 'pwuser'"
            in out.stderr
        )
        del os.environ[PASSWORD_ENV]
        out = mariadb(port, "pwuser", "-e", "select 1")
        assert "ERROR 1045 (28000): Wardgate cannot log in to maria as pwuser" in out.stderr
        assert f"${PASSWORD_ENV}, which is not set" in out.stderr
    finally:
        os.environ[PASSWORD_ENV] = DB_PASSWORD


def test_greeting_follows_the_database(env: Env) -> None:
    """The greeting reflects the database's version and offers only what it offered."""
    port = env.listen("reader")
    c = RawClient(port)
    c.close()
    assert "MariaDB" in c.greeting.server_version
    assert c.greeting.capabilities & my.CLIENT_DEPRECATE_EOF
    assert not c.greeting.capabilities & (my.CLIENT_SSL | my.CLIENT_COMPRESS | my.CLIENT_LOCAL_FILES)
    # A database that does not speak CLIENT_DEPRECATE_EOF (MySQL before 5.7.5): not offered, so
    # clients that would use it (the mariadb CLI does) fall back to EOF packets on both legs.
    key = ("127.0.0.1", env.maria.port)
    seen = engine._SEEN[key]
    engine._SEEN[key] = dataclasses.replace(seen, capabilities=seen.capabilities & ~my.CLIENT_DEPRECATE_EOF)
    c = RawClient(port)
    try:
        assert not c.greeting.capabilities & my.CLIENT_DEPRECATE_EOF
        c.send(0, bytes((my.COM_STMT_PREPARE,)) + b"select name from items where id = ?")
        ok = my.StmtPrepareOk.parse(c.must_read())
        for _ in range(ok.num_params + 1 + ok.num_columns + 1):  # definitions, each list + EOF
            c.must_read()
        c.send(0, _execute_payload(ok.stmt_id, 2))
        first = c.must_read()
        rows = [c.must_read() for _ in range(first[0] + 1)]  # column definitions + EOF
        while not my.is_eof(row := c.must_read()):
            rows.append(row)
        assert any(b"pear" in r for r in rows)
    finally:
        c.close()
    engine._SEEN[key] = dataclasses.replace(seen, capabilities=seen.capabilities & ~my.CLIENT_DEPRECATE_EOF)
    out = mariadb(port, "reader", "-e", "select name from items order by id")
    assert out.stdout.split() == ["apple", "pear"], out.stderr


# ---------------------------------------------------------------- drivers


def test_prepared_statements_are_audited_with_their_parameters(env: Env) -> None:
    port = env.listen("reader")
    before = sids(env)
    conn = mysql.connector.connect(host="127.0.0.1", port=port, user="reader", database="app", use_pure=True)
    try:
        cur = conn.cursor(prepared=True)  # COM_STMT_PREPARE + COM_STMT_EXECUTE (binary protocol)
        cur.execute("select id, name from items where id = %s or name = %s", (2, "apple"))
        assert sorted(cur.fetchall()) == [(1, "apple"), (2, "pear")]
        cur.execute("select id, name from items where id = %s or name = %s", (1, "x" * 300))
        assert cur.fetchall() == [(1, "apple")]
        cur.execute("select %s, %s, %s", (None, 1.5, b"\x00\xff"))
        assert cur.fetchall() == [(None, 1.5, bytearray(b"\x00\xff"))]
        cur.close()
        # A plain cursor afterwards still works on the same connection.
        plain = conn.cursor()
        plain.execute("select count(*) from items")
        assert plain.fetchall() == [(2,)]
    finally:
        conn.close()
    [sid] = env.wait_for("the session's end", lambda: new_sids(env, before, "db.session.end"))
    evs = [e for e in env.session_events(sid) if e["event"] == "db.session.query"]
    prepares = [e["query"] for e in evs if e["command"] == "COM_STMT_PREPARE"]
    assert prepares[0] == "select id, name from items where id = ? or name = ?"
    executes = [e for e in evs if e["command"] == "COM_STMT_EXECUTE"]
    assert [e["query"] for e in executes][:2] == [prepares[0]] * 2
    assert executes[0]["parameters"] == ["2", "apple"]
    assert executes[1]["parameters"][0] == "1"
    assert executes[1]["parameters"][1] == "x" * 256 + "…[truncated 44 bytes]"
    assert executes[2]["parameters"] == ["NULL", "1.5", "0x00ff"]


def test_change_user_is_refused_and_the_session_goes_on(env: Env) -> None:
    port = env.listen("reader")
    before = sids(env)
    conn = mysql.connector.connect(host="127.0.0.1", port=port, user="reader", database="app", use_pure=True)
    try:
        with pytest.raises(mysql.connector.Error) as info:
            conn.cmd_change_user(username="writer", database="app")
        assert "changing users inside a session is not allowed" in str(info.value)
        cur = conn.cursor()
        cur.execute("select current_user()")
        assert cur.fetchall() == [("reader@%",)]
    finally:
        conn.close()
    [sid] = env.wait_for("the session's end", lambda: new_sids(env, before, "db.session.end"))
    [ev] = [e for e in env.session_events(sid) if e["event"] == "db.session.command"]
    assert (ev["command"], ev["success"], ev["target_db_user"]) == ("COM_CHANGE_USER", False, "writer")


def test_pymysql_text_protocol_and_a_10mb_result(env: Env) -> None:
    port = env.listen("reader")
    before = sids(env)
    flags = pymysql.constants.CLIENT.MULTI_STATEMENTS
    conn = pymysql.connect(host="127.0.0.1", port=port, user="reader", database="app", client_flag=flags)
    try:
        cur = conn.cursor()
        cur.execute("select name from items where id = %s", (2,))
        assert cur.fetchall() == (("pear",),)
        cur.execute("select seq, repeat('x', 1000) from seq_1_to_10000")
        rows = cur.fetchall()
        assert len(rows) == 10000 and rows[-1] == (10000, "x" * 1000)
        cur.execute("select 1; select 2")  # multi-statements, multi-results
        assert cur.fetchall() == ((1,),)
        assert cur.nextset() and cur.fetchall() == ((2,),)
    finally:
        conn.close()
    [sid] = env.wait_for("the session's end", lambda: new_sids(env, before, "db.session.end"))
    queries = [e["query"] for e in env.session_events(sid) if e["event"] == "db.session.query"]
    assert "select name from items where id = 2" in queries
    [end] = [e for e in env.session_events(sid) if e["event"] == "db.session.end"]
    assert end["bytes_out"] > 10_000_000


def test_kill_query_reaches_the_right_thread(env: Env) -> None:
    """The greeting's connection id is Wardgate's; KILL QUERY with it stops that session's query."""
    port = env.listen("reader")
    before = sids(env)
    victim = pymysql.connect(host="127.0.0.1", port=port, user="reader", database="app")
    killer = pymysql.connect(host="127.0.0.1", port=port, user="reader", database="app")
    try:
        result: list[Any] = []

        def sleep() -> None:
            try:
                result.append(_query(victim, "select sleep(60)"))
            except pymysql.err.OperationalError as exc:
                result.append(exc.args[0])

        t = threading.Thread(target=sleep)
        t.start()
        env.wait_for("the sleep", lambda: "select sleep(60)" in [e.get("query") for e in env.events()])
        deadline = time.monotonic() + 20
        while t.is_alive() and time.monotonic() < deadline:
            _query(killer, f"kill query {victim.thread_id()}")
            t.join(1)
        assert not t.is_alive()
        assert result in ([((1,),)], [1317])  # SLEEP returns 1, or "Query execution was interrupted"
    finally:
        victim.close()
        killer.close()
    ev = env.wait_for(
        "the KILL",
        lambda: next(
            (e for e in env.events("db.session.query") if e["sid"] not in before and "upstream_query" in e),
            None,
        ),
    )
    assert ev["query"] == f"kill query {victim.thread_id()}"
    assert ev["upstream_query"].startswith("kill query ") and ev["upstream_query"] != ev["query"]


def _query(conn: Any, sql: str) -> Any:
    cur = conn.cursor()
    cur.execute(sql)
    return cur.fetchall()


# ---------------------------------------------------------------- the protocol by hand


class RawClient:
    """A MySQL client written with the codec, for what real clients never send."""

    def __init__(
        self, port: int, user: str = "reader", db: str | None = "app", *, login: bool = True
    ) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.framer = my.PacketReader()
        self.queue: deque[my.Packet] = deque()
        first = self.read()
        assert first is not None
        self.greeting = my.HandshakeV10.parse(first.payload)
        self.caps = (my.DEFAULT_CLIENT_CAPABILITIES | my.CLIENT_CONNECT_WITH_DB) & self.greeting.capabilities
        if login:
            resp = my.HandshakeResponse41(self.caps, user, b"\x01" * 20, db, my.NATIVE_PASSWORD)
            self.send(1, resp.encode())
            ok = self.read()
            assert ok is not None and my.is_ok(ok.payload), ok

    def send(self, seq: int, payload: bytes) -> None:
        self.sock.sendall(my.encode_packet(seq, payload))

    def read(self) -> my.Packet | None:
        while not self.queue:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.queue.extend(self.framer.feed(data))
        return self.queue.popleft()

    def must_read(self) -> bytes:
        pkt = self.read()
        assert pkt is not None, "the connection closed"
        return pkt.payload

    def result(self) -> list[bytes]:
        """One response to a query or execute: OK/ERR, or a whole result set (DEPRECATE_EOF)."""
        first = self.must_read()
        if my.is_ok(first) or my.is_err(first):
            return [first]
        columns, _ = my.read_lenenc_int(first)
        out = [first] + [self.must_read() for _ in range(columns)]
        while True:
            pkt = self.must_read()
            out.append(pkt)
            if my.is_err(pkt) or (pkt[:1] == b"\xfe" and len(pkt) < my.MAX_PAYLOAD):
                return out

    def prepared(self) -> my.StmtPrepareOk:
        ok = my.StmtPrepareOk.parse(self.must_read())
        for _ in range(ok.num_params + ok.num_columns):
            self.must_read()
        return ok

    def closed(self) -> bool:
        try:
            return self.sock.recv(65536) == b""
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()


def _execute_payload(stmt_id: int, value: int) -> bytes:
    """COM_STMT_EXECUTE with one LONGLONG parameter."""
    head = struct.pack("<BIBI", my.COM_STMT_EXECUTE, stmt_id, 0, 1)
    return head + b"\x00\x01" + struct.pack("<BB", my.TYPE_LONGLONG, 0) + struct.pack("<q", value)


def test_pipelined_prepare_and_execute(env: Env) -> None:
    """MariaDB's direct execute: PREPARE and EXECUTE(last prepared) sent back to back."""
    port = env.listen("reader")
    before = sids(env)
    c = RawClient(port)
    assert c.caps & my.CLIENT_DEPRECATE_EOF  # (the drivers above run without it)
    try:
        c.sock.sendall(
            my.encode_packet(0, bytes((my.COM_STMT_PREPARE,)) + b"select name from items where id = ?")
            + my.encode_packet(0, _execute_payload(my.STMT_ID_LAST_PREPARED, 2))
        )
        ok = c.prepared()
        assert ok.num_params == 1
        rows = c.result()
        assert any(b"pear" in r for r in rows)
        c.send(0, _execute_payload(ok.stmt_id, 1))
        assert any(b"apple" in r for r in c.result())
        c.send(0, bytes((my.COM_QUIT,)))
    finally:
        c.close()
    [sid] = env.wait_for("the session's end", lambda: new_sids(env, before, "db.session.end"))
    executes = [e for e in env.session_events(sid) if e.get("command") == "COM_STMT_EXECUTE"]
    assert [(e["query"], e["parameters"]) for e in executes] == [
        ("select name from items where id = ?", ["2"]),
        ("select name from items where id = ?", ["1"]),
    ]


def test_garbage_and_malformed_packets_are_refused(env: Env) -> None:
    port = env.listen("reader")
    # Not MySQL at all, instead of a login: refused, closed.
    c = RawClient(port, login=False)
    c.sock.sendall(b"GET / HTTP/1.1\r\nHost: db\r\n\r\n")
    err = my.ErrPacket.parse(c.must_read())
    assert err.code == 1043 and "Bad handshake" in err.message
    assert c.closed()
    c.close()
    # A schema name that is not UTF-8, after a good login: refused, closed.
    c = RawClient(port)
    c.send(0, bytes((my.COM_INIT_DB,)) + b"\xff\xfe")
    err = my.ErrPacket.parse(c.must_read())
    assert err.code == my.ER_UNKNOWN_COM_ERROR and "Malformed packet" in err.message
    assert c.closed()
    c.close()
    # A truncated COM_STMT_EXECUTE.
    c = RawClient(port)
    c.send(0, b"\x17\x01\x00")
    assert my.ErrPacket.parse(c.must_read()).code == my.ER_UNKNOWN_COM_ERROR
    assert c.closed()
    c.close()
    # A packet header announcing more than the engine holds for one command.
    c = RawClient(port)
    piece = b"x" * my.MAX_PAYLOAD
    for seq in range(4):  # 4 x 16 MiB continued, then a fifth header: past the 64 MiB limit
        c.sock.sendall(b"\xff\xff\xff" + bytes((seq,)) + (b"\x03" + piece[1:] if seq == 0 else piece))
    c.sock.sendall(b"\xff\xff\xff\x04")
    err = my.ErrPacket.parse(c.must_read())
    assert err.code == 1153 and "bigger than Wardgate's limit" in err.message
    assert c.closed()
    c.close()
    # The service carries on.
    out = mariadb(port, "reader", "-e", "select count(*) from items")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2"]


def test_client_gone_mid_query_ends_the_session(env: Env) -> None:
    port = env.listen("reader")
    before = sids(env)
    c = RawClient(port)
    c.send(0, bytes((my.COM_QUERY,)) + b"select sleep(20)")
    env.wait_for(
        "the query", lambda: [e for e in env.events("db.session.query") if e["query"] == "select sleep(20)"]
    )
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()  # a reset, mid-query
    [sid] = env.wait_for("the session's end", lambda: new_sids(env, before, "db.session.end"))
    assert len([e for e in env.session_events(sid) if e["event"] == "db.session.end"]) == 1


def test_database_down_or_killed(env: Env) -> None:
    closed = free_port()
    second = MariaDB(env.tls)
    try:
        doc = _db_yaml("maria2", second.port) + "---\n" + _db_yaml("down", closed)
        (env.root / "more.yaml").write_text(doc)
        wardctl(env.cluster.data_dir, "create", "-f", str(env.root / "more.yaml"))
        env.wait_for("the new databases", lambda: {"maria2", "down"} <= set(env.databases()))
        # Nothing listening: the client is told so.
        port = env.wait_for("a certificate", lambda: _try(lambda: env.listen("reader", db="down")))
        before = sids(env)
        out = mariadb(port, "reader", "-e", "select 1")
        assert "ERROR 1105 (HY000)" in out.stderr
        assert f"Wardgate cannot reach the database down (127.0.0.1:{closed})" in out.stderr
        [fail] = env.wait_for(
            "the failure", lambda: [e for e in env.events("db.session.start") if e["sid"] not in before]
        )
        assert fail["success"] is False and "cannot reach" in fail["error"]
        # A database killed while a client waits for an answer.
        port = env.wait_for("a certificate", lambda: _try(lambda: env.listen("reader", db="maria2")))
        before = sids(env)
        conn = pymysql.connect(host="127.0.0.1", port=port, user="reader", database="app")
        errors: list[Any] = []

        def sleep() -> None:
            try:
                _query(conn, "select sleep(30)")
            except pymysql.err.OperationalError as exc:
                errors.append(exc.args)

        t = threading.Thread(target=sleep)
        t.start()
        env.wait_for(
            "the query",
            lambda: [e for e in env.events("db.session.query") if e["query"] == "select sleep(30)"],
        )
        second.proc.kill()
        t.join(30)
        assert not t.is_alive()
        [(code, message)] = errors
        assert code == 2013 and "maria2" in message
        conn.close()
        [sid] = env.wait_for("the session's end", lambda: new_sids(env, before, "db.session.end"))
        assert sid
    finally:
        second.stop()
    # The service carries on with the other database.
    out = mariadb(env.listen("reader"), "reader", "-e", "select count(*) from items")
    assert out.stdout.split() == ["2"], out.stderr


def _try(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception:
        return None
