"""Databases for `ward`: per-database certificates, the local tunnel native clients use, and
the command lines of psql, mysql and mariadb.

Layout, next to the profile's keys (``~/.ward/keys/<proxy>/<user>-db/``, 0700)::

    <NAME>.key     P-256 private key for database NAME (PKCS#8, 0600; kept across logins)
    <NAME>.crt     the certificate `ward db login` got: the user's identity routed to NAME as one db user
    <NAME>.yaml    name, protocol, db_user, db_name, valid_until: what connect/proxy db/env need again
    ca.pem         the cluster's host CA certificates: how the tunnel recognises the proxy
    local.crt      `ward proxy db` (without --tunnel): the listener's own self-signed certificate
                   for localhost/127.0.0.1/::1, the root clients verify it by (sslrootcert)
    local.key      its key (0600); both are made on first use and renewed a week before expiry

`ward logout` removes the whole key folder, so these go with it.

The data path: every connection a local client makes to the tunnel becomes its own TLS
connection to the proxy's one port with ALPN `ward-postgres` or `ward-mysql`, presenting
`<NAME>.crt` and verifying the proxy against `ca.pem`. The database's own protocol then flows
inside that TLS stream unchanged (no header: the certificate's route says which database and
db user), relayed by `wardgate.proxy.relay` (256 KiB buffers, back-pressure, half-close).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import logging
import os
import re
import shlex
import shutil
import signal
import ssl
import struct
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from wardgate.api.client import ConnectionFailed
from wardgate.client.localproxy import (
    BUFFER_SIZE,
    LOCAL_HOST,
    ErrorSink,
    Held,
    LocalTunnel,
    TLSDial,
    server_hostname,
    tls_failure,
    unreachable,
)
from wardgate.client.profile import NotLoggedInError, Profile, atomic_write, split_host_port, utc_text
from wardgate.client.proxyclient import ProxyClient
from wardgate.client.routed import LoginStore, RoutedLogin, check_resource_name, issued_cert, session_factor
from wardgate.client.tlsstream import open_tls_connection
from wardgate.errors import AccessDeniedError, BadParameterError, NotFoundError, WardgateError
from wardgate.keys import generate_tls_key, load_private_key, load_x509, private_key_pem, public_key_pem
from wardgate.protocols import mysql as my
from wardgate.protocols import postgres as pg
from wardgate.proxy.relay import RelayStats

log = logging.getLogger(__name__)

ALPN = {"postgres": "ward-postgres", "mysql": "ward-mysql"}
RENEW_MARGIN = timedelta(minutes=1)
"""`connect`/`proxy db` log in again when the certificate has less than this left."""
LOCAL_CERT_TTL = timedelta(days=365)
LOCAL_CERT_RENEW = timedelta(days=7)
"""The local listener's certificate is made anew when it has less than this left."""
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


class NotLoggedInToDatabase(NotLoggedInError):
    """No (usable) certificate for this database: the fix is `ward db login NAME`."""


class DatabaseCertExpired(NotLoggedInToDatabase):
    pass


def check_db_name(name: str) -> str:
    return check_resource_name(name, "database", "ward db ls")


# ---------------------------------------------------------------- the certificate store


