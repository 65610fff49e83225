"""`wardgate start`: run the services the config enables, in one process.

Like Teleport's lib/service: opens storage, starts auth (CAs on first start), serves the auth API,
writes the local administrator's identity file, and tells the operator what to do next.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from wardgate.api.identityfile import IdentityFile
from wardgate.audit.store import SQLiteAuditLog
from wardgate.auth.api import AuthAPI
from wardgate.auth.server import ADMIN_CERT_TTL, ADMIN_USER, AuthServer, AuthServerConfig
from wardgate.auth.users import AuthPreference
from wardgate.backend.sqlite import SQLiteBackend
from wardgate.config import Config, parse_addr
from wardgate.keys import generate_tls_key, private_key_pem, public_key_pem

log = logging.getLogger(__name__)
ADMIN_IDENTITY = "admin.identity"
BUILT_SERVICES = ("auth_service",)
"""Services this build can run; the others are accepted in config and reported as not yet available."""
RENEW_EVERY = timedelta(hours=12)


@dataclass
class Started:
    auth_addr: str
    admin_identity: Path
    cluster_name: str
    ca_pin: str
    first_start: bool
    services: list[str]
    unavailable: list[str]


class WardgateProcess:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.data_dir = Path(cfg.wardgate.data_dir)
        self.auth: AuthServer | None = None
        self.api: AuthAPI | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closers: list[object] = []

    async def start(self) -> Started:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        cfg = self.cfg
        unavailable = [s for s in cfg.enabled_services() if s not in BUILT_SERVICES]
        for name in unavailable:
            log.warning("%s is enabled in the config but is not part of this build yet; skipping it", name)
        if not cfg.auth_service.enabled:
            raise SystemExit(
                "auth_service is disabled: this build runs services only beside the auth service; "
                "enable auth_service in the config"
            )
        first_start = not _has_data(Path(cfg.storage_path))
        backend = SQLiteBackend(cfg.storage_path)
        audit = SQLiteAuditLog(cfg.audit_path)
        self._closers += [audit, backend]
        a = cfg.auth_service
        prefs = AuthPreference(
            second_factor=a.authentication.second_factor,
            password_min_length=a.authentication.password_min_length,
            max_attempts=a.authentication.lockout.max_attempts,
            lockout_duration=a.authentication.lockout.duration,
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
            addresses=[
                h for h in {host, public_host, socket.gethostname()} if h and h not in ("0.0.0.0", "::")
            ],
        )
        self.api = AuthAPI(self.auth)
        bound = await self.api.start(
            host, port, self.api.server_ssl_context(certs.tls_cert, private_key_pem(key))
        )
        self._closers.insert(0, self.api)
        auth_addr = f"{_bracket(public_host)}:{bound}"
        ident_path = self.data_dir / ADMIN_IDENTITY
        await self._write_admin_identity(ident_path, auth_addr)
        self._tasks.append(asyncio.create_task(self._renew_admin(ident_path, auth_addr)))
        status = self.auth.status()
        running = [s for s in cfg.enabled_services() if s in BUILT_SERVICES]
        return Started(
            auth_addr, ident_path, cfg.cluster_name, status["ca_pin"], first_start, running, unavailable
        )

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

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for c in self._closers:
            with contextlib.suppress(Exception):
                await c.close()  # type: ignore[attr-defined]

    async def run_forever(self, on_started: object = None) -> None:
        started = await self.start()
        if callable(on_started):
            on_started(started)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        try:
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


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _has_data(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 0
