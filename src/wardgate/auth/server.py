"""The auth service's logic: one object the API server (and in-process services) call.

Every public method takes the caller's Identity first and authorises it here, like Teleport's
ServerWithRoles: the HTTP layer only decodes requests and encodes answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from wardgate.api.cache import ResourceCache
from wardgate.api.events import ResourceEvent, ResourceEventType
from wardgate.api.resources import (
    App,
    AppService,
    CertAuthority,
    Database,
    DatabaseService,
    Lock,
    LockSpec,
    LockTarget,
    Node,
    Resource,
    Role,
    User,
    app_public_addr,
    resolve_kind,
)
from wardgate.audit.store import SQLiteAuditLog
from wardgate.auth import jwt
from wardgate.auth.access import check_ssh_access
from wardgate.auth.appsessions import AppSessionRecord, AppSessionStore
from wardgate.auth.ca import CertSigner, new_cert_authority
from wardgate.auth.certs import EXT_IMPERSONATED_BY, verify_tls_identity
from wardgate.auth.identity import Identity, RouteToApp, RouteToDatabase
from wardgate.auth.locks import find_lock, lock_decision
from wardgate.auth.rbac import BUILTIN_ROLES, AccessChecker, AccessDecision, role_problems
from wardgate.auth.storage import ResourceStore
from wardgate.auth.tokens import TokenManager
from wardgate.auth.users import AuthPreference, Invite, UserManager
from wardgate.auth.websessions import PREFIX as WEB_SESSION_PREFIX
from wardgate.auth.websessions import WebSessionRecord, WebSessionStore, digest
from wardgate.backend.base import Backend
from wardgate.errors import (
    AccessDeniedError,
    AlreadyExistsError,
    AuthenticationError,
    BadParameterError,
    NotFoundError,
    WardgateError,
)
from wardgate.keys import (
    generate_ssh_key,
    generate_tls_key,
    load_x509_pem_list,
    private_key_pem,
    public_key_pem,
    ssh_fingerprint,
    ssh_private_key_openssh,
    ssh_public_key_line,
    tls_ca_pin,
)

log = logging.getLogger(__name__)

CACHED_KINDS = ("role", "user", "lock", "cert_authority", "node", "db", "db_service", "app", "app_service")
CA_TYPES = ("user", "host", "db", "jwt")
HOST_CERT_TTL = timedelta(days=30)
ADMIN_CERT_TTL = timedelta(days=7)
IMPERSONATION_TTL = timedelta(minutes=2)
"""Lifetime of the user certificate a proxy gets to log in to an agentless node for a user: long
enough for one SSH handshake (sshd checks it only then), short enough to be useless if leaked."""
AGENTLESS_HOST_CERT_TTL = timedelta(hours=1)
"""Lifetime of the host certificate a proxy presents for an agentless node (renewed before)."""
ADMIN_USER = "admin"
SESSION_MFA_TTL = timedelta(minutes=1)
"""Lifetime of a per-session MFA certificate: one connection's worth (nodes check it at connect)."""

# What each system role may do through the API (kind -> verbs). `admin` may do everything.
SERVICE_RULES: dict[str, dict[str, set[str]]] = {
    "proxy": {
        "role": {"list", "read"},
        "user": {"list", "read"},
        "lock": {"list", "read"},
        "cert_authority": {"list", "read"},
        "node": {"list", "read", "create", "update"},
        "event": {"create", "list", "read"},
        "session": {"create", "list", "read"},
        "db": {"list", "read"},
        "db_service": {"list", "read"},
        "app": {"list", "read"},
        "app_service": {"list", "read"},
    },
    "node": {
        "role": {"list", "read"},
        "user": {"list", "read"},
        "lock": {"list", "read"},
        "cert_authority": {"list", "read"},
        "node": {"list", "read", "create", "update"},
        "event": {"create"},
        "session": {"create"},
    },
}
for _svc in ("app", "db", "kube", "desktop"):
    SERVICE_RULES[_svc] = {
        "role": {"list", "read"},
        "user": {"list", "read"},
        "lock": {"list", "read"},
        "cert_authority": {"list", "read"},
        "event": {"create"},
        "session": {"create"},
    }
SERVICE_RULES["db"].update({"db": {"list", "read", "create", "update"}, "db_service": {"create", "update"}})
SERVICE_RULES["app"].update(
    {"app": {"list", "read", "create", "update"}, "app_service": {"create", "update"}}
)
HEARTBEAT_KINDS: dict[str, tuple[str, str]] = {
    "db": ("db", "database"),
    "db_service": ("db", "database"),
    "app": ("app", "app"),
    "app_service": ("app", "app"),
}
"""Kinds agents register with heartbeats -> (the system role that may, what the kind names)."""
APP_JWT_TTL = timedelta(minutes=5)
"""Longest life of an app's JWT: the app service asks again for every request burst."""
DB_CLIENT_CERT_TTL = timedelta(hours=1)
"""Lifetime of the certificate a database service logs in to a database with (as one db user)."""


@dataclass
class UserCerts:
    ssh_cert: str
    tls_cert: str
    identity: Identity
    ttl: timedelta


@dataclass
class HostCerts:
    tls_cert: str
    ssh_cert: str
    host_id: str
    identity: Identity


@dataclass
class AuthServerConfig:
    cluster_name: str
    prefs: AuthPreference = field(default_factory=AuthPreference)
    cert_ttl: timedelta = timedelta(hours=12)
    static_tokens: Sequence[str] = ()
    public_addr: str = ""
    recordings_dir: Path | None = None
    """Where uploaded session recordings (`<sid>.cast.gz`) are kept."""


