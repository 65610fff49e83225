"""The app service: publishes internal web applications and TCP services behind the proxy.

The proxy hands it each client connection (in this process, or over the agent's reverse tunnel)
after one header line (`protocols/connheader.py`): the client's certificate (or ""), the app,
`kind` (`http`/`tcp`), the client's address, the proxy's public address and the SNI. The
service never trusts the proxy for identity: it verifies the certificate against the user CA,
or looks the browser's app-session cookie up through the auth API.

HTTP apps: aiohttp's HTTP/1.1 server runs on the stream (`transport.StreamTransport`), so
request parsing (and refusing smuggling tricks like CL+TE) is aiohttp's well-tested parser.
Each request is authenticated, joined to its *session group* (all open connections of one app
session on this service: one `app.session.start`/`app.session.end` pair), and forwarded with a
keep-alive pool per app, bodies streamed both ways, WebSockets relayed message by message.
Sessions with requests in flight are re-authorised every second (roles, locks, expiry, and
for cookies whether the session still exists), so a lock or a sign-out cuts them within seconds.

TCP apps: the certificate (routed to the app) is required, then bytes relay to the upstream.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import html
import json
import logging
import re
import secrets
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp
from aiohttp import WSMsgType, web
from aiohttp.http_exceptions import LineTooLong
from multidict import CIMultiDict
from yarl import URL

from wardgate.agent.app.transport import StreamTransport, abort_writer
from wardgate.api.cache import ResourceCache
from wardgate.api.resources import HOP_BY_HOP_HEADERS, JWT_HEADER, App, Lock, Role, app_public_addr
from wardgate.audit.events import Emitter
from wardgate.auth.access import SESSION_MFA_REQUIRED
from wardgate.auth.certs import verify_tls_identity
from wardgate.auth.identity import Identity
from wardgate.auth.locks import find_lock, lock_decision
from wardgate.auth.rbac import AccessChecker, expand_traits
from wardgate.errors import (
    AccessDeniedError,
    AuthenticationError,
    BadParameterError,
    NotFoundError,
    WardgateError,
)
from wardgate.protocols.connheader import decode_header
from wardgate.protocols.errors import ProtocolError
from wardgate.protocols.tunnel import parse_client_addr
from wardgate.proxy.tunnel import pipe

log = logging.getLogger(__name__)

APP_COOKIE = "__Host-wardgate_app"
STATE_COOKIE = "__Host-wardgate_app_state"
COOKIE_PREFIX = "__Host-wardgate_"
AUTH_PATH = "/x-wardgate/auth"
HEADER_FIELDS = ("cert", "app")
"""What a connection header must carry; `kind`, `client_addr`, `proxy_addr`, `sni` are optional."""
MAX_LINE = 8190
MAX_FIELD = 8190
MAX_HEADERS = 100
JWT_RENEW = 60.0
"""Fetch a new JWT for a certificate when the cached one has less than this many seconds left."""
_STATE_RE = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
_FORWARDED = frozenset(
    ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-forwarded-port")
)
_NOT_FORWARDED = HOP_BY_HOP_HEADERS | _FORWARDED | {"host", "cookie", "expect", JWT_HEADER.lower()}
_WS_HANDSHAKE = frozenset(
    ("sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol")
)
_EMPTY_STATUSES = frozenset((204, 304))
_WS_CLOSE_OK = 1000


@dataclass
class AppServiceOptions:
    """Timeouts and intervals; the defaults are what `wardgate start` runs with."""

    header_timeout: float = 30.0
    """A request head must be complete this long after its first byte (slow clients get 408)."""
    response_timeout: float = 60.0
    """The upstream must answer (headers) this long after the request body was sent (else 504)."""
    connect_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    """An idle client connection is closed after this long."""
    check_interval: float = 1.0
    """Sessions with requests, WebSockets or TCP streams open are re-authorised this often."""
    session_cache_ttl: float = 4.0
    """A cookie's app session is looked up again after this long (so a sign-out shows in ≤5 s)."""
    negative_cache_ttl: float = 1.0
    max_ws_message: int = 64 * 1024 * 1024


class _Member(Protocol):
    """An open connection of a session group: ends at once when the session is terminated."""

    def terminate(self, reason: str) -> None: ...


class _Session:
    """One app session's open connections on this service (its *connection group*)."""

    def __init__(
        self,
        *,
        key: str,
        sid: str,
        identity: Identity,
        cert_pem: str,
        app: App,
        public_addr: str,
        remote_addr: str,
        secret: str = "",
        expires: datetime | None = None,
    ) -> None:
        self.key = key
        self.sid = sid
        self.identity = identity
        self.cert_pem = cert_pem
        self.app = app
        self.public_addr = public_addr
        self.remote_addr = remote_addr
        self.secret = secret
        """The cookie's value for browser sessions; empty when a certificate authenticated."""
        self.expires = expires
        self.members: set[_Member] = set()
        self.active = 0
        self.checked = time.monotonic()
        self.ended = False
        """No new connections join (ended, refused, or being terminated)."""
        self.started = False
        self.finished = False
        self.end_reason = ""
        self.requests = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def via_cookie(self) -> bool:
        return bool(self.secret)

    def fields(self, remote_addr: str = "") -> dict[str, Any]:
        return {
            "user": self.identity.user,
            "sid": self.sid,
            "app": self.app.name,
            "app_uri": self.app.spec.uri,
            "app_public_addr": self.public_addr,
            "remote_addr": remote_addr or self.remote_addr,
        }


class _Upstream:
    """How this service reaches one app over HTTP: its own keep-alive pool, no cookie jar, no
    decompression, no redirects followed, and no headers the client did not send."""

    def __init__(self, app: App, options: AppServiceOptions) -> None:
        parts = urlsplit(app.spec.uri)
        scheme = parts.scheme.lower()
        self.key = (app.spec.uri, app.spec.insecure_skip_verify)
        self.base = f"{scheme}://{parts.netloc}"
        self.host_header = parts.netloc
        self.redirect_hosts = frozenset(
            {(parts.hostname or "").lower(), *(h.lower().rstrip(".") for h in app.spec.rewrite.redirect)}
        )
        tls: ssl.SSLContext | bool = True
        if scheme == "https":
            tls = False if app.spec.insecure_skip_verify else ssl.create_default_context()
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ssl=tls, keepalive_timeout=30),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=options.connect_timeout),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            max_line_size=65536,
            max_field_size=65536,
        )

    def url(self, path: str) -> URL:
        return URL(self.base + path, encoded=True)


