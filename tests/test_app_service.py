"""The app service (`wardgate.agent.app`) against real upstreams on loopback.

No cluster: a user CA made here signs the certificates, a resource cache is fed by hand, and a
small stand-in answers the three auth RPCs the service makes (app sessions and JWTs). Each
connection reaches `AppService.serve` the way the proxy hands it over: a stream pair plus the
header line's fields (here through a loopback listener per header, so real HTTP clients and raw
sockets can talk to it). The upstream is a real aiohttp server; TCP apps get a real echo server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from wardgate.agent.app.service import (
    APP_COOKIE,
    STATE_COOKIE,
    AppService,
    AppServiceOptions,
    local_path,
    rewrite_location,
    split_cookies,
)
from wardgate.agent.app.transport import StreamTransport
from wardgate.api.cache import ResourceCache
from wardgate.api.events import ResourceEvent, ResourceEventType
from wardgate.api.resources import (
    App,
    AppHeader,
    AppRewrite,
    AppSpec,
    Lock,
    LockSpec,
    LockTarget,
    Role,
    RoleConditions,
    RoleSpec,
    User,
    UserSpec,
)
from wardgate.audit.events import MemoryEmitter
from wardgate.auth.ca import CertSigner, new_cert_authority
from wardgate.auth.identity import Identity, RouteToApp
from wardgate.errors import NotFoundError
from wardgate.keys import generate_tls_key
from wardgate.protocols.connheader import decode_header, encode_header
from wardgate.protocols.dbconn import decode_header as decode_db_header
from wardgate.protocols.dbconn import encode_header as encode_db_header
from wardgate.protocols.errors import ProtocolError

CLUSTER = "apps-test"
PROXY = "proxy.test:3080"
PUBLIC = "web.proxy.test:3080"
CLIENT = "203.0.113.7:50123"
HOUR = timedelta(hours=1)
BIG = bytes(range(256)) * 4096 * 3  # 3 MiB


# ---------------------------------------------------------------- the upstream


class Upstream:
    """A real aiohttp app: echoes what it was sent, redirects, streams, hangs, WebSockets."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        r = app.router
        r.add_route("*", "/whoami", self.whoami)
        r.add_get("/redirect", self.redirect)
        r.add_post("/upload", self.upload)
        r.add_get("/download", self.download)
        r.add_get("/hang", self.hang)
        r.add_get("/ws", self.ws)
        r.add_route("*", "/{tail:.*}", self.anything)
        self.runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def whoami(self, request: web.Request) -> web.Response:
        self.seen.append(request.path_qs)
        body = await request.read()
        return web.json_response(
            {
                "headers": [[k, v] for k, v in request.headers.items()],
                "path": request.path_qs,
                "method": request.method,
                "body": body.decode(errors="replace"),
            }
        )

    async def anything(self, request: web.Request) -> web.Response:
        self.seen.append(request.path_qs)
        await request.read()
        return web.Response(text=f"{request.method} {request.path_qs}\n")

    async def redirect(self, request: web.Request) -> web.Response:
        to = request.query.get("to", "self")
        where = {
            "self": f"http://127.0.0.1:{self.port}/landing?x=1",
            "alias": "http://localhost:9999/alias",
            "foreign": "https://example.org/elsewhere",
            "relative": "/relative",
        }[to]
        raise web.HTTPFound(where)

    async def upload(self, request: web.Request) -> web.Response:
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_chunked(65536):
            digest.update(chunk)
            size += len(chunk)
        chunked = "chunked" in request.headers.get("Transfer-Encoding", "")
        return web.json_response({"size": size, "sha256": digest.hexdigest(), "chunked": chunked})

    async def download(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(BIG), 256 * 1024):
            await resp.write(BIG[i : i + 256 * 1024])
        await resp.write_eof()
        return resp

    async def hang(self, request: web.Request) -> web.Response:
        self.seen.append(request.path_qs)
        await asyncio.sleep(3600)
        return web.Response()

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("echo.v1",))
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                await ws.send_str("echo:" + msg.data)
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws


# ---------------------------------------------------------------- the auth stand-in


def fake_jwt(user: str, app: str, exp: float) -> str:
    def part(d: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'ES256'})}.{part({'sub': user, 'aud': app, 'exp': int(exp)})}.c2ln"


class FakeAuth:
    """Only the auth RPCs the app service makes; sessions live in a dict like the backend's."""

    def __init__(self) -> None:
        self.sessions: dict[str, dict[str, Any]] = {}
        self.tokens: dict[str, dict[str, Any]] = {}
        self.jwt_calls: list[tuple[str, str]] = []
        self.lookups = 0

    async def app_jwt(self, cert: str, app: str) -> dict[str, Any]:
        self.jwt_calls.append((cert, app))
        exp = time.time() + 300
        return {"jwt": fake_jwt("alice", app, exp), "expires": datetime.fromtimestamp(exp, UTC).isoformat()}

    async def exchange_app_session(self, token: str) -> dict[str, Any]:
        data = self.tokens.pop(token, None)
        if data is None:
            raise NotFoundError("this sign-in link was used or has expired")
        return data

    async def get_app_session(self, secret: str) -> dict[str, Any]:
        self.lookups += 1
        data = self.sessions.get(secret)
        if data is None:
            raise NotFoundError("no such app session")
        return {k: v for k, v in data.items() if k != "secret"}


