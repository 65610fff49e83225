"""Applications for `ward`: per-app certificates, the command lines that use them, and the local
listener (`ward proxy app`) any client can use without certificates.

Layout, next to the profile's keys (``~/.ward/keys/<proxy>/<user>-app/``, 0700)::

    <NAME>-x509.pem   the certificate `ward app login` got: the user's identity routed to app NAME,
                      for the profile's own TLS key (``<user>-x509-key.pem``)
    <NAME>.yaml       name, kind (http/tcp), public_addr (host:port), valid_until

The cluster's host CA is the profile's ``cas/host.pem`` (written by `ward login`; `ward app
login` writes it when it is missing): `curl --cacert` and the local listener trust the proxy by
it. `ward logout` removes the whole key folder, so app certificates go with it. Because an app
certificate is for the profile's key, a new `ward login` (new key) makes the old ones useless:
they are then treated as absent and renewed where that happens on its own (`ward proxy app`).

The data path: every connection to the local listener becomes its own TLS connection to the
proxy's one port with SNI = the app's public host and ALPN `http/1.1` (HTTP apps: the local
client speaks plain HTTP, the proxy and the app service authenticate by our certificate) or
`ward-tcp` (TCP apps), relayed both ways by `wardgate.client.localproxy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import shlex
import socket
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from wardgate.api.client import ConnectionFailed
from wardgate.auth.certs import verify_tls_identity
from wardgate.auth.identity import Identity
from wardgate.client.localproxy import (
    BUFFER_SIZE,
    LOCAL_HOST,
    ErrorSink,
    LocalTunnel,
    TLSDial,
    server_hostname,
    tls_failure,
    unreachable,
)
from wardgate.client.profile import (
    ExpiredError,
    NotLoggedInError,
    Profile,
    ProfileStore,
    atomic_write,
    private_dir,
    split_host_port,
    utc_text,
)
from wardgate.client.proxyclient import ProxyClient
from wardgate.client.routed import LoginStore, RoutedLogin, check_resource_name, issued_cert, session_factor
from wardgate.client.tlsstream import open_tls_connection
from wardgate.errors import (
    AccessDeniedError,
    AuthenticationError,
    BadParameterError,
    NotFoundError,
    WardgateError,
)
from wardgate.keys import load_private_key, load_x509, load_x509_pem_list, public_key_pem
from wardgate.proxy.relay import RelayStats

ALPN = {"http": "http/1.1", "tcp": "ward-tcp"}
PROXY_ROLE = "proxy"
RENEW_MARGIN = timedelta(seconds=10)
"""A certificate with less left than this is renewed before use: it only has to outlive the
handshake (the app service ends connections whose certificate expires), and certificates for
apps that need a second factor per session last a minute, so a larger margin would ask again."""

CONFIG_FORMATS = ("curl", "uri", "ca", "cert", "key", "json")


class NotLoggedInToApp(NotLoggedInError):
    """No (usable) certificate for this app: the fix is `ward app login NAME`."""


class AppCertExpired(NotLoggedInToApp):
    pass


def check_app_name(name: str) -> str:
    return check_resource_name(name, "app", "ward apps ls")


def app_not_found(name: str) -> NotFoundError:
    return NotFoundError(
        f'app "{name}" not found: `ward apps ls` lists the ones you can reach '
        "(an app is listed while an app service serves it)"
    )


def public_endpoint(public_addr: str, default_port: int) -> tuple[str, int]:
    """`host[:port]` (a scheme and path tolerated) → (host, port); the port defaults to the proxy's."""
    text = public_addr.strip()
    for prefix in ("https://", "http://", "tcp://"):
        if text.lower().startswith(prefix):
            text = text[len(prefix) :]
    text = text.split("/", 1)[0]
    return split_host_port(text, default_port)


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---------------------------------------------------------------- the certificate store