@dataclass
class DBLogin(
    RoutedLogin,
    noun="database",
    command="db",
    error=NotLoggedInToDatabase,
    expired_error=DatabaseCertExpired,
    cert_suffix=".crt",
):
    """One `ward db login`: which database, as whom, until when, and where its files are."""

    name: str
    protocol: str
    db_user: str
    db_name: str
    valid_until: datetime
    folder: Path

    @property
    def key_path(self) -> Path:
        return self.folder / f"{self.name}.key"

    @property
    def ca_path(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def local_ca_path(self) -> Path:
        """The root clients of `ward proxy db NAME` (without --tunnel) verify the listener by."""
        return self.folder / "local.crt"

    @property
    def alpn(self) -> str:
        try:
            return ALPN[self.protocol]
        except KeyError:
            raise BadParameterError(
                f'database "{self.name}" speaks {self.protocol!r}, which ward cannot connect to'
            ) from None

    def ca_pems(self) -> list[str]:
        try:
            return [self.ca_path.read_text()]
        except FileNotFoundError:
            raise NotLoggedInToDatabase(
                f"the cluster CA is missing from {self.ca_path}: run `ward db login {self.name}` again"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        """What `<NAME>.yaml` holds."""
        return {
            "name": self.name,
            "protocol": self.protocol,
            "db_user": self.db_user,
            "db_name": self.db_name,
            "valid_until": utc_text(self.valid_until),
        }

    def describe(self, profile: Profile) -> dict[str, Any]:
        """Everything `ward db config` shows (and `--format json` prints)."""
        return {
            **self.to_dict(),
            "proxy": profile.proxy,
            "alpn": ALPN.get(self.protocol, ""),
            "cert": str(self.cert_path),
            "key": str(self.key_path),
            "ca": str(self.ca_path),
            "local_ca": str(self.local_ca_path),
            "expired": self.is_expired(),
        }


class DBStore(LoginStore[DBLogin]):
    """The database certificates of one profile (see the module docstring for the layout)."""

    login_class = DBLogin
    folder_suffix = "-db"
    files = (".yaml", ".crt", ".key")
    login_args = " --db-user=USER"
    renew_margin = RENEW_MARGIN

    check_name = staticmethod(check_db_name)

    def from_yaml(self, name: str, data: Any, valid_until: datetime) -> DBLogin:
        return DBLogin(
            name=name,
            protocol=str(data["protocol"]),
            db_user=str(data.get("db_user") or ""),
            db_name=str(data.get("db_name") or ""),
            valid_until=valid_until,
            folder=self.folder,
        )

    def key(self, name: str) -> ec.EllipticCurvePrivateKey:
        """The database's key if one is saved (and usable), else a fresh P-256 key."""
        path = self.folder / f"{check_db_name(name)}.key"
        with contextlib.suppress(FileNotFoundError, BadParameterError):
            key = load_private_key(path.read_bytes())
            if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
                return key
        return generate_tls_key()

    def save(
        self,
        name: str,
        *,
        protocol: str,
        db_user: str,
        db_name: str,
        key: ec.EllipticCurvePrivateKey,
        cert_pem: str,
        ca_pems: Sequence[str],
    ) -> DBLogin:
        """Key, CA and certificate first, the small yaml last: it never points at missing files."""
        check_db_name(name)
        cert = load_x509(cert_pem)
        self._check_cert(cert, key)
        if not ca_pems:
            raise WardgateError("the cluster sent no CA to verify the proxy by: not saving the certificate")
        self.make_folder()
        login = DBLogin(
            name=name,
            protocol=protocol,
            db_user=db_user,
            db_name=db_name,
            valid_until=cert.not_valid_after_utc,
            folder=self.folder,
        )
        atomic_write(login.key_path, private_key_pem(key), 0o600)
        atomic_write(login.ca_path, "".join(p.strip() + "\n" for p in ca_pems), 0o644)
        return self._write(login, cert_pem)

    def removed(self, name: str, found: bool) -> None:
        """Also the libpq alias of the key; with the last login, the folder's shared files."""
        proxy_dir = self.profile.home / "keys" / "libpq" / self.profile.proxy.replace(":", "_")
        with contextlib.suppress(FileNotFoundError):
            (proxy_dir / f"{self.profile.user}-db" / f"{name}.key").unlink()
        if found and not any(self.folder.glob("*.yaml")):
            for leftover in ("ca.pem", "local.crt", "local.key", ".local.lock"):
                with contextlib.suppress(FileNotFoundError):
                    (self.folder / leftover).unlink()
            with contextlib.suppress(OSError):
                self.folder.rmdir()

    def libpq_key_path(self, login: DBLogin) -> Path:
        """The key path to give libpq (psql, psycopg, pgAdmin): it reads an sslkey with a colon as
        ENGINE:KEY, and the key folder is named after the proxy's host:port. So psql gets a
        colon-free symlink, `~/.ward/keys/libpq/<host_port>/<user>-db/<NAME>.key`, kept pointing at
        the key (a symlink grants nothing: the key stays 0600 in its 0700 folder)."""
        if ":" not in str(login.key_path):
            return login.key_path
        folder = self.profile.home / "keys" / "libpq"
        alias_dir = folder / self.profile.proxy.replace(":", "_") / f"{self.profile.user}-db"
        alias = alias_dir / f"{login.name}.key"
        if ":" in str(alias):
            return login.key_path  # the ward home itself has one: nothing better to offer
        for d in (folder, folder / self.profile.proxy.replace(":", "_"), alias_dir):
            d.mkdir(mode=0o700, exist_ok=True)
        target = str(login.key_path)
        if not (alias.is_symlink() and os.readlink(alias) == target):
            tmp = alias.with_name(f".{alias.name}.{os.getpid()}.tmp")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            os.symlink(target, tmp)
            os.replace(tmp, alias)
        return alias

    # ---- the local listener's own certificate (`ward proxy db` without --tunnel)

    @contextlib.contextmanager
    def _local_lock(self) -> Any:
        """Two `ward proxy db` runs must not make (or read half of) the local certificate at once."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.folder / ".local.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _local_cert_usable(self, now: datetime) -> bool:
        try:
            cert = load_x509((self.folder / "local.crt").read_bytes())
            key = load_private_key((self.folder / "local.key").read_bytes())
        except (OSError, ValueError, BadParameterError):
            return False
        return (
            public_key_pem(cert.public_key()) == public_key_pem(key)
            and cert.not_valid_after_utc - LOCAL_CERT_RENEW > now
        )

    def local_server_context(self, now: datetime | None = None) -> ssl.SSLContext:
        """A TLS server context with the listener's certificate, made (or renewed) if needed.

        Self-signed for localhost, 127.0.0.1 and ::1, kept in the profile so the root clients are
        told to trust (`local.crt`) stays the same across runs; it proves nothing beyond "this is
        the listener you started", which is all a loopback connection needs.
        """
        now = now or datetime.now(UTC)
        crt, key_path = self.folder / "local.crt", self.folder / "local.key"
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        with self._local_lock():
            if not self._local_cert_usable(now):
                key = generate_tls_key()
                atomic_write(key_path, private_key_pem(key), 0o600)
                atomic_write(
                    crt, self_signed_local_cert(key, now).public_bytes(serialization.Encoding.PEM), 0o644
                )
            ctx.load_cert_chain(crt, key_path)
        return ctx


def self_signed_local_cert(key: ec.EllipticCurvePrivateKey, now: datetime) -> x509.Certificate:
    """The local listener's certificate: its own root (CA:TRUE, so strict verifiers accept it as
    one), for the loopback names only."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ward local database proxy")])
    sans: list[x509.GeneralName] = []
    for n in LOCAL_NAMES:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + LOCAL_CERT_TTL)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