class _Refused(Exception):
    """Answer this request with `response` instead of forwarding it."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__(response.status)
        self.response = response


class AppService:
    """Connections, sessions, checks and upstream pools of one app service."""

    def __init__(
        self,
        *,
        auth: Any,
        cache: ResourceCache,
        emitter: Emitter,
        host_id: str,
        apps: Callable[[], dict[str, App]],
        clock: Callable[[], float] = time.time,
        options: AppServiceOptions | None = None,
    ) -> None:
        self.auth = auth
        """An AuthClient (as this service): app sessions, JWTs, heartbeats."""
        self.cache = cache
        self.emitter = emitter
        self.host_id = host_id
        self.apps = apps
        self.clock = clock
        self.options = options or AppServiceOptions()
        self.sessions: set[asyncio.Task[Any]] = set()
        """Tasks serving connections (cancelled when the agent stops)."""
        self.groups: dict[str, _Session] = {}
        """Live session groups by key."""
        self._upstreams: dict[str, _Upstream] = {}
        self._lookups: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self._inflight: dict[str, asyncio.Future[dict[str, Any] | None]] = {}
        self._jwts: dict[str, tuple[str, float]] = {}
        self._jwt_locks: dict[str, asyncio.Lock] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._emit_nowait: Callable[..., Any] | None = getattr(emitter, "emit_nowait", None)

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def emit(self, event: str, **fields: Any) -> None:
        if self._emit_nowait is not None:
            self._emit_nowait(event, **fields)
        else:  # a local store: fire and forget, errors logged
            self._spawn(self.emitter.emit(event, **fields))

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.warning("app service background task failed: %r", t.exception())

        task.add_done_callback(done)
        return task

    # ---------------------------------------------------------------- identity and checks

    def identify(self, cert_pem: str, app: App) -> Identity:
        """The user in a certificate routed to `app`, verified against the user CA."""
        try:
            ident = verify_tls_identity(cert_pem, self.cache.ca_certs("user", required=True), now=self.now())
        except ValueError as exc:
            raise AuthenticationError(f"unreadable certificate: {exc}") from None
        if ident.system_role:
            raise AuthenticationError("a service certificate cannot open app sessions")
        route = ident.route_to_app
        if route is None or route.name != app.name:
            raise AuthenticationError(
                f"this certificate is not for app {app.name}: run `ward app login {app.name}`"
            )
        return ident

    def check(self, s: _Session) -> None:
        """Raise (with the reason people see) unless the session may use its app right now
        (the app as it is now: its labels may have changed, or it may be gone)."""
        app = self.apps().get(s.app.name)
        if app is None:
            raise NotFoundError(f"app {s.app.name} is not served here anymore")
        s.app = app
        ident, now = s.identity, self.now()
        if ident.expires is not None and ident.expires <= now:
            how = "open the app again" if s.via_cookie else f"run `ward app login {app.name}` again"
            raise AuthenticationError(f"your app certificate has expired: {how}")
        if s.expires is not None and s.expires <= now:
            raise AuthenticationError("your app session has expired: open the app again from Wardgate")
        if "user" in self.cache.kinds and self.cache.get("user", ident.user) is None:
            raise AccessDeniedError(f"user {ident.user} no longer exists")
        locks: list[Lock] = self.cache.list("lock")  # type: ignore[assignment]
        lock = find_lock(locks, user=ident.user, roles=ident.roles, app=app.name, now=now)
        if lock is not None:
            lock_decision(lock).raise_if_denied()
        roles: dict[str, Role] = self.cache.as_dict("role")  # type: ignore[assignment]
        checker = AccessChecker.for_identity(ident, roles)
        checker.check_app(app.metadata.labels, name=app.name).raise_if_denied()
        if not s.via_cookie and checker.options.require_session_mfa and not ident.mfa_verified:
            raise AccessDeniedError(SESSION_MFA_REQUIRED.replace("ward ssh", f"ward app login {app.name}"))

    async def _revalidate(self, s: _Session) -> None:
        """A browser session must still exist (signing out of the web UI deletes it). An auth
        service that does not answer keeps the session as it was: an outage is not a sign-out."""
        if not s.via_cookie:
            return
        try:
            async with asyncio.timeout(3):
                data = await self.lookup(s.secret, max_age=self.options.session_cache_ttl)
        except (WardgateError, TimeoutError) as exc:
            log.info("could not re-check app session %s: %s", s.sid, exc or "timed out")
            return
        if data is None or data.get("session_id") != s.sid:
            raise AuthenticationError("your app session has ended (signed out?): open the app again")

    async def lookup(self, secret: str, *, max_age: float | None = None) -> dict[str, Any] | None:
        """The app session behind a cookie (None when there is none), from the auth service,
        cached for `session_cache_ttl` (unknown secrets for `negative_cache_ttl`)."""
        key = hashlib.sha256(secret.encode()).hexdigest()
        hit = self._lookups.get(key)
        if hit is not None:
            fetched, data = hit
            ttl = self.options.session_cache_ttl if data is not None else self.options.negative_cache_ttl
            if max_age is not None:
                ttl = min(ttl, max_age)
            if time.monotonic() - fetched < ttl:
                return data
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._inflight[key] = fut
        try:
            try:
                data = await self.auth.get_app_session(secret)
            except (NotFoundError, AuthenticationError, AccessDeniedError, BadParameterError):
                data = None
            if data is not None and not isinstance(data, dict):
                data = None
            self._remember(key, data)
            fut.set_result(data)
            return data
        except BaseException as exc:
            if not fut.done():
                fut.set_exception(exc if isinstance(exc, Exception) else WardgateError("cancelled"))
            raise
        finally:
            self._inflight.pop(key, None)

    def remember(self, secret: str, data: dict[str, Any]) -> None:
        """Cache a session just made (the token exchange answered it: no lookup needed)."""
        self._remember(hashlib.sha256(secret.encode()).hexdigest(), data)

    def _remember(self, key: str, data: dict[str, Any] | None) -> None:
        if len(self._lookups) > 10_000:
            self._lookups.clear()
        self._lookups[key] = (time.monotonic(), data)

    # ---------------------------------------------------------------- session groups

    async def join(
        self, key: str, make: Callable[[], _Session], member: _Member, *, announce: bool = True
    ) -> tuple[_Session, bool]:
        """Add `member` to the live group `key`, or start the group (authorised now) with
        `make()`; returns (group, created). A refused start is audited and raised; an accepted
        one is audited too unless `announce` is False (the caller does it once it knows more)."""
        s = self.groups.get(key)
        created = False
        if s is None or s.ended:
            s = make()
            self.groups[key] = s
            created = True
            try:
                self.check(s)
            except WardgateError as exc:
                if self.groups.get(key) is s:
                    del self.groups[key]
                s.ended = True
                s.ready.set_exception(exc)
                s.ready.exception()
                self.emit("app.session.start", success=False, error=str(exc), **s.fields())
                log.info("app session %s of %s for %s refused: %s", s.sid, s.identity.user, s.app.name, exc)
                raise
            s.checked = time.monotonic()
            s.ready.set_result(None)
            if announce:
                self.started(s)
        else:
            await asyncio.shield(s.ready)
            await self.refresh(s)
        if s.ended:
            raise AccessDeniedError(s.end_reason or "the app session has ended")
        s.members.add(member)
        return s, created

    def started(self, s: _Session) -> None:
        s.started = True
        self.emit("app.session.start", **s.fields())

    async def refresh(self, s: _Session) -> None:
        """Re-authorise a group when its last check is older than `check_interval`; a denial
        terminates it and is raised."""
        if s.ended:
            raise AccessDeniedError(s.end_reason or "the app session has ended")
        if time.monotonic() - s.checked < self.options.check_interval:
            return
        s.checked = time.monotonic()
        try:
            self.check(s)
            await self._revalidate(s)
        except WardgateError as exc:
            self.terminate(s, str(exc))
            raise

    def leave(self, s: _Session, member: _Member) -> None:
        """A connection of the group closed; the last one out ends the session."""
        s.members.discard(member)
        if not s.members:
            self._finish(s)

    def _finish(self, s: _Session) -> None:
        if self.groups.get(s.key) is s:
            del self.groups[s.key]
        s.ended = True
        if not s.started or s.finished:
            return
        s.finished = True
        extra: dict[str, Any] = {"requests": s.requests} if s.requests else {}
        if s.end_reason:
            extra["error"] = s.end_reason
        self.emit(
            "app.session.end",
            success=not s.end_reason,
            bytes_in=s.bytes_in,
            bytes_out=s.bytes_out,
            **extra,
            **s.fields(),
        )

    def terminate(self, s: _Session, reason: str) -> None:
        """Cut every connection of the group now (a lock, a sign-out, expiry, lost access);
        `app.session.end` follows once they are all closed."""
        if s.end_reason:
            return
        log.info("ending app session %s of %s for %s: %s", s.sid, s.identity.user, s.app.name, reason)
        s.end_reason = reason
        s.ended = True
        if self.groups.get(s.key) is s:
            del self.groups[s.key]
        if not s.members:
            self._finish(s)
        for m in list(s.members):
            m.terminate(reason)

    def activate(self, s: _Session) -> None:
        s.active += 1
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="app-session-watch")

    def deactivate(self, s: _Session) -> None:
        s.active -= 1

    async def _watch(self) -> None:
        """While any session has something open, re-authorise those every `check_interval`."""
        try:
            while True:
                await asyncio.sleep(self.options.check_interval)
                live = [s for s in self.groups.values() if s.active > 0 and not s.end_reason]
                if not live:
                    return
                await asyncio.gather(*(self._recheck(s) for s in live), return_exceptions=True)
        finally:
            if self._watcher is asyncio.current_task():
                self._watcher = None

    async def _recheck(self, s: _Session) -> None:
        s.checked = time.monotonic()
        try:
            self.check(s)
            await self._revalidate(s)
        except WardgateError as exc:
            self.terminate(s, str(exc))

    # ---------------------------------------------------------------- upstream

    def upstream(self, app: App) -> _Upstream:
        """The app's pool; rebuilt when its uri or TLS setting changes (the old one is closed
        once the requests it carries have had time to finish)."""
        up = self._upstreams.get(app.name)
        if up is not None and up.key == (app.spec.uri, app.spec.insecure_skip_verify):
            return up
        if up is not None:
            self._spawn(_close_later(up.session, 300))
        up = _Upstream(app, self.options)
        self._upstreams[app.name] = up
        return up

    async def jwt_for(self, s: _Session) -> str:
        """The app's identity token for this session's certificate, from the auth service,
        cached until a minute before it expires."""
        key = s.cert_pem
        hit = self._jwts.get(key)
        if hit is not None and hit[1] - self.clock() > JWT_RENEW:
            return hit[0]
        lock = self._jwt_locks.setdefault(key, asyncio.Lock())
        async with lock:
            hit = self._jwts.get(key)
            if hit is not None and hit[1] - self.clock() > JWT_RENEW:
                return hit[0]
            data = await self.auth.app_jwt(s.cert_pem, s.app.name)
            token = str(data["jwt"])
            expires = _jwt_expiry(token) or _epoch(data.get("expires")) or self.clock() + 2 * JWT_RENEW
            if len(self._jwts) > 4096:
                self._jwts.clear()
                self._jwt_locks = {key: lock}
            self._jwts[key] = (token, expires)
            return token

    # ---------------------------------------------------------------- connections

    async def serve(self, reader: Any, writer: Any, header: dict[str, str]) -> None:
        """One client connection, header already read (`cert`, `app`, `kind`, `client_addr`,
        `proxy_addr`, `sni`). `reader`/`writer`: asyncio streams or asyncssh's."""
        task = asyncio.current_task()
        if task is not None:
            self.sessions.add(task)
        try:
            app = self.apps().get(header.get("app", ""))
            kind = header.get("kind", "") or "http"
            if app is None:
                log.info("app %r is not served here", header.get("app", ""))
                if kind != "tcp":
                    await _answer_raw(writer, 404, "No such app", "This app is not served here (anymore).")
                return
            if app.uri_kind == "tcp":
                if kind != "tcp":
                    await _answer_raw(
                        writer,
                        400,
                        "Not a web app",
                        f"{app.name} is a TCP app: reach it with `ward proxy app {app.name}`.",
                    )
                    return
                await self._serve_tcp(app, header, reader, writer)
            elif kind == "tcp":
                log.info("refused a TCP stream to web app %s", app.name)
            else:
                await self._serve_http(app, header, reader, writer)
        finally:
            if task is not None:
                self.sessions.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def serve_tunnel_channel(self, reader: Any, writer: Any) -> None:
        """A channel from the proxy over the reverse tunnel: header line, then the client's bytes."""
        try:
            line = await asyncio.wait_for(reader.readuntil(b"\n"), 15)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            writer.close()
            return
        except Exception as exc:  # asyncssh errors: the channel went away
            log.info("tunnel channel ended before its header: %s", exc)
            writer.close()
            return
        try:
            header = decode_header(line, required=HEADER_FIELDS)
        except ProtocolError as exc:
            log.warning("refused a tunnel channel: %s", exc)
            writer.close()
            return
        await self.serve(reader, writer, header)

    async def _serve_http(self, app: App, header: dict[str, str], reader: Any, writer: Any) -> None:
        conn = _HttpConnection(self, app, header)
        host, port = _peer(header.get("client_addr", ""))
        transport = StreamTransport(
            reader, writer, peername=(host, port) if host else None, on_data=conn.on_data
        )
        server = web.Server(conn.handle, handler_cancellation=True)
        protocol = _Protocol(
            server,
            loop=asyncio.get_running_loop(),
            keepalive_timeout=self.options.keepalive_timeout,
            tcp_keepalive=False,
            access_log=None,
            max_line_size=MAX_LINE,
            max_field_size=MAX_FIELD,
            max_headers=MAX_HEADERS,
            auto_decompress=False,
            lingering_time=2.0,
        )
        conn.transport, conn.protocol = transport, protocol
        try:
            transport.start(protocol)
            await transport.wait_closed()
            if conn.tasks:
                await asyncio.wait(list(conn.tasks), timeout=5)
        finally:
            transport.abort()
            conn.closed()

    async def _serve_tcp(self, app: App, header: dict[str, str], reader: Any, writer: Any) -> None:
        client_addr = header.get("client_addr", "")
        public = app_public_addr(app, header.get("proxy_addr", ""))
        base = {
            "app": app.name,
            "app_uri": app.spec.uri,
            "app_public_addr": public,
            "remote_addr": client_addr,
        }
        cert = header.get("cert", "")
        try:
            if not cert:
                raise AuthenticationError(
                    f"{app.name} is a TCP app and needs a certificate: run `ward app login {app.name}`"
                )
            ident = self.identify(cert, app)
        except WardgateError as exc:
            self.emit("app.session.start", success=False, error=str(exc), **base)
            log.info("refused a TCP stream to %s from %s: %s", app.name, client_addr, exc)
            return
        route = ident.route_to_app
        sid = route.session_id if route is not None and route.session_id else str(uuid.uuid4())
        member = _TcpMember(writer)
        key = f"tcp:{uuid.uuid4()}"
        try:
            s, _ = await self.join(
                key,
                lambda: _Session(
                    key=key,
                    sid=sid,
                    identity=ident,
                    cert_pem=cert,
                    app=app,
                    public_addr=public,
                    remote_addr=client_addr,
                ),
                member,
                announce=False,
            )
        except WardgateError:
            return
        parts = urlsplit(app.spec.uri)
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(parts.hostname, parts.port), self.options.connect_timeout
            )
        except (OSError, TimeoutError) as exc:
            error = f"cannot reach {app.spec.uri}: {exc or 'timed out'}"
            self.emit("app.session.start", success=False, error=error, **s.fields())
            self.leave(s, member)
            return
        member.upstream = up_writer
        self.started(s)
        self.activate(s)
        try:
            if s.end_reason:
                abort_writer(up_writer)
                return
            s.bytes_in, s.bytes_out = await pipe(reader, writer, up_reader, up_writer)
        finally:
            with contextlib.suppress(Exception):
                up_writer.close()
            self.deactivate(s)
            self.leave(s, member)

    async def close(self) -> None:
        for t in [*self.sessions, *self._background]:
            t.cancel()
        if self._watcher is not None:
            self._watcher.cancel()
        for up in self._upstreams.values():
            with contextlib.suppress(Exception):
                await up.session.close()
        self._upstreams.clear()