@dataclass
class AppLogin(
    RoutedLogin,
    noun="app",
    command="app",
    error=NotLoggedInToApp,
    expired_error=AppCertExpired,
    cert_suffix="-x509.pem",
):
    """One `ward app login`: which app, where it is published, until when, and the files to use.

    Its `ssl_context` checks no host names (`server_trusting_context`): the app's public host,
    sent as SNI, need not be in the proxy's certificate (`<name>.localhost` never is). Who
    answered is checked after the handshake instead, by `check_proxy_identity`.
    """

    name: str
    kind: str
    public_addr: str
    """host:port clients ask for (SNI, curl's URL)."""
    valid_until: datetime
    folder: Path
    key_path: Path
    ca_path: Path

    @property
    def public_host(self) -> str:
        return split_host_port(self.public_addr)[0]

    @property
    def public_port(self) -> int:
        return split_host_port(self.public_addr)[1]

    @property
    def alpn(self) -> str:
        try:
            return ALPN[self.kind]
        except KeyError:
            raise BadParameterError(
                f'app "{self.name}" is of kind {self.kind!r}, which ward cannot reach'
            ) from None

    @property
    def uri(self) -> str:
        """`https://host[:port]/` for HTTP apps, `tcp://host:port` for TCP apps."""
        host, port = self.public_host, self.public_port
        shown = f"[{host}]" if ":" in host else host
        if self.kind == "tcp":
            return f"tcp://{shown}:{port}"
        return f"https://{shown}/" if port == 443 else f"https://{shown}:{port}/"

    def matches_key(self) -> bool:
        """Is the certificate for the key it will be used with? (Not after a new `ward login`.)"""
        try:
            cert = load_x509(self.cert_path.read_bytes())
            key = load_private_key(self.key_path.read_bytes())
        except (OSError, WardgateError):
            return False
        return public_key_pem(cert.public_key()) == public_key_pem(key)

    def ca_pems(self) -> list[str]:
        try:
            text = self.ca_path.read_text()
        except FileNotFoundError:
            raise NotLoggedInToApp(
                f"the cluster CA is missing from {self.ca_path}: run `ward login` again"
            ) from None
        if "-----BEGIN CERTIFICATE-----" not in text:
            raise NotLoggedInToApp(f"no cluster CA in {self.ca_path}: run `ward login` again")
        return [text]

    def to_dict(self) -> dict[str, Any]:
        """What `<NAME>.yaml` holds."""
        return {
            "name": self.name,
            "kind": self.kind,
            "public_addr": self.public_addr,
            "valid_until": utc_text(self.valid_until),
        }


class AppStore(LoginStore[AppLogin]):
    """The app certificates of one profile (see the module docstring for the layout)."""

    login_class = AppLogin
    folder_suffix = "-app"
    files = (".yaml", "-x509.pem")
    renew_margin = RENEW_MARGIN

    check_name = staticmethod(check_app_name)

    def _app_login(self, name: str, kind: str, public_addr: str, valid_until: datetime) -> AppLogin:
        host, port = public_endpoint(public_addr, self.profile.proxy_port)
        return AppLogin(
            name=name,
            kind=kind,
            public_addr=_join_host_port(host, port),
            valid_until=valid_until,
            folder=self.folder,
            key_path=self.profile.tls_key_path,
            ca_path=self.profile.host_ca_path,
        )

    def from_yaml(self, name: str, data: Any, valid_until: datetime) -> AppLogin:
        return self._app_login(name, str(data["kind"]), str(data["public_addr"]), valid_until)

    def usable(self, login: AppLogin) -> bool:
        """For today's key (not one of an earlier `ward login`)."""
        return login.matches_key()

    def save(
        self, name: str, *, kind: str, public_addr: str, cert_pem: str, ca_pems: Sequence[str]
    ) -> AppLogin:
        """Certificate (and a missing CA file) first, the small yaml last: it never points at
        missing files."""
        check_app_name(name)
        profile = self.profile
        cert = load_x509(cert_pem)
        key = _tls_key(profile)
        self._check_cert(cert, key)
        login = self._app_login(name, kind, public_addr, cert.not_valid_after_utc)
        self.make_folder()
        if not profile.host_ca_path.exists():  # `ward login` keeps one; curl --cacert needs it
            if not ca_pems:
                raise WardgateError(
                    "the cluster sent no CA to verify the proxy by: not saving the certificate"
                )
            private_dir(profile.host_ca_path.parent)
            atomic_write(profile.host_ca_path, "".join(p.strip() + "\n" for p in ca_pems), 0o644)
        return self._write(login, cert_pem)

    def removed(self, name: str, found: bool) -> None:
        if found and not any(self.folder.iterdir()):
            with contextlib.suppress(OSError):
                self.folder.rmdir()


