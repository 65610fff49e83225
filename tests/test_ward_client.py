"""`ward` for SSH: the ~/.ward store, login against a TLS test proxy, the ward-ssh stream, OpenSSH argv.

The proxy here is a test double speaking the wire contracts the real proxy implements:
`/webapi/ping` and `/webapi/sessions` (aiohttp over TLS with a host-CA certificate), and one
TLS port that routes by ALPN (`ward-ssh`: the one-line JSON handshake then raw bytes, with
TLS half-close honoured; `ward-auth`: the decrypted stream relayed to the same aiohttp app).
Behind it: a TCP echo server and two asyncssh nodes with host certificates, so the real
OpenSSH client runs end to end through `ward ssh` and the `ward config` block.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import socket
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import asyncssh
import pytest
import yaml
from aiohttp import web
from click.testing import CliRunner
from cryptography.hazmat.primitives.serialization import Encoding

from wardgate.auth.ca import CertSigner, new_cert_authority
from wardgate.auth.identity import Identity
from wardgate.cli.ward import main as ward_main
from wardgate.client.login import login
from wardgate.client.nodes import Selector, filter_nodes, node_rows
from wardgate.client.profile import (
    Credentials,
    ExpiredError,
    NotLoggedInError,
    Profile,
    ProfileStore,
    normalize_proxy,
)
from wardgate.client.ssh import scp_argv, split_login, ssh_argv
from wardgate.client.sshconfig import ssh_config_block
from wardgate.client.sshproxy import open_ssh_stream, parse_proxy_target
from wardgate.durations import format_duration, parse_duration
from wardgate.errors import AuthenticationError, BadParameterError, NotFoundError
from wardgate.keys import (
    generate_ssh_key,
    generate_tls_key,
    load_x509,
    private_key_pem,
    public_key_pem,
    ssh_private_key_openssh,
    ssh_public_key_line,
    tls_ca_pin,
)

CLUSTER = "test.example"
BIN = Path(sys.executable).parent
T = TypeVar("T")
NODES = [
    {"name": "web1", "hostname": "web1", "addr": "10.0.0.1:3022", "labels": {"env": "prod", "role": "web"},
     "logins": ["root"], "tunnel": False},
    {"name": "web2", "hostname": "web2", "addr": "", "labels": {"env": "prod", "role": "worker"},
     "logins": ["root", "deploy"], "tunnel": True},
    {"name": "db1", "hostname": "db1", "addr": "10.0.0.3:3022", "labels": {"env": "staging"},
     "logins": ["root"], "tunnel": False},
]  # fmt: skip


# ---------------------------------------------------------------- the cluster's CAs


class Cluster:
    """Host and user CAs, the proxy's TLS certificate, and user certificates on demand."""

    def __init__(self, root: Path) -> None:
        self.host = CertSigner(new_cert_authority("host", CLUSTER))
        self.user = CertSigner(new_cert_authority("user", CLUSTER))
        self.host_ca_pem = self.host.tls_ca_cert.public_bytes(Encoding.PEM).decode()
        self.user_ca_pem = self.user.tls_ca_cert.public_bytes(Encoding.PEM).decode()
        self.pin = tls_ca_pin(load_x509(self.host_ca_pem))
        key = generate_tls_key()
        cert = self.host.sign_tls_cert(
            public_key_pem(key),
            Identity(user="proxy", system_role="proxy", host_id="proxy-1"),
            ttl=timedelta(hours=1),
            dns_names=["localhost"],
            ip_addresses=["127.0.0.1"],
        )
        self.cert_file, self.key_file = root / "proxy.pem", root / "proxy-key.pem"
        self.cert_file.write_text(cert)
        self.key_file.write_text(private_key_pem(key))

    def server_context(self, alpn: list[str], *, client_certs: bool) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        ctx.set_alpn_protocols(alpn)
        if client_certs:
            ctx.load_verify_locations(cadata=self.user_ca_pem)
            ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx

    def sign_session(self, ssh_pub: str, tls_pub: str, ttl: timedelta, user: str = "alice") -> dict[str, Any]:
        ident = Identity(
            user=user,
            roles=("access",),
            logins=("root", "alice"),
            cluster=CLUSTER,
            expires=datetime.now(UTC) + ttl,
        )
        return {
            "ssh_cert": self.user.sign_ssh_user_cert(ssh_pub, ident, ttl=ttl),
            "tls_cert": self.user.sign_tls_cert(tls_pub, ident, ttl=ttl),
            "ttl": format_duration(ttl),
            "expires": ident.expires.isoformat() if ident.expires else None,
            "user": user,
            "roles": list(ident.roles),
            "logins": list(ident.logins),
            "cluster_name": CLUSTER,
            "host_ca_pems": [self.host_ca_pem],
            "user_ca_pems": [self.user_ca_pem],
            "host_ca_ssh_keys": [self.host.ssh_public_key],
            "user_ca_ssh_keys": [self.user.ssh_public_key],
        }

    def save_profile(self, home: Path, proxy: str, *, ttl: timedelta = timedelta(hours=1)) -> Profile:
        """What a successful `ward login` leaves behind, without the login."""
        ssh_key, tls_key = generate_ssh_key(), generate_tls_key()
        resp = self.sign_session(ssh_public_key_line(ssh_key), public_key_pem(tls_key), ttl)
        profile = Profile(
            proxy=proxy,
            user="alice",
            cluster=CLUSTER,
            valid_until=load_x509(resp["tls_cert"]).not_valid_after_utc,
            roles=resp["roles"],
            logins=resp["logins"],
            ttl=resp["ttl"],
            ca_pin=self.pin,
        )
        creds = Credentials(
            ssh_key_openssh=ssh_private_key_openssh(ssh_key),
            ssh_public_line=ssh_public_key_line(ssh_key),
            ssh_cert_line=resp["ssh_cert"],
            tls_cert_pem=resp["tls_cert"],
            tls_key_pem=private_key_pem(tls_key),
            host_ca_pems=resp["host_ca_pems"],
            host_ca_ssh_keys=resp["host_ca_ssh_keys"],
        )
        return ProfileStore(home).save(profile, creds)


