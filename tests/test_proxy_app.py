"""The proxy's app route with real TLS clients through a real TLSRouter on 127.0.0.1.

The app service is an in-process stand-in (it records the header and echoes) or, for the tunnel
path, a real reverse-tunnel agent; what is checked is what the proxy itself decides: which
connections are apps, which app, which header goes to the service, and the pages and refusals
it answers with when it cannot hand a connection on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import uvloop
from cryptography.hazmat.primitives.serialization import Encoding

from wardgate.agent.tunnel import TunnelAgent
from wardgate.api.cache import ResourceCache
from wardgate.api.events import ResourceEvent, ResourceEventType
from wardgate.api.identityfile import load_key_pair, server_trusting_context
from wardgate.api.resources import App, AppService, AppServiceSpec, AppSpec, Resource
from wardgate.audit.events import make_event
from wardgate.auth.ca import CertSigner, new_cert_authority
from wardgate.auth.identity import Identity, RouteToApp
from wardgate.keys import generate_tls_key, private_key_pem
from wardgate.protocols.connheader import decode_header
from wardgate.proxy.app import TCP_ALPN, AppProxy
from wardgate.proxy.router import TLSRouter, server_context
from wardgate.proxy.tunnel import TunnelServer

CLUSTER = "apps.example"
HOUR = timedelta(hours=1)
PUBLIC = "localhost:3080"
HEADER_FIELDS = {"cert", "app", "kind", "client_addr", "proxy_addr", "sni"}


def run(coro: Coroutine[Any, Any, None]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(20):
            await coro

    uvloop.run(bounded())


def pem(cert: Any) -> str:
    return cert.public_bytes(Encoding.PEM).decode()


class Emitter:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit_nowait(
        self, event: str, *, user: str = "", success: bool = True, sid: str = "", **f: Any
    ) -> dict:
        ev = make_event(event, user=user, success=success, sid=sid, **f)
        self.events.append(ev)
        return ev


@dataclass
class EchoApps:
    """An in-process app service: says which header it got, then echoes until EOF."""

    headers: list[dict[str, str]] = field(default_factory=list)

    async def serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, header: dict[str, str]
    ) -> None:
        self.headers.append(header)
        writer.write(b"app " + header["app"].encode() + b"\n")
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()


class World:
    """CAs, the cache a proxy would hold, the router with the app route, and certificates."""

    def __init__(self) -> None:
        self.host = CertSigner(host_ca := new_cert_authority("host", CLUSTER))
        self.user = CertSigner(user_ca := new_cert_authority("user", CLUSTER))
        self.cache = ResourceCache(["cert_authority", "app", "app_service"])
        for ca in (host_ca, user_ca):
            self.put(ca.without_secrets())
        self.put(App.new("grafana", AppSpec(uri="http://127.0.0.1:3000")))
        self.put(App.new("redis", AppSpec(uri="tcp://127.0.0.1:6379")))
        self.put(App.new("orphan", AppSpec(uri="http://127.0.0.1:4000")))
        self.put(App.new("wiki", AppSpec(uri="http://127.0.0.1:5000", public_addr="docs.example.org")))
        self.service("local-1", ["grafana", "redis", "wiki"])
        self.cache.apply(ResourceEvent(ResourceEventType.INIT))
        self.emitter = Emitter()
        self.tunnels = TunnelServer(lambda: [self.host.tls_ca_cert])
        self.apps = AppProxy(self.cache, self.emitter, tunnels=self.tunnels, public_addr=PUBLIC)
        self.local = EchoApps()
        self.apps.local["local-1"] = self.local
        cert, key = self.cert(
            self.host,
            Identity(user="proxy-1", system_role="proxy", host_id="proxy-1"),
            dns_names=["localhost", "*.localhost"],
        )
        ctx = server_context(
            cert, key, client_ca_pems=[pem(self.host.tls_ca_cert), pem(self.user.tls_ca_cert)]
        )
        self.router = TLSRouter(ctx)
        self.router.add_route("ward-tunnel", self.tunnels.handle)
        self.router.add_route(TCP_ALPN, self.apps.handle)
        self.router.add_sni_matcher("app", self.apps.is_app_host, self.apps.handle)
        self.router.set_default(self.web)
        self.port = 0

    @staticmethod
    def web(conn: Any) -> None:
        """Stands for the web UI: says so and closes."""
        conn.transport.write(b"web ui\n")
        conn.close()

    def put(self, res: Resource) -> None:
        self.cache.apply(ResourceEvent(ResourceEventType.PUT, res.kind, res.name, 0, res))

    def delete(self, kind: str, name: str) -> None:
        self.cache.apply(ResourceEvent(ResourceEventType.DELETE, kind, name, 0, None))

    def service(self, host_id: str, apps: list[str], *, expires: timedelta = HOUR) -> None:
        self.put(
            AppService.new(
                host_id, AppServiceSpec(apps=apps, tunnel=True), expires=datetime.now(UTC) + expires
            )
        )

    @staticmethod
    def cert(signer: CertSigner, identity: Identity, **kw: Any) -> tuple[str, str]:
        key = generate_tls_key()
        return signer.sign_tls_cert(key.public_key(), identity, ttl=HOUR, **kw), private_key_pem(key)

    def user_cert(self, app: str = "") -> tuple[str, str]:
        route = RouteToApp(name=app, public_addr=f"{app}.localhost:3080", session_id="s-1") if app else None
        return self.cert(self.user, Identity(user="alice", roles=("dev",), route_to_app=route))

    def client_context(self, alpn: list[str], cert: tuple[str, str] | None = None) -> ssl.SSLContext:
        ctx = server_trusting_context([pem(self.host.tls_ca_cert)])
        ctx.check_hostname = False  # app names vary; the chain is still checked against the host CA
        ctx.set_alpn_protocols(alpn)
        if cert is not None:
            load_key_pair(ctx, *cert)
        return ctx

    async def connect(
        self, sni: str, alpn: list[str] | None = None, cert: tuple[str, str] | None = None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(
            "127.0.0.1",
            self.port,
            ssl=self.client_context(alpn or ["http/1.1"], cert),
            server_hostname=sni,
        )

    async def get(self, host: str) -> tuple[int, dict[str, str], str]:
        """A browser's GET / for `host` (SNI and Host), through the router."""
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                f"https://127.0.0.1:{self.port}/",
                ssl=self.client_context(["http/1.1"]),
                server_hostname=host,
                headers={"Host": host},
            ) as resp,
        ):
            return resp.status, dict(resp.headers), await resp.text()


