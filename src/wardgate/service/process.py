"""`wardgate start`: run the services the config enables, in one process.

Like Teleport's lib/service: with `auth_service` enabled it opens storage, starts auth (CAs on
first start), serves the auth API and writes the local administrator's identity; the proxy and
the SSH node then get host certificates from it directly. Without auth here, the process joins a
cluster with a token (through `proxy_server`'s one port or at `auth_server`), keeps its host
credentials in the data dir, and the node is reached through a reverse tunnel to the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from wardgate.api.client import AuthClient
from wardgate.api.identityfile import IdentityFile, server_trusting_context
from wardgate.audit.store import SQLiteAuditLog
from wardgate.auth.api import AuthAPI
from wardgate.auth.server import ADMIN_CERT_TTL, ADMIN_USER, AuthServer, AuthServerConfig
from wardgate.auth.users import AuthPreference
from wardgate.auth.webauthn import WebAuthnConfig
from wardgate.backend.sqlite import SQLiteBackend
from wardgate.config import Config, parse_addr
from wardgate.errors import BadParameterError
from wardgate.keys import (
    generate_ssh_key,
    generate_tls_key,
    private_key_pem,
    public_key_pem,
    ssh_private_key_openssh,
    ssh_public_key_line,
)

if TYPE_CHECKING:
    from wardgate.proxy.service import ProxyService

log = logging.getLogger(__name__)
ADMIN_IDENTITY = "admin.identity"
BUILT_SERVICES = ("auth_service", "proxy_service", "ssh_service", "db_service", "app_service")
"""Services this build can run; the others are accepted in config and reported as not yet available."""
RENEW_EVERY = timedelta(hours=12)
REJOIN_BEFORE = timedelta(days=3)


@dataclass
class HostCredentials:
    """What a service of this host presents: X.509 identity, and for nodes an SSH host cert."""

    identity: IdentityFile
    host_id: str
    ssh_key: str = ""
    ssh_cert: str = ""


@dataclass
class Started:
    cluster_name: str
    data_dir: Path
    auth_addr: str = ""
    admin_identity: Path | None = None
    ca_pin: str = ""
    first_start: bool = False
    proxy_addr: str = ""
    ssh_addr: str = ""
    tunnel_to: str = ""
    services: list[str] = field(default_factory=list)
    unavailable: list[str] = field(default_factory=list)


class WardgateProcess:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.data_dir = Path(cfg.wardgate.data_dir)
        self.auth: AuthServer | None = None
        self.api: AuthAPI | None = None
        self.proxy: ProxyService | None = None
        self.node: object | None = None
        self.db: object | None = None
        self.app: object | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closers: list[object] = []

    # ------------------------------------------------------------------ start

    async def start(self) -> Started:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        cfg = self.cfg
        unavailable = [s for s in cfg.enabled_services() if s not in BUILT_SERVICES]
        for name in unavailable:
            log.warning("%s is enabled in the config but is not part of this build yet; skipping it", name)
        started = Started(cluster_name=cfg.cluster_name, data_dir=self.data_dir, unavailable=unavailable)
        started.services = [s for s in cfg.enabled_services() if s in BUILT_SERVICES]
        if cfg.auth_service.enabled:
            await self._start_auth(started)
        if cfg.proxy_service.enabled:
            await self._start_proxy(started)
        if cfg.ssh_service.enabled:
            await self._start_node(started)
        if cfg.db_service.enabled:
            await self._start_db(started)
        if cfg.app_service.enabled:
            await self._start_app(started)
        return started

    async def _start_auth(self, started: Started) -> None:
        cfg = self.cfg
        started.first_start = not _has_data(Path(cfg.storage_path))
        backend = SQLiteBackend(cfg.storage_path)
        audit = SQLiteAuditLog(cfg.audit_path)
        self._closers += [audit, backend]
        a = cfg.auth_service
        prefs = AuthPreference(
            second_factor=a.authentication.second_factor,
            password_min_length=a.authentication.password_min_length,
            max_attempts=a.authentication.lockout.max_attempts,
            lockout_duration=a.authentication.lockout.duration,
            passwordless=a.authentication.passwordless,
            webauthn=webauthn_config(cfg, cfg.proxy_public_addr),
        )
        host, port = parse_addr(a.listen_addr, 3025)
        public_host = _reachable_host(host)
        self.auth = AuthServer(
            AuthServerConfig(
                cluster_name=cfg.cluster_name,
                prefs=prefs,
                cert_ttl=a.cert_ttl,
                static_tokens=list(a.tokens),
                public_addr=cfg.proxy_public_addr,
                recordings_dir=self.data_dir / "recordings",
            ),
            backend,
            audit,
        )
        await self.auth.start()
        self._closers.insert(0, self.auth)
        key = generate_tls_key()
        certs = await self.auth.issue_host_certs(
            host_id=f"auth-{cfg.nodename}",
            node_name=cfg.nodename,
            system_role="auth",
            tls_public_key=public_key_pem(key.public_key()),
            addresses=_names(host, public_host),
        )
        self.api = AuthAPI(self.auth)
        bound = await self.api.start(
            host, port, self.api.server_ssl_context(certs.tls_cert, private_key_pem(key))
        )
        self._closers.insert(0, self.api)
        started.auth_addr = f"{_bracket(public_host)}:{bound}"
        ident_path = self.data_dir / ADMIN_IDENTITY
        await self._write_admin_identity(ident_path, started.auth_addr)
        self._tasks.append(asyncio.create_task(self._renew_admin(ident_path, started.auth_addr)))
        started.admin_identity = ident_path
        started.ca_pin = self.auth.status()["ca_pin"]

    async def _credentials(
        self, role: str, *, node_name: str, addresses: list[str], ssh: bool
    ) -> HostCredentials:
        """Host credentials for a service: signed locally when auth runs here, else by joining."""
        if self.auth is not None:
            return await self._local_credentials(role, node_name=node_name, addresses=addresses, ssh=ssh)
        return await self._joined_credentials(role, node_name=node_name, addresses=addresses, ssh=ssh)

    async def _local_credentials(
        self, role: str, *, node_name: str, addresses: list[str], ssh: bool
    ) -> HostCredentials:
        assert self.auth is not None
        host_id = self._host_id()
        tls_key = generate_tls_key()
        ssh_key = generate_ssh_key() if ssh else None
        certs = await self.auth.issue_host_certs(
            host_id=host_id if role == "node" else f"{role}-{host_id}",
            node_name=node_name,
            system_role=role,
            tls_public_key=public_key_pem(tls_key.public_key()),
            ssh_public_key=ssh_public_key_line(ssh_key.public_key()) if ssh_key else "",
            addresses=addresses,
        )
        ident = IdentityFile(
            key_pem=private_key_pem(tls_key),
            cert_pem=certs.tls_cert,
            ca_pems=[k.tls_cert_pem for k in self.auth.ca("host").spec.active_keys],
            cluster=self.auth.cluster_name,
        )
        return HostCredentials(
            ident, certs.host_id, ssh_private_key_openssh(ssh_key) if ssh_key else "", certs.ssh_cert
        )

    async def _joined_credentials(
        self, role: str, *, node_name: str, addresses: list[str], ssh: bool
    ) -> HostCredentials:
        """Join once with the token; reuse the saved credentials until they near expiry."""
        w = self.cfg.wardgate
        host_dir = self.data_dir / "host"
        ident_path = host_dir / f"{role}.identity"
        if ident_path.exists():
            ident = IdentityFile.load(ident_path)
            if ident.certificate.not_valid_after_utc - datetime.now(UTC) > REJOIN_BEFORE:
                ssh_key = (host_dir / f"{role}_ssh_key").read_text() if ssh else ""
                ssh_cert = (host_dir / f"{role}_ssh_key-cert.pub").read_text() if ssh else ""
                return HostCredentials(ident, (host_dir / "host_id").read_text().strip(), ssh_key, ssh_cert)
        token = w.join_token
        if not token:
            raise BadParameterError(
                "this process runs no auth service, so it must join a cluster: set wardgate.auth_token "
                "(from `wardctl tokens add`) and wardgate.proxy_server or wardgate.auth_server"
            )
        addr, alpn = (w.proxy_server, "ward-auth") if w.proxy_server else (w.auth_server, "")
        pin = w.ca_pin[0] if w.ca_pin else ""
        pems = await AuthClient.discover_trust(addr, ca_pin=pin, insecure=not pin, alpn=alpn)
        if not pin:
            log.warning("joining %s without a CA pin (wardgate.ca_pin): trusting it on first use", addr)
        ctx = server_trusting_context(pems)
        if alpn:
            ctx.set_alpn_protocols([alpn])
        tls_key = generate_tls_key()
        ssh_key = generate_ssh_key() if ssh else None
        async with AuthClient(addr, ctx) as client:
            data = await client.join(
                token=token,
                role=role,
                node_name=node_name,
                host_id=self._host_id(),
                tls_public_key=public_key_pem(tls_key.public_key()),
                ssh_public_key=ssh_public_key_line(ssh_key.public_key()) if ssh_key else "",
                addresses=addresses,
            )
        ident = IdentityFile(
            key_pem=private_key_pem(tls_key),
            cert_pem=data["tls_cert"],
            ca_pems=data["host_ca_pems"],
            auth_server=addr,
            cluster=data["cluster_name"],
        )
        host_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        ident.save(ident_path)
        creds = HostCredentials(ident, data["host_id"])
        if ssh_key is not None:
            creds.ssh_key, creds.ssh_cert = ssh_private_key_openssh(ssh_key), data["ssh_cert"]
            _write_private(host_dir / f"{role}_ssh_key", creds.ssh_key)
            (host_dir / f"{role}_ssh_key-cert.pub").write_text(creds.ssh_cert)
        log.info("joined cluster %s as %s %s", data["cluster_name"], role, data["host_id"])
        return creds

    def _host_id(self) -> str:
        """A stable id for this host, kept in the data dir (like Teleport's host_uuid)."""
        path = self.data_dir / "host" / "host_id"
        if path.exists():
            return path.read_text().strip()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        host_id = str(uuid.uuid4())
        path.write_text(host_id + "\n")
        return host_id

    async def _start_proxy(self, started: Started) -> None:
        from wardgate.proxy.service import ProxyService, ProxySettings

        cfg = self.cfg
        if self.auth is None:
            raise BadParameterError("proxy_service needs auth_service in the same process in this build")
        host, port = parse_addr(cfg.proxy_service.listen_addr, 3080)
        public = cfg.proxy_public_addr or f"{_bracket(_reachable_host(host))}:{port}"
        pub_host = public.rsplit(":", 1)[0].strip("[]")
        creds = await self._credentials(
            "proxy",
            node_name=cfg.nodename,
            addresses=_names(host, _reachable_host(host), pub_host, *_app_wildcards(pub_host)),
            ssh=False,
        )
        auth_host, auth_port = started.auth_addr.rsplit(":", 1)
        creds.identity.auth_server = started.auth_addr
        proxy = ProxyService(
            ProxySettings(
                listen_host=host,
                listen_port=port,
                public_addr=public,
                auth_host=auth_host.strip("[]"),
                auth_port=int(auth_port),
                recordings_dir=self.data_dir / "proxy" / "recordings",
                web_idle_timeout=cfg.proxy_service.web_idle_timeout,
            ),
            creds.identity,
        )
        bound = await proxy.start()
        self.proxy = proxy
        self._closers.insert(0, proxy)
        if port == 0:  # a test asked for any free port: the public address follows it
            public = f"{_bracket(_reachable_host(host))}:{bound[1]}"
            self.auth.cfg.public_addr = public
            self.auth.users.prefs.webauthn = webauthn_config(cfg, public)
        started.proxy_addr = public

    async def _start_node(self, started: Started) -> None:
        from wardgate.agent.node import NodeAgent, NodeSettings

        cfg = self.cfg
        w = cfg.wardgate
        tunnel = self.auth is None and bool(w.proxy_server)
        host, port = parse_addr(cfg.ssh_service.listen_addr, 3022)
        reach = _reachable_host(host)
        creds = await self._credentials(
            "node", node_name=cfg.nodename, addresses=[] if tunnel else _names(host, reach), ssh=True
        )
        auth_addr, alpn = self._auth_addr(started)
        agent = NodeAgent(
            NodeSettings(
                nodename=cfg.nodename,
                host_id=creds.host_id,
                cluster_name=creds.identity.cluster or cfg.cluster_name,
                auth_addr=auth_addr,
                auth_alpn=alpn,
                data_dir=self.data_dir / "node",
                listen_host=host,
                listen_port=port,
                public_addr="" if tunnel else f"{_bracket(reach)}:{port}",
                tunnel_proxy=w.proxy_server if tunnel else "",
                ssh_config=cfg.ssh_service,
            ),
            creds.identity,
            creds.ssh_key,
            creds.ssh_cert,
        )
        await agent.start()
        self.node = agent
        self._closers.insert(0, agent)
        started.ssh_addr = "" if tunnel else agent.service.node.spec.addr
        started.tunnel_to = w.proxy_server if tunnel else ""

    def _auth_addr(self, started: Started) -> tuple[str, str]:
        """(address, ALPN) where this process's services reach the auth API: in process, through
        the proxy (`ward-auth`), or an auth server."""
        w = self.cfg.wardgate
        if self.auth is not None:
            return started.auth_addr, ""
        return (w.proxy_server, "ward-auth") if w.proxy_server else (w.auth_server, "")

    async def _proxied(self, role: str, started: Started) -> tuple[HostCredentials, str, str, str]:
        """For a service the proxy hands connections to (in this process, or through the reverse
        tunnel it keeps to `proxy_server`): (credentials, auth address, auth ALPN, tunnel proxy)."""
        w = self.cfg.wardgate
        local_proxy = self.proxy is not None
        if not local_proxy and not w.proxy_server:
            raise BadParameterError(
                f"{role}_service needs a proxy: enable proxy_service here, or set wardgate.proxy_server"
            )
        creds = await self._credentials(role, node_name=self.cfg.nodename, addresses=[], ssh=False)
        auth_addr, alpn = self._auth_addr(started)
        return creds, auth_addr, alpn, "" if local_proxy else w.proxy_server

    async def _start_db(self, started: Started) -> None:
        from wardgate.agent.db.agent import DatabaseAgent, DatabaseAgentSettings

        cfg = self.cfg
        creds, auth_addr, alpn, tunnel_proxy = await self._proxied("db", started)
        agent = DatabaseAgent(
            DatabaseAgentSettings(
                nodename=cfg.nodename,
                host_id=creds.host_id,
                auth_addr=auth_addr,
                auth_alpn=alpn,
                tunnel_proxy=tunnel_proxy,
                databases=cfg.db_service.databases,
                selectors=[dict(s.labels) for s in cfg.db_service.resources],
            ),
            creds.identity,
        )
        if self.proxy is not None:
            self.proxy.db.local[creds.host_id] = agent.service
        await agent.start()
        self.db = agent
        self._closers.insert(0, agent)

    async def _start_app(self, started: Started) -> None:
        from wardgate.agent.app.agent import AppAgent, AppAgentSettings

        cfg = self.cfg
        creds, auth_addr, alpn, tunnel_proxy = await self._proxied("app", started)
        agent = AppAgent(
            AppAgentSettings(
                nodename=cfg.nodename,
                host_id=creds.host_id,
                auth_addr=auth_addr,
                auth_alpn=alpn,
                tunnel_proxy=tunnel_proxy,
                apps=cfg.app_service.apps,
                selectors=[dict(s.labels) for s in cfg.app_service.resources],
            ),
            creds.identity,
        )
        if self.proxy is not None:
            self.proxy.apps.local[creds.host_id] = agent.service
        await agent.start()
        self.app = agent
        self._closers.insert(0, agent)

    # ------------------------------------------------------------------ admin identity

    async def _write_admin_identity(self, path: Path, auth_addr: str) -> None:
        assert self.auth is not None
        key = generate_tls_key()
        certs = await self.auth.issue_host_certs(
            host_id=ADMIN_USER,
            node_name=ADMIN_USER,
            system_role="admin",
            tls_public_key=public_key_pem(key.public_key()),
            ttl=ADMIN_CERT_TTL,
        )
        IdentityFile(
            key_pem=private_key_pem(key),
            cert_pem=certs.tls_cert,
            ca_pems=[k.tls_cert_pem for k in self.auth.ca("host").spec.active_keys],
            auth_server=auth_addr,
            cluster=self.auth.cluster_name,
        ).save(path)

    async def _renew_admin(self, path: Path, auth_addr: str) -> None:
        while True:
            await asyncio.sleep(RENEW_EVERY.total_seconds())
            try:
                await self._write_admin_identity(path, auth_addr)
            except Exception:
                log.exception("renewing the admin identity failed; will retry")

    # ------------------------------------------------------------------ stop

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for c in self._closers:
            try:
                await c.close()  # type: ignore[attr-defined]
            except Exception:
                log.exception("closing %s failed", type(c).__name__)

    async def run_forever(self, on_started: object = None) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        try:
            started = await self.start()
            if callable(on_started):
                on_started(started)
            await stop.wait()
        finally:
            log.info("shutting down")
            await self.close()


def _reachable_host(host: str) -> str:
    """Where local clients should dial a listener bound to `host`."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _app_wildcards(public_host: str) -> list[str]:
    """Names apps get by default under the proxy's public host: `*.<host>` for a DNS name, and
    `*.localhost` for a loopback IP (apps then default to `<name>.localhost`)."""
    host = public_host.strip("[]").rstrip(".").lower()
    if not host or host.startswith("*."):
        return []
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return [f"*.{host}"]
    return ["localhost", "*.localhost"] if ip.is_loopback else []


def _names(*hosts: str) -> list[str]:
    """Addresses for a certificate: given hosts (not wildcards) plus this machine's name."""
    out = {h for h in hosts if h and h not in ("0.0.0.0", "::")}
    out.add(socket.gethostname())
    return sorted(out)


def webauthn_config(cfg: Config, public_addr: str) -> WebAuthnConfig | None:
    """The relying party for passkeys: configured, or the proxy's public host (WebAuthn refuses
    IP addresses, so a loopback proxy uses `localhost`); None when there is no name to use."""
    w = cfg.auth_service.authentication.webauthn
    host, port = parse_addr(public_addr, 3080) if public_addr else ("", 0)
    rp_id = w.rp_id
    if not rp_id and host:
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            rp_id = host
        else:
            rp_id = "localhost" if ip.is_loopback else ""
    if not rp_id:
        return None
    origins = list(w.origins)
    if not origins and port:
        origins = [f"https://{rp_id}:{port}"]
        if host and host != rp_id:
            origins.append(f"https://{_bracket(host)}:{port}")
    return WebAuthnConfig(rp_id=rp_id, rp_name=cfg.cluster_name or rp_id, origins=origins)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _has_data(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 0


def _write_private(path: Path, text: str) -> None:
    import os

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