# ---------------------------------------------------------------- servers


class LoopThread:
    """An event loop in a thread, so servers keep running while CLI commands run their own loops."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class WebAPI:
    """The proxy's JSON API as `ward` sees it: ping, sessions (password + OTP), visible nodes."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.second_factor = "otp"
        self.session_calls: list[dict[str, Any]] = []
        self.app = web.Application()
        self.app.router.add_get("/webapi/ping", self.ping)
        self.app.router.add_post("/webapi/sessions", self.sessions)
        self.app.router.add_get("/v1/nodes/visible", self.nodes)

    async def ping(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "cluster_name": CLUSTER,
                "proxy_public_addr": "localhost:3080",
                "server_version": "test",
                "auth": {"second_factor": self.second_factor, "connectors": []},
                "host_ca_pems": [self.cluster.host_ca_pem],
            }
        )

    async def sessions(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.session_calls.append(body)

        def error(code: str, message: str, status: int) -> web.Response:
            return web.json_response({"error": {"code": code, "message": message}}, status=status)

        if body["user"] == "locked":
            return error(
                "locked", "user locked is temporarily locked until 12:00 after too many failed logins", 403
            )
        if body["user"] != "alice" or body["password"] != "correct horse battery":
            return error("authentication_failed", "invalid username or password", 401)
        if self.second_factor == "otp" and body["otp"] != "123456":
            return error("authentication_failed", "invalid one-time code", 401)
        ttl = parse_duration(body["ttl"] or "12h")
        return web.json_response(
            self.cluster.sign_session(body["ssh_public_key"], body["tls_public_key"], ttl)
        )

    async def nodes(self, request: web.Request) -> web.Response:
        return web.json_response({"nodes": NODES})


class FrontProxy:
    """One TLS port routed by ALPN, in blocking threads (they honour TLS half-close, as the contract asks)."""

    def __init__(
        self, cluster: Cluster, targets: dict[str, tuple[str, int]], auth_backend: tuple[str, int]
    ) -> None:
        self.ctx = cluster.server_context(["ward-ssh", "ward-auth", "http/1.1"], client_certs=True)
        self.targets = targets
        self.auth_backend = auth_backend
        self.requests: list[dict[str, Any]] = []
        self.connections = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.threads: list[threading.Thread] = []
        self.open: set[socket.socket] = set()
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self.threads.append(t)

    def stop(self) -> None:
        _close_listener(self.sock)
        for s in list(self.open):
            with contextlib.suppress(OSError):
                s.close()
        for t in self.threads:
            t.join(5)

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            t = threading.Thread(target=self._handle, args=(raw,), daemon=True)
            t.start()
            self.threads.append(t)

    def _handle(self, raw: socket.socket) -> None:
        raw.settimeout(10)
        self.open.add(raw)
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as tls:
                alpn = tls.selected_alpn_protocol()
                if not tls.getpeercert():
                    return  # both routes need a user certificate
                if alpn == "ward-ssh":
                    self._ssh(tls)
                elif alpn == "ward-auth":
                    self._relay(tls, socket.create_connection(self.auth_backend), b"")
        except (OSError, ValueError):
            pass
        finally:
            self.open.discard(raw)
            raw.close()

    def _ssh(self, tls: ssl.SSLSocket) -> None:
        buf = b""
        while b"\n" not in buf:
            data = tls.recv(4096)
            if not data:
                return
            buf += data
        line, _, rest = buf.partition(b"\n")
        req = json.loads(line)
        self.requests.append(req)
        target = self.targets.get(req["host"])
        if target is None:
            answer = {"ok": False, "code": "not_found", "error": f"node {req['host']!r} not found"}
            tls.sendall(json.dumps(answer).encode() + b"\n")
            return
        node = socket.create_connection(target)
        tls.sendall(
            json.dumps({"ok": True, "node": req["host"], "host_id": "id-" + req["host"]}).encode() + b"\n"
        )
        self._relay(tls, node, rest)

    @staticmethod
    def _relay(tls: ssl.SSLSocket, node: socket.socket, first: bytes) -> None:
        """Both ways until the node ends; the client's close_notify becomes a FIN to the node."""
        node.settimeout(10)
        if first:
            node.sendall(first)
        tls_open = node_open = True
        try:
            while node_open:
                if tls_open and tls.pending():
                    ready = [tls]
                else:
                    watch = [s for s, o in ((tls, tls_open), (node, node_open)) if o]
                    ready, _, _ = select.select(watch, [], [], 10)
                    if not ready:
                        return
                if tls in ready:
                    data = tls.recv(65536)
                    if data:
                        node.sendall(data)
                    else:
                        tls_open = False
                        node.shutdown(socket.SHUT_WR)
                if node in ready:
                    data = node.recv(65536)
                    if data:
                        tls.sendall(data)
                    else:
                        node_open = False
            with contextlib.suppress(OSError, ValueError):
                tls.unwrap()
        finally:
            node.close()


def _close_listener(sock: socket.socket) -> None:
    """shutdown() first: on Linux, close() alone does not wake a thread blocked in accept()."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class EchoServer:
    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.addr = self.sock.getsockname()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            with contextlib.suppress(OSError):
                while data := conn.recv(65536):
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)

    def stop(self) -> None:
        _close_listener(self.sock)
        self.thread.join(5)


async def start_node(cluster: Cluster, name: str, exit_code: int) -> asyncssh.SSHAcceptor:
    """An asyncssh node with a host certificate naming `<name>.<cluster>`, trusting the user CA."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    cert_line = cluster.host.sign_ssh_host_cert(
        key.export_public_key().decode(),
        host_id=f"id-{name}",
        node_name=name,
        cluster=CLUSTER,
        system_role="node",
        extra_principals=[f"{name}.{CLUSTER}"],
        ttl=timedelta(hours=1),
    )

    async def handle(process: asyncssh.SSHServerProcess) -> None:
        user = process.get_extra_info("username")
        process.stdout.write(f"{name} ran {process.command!r} as {user}\nsecond line\n")
        process.exit(exit_code)

    return await asyncssh.create_server(
        asyncssh.SSHServer,
        "127.0.0.1",
        0,
        server_host_keys=[key],
        server_host_certs=[asyncssh.import_certificate(cert_line)],
        authorized_client_keys=asyncssh.import_authorized_keys(
            f"cert-authority {cluster.user.ssh_public_key}\n"
        ),
        process_factory=handle,
    )