# ---------------------------------------------------------------- talking to the cluster


async def visible_databases(profile: Profile) -> list[dict[str, Any]]:
    """What `ward db ls` shows: name, description, protocol, labels, db_users."""
    async with ProxyClient.for_profile(profile) as c:
        return await c.visible_databases()


def default_db_user(entry: Mapping[str, Any]) -> str:
    """The one db user the roles name, if there is exactly one and it is not a wildcard."""
    users = [str(u) for u in entry.get("db_users") or [] if u and "*" not in str(u) and "{{" not in str(u)]
    return users[0] if len(users) == 1 else ""


async def db_login(
    profile: Profile,
    name: str,
    db_user: str = "",
    db_name: str = "",
    *,
    store: DBStore | None = None,
    ask_code: Callable[[], str] | None = None,
) -> DBLogin:
    """`ward db login`: a certificate routed to database NAME as `db_user`, saved in the store.

    A db user or db name not given falls back to the previous login's (then, for the user, to
    the only one the roles allow). The database's key is reused across logins.
    """
    check_db_name(name)
    store = store or DBStore(profile)
    previous = None
    with contextlib.suppress(NotLoggedInToDatabase):
        previous = store.find(name)  # a damaged saved login is simply replaced
    async with ProxyClient.for_profile(profile) as c:
        dbs = await c.visible_databases()
        entry = next((d for d in dbs if d.get("name") == name), None)
        if entry is None:
            raise NotFoundError(
                f'database "{name}" not found: `ward db ls` lists the ones you can reach '
                "(a database is listed while a database service serves it)"
            )
        protocol = str(entry.get("protocol") or "")
        if protocol not in ALPN:
            raise BadParameterError(f'database "{name}" speaks {protocol!r}, which ward cannot connect to')
        if not db_user and previous is not None:
            db_user = previous.db_user
        db_user = db_user or default_db_user(entry)
        if not db_user:
            allowed = ", ".join(str(u) for u in entry.get("db_users") or []) or "none"
            raise BadParameterError(
                f"say which database user to connect as: --db-user=NAME (your roles allow: {allowed})"
            )
        if not db_name and previous is not None:
            db_name = previous.db_name
        key = store.key(name)
        factor = session_factor(
            entry,
            ask_code,
            f'your roles require a second factor for each session on "{name}": '
            "run `ward db login` or `ward db connect` in a terminal",
        )
        try:
            resp = await c.db_user_cert(
                db=name, db_user=db_user, db_name=db_name, tls_public_key=public_key_pem(key), **factor
            )
        except (AccessDeniedError, BadParameterError) as exc:
            raise type(exc)(f'cannot log in to database "{name}" as {db_user}: {exc}') from None
    cert_pem, ca_pems = issued_cert(profile, resp)
    ca_pems = ca_pems or profile.host_ca_pems()
    return store.save(
        name,
        protocol=protocol,
        db_user=db_user,
        db_name=db_name,
        key=key,
        cert_pem=cert_pem,
        ca_pems=ca_pems,
    )


