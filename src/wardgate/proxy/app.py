"""Application access on the one port: HTTP apps by their host name, TCP apps on ALPN `ward-tcp`.

The proxy does not speak to apps itself. It recognises the connection (the SNI is an app's public
host, or a `ward-tcp` client certificate names a TCP app), finds a live app service serving that
app (one in this process first, else through its reverse tunnel, channel service `app`), sends it
one header line saying who connected and for what, and relays the bytes. The app service
authenticates every request, authorises, forwards and audits (docs/apps.md).

What the proxy answers itself is only what no app service can: a host that names no app (404), an
app whose service is not connected (502). Browsers get a small HTML page for these, with the UI's
security headers; a `ward-tcp` stream is closed and the refusal audited.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from wardgate.api.cache import ResourceCache
from wardgate.api.events import ResourceEvent, ResourceEventType
from wardgate.api.resources import App, AppService, AppSpec, app_public_addr, split_host_port
from wardgate.auth.certs import verify_tls_identity
from wardgate.errors import AuthenticationError, NotFoundError, WardgateError
from wardgate.protocols.connheader import encode_header
from wardgate.protocols.tunnel import format_client_addr
from wardgate.proxy.router import TLSConnection
from wardgate.proxy.tunnel import pipe, stream_pair
from wardgate.proxy.web import SECURITY_HEADERS

log = logging.getLogger(__name__)

TCP_ALPN = "ward-tcp"
"""ALPN of TCP app streams (`ward proxy app`); `ward-tcp-ping` is the framed variant."""
APP_CHANNEL = "app"
"""The channel service an app service answers on behind a reverse tunnel."""


class LocalAppService(Protocol):
    """An app service running in this process: takes a client stream and its header as they are."""

    async def serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, header: dict[str, str]
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class ErrorPage:
    status: int
    title: str
    message: str
    hint: str = ""


def host_of(addr: str) -> str:
    """The lower-case host of `host[:port]` (brackets of an IPv6 literal removed)."""
    try:
        host, _ = split_host_port(addr)
    except ValueError:
        host = addr
    return host.rstrip(".").lower()


class _ErrorPages(web.Server):
    """One aiohttp server for every connection the proxy answers itself; each connection's page
    is chosen when it is attached (the route decision), and `Connection: close` makes the
    browser's next try go through routing again (the app may be up by then)."""

    def __init__(self, proxy_public_addr: str) -> None:
        super().__init__(self._answer, access_log=None)
        self.proxy_public_addr = proxy_public_addr
        self.pages: dict[RequestHandler, ErrorPage] = {}

    def attach(self, conn: TLSConnection, page: ErrorPage) -> None:
        handler = self()
        self.pages[handler] = page
        conn.attach(handler)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self.pages.pop(handler, None)
        super().connection_lost(handler, exc)

    async def _answer(self, request: web.BaseRequest) -> web.StreamResponse:
        page = self.pages.get(request.protocol) or ErrorPage(502, "Unavailable", "The app is not available.")
        resp = web.Response(
            status=page.status,
            text=render_error_page(page, self.proxy_public_addr),
            content_type="text/html",
            charset="utf-8",
        )
        resp.headers.update(SECURITY_HEADERS)
        resp.headers["Cache-Control"] = "no-store"
        resp.force_close()
        return resp


