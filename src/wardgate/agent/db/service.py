"""The database service: fronts PostgreSQL and MySQL/MariaDB databases for the proxy.

The proxy hands it each client connection (in this process, or over the agent's reverse tunnel)
with one header line: the client's X.509 certificate and the database it asked for. The service
verifies the certificate against the user CA itself, so a proxy cannot invent an identity, then
runs the protocol engine, which reads the client's startup, asks `DBSession.authorize` (route,
roles, locks, expiry, per-session MFA) before a byte reaches the database, logs in upstream as the
db user (a db-CA client certificate, or a configured password), and relays while auditing queries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from wardgate.api.cache import ResourceCache
from wardgate.api.client import AuthClient
from wardgate.api.identityfile import load_key_pair
from wardgate.api.resources import Database, Lock, Role
from wardgate.audit.events import Emitter
from wardgate.auth.access import SESSION_MFA_REQUIRED
from wardgate.auth.certs import verify_tls_identity
from wardgate.auth.identity import Identity
from wardgate.auth.locks import find_lock, lock_decision
from wardgate.auth.rbac import AccessChecker
from wardgate.durations import format_duration
from wardgate.errors import AccessDeniedError, AuthenticationError, BadParameterError, WardgateError
from wardgate.keys import generate_tls_key, private_key_pem, public_key_pem
from wardgate.protocols.dbconn import decode_header
from wardgate.protocols.errors import ProtocolError

log = logging.getLogger(__name__)
CLIENT_CERT_RENEW = timedelta(minutes=10)
"""Renew a cached db-CA client certificate when it has less than this left."""
SUPERVISE_EVERY = 1.0
"""How often a live session is checked again: a lock, a role change, an expired certificate
(`disconnect_expired_cert`) or the idle timeout ends it within about this long."""

Engine = Callable[["DBSession", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class _ClientCert:
    ctx_material: tuple[str, str, str]  # cert, key, ca
    expires: datetime


@dataclass
class DBSession:
    """One client connection to one database: what an engine needs and nothing more."""

    id: str
    identity: Identity
    database: Database
    client_addr: str
    service: DatabaseService
    started: float = field(default_factory=time.monotonic)
    db_user: str = ""
    db_name: str = ""
    refusal: str = ""
    """Why the certificate itself was refused; told to the client once its startup is read."""
    last_activity: float = field(default_factory=time.monotonic)
    """When the client last sent a statement: what `client_idle_timeout` measures."""
    ended_by: str = ""
    """Why the service cut the session (lock, revoked access, expiry, idle), when it did."""

    @property
    def route(self) -> Any:
        return self.identity.route_to_db

    def authorize(self, db_user: str, db_name: str) -> None:
        """Raise AccessDeniedError (with the reason people see) unless this identity may connect
        as `db_user` to `db_name`; audits refusals as `db.session.start` failures."""
        try:
            if self.refusal:
                raise AuthenticationError(self.refusal)
            self.service.check_access(self.identity, self.database, db_user, db_name)
        except WardgateError as exc:
            self.db_user, self.db_name = db_user, db_name
            self.emit("db.session.start", success=False, error=str(exc))
            raise
        self.db_user, self.db_name = db_user, db_name
        self.service.supervise(self)

    def fields(self) -> dict[str, Any]:
        return {
            "db_service": self.database.name,
            "db_protocol": self.database.spec.protocol,
            "db_uri": self.database.spec.uri,
            "db_user": self.db_user,
            "db_name": self.db_name,
            "remote_addr": self.client_addr,
        }

    def emit(self, event: str, *, success: bool = True, **extra: Any) -> None:
        if event == "db.session.query":
            self.last_activity = time.monotonic()
        self.service.emit(
            event, user=self.identity.user, success=success, sid=self.id, **self.fields(), **extra
        )

    def upstream_host_port(self) -> tuple[str, int]:
        host, _, port = self.database.spec.uri.rpartition(":")
        return host.strip("[]"), int(port)

    def password(self, db_user: str) -> str | None:
        """The configured password source for this db user, read now (rotation-friendly)."""
        src = self.database.spec.auth.passwords.get(db_user)
        if src is None:
            return None
        if src.env:
            value = os.environ.get(src.env)
            if value is None:
                raise BadParameterError(
                    f"the password for db user {db_user} comes from ${src.env}, which is not set "
                    "in the database service's environment"
                )
            return value
        try:
            return Path(src.file).read_text().rstrip("\n")
        except OSError as exc:
            raise BadParameterError(f"cannot read the password file for db user {db_user}: {exc}") from None

    async def upstream_tls(self, db_user: str) -> ssl.SSLContext | None:
        """The TLS context toward the database: server verified per `spec.tls`, and a db-CA client
        certificate for `db_user` unless a password is configured for that user."""
        with_cert = self.password(db_user) is None
        return await self.service.upstream_tls(self.database, db_user, with_cert=with_cert)

    def server_name(self) -> str | None:
        tls = self.database.spec.tls
        if tls.mode != "verify-full":
            return None
        return tls.server_name or self.upstream_host_port()[0]


class DatabaseService:
    """Sessions, checks and upstream credentials; engines do the protocols."""

    def __init__(
        self,
        *,
        auth: AuthClient,
        cache: ResourceCache,
        emitter: Emitter,
        host_id: str,
        databases: Callable[[], dict[str, Database]],
        engines: dict[str, Engine],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.auth = auth
        self.cache = cache
        self.emitter = emitter
        self.host_id = host_id
        self.databases = databases
        self.engines = engines
        self.clock = clock
        self._client_key = generate_tls_key()
        self._client_certs: dict[str, _ClientCert] = {}
        self._cert_locks: dict[str, asyncio.Lock] = {}
        self._tls_contexts: dict[tuple[str, str, str, str], ssl.SSLContext] = {}
        self.sessions: set[asyncio.Task[Any]] = set()
        self._emit_nowait: Callable[..., Any] | None = getattr(emitter, "emit_nowait", None)
        """Resolved once: emit() runs for every query on the data path."""

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def emit(self, event: str, **fields: Any) -> None:
        if self._emit_nowait is not None:
            self._emit_nowait(event, **fields)
        else:  # a local store: fire and forget, errors logged
            task = asyncio.get_running_loop().create_task(self.emitter.emit(event, **fields))
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    # ---------------------------------------------------------------- checks

    def identify(self, cert_pem: str) -> Identity:
        ident = verify_tls_identity(cert_pem, self.cache.ca_certs("user"), now=self.now())
        if ident.system_role:
            raise AuthenticationError("a service certificate cannot open database sessions")
        if ident.route_to_db is None or not ident.route_to_db.service_name:
            raise AuthenticationError("this certificate is not for a database: run `ward db login NAME`")
        return ident

    def check_access(
        self, ident: Identity, db: Database, db_user: str, db_name: str, *, expiry: bool = True
    ) -> None:
        """`expiry=False` for sessions already open: an expired certificate ends those only when
        the roles say `disconnect_expired_cert` (see `violation`)."""
        route = ident.route_to_db
        assert route is not None
        if expiry and ident.expires is not None and ident.expires <= self.now():
            raise AuthenticationError("your database certificate has expired: run `ward db login` again")
        if route.username and db_user != route.username:
            raise AccessDeniedError(
                f'your certificate is for db user "{route.username}", not "{db_user}": '
                f"run `ward db login {db.name} --db-user={db_user}` to switch"
            )
        locks: list[Lock] = self.cache.list("lock")  # type: ignore[assignment]
        lock = find_lock(locks, user=ident.user, roles=ident.roles, now=self.now())
        if lock is not None:
            lock_decision(lock).raise_if_denied()
        roles: dict[str, Role] = self.cache.as_dict("role")  # type: ignore[assignment]
        checker = AccessChecker.for_identity(ident, roles)
        checker.check_db(db.metadata.labels, db_user, db_name, name=db.name).raise_if_denied()
        if checker.options.require_session_mfa and not ident.mfa_verified:
            raise AccessDeniedError(SESSION_MFA_REQUIRED.replace("ward ssh", "ward db login"))

    def violation(self, session: DBSession) -> str:
        """Why an open session may not go on (empty when it may): checked every second."""
        ident = session.identity
        try:
            self.check_access(ident, session.database, session.db_user, session.db_name, expiry=False)
        except WardgateError as exc:
            return str(exc)
        roles: dict[str, Role] = self.cache.as_dict("role")  # type: ignore[assignment]
        options = AccessChecker.for_identity(ident, roles).options
        if options.disconnect_expired_cert and ident.expires is not None and ident.expires <= self.now():
            return "your certificate expired and your roles disconnect expired sessions"
        idle = options.client_idle_timeout
        idle_for = time.monotonic() - session.last_activity
        if idle is not None and idle.total_seconds() > 0 and idle_for > idle.total_seconds():
            return f"the client exceeded the idle timeout of {format_duration(idle)}"
        return ""

    def supervise(self, session: DBSession) -> None:
        """Keep checking an authorised session while it runs, and end it (the engine then
        writes `db.session.end`) when a lock, a role change, expiry or idleness says so."""
        task = asyncio.current_task()
        if task is None:
            return

        async def watch() -> None:
            while not task.done():
                await asyncio.sleep(SUPERVISE_EVERY)
                reason = self.violation(session)
                if reason:
                    session.ended_by = reason
                    user = session.identity.user
                    log.info("ending database session %s of %s: %s", session.id, user, reason)
                    session.emit("db.session.error", success=False, error=f"session ended: {reason}")
                    task.cancel(f"session ended: {reason}")
                    return

        watcher = asyncio.get_running_loop().create_task(watch(), name=f"db-supervise-{session.id}")
        task.add_done_callback(lambda _t: watcher.cancel())

    # ---------------------------------------------------------------- upstream credentials

    async def client_cert(self, db_user: str) -> tuple[str, str, str]:
        """(cert, key, db CA) for `db_user`, from the auth service, cached until near expiry."""
        lock = self._cert_locks.setdefault(db_user, asyncio.Lock())
        async with lock:
            cached = self._client_certs.get(db_user)
            if cached is not None and cached.expires - self.now() > CLIENT_CERT_RENEW:
                return cached.ctx_material
            data = await self.auth.db_client_cert(db_user, public_key_pem(self._client_key))
            cert = x509.load_pem_x509_certificate(data["tls_cert"].encode())
            material = (data["tls_cert"], private_key_pem(self._client_key), data["ca_pem"])
            self._client_certs[db_user] = _ClientCert(material, cert.not_valid_after_utc)
            return material

    async def upstream_tls(self, db: Database, db_user: str, *, with_cert: bool) -> ssl.SSLContext | None:
        """The context toward the database, cached per database, user and client certificate
        (building one means loading CAs and a key pair: too slow for every connection)."""
        tls = db.spec.tls
        if tls.mode == "off":
            return None
        cert_pem, key_pem, db_ca = await self.client_cert(db_user) if with_cert else ("", "", "")
        key = (db.name, tls.model_dump_json(), cert_pem, db_ca)
        cached = self._tls_contexts.get(key)
        if cached is not None:
            return cached
        if len(self._tls_contexts) > 256:
            self._tls_contexts.clear()
        # Only the database's CA: never the system bundle.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if tls.mode == "insecure":
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx.check_hostname = tls.mode == "verify-full"
            if tls.ca_cert_file:
                ctx.load_verify_locations(cafile=tls.ca_cert_file)
            else:
                ctx.load_verify_locations(cadata=db_ca or self._db_ca_pem())
        if with_cert:
            load_key_pair(ctx, cert_pem, key_pem)
        self._tls_contexts[key] = ctx
        return ctx

    def _db_ca_pem(self) -> str:
        return "".join(c.public_bytes(Encoding.PEM).decode() for c in self.cache.ca_certs("db"))

    # ---------------------------------------------------------------- connections

    async def serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, header: dict[str, str]
    ) -> None:
        """One client connection, header already read. Even a refused certificate goes to the
        engine, which reads the client's startup and says no in the protocol's own words."""
        task = asyncio.current_task()
        if task is not None:
            self.sessions.add(task)
        try:
            db = self.databases().get(header["db"])
            if db is None:
                log.info("database %s is not served here", header["db"])
                return
            engine = self.engines.get(db.spec.protocol)
            if engine is None:
                return
            refusal = ""
            try:
                ident = self.identify(header["cert"])
                if ident.route_to_db is None or ident.route_to_db.service_name != db.name:
                    refusal = f"your certificate is not for database {db.name}: run `ward db login {db.name}`"
            except WardgateError as exc:
                ident, refusal = Identity(user=""), str(exc)
            session = DBSession(
                id=str(uuid.uuid4()),
                identity=ident,
                database=db,
                client_addr=header.get("client_addr", ""),
                service=self,
                refusal=refusal,
            )
            try:
                await engine(session, reader, writer)
            except asyncio.CancelledError:
                if not session.ended_by or task is None:
                    raise
                task.uncancel()  # we ended the session, nobody cancelled the connection's owner
        finally:
            if task is not None:
                self.sessions.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def serve_tunnel_channel(self, reader: Any, writer: Any) -> None:
        """A channel from the proxy over the reverse tunnel: header line, then the protocol."""
        try:
            line = await asyncio.wait_for(reader.readuntil(b"\n"), 15)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            writer.close()
            return
        try:
            header = decode_header(line)
        except ProtocolError as exc:
            log.warning("refused a tunnel channel: %s", exc)
            writer.close()
            return
        await self.serve(reader, writer, header)