@contextlib.asynccontextmanager
async def world() -> AsyncIterator[World]:
    w = World()
    _, w.port = await w.router.start("127.0.0.1", 0)
    try:
        yield w
    finally:
        await w.router.close()
        await w.apps.close()
        await w.tunnels.close()


async def round_trip(w: World, sni: str, *, alpn: list[str] | None = None, cert: Any = None) -> bytes:
    reader, writer = await w.connect(sni, alpn, cert)
    writer.write(b"hello app")
    greeting = await reader.readline()
    assert await reader.readexactly(9) == b"hello app"
    writer.close()
    return greeting


# -- which names are apps -----------------------------------------------------------------------


def test_app_hosts_follow_the_app_set() -> None:
    async def main() -> None:
        w = World()
        apps = w.apps
        assert apps.is_app_host("grafana.localhost") and apps.is_app_host("docs.example.org")
        assert apps.is_app_host("nope.localhost")  # under the apps' domain: a 404 page, not the UI
        assert not apps.is_app_host("localhost")  # the proxy itself
        assert not apps.is_app_host("example.org") and not apps.is_app_host("")
        hosts = apps.hosts()
        assert apps.hosts() is hosts  # not rebuilt per connection
        w.put(App.new("blog", AppSpec(uri="http://127.0.0.1:6000", public_addr="blog.example.net:443")))
        assert apps.is_app_host("blog.example.net") and apps.hosts() is not hosts
        w.delete("app", "wiki")
        assert not apps.is_app_host("docs.example.org")
        # An app may not take the proxy's own name.
        w.put(App.new("evil", AppSpec(uri="http://127.0.0.1:1", public_addr="localhost")))
        assert not apps.is_app_host("localhost")
        await apps.close()
        await w.tunnels.close()

    run(main())


