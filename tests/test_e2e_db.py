"""Database access end to end: real PostgreSQL and MariaDB behind a real `wardgate start`.

The databases trust the cluster's db CA (client-certificate logins, `cert` in pg_hba.conf and
`REQUIRE SUBJECT` in MariaDB) and one user logs in with a password read from the environment.
Clients are the real ones: `psql` and `mariadb` through `ward db connect`, and Python drivers
(asyncpg with prepared statements, PyMySQL) through `ward proxy db --tunnel`. A second process
serves a database only through its reverse tunnel.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.cluster import (
    BIN,
    SSHCluster,
    audit,
    free_port,
    joined_agent,
    login,
    wait_port,
    ward,
    ward_env,
    wardctl,
)
from tests.dbservers import DB_PASSWORD, MariaDB, Postgres, db_server_files, have_mariadb, have_postgres

pytestmark = pytest.mark.skipif(
    not (have_postgres() and have_mariadb()), reason="needs PostgreSQL and MariaDB"
)
os.environ["WG_TEST_DB_PASSWORD"] = DB_PASSWORD  # the database service reads pwuser's password here

ROLE = """kind: role
version: v1
metadata: {name: db-dev}
spec:
  allow:
    db_labels: {env: dev}
    db_users: [reader, pwuser]
    db_names: [app]
"""


class DBCluster:
    def __init__(self, root: Path) -> None:
        self.pg_port, self.my_port = free_port(), free_port()
        dbs = f"""db_service:
  enabled: true
  databases:
    - name: pg-main
      protocol: postgres
      uri: 127.0.0.1:{self.pg_port}
      labels: {{env: dev}}
      tls: {{mode: verify-full, server_name: localhost}}
      auth: {{passwords: {{pwuser: {{env: WG_TEST_DB_PASSWORD}}}}}}
    - name: maria
      protocol: mysql
      uri: 127.0.0.1:{self.my_port}
      labels: {{env: dev}}
      tls: {{mode: verify-ca}}
      auth: {{passwords: {{pwuser: {{env: WG_TEST_DB_PASSWORD}}}}}}
