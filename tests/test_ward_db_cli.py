"""`ward db …`, `ward proxy db` and `wardctl auth sign --format=db`, without real databases.

The proxy here is a test double speaking the contract the real one implements: one TLS port
with a host-CA certificate, routed by ALPN: `ward-auth` is relayed to a small aiohttp app
answering `/v1/databases/visible` and `/v1/certs/db-user` (signing with a throw-away user CA,
as the auth service does); `ward-postgres` and `ward-mysql` record who connected (the route in
the client certificate) and then echo, the mysql one after a greeting of its own, since MySQL
servers speak first. End-to-end tests with real PostgreSQL and MariaDB live elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shlex
import signal
import socket
import ssl
import stat
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.cluster import SSHCluster, wardctl
from tests.test_ward_client import CLUSTER, Cluster, LoopThread
from wardgate.auth.certs import verify_tls_identity
from wardgate.auth.identity import Identity, RouteToDatabase
from wardgate.cli.ward import main as ward_main
from wardgate.client.db import (
    ClientProgram,
    DBLogin,
    DBStore,
    DBTunnel,
    client_argv,
    client_env,
    connect_command,
    db_login,
    env_lines,
    find_client,
    mysql_argv,
    open_db_stream,
    psql_argv,
    psql_conninfo,
)
from wardgate.client.profile import ProfileStore
from wardgate.errors import BadParameterError
from wardgate.keys import load_x509, public_key_pem

BIN = Path(sys.executable).parent
DATABASES = [
    {"name": "pg", "description": "Orders", "protocol": "postgres", "labels": {"env": "prod"},
     "db_users": ["alice", "reader"]},
    {"name": "my", "description": "", "protocol": "mysql", "labels": {"env": "dev", "tier": "2"},
     "db_users": ["bob"]},
]  # fmt: skip
ALLOWED = {"pg": {"alice", "reader", "silent"}, "my": {"bob"}}
"""db users the fake auth API certifies; `silent` makes the fake proxy hang up without a word."""


class FakeAuth:
    """The two auth API calls `ward db` makes, signing like the auth service does."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.cert_calls: list[dict[str, Any]] = []
        self.ttl = timedelta(hours=1)
        self.app = web.Application()
        self.app.router.add_get("/v1/databases/visible", self.visible)
        self.app.router.add_post("/v1/certs/db-user", self.db_user)

    async def visible(self, request: web.Request) -> web.Response:
        return web.json_response({"databases": DATABASES})

    async def db_user(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.cert_calls.append(body)
        db = next((d for d in DATABASES if d["name"] == body["db"]), None)
        if db is None:
            msg = f'database "{body["db"]}" not found: `ward db ls` lists the ones you can reach'
            return web.json_response({"error": {"code": "not_found", "message": msg}}, status=404)
        if body["db_user"] not in ALLOWED[db["name"]]:
            msg = f"your roles do not allow db user {body['db_user']!r} on database {db['name']!r}"
            return web.json_response({"error": {"code": "access_denied", "message": msg}}, status=403)
        ident = Identity(
            user="alice",
            roles=("dba",),
            cluster=CLUSTER,
            route_to_db=RouteToDatabase(
                service_name=db["name"],
                protocol=db["protocol"],
                username=body["db_user"],
                database=body["db_name"],
            ),
            expires=datetime.now(UTC) + self.ttl,
        )
        cert = self.cluster.user.sign_tls_cert(body["tls_public_key"], ident, ttl=self.ttl)
        return web.json_response(
            {
                "tls_cert": cert,
                "ssh_cert": "",
                "expires": ident.expires.isoformat() if ident.expires else None,
                "user": "alice",
                "cluster_name": CLUSTER,
                "host_ca_pems": [self.cluster.host_ca_pem],
            }
        )


class FakeProxy:
    """One asyncio TLS port routed by ALPN, like the real proxy's router."""

    def __init__(self, cluster: Cluster, loop: LoopThread, auth_port: int, alpns: list[str]) -> None:
        self.cluster = cluster
        self.auth_port = auth_port
        self.ctx = cluster.server_context(alpns, client_certs=True)
        self.seen: list[dict[str, Any]] = []
        self.server = loop.run(asyncio.start_server(self.handle, "127.0.0.1", 0, ssl=self.ctx))
        self.port = self.server.sockets[0].getsockname()[1]
        self.addr = f"127.0.0.1:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            obj = writer.get_extra_info("ssl_object")
            alpn = obj.selected_alpn_protocol()
            der = obj.getpeercert(binary_form=True)
            if alpn == "ward-auth":
                await self.pipe_to_auth(reader, writer)
                return
            route = None
            if der:
                ident = verify_tls_identity(
                    x509.load_der_x509_certificate(der), [self.cluster.user.tls_ca_cert]
                )
                route = ident.route_to_db
            self.seen.append({"alpn": alpn, "route": route, "sni": obj.server_hostname})
            if route is None or route.username == "silent":
                return  # like the real proxy refusing what it cannot attribute: no word
            if alpn == "ward-mysql":
                writer.write(f"greeting for {route.username}\n".encode())
            while data := await reader.read(256 * 1024):
                writer.write(data)
                await writer.drain()
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def pipe_to_auth(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.auth_port)

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))