class Env:
    def __init__(self, root: Path) -> None:
        self.cluster = Cluster(root)
        self.loop = LoopThread()
        self.web = WebAPI(self.cluster)
        self.runner = web.AppRunner(self.web.app)
        self.loop.run(self.runner.setup())
        tls_site = web.TCPSite(
            self.runner,
            "127.0.0.1",
            0,
            ssl_context=self.cluster.server_context(["http/1.1"], client_certs=False),
        )
        plain_site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run(tls_site.start())
        self.loop.run(plain_site.start())
        self.web_addr = f"127.0.0.1:{tls_site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        plain_port = plain_site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.echo = EchoServer()
        self.nodes = [
            self.loop.run(start_node(self.cluster, "web1", 0)),
            self.loop.run(start_node(self.cluster, "web2", 5)),
        ]
        ports = [n.sockets[0].getsockname()[1] for n in self.nodes]
        self.front = FrontProxy(
            self.cluster,
            {"echo": self.echo.addr, "web1": ("127.0.0.1", ports[0]), "web2": ("127.0.0.1", ports[1])},
            ("127.0.0.1", plain_port),
        )

    def reset(self) -> None:
        self.web.session_calls.clear()
        self.web.second_factor = "otp"
        self.front.requests.clear()

    def stop(self) -> None:
        self.front.stop()
        self.echo.stop()
        for n in self.nodes:
            n.close()
        self.loop.run(self.runner.cleanup())
        self.loop.stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("ward-env"))
    yield e
    e.stop()


