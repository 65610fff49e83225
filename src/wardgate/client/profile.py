"""The `~/.ward` store: who `ward` is logged in as, where, and the keys and certificates to prove it.

Layout (``WARD_HOME`` overrides ``~/.ward``)::

    current-profile                      the proxy address of the profile commands use by default
    <proxy>.yaml                         proxy, user, cluster, roles, logins, ttl, valid_until, ca_pin
    known_hosts                          `@cert-authority *.<cluster> <host CA key>` lines for OpenSSH
    keys/<proxy>/<user>                  SSH private key (OpenSSH format, 0600)
    keys/<proxy>/<user>.pub              its public key
    keys/<proxy>/<user>-cert.pub         the SSH user certificate
    keys/<proxy>/<user>-x509.pem         the X.509 client certificate
    keys/<proxy>/<user>-x509-key.pem     its private key (PKCS#8, 0600)
    keys/<proxy>/cas/host.pem            the cluster's host CA certificates (what we trust the proxy by)
    keys/<proxy>/<user>-db/              per-database keys and certificates (`wardgate.client.db`)
    keys/<proxy>/<user>-app/             per-app certificates for the X.509 key above (`wardgate.client.app`)

Directories are 0700 and every file is written atomically (temp file + rename), so a crash or
a concurrent `ward` never leaves half a key behind. `<proxy>` is `host:port`; colons are fine
in Linux file names and OpenSSH paths.

The known_hosts lines trust a cluster's host CA only for `*.<cluster>`: `ward ssh` and the
block `ward config` prints always present nodes as `<node>.<cluster>`, and node host
certificates carry `<node>.<cluster>` as a principal. Scoping the line (instead of
`@cert-authority *`) means a cluster's CA can never vouch for an unrelated host, even if
someone points OpenSSH at this file for other hosts. Each line ends with a
`wardgate-proxy=<proxy>` comment so re-login and logout replace only their own lines and
keep anything else a person added.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import ssl
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from wardgate.api.identityfile import server_trusting_context
from wardgate.errors import AuthenticationError, BadParameterError

DEFAULT_PROXY_PORT = 3080
KNOWN_HOSTS_MARK = "wardgate-proxy="
_NAME_OK = re.compile(r"^[^/\x00\s]+$")


class NotLoggedInError(AuthenticationError):
    """No usable profile: the fix is always `ward login`."""


class ExpiredError(AuthenticationError):
    """The profile's certificates have expired: refuse before dialling anything."""


