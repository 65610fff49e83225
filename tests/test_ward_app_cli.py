"""`ward apps ls`, `ward app login/logout/config` and `ward proxy app`, against a stand-in cluster.

The proxy here is a test double speaking the contract of docs/apps.md: one TLS port with a
host-CA certificate whose identity is a proxy's (covering `*.wardgate.localhost`, like the real
proxy's certificate covers `*.<its public host>`), routed by ALPN: `ward-auth` is relayed to a
small aiohttp app answering `/v1/apps/visible` and `/v1/certs/app-user` (signing with a
throw-away user CA, as the auth service does); `http/1.1` answers one HTTP request naming the
app in the client certificate's route and the SNI it was asked for; `ward-tcp` echoes. The
end-to-end tests with the real proxy, app service and upstreams live elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.test_ward_client import CLUSTER, Cluster, LoopThread
from wardgate.api.client import ConnectionFailed
from wardgate.auth.certs import verify_tls_identity
from wardgate.auth.identity import Identity, RouteToApp
from wardgate.cli.ward import main as ward_main
from wardgate.client.app import (
    AppLogin,
    AppStore,
    AppTunnel,
    app_login,
    check_proxy_identity,
    config_text,
    curl_argv,
    ensure_app_login,
    local_command,
    open_app_stream,
    public_endpoint,
    resolve_option,
)
from wardgate.client.profile import ExpiredError, ProfileStore
from wardgate.errors import AccessDeniedError, BadParameterError, NotFoundError
from wardgate.keys import generate_tls_key, load_x509, private_key_pem, public_key_pem

BIN = Path(sys.executable).parent
APP_DOMAIN = "wardgate.localhost"
OTP = "123456"


def _apps(port: int) -> list[dict[str, Any]]:
    return [
        {"name": "grafana", "description": "Dashboards", "labels": {"env": "prod", "team": "obs"},
         "uri_kind": "http", "public_addr": f"grafana.{APP_DOMAIN}:{port}", "require_session_mfa": False},
        {"name": "redis", "description": "", "labels": {"env": "dev"},
         "uri_kind": "tcp", "public_addr": f"redis.{APP_DOMAIN}:{port}", "require_session_mfa": False},
        {"name": "vault", "description": "Secrets, second factor per session", "labels": {},
         "uri_kind": "http", "public_addr": f"vault.{APP_DOMAIN}", "require_session_mfa": True},
    ]  # fmt: skip


def host_cert(cluster: Cluster, root: Path, *, role: str, name: str) -> tuple[Path, Path]:
    """A cluster host certificate for a service of `role`, for loopback and `*.wardgate.localhost`."""
    key = generate_tls_key()
    cert = cluster.host.sign_tls_cert(
        public_key_pem(key),
        Identity(user=name, system_role=role, host_id=name),
        ttl=timedelta(hours=1),
        dns_names=["localhost", f"*.{APP_DOMAIN}"],
        ip_addresses=["127.0.0.1"],
    )
    cert_file, key_file = root / f"{name}.pem", root / f"{name}-key.pem"
    cert_file.write_text(cert)
    key_file.write_text(private_key_pem(key))
    return cert_file, key_file


class FakeAuth:
    """The two auth API calls `ward app` makes, signing like the auth service does."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.cert_calls: list[dict[str, Any]] = []
        self.ttl = timedelta(hours=1)
        self.proxy_port = 0
        self.app = web.Application()
        self.app.router.add_get("/v1/apps/visible", self.visible)
        self.app.router.add_post("/v1/certs/app-user", self.app_user)

    async def visible(self, request: web.Request) -> web.Response:
        return web.json_response({"apps": _apps(self.proxy_port)})

    async def app_user(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.cert_calls.append(body)

        def error(code: str, message: str, status: int) -> web.Response:
            return web.json_response({"error": {"code": code, "message": message}}, status=status)

        found = next((a for a in _apps(self.proxy_port) if a["name"] == body["app"]), None)
        if found is None:
            return error("not_found", f'app "{body["app"]}" not found', 404)
        if found["require_session_mfa"] and body.get("otp") != OTP:
            return error("access_denied", "a valid second factor is required for this session", 403)
        ident = Identity(
            user="alice",
            roles=("access",),
            cluster=CLUSTER,
            route_to_app=RouteToApp(name=found["name"], public_addr=found["public_addr"], session_id="s1"),
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
                "route_to_app": {
                    "name": found["name"],
                    "public_addr": found["public_addr"],
                    "session_id": "s1",
                },
            }
        )