"""
        self.cluster = SSHCluster(root / "cluster", extra=dbs)
        self.pg: Postgres | None = None
        self.maria: MariaDB | None = None
        try:
            tls = db_server_files(self.cluster.data_dir, root / "tls")
            self.pg = Postgres(tls, port=self.pg_port)
            self.maria = MariaDB(tls, port=self.my_port)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self.cluster.stop()
        for server in (self.pg, self.maria):
            if server is not None:
                server.stop()


@pytest.fixture(scope="module")
def dbc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DBCluster]:
    c = DBCluster(tmp_path_factory.mktemp("db"))
    wardctl(c.cluster.data_dir, "create", "-f", "-", stdin=ROLE)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def dana(dbc: DBCluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("dana-ward")
    login(dbc.cluster, home, "dana", dbc.cluster.add_user("dana", "db-dev", "root"))
    return home


def run_ward(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return ward(home, *args, timeout=timeout)


def queries(dbc: DBCluster, user: str) -> list[dict]:
    """db.session.query events of a user, oldest first (the emitter ships them in batches)."""
    deadline = time.monotonic() + 10
    while True:
        found = [e for e in audit(dbc.cluster.data_dir, "--type", "db.session.query") if e["user"] == user]
        if found or time.monotonic() > deadline:
            return list(reversed(found))
        time.sleep(0.3)


def test_ward_db_ls_shows_the_databases(dbc: DBCluster, dana: Path) -> None:
    out = run_ward(dana, "db", "ls")
    assert out.returncode == 0, out.stderr
    assert "pg-main" in out.stdout and "maria" in out.stdout and "postgres" in out.stdout


def test_psql_through_ward_db_connect(dbc: DBCluster, dana: Path) -> None:
    out = run_ward(dana, "db", "login", "pg-main", "--db-user=reader", "--db-name=app")
    assert out.returncode == 0, out.stderr
    out = run_ward(dana, "db", "connect", "pg-main", "--", "-At", "-c", "select name from items order by id")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["apple", "pear"]
    q = [e for e in queries(dbc, "dana") if e.get("db_service") == "pg-main"]
    assert any("select name from items order by id" in e.get("query", "") for e in q)
    starts = [e for e in audit(dbc.cluster.data_dir, "--type", "db.session.start") if e["user"] == "dana"]
    assert starts and starts[0]["success"] and starts[0]["db_user"] == "reader"


def test_mariadb_client_through_ward_db_connect(dbc: DBCluster, dana: Path) -> None:
    out = run_ward(dana, "db", "login", "maria", "--db-user=reader", "--db-name=app")
    assert out.returncode == 0, out.stderr
    sql = "select name from items order by id"
    out = run_ward(dana, "db", "connect", "maria", "--", "-N", "-B", "-e", sql)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["apple", "pear"]
    q = [e for e in queries(dbc, "dana") if e.get("db_service") == "maria"]
    assert any("select name from items order by id" in e.get("query", "") for e in q)


def test_denied_db_user_and_db_name_are_refused_clearly(dbc: DBCluster, dana: Path) -> None:
    out = run_ward(dana, "db", "login", "pg-main", "--db-user=writer", "--db-name=app")
    assert out.returncode != 0
    assert 'db user "writer"' in out.stderr
    out = run_ward(dana, "db", "login", "pg-main", "--db-user=reader", "--db-name=secret")
    assert out.returncode != 0 and 'db name "secret"' in out.stderr
    # With a certificate for app, asking psql for another database is refused by the service.
    assert run_ward(dana, "db", "login", "pg-main", "--db-user=reader", "--db-name=app").returncode == 0
    out = run_ward(dana, "db", "connect", "pg-main", "--db-name=secret", "--", "-c", "select 1")
    assert out.returncode != 0


class LocalProxy:
    """`ward proxy db NAME [--tunnel] --port N` in the background."""

    def __init__(self, home: Path, name: str, *, tunnel: bool = True) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                str(BIN / "ward"),
                "proxy",
                "db",
                name,
                *(["--tunnel"] if tunnel else []),
                f"--port={self.port}",
            ],
            env=ward_env(home),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert wait_port(self.port, time.monotonic() + 20), "ward proxy db did not listen"
        assert self.proc.stdout is not None
        self.printed = [self.proc.stdout.readline(), self.proc.stdout.readline(), self.proc.stdout.readline()]
        self.command = self.printed[2].strip()
        """The client command line it printed."""

    def stop(self) -> str:
        """Stop it; what it printed (the connection hints, a warning per refused client)."""
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        return out


def test_python_drivers_with_prepared_statements_through_the_local_proxy(dbc: DBCluster, dana: Path) -> None:
    import asyncpg
    import pymysql

    assert run_ward(dana, "db", "login", "pg-main", "--db-user=reader", "--db-name=app").returncode == 0
    assert run_ward(dana, "db", "login", "maria", "--db-user=reader", "--db-name=app").returncode == 0
    pg, my = LocalProxy(dana, "pg-main"), LocalProxy(dana, "maria")
    try:

        async def with_asyncpg() -> list[str]:
            conn = await asyncpg.connect(
                host="127.0.0.1", port=pg.port, user="reader", database="app", ssl=False
            )
            try:
                stmt = await conn.prepare("select name from items where id = $1")
                return [await stmt.fetchval(1), await stmt.fetchval(2)]
            finally:
                await conn.close()

        assert asyncio.run(with_asyncpg()) == ["apple", "pear"]
        conn = pymysql.connect(
            host="127.0.0.1", port=my.port, user="reader", database="app", ssl_disabled=True
        )
        with conn.cursor() as cur:
            cur.execute("select name from items where id = %s", (2,))
            assert cur.fetchone() == ("pear",)
        conn.close()
    finally:
        pg.stop()
        my.stop()
    texts = [e.get("query", "") for e in queries(dbc, "dana")]
    assert any("select name from items where id = $1" in t for t in texts)
    params = [e.get("parameters") for e in queries(dbc, "dana") if "$1" in e.get("query", "")]
    assert ["1"] in params or [1] in params or any(p and "1" in map(str, p) for p in params)
    assert any("where id = 2" in t for t in texts)


def _psql(port: int, conninfo: str, sql: str = "select 1") -> subprocess.CompletedProcess:
    return subprocess.run(
        ["psql", f"host=127.0.0.1 port={port} user=reader dbname=app {conninfo}", "-w", "-At", "-c", sql],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PGPASSWORD": ""},
        stdin=subprocess.DEVNULL,
    )


def test_local_proxy_without_tunnel_wants_the_database_certificate(
    dbc: DBCluster, dana: Path, tmp_path: Path
) -> None:
    import asyncpg
    import pymysql

    assert run_ward(dana, "db", "login", "pg-main", "--db-user=reader", "--db-name=app").returncode == 0
    assert run_ward(dana, "db", "login", "maria", "--db-user=reader", "--db-name=app").returncode == 0
    files = json.loads(run_ward(dana, "db", "config", "pg-main", "--format=json").stdout)
    my_files = json.loads(run_ward(dana, "db", "config", "maria", "--format=json").stdout)
    cert, key, root = files["cert"], files["key"], files["local_ca"]
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-subj", "/CN=reader", "-days", "1",
         "-keyout", str(tmp_path / "o.key"), "-out", str(tmp_path / "o.crt")],
        check=True, capture_output=True,
    )  # fmt: skip
    other = f"sslmode=verify-ca sslrootcert='{root}' sslcert='{tmp_path}/o.crt' sslkey='{tmp_path}/o.key'"
    pg, my = LocalProxy(dana, "pg-main", tunnel=False), LocalProxy(dana, "maria", tunnel=False)
    try:
        argv = shlex.split(pg.command)
        assert argv[0] == "psql" and "sslmode=verify-ca" in argv[1] and root in argv[1] and cert in argv[1]
        sql = "select name from items order by id"
        out = subprocess.run([*argv, "-w", "-At", "-c", sql], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["apple", "pear"]

        out = _psql(pg.port, "sslmode=disable")
        assert out.returncode != 0
        assert "needs TLS with your database certificate" in out.stderr and "--tunnel" in out.stderr

        out = _psql(pg.port, f"sslmode=require sslrootcert='{root}'")
        assert out.returncode != 0 and "present your certificate" in out.stderr, out.stderr

        # TLS 1.3 checks the client's certificate after the client thinks the handshake is done:
        # psql reads either the alert or the close that follows it, depending on timing.
        out = _psql(pg.port, other)
        assert out.returncode != 0, out.stdout
        assert "SSL" in out.stderr or "closed the connection" in out.stderr, out.stderr

        async def with_asyncpg() -> list[str]:
            ctx = ssl.create_default_context(cafile=root)
            ctx.load_cert_chain(cert, key)
            conn = await asyncpg.connect(
                host="127.0.0.1", port=pg.port, user="reader", database="app", ssl=ctx
            )
            try:
                stmt = await conn.prepare("select name from items where id = $1")
                return [await stmt.fetchval(1), await stmt.fetchval(2)]
            finally:
                await conn.close()

        assert asyncio.run(with_asyncpg()) == ["apple", "pear"]

        mariadb = ["mariadb", "-h", "127.0.0.1", "-P", str(my.port), "--protocol=TCP", "-u", "reader"]
        mtls = [f"--ssl-ca={root}", f"--ssl-cert={my_files['cert']}", f"--ssl-key={my_files['key']}"]
        sql = ["-N", "-B", "-e", "select name from items order by id", "app"]
        out = subprocess.run(
            mariadb + mtls + ["--ssl-verify-server-cert"] + sql, capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["apple", "pear"]
        out = subprocess.run([*mariadb, "--skip-ssl", *sql], capture_output=True, text=True, timeout=30)
        assert out.returncode != 0 and "needs TLS with your database certificate" in out.stderr, out.stderr

        # MySQL clients send their ClientHello right behind the SSLRequest; the listener often
        # reads both at once. Several connections, so that case is met, not left to timing.
        for _ in range(15):
            conn = pymysql.connect(
                host="127.0.0.1", port=my.port, user="reader", database="app",
                ssl={"ca": root, "cert": my_files["cert"], "key": my_files["key"]},
            )  # fmt: skip
            with conn.cursor() as cur:
                cur.execute("select name from items where id = %s", (2,))
                assert cur.fetchone() == ("pear",)
            conn.close()
    finally:
        pg_out, my_out = "".join(pg.printed) + pg.stop(), "".join(my.printed) + my.stop()
    assert "sslmode=verify-ca" in pg_out and "connected without TLS" in pg_out, pg_out
    assert "its certificate is not yours" in pg_out, pg_out
    assert "--ssl-cert=" in my_out, my_out


def test_password_user_for_databases_that_cannot_trust_the_ca(dbc: DBCluster, dana: Path) -> None:
    assert run_ward(dana, "db", "login", "pg-main", "--db-user=pwuser", "--db-name=app").returncode == 0
    out = run_ward(dana, "db", "connect", "pg-main", "--", "-At", "-c", "select current_user")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "pwuser"


def test_locked_user_is_refused_with_the_lock_message(dbc: DBCluster, tmp_path: Path) -> None:
    home = tmp_path / "lee"
    login(dbc.cluster, home, "lee", dbc.cluster.add_user("lee", "db-dev", "root"))
    assert run_ward(home, "db", "login", "pg-main", "--db-user=reader", "--db-name=app").returncode == 0
    wardctl(dbc.cluster.data_dir, "lock", "--user=lee", "--ttl=1h", "--message=db-incident-9")
    out = run_ward(home, "db", "connect", "pg-main", "--", "-c", "select 1")
    assert out.returncode != 0
    assert "db-incident-9" in out.stdout + out.stderr
    refused = [
        e
        for e in audit(dbc.cluster.data_dir, "--type", "db.session.start")
        if e["user"] == "lee" and not e["success"]
    ]
    assert refused and "db-incident-9" in refused[0]["error"]


def _open_then_wait_for_cut(port: int, cut: Callable[[], None]) -> tuple[list[int], str]:
    """asyncpg through the local proxy: a query works, `cut()` happens, then queries are tried
    for up to 8 s; returns what the queries gave and how the connection ended."""
    import asyncpg

    async def go() -> tuple[list[int], str]:
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user="reader", database="app", ssl=False)
        got = [await conn.fetchval("select 1")]
        cut()
        deadline = time.monotonic() + 8
        try:
            while time.monotonic() < deadline:
                got.append(await conn.fetchval("select 2"))
                await asyncio.sleep(0.5)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError, OSError) as exc:
            return got, type(exc).__name__
        finally:
            conn.terminate()
        return got, ""

    return asyncio.run(go())


def test_a_lock_ends_an_open_database_session(dbc: DBCluster, tmp_path: Path) -> None:
    home = tmp_path / "lou"
    login(dbc.cluster, home, "lou", dbc.cluster.add_user("lou", "db-dev", "root"))
    assert run_ward(home, "db", "login", "pg-main", "--db-user=reader", "--db-name=app").returncode == 0
    proxy = LocalProxy(home, "pg-main")
    try:
        got, ended = _open_then_wait_for_cut(
            proxy.port,
            lambda: wardctl(dbc.cluster.data_dir, "lock", "--user=lou", "--ttl=1h", "--message=db-cutoff-3"),
        )
    finally:
        proxy.stop()
    assert got[0] == 1 and ended, f"the session outlived the lock: {got}"
    assert len(got) < 12  # cut off within the ~5 s the service promises, not at the deadline
    errors = [e for e in audit(dbc.cluster.data_dir, "--type", "db.session.error") if e["user"] == "lou"]
    assert errors and "db-cutoff-3" in errors[0]["error"]
    ends = [e for e in audit(dbc.cluster.data_dir, "--type", "db.session.end") if e["user"] == "lou"]
    assert ends


def test_idle_timeout_ends_a_quiet_database_session(dbc: DBCluster, tmp_path: Path) -> None:
    role = ROLE.replace("name: db-dev", "name: db-idle") + "  options: {client_idle_timeout: 2s}\n"
    wardctl(dbc.cluster.data_dir, "create", "-f", "-", stdin=role)
    home = tmp_path / "ida"
    login(dbc.cluster, home, "ida", dbc.cluster.add_user("ida", "db-idle", "root"))
    assert run_ward(home, "db", "login", "pg-main", "--db-user=reader", "--db-name=app").returncode == 0
    proxy = LocalProxy(home, "pg-main")
    try:
        got, ended = _open_then_wait_for_cut(proxy.port, lambda: time.sleep(4))
    finally:
        proxy.stop()
    assert got == [1] and ended
    errors = [e for e in audit(dbc.cluster.data_dir, "--type", "db.session.error") if e["user"] == "ida"]
    assert errors and "idle timeout of 2s" in errors[0]["error"]


def test_expired_certificate_is_refused_with_what_to_do(dbc: DBCluster, tmp_path: Path) -> None:
    home = tmp_path / "eve"
    login(dbc.cluster, home, "eve", dbc.cluster.add_user("eve", "db-dev", "root"), ttl="4s")
    assert run_ward(home, "db", "login", "pg-main", "--db-user=reader", "--db-name=app").returncode == 0
    time.sleep(5)
    out = run_ward(home, "db", "connect", "pg-main", "--", "-c", "select 1")
    assert out.returncode != 0
    assert "expired" in out.stderr and "ward login" in out.stderr


def test_database_behind_a_reverse_tunnel(dbc: DBCluster, tmp_path: Path, dana: Path) -> None:
    agent = joined_agent(
        dbc.cluster,
        tmp_path / "db-agent",
        "db",
        f"""db_service:
  enabled: true
  databases:
    - name: pg-tunnelled
      protocol: postgres
      uri: 127.0.0.1:{dbc.pg_port}
      labels: {{env: dev}}
      tls: {{mode: verify-full, server_name: localhost}}
