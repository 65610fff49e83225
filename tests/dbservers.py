"""Throw-away PostgreSQL and MariaDB servers for end-to-end tests, trusting the cluster's db CA.

Each starts from nothing in a fresh directory on a free 127.0.0.1 port, with TLS from a server
certificate the cluster's db CA signed (`db_server_files`), client-certificate logins for the
certificate users and a password login for one user, and is stopped (and removed) by the test.
PostgreSQL refuses to run as root, so its files belong to the `postgres` system user.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tests.cluster import free_port

PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), Path("/usr/bin"))
DB_PASSWORD = "s3cret-db-password"


def have_postgres() -> bool:
    return (PG_BIN / "initdb").exists() and shutil.which("psql") is not None


def have_mariadb() -> bool:
    return shutil.which("mariadbd") is not None or Path("/usr/sbin/mariadbd").exists()


def db_server_files(data_dir: Path, out: Path, hosts: Sequence[str] = ("localhost", "127.0.0.1")) -> Path:
    """`wardctl auth sign --format=db`'s job, through the admin identity: out/server.{crt,key,cas}."""
    from wardgate import runtime
    from wardgate.api.client import AuthClient
    from wardgate.api.identityfile import IdentityFile
    from wardgate.keys import generate_tls_key, private_key_pem, public_key_pem

    key = generate_tls_key()

    async def sign() -> dict:
        async with AuthClient.from_identity(IdentityFile.load(data_dir / "admin.identity")) as c:
            return await c.db_server_cert(list(hosts), public_key_pem(key.public_key()), "24h")

    data = runtime.run(sign())
    out.mkdir(parents=True, exist_ok=True)
    (out / "server.crt").write_text(data["tls_cert"])
    (out / "server.key").write_text(private_key_pem(key))
    (out / "server.cas").write_text(data["ca_pem"])
    return out


def _wait(cond, what: str, log: Path, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not start:\n{log.read_text() if log.exists() else ''}")


class Postgres:
    """cert users log in with a db-CA client certificate (CN = user); `pwuser` with a password."""

    def __init__(
        self, tls_dir: Path, *, cert_users: Sequence[str] = ("reader", "writer"), port: int = 0
    ) -> None:
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="wardgate-pg-"))
        os.chmod(self.root, 0o755)  # noqa: S103 - the postgres user must reach its files
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        for name in ("server.crt", "server.key", "server.cas"):
            shutil.copy(tls_dir / name, self.root / name)
        os.chmod(self.root / "server.key", 0o600)
        shutil.chown(self.root, "postgres", "postgres")
        for p in self.root.iterdir():
            shutil.chown(p, "postgres", "postgres")
        initdb = [str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync"]
        self._as_pg(initdb)
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(
                f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.root}'\nssl = on\n"
                f"ssl_cert_file = '{self.root}/server.crt'\nssl_key_file = '{self.root}/server.key'\n"
                f"ssl_ca_file = '{self.root}/server.cas'\nfsync = off\nsynchronous_commit = off\n"
                "full_page_writes = off\nmax_connections = 60\n"
            )
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\n"
            "hostssl all pwuser 127.0.0.1/32 scram-sha-256\n"
            "host all pwuser 127.0.0.1/32 scram-sha-256\n"
            "hostssl all all 127.0.0.1/32 cert\n"
        )
        self._as_pg([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "start"])
        try:  # a server that started must never outlive a failed set-up
            self._populate(cert_users)
        except BaseException:
            self.stop()
            raise

    def _populate(self, cert_users: Sequence[str]) -> None:
        users = "".join(f"CREATE ROLE {u} LOGIN;" for u in cert_users)
        self.sql(f"{users} CREATE ROLE pwuser LOGIN PASSWORD '{DB_PASSWORD}'")
        self.sql("CREATE DATABASE app")
        self.sql("CREATE DATABASE secret")
        everyone = ", ".join((*cert_users, "pwuser"))
        self.sql(
            "CREATE TABLE items (id int primary key, name text);"
            "INSERT INTO items VALUES (1, 'apple'), (2, 'pear');"
            f"GRANT ALL ON SCHEMA public TO {everyone}; GRANT ALL ON items TO {everyone};",
            db="app",
        )

    def _as_pg(self, argv: list[str]) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            ["runuser", "-u", "postgres", "--", *argv], capture_output=True, text=True, timeout=60
        )
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def sql(self, text: str, *, db: str = "postgres") -> str:
        """Run SQL as the superuser over the unix socket."""
        proc = subprocess.run(
            ["psql", "-h", str(self.root), "-p", str(self.port), "-U", "postgres", "-d", db,
             "-v", "ON_ERROR_STOP=1", "-Atc", text],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if proc.returncode != 0:
            raise AssertionError(f"psql failed: {proc.stderr}")
        return proc.stdout

    def stop(self) -> None:
        pg_ctl = [str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"]
        subprocess.run(["runuser", "-u", "postgres", "--", *pg_ctl], capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


class MariaDB:
    """cert users present a db-CA certificate whose subject is /CN=<user>; `pwuser` has a password."""

    def __init__(
        self, tls_dir: Path, *, cert_users: Sequence[str] = ("reader", "writer"), port: int = 0
    ) -> None:
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="wardgate-maria-"))
        self.data = self.root / "data"
        self.sock = self.root / "mysqld.sock"
        self.log = self.root / "mariadb.log"
        subprocess.run(
            ["mariadb-install-db", "--no-defaults", "--user=root", f"--datadir={self.data}",
             "--auth-root-authentication-method=normal", "--skip-test-db"],
            capture_output=True, check=True, timeout=120,
        )  # fmt: skip
        self.proc = subprocess.Popen(
            ["mariadbd", "--no-defaults", "--user=root", f"--datadir={self.data}", f"--socket={self.sock}",
             f"--port={self.port}", "--bind-address=127.0.0.1", "--skip-name-resolve",
             f"--ssl-cert={tls_dir / 'server.crt'}", f"--ssl-key={tls_dir / 'server.key'}",
             f"--ssl-ca={tls_dir / 'server.cas'}", f"--log-error={self.log}", f"--pid-file={self.root}/pid",
             "--innodb-buffer-pool-size=16M", "--innodb-log-file-size=8M", "--skip-log-bin"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:  # a server that started must never outlive a failed set-up
            _wait(self.sock.exists, "mariadbd", self.log)
            self._populate(cert_users)
        except BaseException:
            self.stop()
            raise

    def _populate(self, cert_users: Sequence[str]) -> None:
        users = "".join(
            f"CREATE USER '{u}'@'%' REQUIRE SUBJECT '/CN={u}'; GRANT ALL ON app.* TO '{u}'@'%';"
            for u in cert_users
        )
        self.sql(
            "CREATE DATABASE app; CREATE DATABASE secret;"
            "CREATE TABLE app.items (id int primary key, name text);"
            "INSERT INTO app.items VALUES (1, 'apple'), (2, 'pear');"
            f"{users} CREATE USER 'pwuser'@'%' IDENTIFIED BY '{DB_PASSWORD}';"
            "GRANT ALL ON app.* TO 'pwuser'@'%';"
        )

    def sql(self, text: str) -> str:
        proc = subprocess.run(
            ["mariadb", "--no-defaults", "-S", str(self.sock), "-u", "root", "-N", "-B", "-e", text],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if proc.returncode != 0:
            raise AssertionError(f"mariadb failed: {proc.stderr}")
        return proc.stdout

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)