class FakeProxy:
    """One asyncio TLS port routed by ALPN, presenting a host certificate of `role`."""

    def __init__(
        self, cluster: Cluster, loop: LoopThread, auth_port: int, root: Path, *, role: str = "proxy"
    ) -> None:
        self.cluster = cluster
        self.auth_port = auth_port
        cert_file, key_file = host_cert(cluster, root, role=role, name=f"{role}-1")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert_file, key_file)
        ctx.set_alpn_protocols(["http/1.1", "ward-tcp", "ward-auth"])
        ctx.load_verify_locations(cadata=cluster.user_ca_pem)
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.sni_callback = lambda obj, name, _ctx: setattr(
            obj, "sni", name
        )  # the server side has no other way
        self.seen: list[dict[str, Any]] = []
        self.server = loop.run(asyncio.start_server(self.handle, "127.0.0.1", 0, ssl=ctx))
        self.port = self.server.sockets[0].getsockname()[1]
        self.addr = f"127.0.0.1:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            obj = writer.get_extra_info("ssl_object")
            alpn = obj.selected_alpn_protocol()
            if alpn == "ward-auth":
                await self.pipe_to_auth(reader, writer)
                return
            der = obj.getpeercert(binary_form=True)
            route = None
            if der:
                ident = verify_tls_identity(
                    x509.load_der_x509_certificate(der), [self.cluster.user.tls_ca_cert]
                )
                route = ident.route_to_app
            seen: dict[str, Any] = {
                "alpn": alpn,
                "sni": getattr(obj, "sni", None),
                "app": route and route.name,
            }
            self.seen.append(seen)
            if route is None:
                return
            if alpn == "http/1.1":
                head = await reader.readuntil(b"\r\n\r\n")
                method, path, _ = head.split(b" ", 2)
                asked = f"{method.decode()} {path.decode()}"
                body = f"hello alice from {route.name} via {getattr(obj, 'sni', None)}: {asked}"
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
                )
                await writer.drain()
                return
            while data := await reader.read(256 * 1024):
                seen["bytes"] = seen.get("bytes", 0) + len(data)
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
        self.proxy = FakeProxy(self.cluster, self.loop, auth_port, root)
        self.auth.proxy_port = self.proxy.port
        self.impostor = FakeProxy(self.cluster, self.loop, auth_port, root, role="node")

    def reset(self) -> None:
        self.auth.cert_calls.clear()
        self.auth.ttl = timedelta(hours=1)
        self.proxy.seen.clear()
        self.impostor.seen.clear()

    def stop(self) -> None:
        for p in (self.proxy, self.impostor):
            p.server.close()
        self.loop.run(self.runner.cleanup())
        self.loop.stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("ward-app-env"))
    yield e
    e.stop()


@pytest.fixture
def home(tmp_path: Path, env: Env) -> Path:
    env.reset()
    h = tmp_path / "ward home"
    env.cluster.save_profile(h, env.proxy.addr)
    return h


def invoke(home: Path, *args: str) -> Any:
    return CliRunner().invoke(ward_main, list(args), env={"WARD_HOME": str(home), "COLUMNS": "200"})


def app_dir(home: Path, env: Env) -> Path:
    return home / "keys" / env.proxy.addr / "alice-app"


def expire(path: Path) -> None:
    """Make a saved profile or app login look expired."""
    data = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**data, "valid_until": "2020-01-01T00:00:00Z"}))


