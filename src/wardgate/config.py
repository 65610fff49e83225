"""The daemon's config file, `wardgate.yaml`: strict pydantic models, defaults and a commented sample.

Every section forbids unknown keys so a typo (`listen_adr`) stops `wardgate start` with the file,
line and field instead of silently running with a default.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from wardgate.api.codec import ParseError, validate_yaml
from wardgate.api.resources import (
    DNS_LABEL_RE,
    LABEL_KEY_RE,
    NAME_RE,
    SYSTEM_ROLES,
    AppRewrite,
    AppSpec,
    Model,
)
from wardgate.durations import Duration
from wardgate.errors import BadParameterError

AUTH_PORT = 3025
PROXY_PORT = 3080
SSH_PORT = 3022
KUBE_PORT = 3026
DESKTOP_PORT = 3028

# ---------------------------------------------------------------- addresses

_LABEL = r"[A-Za-z0-9_][A-Za-z0-9_-]{0,62}"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?$")
_ADDR_FORMS = "use host:port, host, [::1]:port or :port"


def parse_addr(text: str, default_port: int | None) -> tuple[str, int]:
    """Split `host`, `host:port`, `[::1]:3025` or `:3025` (host "" = all interfaces).

    `default_port` fills in a missing port; None means the port is required.
    """
    s = str(text).strip()
    if not s:
        raise ValueError(f"empty address: {_ADDR_FORMS}")
    if "://" in s:
        raise ValueError(f"{s!r} is a URL; write only host:port (no scheme)")
    if any(c.isspace() for c in s) or "/" in s:
        raise ValueError(f"invalid address {s!r}: {_ADDR_FORMS}")
    port_text: str | None
    if s.startswith("["):
        m = re.fullmatch(r"\[([^\]]+)\](?::(.*))?", s)
        if not m:
            raise ValueError(f"invalid address {s!r}: an IPv6 address goes in brackets, like [::1]:3025")
        host, port_text = m.group(1), m.group(2)
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise ValueError(f"invalid IPv6 address {host!r} in {s!r}") from None
    elif s.count(":") > 1:
        try:
            ipaddress.IPv6Address(s.split("%", 1)[0])
        except ValueError:
            raise ValueError(
                f"invalid address {s!r}: put IPv6 addresses in brackets, like [::1]:3025"
            ) from None
        host, port_text = s, None
    else:
        host, sep, port_text = s.partition(":")
        if not sep:
            port_text = None
        if host and not _HOSTNAME.match(host):
            raise ValueError(f"invalid host {host!r} in {s!r}: {_ADDR_FORMS}")
    if port_text is None:
        if default_port is None:
            raise ValueError(f"address {s!r} needs a port, like {host or '0.0.0.0'}:3080")
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"invalid port {port_text!r} in {s!r}: use a number from 0 to 65535")
    return host, int(port_text)


def format_addr(host: str, port: int) -> str:
    """Inverse of parse_addr; brackets IPv6 hosts."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _addr(default_port: int | None, *, optional: bool) -> Any:
    def check(v: Any) -> str:
        if v is None or (optional and isinstance(v, str) and not v.strip()):
            if optional:
                return ""
            raise ValueError(f"an address is required: {_ADDR_FORMS}")
        if not isinstance(v, str):
            raise ValueError(f"expected an address as a string, like 127.0.0.1:{default_port or 3080}")
        return format_addr(*parse_addr(v, default_port))

    return Annotated[str, BeforeValidator(check)]


def _lower_or_switch(v: Any) -> Any:
    """YAML 1.1 reads `on`/`off` as booleans; give them back as the words people wrote."""
    if isinstance(v, bool):
        return "on" if v else "off"
    return v.lower() if isinstance(v, str) else v


Switch = BeforeValidator(_lower_or_switch)

AuthAddr = _addr(AUTH_PORT, optional=False)
AuthServerAddr = _addr(AUTH_PORT, optional=True)
ProxyAddr = _addr(PROXY_PORT, optional=False)
ProxyPublicAddr = _addr(PROXY_PORT, optional=True)
SSHAddr = _addr(SSH_PORT, optional=False)
PortAddr = _addr(None, optional=True)
"""Optional, and the port must be written out (services whose port has no convention)."""
KubeAddr = _addr(KUBE_PORT, optional=True)
DesktopAddr = _addr(DESKTOP_PORT, optional=True)