def ward_home() -> Path:
    """`WARD_HOME` if set, else `~/.ward`."""
    env = os.environ.get("WARD_HOME", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".ward"


def split_host_port(addr: str, default_port: int = DEFAULT_PROXY_PORT) -> tuple[str, int]:
    """`host:port`, `[v6]:port` or a bare host; the port defaults to the proxy's 3080."""
    addr = addr.strip()
    if addr.startswith("["):
        host, _, rest = addr[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif addr.count(":") == 1:
        host, _, port_text = addr.partition(":")
    else:
        host, port_text = addr, ""
    if not host:
        raise BadParameterError(f"bad address {addr!r}: expected HOST:PORT")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise BadParameterError(f"bad port in {addr!r}: expected HOST:PORT with a port from 1 to 65535")
    return host, int(port_text)


def normalize_proxy(addr: str) -> str:
    """One spelling per proxy (`host:port`), so it names one profile and one key folder."""
    text = addr.strip()
    for prefix in ("https://", "http://"):
        if text.lower().startswith(prefix):
            text = text[len(prefix) :]
    text = text.rstrip("/")
    if not text or not _NAME_OK.match(text) or text.startswith("."):
        raise BadParameterError(f"bad proxy address {addr!r}: expected HOST:PORT, e.g. proxy.example:3080")
    host, port = split_host_port(text)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_user(user: str) -> str:
    if not user or not _NAME_OK.match(user) or user in (".", ".."):
        raise BadParameterError(f"bad user name {user!r}: it must not be empty or contain '/' or spaces")
    return user


@dataclass
class Credentials:
    """What `ward login` produced: private keys (made here) and what the cluster signed."""

    ssh_key_openssh: str
    ssh_public_line: str
    ssh_cert_line: str
    tls_cert_pem: str
    tls_key_pem: str
    host_ca_pems: list[str]
    host_ca_ssh_keys: list[str]


@dataclass
class Profile:
    """One login: enough to find the keys, check expiry and build TLS contexts without the network."""

    proxy: str
    user: str
    cluster: str
    valid_until: datetime
    roles: list[str] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)
    ttl: str = ""
    ca_pin: str = ""
    home: Path = field(default_factory=ward_home)

    # ---- where things live

    @property
    def key_dir(self) -> Path:
        return self.home / "keys" / self.proxy

    @property
    def key_path(self) -> Path:
        return self.key_dir / self.user

    @property
    def pub_path(self) -> Path:
        return self.key_dir / f"{self.user}.pub"

    @property
    def cert_path(self) -> Path:
        return self.key_dir / f"{self.user}-cert.pub"

    @property
    def tls_cert_path(self) -> Path:
        return self.key_dir / f"{self.user}-x509.pem"

    @property
    def tls_key_path(self) -> Path:
        return self.key_dir / f"{self.user}-x509-key.pem"

    @property
    def host_ca_path(self) -> Path:
        return self.key_dir / "cas" / "host.pem"

    @property
    def known_hosts_path(self) -> Path:
        return self.home / "known_hosts"

    @property
    def proxy_host(self) -> str:
        return split_host_port(self.proxy)[0]

    @property
    def proxy_port(self) -> int:
        return split_host_port(self.proxy)[1]

    # ---- validity

    def is_expired(self, now: datetime | None = None) -> bool:
        return (now or datetime.now(UTC)) >= self.valid_until

    def require_valid(self, now: datetime | None = None) -> Profile:
        """Raise the message a person can act on instead of letting a TLS handshake fail obscurely."""
        if self.is_expired(now):
            raise ExpiredError(
                f"your certificate expired at {self.valid_until:%Y-%m-%d %H:%M:%S} UTC; "
                f"run `ward login --proxy={self.proxy} --user={self.user}`"
            )
        return self

    def host_ca_pems(self) -> list[str]:
        try:
            text = self.host_ca_path.read_text()
        except FileNotFoundError:
            raise NotLoggedInError(
                f"the cluster CA for {self.proxy} is missing from {self.host_ca_path}: run `ward login` again"
            ) from None
        return [
            m.group(0)
            for m in re.finditer(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n?", text, re.S)
        ]

    @property
    def session_mfa_tls_path(self) -> Path:
        """A one-connection, MFA-verified X.509 certificate `ward ssh` leaves for its ProxyCommand."""
        return self.key_dir / "session-mfa-tls.pem"

    def ssl_context(self, alpn: str | None = None, *, cert_path: Path | None = None) -> ssl.SSLContext:
        """Mutual TLS to the proxy: our X.509 certificate out, only the cluster's host CA trusted in."""
        ctx = server_trusting_context(self.host_ca_pems())
        try:
            ctx.load_cert_chain(cert_path or self.tls_cert_path, self.tls_key_path)
        except (FileNotFoundError, ssl.SSLError) as exc:
            raise NotLoggedInError(
                f"cannot load your certificate for {self.proxy} ({exc}): run `ward login` again"
            ) from None
        if alpn:
            ctx.set_alpn_protocols([alpn])
        return ctx

    def to_dict(self) -> dict[str, Any]:
        """What `<proxy>.yaml` holds (and `ward status --format json` prints)."""
        d = asdict(self)
        d.pop("home")
        d["valid_until"] = utc_text(self.valid_until)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], home: Path) -> Profile:
        try:
            until = parse_utc(data["valid_until"])
            return cls(
                proxy=str(data["proxy"]),
                user=_check_user(str(data["user"])),
                cluster=str(data.get("cluster", "")),
                valid_until=until,
                roles=[str(r) for r in data.get("roles") or []],
                logins=[str(x) for x in data.get("logins") or []],
                ttl=str(data.get("ttl") or ""),
                ca_pin=str(data.get("ca_pin") or ""),
                home=home,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise NotLoggedInError(f"the profile is damaged ({exc!r}): run `ward login` again") from None


def parse_utc(value: Any) -> datetime:
    """A saved `valid_until` (ISO text with `Z`, or what YAML made of it) as an aware UTC time."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value


def utc_text(when: datetime) -> str:
    """How `valid_until` is saved: ISO 8601 in UTC with a `Z`."""
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def private_dir(path: Path) -> None:
    """Make `path` (and its parents) if needed; it is 0700 either way."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def atomic_write(path: Path, data: str | bytes, mode: int = 0o600) -> None:
    """Write to a temp file in the same folder, fsync, rename: readers see old or new, never half."""
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def known_hosts_lines(cluster: str, proxy: str, host_ca_ssh_keys: list[str]) -> list[str]:
    """`@cert-authority *.<cluster> <key> wardgate-proxy=<proxy>`, one per host CA key."""
    if not cluster or re.search(r"[\s,*?!]", cluster):
        raise BadParameterError(f"cluster name {cluster!r} cannot be used as an OpenSSH host pattern")
    out = []
    for key in host_ca_ssh_keys:
        parts = key.split()
        if len(parts) >= 2:
            out.append(f"@cert-authority *.{cluster} {parts[0]} {parts[1]} {KNOWN_HOSTS_MARK}{proxy}")
    return out


class ProfileStore:
    """Reads and writes profiles under one ward home."""

    def __init__(self, home: Path | str | None = None) -> None:
        self.home = Path(home).expanduser() if home else ward_home()

    @property
    def known_hosts_path(self) -> Path:
        return self.home / "known_hosts"

    def _yaml_path(self, proxy: str) -> Path:
        return self.home / f"{proxy}.yaml"

    def current_proxy(self) -> str:
        try:
            return (self.home / "current-profile").read_text().strip()
        except FileNotFoundError:
            return ""

    def set_current(self, proxy: str) -> None:
        private_dir(self.home)
        atomic_write(self.home / "current-profile", normalize_proxy(proxy) + "\n")

    def load(self, proxy: str | None = None) -> Profile:
        """The profile for `proxy`, or the current one; `NotLoggedInError` says what to run."""
        name = normalize_proxy(proxy) if proxy else self.current_proxy()
        if not name:
            raise NotLoggedInError("not logged in: run `ward login --proxy=HOST:PORT --user=NAME`")
        try:
            data = yaml.safe_load(self._yaml_path(name).read_text())
        except FileNotFoundError:
            raise NotLoggedInError(
                f"not logged in to {name}: run `ward login --proxy={name} --user=NAME`"
            ) from None
        except yaml.YAMLError as exc:
            raise NotLoggedInError(f"the profile for {name} is damaged ({exc}): log in again") from None
        if not isinstance(data, dict):
            raise NotLoggedInError(f"the profile for {name} is damaged: run `ward login` again")
        return Profile.from_dict(data, self.home)

    def profiles(self) -> list[Profile]:
        out = []
        if self.home.is_dir():
            for p in sorted(self.home.glob("*.yaml")):
                with contextlib.suppress(NotLoggedInError, BadParameterError):
                    out.append(self.load(p.name[: -len(".yaml")]))
        return out

    def save(self, profile: Profile, creds: Credentials, *, make_current: bool = True) -> Profile:
        """Write keys first and the profile last, so a profile never points at missing keys."""
        profile.proxy = normalize_proxy(profile.proxy)
        _check_user(profile.user)
        profile.home = self.home
        with contextlib.suppress(NotLoggedInError, BadParameterError):
            old = self.load(profile.proxy)
            if old.user != profile.user:
                self.remove(profile.proxy)  # one user per proxy: don't leave the last user's keys behind
        for d in (self.home, self.home / "keys", profile.key_dir, profile.host_ca_path.parent):
            private_dir(d)
        atomic_write(profile.key_path, creds.ssh_key_openssh, 0o600)
        atomic_write(profile.pub_path, creds.ssh_public_line.strip() + "\n", 0o644)
        atomic_write(profile.cert_path, creds.ssh_cert_line.strip() + "\n", 0o644)
        atomic_write(profile.tls_key_path, creds.tls_key_pem, 0o600)
        atomic_write(profile.tls_cert_path, creds.tls_cert_pem.strip() + "\n", 0o644)
        atomic_write(profile.host_ca_path, "".join(p.strip() + "\n" for p in creds.host_ca_pems), 0o644)
        self._update_known_hosts(
            profile.proxy, known_hosts_lines(profile.cluster, profile.proxy, creds.host_ca_ssh_keys)
        )
        atomic_write(
            self._yaml_path(profile.proxy), yaml.safe_dump(profile.to_dict(), sort_keys=False), 0o600
        )
        if make_current:
            self.set_current(profile.proxy)
        return profile

    def remove(self, proxy: str | None = None) -> Profile | None:
        """Delete a profile, its keys and its known_hosts lines; returns what was removed."""
        name = normalize_proxy(proxy) if proxy else self.current_proxy()
        if not name:
            return None
        try:
            profile: Profile | None = self.load(name)
        except NotLoggedInError:
            profile = None
        key_dir = self.home / "keys" / name
        if key_dir.is_dir():
            for p in sorted(key_dir.rglob("*"), key=lambda q: len(q.parts), reverse=True):
                if p.is_dir() and not p.is_symlink():
                    p.rmdir()
                else:
                    p.unlink()
            key_dir.rmdir()
        with contextlib.suppress(FileNotFoundError):
            self._yaml_path(name).unlink()
        self._update_known_hosts(name, [])
        if self.current_proxy() == name:
            with contextlib.suppress(FileNotFoundError):
                (self.home / "current-profile").unlink()
        return profile

    def _update_known_hosts(self, proxy: str, lines: list[str]) -> None:
        path = self.known_hosts_path
        try:
            old = path.read_text().splitlines()
        except FileNotFoundError:
            if not lines:
                return
            old = []
        mark = f" {KNOWN_HOSTS_MARK}{proxy}"
        kept = [line for line in old if not line.rstrip().endswith(mark)]
        private_dir(self.home)
        atomic_write(path, "".join(line + "\n" for line in [*kept, *lines]), 0o644)