class Env:
    def __init__(self, root: Path) -> None:
        self.cluster = Cluster(root)
        self.loop = LoopThread()
        self.auth = FakeAuth(self.cluster)
        self.runner = web.AppRunner(self.auth.app)
        self.loop.run(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run(site.start())
        auth_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.proxy = FakeProxy(
            self.cluster, self.loop, auth_port, ["ward-postgres", "ward-mysql", "ward-auth"]
        )
        self.web_only = FakeProxy(self.cluster, self.loop, auth_port, ["http/1.1"])

    def reset(self) -> None:
        self.auth.cert_calls.clear()
        self.auth.ttl = timedelta(hours=1)
        self.proxy.seen.clear()

    def stop(self) -> None:
        for p in (self.proxy, self.web_only):
            p.server.close()
        self.loop.run(self.runner.cleanup())
        self.loop.stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("ward-db-env"))
    yield e
    e.stop()


@pytest.fixture
def home(tmp_path: Path, env: Env) -> Path:
    env.reset()
    h = tmp_path / "ward home"
    env.cluster.save_profile(h, env.proxy.addr)
    return h


def ward_env(home: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "WARD_HOME": str(home), "HOME": str(home.parent), "COLUMNS": "200", **extra}


def invoke(home: Path, *args: str) -> Any:
    return CliRunner().invoke(ward_main, list(args), env={"WARD_HOME": str(home), "COLUMNS": "200"})


def db_dir(home: Path, env: Env) -> Path:
    return home / "keys" / env.proxy.addr / "alice-db"


# ---------------------------------------------------------------- native client command lines


def test_client_command_lines() -> None:
    assert psql_conninfo(5433, "alice", "app") == (
        "host=127.0.0.1 port=5433 user=alice dbname=app sslmode=disable"
    )
    assert psql_conninfo(1, "o'brien", "my db") == (
        r"host=127.0.0.1 port=1 user='o\'brien' dbname='my db' sslmode=disable"
    )
    assert psql_argv("/usr/bin/psql", 5433, "alice", "", ["-c", "select 1"]) == [
        "/usr/bin/psql", "host=127.0.0.1 port=5433 user=alice sslmode=disable", "-w", "-c", "select 1",
    ]  # fmt: skip
    assert mysql_argv("/usr/bin/mariadb", "mariadb", 3307, "bob", "shop", ["-e", "select 1"]) == [
        "/usr/bin/mariadb", "-h", "127.0.0.1", "-P", "3307", "--protocol=TCP", "-u", "bob",
        "--skip-ssl", "-e", "select 1", "shop",
    ]  # fmt: skip
    oracle = mysql_argv("mysql", "mysql", 3307, "bob")
    assert (
        "--ssl-mode=DISABLED" in oracle and "--skip-ssl" not in oracle and oracle[-1] == "--ssl-mode=DISABLED"
    )

    # mariadb first; `mysql` is asked which client it is.
    have = {"mariadb": "/bin/mariadb", "mysql": "/bin/mysql", "psql": "/bin/psql"}
    assert find_client("mysql", which=have.get) == ClientProgram("/bin/mariadb", "mariadb")
    only_mysql = {"mysql": "/bin/mysql"}.get
    assert find_client("mysql", which=only_mysql, flavor_of=lambda p: "mysql").flavor == "mysql"
    assert find_client("mysql", which=only_mysql, flavor_of=lambda p: "mariadb").flavor == "mariadb"
    assert find_client("postgres", which=have.get) == ClientProgram("/bin/psql", "psql")
    with pytest.raises(BadParameterError, match="psql is not installed"):
        find_client("postgres", which=lambda _: None)
    with pytest.raises(BadParameterError, match="neither mariadb nor mysql is installed"):
        find_client("mysql", which=lambda _: None)
    assert client_argv(ClientProgram("/bin/mariadb", "mariadb"), 1, "bob")[-1] == "--skip-ssl"

    pg = DBLogin("pg", "postgres", "alice", "", datetime.now(UTC), Path("/w"))
    assert connect_command(pg, 5433) == 'psql "host=127.0.0.1 port=5433 user=alice sslmode=disable"'
    odd = DBLogin("pg", "postgres", "al ice", "x;y", datetime.now(UTC), Path("/w"))
    assert (
        connect_command(odd, 1)
        == "psql 'host=127.0.0.1 port=1 user='\"'\"'al ice'\"'\"' dbname=x;y sslmode=disable'"
    )
    my = DBLogin("my", "mysql", "bob", "shop", datetime.now(UTC), Path("/w"))
    assert connect_command(my, 3307) == "mysql -h 127.0.0.1 -P 3307 -u bob shop --skip-ssl"
    assert connect_command(my, 3307, flavor="mysql").endswith("--ssl-mode=DISABLED")
    assert env_lines(my, 3307)[-2:] == ["export MYSQL_HOST=127.0.0.1", "export MYSQL_TCP_PORT=3307"]

    env = client_env("postgres", {"PGPASSWORD": "secret", "PGSSLMODE": "require", "PATH": "/bin"})
    assert env == {"PGPASSWORD": "", "PATH": "/bin"}
    assert client_env("mysql", {"MYSQL_PWD": "secret"}) == {}