async def wait_for(cond: Any, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if cond():
            return
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------- pure helpers


def test_public_endpoint_resolve_option_and_local_command() -> None:
    assert public_endpoint("grafana.example", 3080) == ("grafana.example", 3080)
    assert public_endpoint("https://grafana.example:443/", 3080) == ("grafana.example", 443)
    assert public_endpoint("[::1]:8443", 3080) == ("::1", 8443)

    def resolver(table: dict[str, str]) -> Any:
        def resolve(host: str, port: int, **kw: Any) -> list[Any]:
            if host not in table:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (table[host], port))]

        return resolve

    proxy_only = resolver({"proxy.example": "10.1.2.3"})
    assert resolve_option("grafana.proxy.example", 3080, "proxy.example", proxy_only) == (
        "grafana.proxy.example:3080:10.1.2.3"
    )
    both = resolver({"proxy.example": "10.1.2.3", "grafana.proxy.example": "10.9.9.9"})
    assert resolve_option("grafana.proxy.example", 3080, "proxy.example", both) == ""
    assert resolve_option("grafana.proxy.example", 3080, "proxy.example", resolver({})) == ""
    assert resolve_option("10.0.0.1", 3080, "proxy.example", proxy_only) == ""
    v6 = resolver({"proxy.example": "2001:db8::1"})
    assert (
        resolve_option("app.proxy.example", 443, "proxy.example", v6) == "app.proxy.example:443:[2001:db8::1]"
    )
    # The real resolver: `*.localhost` has no address here, the loopback proxy has one.
    assert (
        resolve_option(f"grafana.{APP_DOMAIN}", 3080, "127.0.0.1") == f"grafana.{APP_DOMAIN}:3080:127.0.0.1"
    )

    assert local_command("http", "127.0.0.1", 8080) == "curl http://127.0.0.1:8080/"
    assert local_command("http", "0.0.0.0", 8080) == "curl http://127.0.0.1:8080/"
    assert local_command("http", "::", 8080) == "curl http://[::1]:8080/"
    assert local_command("tcp", "127.0.0.1", 6380) == "nc 127.0.0.1 6380"


def test_help_texts_are_complete() -> None:
    for args, words in (
        (["apps", "ls"], ["--format", "type (http or tcp)"]),
        (["app", "login"], ["NAME", "one-time code", "--proxy"]),
        (["app", "logout"], ["every app"]),
        (["app", "config"], ["curl|uri|ca|cert|key|json", "--resolve", "openssl s_client"]),
        (["proxy", "app"], ["--port", "--bind", "Ctrl-C", "whoever can reach it"]),
    ):
        res = CliRunner().invoke(ward_main, [*args, "--help"], env={"COLUMNS": "200"})
        assert res.exit_code == 0, res.output
        for w in words:
            assert w in " ".join(res.output.split()), (args, w)
    res = CliRunner().invoke(ward_main, ["app", "config", "grafana", "--format", "yaml"])
    assert res.exit_code == 2 and "Invalid value for '--format'" in res.output


# ---------------------------------------------------------------- listing, login, config, logout


def _columns(line: str, headers: list[str]) -> list[int]:
    return [line.index(h) for h in headers]


def test_apps_ls_table_and_json(env: Env, home: Path) -> None:
    res = invoke(home, "apps", "ls")
    assert res.exit_code == 0, res.output
    lines = [line for line in res.stdout.splitlines() if line.strip()]
    headers = ["Name", "Type", "Public address", "Description", "Labels"]
    starts = _columns(lines[0], headers)
    assert starts == sorted(starts)
    rows = {line.split()[0]: line for line in lines[2:]}
    assert set(rows) == {"grafana", "redis", "vault"}
    port = env.proxy.port
    assert rows["grafana"].split() == [
        "grafana", "http", f"grafana.{APP_DOMAIN}:{port}", "Dashboards", "env=prod,team=obs",
    ]  # fmt: skip
    assert rows["redis"].split() == ["redis", "tcp", f"redis.{APP_DOMAIN}:{port}", "env=dev"]
    for name, line in rows.items():  # every value starts right under its header
        assert line[starts[1] :].startswith("tcp " if name == "redis" else "http ")
        assert line[starts[2] :].startswith(f"{name}.{APP_DOMAIN}")
    assert rows["grafana"][starts[3] :].startswith("Dashboards ")
    assert rows["grafana"][starts[4] :].rstrip() == "env=prod,team=obs"
    assert (
        rows["redis"][starts[3] : starts[4]].strip() == ""
        and rows["redis"][starts[4] :].rstrip() == "env=dev"
    )

    res = invoke(home, "apps", "ls", "--format", "json")
    listed = {a["name"]: a for a in json.loads(res.stdout)}
    assert listed["grafana"]["logged_in"] is False and listed["redis"]["uri_kind"] == "tcp"
    assert invoke(home, "app", "login", "grafana").exit_code == 0
    listed = {a["name"]: a for a in json.loads(invoke(home, "apps", "ls", "--format", "json").stdout)}
    assert listed["grafana"]["logged_in"] is True and listed["redis"]["logged_in"] is False