# ---------------------------------------------------------------- the harness


def put(cache: ResourceCache, res: Any, rev: list[int] = [0]) -> None:  # noqa: B006 - a counter
    rev[0] += 1
    cache.apply(ResourceEvent(ResourceEventType.PUT, res.kind, res.name, rev[0], res))


class Env:
    def __init__(self, options: AppServiceOptions | None = None) -> None:
        self.options = options or AppServiceOptions()
        self.user_ca = new_cert_authority("user", CLUSTER)
        self.signer = CertSigner(self.user_ca)
        self.other_ca = CertSigner(new_cert_authority("user", "elsewhere"))
        self.cache = ResourceCache(["cert_authority", "role", "lock", "app", "user"])
        self.emitter = MemoryEmitter()
        self.auth = FakeAuth()
        self.upstream = Upstream()
        self.apps: dict[str, App] = {}
        self.servers: list[asyncio.Server] = []
        self.service: AppService | None = None
        self.tcp_echo: asyncio.Server | None = None

    async def start(self) -> None:
        await self.upstream.start()
        put(self.cache, self.user_ca.without_secrets())
        role = Role.new("apps", RoleSpec(allow=RoleConditions(app_labels={"env": "dev"})))
        put(self.cache, role)
        put(self.cache, User.new("alice", UserSpec(roles=["apps"])))
        self.cache.apply(ResourceEvent(ResourceEventType.INIT))
        up = self.upstream.url()
        self.add_app(
            "web",
            AppSpec(
                uri=up,
                public_addr="web.proxy.test",
                rewrite=AppRewrite(
                    redirect=["localhost"],
                    headers=[
                        AppHeader(name="X-Logins", value="{{internal.logins}}"),
                        AppHeader(name="X-Team", value="team-{{external.team}}"),
                        AppHeader(name="X-Missing", value="{{external.nope}}"),
                    ],
                ),
            ),
        )
        self.add_app("refused", AppSpec(uri=f"http://127.0.0.1:{closed_port()}"))
        self.add_app("prod", AppSpec(uri=up), labels={"env": "prod"})
        self.tcp_echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
        echo_port = self.tcp_echo.sockets[0].getsockname()[1]
        self.add_app("cache", AppSpec(uri=f"tcp://127.0.0.1:{echo_port}"))
        self.service = AppService(
            auth=self.auth,
            cache=self.cache,
            emitter=self.emitter,
            host_id="host-1",
            apps=lambda: self.apps,
            options=self.options,
        )

    def add_app(self, name: str, spec: AppSpec, labels: dict[str, str] | None = None) -> None:
        self.apps[name] = App.new(name, spec, labels=labels if labels is not None else {"env": "dev"})

    async def stop(self) -> None:
        for s in self.servers:
            s.close()
        if self.service is not None:
            await self.service.close()
        if self.tcp_echo is not None:
            self.tcp_echo.close()
        await self.upstream.stop()

    # -- credentials

    def cert(
        self,
        app: str = "web",
        *,
        user: str = "alice",
        session_id: str = "sess-cert-1",
        signer: CertSigner | None = None,
        ttl: timedelta = HOUR,
    ) -> str:
        ident = Identity(
            user=user,
            roles=("apps",),
            traits={"logins": ["alice", "root"], "team": ["blue"]},
            cluster=CLUSTER,
            route_to_app=RouteToApp(name=app, public_addr=PUBLIC, session_id=session_id),
        )
        return (signer or self.signer).sign_tls_cert(generate_tls_key().public_key(), ident, ttl=ttl)

    def browser_session(self, sid: str = "app-sess-1") -> dict[str, Any]:
        secret = f"cookie-of-{sid}"
        data = {
            "secret": secret,
            "session_id": sid,
            "user": "alice",
            "app": "web",
            "cert": self.cert(session_id=sid),
            "expires": (datetime.now(UTC) + HOUR).isoformat(),
        }
        self.auth.sessions[secret] = data
        return data

    # -- connections as the proxy hands them over

    async def listen(self, app: str = "web", cert: str = "", kind: str = "http") -> str:
        """host:port where each connection is served with this header."""
        assert self.service is not None
        header = {
            "cert": cert,
            "app": app,
            "kind": kind,
            "client_addr": CLIENT,
            "proxy_addr": PROXY,
            "sni": PUBLIC.split(":")[0],
        }
        service = self.service

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(asyncio.CancelledError):  # connections left open at teardown
                await service.serve(reader, writer, header)

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.servers.append(server)
        return f"127.0.0.1:{server.sockets[0].getsockname()[1]}"

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.emitter.events if e["event"] == name]


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(asyncio.CancelledError, ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    e = Env(AppServiceOptions(response_timeout=1.0, header_timeout=1.0))
    await e.start()
    try:
        yield e
    finally:
        await e.stop()


def client() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False)


async def wait_for(what: str, cond: Callable[[], Any], timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def raw(addr: str, data: bytes, *, timeout: float = 5) -> bytes:
    """Send bytes, read until the service closes (or `timeout`)."""
    host, port = addr.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    out = b""
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                out += chunk
    writer.close()
    return out


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float = 5) -> bool:
    """The service closed (EOF, or a reset when our bytes were left unread) without a reply."""
    try:
        async with asyncio.timeout(timeout):
            return await reader.read() == b""
    except ConnectionResetError:
        return True