def test_the_real_mysql_client_flavor_is_detected() -> None:
    import shutil

    if not shutil.which("mysql"):
        pytest.skip("no mysql client here")
    out = subprocess.run(["mysql", "--version"], capture_output=True, text=True).stdout
    expected = "mariadb" if "mariadb" in out.lower() else "mysql"
    assert find_client("mysql", which=lambda n: shutil.which(n) if n == "mysql" else None).flavor == expected


# ---------------------------------------------------------------- login and the certificate store


def test_db_login_store_layout_and_permissions(env: Env, home: Path) -> None:
    res = invoke(home, "db", "login", "pg", "--db-user=alice", "--db-name=orders")
    assert res.exit_code == 0, res.output
    assert 'Logged in to database "pg" (postgres) as alice@orders, valid until' in res.output
    folder = db_dir(home, env)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert sorted(p.name for p in folder.iterdir()) == ["ca.pem", "pg.crt", "pg.key", "pg.yaml"]
    assert stat.S_IMODE((folder / "pg.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((folder / "pg.yaml").stat().st_mode) == 0o600
    assert (folder / "ca.pem").read_text().strip() == env.cluster.host_ca_pem.strip()
    meta = yaml.safe_load((folder / "pg.yaml").read_text())
    assert {k: meta[k] for k in ("name", "protocol", "db_user", "db_name")} == {
        "name": "pg", "protocol": "postgres", "db_user": "alice", "db_name": "orders",
    }  # fmt: skip
    cert = load_x509((folder / "pg.crt").read_text())
    assert meta["valid_until"] == cert.not_valid_after_utc.isoformat().replace("+00:00", "Z")
    route = verify_tls_identity(cert, [env.cluster.user.tls_ca_cert]).route_to_db
    assert route == RouteToDatabase("pg", "postgres", "alice", "orders")
    [call] = env.auth.cert_calls
    assert call["db"] == "pg" and call["db_user"] == "alice" and call["db_name"] == "orders"
    assert call["tls_public_key"].startswith("-----BEGIN PUBLIC KEY-----")
    first_key = public_key_pem(cert.public_key())

    # Logging in again keeps the key and, unless told otherwise, the db user and name.
    res = invoke(home, "db", "login", "pg")
    assert res.exit_code == 0, res.output
    assert env.auth.cert_calls[-1]["db_user"] == "alice" and env.auth.cert_calls[-1]["db_name"] == "orders"
    assert public_key_pem(load_x509((folder / "pg.crt").read_text()).public_key()) == first_key

    # The only db user the roles name is the default.
    res = invoke(home, "db", "login", "my")
    assert res.exit_code == 0, res.output
    assert "as bob," in res.output

    res = invoke(home, "db", "ls")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].split() == [
        "Name",
        "Description",
        "Protocol",
        "Labels",
        "DB",
        "users",
        "Logged",
        "in",
        "as",
    ]
    rows = {line.split()[1]: line for line in lines[2:] if line.startswith("> ")}
    assert set(rows) == {"pg", "my"} and len(lines) == 4
    assert rows["my"].split() == [">", "my", "mysql", "env=dev,tier=2", "bob", "bob"]
    assert "alice@orders" in rows["pg"] and "Orders" in rows["pg"] and "alice, reader" in rows["pg"]

    res = invoke(home, "db", "ls", "--format", "json")
    listed = {d["name"]: d for d in json.loads(res.stdout)}
    assert listed["pg"]["logged_in"] is True and listed["pg"]["login"]["db_name"] == "orders"

    res = invoke(home, "db", "config", "pg", "--format", "json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["cert"] == str(folder / "pg.crt") and info["key"] == str(folder / "pg.key")
    assert info["ca"] == str(folder / "ca.pem") and info["alpn"] == "ward-postgres"
    assert info["proxy"] == env.proxy.addr and info["expired"] is False
    res = invoke(home, "db", "config", "pg")
    assert "DB user:     alice" in res.stdout and f"Key:         {folder}/pg.key" in res.stdout

    res = invoke(home, "db", "env", "pg", "--port", "6000")
    exports = dict(
        line.removeprefix("export ").split("=", 1)
        for line in res.stdout.splitlines()
        if line.startswith("export ")
    )
    assert exports["PGUSER"] == "alice" and exports["PGDATABASE"] == "orders"
    assert (exports["PGHOST"], exports["PGPORT"], exports["PGSSLMODE"]) == ("127.0.0.1", "6000", "disable")
    assert exports["WARD_DB_CERT"] == f"'{folder}/pg.crt'"  # quoted: the home has a space
    res = invoke(home, "db", "env", "my")
    assert "export WARD_DB_USER=bob" in res.stdout and "PGUSER" not in res.stdout
    assert "ward proxy db my --tunnel" in res.stdout

    res = invoke(home, "db", "logout", "pg")
    assert res.exit_code == 0 and 'Logged out of database "pg".' in res.output
    assert sorted(p.name for p in folder.iterdir()) == ["ca.pem", "my.crt", "my.key", "my.yaml"]
    res = invoke(home, "db", "logout", "pg")
    assert res.exit_code == 1 and 'not logged in to database "pg"' in res.output
    res = invoke(home, "db", "logout")
    assert res.exit_code == 0 and "Logged out of my." in res.output
    assert not folder.exists()
    res = invoke(home, "db", "config", "pg")
    assert res.exit_code == 1
    assert 'not logged in to database "pg": run `ward db login pg --db-user=USER`' in res.output


def test_db_login_errors_are_clear(env: Env, home: Path) -> None:
    res = invoke(home, "db", "login", "pg", "--db-user=mallory")
    assert res.exit_code == 1
    assert (
        "cannot log in to database \"pg\" as mallory: your roles do not allow db user 'mallory'" in res.output
    )
    res = invoke(home, "db", "login", "nosuch", "--db-user=alice")
    assert res.exit_code == 1 and 'database "nosuch" not found: `ward db ls` lists' in res.output
    res = invoke(home, "db", "login", "pg")
    assert res.exit_code == 1
    assert (
        "say which database user to connect as: --db-user=NAME (your roles allow: alice, reader)"
        in res.output
    )
    res = invoke(home, "db", "login", "../etc", "--db-user=alice")
    assert res.exit_code == 1 and "bad database name '../etc'" in res.output
    assert not db_dir(home, env).exists()
    # `ward logout` takes the database certificates with it.
    assert invoke(home, "db", "login", "my").exit_code == 0
    assert invoke(home, "logout").exit_code == 0
    assert not (home / "keys").joinpath(env.proxy.addr).exists()


# ---------------------------------------------------------------- the tunnel, in process


async def test_open_db_stream_presents_the_db_certificate(env: Env, home: Path) -> None:
    profile = ProfileStore(home).load()
    login = await db_login(profile, "my", "bob", "shop")
    reader, writer = await open_db_stream(profile, login)
    assert await reader.readline() == b"greeting for bob\n"  # the server speaks first
    writer.write(b"COM_QUERY")
    assert await reader.readexactly(9) == b"COM_QUERY"
    writer.close()
    assert env.proxy.seen == [
        {"alpn": "ward-mysql", "route": RouteToDatabase("my", "mysql", "bob", "shop"), "sni": None}
    ]


async def _roundtrip(port: int, payload: bytes, *, first_line: bool = False) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        greeting = await reader.readline() if first_line else b""
        writer.write(payload)
        await writer.drain()
        return greeting + await reader.readexactly(len(payload))
    finally:
        writer.close()


async def _hung_up(reader: asyncio.StreamReader) -> bool:
    """The tunnel closed on us (a FIN, or a reset when our bytes arrived after it closed)."""
    try:
        return await reader.read() == b""
    except ConnectionResetError:
        return True


async def test_tunnel_problems_are_reported_and_the_listener_stays(env: Env, home: Path) -> None:
    profile = ProfileStore(home).load()
    await db_login(profile, "pg", "alice", "orders")
    problems: list[str] = []
    async with DBTunnel(profile, "pg", on_error=problems.append) as tunnel:
        port = await tunnel.start()
        assert await _roundtrip(port, b"startup") == b"startup"

        # A client that leaves at once costs nothing and reports nothing.
        _, w = await asyncio.open_connection("127.0.0.1", port)
        w.close()
        await asyncio.sleep(0.2)
        assert problems == []

        # The certificate expired while the tunnel ran: refused here, with the fix.
        store = DBStore(profile)
        meta = yaml.safe_load(store.load("pg").meta_path.read_text())
        store.load("pg").meta_path.write_text(yaml.safe_dump({**meta, "valid_until": "2020-01-01T00:00:00Z"}))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"startup")
        assert await _hung_up(reader)
        assert problems[-1] == (
            'your certificate for database "pg" expired at 2020-01-01 00:00:00 UTC: '
            "run `ward db login pg` again"
        )
        seen = len(env.proxy.seen)

        # A renewal in another terminal is picked up by the running tunnel.
        await db_login(profile, "pg", "silent")
        assert len(env.proxy.seen) == seen
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"startup")
        assert await _hung_up(reader)
        writer.close()
        for _ in range(50):
            if len(problems) == 2:
                break
            await asyncio.sleep(0.05)
        assert problems[-1].startswith('the proxy closed the connection to database "pg" without an answer')
        assert env.proxy.seen[-1]["route"].username == "silent"
    assert tunnel.connections == 4 and tunnel.failures == 2