# -- HTTP apps by SNI ---------------------------------------------------------------------------


def test_sni_of_an_app_goes_to_its_service_with_the_header() -> None:
    async def main() -> None:
        async with world() as w:
            assert await round_trip(w, "grafana.localhost") == b"app grafana\n"
            assert await round_trip(w, "docs.example.org") == b"app wiki\n"
            # The proxy's own name is the web UI.
            reader, writer = await w.connect("localhost")
            assert await reader.readline() == b"web ui\n"
            writer.close()
        first, second = w.local.headers
        assert set(first) == HEADER_FIELDS
        assert first["app"] == "grafana" and first["kind"] == "http" and first["sni"] == "grafana.localhost"
        assert first["cert"] == "" and first["proxy_addr"] == PUBLIC
        assert first["client_addr"].startswith("127.0.0.1:")
        assert second["app"] == "wiki" and second["sni"] == "docs.example.org"
        assert w.router.stats["route:sni:app"] == 2 and w.router.stats["route:default"] == 1

    run(main())


def test_header_carries_the_client_certificate_when_presented() -> None:
    async def main() -> None:
        async with world() as w:
            cert = w.user_cert("grafana")
            assert await round_trip(w, "grafana.localhost", cert=cert) == b"app grafana\n"
        (header,) = w.local.headers
        assert header["cert"] == cert[0]

    run(main())


def test_unknown_app_host_gets_a_404_page() -> None:
    async def main() -> None:
        async with world() as w:
            status, headers, body = await w.get("nope.localhost")
        assert status == 404
        assert "No app named “nope” is published here." in body
        assert headers["Content-Type"].startswith("text/html")
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
        assert headers["X-Frame-Options"] == "DENY" and headers["Cache-Control"] == "no-store"
        assert headers["Connection"] == "close"
        assert "<script" not in body
        assert 'href="https://localhost:3080/web/apps"' in body
        assert w.local.headers == []
        assert w.emitter.events == []  # anonymous scans of random names do not fill the audit log

    run(main())


def test_app_without_a_live_service_gets_a_502_page() -> None:
    async def main() -> None:
        async with world() as w:
            status, headers, body = await w.get("orphan.localhost")
            assert status == 502
            assert "The app service for “orphan” is not connected." in body
            assert headers["Strict-Transport-Security"].startswith("max-age=")
            # A service whose heartbeat has expired does not count either.
            w.service("local-1", ["grafana", "redis", "wiki"], expires=-timedelta(seconds=1))
            status, _, body = await w.get("grafana.localhost")
            assert status == 502 and "“grafana”" in body
            # Nor does a tunnelled one whose agent is not connected.
            w.service("far-1", ["grafana"])
            status, _, _ = await w.get("grafana.localhost")
            assert status == 502
        assert w.local.headers == []
        failures = [e for e in w.emitter.events if e["event"] == "app.session.start"]
        assert [e["app"] for e in failures] == ["orphan", "grafana", "grafana"]
        assert all(not e["success"] and e["code"] == "W4000W" for e in failures)
        assert 'no app service is serving "orphan"' in failures[0]["error"]
        assert 'the app service for "grafana" is not connected' in failures[2]["error"]

    run(main())


def test_tcp_app_by_sni_is_refused_with_a_page() -> None:
    async def main() -> None:
        async with world() as w:
            status, _, body = await w.get("redis.localhost")
        assert status == 400 and "ward proxy app redis" in body and w.local.headers == []

    run(main())