def headers_of(body: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in body["headers"]:
        out.setdefault(k.lower(), []).append(v)
    return out


# ---------------------------------------------------------------- certificate-authenticated HTTP


async def test_upstream_gets_the_jwt_and_never_what_the_client_forged(env: Env) -> None:
    addr = await env.listen(cert=env.cert())
    async with client() as c:
        resp = await c.post(
            f"http://{addr}/whoami?q=secret",
            data=b"hello",
            headers={
                "Host": "web.proxy.test:3080",
                "Wardgate-Jwt-Assertion": "forged",
                "Cookie": f"a=1; {APP_COOKIE}=stolen; b=2; {STATE_COOKIE}=x",
                "X-Forwarded-For": "6.6.6.6",
                "X-Logins": "root-by-client",
            },
        )
        assert resp.status == 200
        body = await resp.json()
    h = headers_of(body)
    (jwt,) = h["wardgate-jwt-assertion"]
    assert jwt != "forged"
    assert json.loads(base64.urlsafe_b64decode(jwt.split(".")[1] + "==="))["sub"] == "alice"
    assert h["cookie"] == ["a=1; b=2"]
    assert h["host"] == [f"127.0.0.1:{env.upstream.port}"]
    assert h["x-forwarded-for"] == ["203.0.113.7"]
    assert h["x-forwarded-proto"] == ["https"]
    assert h["x-forwarded-host"] == ["web.proxy.test:3080"]
    assert h["x-forwarded-port"] == ["3080"]
    assert h["x-logins"] == ["alice, root"]
    assert h["x-team"] == ["team-blue"]
    assert "x-missing" not in h
    assert body["body"] == "hello" and body["path"] == "/whoami?q=secret"
    await wait_for("the session to end", lambda: env.events("app.session.end"))
    (start,) = env.events("app.session.start")
    assert start["success"] and start["sid"] == "sess-cert-1" and start["user"] == "alice"
    assert start["app"] == "web" and start["app_public_addr"] == PUBLIC and start["remote_addr"] == CLIENT
    assert start["app_uri"] == env.upstream.url()
    (req,) = env.events("app.session.request")
    assert (req["method"], req["path"], req["status"], req["bytes_in"]) == ("POST", "/whoami", 200, 5)
    assert req["bytes_out"] > 0 and req["duration_ms"] >= 0 and req["sid"] == "sess-cert-1"
    assert "secret" not in json.dumps(env.emitter.events)


async def test_jwt_is_cached_per_certificate(env: Env) -> None:
    addr = await env.listen(cert=env.cert())
    async with client() as c:
        for _ in range(3):
            async with c.get(f"http://{addr}/whoami") as resp:
                assert resp.status == 200
    assert len(env.auth.jwt_calls) == 1 and env.auth.jwt_calls[0][1] == "web"


async def test_bodies_stream_both_ways_chunked(env: Env) -> None:
    addr = await env.listen(cert=env.cert())
    sent = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        for i in range(40):  # 5 MiB with no Content-Length: chunked to the service and on
            chunk = bytes([i]) * (128 * 1024)
            sent.update(chunk)
            yield chunk

    async with client() as c:
        async with c.post(f"http://{addr}/upload", data=body()) as resp:
            got = await resp.json()
        assert got == {"size": 40 * 128 * 1024, "sha256": sent.hexdigest(), "chunked": True}
        async with c.get(f"http://{addr}/download") as resp:
            assert resp.headers["Transfer-Encoding"] == "chunked"
            assert "Content-Length" not in resp.headers
            assert await resp.read() == BIG
        async with c.post(f"http://{addr}/upload", data=io.BytesIO(BIG)) as resp:  # Content-Length stays
            assert (await resp.json())["chunked"] is False
        async with c.head(f"http://{addr}/whoami") as resp:
            assert resp.status == 200 and resp.headers["Content-Length"] != "0"
            assert await resp.read() == b""
    await wait_for("the session to end", lambda: env.events("app.session.end"))
    reqs = env.events("app.session.request")
    assert [r["bytes_in"] for r in reqs] == [40 * 128 * 1024, 0, len(BIG), 0]
    assert reqs[1]["bytes_out"] == len(BIG)
    (end,) = env.events("app.session.end")
    assert end["bytes_in"] == 40 * 128 * 1024 + len(BIG) and end["requests"] == 4


async def test_redirects_to_the_upstream_point_at_the_public_address(env: Env) -> None:
    addr = await env.listen(cert=env.cert())
    async with client() as c:
        where = {}
        for to in ("self", "alias", "foreign", "relative"):
            async with c.get(f"http://{addr}/redirect?to={to}", allow_redirects=False) as resp:
                assert resp.status == 302
                where[to] = resp.headers["Location"]
    assert where == {
        "self": "https://web.proxy.test:3080/landing?x=1",
        "alias": "https://web.proxy.test:3080/alias",
        "foreign": "https://example.org/elsewhere",
        "relative": "/relative",
    }


async def test_websocket_is_relayed_with_its_subprotocol(env: Env) -> None:
    addr = await env.listen(cert=env.cert())
    async with client() as c, c.ws_connect(f"http://{addr}/ws", protocols=("nope", "echo.v1")) as ws:
        assert ws.protocol == "echo.v1"
        await ws.send_str("hello")
        assert await ws.receive_str() == "echo:hello"
        await ws.send_bytes(b"\x00\x01\x02")
        assert await ws.receive_bytes() == b"\x02\x01\x00"
        await ws.close()
    await wait_for("the session to end", lambda: env.events("app.session.end"))
    (req,) = env.events("app.session.request")
    assert req["status"] == 101 and req["path"] == "/ws"
    assert req["bytes_in"] == 8 and req["bytes_out"] == 13


async def test_refused_upstream_is_a_502_page(env: Env) -> None:
    addr = await env.listen("refused", cert=env.cert("refused"))
    async with client() as c, c.get(f"http://{addr}/") as resp:
        assert resp.status == 502
        assert resp.content_type == "text/html"
        assert "not reachable" in await resp.text()


async def test_hanging_upstream_is_a_504_page(env: Env) -> None:
    addr = await env.listen(cert=env.cert())
    started = time.monotonic()
    async with client() as c, c.get(f"http://{addr}/hang") as resp:
        assert resp.status == 504
        assert "did not answer" in await resp.text()
    assert time.monotonic() - started < 5
    (req,) = env.events("app.session.request")
    assert req["status"] == 504 and req["success"] is False


@pytest.mark.parametrize(
    "head",
    [
        b"POST /whoami HTTP/1.1\r\nHost: w\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST /whoami HTTP/1.1\r\nHost: w\r\nContent-Length: 4\r\nContent-Length: 60\r\n\r\n",
        b"POST /whoami HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
    ],
    ids=["cl-and-te", "duplicate-cl", "te-not-chunked-last"],
)
async def test_smuggling_attempts_are_refused_and_never_forwarded(env: Env, head: bytes) -> None:
    addr = await env.listen(cert=env.cert())
    smuggled = b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: w\r\n\r\n"
    out = await raw(addr, head + smuggled)
    assert out.startswith(b"HTTP/1.1 400 "), out[:200]
    assert env.upstream.seen == []


async def test_oversized_request_heads_are_refused(env: Env) -> None:
    addr = await env.listen(cert=env.cert())
    long_header = b"GET / HTTP/1.1\r\nHost: w\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"
    many = b"GET / HTTP/1.1\r\nHost: w\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n"
    long_line = b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: w\r\n\r\n"
    for data in (long_header, many, long_line):
        out = await raw(addr, data)
        assert out.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), out[:200]
        assert b"Connection: close" in out
    assert env.upstream.seen == []


