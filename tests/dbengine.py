"""A database engine under test: real cluster, real database, the DatabaseService in this process.

A real cluster issues the certificates: a user certificate routed to the database (what
`ward db login` gets), and the database service's own identity (joined with a `db` token) with
which the service fetches db-CA client certificates to log in upstream. The service runs on a
background loop behind plain TCP listeners, the way the proxy hands it connections (TLS already
terminated). Each engine's test module subclasses `EngineEnv` with its database and engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from tests.cluster import SSHCluster, wardctl
from tests.dbservers import DB_PASSWORD, db_server_files
from tests.test_ward_client import LoopThread
from wardgate.agent.db.service import DatabaseService, Engine
from wardgate.api.cache import ResourceCache
from wardgate.api.client import AuthClient
from wardgate.api.identityfile import IdentityFile, server_trusting_context
from wardgate.api.resources import Database
from wardgate.audit.events import MemoryEmitter
from wardgate.keys import generate_tls_key, private_key_pem, public_key_pem

CACHED = ("cert_authority", "role", "lock", "db")


class EngineEnv:
    """Cluster + one database + a DatabaseService on a background loop."""

    DB: ClassVar[str]
    """The registered database's name."""
    ROLE: ClassVar[str]
    """alice's role (YAML)."""
    PASSWORD_ENV: ClassVar[str]
    """Where the service reads password users' password."""
    HOST_ID: ClassVar[str]
    ENGINES: ClassVar[dict[str, Engine]]

    def __init__(self, root: Path) -> None:
        self.stack = contextlib.ExitStack()
        try:
            self._setup(root)
        except BaseException:
            self.stack.close()
            raise

    # ---- what each engine's module provides

    def start_database(self) -> Any:
        """Start the database (from `self.tls`); return it with a `port` and a `stop()`."""
        raise NotImplementedError

    def db_yaml(self, name: str, port: int) -> str:
        raise NotImplementedError

    # ---- set-up

    def _setup(self, root: Path) -> None:
        self.root = root
        self.cluster = SSHCluster(root / "cluster")
        self.stack.callback(self.cluster.stop)
        data = self.cluster.data_dir
        self.tls = db_server_files(data, root / "tls")
        server = self.start_database()
        self.stack.callback(server.stop)
        os.environ[self.PASSWORD_ENV] = DB_PASSWORD
        self.stack.callback(os.environ.pop, self.PASSWORD_ENV, None)
        (root / "res.yaml").write_text(self.ROLE + "---\n" + self.db_yaml(self.DB, server.port))
        wardctl(data, "create", "-f", str(root / "res.yaml"))
        wardctl(data, "users", "add", "alice", "--roles=dbaccess")
        wardctl(data, "auth", "sign", "--user=alice", "-o", str(root / "alice.identity"))
        token = json.loads(wardctl(data, "tokens", "add", "--type=db", "--format=json").stdout)["token"]
        self.addr = f"127.0.0.1:{self.cluster.auth_port}"
        self.loop = LoopThread()
        self.stack.callback(self.loop.stop)
        self.emitter = MemoryEmitter()
        self.certs: dict[tuple[str, str, str], str] = {}
        self.servers: list[asyncio.base_events.Server] = []
        self.loop.run(self._start(root / "alice.identity", token))

    async def _start(self, alice_path: Path, token: str) -> None:
        pems = await AuthClient.discover_trust(self.addr, ca_pin=self.cluster.pin)
        key = generate_tls_key()
        async with AuthClient(self.addr, server_trusting_context(pems)) as c:
            data = await c.join(
                token=token,
                role="db",
                node_name=f"{self.HOST_ID}-node",
                host_id=self.HOST_ID,
                tls_public_key=public_key_pem(key.public_key()),
                ssh_public_key="",
                addresses=[],
            )
        ident = IdentityFile(
            key_pem=private_key_pem(key),
            cert_pem=data["tls_cert"],
            ca_pems=data["host_ca_pems"],
            auth_server=self.addr,
            cluster=data["cluster_name"],
        )
        self.auth = AuthClient.from_identity(ident, self.addr)
        self.cache = ResourceCache(CACHED)
        self.cache_task = asyncio.ensure_future(self.cache.run(lambda: self.auth.watch(CACHED)))
        await asyncio.wait_for(self.cache.ready.wait(), 30)
        self.service = DatabaseService(
            auth=self.auth,
            cache=self.cache,
            emitter=self.emitter,
            host_id=self.HOST_ID,
            databases=self.databases,
            engines=self.ENGINES,
        )
        self.alice = AuthClient.from_identity(IdentityFile.load(alice_path), self.addr)

    # ---- helpers for tests

    def databases(self) -> dict[str, Database]:
        return {d.name: d for d in self.cache.list("db") if isinstance(d, Database)}

    def add_database(self, name: str, port: int) -> None:
        path = self.root / f"{name}.yaml"
        path.write_text(self.db_yaml(name, port))
        wardctl(self.cluster.data_dir, "create", "-f", str(path))
        self.wait_for(f"database {name} in the cache", lambda: name in self.databases())

    def cert(self, db_user: str, db_name: str = "app", db: str = "") -> str:
        """alice's certificate for `ward db login DB --db-user=U --db-name=D`."""
        db = db or self.DB
        if (db, db_user, db_name) not in self.certs:

            async def issue() -> str:
                key = generate_tls_key()
                data = await self.alice.db_user_cert(
                    db=db, db_user=db_user, db_name=db_name, tls_public_key=public_key_pem(key.public_key())
                )
                return data["tls_cert"]

            self.certs[db, db_user, db_name] = self.loop.run(issue())
        return self.certs[db, db_user, db_name]

    def listen(self, db_user: str = "reader", db_name: str = "app", db: str = "") -> int:
        """A port where every connection is handed to the service as alice's `db_user` cert."""
        db = db or self.DB
        header = {"cert": self.cert(db_user, db_name, db), "db": db, "client_addr": "127.0.0.1:40000"}

        async def start() -> int:
            server = await asyncio.start_server(lambda r, w: self.service.serve(r, w, header), "127.0.0.1", 0)
            self.servers.append(server)
            return server.sockets[0].getsockname()[1]

        return self.loop.run(start())

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        return [e for e in list(self.emitter.events) if name is None or e["event"] == name]

    def wait_for(self, what: str, cond: Callable[[], Any], timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = cond()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; events: {self.events()[-20:]}")

    def session_events(self, sid: str) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("sid") == sid]

    def stop(self) -> None:
        async def close() -> None:
            for s in self.servers:
                s.close()
            for t in list(self.service.sessions):
                t.cancel()
            self.cache_task.cancel()
            with contextlib.suppress(BaseException):
                await self.cache_task
            await self.auth.close()
            await self.alice.close()

        with contextlib.suppress(Exception):
            self.loop.run(close())
        self.stack.close()