def _default_nodename() -> str:
    """The host name, made into a valid resource name (it names this node and, by default, the cluster)."""
    name = re.sub(r"[^A-Za-z0-9._@+-]", "-", socket.gethostname()).lstrip("._@+-")
    return name[:253] or "localhost"


def _check_name(v: str, what: str) -> str:
    if v and not NAME_RE.match(v):
        raise ValueError(
            f"{what} must start with a letter or digit and hold only letters, digits and . _ @ + -"
        )
    return v


# ---------------------------------------------------------------- wardgate (process-wide)


class StorageConfig(Model):
    type: str = "sqlite"
    path: str = ""
    """SQLite database file; empty means <data_dir>/backend.db."""

    @field_validator("type", mode="before")
    @classmethod
    def _type(cls, v: Any) -> Any:
        if isinstance(v, str) and v.lower() in ("postgres", "postgresql"):
            raise ValueError("postgres storage is not available in this version yet; use type: sqlite")
        if v != "sqlite":
            raise ValueError(f"unknown storage type {v!r}: use sqlite")
        return v


class LogConfig(Model):
    severity: Annotated[Literal["debug", "info", "warning", "error"], Switch] = "info"
    format: Annotated[Literal["text", "json"], Switch] = "text"

    @field_validator("severity", mode="before")
    @classmethod
    def _warn(cls, v: Any) -> Any:
        return "warning" if isinstance(v, str) and v.lower() == "warn" else v


_PIN = re.compile(r"^sha256:[0-9a-f]{64}$")