def test_app_login_store_config_and_logout(env: Env, home: Path) -> None:
    port = env.proxy.port
    host = f"grafana.{APP_DOMAIN}"
    res = invoke(home, "app", "login", "grafana")
    assert res.exit_code == 0, res.output
    profile = ProfileStore(home).load()
    folder = app_dir(home, env)
    cert_path, key_path, ca_path = folder / "grafana-x509.pem", profile.tls_key_path, profile.host_ca_path
    escaped = str(cert_path).replace(":", "\\:")  # curl's --cert takes FILE:PASSWORD
    expected_curl = shlex.join(
        ["curl", "--cacert", str(ca_path), "--cert", escaped, "--key", str(key_path),
         "--resolve", f"{host}:{port}:127.0.0.1", f"https://{host}:{port}/"]
    )  # fmt: skip
    out = res.stdout.splitlines()
    assert out[0].startswith(f'Logged in to app "grafana" (http, https://{host}:{port}/), valid until ')
    assert f"  {expected_curl}" in out
    assert out[-1] == "or through a local listener that needs no certificates: ward proxy app grafana"

    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert sorted(p.name for p in folder.iterdir()) == ["grafana-x509.pem", "grafana.yaml"]
    assert stat.S_IMODE((folder / "grafana.yaml").stat().st_mode) == 0o600
    meta = yaml.safe_load((folder / "grafana.yaml").read_text())
    cert = load_x509(cert_path.read_text())
    assert meta == {
        "name": "grafana",
        "kind": "http",
        "public_addr": f"{host}:{port}",
        "valid_until": cert.not_valid_after_utc.isoformat().replace("+00:00", "Z"),
    }
    route = verify_tls_identity(cert, [env.cluster.user.tls_ca_cert]).route_to_app
    assert route is not None and route.name == "grafana"
    # The certificate is for the profile's own key; the CA file is the profile's host CA.
    assert public_key_pem(cert.public_key()) == public_key_pem(
        load_x509(profile.tls_cert_path.read_text()).public_key()
    )
    assert [c["app"] for c in env.auth.cert_calls] == ["grafana"] and "otp" not in env.auth.cert_calls[0]
    assert ca_path.read_text().strip() == env.cluster.host_ca_pem.strip()

    def config(*fmt: str) -> str:
        r = invoke(home, "app", "config", "grafana", *fmt)
        assert r.exit_code == 0, r.output
        return r.stdout.rstrip("\n")

    assert config() == expected_curl == config("--format", "curl")
    assert config("--format", "uri") == f"https://{host}:{port}/"
    assert config("--format", "ca") == str(ca_path)
    assert config("--format", "cert") == str(cert_path)
    assert config("--format", "key") == str(key_path)
    info = json.loads(config("--format", "json"))
    assert info["command"] == expected_curl and info["alpn"] == "http/1.1" and info["expired"] is False
    assert (info["kind"], info["public_addr"], info["proxy"]) == ("http", f"{host}:{port}", env.proxy.addr)
    assert info["resolve"] == f"{host}:{port}:127.0.0.1"

    # A TCP app: the ready line is openssl s_client, the hint is the local listener.
    res = invoke(home, "app", "login", "redis")
    assert res.exit_code == 0, res.output
    assert f"(tcp, tcp://redis.{APP_DOMAIN}:{port})" in res.stdout
    assert "Reach it through a local listener: ward proxy app redis --port=N" in res.stdout
    line = shlex.split(invoke(home, "app", "config", "redis").stdout)
    assert line[:4] == ["openssl", "s_client", "-quiet", "-verify_return_error"]
    assert line[line.index("-servername") + 1] == f"redis.{APP_DOMAIN}"
    assert line[line.index("-connect") + 1] == env.proxy.addr and line[line.index("-alpn") + 1] == "ward-tcp"

    # An expired certificate is still shown, with a warning and the fix.
    expire(folder / "grafana.yaml")
    res = invoke(home, "app", "config", "grafana", "--format", "uri")
    assert res.exit_code == 0 and res.stdout.strip() == f"https://{host}:{port}/"
    assert (
        'your certificate for app "grafana" expired at 2020-01-01 00:00:00 UTC: run `ward app login grafana`'
        in res.stderr
    )

    # After a new `ward login` (a new key) the certificate is useless, and config says so.
    assert json.loads(invoke(home, "apps", "ls", "--format", "json").stdout)[1]["logged_in"] is True
    env.cluster.save_profile(home, env.proxy.addr)
    res = invoke(home, "app", "config", "redis", "--format", "cert")
    assert res.exit_code == 0 and res.stdout.strip() == str(folder / "redis-x509.pem")
    assert 'your certificate for app "redis" is for the key of an earlier `ward login`' in res.stderr
    assert json.loads(invoke(home, "apps", "ls", "--format", "json").stdout)[1]["logged_in"] is False

    res = invoke(home, "app", "logout", "grafana")
    assert res.exit_code == 0 and res.stdout.strip() == 'Logged out of app "grafana".'
    assert sorted(p.name for p in folder.iterdir()) == ["redis-x509.pem", "redis.yaml"]
    res = invoke(home, "app", "logout", "grafana")
    assert res.exit_code == 1 and 'not logged in to app "grafana"' in res.output
    res = invoke(home, "app", "config", "grafana")
    assert res.exit_code == 1 and 'not logged in to app "grafana": run `ward app login grafana`' in res.output
    res = invoke(home, "app", "logout")
    assert res.exit_code == 0 and res.stdout.strip() == "Logged out of redis."
    assert not folder.exists() and ca_path.exists()
    assert invoke(home, "app", "logout").stdout.strip() == "Not logged in to any app."

    # `ward logout` takes app certificates with the profile.
    assert invoke(home, "app", "login", "grafana").exit_code == 0
    assert invoke(home, "logout").exit_code == 0
    assert not (home / "keys" / env.proxy.addr).exists()