""",
    )
    try:
        deadline = time.monotonic() + 20
        while "pg-tunnelled" not in run_ward(dana, "db", "ls").stdout:
            assert time.monotonic() < deadline, agent.output()
            time.sleep(0.5)
        out = run_ward(dana, "db", "login", "pg-tunnelled", "--db-user=reader", "--db-name=app")
        assert out.returncode == 0, out.stderr
        sql = "select count(*) from items"
        out = run_ward(dana, "db", "connect", "pg-tunnelled", "--", "-At", "-c", sql)
        assert out.returncode == 0, out.stderr + agent.output()
        assert out.stdout.strip() == "2"
    finally:
        agent.stop()


def test_per_session_mfa_asks_for_a_code(dbc: DBCluster, tmp_path: Path) -> None:
    import pexpect

    from tests.cluster import current_code

    role = ROLE.replace("name: db-dev", "name: db-mfa") + "  options: {require_session_mfa: true}\n"
    wardctl(dbc.cluster.data_dir, "create", "-f", "-", stdin=role)
    home = tmp_path / "max"
    secret = dbc.cluster.add_user("max", "db-mfa", "root")
    login(dbc.cluster, home, "max", secret)  # spends the current TOTP step
    child = pexpect.spawn(
        str(BIN / "ward"),
        ["db", "connect", "pg-main", "--db-user=reader", "--db-name=app", "--", "-At", "-c", "select 40+2"],
        env=ward_env(home),
        encoding="utf-8",
        timeout=60,
    )
    child.expect("require MFA for each session")
    child.sendline(current_code(secret, time.time() + 30))
    child.expect("42")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    # Without a terminal to ask in, the refusal says why.
    out = run_ward(home, "db", "connect", "pg-main", "--db-user=pwuser", "--", "-c", "select 1")
    assert out.returncode != 0 and "second factor" in out.stderr