_PAGE_STYLE = """
body{margin:0;min-height:100vh;display:flex;align-items:center;justify-content:center;
background:#f4f5f7;color:#1b2230;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,
"Noto Sans","Liberation Sans",Arial,sans-serif}
main{background:#fff;border:1px solid #e2e5ea;border-radius:8px;max-width:34rem;margin:1rem;
padding:2rem 2.25rem;box-shadow:0 1px 2px rgba(16,24,40,.06),0 1px 3px rgba(16,24,40,.08)}
.brand{display:flex;align-items:center;gap:.5rem;font-weight:600;color:#3d4757;margin-bottom:1.25rem}
.status{font:600 13px/1 ui-monospace,"DejaVu Sans Mono",monospace;color:#c2272d;letter-spacing:.04em}
h1{font-size:1.35rem;margin:.35rem 0 .75rem}p{margin:.5rem 0;color:#3d4757}
code{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,monospace;background:#f4f5f7;border-radius:4px;
padding:.05rem .3rem}a{color:#3b5bdb;text-decoration:none}a:hover{text-decoration:underline}
.back{margin-top:1.5rem;padding-top:1rem;border-top:1px solid #e2e5ea}
"""
_LOGO = (
    '<svg width="22" height="22" viewBox="0 0 32 32" aria-hidden="true">'
    '<path d="M16 2 4 6.5v8.3c0 7.3 5 12.9 12 15.2 7-2.3 12-7.9 12-15.2V6.5z" fill="#3b5bdb"/>'
    '<path d="M10.5 15.5 14.5 19.5 22 11.5" fill="none" stroke="#fff" stroke-width="2.6" '
    'stroke-linecap="round" stroke-linejoin="round"/></svg>'
)


def render_error_page(page: ErrorPage, proxy_public_addr: str) -> str:
    """A self-contained page (no scripts, no assets from a host it is not served on); every
    value is escaped."""
    e = html.escape
    apps = f"https://{proxy_public_addr}/web/apps"
    hint = f"<p>{e(page.hint)}</p>" if page.hint else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{page.status} {e(page.title)} · Wardgate</title><style>{_PAGE_STYLE}</style></head>"
        f'<body><main data-testid="app-error" data-status="{page.status}">'
        f'<div class="brand">{_LOGO}<span>Wardgate</span></div>'
        f'<div class="status">{page.status} · {e(page.title.upper())}</div>'
        f"<h1>{e(page.message)}</h1>{hint}"
        f'<p class="back"><a href="{e(apps, quote=True)}">Your applications</a></p>'
        "</main></body></html>"
    )


