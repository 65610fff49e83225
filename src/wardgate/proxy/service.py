"""The proxy service: the one TLS port, wired to the auth service it fronts.

It talks to auth like any remote service (mutual TLS with its host certificate), keeps a watched
cache of what it authorises against, and routes: web (`/webapi/…`), `ward-ssh`, `ward-tunnel`,
databases, apps (an app's host name, or `ward-tcp`), and `ward-auth` passed through untouched so
clients' certificates reach the auth API. Recordings of agentless sessions (which the proxy makes
itself) are kept in `recordings_dir` until uploaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from aiohttp import web
from cryptography import x509

from wardgate.api.cache import ResourceCache
from wardgate.api.client import AuthClient
from wardgate.api.emitter import RemoteEmitter
from wardgate.api.identityfile import IdentityFile
from wardgate.api.resources import CertAuthority
from wardgate.proxy.agentless import AgentlessRecorder
from wardgate.proxy.app import TCP_ALPN, AppProxy
from wardgate.proxy.db import ALPN_PROTOCOLS, DBProxy
from wardgate.proxy.router import TLSRouter, server_context
from wardgate.proxy.sshproxy import SSHProxy
from wardgate.proxy.tunnel import TunnelServer
from wardgate.proxy.web import ProxyWeb
from wardgate.proxy.webapi import WebAPI
from wardgate.proxy.websession import DEFAULT_IDLE_TIMEOUT, WebSessions
from wardgate.proxy.webterm import WebTerminal

log = logging.getLogger(__name__)
CACHED_KINDS = ("cert_authority", "role", "lock", "node", "user", "db", "db_service", "app", "app_service")


@dataclass
class ProxySettings:
    listen_host: str
    listen_port: int
    public_addr: str
    auth_host: str
    auth_port: int
    handshake_timeout: float = 15.0
    ping_interval: float = 30.0
    web_idle_timeout: timedelta = DEFAULT_IDLE_TIMEOUT
    recordings_dir: Path | None = None
    """Where recordings of agentless sessions wait for upload; None refuses sessions that roles
    want recorded on agentless nodes."""


class ProxyService:
    def __init__(self, settings: ProxySettings, identity: IdentityFile) -> None:
        self.settings = settings
        self.identity = identity
        self.auth = AuthClient.from_identity(identity, f"{_bracket(settings.auth_host)}:{settings.auth_port}")
        self.cache = ResourceCache(CACHED_KINDS)
        self.emitter = RemoteEmitter(self.auth)
        self.tunnels = TunnelServer(
            self._host_cas, on_refused=self._tunnel_refused, authorize=self._authorize_agent
        )
        self.agentless = (
            AgentlessRecorder(self.cache, self.emitter, self.auth, settings.recordings_dir)
            if settings.recordings_dir is not None
            else None
        )
        self.ssh = SSHProxy(self.cache, self.emitter, tunnels=self.tunnels, agentless=self.agentless)
        self.db = DBProxy(self.cache, self.emitter, tunnels=self.tunnels)
        self.apps = AppProxy(self.cache, self.emitter, tunnels=self.tunnels, public_addr=settings.public_addr)
        self.web_sessions = WebSessions(
            self.auth,
            auth_addr=self.auth.addr,
            ca_pems=lambda: list(identity.ca_pems),
            user_cas=lambda: self.cache.ca_certs("user"),
            idle_timeout=settings.web_idle_timeout,
        )
        self._reaper: asyncio.Task[None] | None = None
        self.terminal: WebTerminal | None = None
        self.router: TLSRouter | None = None
        self._runner: web.AppRunner | None = None
        self._cache_task: asyncio.Task[None] | None = None
        self.address: tuple[str, int] | None = None

    def _jwt_public_keys(self) -> list[str]:
        ca = self.cache.get("cert_authority", "jwt")
        if not isinstance(ca, CertAuthority):
            return []
        keys = (*ca.spec.active_keys, *ca.spec.additional_trusted_keys)
        return [k.jwt_public_key_pem for k in keys if k.jwt_public_key_pem]

    def _host_cas(self) -> list[x509.Certificate]:
        return self.cache.ca_certs("host")

    def _authorize_agent(self, identity: object) -> None:
        from wardgate.auth.identity import Identity
        from wardgate.auth.locks import find_lock, lock_decision

        if isinstance(identity, Identity):
            lock = find_lock(self.cache.list("lock"), node=[identity.host_id])  # type: ignore[arg-type]
            if lock is not None:
                lock_decision(lock).raise_if_denied()

    def _tunnel_refused(self, remote: str, reason: str, identity: object = None) -> None:
        self.emitter.emit_nowait(
            "auth",
            success=False,
            protocol="tunnel",
            remote_addr=remote,
            error=reason,
            user=getattr(identity, "host_id", "") or "",
        )

    async def start(self) -> tuple[str, int]:
        s = self.settings
        self._cache_task = asyncio.create_task(self.cache.run(lambda: self.auth.watch(CACHED_KINDS)))
        await asyncio.wait_for(self.cache.ready.wait(), 30)
        ping = await self.auth.ping()
        client_cas = [
            k.tls_cert_pem
            for t in ("user", "host")
            for k in self.cache.get("cert_authority", t).spec.active_keys  # type: ignore[union-attr]
        ]
        ctx = server_context(self.identity.cert_pem, self.identity.key_pem, client_ca_pems=client_cas)
        webapi = ProxyWeb(
            self.auth,
            cluster_name=ping["cluster_name"],
            public_addr=s.public_addr,
            host_ca_pems=ping["host_ca_pems"],
            second_factor=ping["second_factor"],
            passwordless=bool(ping.get("passwordless")),
            webauthn_rp_id=str(ping.get("webauthn_rp_id") or ""),
            jwt_public_keys=self._jwt_public_keys,
        )
        WebAPI(
            sessions=self.web_sessions,
            cache=self.cache,
            cluster_name=ping["cluster_name"],
            second_factor=ping["second_factor"],
            allowed_origins=webapi.allowed_origins,
            apps=self.apps,
        ).register(webapi.app)
        self.terminal = terminal = WebTerminal(
            sessions=self.web_sessions,
            cache=self.cache,
            resolve=self.ssh.resolve,
            tunnels=self.tunnels,
            agentless=self.agentless,
            cluster_name=ping["cluster_name"],
            allowed_origins=webapi.allowed_origins,
            emitter=self.emitter,
        )
        webapi.app.router.add_get("/webapi/sites/{cluster}/connect/ws", terminal.handle)
        self._reaper = asyncio.create_task(self._reap_web_sessions(), name="web-session-reaper")
        self._runner = web.AppRunner(webapi.app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        server = self._runner.server
        assert server is not None
        router = TLSRouter(ctx, handshake_timeout=s.handshake_timeout, ping_interval=s.ping_interval)
        router.set_default(lambda conn: conn.attach(server()))
        router.add_route("ward-ssh", self.ssh.handle)
        router.add_route("ward-tunnel", self.tunnels.handle)
        for alpn in ALPN_PROTOCOLS:
            router.add_route(alpn, self.db.handle)
        router.add_route(TCP_ALPN, self.apps.handle)
        router.add_sni_matcher("app", self.apps.is_app_host, self.apps.handle)
        router.add_passthrough("ward-auth", s.auth_host, s.auth_port)
        if self.agentless is not None:
            await self.agentless.start()
        self.address = await router.start(s.listen_host, s.listen_port)
        self.router = router
        return self.address

    async def _reap_web_sessions(self) -> None:
        while True:
            await asyncio.sleep(60)
            self.web_sessions.reap()

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        if self.terminal is not None:
            await self.terminal.close()
        if self.router is not None:
            await self.router.close()
        await self.apps.close()
        await self.tunnels.close()
        if self.agentless is not None:
            await self.agentless.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._cache_task is not None:
            self._cache_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._cache_task
        await self.web_sessions.close()
        await self.emitter.close()
        await self.auth.close()


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