class AuthServer:
    def __init__(
        self,
        cfg: AuthServerConfig,
        backend: Backend,
        audit: SQLiteAuditLog,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.cluster_name = cfg.cluster_name
        self.backend = backend
        self.store = ResourceStore(backend)
        self.audit = audit
        self.clock = clock
        self.users = UserManager(self.store, audit, cfg.prefs, cluster_name=cfg.cluster_name, clock=clock)
        self.tokens = TokenManager(self.store, audit, static=cfg.static_tokens, clock=clock)
        self.web_sessions = WebSessionStore(self.store)
        self.app_sessions = AppSessionStore(self.store)
        self.cache = ResourceCache(CACHED_KINDS)
        self._signers: dict[str, CertSigner] = {}
        self._cache_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Create the cluster's CAs on first start, then fill the cache."""
        for ca_type in CA_TYPES:
            name = ca_type
            if await self.store.find("cert_authority", name) is None:
                ca = new_cert_authority(ca_type, self.cluster_name)
                ca.metadata.name = name
                with contextlib.suppress(AlreadyExistsError):  # another auth process won the race
                    await self.store.create(ca)
                    log.info("generated the %s certificate authority", ca_type)
        for ca_type in CA_TYPES:
            ca = await self.store.get("cert_authority", ca_type)
            if ca.spec.cluster_name != self.cluster_name:  # type: ignore[attr-defined]
                raise BadParameterError(
                    f"the data directory belongs to cluster {ca.spec.cluster_name!r}, "  # type: ignore[attr-defined]
                    f"but the config says {self.cluster_name!r}: fix cluster_name or use another data_dir"
                )
            if ca_type != "jwt":
                self._signers[ca_type] = CertSigner(ca)  # type: ignore[arg-type]
        self._cache_task = asyncio.create_task(
            self.cache.run(lambda: self.store.watch(CACHED_KINDS)), name="auth-cache"
        )
        await asyncio.wait_for(self.cache.ready.wait(), 30)

    async def close(self) -> None:
        if self._cache_task:
            self._cache_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._cache_task

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    # ------------------------------------------------------------------ trust

    def signer(self, ca_type: str) -> CertSigner:
        return self._signers[ca_type]

    def ca(self, ca_type: str) -> CertAuthority:
        ca = self.cache.get("cert_authority", ca_type)
        if ca is None:
            raise NotFoundError(f"{ca_type} CA not found")
        return ca  # type: ignore[return-value]

    def ca_certs(self, ca_type: str) -> list[x509.Certificate]:
        ca = self.ca(ca_type)
        pems = [k.tls_cert_pem for k in (*ca.spec.active_keys, *ca.spec.additional_trusted_keys)]
        return load_x509_pem_list("".join(pems))

    def ca_ssh_keys(self, ca_type: str) -> list[str]:
        ca = self.ca(ca_type)
        return [
            k.ssh_public_key
            for k in (*ca.spec.active_keys, *ca.spec.additional_trusted_keys)
            if k.ssh_public_key
        ]

    def identify(self, cert: x509.Certificate) -> Identity:
        """Who presented this client certificate: a user (user CA) or a service (host CA)."""
        now = self.now()
        try:
            ident = verify_tls_identity(cert, self.ca_certs("user"), now=now)
        except AuthenticationError as user_err:
            try:
                ident = verify_tls_identity(cert, self.ca_certs("host"), now=now)
            except AuthenticationError:
                raise user_err from None
            if not ident.system_role:
                raise AuthenticationError("host certificate carries no system role") from None
            return ident
        if ident.system_role:
            raise AuthenticationError("a user certificate cannot claim a system role")
        return ident

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cluster_name": self.cluster_name, "cas": []}
        for ca_type in CA_TYPES:
            ca = self.ca(ca_type)
            kp = ca.spec.active_keys[0]
            row: dict[str, Any] = {"type": ca_type}
            if kp.ssh_public_key:
                row["ssh_fingerprint"] = ssh_fingerprint(kp.ssh_public_key)
            if kp.tls_cert_pem:
                row["tls_pin"] = tls_ca_pin(load_x509_pem_list(kp.tls_cert_pem)[0])
            out["cas"].append(row)
        out["ca_pin"] = tls_ca_pin(self.ca_certs("host")[0])
        return out

    # ------------------------------------------------------------------ authorisation

    def checker_for(self, ident: Identity) -> AccessChecker:
        return AccessChecker.for_identity(ident, self.cache.as_dict("role"))  # type: ignore[arg-type]

    def check_locks(self, ident: Identity, *, node: str = "", login: str = "", app: str = "") -> None:
        """Raise LockedError when a lock applies: on the user, a role, the service's host, and the
        node/login/app being reached when given."""
        locks = self.cache.list("lock")
        lock = find_lock(
            locks,  # type: ignore[arg-type]
            user=ident.user if not ident.system_role else "",
            roles=ident.roles,
            node=node or (ident.host_id if ident.system_role else ""),
            login=login,
            app=app,
            now=self.now(),
        )
        if lock is not None:
            lock_decision(lock).raise_if_denied()

    def authorize(self, ident: Identity, kind: str, verb: str) -> None:
        """Raise AccessDeniedError unless the caller may do `verb` on `kind`."""
        if ident.system_role == "admin":
            return
        if ident.system_role:
            if verb in SERVICE_RULES.get(ident.system_role, {}).get(kind, set()):
                self.check_locks(ident)
                return
            raise AccessDeniedError(f"the {ident.system_role} service may not {verb} {kind}")
        self.check_locks(ident)
        user = self.cache.get("user", ident.user)
        if user is None:
            raise AccessDeniedError(f"user {ident.user} no longer exists")
        self.checker_for(ident).check_rule(kind, verb).raise_if_denied()

    # ------------------------------------------------------------------ login and certificates

    async def login(
        self,
        username: str,
        password: str,
        otp: str,
        *,
        ssh_public_key: str = "",
        tls_public_key: str = "",
        ttl: timedelta | None = None,
        remote_addr: str = "",
    ) -> UserCerts:
        user = await self.users.authenticate(username, password, otp, remote_addr=remote_addr)
        # No mfa_verified here: login-time MFA must not satisfy require_session_mfa, which means
        # a fresh second factor for each session (a per-session certificate).
        return await self.issue_user_certs(
            user,
            ssh_public_key=ssh_public_key,
            tls_public_key=tls_public_key,
            ttl=ttl,
            by=username,
        )

    async def issue_user_certs(
        self,
        user: User,
        *,
        ssh_public_key: str = "",
        tls_public_key: str = "",
        ttl: timedelta | None = None,
        route_to_db: RouteToDatabase | None = None,
        route_to_app: RouteToApp | None = None,
        kube_cluster: str = "",
        mfa_device: str = "",
        by: str = "",
    ) -> UserCerts:
        """Sign the user's keys with what their roles grant; TTL capped by max_session_ttl."""
        if not ssh_public_key and not tls_public_key:
            raise BadParameterError("send at least one public key to sign (ssh_public_key or tls_public_key)")
        base = Identity(user=user.name, roles=tuple(user.spec.roles), traits=dict(user.spec.traits))
        self.check_locks(base)
        checker = self.checker_for(base)
        max_ttl = checker.options.max_session_ttl
        ttl = min(ttl or self.cfg.cert_ttl, max_ttl)
        if ttl <= timedelta(0):
            raise BadParameterError("certificate TTL must be positive")
        now = self.now()
        ident = replace(
            base,
            logins=tuple(checker.logins()),
            cluster=self.cluster_name,
            route_to_cluster=self.cluster_name,
            route_to_db=route_to_db,
            route_to_app=route_to_app,
            kube_cluster=kube_cluster,
            mfa_verified=mfa_device,
            expires=now + ttl,
        )
        signer = self.signer("user")
        ssh_cert = tls_cert = ""
        if ssh_public_key:
            ssh_cert = signer.sign_ssh_user_cert(
                ssh_public_key,
                ident,
                ttl=ttl,
                permit_pty=True,
                permit_port_forwarding=checker.options.port_forwarding,
                permit_agent_forwarding=checker.options.forward_agent,
                now=now,
            )
        if tls_public_key:
            tls_cert = signer.sign_tls_cert(tls_public_key, ident, ttl=ttl, now=now)
        await self.audit.emit(
            "cert.create",
            user=by or user.name,
            identity_user=user.name,
            roles=list(ident.roles),
            logins=list(ident.logins),
            ttl=int(ttl.total_seconds()),
            cert_type="user",
        )
        return UserCerts(ssh_cert, tls_cert, ident, ttl)

    async def issue_host_certs(
        self,
        *,
        host_id: str,
        node_name: str,
        system_role: str,
        ssh_public_key: str = "",
        tls_public_key: str = "",
        addresses: Sequence[str] = (),
        ttl: timedelta = HOST_CERT_TTL,
        by: str = "",
    ) -> HostCerts:
        dns, ips = _split_addresses(
            [node_name, host_id, f"{host_id}.{self.cluster_name}", "localhost", *addresses]
        )
        ips = sorted({*ips, "127.0.0.1", "::1"})
        principals = tuple(
            dict.fromkeys(
                [
                    host_id,
                    f"{host_id}.{self.cluster_name}",
                    node_name,
                    f"{node_name}.{self.cluster_name}",
                    *addresses,
                ]
            )
        )
        now = self.now()
        ident = Identity(
            user=host_id,
            cluster=self.cluster_name,
            system_role=system_role,
            host_id=host_id,
            principals=principals,
            expires=now + ttl,
        )
        signer = self.signer("host")
        tls_cert = ssh_cert = ""
        if tls_public_key:
            tls_cert = signer.sign_tls_cert(
                tls_public_key, ident, ttl=ttl, now=now, dns_names=dns, ip_addresses=ips
            )
        if ssh_public_key:
            ssh_cert = signer.sign_ssh_host_cert(
                ssh_public_key,
                host_id=host_id,
                node_name=node_name,
                cluster=self.cluster_name,
                system_role=system_role,
                extra_principals=[f"{node_name}.{self.cluster_name}", *addresses],
                ttl=ttl,
                now=now,
            )
        await self.audit.emit(
            "cert.create",
            user=by or host_id,
            cert_type="host",
            host_id=host_id,
            role=system_role,
            principals=list(principals),
        )
        return HostCerts(tls_cert, ssh_cert, host_id, ident)

    async def join(
        self,
        token: str,
        *,
        system_role: str,
        node_name: str,
        host_id: str = "",
        ssh_public_key: str = "",
        tls_public_key: str = "",
        addresses: Sequence[str] = (),
        remote_addr: str = "",
    ) -> HostCerts:
        """Exchange a join token for host certificates."""
        await self.tokens.validate(token, system_role, host=node_name, remote_addr=remote_addr)
        host_id = host_id or secrets.token_hex(8)
        certs = await self.issue_host_certs(
            host_id=host_id,
            node_name=node_name,
            system_role=system_role,
            ssh_public_key=ssh_public_key,
            tls_public_key=tls_public_key,
            addresses=addresses,
            by=node_name,
        )
        await self.audit.emit(
            "join", user=node_name, host_id=host_id, role=system_role, remote_addr=remote_addr
        )
        return certs

    async def sign_for(
        self,
        caller: Identity,
        *,
        user: str,
        ssh_public_key: str = "",
        tls_public_key: str = "",
        ttl: timedelta | None = None,
    ) -> UserCerts:
        """`wardctl auth sign --user`: an identity for a bot, by an admin or editor."""
        self.authorize(caller, "user", "update")
        target = await self.users.get(user)
        return await self.issue_user_certs(
            target, ssh_public_key=ssh_public_key, tls_public_key=tls_public_key, ttl=ttl, by=caller.user
        )

    async def sign_host(
        self,
        caller: Identity,
        *,
        host_id: str,
        node_name: str,
        ssh_public_key: str = "",
        tls_public_key: str = "",
        addresses: Sequence[str] = (),
        ttl: timedelta = HOST_CERT_TTL,
        system_role: str = "node",
    ) -> HostCerts:
        """`wardctl auth sign --host`: host certs for an OpenSSH (agentless) server."""
        self.authorize(caller, "cert_authority", "create")
        return await self.issue_host_certs(
            host_id=host_id,
            node_name=node_name,
            system_role=system_role,
            ssh_public_key=ssh_public_key,
            tls_public_key=tls_public_key,
            addresses=addresses,
            ttl=ttl,
            by=caller.user,
        )

    # ------------------------------------------------------------------ web sessions (proxy only)

    async def create_web_session(
        self,
        caller: Identity,
        *,
        user: str = "",
        password: str = "",
        otp: str = "",
        webauthn: dict[str, Any] | None = None,
        remote_addr: str = "",
    ) -> tuple[WebSessionRecord, str]:
        """Sign a browser in: password + second factor, or a passkey alone (passwordless)."""
        self._require_proxy(caller, "create web sessions")
        if webauthn is not None and not user and not password:
            found = await self.users.authenticate_passwordless(webauthn, remote_addr=remote_addr)
            return await self._new_web_session(found, method="passwordless")
        found = await self.users.authenticate(
            user, password, otp, webauthn_response=webauthn, remote_addr=remote_addr
        )
        return await self._new_web_session(found, method="local")

    async def register_web_session(
        self,
        caller: Identity,
        token: str,
        *,
        password: str,
        otp: str = "",
        webauthn: dict[str, Any] | None = None,
        device_name: str = "",
    ) -> tuple[WebSessionRecord, str]:
        """Accept an invitation from the browser and sign the new user in."""
        self._require_proxy(caller, "register users from the web")
        user = await self.users.complete_registration(
            token, password, otp, webauthn_response=webauthn, device_name=device_name
        )
        return await self._new_web_session(user, method="invite")

    async def _new_web_session(
        self, user: User, *, method: str, expires: datetime | None = None
    ) -> tuple[WebSessionRecord, str]:
        now = self.now()
        ssh_key, tls_key = generate_ssh_key(), generate_tls_key()
        certs = await self.issue_user_certs(
            user,
            ssh_public_key=ssh_public_key_line(ssh_key),
            tls_public_key=public_key_pem(tls_key),
            ttl=(expires - now) if expires else None,
            by=user.name,
        )
        session_id, token = WebSessionStore.new_secrets()
        assert certs.identity.expires is not None
        ends = min(certs.identity.expires, expires) if expires else certs.identity.expires
        rec = WebSessionRecord(
            id=session_id,
            user=user.name,
            token_hash=digest(token),
            created=now,
            expires=ends,
            ssh_key=ssh_private_key_openssh(ssh_key),
            ssh_cert=certs.ssh_cert,
            tls_key=private_key_pem(tls_key),
            tls_cert=certs.tls_cert,
            login_method=method,
        )
        await self.web_sessions.put(rec)
        await self.audit.emit(
            "web.session.create", user=user.name, method=method, expires=rec.expires.isoformat()
        )
        return rec, token

    async def get_web_session(self, caller: Identity, session_id: str) -> WebSessionRecord:
        self._require_proxy(caller, "read web sessions")
        return await self.web_sessions.get(session_id, now=self.now())

    async def delete_web_session(self, caller: Identity, session_id: str) -> None:
        """Sign-out: the web session and every app session made from it."""
        self._require_proxy(caller, "end web sessions")
        try:
            rec = await self.web_sessions.get(session_id, now=self.now())
        except AuthenticationError:
            await self.app_sessions.delete_for_web_session(digest(session_id))
            return  # already over: signing out twice is not an error
        await self.web_sessions.delete(session_id)
        await self.app_sessions.delete_for_web_session(digest(session_id))
        await self.audit.emit("user.logout", user=rec.user, method="web")

    async def renew_web_session(self, caller: Identity, session_id: str) -> tuple[WebSessionRecord, str]:
        """A new id, token and certificates (roles re-read); the absolute expiry stays."""
        self._require_proxy(caller, "renew web sessions")
        old = await self.web_sessions.get(session_id, now=self.now())
        user = await self.users.get(old.user)
        rec, token = await self._new_web_session(user, method=old.login_method, expires=old.expires)
        # Same sign-in, same absolute expiry: its app sessions carry on, now ended by the new id
        # (moved before the old one goes, so no app session is ever seen without its web session).
        await self.app_sessions.move_web_session(digest(session_id), digest(rec.id))
        await self.web_sessions.delete(session_id)
        return rec, token

    # ------------------------------------------------------------------ a user's own second factors

    def self_user(self, caller: Identity) -> str:
        if caller.system_role or not caller.user:
            raise AccessDeniedError("only a user can manage their own second factors")
        self.check_locks(caller)
        return caller.user

    async def session_mfa_certs(
        self,
        caller: Identity,
        *,
        ssh_public_key: str = "",
        tls_public_key: str = "",
        otp: str = "",
        webauthn: dict[str, Any] | None = None,
    ) -> UserCerts:
        """A one-minute certificate marked MFA-verified, after a fresh second factor, so roles
        with `require_session_mfa` let exactly one new session through."""
        name = self.self_user(caller)
        device = await self.users.verify_mfa(name, otp_code=otp, webauthn_response=webauthn)
        user = await self.users.get(name)
        return await self.issue_user_certs(
            user,
            ssh_public_key=ssh_public_key,
            tls_public_key=tls_public_key,
            ttl=SESSION_MFA_TTL,
            mfa_device=device,
            by=name,
        )

    # ------------------------------------------------------------------ agentless nodes (proxy only)

    def _require_proxy(self, caller: Identity, what: str) -> None:
        """Only the proxy terminates SSH for agentless nodes; not even an admin may ask for this."""
        if caller.system_role != "proxy":
            who = f"the {caller.system_role} service" if caller.system_role else f"user {caller.user}"
            raise AccessDeniedError(f"only a proxy may {what}, not {who}")
        self.check_locks(caller)

    def _agentless_node(self, name: str) -> Node:
        node = self.cache.get("node", name)
        if not isinstance(node, Node):
            raise NotFoundError(f'node "{name}" not found')
        if not node.spec.agentless:
            raise AccessDeniedError(
                f'node "{name}" runs a Wardgate agent, which records its own sessions: '
                "the proxy only terminates SSH for agentless nodes"
            )
        return node

    async def sign_agentless_host(
        self, caller: Identity, *, node: str, ssh_public_key: str, ttl: timedelta = AGENTLESS_HOST_CERT_TTL
    ) -> tuple[str, list[str], datetime]:
        """A host certificate for the proxy's key, valid for an agentless node's names, so the
        user's OpenSSH (which trusts the host CA for `*.<cluster>`) accepts the proxy as that node
        while it records the session. Returns (certificate line, principals, expiry)."""
        self._require_proxy(caller, "present an agentless node's host certificate")
        if not ssh_public_key:
            raise BadParameterError("ssh_public_key: send the public key to certify")
        n = self._agentless_node(node)
        names = [n.name, n.spec.host_id, n.spec.hostname]
        principals = [
            p for p in dict.fromkeys([*names, *(f"{x}.{self.cluster_name}" for x in names if x)]) if p
        ]
        now = self.now()
        ttl = min(ttl, AGENTLESS_HOST_CERT_TTL)
        cert = self.signer("host").sign_ssh_host_cert(
            ssh_public_key,
            host_id=n.spec.host_id or n.name,
            node_name=n.name,
            cluster=self.cluster_name,
            system_role="proxy",
            extra_principals=principals,
            ttl=ttl,
            now=now,
        )
        await self.audit.emit(
            "cert.create",
            user=caller.host_id,
            cert_type="host",
            host_id=n.spec.host_id or n.name,
            role="proxy",
            principals=principals,
            node=n.name,
            agentless=True,
            ttl=int(ttl.total_seconds()),
        )
        return cert, principals, now + ttl

    async def impersonate_ssh(
        self,
        caller: Identity,
        *,
        user: str,
        login: str,
        node: str,
        ssh_public_key: str,
        mfa_verified: str = "",
    ) -> tuple[str, Identity]:
        """A user certificate for one login on one agentless node, issued to the proxy that
        terminates the user's SSH connection so it can log in to sshd on the user's behalf.

        The proxy has already authorised the user; this decides again from the user as stored
        (exists, roles, traits, locks), so a proxy cannot mint access the user does not have.
        Principals are that login only, the TTL is `IMPERSONATION_TTL`, and the certificate
        names the proxy in `impersonated-by@wardgate`. `mfa_verified` is the proxy's word that
        the user's own certificate carried it (for roles with `require_session_mfa`)."""
        self._require_proxy(caller, "log in to nodes on a user's behalf")
        if not login or not ssh_public_key:
            raise BadParameterError("login and ssh_public_key are required")
        n = self._agentless_node(node)
        u = self.cache.get("user", user)
        if not isinstance(u, User):
            raise AccessDeniedError(f"user {user} no longer exists")
        now = self.now()
        base = Identity(user=u.name, roles=tuple(u.spec.roles), traits=dict(u.spec.traits))
        checker = self.checker_for(base)
        ident = replace(
            base,
            logins=tuple(checker.logins()),
            cluster=self.cluster_name,
            route_to_cluster=self.cluster_name,
            mfa_verified=mfa_verified,
            expires=now + IMPERSONATION_TTL,
        )
        decision, _ = check_ssh_access(
            ident,
            n,
            login,
            roles=self.cache.as_dict("role"),  # type: ignore[arg-type]
            locks=self.cache.list("lock"),  # type: ignore[arg-type]
            node_names=[x for x in (n.name, n.spec.hostname, n.spec.host_id) if x],
            now=now,
        )
        fields = {
            "identity_user": u.name,
            "impersonator": caller.host_id,
            "logins": [login],
            "node": n.name,
            "cert_type": "user",
        }
        if not decision.allowed:
            await self.audit.emit("cert.create", user=u.name, success=False, **fields, error=decision.reason)
            decision.raise_if_denied()
        ident = replace(ident, logins=(login,))
        cert = self.signer("user").sign_ssh_user_cert(
            ssh_public_key,
            ident,
            ttl=IMPERSONATION_TTL,
            permit_pty=True,
            permit_port_forwarding=checker.options.port_forwarding,
            permit_agent_forwarding=False,
            extensions={EXT_IMPERSONATED_BY: caller.host_id},
            now=now,
        )
        await self.audit.emit(
            "cert.create", user=u.name, **fields, ttl=int(IMPERSONATION_TTL.total_seconds())
        )
        return cert, ident

    # ------------------------------------------------------------------ users, tokens, locks

    async def create_user(
        self, caller: Identity, name: str, *, roles: Sequence[str], traits: dict[str, list[str]]
    ) -> tuple[User, Invite]:
        self.authorize(caller, "user", "create")
        missing = [r for r in roles if r not in BUILTIN_ROLES and self.cache.get("role", r) is None]
        if missing:
            raise BadParameterError(
                f"role(s) {', '.join(missing)} do not exist: create them first or fix the name"
            )
        if not roles:
            raise BadParameterError("a user needs at least one role (e.g. --roles=access)")
        return await self.users.create(name, roles=list(roles), traits=traits, created_by=caller.user)

    async def reset_user(self, caller: Identity, name: str) -> Invite:
        self.authorize(caller, "user", "update")
        invite = await self.users.reset(name, by=caller.user)
        await self.web_sessions.delete_user(name)
        await self.app_sessions.delete_user(name)
        return invite

    async def create_token(
        self, caller: Identity, roles: Sequence[str], ttl: timedelta
    ) -> tuple[str, Resource]:
        self.authorize(caller, "token", "create")
        return await self.tokens.create(roles, ttl, by=caller.user)

    async def create_lock(
        self, caller: Identity, target: LockTarget, *, ttl: timedelta | None, message: str
    ) -> Lock:
        self.authorize(caller, "lock", "create")
        now = self.now()
        name = secrets.token_hex(8)
        lock = Lock.new(
            name,
            LockSpec(target=target, message=message, created_by=caller.user, created=now),
            expires=now + ttl if ttl else None,
        )
        lock = await self.store.create(lock)
        self.cache.apply(
            ResourceEvent(ResourceEventType.PUT, "lock", name, lock.metadata.revision or 0, lock)
        )
        await self.audit.emit(
            "lock.create",
            user=caller.user,
            name=name,
            target=target.model_dump(exclude_defaults=True),
            message=message,
            expires=lock.metadata.expires.isoformat() if lock.metadata.expires else None,
        )
        return lock

    # ------------------------------------------------------------------ generic resources

    async def get_resource(self, caller: Identity, kind: str, name: str) -> Resource:
        kind = resolve_kind(kind)
        self.authorize(caller, kind, "read")
        if kind == "role" and name in BUILTIN_ROLES and await self.store.find("role", name) is None:
            return BUILTIN_ROLES[name]
        return (await self.store.get(kind, name)).without_secrets()

    async def list_resources(self, caller: Identity, kind: str) -> list[Resource]:
        kind = resolve_kind(kind)
        self.authorize(caller, kind, "list")
        items = [r.without_secrets() for r in await self.store.list(kind)]
        if kind == "role":
            stored = {r.name for r in items}
            items += [r for n, r in BUILTIN_ROLES.items() if n not in stored]
            items.sort(key=lambda r: r.name)
        return items

    async def put_resource(self, caller: Identity, res: Resource, *, force: bool = False) -> Resource:
        """Create (or with force, overwrite) a resource from YAML."""
        kind = res.kind
        if kind in ("cert_authority",):
            raise BadParameterError("certificate authorities are managed by the auth service, not by create")
        exists = await self.store.find(kind, res.name) is not None
        verb = "update" if exists else "create"
        self.authorize(caller, kind, verb)
        if exists and not force:
            raise AlreadyExistsError(f'{kind} "{res.name}" already exists: use --force to overwrite')
        if kind == "user":
            self._check_roles_exist(res.spec.roles)  # type: ignore[attr-defined]
        if kind == "role":
            problems = role_problems(res)  # type: ignore[arg-type]
            if problems:
                raise BadParameterError(f'role "{res.name}" is invalid: ' + "; ".join(problems))
        if kind == "token":
            raise BadParameterError(
                "create tokens with `wardctl tokens add` so the secret is generated for you"
            )
        res = res.model_copy(deep=True)
        res.metadata.revision = None
        try:
            out = await (self.store.put(res) if exists else self.store.create(res))
        except Exception as exc:
            await self.audit.emit(
                f"{_event_kind(kind)}.{verb}",
                user=caller.user,
                success=False,
                name=res.name,
                kind=kind,
                error=str(exc),
            )
            raise
        self.cache.apply(
            ResourceEvent(ResourceEventType.PUT, kind, out.name, out.metadata.revision or 0, out)
        )
        await self.audit.emit(f"{_event_kind(kind)}.{verb}", user=caller.user, name=res.name, kind=kind)
        return out.without_secrets()

    def _check_roles_exist(self, roles: Sequence[str]) -> None:
        missing = [r for r in roles if r not in BUILTIN_ROLES and self.cache.get("role", r) is None]
        if missing:
            raise BadParameterError(f"role(s) {', '.join(missing)} do not exist")

    async def delete_resource(self, caller: Identity, kind: str, name: str) -> None:
        kind = resolve_kind(kind)
        self.authorize(caller, kind, "delete")
        if kind == "cert_authority":
            raise BadParameterError("certificate authorities cannot be deleted (rotation arrives later)")
        if kind == "user":
            await self.users.delete(name, by=caller.user)
            await self.web_sessions.delete_user(name)
            await self.app_sessions.delete_user(name)
        elif kind == "token":
            await self.tokens.delete(name, by=caller.user)
        else:
            await self.store.delete(kind, name)
            await self.audit.emit(f"{_event_kind(kind)}.delete", user=caller.user, name=name, kind=kind)
        self.cache.apply(ResourceEvent(ResourceEventType.DELETE, kind, name, 1 << 62))

    async def upsert_node(self, caller: Identity, node: Node) -> Node:
        """Heartbeat: a node registers or renews itself (expiring unless renewed)."""
        self.authorize(caller, "node", "update")
        if caller.system_role == "node" and caller.host_id != node.spec.host_id:
            raise AccessDeniedError("a node may only heartbeat itself")
        existing = self.cache.get("node", node.name)
        if (
            isinstance(existing, Node)
            and existing.spec.host_id
            and existing.spec.host_id != node.spec.host_id
            and not existing.is_expired(self.now())
        ):
            raise AlreadyExistsError(
                f'another node named "{node.name}" is registered (host id {existing.spec.host_id}): '
                "give this one a different nodename"
            )
        node = node.model_copy(deep=True)
        node.metadata.revision = None
        return await self.store.put(node)

    async def upsert_heartbeat(self, caller: Identity, res: Resource) -> Resource:
        """An agent service registers itself (`db_service`, `app_service`, named by its host id) or
        a resource from its config (`db`, `app`, with `spec.host_id` = its host id)."""
        if not isinstance(res, Database | DatabaseService | App | AppService):
            raise BadParameterError(
                f"cannot heartbeat a {res.kind}: only db, db_service, app and app_service"
            )
        role, noun = HEARTBEAT_KINDS[res.kind]
        self.authorize(caller, res.kind, "update")
        host_id = res.name if isinstance(res, DatabaseService | AppService) else res.spec.host_id
        if caller.system_role == role and caller.host_id != host_id:
            article = "an" if noun[0] in "aeiou" else "a"
            raise AccessDeniedError(f"{article} {noun} service may only register itself and its own {noun}s")
        existing = self.cache.get(res.kind, res.name)
        if (
            isinstance(existing, Database | App)
            and existing.spec.host_id != host_id
            and (not existing.spec.host_id or not existing.is_expired(self.now()))
        ):
            raise AlreadyExistsError(
                f'{noun} "{res.name}" is already registered by another service or with wardctl: '
                "rename one of them"
            )
        res = res.model_copy(deep=True)
        res.metadata.revision = None
        out = await self.store.put(res)
        # Known at once to calls that check who serves what (app sessions), not a watch hop later.
        self.cache.apply(
            ResourceEvent(ResourceEventType.PUT, out.kind, out.name, out.metadata.revision or 0, out)
        )
        return out

    def live_db_services(self) -> list[DatabaseService]:
        now = self.now()
        return [s for s in self.cache.list("db_service") if not s.is_expired(now)]  # type: ignore[misc]

    def serving(self, db: Database) -> list[str]:
        """Host ids of live database services that serve `db`."""
        out = []
        for svc in self.live_db_services():
            if db.name in svc.spec.databases:
                out.append(svc.name)
        return out

    def visible_databases(self, caller: Identity) -> list[tuple[Database, list[str]]]:
        """Databases (served right now) the caller's roles let them see, with db-user hints."""
        self.check_locks(caller)
        checker = self.checker_for(caller)
        out = []
        for db in self.cache.list("db"):
            assert isinstance(db, Database)
            if db.is_expired(self.now()) or not self.serving(db):
                continue
            if not checker.can_see_db(db.metadata.labels):
                continue
            out.append((db, checker.db_users()))
        out.sort(key=lambda pair: pair[0].name)
        return out

    async def issue_db_cert(
        self,
        caller: Identity,
        *,
        db: str,
        db_user: str,
        db_name: str = "",
        tls_public_key: str,
        otp: str = "",
        webauthn: dict[str, Any] | None = None,
    ) -> UserCerts:
        """`ward db login`: a certificate routed to one database as one db user, after the roles
        say yes (the database service decides again on every connection)."""
        name = self.self_user(caller)
        found = self.cache.get("db", db)
        if not isinstance(found, Database) or found.is_expired(self.now()):
            raise NotFoundError(f'database "{db}" not found: `ward db ls` lists the ones you can reach')
        if not db_user:
            raise BadParameterError("say which database user to connect as: --db-user NAME")
        checker = self.checker_for(caller)
        if not checker.can_see_db(found.metadata.labels):
            raise NotFoundError(f'database "{db}" not found: `ward db ls` lists the ones you can reach')
        checker.check_db(found.metadata.labels, db_user, db_name, name=db).raise_if_denied()
        user = await self.users.get(name)
        route = RouteToDatabase(
            service_name=db, protocol=found.spec.protocol, username=db_user, database=db_name
        )
        ttl = (caller.expires - self.now()) if caller.expires else None
        device = caller.mfa_verified
        if checker.options.require_session_mfa and not device:
            if not otp and webauthn is None:
                raise AccessDeniedError(
                    "your roles require a second factor for every database session: "
                    "give a one-time code (ward db login asks for it)"
                )
            device = await self.users.verify_mfa(name, otp_code=otp, webauthn_response=webauthn)
            ttl = SESSION_MFA_TTL  # one connection's worth, like per-session SSH certificates
        return await self.issue_user_certs(
            user,
            tls_public_key=tls_public_key,
            ttl=ttl,
            route_to_db=route,
            mfa_device=device,
            by=name,
        )

    def sign_db_client(self, caller: Identity, *, db_user: str, tls_public_key: str) -> tuple[str, str]:
        """For a database service: a db-CA client certificate with CN = the db user (what
        PostgreSQL's `cert` auth and MariaDB's `REQUIRE X509` check) → (cert, db CA PEM)."""
        if caller.system_role != "db":
            raise AccessDeniedError("only a database service may ask for database client certificates")
        self.check_locks(caller)
        if not db_user or len(db_user) > 63:
            raise BadParameterError("a database user name is 1-63 characters")
        cert = self.signer("db").sign_tls_cert(
            tls_public_key, Identity(user=db_user), ttl=DB_CLIENT_CERT_TTL, now=self.now()
        )
        return cert, "".join(k.tls_cert_pem for k in self.ca("db").spec.active_keys)

    def sign_db_server(
        self, caller: Identity, *, hosts: Sequence[str], tls_public_key: str, ttl: timedelta
    ) -> tuple[str, str]:
        """`wardctl auth sign --format=db`: a server certificate for the database itself, signed
        by the db CA, and the CA file its `ssl_ca_file`/`ssl-ca` should trust."""
        self.authorize(caller, "cert_authority", "create")
        names, ips = _split_addresses(hosts)
        if not names and not ips:
            raise BadParameterError("say which names the database answers to: --host db.internal[,10.0.0.5]")
        cert = self.signer("db").sign_tls_cert(
            tls_public_key,
            # Not a plain name: the certificate must never pass as a db user's client certificate.
            Identity(user=f"db-server:{(names or ips)[0]}"),
            ttl=ttl,
            now=self.now(),
            dns_names=names,
            ip_addresses=ips,
        )
        return cert, "".join(k.tls_cert_pem for k in self.ca("db").spec.active_keys)

    # ------------------------------------------------------------------ applications

    def live_app_services(self) -> list[AppService]:
        now = self.now()
        return [s for s in self.cache.list("app_service") if not s.is_expired(now)]  # type: ignore[misc]

    def serving_app(self, app: App) -> list[str]:
        """Host ids of live app services serving `app`: its own service for a config app (by
        `host_id`), or any that lists it in `spec.apps` (how `wardctl create`d apps are served)."""
        return [
            svc.name
            for svc in self.live_app_services()
            if app.name in svc.spec.apps or (app.spec.host_id and app.spec.host_id == svc.name)
        ]

    def find_app(self, name: str) -> App:
        found = self.cache.get("app", name)
        if not isinstance(found, App) or found.is_expired(self.now()):
            raise NotFoundError(
                f'app "{name}" not found: the web UI (or `ward app ls`) lists the ones you can reach'
            )
        return found

    def app_public_addr(self, app: App) -> str:
        return app_public_addr(app, self.cfg.public_addr)

    def visible_apps(self, caller: Identity) -> list[App]:
        """Apps served right now that the caller's roles allow and no lock closes, by name.

        A service sees every served app (with `app` list rights)."""
        if caller.system_role:
            self.authorize(caller, "app", "list")
        else:
            self.check_locks(caller)
        checker = None if caller.system_role else self.checker_for(caller)
        locks = self.cache.list("lock")
        now = self.now()
        out = []
        for app in self.cache.list("app"):
            if not isinstance(app, App) or app.is_expired(now) or not self.serving_app(app):
                continue
            if checker is not None:
                if not checker.check_app(app.metadata.labels, name=app.name).allowed:
                    continue
                if find_lock(locks, user=caller.user, roles=caller.roles, app=app.name, now=now):  # type: ignore[arg-type]
                    continue
            out.append(app)
        out.sort(key=lambda a: a.name)
        return out

    def _app_user(self, caller: Identity) -> str:
        if caller.system_role or not caller.user:
            raise AccessDeniedError(f"only a user can open an app, not the {caller.system_role} service")
        return caller.user

    def _app_checker(self, caller: Identity, app: App) -> AccessChecker:
        """Locks (the user's, their roles', the app's) and then the roles, for one user and app."""
        self.check_locks(caller, app=app.name)
        checker = self.checker_for(caller)
        checker.check_app(app.metadata.labels, name=app.name).raise_if_denied()
        return checker

    async def _session_mfa(
        self, checker: AccessChecker, user: str, otp: str, webauthn: dict[str, Any] | None, what: str
    ) -> str:
        """The MFA device that verified a fresh second factor, when the roles ask for one."""
        if not checker.options.require_session_mfa:
            return ""
        if not otp and webauthn is None:
            raise AccessDeniedError(
                f"your roles require a second factor for every {what}: give a one-time code or use a passkey"
            )
        return await self.users.verify_mfa(user, otp_code=otp, webauthn_response=webauthn)

    async def issue_app_cert(
        self,
        caller: Identity,
        *,
        app: str,
        tls_public_key: str,
        otp: str = "",
        webauthn: dict[str, Any] | None = None,
    ) -> UserCerts:
        """`ward app login`: a certificate routed to one app (for curl, or a local proxy), after the
        roles and locks say yes; the app service decides again on every connection."""
        name = self._app_user(caller)
        found = self.find_app(app)
        checker = self._app_checker(caller, found)
        user = await self.users.get(name)
        route = RouteToApp(
            name=found.name, public_addr=self.app_public_addr(found), session_id=str(uuid.uuid4())
        )
        ttl = (caller.expires - self.now()) if caller.expires else None
        device = caller.mfa_verified
        if not device:
            device = await self._session_mfa(checker, name, otp, webauthn, "app session")
            if device:
                ttl = SESSION_MFA_TTL  # one connection's worth, like per-session SSH certificates
        return await self.issue_user_certs(
            user, tls_public_key=tls_public_key, ttl=ttl, route_to_app=route, mfa_device=device, by=name
        )

    def _app_event(self, app: App | None, name: str) -> dict[str, Any]:
        if app is None:
            return {"app": name}
        return {"app": app.name, "app_uri": app.spec.uri, "app_public_addr": self.app_public_addr(app)}

    async def create_app_session(
        self,
        caller: Identity,
        *,
        app: str,
        web_session_id: str,
        otp: str = "",
        webauthn: dict[str, Any] | None = None,
        remote_addr: str = "",
    ) -> tuple[str, AppSessionRecord]:
        """The web UI's launch of an app: after the roles, locks and (when required) a fresh second
        factor agree, a one-time token the app service exchanges for the app's session cookie.

        The caller is the user's web-session certificate (through the proxy), and the web session
        must be theirs: an app session never outlives, or belongs to anyone but, its web session."""
        found: App | None = None
        try:
            name = self._app_user(caller)
            web = await self.web_sessions.get(web_session_id, now=self.now())
            if web.user != name:
                raise AccessDeniedError("that web session belongs to another user")
            found = self.find_app(app)
            checker = self._app_checker(caller, found)
            device = await self._session_mfa(checker, name, otp, webauthn, "app session")
            user = await self.users.get(name)
            session_id = str(uuid.uuid4())
            public_addr = self.app_public_addr(found)
            key = generate_tls_key()  # thrown away: the cert only proves who the session is for
            certs = await self.issue_user_certs(
                user,
                tls_public_key=public_key_pem(key),
                ttl=web.expires - self.now(),
                route_to_app=RouteToApp(name=found.name, public_addr=public_addr, session_id=session_id),
                mfa_device=device,
                by=name,
            )
            assert certs.identity.expires is not None
            rec = AppSessionRecord(
                session_id=session_id,
                user=name,
                app=found.name,
                public_addr=public_addr,
                cert=certs.tls_cert,
                expires=min(certs.identity.expires, web.expires),
                web_session=digest(web_session_id),
            )
            token = await self.app_sessions.create_token(rec, now=self.now())
        except WardgateError as exc:
            await self.audit.emit(
                "app.session.create",
                user=caller.user,
                success=False,
                error=str(exc),
                remote_addr=remote_addr or None,
                **self._app_event(found, app),
            )
            raise
        await self.audit.emit(
            "app.session.create",
            user=name,
            sid=session_id,
            expires=rec.expires.isoformat(),
            mfa_verified=device or None,
            remote_addr=remote_addr or None,
            **self._app_event(found, app),
        )
        return token, rec

    def _require_app_service(self, caller: Identity, what: str) -> None:
        if caller.system_role != "app":
            who = f"the {caller.system_role} service" if caller.system_role else f"user {caller.user}"
            raise AccessDeniedError(f"only an app service may {what}, not {who}")
        self.check_locks(caller)

    def _check_serves(self, caller: Identity, app_name: str) -> App:
        """An app service acts only for apps it serves (so one cannot collect another's sessions)."""
        app = self.find_app(app_name)
        if caller.host_id not in self.serving_app(app):
            raise AccessDeniedError(f'this app service does not serve app "{app_name}"')
        return app

    async def exchange_app_session(self, caller: Identity, token: str) -> tuple[str, AppSessionRecord]:
        """Spend a one-time token (once, within 60 s) for the app session's secret (its cookie)."""
        self._require_app_service(caller, "exchange app session tokens")

        def serves(rec: AppSessionRecord) -> None:
            self._check_serves(caller, rec.app)

        return await self.app_sessions.exchange(token, now=self.now(), authorize=serves)

    async def get_app_session(self, caller: Identity, secret: str) -> AppSessionRecord:
        """The app session a cookie names, while it and its web session live (NotFoundError after)."""
        self._require_app_service(caller, "read app sessions")
        rec = await self.app_sessions.get(secret, now=self.now())
        self._check_serves(caller, rec.app)
        if await self.store.get_record(WEB_SESSION_PREFIX + rec.web_session) is None:
            await self.app_sessions.delete(secret)  # signed out while this one was being made
            raise NotFoundError("app session not found: its web session has ended")
        return rec

    def sign_app_jwt(self, caller: Identity, *, cert_pem: str, app: str) -> tuple[str, datetime]:
        """The `Wardgate-Jwt-Assertion` for a request to `app` by the holder of `cert_pem` (a user
        certificate routed to that app): ES256, `aud` = the app's uri, at most 5 minutes."""
        self._require_app_service(caller, "have app JWTs signed")
        found = self._check_serves(caller, app)
        now = self.now()
        ident = verify_tls_identity(cert_pem, self.ca_certs("user"), now=now)
        if ident.system_role:
            raise AuthenticationError("a service certificate cannot stand for a user")
        if ident.route_to_app is None or ident.route_to_app.name != found.name:
            raise AccessDeniedError(f'that certificate is not for app "{found.name}"')
        if not isinstance(self.cache.get("user", ident.user), User):
            raise AccessDeniedError(f"user {ident.user} no longer exists")
        self.check_locks(ident, app=found.name)
        cert_end = ident.expires or x509.load_pem_x509_certificate(cert_pem.encode()).not_valid_after_utc
        expires = min(cert_end, now + APP_JWT_TTL).replace(microsecond=0)
        ttl = int((expires - now).total_seconds())
        if ttl <= 0:
            raise AuthenticationError("the certificate expires too soon to sign a JWT for it")
        claims = jwt.user_claims(
            username=ident.user,
            roles=ident.roles,
            traits=ident.traits,
            issuer=self.cluster_name,
            audience=found.spec.uri,
            ttl=ttl,
            now=now.timestamp(),
        )
        key = self.ca("jwt").spec.active_keys[0].jwt_private_key_pem
        return jwt.sign(key, claims), datetime.fromtimestamp(claims["exp"], UTC)

    def visible_nodes(self, caller: Identity) -> list[tuple[Node, list[str]]]:
        """Nodes the caller's roles let them see, each with the logins allowed there (for `ward ls`)."""
        if caller.system_role:
            self.authorize(caller, "node", "list")
            return [(n, []) for n in self.cache.list("node")]  # type: ignore[misc]
        self.check_locks(caller)
        checker = self.checker_for(caller)
        out = []
        for node in self.cache.list("node"):
            if not checker.can_see_node(node):  # type: ignore[arg-type]
                continue
            logins = [
                login
                for login in checker.logins()
                if checker.check_node(node, login, node_name=node.name).allowed  # type: ignore[arg-type]
            ]
            out.append((node, logins))
        out.sort(key=lambda pair: pair[0].name)
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ explain and audit

    def explain_node_access(self, caller: Identity, user: str, node_name: str, login: str) -> AccessDecision:
        self.authorize(caller, "role", "read")
        u = self.cache.get("user", user)
        if u is None:
            raise NotFoundError(f'user "{user}" not found')
        node = self.cache.get("node", node_name)
        if node is None:
            raise NotFoundError(f'node "{node_name}" not found: `wardctl get nodes` lists them')
        ident = Identity(user=user, roles=tuple(u.spec.roles), traits=dict(u.spec.traits))  # type: ignore[attr-defined]
        lock = find_lock(
            self.cache.list("lock"),
            user=user,
            roles=ident.roles,
            node=node_name,
            login=login,
            now=self.now(),  # type: ignore[arg-type]
        )
        if lock is not None:
            return lock_decision(lock)
        if isinstance(u, User) and u.spec.status.locked_until and u.spec.status.locked_until > self.now():
            return AccessDecision(
                False,
                f"user {user} is locked until {u.spec.status.locked_until:%Y-%m-%d %H:%M UTC}",
                locked=True,
            )
        return self.checker_for(ident).check_node(node, login, node_name=node_name)  # type: ignore[arg-type]

    async def emit_events(self, caller: Identity, events: Sequence[dict[str, Any]]) -> None:
        self.authorize(caller, "event", "create")
        if not all(isinstance(ev, dict) for ev in events):
            raise BadParameterError("events must be a list of JSON objects")
        await self.audit.write_many(events)

    async def search_events(self, caller: Identity, **query: Any) -> tuple[list[dict], str | None]:
        self.authorize(caller, "event", "list")
        return await self.audit.search(**query)

    async def find_session(self, caller: Identity, sid: str) -> dict[str, Any]:
        """Where a session runs and whether it is live, from its audit events (for `ward join`)."""
        self.authorize(caller, "session", "read")
        events, _ = await self.audit.search(sid=sid, types=["session.start", "session.end"], limit=10)
        start = next((e for e in events if e["event"] == "session.start"), None)
        if start is None:
            raise NotFoundError(f"no session {sid}: copy the id from WARD_SESSION_ID in that session")
        return {
            "sid": sid,
            "user": start.get("user", ""),
            "login": start.get("login", ""),
            "server_id": start.get("server_id", ""),
            "server_hostname": start.get("server_hostname", ""),
            "active": not any(e["event"] == "session.end" for e in events),
        }

    async def active_sessions(self, caller: Identity) -> list[dict[str, Any]]:
        """Live sessions (started in the last day, not ended, on a node still heartbeating) the
        caller may see: their own, all with `session` list rights, or any they may join."""
        self.check_locks(caller)
        checker = None if caller.system_role else self.checker_for(caller)
        see_all = caller.system_role == "admin" or (
            checker is not None and checker.check_rule("session", "list").allowed
        )
        modes = checker.join_modes() if checker is not None else frozenset()
        since = self.now() - timedelta(days=1)
        events, _ = await self.audit.search(
            since=since, types=["session.start", "session.end"], limit=5000
        )
        ended = {e.get("sid") for e in events if e["event"] == "session.end"}
        nodes: dict[str, str] = {}
        for n in self.cache.list("node"):
            nodes[n.name] = n.name
            if n.spec.host_id:  # type: ignore[attr-defined]
                nodes[n.spec.host_id] = n.name  # type: ignore[attr-defined]
        out = []
        for e in events:
            sid = e.get("sid", "")
            if e["event"] != "session.start" or not sid or sid in ended or not e.get("success", True):
                continue
            if e.get("server_id") not in nodes or e.get("agentless"):
                continue
            own = e.get("user") == caller.user and not caller.system_role
            if not (own or see_all or modes):
                continue
            out.append(
                {
                    "sid": sid,
                    "user": e.get("user", ""),
                    "login": e.get("login", ""),
                    "server_id": e.get("server_id", ""),
                    "server_hostname": e.get("server_hostname", ""),
                    "node": nodes[e["server_id"]],
                    "started": e.get("time", ""),
                    "can_join": own or bool(modes),
                    "join_modes": sorted({"observer", "peer"} if own else modes),
                }
            )
        return out

    # ------------------------------------------------------------------ recordings

    def _recording_path(self, sid: str) -> Path:
        try:
            sid = str(uuid.UUID(sid))
        except ValueError:
            raise BadParameterError(f"{sid!r} is not a session id") from None
        if self.cfg.recordings_dir is None:
            raise NotFoundError("this auth service keeps no recordings (no recordings_dir)")
        return self.cfg.recordings_dir / f"{sid}.cast.gz"

    async def store_recording(self, caller: Identity, sid: str, data: bytes) -> None:
        """A node ships a finished recording (gzip of asciicast v2)."""
        self.authorize(caller, "session", "create")
        if data[:2] != b"\x1f\x8b":
            raise BadParameterError("a recording must be a gzip file of an asciicast")
        path = self._recording_path(sid)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        await asyncio.to_thread(tmp.write_bytes, data)
        await asyncio.to_thread(tmp.replace, path)
        await self.audit.emit(
            "session.upload", user=caller.user, sid=sid, size=len(data), host_id=caller.host_id
        )

    async def read_recording(self, caller: Identity, sid: str) -> bytes:
        self.authorize(caller, "session", "read")
        path = self._recording_path(sid)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            raise NotFoundError(
                f"no recording for session {sid} (not recorded, still live, or not uploaded yet)"
            ) from None

    async def list_recordings(self, caller: Identity, *, limit: int = 100) -> list[dict[str, Any]]:
        """Recorded sessions, newest first, described by their session.end events."""
        self.authorize(caller, "session", "list")
        if self.cfg.recordings_dir is None:
            return []
        ends, _ = await self.audit.search(types=["session.end"], limit=min(limit, 1000))
        fields = ("sid", "user", "login", "server_id", "server_hostname", "time", "duration")
        out = []
        for ev in ends:
            sid = ev.get("sid", "")
            if sid and await asyncio.to_thread((self.cfg.recordings_dir / f"{sid}.cast.gz").exists):
                out.append({k: ev.get(k) for k in fields})
        return out

    @asynccontextmanager
    async def watch(
        self, caller: Identity, kinds: Sequence[str]
    ) -> AsyncIterator[AsyncIterator[ResourceEvent]]:
        kinds = [resolve_kind(k) for k in kinds]
        for k in kinds:
            self.authorize(caller, k, "list")
        async with self.store.watch(kinds) as events:

            async def stripped() -> AsyncIterator[ResourceEvent]:
                async for ev in events:
                    if ev.resource is not None:
                        ev = replace(ev, resource=ev.resource.without_secrets())
                    yield ev

            yield stripped()


def _event_kind(kind: str) -> str:
    return kind if kind in ("user", "role", "lock", "token") else "resource"


def _split_addresses(items: Sequence[str]) -> tuple[list[str], list[str]]:
    dns, ips = [], []
    for item in items:
        host = item.rsplit(":", 1)[0] if item.count(":") == 1 else item
        host = host.strip("[]")
        if not host:
            continue
        try:
            ips.append(str(ipaddress.ip_address(host)))
        except ValueError:
            dns.append(host)
    return sorted(set(dns)), sorted(set(ips))


__all__ = ["ADMIN_USER", "AuthServer", "AuthServerConfig", "HostCerts", "Role", "UserCerts"]