def test_app_login_errors_are_clear(env: Env, home: Path, tmp_path: Path) -> None:
    res = invoke(home, "app", "login", "nosuch")
    assert res.exit_code == 1
    assert 'app "nosuch" not found: `ward apps ls` lists the ones you can reach' in res.output
    res = invoke(home, "app", "login", "../etc")
    assert res.exit_code == 1 and "bad app name '../etc'" in res.output
    # A second factor per session, and no terminal to ask in.
    res = invoke(home, "app", "login", "vault")
    assert res.exit_code == 1 and "there is no terminal to ask for a one-time code in" in res.output
    assert env.auth.cert_calls == [] and not app_dir(home, env).exists()

    nobody = tmp_path / "nobody"
    for args in (
        ["apps", "ls"],
        ["app", "login", "grafana"],
        ["app", "config", "grafana"],
        ["proxy", "app", "grafana"],
    ):
        res = invoke(nobody, *args)
        assert (
            res.exit_code == 1
            and "not logged in: run `ward login --proxy=HOST:PORT --user=NAME`" in res.output
        )

    expire(home / f"{env.proxy.addr}.yaml")
    res = invoke(home, "app", "login", "grafana")
    assert (
        res.exit_code == 1
        and "your certificate expired at 2020-01-01 00:00:00 UTC; run `ward login" in res.output
    )