async def test_a_slow_request_head_gets_408(env: Env) -> None:
    addr = await env.listen(cert=env.cert())
    host, port = addr.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /whoami HTTP/1.1\r\nHost: w\r\n")  # and nothing more
    started = time.monotonic()
    async with asyncio.timeout(10):
        out = await reader.read()
    assert out.startswith(b"HTTP/1.1 408 "), out[:100]
    assert 0.9 < time.monotonic() - started < 5
    writer.close()
    # An idle keep-alive connection is not a slow head: it gets no 408.
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /whoami HTTP/1.1\r\nHost: w\r\n\r\n")
    async with asyncio.timeout(5):
        first = await reader.readuntil(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200 ")
    length = int(next(v for k, v in (ln.split(b": ", 1) for ln in first.split(b"\r\n")[1:] if b": " in ln)
                      if k.lower() == b"content-length"))  # fmt: skip
    await reader.readexactly(length)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(1.5):
            await reader.read(1)
    writer.close()


# ---------------------------------------------------------------- refusals and live re-checks


async def test_missing_and_foreign_certificates_are_refused(env: Env) -> None:
    other_app = await env.listen(cert=env.cert("prod"))
    foreign_ca = await env.listen(cert=env.cert(signer=env.other_ca))
    not_allowed = await env.listen("prod", cert=env.cert("prod"))
    async with client() as c:
        async with c.get(f"http://{other_app}/whoami") as resp:
            assert resp.status == 403
            assert "not for app web: run `ward app login web`" in await resp.text()
        async with c.get(f"http://{foreign_ca}/whoami") as resp:
            assert resp.status == 403
            assert "not signed by a trusted Wardgate CA" in await resp.text()
        async with c.get(f"http://{not_allowed}/whoami") as resp:
            assert resp.status == 403
            assert "no role allows app &quot;prod&quot;" in await resp.text()
    for cert in ("", env.cert("web"), env.cert("cache", signer=env.other_ca)):
        addr = await env.listen("cache", cert=cert, kind="tcp")
        host, port = addr.split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"ping")
        assert await closed_by_peer(reader)
        writer.close()
    assert env.upstream.seen == []
    fails = [e for e in env.events("app.session.start") if not e["success"]]
    assert len(fails) == 6
    assert all(e["code"] == "W4000W" and e["error"] and e["remote_addr"] == CLIENT for e in fails)
    assert "needs a certificate" in fails[3]["error"]
    assert not env.events("app.session.end")


async def test_tcp_app_relays_bytes_and_audits_them(env: Env) -> None:
    addr = await env.listen("cache", cert=env.cert("cache", session_id="tcp-1"), kind="tcp")
    host, port = addr.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"PING\r\n" * 1000)
    await writer.drain()
    async with asyncio.timeout(5):
        assert await reader.readexactly(6000) == b"PING\r\n" * 1000
    writer.write_eof()
    async with asyncio.timeout(5):
        assert await reader.read() == b""
    writer.close()
    (end,) = await wait_for("the end", lambda: env.events("app.session.end"))
    (start,) = env.events("app.session.start")
    assert start["success"] and start["sid"] == "tcp-1" and start["app"] == "cache"
    assert (end["bytes_in"], end["bytes_out"], end["success"]) == (6000, 6000, True)
    assert not env.events("app.session.request")