def test_page_text_is_escaped() -> None:
    from wardgate.proxy.app import ErrorPage, render_error_page

    page = render_error_page(ErrorPage(404, "Not Found", "No app named “<img src=x>”"), 'a"b:1')
    assert "<img" not in page and "&lt;img src=x&gt;" in page and 'href="https://a&quot;b:1/web/apps"' in page


# -- TCP apps on ward-tcp -----------------------------------------------------------------------


async def closed_at_once(w: World, sni: str, cert: Any = None) -> bool:
    reader, writer = await w.connect(sni, [TCP_ALPN], cert)
    try:
        data = await reader.read(100)
    except (ConnectionError, ssl.SSLError):
        data = b""
    writer.close()
    return data == b""


def test_ward_tcp_without_a_certificate_is_closed_and_audited() -> None:
    async def main() -> None:
        async with world() as w:
            assert await closed_at_once(w, "localhost")
            # A certificate for a web app, or one with no app route, does not open a TCP stream.
            assert await closed_at_once(w, "localhost", w.user_cert("grafana"))
            assert await closed_at_once(w, "localhost", w.user_cert())
        assert w.local.headers == []
        errors = [(e["user"], e["error"]) for e in w.emitter.events if e["event"] == "app.session.start"]
        assert errors[0] == ("", "no client certificate: run `ward app login NAME` first")
        assert errors[1][0] == "alice" and "is a web app" in errors[1][1]
        assert errors[2][0] == "alice" and "not for an app" in errors[2][1]
        assert all(e["protocol"] == "tcp" for e in w.emitter.events)

    run(main())


def test_ward_tcp_with_an_app_certificate_reaches_the_service() -> None:
    async def main() -> None:
        async with world() as w:
            cert = w.user_cert("redis")
            assert await round_trip(w, "localhost", alpn=[TCP_ALPN], cert=cert) == b"app redis\n"
        (header,) = w.local.headers
        assert header["app"] == "redis" and header["kind"] == "tcp" and header["cert"] == cert[0]
        assert header["sni"] == "localhost"

    run(main())


# -- through a reverse tunnel -------------------------------------------------------------------


def test_app_service_behind_a_tunnel_gets_the_header_line_then_the_bytes() -> None:
    async def main() -> None:
        seen: list[tuple[str, dict[str, str]]] = []

        async def app_channel(service: str, client_addr: str, reader: Any, writer: Any) -> None:
            header = decode_header(await reader.readline(), required=("cert", "app"))
            seen.append((service, header))
            writer.write(b"tunnelled " + header["app"].encode() + b"\n")
            while data := await reader.read(65536):
                writer.write(data)
            writer.write_eof()

        async with world() as w:
            del w.apps.local["local-1"]
            w.service("local-1", [])
            w.service("far-1", ["grafana"])
            cert, key = w.cert(w.host, Identity(user="far-1", system_role="app", host_id="far-1"))
            agent = TunnelAgent(
                f"127.0.0.1:{w.port}",
                cert_pem=cert,
                key_pem=key,
                ca_pems=[pem(w.host.tls_ca_cert)],
                on_connection=app_channel,
                backoff_base=0.05,
                backoff_max=0.2,
            )
            agent.start()
            try:
                await asyncio.wait_for(agent.connected.wait(), 10)
                while w.tunnels.connected() != ["far-1"]:
                    await asyncio.sleep(0.01)
                user = w.user_cert("grafana")
                assert await round_trip(w, "grafana.localhost", cert=user) == b"tunnelled grafana\n"
            finally:
                await agent.close()
        ((service, header),) = seen
        assert service == "app" and set(header) == HEADER_FIELDS
        assert header["cert"] == user[0] and header["kind"] == "http" and header["sni"] == "grafana.localhost"
        assert json.loads(json.dumps(header))["client_addr"].startswith("127.0.0.1:")

    run(main())