async def test_app_login_with_a_second_factor(env: Env, home: Path) -> None:
    profile = ProfileStore(home).load()
    with pytest.raises(AccessDeniedError, match='second factor for each session on app "vault"'):
        await app_login(profile, "vault")
    with pytest.raises(
        AccessDeniedError, match='cannot log in to app "vault": a valid second factor is required'
    ):
        await app_login(profile, "vault", ask_code=lambda: "000000")
    login = await app_login(profile, "vault", ask_code=lambda: OTP)
    assert env.auth.cert_calls[-1]["otp"] == OTP
    # The app's address names no port: the proxy's is used.
    assert login.public_addr == f"vault.{APP_DOMAIN}:{env.proxy.port}"
    with pytest.raises(NotFoundError, match='app "nosuch" not found'):
        await app_login(profile, "nosuch")


# ---------------------------------------------------------------- the certificate works with real curl


@pytest.mark.skipif(not shutil.which("curl"), reason="no curl here")
def test_the_printed_curl_line_reaches_the_app(env: Env, home: Path) -> None:
    assert invoke(home, "app", "login", "grafana").exit_code == 0
    line = invoke(home, "app", "config", "grafana").stdout.strip()
    res = subprocess.run(
        [*shlex.split(line), "-sS", "--max-time", "20"], capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"hello alice from grafana via grafana.{APP_DOMAIN}: GET /"
    assert env.proxy.seen[-1] == {"alpn": "http/1.1", "sni": f"grafana.{APP_DOMAIN}", "app": "grafana"}


# ---------------------------------------------------------------- the local listener, in process


async def _http_get(port: int, path: str = "/") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def _echo(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(payload)), 30)
    finally:
        writer.close()


async def _hung_up(port: int, payload: bytes = b"x") -> bool:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        return await asyncio.wait_for(reader.read(), 10) == b""
    except ConnectionResetError:
        return True
    finally:
        writer.close()


async def test_tunnel_relays_http_and_tcp_apps_logging_in_as_needed(env: Env, home: Path) -> None:
    profile = ProfileStore(home).load()
    problems: list[str] = []
    async with AppTunnel(profile, "grafana", on_error=problems.append) as tunnel:
        port = await tunnel.start()
        assert tunnel.address == ("127.0.0.1", port)
        answers = await asyncio.gather(*(_http_get(port, f"/d/{i}") for i in range(5)))
        for i, answer in enumerate(answers):
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
            assert answer.endswith(f"hello alice from grafana via grafana.{APP_DOMAIN}: GET /d/{i}".encode())
        # No login before: the first connection got one, the others waited for it and used it.
        assert tunnel.renewals == 1 and len(env.auth.cert_calls) == 1
    assert problems == []
    assert {(s["alpn"], s["sni"], s["app"]) for s in env.proxy.seen} == {
        ("http/1.1", f"grafana.{APP_DOMAIN}", "grafana")
    }

    await app_login(profile, "redis")
    payloads = [os.urandom(n) for n in (1, 70_000, 3 * 1024 * 1024)]
    async with AppTunnel(profile, "redis", on_error=problems.append) as tunnel:
        port = await tunnel.start()
        assert await asyncio.gather(*(_echo(port, p) for p in payloads)) == payloads
        assert tunnel.renewals == 0
    assert problems == []
    tcp = [s for s in env.proxy.seen if s["alpn"] == "ward-tcp"]
    assert len(tcp) == 3 and {(s["sni"], s["app"]) for s in tcp} == {(f"redis.{APP_DOMAIN}", "redis")}

    reader, writer = await open_app_stream(profile, AppStore(profile).load("redis"))
    writer.write(b"PING\r\n")
    assert await reader.readexactly(6) == b"PING\r\n"
    writer.close()