async def test_tunnel_to_an_unreachable_or_wrong_proxy(env: Env, home: Path) -> None:
    profile = ProfileStore(home).load()
    login = await db_login(profile, "pg", "alice")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    problems: list[str] = []
    store = DBStore(profile)
    for addr in (f"127.0.0.1:{dead}", env.web_only.addr):
        elsewhere = dataclasses.replace(profile, proxy=addr)
        async with DBTunnel(elsewhere, "pg", store=store, on_error=problems.append) as tunnel:
            port = await tunnel.start()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"x")
            assert await _hung_up(reader)
            for _ in range(50):
                if tunnel.failures:
                    break
                await asyncio.sleep(0.05)
    assert problems[0].startswith(f"cannot reach the proxy at 127.0.0.1:{dead} (")
    assert problems[0].endswith("check the address and that the Wardgate proxy is running")
    assert problems[1].startswith(f"the proxy at {env.web_only.addr} does not offer database access")
    assert login.alpn in problems[1]


# ---------------------------------------------------------------- `ward proxy db`, as a person runs it


class Tunnel:
    """`ward proxy db … --tunnel` in the background; `port` from what it prints."""

    def __init__(self, home: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [str(BIN / "ward"), "proxy", "db", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=ward_env(home),
            text=True,
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        m = re.search(r"on 127\.0\.0\.1:(\d+)\. Connect with:", first)
        assert m, first + self.proc.stderr.read()  # type: ignore[union-attr]
        self.port = int(m.group(1))
        self.first = first
        self.proc.stdout.readline()
        self.command = self.proc.stdout.readline().strip()

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=15)
        return self.proc.returncode, err


def _sock_roundtrip(port: int, payload: bytes, greeting: bytes = b"") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        got = b""
        while len(got) < len(greeting):
            got += s.recv(65536)
        out = bytearray()
        sender = threading.Thread(target=s.sendall, args=(payload,))
        sender.start()
        while len(out) < len(payload):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            out += chunk
        sender.join()
        return got + bytes(out)


def test_ward_proxy_db_tunnel_relays_concurrent_connections(env: Env, home: Path) -> None:
    assert invoke(home, "db", "login", "pg", "--db-user=alice", "--db-name=orders").exit_code == 0
    t = Tunnel(home, "pg", "--tunnel")
    try:
        assert t.first.startswith(
            'Started a local tunnel to database "pg" (postgres, as alice, database orders)'
        )
        assert t.command == f'psql "host=127.0.0.1 port={t.port} user=alice dbname=orders sslmode=disable"'
        payloads = [os.urandom(n) for n in (1, 1000, 3 * 1024 * 1024, 300_000, 17, 5 * 1024 * 1024)]
        results: list[bytes | None] = [None] * len(payloads)

        def run(i: int) -> None:
            results[i] = _sock_roundtrip(t.port, payloads[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(payloads))]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert results == payloads
        assert len(env.proxy.seen) == len(payloads)
        assert {(s["alpn"], s["route"]) for s in env.proxy.seen} == {
            ("ward-postgres", RouteToDatabase("pg", "postgres", "alice", "orders"))
        }
    finally:
        rc, err = t.stop()
    assert rc == 0, err
    assert err.strip() == 'Stopped the tunnel to database "pg".'


def test_ward_proxy_db_mysql_logs_in_and_the_server_speaks_first(env: Env, home: Path) -> None:
    t = Tunnel(home, "my", "--tunnel", "--db-user=bob", "--db-name=shop", "--port=0")
    try:
        assert [c["db_user"] for c in env.auth.cert_calls] == ["bob"]
        assert t.command == f"mysql -h 127.0.0.1 -P {t.port} -u bob shop --skip-ssl"
        greeting = b"greeting for bob\n"
        assert (
            _sock_roundtrip(t.port, b"\x01\x00\x00\x00\x01", greeting) == greeting + b"\x01\x00\x00\x00\x01"
        )
        assert env.proxy.seen[-1]["alpn"] == "ward-mysql"
    finally:
        rc, err = t.stop()
    assert rc == 0, err


def test_ward_proxy_db_refusals(env: Env, home: Path, tmp_path: Path) -> None:
    assert invoke(home, "db", "login", "pg", "--db-user=alice").exit_code == 0

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        res = invoke(home, "proxy", "db", "pg", "--tunnel", f"--port={busy.getsockname()[1]}")
        assert res.exit_code == 1 and f"cannot listen on 127.0.0.1:{busy.getsockname()[1]}" in res.output

    # Expired login and expired database certificate: the fix is `ward login`, before any dial.
    before = len(env.proxy.seen)
    path = home / f"{env.proxy.addr}.yaml"
    data = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**data, "valid_until": "2020-01-01T00:00:00Z"}))
    meta_path = db_dir(home, env) / "pg.yaml"
    meta = yaml.safe_load(meta_path.read_text())
    meta_path.write_text(yaml.safe_dump({**meta, "valid_until": "2020-01-01T00:00:00Z"}))
    res = invoke(home, "proxy", "db", "pg", "--tunnel")
    assert (
        res.exit_code == 1
        and "your certificate expired at 2020-01-01 00:00:00 UTC; run `ward login" in res.output
    )
    assert len(env.proxy.seen) == before

    res = invoke(home, "db", "ls")
    assert res.exit_code == 1 and "run `ward login" in res.output