async def test_a_lock_cuts_an_open_websocket_and_tcp_stream_within_seconds(env: Env) -> None:
    web_addr = await env.listen(cert=env.cert())
    tcp_addr = await env.listen("cache", cert=env.cert("cache", session_id="tcp-2"), kind="tcp")
    host, port = tcp_addr.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"x")
    assert await reader.readexactly(1) == b"x"
    async with client() as c, c.ws_connect(f"http://{web_addr}/ws") as ws:
        await ws.send_str("before")
        assert await ws.receive_str() == "echo:before"
        put(env.cache, Lock.new("stop-alice", LockSpec(target=LockTarget(user="alice"), message="incident")))
        locked = time.monotonic()
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING, WSMsgType.ERROR)
        assert time.monotonic() - locked < 5
        assert ws.close_code == 1008
        assert await closed_by_peer(reader)
        assert time.monotonic() - locked < 5
        writer.close()
        # New requests on the locked session are refused.
        async with c.get(f"http://{web_addr}/whoami") as resp:
            assert resp.status == 403 and "incident" in await resp.text()
    await wait_for("two ends", lambda: len(env.events("app.session.end")) == 2)
    ends = env.events("app.session.end")
    assert all(not e["success"] and "incident" in e["error"] for e in ends)
    assert {e["sid"] for e in ends} == {"sess-cert-1", "tcp-2"}


async def test_an_app_lock_applies_to_that_app_only(env: Env) -> None:
    put(env.cache, Lock.new("stop-web", LockSpec(target=LockTarget(app="web"))))
    addr = await env.listen(cert=env.cert())
    tcp = await env.listen("cache", cert=env.cert("cache"), kind="tcp")
    async with client() as c, c.get(f"http://{addr}/whoami") as resp:
        assert resp.status == 403 and "app &quot;web&quot; is locked" in await resp.text()
    host, port = tcp.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"ok")
    assert await asyncio.wait_for(reader.readexactly(2), 5) == b"ok"
    writer.close()


async def test_an_expired_certificate_ends_the_session(env: Env) -> None:
    addr = await env.listen(cert=env.cert(ttl=timedelta(seconds=3)))
    async with client() as c, c.ws_connect(f"http://{addr}/ws") as ws:
        msg = await asyncio.wait_for(ws.receive(), 8)
        assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING, WSMsgType.ERROR)
    (end,) = await wait_for("the end", lambda: env.events("app.session.end"))
    assert "expired" in end["error"]


# ---------------------------------------------------------------- browsers: launch, cookie, sign-out


def set_cookies(resp: aiohttp.ClientResponse) -> dict[str, str]:
    return {v.split("=", 1)[0]: v for v in resp.headers.getall("Set-Cookie", ())}


async def test_browser_signs_in_through_the_launch_page_and_gets_a_host_cookie(env: Env) -> None:
    addr = await env.listen()
    host = {"Host": "web.proxy.test:3080"}
    data = env.browser_session()
    async with client() as c:
        # 1. No session: off to the proxy's launch page, with a state cookie on this host.
        async with c.get(f"http://{addr}/dash/x?tab=2", headers=host, allow_redirects=False) as resp:
            assert resp.status == 302
            loc = resp.headers["Location"]
            state_cookie = set_cookies(resp)[STATE_COOKIE]
        state = state_cookie.split(";")[0].split("=", 1)[1]
        assert loc == f"https://{PROXY}/web/launch/web.proxy.test?state={state}&path=%2Fdash%2Fx%3Ftab%3D2"
        for attr in ("Secure", "HttpOnly", "SameSite=Lax", "Path=/", "Max-Age=300"):
            assert attr in state_cookie
        assert "Domain" not in state_cookie
        # A second resource of the page keeps the same state (no race between tabs and assets).
        cookie = {"Cookie": f"{STATE_COOKIE}={state}", **host}
        async with c.get(f"http://{addr}/favicon.ico", headers=cookie, allow_redirects=False) as resp:
            assert f"state={state}&" in resp.headers["Location"]
        # Non-GET without a session: 401, not a redirect.
        async with c.post(f"http://{addr}/api", headers=host, data=b"x", allow_redirects=False) as resp:
            assert resp.status == 401 and "Sign-in required" in await resp.text()
        # 2. Back from the launch page with a token; a state from elsewhere is refused.
        env.auth.tokens["tok-1"] = data
        bad = {"Cookie": f"{STATE_COOKIE}={'x' * 32}", **host}
        url = f"http://{addr}/x-wardgate/auth?token=tok-1&state={state}&path=%2Fwhoami%3Fa%3D1"
        async with c.get(url, headers=bad, allow_redirects=False) as resp:
            assert resp.status == 403 and "not started in this browser" in await resp.text()
        async with c.get(url, headers=cookie, allow_redirects=False) as resp:
            assert resp.status == 302
            assert resp.headers["Location"] == "/whoami?a=1"
            cookies = set_cookies(resp)
        app_cookie = cookies[APP_COOKIE]
        assert app_cookie.startswith(f"{APP_COOKIE}={data['secret']};")
        for attr in ("Secure", "HttpOnly", "SameSite=Lax", "Path=/"):
            assert attr in app_cookie
        assert "Domain" not in app_cookie
        assert "Max-Age=0" in cookies[STATE_COOKIE]
        # The token works once.
        async with c.get(url, headers=cookie, allow_redirects=False) as resp:
            assert resp.status == 403 and "expired" in await resp.text()
        # 3. With the cookie: forwarded, and the app never sees Wardgate's cookies.
        signed_in = {"Cookie": f"theme=dark; {APP_COOKIE}={data['secret']}", **host}
        async with c.get(f"http://{addr}/whoami?a=1", headers=signed_in) as resp:
            assert resp.status == 200
            h = headers_of(await resp.json())
        assert h["cookie"] == ["theme=dark"]
        assert "wardgate-jwt-assertion" in h
        # The cookie on another host name (a coalesced connection): 421.
        other = {"Cookie": f"{APP_COOKIE}={data['secret']}", "Host": "other.proxy.test:3080"}
        async with c.get(f"http://{addr}/whoami", headers=other) as resp:
            assert resp.status == 421
    await wait_for("the session to end", lambda: env.events("app.session.end"))
    (start,) = env.events("app.session.start")
    assert start["sid"] == "app-sess-1" and start["user"] == "alice"
    assert env.auth.lookups == 0  # the exchange's answer was cached


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/a/b?c=d", "/a/b?c=d"),
        ("//evil.example/x", "/"),
        ("/\\evil.example", "/"),
        ("https://evil.example/", "/"),
        ("/ok\r\nSet-Cookie: x=y", "/"),
        ("", "/"),
    ],
)
def test_only_local_paths_are_redirect_targets(path: str, expected: str) -> None:
    assert local_path(path) == expected