@pytest.fixture
def home(tmp_path: Path, env: Env) -> Path:
    env.reset()
    return tmp_path / "ward home"  # a space, to prove paths are quoted for OpenSSH


def run_ward(home: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """The installed `ward`, as a person (or OpenSSH) runs it."""
    env = {**os.environ, "WARD_HOME": str(home), "HOME": str(home.parent)}
    return subprocess.run([str(BIN / "ward"), *args], input=stdin, capture_output=True, timeout=30, env=env)


# ---------------------------------------------------------------- profile store


def test_profile_save_load_permissions_and_expiry(env: Env, home: Path) -> None:
    profile = env.cluster.save_profile(home, "127.0.0.1:3080")
    store = ProfileStore(home)
    assert (home / "current-profile").read_text().strip() == "127.0.0.1:3080"
    key_dir = home / "keys" / "127.0.0.1:3080"
    for d in (home, home / "keys", key_dir, key_dir / "cas"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert stat.S_IMODE((key_dir / "alice").stat().st_mode) == 0o600
    assert stat.S_IMODE((key_dir / "alice-x509-key.pem").stat().st_mode) == 0o600
    assert (key_dir / "alice").read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert (key_dir / "alice-cert.pub").read_text().startswith("ssh-ed25519-cert-v01@openssh.com ")
    assert "BEGIN CERTIFICATE" in (key_dir / "alice-x509.pem").read_text()
    assert (key_dir / "cas" / "host.pem").read_text().strip() == env.cluster.host_ca_pem.strip()
    saved = yaml.safe_load((home / "127.0.0.1:3080.yaml").read_text())
    assert saved["user"] == "alice" and saved["cluster"] == CLUSTER and saved["logins"] == ["root", "alice"]
    assert not list(home.rglob("*.tmp"))

    known = (home / "known_hosts").read_text().splitlines()
    ca_type, ca_key = env.cluster.host.ssh_public_key.split()[:2]
    assert known == [f"@cert-authority *.{CLUSTER} {ca_type} {ca_key} wardgate-proxy=127.0.0.1:3080"]

    loaded = store.load()
    assert (loaded.proxy, loaded.user, loaded.valid_until) == (profile.proxy, "alice", profile.valid_until)
    assert not loaded.is_expired()
    assert loaded.is_expired(loaded.valid_until + timedelta(seconds=1))
    with pytest.raises(
        ExpiredError, match=r"your certificate expired at .* UTC; run `ward login --proxy=127"
    ):
        loaded.require_valid(loaded.valid_until + timedelta(seconds=1))
    ctx = loaded.ssl_context("ward-ssh")
    assert ctx.verify_mode == ssl.CERT_REQUIRED

    # A person's own line survives re-login; the profile's line is replaced, not duplicated.
    with (home / "known_hosts").open("a") as f:
        f.write("@cert-authority *.other.example ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMine mine\n")
    env.cluster.save_profile(home, "127.0.0.1:3080")
    lines = (home / "known_hosts").read_text().splitlines()
    assert len(lines) == 2 and lines[0].endswith(" mine")

    assert store.remove() is not None
    assert not key_dir.exists() and not (home / "127.0.0.1:3080.yaml").exists()
    assert not (home / "current-profile").exists()
    assert (home / "known_hosts").read_text().splitlines() == [lines[0]]
    with pytest.raises(NotLoggedInError, match="not logged in: run `ward login"):
        store.load()


def test_proxy_addresses_are_normalized() -> None:
    assert normalize_proxy("proxy.example") == "proxy.example:3080"
    assert normalize_proxy("https://proxy.example:443/") == "proxy.example:443"
    assert normalize_proxy("[::1]:3080") == "[::1]:3080"
    for bad in ("", "a/b:3080", "host:99999", "host:port"):
        with pytest.raises(BadParameterError):
            normalize_proxy(bad)


# ---------------------------------------------------------------- OpenSSH config and argv


def test_ssh_config_block(env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    profile = env.cluster.save_profile(tmp_path / ".ward", "proxy.example.com:3080")
    block = ssh_config_block(profile, ward=["/opt/ward bin/ward"])
    assert block == (
        f"# Wardgate: cluster {CLUSTER} via proxy.example.com:3080 (generated by `ward config`)\n"
        f"Host *.{CLUSTER}\n"
        '    UserKnownHostsFile "~/.ward/known_hosts"\n'
        "    GlobalKnownHostsFile /dev/null\n"
        '    IdentityFile "~/.ward/keys/proxy.example.com:3080/alice"\n'
        '    CertificateFile "~/.ward/keys/proxy.example.com:3080/alice-cert.pub"\n'
        '    ProxyCommand "/opt/ward bin/ward" proxy ssh --proxy=proxy.example.com:3080 %r@%h:%p\n'
        "    StrictHostKeyChecking yes\n"
        "    IdentitiesOnly yes\n"
    )
    # A moved home is spelled out (OpenSSH won't have WARD_HOME), and a proxy under *.CLUSTER is excluded.
    other = env.cluster.save_profile(tmp_path / "elsewhere", f"proxy.{CLUSTER}:443")
    block = ssh_config_block(other, ward=["/usr/bin/ward"])
    assert f"Host *.{CLUSTER} !proxy.{CLUSTER}\n" in block
    assert f'IdentityFile "{tmp_path}/elsewhere/keys/proxy.{CLUSTER}:443/alice"' in block
    home_arg = f"--home={tmp_path}/elsewhere"
    assert f'ProxyCommand "/usr/bin/ward" proxy ssh --proxy=proxy.{CLUSTER}:443 {home_arg} %r@%h:%p' in block


def test_ssh_argv_for_the_main_flags(env: Env, home: Path) -> None:
    profile = env.cluster.save_profile(home, "127.0.0.1:3080")
    argv = ssh_argv(
        profile,
        "web1",
        "root",
        ["ls", "-l", "/tmp"],
        port=2222,
        local_forwards=["8080:localhost:80"],
        remote_forwards=["9000:localhost:9000"],
        dynamic_forwards=["1080"],
        forward_agent=True,
        tty=2,
        options=["ServerAliveInterval=15"],
        ward=["/usr/bin/ward"],
    )
    key_dir = home / "keys" / "127.0.0.1:3080"
    assert argv[:5] == ["ssh", "-F", "none", "-o", "ServerAliveInterval=15"]
    opts = [argv[i + 1] for i, a in enumerate(argv) if a == "-o"]
    assert f'UserKnownHostsFile="{home}/known_hosts"' in opts
    assert f'IdentityFile="{key_dir}/alice"' in opts
    assert f'CertificateFile="{key_dir}/alice-cert.pub"' in opts
    assert "StrictHostKeyChecking=yes" in opts and "IdentitiesOnly=yes" in opts
    assert f'ProxyCommand="/usr/bin/ward" proxy ssh --proxy=127.0.0.1:3080 "--home={home}" %r@%h:%p' in opts
    tail = argv[argv.index("-p") :]
    assert tail == [
        "-p", "2222", "-L", "8080:localhost:80", "-R", "9000:localhost:9000", "-D", "1080", "-A", "-t", "-t",
        "--", f"root@web1.{CLUSTER}", "ls", "-l", "/tmp",
    ]  # fmt: skip
    plain = ssh_argv(profile, f"web1.{CLUSTER}", "root", no_tty=True, ward=["/w"])
    assert plain[-3:] == ["-T", "--", f"root@web1.{CLUSTER}"]

    assert split_login("deploy@web2", "", profile) == ("deploy", "web2")
    assert split_login("web2", "", profile) == ("root", "web2")  # the first login the roles grant
    assert split_login("web2", "alice", profile) == ("alice", "web2")
    for user, node in (("root;id", "web1"), ("root", "web1$(id)"), ("root", "a b")):
        with pytest.raises(BadParameterError):
            ssh_argv(profile, node, user, ward=["/w"])


def test_scp_argv(env: Env, home: Path) -> None:
    profile = env.cluster.save_profile(home, "127.0.0.1:3080")
    argv = scp_argv(
        profile, ["./a:b", "local.txt"], "deploy@web1:/srv/", recursive=True, port=2222, ward=["/w"]
    )
    assert argv[0] == "scp" and argv[1:3] == ["-F", "none"]
    assert argv[argv.index("-r") :] == [
        "-r",
        "-P",
        "2222",
        "--",
        "./a:b",
        "local.txt",
        f"deploy@web1.{CLUSTER}:/srv/",
    ]
    argv = scp_argv(profile, ["web1:/etc/hosts"], ".", ward=["/w"])
    assert argv[-2:] == [f"root@web1.{CLUSTER}:/etc/hosts", "."]
    with pytest.raises(BadParameterError, match="neither source nor destination is remote"):
        scp_argv(profile, ["a"], "b", ward=["/w"])


def test_proxy_target_parsing(env: Env, home: Path) -> None:
    profile = env.cluster.save_profile(home, "127.0.0.1:3080")
    t = parse_proxy_target(f"root@web1.{CLUSTER}:22", profile)
    assert (t.login, t.host, t.port) == ("root", "web1", 0)  # ssh's default %p means "the node's own port"
    t = parse_proxy_target("deploy@10.1.2.3:2222", profile)
    assert (t.login, t.host, t.port) == ("deploy", "10.1.2.3", 2222)


def test_ls_filtering_units() -> None:
    sel = Selector.parse(["env=prod", "role=web"])
    assert [n["name"] for n in filter_nodes(NODES, sel)] == ["web1"]
    assert [n["name"] for n in filter_nodes(NODES, Selector.parse(["env=prod"]))] == ["web1", "web2"]
    assert filter_nodes(NODES, Selector.parse(["missing="])) == []
    assert node_rows(NODES[1:2]) == [["web2", "⟵ tunnel", "env=prod,role=worker", "root, deploy"]]
    with pytest.raises(BadParameterError, match="expected label=value"):
        Selector.parse(["prod"])


# ---------------------------------------------------------------- login over real HTTP and TLS


async def test_login_with_the_right_pin(env: Env, home: Path) -> None:
    profile = await login(
        env.web_addr, "alice", "correct horse battery", "123456", ttl="2h", ca_pin=env.cluster.pin, home=home
    )
    assert (profile.user, profile.cluster, profile.logins) == ("alice", CLUSTER, ["root", "alice"])
    left = profile.valid_until - datetime.now(UTC)
    assert timedelta(hours=1, minutes=58) < left <= timedelta(hours=2)
    [body] = env.web.session_calls
    assert body["ttl"] == "2h" and body["otp"] == "123456"
    assert body["ssh_public_key"].startswith("ssh-ed25519 ")
    assert body["tls_public_key"].startswith("-----BEGIN PUBLIC KEY-----")
    assert "PRIVATE" not in json.dumps(body)  # keys are made here and stay here
    again = ProfileStore(home).load()
    assert again.ca_pin == env.cluster.pin and again.proxy == env.web_addr
    # Re-login needs no pin: the CA saved at first login is trusted.
    await login(env.web_addr, "alice", "correct horse battery", "123456", home=home)
    assert len(env.web.session_calls) == 2


async def test_wrong_pin_is_refused_before_the_password_is_sent(env: Env, home: Path) -> None:
    wrong = "sha256:" + "0" * 64
    with pytest.raises(AuthenticationError, match="does not match --ca-pin"):
        await login(env.web_addr, "alice", "correct horse battery", "123456", ca_pin=wrong, home=home)
    assert env.web.session_calls == []
    assert not home.exists()
    with pytest.raises(BadParameterError, match="pass --ca-pin"):
        await login(env.web_addr, "alice", "correct horse battery", "123456", home=home)


def test_ward_login_status_logout_cli(env: Env, home: Path) -> None:
    runner = CliRunner()
    wenv = {"WARD_HOME": str(home)}
    args = ["login", f"--proxy={env.web_addr}", "--user=alice", f"--ca-pin={env.cluster.pin}"]
    res = runner.invoke(ward_main, args, input="correct horse battery\n123456\n", env=wenv)
    assert res.exit_code == 0, res.output
    assert "One-time code" in res.output
    for expected in (f"Proxy:       {env.web_addr}", f"Cluster:     {CLUSTER}", "User:        alice",
                     "Roles:       access", "Logins:      root, alice", "Valid until: "):  # fmt: skip
        assert expected in res.stdout, res.stdout

    res = runner.invoke(ward_main, ["status", "--format", "json"], env=wenv)
    assert res.exit_code == 0
    status = json.loads(res.stdout)
    assert status["user"] == "alice" and status["expired"] is False

    res = runner.invoke(ward_main, args, input="wrong password\n123456\n", env=wenv)
    assert res.exit_code == 1 and "login failed: invalid username or password" in res.output

    env.web.second_factor = "off"
    res = runner.invoke(ward_main, [*args[:1], args[1], "--user=locked", args[3]], input="x\n", env=wenv)
    assert res.exit_code == 1 and "One-time code" not in res.output
    assert "temporarily locked" in res.output

    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    res = runner.invoke(ward_main, ["login", f"--proxy=127.0.0.1:{port}", "--insecure"], env=wenv)
    assert res.exit_code == 1
    assert (
        f"cannot reach the proxy at 127.0.0.1:{port}" in res.output and "default port is 3080" in res.output
    )

    res = runner.invoke(ward_main, ["logout"], env=wenv)
    assert res.exit_code == 0 and f"Logged out alice from {env.web_addr}" in res.output
    res = runner.invoke(ward_main, ["status"], env=wenv)
    assert res.exit_code == 1 and "not logged in" in res.output


# ---------------------------------------------------------------- the ward-ssh stream


async def test_open_ssh_stream_relays_and_half_closes(env: Env, home: Path) -> None:
    profile = env.cluster.save_profile(home, env.front.addr)
    reader, writer = await open_ssh_stream(profile, "echo", 0, "root")
    payload = os.urandom(3 * 1024 * 1024)
    writer.write(payload)
    await writer.drain()
    writer.write_eof()  # TLS close_notify; the echo ends only once it sees our EOF
    assert await reader.read() == payload
    writer.close()
    await writer.wait_closed()
    assert env.front.requests == [{"host": "echo", "port": 0, "login": "root"}]


async def test_open_ssh_stream_refused(env: Env, home: Path) -> None:
    profile = env.cluster.save_profile(home, env.front.addr)
    with pytest.raises(NotFoundError, match="cannot connect to root@nowhere: node 'nowhere' not found"):
        await open_ssh_stream(profile, "nowhere", 0, "root")


def test_ward_proxy_ssh_pipes_stdin_and_stdout(env: Env, home: Path) -> None:
    env.cluster.save_profile(home, env.front.addr)
    payload = os.urandom(1024 * 1024)
    res = run_ward(
        home, "proxy", "ssh", f"--proxy={env.front.addr}", f"root@echo.{CLUSTER}:22", stdin=payload
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == payload
    assert env.front.requests == [{"host": "echo", "port": 0, "login": "root"}]

    res = run_ward(home, "proxy", "ssh", f"deploy@nowhere.{CLUSTER}:2222")
    assert res.returncode == 1
    assert b"cannot connect to deploy@nowhere: node 'nowhere' not found" in res.stderr
    assert env.front.requests[-1] == {"host": "nowhere", "port": 2222, "login": "deploy"}


def test_expired_profile_is_refused_before_dialling(env: Env, home: Path) -> None:
    env.cluster.save_profile(home, env.front.addr)
    path = home / f"{env.front.addr}.yaml"
    data = yaml.safe_load(path.read_text())
    data["valid_until"] = "2020-01-01T00:00:00Z"
    path.write_text(yaml.safe_dump(data))
    before = env.front.connections
    runner = CliRunner()
    for args in (["ls"], ["ssh", "root@web1", "true"], ["scp", "web1:/etc/hosts", "."]):
        res = runner.invoke(ward_main, args, env={"WARD_HOME": str(home)})
        assert res.exit_code == 1, args
        assert "your certificate expired at 2020-01-01 00:00:00 UTC; run `ward login" in res.output
    res = run_ward(home, "proxy", "ssh", f"root@web1.{CLUSTER}:22")
    assert res.returncode == 1 and b"your certificate expired at 2020-01-01" in res.stderr
    assert env.front.connections == before
    res = runner.invoke(ward_main, ["status"], env={"WARD_HOME": str(home)})
    assert res.exit_code == 0 and "[EXPIRED]" in res.output


# ---------------------------------------------------------------- through the auth API and real OpenSSH


def test_ward_ls_through_the_proxy(env: Env, home: Path) -> None:
    env.cluster.save_profile(home, env.front.addr)
    runner = CliRunner()
    res = runner.invoke(ward_main, ["ls", "env=prod"], env={"WARD_HOME": str(home)})
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["Node", "Address", "Labels", "Logins"]
    assert [line.split()[0] for line in lines[2:]] == ["web1", "web2"]
    assert "10.0.0.1:3022" in lines[2] and "env=prod,role=web" in lines[2] and "root" in lines[2]
    res = runner.invoke(ward_main, ["ls", "--format", "json", "role=worker"], env={"WARD_HOME": str(home)})
    assert [n["name"] for n in json.loads(res.stdout)] == ["web2"]


def test_ward_ssh_and_ssh_config_with_real_openssh(env: Env, home: Path) -> None:
    env.cluster.save_profile(home, env.front.addr)
    res = run_ward(home, "ssh", "root@web1", "echo", "-n", "hi")
    assert res.returncode == 0, res.stderr
    assert res.stdout == b"web1 ran 'echo -n hi' as root\nsecond line\n"
    res = run_ward(home, "ssh", "web2", "true")
    assert res.returncode == 5  # ssh's exit code passes through
    assert env.front.requests[-1] == {"host": "web2", "port": 0, "login": "root"}

    # Every node matching the labels, in parallel, lines prefixed; the exit code is the worst one.
    res = run_ward(home, "ssh", "env=prod", "uptime")
    assert res.returncode == 5, res.stderr
    assert sorted(res.stdout.decode().splitlines()) == [
        "[web1] second line",
        "[web1] web1 ran 'uptime' as root",
        "[web2] second line",
        "[web2] web2 ran 'uptime' as root",
    ]

    # The printed block makes plain `ssh root@web1.CLUSTER` work.
    block = run_ward(home, "config")
    assert block.returncode == 0
    config = home / "ssh_config"
    config.write_bytes(block.stdout)
    res = subprocess.run(
        ["ssh", "-F", str(config), f"root@web1.{CLUSTER}", "id"],
        capture_output=True,
        timeout=30,
        env={**os.environ, "WARD_HOME": str(home), "HOME": str(home.parent)},
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(b"web1 ran 'id' as root")