def _startup(user: str = "alice") -> bytes:
    body = struct.pack("!i", 196608) + b"user\0" + user.encode() + b"\0\0"
    return struct.pack("!i", len(body) + 4) + body


SSL_REQUEST = struct.pack("!ii", 8, 80877103)
GSSENC_REQUEST = struct.pack("!ii", 8, 80877104)


def _recv_all(s: socket.socket | ssl.SSLSocket) -> bytes:
    out = b""
    with contextlib.suppress(OSError):
        while chunk := s.recv(65536):
            out += chunk
    return out


def _pg_tls(port: int, ctx: ssl.SSLContext, *, gss_first: bool = False) -> ssl.SSLSocket:
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    if gss_first:
        s.sendall(GSSENC_REQUEST)
        assert s.recv(1) == b"N"
    s.sendall(SSL_REQUEST)
    assert s.recv(1) == b"S"
    return ctx.wrap_socket(s, server_hostname="127.0.0.1")


def _pg_talk(port: int, ctx: ssl.SSLContext) -> bytes:
    with _pg_tls(port, ctx) as s:
        s.sendall(_startup())
        if not (got := s.recv(1)):
            raise ConnectionResetError("closed without a word")
        return got


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    from wardgate.keys import generate_tls_key, private_key_pem

    key = generate_tls_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alice")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1)).sign(key, hashes.SHA256())
    )  # fmt: skip
    (tmp_path / "other.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "other.key").write_text(private_key_pem(key))
    return tmp_path / "other.crt", tmp_path / "other.key"


def test_ward_proxy_db_without_tunnel_wants_the_database_certificate(
    env: Env, home: Path, tmp_path: Path
) -> None:
    assert invoke(home, "db", "login", "pg", "--db-user=alice", "--db-name=orders").exit_code == 0
    folder = db_dir(home, env)
    libpq_key = home / "keys" / "libpq" / env.proxy.addr.replace(":", "_") / "alice-db" / "pg.key"
    t = Tunnel(home, "pg")
    try:
        assert t.first.startswith(
            'Started a local proxy to database "pg" (postgres, as alice, database orders)'
        )
        assert shlex.split(t.command) == [
            "psql",
            f"host=127.0.0.1 port={t.port} user=alice dbname=orders sslmode=verify-ca "
            f"sslrootcert='{folder}/local.crt' sslcert='{folder}/pg.crt' sslkey='{libpq_key}'",
        ]
        assert libpq_key.is_symlink() and libpq_key.resolve() == (folder / "pg.key").resolve()
        local_crt = load_x509((folder / "local.crt").read_text())
        assert stat.S_IMODE((folder / "local.key").stat().st_mode) == 0o600
        ctx = ssl.create_default_context(cafile=str(folder / "local.crt"))
        ctx.load_cert_chain(folder / "pg.crt", folder / "pg.key")
        payload = _startup() + os.urandom(300_000)
        for gss_first in (False, True):
            with _pg_tls(t.port, ctx, gss_first=gss_first) as s:
                s.sendall(payload)
                got = b""
                while len(got) < len(payload):
                    got += s.recv(1 << 20)
                assert got == payload  # the fake proxy echoes what the startup began
        assert {(x["alpn"], x["route"]) for x in env.proxy.seen} == {
            ("ward-postgres", RouteToDatabase("pg", "postgres", "alice", "orders"))
        }
        seen = len(env.proxy.seen)

        # No TLS: told what to do in an ErrorResponse, nothing dialled.
        with socket.create_connection(("127.0.0.1", t.port), timeout=20) as s:
            s.sendall(_startup())
            answer = _recv_all(s)
        assert (
            answer[:1] == b"E"
            and b"C28000" in answer
            and b"needs TLS with your database certificate" in answer
        )
        # TLS but no certificate: the same, inside TLS, after the startup message.
        bare = ssl.create_default_context(cafile=str(folder / "local.crt"))
        with _pg_tls(t.port, bare) as s:
            s.sendall(_startup())
            answer = _recv_all(s)
        assert answer[:1] == b"E" and b"C28000" in answer and b"present your certificate" in answer
        # Another certificate (even for the same name): the handshake fails.
        other = ssl.create_default_context(cafile=str(folder / "local.crt"))
        other.load_cert_chain(*_self_signed(tmp_path))
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _pg_talk(t.port, other)
        assert len(env.proxy.seen) == seen
        # The listener's certificate stays across runs.
        assert load_x509((folder / "local.crt").read_text()) == local_crt
    finally:
        rc, err = t.stop()
    assert rc == 0, err
    assert "connected without TLS" in err and "without your certificate" in err
    assert "its certificate is not yours" in err
    assert err.strip().endswith('Stopped the proxy to database "pg".')
    res = invoke(home, "db", "config", "pg", "--format", "json")
    assert json.loads(res.stdout)["local_ca"] == str(folder / "local.crt")
    assert invoke(home, "db", "logout").exit_code == 0 and not folder.exists()
    assert not libpq_key.is_symlink()


# ---------------------------------------------------------------- `ward db connect` with stand-in clients

FAKE_CLIENT = """#!{python}
import json, os, re, socket, sys
argv = sys.argv
if "host=" in " ".join(argv):
    port = int(re.search(r"port=(\\d+)", argv[1]).group(1))
else:
    port = int(argv[argv.index("-P") + 1])
with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
    greeting = s.recv(100) if "mariadb" in argv[0] else b""
    s.sendall(b"ping")
    got = b""
    while len(got) < 4:
        got += s.recv(4)
with open(os.environ["FAKE_CLIENT_LOG"], "w") as f:
    json.dump({{"argv": argv, "pgpassword": os.environ.get("PGPASSWORD"), "got": got.decode(),
               "greeting": greeting.decode()}}, f)
sys.exit(7)
"""


def _fake_clients(tmp_path: Path) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("psql", "mariadb"):
        p = bindir / name
        p.write_text(FAKE_CLIENT.format(python=sys.executable))
        p.chmod(0o755)
    return bindir


def test_ward_db_connect_runs_the_client_through_the_tunnel(env: Env, home: Path, tmp_path: Path) -> None:
    bindir = _fake_clients(tmp_path)
    log = tmp_path / "client.json"
    run_env = ward_env(home, PATH=f"{bindir}:{os.environ['PATH']}", FAKE_CLIENT_LOG=str(log), PGPASSWORD="x")

    def connect(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "ward"), "db", "connect", *args],
            capture_output=True,
            text=True,
            env=run_env,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )

    # Not logged in yet: connect logs in first, then runs psql; the exit code is psql's.
    res = connect("pg", "--db-user=alice", "--db-name=orders", "--", "-c", "select 1")
    assert res.returncode == 7, res.stderr
    ran = json.loads(log.read_text())
    port = re.search(r"port=(\d+)", ran["argv"][1]).group(1)  # type: ignore[union-attr]
    assert ran["argv"] == [
        str(bindir / "psql"),
        f"host=127.0.0.1 port={port} user=alice dbname=orders sslmode=disable",
        "-w", "-c", "select 1",
    ]  # fmt: skip
    assert ran["pgpassword"] == "" and ran["got"] == "ping"
    assert len(env.auth.cert_calls) == 1

    # Logged in: no new certificate; another db user: a new one.
    assert connect("pg").returncode == 7
    assert len(env.auth.cert_calls) == 1
    assert connect("pg", "--db-user=reader").returncode == 7
    assert [c["db_user"] for c in env.auth.cert_calls] == ["alice", "reader"]
    assert json.loads(log.read_text())["argv"][1].endswith("user=reader dbname=orders sslmode=disable")

    res = connect("my")
    assert res.returncode == 7, res.stderr
    ran = json.loads(log.read_text())
    port = ran["argv"][ran["argv"].index("-P") + 1]
    assert ran["argv"] == [
        str(bindir / "mariadb"), "-h", "127.0.0.1", "-P", port, "--protocol=TCP", "-u", "bob", "--skip-ssl",
    ]  # fmt: skip
    assert ran["greeting"] == "greeting for bob\n" and ran["got"] == "ping"

    res = subprocess.run(
        [str(BIN / "ward"), "db", "connect", "pg"],
        capture_output=True,
        text=True,
        env={**run_env, "PATH": "/nonexistent"},
        timeout=60,
    )
    assert res.returncode == 1 and "psql is not installed" in res.stderr