async def test_tunnel_renews_expired_certificates_and_refuses_after_the_login_expired(
    env: Env, home: Path
) -> None:
    profile = ProfileStore(home).load()
    store = AppStore(profile)
    await app_login(profile, "grafana")
    problems: list[str] = []
    async with AppTunnel(profile, "grafana", on_error=problems.append) as tunnel:
        port = await tunnel.start()
        assert (await _http_get(port)).startswith(b"HTTP/1.1 200")
        assert tunnel.renewals == 0

        # The app certificate expired: the next connection gets a new one by itself.
        expire(store.load("grafana").meta_path)
        assert (await _http_get(port)).startswith(b"HTTP/1.1 200")
        assert tunnel.renewals == 1 and len(env.auth.cert_calls) == 2
        assert not store.load("grafana").is_expired()

        # A `ward login` elsewhere (a new key): the old certificate is useless, a new one is fetched.
        env.cluster.save_profile(home, env.proxy.addr)
        assert (await _http_get(port)).startswith(b"HTTP/1.1 200")
        assert tunnel.renewals == 2
        assert AppStore(ProfileStore(home).load()).current("grafana") is not None

        # Both expired: refused here with the fix, nothing sent to the proxy.
        expire(store.load("grafana").meta_path)
        expire(home / f"{env.proxy.addr}.yaml")
        seen = len(env.proxy.seen)
        assert await _hung_up(port)
        await wait_for(lambda: problems)
        assert len(env.proxy.seen) == seen and tunnel.renewals == 2
    assert len(problems) == 1
    assert problems[0].startswith('cannot get a certificate for app "grafana": your login to ')
    assert problems[0].endswith(f"run `ward login --proxy={env.proxy.addr} --user=alice`")

    # The same refusal before listening, for `ward proxy app`.
    with pytest.raises(ExpiredError, match=r"your login to .* expired at 2020-01-01 00:00:00 UTC"):
        await ensure_app_login(ProfileStore(home).load(), "grafana")


async def test_tunnel_asks_for_a_code_when_the_roles_want_one(env: Env, home: Path) -> None:
    profile = ProfileStore(home).load()
    asked: list[int] = []

    def ask() -> str:
        asked.append(1)
        return OTP

    async with AppTunnel(profile, "vault", ask_code=ask) as tunnel:
        port = await tunnel.start()
        assert (await _http_get(port)).endswith(f"via vault.{APP_DOMAIN}: GET /".encode())
        assert (await _http_get(port)).startswith(b"HTTP/1.1 200")
    assert asked == [1] and env.auth.cert_calls[-1]["otp"] == OTP


async def test_tunnel_trusts_only_a_proxy_of_the_cluster(env: Env, home: Path, tmp_path: Path) -> None:
    profile = ProfileStore(home).load()
    await app_login(profile, "redis")
    problems: list[str] = []

    # A host certificate of the cluster, but a node's: it never gets a byte of ours.
    impostor = env.cluster.save_profile(home, env.impostor.addr)
    await app_login(impostor, "redis")
    async with AppTunnel(impostor, "redis", on_error=problems.append) as tunnel:
        port = await tunnel.start()
        assert await _hung_up(port, b"secret")
        await wait_for(lambda: problems)
    assert problems == [
        f"{env.impostor.addr} is not a Wardgate proxy: its certificate is for 'node-1' with system role "
        "'node'; check the proxy address of your profile (`ward status`)"
    ]
    await wait_for(lambda: env.impostor.seen)
    assert [s.get("bytes", 0) for s in env.impostor.seen] == [0]

    # Unit: the identity check itself.
    ca = [env.cluster.host.tls_ca_cert]
    proxy_der = load_x509(
        host_cert(env.cluster, tmp_path, role="proxy", name="p")[0].read_text()
    ).public_bytes(Encoding.DER)
    assert check_proxy_identity(proxy_der, ca, "x").system_role == "proxy"
    (tmp_path / "other").mkdir()
    stranger = Cluster(tmp_path / "other")
    with pytest.raises(ConnectionFailed, match="cannot verify the proxy at x: certificate is not signed"):
        check_proxy_identity(proxy_der, [stranger.host.tls_ca_cert], "x")
    with pytest.raises(ConnectionFailed, match="presented no certificate"):
        check_proxy_identity(None, ca, "x")

    # A proxy of another cluster fails the TLS handshake itself.
    other = dataclasses.replace(profile, proxy=env.proxy.addr, home=tmp_path / "elsewhere")
    login = AppStore(profile).load("redis")
    other_ca = tmp_path / "other-ca.pem"
    other_ca.write_text(stranger.host_ca_pem)
    foreign = dataclasses.replace(login, ca_path=other_ca)
    with pytest.raises(ConnectionFailed, match=f"cannot verify the proxy at {env.proxy.addr}"):
        await open_app_stream(other, foreign)