def _tls_key(profile: Profile) -> Any:
    """The profile's TLS key, which app certificates are for."""
    try:
        return load_private_key(profile.tls_key_path.read_bytes())
    except FileNotFoundError:
        raise NotLoggedInError(f"your key for {profile.proxy} is missing: run `ward login` again") from None


# ---------------------------------------------------------------- talking to the cluster


async def visible_apps(profile: Profile) -> list[dict[str, Any]]:
    """What `ward apps ls` shows: name, description, labels, uri_kind, public_addr, require_session_mfa."""
    async with ProxyClient.for_profile(profile) as c:
        return await c.visible_apps()


def find_app(apps: Sequence[Mapping[str, Any]], name: str) -> Mapping[str, Any]:
    entry = next((a for a in apps if a.get("name") == name), None)
    if entry is None:
        raise app_not_found(name)
    return entry


async def app_login(
    profile: Profile,
    name: str,
    *,
    store: AppStore | None = None,
    ask_code: Callable[[], str] | None = None,
) -> AppLogin:
    """`ward app login`: a certificate routed to app NAME for the profile's TLS key, saved in the store.

    `ask_code` supplies a one-time code when the roles want a second factor per session.
    """
    check_app_name(name)
    store = store or AppStore(profile)
    key = _tls_key(profile)
    async with ProxyClient.for_profile(profile) as c:
        entry = find_app(await c.visible_apps(), name)
        kind = str(entry.get("uri_kind") or "")
        if kind not in ALPN:
            raise BadParameterError(f'app "{name}" is of kind {kind!r}, which ward cannot reach')
        public_addr = str(entry.get("public_addr") or "")
        if not public_addr:
            raise WardgateError(f'the cluster did not say where app "{name}" is published')
        factor = session_factor(
            entry,
            ask_code,
            f'your roles require a second factor for each session on app "{name}": '
            f"run `ward app login {name}` in a terminal",
        )
        try:
            resp = await c.app_user_cert(app=name, tls_public_key=public_key_pem(key), **factor)
        except (AccessDeniedError, AuthenticationError, BadParameterError, NotFoundError) as exc:
            raise type(exc)(f'cannot log in to app "{name}": {exc}') from None
    cert_pem, ca_pems = issued_cert(profile, resp)
    return store.save(name, kind=kind, public_addr=public_addr, cert_pem=cert_pem, ca_pems=ca_pems)


def require_login(profile: Profile, name: str) -> None:
    """A new app certificate needs a valid `ward login`: refuse with that fix before dialling."""
    if profile.is_expired():
        raise ExpiredError(
            f'cannot get a certificate for app "{name}": your login to {profile.proxy} expired at '
            f"{profile.valid_until:%Y-%m-%d %H:%M:%S} UTC; run `ward login --proxy={profile.proxy} "
            f"--user={profile.user}`"
        )


async def ensure_app_login(
    profile: Profile,
    name: str,
    *,
    store: AppStore | None = None,
    ask_code: Callable[[], str] | None = None,
    margin: timedelta = RENEW_MARGIN,
) -> AppLogin:
    """The saved login if it is usable (valid a while yet, for today's key); else log in again,
    which needs a valid `ward login` (refused with that fix otherwise)."""
    store = store or AppStore(profile)
    found = store.current(check_app_name(name), margin)
    if found is not None:
        return found
    require_login(profile, name)
    return await app_login(profile, name, store=store, ask_code=ask_code)