async def test_signing_out_ends_the_browser_session_within_five_seconds(env: Env) -> None:
    addr = await env.listen()
    data = env.browser_session()
    signed_in = {"Cookie": f"{APP_COOKIE}={data['secret']}", "Host": "web.proxy.test:3080"}
    async with client() as c, c.ws_connect(f"http://{addr}/ws", headers=signed_in) as ws:
        await ws.send_str("hi")
        assert await ws.receive_str() == "echo:hi"
        await asyncio.sleep(1.5)  # the cached lookup is a while old when the sign-out comes
        del env.auth.sessions[data["secret"]]  # the web session was deleted
        out = time.monotonic()
        msg = await asyncio.wait_for(ws.receive(), 6)
        assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING, WSMsgType.ERROR)
        assert time.monotonic() - out <= 5
        # The next page load goes back to the launch page.
        async with c.get(f"http://{addr}/", headers=signed_in, allow_redirects=False) as resp:
            assert resp.status == 302 and "/web/launch/" in resp.headers["Location"]
    (end,) = await wait_for("the end", lambda: env.events("app.session.end"))
    assert not end["success"] and "signed out" in end["error"]


async def test_a_browser_session_of_a_user_without_access_is_refused(env: Env) -> None:
    addr = await env.listen("prod")
    data = env.browser_session()
    data["app"] = "prod"
    data["cert"] = env.cert("prod", session_id=data["session_id"])
    signed_in = {"Cookie": f"{APP_COOKIE}={data['secret']}", "Host": "prod.proxy.test:3080"}
    async with client() as c, c.get(f"http://{addr}/whoami", headers=signed_in) as resp:
        assert resp.status == 403
    (start,) = env.events("app.session.start")
    assert not start["success"] and start["sid"] == data["session_id"]
    assert env.upstream.seen == []


# ---------------------------------------------------------------- pieces


def test_cookie_split_keeps_the_apps_cookies_in_order() -> None:
    kept, ours = split_cookies([f"a=1; {APP_COOKIE}=s; b=2", f"{STATE_COOKIE}=t; c=3"])
    assert kept == "a=1; b=2; c=3"
    assert ours == {APP_COOKIE: "s", STATE_COOKIE: "t"}


def test_location_rewrite() -> None:
    hosts = frozenset({"10.0.0.5", "localhost"})
    assert rewrite_location("http://10.0.0.5:3000/x?y#z", hosts, "g.example:443") == "https://g.example/x?y#z"
    assert rewrite_location("//localhost/a", hosts, "g.example:3080") == "https://g.example:3080/a"
    assert rewrite_location("ws://localhost/s", hosts, "g.example:3080") == "wss://g.example:3080/s"
    assert rewrite_location("http://10.0.0.50/x", hosts, "g.example:3080") == "http://10.0.0.50/x"
    assert rewrite_location("/x", hosts, "g.example:3080") == "/x"


def test_connection_header_is_one_json_line_with_required_fields() -> None:
    line = encode_header(cert="PEM\nX", app="web", kind="http", client_addr="1.2.3.4:5")
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_header(line, required=("cert", "app"))["cert"] == "PEM\nX"
    with pytest.raises(ProtocolError, match="needs cert and app"):
        decode_header(b'{"cert": ""}\n', required=("cert", "app"))
    with pytest.raises(ProtocolError, match="malformed"):
        decode_header(b"GET / HTTP/1.1\r\n", required=())
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_header(b" " * (64 * 1024 + 1), required=())
    # The database service's header is the same framing.
    db = decode_db_header(encode_db_header("PEM", "pg", "1.2.3.4:5"))
    assert db == {"cert": "PEM", "db": "pg", "client_addr": "1.2.3.4:5"}
    with pytest.raises(ProtocolError, match="needs cert and db"):
        decode_db_header(b'{"cert": "x"}')