# ---------------------------------------------------------------- wardctl auth sign --format=db


@pytest.mark.slow
def test_wardctl_auth_sign_db_server_certificate(tmp_path: Path) -> None:
    cluster = SSHCluster(tmp_path / "cluster")
    try:
        out = tmp_path / "pg" / "server"
        out.parent.mkdir()
        res = wardctl(
            cluster.data_dir, "auth", "sign", "--format=db", "--host=db.internal,10.0.0.5", f"--out={out}"
        )
        assert f"Wrote {out}.key, {out}.crt and {out}.cas (the database CA)" in res.stdout
        for line in (
            "ssl = on",
            f"ssl_cert_file = '{out}.crt'",
            f"ssl_key_file = '{out}.key'",
            f"ssl_ca_file = '{out}.cas'",
            "hostssl all all 0.0.0.0/0 cert",
            f"ssl-cert = {out}.crt",
            f"ssl-key = {out}.key",
            f"ssl-ca = {out}.cas",
            "ALTER USER 'alice'@'%' REQUIRE SUBJECT '/CN=alice';",
        ):
            assert line in res.stdout, line
        assert stat.S_IMODE(Path(f"{out}.key").stat().st_mode) == 0o600
        verify = subprocess.run(
            ["openssl", "verify", "-purpose", "sslserver", "-CAfile", f"{out}.cas", f"{out}.crt"],
            capture_output=True,
            text=True,
        )
        assert verify.returncode == 0 and verify.stdout.strip() == f"{out}.crt: OK", verify.stderr
        cert = load_x509(Path(f"{out}.crt").read_text())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == ["db.internal"]
        assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
        left = cert.not_valid_after_utc - datetime.now(UTC)
        assert timedelta(days=364) < left <= timedelta(days=366)
        ca_cn = load_x509(Path(f"{out}.cas").read_text()).subject.rfc4514_string()
        assert "Wardgate db CA" in ca_cn
        # The key and the certificate belong together (what the database checks at start).
        key_pub = subprocess.run(
            ["openssl", "pkey", "-in", f"{out}.key", "-pubout"], capture_output=True, text=True
        ).stdout
        assert key_pub == public_key_pem(cert.public_key())

        res = wardctl(
            cluster.data_dir, "auth", "sign", "--format=db", "--host=db2", f"--out={out}2", "--ttl=48h"
        )
        left = load_x509(Path(f"{out}2.crt").read_text()).not_valid_after_utc - datetime.now(UTC)
        assert timedelta(hours=47) < left <= timedelta(hours=48)

        for args, message in (
            (["--format=db", "--user=bot"], "--format=identity goes with --user"),
            (
                ["--format=db", "--host=db", "--principals=x"],
                "--format=db takes every name and address in --host",
            ),
            (["--format=identity", "--host=db"], "--format=identity goes with --user"),
        ):
            res = wardctl(cluster.data_dir, "auth", "sign", *args, f"--out={tmp_path}/x", check=False)
            assert res.returncode == 1 and message in res.stderr, res.stderr
        assert not list(tmp_path.glob("x*"))
    finally:
        cluster.stop()