async def ensure_login(
    profile: Profile,
    name: str,
    db_user: str = "",
    db_name: str = "",
    *,
    store: DBStore | None = None,
    ask_code: Callable[[], str] | None = None,
) -> DBLogin:
    """The saved login if it is valid (for a while yet) and matches what was asked; else log in."""
    store = store or DBStore(profile)
    found = store.current(name)
    if (
        found is not None
        and (not db_user or db_user == found.db_user)
        and (not db_name or db_name == found.db_name)
    ):
        return found
    return await db_login(profile, name, db_user, db_name, store=store, ask_code=ask_code)


# ---------------------------------------------------------------- the data path


def _tls_failure(profile: Profile, login: DBLogin, exc: ssl.SSLError) -> WardgateError:
    return tls_failure(
        profile,
        exc,
        subject=f'database "{login.name}"',
        relogin=f"ward db login {login.name}",
        expired=DatabaseCertExpired,
    )


def _check_alpn(profile: Profile, login: DBLogin, chosen: str | None) -> None:
    if chosen != login.alpn:
        raise ConnectionFailed(
            f"the proxy at {profile.proxy} does not offer database access ({login.alpn}; it chose "
            f"{chosen or 'no protocol'}): is it a Wardgate proxy with database access enabled?"
        )


async def open_db_stream(
    profile: Profile, login: DBLogin, *, dial_timeout: float = 30.0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """One TLS connection to the proxy for database `login.name`: the native protocol flows
    through the returned streams (for tools and tests; the tunnel relays without streams)."""
    login.require_valid()
    ctx = login.ssl_context()
    host, port = split_host_port(profile.proxy)
    try:
        reader, writer = await asyncio.wait_for(
            open_tls_connection(host, port, ctx, server_hostname=server_hostname(host)), dial_timeout
        )
    except ssl.SSLError as exc:
        raise _tls_failure(profile, login, exc) from None
    except (OSError, TimeoutError) as exc:
        raise unreachable(profile, exc) from None
    try:
        _check_alpn(profile, login, writer.get_extra_info("selected_alpn"))
    except BaseException:
        writer.close()
        raise
    return reader, writer


class DBTunnel(LocalTunnel[DBLogin]):
    """`ward proxy db --tunnel`: a local listener; every connection it accepts gets its own TLS
    connection to the proxy, carrying this database's certificate, and is relayed both ways.

    Nothing the local client sends reaches the proxy before the TLS handshake is done and the
    proxy agreed to the database's ALPN. The login is re-read for every connection, so a
    `ward db login NAME` in another terminal renews a running tunnel, and an expired
    certificate is refused here with the fix instead of being sent. Per-connection problems go
    to `on_error` (one line each); the listener keeps going.
    """

    def __init__(
        self,
        profile: Profile,
        name: str,
        *,
        store: DBStore | None = None,
        on_error: ErrorSink | None = None,
        dial_timeout: float = 30.0,
        buffer_size: int = BUFFER_SIZE,
    ) -> None:
        self.name = check_db_name(name)
        self.store = store or DBStore(profile)
        super().__init__(
            profile,
            f'database "{self.name}"',
            on_error=on_error,
            dial_timeout=dial_timeout,
            buffer_size=buffer_size,
        )

    async def prepare(self) -> DBLogin:
        return self.store.load(self.name).require_valid()

    def dial_params(self, login: DBLogin) -> TLSDial:
        return TLSDial(login.ssl_context(), server_hostname(self._proxy_host))

    def tls_failure(self, login: DBLogin, exc: ssl.SSLError) -> WardgateError:
        return _tls_failure(self.profile, login, exc)

    def check_peer(self, login: DBLogin, ssl_object: ssl.SSLObject | None) -> None:
        _check_alpn(self.profile, login, ssl_object.selected_alpn_protocol() if ssl_object else None)

    def check_end(self, login: DBLogin, stats: RelayStats) -> None:
        super().check_end(login, stats)
        if stats.a_to_b and not stats.b_to_a and stats.reason in ("done", "error"):
            raise ConnectionFailed(
                f'the proxy closed the connection to database "{login.name}" without an answer: '
                f"your certificate was refused (run `ward db login {login.name}` again) or no "
                "database service serves it right now"
            )


class LocalClientRefused(AccessDeniedError):
    """A local client of `ward proxy db` (without --tunnel) was refused; it was told why in its
    own protocol where it could be, and the person running the listener gets this warning."""


def require_saved_cert(ctx: ssl.SSLContext, login: DBLogin) -> ssl.SSLContext:
    """Ask local clients for a certificate and trust exactly the one `ward db login` saved, as
    its own anchor (a partial chain): only a holder of its key completes a handshake with one.
    Optional at the TLS level so a client without one can still be told what to do."""
    try:
        pem = login.cert_path.read_text()
    except FileNotFoundError:
        raise NotLoggedInToDatabase(
            f'your certificate for database "{login.name}" is missing: run `ward db login {login.name}`'
        ) from None
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.load_verify_locations(cadata=pem)
    return ctx


def is_saved_cert(login: DBLogin, der: bytes | None, now: datetime | None = None) -> bool:
    """The very certificate `ward db login` saved, or one for the same key that has not expired."""
    if not der:
        return False
    try:
        saved = load_x509(login.cert_path.read_bytes())
        presented = x509.load_der_x509_certificate(der)
    except (OSError, ValueError, BadParameterError):
        return False
    if der == saved.public_bytes(serialization.Encoding.DER):
        return True
    now = now or datetime.now(UTC)
    return (
        public_key_pem(presented.public_key()) == public_key_pem(saved.public_key())
        and presented.not_valid_before_utc <= now < presented.not_valid_after_utc
    )


async def _read_mysql_packet(held: Held) -> tuple[int, bytes] | None:
    """One physical MySQL packet (sequence id, payload) from a held connection; None at its end."""
    if not await held.wait_for(my.HEADER_SIZE):
        return None
    n = int.from_bytes(held.pending()[:3], "little")
    if n + my.HEADER_SIZE > held.limit:
        raise ConnectionFailed(f"a {n}-byte MySQL packet during the login: not a MySQL client or server")
    if not await held.wait_for(my.HEADER_SIZE + n):
        return None
    raw = held.take(my.HEADER_SIZE + n)
    return raw[3], raw[my.HEADER_SIZE :]


def offer_tls(greeting: bytes) -> bytes:
    """The server's greeting with CLIENT_SSL added: the local client may (must) upgrade to TLS."""
    my.HandshakeV10.parse(greeting)  # a real greeting, or ProtocolError
    pos = greeting.index(b"\0", 1) + 1 + 4 + 8 + 1  # version, connection id, nonce part 1, filler
    caps = int.from_bytes(greeting[pos : pos + 2], "little") | my.CLIENT_SSL
    return greeting[:pos] + caps.to_bytes(2, "little") + greeting[pos + 2 :]


def without_client_ssl(response: bytes) -> bytes:
    """The client's login with CLIENT_SSL taken out: TLS was between the client and us only."""
    caps = int.from_bytes(response[:4], "little") & ~my.CLIENT_SSL
    return caps.to_bytes(4, "little") + response[4:]


class DBCertTunnel(DBTunnel):
    """`ward proxy db NAME` without --tunnel: the same relay, but only for local clients that
    prove they hold this database's key.

    Each client must speak TLS to the listener and present the certificate `ward db login`
    saved (`<NAME>.crt` with `<NAME>.key`); the listener's own certificate is `local.crt`,
    which clients verify it by. PostgreSQL: the SSLRequest is answered `S` (a GSSENCRequest `N`
    first), the TLS handshake happens here, and the startup message flows on to the proxy
    inside it. MySQL: the proxy's greeting is passed on with CLIENT_SSL offered, the client's
    SSLRequest upgrades the connection, and the login exchange is relayed with sequence ids
    shifted by the one packet the proxy never saw. A client without TLS or without the
    certificate is told what to do in its protocol's error (SQLSTATE 28000); one with another
    certificate fails the TLS handshake (TLS can only answer that with an alert).
    """

    greet_timeout = 30.0
    """Seconds a local client has for its TLS request, handshake and login."""

    def __init__(self, profile: Profile, name: str, **kwargs: Any) -> None:
        super().__init__(profile, name, **kwargs)
        self.store.local_server_context()  # made (or found) now, so the hints name a real file

    def _how(self, login: DBLogin) -> str:
        return (
            f"present {login.cert_path} with key {login.key_path} and verify the listener by "
            f"{login.local_ca_path} (`ward proxy db {login.name}` prints the command), or run "
            f"`ward proxy db {login.name} --tunnel` for clients without certificates"
        )

    def _server_context(self, login: DBLogin) -> ssl.SSLContext:
        return require_saved_cert(self.store.local_server_context(), login)

    async def _tls(self, local: Held, login: DBLogin, *, held_is_tls: bool = False) -> bool:
        """Upgrade a local client to TLS: True if it presented the saved certificate, False if it
        presented none (it is then told so); a failed handshake is a refusal. `held_is_tls`: bytes
        already here are the client's ClientHello (MySQL does not wait for an answer)."""
        if local.size and not held_is_tls:
            raise LocalClientRefused(
                f'a local client of database "{login.name}" sent data before TLS was agreed: refused'
            )
        try:
            ctx = self._server_context(login)
            await local.start_tls_server(ctx, self.greet_timeout, held_is_tls=held_is_tls)
        except ssl.SSLCertVerificationError as exc:
            raise LocalClientRefused(
                f'refused a local client of database "{login.name}": its certificate is not yours '
                f"({exc.verify_message or exc}); clients must {self._how(login)}"
            ) from None
        except (ssl.SSLError, OSError) as exc:
            why = getattr(exc, "reason", None) or exc or type(exc).__name__
            raise LocalClientRefused(
                f'TLS with a local client of database "{login.name}" failed ({why}); '
                f"clients must {self._how(login)}"
            ) from None
        obj = local.transport.get_extra_info("ssl_object")
        return is_saved_cert(login, obj.getpeercert(binary_form=True) if obj else None)

    def _no_cert(self, login: DBLogin) -> str:
        return (
            f'ward proxy db: present your certificate for database "{login.name}" '
            f"({login.cert_path} with key {login.key_path}, from `ward db login {login.name}`)"
        )

    def _no_tls(self, login: DBLogin) -> str:
        return f'ward proxy db: database "{login.name}" needs TLS with your database certificate here: ' + (
            self._how(login)
        )

    async def greet_local(self, local: Held, login: DBLogin) -> bool:
        if login.protocol != "postgres":
            return True
        try:
            async with asyncio.timeout(self.greet_timeout):
                return await self._pg_greet(local, login)
        except TimeoutError:
            raise LocalClientRefused(
                f'a local client of database "{login.name}" did not finish TLS in {self.greet_timeout:.0f} s'
            ) from None

    async def _pg_greet(self, local: Held, login: DBLogin) -> bool:
        while True:
            if not await local.wait_for(8):
                return False
            length, code = struct.unpack("!ii", local.pending()[:8])
            if length == 8 and code == pg.GSSENC_REQUEST_CODE:
                local.take(8)
                local.transport.write(b"N")
                continue
            if length == 8 and code == pg.SSL_REQUEST_CODE:
                local.take(8)
                break
            if length == 16 and code == pg.CANCEL_REQUEST_CODE:
                return True  # psql sends these without TLS; the session's secret key is the proof
            if 8 <= length <= pg.MAX_STARTUP:
                await local.wait_for(length)  # all of it read: closing then cannot reset the answer away
            local.transport.write(pg.error_response(self._no_tls(login)))
            raise LocalClientRefused(
                f'refused a local client of database "{login.name}" that connected without TLS '
                f"(sslmode=disable): clients must {self._how(login)}"
            )
        local.transport.write(b"S")
        if await self._tls(local, login):
            return True
        if await local.wait_for(4):  # its startup message first, then the answer to it
            length = struct.unpack("!i", local.pending()[:4])[0]
            if 8 <= length <= pg.MAX_STARTUP:
                await local.wait_for(length)
        local.transport.write(pg.error_response(self._no_cert(login)))
        raise LocalClientRefused(
            f'refused a local client of database "{login.name}" without your certificate: '
            f"clients must {self._how(login)}"
        )

    async def greet_remote(self, local: Held, remote: Held, login: DBLogin) -> bool:
        if login.protocol != "mysql":
            return True
        try:
            async with asyncio.timeout(self.greet_timeout):
                return await self._my_greet(local, remote, login)
        except TimeoutError:
            raise LocalClientRefused(
                f'a local client of database "{login.name}" did not finish its login in '
                f"{self.greet_timeout:.0f} s"
            ) from None
        except my.ProtocolError as exc:
            raise ConnectionFailed(f'bad MySQL greeting from database "{login.name}": {exc}') from None

    async def _my_greet(self, local: Held, remote: Held, login: DBLogin) -> bool:
        got = await _read_mysql_packet(remote)
        if got is None:
            return True  # the proxy closed at once: the relay ends and says why
        seq, greeting = got
        local.transport.write(my.encode_packet(seq, offer_tls(greeting)))
        if (got := await _read_mysql_packet(local)) is None:
            return False
        seq, first = got
        is_ssl_request = (
            len(first) == my.SSLRequest.SIZE and int.from_bytes(first[:4], "little") & my.CLIENT_SSL
        )
        if not is_ssl_request:
            local.transport.write(
                my.err_packet(seq + 1, my.ER_ACCESS_DENIED_ERROR, "28000", self._no_tls(login))
            )
            raise LocalClientRefused(
                f'refused a local client of database "{login.name}" that connected without TLS: '
                f"clients must {self._how(login)}"
            )
        if not await self._tls(local, login, held_is_tls=True):
            if (got := await _read_mysql_packet(local)) is not None:
                local.transport.write(
                    my.err_packet(got[0] + 1, my.ER_ACCESS_DENIED_ERROR, "28000", self._no_cert(login))
                )
            raise LocalClientRefused(
                f'refused a local client of database "{login.name}" without your certificate: '
                f"clients must {self._how(login)}"
            )
        # The login and any further exchange until OK or ERR: the client counts the SSLRequest.
        if (got := await _read_mysql_packet(local)) is None:
            return False
        remote.transport.write(my.encode_packet((got[0] - 1) & 0xFF, without_client_ssl(got[1])))
        for _ in range(16):
            if (got := await _read_mysql_packet(remote)) is None:
                return True
            local.transport.write(my.encode_packet((got[0] + 1) & 0xFF, got[1]))
            if got[1][:1] in (b"\x00", b"\xff"):
                return True
            if (got := await _read_mysql_packet(local)) is None:
                return False
            remote.transport.write(my.encode_packet((got[0] - 1) & 0xFF, got[1]))
        raise ConnectionFailed(f'the login to database "{login.name}" went on too long: refused')


# ---------------------------------------------------------------- native clients


@dataclass(frozen=True)
class ClientProgram:
    path: str
    flavor: str
    """`psql`, `mariadb` (MariaDB's client, also when installed as `mysql`) or `mysql` (Oracle's)."""


def _mysql_flavor(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "mysql"
    return "mariadb" if "mariadb" in out.lower() else "mysql"


def find_client(
    protocol: str,
    *,
    which: Callable[[str], str | None] = shutil.which,
    flavor_of: Callable[[str], str] = _mysql_flavor,
) -> ClientProgram:
    """psql for postgres; for mysql `mariadb`, else `mysql` (MariaDB's or Oracle's, by --version)."""
    if protocol == "postgres":
        if path := which("psql"):
            return ClientProgram(path, "psql")
        raise BadParameterError(
            "psql is not installed: install the PostgreSQL client (e.g. `apt install postgresql-client`), "
            "or run `ward proxy db NAME --tunnel` and use a client of your choice"
        )
    if protocol == "mysql":
        if path := which("mariadb"):
            return ClientProgram(path, "mariadb")
        if path := which("mysql"):
            return ClientProgram(path, flavor_of(path))
        raise BadParameterError(
            "neither mariadb nor mysql is installed: install one (e.g. `apt install mariadb-client`), "
            "or run `ward proxy db NAME --tunnel` and use a client of your choice"
        )
    raise BadParameterError(f"ward has no client for databases speaking {protocol!r}")


def _conninfo_value(v: str) -> str:
    if v and re.fullmatch(r"[^\s'\\]+", v):
        return v
    return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"


def psql_conninfo(
    port: int,
    db_user: str,
    db_name: str = "",
    host: str = LOCAL_HOST,
    *,
    tls: DBLogin | None = None,
    libpq_key: Path | None = None,
) -> str:
    """A libpq connection string for the local listener: no TLS for the tunnel (it does TLS), or
    with `tls`, this login's certificate and the listener's root (`ward proxy db` without --tunnel;
    `libpq_key` is the key's colon-free path, see `DBStore.libpq_key_path`)."""
    parts = [f"host={host}", f"port={int(port)}", f"user={_conninfo_value(db_user)}"]
    if db_name:
        parts.append(f"dbname={_conninfo_value(db_name)}")
    if tls is None:
        parts.append("sslmode=disable")
    else:
        parts += [
            "sslmode=verify-ca",
            f"sslrootcert={_conninfo_value(str(tls.local_ca_path))}",
            f"sslcert={_conninfo_value(str(tls.cert_path))}",
            f"sslkey={_conninfo_value(str(libpq_key or tls.key_path))}",
        ]
    return " ".join(parts)


def psql_argv(
    program: str, port: int, db_user: str, db_name: str = "", extra: Sequence[str] = ()
) -> list[str]:
    """`psql "host=127.0.0.1 port=N user=U dbname=D sslmode=disable" -w [extra…]`."""
    return [program, psql_conninfo(port, db_user, db_name), "-w", *extra]


def mysql_ssl_flag(flavor: str) -> str:
    """MariaDB's client spells "no TLS" `--skip-ssl`; Oracle's, `--ssl-mode=DISABLED`."""
    return "--ssl-mode=DISABLED" if flavor == "mysql" else "--skip-ssl"


def mysql_argv(
    program: str,
    flavor: str,
    port: int,
    db_user: str,
    db_name: str = "",
    extra: Sequence[str] = (),
    host: str = LOCAL_HOST,
) -> list[str]:
    """`mysql -h 127.0.0.1 -P N --protocol=TCP -u U --skip-ssl [extra…] [D]` (no password prompt)."""
    argv = [program, "-h", host, "-P", str(int(port)), "--protocol=TCP", "-u", db_user]
    argv += [mysql_ssl_flag(flavor), *extra]
    if db_name:
        argv.append(db_name)
    return argv


def client_argv(
    client: ClientProgram, port: int, db_user: str, db_name: str = "", extra: Sequence[str] = ()
) -> list[str]:
    if client.flavor == "psql":
        return psql_argv(client.path, port, db_user, db_name, extra)
    return mysql_argv(client.path, client.flavor, port, db_user, db_name, extra)


def client_env(protocol: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The client's environment: never a password prompt, never a password of ours sent."""
    env = dict(os.environ if base is None else base)
    if protocol == "postgres":
        env["PGPASSWORD"] = ""
        env.pop("PGSSLMODE", None)
    else:
        env.pop("MYSQL_PWD", None)
    return env


def mysql_tls_flags(flavor: str, login: DBLogin) -> list[str]:
    """Client options for `ward proxy db` without --tunnel: the certificate, and the listener's root."""
    files = [
        f"--ssl-ca={login.local_ca_path}",
        f"--ssl-cert={login.cert_path}",
        f"--ssl-key={login.key_path}",
    ]
    return ["--ssl-mode=VERIFY_CA", *files] if flavor == "mysql" else [*files, "--ssl-verify-server-cert"]


def connect_command(
    login: DBLogin, port: int, *, flavor: str = "", tunnel: bool = True, libpq_key: Path | None = None
) -> str:
    """The ready-to-paste line `ward proxy db` prints (with the certificate files unless `tunnel`)."""
    if login.protocol == "postgres":
        tls = None if tunnel else login
        info = psql_conninfo(port, login.db_user, login.db_name, tls=tls, libpq_key=libpq_key)
        quoted = f'"{info}"' if re.fullmatch(r"[\w.=@+:/ -]*", info) else shlex.quote(info)
        return f"psql {quoted}"
    argv = ["mysql", "-h", LOCAL_HOST, "-P", str(port), "-u", login.db_user]
    if login.db_name:
        argv.append(login.db_name)
    if tunnel:
        argv.append(mysql_ssl_flag(flavor or "mariadb"))
    else:
        argv += mysql_tls_flags(flavor or "mariadb", login)
    return " ".join(shlex.quote(a) for a in argv)


def env_lines(login: DBLogin, port: int | None = None) -> list[str]:
    """`ward db env`: shell exports for this database's login (and the tunnel's port, if known)."""
    q = shlex.quote
    out = [
        f"export WARD_DB={q(login.name)}",
        f"export WARD_DB_PROTOCOL={q(login.protocol)}",
        f"export WARD_DB_USER={q(login.db_user)}",
        f"export WARD_DB_NAME={q(login.db_name)}",
        f"export WARD_DB_CERT={q(str(login.cert_path))}",
        f"export WARD_DB_KEY={q(str(login.key_path))}",
        f"export WARD_DB_CA={q(str(login.ca_path))}",
    ]
    if login.protocol == "postgres":
        out.append(f"export PGUSER={q(login.db_user)}")
        if login.db_name:
            out.append(f"export PGDATABASE={q(login.db_name)}")
        if port:
            out += [f"export PGHOST={LOCAL_HOST}", f"export PGPORT={int(port)}", "export PGSSLMODE=disable"]
    elif port:
        out += [f"export MYSQL_HOST={LOCAL_HOST}", f"export MYSQL_TCP_PORT={int(port)}"]
    if not port:
        out.append(
            f"# The tunnel's port is not known here: run `ward proxy db {login.name} --tunnel` and add "
            f"`--port=N` to this command (or pass `--port=N` to both)."
        )
    return out


async def run_client(tunnel: DBTunnel, argv_for: Callable[[int], list[str]], env: Mapping[str, str]) -> int:
    """`ward db connect`: the tunnel on a free port, the client in the foreground (it gets the
    terminal and Ctrl-C; we ignore SIGINT meanwhile and pass SIGTERM/SIGHUP on); returns its
    exit code (128+N if a signal ended it)."""
    loop = asyncio.get_running_loop()
    port = await tunnel.start()
    installed: list[int] = []
    try:
        argv = argv_for(port)
        try:
            proc = await asyncio.create_subprocess_exec(*argv, env=dict(env))
        except OSError as exc:
            raise BadParameterError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None

        def forward(sig: int) -> None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                if sig == signal.SIGINT:
                    loop.add_signal_handler(sig, lambda: None)  # the terminal sent it to the client too
                else:
                    loop.add_signal_handler(sig, forward, sig)
                installed.append(sig)
        rc = await proc.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await tunnel.close()
    return rc if rc >= 0 else 128 - rc