async def test_tunnel_channel_reads_the_header_line_first(env: Env) -> None:
    assert env.service is not None
    a, b = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=a)
    header = encode_header(cert=env.cert("cache"), app="cache", kind="tcp", client_addr=CLIENT)
    task = asyncio.ensure_future(env.service.serve_tunnel_channel(reader, writer))
    peer_r, peer_w = await asyncio.open_connection(sock=b)
    peer_w.write(header + b"hello")
    assert await asyncio.wait_for(peer_r.readexactly(5), 5) == b"hello"
    peer_w.close()
    await asyncio.wait_for(task, 5)
    # A channel whose first line is not a header is dropped.
    a, b = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=a)
    task = asyncio.ensure_future(env.service.serve_tunnel_channel(reader, writer))
    peer_r, peer_w = await asyncio.open_connection(sock=b)
    peer_w.write(b"GET / HTTP/1.1\r\n\r\n")
    assert await closed_by_peer(peer_r)
    await asyncio.wait_for(task, 5)
    peer_w.close()


# ---------------------------------------------------------------- the transport adapter


class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: Any = None
        self.data = b""
        self.eof = False
        self.lost: list[BaseException | None] = []
        self.paused = 0
        self.resumed = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.append(exc)

    def pause_writing(self) -> None:
        self.paused += 1

    def resume_writing(self) -> None:
        self.resumed += 1


async def stream_pair() -> tuple[Any, Any, asyncio.StreamReader, asyncio.StreamWriter]:
    a, b = socket.socketpair()
    ra, wa = await asyncio.open_connection(sock=a)
    rb, wb = await asyncio.open_connection(sock=b)
    return ra, wa, rb, wb


async def test_transport_feeds_the_protocol_and_honours_pause_reading() -> None:
    r, w, peer_r, peer_w = await stream_pair()
    proto = Recorder()
    t = StreamTransport(r, w, peername=("198.51.100.1", 4242))
    t.start(proto)
    assert t.get_extra_info("peername") == ("198.51.100.1", 4242)
    assert t.get_extra_info("socket") is None and t.get_extra_info("nope", 7) == 7
    peer_w.write(b"one")
    await wait_for("data", lambda: proto.data == b"one")
    t.pause_reading()
    assert not t.is_reading()
    peer_w.write(b"two")
    await asyncio.sleep(0.2)
    assert proto.data == b"one"  # held while paused
    t.resume_reading()
    await wait_for("held data", lambda: proto.data == b"onetwo")
    peer_w.write_eof()
    await wait_for("eof", lambda: proto.eof)
    assert not proto.lost  # eof_received asked to stay open: we can still write
    t.write(b"reply")
    t.close()
    assert t.is_closing()
    assert await asyncio.wait_for(peer_r.read(), 5) == b"reply"
    await asyncio.wait_for(t.wait_closed(), 5)
    assert proto.lost == [None]
    peer_w.close()


async def test_transport_pauses_writing_above_the_high_water_mark() -> None:
    r, w, peer_r, peer_w = await stream_pair()
    proto = Recorder()
    t = StreamTransport(r, w, high_water=64 * 1024)
    t.start(proto)
    payload = b"z" * (4 * 1024 * 1024)
    for i in range(0, len(payload), 32 * 1024):
        t.write(payload[i : i + 32 * 1024])
    assert proto.paused == 1  # paused once, until the writer drains
    got = await asyncio.wait_for(peer_r.readexactly(len(payload)), 10)
    assert got == payload
    await wait_for("resume", lambda: proto.resumed == 1)
    t.abort()
    await asyncio.wait_for(t.wait_closed(), 5)
    assert proto.lost == [None]
    peer_w.close()


async def test_transport_reports_a_reset_and_closes_on_eof_by_default() -> None:
    r, w, _peer_r, peer_w = await stream_pair()

    class Plain(Recorder):
        def eof_received(self) -> bool:
            self.eof = True
            return False

    proto = Plain()
    t = StreamTransport(r, w)
    t.start(proto)
    peer_w.close()
    await asyncio.wait_for(t.wait_closed(), 5)
    assert proto.eof and proto.lost == [None]