async def test_tunnel_reports_a_certificate_the_proxy_refuses(env: Env, home: Path, tmp_path: Path) -> None:
    profile = ProfileStore(home).load()
    login = await db_login(profile, "pg", "alice")
    # A certificate from some other cluster's CA, for the same key: the proxy's TLS refuses it.
    stranger = Cluster(tmp_path)
    ident = Identity(user="alice", route_to_db=RouteToDatabase("pg", "postgres", "alice", ""))
    key_pem = public_key_pem(load_x509(login.cert_path.read_text()).public_key())
    login.cert_path.write_text(stranger.user.sign_tls_cert(key_pem, ident, ttl=timedelta(hours=1)))
    problems: list[str] = []
    async with DBTunnel(profile, "pg", on_error=problems.append) as tunnel:
        port = await tunnel.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"startup")
        assert await _hung_up(reader)
        for _ in range(50):
            if tunnel.failures:
                break
            await asyncio.sleep(0.05)
    # TLS 1.3 delivers the proxy's alert after the handshake, and neither asyncio's nor
    # uvloop's transport passes it on: what we know is that the proxy hung up without a word.
    assert problems == [
        'the proxy closed the connection to database "pg" without an answer: your certificate was '
        "refused (run `ward db login pg` again) or no database service serves it right now"
    ]