# ---------------------------------------------------------------- `ward proxy app`, as a person runs it


class Listener:
    """`ward proxy app …` in the background; `port` from what it prints."""

    def __init__(self, home: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [str(BIN / "ward"), "proxy", "app", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "WARD_HOME": str(home), "HOME": str(home.parent), "COLUMNS": "200"},
            text=True,
        )
        assert self.proc.stdout is not None
        self.first = self.proc.stdout.readline()
        m = re.search(r" on 127\.0\.0\.1:(\d+)\. Use it with:", self.first)
        assert m, self.first + self.proc.stderr.read()  # type: ignore[union-attr]
        self.port = int(m.group(1))
        self.proc.stdout.readline()
        self.command = self.proc.stdout.readline().strip()

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=15)
        return self.proc.returncode, err


def test_ward_proxy_app_serves_plain_http_and_tcp(env: Env, home: Path) -> None:
    t = Listener(home, "grafana")
    try:
        assert t.first.startswith(
            f'Started a local proxy for app "grafana" (http, grafana.{APP_DOMAIN}:{env.proxy.port}) '
            "on 127.0.0.1:"
        )
        assert t.command == f"curl http://127.0.0.1:{t.port}/"
        with urllib.request.urlopen(f"http://127.0.0.1:{t.port}/api/health", timeout=20) as r:
            assert r.read().decode() == f"hello alice from grafana via grafana.{APP_DOMAIN}: GET /api/health"
        if shutil.which("curl"):
            res = subprocess.run(
                [*shlex.split(t.command), "-sS", "--max-time", "20"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert res.stdout.endswith("GET /"), res.stderr
    finally:
        rc, err = t.stop()
    assert rc == 0, err
    assert err.strip() == 'Stopped the local proxy for app "grafana".'
    assert [c["app"] for c in env.auth.cert_calls] == ["grafana"]  # logged in on the way

    t = Listener(home, "redis", "--port=0", "--bind=127.0.0.1")
    try:
        assert t.command == f"nc 127.0.0.1 {t.port}"
        with socket.create_connection(("127.0.0.1", t.port), timeout=20) as s:
            payload = os.urandom(2 * 1024 * 1024)
            sender = threading.Thread(target=s.sendall, args=(payload,))
            sender.start()
            got = bytearray()
            while len(got) < len(payload) and (chunk := s.recv(1 << 20)):
                got += chunk
            sender.join()
        assert bytes(got) == payload
    finally:
        rc, err = t.stop()
    assert rc == 0, err


def test_ward_proxy_app_refusals(env: Env, home: Path) -> None:
    res = invoke(home, "proxy", "app", "nosuch")
    assert res.exit_code == 1 and 'app "nosuch" not found: `ward apps ls` lists' in res.output
    assert invoke(home, "app", "login", "grafana").exit_code == 0
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        res = invoke(home, "proxy", "app", "grafana", f"--port={busy.getsockname()[1]}")
        assert res.exit_code == 1 and f"cannot listen on 127.0.0.1:{busy.getsockname()[1]}" in res.output
    expire(app_dir(home, env) / "grafana.yaml")
    expire(home / f"{env.proxy.addr}.yaml")
    calls = len(env.auth.cert_calls)
    res = invoke(home, "proxy", "app", "grafana")
    assert res.exit_code == 1
    assert (
        "your login to" in res.output
        and f"run `ward login --proxy={env.proxy.addr} --user=alice`" in res.output
    )
    assert len(env.auth.cert_calls) == calls


def test_config_text_rejects_unknown_formats(env: Env, home: Path) -> None:
    profile = ProfileStore(home).load()
    login = AppLogin(
        "grafana", "http", "grafana.example:443", datetime.now(UTC), Path("/w"), Path("/k"), Path("/ca")
    )
    assert config_text(login, profile, "uri") == "https://grafana.example/"
    assert curl_argv(login, profile, resolver=lambda *a, **k: [])[-1] == "https://grafana.example/"
    with pytest.raises(BadParameterError, match="unknown format 'yaml'"):
        config_text(login, profile, "yaml")