# ---------------------------------------------------------------- command lines


Resolver = Callable[..., Sequence[Any]]


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def resolve_option(host: str, port: int, proxy_host: str, resolver: Resolver = socket.getaddrinfo) -> str:
    """curl's `--resolve HOST:PORT:IP` value when the app's host has no address on this machine
    but the proxy's has (`grafana.proxy.localhost` on a loopback proxy); empty otherwise."""
    if _is_ip(host):
        return ""
    try:
        resolver(host, port, type=socket.SOCK_STREAM)
        return ""
    except (OSError, UnicodeError):
        pass
    try:
        infos = resolver(proxy_host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return ""
    if not infos:
        return ""
    ip = str(infos[0][4][0])
    return f"{host}:{port}:{f'[{ip}]' if ':' in ip else ip}"


def curl_argv(login: AppLogin, profile: Profile, *, resolver: Resolver = socket.getaddrinfo) -> list[str]:
    """`curl --cacert CA --cert CERT --key KEY [--resolve H:P:IP] https://HOST:PORT/`."""
    # curl reads `--cert FILE:PASSWORD`: the colon of our `<host>:<port>` key folder must be escaped.
    cert = str(login.cert_path).replace("\\", "\\\\").replace(":", "\\:")
    argv = ["curl", "--cacert", str(login.ca_path), "--cert", cert, "--key", str(login.key_path)]
    if resolve := resolve_option(login.public_host, login.public_port, profile.proxy_host, resolver):
        argv += ["--resolve", resolve]
    return [*argv, login.uri]


def openssl_argv(login: AppLogin, profile: Profile) -> list[str]:
    """A TCP app by hand: `openssl s_client` to the proxy with the app's SNI, ALPN and certificate."""
    argv = ["openssl", "s_client", "-quiet", "-verify_return_error", "-connect", profile.proxy]
    argv += ["-servername", login.public_host, "-alpn", ALPN["tcp"], "-CAfile", str(login.ca_path)]
    return [*argv, "-cert", str(login.cert_path), "-key", str(login.key_path)]


def command_line(login: AppLogin, profile: Profile, *, resolver: Resolver = socket.getaddrinfo) -> str:
    """The ready-to-paste line for this app: curl for HTTP apps, openssl s_client for TCP apps."""
    argv = (
        openssl_argv(login, profile) if login.kind == "tcp" else curl_argv(login, profile, resolver=resolver)
    )
    return shlex.join(argv)


def describe(login: AppLogin, profile: Profile, *, resolver: Resolver = socket.getaddrinfo) -> dict[str, Any]:
    """Everything `ward app config --format json` prints."""
    return {
        **login.to_dict(),
        "uri": login.uri,
        "proxy": profile.proxy,
        "alpn": ALPN.get(login.kind, ""),
        "cert": str(login.cert_path),
        "key": str(login.key_path),
        "ca": str(login.ca_path),
        "expired": login.is_expired(),
        "resolve": resolve_option(login.public_host, login.public_port, profile.proxy_host, resolver),
        "command": command_line(login, profile, resolver=resolver),
    }


def config_text(
    login: AppLogin, profile: Profile, fmt: str = "curl", *, resolver: Resolver = socket.getaddrinfo
) -> str:
    """`ward app config NAME --format FMT`: one line (a path, a URI, a command) or JSON."""
    if fmt == "curl":
        return command_line(login, profile, resolver=resolver)
    if fmt == "uri":
        return login.uri
    if fmt == "ca":
        return str(login.ca_path)
    if fmt == "cert":
        return str(login.cert_path)
    if fmt == "key":
        return str(login.key_path)
    if fmt == "json":
        return json.dumps(describe(login, profile, resolver=resolver), indent=2)
    raise BadParameterError(f"unknown format {fmt!r}: use one of {', '.join(CONFIG_FORMATS)}")


def local_command(kind: str, host: str, port: int) -> str:
    """What to run against `ward proxy app`'s listener (on this machine: a wildcard bind is
    reached through the loopback address)."""
    host = {"0.0.0.0": LOCAL_HOST, "::": "::1", "": LOCAL_HOST}.get(host, host)
    shown = f"[{host}]" if ":" in host else host
    if kind == "tcp":
        return f"nc {shlex.quote(host)} {port}"
    return f"curl http://{shown}:{port}/"


# ---------------------------------------------------------------- who answered


def check_proxy_identity(der: bytes | None, ca_certs: Sequence[x509.Certificate], proxy: str) -> Identity:
    """Require that the certificate the proxy presented is a current cluster host certificate
    whose identity is a proxy's.

    The TLS handshake already checked the chain against the cluster's host CA, but with host
    name checks off: we dial the proxy's address while sending the app's host as SNI, and that
    name need not be in the proxy's certificate (`<name>.localhost` never is). Any service of
    the cluster has a host-CA certificate, though, so without this check a node or app agent
    could pose as the proxy and be handed our app certificate and traffic.
    """
    if not der:
        raise ConnectionFailed(f"the proxy at {proxy} presented no certificate")
    try:
        identity = verify_tls_identity(der, ca_certs)
    except AuthenticationError as exc:
        raise ConnectionFailed(f"cannot verify the proxy at {proxy}: {exc}") from None
    if identity.system_role != PROXY_ROLE:
        raise ConnectionFailed(
            f"{proxy} is not a Wardgate proxy: its certificate is for "
            f"{identity.host_id or identity.user!r} with system role {identity.system_role or 'none'!r}; "
            "check the proxy address of your profile (`ward status`)"
        )
    return identity


def _check_alpn(profile: Profile, login: AppLogin, chosen: str | None) -> None:
    if chosen != login.alpn:
        raise ConnectionFailed(
            f"the proxy at {profile.proxy} does not offer app access ({login.alpn}; it chose "
            f"{chosen or 'no protocol'}): is it a Wardgate proxy with app access enabled?"
        )


def _tls_failure(profile: Profile, login: AppLogin, exc: ssl.SSLError) -> WardgateError:
    return tls_failure(
        profile,
        exc,
        subject=f'app "{login.name}"',
        relogin=f"ward app login {login.name}",
        expired=AppCertExpired,
    )


def _ca_certs(login: AppLogin) -> list[x509.Certificate]:
    return [c for pem in login.ca_pems() for c in load_x509_pem_list(pem)]


async def open_app_stream(
    profile: Profile, login: AppLogin, *, dial_timeout: float = 30.0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """One TLS connection to the proxy for app `login.name` (for tools and tests): plain HTTP
    (HTTP apps) or the TCP app's own protocol flows through the returned streams."""
    login.require_valid()
    ctx = login.ssl_context()
    ca_certs = _ca_certs(login)
    host, port = split_host_port(profile.proxy)
    try:
        reader, writer = await asyncio.wait_for(
            open_tls_connection(host, port, ctx, server_hostname=server_hostname(login.public_host)),
            dial_timeout,
        )
    except ssl.SSLError as exc:
        raise _tls_failure(profile, login, exc) from None
    except (OSError, TimeoutError) as exc:
        raise unreachable(profile, exc) from None
    try:
        _check_alpn(profile, login, writer.get_extra_info("selected_alpn"))
        check_proxy_identity(
            writer.get_extra_info("ssl_object").getpeercert(binary_form=True), ca_certs, profile.proxy
        )
    except BaseException:
        writer.close()
        raise
    return reader, writer


# ---------------------------------------------------------------- the local listener


def _file_signature(paths: Sequence[Path]) -> tuple[tuple[int, int, int], ...] | None:
    out = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            return None
        out.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


@dataclass
class _Ready:
    """A login ready for connections: its TLS context and CA certificates, parsed once."""

    login: AppLogin
    ctx: ssl.SSLContext
    ca_certs: list[x509.Certificate]
    signature: tuple[tuple[int, int, int], ...] | None


class AppTunnel(LocalTunnel[_Ready]):
    """`ward proxy app`: a local listener; every connection it accepts gets its own TLS connection
    to the proxy (SNI = the app's public host, ALPN by kind, the app certificate) and is relayed.

    Before each connection the saved login is checked (cheaply: file times, unless they changed):
    a `ward app login` or `ward login` in another terminal is picked up, and a certificate that
    expired (or belongs to an older key) is renewed, asking `ask_code` for a one-time code when
    the roles want one; while the profile's own login has expired, connections are refused with
    the fix (`ward login`). Per-connection problems go to `on_error`; the listener keeps going.
    """

    def __init__(
        self,
        profile: Profile,
        name: str,
        *,
        ask_code: Callable[[], str] | None = None,
        on_error: ErrorSink | None = None,
        dial_timeout: float = 30.0,
        buffer_size: int = BUFFER_SIZE,
    ) -> None:
        self.name = check_app_name(name)
        self.ask_code = ask_code
        self.renewals = 0
        """Certificates this listener fetched itself."""
        self._ready: _Ready | None = None
        self._lock = asyncio.Lock()
        super().__init__(
            profile,
            f'app "{self.name}"',
            on_error=on_error,
            dial_timeout=dial_timeout,
            buffer_size=buffer_size,
        )

    def _paths(self, profile: Profile) -> list[Path]:
        folder = AppStore(profile).folder
        return [
            profile.tls_key_path,
            profile.tls_cert_path,
            profile.host_ca_path,
            folder / f"{self.name}.yaml",
            folder / f"{self.name}-x509.pem",
        ]

    def _reload_profile(self) -> Profile:
        """The profile as saved now (a `ward login` elsewhere renews it), else the one we were given."""
        try:
            fresh = ProfileStore(self.profile.home).load(self.profile.proxy)
        except (NotLoggedInError, BadParameterError):
            return self.profile
        return fresh

    async def prepare(self) -> _Ready:
        async with self._lock:  # one renewal at a time; connections waiting meanwhile reuse it
            ready = self._ready
            if (
                ready is not None
                and ready.signature is not None
                and ready.signature == _file_signature(self._paths(self.profile))
                and not ready.login.is_expired(margin=RENEW_MARGIN)
            ):
                return ready
            self.profile = profile = self._reload_profile()
            store = AppStore(profile)
            login = store.current(self.name)
            if login is None:
                require_login(profile, self.name)
                login = await app_login(profile, self.name, store=store, ask_code=self.ask_code)
                self.renewals += 1
            self._ready = _Ready(
                login, login.ssl_context(), _ca_certs(login), _file_signature(self._paths(profile))
            )
            return self._ready

    def dial_params(self, ready: _Ready) -> TLSDial:
        return TLSDial(ready.ctx, server_hostname(ready.login.public_host))

    def tls_failure(self, ready: _Ready, exc: ssl.SSLError) -> WardgateError:
        return _tls_failure(self.profile, ready.login, exc)

    def check_peer(self, ready: _Ready, ssl_object: ssl.SSLObject | None) -> None:
        _check_alpn(self.profile, ready.login, ssl_object.selected_alpn_protocol() if ssl_object else None)
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        check_proxy_identity(der, ready.ca_certs, self.profile.proxy)

    def check_end(self, ready: _Ready, stats: RelayStats) -> None:
        super().check_end(ready, stats)
        if stats.a_to_b and not stats.b_to_a and stats.reason in ("done", "error"):
            raise ConnectionFailed(
                f'the proxy closed the connection to app "{self.name}" without an answer: your '
                f"certificate was refused (run `ward app login {self.name}` again) or no app "
                "service serves it right now"
            )