class WardgateConfig(Model):
    nodename: str = Field(default_factory=_default_nodename)
    data_dir: str = "./wardgate-data"
    auth_server: AuthServerAddr = f"127.0.0.1:{AUTH_PORT}"
    """Where services in this process reach the auth service when it runs elsewhere."""
    proxy_server: ProxyPublicAddr = ""
    """Join and reach auth through this proxy instead of auth_server."""
    auth_token: str = ""
    """A join token, or the path (starting with / . or ~) of a file holding it."""
    ca_pin: list[str] = Field(default_factory=list)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    _token: str = PrivateAttr(default="")

    @field_validator("nodename")
    @classmethod
    def _nodename(cls, v: str) -> str:
        if not v:
            raise ValueError("nodename must not be empty (leave it out to use the host name)")
        return _check_name(v, "nodename")

    @field_validator("data_dir")
    @classmethod
    def _data_dir(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("data_dir must not be empty (default ./wardgate-data)")
        return v

    @field_validator("ca_pin", mode="before")
    @classmethod
    def _pins(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v] if v else []
        if isinstance(v, list):
            for pin in v:
                if isinstance(pin, str) and not _PIN.match(pin.strip().lower()):
                    raise ValueError(
                        f"invalid CA pin {pin!r}: expected sha256: and 64 hex digits "
                        "(as printed by `wardctl status`)"
                    )
            v = [p.strip().lower() if isinstance(p, str) else p for p in v]
        return v

    @model_validator(mode="after")
    def _read_token(self) -> WardgateConfig:
        raw = self.auth_token.strip()
        if raw.startswith(("/", ".", "~")):
            path = Path(raw).expanduser()
            try:
                token = path.read_text().strip()
            except OSError as exc:
                _fail("auth_token", raw, f"cannot read the token file {raw}: {exc.strerror or exc}")
            if not token:
                _fail("auth_token", raw, f"the token file {raw} is empty")
            self._token = token
        else:
            self._token = raw
        return self

    @property
    def join_token(self) -> str:
        """The join token itself (read from the file when auth_token names one)."""
        return self._token


def _fail(field: str | tuple[str | int, ...], value: Any, message: str) -> Any:
    """Raise a validation error at a specific field from a model-level check (so it gets a line)."""
    loc = (field,) if isinstance(field, str) else field
    raise ValidationError.from_exception_data(
        "Config",
        [InitErrorDetails(type=PydanticCustomError("value_error", message), loc=loc, input=value)],
    )


# ---------------------------------------------------------------- auth service


class LockoutConfig(Model):
    max_attempts: int = Field(default=5, ge=0)
    """Failed logins before the account is locked; 0 turns lockout off."""
    duration: Duration = timedelta(minutes=30)

    @field_validator("duration")
    @classmethod
    def _positive(cls, v: timedelta) -> timedelta:
        if v <= timedelta(0):
            raise ValueError("lockout duration must be positive, like 30m")
        return v


class WebAuthnSettings(Model):
    rp_id: str = ""
    """The WebAuthn relying party id: a domain name (not an IP address); empty means the host of
    the proxy's public address (`localhost` when that is a loopback address)."""
    origins: list[str] = Field(default_factory=list)
    """Pages allowed to use passkeys, like https://proxy.example.com:3080; empty means the proxy's."""

    @field_validator("origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        for o in v:
            if not o.startswith("https://") or o.rstrip("/") != o:
                raise ValueError(f"origin {o!r} must look like https://host[:port] with no path")
        return v


class AuthenticationConfig(Model):
    type: str = "local"
    second_factor: Annotated[Literal["otp", "webauthn", "on", "off"], Switch] = "otp"
    """`on` accepts either OTP or WebAuthn; `off` allows password-only logins."""
    passwordless: bool = False
    """Allow signing in to the web UI with a passkey alone (no password)."""
    webauthn: WebAuthnSettings = Field(default_factory=WebAuthnSettings)
    password_min_length: int = Field(default=12, ge=6, le=128)
    lockout: LockoutConfig = Field(default_factory=LockoutConfig)

    @field_validator("type", mode="before")
    @classmethod
    def _type(cls, v: Any) -> Any:
        if isinstance(v, str) and v.lower() in ("oidc", "saml", "github"):
            raise ValueError(f"{v} logins are not available in this version yet; use type: local")
        if v != "local":
            raise ValueError(f"unknown authentication type {v!r}: use local")
        return v


class AuditConfig(Model):
    path: str = ""
    """SQLite file for audit events; empty means <data_dir>/audit.db."""


def parse_static_token(text: str) -> tuple[list[str], str]:
    """`node,app:SECRET` -> (["node", "app"], "SECRET"); raise ValueError saying how to write it."""
    roles_text, sep, secret = text.partition(":")
    if not sep or not secret.strip() or not roles_text.strip():
        raise ValueError(f"invalid static token {text!r}: write it as ROLES:SECRET, like node,app:s3cr3t")
    roles = [r.strip().lower() for r in roles_text.split(",") if r.strip()]
    bad = [r for r in roles if r not in SYSTEM_ROLES or r == "admin"]
    if bad:
        allowed = ", ".join(r for r in SYSTEM_ROLES if r != "admin")
        raise ValueError(f"invalid role(s) {', '.join(bad)} in static token: use {allowed}")
    return roles, secret.strip()


class AuthServiceConfig(Model):
    enabled: bool = True
    listen_addr: AuthAddr = f"127.0.0.1:{AUTH_PORT}"
    cluster_name: str = ""
    """Fixed at first start (it is inside every certificate); empty means the nodename."""
    authentication: AuthenticationConfig = Field(default_factory=AuthenticationConfig)
    tokens: list[str] = Field(default_factory=list)
    session_recording: Annotated[Literal["node", "proxy", "off"], Switch] = "node"
    audit: AuditConfig = Field(default_factory=AuditConfig)
    cert_ttl: Duration = timedelta(hours=12)

    @field_validator("cluster_name")
    @classmethod
    def _cluster(cls, v: str) -> str:
        return _check_name(v, "cluster_name")

    @field_validator("tokens")
    @classmethod
    def _tokens(cls, v: list[str]) -> list[str]:
        for t in v:
            parse_static_token(t)
        return v

    @field_validator("cert_ttl")
    @classmethod
    def _ttl(cls, v: timedelta) -> timedelta:
        if v < timedelta(minutes=1):
            raise ValueError("cert_ttl must be at least 1m, like 12h")
        return v

    def static_tokens(self) -> list[tuple[list[str], str]]:
        """The `tokens` list parsed into (system roles, secret) pairs."""
        return [parse_static_token(t) for t in self.tokens]


# ---------------------------------------------------------------- proxy and agent services


class KeyPairConfig(Model):
    key_file: str
    cert_file: str

    @field_validator("key_file", "cert_file")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a PEM file")
        return v


class ProxyServiceConfig(Model):
    enabled: bool = True
    listen_addr: ProxyAddr = f"0.0.0.0:{PROXY_PORT}"
    public_addr: ProxyPublicAddr = ""
    """host:port users and agents reach the proxy at (behind NAT or a load balancer)."""
    https_keypairs: list[KeyPairConfig] = Field(default_factory=list)
    """Web certificates for browsers. Accepted but not used yet: the proxy serves its certificate
    from the cluster's host CA."""
    web_idle_timeout: Duration = timedelta(minutes=30)
    """A browser session ends after this long without activity."""

    @field_validator("web_idle_timeout")
    @classmethod
    def _idle(cls, v: timedelta) -> timedelta:
        if v < timedelta(minutes=1):
            raise ValueError("web_idle_timeout must be at least 1m, like 30m")
        return v


class CommandLabelConfig(Model):
    name: str
    command: list[str] = Field(min_length=1)
    period: Duration = timedelta(minutes=1)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not LABEL_KEY_RE.match(v):
            raise ValueError("a label name is 1-63 letters, digits and /._:-")
        return v

    @field_validator("period")
    @classmethod
    def _period(cls, v: timedelta) -> timedelta:
        if v < timedelta(seconds=1):
            raise ValueError("period must be at least 1s, like 1m")
        return v


def _label_values(v: Any) -> Any:
    """YAML reads `tier: 1` as a number and `gpu: yes` as a boolean; labels are strings."""
    if isinstance(v, dict):
        out = {}
        for k, val in v.items():
            if isinstance(val, bool):
                val = "true" if val else "false"
            elif isinstance(val, int | float):
                val = str(val)
            out[str(k) if isinstance(k, int | float) and not isinstance(k, bool) else k] = val
        return out
    return v


class SSHServiceConfig(Model):
    enabled: bool = True
    listen_addr: SSHAddr = f"127.0.0.1:{SSH_PORT}"
    labels: Annotated[dict[str, str], BeforeValidator(_label_values)] = Field(default_factory=dict)
    commands: list[CommandLabelConfig] = Field(default_factory=list)

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if not LABEL_KEY_RE.match(k):
                raise ValueError(f"label key {k!r} must be 1-63 letters, digits and /._:-")
        return v

    @model_validator(mode="after")
    def _unique_commands(self) -> SSHServiceConfig:
        seen: set[str] = set()
        for i, c in enumerate(self.commands):
            if c.name in seen or c.name in self.labels:
                _fail(("commands", i, "name"), c.name, f"label {c.name!r} is defined twice")
            seen.add(c.name)
        return self


class ResourceSelector(Model):
    labels: dict[str, str] = Field(default_factory=dict)
    """Resources (`db` or `app`, from `wardctl create`) whose labels match all of these ("*" = any value)."""


def _app_spec_error(exc: ValidationError) -> str:
    return str(exc.errors()[0]["msg"]).removeprefix("Value error, ")


class AppConfig(Model):
    """One app this service publishes (registered with heartbeats, like a node)."""

    name: str
    uri: str
    """http://, https:// or tcp://host:port: where this service reaches the app."""
    public_addr: str = ""
    """Host name (optionally :port) users reach it at; empty means <name>.<proxy public host>."""
    description: str = ""
    labels: Annotated[dict[str, str], BeforeValidator(_label_values)] = Field(default_factory=dict)
    insecure_skip_verify: bool = False
    rewrite: AppRewrite = Field(default_factory=AppRewrite)

    @field_validator("name")
    @classmethod
    def _appname(cls, v: str) -> str:
        if not v:
            raise ValueError("an app needs a name")
        return _check_name(v, "name")

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        try:
            return AppSpec(uri=v).uri
        except ValidationError as exc:
            raise ValueError(_app_spec_error(exc)) from None

    @field_validator("public_addr")
    @classmethod
    def _public_addr(cls, v: str) -> str:
        try:
            return AppSpec(uri="http://127.0.0.1:1", public_addr=v).public_addr
        except ValidationError as exc:
            raise ValueError(_app_spec_error(exc)) from None

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if not LABEL_KEY_RE.match(k):
                raise ValueError(f"label key {k!r} must be 1-63 letters, digits and /._:-")
        return v

    @model_validator(mode="after")
    def _dns_name(self) -> AppConfig:
        if not self.public_addr and not DNS_LABEL_RE.match(self.name):
            _fail(
                "name",
                self.name,
                f"app name {self.name!r} must be a DNS label (letters, digits and -) because its public "
                "address defaults to <name>.<proxy host>; or set public_addr",
            )
        if self.insecure_skip_verify and not self.uri.lower().startswith("https://"):
            _fail("insecure_skip_verify", True, "insecure_skip_verify is only for https:// apps")
        return self


class AppServiceConfig(Model):
    enabled: bool = False
    listen_addr: PortAddr = ""
    apps: list[AppConfig] = Field(default_factory=list)
    resources: list[ResourceSelector] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> AppServiceConfig:
        seen: set[str] = set()
        for i, a in enumerate(self.apps):
            if a.name in seen:
                _fail(("apps", i, "name"), a.name, f"app {a.name!r} is listed twice")
            seen.add(a.name)
        return self


class DatabaseConfig(Model):
    """One database this service fronts (registered with heartbeats, like a node)."""

    name: str
    protocol: Literal["postgres", "mysql"]
    uri: str
    description: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    tls: dict[str, Any] = Field(default_factory=dict)
    """mode (verify-full, verify-ca, insecure, off), ca_cert_file, server_name."""
    auth: dict[str, Any] = Field(default_factory=dict)
    """passwords: {db_user: {file: PATH} or {env: VAR}} for databases that cannot trust the db CA."""

    @field_validator("name")
    @classmethod
    def _dbname(cls, v: str) -> str:
        return _check_name(v, "name")


class DBServiceConfig(Model):
    enabled: bool = False
    listen_addr: PortAddr = ""
    databases: list[DatabaseConfig] = Field(default_factory=list)
    resources: list[ResourceSelector] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> DBServiceConfig:
        seen: set[str] = set()
        for i, d in enumerate(self.databases):
            if d.name in seen:
                _fail(("databases", i, "name"), d.name, f"database {d.name!r} is listed twice")
            seen.add(d.name)
        return self


class KubernetesServiceConfig(Model):
    enabled: bool = False
    listen_addr: KubeAddr = ""


class DesktopServiceConfig(Model):
    enabled: bool = False
    listen_addr: DesktopAddr = ""


# ---------------------------------------------------------------- the file

_SERVICES = (
    "auth_service",
    "proxy_service",
    "ssh_service",
    "app_service",
    "db_service",
    "kubernetes_service",
    "desktop_service",
)
_WILDCARD = {"", "0.0.0.0", "::"}


class Config(Model):
    version: Literal["v1"] = "v1"
    wardgate: WardgateConfig = Field(default_factory=WardgateConfig)
    auth_service: AuthServiceConfig = Field(default_factory=AuthServiceConfig)
    proxy_service: ProxyServiceConfig = Field(default_factory=ProxyServiceConfig)
    ssh_service: SSHServiceConfig = Field(default_factory=SSHServiceConfig)
    app_service: AppServiceConfig = Field(default_factory=AppServiceConfig)
    db_service: DBServiceConfig = Field(default_factory=DBServiceConfig)
    kubernetes_service: KubernetesServiceConfig = Field(default_factory=KubernetesServiceConfig)
    desktop_service: DesktopServiceConfig = Field(default_factory=DesktopServiceConfig)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        """Checks that span sections: something to run, and no two listeners on one port."""
        enabled = [s for s in _SERVICES if getattr(self, s).enabled]
        if not enabled:
            _fail(
                ("auth_service", "enabled"),
                False,
                "every service is disabled, so there is nothing to run: enable at least one",
            )
        taken: dict[int, list[tuple[str, str]]] = {}
        for s in enabled:
            addr = getattr(self, s).listen_addr
            if not addr:
                continue
            host, port = parse_addr(addr, None)
            if port == 0:
                continue
            for other, other_host in taken.get(port, []):
                if host == other_host or host in _WILDCARD or other_host in _WILDCARD:
                    _fail(
                        (s, "listen_addr"),
                        addr,
                        f"port {port} is already taken by {other}.listen_addr; use another port",
                    )
            taken.setdefault(port, []).append((s, host))
        return self

    def enabled_services(self) -> list[str]:
        """Section names of the services this process runs, e.g. ["auth_service", "proxy_service"]."""
        return [s for s in _SERVICES if getattr(self, s).enabled]

    def data_path(self, *parts: str) -> Path:
        """A path under data_dir (`~` expanded; relative data_dir means relative to the cwd)."""
        return Path(self.wardgate.data_dir).expanduser().joinpath(*parts)

    @property
    def storage_path(self) -> Path:
        p = self.wardgate.storage.path
        return Path(p).expanduser() if p else self.data_path("backend.db")

    @property
    def audit_path(self) -> Path:
        p = self.auth_service.audit.path
        return Path(p).expanduser() if p else self.data_path("audit.db")

    @property
    def cluster_name(self) -> str:
        return self.auth_service.cluster_name or self.wardgate.nodename

    @property
    def nodename(self) -> str:
        return self.wardgate.nodename

    @property
    def proxy_public_addr(self) -> str:
        """host:port people reach the proxy at (for links); "" when no proxy runs here.

        Without public_addr: the listen address, with a wildcard host replaced by the host name.
        """
        p = self.proxy_service
        if p.public_addr:
            return p.public_addr
        if not p.enabled:
            return ""
        host, port = parse_addr(p.listen_addr, PROXY_PORT)
        if port == 0:
            return ""
        return format_addr(socket.gethostname() if host in _WILDCARD else host, port)


def load_config_text(text: str | bytes, source: str = "wardgate.yaml") -> Config:
    """Validate config text; errors read `wardgate.yaml:7: auth_service.listen_addr: …`."""
    return validate_yaml(Config, text, source)


def load_config(path: str | Path) -> Config:
    """Read and validate a config file, with an actionable message when it is missing."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadParameterError(
            f"config file {path} not found: create one with `wardgate configure > wardgate.yaml`, "
            "or run `wardgate start` without -c for the built-in defaults"
        ) from None
    except IsADirectoryError:
        raise BadParameterError(f"config file {path} is a directory, not a YAML file") from None
    except OSError as exc:
        raise BadParameterError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ParseError("not UTF-8 text", source=str(path)) from None
    return load_config_text(text, str(path))


def default_config(data_dir: str | None = None) -> Config:
    """What `wardgate start` runs with no config: auth + proxy + ssh, all on loopback."""
    return Config(
        wardgate=WardgateConfig(data_dir=data_dir or "./wardgate-data"),
        proxy_service=ProxyServiceConfig(listen_addr=f"127.0.0.1:{PROXY_PORT}"),
    )


SAMPLE_CONFIG = """\
# wardgate.yaml: configuration of the Wardgate daemon (`wardgate start -c wardgate.yaml`).
# Unknown keys are an error, so a typo stops the start instead of being ignored.
version: v1

wardgate:
  # Name of this host in the cluster; default: the machine's host name.
  # nodename: host1
  # Where keys, the SQLite backend and recordings are kept.
  data_dir: ./wardgate-data
  # Where services reach the auth service when it does not run in this process.
  auth_server: 127.0.0.1:3025
  # Join through a proxy (host:port) instead of auth_server; leave empty to use auth_server.
  proxy_server: ""
  # Join token for services joining a remote cluster, or a file holding it (/path, ./path or ~/path).
  auth_token: ""
  # Pins of the cluster CA (sha256:<hex>, from `wardctl status`), checked when joining.
  ca_pin: []
  # Where cluster state (users, roles, certificate authorities, nodes) is kept.
  storage:
    # Backend type: sqlite (postgres, for high availability, comes later).
    type: sqlite
    # SQLite file; empty means <data_dir>/backend.db.
    path: ""
  log:
    # debug, info, warning or error.
    severity: info
    # text or json.
    format: text

auth_service:
  # Run the auth service (certificate authority, users, roles, audit) in this process.
  enabled: true
  # Address of the auth API (services and wardctl connect here).
  listen_addr: 127.0.0.1:3025
  # Name of the cluster, written into every certificate; empty means the nodename.
  cluster_name: ""
  authentication:
    # local users with passwords (SSO connectors come later).
    type: local
    # otp, webauthn, on (either) or off (password only).
    second_factor: otp
    # Allow web sign-in with a passkey alone (no password).
    passwordless: false
    webauthn:
      # Relying party id for passkeys: a domain; empty means the proxy's public host.
      rp_id: ""
      # Pages allowed to use passkeys; empty means https://<proxy public address>.
      origins: []
    # Shortest password accepted.
    password_min_length: 12
    lockout:
      # Failed logins before the account is locked (0 turns lockout off).
      max_attempts: 5
      # How long the lock lasts.
      duration: 30m
  # Static join tokens as ROLES:SECRET, e.g. "node,app:a-long-random-secret"; prefer dynamic ones.
  tokens: []
  # Where interactive sessions are recorded: node, proxy or off.
  session_recording: node
  audit:
    # SQLite file for audit events; empty means <data_dir>/audit.db.
    path: ""
  # Default lifetime of user certificates (capped by the roles' max_session_ttl).
  cert_ttl: 12h

proxy_service:
  # Run the proxy: the one TLS port for web, SSH, databases, apps, Kubernetes and desktops.
  enabled: true
  # Address the proxy listens on.
  listen_addr: 0.0.0.0:3080
  # Address users and agents reach the proxy at, if it differs (NAT, load balancer).
  public_addr: ""
  # Web certificates for browsers (accepted, not used yet: the proxy serves its
  # certificate from the cluster's host CA). Example:
  # https_keypairs:
  #   - key_file: /etc/wardgate/privkey.pem
  #     cert_file: /etc/wardgate/fullchain.pem
  https_keypairs: []
  # A browser session ends after this long without activity.
  web_idle_timeout: 30m

ssh_service:
  # Run an SSH node in this process.
  enabled: true
  # Address the SSH node listens on (the proxy dials it).
  listen_addr: 127.0.0.1:3022
  # Static labels roles match with node_labels.
  labels:
    env: dev
  # Labels from commands, re-run every period.
  commands:
    - name: kernel
      command: [uname, -r]
      period: 1h

app_service:
  # Web and TCP application access behind the proxy (docs/apps.md).
  enabled: false
  # Not used: clients reach apps through the proxy's port (or a reverse tunnel).
  listen_addr: ""
  # Apps this service publishes. Example:
  # apps:
  #   - name: grafana
  #     description: dashboards
  #     uri: http://127.0.0.1:3000        # http://, https:// or tcp://host:port
  #     public_addr: grafana.example.com  # default: <name>.<proxy public host>
  #     labels: {env: prod}
  #     insecure_skip_verify: false       # https upstreams whose certificate cannot be verified
  #     rewrite:
  #       redirect: [localhost]           # more hosts whose redirects point at the public address
  #       headers:                        # extra request headers; {{internal.*}}/{{external.*}} expand
  #         - name: X-Grafana-User
  #           value: "{{internal.logins}}"
  apps: []
  # Also serve `app` resources created with `wardctl create` whose labels match:
  # resources: [{labels: {env: dev}}]
  resources: []

db_service:
  # Database access: PostgreSQL and MySQL/MariaDB behind the proxy (docs/databases.md).
  enabled: false
  # Not used: clients reach databases through the proxy's port (or a reverse tunnel).
  listen_addr: ""
  # Databases this service fronts. Example:
  # databases:
  #   - name: pg-main
  #     description: the main application database
  #     protocol: postgres          # or mysql
  #     uri: db.internal:5432
  #     labels: {env: prod}
  #     tls: {mode: verify-full, ca_cert_file: /etc/wardgate/db-ca.pem}
  #     auth: {passwords: {reporting: {env: PG_REPORTING_PASSWORD}}}
  databases: []
  # Also serve `db` resources created with `wardctl create` whose labels match:
  # resources: [{labels: {env: dev}}]
  resources: []

kubernetes_service:
  # Kubernetes access (configured in a later version).
  enabled: false
  # Address it listens on, if it listens (default port 3026); empty means none.
  listen_addr: ""

desktop_service:
  # Desktop access (configured in a later version).
  enabled: false
  # Address it listens on, if it listens (default port 3028); empty means none.
  listen_addr: ""
"""
"""Printed by `wardgate configure`; a test keeps it valid."""