class AppProxy:
    """The app route's handler and the list of app host names the router asks about."""

    def __init__(
        self,
        cache: ResourceCache,
        emitter: Any,
        *,
        tunnels: Any | None,
        public_addr: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cache = cache
        self.emitter = emitter
        self.tunnels = tunnels
        self.public_addr = public_addr
        self.clock = clock
        self.local: dict[str, LocalAppService] = {}
        """App services running in this process, by host id (no tunnel needed)."""
        self._proxy_host = host_of(public_addr)
        # `<anything>.<domain>` is where apps live by default: names there that no app claims get a
        # 404 page rather than the web UI (a mistyped app link says so instead of showing the UI).
        probe = App.new("x", AppSpec(uri="http://127.0.0.1"))
        self._domain = host_of(app_public_addr(probe, public_addr)).removeprefix("x.")
        self._hosts: dict[str, str] | None = None
        self._unsubscribe = cache.subscribe(self._on_change)
        self._errors = _ErrorPages(public_addr)

    # -- which names are ours -------------------------------------------------------------------

    def _on_change(self, ev: ResourceEvent) -> None:
        if ev.kind == "app" or ev.type is ResourceEventType.INIT:
            self._hosts = None

    def hosts(self) -> dict[str, str]:
        """Public host → app name, rebuilt only after the app set changed."""
        if self._hosts is None:
            hosts: dict[str, str] = {}
            for app in sorted(self._apps(), key=lambda a: a.name):
                host = host_of(app_public_addr(app, self.public_addr))
                if host == self._proxy_host:
                    log.warning("app %s: public address %s is the proxy's own: ignored", app.name, host)
                elif host in hosts:
                    log.warning("app %s: public host %s is taken by app %s", app.name, host, hosts[host])
                else:
                    hosts[host] = app.name
            self._hosts = hosts
        return self._hosts

    def _apps(self) -> list[App]:
        return [a for a in self.cache.list("app") if isinstance(a, App)]

    def is_app_host(self, sni: str) -> bool:
        """For the router: a published app's host, or an unclaimed name under the apps' domain."""
        name = sni.rstrip(".").lower()
        if not name or name == self._proxy_host:
            return False
        return name in self.hosts() or (bool(self._domain) and name.endswith("." + self._domain))

    def app_for_host(self, sni: str) -> App | None:
        name = self.hosts().get(sni.rstrip(".").lower())
        found = self.cache.get("app", name) if name else None
        return found if isinstance(found, App) else None

    def public_addr_of(self, app: App) -> str:
        return app_public_addr(app, self.public_addr)

    def services_for(self, app: App) -> list[str]:
        """Host ids of live app services serving `app` (listing it, or the one that registered
        it from its config), in-process ones first."""
        now = datetime.fromtimestamp(self.clock(), UTC)
        live = [
            s.name
            for s in self.cache.list("app_service")
            if isinstance(s, AppService)
            and not s.is_expired(now)
            and (app.name in s.spec.apps or (app.spec.host_id and app.spec.host_id == s.name))
        ]
        random.shuffle(live)
        return sorted(live, key=lambda h: h not in self.local)

    # -- the route handler ----------------------------------------------------------------------

    async def handle(self, conn: TLSConnection) -> None:
        """For SNI-matched (HTTP) connections and for `ward-tcp`: find the app, relay to a service."""
        client_addr = format_client_addr(str(conn.remote[0]), int(conn.remote[1])) if conn.remote else ""
        if conn.alpn == TCP_ALPN:
            await self._handle_tcp(conn, client_addr)
        else:
            await self._handle_http(conn, client_addr)

    async def _handle_http(self, conn: TLSConnection, client_addr: str) -> None:
        sni = (conn.sni or "").rstrip(".").lower()
        cert_pem = _pem(conn.peer_cert)
        app = self.app_for_host(sni)
        if app is None:
            label = sni.removesuffix("." + self._domain) if self._domain else sni
            self._refused(conn, client_addr, None, f"no app is published at {sni}")
            self._errors.attach(
                conn,
                ErrorPage(
                    404,
                    "Not Found",
                    f"No app named “{label}” is published here.",
                    "Check the address, or open the app from your list of applications.",
                ),
            )
            return
        if app.uri_kind == "tcp":
            self._refused(conn, client_addr, app, "a TCP app was asked for over HTTPS")
            self._errors.attach(
                conn,
                ErrorPage(
                    400,
                    "Not a Web App",
                    f"“{app.name}” is a TCP application, not a web one.",
                    f"Connect to it through a local port: ward proxy app {app.name} --port 8080",
                ),
            )
            return
        if not await self._relay(conn, app, "http", cert_pem, client_addr, sni):
            self._errors.attach(
                conn,
                ErrorPage(
                    502,
                    "Bad Gateway",
                    f"The app service for “{app.name}” is not connected.",
                    "The app is published, but no app service serving it is reachable right now. "
                    "Try again in a moment; if it persists, tell your administrator.",
                ),
            )

    async def _handle_tcp(self, conn: TLSConnection, client_addr: str) -> None:
        app: App | None = None
        user = ""
        try:
            if not conn.peer_cert:
                raise AuthenticationError("no client certificate: run `ward app login NAME` first")
            cert = x509.load_der_x509_certificate(conn.peer_cert)
            ident = verify_tls_identity(
                cert,
                self.cache.ca_certs("user", required=True),
                now=datetime.fromtimestamp(self.clock(), UTC),
            )
            user = ident.user
            route = ident.route_to_app
            if ident.system_role or route is None or not route.name:
                raise AuthenticationError("this certificate is not for an app: run `ward app login NAME`")
            found = self.cache.get("app", route.name)
            if not isinstance(found, App):
                raise NotFoundError(f'app "{route.name}" is not published (anymore)')
            app = found
            if app.uri_kind != "tcp":
                raise NotFoundError(
                    f'app "{app.name}" is a web app: open https://{self.public_addr_of(app)}/ instead'
                )
        except (WardgateError, ValueError) as exc:
            self._refused(conn, client_addr, app, str(exc), user=user)
            conn.close()
            return
        sni = (conn.sni or "").rstrip(".").lower()
        if not await self._relay(conn, app, "tcp", _pem(conn.peer_cert), client_addr, sni, user=user):
            conn.close()

    async def _relay(
        self,
        conn: TLSConnection,
        app: App,
        kind: str,
        cert_pem: str,
        client_addr: str,
        sni: str,
        *,
        user: str = "",
    ) -> bool:
        """Hand the stream to the first app service that takes it; False (stream untouched)
        when none is live or reachable, so the caller can still answer."""
        header = {
            "cert": cert_pem,
            "app": app.name,
            "kind": kind,
            "client_addr": client_addr,
            "proxy_addr": self.public_addr,
            "sni": sni,
        }
        hosts = self.services_for(app)
        if not hosts:
            self._refused(
                conn, client_addr, app, f'no app service is serving "{app.name}" right now', user=user
            )
            return False
        for host_id in hosts:
            local = self.local.get(host_id)
            if local is not None:
                try:
                    d = conn.detach()
                except ConnectionError:
                    return True  # the client left: nothing to answer
                reader, writer = stream_pair(d.transport, pending=d.pending, eof=d.eof)
                try:
                    await local.serve(reader, writer, header)
                except Exception:
                    log.exception(
                        "in-process app service %s failed on a connection for %s", host_id, app.name
                    )
                    writer.transport.abort()
                return True
            if self.tunnels is None:
                continue
            try:
                up_reader, up_writer = await self.tunnels.dial(host_id, APP_CHANNEL, client_addr=client_addr)
            except WardgateError as exc:
                log.info("app service %s unreachable for %s: %s", host_id, app.name, exc)
                continue
            try:
                d = conn.detach()
            except ConnectionError:
                up_writer.close()
                return True
            reader, writer = stream_pair(d.transport, pending=d.pending, eof=d.eof)
            up_writer.write(encode_header(**header))
            await pipe(reader, writer, up_reader, up_writer)
            return True
        self._refused(conn, client_addr, app, f'the app service for "{app.name}" is not connected', user=user)
        return False

    def _refused(
        self,
        conn: TLSConnection,
        client_addr: str,
        app: App | None,
        reason: str,
        *,
        user: str = "",
    ) -> None:
        """Audit a connection no app service got (with the user when a certificate says who).
        Anonymous browsers asking for a name no app has are only logged: a scanner trying names
        must not be able to fill the audit log."""
        log.info("app connection from %s (SNI %s) refused: %s", client_addr, conn.sni, reason)
        tcp = conn.alpn == TCP_ALPN
        user = user or self._cert_user(conn.peer_cert)
        if app is None and not user and not tcp:
            return
        self.emitter.emit_nowait(
            "app.session.start",
            success=False,
            error=reason,
            user=user,
            remote_addr=client_addr,
            app=app.name if app else None,
            app_uri=app.spec.uri if app else None,
            app_public_addr=self.public_addr_of(app) if app else None,
            protocol="tcp" if tcp else "http",
        )

    def _cert_user(self, der: bytes | None) -> str:
        if not der:
            return ""
        try:
            ident = verify_tls_identity(
                der, self.cache.ca_certs("user"), now=datetime.fromtimestamp(self.clock(), UTC)
            )
        except (WardgateError, ValueError):
            return ""
        return "" if ident.system_role else ident.user

    async def close(self) -> None:
        """Stop following the cache and close the connections showing an error page."""
        self._unsubscribe()
        with contextlib.suppress(Exception):
            await self._errors.shutdown(1.0)


def _pem(der: bytes | None) -> str:
    if not der:
        return ""
    try:
        return x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM).decode()
    except ValueError:
        return ""