class _TcpMember:
    def __init__(self, writer: Any) -> None:
        self.writer = writer
        self.upstream: Any = None

    def terminate(self, reason: str) -> None:
        abort_writer(self.writer)
        if self.upstream is not None:
            abort_writer(self.upstream)


class _Protocol(web.RequestHandler):
    """aiohttp's HTTP/1.1 server protocol, answering malformed requests with our own pages."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("the response has started: cannot send an error page")
        title, text = "Bad request", "The request could not be read as HTTP/1.1."
        if isinstance(exc, LineTooLong):
            status, title, text = 431, "Request header too large", "A request line or header is too long."
        elif exc is not None and "too many headers" in str(exc).lower():
            status, title, text = 431, "Request header too large", "The request has too many headers."
        elif status == 500:
            title, text = "Internal error", "The app service failed to handle this request."
            log.error("app request failed", exc_info=exc)
        if status != 500:
            log.info(
                "refused a malformed request from %s: %s",
                request.remote,
                " ".join(str(exc or message).split()),
            )
        resp = page(status, title, text)
        transport = request.transport
        if transport is not None and not transport.is_closing():
            # aiohttp would answer an unreadable request as HTTP/1.0; HTTP/1.1 servers say 1.1.
            # Written here, then closed: aiohttp's own attempt finds the connection closing.
            transport.write(_raw_response(status, title, text))
            transport.close()
        resp.force_close()
        return resp


class _HttpConnection:
    """One client connection to one HTTP app: authentication, forwarding, slow-client timer."""

    def __init__(self, service: AppService, app: App, header: dict[str, str]) -> None:
        self.service = service
        self.options = service.options
        self.app = app
        self.cert_pem = header.get("cert", "")
        self.client_addr = header.get("client_addr", "")
        self.proxy_addr = header.get("proxy_addr", "")
        self.public_addr = app_public_addr(app, self.proxy_addr)
        host, _, port = self.public_addr.rpartition(":")
        self.public_host, self.public_port = host.strip("[]").lower(), int(port or 443)
        self.transport: StreamTransport | None = None
        self.protocol: _Protocol | None = None
        self.groups: set[_Session] = set()
        self.cert_session: _Session | None = None
        self.cert_refusal = ""
        self.tasks: set[asyncio.Task[Any]] = set()
        self.websockets: set[web.WebSocketResponse] = set()
        self.loop = asyncio.get_running_loop()
        self._head_timer: asyncio.TimerHandle | None = None
        self._payload: Any = None
        self._upgraded = False
        self._inflight = 0
        self._terminating = False

    # -- lifecycle -----------------------------------------------------------------------------

    def terminate(self, reason: str) -> None:
        if self._terminating:
            return
        self._terminating = True
        self.service._spawn(self._shut(reason))

    async def _shut(self, reason: str) -> None:
        """WebSockets get a close frame saying why (1008, policy), then the connection drops."""
        for ws in list(self.websockets):
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1):
                    await ws.close(code=1008, message=reason.encode()[:120])
        if self.transport is not None:
            self.transport.abort()
        for t in list(self.tasks):
            t.cancel()

    def closed(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        for s in list(self.groups):
            self.service.leave(s, self)
        self.groups.clear()

    # -- the slow-client timer -----------------------------------------------------------------

    def on_data(self, data: bytes) -> None:
        """Bytes that do not belong to a body or a WebSocket start a request head: time it."""
        if self._head_timer is not None or self._upgraded:
            return
        if self._payload is not None and not self._payload.is_eof():
            return
        self._head_timer = self.loop.call_later(self.options.header_timeout, self._head_timeout)

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport is None or self.transport.is_closing():
            return
        log.info(
            "request head from %s not complete in %ss: 408", self.client_addr, self.options.header_timeout
        )
        if self._inflight and self.protocol is not None:
            self.protocol.close()  # a pipelined head: end after the response in flight
            return
        self.transport.write(_raw_response(408, "Request timeout", "The request was not received in time."))
        self.transport.close()

    # -- requests ------------------------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._payload = request.content
        self._inflight += 1
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
        try:
            return await self._handle(request)
        except _Refused as r:
            return r.response
        finally:
            self._inflight -= 1
            if task is not None:
                self.tasks.discard(task)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        cookie_header, ours = split_cookies(request.headers.getall("Cookie", ()))
        if request.raw_path.split("?", 1)[0] == AUTH_PATH:
            return await self._auth_callback(request, ours)
        session = await self._authenticate(request, ours)
        if session is None:
            return self._launch(request, ours)
        return await self._forward(request, session, cookie_header)

    async def _authenticate(self, request: web.BaseRequest, ours: dict[str, str]) -> _Session | None:
        """The request's session: the connection's certificate, else the app-session cookie."""
        svc = self.service
        if self.cert_pem and not self.cert_refusal:
            if self.cert_session is not None:
                await self._refresh(self.cert_session)
                return self.cert_session
            try:
                ident = svc.identify(self.cert_pem, self.app)
            except WardgateError as exc:
                self.cert_refusal = str(exc)
                svc.emit(
                    "app.session.start",
                    success=False,
                    error=str(exc),
                    app=self.app.name,
                    app_uri=self.app.spec.uri,
                    app_public_addr=self.public_addr,
                    remote_addr=self.client_addr,
                )
            else:
                route = ident.route_to_app
                fingerprint = hashlib.sha256(self.cert_pem.encode()).hexdigest()
                sid = route.session_id if route is not None and route.session_id else fingerprint[:32]
                key = f"cert:{fingerprint}"
                cert = self.cert_pem
                self.cert_session = await self._join(
                    key,
                    lambda: _Session(
                        key=key,
                        sid=sid,
                        identity=ident,
                        cert_pem=cert,
                        app=self.app,
                        public_addr=self.public_addr,
                        remote_addr=self.client_addr,
                    ),
                )
                return self.cert_session
        secret = ours.get(APP_COOKIE, "")
        if secret:
            if _host_of(request.headers.get("Host", "")) != self.public_host:
                raise _Refused(
                    page(421, "Misdirected request", f"This connection serves {self.public_host} only.")
                )
            try:
                data = await svc.lookup(secret)
            except WardgateError as exc:
                raise _Refused(page(502, "Cannot check your session", str(exc))) from None
            if data is not None and data.get("app") == self.app.name and data.get("session_id"):
                return await self._cookie_session(secret, data)
        if self.cert_refusal:
            raise _Refused(page(403, "Access denied", self.cert_refusal))
        return None

    async def _cookie_session(self, secret: str, data: dict[str, Any]) -> _Session:
        svc = self.service
        sid = str(data["session_id"])
        key = f"cookie:{sid}"
        existing = svc.groups.get(key)
        if existing is not None and not existing.ended and existing.secret == secret:
            return await self._join(key, lambda: existing)
        cert = str(data.get("cert", ""))
        try:
            ident = svc.identify(cert, self.app)
        except WardgateError as exc:
            raise _Refused(page(403, "Access denied", str(exc))) from None
        expires = _parse_time(data.get("expires"))
        return await self._join(
            key,
            lambda: _Session(
                key=key,
                sid=sid,
                identity=ident,
                cert_pem=cert,
                app=self.app,
                public_addr=self.public_addr,
                remote_addr=self.client_addr,
                secret=secret,
                expires=expires,
            ),
        )

    async def _join(self, key: str, make: Callable[[], _Session]) -> _Session:
        try:
            s, _ = await self.service.join(key, make, self)
        except WardgateError as exc:
            raise _Refused(page(403, "Access denied", str(exc))) from None
        self.groups.add(s)
        return s

    async def _refresh(self, s: _Session) -> None:
        try:
            await self.service.refresh(s)
        except WardgateError as exc:
            raise _Refused(_closing(page(403, "Access denied", str(exc)))) from None

    def _launch(self, request: web.BaseRequest, ours: dict[str, str]) -> web.StreamResponse:
        """No session: send a browser to the proxy's launch page, which comes back with a token."""
        if request.method not in ("GET", "HEAD") or not self.proxy_addr:
            return page(
                401,
                "Sign-in required",
                f"Open {self.app.name} from the Wardgate web UI, or use `ward app login {self.app.name}` "
                "for scripts and command-line clients.",
            )
        state = ours.get(STATE_COOKIE, "")
        if not _STATE_RE.match(state):
            state = secrets.token_urlsafe(24)
        path = quote(local_path(request.raw_path), safe="")
        location = f"https://{self.proxy_addr}/web/launch/{self.public_host}?state={state}&path={path}"
        resp = web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})
        resp.set_cookie(
            STATE_COOKIE, state, max_age=300, secure=True, httponly=True, samesite="Lax", path="/"
        )
        return resp

    async def _auth_callback(self, request: web.BaseRequest, ours: dict[str, str]) -> web.StreamResponse:
        """Back from the launch page with a one-time token: check the state, exchange, set the cookie."""
        if request.method not in ("GET", "HEAD"):
            return page(405, "Method not allowed", "Sign-in links are opened with GET.")
        token, state = request.query.get("token", ""), request.query.get("state", "")
        expected = ours.get(STATE_COOKIE, "")
        if not (token and state and expected and hmac.compare_digest(state.encode(), expected.encode())):
            return page(
                403,
                "Sign-in link not for this browser",
                f"This sign-in link was not started in this browser. Open {self.app.name} from the "
                "Wardgate web UI again.",
            )
        try:
            data = await self.service.auth.exchange_app_session(token)
        except (NotFoundError, AccessDeniedError, AuthenticationError, BadParameterError) as exc:
            return page(403, "Sign-in link expired", f"{exc}. Open {self.app.name} from Wardgate again.")
        except WardgateError as exc:
            return page(502, "Cannot sign you in", f"The auth service did not answer: {exc}")
        if data.get("app") != self.app.name or not data.get("secret"):
            return page(403, "Wrong app", f"This sign-in link is not for {self.app.name}.")
        secret = str(data["secret"])
        self.service.remember(secret, data)
        resp = web.Response(
            status=302,
            headers={"Location": local_path(request.query.get("path", "/")), "Cache-Control": "no-store"},
        )
        expires = _parse_time(data.get("expires"))
        max_age = int((expires - self.service.now()).total_seconds()) if expires is not None else None
        resp.set_cookie(
            APP_COOKIE, secret, max_age=max_age, secure=True, httponly=True, samesite="Lax", path="/"
        )
        resp.set_cookie(STATE_COOKIE, "", max_age=0, secure=True, httponly=True, samesite="Lax", path="/")
        return resp

    # -- forwarding ----------------------------------------------------------------------------

    def _headers(
        self, request: web.BaseRequest, s: _Session, cookie_header: str, jwt: str, up: _Upstream
    ) -> CIMultiDict[str]:
        """What the upstream gets: the client's end-to-end headers (minus ours, hop-by-hop and
        anything claiming to say who or where the client is), then Host, X-Forwarded-*,
        the configured headers, and the identity token."""
        listed = {t.strip().lower() for v in request.headers.getall("Connection", ()) for t in v.split(",")}
        out: CIMultiDict[str] = CIMultiDict()
        for name, value in request.headers.items():
            lower = name.lower()
            if lower in _NOT_FORWARDED or lower in listed:
                continue
            out.add(name, value)
        out["Host"] = up.host_header
        if cookie_header:
            out["Cookie"] = cookie_header
        client_host = _peer(self.client_addr)[0] or (request.remote or "")
        asked = request.headers.get("Host", "") or self.public_addr
        out["X-Forwarded-For"] = client_host
        out["X-Forwarded-Proto"] = "https"
        out["X-Forwarded-Host"] = asked
        asked_port = asked.rpartition(":")[2] if not asked.endswith("]") and ":" in asked else ""
        out["X-Forwarded-Port"] = asked_port if asked_port.isdigit() else str(self.public_port)
        for h in s.app.spec.rewrite.headers:
            values = expand_traits([h.value], s.identity.traits)
            if h.name in out:
                del out[h.name]
            if values:
                out[h.name] = ", ".join(values)
        out[JWT_HEADER] = jwt
        return out

    async def _forward(self, request: web.BaseRequest, s: _Session, cookie_header: str) -> web.StreamResponse:
        svc = self.service
        up = svc.upstream(s.app)
        stats = _Stats()
        svc.activate(s)
        try:
            try:
                jwt = await svc.jwt_for(s)
            except WardgateError as exc:
                resp = page(502, "Cannot sign the request", f"The auth service did not issue a token: {exc}")
                stats.status = resp.status
                return resp
            headers = self._headers(request, s, cookie_header, jwt, up)
            if _is_websocket(request):
                return await self._websocket(request, s, up, headers, stats)
            return await self._http(request, s, up, headers, stats)
        finally:
            svc.deactivate(s)
            s.requests += 1
            s.bytes_in += stats.bytes_in
            s.bytes_out += stats.bytes_out
            if stats.status:
                self._audit(request, s, stats)

    def _audit(self, request: web.BaseRequest, s: _Session, stats: _Stats) -> None:
        """`app.session.request`: what was asked and answered, never the bodies."""
        self.service.emit(
            "app.session.request",
            success=stats.status < 500,
            method=request.method,
            path=request.raw_path.split("?", 1)[0],
            status=stats.status,
            bytes_in=stats.bytes_in,
            bytes_out=stats.bytes_out,
            duration_ms=int((time.monotonic() - stats.started) * 1000),
            **s.fields(self.client_addr),
        )

    async def _http(
        self,
        request: web.BaseRequest,
        s: _Session,
        up: _Upstream,
        headers: CIMultiDict[str],
        stats: _Stats,
    ) -> web.StreamResponse:
        body_sent = asyncio.Event()
        body: Any = None
        if request.body_exists:
            if request.headers.get("Expect", "").lower() == "100-continue" and request.version >= (1, 1):
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")

            async def stream() -> Any:
                try:
                    while chunk := await request.content.readany():
                        stats.bytes_in += len(chunk)
                        yield chunk
                finally:
                    body_sent.set()

            body = stream()

        async def send() -> aiohttp.ClientResponse:
            return await up.session.request(
                request.method,
                up.url(_target(request)),
                headers=headers,
                data=body,
                allow_redirects=False,
            )

        # The answer is due `response_timeout` after the body was sent (a slow upload is not
        # the app's delay), or earlier if the app answers before reading it all. Without a body
        # (most requests) the clock starts at once: no tasks to race.
        sending: asyncio.Future[aiohttp.ClientResponse] | None = None
        try:
            if body is None:
                async with asyncio.timeout(self.options.response_timeout):
                    upstream = await send()
            else:
                sending = asyncio.ensure_future(send())
                waiting = asyncio.ensure_future(body_sent.wait())
                try:
                    await asyncio.wait({sending, waiting}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiting.cancel()
                async with asyncio.timeout(self.options.response_timeout):
                    upstream = await sending
        except TimeoutError:
            log.info(
                "%s did not answer %s in %ss", s.app.spec.uri, request.method, self.options.response_timeout
            )
            resp = page(
                504, "The app did not answer", f"{s.app.name} did not answer in time. Try again later."
            )
            stats.status = resp.status
            return _closing(resp)
        except (aiohttp.ClientError, OSError) as exc:
            why = _upstream_error(s.app, exc)
            log.info("cannot forward %s %s to %s: %s", request.method, request.path, s.app.spec.uri, why)
            resp = page(502, "Cannot reach the app", why)
            stats.status = resp.status
            return _closing(resp)
        finally:
            if sending is not None and not sending.done():
                sending.cancel()
        stats.status = upstream.status
        try:
            return await self._respond(request, s, up, upstream, stats)
        finally:
            upstream.release()

    async def _respond(
        self,
        request: web.BaseRequest,
        s: _Session,
        up: _Upstream,
        upstream: aiohttp.ClientResponse,
        stats: _Stats,
    ) -> web.StreamResponse:
        out = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        listed = {t.strip().lower() for v in upstream.headers.getall("Connection", ()) for t in v.split(",")}
        for name, value in upstream.headers.items():
            lower = name.lower()
            if lower in HOP_BY_HOP_HEADERS or lower in listed or lower == "content-length":
                continue
            if lower == "location":
                value = rewrite_location(value, up.redirect_hosts, self.public_addr)
            out.headers.add(name, value)
        length = upstream.headers.get("Content-Length")
        empty = request.method == "HEAD" or upstream.status in _EMPTY_STATUSES or upstream.status < 200
        if length is not None and length.isdigit():
            out.headers["Content-Length"] = length
        elif not empty and request.version >= (1, 1):
            out.enable_chunked_encoding()
        try:
            await out.prepare(request)
            if not empty:
                async for chunk in upstream.content.iter_any():
                    stats.bytes_out += len(chunk)
                    await out.write(chunk)
            await out.write_eof()
        except (aiohttp.ClientError, ConnectionError, OSError) as exc:
            # Cut mid-body (either side): the client must see a broken connection, never a
            # clean but short response.
            log.info("response from %s to %s cut: %r", s.app.spec.uri, self.client_addr, exc)
            upstream.close()
            if self.transport is not None:
                self.transport.abort()
        return out

    async def _websocket(
        self,
        request: web.BaseRequest,
        s: _Session,
        up: _Upstream,
        headers: CIMultiDict[str],
        stats: _Stats,
    ) -> web.StreamResponse:
        """Open the upstream WebSocket first (so its refusal reaches the client as a status),
        then accept the client's and relay messages both ways."""
        protocols = [
            p.strip() for v in request.headers.getall("Sec-WebSocket-Protocol", ()) for p in v.split(",")
        ]
        for name in _WS_HANDSHAKE:
            headers.popall(name, None)
        resp: web.Response
        try:
            async with asyncio.timeout(self.options.response_timeout):
                upstream = await up.session.ws_connect(
                    up.url(_target(request)),
                    headers=headers,
                    protocols=[p for p in protocols if p],
                    autoping=True,
                    max_msg_size=self.options.max_ws_message,
                )
        except TimeoutError:
            resp = page(504, "The app did not answer", f"{s.app.name} did not accept the WebSocket in time.")
        except aiohttp.WSServerHandshakeError as exc:
            status = exc.status if exc.status >= 400 else 502
            resp = page(
                status, "WebSocket refused", f"{s.app.name} refused the WebSocket (HTTP {exc.status})."
            )
        except (aiohttp.ClientError, OSError) as exc:
            resp = page(502, "Cannot reach the app", _upstream_error(s.app, exc))
        else:
            return await self._relay(request, upstream, stats)
        stats.status = resp.status
        return _closing(resp)

    async def _relay(
        self, request: web.BaseRequest, upstream: aiohttp.ClientWebSocketResponse, stats: _Stats
    ) -> web.StreamResponse:
        self._upgraded = True
        ws = web.WebSocketResponse(
            protocols=[upstream.protocol] if upstream.protocol else (),
            autoping=True,
            max_msg_size=self.options.max_ws_message,
        )
        self.websockets.add(ws)
        try:
            await ws.prepare(request)
            stats.status = 101
            await _relay_websockets(ws, upstream, stats)
        finally:
            self.websockets.discard(ws)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await upstream.close()
        return ws


@dataclass
class _Stats:
    """One request's audit numbers, filled in as it goes (an aborted request still reports)."""

    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    started: float = field(default_factory=time.monotonic)


# ---------------------------------------------------------------- helpers


async def _relay_websockets(
    client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse, stats: _Stats
) -> None:
    """Relay messages until one side closes, then close the other with the same code."""

    async def pump(src: Any, dst: Any, inbound: bool) -> None:
        async for msg in src:
            if msg.type is WSMsgType.TEXT:
                size = len(msg.data.encode())
                await dst.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                size = len(msg.data)
                await dst.send_bytes(msg.data)
            else:
                break
            if inbound:
                stats.bytes_in += size
            else:
                stats.bytes_out += size

    a = asyncio.ensure_future(pump(client, upstream, True))
    b = asyncio.ensure_future(pump(upstream, client, False))
    try:
        done, _ = await asyncio.wait({a, b}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (a, b):
            t.cancel()
        await asyncio.gather(a, b, return_exceptions=True)
    closer, other = (upstream, client) if a in done else (client, upstream)
    code = other.close_code if other.close_code not in (None, 1005, 1006) else _WS_CLOSE_OK
    with contextlib.suppress(Exception):
        async with asyncio.timeout(2):
            await closer.close(code=code)


def page(status: int, title: str, message: str) -> web.Response:
    """A small HTML page for what went wrong, in words people can act on."""
    return web.Response(
        status=status,
        body=_page_html(status, title, message),
        content_type="text/html",
        charset="utf-8",
        headers={"Cache-Control": "no-store"},
    )


def _page_html(status: int, title: str, message: str) -> bytes:
    t, m = html.escape(title), html.escape(message)
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>{status} {t}</title></head>"
        f"<body><h1>{t}</h1><p>{m}</p><hr><p><small>Wardgate app access</small></p></body></html>\n"
    ).encode()


def _raw_response(status: int, title: str, message: str) -> bytes:
    body = _page_html(status, title, message)
    return (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: text/html; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
    ).encode() + body


async def _answer_raw(writer: Any, status: int, title: str, message: str) -> None:
    """An HTTP error before any HTTP is read (nothing here can serve the connection)."""
    with contextlib.suppress(Exception):
        writer.write(_raw_response(status, title, message))
        async with asyncio.timeout(5):
            await writer.drain()


def _closing(resp: web.StreamResponse) -> web.StreamResponse:
    resp.force_close()
    return resp


def _is_websocket(request: web.BaseRequest) -> bool:
    if request.method != "GET" or request.headers.get("Upgrade", "").lower() != "websocket":
        return False
    return any(
        t.strip().lower() == "upgrade" for v in request.headers.getall("Connection", ()) for t in v.split(",")
    )


def _target(request: web.BaseRequest) -> str:
    """The request target as the client sent it (origin form), for the upstream's request line."""
    raw = request.raw_path
    if raw.startswith("/"):
        return raw
    return request.rel_url.raw_path_qs or "/"


def split_cookies(values: Any) -> tuple[str, dict[str, str]]:
    """(the Cookie header without Wardgate's cookies, Wardgate's cookies by name)."""
    kept: list[str] = []
    ours: dict[str, str] = {}
    for value in values:
        for part in value.split(";"):
            item = part.strip()
            if not item:
                continue
            name, _, val = item.partition("=")
            if name.strip().startswith(COOKIE_PREFIX):
                ours.setdefault(name.strip(), val.strip().strip('"'))
            else:
                kept.append(item)
    return "; ".join(kept), ours


def local_path(path: str) -> str:
    """`path` if it is a path on this site (one leading "/"), else "/": never an open redirect."""
    if (
        not path.startswith("/")
        or path.startswith(("//", "/\\"))
        or any(ord(c) < 0x21 or c == "\x7f" for c in path)
    ):
        return "/"
    return path


def rewrite_location(value: str, upstream_hosts: frozenset[str], public_addr: str) -> str:
    """A redirect to the upstream's own host (or a `rewrite.redirect` host) goes to the public
    address over https instead; relative and foreign redirects stay as they are."""
    try:
        parts = urlsplit(value)
        host = (parts.hostname or "").lower().rstrip(".")
    except ValueError:
        return value
    if not parts.netloc or host not in upstream_hosts:
        return value
    if parts.scheme and parts.scheme.lower() not in ("http", "https", "ws", "wss"):
        return value
    pub_host, _, pub_port = public_addr.rpartition(":")
    netloc = pub_host if pub_port == "443" else public_addr
    scheme = "wss" if parts.scheme.lower() in ("ws", "wss") else "https"
    return urlunsplit((scheme, netloc, parts.path, parts.query, parts.fragment))


def _host_of(host_header: str) -> str:
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.partition(":")[0].rstrip(".")


def _peer(addr: str) -> tuple[str, int]:
    try:
        return parse_client_addr(addr)
    except WardgateError:
        return "", 0


def _upstream_error(app: App, exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return (
            f"{app.name}'s certificate could not be verified ({exc.certificate_error}); an operator can "
            "set insecure_skip_verify for self-signed upstreams."
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"{app.name} is not reachable from the app service ({exc.os_error or exc})."
    return f"{app.name} closed the connection without answering ({type(exc).__name__})."


def _parse_time(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    try:
        dt = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _epoch(value: Any) -> float | None:
    dt = _parse_time(value)
    return dt.timestamp() if dt is not None else None


def _jwt_expiry(token: str) -> float | None:
    """`exp` of a JWT (not verified: the auth service just gave it to us)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"])
    except (IndexError, ValueError, KeyError, TypeError):
        return None


async def _close_later(session: aiohttp.ClientSession, delay: float) -> None:
    try:
        await asyncio.sleep(delay)
    finally:
        await session.close()