async def test_http_and_websockets_work_over_a_reverse_tunnel_channel(env: Env) -> None:
    """The adapter over asyncssh's SSHReader/SSHWriter, as behind a real reverse tunnel."""
    from tests.test_tunnel import Cluster, agent, proxy
    from wardgate.proxy.tunnel import pipe

    assert env.service is not None
    service = env.service
    cluster = Cluster()

    async def on_channel(name: str, client_addr: str, reader: Any, writer: Any) -> None:
        await service.serve_tunnel_channel(reader, writer)

    async with proxy(cluster) as p, agent(cluster, p.addr, on_channel, cert=cluster.agent_cert(role="app")):
        await wait_for("the tunnel", lambda: p.tunnels.connected() == ["host-1"])
        header = encode_header(
            cert=env.cert(),
            app="web",
            kind="http",
            client_addr=CLIENT,
            proxy_addr=PROXY,
            sni="web.proxy.test",
        )

        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            up_reader, up_writer = await p.tunnels.dial("host-1", "app", client_addr=CLIENT)
            up_writer.write(header)
            await pipe(reader, writer, up_reader, up_writer)

        server = await asyncio.start_server(relay, "127.0.0.1", 0)
        env.servers.append(server)
        addr = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        sent = hashlib.sha256()

        async def body() -> AsyncIterator[bytes]:
            for i in range(40):
                chunk = bytes([i]) * (128 * 1024)
                sent.update(chunk)
                yield chunk

        async with client() as c:
            async with c.post(f"http://{addr}/upload", data=body()) as resp:
                assert (await resp.json())["sha256"] == sent.hexdigest()
            async with c.get(f"http://{addr}/download") as resp:
                assert await resp.read() == BIG
            async with c.get(f"http://{addr}/whoami") as resp:
                h = headers_of(await resp.json())
                assert h["x-forwarded-for"] == ["203.0.113.7"] and "wardgate-jwt-assertion" in h
            async with c.ws_connect(f"http://{addr}/ws") as ws:
                await ws.send_str("through the tunnel")
                assert await ws.receive_str() == "echo:through the tunnel"


# ---------------------------------------------------------------- config


APPS_YAML = """\
app_service:
  enabled: true
  apps:
    - name: grafana
      uri: http://127.0.0.1:3000
      labels: {env: prod, tier: 1}
      rewrite:
        redirect: [localhost]
        headers:
          - {name: X-Grafana-User, value: "{{internal.logins}}"}
    - {name: cache, uri: "tcp://10.0.0.5:6379", public_addr: "Redis.Example.com:443"}
  resources: [{labels: {team: web}}]
"""


def test_app_service_config_reads_apps_and_selectors() -> None:
    from wardgate.config import load_config_text

    cfg = load_config_text(APPS_YAML)
    grafana, cache = cfg.app_service.apps
    assert grafana.labels == {"env": "prod", "tier": "1"}
    assert grafana.rewrite.headers[0].value == "{{internal.logins}}"
    assert cache.public_addr == "redis.example.com:443"
    assert cfg.app_service.resources[0].labels == {"team": "web"}
    assert "app_service" in cfg.enabled_services()


@pytest.mark.parametrize(
    ("entry", "where", "why"),
    [
        (
            '{name: a, uri: "ftp://x"}',
            "app_service.apps[1].uri",
            "must start with http://, https:// or tcp://",
        ),
        ('{name: a, uri: "tcp://x"}', "app_service.apps[1].uri", "a tcp app needs a port"),
        ('{name: grafana, uri: "http://x"}', "app_service.apps[1].name", "listed twice"),
        ('{name: a_b, uri: "http://x"}', "app_service.apps[1].name", "must be a DNS label"),
        (
            '{name: a, uri: "http://x", public_addr: "10.0.0.1"}',
            "app_service.apps[1].public_addr",
            "not an IP",
        ),
        (
            '{name: a, uri: "http://x", rewrite: {headers: [{name: Wardgate-Jwt-Assertion, value: x}]}}',
            "app_service.apps[1].rewrite.headers[0].name",
            "set by Wardgate itself",
        ),
        ('{name: a, uri: "http://x", insecure_skip_verify: true}', "insecure_skip_verify", "only for https"),
        ('{name: a, uri: "http://x", typo: 1}', "app_service.apps[1].typo", "unknown field"),
    ],
)
def test_app_config_errors_name_the_entry(entry: str, where: str, why: str) -> None:
    from wardgate.api.codec import ParseError
    from wardgate.config import load_config_text

    text = (
        f'app_service:\n  enabled: true\n  apps:\n    - {{name: grafana, uri: "http://x"}}\n    - {entry}\n'
    )
    with pytest.raises(ParseError) as e:
        load_config_text(text)
    assert where in str(e.value) and why in str(e.value), str(e.value)
    assert "wardgate.yaml:5" in str(e.value)


def test_proxy_certificate_covers_app_names_under_its_public_host() -> None:
    from wardgate.service.process import _app_wildcards

    assert _app_wildcards("proxy.example.com") == ["*.proxy.example.com"]
    assert _app_wildcards("127.0.0.1") == ["localhost", "*.localhost"]
    assert _app_wildcards("[::1]") == ["localhost", "*.localhost"]
    assert _app_wildcards("10.1.2.3") == []
    assert _app_wildcards("*.example.com") == []


async def test_an_app_that_loses_its_label_or_goes_away_ends_open_sessions(env: Env) -> None:
    addr = await env.listen(cert=env.cert())
    async with client() as c, c.ws_connect(f"http://{addr}/ws") as ws:
        env.add_app("web", env.apps["web"].spec, labels={"env": "prod"})
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING, WSMsgType.ERROR)
    (end,) = await wait_for("the end", lambda: env.events("app.session.end"))
    assert 'no role allows app "web"' in end["error"]
    env.add_app("web", env.apps["web"].spec, labels={"env": "dev"})
    addr = await env.listen(cert=env.cert())
    async with client() as c, c.ws_connect(f"http://{addr}/ws") as ws:
        del env.apps["web"]
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING, WSMsgType.ERROR)
    await wait_for("the second end", lambda: len(env.events("app.session.end")) == 2)
    assert "not served here anymore" in env.events("app.session.end")[1]["error"]
